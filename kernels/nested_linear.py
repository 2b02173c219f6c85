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

Gradients of fp32 parameters trained in 16 bits (autocast) are written in fp32 from the
kernel (`ROUND_TO`): each output is rounded to the 16-bit dtype first, so it holds the bits
of a 16-bit gradient cast up, without that 16-bit tensor or the pass that casts it.

GELU rides in the epilogue too (`GELU`, SEPARATE products or a plain one: the TA alone,
`n_s` = 0 in the launchers), so that an FFN's activation costs no pass of its own: GELU_OUT
stores the pre-activation h in C (C2) and gelu(h) in E (E2), for the next layer's input and
this layer's backward; GELU_GRAD multiplies the product by gelu'(h), h read from E (E2),
which turns the next layer's input gradient into this layer's output gradient. gelu is the
tanh form, gelu(h) = h sigmoid(2u) with u = sqrt(2/pi) (h + 0.044715 h^3), evaluated on h as
stored (rounded to C's dtype), so that forward and backward see one h.

Split-K. A weight gradient has few output tiles (a 1024 x 1024 dW is 64 tiles of 128 x 128
for an H100's 132 SMs) and a long reduction over tokens. When the tiles are fewer than two
per SM, the token range is cut into `split_k` slices of whole BLOCK_K steps; slice s writes
fp32 partial results into rows [s P, (s + 1) P) of a buffer, and `_split_k_reduce_kernel`
sums the slices in order 0, 1, ... into the output: the same bits on every run (no atomics).

Offsets are int32 unless an operand spans 2^31 elements or more (`INT64`, chosen per launch).
"""
import dataclasses
import itertools

import torch
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, record_launch, register_compile_spec
from ._launches import count_launch

NONE, SEPARATE, ADD, PREFIX = 0, 1, 2, 3
NO_GELU, GELU_OUT, GELU_GRAD = 0, 1, 2
GELU_LAUNCH_NAMES = {GELU_OUT: "nested_linear.matmul.gelu_out", GELU_GRAD: "nested_linear.matmul.gelu_grad"}
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}  # the 16-bit dtypes ROUND_TO takes

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per operand kind. 16-bit: two warpgroups on the
# large tiles for Hopper's wgmma, smaller tiles for thin problems. A Student-block tile may
# stream four operands per stage and hold two accumulators, so 128x256 tiles spill and
# overflow shared memory (kernels/compile_check.py); fp32 tiles take twice the bytes, so their
# K step and pipeline depth are smaller to fit sm_80's 163 KiB. Without TF32 (`ieee`) the dot
# runs on FMA units and holds its accumulators in registers, so only a tile that does not
# spill: 64 x 64, 8 warps, 2 stages (63-128 registers on sm_90 with triton 3.6 and 3.9; with
# 4 warps 3.6's two-input input gradient took 255 and spilled 8 bytes, with 3 stages 3.9's
# plain input gradient kept 8 bytes of stack). A 64 x 32 tile with 4 warps spilled 8-16 bytes
# in the one-input weight gradient (3.9) and the plain input gradient (both). fp32 without
# TF32 goes to cuBLAS unless the dispatch table says otherwise.
TILES = {
    "16-bit": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    "tf32": [(128, 128, 32, 8, 2), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)],
    "ieee": [(64, 64, 32, 8, 2)],
}
GROUP_M = 8
INTERPRETER_TILES = (32, 32, 32)  # the interpreter's default; MATTA_INTERPRET_TILES pins others

# Split-K is sized for the tile count at 128 x 128 (so the buffers do not depend on which
# config the autotuner picks) against two tiles per SM of the GPU (an H100 when there is none).
MODEL_SM_COUNT = 132
SPLIT_K_TILE = 128
MIN_TOKENS_PER_SPLIT = 512
MAX_SPLIT_K = 16
REDUCE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How the op layer wants the kernels launched.

    precision: `tl.dot`'s input precision for fp32 operands, "tf32" or "ieee" (16-bit ignore it).
    interpreting: the kernels run under TRITON_INTERPRET=1 (operands are upcast to fp32 there,
        because the interpreter's bf16 arithmetic is wrong, and outputs are poisoned with NaN).
    tiles: (BLOCK_M, BLOCK_N, BLOCK_K) to launch instead of autotuning; it must be a tile
        shape of `tile_configs` unless interpreting. None: autotune (interpreter: INTERPRETER_TILES).
    sm_count: the GPU's SM count, for the split-K decision.
    record: launch nothing and append each launch's `Launch` (what it compiles) here instead
        (`enumerate_launches`, for compile_check).
    """

    precision: str = "ieee"
    interpreting: bool = False
    tiles: tuple | None = None
    sm_count: int = MODEL_SM_COUNT
    record: list | None = None


def tile_configs(element_size, precision, gelu=NO_GELU, int64=False):
    """The (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) configs the autotuner may launch."""
    configs = TILES["16-bit"] if element_size == 2 else TILES[precision]
    if gelu != NO_GELU:
        # The GELU epilogue holds two accumulators and a tile of h or gelu(h). With fp32
        # outputs (TF32) 128-row tiles spill 8-88 bytes on sm_90 (16-bit outputs round the
        # Student's accumulator first and fit); 64-bit offsets spill 8 bytes at the largest
        # tile that fits without them, so they take the smallest left.
        if element_size == 4 and precision == "tf32":
            configs = [c for c in configs if c[0] == 64]
        if element_size == 2 and gelu == GELU_GRAD:  # triton 3.6 spills 32 bytes at 64 x 128
            configs = [c for c in configs if c[:2] != (64, 128)]
        if int64:
            configs = [min(configs, key=lambda c: (c[0] * c[1], c[0]))]
    return configs


def _as_config(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=warps,
                         num_stages=stages)


def _config_tuple(config):
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _all_configs():
    unique = dict.fromkeys(c for configs in TILES.values() for c in configs)
    return [_as_config(*c) for c in unique]


def _prune_configs(configs, named_args, **kwargs):
    """Autotune prune: the tile set of the operand kind."""
    wanted = tile_configs(named_args["a_ptr"].element_size(), kwargs["PRECISION"], kwargs["GELU"], kwargs["INT64"])
    return [c for c in configs if _config_tuple(c) in wanted]


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST: tl.constexpr):
    # UPCAST loads fp32: for sums, and for matrix operands under the interpreter, whose bf16
    # arithmetic is wrong (compiled code keeps the input dtype for the tensor cores).
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(ptr, value, rows, cols, stride_row, stride_col, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sums(a_ptr, stride_ap, stride_ar, rows, n_rows, lo, hi, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
              INT64: tl.constexpr):
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        if INT64:
            rr = rr.to(tl.int64)
        total += tl.sum(_load_tile(a_ptr, rows, rr, stride_ap, stride_ar, n_rows, hi, True), axis=1)
    return total


@triton.jit
def _rounded(x, ROUND_TO: tl.constexpr):
    """x (fp32) rounded to ROUND_TO and back, or x itself where ROUND_TO is None."""
    if ROUND_TO is not None:
        x = x.to(ROUND_TO).to(tl.float32)
    return x


@triton.jit
def _gelu_tanh(h):
    # 0.5 h (1 + tanh(u)) = h sigmoid(2u): no cancellation near h = 0. (sqrt(2/pi) = 0.79788...)
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    return h * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_tanh_grad(h):
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    s = tl.sigmoid(2.0 * u)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    return s + 2.0 * h * s * (1.0 - s) * du


@triton.jit
def _epilogue_store(c_ptr, e_ptr, acc, rows, cols, stride_cp, stride_cq, n_rows, n_cols, GELU: tl.constexpr):
    """Store one output tile, with the GELU epilogue (E has C's strides). The GELU modes
    round the product to C's dtype first, as the unfused ops do (PyTorch's gelu and its
    backward read the stored, rounded tensors), which also frees the fp32 accumulator."""
    if GELU == 0:
        _store_tile(c_ptr, acc, rows, cols, stride_cp, stride_cq, n_rows, n_cols)
    else:
        out = acc.to(c_ptr.dtype.element_ty)
        if GELU == 1:  # GELU_OUT: h to C, gelu(h) to E
            _store_tile(c_ptr, out, rows, cols, stride_cp, stride_cq, n_rows, n_cols)
            _store_tile(e_ptr, _gelu_tanh(out.to(tl.float32)), rows, cols, stride_cp, stride_cq, n_rows, n_cols)
        else:  # GELU_GRAD: (dy W) gelu'(h), h from E
            h = _load_tile(e_ptr, rows, cols, stride_cp, stride_cq, n_rows, n_cols, True)
            _store_tile(c_ptr, out.to(tl.float32) * _gelu_tanh_grad(h), rows, cols, stride_cp, stride_cq, n_rows,
                        n_cols)


AUTOTUNE_KEYS = ("key_p", "key_q", "key_r")  # never specialised: they only key the autotuner


@triton.jit(do_not_specialize=list(AUTOTUNE_KEYS))
def _nested_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, a2_ptr, b2_ptr, c2_ptr, bias2_ptr, sums_ptr, sums2_ptr, e_ptr, e2_ptr,
    P, Q, R, P2, Q2, R2,
    stride_ap, stride_ar, stride_br, stride_bq, stride_cp, stride_cq,
    stride_a2p, stride_a2r, stride_b2r, stride_b2q, stride_c2p, stride_c2q,
    SPLIT_K, key_p, key_q, key_r,
    SUB_MODE: tl.constexpr, FOLD: tl.constexpr, SHARE_B: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, ROW_SUMS: tl.constexpr, ROW_SUMS2: tl.constexpr,
    GELU: tl.constexpr, PRECISION: tl.constexpr, INTERPRETING: tl.constexpr, INT64: tl.constexpr,
    ROUND_TO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # key_p, key_q, key_r only key the autotuner (the sizes with the token count bucketed).
    # Grouped tile order: GROUP_M row blocks share their column blocks of B in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    blocks_p = tl.cdiv(P, BLOCK_M)
    blocks_q = tl.cdiv(Q, BLOCK_N)
    group = pid // (GROUP_M * blocks_q)
    first_p = group * GROUP_M
    group_size = min(blocks_p - first_p, GROUP_M)
    pid_p = first_p + (pid % (GROUP_M * blocks_q)) % group_size
    pid_q = (pid % (GROUP_M * blocks_q)) // group_size

    rows = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:  # an operand spans 2^31 elements: every offset product in 64 bits
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    in_sub = (SUB_MODE != 0) & (pid_p * BLOCK_M < P2) & (pid_q * BLOCK_N < Q2)
    r_split = tl.where(in_sub, R2, 0)
    fold_here = (pid_q + 1) * BLOCK_N <= Q2
    # This program's slice of the reduction: whole BLOCK_K steps, all of it without split-K.
    chunk = tl.cdiv(tl.cdiv(R, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, R)
    p1_end = tl.minimum(k_hi, r_split)

    # Phase 1, reduction [0, R2) of a Student-block tile: both products (a plain product,
    # SUB_MODE NONE, has none: compiled without it, it holds fewer registers).
    if SUB_MODE != 0:
        for r0 in range(k_lo, p1_end, BLOCK_K):
            rr = r0 + tl.arange(0, BLOCK_K)
            if INT64:
                rr = rr.to(tl.int64)
            a = _load_tile(a_ptr, rows, rr, stride_ap, stride_ar, P, p1_end, INTERPRETING)
            b = _load_tile(b_ptr, rr, cols, stride_br, stride_bq, p1_end, Q, INTERPRETING)
            if SUB_MODE == 3:  # PREFIX
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            else:
                a2 = _load_tile(a2_ptr, rows, rr, stride_a2p, stride_a2r, P2, p1_end, INTERPRETING)
                if FOLD:
                    if fold_here:
                        acc = tl.dot(a + a2, b, acc, input_precision=PRECISION)
                    else:  # columns past Q2 in this tile must not see A2
                        b_s = tl.where(cols[None, :] < Q2, b, 0.0).to(b.dtype)
                        acc = tl.dot(a2, b_s, acc, input_precision=PRECISION)
                        acc = tl.dot(a, b, acc, input_precision=PRECISION)
                else:
                    if SHARE_B:
                        b2 = b
                    else:
                        b2 = _load_tile(b2_ptr, rr, cols, stride_b2r, stride_b2q, p1_end, Q2, INTERPRETING)
                    if SUB_MODE == 1:  # SEPARATE
                        acc2 = tl.dot(a2, b2, acc2, input_precision=PRECISION)
                    else:  # ADD
                        acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SUB_MODE == 3:
        acc2 = acc

    # Phase 2, the rest of the slice: the main product only (masked at k_hi, where the next
    # slice starts).
    for r0 in range(tl.maximum(k_lo, r_split), k_hi, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        if INT64:
            rr = rr.to(tl.int64)
        a = _load_tile(a_ptr, rows, rr, stride_ap, stride_ar, P, k_hi, INTERPRETING)
        b = _load_tile(b_ptr, rr, cols, stride_br, stride_bq, k_hi, Q, INTERPRETING)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # With split-K, the outputs are slice `split` of the partial buffers.
    first_row = split * P
    first_row2 = split * P2
    if INT64:
        first_row = first_row.to(tl.int64)
        first_row2 = first_row2.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < Q, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    if GELU == 0:
        _store_tile(c_ptr + first_row * stride_cp, _rounded(acc, ROUND_TO), rows, cols, stride_cp, stride_cq, P, Q)
        if (SUB_MODE == 1) | (SUB_MODE == 3):
            if in_sub:
                if HAS_BIAS2:
                    acc2 += tl.load(bias2_ptr + cols, mask=cols < Q2, other=0.0).to(tl.float32)[None, :]
                _store_tile(c2_ptr + first_row2 * stride_c2p, _rounded(acc2, ROUND_TO), rows, cols, stride_c2p,
                            stride_c2q, P2, Q2)
    else:
        # SEPARATE, or NONE (one stream alone), without split-K. The Student's product is
        # rounded to its output dtype before the TA tile's epilogue: two fp32 accumulators
        # and a loaded tile of h spill on sm_90 (kernels/compile_check.py).
        if HAS_BIAS2:
            acc2 += tl.load(bias2_ptr + cols, mask=cols < Q2, other=0.0).to(tl.float32)[None, :]
        out2 = acc2.to(c2_ptr.dtype.element_ty)
        _epilogue_store(c_ptr, e_ptr, acc, rows, cols, stride_cp, stride_cq, P, Q, GELU)
        if SUB_MODE == 1:
            if in_sub:
                _epilogue_store(c2_ptr, e2_ptr, out2, rows, cols, stride_c2p, stride_c2q, P2, Q2, GELU)

    if ROW_SUMS:
        if pid_q == 0:
            sums = _row_sums(a_ptr, stride_ap, stride_ar, rows, P, k_lo, k_hi, BLOCK_K, BLOCK_M, INT64)
            if ROW_SUMS2:
                sums2 = _row_sums(a2_ptr, stride_a2p, stride_a2r, rows, P2, k_lo, tl.minimum(k_hi, R2),
                                  BLOCK_K, BLOCK_M, INT64)
                if SUB_MODE == 1:
                    tl.store(sums2_ptr + first_row2 + rows, _rounded(sums2, ROUND_TO).to(sums2_ptr.dtype.element_ty),
                             mask=rows < P2)
                else:
                    sums += tl.where(rows < P2, sums2, 0.0)
            tl.store(sums_ptr + first_row + rows, _rounded(sums, ROUND_TO).to(sums_ptr.dtype.element_ty),
                     mask=rows < P)


_nested_matmul_tuned = triton.autotune(
    configs=_all_configs(),
    key=["key_p", "key_q", "key_r", "SPLIT_K", "SUB_MODE", "FOLD", "SHARE_B", "GELU", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_nested_matmul_kernel)


@triton.jit
def _split_k_reduce_kernel(parts_ptr, out_ptr, n, SPLITS, ROUND_TO: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = parts[0, i] + parts[1, i] + ... in that order (parts: (SPLITS, n) fp32),
    rounded to ROUND_TO first unless it is None."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        total += tl.load(parts_ptr + s * n + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _rounded(total, ROUND_TO).to(out_ptr.dtype.element_ty), mask=mask)


def _split_k_reduce(parts, out, splits, round_to, options):
    """Sum `splits` equal slices of the flat fp32 `parts` into the contiguous `out`."""
    n = out.numel()
    constexprs = {"ROUND_TO": round_to, "BLOCK": REDUCE_BLOCK}
    if options.record is not None:
        options.record.append(record_launch(_split_k_reduce_kernel, (parts, out, n, splits), constexprs, num_warps=4))
        return
    count_launch("nested_linear.split_k_reduce")
    _split_k_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](parts, out, n, splits, **constexprs, num_warps=4)


def choose_split_k(p, q, r, sm_count):
    """Slices of the reduction for a (p x q, reduction r) product with fewer than two tiles per
    SM: the fewest that fill waves of one tile per SM at least 90% (every slice adds a partial
    tile to write and sum), else the fullest; each slice at least MIN_TOKENS_PER_SPLIT long,
    at most MAX_SPLIT_K."""
    tiles = triton.cdiv(p, SPLIT_K_TILE) * triton.cdiv(q, SPLIT_K_TILE)
    most = min(r // MIN_TOKENS_PER_SPLIT, MAX_SPLIT_K)
    if tiles >= 2 * sm_count or most < 2:
        return 1

    def wave_efficiency(splits):
        programs = tiles * splits
        return programs / (triton.cdiv(programs, sm_count) * sm_count)

    counts = range(1, most + 1)
    return next((s for s in counts if wave_efficiency(s) >= 0.9), max(counts, key=wave_efficiency))


def _max_offset(t):
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _pinned_launch_options(options, element_size, gelu, int64):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a launch that skips the autotuner, or None.
    Pinned tiles a launch kind cannot run (`tile_configs`) give way to its first config."""
    if options.tiles is None:
        return (*INTERPRETER_TILES, 4, 1) if options.interpreting else None
    tiles = tuple(options.tiles)
    configs = tile_configs(element_size, options.precision, gelu, int64)
    if all(c[:3] != tiles for c in configs) and any(c[:3] == tiles for c in tile_configs(element_size,
                                                                                         options.precision)):
        tiles = configs[0][:3]
    if options.interpreting:
        return (*tiles, 4, 1)
    return next(c for c in configs if c[:3] == tiles)


def nested_matmul(a, b, out, *, options, bias=None, sub_mode=NONE, sub_shape=(0, 0, 0), a2=None, b2=None,
                  out2=None, bias2=None, fold=False, row_sums=None, row_sums2=None, token_axis=0, split_k=1,
                  gelu=NO_GELU, gelu_out=None, gelu_out2=None, round_to=None):
    """out = a @ b (+ bias) plus the Student product selected by `sub_mode` (module docstring).

    a (P, R), b (R, Q), out (P, Q); a2 (P2, R2), b2 (R2, Q2) (None: b itself), out2 (P2, Q2);
    row_sums (P,) receives a.sum(1) (plus a2's sums unless SEPARATE, where row_sums2 must be
    given too and receives them). `token_axis` names which of P, Q, R (0, 1, 2) counts
    tokens: the autotuner keys on its bucket. `split_k` > 1 (no bias, no PREFIX) slices the
    reduction; the outputs must then be contiguous. `gelu` (SEPARATE or NONE, no split-K):
    with GELU_OUT, gelu_out (gelu_out2) receives gelu(out) (gelu(out2)); with GELU_GRAD they
    hold h, and out (out2) is multiplied by gelu'(h). They have the strides of out (out2).
    `round_to` (a 16-bit torch dtype; no GELU): out, out2 and the row sums are rounded to it
    before they are stored in their own (wider) dtypes. Any strides; every tensor on one device.
    """
    if round_to is not None and (round_to not in _TL_DTYPES or gelu != NO_GELU):
        raise ValueError(f"round_to must be a 16-bit dtype of a launch without GELU, got {round_to}")
    if gelu != NO_GELU:
        if sub_mode not in (NONE, SEPARATE) or split_k != 1:
            raise ValueError("the GELU epilogue needs a SEPARATE Student product or none, and no split-K")
        if gelu_out.stride() != out.stride() or (sub_mode == SEPARATE and gelu_out2.stride() != out2.stride()):
            raise ValueError("the GELU epilogue's tensors must have the strides of the outputs")
    P, R = a.shape
    Q = b.shape[1]
    P2, Q2, R2 = sub_shape if sub_mode != NONE else (0, 0, 0)
    share_b = b2 is None
    a2_ = a if a2 is None else a2
    b2_ = b if share_b else b2
    dummy = out
    if split_k > 1:  # fp32 partial buffers, summed into the outputs below
        targets = [(out, split_k * P * Q), (out2, split_k * P2 * Q2), (row_sums, split_k * P), (row_sums2, split_k * P2)]
        parts = [None if t is None else _poisoned((size,), out, torch.float32, options) for t, size in targets]
        c, c2, sums, sums2 = parts
        c = c.view(split_k * P, Q)
        c2 = None if c2 is None else c2.view(split_k * P2, Q2)
    else:
        c, c2, sums, sums2 = out, out2, row_sums, row_sums2
    c2_ = c if c2 is None else c2
    key = [P, Q, R]
    key[token_axis] = triton.next_power_of_2(key[token_axis])  # new batch sizes reuse the tuning
    int64 = any(_max_offset(t) >= 2**31 for t in (a, b, c, a2_, b2_, c2_))

    args = (
        a, b, c, dummy if bias is None else bias, a2_, b2_, c2_, dummy if bias2 is None else bias2,
        dummy if sums is None else sums, dummy if sums2 is None else sums2,
        dummy if gelu_out is None else gelu_out, dummy if gelu_out2 is None else gelu_out2,
        P, Q, R, P2, Q2, R2,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1), c2_.stride(0), c2_.stride(1),
        split_k, *key,
    )
    flags = dict(
        SUB_MODE=sub_mode, FOLD=fold, SHARE_B=share_b,
        HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        ROW_SUMS=row_sums is not None, ROW_SUMS2=row_sums is not None and a2 is not None, GELU=gelu,
        PRECISION=options.precision, INTERPRETING=options.interpreting, INT64=int64,
        ROUND_TO=None if split_k > 1 else _TL_DTYPES.get(round_to),  # split-K: the reduction rounds
    )

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), split_k)

    pinned = _pinned_launch_options(options, a.element_size(), gelu, int64)
    if options.record is not None:  # what each config the autotuner may pick would compile
        unused = [name for name, t in (("bias_ptr", bias), ("bias2_ptr", bias2), ("sums_ptr", sums),
                                       ("sums2_ptr", sums2), ("e_ptr", gelu_out), ("e2_ptr", gelu_out2)) if t is None]
        for m, n, k, warps, stages in [pinned] if pinned else tile_configs(a.element_size(), options.precision, gelu,
                                                                           int64):
            options.record.append(record_launch(
                _nested_matmul_kernel, args, {**flags, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M},
                unused=unused, do_not_specialize=AUTOTUNE_KEYS, num_warps=warps, num_stages=stages))
    elif pinned is None:
        count_launch("nested_linear.matmul")
        if gelu != NO_GELU:
            count_launch(GELU_LAUNCH_NAMES[gelu])
        _nested_matmul_tuned[grid](*args, **flags)
    else:
        m, n, k, warps, stages = pinned
        count_launch("nested_linear.matmul")
        if gelu != NO_GELU:
            count_launch(GELU_LAUNCH_NAMES[gelu])
        count_launch(f"nested_linear.matmul.{m}x{n}x{k}")
        _nested_matmul_kernel[grid](*args, **flags, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=GROUP_M,
                                    num_warps=warps, num_stages=stages)
    if split_k > 1:
        for target, part in zip((out, out2, row_sums, row_sums2), parts):
            if target is not None:
                _split_k_reduce(part, target, split_k, _TL_DTYPES.get(round_to), options)


def _poisoned(shape, like, dtype, options):
    # Under the interpreter, outputs start as NaN so that an unwritten element fails tests.
    out = like.new_empty(shape, dtype=dtype)
    if options.interpreting:
        out.fill_(float("nan"))
    return out


def nested_linear_forward(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input, options,
                          gelu=False):
    """(y_s, y_ta); with `gelu` (two inputs only) (y_s, y_ta, gelu(y_s), gelu(y_ta)). `n_s` = 0
    (two inputs, shared weight): the TA alone, one plain product; y_s is empty."""
    t = x_ta.shape[0]
    n_ta, m_ta = weight.shape
    y_ta = _poisoned((t, n_ta), x_ta, x_ta.dtype, options)
    y_s = _poisoned((t, n_s), x_ta, x_ta.dtype, options)
    if gelu:
        if one_input:
            raise ValueError("the GELU epilogue needs two inputs")
        a_s, a_ta = _poisoned((t, n_s), x_ta, x_ta.dtype, options), _poisoned((t, n_ta), x_ta, x_ta.dtype, options)
    if t == 0:
        return (y_s, y_ta, a_s, a_ta) if gelu else (y_s, y_ta)
    w_t = weight.t()
    launch = dict(options=options, token_axis=0)
    if gelu:
        launch.update(gelu=GELU_OUT, gelu_out=a_ta, gelu_out2=None if n_s == 0 else a_s)
    if n_s == 0:
        if one_input or student_weight is not None:
            raise ValueError("the TA alone (n_s = 0) takes two inputs and a shared weight")
        nested_matmul(x_ta, w_t, y_ta, bias=bias, **launch)
    elif student_weight is not None:
        b2 = student_weight.t()
        a2 = x_ta if one_input else x_s
        nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=SEPARATE, sub_shape=(t, n_s, m_s), a2=a2, b2=b2,
                      out2=y_s, bias2=student_bias, **launch)
    else:
        b_s = None if bias is None else bias[:n_s]
        if one_input:
            nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=PREFIX, sub_shape=(t, n_s, m_s), out2=y_s, bias2=b_s,
                          **launch)
        else:
            nested_matmul(x_ta, w_t, y_ta, bias=bias, sub_mode=SEPARATE, sub_shape=(t, n_s, m_s), a2=x_s,
                          out2=y_s, bias2=b_s, **launch)
    return (y_s, y_ta, a_s, a_ta) if gelu else (y_s, y_ta)


def nested_linear_backward(grad_s, grad_ta, x_s, x_ta, weight, student_weight, n_s, m_s, one_input, needs, options,
                           gelu_inputs=None, param_dtype=None):
    """The gradients (dx_s, dx_ta, dw, db, dws, dbs), None where not needed. `gelu_inputs`
    (h_s, h_ta), with both input gradients of a two-input layer: the input gradients come
    out multiplied by gelu'(h) (the gradients of the pre-activations before this layer).
    `param_dtype` (default: the weight's): the dtype of the parameter gradients; fp32 for a
    16-bit product gives the 16-bit gradients' bits in fp32 (module docstring)."""
    need_x_s, need_x_ta, need_w, need_b, need_ws, need_bs = needs
    alone = n_s == 0  # the TA alone: plain products (see nested_linear_forward)
    if alone and (one_input or student_weight is not None or need_x_s or need_ws or need_bs):
        raise ValueError("the TA alone (n_s = 0) takes two inputs, a shared weight and no Student gradients")
    if gelu_inputs is not None and (one_input or not (need_x_ta and (need_x_s or alone))):
        raise ValueError("the GELU epilogue needs both input gradients of a two-input layer")
    t = grad_ta.shape[0]
    n_ta, m_ta = weight.shape
    shared = student_weight is None
    w_s = weight[:n_s, :m_s] if shared else student_weight
    if one_input:
        x_s = x_ta[:, :m_s]

    def empty(*shape, dtype=grad_ta.dtype):
        return _poisoned(shape, grad_ta, dtype, options)

    param_dtype = weight.dtype if param_dtype is None else param_dtype
    round_to = grad_ta.dtype if param_dtype != grad_ta.dtype else None
    if round_to is not None and (param_dtype != torch.float32 or round_to not in _TL_DTYPES):
        raise ValueError(f"parameter gradients in {param_dtype} from a {grad_ta.dtype} product: only fp32 ones "
                         "of a 16-bit product are supported")
    dx_s = empty(t, m_s) if need_x_s else None
    dx_ta = empty(t, m_ta) if need_x_ta else None
    dw = empty(n_ta, m_ta, dtype=param_dtype) if need_w else None
    dws = empty(n_s, m_s, dtype=param_dtype) if need_ws else None
    if t == 0:
        return (
            dx_s, dx_ta,
            None if dw is None else dw.zero_(),
            grad_ta.new_zeros(n_ta, dtype=param_dtype) if need_b else None,
            None if dws is None else dws.zero_(),
            grad_ta.new_zeros(n_s, dtype=param_dtype) if need_bs else None,
        )

    # Input gradients: dx_ta = dy_ta W (+ dy_s W_S into its first M_S columns with one input).
    launch = dict(options=options, token_axis=0)
    if alone:
        if gelu_inputs is not None:
            launch.update(gelu=GELU_GRAD, gelu_out=gelu_inputs[1])
        if need_x_ta:
            nested_matmul(grad_ta, weight, dx_ta, **launch)
    elif need_x_ta and one_input:
        if shared:
            nested_matmul(grad_ta, weight, dx_ta, sub_mode=ADD, sub_shape=(t, m_s, n_s), a2=grad_s, fold=True, **launch)
        else:
            nested_matmul(grad_ta, weight, dx_ta, sub_mode=ADD, sub_shape=(t, m_s, n_s), a2=grad_s, b2=w_s, **launch)
    elif need_x_ta and need_x_s:
        if gelu_inputs is not None:
            launch.update(gelu=GELU_GRAD, gelu_out=gelu_inputs[1], gelu_out2=gelu_inputs[0])
        nested_matmul(grad_ta, weight, dx_ta, sub_mode=SEPARATE, sub_shape=(t, m_s, n_s), a2=grad_s,
                      b2=None if shared else w_s, out2=dx_s, **launch)
    elif need_x_ta:
        nested_matmul(grad_ta, weight, dx_ta, **launch)
    elif need_x_s:
        nested_matmul(grad_s, w_s, dx_s, **launch)

    # Weight gradients: the kernel reads dy^T as A, so its row sums are the bias gradients.
    # Tokens are the reduction, split when the output tiles cannot fill the GPU.
    db = empty(n_ta, dtype=torch.float32) if need_b else None
    dbs = empty(n_s, dtype=torch.float32) if need_bs else None
    rows, cols = (n_ta, m_ta) if need_w or alone else (n_s, m_s)
    launch = dict(options=options, token_axis=2, split_k=choose_split_k(rows, cols, t, options.sm_count),
                  round_to=round_to)
    if alone:
        if need_w:
            nested_matmul(grad_ta.t(), x_ta, dw, row_sums=db, **launch)
    elif shared and need_w:
        nested_matmul(grad_ta.t(), x_ta, dw, sub_mode=ADD, sub_shape=(n_s, m_s, t), a2=grad_s.t(),
                      b2=None if one_input else x_s, fold=one_input, row_sums=db, **launch)
    elif need_w or need_ws:
        if need_w and need_ws:
            # One launch fills both bias gradients (or neither): scratch for an unneeded one.
            sums = (db, dbs) if need_b or need_bs else (None, None)
            if need_b != need_bs:
                sums = (empty(n_ta, dtype=torch.float32) if db is None else db,
                        empty(n_s, dtype=torch.float32) if dbs is None else dbs)
            nested_matmul(grad_ta.t(), x_ta, dw, sub_mode=SEPARATE, sub_shape=(n_s, m_s, t), a2=grad_s.t(), b2=x_s,
                          out2=dws, row_sums=sums[0], row_sums2=sums[1], **launch)
        elif need_w:
            nested_matmul(grad_ta.t(), x_ta, dw, row_sums=db, **launch)
        else:
            nested_matmul(grad_s.t(), x_s, dws, row_sums=dbs, **launch)
    # The kernel's fp32 bias sums: rounded already where the parameters are fp32 (round_to).
    if need_b and not need_w:
        db = grad_ta.sum(0, dtype=torch.float32)
        if shared and not alone:
            db[:n_s] += grad_s.sum(0, dtype=torch.float32)
        db = db.to(grad_ta.dtype)
    if need_bs and not need_ws:
        dbs = grad_s.sum(0, dtype=torch.float32).to(grad_ta.dtype)
    db = None if db is None else db.to(param_dtype)
    dbs = None if dbs is None else dbs.to(param_dtype)
    return dx_s, dx_ta, dw, db, dws, dbs


def enumerate_launches() -> list:
    """Every configuration the launchers above can launch on ordinary shapes (sizes and strides
    multiples of 16, 32-bit offsets), as `Launch`es: the forward and backward of every layer
    kind (shared or unshared Student, one or two inputs, with and without each bias), every set
    of gradients the op can ask for, with and without split-K, in every operand kind (16-bit
    ones also with fp32 parameter gradients), each with every tile config the autotuner may
    pick. Nothing runs: the tensors are on the meta device and the launches are only recorded."""
    t, n_s, n_ta, m_s, m_ta = 4096, 128, 256, 64, 192
    launches = []
    for dtype_name, element_size, precision in _KINDS:
        def meta(*shape, dtype=_TORCH_DTYPES[dtype_name]):
            return torch.empty(shape, dtype=dtype, device="meta")

        param_dtypes = (None, torch.float32) if element_size == 2 else (None,)

        for sm_count in (1, 10**6):  # split-K never, and wherever the token count allows it
            options = LaunchOptions(precision=precision, sm_count=sm_count, record=launches)
            for shared, one_input, has_bias, has_student_bias in itertools.product((True, False), repeat=4):
                if shared and has_student_bias:
                    continue  # a shared Student's bias is bias[:N_S]
                weight, x_ta = meta(n_ta, m_ta), meta(t, m_ta)
                x_s = x_ta if one_input else meta(t, m_s)
                bias = meta(n_ta) if has_bias else None
                student_weight = None if shared else meta(n_s, m_s)
                student_bias = meta(n_s) if has_student_bias else None
                for gelu in (False, True) if not one_input else (False,):
                    nested_linear_forward(x_s, x_ta, weight, bias, student_weight, student_bias, n_s, m_s, one_input,
                                          options, gelu=gelu)
                possible = (not one_input, True, True, has_bias, not shared, has_student_bias)  # as the op asks
                for needs in itertools.product((False, True), repeat=6):
                    if any(need and not can for need, can in zip(needs, possible)):
                        continue
                    gelu_inputs = (None, (x_s, x_ta)) if needs[0] and needs[1] else (None,)
                    for gelu, param_dtype in itertools.product(gelu_inputs, param_dtypes):
                        # gelu: an FFN's second layer, given its inputs' pre-activations
                        nested_linear_backward(meta(t, n_s), meta(t, n_ta), x_s, x_ta, weight, student_weight, n_s,
                                               m_s, one_input, needs, options, gelu_inputs=gelu,
                                               param_dtype=param_dtype)
            for has_bias in (False, True):  # the TA alone (n_s = 0): an FFN of one stream
                weight, x_ta, empty = meta(n_ta, m_ta), meta(t, m_ta), meta(t, 0)
                bias = meta(n_ta) if has_bias else None
                for gelu in (False, True):
                    nested_linear_forward(empty, x_ta, weight, bias, None, None, 0, 0, False, options, gelu=gelu)
                for need_x, need_w in itertools.product((False, True), repeat=2):
                    needs = (False, need_x, need_w, has_bias, False, False)
                    for gelu, param_dtype in itertools.product((None, (empty, x_ta)) if need_x else (None,),
                                                               param_dtypes):
                        nested_linear_backward(empty, meta(t, n_ta), empty, x_ta, weight, None, 0, 0, False, needs,
                                               options, gelu_inputs=gelu, param_dtype=param_dtype)
    return launches


# Operand kinds: (Triton dtype, element size, precision of tl.dot).
_KINDS = (("bf16", 2, "ieee"), ("fp16", 2, "ieee"), ("fp32", 4, "tf32"), ("fp32", 4, "ieee"))
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _register_compile_specs():
    """The launchable variants with every tile set, specialised as the JIT specialises them on
    ordinary shapes: unit strides and a split count of 1 become constants, other sizes and
    strides multiples of 16. Weight gradients are built with and without split-K, 64-bit
    offsets with the largest tile; 16-bit ones also with fp32 outputs (`ROUND_TO`) where
    split-K is off (its partial sums are fp32 either way, and its reduction rounds). Each
    variant is built with its biases and row sums: the
    launches without them are the same code less its epilogue (`CompileSpec.epilogue_flags`).
    `enumerate_launches` lists what the launchers launch; compile_check fails on any launch
    no spec covers."""
    pointers = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "a2_ptr", "b2_ptr", "c2_ptr", "bias2_ptr", "e_ptr", "e2_ptr")
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
    plain = dict(SUB_MODE=NONE, FOLD=False, SHARE_B=True, HAS_BIAS=False, HAS_BIAS2=False)
    variants = {  # name: (kind of product, flags); every path of nested_linear_forward/backward
        "forward_two_inputs": ("forward", dict(separate, SHARE_B=True, HAS_BIAS=True, HAS_BIAS2=True)),
        "forward_two_inputs_gelu": ("forward", dict(separate, SHARE_B=True, HAS_BIAS=True, HAS_BIAS2=True,
                                                    GELU=GELU_OUT)),
        "forward_unshared_gelu": ("forward", dict(separate, SHARE_B=False, HAS_BIAS=True, HAS_BIAS2=True,
                                                  GELU=GELU_OUT)),
        "grad_input_two_inputs_gelu": ("grad_input", dict(separate, SHARE_B=True, HAS_BIAS=False, HAS_BIAS2=False,
                                                          GELU=GELU_GRAD)),
        "grad_input_two_inputs_unshared_gelu": ("grad_input", dict(separate, SHARE_B=False, HAS_BIAS=False,
                                                                   HAS_BIAS2=False, GELU=GELU_GRAD)),
        "forward_alone": ("forward", dict(plain, HAS_BIAS=True)),  # the TA alone (n_s = 0)
        "forward_alone_gelu": ("forward", dict(plain, HAS_BIAS=True, GELU=GELU_OUT)),
        "grad_input_alone_gelu": ("grad_input", dict(plain, GELU=GELU_GRAD)),
        "forward_one_input": ("forward", dict(SUB_MODE=PREFIX, FOLD=False, SHARE_B=True, HAS_BIAS=True,
                                              HAS_BIAS2=True)),
        "forward_unshared": ("forward", dict(separate, SHARE_B=False, HAS_BIAS=True, HAS_BIAS2=True)),
        "grad_input_two_inputs": ("grad_input", dict(separate, SHARE_B=True, HAS_BIAS=False, HAS_BIAS2=False)),
        "grad_input_two_inputs_unshared": ("grad_input", dict(separate, SHARE_B=False, HAS_BIAS=False,
                                                              HAS_BIAS2=False)),
        "grad_input_folded": ("grad_input", dict(add, FOLD=True, SHARE_B=True)),
        "grad_input_one_input_unshared": ("grad_input", dict(add, FOLD=False, SHARE_B=False)),
        "grad_input_plain": ("grad_input", plain),  # one stream's input gradient alone
        "grad_weight_shared": ("grad_weight", dict(add, FOLD=False, SHARE_B=False, ROW_SUMS=True, ROW_SUMS2=True)),
        "grad_weight_shared_one_input": ("grad_weight", dict(add, FOLD=True, SHARE_B=True, ROW_SUMS=True,
                                                             ROW_SUMS2=True)),
        "grad_weight_unshared": ("grad_weight", dict(separate, SHARE_B=False, HAS_BIAS=False, HAS_BIAS2=False,
                                                     ROW_SUMS=True, ROW_SUMS2=True)),
        "grad_weight_plain": ("grad_weight", dict(plain, ROW_SUMS=True)),  # one weight's gradient alone
    }
    for dtype, element_size, precision in _KINDS:
        for name, (kind, flags) in variants.items():
            gelu = flags.get("GELU", NO_GELU)
            # 64-bit offsets: the first tile they launch with, of the default kinds (fp16
            # builds bf16's code; fp32 without TF32 is off the default path).
            int64_kind = dtype != "fp16" and precision == ("tf32" if dtype == "fp32" else "ieee")
            fp32_grads = (False, True) if kind == "grad_weight" and element_size == 2 else (False,)
            splits = (False, True) if kind == "grad_weight" else (False,)
            for split, fp32_out in itertools.product(splits, fp32_grads):
                if split and fp32_out:
                    continue
                round_to = _TL_DTYPES[_TORCH_DTYPES[dtype]] if fp32_out else None
                for int64 in (False, True) if int64_kind else (False,):
                    configs = tile_configs(element_size, precision, gelu, int64)
                    for config in configs[:1] if int64 else configs:
                        _register_nested_matmul_spec(
                            name + ("_split_k" if split else "") + ("_fp32_grads" if fp32_out else ""), dtype,
                            precision, config, flags, unit[kind], pointers, sizes, strides, split, int64, round_to)
    reduce_kinds = [(out, None) for out in ("bf16", "fp16", "fp32")] + [("fp32", r) for r in ("bf16", "fp16")]
    for out, rounded in reduce_kinds:
        register_compile_spec(CompileSpec(
            name=f"nested_linear.split_k_reduce.{out}" + (f".rounded_{rounded}" if rounded else ""),
            fn=_split_k_reduce_kernel,
            signature={"parts_ptr": "*fp32", "out_ptr": f"*{out}", "n": "i32", "SPLITS": "i32",
                       "ROUND_TO": "constexpr", "BLOCK": "constexpr"},
            constexprs={"ROUND_TO": _TL_DTYPES[_TORCH_DTYPES[rounded]] if rounded else None, "BLOCK": REDUCE_BLOCK},
            options={"num_warps": 4},
            divisible=("parts_ptr", "out_ptr", "n"),
        ))


def _register_nested_matmul_spec(name, dtype, precision, config, flags, unit_strides, pointers, sizes, strides,
                                 split, int64, round_to):
    m, n, k, warps, stages = config
    signature = {p: f"*{dtype}" for p in pointers}
    signature.update(sums_ptr="*fp32", sums2_ptr="*fp32", key_p="i32", key_q="i32", key_r="i32")
    if split or round_to is not None:  # fp32 partial buffers, or fp32 parameter gradients
        signature.update(c_ptr="*fp32", c2_ptr="*fp32")
    signature.update({a: "constexpr" if a in unit_strides else "i32" for a in sizes + strides})
    signature["SPLIT_K"] = "i32" if split else "constexpr"
    constexprs = {
        **{a: 1 for a in unit_strides}, "ROW_SUMS": False, "ROW_SUMS2": False, "GELU": NO_GELU, **flags,
        "PRECISION": precision, "INTERPRETING": False, "INT64": int64, "ROUND_TO": round_to,
        "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M,
    }
    if not split:
        constexprs["SPLIT_K"] = 1
    signature.update({a: "constexpr" for a in constexprs})
    kind = "tf32" if precision == "tf32" else dtype
    register_compile_spec(CompileSpec(
        name=f"nested_linear.{name}.{kind}.{m}x{n}x{k}.w{warps}s{stages}{'.int64' if int64 else ''}",
        fn=_nested_matmul_kernel,
        signature=signature,
        constexprs=constexprs,
        options={"num_warps": warps, "num_stages": stages},
        uses_dot=precision == "tf32" or dtype != "fp32",  # an ieee fp32 dot runs on FMA units
        divisible=pointers + ("sums_ptr", "sums2_ptr") + tuple(a for a in sizes + strides if a not in unit_strides),
        epilogue_flags=("HAS_BIAS", "HAS_BIAS2", "ROW_SUMS", "ROW_SUMS2"),
    ))


_register_compile_specs()
