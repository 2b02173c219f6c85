"""MatTA training: configuration, tasks, the run folder, checkpoints, the parallel engines and the loop.

`train(make_config({...}))` is what `matta train` runs: one `Run`, then (by default) the
Student trained alone as a baseline (baseline.py). `load_run(run_dir)` reads a run folder
back: its config, its nested model with the latest weights, its tokenizer.
"""
from .baseline import train
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_toml, make_config
from .report import format_table
from .run_dir import build_model, load_run
from .schedule import learning_rate
from .tasks import TASKS, Task
from .trainer import Run

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Run",
    "TASKS",
    "Task",
    "TrainConfig",
    "build_model",
    "format_table",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "load_run",
    "load_toml",
    "make_config",
    "save_checkpoint",
    "train",
]
