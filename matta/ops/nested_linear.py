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
`_torch_backward` here. `nested_linear_reference` is the readable oracle the tests use.
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
# The custom op. Tensors are 2-D; in the one-input form x_s is x_ta itself and ignored.


def _use_kernels(weight, tokens):
    # float64 (gradcheck, oracles) always takes the PyTorch path: tensor cores have no use for it.
    return weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and use_triton_for(
        "nested_linear", weight, tokens=tokens)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, tuple(needs))
    if _use_kernels(weight, grad_ta.shape[0]):
        from ..kernels import nested_linear as kernel

        grads = kernel.nested_linear_backward(*args, _launch_options(kernel, weight))
    else:
        grads = _torch_backward(*args)
    return tuple(_or_empty(g, grad_ta) for g in grads)


@_nested_linear_backward_op.register_fake
def _(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs):
    t, (n_ta, m_ta) = grad_ta.shape[0], weight.shape
    shapes = [(t, m_s), (t, m_ta), (n_ta, m_ta), (n_ta,), (n_s, m_s), (n_s,)]
    if one_input:
        needs = [False] + list(needs[1:])
    return tuple(grad_ta.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input = inputs
    ctx.save_for_backward(x_s, x_ta, weight, student_weight)
    ctx.sizes = (n_s, m_s, one_input)
    ctx.has_bias = (bias is not None, student_bias is not None)


def _backward(ctx, grad_s, grad_ta):
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
    grads = _nested_linear_backward_op(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs)
    dx_s, dx_ta, dw, db, dws, dbs = (gr if need else None for gr, need in zip(grads, needs))
    return dx_s, dx_ta, dw, db, dws, dbs, None, None, None


_nested_linear_op.register_autograd(_backward, setup_context=_setup_context)


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
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (N_TA, M_TA), got {getattr(weight, 'shape', type(weight))}")
    n_ta, m_ta = weight.shape
    n_s, m_s = check_student_features(student_features, weight.shape)
    if weight.device.type != "meta" and torch.is_autocast_enabled(weight.device.type):
        # Like F.linear under autocast: every operand in the autocast dtype (gradients flow
        # back through the casts to the fp32 parameters).
        cast = torch.get_autocast_dtype(weight.device.type)
        x_s, x_ta, weight, bias, student_weight, student_bias = (
            t.to(cast) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (x_s, x_ta, weight, bias, student_weight, student_bias)
        )
    dtype, device = weight.dtype, weight.device
    one_input = x_ta is None
    if one_input:
        _check_tensor("x", x_s, m_ta, dtype, device)
    else:
        _check_tensor("x_s", x_s, m_s, dtype, device)
        _check_tensor("x_ta", x_ta, m_ta, dtype, device, lead_shape=x_s.shape[:-1])
    if bias is not None:
        _check_tensor("bias", bias, n_ta, dtype, device)
        if bias.dim() != 1:
            raise ValueError(f"bias must be 1-D ({n_ta},), got shape {tuple(bias.shape)}")
    if student_weight is not None:
        if student_weight.dim() != 2 or tuple(student_weight.shape) != (n_s, m_s):
            raise ValueError(f"student_weight must have shape ({n_s}, {m_s}), got {tuple(student_weight.shape)}")
        _check_tensor("student_weight", student_weight, m_s, dtype, device)
        if student_bias is not None:
            _check_tensor("student_bias", student_bias, n_s, dtype, device)
            if student_bias.dim() != 1:
                raise ValueError(f"student_bias must be 1-D ({n_s},), got shape {tuple(student_bias.shape)}")
    elif student_bias is not None:
        raise ValueError("student_bias needs student_weight (a shared Student uses bias[:N_S])")

    lead = x_s.shape[:-1]
    x_ta2 = x_s.reshape(-1, m_ta) if one_input else x_ta.reshape(-1, m_ta)
    x_s2 = x_ta2 if one_input else x_s.reshape(-1, m_s)
    y_s, y_ta = _nested_linear_op(x_s2, x_ta2, weight, bias, student_weight, student_bias, n_s, m_s, one_input)
    return y_s.reshape(*lead, n_s), y_ta.reshape(*lead, n_ta)
