"""The MatTA composite loss (paper Section 3.1, Algorithm 1) on logits, and what the fused op shares.

With p = softmax(z), q = softmax(z / tau), target y (one-hot ids or probabilities), weights
(w_S, w_TA, w_D) and ramp r in [0, 1], per kept token:

    L_S  = -sum y log p_S            L_TA = -sum y log p_TA
    L_D  = -tau^2 sum stopgrad(q_TA) log q_S
    L    = w_S L_S + w_TA L_TA + r w_D L_D
    dz_S  = w_S (sum(y) p_S - y) + r w_D tau (q_S - q_TA)        dz_TA = w_TA (sum(y) p_TA - y)

and every reported value is the mean over the kept tokens (tokens whose id is not
`ignore_index`; with soft targets every token is kept). The distillation term never sends
gradient into the TA, and the labels never get a gradient. If every token is ignored, the
loss and its three parts are 0 and all gradients are zero (an all-padding batch is a
no-op step rather than the NaN of `F.cross_entropy`).

One softmax/loss/gradient pass over a block of logit rows does all of it (`loss_rows_pass`):
the Triton kernel (kernels/matta_loss.py) on CUDA for fp32/bf16/fp16 logits, `_rows_torch`
here otherwise (CPU, fp64, MATTA_BACKEND=torch). It computes the gradients in the forward
and writes them over (a copy of) the logits, so the backward only rescales them by the
upstream gradient; there is no double backward. This module holds `matta_loss` (full
logits, what `matta.losses.MatTALoss` calls) and `matta_loss_reference` (the plain
log_softmax oracle); fused_linear_matta_loss.py, beside it, holds the chunked LM-head op.

No host sync: neither op reads a device value in its forward or backward, so a training
step never waits for the GPU. Shapes, dtypes, devices and configuration values are checked
at once; checks of values (class ids in range, soft targets that are distributions, NaN/inf
anywhere in the inputs) run on the device. A failed value check makes that call's loss,
its parts and its gradients NaN (never a plausible wrong number), and is filed in the
caller's `matta.ops.DeferredReport` (`report=`), whose `check()` reads every filed check in
one sync and raises a ValueError naming each problem; call it where the loss is read anyway
(a log step). `matta.losses.MatTALoss` owns such a report (`MatTALoss.check_inputs()`).

One stream: either logits (or hidden states, in the fused op) may be None when the weights
give that stream's terms nothing to do (w_TA = w_D = 0 without the TA, w_S = w_D = 0 without
the Student), as in a run that trains one model alone. The remaining stream's cross-entropy
is computed on its full logits by PyTorch's own ops (`one_stream_loss`), with the same
target checks and report as the pair.
"""
import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import kernel_knobs, triton_interpreting, use_triton
from .deferred import DeferredReport


class MatTALossOutput(NamedTuple):
    """Result of the MatTA loss. All tensors are 0-dim; only `loss` carries gradient.

    loss = weights[0] * student + weights[1] * ta + ramp * weights[2] * distill, where
    student, ta and distill are the token means of L_S, L_TA and L_D (L_D including the
    tau^2 factor). `ramp` is the ramp value that was used (a float, for logging).
    """

    loss: Tensor
    student: Tensor
    ta: Tensor
    distill: Tensor
    ramp: float


# ----------------------------------------------------------------------------------------
# Reference: what a user writes by hand.


