"""FLOPs, bytes and launches of one dispatched op: the per-op half of the cost model.

`op_cost(func, args, kwargs, out, card_kind)` returns an `OpCost`, or None for an op that
costs nothing on a device (views, allocations, metadata). Bytes are the compulsory traffic:
every tensor an op reads, once, and every tensor it writes, once (a view counts its own
elements; a broadcast dimension counts once). FLOPs count multiply-adds as two, and one per
element of the largest tensor for element-wise ops and reductions, in units of one `exp` (the
card's `vector_flops` rate), except GELU's tanh form, `GELU_EXP_EQUIVALENTS` per element.

Op kinds (what the overhead split of `matta cost` groups by):
    gemm       matrix products (aten mm/addmm/bmm/..., matta::nested_linear[_backward], the
               fused loss's fp32-accumulating GEMM) and the symmetric eigensolver
    attention  SDPA kernels (FlashAttention-style: causal halves the products)
    memory     everything else: element-wise passes, reductions, copies, casts, fills,
               norms, the optimizer's arithmetic
    collective torch.distributed collectives an op issues itself (Shampoo's gather of the
               directions of its share of blocks), priced on the card's interconnect as NCCL
               rings: bytes each rank sends, and the ring's steps; DDP's gradient all-reduce
               is not traced (`predict` models it)

Launches are counted as they happen on the device kind:
- "gpu": one kernel per op; multi-tensor ops (`_foreach_*`, fused Adam) pack up to
  `_MTA_TENSORS[depth]` tensors and 320 blocks of 65536 elements per launch (PyTorch's
  multi_tensor_apply); matta's nested Dense op is one Triton launch forward and one per
  product backward (plus split-K reductions), as kernels/nested_linear.py launches them;
  SDPA's FlashAttention backward is 3 kernels (dot(dO, O), the main pass, dQ conversion);
  LayerNorm's backward 2 (input, then weight/bias reductions), as is matta's fused one
  (matta::layer_norm_backward; its forward 1); embedding backward 3.
- "cpu": one dispatched op each; multi-tensor ops loop over their tensors (one op per
  tensor), nested Dense runs its PyTorch path (one op per GEMM or reduction it issues).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

GEMM, ATTENTION, MEMORY, COLLECTIVE = "gemm", "attention", "memory", "collective"

# Ops that move no data on a device: views, allocations (the caching allocator), metadata.
FREE_OPS = frozenset(
    "aten::" + name for name in (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "expand_as",
        "slice", "select", "unsqueeze", "squeeze", "alias", "detach", "split", "split_with_sizes", "unbind",
        "chunk", "as_strided", "diagonal", "narrow", "unfold", "view_as", "lift_fresh", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride", "sym_numel",
        "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "is_contiguous", "numel",
        "size", "stride", "dim", "_local_scalar_dense", "set_", "resize_", "_conj", "_neg_view", "mT", "movedim",
        "_assert_async", "_functional_assert_async", "record_stream",
    )
) | {"prim::device", "prim::layout"}

_WRITE_ONLY = frozenset("aten::" + n for n in (
    "zeros", "ones", "full", "fill", "fill_", "zero_", "zeros_like", "ones_like", "full_like", "scalar_tensor",
    "arange", "eye", "normal_", "uniform_", "random_", "bernoulli_", "new_zeros", "new_ones", "new_full",
    "linspace", "logspace",
))
_COPIES = frozenset("aten::" + n for n in ("copy_", "_to_copy", "clone", "_copy_from", "_copy_from_and_resize"))
_MATMULS = frozenset("aten::" + n for n in (
    "mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "mv", "addmv", "addmv_", "dot",
    "vdot", "_addmm_activation",
))
_MATMUL_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

# PyTorch's multi_tensor_apply: tensors per launch by list depth, blocks per launch, chunk size.
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS, _MTA_CHUNK = 320, 65536

# Launches on a GPU of ops that are more than one kernel there.
_GPU_LAUNCHES = {
    "aten::native_layer_norm_backward": 2,
    "aten::embedding_dense_backward": 3,
    "aten::slice_backward": 2,  # a zero fill, then the copy into the slice
    "aten::select_backward": 2,
    "aten::_linalg_eigh": 4,  # cuSOLVER syevd: workspace query, reduction, solve, back-transform (approx.)
}


# GELU's tanh form costs about six `exp`s per element, forward or backward: on this CPU (one
# thread, 2048 x 1024 fp32) exp ran at 3.55 G elements/s, F.gelu(approximate="tanh") at 0.60
# and its backward at 0.57 (torch.utils.benchmark, 2026-12-02). A GPU streams both at memory speed.
GELU_EXP_EQUIVALENTS = 6.0


@dataclass
class OpCost:
    """What one op costs, before a card prices it."""

    op: str
    kind: str
    flops: float
    read: float
    written: float
    launches: int
    dtype: str = "fp32"  # the matrix-product dtype key (gemm / attention)
    shape: str = ""
    min_dim: int = 0  # a GEMM's smallest dimension (0: not a GEMM), for the card's gemm_curve
    wire: float = 0.0  # a collective's bytes sent by each rank over its link
    net_steps: int = 0  # a collective's ring steps (each pays the card's network latency)
    # Element-wise work a GEMM op runs as passes of their own after its products (a CPU's
    # GELU inside the nested ops), in exp-equivalents at the card's vector rate.
    element_flops: float = 0.0

    @property
    def bytes(self) -> float:
        return self.read + self.written


def tensor_bytes(t: torch.Tensor) -> float:
    """Bytes of the elements a tensor (or view) addresses; a broadcast (stride 0) dimension counts once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return float(elements * t.element_size()) if t.numel() else 0.0


