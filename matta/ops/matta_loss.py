"""The MatTA composite loss (paper Section 3.1, Algorithm 1) on logits, and fused with the LM head.

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

One softmax/loss/gradient pass over a block of logit rows does all of it: the Triton kernel
(kernels/matta_loss.py) on CUDA for fp32/bf16/fp16 logits, `_rows_torch` here otherwise
(CPU, fp64, MATTA_BACKEND=torch). It computes the gradients in the forward and writes them
over (a copy of) the logits, so the backward only rescales; there is no double backward.
Both ops are autograd Functions (a teacher callable cannot pass through a custom op), so
torch.compile runs them eagerly.

- `matta_loss`: the loss on full logits (what `matta.losses.MatTALoss` calls).
- `fused_linear_matta_loss`: takes the final hidden states and the output embedding, walks
  the tokens in chunks and never holds more than one chunk of logits (two heads x chunk x V).
- `matta_loss_reference`: the plain log_softmax oracle.

Non-finite inputs raise ValueError before any gradient exists: the check reads the summed
per-row log-normalisers (one sync at the end of the forward) and, in the fused op, the
hidden states (which are small next to the logits).
"""
import contextlib
import math
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import triton_interpreting, use_triton

TeacherSpec = Union[Callable[[int, int], Tensor], tuple]


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
# gradients (times `scale`) written over z_s / z_ta, per-row [L_S, L_TA, L_D, lse_S + lse_TA]
# into `out`; without write_grad, z_s / z_ta are scratch. Works block by block so its fp32
# temporaries stay small.

_TORCH_BLOCK_ELEMENTS = 1 << 20  # 4 MiB fp32 temporaries per block


def _rowdot(a, b):
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _rows_torch_block(z_s_io, z_ta_io, y, out, *, hard, ignore_index, w_s, w_ta, w_d, temperature, scale,
                      write_grad):
    # Built from fused, vectorised ATen ops (log_softmax, exp into the buffer, addcmul):
    # on the CPU each pass over the block costs about as much as the next, so fewer is faster.
    math_dtype = torch.float64 if z_s_io.dtype == torch.float64 else torch.float32
    # Written below: the caller's buffer when it already has the math dtype, else a copy.
    z_s = z_s_io.to(math_dtype)
    z_ta = z_ta_io.to(math_dtype)
    tau = float(temperature)
    log_p_s = torch.log_softmax(z_s, 1)
    log_p_ta = torch.log_softmax(z_ta, 1)
    # Row log-normalisers, for the finiteness check (NaN anywhere in a row reaches them).
    lse_sum = (z_s[:, 0] - log_p_s[:, 0]) + (z_ta[:, 0] - log_p_ta[:, 0])
    if hard:
        keep = y != ignore_index
        idx = torch.where(keep, y, 0).unsqueeze(1)
        sum_y = keep.to(math_dtype)
        loss_s = -log_p_s.gather(1, idx).squeeze(1)
        loss_ta = -log_p_ta.gather(1, idx).squeeze(1)
        row_scale = sum_y * scale
    else:
        y = y.to(math_dtype)
        sum_y = y.sum(1)
        loss_s = -_rowdot(y, log_p_s)
        loss_ta = -_rowdot(y, log_p_ta)
        row_scale = torch.full_like(sum_y, scale)
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
            ignored = (~keep).nonzero().view(-1)  # zero even if their logits were garbage
            if ignored.numel():
                z_s.index_fill_(0, ignored, 0.0)
                z_ta.index_fill_(0, ignored, 0.0)
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


