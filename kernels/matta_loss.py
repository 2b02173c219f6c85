"""Triton kernel of the MatTA loss pass: softmax, the three losses and the logit gradients.

One program per token row. Pass 1 walks the vocabulary once with an online softmax
(running max and rescaled sum) for the Student and TA logits (and, with a temperature,
for the softened ones too). Pass 2 walks it again, forms the probabilities, writes the
gradients in place over the logits and collects sum(q_TA * z_S) for the distillation term.
Loads may be bf16/fp16/fp32; all math is fp32 (the interpreter gets bf16 arithmetic wrong,
and the sums over 50k classes need it anyway).

Per row, with p = softmax(z), q = softmax(z / tau), y the target (one-hot or soft),
sy = sum(y), w_d the ramped distillation weight:
    L_S  = sy lse(z_S)  - sum y z_S           L_TA = sy lse(z_TA) - sum y z_TA
    L_D  = tau^2 (lse(z_S / tau) - sum q_TA z_S / tau)
    dz_S  = scale (w_s (sy p_S - y) + w_d tau (q_S - q_TA))
    dz_TA = scale  w_ta (sy p_TA - y)
Ignored rows get zero losses and zero gradients (tl.where, so garbage there cannot leak).
"""
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, register_compile_spec


@triton.jit
def _online_update(m, s, x):
    """One step of the online log-sum-exp: running max m and sum s of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def matta_loss_rows_kernel(
    zs_ptr,
    zta_ptr,
    y_ptr,
    out_ptr,
    n_cols,
    zs_stride,
    zta_stride,
    y_stride,
    ignore_index,
    w_s,
    w_ta,
    w_d,
    tau,
    scale,
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
        safe_label = tl.where(keep, label, 0)
        sum_y = 1.0
        y_zs = tl.load(zs_row + safe_label).to(tl.float32)
        y_zta = tl.load(zta_row + safe_label).to(tl.float32)
    else:
        y_row = y_ptr + row * y_stride
        sum_y = 0.0
        y_zs = 0.0
        y_zta = 0.0

    # Pass 1: the normalisers.
    m_s = neg_inf
    s_s = 0.0
    m_ta = neg_inf
    s_ta = 0.0
    m_st = neg_inf
    s_st = 0.0
    m_tat = neg_inf
    s_tat = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        zs = tl.load(zs_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        zta = tl.load(zta_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        m_s, s_s = _online_update(m_s, s_s, zs)
        m_ta, s_ta = _online_update(m_ta, s_ta, zta)
        if HAS_TAU:
            m_st, s_st = _online_update(m_st, s_st, zs * inv_tau)
            m_tat, s_tat = _online_update(m_tat, s_tat, zta * inv_tau)
        if not HARD:
            y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
            sum_y += tl.sum(y, axis=0)
            # masked lanes hold -inf logits and y = 0: keep 0 * -inf out of the sums
            y_zs += tl.sum(y * tl.where(mask, zs, 0.0), axis=0)
            y_zta += tl.sum(y * tl.where(mask, zta, 0.0), axis=0)
    lse_s = m_s + tl.log(s_s)
    lse_ta = m_ta + tl.log(s_ta)
    if HAS_TAU:
        lse_st = m_st + tl.log(s_st)
        lse_tat = m_tat + tl.log(s_tat)
    else:
        lse_st = lse_s
        lse_tat = lse_ta

    # Pass 2: probabilities, in-place gradients, and sum(q_TA z_S) for L_D.
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
            q_ta = tl.exp(zta * inv_tau - lse_tat)
        else:
            q_s = p_s
            q_ta = p_ta
        qta_zs += tl.sum(tl.where(mask, q_ta * zs, 0.0), axis=0)
        if WRITE_GRAD:
            if HARD:
                y = tl.where(offs == safe_label, 1.0, 0.0)
            else:
                y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
            g_s = coef_s * (sum_y * p_s - y) + coef_d * (q_s - q_ta)
            g_ta = coef_ta * (sum_y * p_ta - y)
            if HARD:
                g_s = tl.where(keep, g_s, 0.0)
                g_ta = tl.where(keep, g_ta, 0.0)
            tl.store(zs_row + offs, g_s.to(zs_ptr.dtype.element_ty), mask=mask)
            tl.store(zta_row + offs, g_ta.to(zta_ptr.dtype.element_ty), mask=mask)

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
# The interpreter gets a small block so tests on V ~ 100 still walk several blocks.
GPU_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 32
NUM_WARPS = 8


def matta_loss_rows(z_s, z_ta, target, out, *, hard, ignore_index, w_s, w_ta, w_d, temperature, scale,
                    write_grad, interpreting=False):
    """Launch one program per row.

    z_s, z_ta: (R, V) with unit column stride, fp32/bf16/fp16, overwritten with their
    gradients (times `scale`) when write_grad; target: (R,) int64 ids (hard) or (R, V) fp32
    probabilities; out: (R, 4) fp32 receiving [L_S, L_TA, L_D, lse_S + lse_TA] per row.
    """
    rows, n_cols = z_s.shape
    matta_loss_rows_kernel[(rows,)](
        z_s, z_ta, target, out,
        n_cols, z_s.stride(0), z_ta.stride(0), 0 if hard else target.stride(0),
        ignore_index, float(w_s), float(w_ta), float(w_d), float(temperature), float(scale),
        HARD=hard, HAS_TAU=temperature != 1.0, WRITE_GRAD=write_grad,
        BLOCK_V=INTERPRETER_BLOCK_V if interpreting else GPU_BLOCK_V,
        num_warps=1 if interpreting else NUM_WARPS,
    )


_SCALARS = {"n_cols": "i32", "zs_stride": "i32", "zta_stride": "i32", "y_stride": "i32",
            "ignore_index": "i32", "w_s": "fp32", "w_ta": "fp32", "w_d": "fp32", "tau": "fp32",
            "scale": "fp32"}

for _dtype in ("bf16", "fp16", "fp32"):
    for _hard in (True, False):
        for _has_tau in (False, True):
            for _write in (True, False):
                register_compile_spec(CompileSpec(
                    name=f"matta_loss_rows[{_dtype},hard={_hard},tau={_has_tau},grad={_write}]",
                    fn=matta_loss_rows_kernel,
                    signature={"zs_ptr": f"*{_dtype}", "zta_ptr": f"*{_dtype}",
                               "y_ptr": "*i64" if _hard else "*fp32", "out_ptr": "*fp32", **_SCALARS},
                    constexprs={"HARD": _hard, "HAS_TAU": _has_tau, "WRITE_GRAD": _write,
                                "BLOCK_V": GPU_BLOCK_V},
                    options={"num_warps": NUM_WARPS},
                ))
