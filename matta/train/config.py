"""The training configuration: one frozen dataclass, filled from defaults, a TOML file and flags.

Every field is a `matta train` flag (`batch_size` -> `--batch-size`) and a TOML key (either
spelling). The resolved configuration is saved as `RUN_DIR/config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..losses import RAMP_SCHEDULES
from .tasks import TASKS

MODES = ("matta", "student", "ta")
OPTIMIZERS = ("adamw", "shampoo")
DTYPES = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it and the fix."""


def _opt(help, choices=None, **kw):
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    out: str = _opt("run directory (config, metrics, checkpoints, report)", default="runs/demo")
    # model
    model: str | None = _opt("model preset: gpt2-tiny, gpt2, gpt2-medium, gau-tiny, ... (default: the task's, "
                             + ", ".join(f"{t.default_model} for {name}" for name, t in TASKS.items()) + ")",
                             default=None)
    n_layer: int | None = _opt("Student layers (overrides the preset)", default=None)
    n_embd: int | None = _opt("Student width d_model (overrides the preset)", default=None)
    n_head: int | None = _opt("attention heads (overrides the preset)", default=None)
    ffn: int | None = _opt("Student FFN / GAU expansion width (overrides the preset)", default=None)
    ffn_ta: int | None = _opt("TA FFN / expansion width (default: twice the Student's)", default=None)
    extra_layers: int | None = _opt("TA-only layers (depth nesting)", default=None)
    extra_layer_positions: str = _opt("where TA-only layers go: interleave, top, bottom", default="interleave")
    d_model_ta: int | None = _opt("TA width d_model (d_model nesting; default: the Student's)", default=None)
    n_head_ta: int | None = _opt("TA heads with d_model nesting", default=None)
    share_weights: bool = _opt("the Student's Dense layers are the TA's leading blocks (the paper's MatTA); "
                               "--no-share-weights gives the Student its own (the unshared ablation, --mode matta "
                               "only; Student and TA extraction only)", default=True)
    dropout: float = _opt("dropout probability", default=0.0)
    # data
    task: str = _opt("lm: language modelling on --data; classify: the synthetic relevance task of "
                     "matta.classification (a GAU classifier on a Teacher's soft labels, scored by AucLoss; "
                     "--data, --block-size and --eval-tokens do not apply)", choices=tuple(TASKS), default="lm")
    data: str = _opt("builtin, a text file or folder, a .bin file (or folder with train.bin/val.bin), or hf:NAME", default="builtin")
    tokenizer: str = _opt("auto (BPE for text), bpe, bytes, gpt2 (tiktoken)", choices=("auto", "bpe", "bytes", "gpt2"), default="auto")
    vocab_size: int | None = _opt("BPE vocabulary to train (default 2048), or the vocabulary of .bin data", default=None)
    bin_dtype: str = _opt("token dtype of .bin data", choices=("uint16", "uint32"), default="uint16")
    val_fraction: float = _opt("share of the tokens held out for validation", default=0.1)
    block_size: int = _opt("context length in tokens", default=128)
    batch_size: int = _opt("sequences per step and process (before accumulation)", default=16)
    grad_accum: int = _opt("micro-batches accumulated per optimizer step", default=1)
    # objective
    mode: str = _opt("what to train: matta (Student+TA), student or ta alone", choices=MODES, default="matta")
    loss_weights: tuple = _opt("w_S,w_TA,w_D", default=(1.0, 1.0, 1.0))
    rampup_start: int = _opt("step at which the distillation term starts", default=0)
    rampup_steps: int = _opt("steps over which the distillation weight rises to w_D", default=50)
    rampup: str = _opt("ramp shape", choices=RAMP_SCHEDULES, default="linear")
    temperature: float = _opt("distillation temperature", default=1.0)
    teacher: str | None = _opt("Teacher: a matta run directory or a Hugging Face GPT-2 folder", default=None)
    # optimisation
    optimizer: str = _opt("optimizer", choices=OPTIMIZERS, default="adamw")
    lr: float = _opt("peak learning rate", default=3e-3)
    min_lr: float | None = _opt("final learning rate (default lr/10)", default=None)
    warmup_steps: int = _opt("linear warmup steps", default=20)
    weight_decay: float = _opt("decoupled weight decay of matrices", default=0.1)
    beta1: float = _opt("first-moment decay", default=0.9)
    beta2: float = _opt("second-moment decay", default=0.99)
    grad_clip: float = _opt("clip the global gradient norm to this (0: off)", default=1.0)
    precondition_frequency: int = _opt("Shampoo: steps between inverse roots", default=10)
    start_preconditioning_step: int = _opt("Shampoo: first preconditioned step", default=10)
    max_preconditioner_dim: int = _opt("Shampoo: largest block side", default=1024)
    shampoo_nested_blocks: bool = _opt("Shampoo: split blocks at the Student/TA boundary", default=False)
    max_steps: int | None = _opt("optimizer steps (default 200, or from --tokens)", default=None)
    tokens: int | None = _opt("train on this many tokens instead of --max-steps", default=None)
    # bookkeeping
    log_interval: int = _opt("steps between metrics.jsonl records", default=5)
    eval_interval: int = _opt("steps between validation evals (0: only at the end)", default=50)
    eval_tokens: int = _opt("validation tokens per eval (0: all)", default=16384)
    checkpoint_interval: int = _opt("steps between checkpoints (0: only at the end)", default=100)
    keep_checkpoints: int = _opt("checkpoints kept", default=2)
    family: bool = _opt("evaluate the wide-narrow-wide family at the end", default=True)
    baseline: bool = _opt("with --mode matta and one process: then train the Student alone on the same data, "
                          "steps and seed (RUN_DIR/baseline) and add it to the table", default=True)
    seed: int = _opt("random seed (model init and data order)", default=1337)
    device: str = _opt("auto, cpu, cuda, cuda:N", default="auto")
    dtype: str = _opt("autocast precision (auto: bf16 on GPU, fp32 on CPU)", choices=DTYPES, default="auto")
    compile: bool = _opt("torch.compile the model's forward (the fused loss stays eager)", default=False)
    threads: int | None = _opt("CPU threads per process (default or 0: $OMP_NUM_THREADS, else 1); the number "
                               "used is saved in config.json and --resume reuses it", default=None)
    parallel: str = _opt("with several processes (torchrun): ddp replicates the model, fsdp shards it (AdamW only)",
                         choices=PARALLEL, default="ddp")
    progress: bool = _opt("show a progress bar", default=True)

    def __post_init__(self):
        if self.model is None and self.task in TASKS:
            object.__setattr__(self, "model", TASKS[self.task].default_model)

    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps is not None else 200

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name: f for f in fields(TrainConfig)}
BOOL_FIELDS = {name for name, f in FIELDS.items() if f.type == "bool"}


