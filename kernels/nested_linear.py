"""Fused nested Dense forward and backward (matta.ops.nested_linear holds the math).

All six GEMMs of a nested Dense layer (Student and TA; forward, input grad, weight grad)
have one shape: a main product `C = A @ B` (P x Q, reduction R) plus a Student product
restricted to a leading block (rows < P2, columns < Q2, reduction < R2) whose operands are
blocks of, or stand beside, the main ones. One kernel, `_nested_matmul_kernel`, computes
every output tile of both in one launch. A tile inside the Student block runs its reduction
in two phases: over [0, R2) it advances both products, loading each shared operand tile
once; over [R2, R) only the main one. How the Student product enters is `SUB_MODE`:

- SEPARATE: it has its own output C2 (y_s in the forward, dx_s with two inputs, the
  unshared Student's weight grad).
- ADD: it is added into C (the Student block of the shared dW; dx with one input and an
  unshared Student). With `FOLD` its A operand is added to A's tile before one product:
  valid when A2 is a block of A's coordinates and B2 is B (one-input dx and dW).
- PREFIX: C2 is C's accumulator after the first R2 steps (one-input forward: y_s is a
  partial sum of y_ta, so the Student costs no FLOPs at all).

Bias is added in the epilogue; bias gradients are the row sums of A (the kernel that
computes dW reads dy^T as A), computed by the programs of the first column block.
"""
import os

import torch
import triton
import triton.language as tl

from ..ops.backend import triton_interpreting
from ._compile_specs import CompileSpec, register_compile_spec

NONE, SEPARATE, ADD, PREFIX = 0, 1, 2, 3

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit: two warpgroups on the large tiles for
# Hopper's wgmma, smaller tiles for thin problems (small T, few output columns). A
# Student-block tile may stream four operands per stage and hold two accumulators, so
# 128x256 tiles spill and overflow shared memory (kernels/compile_check.py); fp32 tiles take
# twice the bytes, so their K step and pipeline depth are smaller to fit sm_80's 163 KiB.
_TILES = {
    2: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    4: [(128, 128, 32, 8, 2), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)],
}


def _gpu_configs(element_size):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _TILES[element_size]
    ]


def _configs():
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return _gpu_configs(2) + _gpu_configs(4)


