"""benchmarks/gpu_check.sh keeps what it measured on a 15-minute lease.

A lease returns at most 8 files from $OUT and the last 12,000 characters of output, and kills
a command at 10 minutes. These run the real script on this CPU with fake benchmark scripts
(MATTA_GPU_CHECK_BENCHMARKS), so each takes seconds: one where every step fails at once, one
started past its deadline, and one whose first step hangs until it is killed at its limit.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
LEASE_FILES, LEASE_OUTPUT_CHARS = 8, 12_000


def run_check(tmp_path, fake_benchmarks, deadline, reserve=5, step_limit=600):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "MATTA_GPU_CHECK_PYTHON": sys.executable,
           "MATTA_GPU_CHECK_BENCHMARKS": str(fake_benchmarks), "MATTA_GPU_CHECK_DEADLINE_S": str(deadline),
           "MATTA_GPU_CHECK_RESERVE_S": str(reserve), "MATTA_GPU_CHECK_STEP_LIMIT_S": str(step_limit),
           "TMPDIR": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=deadline + 60)
    return proc, out, time.monotonic() - start


def check_lease_files(out: Path):
    """What comes back from a lease: at most 8 plain files, with plain names."""
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= LEASE_FILES, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", str(f)) for f in files), files
    assert {"summary.txt", "results.json", "gpu_check.tar.gz"} <= {str(f) for f in files}, files
    return files


def archived(out: Path, name: str) -> str:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return tar.extractfile(f"./{name}").read().decode()


def test_a_dry_run_where_every_step_fails_leaves_the_summary(tmp_path):
    (tmp_path / "no_benchmarks").mkdir()
    proc, out, _ = run_check(tmp_path, tmp_path / "no_benchmarks", deadline=120)
    check_lease_files(out)
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.endswith(summary), proc.stdout[-2000:]  # the summary prints last
    assert proc.returncode == 1  # some step failed
    steps = [line.split("\t") for line in archived(out, "steps.tsv").splitlines()[1:]]
    names = [s[0] for s in steps]
    assert names == ["nested_linear", "nested_linear_fp32", "dispatch_table", "matta_loss", "models",
                     "train_throughput", "cost_prediction", "shampoo_roots", "kernel_tests"], names
    assert all(code not in ("0", "skipped") for _, code, _, _ in steps), steps
    for name in names:
        if name in ("cost_prediction", "kernel_tests"):  # these need CUDA
            assert re.search(rf"^{name} +skipped \(no CUDA device\)", summary, re.M), (name, summary)
        else:
            assert re.search(rf"^{name} +(FAILED|KILLED)", summary, re.M), (name, summary)
    assert not (out / "dispatch_table.json").exists()  # nothing measured, nothing written


def test_past_the_deadline_every_step_is_skipped_and_the_summary_prints(tmp_path):
    (tmp_path / "no_benchmarks").mkdir()
    proc, out, _ = run_check(tmp_path, tmp_path / "no_benchmarks", deadline=1, reserve=0)
    check_lease_files(out)
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.endswith(summary) and proc.returncode == 0  # skipping is no failure
    for name in ("nested_linear", "dispatch_table", "train_throughput", "shampoo_roots"):
        assert re.search(rf"^{name} +skipped \(deadline\)", summary, re.M), (name, summary)


def test_a_step_killed_at_its_limit_keeps_its_rows(tmp_path):
    """The first step writes a row every 0.2 s and never ends: it is killed at its (capped)
    limit, the steps after it still run, and the summary prints with its rows."""
    fake = tmp_path / "slow_benchmarks"
    fake.mkdir()
    (fake / "bench_nested_linear.py").write_text(textwrap.dedent(f"""
        import argparse, sys, time
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from partial_results import PartialResults
        parser = argparse.ArgumentParser()
        parser.add_argument("--gpu", action="store_true")
        parser.add_argument("--json")
        args, _ = parser.parse_known_args()
        results = PartialResults(args.json, op="nested_linear", rows=[])
        for t in range(1, 10**6):
            row = dict(shape="ffn_up", T=t, dtype_key="bf16", variant="triton", median_ms=1.5, tflops=300.0,
                       speedup_vs_naive=1.25, fraction_of_ceiling=0.9)
            results.add("rows", row, f"row {{t}}")
            time.sleep(0.2)
    """))
    # 20 s: the fake imports torch and matta first, which takes seconds on a loaded machine.
    proc, out, _ = run_check(tmp_path, fake, deadline=300, step_limit=20)
    check_lease_files(out)
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.endswith(summary)
    assert re.search(r"^nested_linear +KILLED at its 20 s limit", summary, re.M), summary
    assert re.search(r"^train_throughput +FAILED", summary, re.M), summary  # the next steps ran
    kept = json.loads((out / "results.json").read_text())["nested_linear"]
    assert kept["complete"] is False and len(kept["rows"]) >= 2, kept
    assert "nested_linear  (partial" in summary
    last = kept["rows"][-1]["T"]
    assert re.search(rf"^bf16 +ffn_up +{last} ", summary, re.M)  # the last row saved is in the summary
    assert f"row {last}" in archived(out, "nested_linear.txt")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_full_summary_fits_in_what_a_lease_returns(tmp_path, monkeypatch):
    """Every row of a complete run (the default shapes, token counts and dtypes), 20 failing
    tests and the dispatch table: every nested-linear row is in the summary, and the summary
    fits in the 12,000 characters a lease returns."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the benchmark runs as a script
    summary_module = _load("gpu_summary")
    shapes = _load("bench_nested_linear").SHAPES
    work = tmp_path / "work"
    work.mkdir()

    def nested(dtypes, shapes_, tokens):
        rows = [dict(shape=s, T=t, dtype_key=d, variant=v, median_ms=12.345, tflops=654.3, speedup_vs_naive=1.23,
                     fraction_of_ceiling=0.98)
                for d in dtypes for s in shapes_ for t in tokens for v in ("ceiling", "naive", "torch", "triton")]
        return {"op": "nested_linear", "rows": rows, "complete": True}

    docs = {
        "nested_linear": nested(["bf16"], list(shapes), [256, 1024, 8192, 16384]),
        "nested_linear_fp32": nested(["tf32", "fp32"], ["ffn_up"], [1024, 16384]),
        "matta_loss": {"gpu": [dict(tokens=t, variant=v, median_s=0.0123, peak_extra_mib=12345.0, loss_rel_diff=1e-3,
                                    dweight_rel_diff=2e-3) for t in (4096, 16384) for v in ("naive", "fused")]},
        "models": {**{f"{n}_ms": 123.45 for n in ("student", "ta", "nested_student_only", "nested_ta_only",
                                                 "matta_auto", "matta_torch")}, "matta_auto_ratio": 0.98, "rounds": 10},
        "train_throughput": {"rows": [dict(row=f"nested {m}", step_s=0.1234, tokens_per_s=65432.0, achieved_tflops=456.7,
                                           mfu=0.456) for m in ("student", "ta", "matta", "matta (shampoo)",
                                                                "matta (compiled)")],
                             "extras": [dict(label="shampoo", seconds=40.0, estimate_s=40.0)], "setup_s": 12.0,
                             "student_over_matta": 0.4, "matta_over_plain_sum": 1.0},
        "shampoo_roots": {"roots": [dict(block=b, n=n, timed_count=48, full_count=1541, loop_s=1.0, batch_s=1.0,
                                         auto_s=1.0, newton_s=1.0, auto_choice="newton", auto_setup_s=1.0)
                                    for b, n in ((1024, 1024), (1024, 128), (256, 256), (256, 128))],
                          "optimizer_step": dict(layers=4, adamw_step_ms=1.0, shampoo_step_ms=2.0)},
    }
    for name, doc in docs.items():
        (work / f"{name}.json").write_text(json.dumps(doc))
    (work / "steps.tsv").write_text("step\texit\tseconds\tlimit\n" + "".join(
        f"{name}\t0\t100\t100\n" for name in [*docs, "dispatch_table", "kernel_tests"]))
    (work / "machine.txt").write_text("NVIDIA H200, 143771 MiB, 570.00\npython 3.12.3 torch 2.11.0 triton 3.6.0\n")
    (work / "dispatch_table.txt").write_text("".join(
        f"nested_linear  sm_90 bf16  T<={t:<6} -> triton (triton 1.000 ms, torch 2.000 ms)\n"
        for t in (256, 1024, 8192, 16384)) + "8 entries measured; 8 in matta/ops/dispatch_table.json\n")
    (work / "kernel_tests.txt").write_text("".join(
        f"FAILED tests/test_nested_linear.py::test_forward_matches_reference[case{i}-bf16-triton] - "
        f"AssertionError: relative error 1.2e-01 > 2.0e-02\n" for i in range(20)) + "20 failed, 980 passed in 250.0s\n")
    text = summary_module.summary(work)
    assert len(text) < LEASE_OUTPUT_CHARS - 1000, len(text)  # room for the last lines of the steps
    for doc in (docs["nested_linear"], docs["nested_linear_fp32"]):
        for r in doc["rows"]:
            assert re.search(rf"^{r['dtype_key']} +{r['shape']} +{r['T']} ", text, re.M), r
    assert "20 failed, 980 passed" in text and "KILLED" not in text
