"""What one micro-batch optimises: a nested LM's streams and the MatTA loss, as one module.

`LMObjective(model, criterion)(x, y, step)` runs the streams the criterion needs
(`MatTALoss.streams`: both, or one for a Student-only or TA-only run) and the fused LM-head
loss, and returns the criterion's `MatTALossOutput`. Being one module, it is what
DistributedDataParallel and FSDP wrap: the tied head is used inside the wrapped forward.
The model may be compiled (`model.compile()`); the fused loss runs eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses import MatTALoss
from ..models import NestedLM


def criterion_for(mode: str, loss_weights, *, rampup_steps: int, rampup_start: int, rampup: str,
                  temperature: float) -> MatTALoss:
    """The MatTALoss of a run: `mode` "matta" keeps (w_S, w_TA, w_D); "student" and "ta"
    keep only their own label term, so only their stream is computed."""
    w_s, w_ta, w_d = loss_weights
    weights = {"matta": (w_s, w_ta, w_d), "student": (w_s, 0.0, 0.0), "ta": (0.0, w_ta, 0.0)}[mode]
    return MatTALoss(weights, rampup_steps=rampup_steps, rampup_start=rampup_start, rampup=rampup,
                     temperature=temperature)


def teacher_spec(teacher: nn.Module, x):
    """(hidden, head) of a Teacher for the fused loss: a nested model's TA stream, or a plain LM."""
    if isinstance(teacher, NestedLM):
        hidden = teacher(x, return_hidden=True, stream="ta")[1]
    else:
        hidden = teacher(x, return_hidden=True)
    return hidden, teacher.lm_head_weight


class LMObjective(nn.Module):
    def __init__(self, model: NestedLM, criterion: MatTALoss):
        super().__init__()
        self.model = model
        self.criterion = criterion
        streams = criterion.streams
        self.stream = streams[0] if len(streams) == 1 else None

    def forward(self, x, y, step: int, teacher: nn.Module | None = None):
        """The loss of one micro-batch at training step `step` (for the ramp); with a Teacher,
        its soft labels replace `y` (whose ignore_index entries still mask tokens)."""
        h_s, h_ta = self.model(x, return_hidden=True, stream=self.stream)
        spec = None
        if teacher is not None:
            with torch.no_grad():
                spec = teacher_spec(teacher, x)
        return self.criterion.fused_linear(h_s, h_ta, self.model.lm_head_weight, y, step, teacher=spec)


class ClassifierObjective(LMObjective):
    """The same for a nested two-class classifier (`matta train --task classify`): `y` holds
    the Teacher's soft labels (B, 2). Both streams go through the full-logits MatTA loss (the
    head is 2 wide: nothing to chunk); one stream alone through `fused_linear`'s one-stream
    path, which computes that stream's label term only."""

    def forward(self, x, y, step: int, teacher: nn.Module | None = None):
        if teacher is not None:
            raise ValueError("a classifier is trained on the task's own Teacher; pass teacher=None")
        if self.stream is None:
            logits_s, logits_ta = self.model(x)
            return self.criterion(logits_s, logits_ta, y, step)
        h_s, h_ta = self.model(x, return_hidden=True, stream=self.stream)
        head = self.model.head
        return self.criterion.fused_linear(h_s, h_ta, head.weight, y, step, bias=head.bias)
