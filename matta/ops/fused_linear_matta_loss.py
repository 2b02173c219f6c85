"""The MatTA loss fused with the LM head: logits never materialised for all tokens at once.

`fused_linear_matta_loss` takes the final hidden states and the (shared, possibly nested)
output embedding, walks the tokens in chunks and, per chunk, computes both heads' logits,
the row pass of matta_loss.py over them (softmax, the three losses and the logit gradients,
written over the logits), and accumulates dh_s, dh_ta, dW and db. At most one chunk of
logits (2 x chunk x V) is alive, and the backward only rescales the saved gradients. The
loss math, its checks and its no-host-sync contract are matta_loss.py's.
"""
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .deferred import DeferredReport
from .matta_loss import (MatTALossOutput, ValueChecks, begin_backward, check_loss_config, check_target,
                         loss_and_parts, loss_rows_pass, loss_scale, no_autocast, one_stream_loss, present_stream,
                         scaled_gradient)

TeacherSource = Union[Callable[[int, int], Tensor], tuple]

# cuBLAS GEMMs of bf16/fp16 operands with an fp32 output (torch >= 2.8 on CUDA).
_GEMM_WITH_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


GPU_MIN_CHUNK = 1024  # tokens: the dW accumulation of a chunk stays compute-bound (default_chunk_size)