def _configs_for_dtype(configs, named_args, **kwargs):
    """Autotune prune: the tile set of the operand width; the first only with MATTA_AUTOTUNE=0
    (GPU test runs, where tuning every new test shape would cost minutes)."""
    if triton_interpreting():
        return configs
    wanted = _gpu_configs(named_args["a_ptr"].element_size())
    keep = [c for c in configs if any(c.kwargs == w.kwargs and c.num_stages == w.num_stages for w in wanted)]
    return keep[:1] if os.environ.get("MATTA_AUTOTUNE", "1") == "0" else keep


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _load_operand(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST: tl.constexpr):
    # The interpreter computes bf16 arithmetic wrongly, so it gets fp32 operands; compiled
    # code keeps the input dtype for the tensor cores.
    tile = _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(ptr, value, rows, cols, stride_row, stride_col, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sums(a_ptr, stride_ap, stride_ar, rows, n_rows, n_red, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, n_red, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        total += tl.sum(_load_tile(a_ptr, rows, rr, stride_ap, stride_ar, n_rows, n_red).to(tl.float32), axis=1)
    return total


@triton.autotune(
    configs=_configs(),
    key=["P", "Q", "R", "P2", "Q2", "R2", "SUB_MODE", "FOLD", "SHARE_B"],
    prune_configs_by={"early_config_prune": _configs_for_dtype},
)
@triton.jit
def _nested_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, a2_ptr, b2_ptr, c2_ptr, bias2_ptr, sums_ptr, sums2_ptr,
    P, Q, R, P2, Q2, R2,
    stride_ap, stride_ar, stride_br, stride_bq, stride_cp, stride_cq,
    stride_a2p, stride_a2r, stride_b2r, stride_b2q, stride_c2p, stride_c2q,
    SUB_MODE: tl.constexpr, FOLD: tl.constexpr, SHARE_B: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, ROW_SUMS: tl.constexpr, ROW_SUMS2: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share their column blocks of B in L2.
    pid = tl.program_id(0)
    blocks_p = tl.cdiv(P, BLOCK_M)
    blocks_q = tl.cdiv(Q, BLOCK_N)
    group = pid // (GROUP_M * blocks_q)
    first_p = group * GROUP_M
    group_size = min(blocks_p - first_p, GROUP_M)
    pid_p = first_p + (pid % (GROUP_M * blocks_q)) % group_size
    pid_q = (pid % (GROUP_M * blocks_q)) // group_size

    rows = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    in_sub = (SUB_MODE != 0) & (pid_p * BLOCK_M < P2) & (pid_q * BLOCK_N < Q2)
    r_split = tl.where(in_sub, R2, 0)
    fold_here = (pid_q + 1) * BLOCK_N <= Q2

    # Phase 1, reduction [0, R2) of a Student-block tile: both products.
    for r0 in range(0, r_split, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        a = _load_operand(a_ptr, rows, rr, stride_ap, stride_ar, P, r_split, UPCAST)
        b = _load_operand(b_ptr, rr, cols, stride_br, stride_bq, r_split, Q, UPCAST)
        if SUB_MODE == 3:  # PREFIX
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            a2 = _load_operand(a2_ptr, rows, rr, stride_a2p, stride_a2r, P2, R2, UPCAST)
            if FOLD:
                if fold_here:
                    acc = tl.dot(a + a2, b, acc, input_precision=PRECISION)
                else:  # columns past Q2 in this tile must not see A2
                    acc = tl.dot(a2, tl.where(cols[None, :] < Q2, b, 0.0).to(b.dtype), acc, input_precision=PRECISION)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
            else:
                if SHARE_B:
                    b2 = b
                else:
                    b2 = _load_operand(b2_ptr, rr, cols, stride_b2r, stride_b2q, R2, Q2, UPCAST)
                if SUB_MODE == 1:  # SEPARATE
                    acc2 = tl.dot(a2, b2, acc2, input_precision=PRECISION)
                else:  # ADD
                    acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SUB_MODE == 3:
        acc2 = acc

    # Phase 2, the rest of the reduction: the main product only.
    for r0 in range(r_split, R, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        a = _load_operand(a_ptr, rows, rr, stride_ap, stride_ar, P, R, UPCAST)
        b = _load_operand(b_ptr, rr, cols, stride_br, stride_bq, R, Q, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < Q, other=0.0).to(tl.float32)[None, :]
    _store_tile(c_ptr, acc, rows, cols, stride_cp, stride_cq, P, Q)
    if (SUB_MODE == 1) | (SUB_MODE == 3):
        if in_sub:
            if HAS_BIAS2:
                acc2 += tl.load(bias2_ptr + cols, mask=cols < Q2, other=0.0).to(tl.float32)[None, :]
            _store_tile(c2_ptr, acc2, rows, cols, stride_c2p, stride_c2q, P2, Q2)

    if ROW_SUMS:
        if pid_q == 0:
            sums = _row_sums(a_ptr, stride_ap, stride_ar, rows, P, R, BLOCK_K, BLOCK_M)
            if ROW_SUMS2:
                sums2 = _row_sums(a2_ptr, stride_a2p, stride_a2r, rows, P2, R2, BLOCK_K, BLOCK_M)
                if SUB_MODE == 1:
                    tl.store(sums2_ptr + rows, sums2.to(sums2_ptr.dtype.element_ty), mask=rows < P2)
                else:
                    sums += tl.where(rows < P2, sums2, 0.0)
            tl.store(sums_ptr + rows, sums.to(sums_ptr.dtype.element_ty), mask=rows < P)


def _precision(dtype):
    # fp32 inputs follow PyTorch's own switch, so the kernel matches F.linear's precision.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def nested_matmul(a, b, out, *, bias=None, sub_mode=NONE, sub_shape=(0, 0, 0), a2=None, b2=None, out2=None,
                  bias2=None, fold=False, row_sums=None, row_sums2=None):
    """out = a @ b (+ bias) plus the Student product selected by `sub_mode` (module docstring).

    a (P, R), b (R, Q), out (P, Q); a2 (P2, R2), b2 (R2, Q2) (None: b itself), out2 (P2, Q2);
    row_sums (P,) receives a.sum(1) (plus a2's sums unless SEPARATE, where row_sums2 must be
    given too and receives them).
    Any strides; every tensor on one device.
    """
    P, R = a.shape
    Q = b.shape[1]
    P2, Q2, R2 = sub_shape if sub_mode != NONE else (0, 0, 0)
    share_b = b2 is None
    a2_ = a if a2 is None else a2
    b2_ = b if share_b else b2
    c2_ = out if out2 is None else out2
    dummy = out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]),)

    _nested_matmul_kernel[grid](
        a, b, out, dummy if bias is None else bias, a2_, b2_, c2_, dummy if bias2 is None else bias2,
        dummy if row_sums is None else row_sums, dummy if row_sums2 is None else row_sums2,
        P, Q, R, P2, Q2, R2,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1), c2_.stride(0), c2_.stride(1),
        SUB_MODE=sub_mode, FOLD=fold, SHARE_B=share_b,
        HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        ROW_SUMS=row_sums is not None, ROW_SUMS2=row_sums is not None and a2 is not None,
        PRECISION=_precision(a.dtype), UPCAST=triton_interpreting(),
    )


