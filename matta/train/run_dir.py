"""Run directories: what a run writes, the model it trains, and reading a run back.

`matta train --out RUN_DIR` writes:
    config.json      the resolved TrainConfig (with the CPU thread count used)
    model.json       {"kind": "gpt2" | "gau" | "hf", "vocab_size", "config": the Student's model
                     config (for "hf" its transformers config.json), "nesting": the
                     NestingConfig}: what rebuilds the model
    tokenizer.json   the tokenizer (absent for pre-tokenised data without one)
    metrics.jsonl    one JSON record per log step ("train") and per evaluation ("eval")
    checkpoints/     atomic checkpoints, each verified by its manifest (checkpoint.py); a resume
                     takes the newest intact one
    results.json     the final table: per model, parameters and the task's scores
    report.png       loss curves and the size-vs-quality curve (report.py)
    .lock            held (flock) by the one process that writes the folder
    baseline/        with the default baseline: the Student trained alone, a run folder too

`build_model(cfg, vocab_size)` makes the nested model a TrainConfig asks for;
`load_run(run_dir)` gives back (config, model with the latest weights, tokenizer), and
`load_teacher(path, ...)` a frozen Teacher from a run or a Hugging Face model folder.
`RunDirLock` keeps a second process out of a folder that a live one writes.

`--model hf:FOLDER` nests the Hugging Face causal LM in FOLDER (`NestedHFCausalLM.from_folder`:
its weights are the Student, `--ffn-ta` and `--extra-layers` shape the TA) and reads the data
with that folder's tokenizer (`TrainConfig.data_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path

from .._atomic import write_json_atomic, write_text_atomic
from ..data import tokenizer_from_json
from ..models import GAU_PRESETS, GPT2_PRESETS, GAUConfig, GPT2Config, NestedGAU, NestedGPT2, NestedLM, NestingConfig
from ..models import HFModelConfig, NestedHFCausalLM, load_hf_causal, load_hf_gpt2
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import ConfigError, TrainConfig, make_config
from .tasks import task_for

# The model families a run can train, by `NestedLM.architecture`: (model class, config class, presets).
ARCHITECTURES = {
    NestedGPT2.architecture: (NestedGPT2, GPT2Config, GPT2_PRESETS),
    NestedGAU.architecture: (NestedGAU, GAUConfig, GAU_PRESETS),
    NestedHFCausalLM.architecture: (NestedHFCausalLM, HFModelConfig, {}),  # --model hf:FOLDER
}
MODEL_INFO = "model.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


def _hf_model_configs(cfg: TrainConfig, vocab_size: int):
    """("hf", HFModelConfig, NestingConfig) for --model hf:FOLDER; flags that reshape the Student
    (the folder fixes it) and the data vocabulary are checked against the folder."""
    folder = cfg.hf_model_folder
    for name in ("n_layer", "n_embd", "n_head", "ffn", "d_model_ta", "n_head_ta"):
        if getattr(cfg, name) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to --model {cfg.model} (the folder fixes the "
                              "Student; --ffn-ta and --extra-layers shape the TA); drop it")
    checks = ((cfg.tokenizer == "auto", f"--model {cfg.model} reads its folder's own tokenizer; drop --tokenizer"),
              (cfg.dropout == 0.0, f"--dropout does not apply to --model {cfg.model}: the model keeps the dropout of "
                                   "its config.json"),
              (cfg.share_weights, "--no-share-weights is not available for Hugging Face models (their attention is "
                                  "not nested)"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    path = Path(folder)
    try:
        info = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--model {cfg.model}: cannot read {path / 'config.json'} ({type(exc).__name__}); pass a "
                          "Hugging Face model folder (config.json, weights, tokenizer.json)") from None
    model_vocab = info.get("vocab_size")
    if isinstance(model_vocab, int) and vocab_size > model_vocab:
        raise ConfigError(f"--model {cfg.model}: the tokenizer has {vocab_size} ids but the model only {model_vocab} "
                          "embedding rows; use the folder the tokenizer belongs to")
    nest = NestingConfig(ffn_ta=cfg.ffn_ta, extra_layers=cfg.extra_layers or 0,
                         extra_layer_positions=cfg.extra_layer_positions)
    return NestedHFCausalLM.architecture, HFModelConfig(info, source=folder), nest


def model_configs(cfg: TrainConfig, vocab_size: int):
    """(architecture, Student model config, NestingConfig) for `cfg` and a data vocabulary."""
    if cfg.hf_model_folder is not None:
        kind = NestedHFCausalLM.architecture
    else:
        kind = next((name for name, (_, _, presets) in ARCHITECTURES.items() if cfg.model in presets), None)
    if kind is None:
        known = sorted(p for _, _, presets in ARCHITECTURES.values() for p in presets)
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(known)}, or hf:FOLDER")
    task = task_for(cfg)
    if kind not in task.architectures:
        families = " or ".join("hf:FOLDER" if a == NestedHFCausalLM.architecture else a + "-*"
                               for a in task.architectures)
        raise ConfigError(f"--task {task.name} trains {task.what}; use a {families} model (the default is "
                          f"{task.default_model}), not {cfg.model!r}")
    if kind == NestedHFCausalLM.architecture:
        return _hf_model_configs(cfg, vocab_size)
    _, config_cls, presets = ARCHITECTURES[kind]
    overrides = {"vocab_size": vocab_size, "dropout": cfg.dropout}
    for name in ("n_layer", "n_embd"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    overrides.update(task.model_overrides(cfg, presets[cfg.model]))
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
    """The nested model `cfg` describes (freshly initialised, or a Hugging Face model's weights
    as the Student; on the default device)."""
    kind, model_cfg, nest = model_configs(cfg, vocab_size)
    try:
        if kind == NestedHFCausalLM.architecture:
            model = NestedHFCausalLM.from_folder(model_cfg.source, nest)
            _check_hf_model(cfg, model)
            return model
        return ARCHITECTURES[kind][0](model_cfg, nest)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        raise ConfigError(f"bad model configuration: {exc}") from None


def _check_hf_model(cfg: TrainConfig, model: NestedHFCausalLM) -> None:
    if model.logit_softcap is not None:
        raise ConfigError(f"--model {cfg.model} soft-caps its logits (c tanh(z / c), c = {model.logit_softcap}), which "
                          "the fused MatTA loss (a linear head) does not compute; train it in your own loop on "
                          "model(idx)'s logits with matta.MatTALoss")
    if cfg.block_size > model.n_positions:
        raise ConfigError(f"--block-size {cfg.block_size} exceeds the {model.n_positions} positions of --model {cfg.model}")


def model_info(model: NestedLM, vocab_size: int) -> dict:
    """What RUN_DIR/model.json holds: what rebuilds `model` (and fingerprints it in checkpoints)."""
    return {"kind": model.architecture, "vocab_size": vocab_size, "config": dataclasses.asdict(model.config),
            "nesting": dataclasses.asdict(model.nest)}


def write_model_info(run_dir, model: NestedLM, vocab_size: int) -> None:
    write_json_atomic(Path(run_dir) / MODEL_INFO, model_info(model, vocab_size))


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


def write_run_files(run_dir, cfg: TrainConfig, model: NestedLM, vocab_size: int, tokenizer) -> None:
    """config.json, model.json and (when there is one) tokenizer.json: what rebuilds the run."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "config.json", json.loads(cfg.to_json()))
    if tokenizer is not None:
        write_text_atomic(run_dir / "tokenizer.json", tokenizer.to_json())
    write_model_info(run_dir, model, vocab_size)


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


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_folder(path) -> bool:
    """Whether `path` holds a Hugging Face model: config.json and weights (one file or shards)."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHT_FILES)


def load_hf_folder(path):
    """The model in a Hugging Face folder: a one-file GPT-2 as matta's plain GPT2 (no
    transformers needed), anything else through transformers (an HFCausalLM)."""
    path = Path(path)
    one_file = any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    if one_file and json.loads((path / "config.json").read_text()).get("model_type", "gpt2") == "gpt2":
        return load_hf_gpt2(path)
    return load_hf_causal(path)


def load_teacher(path, vocab_size: int, device):
    """A frozen Teacher: a matta run directory (its nested model; the TA teaches) or a
    Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin), which must
    predict `vocab_size` classes (the rows of the Student's head)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        _, teacher, _ = load_run(path, device)
    elif is_hf_folder(path):
        try:
            teacher = load_hf_folder(path)
        except (OSError, KeyError, ValueError, RuntimeError, ImportError) as exc:
            raise CheckpointError(f"--teacher {path}: cannot read the Hugging Face checkpoint ({exc})") from None
        if getattr(teacher, "logit_softcap", None) is not None:
            raise ConfigError(f"--teacher {path} soft-caps its logits, which the fused loss's linear Teacher head "
                              "does not compute; use a Teacher with linear logits")
    else:
        raise ConfigError(
            f"--teacher {path} is neither a matta run directory nor a Hugging Face model folder "
            "(config.json + model.safetensors); pass one of those"
        )
    teacher_vocab = teacher.lm_head_weight.shape[0]
    if teacher_vocab != vocab_size:
        raise ConfigError(
            f"--teacher {path} predicts {teacher_vocab} token ids but the Student {vocab_size}; "
            "use a Teacher trained with the same tokenizer (--tokenizer/--data)"
        )
    return teacher.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------
# metrics.jsonl and results.json


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl. A torn last line (what a kill or a full disk
    leaves in the middle of an append) is dropped; a bad line before it means the file
    was damaged otherwise, and is an error naming it."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if all(not rest.strip() for rest in lines[number:]):
                break  # the torn last line
            raise CheckpointError(f"{path}, line {number}, is not a JSON record; repair or delete the line") from None
    return records


def start_metrics(run_dir) -> None:
    """An empty RUN_DIR/metrics.jsonl, for a run that starts from step 0."""
    write_text_atomic(Path(run_dir) / METRICS, "")


def append_metrics(run_dir, record: dict) -> None:
    """Appends one record (one line) to RUN_DIR/metrics.jsonl."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(run_dir, step: int) -> None:
    """Drops the records after `step` (written by a run that then stopped before its next
    checkpoint), and a torn last line, atomically."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_text_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def read_results(run_dir) -> dict | None:
    """RUN_DIR/results.json, or None when the run has not finished."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); rerun the run with --resume to write it again") from None


def write_results(run_dir, results: dict) -> None:
    write_json_atomic(Path(run_dir) / RESULTS, results)


# ----------------------------------------------------------------------------------------
# One writer per run folder


class RunDirLock:
    """An exclusive `flock` on RUN_DIR/.lock while a process writes the folder.

    The kernel drops the lock when its holder dies however it dies (kill -9 included), so
    a crashed run never locks its folder out; a live writer does, and a second process that
    tries gets a CheckpointError naming it. Re-entrant within a process (a run and the
    orchestration around it take the same folder's lock).
    """

    _held: dict = {}  # resolved path -> [fd, depth], this process's locks

    def __init__(self, run_dir):
        self.path = Path(run_dir).resolve() / ".lock"

    def __enter__(self):
        held = self._held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise CheckpointError(f"{self.path.parent} is being written by another process (pid {holder}); "
                                  "wait for it to end, or end it, then rerun") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._held[self.path] = [fd, 1]
        return self

    def __exit__(self, *exc):
        held = self._held[self.path]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.path]
            os.close(held[0])  # closing drops the flock