def default_chunk_size(n_tokens, n_classes, width, dtype, device) -> int:
    """Tokens per chunk when `chunk_size=None`.

    GPU: the chunk's logits (2 heads x chunk x V) are kept near the size of the hidden
    states (chunk = T / ceil(V / d), rounded up to a multiple of 64: Liger-Kernel's rule of
    thumb), but at least `GPU_MIN_CHUNK`
    tokens, and within a quarter of the free GPU memory. The floor is for dW: each chunk adds
    4 chunk V d FLOPs (both heads) into the fp32 accumulator and reads and writes its 8 V d
    bytes, so at d = 1024 a chunk below ~700 tokens leaves an H100's GEMM waiting on memory
    (its ridge is ~260 FLOP per byte at the cost model's efficiencies; `matta cost`). GPT-2
    Medium MatTA's rule of thumb would give 384.
    CPU: 192 tokens, within a 128 MiB logits budget: the smallest chunk whose GEMMs kept up
    with the naive loss's (BENCHMARKS.md, "Choices in the code").
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        chunk = -(-n_tokens // max(1, -(-n_classes // width)))
        chunk = max(GPU_MIN_CHUNK, -(-chunk // 64) * 64)
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
    def forward(ctx, h_s, h_ta, weight, bias, y, hard, row_mask, teacher, n_kept, checks, report, grad_enabled,
                compute_dtype, chunk, config):
        n_tokens, d_s = h_s.shape
        n_classes, d_ta = weight.shape
        need_hs, need_hta, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:4])
        write_grad = need_hs or need_hta or need_w or need_b
        math_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        hs, hta, w = h_s.to(compute_dtype), h_ta.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        w_s = w[:, :d_s]
        nested = d_s != d_ta
        scale = loss_scale(n_kept, checks, math_dtype)

        def acc_dtype(t):  # gradients summed over chunks are kept in at least fp32
            return math_dtype if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

        # NaN-filled: every row must be written by its chunk (tests would see a gap)
        dh_s = torch.full_like(hs, math.nan) if need_hs else None
        dh_ta = torch.full_like(hta, math.nan) if need_hta else None
        new_dw = torch.empty if n_tokens else torch.zeros  # chunk 0 overwrites it (when there is one)
        dw = new_dw(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc_dtype(bias), device=bias.device) if need_b else None
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
            loss_rows_pass(z_s, z_ta, y_c, rc, scale, hard=hard, write_grad=write_grad, **config)
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
                _add_mm(shared, zc.t(), h_both, first)
                if nested:
                    _add_mm(dw[:, d_s:], z_ta.t(), hta_c[:, d_s:], first)
            if need_b:
                db += zc.sum(0, dtype=db.dtype)

        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh_s, dh_ta, dw, db)))
        ctx.dtypes = (h_s.dtype, h_ta.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_and_parts(ctx, totals, scale, checks, report, config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        begin_backward(ctx)
        grads = []
        for g, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:4]):
            grads.append(scaled_gradient(ctx, g, grad_loss, dtype) if need else None)
        return (*grads,) + (None,) * 11


def _linear_into(out, x, w, b):
    """out = x @ w.T + b into a row-major buffer."""
    if out.device.type == "cpu":
        # MKL/oneDNN runs w @ x.T faster than x @ w.T for these shapes (BENCHMARKS.md,
        # "Choices in the code"); writing it through out.T keeps the buffer row-major.
        if b is None:
            torch.mm(w, x.t(), out=out.t())
        else:
            torch.addmm(b.unsqueeze(1), w, x.t(), out=out.t())
    elif b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _add_mm(acc, a, b, overwrite):
    """acc += a @ b, or acc = a @ b when `overwrite` (acc may hold garbage then; beta = 0
    ignores it). acc is fp32/fp64 and the sum is rounded only to acc's precision: a 16-bit
    a, b go through a GEMM with an fp32 output on CUDA, or are widened chunk by chunk."""
    beta = 0.0 if overwrite else 1.0
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.is_cuda and _GEMM_WITH_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, beta=beta, out=acc)
    else:  # no mixed-precision GEMM (CPU, older torch): widen the chunk's operands, never a V x d temporary
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


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
                            teacher: Optional[TeacherSource] = None,
                            report: Optional[DeferredReport] = None) -> MatTALossOutput:
    """MatTA loss of the LM head `logits = h @ weight.T + bias` without materialising the logits.

    Equal (values and gradients) to `matta_loss(h_s @ weight[:, :d_S].T + bias,
    h_ta @ weight.T + bias, target, ...)`, but the tokens are processed `chunk_size` at a
    time: per chunk both logits, the three losses and their gradients are computed, and
    dh_s, dh_ta, dW (its Student block in one GEMM over both token sets) and db accumulated.
    At most one chunk of logits (2 x chunk x V) is alive; the backward only rescales.

    Args:
        h_s: Student final hidden states (..., d_S).
        h_ta: TA final hidden states (..., d_TA), same leading dims. One of the two may be
            None when the weights need only the other stream (`matta_loss`'s one-stream
            case: that stream's cross-entropy on its full logits; `chunk_size` is unused).
        weight: output embedding (V, d_TA); the Student's head is weight[:, :d_S].
        target: class ids (...) with `ignore_index`, or probabilities (..., V) (any
            strides); or, with a teacher, None (all tokens kept) or ids used only as a mask
            (tokens equal to `ignore_index` are dropped; other id values are not used).
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
        report: a DeferredReport that receives the value checks (see `matta_loss`).
    Under autocast the GEMMs run in the autocast dtype; otherwise in the promoted dtype of
    the inputs. The softmax/loss math is fp32 (fp64 for fp64 inputs); dW and db are summed
    in at least fp32 (never rounded to 16 bits on the way); gradients come back in each
    input's dtype.
    Returns:
        MatTALossOutput(loss, student, ta, distill, ramp), 0-dim tensors (fp32, or fp64 for
        fp64 inputs); gradient flows through `loss` only.
    Raises:
        ValueError for bad shapes, dtypes, devices or configuration values. Values are
        checked on the device without a sync, as in `matta_loss`: NaN/inf in the hidden
        states, weight, bias, targets or teacher, ids out of range or soft targets that are
        not distributions make the loss and gradients NaN, and `report.check()` raises
        ValueError naming the problem.
    """
    weights, ramp, temperature = check_loss_config(weights, ramp, temperature, ignore_index)
    stream = present_stream(weights, h_s, h_ta, ("h_s", "h_ta"))
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (V, d_TA) tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    n_classes, d_ta = weight.shape
    device = weight.device
    if h_ta is not None:
        _check_hidden("h_ta", h_ta, d_ta, None, device)
    if h_s is not None:
        if not isinstance(h_s, Tensor) or h_s.dim() < 2 or not 0 < h_s.shape[-1] <= d_ta:
            raise ValueError(f"h_s must have shape (..., d_S) with 0 < d_S <= d_TA={d_ta}, got "
                             f"{tuple(getattr(h_s, 'shape', ()))}")
        _check_hidden("h_s", h_s, h_s.shape[-1], None if h_ta is None else h_ta.shape[:-1], device)
    hidden = [h for h in (h_s, h_ta) if h is not None]
    lead = hidden[-1].shape[:-1]
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_classes,) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point ({n_classes},) tensor, got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but weight is on {device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_tokens = math.prod(lead)
    compute_dtype = _compute_dtype(device, *hidden, weight, *(() if bias is None else (bias,)))

    checks = ValueChecks(device)
    not_finite = ~torch.isfinite(hidden[0]).all()
    if stream is None:
        not_finite = not_finite | ~torch.isfinite(h_ta).all()
    checks.add([(not_finite, f"{'h_s or h_ta' if stream is None else 'h_' + ('s' if h_ta is None else 'ta')} "
                             "contains NaN or inf")])
    row_mask = None
    if teacher is not None:
        teacher = _normalize_teacher(teacher, lead, n_tokens, n_classes, device, compute_dtype)
        if teacher is not None and not callable(teacher):
            checks.add([(~torch.isfinite(teacher[0]).all(), "teacher hidden states contain NaN or inf")])
        hard, y = False, None
        if target is None:
            n_kept = n_tokens
        else:
            is_ids, ids, target_checks, kept_mask = check_target(target, lead, n_classes, device, ignore_index, "h_s")
            if not is_ids:
                raise ValueError("with a teacher, target must be None or class ids (used as an ignore mask), "
                                 "not probabilities")
            checks.add(target_checks)
            row_mask, n_kept = kept_mask, kept_mask.sum()
    else:
        if target is None:
            raise ValueError("target is required unless a teacher supplies the soft labels")
        hard, y, target_checks, kept_mask = check_target(target, lead, n_classes, device, ignore_index, "h_s")
        checks.add(target_checks)
        n_kept = kept_mask.sum() if hard else n_tokens

    if stream is not None:  # the caller's autocast applies, as to any head the caller runs
        h = hidden[0]
        logits = F.linear(h, weight[:, : h.shape[-1]], bias).reshape(-1, n_classes)
        if teacher is None:
            labels, keep = y, (kept_mask if hard else None)
        else:
            math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            with torch.no_grad():
                labels, keep = _teacher_probs(teacher, 0, n_tokens, n_classes, math_dtype), row_mask
        return one_stream_loss(logits, stream, labels, keep, checks, report, weights, ramp, ignore_index)

    w_s, w_ta, w_d = weights
    chunk = chunk_size or default_chunk_size(n_tokens, n_classes, d_ta, compute_dtype, device)
    config = dict(ignore_index=ignore_index, w_s=w_s, w_ta=w_ta, w_d=ramp * w_d, temperature=temperature)
    if callable(teacher):
        teacher = _with_autocast_of_caller(teacher, device)
    with no_autocast(device):
        loss, student, ta, distill = _FusedLinearMatTALoss.apply(
            h_s.reshape(n_tokens, h_s.shape[-1]), h_ta.reshape(n_tokens, d_ta), weight, bias, y, hard, row_mask,
            teacher, n_kept, checks, report, torch.is_grad_enabled(), compute_dtype, chunk, config,
        )
    return MatTALossOutput(loss, student, ta, distill, ramp)
