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
from its flags (a Student-only run is weights (w_S, 0, 0)) and calls `fused_linear`, as a
user's own training loop would.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import MatTALossOutput, fused_linear_matta_loss, matta_loss
from ..ops.matta_loss import check_loss_config

RAMP_SCHEDULES = ("linear", "sigmoid")
BOTH_STREAMS = ("student", "ta")


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

    `streams` names the model streams the loss needs: with w_TA = w_D = 0 only the
    Student's ("student",), with w_S = w_D = 0 only the TA's; a run that trains one model
    then computes only that stream and passes None for the other to `fused_linear`.
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

    @property
    def streams(self) -> tuple:
        """The streams whose hidden states the loss reads: ("student", "ta"), or one of them
        when every term of the other weighs 0."""
        w_s, w_ta, w_d = self.weights
        needs_s, needs_ta = w_s > 0 or w_d > 0, w_ta > 0 or w_d > 0
        if needs_s != needs_ta:
            return ("student",) if needs_s else ("ta",)
        return BOTH_STREAMS

    def ramp_at(self, step: Optional[int]) -> float:
        """The ramp r at `step` under this loss's schedule (None: fully ramped)."""
        return ramp_value(step, rampup_steps=self.rampup_steps, rampup_start=self.rampup_start, schedule=self.rampup)

    def _options(self, step):
        self.last_ramp = self.ramp_at(step)
        return dict(weights=self.weights, ramp=self.last_ramp, temperature=self.temperature,
                    ignore_index=self.ignore_index)

    def forward(self, logits_s: Tensor, logits_ta: Tensor, target: Tensor, step: Optional[int] = None) -> MatTALossOutput:
        return matta_loss(logits_s, logits_ta, target, **self._options(step))

    def fused_linear(self, h_s: Optional[Tensor], h_ta: Optional[Tensor], weight: Tensor,
                     target: Optional[Tensor] = None, step: Optional[int] = None, *, bias: Optional[Tensor] = None,
                     teacher=None, chunk_size: Optional[int] = None) -> MatTALossOutput:
        """The same loss on the LM head `h @ weight.T + bias`, chunked (never full logits).

        A stream the loss does not need (see `streams`) may be None. The one remaining
        stream's cross-entropy then runs on its full logits (`chunk_size` is unused): the
        fused op serves the pair of heads. `teacher` is as in `fused_linear_matta_loss`.
        """
        options = self._options(step)
        if h_s is not None and h_ta is not None:
            return fused_linear_matta_loss(h_s, h_ta, weight, target, bias=bias, teacher=teacher,
                                           chunk_size=chunk_size, **options)
        return self._one_stream(h_s, h_ta, weight, target, bias, teacher, options["ramp"])

    def _one_stream(self, h_s, h_ta, weight, target, bias, teacher, ramp) -> MatTALossOutput:
        if h_s is None and h_ta is None:
            raise ValueError("fused_linear needs h_s, h_ta or both, got neither")
        stream = "student" if h_ta is None else "ta"
        if self.streams != (stream,):
            missing = "h_ta" if h_ta is None else "h_s"
            raise ValueError(f"{missing} is None, but weights {self.weights} need both streams; "
                             f"only weights (w_S, 0, 0) or (0, w_TA, 0) let one stream run alone")
        h = h_s if stream == "student" else h_ta
        if not isinstance(weight, Tensor) or weight.dim() != 2 or h.shape[-1] > weight.shape[1]:
            raise ValueError(f"weight must be (V, d) with d >= the hidden width {h.shape[-1]}, got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        logits = F.linear(h, weight[:, : h.shape[-1]], bias)
        math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # as the fused op's
        logits = logits.reshape(-1, logits.shape[-1]).to(math_dtype)
        if teacher is not None:
            labels, keep = _teacher_probabilities(teacher, logits.shape[0]).to(math_dtype), None
            if target is not None:
                keep = target.reshape(-1) != self.ignore_index
        elif target is None:
            raise ValueError("target is required unless a teacher supplies the soft labels")
        elif target.is_floating_point():
            labels, keep = target.reshape(-1, logits.shape[-1]).to(math_dtype), None
        else:
            labels, keep = target.reshape(-1), target.reshape(-1) != self.ignore_index
        if labels.dim() == 1:
            total = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        else:
            per_token = -(labels * torch.log_softmax(logits, -1)).sum(-1)
            total = (per_token if keep is None else per_token * keep).sum()
        part = total / (keep.sum().clamp(min=1) if keep is not None else logits.shape[0])
        zero = torch.zeros((), dtype=part.dtype, device=part.device)
        w_s, w_ta, _ = self.weights
        if stream == "student":
            return MatTALossOutput(w_s * part, part.detach(), zero, zero, ramp)
        return MatTALossOutput(w_ta * part, zero, part.detach(), zero, ramp)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, rampup={self.rampup!r}, rampup_steps={self.rampup_steps}, "
                f"rampup_start={self.rampup_start}, temperature={self.temperature}, ignore_index={self.ignore_index}")


def _teacher_probabilities(teacher, n_tokens: int) -> Tensor:
    """softmax of the teacher's logits for all `n_tokens` flattened tokens (fp32 at least), no gradient."""
    with torch.no_grad():
        if callable(teacher):
            logits = teacher(0, n_tokens)
        else:
            hidden, head, *bias = teacher
            logits = F.linear(hidden.reshape(n_tokens, -1), head, *bias)
        return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
