"""The run-directory layer: reading what `matta train` wrote (config, weights, tokenizer).

Stand-in until the module moves here from matta/train/trainer.py; the import is inside the
function so that matta.evaluation can import this module while the trainer imports it.
"""


def load_run(run_dir, device="cpu"):
    """(config, model with the latest checkpoint's weights, tokenizer) of a run directory."""
    from .train.trainer import load_run as _load_run

    return _load_run(run_dir, device)
