"""The backend dispatcher: MATTA_BACKEND, the dispatch table, its buckets, fallbacks and
refusals, MATTA_INTERPRET_TILES, and the script that writes the table from benchmarks."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from matta.ops import backend

ROOT = Path(__file__).resolve().parents[1]


def write_table(path, entries):
    path.write_text(json.dumps({"entries": entries}))
    return path


def entry(tokens, chosen, op="nested_linear", capability="sm_90", dtype="bf16"):
    return {"op": op, "capability": capability, "dtype": dtype, "tokens": tokens, "backend": chosen}


def test_token_bucket_is_the_next_power_of_two():
    assert [backend.token_bucket(n) for n in (0, 1, 2, 3, 255, 256, 257, 16384, 16385)] == \
        [1, 1, 2, 4, 256, 256, 512, 16384, 32768]


def test_dtype_key_follows_torch_tf32_switch():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert backend.dtype_key(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert backend.dtype_key(torch.float32) == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert backend.dtype_key(torch.bfloat16) == "bf16" and backend.dtype_key(torch.float16) == "fp16"


def test_lookup_takes_the_nearest_measured_bucket(tmp_path):
    path = write_table(tmp_path / "t.json", [entry(256, "torch"), entry(4096, "triton"), entry(1024, "torch", dtype="fp16")])
    assert backend.lookup("nested_linear", "sm_90", "bf16", 200, path) == "torch"  # bucket 256, measured
    assert backend.lookup("nested_linear", "sm_90", "bf16", 3000, path) == "triton"  # 4096
    assert backend.lookup("nested_linear", "sm_90", "bf16", 100000, path) == "triton"  # beyond: nearest, 4096
    assert backend.lookup("nested_linear", "sm_90", "bf16", 1, path) == "torch"  # below: nearest, 256
    # 1024 is two doublings from 256 and from 4096: the smaller bucket wins the tie.
    assert backend.lookup("nested_linear", "sm_90", "bf16", 1024, path) == "torch"
    assert backend.lookup("nested_linear", "sm_90", "fp16", 99, path) == "torch"


def test_lookup_falls_back_to_the_default_rule(tmp_path):
    path = write_table(tmp_path / "t.json", [entry(256, "torch")])
    # Another capability, dtype or op has nothing measured: Triton, except fp32 without TF32.
    assert backend.lookup("nested_linear", "sm_80", "bf16", 256, path) == "triton"
    assert backend.lookup("matta_loss", "sm_90", "bf16", 256, path) == "triton"
    assert backend.lookup("nested_linear", "sm_90", "tf32", 256, path) == "triton"
    assert backend.lookup("nested_linear", "sm_90", "fp32", 256, path) == "torch"


def test_shipped_table_is_valid_and_decides_what_it_holds():
    """The shipped table parses, every entry decides its own lookup, and what it does not
    hold falls to the default rule."""
    table = backend.load_dispatch_table(backend.DISPATCH_TABLE)
    raw = json.loads(backend.DISPATCH_TABLE.read_text())["entries"]
    assert sum(len(buckets) for buckets in table.values()) == len(raw)
    for entry in raw:
        assert backend.lookup(entry["op"], entry["capability"], entry["dtype"], entry["tokens"],
                              backend.DISPATCH_TABLE) == entry["backend"]
    for dtype in backend.DTYPE_KEYS:
        if ("an_op_never_measured", "sm_90", dtype) not in table:
            assert backend.lookup("an_op_never_measured", "sm_90", dtype, 256) == backend.default_backend(dtype)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"rows": []}', 'list "entries"'),
    ('{"entries": [3]}', "entry 0 is not an object"),
    ('{"entries": [{"op": "x"}]}', "entry 0 lacks capability, dtype, tokens, backend"),
    (json.dumps({"entries": [entry(256, "torch", capability="90")]}), "capability must look like 'sm_90'"),
    (json.dumps({"entries": [entry(256, "torch", dtype="float32")]}), "dtype must be one of"),
    (json.dumps({"entries": [entry(300, "torch")]}), "tokens must be a power of two"),
    (json.dumps({"entries": [entry(256, "cuda")]}), "backend must be 'triton' or 'torch'"),
    (json.dumps({"entries": [entry(256, "torch"), entry(256, "triton")]}), "entry 1 repeats"),
])
def test_bad_table_is_refused_with_its_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"dispatch table {path}") as info:
        backend.load_dispatch_table(path)
    assert problem in str(info.value)


def test_missing_table_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MATTA_DISPATCH_TABLE", str(tmp_path / "absent.json"))
    with pytest.raises(backend.BackendError, match="absent.json"):
        backend.lookup("nested_linear", "sm_90", "bf16", 256)


def test_table_is_reread_when_it_changes(tmp_path, monkeypatch):
    path = write_table(tmp_path / "t.json", [entry(256, "torch")])
    monkeypatch.setenv("MATTA_DISPATCH_TABLE", str(path))
    assert backend.lookup("nested_linear", "sm_90", "bf16", 256) == "torch"
    write_table(path, [entry(256, "triton"), entry(512, "triton")])
    assert backend.lookup("nested_linear", "sm_90", "bf16", 256) == "triton"


def fake_cuda_tensor(dtype):
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)


def test_use_triton_for_reads_the_table_on_cuda(tmp_path, monkeypatch):
    """The CUDA path of the dispatcher, with the device's capability faked (no GPU here)."""
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    path = write_table(tmp_path / "t.json", [entry(256, "torch"), entry(16384, "triton")])
    monkeypatch.setenv("MATTA_DISPATCH_TABLE", str(path))
    x = fake_cuda_tensor(torch.bfloat16)
    monkeypatch.setenv("MATTA_BACKEND", "auto")
    assert not backend.use_triton_for("nested_linear", x, tokens=300)
    assert backend.use_triton_for("nested_linear", x, tokens=12000)
    monkeypatch.setenv("MATTA_BACKEND", "triton")  # forcing wins over the table
    assert backend.use_triton_for("nested_linear", x, tokens=300)
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    assert not backend.use_triton_for("nested_linear", x, tokens=12000)


