"""What a `matta study` would cost on one lent GPU, from what this CPU can count: a model.

For each kind of run of a study (mode x optimizer), builds the run `matta study` would start
(the preset's `matta train` flags), times a few steps here, and counts what one step
dispatches (ATen ops, views excepted: on a GPU each is about one kernel launch; the nested
Dense op is one Triton launch there but several ATen ops on the CPU path, so the count is an
upper bound) and its FLOPs (the model's own `flops_per_token`). A GPU step is then priced as

    host  = ops x HOST_S_PER_OP                       (the CPU side: Python, dispatch, launch)
    gpu   = ops x KERNEL_S_MIN + FLOPs / (MFU x peak) (the device side)
    step  = max(host, gpu)

and the study, with `--jobs` runs side by side on one GPU, as
max(sum of gpu time, sum of host time / jobs) over all its runs (processes share the GPU by
time slices, and each needs a CPU core), plus a fixed cost per run in waves of `--jobs`.
Every constant is an assumption, printed with the result; the first GPU study measures them
(its RESULTS.md has the wall time of every run).

    python benchmarks/study_gpu_budget.py --preset small --steps 3000 --seeds 3 --jobs 8
"""
import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from matta.train.config import config_from_flags  # noqa: E402
from matta.study import CORE_ARMS, PRESETS, parse_arm  # noqa: E402
from matta.train import Run  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s (NVIDIA's H200 datasheet, the same as an H100 SXM)
HOST_S_PER_OP = 10e-6  # eager PyTorch: Python, dispatch and launch per op on a server CPU
KERNEL_S_MIN = 3e-6  # the shortest a launched kernel keeps the GPU busy, launch gap included
MFU = 0.25  # of the bf16 peak, for these small matrix products
FIXED_S_PER_RUN = 40.0  # start, imports, Triton compile and autotune, data, final evaluation


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:  # views launch nothing
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def run_kind(preset, mode: str, optimizer: str, steps: int) -> dict:
    """CPU seconds per step, ATen ops and FLOPs of one step of one kind of study run."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_flags([*preset.budgets["lm"].flags, "--data", preset.data, "--mode", mode,
                                 "--optimizer", optimizer, "--threads", "1", "--out", tmp, "--no-progress"])
        run = Run(cfg, log=lambda *a, **k: None)
        run.setup()
        run.train_step()  # first step: state allocation
        with CountOps() as counter:
            run.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            run.train_step()
        cpu_s = (time.perf_counter() - start) / steps if steps else float("nan")
        cfg = run.cfg
        tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum
        return {"mode": mode, "optimizer": optimizer, "cpu_s_per_step": cpu_s, "ops": sum(counter.ops.values()),
                "flops": run.model.flops_per_token(cfg.block_size, run.objective.criterion.streams) * tokens,
                "tokens": tokens}


def gpu_step(kind: dict) -> tuple[float, float]:
    """(host s, GPU s) of one step on the model above."""
    host = kind["ops"] * HOST_S_PER_OP
    gpu = kind["ops"] * KERNEL_S_MIN + kind["flops"] / (MFU * H200_BF16_PEAK)
    return host, gpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="the study's steps (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--sweep", type=int, default=3, help="learning rates per optimizer (1: --lr given, no sweep)")
    p.add_argument("--timed", type=int, default=3, help="CPU steps timed per kind (0: count only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    steps = args.steps or preset.budgets["lm"].steps
    arms = [parse_arm(a) for a in CORE_ARMS]
    kinds = {}
    for mode, opt in sorted({(a.kind.mode, a.optimizer) for a in arms}):
        kinds[(mode, opt)] = k = run_kind(preset, mode, opt, args.timed)
        host, gpu = gpu_step(k)
        print(f"{mode:8s} {opt:8s} CPU {k['cpu_s_per_step']:7.3f} s/step (measured, 1 thread)   "
              f"{k['ops']:5d} ops/step   {k['flops'] / 1e9:8.1f} GFLOP/step   predicted GPU step: host "
              f"{1e3 * host:6.2f} ms, device {1e3 * gpu:6.2f} ms", flush=True)
    runs = [(a.kind.mode, a.optimizer) for a in arms for _ in range(args.seeds)]
    runs += [("student", o) for o in {a.optimizer for a in arms} for _ in range(args.sweep - 1)]
    host_total = sum(gpu_step(kinds[r])[0] for r in runs) * steps
    gpu_total = sum(gpu_step(kinds[r])[1] for r in runs) * steps
    waves = math.ceil(len(runs) / args.jobs)
    wall = max(gpu_total, host_total / args.jobs) + waves * FIXED_S_PER_RUN
    print(f"\n{len(runs)} runs of {steps} steps, {args.jobs} side by side: predicted GPU busy {gpu_total:.0f} s, "
          f"host {host_total:.0f} s ({host_total / args.jobs:.0f} s per job slot), {waves} waves x "
          f"{FIXED_S_PER_RUN:.0f} s fixed: about {wall / 60:.1f} min")
    print(f"assumptions: {HOST_S_PER_OP * 1e6:.0f} us host per op, {KERNEL_S_MIN * 1e6:.0f} us device floor per "
          f"kernel, MFU {MFU} of {H200_BF16_PEAK / 1e12:.0f} TFLOP/s bf16, {FIXED_S_PER_RUN:.0f} s fixed per run")


if __name__ == "__main__":
    main()
