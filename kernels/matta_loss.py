"""Triton kernel of the MatTA loss pass: softmax, the three losses and the logit gradients.

One program per token row. Pass 1 walks the vocabulary once with an online softmax
(running max and rescaled sum) for the Student and TA logits (and, with a temperature,
for the softened ones too). With gradients, pass 2 walks it again, forms the probabilities,
writes the gradients in place over the logits and collects sum(q_TA * z_S) for the
distillation term; without, pass 1 collects that sum online too (rescaled like the sums),
so a no-grad call reads the logits once. Loads may be bf16/fp16/fp32; all math is fp32 (the
interpreter gets bf16 arithmetic wrong, and the sums over 50k classes need it anyway).

Per row, with p = softmax(z), q = softmax(z / tau), y the target (one-hot or soft),
sy = sum(y), w_d the ramped distillation weight and `scale` read from device memory (so
the caller never needs its value on the host):
    L_S  = sy lse(z_S)  - sum y z_S           L_TA = sy lse(z_TA) - sum y z_TA
    L_D  = tau^2 (lse(z_S / tau) - sum q_TA z_S / tau)
    dz_S  = scale (w_s (sy p_S - y) + w_d tau (q_S - q_TA))
    dz_TA = scale  w_ta (sy p_TA - y)
Ignored rows get zero losses and zero gradients (tl.where, so garbage there cannot leak).
A class id outside [0, V) is never used as an address (the row's results are meaningless
and the op reports it); soft targets may have any strides, a broadcast row included.
"""
import torch
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, register_compile_spec
from ._launches import count_launch