def _tensors(value) -> list:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _bound(schema, args, kwargs):
    """[(schema argument, value)] for every argument of the call."""
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out.append((arg, args[i]))
        elif arg.name in kwargs:
            out.append((arg, kwargs[arg.name]))
    return out


def _value(bound, name, default=None):
    return next((v for a, v in bound if a.name == name), default)


def _reads_writes(name, bound, out):
    """(bytes read, bytes written, elements touched) from the schema's alias annotations."""
    read = written = 0.0
    elements = 0
    seen = set()
    for arg, value in bound:
        writes = arg.alias_info is not None and arg.alias_info.is_write
        for t in _tensors(value):
            if id(t) in seen:
                continue
            seen.add(id(t))
            size = tensor_bytes(t)
            elements = max(elements, t.numel())
            if writes:
                written += size
                # an out= argument, a pure fill or a copy destination is not read
                if not arg.kwarg_only and name not in _WRITE_ONLY and name not in _COPIES:
                    read += size
            elif name not in _WRITE_ONLY:
                read += size
    for t in _tensors(out):
        if id(t) not in seen:
            seen.add(id(t))
            written += tensor_bytes(t)
            elements = max(elements, t.numel())
    return read, written, elements


def _multi_tensor_launches(bound, card_kind):
    lists = [v for _, v in bound if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)]
    if not lists:
        return 1
    tensors = max(len(l) for l in lists)
    if card_kind == "cpu":
        return tensors
    depth = min(5, max(1, len(lists)))
    chunks = sum(math.ceil(t.numel() / _MTA_CHUNK) for t in lists[0])
    return max(1, math.ceil(tensors / _MTA_TENSORS[depth]), math.ceil(chunks / _MTA_BLOCKS))


def _matmul_cost(name, bound, read, written):
    tensors = [v for a, v in bound if isinstance(v, torch.Tensor) and a.name in ("self", "mat1", "mat2", "batch1",
                                                                                 "batch2", "vec", "tensor", "mat")]
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::_addmm_activation"):
        a = _value(bound, "mat1", _value(bound, "self"))
        b = _value(bound, "mat2")
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        dims = (a.shape[0], a.shape[1], b.shape[1])
    elif name in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addbmm", "aten::addbmm_"):
        a = _value(bound, "batch1", _value(bound, "self"))
        b = _value(bound, "batch2", _value(bound, "mat2"))
        flops = 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        dims = (a.shape[1], a.shape[2], b.shape[2])
    else:  # matrix-vector and dot products: two FLOPs per element of the largest operand
        a = b = max(tensors, key=lambda t: t.numel())
        flops = 2.0 * a.numel()
        dims = (1,)
    dtype = _MATMUL_KEYS.get(a.dtype, "fp32")
    if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:  # what cuBLAS then runs
        dtype = "tf32"
    shape = f"{tuple(a.shape)}@{tuple(b.shape)}"
    return OpCost(name, GEMM, flops, read, written, 1, dtype, shape, min(dims))


