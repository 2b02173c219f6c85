"""The training configuration: one frozen dataclass, filled from defaults, a TOML file and flags.

Every field is a `matta train` flag (`batch_size` -> `--batch-size`) and a TOML key (either
spelling). The resolved configuration is saved as `RUN_DIR/config.json`.

One validation layer serves the flags, the TOML file, config.json and the Python API:
`coerce` turns a flag string or TOML value into the field's type (refusing a bool where a
number goes, a float with a fraction where an integer goes, a number where text goes), and
`validate` checks every field of a TrainConfig (its type, finite and in range, and the
combinations). Each error is one ConfigError line naming the flag and what it accepts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..losses import RAMP_SCHEDULES
from ..optim import FACTOR_MATMUL_DTYPES
from .tasks import TASKS

HF_MODEL = "hf:"  # --model hf:FOLDER
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
    extra_layer_positions: str = _opt("where TA-only layers go", choices=("interleave", "top", "bottom"),
                                      default="interleave")
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
    shampoo_factor_matmul: str = _opt("Shampoo: precision of the factor products G G^T, G^T G (float32: exact; tf32: "
                                      "TF32 tensor cores on a GPU; bfloat16: bf16 products summed into fp32 factors)",
                                      choices=FACTOR_MATMUL_DTYPES, default="float32")
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
    threads: int | None = _opt("CPU threads per process, at most the machine's CPUs (default or 0: $OMP_NUM_THREADS, "
                               "else 1); the number used is saved in config.json and --resume reuses it", default=None)
    parallel: str = _opt("with several processes (torchrun): ddp replicates the model, fsdp shards it (AdamW only)",
                         choices=PARALLEL, default="ddp")
    progress: bool = _opt("show a progress bar", default=True)

    def __post_init__(self):
        if self.model is None and self.task in TASKS:
            object.__setattr__(self, "model", TASKS[self.task].default_model)

    @property
    def hf_model_folder(self) -> str | None:
        """The folder of `--model hf:FOLDER` (a Hugging Face causal LM to nest), else None."""
        return self.model[len(HF_MODEL):] if self.model and self.model.startswith(HF_MODEL) else None

    @property
    def data_tokenizer(self) -> str:
        """The tokenizer choice of the run's data: a Hugging Face model's own, else --tokenizer."""
        return self.model if self.hf_model_folder is not None else self.tokenizer

    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps is not None else 200

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name: f for f in fields(TrainConfig)}
BOOL_FIELDS = {name for name, f in FIELDS.items() if f.type == "bool"}
INT_MAX = 2**63 - 1  # what torch's int64 (seeds, step counters) holds

# The least value of each integer field (the most is INT_MAX).
INT_MINIMUM = {
    "n_layer": 1, "n_embd": 1, "n_head": 1, "ffn": 1, "ffn_ta": 1, "extra_layers": 0, "d_model_ta": 1,
    "n_head_ta": 1, "vocab_size": 1, "block_size": 1, "batch_size": 1, "grad_accum": 1, "rampup_start": 0,
    "rampup_steps": 0, "warmup_steps": 0, "precondition_frequency": 1, "start_preconditioning_step": 1,
    "max_preconditioner_dim": 1, "max_steps": 1, "tokens": 1, "log_interval": 1, "eval_interval": 0,
    "eval_tokens": 0, "checkpoint_interval": 0, "keep_checkpoints": 0, "seed": 0, "threads": 0,
}
# The interval of each real-number field; every one must also be finite.
REAL_RANGE = {
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "val_fraction": ("in (0, 1)", lambda v: 0 < v < 1),
    "temperature": ("> 0", lambda v: v > 0),
    "lr": ("> 0", lambda v: v > 0),
    "min_lr": ("in [0, --lr]", lambda v: v >= 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "beta2": ("in (0, 1]", lambda v: 0 < v <= 1),
    "grad_clip": (">= 0 (0: off)", lambda v: v >= 0),
}
# What a resumed run cannot change: the model, its data and vocabulary, and the kind of
# optimizer state its checkpoints hold.
RESUME_FIXED = ("task", "model", "n_layer", "n_embd", "n_head", "ffn", "ffn_ta", "extra_layers", "extra_layer_positions",
                "d_model_ta", "n_head_ta", "share_weights", "dropout", "data", "tokenizer", "vocab_size", "bin_dtype",
                "block_size", "mode", "optimizer", "max_preconditioner_dim", "shampoo_nested_blocks")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(name: str) -> str:
    return FIELDS[name].type.replace(" | None", "")


def _number(value) -> float:
    """A flag string or TOML number as a float; bools and other kinds are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    return float(value)