def _poisoned(shape, like):
    # Under the interpreter, outputs start as NaN so that an unwritten element fails tests.
    out = like.new_empty(shape)
    if triton_interpreting():
        out.fill_(float("nan"))
    return out


def nested_linear_forward(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input):
    t = x_ta.shape[0]
    n_ta, m_ta = weight.shape
    y_ta = _poisoned((t, n_ta), x_ta)
    y_s = _poisoned((t, n_s), x_ta)
    if t == 0:
        return y_s, y_ta
    w_t = weight.t()
    if student_weight is not None:
        b2 = student_weight.t()
        a2 = x_ta if one_input else x_s
        nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=SEPARATE, sub_shape=(t, n_s, m_s), a2=a2, b2=b2,
                      out2=y_s, bias2=student_bias)
    else:
        b_s = None if bias is None else bias[:n_s]
        if one_input:
            nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=PREFIX, sub_shape=(t, n_s, m_s), out2=y_s, bias2=b_s)
        else:
            nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=SEPARATE, sub_shape=(t, n_s, m_s), a2=x_s,
                          out2=y_s, bias2=b_s)
    return y_s, y_ta


def nested_linear_backward(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs):
    need_x_s, need_x_ta, need_w, need_b, need_ws, need_bs = needs
    t = grad_ta.shape[0]
    n_ta, m_ta = weight.shape
    shared = student_weight is None
    w_s = weight[:n_s, :m_s] if shared else student_weight
    if one_input:
        x_s = x_ta[:, :m_s]
    dx_s = _poisoned((t, m_s), grad_ta) if need_x_s else None
    dx_ta = _poisoned((t, m_ta), grad_ta) if need_x_ta else None
    dw = _poisoned((n_ta, m_ta), grad_ta) if need_w else None
    dws = _poisoned((n_s, m_s), grad_ta) if need_ws else None
    if t == 0:
        return (
            dx_s, dx_ta,
            None if dw is None else dw.zero_(),
            grad_ta.new_zeros(n_ta) if need_b else None,
            None if dws is None else dws.zero_(),
            grad_ta.new_zeros(n_s) if need_bs else None,
        )

    # Input gradients: dx_ta = dy_ta W (+ dy_s W_S into its first M_S columns with one input).
    if need_x_ta and one_input:
        if shared:
            nested_matmul(grad_ta, weight, dx_ta, sub_mode=ADD, sub_shape=(t, m_s, n_s), a2=grad_s, fold=True)
        else:
            nested_matmul(grad_ta, weight, dx_ta, sub_mode=ADD, sub_shape=(t, m_s, n_s), a2=grad_s, b2=w_s)
    elif need_x_ta and need_x_s:
        nested_matmul(grad_ta, weight, dx_ta, sub_mode=SEPARATE, sub_shape=(t, m_s, n_s), a2=grad_s,
                      b2=None if shared else w_s, out2=dx_s)
    elif need_x_ta:
        nested_matmul(grad_ta, weight, dx_ta)
    elif need_x_s:
        nested_matmul(grad_s, w_s, dx_s)

    # Weight gradients: the kernel reads dy^T as A, so its row sums are the bias gradients.
    db = grad_ta.new_empty(n_ta, dtype=torch.float32) if need_b else None
    dbs = grad_ta.new_empty(n_s, dtype=torch.float32) if need_bs else None
    if shared and need_w:
        nested_matmul(grad_ta.t(), x_ta, dw, sub_mode=ADD, sub_shape=(n_s, m_s, t), a2=grad_s.t(),
                      b2=None if one_input else x_s, fold=one_input, row_sums=db)
    elif need_w or need_ws:
        if need_w and need_ws:
            # One launch fills both bias gradients (or neither): scratch for an unneeded one.
            sums = (db, dbs) if need_b or need_bs else (None, None)
            if need_b != need_bs:
                sums = (grad_ta.new_empty(n_ta, dtype=torch.float32) if db is None else db,
                        grad_ta.new_empty(n_s, dtype=torch.float32) if dbs is None else dbs)
            nested_matmul(grad_ta.t(), x_ta, dw, sub_mode=SEPARATE, sub_shape=(n_s, m_s, t), a2=grad_s.t(), b2=x_s,
                          out2=dws, row_sums=sums[0], row_sums2=sums[1])
        elif need_w:
            nested_matmul(grad_ta.t(), x_ta, dw, row_sums=db)
        else:
            nested_matmul(grad_s.t(), x_s, dws, row_sums=dbs)
    if need_b and not need_w:
        db = grad_ta.sum(0, dtype=torch.float32)
        if shared:
            db[:n_s] += grad_s.sum(0, dtype=torch.float32)
    if need_bs and not need_ws:
        dbs = grad_s.sum(0, dtype=torch.float32)
    db = None if db is None else db.to(grad_ta.dtype)
    dbs = None if dbs is None else dbs.to(grad_ta.dtype)
    return dx_s, dx_ta, dw, db, dws, dbs


