"""Atomic, verified, resumable checkpoints that never unpickle anything.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNN/` holding
- `model.safetensors`: the model's state_dict,
- `optimizer.safetensors` + the tensor-free rest of the optimizer state in `state.json`,
- `state.json`: the step (which is also the data position: a batch is a function of its
  step) and the trainer's state, whose tensors (the RNG states) are in `rng.safetensors`,
- `manifest.json`, written last: per file its size and SHA-256, the shape and dtype of every
  model tensor, and the run's identity when the writer gives one (`run_identity`: the
  optimizer kind and a fingerprint of the model configuration).

Writing: the files go to a temporary sibling `.step_NNNNNNN.tmp-PID`, each synced, and the
folder is renamed into place; then `checkpoints/latest` (one line: the folder name, for
people and scripts) is replaced atomically. A write that fails (a full disk, a read-only
folder) removes its temporary folder and raises OSError naming the file; a killed writer
leaves it behind, and `remove_dead_writes` (run by the next writer) removes it.

Resuming is defined by what is on disk, not by `latest`: `latest_checkpoint` is the newest
`step_N` folder whose files match its manifest (a damaged newer one is skipped with a
warning), `check_fits` says whether it belongs to the run about to continue, and
`load_checkpoint` reads it, checking the files and `state.json` again.

Nested state (an optimizer's state_dict: dicts with int keys, lists, tuples, tensors) is
split into a JSON tree and a flat name -> tensor map; `encode_state` / `decode_state`
round-trip it exactly, key types and tuples included.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import fsync_dir, write_synced, write_text_atomic

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: manifest.json with checksums; 1 (no manifest) is still read, unverified
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
MAX_STEP = 2**53  # beyond it a step is no count a run reaches (and JSON numbers stop being exact)
_FOLDER = re.compile(r"step_(\d+)")
_TEMP = re.compile(r"\..+\.tmp-(\d+)")  # what a writer leaves when it is killed: `.step_N.tmp-PID`, `.latest.tmp-PID`
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


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


def run_identity(optimizer: str, model_info: dict) -> dict:
    """What ties a checkpoint to its run, for `save_checkpoint(identity=...)` and
    `check_fits`: the optimizer kind, and a fingerprint of the model's configuration
    (`model_info`: any JSON-able description that changes with the model, such as what
    RUN_DIR/model.json holds)."""
    canonical = json.dumps(model_info, sort_keys=True, separators=(",", ":"))
    return {"optimizer": optimizer, "model": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


# ----------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(tensors: dict, path: Path) -> None:
    """`safetensors.torch.save_file`, its I/O failures raised as the OSError they are."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        code = _OS_ERROR.search(str(exc))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(path)) from None


