"""`torchrun --nproc_per_node=2 -m matta train` (gloo, CPU): DistributedDataParallel and
FSDP2 give the losses of one process on the same global batch, and a killed 2-process run
resumes to exactly the end of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from matta.train.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow

TINY = ["--tokenizer", "bytes", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--ffn", "64", "--ffn-ta", "128",
        "--extra-layers", "1", "--block-size", "16", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0",
        "--eval-tokens", "128", "--no-progress", "--no-family", "--threads", "1"]


def _command(args, nproc):
    if nproc == 1:
        return [sys.executable, "-m", "matta", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "matta", "train", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _train(args, nproc, cwd):
    job = subprocess.Popen(_command(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=_env(), cwd=cwd)
    try:
        stdout, stderr = job.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        _kill_tree(job.pid)  # no rank may outlive the test
        stdout, stderr = job.communicate()
        pytest.fail(f"training did not end in 30 minutes:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert job.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _last_step(run_dir) -> int:
    """The last step rank 0 has logged so far (0 before any; a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return max(steps)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own
    sessions, so killing its process group would leave them running)."""
    children: dict = {}
    for stat in os.scandir("/proc"):
        if stat.name.isdigit():
            try:
                with open(f"/proc/{stat.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in tree[1:]:  # wait until the workers are gone (or zombies)
        while os.path.exists(f"/proc/{p}"):
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.01)


def _weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["model"]


@pytest.mark.parametrize(
    "optimizer, parallel, single, each",
    [
        # each rank accumulates two micro-batches of one sequence: no_sync, then one all-reduce
        ("adamw", "ddp", ["--batch-size", "4"], ["--batch-size", "1", "--grad-accum", "2"]),
        # Shampoo's inverse roots of nearly singular factors amplify rounding: there the one
        # process sums its gradient in the same two halves (accumulation) as the two ranks do.
        ("shampoo", "ddp", ["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2"]),
        ("adamw", "fsdp", ["--batch-size", "4"], ["--batch-size", "1", "--grad-accum", "2"]),
    ],
)
def test_two_processes_equal_one(tmp_path, corpus, optimizer, parallel, single, each):
    common = ["--data", str(corpus), *TINY, "--max-steps", "4", "--optimizer", optimizer,
              "--precondition-frequency", "2", "--start-preconditioning-step", "2"]
    _train(["--out", str(tmp_path / "one"), *single, *common], 1, tmp_path)
    two = _train(["--out", str(tmp_path / "two"), *each, "--parallel", parallel, *common], 2, tmp_path)
    assert f"2 process(es) ({parallel})" in two.stdout and two.stdout.count("validation (") == 1  # only rank 0 reports

    one, dist = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in dist] == [1, 2, 3, 4]
    # Tolerance: the two ranks sum the batch's gradient in a different order than one
    # process does (fp32 rounding, ~1e-7 relative per step), which Adam and Shampoo carry on.
    for a, b in zip(one, dist):
        for key in ("loss", "loss_student", "loss_ta", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), key
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("parallel, optimizer", [("ddp", "shampoo"), ("fsdp", "adamw")])
def test_killed_two_process_run_resumes_exactly(tmp_path, corpus, parallel, optimizer):
    # Accumulation (no_sync on the first micro-batch), dropout (each rank its own random
    # stream) and, for DDP, Shampoo's roots split across the ranks: all must resume exactly.
    args = ["--data", str(corpus), *TINY, "--max-steps", "24", "--checkpoint-interval", "4", "--batch-size", "2",
            "--grad-accum", "2", "--dropout", "0.1", "--parallel", parallel, "--optimizer", optimizer,
            "--precondition-frequency", "2", "--start-preconditioning-step", "2"]
    _train(["--out", str(tmp_path / "straight"), *args], 2, tmp_path)

    broken = tmp_path / "broken"
    job = subprocess.Popen(_command(["--out", str(broken), *args], 2), cwd=tmp_path, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and job.poll() is None and _last_step(broken) < 6:
            time.sleep(0.02)
    finally:
        _kill_tree(job.pid)  # torchrun and both ranks, with no chance to clean up
        job.wait()
    killed_at = _last_step(broken)
    time.sleep(1)
    assert _last_step(broken) == killed_at, "a rank survived the kill"
    checkpoint = int((broken / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 6 <= killed_at < 24 and checkpoint < killed_at, "the run ended before it could be killed"
    resumed = _train(["--out", str(broken), *args, "--resume"], 2, tmp_path)
    assert f"resumed from {broken / 'checkpoints' / f'step_{checkpoint:07d}'} at step {checkpoint}" in resumed.stdout

    a, b = _records(tmp_path / "straight"), _records(broken)
    assert [r["step"] for r in b] == list(range(1, 25))
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]  # bit-identical
    w1, w2 = _weights(tmp_path / "straight"), _weights(broken)
    assert all(torch.equal(w1[name], w2[name]) for name in w1)