def _attention_cost(name, bound, read, written, card_kind):
    backward = name.endswith("_backward")
    q, k = _value(bound, "query"), _value(bound, "key")
    *lead, s_q, d = q.shape
    s_k = k.shape[-2]
    pairs = math.prod(lead) * s_q * s_k
    causal = bool(_value(bound, "is_causal", False))
    if causal and s_q == s_k:  # masked tiles are skipped
        pairs = pairs * (s_q + 1) / (2 * s_q)
    flops = 4.0 * pairs * d * (2.5 if backward else 1.0)  # backward: 5 products against 2
    launches = (3 if backward else 1) if card_kind == "gpu" else 1
    return OpCost(name, ATTENTION, flops, read, written, launches, _MATMUL_KEYS.get(q.dtype, "fp32"),
                  f"{tuple(q.shape)}{' causal' if causal else ''}")


def _nested_linear_cost(name, args, card_kind, sm_count):
    """matta::nested_linear[_gelu] / matta::nested_linear_backward (see matta/ops/nested_linear.py);
    n_s = 0 is one stream alone (`linear`, `gelu_mlp`), whose Student terms vanish.
    GELU rides in the kernels' epilogues on a GPU (its outputs and inputs are bytes of the
    GEMM); on the CPU it is a pass of its own per stream."""
    if name in ("matta::nested_linear", "matta::nested_linear_gelu"):
        gelu = name == "matta::nested_linear_gelu"
        x_s, x_ta, weight, bias, s_weight, s_bias, n_s, m_s = args[:8]
        one_input = False if gelu else args[8]
        t, (n_ta, m_ta) = x_ta.shape[0], weight.shape
        shared = s_weight is None
        # One input and shared weights: the Student's outputs are a by-product of the TA's K-loop.
        student_free = one_input and shared and (card_kind == "gpu" or m_s == m_ta)
        flops = 2.0 * t * n_ta * m_ta + (0.0 if student_free else 2.0 * t * n_s * m_s)
        read = sum(tensor_bytes(u) for u in (x_ta, weight, bias, s_weight, s_bias) if u is not None)
        if not one_input:
            read += tensor_bytes(x_s)
        written = t * (n_ta + n_s) * x_ta.element_size() * (2 if gelu else 1)
        launches = 1 if card_kind == "gpu" else 2 + (2 if gelu else 0)
        element_flops = 0.0
        if gelu and card_kind != "gpu":
            read += t * (n_ta + n_s) * x_ta.element_size()
            element_flops = GELU_EXP_EQUIVALENTS * t * (n_ta + n_s)
        return OpCost(name, GEMM, flops, read, float(written), launches, _MATMUL_KEYS.get(weight.dtype, "fp32"),
                      f"T={t} W={n_ta}x{m_ta} S={n_s}x{m_s}{' +GELU' if gelu else ''}", min(t, n_ta, m_ta),
                      element_flops=element_flops)
    grad_s, grad_ta, x_s, x_ta, weight, s_weight, n_s, m_s, one_input, needs, gelu_s, gelu_ta, param_dtype = args
    gelu = gelu_ta is not None
    need_x_s, need_x_ta, need_w, need_b, need_ws, need_bs = needs
    t, (n_ta, m_ta) = grad_ta.shape[0], weight.shape
    size, param_size = grad_ta.element_size(), param_dtype.itemsize
    shared = s_weight is None
    big, small = 2.0 * t * n_ta * m_ta, 2.0 * t * n_s * m_s
    flops = launches = read = written = element_flops = 0.0
    if need_x_ta or need_x_s:  # one launch for both input gradients
        flops += (big if need_x_ta else 0.0) + (small if need_x_s or one_input else 0.0)
        read += t * (n_ta + n_s) * size + n_ta * m_ta * size + (0 if shared else n_s * m_s * size)
        written += t * ((m_ta if need_x_ta else 0) + (m_s if need_x_s else 0)) * size
        launches += 1 if card_kind == "gpu" else 1 + (need_x_s or one_input)
        if gelu:  # h read in the epilogue (on the CPU: a gelu_backward per stream)
            read += t * (m_ta + m_s) * size * (1 if card_kind == "gpu" else 2)
            written += 0 if card_kind == "gpu" else t * (m_ta + m_s) * size
            launches += 0 if card_kind == "gpu" else 2
            element_flops += 0.0 if card_kind == "gpu" else GELU_EXP_EQUIVALENTS * t * (m_ta + m_s)
    if need_w or need_ws:  # one launch for both weight gradients (and the bias sums)
        flops += (big if need_w else 0.0) + (small if shared or need_ws else 0.0)
        read += t * (n_ta + n_s + m_ta + (0 if one_input else m_s)) * size
        outputs = [(n_ta, m_ta)] if need_w else []
        if need_ws:
            outputs.append((n_s, m_s))
        written += sum(r * c for r, c in outputs) * (param_size if card_kind == "gpu" else size)
        written += (n_ta if need_b else 0) * 4 + (n_s if need_bs else 0) * 4
        launches += 1 if card_kind == "gpu" else 1 + len(outputs)
        if card_kind != "gpu" and param_size != size:  # the PyTorch path casts each weight gradient
            cast = sum(r * c for r, c in outputs)
            read, written, launches = read + cast * size, written + cast * param_size, launches + len(outputs)
        if card_kind == "gpu":
            from ..kernels.nested_linear import choose_split_k

            rows, cols = (n_ta, m_ta) if need_w else (n_s, m_s)
            split = choose_split_k(rows, cols, t, sm_count)
            if split > 1:  # fp32 partials written, then read by one reduction per output
                partial = split * sum(r * c for r, c in outputs) * 4
                written += partial
                read += partial
                launches += len(outputs) + (need_b or need_bs)
    # The fp32 bias sums cast to a 16-bit parameter's dtype (a GPU's kernel rounds them for
    # fp32 parameters in place); the PyTorch path rounds to 16 bits and casts back.
    casts = (need_b + need_bs) * ((param_size != 4) if card_kind == "gpu" else (size != 4) + (param_size != size))
    launches += casts
    return OpCost(name, GEMM, flops, read, written, int(launches), _MATMUL_KEYS.get(weight.dtype, "fp32"),
                  f"T={t} W={n_ta}x{m_ta} S={n_s}x{m_s}{' +GELU' if gelu else ''}", min(t, n_ta, m_ta),
                  element_flops=element_flops)