def coerce(name: str, value):
    """Converts a flag string or TOML value to the field's type, or raises ConfigError."""
    f = FIELDS[name]
    kind = _kind(name)
    if value is None and "None" in f.type:
        return None
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                return int(value)
            number = _number(value)  # 2e3, or a TOML 3.0
            if not number.is_integer():  # 2.5, inf, nan
                raise ValueError
            return int(number)
        if kind == "float":
            return _number(value)
        if kind == "tuple":
            parts = value.split(",") if isinstance(value, str) else list(value)
            out = tuple(_number(p) for p in parts)
            if len(out) != 3:
                raise ValueError
            return out
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        expect = {"bool": "true or false", "int": "an integer", "float": "a number", "tuple": "three numbers w_S,w_TA,w_D",
                  "str": "a string"}
        raise ConfigError(f"{flag(name)} must be {expect[kind]}, got {value!r}") from None


def load_toml(path) -> dict:
    """Reads a TOML config file: {field: value}, keys with '-' or '_', at the top level or in
    a [train] table. Any other table, or an unknown key, is an error."""
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
    entries = [(k, v) for k, v in raw.items() if k != "train"]
    if "train" in raw:
        if not isinstance(raw["train"], dict):
            raise ConfigError(f"config file {path}: 'train' must be a table ([train]), got {raw['train']!r}")
        entries += list(raw["train"].items())
    out = {}
    for key, value in entries:
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: unknown table [{key}]; the settings go at the top level or in "
                              "[train], named as in `matta train --help`")
        if name not in FIELDS:
            raise ConfigError(f"config file {path}: unknown key {key!r}; see `matta train --help` for the names")
        if name in out:
            raise ConfigError(f"config file {path}: {key!r} is given twice")
        out[name] = coerce(name, value)
    return out


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`batch_size` -> `--batch-size`; a bool also as `--no-...`), each
    left unset unless given, so that flags can override a TOML file or a saved config."""
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata["help"]
        if name in BOOL_FIELDS:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, dest=name, action="store_const", const=True, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {f.default}; --no-{name.replace('_', '-')} for off)")
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            default = ",".join(str(v) for v in f.default) if isinstance(f.default, tuple) else f.default
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=f.metadata["choices"],
                                metavar=None if f.metadata["choices"] else name.upper(),
                                help=f"{help_text} (default: {default})")


def config_from_flags(argv) -> TrainConfig:
    """The TrainConfig that `matta train` flags (no --config, --resume) describe."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ConfigError(message)

    parser = Parser(prog="matta train", add_help=False)
    add_train_flags(parser)
    args = parser.parse_args(list(argv))
    return make_config({name: coerce(name, getattr(args, name)) for name in FIELDS if hasattr(args, name)})


