"""CPU time of one Shampoo step on a 6 x 256 MLP, against another Shampoo implementation.

The parameters of 6 `nn.Linear(256, 256)` layers (weights and biases) with fixed random
gradients; blocks of --block (256: one block per weight; 64: 16 per weight). Timed: a
steady preconditioned step (no root due), and a step amortised over precondition_frequency
= 20 steps (one of them roots every factor, with eigh). The two implementations take turns
in every repeat (so load drifts hit both alike); medians over --repeats.

    python benchmarks/bench_shampoo_step.py --baseline /tmp/shampoo_old.py   # a copy of the old matta/optim/shampoo.py
    python benchmarks/bench_shampoo_step.py --block 64 --repeats 15

--baseline is a Python file defining a `Shampoo` class with matta's constructor (relative
imports of matta are rewritten to absolute ones); without it, only this checkout is timed.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.optim import Shampoo  # noqa: E402

LAYERS, WIDTH, FREQUENCY = 6, 256, 20


def load_baseline(path):
    """The `Shampoo` class of a file such as an older matta/optim/shampoo.py."""
    source = open(path).read().replace("from ..ops", "from matta.ops")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("baseline_shampoo", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module.Shampoo


def make(cls, block):
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(LAYERS):
        params.append(torch.nn.Parameter(torch.randn(WIDTH, WIDTH, generator=generator) * WIDTH**-0.5))
        params.append(torch.nn.Parameter(torch.zeros(WIDTH)))
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    opt = cls(params, lr=1e-3, max_preconditioner_dim=block, precondition_frequency=FREQUENCY,
              start_preconditioning_step=1, root_method="eigh")
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # step 1: state, roots
    return opt


def time_steps(opt, count):
    start = time.perf_counter()
    for _ in range(count):
        opt.step()
    return (time.perf_counter() - start) / count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a file with the Shampoo class to compare with")
    parser.add_argument("--block", type=int, default=256, help="max_preconditioner_dim")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classes = {"this": Shampoo}
    if args.baseline:
        classes["baseline"] = load_baseline(args.baseline)
    steady = {name: [] for name in classes}
    amortised = {name: [] for name in classes}
    for _ in range(args.repeats):
        for name, cls in classes.items():
            opt = make(cls, args.block)  # at step 1: steps 2..20 are steady, step 21 roots
            steady[name].append(time_steps(opt, FREQUENCY - 1))
            amortised[name].append(time_steps(opt, FREQUENCY))
    blocks = LAYERS * (-(-WIDTH // args.block)) ** 2
    print(f"{LAYERS} x Linear({WIDTH}, {WIDTH}), {blocks} blocks of {min(args.block, WIDTH)}, torch {torch.__version__}, "
          f"{args.threads} thread(s), medians of {args.repeats}:")
    for name in classes:
        print(f"  {name:8s} steady step {1e3 * statistics.median(steady[name]):7.2f} ms   "
              f"amortised over {FREQUENCY} (one roots) {1e3 * statistics.median(amortised[name]):7.2f} ms")
    if args.baseline:
        print(f"  this / baseline: steady {statistics.median(steady['this']) / statistics.median(steady['baseline']):.2f}, "
              f"amortised {statistics.median(amortised['this']) / statistics.median(amortised['baseline']):.2f}")


if __name__ == "__main__":
    main()
