"""The trainer's view of the models: build one from a TrainConfig, run its loss, cut it up.

Everything the trainer needs from `matta.models`, `matta.extraction` and the fused loss
goes through the few functions here.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import ConfigError, TrainConfig

def model_configs(cfg: TrainConfig, vocab_size: int):
    """(kind, model config, NestingConfig) for `cfg` and a data vocabulary of `vocab_size`."""
    from ..models import GAUConfig, GPT2Config, NestingConfig
    from ..models.config import GAU_PRESETS, GPT2_PRESETS

    presets = {**{k: "gpt2" for k in GPT2_PRESETS}, **{k: "gau" for k in GAU_PRESETS}}
    kind = presets.get(cfg.model)
    if kind is None:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(sorted(presets))}")
    overrides = {"vocab_size": vocab_size, "dropout": cfg.dropout}
    for ours, theirs in (("n_layer", "n_layer"), ("n_embd", "n_embd")):
        if getattr(cfg, ours) is not None:
            overrides[theirs] = getattr(cfg, ours)
    base = (GPT2_PRESETS if kind == "gpt2" else GAU_PRESETS)[cfg.model]
    if cfg.block_size > base.n_positions:
        overrides["n_positions"] = cfg.block_size
    if kind == "gpt2":
        if cfg.n_head is not None:
            overrides["n_head"] = cfg.n_head
        if cfg.ffn is not None:
            overrides["n_inner"] = cfg.ffn
        elif cfg.n_embd is not None:
            overrides["n_inner"] = 4 * cfg.n_embd
    else:
        if cfg.n_head is not None:
            raise ConfigError("--n-head does not apply to GAU models (single-head attention); drop it")
        if cfg.ffn is not None:
            overrides["expansion"] = cfg.ffn
        elif cfg.n_embd is not None:
            overrides["expansion"] = 2 * cfg.n_embd
    config_cls = GPT2Config if kind == "gpt2" else GAUConfig
    try:
        model_cfg = config_cls.preset(cfg.model, **overrides)
        nest = NestingConfig(
            ffn_ta=cfg.ffn_ta,
            extra_layers=cfg.extra_layers or 0,
            extra_layer_positions=cfg.extra_layer_positions,
            d_model_ta=cfg.d_model_ta,
            n_head_ta=cfg.n_head_ta,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad model configuration: {exc}") from None
    return kind, model_cfg, nest


def build_model(cfg: TrainConfig, vocab_size: int):
    from ..models import NestedGAU, NestedGPT2

    kind, model_cfg, nest = model_configs(cfg, vocab_size)
    try:
        model = (NestedGPT2 if kind == "gpt2" else NestedGAU)(model_cfg, nest)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad model configuration: {exc}") from None
    return model


def estimate_parameters(cfg: TrainConfig, vocab_size: int) -> int:
    """A quick count of the nested model's parameters (TA size), before building it."""
    _, m, nest = model_configs(cfg, vocab_size)
    d = nest.d_model_ta or m.n_embd
    width = getattr(m, "n_inner", None) or getattr(m, "expansion")
    ffn = nest.ffn_ta or 2 * width
    layers = m.n_layer + nest.extra_layers
    per_layer = 4 * d * d + 2 * d * ffn if hasattr(m, "n_inner") else 2 * d * ffn + d * ffn
    return layers * per_layer + (m.padded_vocab_size + m.n_positions) * d


def save_model_info(run_dir, model, vocab_size: int) -> None:
    """RUN_DIR/model.json: what `load_run` needs to rebuild the model (kind, vocabulary)."""
    import json
    from pathlib import Path

    kind = "gpt2" if type(model).__name__ == "NestedGPT2" else "gau"
    info = {"kind": kind, "vocab_size": vocab_size, "config": dataclasses.asdict(model.config),
            "nesting": dataclasses.asdict(model.nest)}
    (Path(run_dir) / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def matta_loss(forward, model, x, y, *, weights, ramp, temperature, mode, teacher=None):
    """One micro-batch: Student and TA streams, then the fused linear MatTA loss (Algorithm 1).

    `forward` is the model or its compiled version; `model` the module (for its head).
    With a Teacher, its soft labels (hidden states + head, chunk by chunk) replace `y`.
    """
    from ..ops import fused_linear_matta_loss

    h_s, h_ta = forward(x, return_hidden=True)
    spec = None
    if teacher is not None:
        with torch.no_grad():
            spec = teacher_spec(teacher, x)
    return fused_linear_matta_loss(
        h_s, h_ta, model.lm_head_weight, y, weights=weights, ramp=ramp, temperature=temperature, teacher=spec
    )


def teacher_spec(teacher, x):
    """(hidden, head) of a Teacher for the fused loss: a nested run's TA stream, or a plain LM."""
    out = teacher(x, return_hidden=True)
    hidden = out[1] if isinstance(out, tuple) else out
    return hidden, teacher.lm_head_weight


def load_teacher(path, vocab_size: int, device):
    """A frozen Teacher from a matta run directory (its TA) or a Hugging Face GPT-2 folder."""
    from pathlib import Path

    from .checkpoint import CheckpointError

    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        from .trainer import load_run

        _, teacher, _ = load_run(path, device)
    elif (path / "config.json").is_file() and any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        from ..models.hf_gpt2 import load_hf_gpt2

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
    teacher.to(device).eval().requires_grad_(False)
    return teacher


def stream_sizes(model) -> dict:
    """Per stream: (parameters doing matmuls per token incl. the head, layers, width)."""
    from ..extraction import num_parameters_of

    vocab = model.config.vocab_size
    n_layer_ta = len(model.blocks) if hasattr(model, "blocks") else len(model.layers)
    n_layer_s = n_layer_ta - len(model.ta_only_layers)
    return {
        "student": (num_parameters_of(model, "student") + vocab * model.student_width, n_layer_s, model.student_width),
        "ta": (num_parameters_of(model, "ta") + vocab * model.ta_width, n_layer_ta, model.ta_width),
    }


def extracted_models(model, family: bool = True):
    """Yields (display name, spec, plain model): Student, TA, then the wide-narrow-wide family."""
    from ..extraction import extract, layer_choices, wide_narrow_wide_family

    yield "Student", "student", extract(model, "student")
    yield "TA", "ta", extract(model, "ta")
    if not family:
        return
    known = {layer_choices(model, "student"), layer_choices(model, "ta")}
    for member in wide_narrow_wide_family(model):
        if member.layers in known:
            continue
        yield f"wide-narrow-wide k={member.k}", f"wide_narrow_wide:{member.k}", extract(model, list(member.layers))


def non_embedding_parameters(model) -> int:
    return model.num_parameters(non_embedding=True)
