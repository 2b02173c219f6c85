"""The nested Dense op (paper Algorithm 2): Student and TA linear maps over one weight.

Conventions (PyTorch's): `weight` is (N_TA, M_TA), `bias` is (N_TA,). The Student uses the
block `weight[:N_S, :M_S]` and `bias[:N_S]`, or, with unshared weights, its own
`student_weight` (N_S, M_S) and `student_bias` (N_S,).

    y_s  = x_s  W_S^T + b_S            y_ta = x_ta W^T + b
    dx_s = dy_s W_S                    dx_ta = dy_ta W
    dW   = dy_ta^T x_ta + embed_topleft(dy_s^T x_s)
    db   = sum(dy_ta) + embed_front(sum(dy_s))

With one input `x` of width M_TA, the Student reads `x[:, :M_S]` and `dx` gathers both
streams. Then y_s is the partial sum of y_ta's first N_S columns over the first M_S inputs,
so the forward costs one GEMM of the TA's size, and the backward folds dy_s into dy_ta before
multiplying.

Layers above call `nested_linear`; it checks arguments, flattens leading dimensions and
calls the custom op `matta::nested_linear`, which `torch.compile` sees as one node and which
dispatches to the Triton kernels (kernels/nested_linear.py) or to `_torch_forward` /
`_torch_backward` here. Its autograd (`_NestedLinear`) casts the parameters to autocast's
dtype itself and asks `matta::nested_linear_backward` for gradients in the parameters' own
dtype: the kernels write an fp32 weight gradient directly (the bits of the 16-bit gradient
cast up), so no 16-bit gradient is stored and cast back. `nested_linear_reference` is the
readable oracle the tests use.

`nested_gelu_mlp` is an FFN of two nested Dense layers with GELU (tanh form) between them:
the first layer's kernel writes the pre-activation and its GELU from one accumulator, and
the second layer's input-gradient kernel multiplies by gelu'(h) before it stores, so the
activation costs no pass over the FFN width in either direction (`matta::nested_linear_gelu`,
and the `gelu_s`, `gelu_ta` inputs of `matta::nested_linear_backward`). On the PyTorch path
it runs the same aten ops as two `nested_linear` calls around `F.gelu`, with the same bits.
`gelu_mlp` is that FFN for one stream: the same ops with a Student of size 0 (`n_s` = `m_s`
= 0, the TA alone: plain products in the kernels) where the kernels run, else F.linear,
F.gelu and F.linear; `linear` is one such layer without GELU.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .._sizes import as_size_pair
from .backend import BackendError, kernel_knobs, triton_interpreting, use_triton_for


def nested_linear_reference(x_s, x_ta, weight, bias=None, *, student_features, student_weight=None, student_bias=None):
    """Plain slicing + F.linear (what a user writes without matta); same contract as nested_linear."""
    n_s, m_s = student_features
    if x_ta is None:
        x_ta, x_s = x_s, x_s[..., :m_s]
    w_s = weight[:n_s, :m_s] if student_weight is None else student_weight
    if student_weight is None:
        b_s = None if bias is None else bias[:n_s]
    else:
        b_s = student_bias
    return F.linear(x_s, w_s, b_s), F.linear(x_ta, weight, bias)


# ----------------------------------------------------------------------------------------
# PyTorch path: GEMMs on views, the Student block of dW accumulated in place (no full-size
# zero gradient from slice-backward, no separate add).


def _addmm(bias, x, w_t):
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def _torch_forward(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input):
    if one_input:
        x_s = x_ta[:, :m_s]
    if student_weight is not None:
        return _addmm(student_bias, x_s, student_weight.t()), _addmm(bias, x_ta, weight.t())
    b_s = None if bias is None else bias[:n_s]
    if not one_input:
        return _addmm(b_s, x_s, weight[:n_s, :m_s].t()), _addmm(bias, x_ta, weight.t())
    m_ta = weight.shape[1]
    y_ta = _addmm(bias, x_ta, weight.t())
    if m_s == m_ta:
        return y_ta[:, :n_s].clone(), y_ta
    # y_s is recomputed from its own inputs rather than split off y_ta: on the CPU one
    # large GEMM plus one small beats three GEMMs on thin slices.
    return _addmm(b_s, x_s, weight[:n_s, :m_s].t()), y_ta


def _torch_gelu(h):
    return F.gelu(h, approximate="tanh")


def _torch_gelu_grad(grad, h):
    # What autograd runs for F.gelu's backward: the same op, the same bits.
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")


def _torch_backward(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs):
    need_x_s, need_x_ta, need_w, need_b, need_ws, need_bs = needs
    w_s = weight[:n_s, :m_s] if student_weight is None else student_weight
    dx_s = dx_ta = dw = db = dws = dbs = None
    if one_input:
        if need_x_ta:
            dx_ta = grad_ta @ weight
            dx_ta[:, :m_s].addmm_(grad_s, w_s)
        x_s = x_ta[:, :m_s]
    else:
        if need_x_s:
            dx_s = grad_s @ w_s
        if need_x_ta:
            dx_ta = grad_ta @ weight
    if need_w:
        dw = grad_ta.t() @ x_ta
    if need_b:
        db = grad_ta.sum(0)
    if student_weight is None:
        if need_w:
            dw[:n_s, :m_s].addmm_(grad_s.t(), x_s)
        if need_b:
            db[:n_s] += grad_s.sum(0)
    else:
        if need_ws:
            dws = grad_s.t() @ x_s
        if need_bs:
            dbs = grad_s.sum(0)
    return dx_s, dx_ta, dw, db, dws, dbs


# ----------------------------------------------------------------------------------------
# The custom op. Tensors are 2-D; in the one-input form x_s is ignored.


def _use_kernels(weight, tokens, dtype=None):
    """The kernels for `weight` computing in `dtype` (default: its own). float64 (gradcheck,
    oracles) always takes the PyTorch path: tensor cores have no use for it."""
    dtype = weight.dtype if dtype is None else dtype
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and use_triton_for(
        "nested_linear", weight, tokens=tokens, dtype=dtype)


def _launch_options(kernel, weight):
    """How the kernels run here: fp32 follows PyTorch's TF32 switch like F.linear does; the
    tile shape and autotuning follow the kernel knobs (backend.KernelKnobs)."""
    tf32 = weight.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if tf32 else "ieee"
    interpreting = triton_interpreting()
    knobs = kernel_knobs()
    tiles = None if knobs.tiles is None else tuple(knobs.tiles)
    if not interpreting:
        launchable = [c[:3] for c in kernel.tile_configs(weight.element_size(), precision)]
        if tiles is not None and tiles not in launchable:
            raise BackendError(
                f"MATTA_INTERPRET_TILES={','.join(map(str, tiles))} is not a tile shape the nested-linear kernel "
                f"launches for {weight.dtype} (TF32 {'on' if tf32 else 'off'}) on a GPU; use one of {launchable}"
            )
        if tiles is None and not knobs.autotune:
            tiles = launchable[0]
    sm_count = (torch.cuda.get_device_properties(weight.device).multi_processor_count if weight.is_cuda
                else kernel.MODEL_SM_COUNT)
    return kernel.LaunchOptions(precision=precision, interpreting=interpreting, tiles=tiles, sm_count=sm_count)


def _empty(like):
    return like.new_empty(0)


def _or_empty(tensor, like):
    return _empty(like) if tensor is None else tensor


@torch.library.custom_op("matta::nested_linear", mutates_args=())
def _nested_linear_op(
    x_s: Tensor,
    x_ta: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    student_weight: Tensor | None,
    student_bias: Tensor | None,
    n_s: int,
    m_s: int,
    one_input: bool,
) -> tuple[Tensor, Tensor]:
    args = (x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input)
    if _use_kernels(weight, x_ta.shape[0]):
        from ..kernels import nested_linear as kernel

        return kernel.nested_linear_forward(*args, _launch_options(kernel, weight))
    return _torch_forward(*args)


@_nested_linear_op.register_fake
def _(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input):
    return x_ta.new_empty(x_ta.shape[0], n_s), x_ta.new_empty(x_ta.shape[0], weight.shape[0])


@torch.library.custom_op("matta::nested_linear_gelu", mutates_args=())
def _nested_linear_gelu_op(
    x_s: Tensor,
    x_ta: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    student_weight: Tensor | None,
    student_bias: Tensor | None,
    n_s: int,
    m_s: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h_s, h_ta, gelu(h_s), gelu(h_ta)) of a two-input nested Dense layer; no autograd of
    its own (`nested_gelu_mlp` differentiates the FFN as a whole)."""
    args = (x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, False)
    if _use_kernels(weight, x_ta.shape[0]):
        from ..kernels import nested_linear as kernel

        return kernel.nested_linear_forward(*args, _launch_options(kernel, weight), gelu=True)
    h_s, h_ta = _torch_forward(*args)
    return h_s, h_ta, _torch_gelu(h_s), _torch_gelu(h_ta)