def _rows_torch(z_s, z_ta, y, out, **kw):
    rows, n_cols = z_s.shape
    step = max(1, _TORCH_BLOCK_ELEMENTS // n_cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        _rows_torch_block(z_s[a:b], z_ta[a:b], y[a:b], out[a:b], **kw)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows_pass(z_s, z_ta, y, out, **kw):
    """One softmax/loss/gradient pass over rows of logits (dispatches Triton vs PyTorch)."""
    if z_s.dtype in _TRITON_DTYPES and use_triton(z_s):
        from ..kernels import matta_loss as kernel

        if not kw["hard"]:
            y = y.float()
        kernel.matta_loss_rows(z_s, z_ta, y, out, interpreting=triton_interpreting(), **kw)
    else:
        _rows_torch(z_s, z_ta, y, out, **kw)


# ----------------------------------------------------------------------------------------
# Argument checks shared by both public functions.


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


def _loss_and_parts(ctx, totals, scale, config):
    """Forward result of both Functions: the weighted loss and its three parts (0-dim,
    logged, non-differentiable), after one host check that nothing became NaN or inf."""
    (check,) = _read_checks([], [totals.sum()])
    _raise_if_not_finite(check)
    parts = totals[:3] * scale
    loss = config["w_s"] * parts[0] + config["w_ta"] * parts[1] + config["w_d"] * parts[2]
    student, ta, distill = parts.unbind()
    ctx.mark_non_differentiable(student, ta, distill)
    return loss, student, ta, distill


def _soft_tolerance(dtype):
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _check_target(target, lead_shape, n_classes, device, ignore_index, name_of_lead):
    """Classify the target; returns (hard, flat target, checks) where `checks` are 0-dim
    bool tensors, True when bad, to be read in one sync with their messages."""
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
        return False, y, checks, sums
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


def _read_checks(checks, extra=()):
    """One host sync for all pending checks (0-dim bool tensors, True when bad, with their
    messages); `extra` are 0-dim tensors (on the same device) whose values are returned."""
    tensors = [c for c, _ in checks] + list(extra)
    if not tensors:
        return []
    values = torch.stack([t.to(torch.float64) for t in tensors]).tolist()
    for (_, message), bad in zip(checks, values):
        if bad:
            raise ValueError(message)
    return values[len(checks):]


def _raise_if_not_finite(total):
    if not math.isfinite(total):
        raise ValueError(
            "MatTA loss is not finite: the inputs (logits, hidden states, weight, bias or "
            "teacher) contain NaN or inf; no gradient was produced"
        )


def _no_autocast(device):
    """The loss math picks its dtypes itself (fp32/fp64 sums, GEMMs into out= buffers);
    autocast must not recast its matmuls."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Loss on full logits.


class _MatTALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_ta, y, hard, scale, config):
        write_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        work = torch.promote_types(logits_s.dtype, logits_ta.dtype)
        z_s = logits_s.to(work, copy=True, memory_format=torch.contiguous_format)
        z_ta = logits_ta.to(work, copy=True, memory_format=torch.contiguous_format)
        out_dtype = torch.float64 if work == torch.float64 else torch.float32
        rows = torch.full((z_s.shape[0], 4), float("nan"), dtype=out_dtype, device=z_s.device)
        _rows_pass(z_s, z_ta, y, rows, hard=hard, scale=scale, write_grad=write_grad, **config)
        totals = rows.sum(0)
        ctx.dtypes = (logits_s.dtype, logits_ta.dtype)
        if write_grad:
            ctx.save_for_backward(z_s, z_ta)
        return _loss_and_parts(ctx, totals, scale, config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        z_s, z_ta = ctx.saved_tensors
        dtype_s, dtype_ta = ctx.dtypes
        return _scaled(z_s, grad_loss, dtype_s), _scaled(z_ta, grad_loss, dtype_ta), None, None, None, None


def _scaled(grad, grad_loss, dtype):
    """grad * grad_loss in `dtype`; skips the multiply for the usual grad_loss == 1."""
    if grad_loss.item() == 1.0:
        return grad.to(dtype)
    return (grad * grad_loss.to(grad.dtype)).to(dtype)


def matta_loss(logits_s, logits_ta, target, *, weights=(1.0, 1.0, 1.0), ramp=1.0, temperature=1.0,
               ignore_index=-100) -> MatTALossOutput:
    """MatTA composite loss on Student and TA logits of shape (..., C).

    Args:
        logits_s, logits_ta: Student and TA logits, same shape (..., C), floating point.
        target: class ids of shape (...) (an integer tensor; `ignore_index` tokens are left
            out of every part and of the mean) or probabilities of shape (..., C) (soft
            labels, e.g. from a Teacher; each row must sum to 1; they get no gradient).
        weights: (w_S, w_TA, w_D), finite and >= 0.
        ramp: the ramp-up factor r in [0, 1] multiplying w_D (see matta.losses.ramp_value).
        temperature: tau > 0 of the distillation term (softened softmax of both, times
            tau^2); the label terms never use it.
        ignore_index: class id that marks tokens to ignore.
    Returns:
        MatTALossOutput(loss, student, ta, distill, ramp).
    Raises:
        ValueError on mismatched shapes, a wrong target dtype, ids out of range, a soft
        target that is not a distribution, or NaN/inf anywhere in the kept logits.
    """
    (w_s, w_ta, w_d), ramp, temperature = check_loss_config(weights, ramp, temperature, ignore_index)
    for name, t in (("logits_s", logits_s), ("logits_ta", logits_ta)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() == 0:
            raise ValueError(f"{name} must be a floating-point tensor (..., C), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if logits_s.shape != logits_ta.shape:
        raise ValueError(f"logits_s and logits_ta must have the same shape, got {tuple(logits_s.shape)} "
                         f"and {tuple(logits_ta.shape)}")
    if logits_s.device != logits_ta.device:
        raise ValueError(f"logits_s is on {logits_s.device} but logits_ta is on {logits_ta.device}")
    n_classes = logits_s.shape[-1]
    hard, y, checks, kept = _check_target(target, logits_s.shape[:-1], n_classes, logits_s.device,
                                          ignore_index, "the logits' leading dims")
    if hard:
        (n_kept,) = _read_checks(checks, [kept.sum()])
    else:
        _read_checks(checks)
        n_kept = float(kept.numel())
    config = dict(ignore_index=ignore_index, w_s=w_s, w_ta=w_ta, w_d=ramp * w_d, temperature=temperature)
    with _no_autocast(logits_s.device):
        loss, student, ta, distill = _MatTALossFunction.apply(
            logits_s.reshape(-1, n_classes), logits_ta.reshape(-1, n_classes), y, hard, 1.0 / max(n_kept, 1.0),
            config,
        )
    return MatTALossOutput(loss, student, ta, distill, ramp)


# ----------------------------------------------------------------------------------------
# Fused LM head + loss.


def default_chunk_size(n_tokens, n_classes, width, dtype, device) -> int:
    """Tokens per chunk when `chunk_size=None`.

    GPU: the chunk's logits (2 heads x chunk x V) are kept near the size of the hidden
    states (chunk ~ T * d / V, Liger-Kernel's rule of thumb), at least 64 tokens so the
    GEMMs stay efficient, and within a quarter of the free GPU memory.
    CPU: 192 tokens, within a 128 MiB logits budget (at T=4096, d=1024, V=50257 on 2 cores,
    chunk 128 left the GEMMs ~10% slower than naive's; 192-256 are faster than naive, and
    192 keeps the peak extra memory under 1/10 of naive's).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        chunk = -(-n_tokens // max(1, -(-n_classes // width)))
        chunk = max(64, -(-chunk // 64) * 64)
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        chunk, budget = 192, 128 << 20
    fit = max(1, budget // (2 * n_classes * itemsize))
    return int(max(1, min(chunk, fit, n_tokens)))


def _teacher_probs(teacher, start, end, n_classes, dtype):
    """Soft labels for tokens [start, end) from a teacher (see fused_linear_matta_loss)."""
    if callable(teacher):
        logits = teacher(start, end)
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (end - start, n_classes):
            raise ValueError(f"teacher({start}, {end}) must return logits of shape ({end - start}, {n_classes}), "
                             f"got {tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    else:
        hidden, weight, bias = teacher
        logits = F.linear(hidden[start:end], weight, bias)
    return torch.softmax(logits.to(dtype), -1)


class _FusedLinearMatTALoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_ta, weight, bias, y, hard, row_mask, teacher, scale, compute_dtype, chunk, config):
        n_tokens, d_s = h_s.shape
        n_classes, d_ta = weight.shape
        need_hs, need_hta, need_w, need_b = ctx.needs_input_grad[:4]
        write_grad = need_hs or need_hta or need_w or need_b
        math_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        hs, hta, w = h_s.to(compute_dtype), h_ta.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        w_s = w[:, :d_s]
        nested = d_s != d_ta

        def acc_dtype(t):  # gradients summed over chunks are kept in at least fp32
            return math_dtype if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

        # NaN-filled: every row must be written by its chunk (tests would see a gap)
        dh_s = torch.full_like(hs, math.nan) if need_hs else None
        dh_ta = torch.full_like(hta, math.nan) if need_hta else None
        new_dw = torch.empty if n_tokens else torch.zeros  # chunk 0 overwrites it (when there is one)
        dw = new_dw(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc_dtype(bias), device=bias.device) if need_b else None
        add_dw_in_place = need_w and dw.dtype == compute_dtype
        z = torch.empty(2 * min(chunk, n_tokens), n_classes, dtype=compute_dtype, device=h_s.device)
        rows = torch.full((min(chunk, n_tokens), 4), math.nan, dtype=math_dtype, device=h_s.device)
        totals = torch.zeros(4, dtype=math_dtype, device=h_s.device)

        for start in range(0, n_tokens, chunk):
            end = min(n_tokens, start + chunk)
            c = end - start
            zc, rc = z[: 2 * c], rows[:c]
            z_s, z_ta = zc[:c], zc[c:]
            hs_c, hta_c = hs[start:end], hta[start:end]
            # Both token sets stacked: one GEMM for the logits when the heads coincide, and
            # one GEMM (K = 2c) for the shared block of dW below.
            h_both = torch.cat([hs_c, hta_c[:, :d_s]]) if need_w or not nested else None
            if nested:
                _linear_into(z_s, hs_c, w_s, b)
                _linear_into(z_ta, hta_c, w, b)
            else:
                _linear_into(zc, h_both, w, b)
            if teacher is None:
                y_c = y[start:end]
            else:
                y_c = _teacher_probs(teacher, start, end, n_classes, math_dtype)
            _rows_pass(z_s, z_ta, y_c, rc, hard=hard, scale=scale, write_grad=write_grad, **config)
            if row_mask is not None:
                dropped = ~row_mask[start:end].unsqueeze(1)
                rc[:, :3].masked_fill_(dropped, 0.0)
                z_s.masked_fill_(dropped, 0.0)
                z_ta.masked_fill_(dropped, 0.0)
            totals += rc.sum(0)
            if not write_grad:
                continue
            if not nested and need_hs and need_hta:  # one GEMM for both heads
                dh_both = zc @ w
                dh_s[start:end], dh_ta[start:end] = dh_both[:c], dh_both[c:]
            else:
                if need_hs:
                    torch.mm(z_s, w_s, out=dh_s[start:end])
                if need_hta:
                    torch.mm(z_ta, w, out=dh_ta[start:end])
            if need_w:  # the first chunk overwrites dw, so it needs no zero fill
                first = start == 0
                shared = dw[:, :d_s] if nested else dw
                _add_mm(shared, zc.t(), h_both, add_dw_in_place, first)
                if nested:
                    _add_mm(dw[:, d_s:], z_ta.t(), hta_c[:, d_s:], add_dw_in_place, first)
            if need_b:
                db += zc.sum(0, dtype=db.dtype)

        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh_s, dh_ta, dw, db)))
        ctx.dtypes = (h_s.dtype, h_ta.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _loss_and_parts(ctx, totals, scale, config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        grads = []
        for g, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:4]):
            grads.append(_scaled(g, grad_loss, dtype) if need else None)
        return (*grads,) + (None,) * 8


def _linear_into(out, x, w, b):
    """out = x @ w.T + b into a row-major buffer."""
    if out.device.type == "cpu":
        # MKL/oneDNN runs w @ x.T about 1.5x faster than x @ w.T for these shapes (measured:
        # 36 vs 23 GFLOPS at (256 x 1024) @ (1024 x 50257)); writing it through out.T keeps
        # the buffer row-major.
        if b is None:
            torch.mm(w, x.t(), out=out.t())
        else:
            torch.addmm(b.unsqueeze(1), w, x.t(), out=out.t())
    elif b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _add_mm(acc, a, b, in_place, overwrite):
    """acc += a @ b, or acc = a @ b when `overwrite` (acc may hold garbage then)."""
    if in_place:
        acc.addmm_(a, b, beta=0.0 if overwrite else 1.0)
    elif overwrite:
        acc.copy_(a @ b)
    else:  # low-precision GEMM, summed into the fp32 accumulator
        acc += a @ b


def _compute_dtype(device, *tensors):
    if device.type != "meta" and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_hidden(name, t, width, lead_shape, device):
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < 2 or t.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}) with at least 2 dims, got {tuple(t.shape)}")
    if lead_shape is not None and tuple(t.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"{name} has leading dims {tuple(t.shape[:-1])} but h_s has {tuple(lead_shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but weight is on {device}")


def _with_autocast_of_caller(teacher, device):
    """The teacher callable runs under the autocast state of fused_linear_matta_loss's caller."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return teacher
    dtype = torch.get_autocast_dtype(device.type)

    def run(start, end):
        with torch.autocast(device.type, dtype=dtype):
            return teacher(start, end)

    return run


def _normalize_teacher(teacher, lead_shape, n_tokens, n_classes, device, dtype):
    if teacher is None or callable(teacher):
        return teacher
    if not isinstance(teacher, (tuple, list)) or len(teacher) not in (2, 3):
        raise TypeError("teacher must be a callable teacher(start, end) -> logits (end - start, V), or a tuple "
                        f"(hidden (..., d_T), weight (V, d_T)[, bias (V,)]); got {type(teacher).__name__}")
    hidden, weight, bias = (*teacher, None) if len(teacher) == 2 else teacher
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != n_classes:
        raise ValueError(f"teacher weight must have shape ({n_classes}, d_T), got {tuple(getattr(weight, 'shape', ()))}")
    _check_hidden("teacher hidden", hidden, weight.shape[1], lead_shape, device)
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n_classes,)):
        raise ValueError(f"teacher bias must have shape ({n_classes},), got {tuple(getattr(bias, 'shape', ()))}")
    cast = [t.detach().to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    return (cast[0].reshape(n_tokens, -1), cast[1], cast[2])


def fused_linear_matta_loss(h_s, h_ta, weight, target=None, *, bias=None, weights=(1.0, 1.0, 1.0), ramp=1.0,
                            temperature=1.0, ignore_index=-100, chunk_size=None,
                            teacher: Optional[TeacherSpec] = None) -> MatTALossOutput:
    """MatTA loss of the LM head `logits = h @ weight.T + bias` without materialising the logits.

    Equal (values and gradients) to `matta_loss(h_s @ weight[:, :d_S].T + bias,
    h_ta @ weight.T + bias, target, ...)`, but the tokens are processed `chunk_size` at a
    time: per chunk both logits, the three losses and their gradients are computed, and
    dh_s, dh_ta, dW (its Student block in one GEMM over both token sets) and db accumulated.
    At most one chunk of logits (2 x chunk x V) is alive; the backward only rescales.

    Args:
        h_s: Student final hidden states (..., d_S).
        h_ta: TA final hidden states (..., d_TA), same leading dims.
        weight: output embedding (V, d_TA); the Student's head is weight[:, :d_S].
        target: class ids (...) with `ignore_index`, or probabilities (..., V); or, with a
            teacher, None (all tokens kept) or ids used only as a mask (tokens equal to
            `ignore_index` are dropped; other id values are not used).
        bias: optional (V,) output bias, shared by both heads.
        weights, ramp, temperature, ignore_index: as in `matta_loss`.
        chunk_size: tokens per chunk; None chooses one from T, V, d and free memory
            (`default_chunk_size`).
        teacher: soft labels produced chunk by chunk instead of `target` probabilities:
            - a callable `teacher(start, end)` returning the teacher's logits (end - start, V)
              for the flattened tokens [start, end) (row-major over the leading dims); it is
              called once per chunk, in order, under no_grad; or
            - a tuple `(hidden, weight)` or `(hidden, weight, bias)`: teacher hidden states
              (..., d_T) with h_s's leading dims and its head (V, d_T), (V,).
            Labels are softmax(teacher logits) (temperature 1); they get no gradient.
    Under autocast the GEMMs run in the autocast dtype; otherwise in the promoted dtype of
    the inputs. The softmax/loss math is fp32 (fp64 for fp64 inputs); dW and db are summed
    in at least fp32; gradients come back in each input's dtype.
    Returns:
        MatTALossOutput(loss, student, ta, distill, ramp), 0-dim tensors (fp32, or fp64 for
        fp64 inputs); gradient flows through `loss` only.
    Raises:
        ValueError for bad shapes, dtypes, devices or configuration values, and when the
        hidden states, weight, bias, targets or teacher contain NaN or inf.
    """
    (w_s, w_ta, w_d), ramp, temperature = check_loss_config(weights, ramp, temperature, ignore_index)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (V, d_TA) tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    n_classes, d_ta = weight.shape
    device = weight.device
    _check_hidden("h_ta", h_ta, d_ta, None, device)
    lead = h_ta.shape[:-1]
    if not isinstance(h_s, Tensor) or h_s.dim() < 2 or not 0 < h_s.shape[-1] <= d_ta:
        raise ValueError(f"h_s must have shape (..., d_S) with 0 < d_S <= d_TA={d_ta}, got "
                         f"{tuple(getattr(h_s, 'shape', ()))}")
    _check_hidden("h_s", h_s, h_s.shape[-1], lead, device)
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_classes,) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point ({n_classes},) tensor, got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but weight is on {device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_tokens = math.prod(lead)
    compute_dtype = _compute_dtype(device, h_s, h_ta, weight, *(() if bias is None else (bias,)))
    math_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    checks = [(~torch.isfinite(h_s).all() | ~torch.isfinite(h_ta).all(), "h_s or h_ta contains NaN or inf")]
    row_mask = None
    if teacher is not None:
        teacher = _normalize_teacher(teacher, lead, n_tokens, n_classes, device, compute_dtype)
        if teacher is not None and not callable(teacher):
            checks.append((~torch.isfinite(teacher[0]).all(), "teacher hidden states contain NaN or inf"))
        hard, y = False, None
        if target is None:
            kept = float(n_tokens)
        else:
            is_ids, ids, target_checks, kept_mask = _check_target(target, lead, n_classes, device, ignore_index, "h_s")
            if not is_ids:
                raise ValueError("with a teacher, target must be None or class ids (used as an ignore mask), "
                                 "not probabilities")
            checks += target_checks
            row_mask, kept = kept_mask, kept_mask.sum()
    else:
        if target is None:
            raise ValueError("target is required unless a teacher supplies the soft labels")
        hard, y, target_checks, kept = _check_target(target, lead, n_classes, device, ignore_index, "h_s")
        checks += target_checks
        kept = kept.sum() if hard else float(n_tokens)
        if not hard:
            y = y.to(math_dtype)
    if isinstance(kept, Tensor):
        (n_kept,) = _read_checks(checks, [kept])
    else:
        _read_checks(checks)
        n_kept = kept

    chunk = chunk_size or default_chunk_size(n_tokens, n_classes, d_ta, compute_dtype, device)
    config = dict(ignore_index=ignore_index, w_s=w_s, w_ta=w_ta, w_d=ramp * w_d, temperature=temperature)
    if callable(teacher):
        teacher = _with_autocast_of_caller(teacher, device)
    with _no_autocast(device):
        loss, student, ta, distill = _FusedLinearMatTALoss.apply(
            h_s.reshape(n_tokens, h_s.shape[-1]), h_ta.reshape(n_tokens, d_ta), weight, bias, y, hard, row_mask, teacher,
            1.0 / max(n_kept, 1.0), compute_dtype, chunk, config,
        )
    return MatTALossOutput(loss, student, ta, distill, ramp)
