"""Atomic, resumable checkpoints that never unpickle anything.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNN/` holding
- `model.safetensors`: the model's state_dict,
- `optimizer.safetensors` + the tensor-free rest of the optimizer state in `state.json`,
- `state.json`: the step (which is also the data position: a batch is a function of its
  step) and the trainer's state, whose tensors (the RNG states) are in `rng.safetensors`.
It is written to a temporary sibling folder, synced, and renamed into place; then the file
`RUN_DIR/checkpoints/latest` (one line: the folder name) is replaced atomically. A kill at any
moment leaves `latest` naming a complete checkpoint.

Nested state (an optimizer's state_dict: dicts with int keys, lists, tuples, tensors) is
split into a JSON tree and a flat name -> tensor map; `encode_state` / `decode_state`
round-trip it exactly, key types and tuples included.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import fsync_dir, write_synced, write_text_atomic

LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit the run; the message says what to do."""


def encode_state(obj, tensors: dict, prefix: str = "t"):
    """Returns a JSON-able tree for `obj`, moving its tensors into `tensors` (name -> tensor)."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[encode_state(k, tensors, prefix), encode_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}: {obj!r}")


def decode_state(tree, tensors: dict):
    """Inverse of `encode_state`."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(decode_state(v, tensors) for v in tree["__tuple__"])
        if "__float__" in tree:
            return float(tree["__float__"])
        if "__dtype__" in tree:
            return getattr(torch, tree["__dtype__"])
    return tree


def save_checkpoint(run_dir, step: int, model_state: dict, optimizer_state: dict, state: dict, keep: int = 2) -> Path:
    """Writes checkpoint `step` atomically and keeps only the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    write_synced(tmp / "model.safetensors", lambda p: save_file(_unshare(weights), str(p)))
    opt_tensors: dict = {}
    opt_tree = encode_state(optimizer_state, opt_tensors, "o")
    write_synced(tmp / "optimizer.safetensors", lambda p: save_file(opt_tensors, str(p)))
    state_tensors: dict = {}
    state_tree = encode_state(state, state_tensors, "s")
    write_synced(tmp / "rng.safetensors", lambda p: save_file(state_tensors, str(p)))
    meta = {"format": FORMAT_VERSION, "step": step, "optimizer": opt_tree, "state": state_tree}
    write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps(meta)))
    fsync_dir(tmp)

    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, name + "\n")

    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unshare(weights: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): store each once, cloned."""
    seen: dict = {}
    out = {}
    for k, v in weights.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        out[k] = v.clone() if key in seen else v
        seen[key] = k
    return out


def latest_checkpoint(run_dir) -> Path | None:
    """The folder `latest` names, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith("step_") or not path.is_dir():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint folder; delete {pointer} to start over"
        )
    return path


def load_checkpoint(path) -> dict:
    """Reads a checkpoint folder: {'step', 'model', 'optimizer', 'state'}; tensors on the CPU."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it (and fix "
            f"{path.parent / LATEST}) to fall back to an older one, or train without --resume"
        ) from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this matta reads {FORMAT_VERSION}")
    return {
        "step": meta["step"],
        "model": model,
        "optimizer": decode_state(meta["optimizer"], opt_tensors),
        "state": decode_state(meta["state"], state_tensors),
    }
