"""Learning-rate schedule: linear warmup, then cosine decay to a floor (nanoGPT's)."""
import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def distill_ramp(step: int | None, *, start: int, steps: int, shape: str = "linear") -> float:
    """Weight multiplier r in [0, 1] of the distillation term L_D at `step` (paper 3.1.1).

    0 before `start`, then rising to 1 over `steps` steps: linearly, or along the sigmoid-
    shaped exp(-5 (1 - t)^2) used in distillation. `step=None` means fully ramped.
    """
    if step is None:
        return 1.0
    if step < start:
        return 0.0
    if steps <= 0:
        return 1.0
    t = min(1.0, (step - start) / steps)
    if shape == "sigmoid":
        return 1.0 if t >= 1.0 else math.exp(-5.0 * (1.0 - t) ** 2)
    return t
