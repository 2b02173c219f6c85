"""Checkpoints: exact round trips, atomic writes, corruption is a clear error, no pickle."""
import json
import math

import pytest
import torch

import matta.train.checkpoint as ckpt_mod
from matta.train.checkpoint import (
    CheckpointError,
    decode_state,
    encode_state,
    latest_checkpoint,
    load_checkpoint,
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


def test_encode_decode_round_trip_keeps_types():
    state = _state()
    state["nan"] = float("nan")
    tensors = {}
    tree = encode_state(state, tensors)
    json.dumps(tree)  # JSON-able
    assert _equal(decode_state(json.loads(json.dumps(tree)), tensors), state)
    with pytest.raises(TypeError, match="cannot checkpoint"):
        encode_state({"f": object()}, {})


def test_save_load_latest_and_pruning(tmp_path):
    model = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    model["tied"] = model["w"]  # shared storage (tied embeddings) is stored twice, not refused
    opt = _state()
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, model, opt, {"step": step, "rng": torch.get_rng_state()}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000010", "step_0000015"]
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_0000015"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 15 and loaded["state"]["step"] == 15
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.items())
    assert _equal(loaded["optimizer"], opt)
    # nothing that needs unpickling is written
    names = {p.name for p in path.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


def test_kill_during_write_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    model = {"w": torch.randn(3, 4)}
    opt = _state()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the process "dies" in the middle of the second file
            with open(filename, "wb") as f:
                f.write(b"\x00\x01partial")
            raise KeyboardInterrupt
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3, 4)}, opt, {"step": 2})
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_0000001"
    assert torch.equal(load_checkpoint(path)["model"]["w"], model["w"])
    # the next save works and replaces the debris
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(3, 4)}, opt, {"step": 2})
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_kill_between_rename_and_pointer_update(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {"step": 1})
    real_replace = ckpt_mod.os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("latest"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {}, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"], torch.ones(2))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"w": torch.randn(8, 8)}, {}, {"step": 3})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    (tmp_path / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing") is None
