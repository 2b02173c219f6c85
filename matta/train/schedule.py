"""Learning-rate schedule: linear warmup, then cosine decay to a floor (nanoGPT's).

(The ramp of the distillation term belongs to the objective: `matta.losses.MatTALoss`.)
"""
import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
