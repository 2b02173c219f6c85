"""MatTA training: configuration, schedule, checkpoints and the training loop.

`Run(TrainConfig(...)).train()` is what `matta train` runs; `load_run(run_dir)` gives back
a run's configuration, nested model and tokenizer.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_toml, make_config
from .schedule import distill_ramp, learning_rate
from .trainer import Run, format_table, load_run

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Run",
    "TrainConfig",
    "distill_ramp",
    "format_table",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "load_run",
    "load_toml",
    "make_config",
    "save_checkpoint",
]
