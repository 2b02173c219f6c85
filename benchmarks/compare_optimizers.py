"""Seeded comparison of Shampoo and Adam, each at its best learning rate from a small sweep.

Task: 10-class classification by a 2-hidden-layer MLP (32 -> 64 -> 64 -> 10, tanh) of inputs
that are rotated and anisotropic: x = (z * s) R with z ~ N(0, I), s log-spaced over
[0.01, 1] and R a random rotation; labels come from a fixed random teacher MLP on x. The
rotation is what a diagonal method (Adam) cannot undo and a Kronecker preconditioner can.

For each optimizer and learning rate of the grid, train --steps steps (batch 128) with each
of --seeds seeds; the score is the mean over seeds of the held-out loss at the end. The best
learning rate of each is reported with all its seeds. This is an experiment, not a test:
the outcome is recorded whichever way it goes.

    python benchmarks/compare_optimizers.py                  # a few minutes on 2 CPU cores
    python benchmarks/compare_optimizers.py --steps 200 --seeds 2 --json out.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.optim import Shampoo  # noqa: E402

DIM, HIDDEN, CLASSES = 32, 64, 10


def make_task(seed):
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator))
    scales = torch.logspace(-2, 0, DIM)
    teacher = [torch.randn(DIM, 64, generator=generator) / DIM**0.5, torch.randn(64, CLASSES, generator=generator)]

    def sample(count, gen):
        x = (torch.randn(count, DIM, generator=gen) * scales) @ rotation
        # The teacher sees the unscaled, unrotated signal, so every direction matters.
        z = x @ rotation.T / scales
        labels = (torch.tanh(z @ teacher[0]) @ teacher[1]).argmax(-1)
        return x, labels

    return sample


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_optimizer(name, params, lr):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return Shampoo(params, lr=lr, betas=(0.9, 0.999), epsilon=1e-12, grafting="adam",
                   precondition_frequency=10, start_preconditioning_step=10, root_method="eigh")


def run(name, lr, seed, steps, batch=128):
    sample = make_task(seed)
    data_gen = torch.Generator().manual_seed(seed + 1)
    x_test, y_test = sample(4096, torch.Generator().manual_seed(seed + 2))
    model = make_model(seed)
    opt = make_optimizer(name, model.parameters(), lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        x, y = sample(batch, data_gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return float("inf"), 0.0
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x_test)
        return loss_fn(logits, y_test).item(), (logits.argmax(-1) == y_test).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead

    results = {"steps": args.steps, "seeds": args.seeds, "sweep": {}, "best": {}}
    for name in ("adam", "shampoo"):
        results["sweep"][name] = {}
        for lr in args.lrs:
            start = time.perf_counter()
            runs = [run(name, lr, seed, args.steps) for seed in range(args.seeds)]
            losses = [loss for loss, _ in runs]
            results["sweep"][name][lr] = {"test_loss": losses, "test_accuracy": [acc for _, acc in runs],
                                          "mean_test_loss": statistics.mean(losses),
                                          "seconds": time.perf_counter() - start}
            print(f"{name:8s} lr {lr:.0e}: mean test loss {statistics.mean(losses):.4f} "
                  f"(seeds {', '.join(f'{v:.4f}' for v in losses)}), "
                  f"accuracy {statistics.mean(acc for _, acc in runs):.3f}, {time.perf_counter() - start:.1f}s", flush=True)
        best_lr = min(results["sweep"][name], key=lambda lr: results["sweep"][name][lr]["mean_test_loss"])
        results["best"][name] = {"lr": best_lr, **results["sweep"][name][best_lr]}
    adam, shampoo = results["best"]["adam"], results["best"]["shampoo"]
    wins = sum(s < a for s, a in zip(shampoo["test_loss"], adam["test_loss"]))
    print(f"best: Adam lr {adam['lr']:.0e} loss {adam['mean_test_loss']:.4f} acc {statistics.mean(adam['test_accuracy']):.3f}; "
          f"Shampoo lr {shampoo['lr']:.0e} loss {shampoo['mean_test_loss']:.4f} acc {statistics.mean(shampoo['test_accuracy']):.3f}; "
          f"Shampoo lower on {wins}/{args.seeds} seeds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