@_nested_linear_gelu_op.register_fake
def _(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s):
    t = x_ta.shape[0]
    return (x_ta.new_empty(t, n_s), x_ta.new_empty(t, weight.shape[0]), x_ta.new_empty(t, n_s),
            x_ta.new_empty(t, weight.shape[0]))


@torch.library.custom_op("matta::nested_linear_backward", mutates_args=())
def _nested_linear_backward_op(
    grad_s: Tensor,
    grad_ta: Tensor,
    x_s: Tensor,
    x_ta: Tensor,
    weight: Tensor,
    student_weight: Tensor | None,
    n_s: int,
    m_s: int,
    one_input: bool,
    needs: list[bool],
    gelu_s: Tensor | None,
    gelu_ta: Tensor | None,
    param_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients (dx_s, dx_ta, dw, db, dws, dbs), empty where not needed; those of the
    parameters in `param_dtype` (fp32 parameters of a 16-bit product: the 16-bit gradients'
    bits, which the kernels write in fp32 directly). With `gelu_s`, `gelu_ta` (the
    pre-activations h whose GELU this layer read, two inputs and both input gradients asked
    for), the input gradients are those of h."""
    args = (grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, tuple(needs))
    gelu_inputs = None if gelu_ta is None else (gelu_s, gelu_ta)
    if _use_kernels(weight, grad_ta.shape[0]):
        from ..kernels import nested_linear as kernel

        # The kernels write fp32 parameter gradients themselves; any other dtype is cast below.
        grads = list(kernel.nested_linear_backward(
            *args, _launch_options(kernel, weight), gelu_inputs=gelu_inputs,
            param_dtype=torch.float32 if param_dtype == torch.float32 else None))
    else:
        grads = list(_torch_backward(*args))
        if gelu_inputs is not None:
            grads[0], grads[1] = _torch_gelu_grad(grads[0], gelu_s), _torch_gelu_grad(grads[1], gelu_ta)
    grads[2:] = [None if g is None else g.to(param_dtype) for g in grads[2:]]
    return tuple(_or_empty(g, grad_ta) for g in grads)


@_nested_linear_backward_op.register_fake
def _(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs, gelu_s, gelu_ta, param_dtype):
    t, (n_ta, m_ta) = grad_ta.shape[0], weight.shape
    shapes = [(t, m_s), (t, m_ta), (n_ta, m_ta), (n_ta,), (n_s, m_s), (n_s,)]
    if one_input:
        needs = [False] + list(needs[1:])
    return tuple(grad_ta.new_empty(shape if need else (0,), dtype=grad_ta.dtype if i < 2 else param_dtype)
                 for i, (shape, need) in enumerate(zip(shapes, needs)))


def _in_compute_dtype(params, compute):
    """The layer's parameters cast to the dtype the products run in (autocast's), inside an
    autograd.Function: their gradients come back in the parameters' dtype from the backward
    op itself, with no cast for autograd to run."""
    return tuple(p.to(compute) if isinstance(p, Tensor) else p for p in params)


class _NestedLinear(torch.autograd.Function):
    """The autograd of `matta::nested_linear`: saves the inputs and the weights it multiplied."""

    @staticmethod
    def forward(ctx, x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input, compute):
        w, b, sw, sb = _in_compute_dtype((weight, bias, student_weight, student_bias), compute)
        ctx.save_for_backward(x_s, x_ta, w, sw)
        ctx.sizes = (n_s, m_s, one_input)
        ctx.has_bias = (bias is not None, student_bias is not None)
        ctx.param_dtype = weight.dtype
        return _nested_linear_op(x_s, x_ta, w, b, sw, sb, n_s, m_s, one_input)

    @staticmethod
    def backward(ctx, grad_s, grad_ta):
        x_s, x_ta, weight, student_weight = ctx.saved_tensors
        n_s, m_s, one_input = ctx.sizes
        has_bias, has_student_bias = ctx.has_bias
        g = ctx.needs_input_grad
        needs = [
            g[0] and not one_input,
            g[1],
            g[2],
            has_bias and g[3],
            student_weight is not None and g[4],
            has_student_bias and g[5],
        ]
        # Autograd materialises an unused output's gradient as zeros, so both are tensors here.
        grad_s, grad_ta = grad_s.contiguous(), grad_ta.contiguous()
        grads = _nested_linear_backward_op(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input,
                                           needs, None, None, ctx.param_dtype)
        dx_s, dx_ta, dw, db, dws, dbs = (gr if need else None for gr, need in zip(grads, needs))
        return dx_s, dx_ta, dw, db, dws, dbs, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public functional API: argument checks, leading dims, autocast.


def _check_tensor(name, t, width, dtype, device, lead_shape=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0 or t.shape[-1] != width:
        raise ValueError(f"{name} must have last dimension {width}, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the weight has dtype {dtype}; cast one to match")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {device}; move them to one device")
    if lead_shape is not None and tuple(t.shape[:-1]) != tuple(lead_shape):
        raise ValueError(
            f"{name} has leading dimensions {tuple(t.shape[:-1])} but x_s has {tuple(lead_shape)}; "
            "both streams must see the same tokens"
        )


def check_student_features(student_features, weight_shape):
    n_ta, m_ta = weight_shape
    n_s, m_s = as_size_pair("student_features", student_features, "(N_S, M_S)")
    if not (0 < n_s <= n_ta):
        raise ValueError(f"Student output size N_S must be in [1, N_TA={n_ta}], got {n_s}")
    if not (0 < m_s <= m_ta):
        raise ValueError(f"Student input size M_S must be in [1, M_TA={m_ta}], got {m_s}")
    return n_s, m_s


def _autocast_dtype(device):
    """The autocast dtype where autocast is on for `device`, else None."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast_inputs(tensors, device):
    """Like F.linear under autocast: the inputs in the autocast dtype (gradients flow back
    through the casts). The parameters are cast inside the autograd Functions."""
    cast = _autocast_dtype(device)
    if cast is None:
        return tensors
    return tuple(t.to(cast) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def _compute_dtype(weight):
    """The dtype the products run in: autocast's where it is on (for floating parameters), else
    the weight's own."""
    return (_autocast_dtype(weight.device) if weight.is_floating_point() else None) or weight.dtype


def _check_layer(weight, bias, student_features, student_weight, student_bias, name=""):
    """(n_s, m_s) of one nested Dense layer's parameters, or a clear error."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}weight must be a 2-D tensor (N_TA, M_TA), got {getattr(weight, 'shape', type(weight))}")
    n_ta, m_ta = weight.shape
    n_s, m_s = check_student_features(student_features, weight.shape)
    dtype, device = weight.dtype, weight.device
    if bias is not None:
        _check_tensor(f"{name}bias", bias, n_ta, dtype, device)
        if bias.dim() != 1:
            raise ValueError(f"{name}bias must be 1-D ({n_ta},), got shape {tuple(bias.shape)}")
    if student_weight is not None:
        if student_weight.dim() != 2 or tuple(student_weight.shape) != (n_s, m_s):
            raise ValueError(f"{name}student_weight must have shape ({n_s}, {m_s}), got {tuple(student_weight.shape)}")
        _check_tensor(f"{name}student_weight", student_weight, m_s, dtype, device)
        if student_bias is not None:
            _check_tensor(f"{name}student_bias", student_bias, n_s, dtype, device)
            if student_bias.dim() != 1:
                raise ValueError(f"{name}student_bias must be 1-D ({n_s},), got shape {tuple(student_bias.shape)}")
    elif student_bias is not None:
        raise ValueError(f"{name}student_bias needs {name}student_weight (a shared Student uses bias[:N_S])")
    return n_s, m_s


def nested_linear(x_s, x_ta, weight, bias=None, *, student_features, student_weight=None, student_bias=None):
    """Student and TA outputs of a nested Dense layer, fused.

    Args:
        x_s: Student input (..., M_S); or, when `x_ta` is None, the one input (..., M_TA)
            that both read (the Student reads its first M_S features).
        x_ta: TA input (..., M_TA) with the same leading dims as x_s, or None.
        weight: (N_TA, M_TA); its block [:N_S, :M_S] is the Student's unless
            `student_weight` is given.
        bias: (N_TA,) or None; bias[:N_S] is the Student's unless `student_weight` is given.
        student_features: (N_S, M_S).
        student_weight, student_bias: an independent Student (N_S, M_S) weight and (N_S,)
            bias (the unshared ablation); the Student then uses nothing of weight/bias.
    Returns:
        (y_s, y_ta) of shapes (..., N_S) and (..., N_TA).
    """
    n_s, m_s = _check_layer(weight, bias, student_features, student_weight, student_bias)
    n_ta, m_ta = weight.shape
    dtype, device = _compute_dtype(weight), weight.device
    x_s, x_ta = _autocast_inputs((x_s, x_ta), device)
    one_input = x_ta is None
    if one_input:
        _check_tensor("x", x_s, m_ta, dtype, device)
    else:
        _check_tensor("x_s", x_s, m_s, dtype, device)
        _check_tensor("x_ta", x_ta, m_ta, dtype, device, lead_shape=x_s.shape[:-1])

    lead = x_s.shape[:-1]
    x_ta2 = x_s.reshape(-1, m_ta) if one_input else x_ta.reshape(-1, m_ta)
    # One input: x_s is a placeholder (the op reads x_ta's first M_S columns).
    x_s2 = x_ta2.new_empty(x_ta2.shape[0], 0) if one_input else x_s.reshape(-1, m_s)
    y_s, y_ta = _NestedLinear.apply(x_s2, x_ta2, weight, bias, student_weight, student_bias, n_s, m_s, one_input,
                                    dtype)
    return y_s.reshape(*lead, n_s), y_ta.reshape(*lead, n_ta)


def _check_one_stream(name, weight, bias, width=None, source="", like=None):
    """A one-stream layer's weight (N, width), of the dtype and device of `like` if given, and
    bias (N,) or None, or a clear error."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
    if width is not None and weight.shape[1] != width:
        raise ValueError(f"{name}weight {tuple(weight.shape)} must take {width} inputs{source}")
    if like is not None:
        _check_tensor(f"{name}weight", weight, weight.shape[1], like.dtype, like.device)
    if bias is not None:
        _check_tensor(f"{name}bias", bias, weight.shape[0], weight.dtype, weight.device)
        if bias.dim() != 1:
            raise ValueError(f"{name}bias must be 1-D ({weight.shape[0]},), got shape {tuple(bias.shape)}")


def one_stream_fused(weight, tokens, dtype) -> bool:
    """Whether the one-stream layers (`linear`, `gelu_mlp`) run the nested kernels: the nested
    Dense op's dispatch for `dtype`, the dtype it computes in (autocast's under autocast)."""
    return _use_kernels(weight, tokens, dtype)


def _one_stream_compute(x, weight, weight_name):
    """The dtype a one-stream layer computes in where it runs the nested kernels, else None."""
    if not isinstance(weight, Tensor) or not isinstance(x, Tensor):
        raise TypeError(f"x and {weight_name} must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    compute = _compute_dtype(weight)
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return compute if one_stream_fused(weight, tokens, compute) else None


def _one_stream_tokens(x, width, compute, device):
    """(leading dims, x as (tokens, width) in `compute`, the empty Student input beside it)."""
    (x,) = _autocast_inputs((x,), device)
    _check_tensor("x", x, width, compute, device)
    x2 = x.reshape(-1, width)
    return x.shape[:-1], x2, x2.new_empty(x2.shape[0], 0)


def linear(x, weight, bias=None):
    """One stream's Dense layer, x W^T + b: the TA alone or the Student alone. Where the nested
    Dense kernels run, the nested op with a Student of size 0 (a plain product, its bias
    gradient summed in the weight-gradient kernel, fp32 parameter gradients written directly);
    elsewhere F.linear, the op and bits of unfused code.

    Args:
        x: (..., M); weight (N, M), any strides; bias (N,) or None.
    Returns:
        (..., N).
    """
    compute = _one_stream_compute(x, weight, "weight")
    if compute is None:
        return F.linear(x, weight, bias)
    _check_one_stream("", weight, bias)
    lead, x2, empty = _one_stream_tokens(x, weight.shape[1], compute, weight.device)
    _, y = _NestedLinear.apply(empty, x2, weight, bias, None, None, 0, 0, False, compute)
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------
# The FFN: nested Dense, GELU, nested Dense.


def nested_gelu_mlp_reference(x_s, x_ta, fc, proj):
    """`nested_linear_reference` twice around F.gelu (tanh form); `fc` and `proj` are dicts of
    nested_linear's parameter arguments (weight, bias, student_features, student_weight,
    student_bias)."""
    h_s, h_ta = nested_linear_reference(x_s, x_ta, **fc)
    return nested_linear_reference(_torch_gelu(h_s), _torch_gelu(h_ta), **proj)


class _NestedGeluMLP(torch.autograd.Function):
    """y = proj(gelu(fc(x))) for both streams (or the TA alone: Student sizes 0); saves what the
    unfused graph saves (x, h and gelu(h)) and hands the second layer's backward h, so that it
    returns dh directly. The parameters are cast to `compute` here (see `_NestedLinear`)."""

    @staticmethod
    def forward(ctx, x_s, x_ta, w1, b1, sw1, sb1, w2, b2, sw2, sb2, fc_sizes, proj_sizes, compute):
        ctx.param_dtype = w1.dtype
        ctx.has_bias = tuple(b is not None for b in (b1, sb1, b2, sb2))
        w1, b1, sw1, sb1, w2, b2, sw2, sb2 = _in_compute_dtype((w1, b1, sw1, sb1, w2, b2, sw2, sb2), compute)
        h_s, h_ta, a_s, a_ta = _nested_linear_gelu_op(x_s, x_ta, w1, b1, sw1, sb1, *fc_sizes)
        y_s, y_ta = _nested_linear_op(a_s, a_ta, w2, b2, sw2, sb2, *proj_sizes, False)
        ctx.save_for_backward(x_s, x_ta, w1, sw1, h_s, h_ta, a_s, a_ta, w2, sw2)
        ctx.sizes = fc_sizes, proj_sizes
        return y_s, y_ta

    @staticmethod
    def backward(ctx, dy_s, dy_ta):
        x_s, x_ta, w1, sw1, h_s, h_ta, a_s, a_ta, w2, sw2 = ctx.saved_tensors
        fc_sizes, proj_sizes = ctx.sizes
        has_b1, has_sb1, has_b2, has_sb2 = ctx.has_bias
        g = ctx.needs_input_grad
        alone = fc_sizes[0] == 0  # the TA alone (`gelu_mlp`): x_s, h_s, a_s and y_s are empty
        needs2 = [not alone, True, g[6], has_b2 and g[7], sw2 is not None and g[8], has_sb2 and g[9]]
        grads2 = _nested_linear_backward_op(dy_s.contiguous(), dy_ta.contiguous(), a_s, a_ta, w2, sw2, *proj_sizes,
                                            False, needs2, h_s, h_ta, ctx.param_dtype)
        needs1 = [g[0], g[1], g[2], has_b1 and g[3], sw1 is not None and g[4], has_sb1 and g[5]]
        grads1 = _nested_linear_backward_op(x_s if alone else grads2[0], grads2[1], x_s, x_ta, w1, sw1, *fc_sizes,
                                            False, needs1, None, None, ctx.param_dtype)
        dx_s, dx_ta, dw1, db1, dsw1, dsb1 = (gr if need else None for gr, need in zip(grads1, needs1))
        _, _, dw2, db2, dsw2, dsb2 = (gr if need else None for gr, need in zip(grads2, needs2))
        return dx_s, dx_ta, dw1, db1, dsw1, dsb1, dw2, db2, dsw2, dsb2, None, None, None


def nested_gelu_mlp(x_s, x_ta, fc, proj):
    """An FFN of both streams, proj(gelu(fc(x))) with GELU's tanh form, fused (module docstring).

    Args:
        x_s, x_ta: the Student's (..., M_S) and the TA's (..., M_TA) inputs, same leading dims.
        fc, proj: the two layers' parameters, each a dict of nested_linear's parameter
            arguments: weight, bias (optional), student_features, student_weight and
            student_bias (optional). proj's input sizes must be fc's output sizes.
    Returns:
        (y_s, y_ta) of shapes (..., proj N_S) and (..., proj N_TA).
    """
    params = []
    for name, layer in (("fc.", fc), ("proj.", proj)):
        unknown = set(layer) - {"weight", "bias", "student_features", "student_weight", "student_bias"}
        if unknown or "weight" not in layer or "student_features" not in layer:
            raise ValueError(f"{name[:-1]} must hold weight and student_features (and optionally bias, "
                             f"student_weight, student_bias), got keys {sorted(layer)}")
        tensors = tuple(layer.get(k) for k in ("weight", "bias", "student_weight", "student_bias"))
        sizes = _check_layer(tensors[0], tensors[1], layer["student_features"], *tensors[2:], name=name)
        params.append((tensors, sizes))
    (fc_tensors, fc_sizes), (proj_tensors, proj_sizes) = params
    w1, w2 = fc_tensors[0], proj_tensors[0]
    if (proj_sizes[1], w2.shape[1]) != (fc_sizes[0], w1.shape[0]):
        raise ValueError(f"proj's input sizes (M_S, M_TA) = ({proj_sizes[1]}, {w2.shape[1]}) must be fc's output "
                         f"sizes (N_S, N_TA) = ({fc_sizes[0]}, {w1.shape[0]})")
    if (w2.dtype, w2.device) != (w1.dtype, w1.device):
        raise ValueError(f"proj's weight is {w2.dtype} on {w2.device} but fc's is {w1.dtype} on {w1.device}")
    compute = _compute_dtype(w1)
    x_s, x_ta = _autocast_inputs((x_s, x_ta), w1.device)
    m_s, m_ta = fc_sizes[1], w1.shape[1]
    _check_tensor("x_s", x_s, m_s, compute, w1.device)
    _check_tensor("x_ta", x_ta, m_ta, compute, w1.device, lead_shape=x_s.shape[:-1])
    lead = x_s.shape[:-1]
    y_s, y_ta = _NestedGeluMLP.apply(x_s.reshape(-1, m_s), x_ta.reshape(-1, m_ta), *fc_tensors, *proj_tensors,
                                     fc_sizes, proj_sizes, compute)
    return y_s.reshape(*lead, proj_sizes[0]), y_ta.reshape(*lead, w2.shape[0])


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """One stream's FFN, proj(gelu(fc(x))) with GELU's tanh form: a TA-only block, or a run that
    trains one model. Where the nested Dense kernels run, fused as `nested_gelu_mlp` fuses both
    streams (the TA alone: no Student block, plain products); elsewhere F.linear, F.gelu and
    F.linear, the ops and bits of unfused code.

    Args:
        x: (..., M); fc_weight (F, M), fc_bias (F,) or None; proj_weight (N, F), proj_bias (N,) or None.
    Returns:
        (..., N).
    """
    compute = _one_stream_compute(x, fc_weight, "fc_weight")
    if compute is None:
        return F.linear(_torch_gelu(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)
    _check_one_stream("fc_", fc_weight, fc_bias)
    f, m = fc_weight.shape
    _check_one_stream("proj_", proj_weight, proj_bias, f, " (fc_weight's outputs)", like=fc_weight)
    lead, x2, empty = _one_stream_tokens(x, m, compute, fc_weight.device)
    _, y = _NestedGeluMLP.apply(empty, x2, fc_weight, fc_bias, None, None, proj_weight, proj_bias, None, None, (0, 0),
                                (0, 0), compute)
    return y.reshape(*lead, proj_weight.shape[0])
