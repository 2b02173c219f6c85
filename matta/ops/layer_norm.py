"""LayerNorm with the residual add in front of it fused in, and its output in the dtype the
next layer reads.

    s = x + residual                  (in x's dtype; the residual may be narrower)
    y = LayerNorm(s) weight + bias    (statistics in fp32, y written in out_dtype)

`layer_norm(x, weight, bias, eps, residual=..., out_dtype=...)` returns (s, y), or y alone
without a residual. Under autocast out_dtype defaults to the autocast dtype, so the nested
Dense op after it reads y as it is: no cast pass forward, and none backward, where the
gradient arrives in y's dtype. The backward adds the gradient that reaches s from elsewhere
(the skip path of a residual block) into dx in the same pass, writes d residual in the
residual's dtype (or hands dx itself to both when the dtypes agree, as autograd's add does),
and gives dweight and dbias. In a transformer block `x + drop(attn(ln_1(x)))` then `ln_2`
this is one op forward and one backward where autograd ran an add, the norm, a cast each way
and a gradient sum.

Saved for the backward: s (or x without a residual), and the fp32 mean and rstd of each row
(float64 for float64 rows), 8 bytes a row, so the kernel reads s and dy once and does not recompute the statistics.

The custom ops `matta::layer_norm` and `matta::layer_norm_backward` dispatch to the Triton
kernels (kernels/layer_norm.py) or to the PyTorch path here: `x + residual` and the aten
ops `F.layer_norm` and its autograd run (native_layer_norm, native_layer_norm_backward),
so in fp32 the PyTorch path gives the same bits as unfused model code.
`layer_norm_reference` is the readable oracle the tests use.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import BackendError, requested_backend, triton_interpreting, use_triton_for


def default_out_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for x's device, else x's dtype."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _wide(t):
    """t in fp32 at least (float64 stays float64: gradcheck and the oracles run in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm_reference(x, weight, bias, eps, *, residual=None, out_dtype=None):
    """The add and F.layer_norm in fp32 as plain PyTorch (autograd runs the backward); same contract."""
    out_dtype = default_out_dtype(x) if out_dtype is None else out_dtype
    s = x if residual is None else (x + residual).to(x.dtype)
    y = F.layer_norm(_wide(s), (x.shape[-1],), _wide(weight), _wide(bias), eps).to(out_dtype)
    return y if residual is None else (s, y)


# ----------------------------------------------------------------------------------------
# PyTorch path: the aten ops unfused model code runs, in its order.


def _torch_forward(x, residual, weight, bias, eps, out_dtype):
    s = x if residual is None else (x + residual).to(x.dtype)
    y, mean, rstd = torch.native_layer_norm(_wide(s), (s.shape[-1],), _wide(weight), _wide(bias), eps)
    return (x.new_empty(0) if residual is None else s), y.to(out_dtype), mean.view(-1), rstd.view(-1)


def _torch_backward(dy, s, weight, bias, mean, rstd, skip_grad, residual_dtype, param_grads):
    rows = s.shape[0]
    dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        _wide(dy), _wide(s), (s.shape[-1],), mean.view(rows, 1), rstd.view(rows, 1), _wide(weight), _wide(bias),
        [True, param_grads, param_grads])
    if skip_grad is not None:
        dx = dx + skip_grad
    dx = dx.to(s.dtype)
    dresidual = s.new_empty(0) if residual_dtype is None else dx.to(residual_dtype)
    if not param_grads:
        return dx, dresidual, s.new_empty(0), s.new_empty(0)
    return dx, dresidual, dweight.to(weight.dtype), dbias.to(weight.dtype)


# ----------------------------------------------------------------------------------------
# The custom ops. Rows are 2-D and contiguous; without a residual, s is an empty placeholder
# (an op's output may not alias its input x).


def _use_kernels(x, residual, weight, out_dtype):
    """Triton for CUDA tensors (or MATTA_BACKEND=triton) in the dtypes and widths the kernels
    serve; float64 (gradcheck, oracles) always takes the PyTorch path. A call the kernels do
    not serve raises under MATTA_BACKEND=triton and takes the PyTorch path under auto."""
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if torch.float64 in (t.dtype for t in tensors) or not use_triton_for(
            "layer_norm", *tensors, tokens=x.shape[0], dtype=out_dtype):
        return False
    from ..kernels import layer_norm as kernel

    problem = kernel.serves(x.dtype, out_dtype, None if residual is None else residual.dtype, weight.dtype,
                            x.shape[-1])
    if problem is not None and requested_backend() == "triton":
        raise BackendError(f"MATTA_BACKEND=triton: the layer_norm kernels do not serve {problem}; "
                           "use MATTA_BACKEND=auto or torch")
    return problem is None


