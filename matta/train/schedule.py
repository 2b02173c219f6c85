"""The per-step values of a run, in one place: the learning rate (linear warmup, then cosine
decay to a floor, nanoGPT's) and the ramp of the distillation term (whose shape the run's
`MatTALoss` defines: `ramp_at`). `Schedule.apply(step)` sets both before the step's first
forward, as the optimizer's `lr` and the criterion's `ramp`, so no step number travels
through the model's (or DistributedDataParallel's) forward.
"""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class Schedule:
    def __init__(self, cfg, max_steps: int, optimizer, criterion):
        self.lr = cfg.lr
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
        self.warmup_steps = cfg.warmup_steps
        self.max_steps = max_steps
        self.optimizer = optimizer
        self.criterion = criterion

    def apply(self, step: int) -> tuple[float, float]:
        """Sets the learning rate and the distillation ramp of optimizer step `step`
        (0-based); returns (lr, ramp)."""
        lr = learning_rate(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                           max_steps=self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.criterion.ramp = ramp = self.criterion.ramp_at(step)
        return lr, ramp