def matta_loss_reference(logits_s, logits_ta, target, *, weights=(1.0, 1.0, 1.0), ramp=1.0, temperature=1.0,
                         ignore_index=-100):
    """Plain log_softmax version of `matta_loss` (same contract; autograd does the backward)."""
    w_s, w_ta, w_d = weights
    n_classes = logits_s.shape[-1]
    z_s = logits_s.reshape(-1, n_classes)
    z_ta = logits_ta.reshape(-1, n_classes)
    if target.is_floating_point():
        y = target.reshape(-1, n_classes).to(z_s.dtype)
        keep = torch.ones(z_s.shape[0], dtype=torch.bool, device=z_s.device)
    else:
        ids = target.reshape(-1)
        keep = ids != ignore_index
        y = F.one_hot(torch.where(keep, ids, 0), n_classes).to(z_s.dtype)
    log_p_s = torch.log_softmax(z_s, -1)
    log_p_ta = torch.log_softmax(z_ta, -1)
    q_ta = torch.softmax(z_ta.detach() / temperature, -1)
    l_s = -(y * log_p_s).sum(-1)
    l_ta = -(y * log_p_ta).sum(-1)
    l_d = -(temperature**2) * (q_ta * torch.log_softmax(z_s / temperature, -1)).sum(-1)
    n_kept = keep.sum().clamp(min=1)
    parts = [torch.where(keep, l, 0).sum() / n_kept for l in (l_s, l_ta, l_d)]
    loss = w_s * parts[0] + w_ta * parts[1] + ramp * w_d * parts[2]
    return MatTALossOutput(loss, *(p.detach() for p in parts), float(ramp))


# ----------------------------------------------------------------------------------------
# The row pass on the PyTorch path. Same contract as kernels.matta_loss.matta_loss_rows:
# gradients (times `scale`, a 1-element tensor) written over z_s / z_ta, per-row
# [L_S, L_TA, L_D, lse_S + lse_TA] into `out`; without write_grad, z_s / z_ta are scratch.
# Works block by block so its fp32 temporaries stay small.

_TORCH_BLOCK_ELEMENTS = 1 << 20  # 4 MiB fp32 temporaries per block


def _rowdot(a, b):
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _rows_torch_block(z_s_io, z_ta_io, y, out, scale, *, hard, ignore_index, w_s, w_ta, w_d, temperature,
                      write_grad):
    # Built from fused, vectorised ATen ops (log_softmax, exp into the buffer, addcmul):
    # on the CPU each pass over the block costs about as much as the next, so fewer is faster.
    math_dtype = torch.float64 if z_s_io.dtype == torch.float64 else torch.float32
    # Written below: the caller's buffer when it already has the math dtype, else a copy.
    z_s = z_s_io.to(math_dtype)
    z_ta = z_ta_io.to(math_dtype)
    n_cols = z_s.shape[1]
    tau = float(temperature)
    log_p_s = torch.log_softmax(z_s, 1)
    log_p_ta = torch.log_softmax(z_ta, 1)
    # Row log-normalisers, for the finiteness check (NaN anywhere in a row reaches them).
    lse_sum = (z_s[:, 0] - log_p_s[:, 0]) + (z_ta[:, 0] - log_p_ta[:, 0])
    scale = scale.to(math_dtype).reshape(())
    if hard:
        keep = y != ignore_index
        # An id outside [0, V) is never used as an index (the op reports it).
        idx = torch.where(keep & (y >= 0) & (y < n_cols), y, 0).unsqueeze(1)
        sum_y = keep.to(math_dtype)
        loss_s = -log_p_s.gather(1, idx).squeeze(1)
        loss_ta = -log_p_ta.gather(1, idx).squeeze(1)
        row_scale = sum_y * scale  # 0 on ignored rows: their gradients come out 0
    else:
        y = y.to(math_dtype)
        sum_y = y.sum(1)
        loss_s = -_rowdot(y, log_p_s)
        loss_ta = -_rowdot(y, log_p_ta)
        row_scale = scale.expand(sum_y.shape)
    c_s = (w_s * row_scale).unsqueeze(1)
    c_ta = (w_ta * row_scale).unsqueeze(1)
    c_d = (w_d * tau * row_scale).unsqueeze(1)

    if tau == 1.0:
        p_ta = log_p_ta.exp_()  # log p_TA is not needed any more
        loss_d = -_rowdot(p_ta, log_p_s)
        if write_grad:  # dz_S = (c_s sy + c_d) p_S - c_d p_TA - c_s y
            torch.exp(log_p_s, out=z_s).mul_(c_s * sum_y.unsqueeze(1) + c_d).addcmul_(p_ta, -c_d)
    else:
        log_q_s = torch.log_softmax(z_s / tau, 1)
        q_ta = torch.softmax(z_ta / tau, 1)
        loss_d = -tau * tau * _rowdot(q_ta, log_q_s)
        if write_grad:  # dz_S = c_s sy p_S + c_d (q_S - q_TA) - c_s y
            q_diff = log_q_s.exp_().sub_(q_ta).mul_(c_d)
            torch.exp(log_p_s, out=z_s).mul_(c_s * sum_y.unsqueeze(1)).add_(q_diff)
    if write_grad:  # dz_TA = c_ta sy p_TA - c_ta y
        if tau == 1.0:
            torch.mul(p_ta, c_ta * sum_y.unsqueeze(1), out=z_ta)
        else:
            torch.exp(log_p_ta, out=z_ta).mul_(c_ta * sum_y.unsqueeze(1))
        if hard:
            z_s.scatter_add_(1, idx, -c_s)
            z_ta.scatter_add_(1, idx, -c_ta)
        else:
            z_s.addcmul_(y, -c_s)
            z_ta.addcmul_(y, -c_ta)
        if z_s.data_ptr() != z_s_io.data_ptr():
            z_s_io.copy_(z_s)
            z_ta_io.copy_(z_ta)
    if hard:
        zero = torch.zeros((), dtype=math_dtype, device=keep.device)
        loss_s, loss_ta, loss_d = (torch.where(keep, l, zero) for l in (loss_s, loss_ta, loss_d))
    out.copy_(torch.stack([loss_s, loss_ta, loss_d, lse_sum], 1))