def _layer_norm_cost(name, args, card_kind, sm_count):
    """matta::layer_norm / matta::layer_norm_backward (see matta/ops/layer_norm.py): one pass
    over the rows each way, plus on a GPU the backward's fp32 partial sums of dweight and
    dbias (one row per program, kernels/layer_norm.py) and the launch that adds them up."""
    if name == "matta::layer_norm":
        x, residual, weight, bias, _, out_dtype = args
        rows, width = x.shape
        read = sum(tensor_bytes(t) for t in (x, residual, weight, bias) if t is not None)
        written = rows * width * out_dtype.itemsize + 8 * rows + (tensor_bytes(x) if residual is not None else 0)
        # The PyTorch path: the add, the norm, and casts to fp32 and to out_dtype where they differ.
        cpu_ops = 1 + (residual is not None) + (x.dtype != torch.float32) + (out_dtype != torch.float32)
        return OpCost(name, MEMORY, float(rows * width), read, float(written), 1 if card_kind == "gpu" else cpu_ops,
                      shape=str((rows, width)))
    dy, s, weight, bias, mean, rstd, skip_grad, residual_dtype, param_grads = args
    rows, width = s.shape
    read = sum(tensor_bytes(t) for t in (dy, s, weight, mean, rstd, skip_grad) if t is not None)
    written = tensor_bytes(s) + (rows * width * residual_dtype.itemsize if residual_dtype is not None else 0)
    if param_grads:
        written += 2 * width * weight.element_size()
    if card_kind == "gpu":
        launches = 1 + param_grads
        if param_grads:
            from ..kernels.layer_norm import LaunchOptions, backward_programs

            partials = 2 * backward_programs(rows, width, LaunchOptions(sm_count=sm_count)) * width * 4
            written += partials
            read += partials
    else:  # native_layer_norm_backward, the skip gradient's add, casts where dtypes differ
        launches = 1 + (skip_grad is not None) + (residual_dtype is not None) + (dy.dtype != torch.float32) \
            + (s.dtype != torch.float32)
    return OpCost(name, MEMORY, float(rows * width), read, float(written), int(launches), shape=str((rows, width)))