def coerce(name: str, value):
    """Converts a flag string or TOML value to the field's type, or raises ConfigError."""
    f = FIELDS[name]
    flag = "--" + name.replace("_", "-")
    kind = f.type.replace(" | None", "")
    if value is None and "None" in f.type:
        return None
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind == "float":
            return float(value)
        if kind == "tuple":
            parts = value.split(",") if isinstance(value, str) else list(value)
            out = tuple(float(p) for p in parts)
            if len(out) != 3:
                raise ValueError
            return out
        return str(value)
    except (TypeError, ValueError):
        expect = {"bool": "true or false", "int": "an integer", "float": "a number", "tuple": "three numbers w_S,w_TA,w_D"}
        raise ConfigError(f"{flag} must be {expect.get(kind, kind)}, got {value!r}") from None


def load_toml(path) -> dict:
    """Reads a TOML config file: {field: value}, keys with '-' or '_'. A [train] table is allowed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config FILE.toml")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML config files need Python >= 3.11 or `pip install tomli` on 3.10") from None
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the file") from None
    raw = raw.get("train", raw)
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"config file {path}: unknown key {key!r}; see `matta train --help` for the names")
        out[name] = coerce(name, value)
    return out


def make_config(values: dict) -> TrainConfig:
    """Builds and checks a TrainConfig from field values (defaults for the rest)."""
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    for name in ("block_size", "batch_size", "grad_accum", "log_interval", "precondition_frequency", "max_preconditioner_dim"):
        value = getattr(cfg, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("n_layer", "n_embd", "n_head", "ffn", "ffn_ta", "d_model_ta", "n_head_ta", "max_steps", "tokens", "vocab_size"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("extra_layers", "warmup_steps", "rampup_start", "rampup_steps", "eval_interval", "eval_tokens",
                 "checkpoint_interval", "keep_checkpoints", "start_preconditioning_step", "threads"):
        value = getattr(cfg, name)
        need(value is None or value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name, choices in (("mode", MODES), ("optimizer", OPTIMIZERS), ("dtype", DTYPES), ("rampup", RAMP_SCHEDULES),
                          ("parallel", PARALLEL), ("task", TASKS),
                          ("tokenizer", FIELDS["tokenizer"].metadata["choices"]), ("bin_dtype", ("uint16", "uint32")),
                          ("extra_layer_positions", ("interleave", "top", "bottom"))):
        value = getattr(cfg, name)
        need(value in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.min_lr is None or 0 <= cfg.min_lr <= cfg.lr, f"--min-lr must be in [0, --lr={cfg.lr}], got {cfg.min_lr}")
    need(0 <= cfg.beta1 < 1 and 0 < cfg.beta2 <= 1, f"--beta1 must be in [0,1) and --beta2 in (0,1], got {cfg.beta1}, {cfg.beta2}")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}")
    need(all(w >= 0 for w in cfg.loss_weights), f"--loss-weights must be >= 0, got {cfg.loss_weights}")
    need(cfg.max_steps is None or cfg.tokens is None, "give --max-steps or --tokens, not both")
    if not cfg.share_weights:
        need(cfg.mode == "matta", "--no-share-weights is the unshared MatTA ablation; use it with --mode matta "
                                  "(a Student or TA trained alone shares with nothing)")
        need(not cfg.family, "--no-share-weights cuts only the Student and the TA out of the run; add --no-family")
    if cfg.task == "classify":
        need(cfg.data == "builtin", "--task classify trains on the synthetic relevance task; drop --data")
        need(cfg.teacher is None, "--task classify has its own Teacher (the task's soft labels); drop --teacher")
    device = cfg.device
    need(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    need(not (cfg.parallel == "fsdp" and cfg.optimizer == "shampoo"),
         "--parallel fsdp works with --optimizer adamw only (Shampoo preconditions whole matrices, which FSDP "
         "splits across ranks); use --parallel ddp for Shampoo")