def _rows_torch(z_s, z_ta, y, out, scale, **kw):
    rows, n_cols = z_s.shape
    step = max(1, _TORCH_BLOCK_ELEMENTS // n_cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        _rows_torch_block(z_s[a:b], z_ta[a:b], y[a:b], out[a:b], scale, **kw)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_target(y):
    """The soft target as the kernel reads it: fp32, with one coalesced copy for a strided
    (say, transposed) layout, which the kernel would otherwise read twice with gaps; a
    broadcast dimension (stride 0) stays broadcast, so no R x V copy is ever made of it."""
    base = y[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in y.stride())]
    if base.shape[-1] > 1 and base.stride(-1) != 1:
        base = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return base.to(torch.float32).expand(y.shape)


def loss_rows_pass(z_s, z_ta, y, out, scale, **kw):
    """One softmax/loss/gradient pass over rows of logits (dispatches Triton vs PyTorch)."""
    if z_s.dtype in _TRITON_DTYPES and use_triton(z_s):
        from ..kernels import matta_loss as kernel

        interpreting = triton_interpreting()
        kernel.matta_loss_rows(z_s, z_ta, y if kw["hard"] else _kernel_target(y), out, scale,
                               interpreting=interpreting, block_v=kernel_knobs().loss_block_v if interpreting else None,
                               **kw)
    else:
        _rows_torch(z_s, z_ta, y, out, scale, **kw)


# ----------------------------------------------------------------------------------------
# Checks shared by both ops.


def check_loss_config(weights, ramp, temperature, ignore_index):
    """Validated ((w_S, w_TA, w_D), ramp, temperature); errors name the bad value."""
    try:
        w = tuple(float(v) for v in weights)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be three numbers (w_S, w_TA, w_D), got {weights!r}") from None
    if len(w) != 3 or not all(math.isfinite(v) and v >= 0 for v in w):
        raise ValueError(f"weights must be three finite numbers >= 0 (w_S, w_TA, w_D), got {weights!r}")
    if isinstance(ramp, Tensor) or not isinstance(ramp, (int, float)) or not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be a number in [0, 1], got {ramp!r}")
    if isinstance(temperature, Tensor) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -2**31 <= ignore_index < 2**31:
        raise TypeError(f"ignore_index must be an int (32-bit), got {ignore_index!r}")
    return w, float(ramp), float(temperature)