def _unshare(weights: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): store each once, cloned."""
    seen: dict = {}
    out = {}
    for k, v in weights.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        out[k] = v.clone() if key in seen else v
        seen[key] = k
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_writes(run_dir) -> list[Path]:
    """Removes what killed writers left in RUN_DIR/checkpoints (`.step_N.tmp-PID` folders,
    `.latest.tmp-PID` files) whose process is not alive on this machine; returns them.
    Only the run's writer should call it (on a folder shared between machines a PID says
    nothing about another machine's processes)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _TEMP.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def save_checkpoint(run_dir, step: int, model_state: dict, optimizer_state: dict, state: dict, keep: int = 2, *,
                    identity: dict | None = None) -> Path:
    """Writes checkpoint `step` atomically and keeps only the newest `keep` checkpoints.

    `identity` (`run_identity(...)`) is recorded for `check_fits`. An I/O failure raises
    OSError naming the file, after removing the partial folder; the checkpoints written
    before are untouched."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_writes(run_dir)
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        weights = _unshare({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()})
        write_synced(tmp / "model.safetensors", lambda p: _save_tensors(weights, p))
        opt_tensors: dict = {}
        opt_tree = encode_state(optimizer_state, opt_tensors, "o")
        write_synced(tmp / "optimizer.safetensors", lambda p: _save_tensors(opt_tensors, p))
        state_tensors: dict = {}
        state_tree = encode_state(state, state_tensors, "s")
        write_synced(tmp / "rng.safetensors", lambda p: _save_tensors(state_tensors, p))
        meta = {"format": FORMAT_VERSION, "step": step, "optimizer": opt_tree, "state": state_tree}
        write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps(meta)))
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES},
            "model": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                      for k, v in weights.items()},
            "identity": identity,
        }
        write_synced(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    write_text_atomic(root / LATEST, name + "\n")

    # Folders of later steps are what this run continues past (damaged ones it resumed
    # before): they go, and of the rest the newest `keep` stay.
    older = []
    for other_step, path in checkpoint_folders(run_dir):
        if other_step > step:
            shutil.rmtree(path, ignore_errors=True)
        elif other_step < step:
            older.append(path)
    for path in older[max(keep, 1) - 1:]:
        shutil.rmtree(path, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------
# Finding, verifying and reading


def checkpoint_folders(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every renamed `step_N` folder in RUN_DIR/checkpoints, newest first,
    whether or not its files are intact (`verify_files` says)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _FOLDER.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name} ({what}); {_FALLBACK}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable ({exc}); {_FALLBACK}") from None


_FALLBACK = "delete that folder to fall back to an older checkpoint, or start the run over (--overwrite)"


def verify_files(path) -> dict | None:
    """Checks that the checkpoint folder `path` holds the files its manifest lists, each of its
    recorded size and SHA-256. Returns the manifest (None for a format-1 checkpoint, which has
    none to check); raises CheckpointError naming the file that differs."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / "state.json").is_file() and _read_json(path / "state.json", "the step").get("format") == 1:
            return None
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (it is incomplete); {_FALLBACK}")
    manifest = _read_json(path / MANIFEST, "the checksums")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    match = _FOLDER.fullmatch(path.name)
    if (not isinstance(files, dict) or set(files) != set(FILES) or not all(isinstance(v, dict) for v in files.values())
            or manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("model"), dict)
            or (match is not None and manifest.get("step") != int(match.group(1)))):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not the format-{FORMAT_VERSION} manifest of this "
                              f"folder's step; {_FALLBACK}")
    for name, expected in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is missing {name}; {_FALLBACK}") from None
        if size != expected.get("bytes") or _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: {name} is not the file that was written (its "
                                  f"{'size' if size != expected.get('bytes') else 'SHA-256'} differs from "
                                  f"{MANIFEST}); {_FALLBACK}")
    return manifest


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint of RUN_DIR whose files are intact, or None when it has none.

    A damaged newer one is skipped with a warning naming it; if every one is damaged,
    CheckpointError says so. `checkpoints/latest` is not consulted: a lost or garbled
    pointer does not matter."""
    damaged = []
    for _, path in checkpoint_folders(run_dir):
        try:
            verify_files(path)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        if damaged:
            warnings.warn(f"{len(damaged)} newer checkpoint(s) skipped ({damaged[0]}); resuming from {path}",
                          stacklevel=2)
        return path
    if damaged:
        raise CheckpointError(f"no checkpoint of {run_dir} is intact: {damaged[0]}")
    return None


def check_fits(path, *, identity: dict | None = None, model_state: dict | None = None,
               max_steps: int | None = None) -> None:
    """Checks, from its manifest, that checkpoint `path` can continue the run about to resume:
    the same optimizer kind and model fingerprint (`identity`, as `run_identity` makes it),
    tensors of the shapes `model_state` has, and a step within `max_steps`. Raises
    CheckpointError naming the first difference; a checkpoint that recorded no identity
    (or format 1, no manifest) is checked for what it holds."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return  # format 1: nothing recorded to compare
    manifest = _read_json(path / MANIFEST, "the checksums")
    recorded = manifest.get("identity") or {}
    if identity is not None:
        if "optimizer" in recorded and recorded["optimizer"] != identity.get("optimizer"):
            raise CheckpointError(
                f"checkpoint {path} holds the state of --optimizer {recorded['optimizer']}, not "
                f"{identity.get('optimizer')}; resume with --optimizer {recorded['optimizer']} or start a new --out"
            )
        if "model" in recorded and recorded["model"] != identity.get("model"):
            raise CheckpointError(
                f"checkpoint {path} belongs to another model configuration (fingerprint {recorded['model']}, this "
                f"run's is {identity.get('model')}); resume with the run's own model settings or start a new --out"
            )
    if model_state is not None:
        saved = manifest.get("model", {})
        for name, tensor in model_state.items():
            if name not in saved:
                raise CheckpointError(f"checkpoint {path} has no tensor {name!r} of this model; resume with the "
                                      "run's own model settings or start a new --out")
            if list(tensor.shape) != saved[name]["shape"]:
                raise CheckpointError(f"checkpoint {path} holds {name!r} of shape {tuple(saved[name]['shape'])}, "
                                      f"this model's is {tuple(tensor.shape)}; resume with the run's own model "
                                      "settings or start a new --out")
        extra = sorted(set(saved) - set(model_state))
        if extra:
            raise CheckpointError(f"checkpoint {path} holds tensor {extra[0]!r}, which this model does not have; "
                                  "resume with the run's own model settings or start a new --out")
    if max_steps is not None and manifest["step"] > max_steps:
        raise CheckpointError(f"checkpoint {path} is at step {manifest['step']}, past this run's {max_steps} steps; "
                              "raise --max-steps (or --tokens) to continue it")


def _check_meta(meta, path: Path) -> int:
    """The step of a checkpoint's state.json, after checking what the loader relies on."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: state.json is not a JSON object; {_FALLBACK}")
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, this matta reads 1 and "
                              f"{FORMAT_VERSION}; use the matta that wrote it")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint {path}: state.json's step must be an int from 0 to {MAX_STEP}, got "
                              f"{step!r}; {_FALLBACK}")
    match = _FOLDER.fullmatch(path.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(f"checkpoint {path}: state.json says step {step}, the folder name step "
                              f"{int(match.group(1))}; {_FALLBACK}")
    for key in ("optimizer", "state"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path}: state.json has no {key!r} entry; {_FALLBACK}")
    return step


def load_checkpoint(path) -> dict:
    """Reads a checkpoint folder after checking its files: {'step', 'model', 'optimizer',
    'state'}; tensors on the CPU."""
    path = Path(path)
    verify_files(path)
    meta = _read_json(path / "state.json", "the step")
    step = _check_meta(meta, path)
    try:
        model = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state_tensors = load_file(str(path / "rng.safetensors"))
        optimizer, state = decode_state(meta["optimizer"], opt_tensors), decode_state(meta["state"], state_tensors)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); {_FALLBACK}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: state.json's trainer state is not a dict; {_FALLBACK}")
    return {"step": step, "model": model, "optimizer": optimizer, "state": state}
