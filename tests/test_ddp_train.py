"""`torchrun --nproc_per_node=2 -m matta train` (gloo, CPU) equals one process on the same global batch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from matta.train.checkpoint import latest_checkpoint, load_checkpoint

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def _train(args, nproc, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "matta", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "matta", "train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.parametrize(
    "optimizer, single",
    [
        ("adamw", ["--batch-size", "4"]),
        # Shampoo's inverse roots of nearly singular factors amplify rounding: there the one
        # process sums its gradient in the same two halves (accumulation) as the two ranks do.
        ("shampoo", ["--batch-size", "2", "--grad-accum", "2"]),
    ],
)
def test_two_processes_equal_one(tmp_path, optimizer, single):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 3000)))
    common = ["--data", str(corpus), "--tokenizer", "bytes", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
              "--ffn", "64", "--ffn-ta", "128", "--extra-layers", "1", "--block-size", "16", "--max-steps", "4",
              "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--eval-tokens", "128",
              "--no-progress", "--no-family", "--optimizer", optimizer, "--precondition-frequency", "2",
              "--start-preconditioning-step", "2", "--threads", "1"]
    _train(["--out", str(tmp_path / "one"), *single, *common], 1, tmp_path)
    two = _train(["--out", str(tmp_path / "two"), "--batch-size", "2", *common], 2, tmp_path)
    assert "2 process(es)" in two.stdout and two.stdout.count("validation (") == 1  # only rank 0 reports

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["loss_student"], r["loss_ta"]) for r in map(json.loads, lines)
                if r["kind"] == "train"]

    one, dist = losses("one"), losses("two")
    assert [s for s, *_ in one] == [s for s, *_ in dist] == [1, 2, 3, 4]
    for a, b in zip(one, dist):
        assert b[1:] == pytest.approx(a[1:], rel=2e-5)
    w1 = load_checkpoint(latest_checkpoint(tmp_path / "one"))["model"]
    w2 = load_checkpoint(latest_checkpoint(tmp_path / "two"))["model"]
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=2e-5, msg=name)