@triton.jit
def matta_loss_rows_kernel(
    zs_ptr,
    zta_ptr,
    y_ptr,
    out_ptr,
    scale_ptr,
    n_cols,
    zs_stride,
    zta_stride,
    y_stride,
    y_col_stride,
    ignore_index,
    w_s,
    w_ta,
    w_d,
    tau,
    HARD: tl.constexpr,
    HAS_TAU: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zta_row = zta_ptr + row * zta_stride
    cols = tl.arange(0, BLOCK_V)
    inv_tau = 1.0 / tau
    neg_inf = float("-inf")

    if HARD:
        label = tl.load(y_ptr + row).to(tl.int32)
        keep = label != ignore_index
        safe_label = tl.where(keep & (label >= 0) & (label < n_cols), label, 0)
        sum_y = 1.0
        y_zs = tl.load(zs_row + safe_label).to(tl.float32)
        y_zta = tl.load(zta_row + safe_label).to(tl.float32)
    else:
        y_row = y_ptr + row * y_stride
        sum_y = 0.0
        y_zs = 0.0
        y_zta = 0.0

    # Pass 1: the normalisers, by online log-sum-exp: per logit row a running max m and sum
    # s of exp(z - m), rescaled by exp(m_old - m_new) when a block raises the max. Without
    # gradients also acc_d = sum exp(z_TA / tau - m_q) z_S, rescaled the same way, so that
    # sum q_TA z_S = acc_d / s_q. (Written out, not as a @triton.jit helper: the interpreter
    # re-patches the language on every helper call, which doubled the tests' run time.)
    m_s = neg_inf
    s_s = 0.0
    m_ta = neg_inf
    s_ta = 0.0
    m_st = neg_inf
    s_st = 0.0
    m_q = neg_inf
    s_q = 0.0
    acc_d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        zs = tl.load(zs_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        zta = tl.load(zta_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        if not HARD:
            y = tl.load(y_row + offs * y_col_stride, mask=mask, other=0.0).to(tl.float32)
            sum_y += tl.sum(y, axis=0)
            y_zs += tl.sum(y * tl.where(mask, zs, 0.0), axis=0)
            y_zta += tl.sum(y * tl.where(mask, zta, 0.0), axis=0)
        m_new = tl.maximum(m_s, tl.max(zs, axis=0))
        s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs - m_new), axis=0)
        m_s = m_new
        if HAS_TAU or WRITE_GRAD:
            m_new = tl.maximum(m_ta, tl.max(zta, axis=0))
            s_ta = s_ta * tl.exp(m_ta - m_new) + tl.sum(tl.exp(zta - m_new), axis=0)
            m_ta = m_new
        if HAS_TAU:
            m_new = tl.maximum(m_st, tl.max(zs * inv_tau, axis=0))
            s_st = s_st * tl.exp(m_st - m_new) + tl.sum(tl.exp(zs * inv_tau - m_new), axis=0)
            m_st = m_new
        if HAS_TAU or not WRITE_GRAD:  # q_TA = p_TA when tau = 1, with its sums kept here
            zq = zta * inv_tau if HAS_TAU else zta
            m_new = tl.maximum(m_q, tl.max(zq, axis=0))
            rescale = tl.exp(m_q - m_new)
            e = tl.exp(zq - m_new)
            s_q = s_q * rescale + tl.sum(e, axis=0)
            if not WRITE_GRAD:  # masked lanes: e = 0 times a finite stand-in for z_S
                acc_d = acc_d * rescale + tl.sum(e * tl.where(mask, zs, 0.0), axis=0)
            m_q = m_new
    if not (HAS_TAU or WRITE_GRAD):
        m_ta = m_q
        s_ta = s_q
    lse_s = m_s + tl.log(s_s)
    lse_ta = m_ta + tl.log(s_ta)
    if HAS_TAU:
        lse_st = m_st + tl.log(s_st)
        lse_q = m_q + tl.log(s_q)
    else:
        lse_st = lse_s
        lse_q = lse_ta
    if WRITE_GRAD:
        # Pass 2: probabilities, in-place gradients, and sum(q_TA z_S) for L_D.
        scale = tl.load(scale_ptr)
        coef_s = w_s * scale
        coef_ta = w_ta * scale
        coef_d = w_d * tau * scale
        qta_zs = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            zs = tl.load(zs_row + offs, mask=mask, other=0.0).to(tl.float32)
            zta = tl.load(zta_row + offs, mask=mask, other=0.0).to(tl.float32)
            p_s = tl.exp(zs - lse_s)
            p_ta = tl.exp(zta - lse_ta)
            if HAS_TAU:
                q_s = tl.exp(zs * inv_tau - lse_st)
                q_ta = tl.exp(zta * inv_tau - lse_q)
            else:
                q_s = p_s
                q_ta = p_ta
            qta_zs += tl.sum(tl.where(mask, q_ta * zs, 0.0), axis=0)
            if HARD:
                y = tl.where(offs == safe_label, 1.0, 0.0)
            else:
                y = tl.load(y_row + offs * y_col_stride, mask=mask, other=0.0).to(tl.float32)
            g_s = coef_s * (sum_y * p_s - y) + coef_d * (q_s - q_ta)
            g_ta = coef_ta * (sum_y * p_ta - y)
            if HARD:
                g_s = tl.where(keep, g_s, 0.0)
                g_ta = tl.where(keep, g_ta, 0.0)
            tl.store(zs_row + offs, g_s.to(zs_ptr.dtype.element_ty), mask=mask)
            tl.store(zta_row + offs, g_ta.to(zta_ptr.dtype.element_ty), mask=mask)
    else:
        qta_zs = acc_d / s_q

    loss_s = sum_y * lse_s - y_zs
    loss_ta = sum_y * lse_ta - y_zta
    loss_d = tau * tau * (lse_st - qta_zs * inv_tau)
    if HARD:
        loss_s = tl.where(keep, loss_s, 0.0)
        loss_ta = tl.where(keep, loss_ta, 0.0)
        loss_d = tl.where(keep, loss_d, 0.0)
    out_row = out_ptr + row * 4
    tl.store(out_row + 0, loss_s)
    tl.store(out_row + 1, loss_ta)
    tl.store(out_row + 2, loss_d)
    # Unmasked: lets the caller see non-finite logits in any row, ignored or not.
    tl.store(out_row + 3, lse_s + lse_ta)


# One block size on GPU: rows are 32k-50k classes long, and masking covers small vocabularies.
# The interpreter gets a small block by default so tests on V ~ 100 still walk several
# blocks; the caller may pass the GPU's block to test what a GPU runs.
GPU_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 32
NUM_WARPS = 8
_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def launch_options(dtype: str, hard: bool, has_tau: bool, write_grad: bool) -> dict:
    """num_warps, and for fp32 rows with hard targets, a temperature and the gradient, leave to
    use a thread's every register (.maxnreg 255): triton 3.6's ptxas caps that build at 128
    registers (two blocks per SM) and spills 8 bytes on sm_90; with the cap lifted it takes
    183 (3.9's takes 176 unasked, 203 with it; one block of 8 warps per SM either way).
    16 warps instead make other fp32 builds spill on 3.6, which then caps them at 64."""
    lift = dtype == "fp32" and hard and has_tau and write_grad
    return {"num_warps": NUM_WARPS, **({"maxnreg": 255} if lift else {})}


def matta_loss_rows(z_s, z_ta, target, out, scale, *, hard, ignore_index, w_s, w_ta, w_d, temperature,
                    write_grad, interpreting=False, block_v=None):
    """Launch one program per row.

    z_s, z_ta: (R, V) with unit column stride, fp32/bf16/fp16, overwritten with their
    gradients (times `scale`) when write_grad; target: (R,) int64 ids (hard) or (R, V) fp32
    probabilities (any strides); out: (R, 4) fp32 receiving [L_S, L_TA, L_D, lse_S + lse_TA]
    per row; scale: a 1-element fp32 tensor on the device. block_v: the vocabulary block
    (default: GPU_BLOCK_V, or INTERPRETER_BLOCK_V when interpreting).
    """
    count_launch("matta_loss_rows")
    rows, n_cols = z_s.shape
    if block_v is None:
        block_v = INTERPRETER_BLOCK_V if interpreting else GPU_BLOCK_V
    matta_loss_rows_kernel[(rows,)](
        z_s, z_ta, target, out, scale,
        n_cols, z_s.stride(0), z_ta.stride(0), 0 if hard else target.stride(0), 1 if hard else target.stride(1),
        ignore_index, float(w_s), float(w_ta), float(w_d), float(temperature),
        HARD=hard, HAS_TAU=temperature != 1.0, WRITE_GRAD=write_grad, BLOCK_V=block_v,
        **({"num_warps": 1} if interpreting else
           launch_options(_TRITON_DTYPES[z_s.dtype], hard, temperature != 1.0, write_grad)),
    )


_SCALARS = {"n_cols": "i32", "zs_stride": "i32", "zta_stride": "i32", "y_stride": "i32",
            "ignore_index": "i32", "w_s": "fp32", "w_ta": "fp32", "w_d": "fp32", "tau": "fp32"}

# Soft targets come with unit column stride (which the JIT specialises to the constant 1,
# as hard targets always pass) or any other (a broadcast row has stride 0).
for _dtype in ("bf16", "fp16", "fp32"):
    for _hard, _unit_cols in ((True, True), (False, True), (False, False)):
        for _has_tau in (False, True):
            for _write in (True, False):
                register_compile_spec(CompileSpec(
                    name=f"matta_loss_rows[{_dtype},hard={_hard},tau={_has_tau},grad={_write}"
                         f"{'' if _unit_cols else ',y_col_stride=any'}]",
                    fn=matta_loss_rows_kernel,
                    signature={"zs_ptr": f"*{_dtype}", "zta_ptr": f"*{_dtype}",
                               "y_ptr": "*i64" if _hard else "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32",
                               **_SCALARS, "y_col_stride": "constexpr" if _unit_cols else "i32"},
                    constexprs={"HARD": _hard, "HAS_TAU": _has_tau, "WRITE_GRAD": _write,
                                "BLOCK_V": GPU_BLOCK_V, **({"y_col_stride": 1} if _unit_cols else {})},
                    options=launch_options(_dtype, _hard, _has_tau, _write),
                ))
