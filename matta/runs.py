"""Run directories: the model a run trains, and reading a finished (or running) run back.

`matta train --out RUN_DIR` writes (see matta/train/trainer.py for the rest):
    config.json      the resolved TrainConfig
    model.json       {"kind": "gpt2" | "gau", "vocab_size", "config": the Student's model
                     config, "nesting": the NestingConfig}: what rebuilds the model
    tokenizer.json   the tokenizer (absent for pre-tokenised data without one)
    checkpoints/     atomic checkpoints; `latest` names the newest

`build_model(cfg, vocab_size)` makes the nested model a TrainConfig asks for;
`load_run(run_dir)` gives back (config, model with the latest weights, tokenizer), and
`load_teacher(path, ...)` a frozen Teacher from a run or a Hugging Face GPT-2 folder.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ._atomic import write_json_atomic
from .classification import NUM_CLASSES
from .data import tokenizer_from_json
from .models import GAU_PRESETS, GPT2_PRESETS, GAUConfig, GPT2Config, NestedGAU, NestedGPT2, NestedLM, NestingConfig
from .models import load_hf_gpt2
from .train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .train.config import ConfigError, TrainConfig, make_config

# The model families a run can train, by `NestedLM.architecture`: (model class, config class, presets).
ARCHITECTURES = {
    NestedGPT2.architecture: (NestedGPT2, GPT2Config, GPT2_PRESETS),
    NestedGAU.architecture: (NestedGAU, GAUConfig, GAU_PRESETS),
}
MODEL_INFO = "model.json"


def model_configs(cfg: TrainConfig, vocab_size: int):
    """(architecture, Student model config, NestingConfig) for `cfg` and a data vocabulary."""
    kind = next((name for name, (_, _, presets) in ARCHITECTURES.items() if cfg.model in presets), None)
    if kind is None:
        known = sorted(p for _, _, presets in ARCHITECTURES.values() for p in presets)
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(known)}")
    _, config_cls, presets = ARCHITECTURES[kind]
    overrides = {"vocab_size": vocab_size, "dropout": cfg.dropout}
    for name in ("n_layer", "n_embd"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if cfg.task == "classify":
        if kind != "gau":
            raise ConfigError(f"--task classify trains a GAU classifier; use a gau-* model, not {cfg.model!r}")
        overrides.update(num_classes=NUM_CLASSES, n_positions=cfg.block_size)
    elif cfg.block_size > presets[cfg.model].n_positions:
        overrides["n_positions"] = cfg.block_size
    # The FFN width is n_inner (4 d) for GPT-2 and the expansion e (2 d) for GAU.
    ffn_field, ffn_per_width = ("n_inner", 4) if kind == "gpt2" else ("expansion", 2)
    if cfg.ffn is not None:
        overrides[ffn_field] = cfg.ffn
    elif cfg.n_embd is not None:
        overrides[ffn_field] = ffn_per_width * cfg.n_embd
    if cfg.n_head is not None:
        if kind != "gpt2":
            raise ConfigError("--n-head does not apply to GAU models (single-head attention); drop it")
        overrides["n_head"] = cfg.n_head
    try:
        model_cfg = config_cls.preset(cfg.model, **overrides)
        nest = NestingConfig(
            ffn_ta=cfg.ffn_ta,
            extra_layers=cfg.extra_layers or 0,
            extra_layer_positions=cfg.extra_layer_positions,
            d_model_ta=cfg.d_model_ta,
            n_head_ta=cfg.n_head_ta,
            share_weights=cfg.share_weights,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad model configuration: {exc}") from None
    return kind, model_cfg, nest


def build_model(cfg: TrainConfig, vocab_size: int) -> NestedLM:
    """The nested model `cfg` describes (freshly initialised; on the default device)."""
    kind, model_cfg, nest = model_configs(cfg, vocab_size)
    try:
        return ARCHITECTURES[kind][0](model_cfg, nest)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad model configuration: {exc}") from None


def write_model_info(run_dir, model: NestedLM, vocab_size: int) -> None:
    info = {"kind": model.architecture, "vocab_size": vocab_size, "config": dataclasses.asdict(model.config),
            "nesting": dataclasses.asdict(model.nest)}
    write_json_atomic(Path(run_dir) / MODEL_INFO, info)


def model_from_info(run_dir) -> NestedLM:
    """A freshly initialised model of the shape `RUN_DIR/model.json` records."""
    path = Path(run_dir) / MODEL_INFO
    try:
        info = json.loads(path.read_text())
        model_cls, config_cls, _ = ARCHITECTURES[info["kind"]]
        return model_cls(config_cls(**info["config"]), NestingConfig(**info["nesting"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing or unreadable ({type(exc).__name__}: {exc}); "
                              "the run directory is incomplete") from None


def read_config(run_dir) -> TrainConfig:
    """The TrainConfig a run recorded in config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a matta run directory (no config.json); pass the --out of `matta train`")
    try:
        values = json.loads(path.read_text())
        return make_config({k: tuple(v) if k == "loss_weights" else v for k, v in values.items()})
    except (json.JSONDecodeError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); rerun `matta train` for this run") from None


def load_run(run_dir, device="cpu"):
    """(config, model with the latest checkpoint's weights in eval mode, tokenizer or None)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint; train it first (`matta train --out {run_dir}`)")
    ckpt = load_checkpoint(ckpt_path)
    tok_path = run_dir / "tokenizer.json"
    tokenizer = tokenizer_from_json(tok_path.read_text()) if tok_path.is_file() else None
    model = model_from_info(run_dir)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit the model in {run_dir / MODEL_INFO}; "
                              "the run directory is mixed up") from None
    return cfg, model.to(device).eval(), tokenizer


def load_teacher(path, vocab_size: int, device):
    """A frozen Teacher: a matta run directory (its nested model; the TA teaches) or a
    Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        _, teacher, _ = load_run(path, device)
    elif (path / "config.json").is_file() and any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        try:
            teacher = load_hf_gpt2(path)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"--teacher {path}: cannot read the Hugging Face GPT-2 checkpoint ({exc})") from None
    else:
        raise ConfigError(
            f"--teacher {path} is neither a matta run directory nor a Hugging Face GPT-2 folder "
            "(config.json + model.safetensors); pass one of those"
        )
    teacher_vocab = teacher.lm_head_weight.shape[0]
    if teacher_vocab != vocab_size:
        raise ConfigError(
            f"--teacher {path} predicts {teacher_vocab} token ids but the data has {vocab_size}; "
            "use a Teacher trained with the same tokenizer (--tokenizer/--data)"
        )
    return teacher.to(device).eval().requires_grad_(False)