def _launch_options(kernel, x):
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda \
        else kernel.MODEL_SM_COUNT
    return kernel.LaunchOptions(interpreting=triton_interpreting(), sm_count=sm_count)


@torch.library.custom_op("matta::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _use_kernels(x, residual, weight, out_dtype):
        from ..kernels import layer_norm as kernel

        return kernel.layer_norm_forward(x, residual, weight, bias, eps, out_dtype, _launch_options(kernel, x))
    return _torch_forward(x, residual, weight, bias, eps, out_dtype)


@_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    rows = x.shape[0]
    s = x.new_empty(0) if residual is None else torch.empty_like(x)
    stats = x.new_empty(rows, dtype=torch.promote_types(x.dtype, torch.float32))
    return s, x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("matta::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, s: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                            skip_grad: Tensor | None, residual_dtype: torch.dtype | None,
                            param_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _use_kernels(s, skip_grad, weight, dy.dtype):
        from ..kernels import layer_norm as kernel

        return kernel.layer_norm_backward(dy, s, weight, mean, rstd, skip_grad, residual_dtype, param_grads,
                                          _launch_options(kernel, s))
    return _torch_backward(dy, s, weight, bias, mean, rstd, skip_grad, residual_dtype, param_grads)


@_layer_norm_backward_op.register_fake
def _(dy, s, weight, bias, mean, rstd, skip_grad, residual_dtype, param_grads):
    dresidual = s.new_empty(0) if residual_dtype is None else s.new_empty(s.shape, dtype=residual_dtype)
    params = (weight.shape[0],) if param_grads else (0,)
    return torch.empty_like(s), dresidual, weight.new_empty(params), weight.new_empty(params)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _, _ = inputs
    s, _, mean, rstd = output
    has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd, *(() if has_residual else (s,)))
    ctx.set_materialize_grads(False)  # no zero fills for the statistics or an unused s
    ctx.save_for_backward(s if has_residual else x, weight, bias, mean, rstd)
    ctx.has_residual, ctx.out_dtype = has_residual, output[1].dtype
    # d residual needs a pass of its own only in another dtype; else dx serves both.
    ctx.residual_dtype = residual.dtype if has_residual and residual.dtype != x.dtype else None


def _backward(ctx, grad_s, grad_y, _grad_mean, _grad_rstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_y is None:  # y unused: only the skip path carries a gradient
        grad_y = s.new_zeros(s.shape, dtype=ctx.out_dtype)
    if ctx.has_residual and grad_s is None:
        grad_s = torch.zeros_like(s)
    param_grads = needs[2] or needs[3]
    dx, dresidual, dweight, dbias = _layer_norm_backward_op(
        grad_y.contiguous(), s, weight, bias, mean, rstd, None if grad_s is None else grad_s.contiguous(),
        ctx.residual_dtype, param_grads)
    if ctx.residual_dtype is None:
        dresidual = dx
    return (dx if needs[0] else None, dresidual if ctx.has_residual and needs[1] else None,
            dweight if needs[2] else None, dbias if needs[3] else None, None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public functional API: argument checks, leading dims, the autocast output dtype.


def _check(name, t, *, shape, device):
    if not isinstance(t, Tensor):
        raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"layer_norm: {name} must be floating point, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"layer_norm: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {device}; move them to one device")


def layer_norm(x, weight, bias, eps, *, residual=None, out_dtype=None):
    """LayerNorm over the last dimension of `x` (+ `residual`), fused.

    Args:
        x: (..., d), floating point.
        weight, bias: (d,), one dtype.
        eps: the variance's stabiliser, a positive float.
        residual: None, or (..., d) like x (any floating dtype) added to it first.
        out_dtype: y's dtype; None: the autocast dtype where autocast is on for x's
            device, else x's dtype.
    Returns:
        y, or (s, y) with a residual: s = x + residual in x's dtype, y = LayerNorm(s)
        computed in fp32 and written in out_dtype.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f"layer_norm: x must be a tensor of at least one dimension, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"layer_norm: x must be floating point, got dtype {x.dtype}")
    width = x.shape[-1]
    _check("weight", weight, shape=(width,), device=x.device)
    _check("bias", bias, shape=(width,), device=x.device)
    if bias.dtype != weight.dtype:
        raise TypeError(f"layer_norm: bias has dtype {bias.dtype} but weight has {weight.dtype}; cast one to match")
    if residual is not None:
        _check("residual", residual, shape=x.shape, device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps!r}")
    if out_dtype is None:
        out_dtype = default_out_dtype(x)
    elif not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"layer_norm: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, width).contiguous()
    residual2 = None if residual is None else residual.reshape(-1, width).contiguous()
    s, y, _, _ = _layer_norm_op(x2, residual2, weight.contiguous(), bias.contiguous(), float(eps), out_dtype)
    y = y.view(*lead, width)
    return y if residual is None else (s.view(*lead, width), y)
