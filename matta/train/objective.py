"""What one micro-batch optimises, as one module: a nested model, the MatTA loss, and the task.

`Objective(task, model, criterion)(x, y, teacher=None)` is `task.loss(model, criterion, x,
y, teacher)`: the streams the criterion reads (`MatTALoss.streams`: both, or one for a
Student-only or TA-only run) and the loss. Being one module, it is what
DistributedDataParallel and FSDP wrap, so the tied head is used inside the wrapped forward.
The model may be compiled (`model.compile()`); the loss runs eagerly.

`criterion_for(cfg, report)` is the MatTALoss of a run: `--mode` picks the weights
(`mode_weights`), and the ramp and temperature come from the config.
"""
from __future__ import annotations

from torch import nn

from ..losses import MatTALoss
from ..models import NestedLM
from ..ops import DeferredReport
from ..ops.matta_loss import needed_streams
from .tasks import Task


def mode_weights(mode: str, loss_weights) -> tuple:
    """The loss weights of a run in `mode`: "matta" keeps (w_S, w_TA, w_D); "student" and
    "ta" keep only their own label term, so only their stream is computed."""
    w_s, w_ta, w_d = loss_weights
    return {"matta": (w_s, w_ta, w_d), "student": (w_s, 0.0, 0.0), "ta": (0.0, w_ta, 0.0)}[mode]


def streams_of(mode: str, loss_weights) -> tuple:
    """The model streams a run in `mode` computes: ("student", "ta"), ("student",) or ("ta",)."""
    return needed_streams(mode_weights(mode, loss_weights))


def criterion_for(cfg, report: DeferredReport | None = None) -> MatTALoss:
    """The MatTALoss a TrainConfig asks for; its value checks go to `report`."""
    return MatTALoss(mode_weights(cfg.mode, cfg.loss_weights), rampup_steps=cfg.rampup_steps,
                     rampup_start=cfg.rampup_start, rampup=cfg.rampup, temperature=cfg.temperature, report=report)


class Objective(nn.Module):
    def __init__(self, task: Task, model: NestedLM, criterion: MatTALoss):
        super().__init__()
        self.task = task
        self.model = model
        self.criterion = criterion

    def forward(self, x, y, teacher: nn.Module | None = None):
        """The loss of one micro-batch; with a Teacher, its soft labels replace `y` (whose
        ignore_index entries still mask tokens)."""
        return self.task.loss(self.model, self.criterion, x, y, teacher)
