"""`MatTALoss`: the composite MatTA loss as a module, with the ramp-up of the distillation term.

Paper Section 3.1.1: both models are poor early in training, so L_D is held off at first
and then phased in. The ramp r multiplies w_D:
    step < rampup_start                    r = 0
    t = (step - rampup_start) / rampup_steps, clipped to [0, 1]
    "linear"                               r = t
    "sigmoid"                              r = exp(-5 (1 - t)^2)   (the sigmoid-shaped ramp of
                                           mean-teacher / temporal-ensembling distillation)
    rampup_steps = 0                       r = 1 from rampup_start on
    step = None                            r = 1 (fully ramped; e.g. evaluation)
"""
import math
from typing import Optional

from torch import Tensor, nn

from ..ops.fused_linear_matta_loss import fused_linear_matta_loss
from ..ops.matta_loss import MatTALossOutput, check_loss_config, matta_loss

RAMP_SCHEDULES = ("linear", "sigmoid")


def _check_ramp_config(rampup_steps, rampup_start, schedule):
    for name, value in (("rampup_steps", rampup_steps), ("rampup_start", rampup_start)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if schedule not in RAMP_SCHEDULES:
        raise ValueError(f"rampup must be one of {RAMP_SCHEDULES}, got {schedule!r}")


def ramp_value(step: Optional[int], *, rampup_steps: int = 0, rampup_start: int = 0, schedule: str = "linear") -> float:
    """Weight multiplier r in [0, 1] of the distillation loss at training step `step`."""
    _check_ramp_config(rampup_steps, rampup_start, schedule)
    if step is None:
        return 1.0
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"step must be an int or None, got {step!r}")
    if step < rampup_start:
        return 0.0
    if rampup_steps == 0:
        return 1.0
    t = min(1.0, (step - rampup_start) / rampup_steps)
    if schedule == "linear":
        return t
    return math.exp(-5.0 * (1.0 - t) ** 2)


class MatTALoss(nn.Module):
    """MatTA composite loss: w_S L_S + w_TA L_TA + r w_D L_D, averaged over the kept tokens.

    Args:
        weights: (w_S, w_TA, w_D).
        rampup_steps, rampup_start, rampup: the ramp of L_D (see `ramp_value`).
        temperature: tau of the distillation term (softened softmax, tau^2 factor).
        ignore_index: class id of tokens to leave out (hard targets only).

    `forward(logits_s, logits_ta, target, step=None)` takes logits (..., C) and class ids
    (...) or probabilities (..., C); `fused_linear(h_s, h_ta, weight, target, step=None, ...)`
    takes the final hidden states and the output embedding instead (see
    `matta.fused_linear_matta_loss`). Both return MatTALossOutput(loss, student, ta, distill,
    ramp); `last_ramp` holds the ramp value of the latest call, for logging.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0), rampup_steps: int = 0, rampup_start: int = 0,
                 rampup: str = "linear", temperature: float = 1.0, ignore_index: int = -100):
        super().__init__()
        _check_ramp_config(rampup_steps, rampup_start, rampup)
        self.weights, _, self.temperature = check_loss_config(weights, 1.0, temperature, ignore_index)
        self.rampup_steps = rampup_steps
        self.rampup_start = rampup_start
        self.rampup = rampup
        self.ignore_index = ignore_index
        self.last_ramp: Optional[float] = None

    def ramp_at(self, step: Optional[int]) -> float:
        """The ramp r at `step` under this loss's schedule (None: fully ramped)."""
        return ramp_value(step, rampup_steps=self.rampup_steps, rampup_start=self.rampup_start, schedule=self.rampup)

    def _options(self, step):
        self.last_ramp = self.ramp_at(step)
        return dict(weights=self.weights, ramp=self.last_ramp, temperature=self.temperature,
                    ignore_index=self.ignore_index)

    def forward(self, logits_s: Tensor, logits_ta: Tensor, target: Tensor, step: Optional[int] = None) -> MatTALossOutput:
        return matta_loss(logits_s, logits_ta, target, **self._options(step))

    def fused_linear(self, h_s: Tensor, h_ta: Tensor, weight: Tensor, target: Optional[Tensor] = None,
                     step: Optional[int] = None, *, bias: Optional[Tensor] = None, teacher=None,
                     chunk_size: Optional[int] = None) -> MatTALossOutput:
        """The same loss on the LM head `h @ weight.T + bias`, chunked (never full logits)."""
        return fused_linear_matta_loss(h_s, h_ta, weight, target, bias=bias, teacher=teacher, chunk_size=chunk_size,
                                       **self._options(step))

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, rampup={self.rampup!r}, rampup_steps={self.rampup_steps}, "
                f"rampup_start={self.rampup_start}, temperature={self.temperature}, ignore_index={self.ignore_index}")
