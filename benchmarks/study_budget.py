"""What a `matta study` preset costs: CPU seconds per run of each arm kind, and the projected
wall time of the whole study on an otherwise idle machine.

Runs `matta train` with a preset's flags, as the study runs it (one thread, a subprocess),
at two step counts per (mode, optimizer), and reads the child's CPU time (user + system):
CPU time does not depend much on what else the machine runs, wall time does. The
difference of the two step counts gives the CPU seconds per step; the rest is the fixed
cost of a run (start, data, final evaluation of every extracted model, report).
Projection: the CPU seconds of every run of the study (the sweep, then every arm and seed),
divided by the jobs run side by side (ideal packing; a lower bound on the wall time).

    python benchmarks/study_budget.py --preset tiny --steps 20 60 --project 400 --seeds 3 --jobs 2
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matta.study import CORE_ARMS, PRESETS, parse_arm  # noqa: E402


def cpu_seconds_of(cmd: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--steps", type=int, nargs=2, default=(20, 60), help="the two step counts measured")
    p.add_argument("--project", type=int, nargs="+", default=[400, 1000], help="study budgets (steps) to project")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--arms", default=",".join(CORE_ARMS))
    p.add_argument("--sweep", type=int, default=3, help="learning rates in each optimizer's sweep")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    arms = [parse_arm(a) for a in args.arms.split(",")]
    kinds = sorted({(a.kind.mode, a.optimizer) for a in arms} | {("student", a.optimizer) for a in arms})
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"preset {args.preset}; load average before: {load}")
    cost = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, opt in kinds:
            seconds = []
            for steps in args.steps:
                out = Path(tmp) / f"{mode}-{opt}-{steps}"
                cmd = [sys.executable, "-m", "matta", "train", *preset.budgets["lm"].flags, "--data", preset.data,
                       "--threads", "1", "--mode", mode, "--optimizer", opt, "--max-steps", str(steps),
                       "--out", str(out)]
                seconds.append(cpu_seconds_of(cmd))
            per_step = (seconds[1] - seconds[0]) / (args.steps[1] - args.steps[0])
            fixed = seconds[0] - per_step * args.steps[0]
            cost[(mode, opt)] = (fixed, per_step)
            print(f"{mode:8s} {opt:8s} CPU s per step {per_step:6.3f}   fixed CPU s per run {fixed:6.1f}", flush=True)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    optimizers = sorted({a.optimizer for a in arms})
    for steps in args.project:
        total = sum(cost[(a.kind.mode, a.optimizer)][0] + steps * cost[(a.kind.mode, a.optimizer)][1]
                    for a in arms) * args.seeds
        # The sweep: every rate but the chosen one is an extra Student-alone run of seed 0.
        total += sum((args.sweep - 1) * (cost[("student", o)][0] + steps * cost[("student", o)][1]) for o in optimizers)
        print(f"{steps} steps, {args.seeds} seeds, {len(arms)} arms, sweep of {args.sweep}: {total / 60:.0f} CPU min, "
              f">= {total / 60 / args.jobs:.0f} min with {args.jobs} jobs side by side")


if __name__ == "__main__":
    main()