def test_use_triton_for_cpu_tensors(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("MATTA_BACKEND", "auto")
    assert not backend.use_triton_for("nested_linear", x, tokens=2)
    monkeypatch.setenv("MATTA_BACKEND", "nonsense")
    with pytest.raises(backend.BackendError, match="MATTA_BACKEND must be one of"):
        backend.use_triton_for("nested_linear", x, tokens=2)


@pytest.mark.parametrize("raw, expected", [("", None), ("128,64,32", (128, 64, 32)), (" 16, 256 ,64 ", (16, 256, 64))])
def test_interpret_tiles(raw, expected):
    assert backend.KernelKnobs.from_environment({"MATTA_INTERPRET_TILES": raw}).tiles == expected


@pytest.mark.parametrize("raw", ["64,64", "64,64,64,64", "64,48,32", "8,64,64", "512,64,64", "a,b,c", "64;64;64"])
def test_interpret_tiles_refuses_bad_values(raw):
    with pytest.raises(backend.BackendError, match="MATTA_INTERPRET_TILES"):
        backend.KernelKnobs.from_environment({"MATTA_INTERPRET_TILES": raw})


@pytest.mark.parametrize("raw, expected", [("", True), ("1", True), ("0", False)])
def test_autotune_knob(raw, expected):
    assert backend.KernelKnobs.from_environment({"MATTA_AUTOTUNE": raw}).autotune is expected
    with pytest.raises(backend.BackendError, match="MATTA_AUTOTUNE must be 0 or 1"):
        backend.KernelKnobs.from_environment({"MATTA_AUTOTUNE": "off"})


def test_knobs_are_read_once_not_per_launch(monkeypatch, knobs):
    """The launch path reads the knobs in force, never the environment."""
    knobs(tiles=(64, 64, 32))
    monkeypatch.setenv("MATTA_INTERPRET_TILES", "not,a,tile")
    assert backend.kernel_knobs().tiles == (64, 64, 32)


def test_pinned_tiles_on_a_gpu_must_be_a_kernel_config(monkeypatch, knobs):
    """Compiled (not interpreting), only the kernel's own tile shapes may be pinned; with
    autotuning off the first config is pinned."""
    kernel = pytest.importorskip("matta.kernels.nested_linear")
    from matta.ops.nested_linear import _launch_options

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    weight = torch.zeros(4, 4, dtype=torch.bfloat16)
    knobs(tiles=(32, 32, 32))
    with pytest.raises(backend.BackendError, match="not a tile shape the nested-linear kernel launches for torch.bfloat16"):
        _launch_options(kernel, weight)
    knobs(tiles=(64, 128, 64))
    assert _launch_options(kernel, weight).tiles == (64, 128, 64)
    knobs(tiles=None)
    assert _launch_options(kernel, weight).tiles is None
    knobs(autotune=False)
    assert _launch_options(kernel, weight).tiles == kernel.tile_configs(2, "ieee")[0][:3]


def test_dispatch_table_written_from_benchmark_json(tmp_path):
    """benchmarks/write_dispatch_table.py: the faster backend per dtype and bucket, merged into
    the table, and a table the dispatcher accepts."""
    rows = []
    for t, triton_ms, torch_ms in ((256, 2.0, 1.0), (16384, 10.0, 12.0)):
        for shape in ("ffn_up", "ffn_down"):
            rows += [{"shape": shape, "T": t, "dtype_key": "bf16", "variant": "triton", "median_ms": triton_ms},
                     {"shape": shape, "T": t, "dtype_key": "bf16", "variant": "torch", "median_ms": torch_ms},
                     {"shape": shape, "T": t, "dtype_key": "bf16", "variant": "naive", "median_ms": 0.1}]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"op": "nested_linear", "capability": "sm_90", "device": "H100", "rows": rows}))
    out = write_table(tmp_path / "table.json", [entry(256, "triton", capability="sm_80"), entry(256, "triton")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "write_dispatch_table.py"), str(bench),
                           "--out", str(out)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert backend.lookup("nested_linear", "sm_90", "bf16", 256, out) == "torch"  # replaced by the measurement
    assert backend.lookup("nested_linear", "sm_90", "bf16", 16384, out) == "triton"
    assert backend.lookup("nested_linear", "sm_80", "bf16", 256, out) == "triton"  # kept
    entries = json.loads(out.read_text())["entries"]
    assert len(entries) == 3 and {e["triton_ms"] for e in entries if e["capability"] == "sm_90"} == {4.0, 20.0}