def _soft_tolerance(dtype):
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def check_target(target, lead_shape, n_classes, device, ignore_index, name_of_lead):
    """Classify the target; returns (hard, flat target, checks, kept) where `checks` are
    (0-dim bool device tensor, True when bad; message) for `ValueChecks`, and `kept` is
    the kept-token mask (hard) or None (soft: every token is kept)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class ids or probabilities, got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")
    lead_shape = tuple(lead_shape)
    if tuple(target.shape) == lead_shape + (n_classes,) and target.is_floating_point():
        y = target.reshape(-1, n_classes)
        tol = _soft_tolerance(y.dtype)
        sums = y.sum(1, dtype=torch.float32)
        checks = [
            (~torch.isfinite(sums).all(), "soft target contains NaN or inf"),
            ((y.amin() < -tol) if y.numel() else torch.zeros((), dtype=torch.bool, device=device),
             "soft target has negative probabilities"),
            (((sums - 1).abs() > tol).any(), f"soft target rows must sum to 1 (within {tol})"),
        ]
        return False, y, checks, None
    if tuple(target.shape) == lead_shape:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f"class-id target must be an integer tensor, got dtype {target.dtype} "
                f"(soft targets must have shape {lead_shape + (n_classes,)})"
            )
        ids = target.reshape(-1).to(torch.int64).contiguous()
        bad = ((ids < 0) & (ids != ignore_index)) | (ids >= n_classes)
        checks = [(bad.any(), f"class ids must be in [0, {n_classes}) or equal ignore_index={ignore_index}")]
        return True, ids, checks, ids != ignore_index
    raise ValueError(
        f"target must be class ids of shape {lead_shape} or probabilities of shape "
        f"{lead_shape + (n_classes,)} (matching {name_of_lead}), got shape {tuple(target.shape)} "
        f"and dtype {target.dtype}"
    )


NOT_FINITE = ("MatTA loss is not finite: the inputs (logits, hidden states, weight, bias, targets or teacher) "
              "contain NaN or inf")

class ValueChecks:
    """The value checks of one loss call, evaluated on the device (no host sync).

    `add` collects (flag, message) pairs; `flag()` is the 0-dim device bool "some check
    failed", which the op turns into NaN outputs; `file(report)` hands the flags to the
    caller's DeferredReport (none: the NaN outputs are the only sign).
    """

    def __init__(self, device):
        self.device = device
        self.flags, self.messages = [], []

    def add(self, checks):
        for flag, message in checks:
            self.flags.append(flag.reshape(()).to(device=self.device, dtype=torch.bool))
            self.messages.append(message)

    def flag(self) -> Tensor:
        if not self.flags:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return torch.stack(self.flags).any()

    def file(self, report: Optional[DeferredReport]):
        if report is not None and self.flags:
            report.add(torch.stack(self.flags), self.messages)


def loss_scale(n_kept, checks: ValueChecks, dtype):
    """1 / max(kept tokens, 1) as a 1-element device tensor, NaN when a value check failed:
    the factor the row pass folds into every gradient."""
    poison = torch.where(checks.flag(), math.nan, 1.0).to(dtype)
    if isinstance(n_kept, Tensor):
        return (poison / n_kept.clamp(min=1).to(dtype)).reshape(1)
    return (poison / max(n_kept, 1)).reshape(1)


def loss_and_parts(ctx, totals, scale, checks: ValueChecks, report, config):
    """Forward result of both Functions: the weighted loss and its three parts (0-dim,
    logged, non-differentiable). Non-finite sums (NaN/inf in any row, ignored or not) are
    one more value check; its failure is kept for the backward, which returns NaN."""
    checks.add([(~torch.isfinite(totals).all(), NOT_FINITE)])
    checks.file(report)
    ctx.grad_factor = torch.where(checks.flag(), math.nan, 1.0).to(totals.dtype)
    parts = totals[:3] * scale.to(totals.dtype) * ctx.grad_factor
    loss = config["w_s"] * parts[0] + config["w_ta"] * parts[1] + config["w_d"] * parts[2]
    student, ta, distill = parts.unbind()
    ctx.mark_non_differentiable(student, ta, distill)
    ctx.backward_done = False
    return loss, student, ta, distill


def scaled_gradient(ctx, grad, grad_loss, dtype):
    """A saved gradient times the upstream gradient (and NaN after a failed check), in
    `dtype`. In place, so the backward allocates nothing; hence one backward per forward."""
    return grad.mul_((grad_loss * ctx.grad_factor).to(grad.dtype)).to(dtype)


def begin_backward(ctx):
    if ctx.backward_done:
        raise RuntimeError("the MatTA loss's backward ran twice on one forward (retain_graph=True): its saved "
                           "gradients are rescaled in place; run the loss again instead")
    ctx.backward_done = True


# Both Functions take the caller's grad mode (`torch.is_grad_enabled()`, read before apply):
# under torch.no_grad() their inputs may still require grad (parameters), but no gradient
# is wanted, so the row kernel takes its one-pass variant and the fused op skips dW and dh.


def no_autocast(device):
    """The loss math picks its dtypes itself (fp32/fp64 sums, GEMMs into out= buffers);
    autocast must not recast its matmuls."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Loss on full logits.