def make_config(values: dict) -> TrainConfig:
    """Builds and checks a TrainConfig from field values (defaults for the rest)."""
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _check_field(name: str, value) -> None:
    """The type and range of one field's value."""
    kind, f = _kind(name), FIELDS[name]
    if value is None and "None" in f.type:
        return
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{flag(name)} must be an integer, got {value!r}")
        low = INT_MINIMUM[name]
        if not low <= value <= INT_MAX:
            raise ConfigError(f"{flag(name)} must be an integer from {low} to 2**63 - 1, got {value}")
    elif kind == "float":
        text, ok = REAL_RANGE[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{flag(name)} must be a finite number {text}, got {value!r}")
    elif kind == "tuple":
        if (not isinstance(value, tuple) or len(value) != 3
                or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                       for w in value)):
            raise ConfigError(f"{flag(name)} must be three finite numbers >= 0 (w_S,w_TA,w_D), got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{flag(name)} must be true or false, got {value!r}")
    else:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{flag(name)} must be a non-empty string, got {value!r}")
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Checks every field of `cfg` (see the module docstring); raises ConfigError."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    for name in FIELDS:
        _check_field(name, getattr(cfg, name))
    need(cfg.min_lr is None or cfg.min_lr <= cfg.lr, f"--min-lr must be in [0, --lr={cfg.lr}], got {cfg.min_lr}")
    w_s, w_ta, w_d = cfg.loss_weights
    used = {"matta": ("one of w_S, w_TA, w_D", (w_s, w_ta, w_d)), "student": ("w_S", (w_s,)), "ta": ("w_TA", (w_ta,))}
    what, weights = used[cfg.mode]
    need(any(w > 0 for w in weights), f"--loss-weights: with --mode {cfg.mode}, {what} must be > 0 (else nothing is "
                                      f"trained), got {','.join(str(w) for w in cfg.loss_weights)}")
    need(cfg.max_steps is None or cfg.tokens is None, "give --max-steps or --tokens, not both")
    check_folder("--out", cfg.out)
    if not cfg.share_weights:
        need(cfg.mode == "matta", "--no-share-weights is the unshared MatTA ablation; use it with --mode matta "
                                  "(a Student or TA trained alone shares with nothing)")
        need(not cfg.family, "--no-share-weights cuts only the Student and the TA out of the run; add --no-family")
    if cfg.task == "classify":
        need(cfg.data == "builtin", "--task classify trains on the synthetic relevance task; drop --data")
        need(cfg.teacher is None, "--task classify has its own Teacher (the task's soft labels); drop --teacher")
    need(cfg.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.device) is not None,
         f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    need(not (cfg.parallel == "fsdp" and cfg.optimizer == "shampoo"),
         "--parallel fsdp works with --optimizer adamw only (Shampoo preconditions whole matrices, which FSDP "
         "splits across ranks); use --parallel ddp for Shampoo")


def check_folder(flag_name: str, value: str) -> None:
    """Refuses a folder path (to be made or filled) that is empty or runs into a file."""
    if not value.strip():
        raise ConfigError(f"{flag_name} must name a folder, got {value!r}")
    path = Path(value)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{flag_name} {value}: {existing} is a file, not a folder; pass a folder")


def check_threads(threads: int, source: str = "--threads") -> None:
    """Refuses a CPU thread count above this machine's CPUs (OpenMP cannot start, say, 100000
    threads: libgomp crashes). Not part of `validate`: a run's recorded count must stay
    readable on a smaller machine; call it where the count is applied."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ConfigError(f"{source} {threads} is more than the {cpus} CPUs of this machine; use at most {cpus}")


def check_resume(run_dir, saved: dict, requested: dict) -> None:
    """Refuses settings a resumed run cannot change (RESUME_FIXED): `saved` are the values in
    the run's config.json, `requested` the ones given now (flags and TOML)."""
    def same(name, a, b):
        if a == b:
            return True
        # one data file named two ways (relative and absolute, ~)
        return name == "data" and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    for name in RESUME_FIXED:
        if name in requested and name in saved and not same(name, requested[name], saved[name]):
            raise ConfigError(
                f"{flag(name)} {requested[name]}: the run in {run_dir} was started with {flag(name)} {saved[name]}, "
                f"which its checkpoints hold; drop {flag(name)} to resume it, or start a new run in another --out"
            )
