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

`MatTALoss` is the one place where the objective is configured: the trainer builds one
from its flags (a Student-only run is weights (w_S, 0, 0)), sets its `ramp` each step from
the run's schedule, and calls it as a user's own training loop would.
"""
import math
from typing import Optional

from torch import Tensor, nn

from ..ops import DeferredReport, MatTALossOutput, fused_linear_matta_loss, matta_loss
from ..ops.matta_loss import check_loss_config, needed_streams

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
        report: the DeferredReport that the value checks of every call go to (default: one
            of its own); `check_inputs()` reads it.

    `forward(logits_s, logits_ta, target, step=None)` takes logits (..., C) and class ids
    (...) or probabilities (..., C); `fused_linear(h_s, h_ta, weight, target, step=None, ...)`
    takes the final hidden states and the output embedding instead (see
    `matta.fused_linear_matta_loss`). Both return MatTALossOutput(loss, student, ta, distill,
    ramp). The ramp is `ramp_at(step)` when a call gives `step` (a user's own loop), else
    the attribute `ramp` (1.0, fully ramped, until a training loop's schedule sets it).

    `streams` names the model streams the loss needs: with w_TA = w_D = 0 only the
    Student's ("student",), with w_S = w_D = 0 only the TA's; a run that trains one model
    then computes only that stream (`stream` is the one to ask the model for, None for
    both) and passes None for the other.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0), rampup_steps: int = 0, rampup_start: int = 0,
                 rampup: str = "linear", temperature: float = 1.0, ignore_index: int = -100,
                 report: Optional[DeferredReport] = None):
        super().__init__()
        _check_ramp_config(rampup_steps, rampup_start, rampup)
        self.weights, _, self.temperature = check_loss_config(weights, 1.0, temperature, ignore_index)
        self.rampup_steps = rampup_steps
        self.rampup_start = rampup_start
        self.rampup = rampup
        self.ignore_index = ignore_index
        self.ramp = 1.0
        self.report = report if report is not None else DeferredReport()

    @property
    def streams(self) -> tuple:
        """The streams whose outputs the loss reads: ("student", "ta"), or one of them when
        every term of the other weighs 0."""
        return needed_streams(self.weights)

    @property
    def stream(self) -> Optional[str]:
        """What to ask a nested model for (`model(..., stream=...)`): None for both streams,
        else the one the loss reads."""
        streams = self.streams
        return streams[0] if len(streams) == 1 else None

    def ramp_at(self, step: Optional[int]) -> float:
        """The ramp r at `step` under this loss's schedule (None: fully ramped)."""
        return ramp_value(step, rampup_steps=self.rampup_steps, rampup_start=self.rampup_start, schedule=self.rampup)

    def _options(self, step):
        return dict(weights=self.weights, ramp=self.ramp if step is None else self.ramp_at(step),
                    temperature=self.temperature, ignore_index=self.ignore_index, report=self.report)

    def forward(self, logits_s: Optional[Tensor], logits_ta: Optional[Tensor], target: Tensor,
                step: Optional[int] = None) -> MatTALossOutput:
        return matta_loss(logits_s, logits_ta, target, **self._options(step))

    def fused_linear(self, h_s: Optional[Tensor], h_ta: Optional[Tensor], weight: Tensor,
                     target: Optional[Tensor] = None, step: Optional[int] = None, *, bias: Optional[Tensor] = None,
                     teacher=None, chunk_size: Optional[int] = None) -> MatTALossOutput:
        """The same loss on the LM head `h @ weight.T + bias`, chunked (never full logits).

        A stream the loss does not need (see `streams`) may be None; the one remaining
        stream's cross-entropy then runs on its full logits. `teacher` is as in
        `fused_linear_matta_loss`.
        """
        return fused_linear_matta_loss(h_s, h_ta, weight, target, bias=bias, teacher=teacher, chunk_size=chunk_size,
                                       **self._options(step))

    def check_inputs(self) -> None:
        """Raises ValueError naming every failed value check of the calls since the last
        read (class ids out of range, soft targets that are not distributions, NaN or inf in
        any input; those calls returned NaN losses and gradients). One host read: call it
        where the loss is read anyway, e.g. at a log step."""
        self.report.check(ValueError, "invalid input to the MatTA loss (the loss and gradients of those calls are "
                                      "NaN): ")

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, rampup={self.rampup!r}, rampup_steps={self.rampup_steps}, "
                f"rampup_start={self.rampup_start}, temperature={self.temperature}, ignore_index={self.ignore_index}")