class _MatTALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_ta, y, hard, n_kept, checks, report, grad_enabled, config):
        write_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        work = torch.promote_types(logits_s.dtype, logits_ta.dtype)
        z_s = logits_s.to(work, copy=True, memory_format=torch.contiguous_format)
        z_ta = logits_ta.to(work, copy=True, memory_format=torch.contiguous_format)
        out_dtype = torch.float64 if work == torch.float64 else torch.float32
        rows = torch.full((z_s.shape[0], 4), float("nan"), dtype=out_dtype, device=z_s.device)
        scale = loss_scale(n_kept, checks, out_dtype)
        loss_rows_pass(z_s, z_ta, y, rows, scale, hard=hard, write_grad=write_grad, **config)
        ctx.dtypes = (logits_s.dtype, logits_ta.dtype)
        if write_grad:
            ctx.save_for_backward(z_s, z_ta)
        return loss_and_parts(ctx, rows.sum(0), scale, checks, report, config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        begin_backward(ctx)
        z_s, z_ta = ctx.saved_tensors
        dtype_s, dtype_ta = ctx.dtypes
        return (scaled_gradient(ctx, z_s, grad_loss, dtype_s), scaled_gradient(ctx, z_ta, grad_loss, dtype_ta),
                None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------
# One stream alone.


STREAMS = ("student", "ta")


def needed_streams(weights) -> tuple:
    """The streams a loss with these weights reads: ("student", "ta"), or one of them when
    every term of the other weighs 0 (the distillation term needs both)."""
    w_s, w_ta, w_d = weights
    needs_s, needs_ta = w_s > 0 or w_d > 0, w_ta > 0 or w_d > 0
    if needs_s != needs_ta:
        return ("student",) if needs_s else ("ta",)
    return STREAMS


def present_stream(weights, first, second, names) -> Optional[str]:
    """None when both inputs are given, else the stream of the one that is; raises when
    neither is, or when the weights need the missing one. `names` name the two inputs."""
    if first is None and second is None:
        raise ValueError(f"the MatTA loss needs {names[0]}, {names[1]} or both, got neither")
    if first is not None and second is not None:
        return None
    stream = "student" if second is None else "ta"
    if needed_streams(weights) != (stream,):
        raise ValueError(f"{names[1] if second is None else names[0]} is None, but weights {tuple(weights)} need "
                         "both streams; only weights (w_S, 0, 0) or (0, w_TA, 0) let one stream run alone")
    return stream


def one_stream_loss(logits, stream, labels, keep, checks: ValueChecks, report, weights, ramp, ignore_index):
    """The loss of one stream alone (see the module docstring): its label term, on full
    logits (N, V), with PyTorch's cross-entropy for class ids and -sum y log p for
    probabilities; autograd does the backward. `labels` and `keep` are what `check_target`
    gave (keep None: every token counts); failed checks make the loss NaN."""
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(math_dtype)
    if labels.dim() == 1:
        # An id out of range (reported through `checks`) must not reach cross_entropy, which
        # raises: it counts as class 0, so its row, like the others, gets the NaN gradient.
        valid = ((labels >= 0) & (labels < logits.shape[-1])) | (labels == ignore_index)
        total = F.cross_entropy(logits, torch.where(valid, labels, 0), ignore_index=ignore_index, reduction="sum")
    else:
        per_token = -(labels.to(math_dtype) * torch.log_softmax(logits, -1)).sum(-1)
        total = (per_token if keep is None else per_token * keep).sum()
    checks.add([(~torch.isfinite(total), NOT_FINITE)])
    checks.file(report)
    total = total * torch.where(checks.flag(), math.nan, 1.0).to(total.dtype)
    part = total / (keep.sum().clamp(min=1) if keep is not None else logits.shape[0])
    zero = torch.zeros((), dtype=part.dtype, device=part.device)
    w_s, w_ta, _ = weights
    if stream == "student":
        return MatTALossOutput(w_s * part, part.detach(), zero, zero, ramp)
    return MatTALossOutput(w_ta * part, zero, part.detach(), zero, ramp)


def _check_logits(name, t):
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() == 0:
        raise ValueError(f"{name} must be a floating-point tensor (..., C), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def matta_loss(logits_s, logits_ta, target, *, weights=(1.0, 1.0, 1.0), ramp=1.0, temperature=1.0,
               ignore_index=-100, report: Optional[DeferredReport] = None) -> MatTALossOutput:
    """MatTA composite loss on Student and TA logits of shape (..., C).

    Args:
        logits_s, logits_ta: Student and TA logits, same shape (..., C), floating point; one
            may be None when the weights need only the other stream (see `needed_streams`).
        target: class ids of shape (...) (an integer tensor; `ignore_index` tokens are left
            out of every part and of the mean) or probabilities of shape (..., C) (soft
            labels, e.g. from a Teacher; each row must sum to 1; they get no gradient; any
            strides, a broadcast row included).
        weights: (w_S, w_TA, w_D), finite and >= 0.
        ramp: the ramp-up factor r in [0, 1] multiplying w_D (see matta.losses.ramp_value).
        temperature: tau > 0 of the distillation term (softened softmax of both, times
            tau^2); the label terms never use it.
        ignore_index: class id that marks tokens to ignore.
        report: a DeferredReport that receives the value checks (see the module docstring).
    Returns:
        MatTALossOutput(loss, student, ta, distill, ramp).
    Raises:
        ValueError on mismatched shapes, a wrong target dtype or bad configuration values.
        Values are checked on the device without a sync: ids out of range, a soft target
        that is not a distribution, or NaN/inf anywhere in the logits make the loss and
        gradients NaN, and `report.check()` raises ValueError naming the problem.
    """
    weights, ramp, temperature = check_loss_config(weights, ramp, temperature, ignore_index)
    stream = present_stream(weights, logits_s, logits_ta, ("logits_s", "logits_ta"))
    for name, t in (("logits_s", logits_s), ("logits_ta", logits_ta)):
        if t is not None:
            _check_logits(name, t)
    if stream is None:
        if logits_s.shape != logits_ta.shape:
            raise ValueError(f"logits_s and logits_ta must have the same shape, got {tuple(logits_s.shape)} "
                             f"and {tuple(logits_ta.shape)}")
        if logits_s.device != logits_ta.device:
            raise ValueError(f"logits_s is on {logits_s.device} but logits_ta is on {logits_ta.device}")
    logits = logits_ta if logits_s is None else logits_s
    n_classes = logits.shape[-1]
    hard, y, target_checks, kept = check_target(target, logits.shape[:-1], n_classes, logits.device,
                                                ignore_index, "the logits' leading dims")
    checks = ValueChecks(logits.device)
    checks.add(target_checks)
    if stream is not None:
        return one_stream_loss(logits.reshape(-1, n_classes), stream, y, kept, checks, report, weights, ramp,
                               ignore_index)
    w_s, w_ta, w_d = weights
    n_kept = kept.sum() if hard else y.shape[0]
    config = dict(ignore_index=ignore_index, w_s=w_s, w_ta=w_ta, w_d=ramp * w_d, temperature=temperature)
    with no_autocast(logits_s.device):
        loss, student, ta, distill = _MatTALossFunction.apply(
            logits_s.reshape(-1, n_classes), logits_ta.reshape(-1, n_classes), y, hard, n_kept, checks, report,
            torch.is_grad_enabled(), config,
        )
    return MatTALossOutput(loss, student, ta, distill, ramp)
