"""Calibrate the cost model on this CPU: measure a CPU card, then predict and time real steps.

1. The card, from micro-benchmarks on one thread: the fp32 GEMM rate (1024^3 `mm`), the
   copy bandwidth (`copy_` of 64 MiB, bytes read + written per second), the element-wise
   rate (`exp` of 4M floats, elements per second), and the per-op overhead (a tiny
   forward + backward under autograd, seconds per dispatched aten op, the ops counted with
   a dispatch mode). Efficiencies are 1: these are measured rates, not datasheet peaks.
2. The steps: `Run.train_step` of `matta train --model gpt2-tiny` (the README demo: batch
   16 x 128 tokens, the builtin corpus, BPE 2048, MatTA, AdamW, fp32) and `--model gpt2`
   (batch 4), timed for real (medians after a warm-up), against `matta cost` on the card.

    python benchmarks/calibrate_cost.py --card-out cpu-card.json [--repeats 5] [--models gpt2-tiny gpt2]
    matta cost --card cpu-card.json --model gpt2-tiny ...     # then price any step on this card

Timings on a shared machine are noisy: run it when the load is low and quote the load.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from matta.costmodel import DeviceCard, trace_training_step  # noqa: E402
from matta.costmodel.predict import predict  # noqa: E402
from matta.train import Run, make_config  # noqa: E402

STEP_CONFIGS = {
    "gpt2-tiny": dict(model="gpt2-tiny", batch_size=16, block_size=128),
    "gpt2": dict(model="gpt2", batch_size=4, block_size=128),
}


def best_of(fn, repeats):
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure_card(repeats: int) -> tuple[DeviceCard, dict]:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / best_of(lambda: torch.mm(a, b), repeats)
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    bandwidth = 2 * src.numel() * 4 / best_of(lambda: dst.copy_(src), repeats)
    x, y = torch.randn(4 * 2**20), torch.empty(4 * 2**20)
    vector = x.numel() / best_of(lambda: torch.exp(x, out=y), repeats)
    w = torch.randn(8, requires_grad=True)

    def tiny_step():
        ((w * 2 + 1).tanh() * w).sum().backward()

    counter = _OpCounter()
    with counter:
        tiny_step()
    per_op = best_of(lambda: [tiny_step() for _ in range(200)], repeats) / (200 * counter.ops)
    raw = {"gemm_flops": gemm, "copy_bandwidth": bandwidth, "exp_elements_per_s": vector, "seconds_per_op": per_op,
           "ops_in_tiny_step": counter.ops}
    card = DeviceCard(
        name=f"CPU ({os.cpu_count()} cores, 1 thread) measured {time.strftime('%Y-%m-%d')}", kind="cpu",
        peak_flops={"fp32": gemm, "fp64": gemm / 2, "bf16": gemm, "fp16": gemm, "tf32": gemm},
        vector_flops=vector, bandwidth=bandwidth, launch=per_op, memory=0.0,
        source="benchmarks/calibrate_cost.py micro-benchmarks (1 thread)")
    return card, raw


def time_steps(values: dict, repeats: int, run_dir: Path):
    """(median seconds of `Run.train_step`, the data's vocabulary, the config) for `values`."""
    cfg = make_config({**values, "out": str(run_dir / values["model"]), "progress": False, "family": False,
                       "eval_interval": 0, "checkpoint_interval": 0, "max_steps": 10**6, "threads": 1})
    run = Run(cfg, log=lambda *a, **k: None)
    run.setup()
    return best_of(run.train_step, repeats), run.data.vocab_size, cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card-out", default="cpu-card.json", help="where to write the measured CPU card")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(STEP_CONFIGS), choices=list(STEP_CONFIGS))
    parser.add_argument("--json", default=None, help="also write all numbers here")
    parser.add_argument("--tmp", default="/tmp/matta-calibrate", help="run directories of the timed steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    card, raw = measure_card(args.repeats)
    Path(args.card_out).write_text(card.to_json() + "\n")
    print(f"CPU card (load average {load:.1f}): GEMM {raw['gemm_flops'] / 1e9:.1f} GFLOP/s, copy "
          f"{raw['copy_bandwidth'] / 1e9:.1f} GB/s, exp {raw['exp_elements_per_s'] / 1e9:.2f} G/s, "
          f"{raw['seconds_per_op'] * 1e6:.1f} us per op -> {args.card_out}")
    rows = []
    for name in args.models:
        measured, vocab, cfg = time_steps(STEP_CONFIGS[name], args.repeats, Path(args.tmp))
        trace = trace_training_step(cfg, vocab, card)
        pred = predict(trace, card)
        error = pred.step_time / measured - 1
        rows.append({"model": name, "batch": f"{cfg.batch_size} x {cfg.block_size}", "vocab": vocab,
                     "measured_s": measured, "predicted_s": pred.step_time, "error": error,
                     "predicted_phases_s": pred.phases, "launches": pred.launches})
        print(f"{name}: measured {measured:.3f} s per step (median of {args.repeats}), predicted {pred.step_time:.3f} s "
              f"({100 * error:+.0f}%); predicted phases " + ", ".join(f"{k} {v:.3f}" for k, v in pred.phases.items() if v),
              flush=True)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} before, {end_load:.1f} after")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": json.loads(card.to_json()), "raw": raw, "steps": rows,
                                               "load": [load, end_load]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