def op_cost(func, args, kwargs, out, card_kind: str, sm_count: int = 132) -> OpCost | None:
    """The cost of one op on a `card_kind` ("gpu" or "cpu") device; None when it is free."""
    schema = func._schema
    name = schema.name
    if name in FREE_OPS:
        return None
    if name.startswith("matta::nested_linear"):
        return _nested_linear_cost(name, args, card_kind, sm_count)
    if name.startswith("matta::layer_norm"):
        return _layer_norm_cost(name, args, card_kind, sm_count)
    custom = CUSTOM_COSTS.get(name)
    if custom is not None:
        return custom(args, kwargs, card_kind)
    if name.startswith("c10d::"):
        return _collective_cost(name, args)
    bound = _bound(schema, args, kwargs)
    read, written, elements = _reads_writes(name, bound, out)
    if name in _MATMULS:
        return _matmul_cost(name, bound, read, written)
    if "scaled_dot_product" in name and "attention" in name:
        return _attention_cost(name, bound, read, written, card_kind)
    launches = 1
    if name.startswith("aten::_foreach_") or name.startswith("aten::_fused_adam"):
        launches = _multi_tensor_launches(bound, card_kind)
        elements = sum(t.numel() for t in _tensors(args))
    elif card_kind == "gpu":
        launches = _GPU_LAUNCHES.get(name, 1)
    if name == "aten::_linalg_eigh":
        # Symmetric eigensolver with vectors, ~9 n^3 FLOPs (Golub & Van Loan), priced as matrix
        # work; LAPACK's and cuSOLVER's reductions run below the GEMM rate, so this underestimates.
        a = _tensors(args)[0]
        return OpCost(name, GEMM, 9.0 * a.numel() * a.shape[-1], read, written, launches,
                      _MATMUL_KEYS.get(a.dtype, "fp32"), str(tuple(a.shape)), a.shape[-1])
    shape = str(tuple(_tensors(args)[0].shape)) if _tensors(args) else ""
    if name in ("aten::gelu", "aten::gelu_backward") and _value(bound, "approximate") == "tanh":
        elements *= GELU_EXP_EQUIVALENTS
    return OpCost(name, MEMORY, float(elements), read, written, launches, shape=shape)


def _collective_cost(name, args) -> OpCost:
    """A c10d collective as an NCCL ring over the process group in its arguments: an
    all-gather sends (p-1)/p of its output from each rank in p-1 steps, an all-reduce twice
    that, a broadcast (pipelined) all of it; anything else is priced as a broadcast."""
    # The dispatcher passes the group boxed, as a ScriptObject.
    groups = [a for a in args if isinstance(a, torch.ScriptObject)]
    world = torch.distributed.ProcessGroup.unbox(groups[0]).size() if groups else 1
    tensors = _tensors(args)
    nbytes = sum(tensor_bytes(t) for t in (tensors[:1] if "allgather" in name else tensors))
    if world <= 1:
        wire, steps = 0.0, 0
    elif "allgather" in name:
        wire, steps = (world - 1) / world * nbytes, world - 1
    elif "allreduce" in name:
        wire, steps = 2 * (world - 1) / world * nbytes, 2 * (world - 1)
    else:
        wire, steps = nbytes, world - 1
    shape = str(tuple(tensors[0].shape)) if tensors else ""
    return OpCost(name, COLLECTIVE, 0.0, 0.0, 0.0, 1, shape=shape, wire=wire, net_steps=steps)


# Costs of the cost model's own stand-in ops (matta/costmodel/lowering.py): name -> function.
CUSTOM_COSTS: dict = {}
