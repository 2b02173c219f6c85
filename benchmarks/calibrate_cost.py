"""Calibrate the cost model on this CPU: measure a CPU card, then predict and time real steps.

1. The card, from micro-benchmarks on one thread: the fp32 GEMM rate (1024^3 `mm`) and its
   share at thinner products ((1024 x K) @ (K x 1024), K = 32..512: the card's `gemm_curve`
   by smallest dimension), the copy bandwidth (`copy_` of 64 MiB, bytes read + written per second), the element-wise
   rate (`exp` of 4M floats, elements per second), and the per-op overhead (a tiny
   forward + backward under autograd, seconds per dispatched aten op, the ops counted with
   a dispatch mode). Efficiencies are 1: these are measured rates, not datasheet peaks.
2. The steps: `Run.train_step` of `matta train --model gpt2-tiny` (the README demo: batch
   16 x 128 tokens, the builtin corpus, BPE 2048, MatTA, AdamW, fp32) and `--model gpt2`
   (batch 4), timed for real, against `matta cost` on the card.
The micro-benchmarks and one step of each model take turns for `--repeats` rounds (after a
warm-up step each), so a load that changes during the run falls on the card and the steps
alike; the card takes the median of each rate, a step its median time.

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

THIN_GEMM_DIMS = (32, 64, 128, 256, 512)
STEP_CONFIGS = {
    "gpt2-tiny": dict(model="gpt2-tiny", batch_size=16, block_size=128),
    "gpt2": dict(model="gpt2", batch_size=4, block_size=128),
}


def seconds(fn, repeats=1):
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start



class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure_rates(repeats: int = 3) -> dict:
    """One round of the card's micro-benchmarks (see the module docstring)."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    x, y = torch.randn(4 * 2**20), torch.empty(4 * 2**20)
    w = torch.randn(8, requires_grad=True)

    def tiny_step():
        ((w * 2 + 1).tanh() * w).sum().backward()

    counter = _OpCounter()
    with counter:
        tiny_step()
    thin = {}
    for k in THIN_GEMM_DIMS:
        a_k, b_k = torch.randn(n, k), torch.randn(k, n)
        thin[f"gemm_flops_k{k}"] = 2 * n * n * k / seconds(lambda: torch.mm(a_k, b_k), repeats)
    return {
        **thin,
        "gemm_flops": 2 * n**3 / seconds(lambda: torch.mm(a, b), repeats),
        "copy_bandwidth": 2 * src.numel() * 4 / seconds(lambda: dst.copy_(src), repeats),
        "exp_elements_per_s": x.numel() / seconds(lambda: torch.exp(x, out=y), repeats),
        "seconds_per_op": seconds(lambda: [tiny_step() for _ in range(200)], repeats) / (200 * counter.ops),
    }


def card_of(rounds: list) -> DeviceCard:
    """The CPU card of the median of each rate over the rounds."""
    rate = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    gemm = rate["gemm_flops"]
    curve = [(k, min(1.0, rate[f"gemm_flops_k{k}"] / gemm)) for k in THIN_GEMM_DIMS] + [(1024, 1.0)]
    return DeviceCard(
        name=f"CPU ({os.cpu_count()} cores, 1 thread) measured {time.strftime('%Y-%m-%d')}", kind="cpu",
        peak_flops={"fp32": gemm},  # what was measured; a bf16 step is refused rather than guessed
        vector_flops=rate["exp_elements_per_s"], bandwidth=rate["copy_bandwidth"], launch=rate["seconds_per_op"],
        gemm_curve=curve,
        source=f"benchmarks/calibrate_cost.py micro-benchmarks (1 thread, median of {len(rounds)} rounds)")


def set_up(values: dict, run_dir: Path) -> Run:
    cfg = make_config({**values, "out": str(run_dir / values["model"]), "progress": False, "family": False,
                       "eval_interval": 0, "checkpoint_interval": 0, "max_steps": 10**6, "threads": 1})
    run = Run(cfg, log=lambda *a, **k: None)
    run.setup()
    run.train_step()  # warm-up
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card-out", default="cpu-card.json", help="where to write the measured CPU card")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(STEP_CONFIGS), choices=list(STEP_CONFIGS))
    parser.add_argument("--json", default=None, help="also write all numbers here")
    parser.add_argument("--tmp", default="/tmp/matta-calibrate", help="run directories of the timed steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    runs = {name: set_up(STEP_CONFIGS[name], Path(args.tmp)) for name in args.models}
    rounds, step_times = [], {name: [] for name in runs}
    for _ in range(args.repeats):
        rounds.append({**measure_rates(), "load": os.getloadavg()[0]})
        for name, run in runs.items():
            step_times[name].append(_time(run.train_step))
    card = card_of(rounds)
    Path(args.card_out).write_text(card.to_json() + "\n")
    print(f"CPU card: GEMM {card.peak_flops['fp32'] / 1e9:.1f} GFLOP/s (share by smallest dimension "
          + ", ".join(f"{k}: {v:.2f}" for k, v in card.gemm_curve) + f"), copy {card.bandwidth / 1e9:.1f} GB/s, "
          f"exp {card.vector_flops / 1e9:.2f} G/s, {card.launch * 1e6:.1f} us per op (medians of {args.repeats} rounds) "
          f"-> {args.card_out}")
    rows = []
    for name, run in runs.items():
        measured = statistics.median(step_times[name])
        cfg = run.cfg
        pred = predict(trace_training_step(cfg, run.data.vocab_size, card), card)
        error = pred.step_time / measured - 1
        rows.append({"model": name, "batch": f"{cfg.batch_size} x {cfg.block_size}", "vocab": run.data.vocab_size,
                     "measured_s": measured, "runs_s": step_times[name], "predicted_s": pred.step_time, "error": error,
                     "predicted_phases_s": pred.phases, "launches": pred.launches})
        print(f"{name}: measured {measured:.3f} s per step (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in step_times[name])}), predicted {pred.step_time:.3f} s ({100 * error:+.0f}%); "
              "predicted phases " + ", ".join(f"{k} {v:.3f}" for k, v in pred.phases.items() if v), flush=True)
    end_load = os.getloadavg()[0]
    print(f"load average {load:.1f} before, {end_load:.1f} after")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": json.loads(card.to_json()), "rounds": rounds, "steps": rows,
                                               "load": [load, end_load]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
