"""Checkpoints: exact round trips, atomic writes that clean up after themselves, resume by what
is on disk, every kind of damage one clear error, no pickle."""
import errno
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import matta.train.checkpoint as ckpt_mod
from matta.train.checkpoint import (
    CheckpointError,
    check_fits,
    checkpoint_folders,
    decode_state,
    encode_state,
    latest_checkpoint,
    load_checkpoint,
    remove_dead_writes,
    run_identity,
    save_checkpoint,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _state():
    return {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 3)}, 7: {"m": torch.randn(4).bfloat16()}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 7], "name": None, "flag": True,
                          "eps": float("inf"), "dtype": torch.float32}],
    }


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _save(run_dir, step, w=None, **kw):
    return save_checkpoint(run_dir, step, {"w": torch.randn(3, 5) if w is None else w}, _state(), {"rng": [step]}, **kw)


def _entries(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_encode_decode_round_trip_keeps_types():
    state = _state()
    state["nan"] = float("nan")
    tensors = {}
    tree = encode_state(state, tensors)
    json.dumps(tree)  # JSON-able
    assert _equal(decode_state(json.loads(json.dumps(tree)), tensors), state)
    with pytest.raises(TypeError, match="cannot checkpoint"):
        encode_state({"f": object()}, {})


def test_save_load_manifest_and_pruning(tmp_path):
    model = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    model["tied"] = model["w"]  # shared storage (tied embeddings) is stored twice, not refused
    opt = _state()
    identity = run_identity("adamw", {"n_layer": 2})
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, model, opt, {"step": step, "rng": torch.get_rng_state()}, keep=2,
                        identity=identity)
    assert _entries(tmp_path) == ["latest", "step_0000010", "step_0000015"]
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_0000015"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 15 and loaded["state"]["step"] == 15
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.items())
    assert _equal(loaded["optimizer"], opt)
    # nothing that needs unpickling is written; the manifest checks every other file
    names = {p.name for p in path.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json"}
    manifest = json.loads((path / "manifest.json").read_text())
    for name in names - {"manifest.json"}:
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["model"]["w"] == {"dtype": "float32", "shape": [3, 4]}
    assert manifest["identity"] == identity and manifest["step"] == 15


def test_resume_is_defined_by_the_folders_not_by_latest(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    pointer = tmp_path / "checkpoints" / "latest"
    for garbled in ("../../etc\n", "step_00", ""):
        pointer.write_text(garbled)
        assert latest_checkpoint(tmp_path).name == "step_0000002"
    pointer.unlink()
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    assert latest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / "checkpoints" / "step_notanumber").mkdir()  # not a checkpoint folder: ignored
    assert [s for s, _ in checkpoint_folders(tmp_path)] == [2, 1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_checkpoint_is_skipped_for_an_intact_one(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of one weight
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        weights.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="step_0000002.*resuming from .*step_0000001"):
        assert latest_checkpoint(tmp_path).name == "step_0000001"
    with pytest.raises(CheckpointError, match="step_0000002") as info:
        load_checkpoint(newest)
    assert "\n" not in str(info.value) and "delete that folder" in str(info.value)
    # with nothing intact left, one line says so
    (tmp_path / "checkpoints" / "step_0000001" / "rng.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint of .* is intact"):
        latest_checkpoint(tmp_path)


def _rewrite_state(path, change):
    """Edits state.json and re-records its checksum, as a buggy writer would have written it."""
    meta = json.loads((path / "state.json").read_text())
    change(meta)
    (path / "state.json").write_text(json.dumps(meta))
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "state.json").read_bytes()
    manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("step"), "step must be an int from 0 to"),
        (lambda m: m.update(step="3"), "step must be an int from 0 to"),
        (lambda m: m.update(step=-1), "step must be an int from 0 to"),
        (lambda m: m.update(step=True), "step must be an int from 0 to"),
        (lambda m: m.update(step=10**30), "step must be an int from 0 to"),
        (lambda m: m.update(step=4), "says step 4, the folder name step 3"),
        (lambda m: m.pop("optimizer"), "no 'optimizer' entry"),
        (lambda m: m.update(format=99), "format 99"),
        (lambda m: m.update(state=[1, 2]), "trainer state is not a dict"),
        (lambda m: m.update(optimizer={"__tensor__": "o999"}), "unreadable"),
    ],
)
def test_state_json_is_validated(tmp_path, change, message):
    path = _save(tmp_path, 3)
    _rewrite_state(path, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_check_fits_names_what_does_not_belong(tmp_path):
    identity = run_identity("adamw", {"n_embd": 32})
    path = _save(tmp_path, 3, w=torch.zeros(3, 5), identity=identity)
    check_fits(path, identity=identity, model_state={"w": torch.zeros(3, 5)}, max_steps=3)
    cases = [
        (dict(identity=run_identity("shampoo", {"n_embd": 32})), "--optimizer adamw, not shampoo"),
        (dict(identity=run_identity("adamw", {"n_embd": 64})), "another model configuration"),
        (dict(model_state={"w": torch.zeros(3, 6)}), r"'w' of shape \(3, 5\), this model's is \(3, 6\)"),
        (dict(model_state={"w": torch.zeros(3, 5), "v": torch.zeros(1)}), "no tensor 'v'"),
        (dict(model_state={}), "holds tensor 'w', which this model does not have"),
        (dict(max_steps=2), "at step 3, past this run's 2 steps"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message):
            check_fits(path, **kwargs)
    assert run_identity("adamw", {"a": 1, "b": 2}) == run_identity("adamw", {"b": 2, "a": 1})
    # a checkpoint that recorded no identity is checked for what it holds
    check_fits(_save(tmp_path, 4), identity=identity)


def test_format_1_checkpoints_still_load(tmp_path):
    path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()
    meta = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**meta, "format": 1}))
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path)["step"] == 3
    check_fits(path, max_steps=1)  # nothing recorded to check
    meta["format"] = 2  # a format-2 folder without its manifest is incomplete
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("failing_file", [0, 1, 2])
def test_disk_full_during_a_write_leaves_no_partial_files(tmp_path, monkeypatch, failing_file):
    """safetensors reports a full disk as SafetensorError; it must come out as the OSError it is,
    with the file named and the partial folder gone, and the checkpoints before untouched."""
    first = _save(tmp_path, 1, w=torch.ones(3, 5))
    real_save = ckpt_mod.save_file
    calls = []

    def full_disk(tensors, filename):
        calls.append(filename)
        if len(calls) - 1 == failing_file:
            with open(filename, "wb") as f:
                f.write(b"\x00partial")
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                                  f'path "{filename}"')
        return real_save(tensors, filename)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        _save(tmp_path, 2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == calls[-1]
    assert _entries(tmp_path) == ["latest", "step_0000001"]
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    assert latest_checkpoint(tmp_path) == first
    assert torch.equal(load_checkpoint(first)["model"]["w"], torch.ones(3, 5))


def test_a_failing_json_write_names_its_file(tmp_path, monkeypatch):
    real_write = ckpt_mod.Path.write_text

    def full(self, text, *a, **k):
        if self.name in ("state.json", "manifest.json"):
            raise OSError(errno.ENOSPC, "No space left on device")  # what a failed write() gives: no file name
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(ckpt_mod.Path, "write_text", full)
    with pytest.raises(OSError) as info:
        _save(tmp_path, 1)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("state.json")
    assert _entries(tmp_path) == []


def test_interrupt_during_a_write_removes_the_temporary_folder(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def interrupted(tensors, filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert _entries(tmp_path) == ["latest", "step_0000001"]


def test_what_dead_writers_leave_is_removed_by_the_next_writer(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (root / f".step_0000002.tmp-{dead_pid}").mkdir()
    (root / f".step_0000002.tmp-{dead_pid}" / "model.safetensors").write_bytes(b"partial")
    (root / f".latest.tmp-{dead_pid}").write_text("step_00")
    live = root / f".step_0000003.tmp-{os.getppid()}"  # a live writer's folder stays
    live.mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000001"  # readers remove nothing
    assert len(_entries(tmp_path)) == 5
    removed = remove_dead_writes(tmp_path)
    assert sorted(p.name for p in removed) == [f".latest.tmp-{dead_pid}", f".step_0000002.tmp-{dead_pid}"]
    assert _entries(tmp_path) == [live.name, "latest", "step_0000001"]
    _save(tmp_path, 2)  # and a save does it too
    assert _entries(tmp_path) == [live.name, "latest", "step_0000001", "step_0000002"]


def test_a_save_supersedes_later_damaged_checkpoints(tmp_path):
    """Resuming from step 1 past a damaged step 3: the next checkpoints replace it."""
    _save(tmp_path, 1)
    _save(tmp_path, 3, keep=3)
    (tmp_path / "checkpoints" / "step_0000003" / "rng.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path).name == "step_0000001"
    _save(tmp_path, 2, keep=3)
    assert _entries(tmp_path) == ["latest", "step_0000001", "step_0000002"]
    assert latest_checkpoint(tmp_path).name == "step_0000002"