def _register_compile_specs():
    """The launchable variants with every tile set, specialised as the JIT specialises them on
    ordinary shapes: unit strides become constants, other sizes and strides multiples of 16."""
    pointers = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "a2_ptr", "b2_ptr", "c2_ptr", "bias2_ptr")
    sizes = ("P", "Q", "R", "P2", "Q2", "R2")
    strides = ("stride_ap", "stride_ar", "stride_br", "stride_bq", "stride_cp", "stride_cq",
               "stride_a2p", "stride_a2r", "stride_b2r", "stride_b2q", "stride_c2p", "stride_c2q")
    # Unit strides per kind of product: forward A = x, B = W^T; input grad A = dy, B = W;
    # weight grad A = dy^T, B = x. Outputs are row-major.
    unit = {
        "forward": ("stride_ar", "stride_br", "stride_cq", "stride_a2r", "stride_b2r", "stride_c2q"),
        "grad_input": ("stride_ar", "stride_bq", "stride_cq", "stride_a2r", "stride_b2q", "stride_c2q"),
        "grad_weight": ("stride_ap", "stride_bq", "stride_cq", "stride_a2p", "stride_b2q", "stride_c2q"),
    }
    add = dict(SUB_MODE=ADD, HAS_BIAS=False, HAS_BIAS2=False)
    separate = dict(SUB_MODE=SEPARATE, FOLD=False)
    variants = {  # name: (kind of product, flags)
        "forward_two_inputs": ("forward", dict(separate, SHARE_B=True, HAS_BIAS=True, HAS_BIAS2=True)),
        "forward_one_input": ("forward", dict(SUB_MODE=PREFIX, FOLD=False, SHARE_B=True, HAS_BIAS=True,
                                              HAS_BIAS2=True)),
        "forward_unshared": ("forward", dict(separate, SHARE_B=False, HAS_BIAS=True, HAS_BIAS2=True)),
        "grad_input_two_inputs": ("grad_input", dict(separate, SHARE_B=True, HAS_BIAS=False, HAS_BIAS2=False)),
        "grad_input_folded": ("grad_input", dict(add, FOLD=True, SHARE_B=True)),
        "grad_weight_shared": ("grad_weight", dict(add, FOLD=False, SHARE_B=False, ROW_SUMS=True, ROW_SUMS2=True)),
        "grad_weight_unshared": ("grad_weight", dict(separate, SHARE_B=False, HAS_BIAS=False, HAS_BIAS2=False,
                                                     ROW_SUMS=True, ROW_SUMS2=True)),
    }
    for dtype, element_size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        for name, (kind, flags) in variants.items():
            unit_strides = unit[kind]
            signature = {p: f"*{dtype}" for p in pointers}
            signature.update(sums_ptr="*fp32", sums2_ptr="*fp32")
            signature.update({n: "constexpr" if n in unit_strides else "i32" for n in sizes + strides})
            flags = {"ROW_SUMS": False, "ROW_SUMS2": False, **flags}
            for config in _gpu_configs(element_size):
                constexprs = {
                    **{n: 1 for n in unit_strides}, **flags, "PRECISION": "tf32" if dtype == "fp32" else "ieee",
                    "UPCAST": False, **config.kwargs,
                }
                signature.update({n: "constexpr" for n in constexprs})
                tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                register_compile_spec(CompileSpec(
                    name=f"nested_linear.{name}.{dtype}.{tiles}.w{config.num_warps}s{config.num_stages}",
                    fn=_nested_matmul_kernel.fn,
                    signature=dict(signature),
                    constexprs=constexprs,
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                    uses_dot=True,
                    divisible=pointers + ("sums_ptr", "sums2_ptr") + tuple(n for n in sizes + strides if n not in unit_strides),
                ))


_register_compile_specs()
