"""MatTA training: configuration, schedule, checkpoints, the parallel engines and the loop.

`train(make_config({...}))` is what `matta train` runs: one `Run`, then (by default) the
Student trained alone as a baseline. Reading a run directory back
(`load_run`, `build_model`) is `matta.runs`; `load_run` is re-exported here.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_toml, make_config
from .schedule import learning_rate
from .trainer import Run, format_table, train


def __getattr__(name):
    # `matta.train.load_run` is matta.runs' (which imports this package's config and
    # checkpoint modules), so it is looked up on first use rather than imported here.
    if name == "load_run":
        from ..runs import load_run

        return load_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Run",
    "TrainConfig",
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
