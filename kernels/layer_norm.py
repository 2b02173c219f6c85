"""Fused residual add + LayerNorm, forward and backward (matta.ops.layer_norm holds the math).

Forward, one program per row, the whole row in one block of BLOCK >= d lanes:
    s = x + residual  (rounded to x's dtype and stored, when there is a residual)
    y = (s - mean) * rstd * weight + bias      mean, rstd in fp32, y stored in y's dtype
Every load is upcast to fp32 (the interpreter's bf16 arithmetic is wrong, and the row sums
want fp32 anyway). Per row, mean and rstd are stored for the backward (8 bytes a row), so
it reads s and dy once and recomputes nothing but xhat.

Backward, each of a fixed number of programs walks a contiguous run of rows:
    xhat = (s - mean) * rstd      g = weight * dy
    dx   = rstd (g - xhat mean(g xhat) - mean(g))  +  ds_skip   (the gradient that reaches s
           from elsewhere, the skip path, added here instead of by autograd in another pass)
dx is written in x's dtype, and again in the residual's dtype when that differs (under
autocast: an fp32 stream, a bf16 residual); with one dtype the op hands dx to both. Each
program keeps sum(dy xhat) and sum(dy) over its rows in fp32 registers and writes them as
one row of a (programs, d) partial buffer; `_param_grads_kernel` then sums the partial rows
in order 0, 1, ... into dweight and dbias: the same bits on every run, and no atomics (the
interpreter cannot do bf16 atomics anyway).

Launches: forward 1; backward 2 (rows, then the partial sums; 1 without parameter gradients).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, record_launch, register_compile_spec
from ._launches import count_launch

# Rows up to MAX_WIDTH features; BLOCK is the next power of two of d, at least MIN_BLOCK so
# that a handful of builds (1024, 2048, 4096, 8192) serves every width: lanes past d are
# masked, and rows narrower than 1024 are rare on a GPU (GPT-2 small is 768).
MIN_BLOCK = 1024
MAX_WIDTH = 8192
BLOCKS = (1024, 2048, 4096, 8192)
# The widest block whose backward holds its running dweight/dbias sums in registers.
HELD_SUMS_BLOCK = tl.constexpr(4096)
# Backward programs: one wave of what fits on an SM. Its builds take 56-98 registers a
# thread (compile_check), so about 24 warps are resident per SM: 6 programs of 4 warps at
# d <= 1024, down to 1 of the 16- and 32-warp builds.
RESIDENT_WARPS_PER_SM = 24
# Under the interpreter, few programs, so that each walks several rows (and one a partial run).
INTERPRETER_PROGRAMS = 3
# The partial-sum kernel: a program sums REDUCE_PARTS partial rows at a time over
# REDUCE_BLOCK columns, so d = 1024 spreads over 32 programs.
REDUCE_BLOCK = 32
REDUCE_PARTS = 64
MODEL_SM_COUNT = 132  # an H100's, where the launcher cannot ask the device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def num_warps(block: int) -> int:
    """8 values of a row a thread: 4 warps at 1024 lanes, 32 (the most) at 8192."""
    return block // 256


def block_for(width: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(width))


def serves(x_dtype, out_dtype, residual_dtype, weight_dtype, width) -> str | None:
    """None when the kernels serve this call, else why not (one phrase).

    Served: one dtype throughout, or fp32 rows and parameters written as 16-bit output with
    a residual in x's or the output's dtype (bf16/fp16 autocast of an fp32 residual stream)."""
    if width > MAX_WIDTH:
        return f"rows of {width} features (the kernels serve up to {MAX_WIDTH})"
    names = [_NAMES.get(d) for d in (x_dtype, out_dtype, weight_dtype)]
    if None in names or (residual_dtype is not None and residual_dtype not in _NAMES):
        return "a dtype other than fp32, bf16 and fp16"
    if weight_dtype != x_dtype:
        return f"weight dtype {weight_dtype} with rows of dtype {x_dtype}"
    if out_dtype != x_dtype and x_dtype != torch.float32:
        return f"{x_dtype} rows written as {out_dtype}"
    if residual_dtype is not None and residual_dtype not in (x_dtype, out_dtype):
        return f"a {residual_dtype} residual added to {x_dtype} rows written as {out_dtype}"
    return None


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """interpreting: under TRITON_INTERPRET=1 (outputs poisoned with NaN, few backward
    programs); sm_count: the GPU's SMs (backward programs); record: launch nothing and append
    each launch's `Launch` here (`enumerate_launches`, for compile_check)."""

    interpreting: bool = False
    sm_count: int = MODEL_SM_COUNT
    record: list | None = None


@triton.jit
def _forward_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    start = row * n_cols  # a scalar row offset, added before the lanes' 32-bit ones
    s = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Rounded to s's dtype before the statistics, as PyTorch normalises the stored sum.
        rounded = (s + tl.load(residual_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + start + cols, rounded, mask=mask)
        s = rounded.to(tl.float32)
    mean = tl.sum(s, axis=0) / n_cols
    centered = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * weight + bias
    tl.store(y_ptr + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _backward_kernel(dy_ptr, s_ptr, weight_ptr, mean_ptr, rstd_ptr, skip_grad_ptr, dx_ptr, dresidual_ptr,
                     dweight_parts_ptr, dbias_parts_ptr, n_rows, n_cols, rows_per_program,
                     HAS_SKIP_GRAD: tl.constexpr, WRITE_RESIDUAL_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    parts = program * n_cols + cols
    if BLOCK > HELD_SUMS_BLOCK:
        # Rows this wide keep the running sums in their partial rows (L2-resident, each
        # lane rereading what it wrote): held in registers beside a row they spill on sm_90.
        tl.store(dweight_parts_ptr + parts, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)
        tl.store(dbias_parts_ptr + parts, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)
    else:
        dweight = tl.zeros((BLOCK,), dtype=tl.float32)
        dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        # Lanes past d and rows past the last load 0, so they add nothing to the sums.
        row_mask = cols < tl.where(row < n_rows, n_cols, 0)
        start = row * n_cols  # a scalar row offset, added before the lanes' 32-bit ones
        in_bounds = tl.minimum(row, n_rows - 1)
        mean = tl.load(mean_ptr + in_bounds)
        rstd = tl.load(rstd_ptr + in_bounds)
        # In an order that ends each row vector's life early; the weight is loaded per row
        # (a cache hit after the first) rather than held across the loop.
        dy = tl.load(dy_ptr + start + cols, mask=row_mask, other=0.0).to(tl.float32)
        xhat = tl.where(row_mask, (tl.load(s_ptr + start + cols, mask=row_mask, other=0.0).to(tl.float32) - mean)
                        * rstd, 0.0)
        if BLOCK > HELD_SUMS_BLOCK:
            tl.store(dbias_parts_ptr + parts, tl.load(dbias_parts_ptr + parts, mask=mask) + dy, mask=mask)
            tl.store(dweight_parts_ptr + parts, tl.load(dweight_parts_ptr + parts, mask=mask) + dy * xhat, mask=mask)
        else:
            dbias += dy
            dweight += dy * xhat
        g = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) * dy
        mean_g_xhat = tl.sum(g * xhat, axis=0) / n_cols
        mean_g = tl.sum(g, axis=0) / n_cols
        dx = (g - (xhat * mean_g_xhat + mean_g)) * rstd
        if HAS_SKIP_GRAD:
            dx += tl.load(skip_grad_ptr + start + cols, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
        if WRITE_RESIDUAL_GRAD:
            tl.store(dresidual_ptr + start + cols, dx.to(dresidual_ptr.dtype.element_ty), mask=row_mask)
    if BLOCK <= HELD_SUMS_BLOCK:
        tl.store(dweight_parts_ptr + parts, dweight, mask=mask)
        tl.store(dbias_parts_ptr + parts, dbias, mask=mask)


@triton.jit(do_not_specialize=["n_parts"])
def _param_grads_kernel(dweight_parts_ptr, dbias_parts_ptr, dweight_ptr, dbias_ptr, n_parts, n_cols,
                        PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """dweight[j] = the sum over p of parts[p, j], PARTS rows a step (a fixed tree within a
    step, steps in order: the same bits every run); dbias likewise."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    dweight = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    for first in range(0, n_parts, PARTS):
        parts = first + tl.arange(0, PARTS)
        offs = parts[:, None] * n_cols + cols[None, :]
        mask = (parts[:, None] < n_parts) & col_mask[None, :]
        dweight += tl.sum(tl.load(dweight_parts_ptr + offs, mask=mask, other=0.0), axis=0)
        dbias += tl.sum(tl.load(dbias_parts_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(dweight_ptr + cols, dweight.to(dweight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(dbias_ptr + cols, dbias.to(dbias_ptr.dtype.element_ty), mask=col_mask)


def _poisoned(shape, like, dtype, options):
    # Under the interpreter, outputs start as NaN so that an unwritten element fails tests.
    out = like.new_empty(shape, dtype=dtype)
    if options.interpreting:
        out.fill_(float("nan"))
    return out


# The row counts the JIT would otherwise specialise to a constant when they are 1.
_NOT_SPECIALISED = ("n_rows", "rows_per_program", "n_parts")


def _launch(fn, grid, args, constexprs, options, name, unused=()):
    warps = num_warps(constexprs["BLOCK"]) if fn is not _param_grads_kernel else 4
    if options.record is not None:
        options.record.append(record_launch(fn, args, constexprs, unused=unused, do_not_specialize=_NOT_SPECIALISED,
                                            num_warps=warps))
        return
    count_launch(name)
    fn[grid](*args, **constexprs, num_warps=warps)


def backward_programs(rows: int, width: int, options: LaunchOptions) -> int:
    """How many programs (and partial rows of the parameter gradients) the backward runs."""
    per_sm = max(1, RESIDENT_WARPS_PER_SM // num_warps(block_for(width)))
    most = INTERPRETER_PROGRAMS if options.interpreting else per_sm * options.sm_count
    return max(1, min(rows, most))


def layer_norm_forward(x, residual, weight, bias, eps, out_dtype, options):
    """x (R, d) and residual (R, d) or None, contiguous; weight, bias (d,). Returns (s or an
    empty tensor without a residual, y in out_dtype, mean (R,), rstd (R,) fp32)."""
    rows, width = x.shape
    s = _poisoned((rows, width), x, x.dtype, options) if residual is not None else x.new_empty(0)
    y = _poisoned((rows, width), x, out_dtype, options)
    mean = _poisoned((rows,), x, torch.float32, options)
    rstd = _poisoned((rows,), x, torch.float32, options)
    if rows:
        has_residual = residual is not None
        args = (x, residual if has_residual else x, weight, bias, s if has_residual else y, y, mean, rstd,
                width, float(eps))
        _launch(_forward_kernel, (rows,), args, {"HAS_RESIDUAL": has_residual, "BLOCK": block_for(width)}, options,
                "layer_norm.forward", unused=() if has_residual else ("residual_ptr", "s_ptr"))
    return s, y, mean, rstd


def layer_norm_backward(dy, s, weight, mean, rstd, skip_grad, residual_dtype, param_grads, options):
    """dy (R, d) in y's dtype, s (R, d) the normalised rows, skip_grad (R, d) in s's dtype or
    None; residual_dtype: also write dx in this dtype (None: not). Returns (dx, dresidual or
    an empty tensor, dweight, dbias) (the last two empty unless param_grads)."""
    rows, width = s.shape
    dx = _poisoned((rows, width), s, s.dtype, options)
    write_residual = residual_dtype is not None
    dresidual = _poisoned((rows, width), s, residual_dtype, options) if write_residual else s.new_empty(0)
    dweight = _poisoned((width,), s, weight.dtype, options) if param_grads else s.new_empty(0)
    dbias = _poisoned((width,), s, weight.dtype, options) if param_grads else s.new_empty(0)
    if not rows:
        return dx, dresidual, dweight.zero_(), dbias.zero_()
    programs = backward_programs(rows, width, options)
    parts = [_poisoned((programs, width), s, torch.float32, options) for _ in range(2)]
    has_skip = skip_grad is not None
    args = (dy, s, weight, mean, rstd, skip_grad if has_skip else s, dx, dresidual if write_residual else dx, *parts,
            rows, width, triton.cdiv(rows, programs))
    unused = (() if has_skip else ("skip_grad_ptr",)) + (() if write_residual else ("dresidual_ptr",))
    _launch(_backward_kernel, (programs,), args, {"HAS_SKIP_GRAD": has_skip, "WRITE_RESIDUAL_GRAD": write_residual,
                                                  "BLOCK": block_for(width)}, options, "layer_norm.backward", unused)
    if param_grads:
        _launch(_param_grads_kernel, (triton.cdiv(width, REDUCE_BLOCK),), (*parts, dweight, dbias, programs, width),
                {"PARTS": REDUCE_PARTS, "BLOCK": REDUCE_BLOCK}, options, "layer_norm.param_grads")
    return dx, dresidual, dweight, dbias


def served_dtypes():
    """(x, y, residual or None) of every served call; weight and bias have x's dtype."""
    for x in DTYPES:
        for out in DTYPES if x == "fp32" else (x,):
            for residual in dict.fromkeys((None, x, out)):
                yield x, out, residual


def enumerate_launches() -> list:
    """Every configuration the launchers can launch on ordinary shapes (widths multiples of
    16): each served dtype set, with and without a residual, every block, with and without
    parameter gradients. Nothing runs: the tensors are on the meta device."""
    launches = []
    options = LaunchOptions(record=launches)
    rows = 4096
    for x_name, out_name, residual_name in served_dtypes():
        x_dtype, out_dtype = DTYPES[x_name], DTYPES[out_name]
        residual_dtype = None if residual_name is None else DTYPES[residual_name]
        for width in (MIN_BLOCK // 2, *BLOCKS):
            def meta(*shape, dtype=x_dtype):
                return torch.empty(shape, dtype=dtype, device="meta")

            residual = None if residual_dtype is None else meta(rows, width, dtype=residual_dtype)
            x, weight = meta(rows, width), meta(width)
            s, _, mean, rstd = layer_norm_forward(x, residual, weight, meta(width), 1e-5, out_dtype, options)
            if residual is None:
                s = x
            for param_grads in (False, True):
                layer_norm_backward(meta(rows, width, dtype=out_dtype), s, weight, mean, rstd,
                                    None if residual is None else meta(rows, width),
                                    None if residual_dtype in (None, x_dtype) else residual_dtype, param_grads,
                                    options)
    return launches


def _register_compile_specs():
    """One build per served dtype set and block, forward and backward, as the JIT
    specialises them on ordinary shapes (widths multiples of 16, so every row starts
    16-byte aligned); the partial-sum kernel per parameter dtype."""
    pointers_forward = ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "s_ptr", "y_ptr", "mean_ptr", "rstd_ptr")
    pointers_backward = ("dy_ptr", "s_ptr", "weight_ptr", "mean_ptr", "rstd_ptr", "skip_grad_ptr", "dx_ptr",
                         "dresidual_ptr", "dweight_parts_ptr", "dbias_parts_ptr")
    for x, out, residual in served_dtypes():
        has_residual = residual is not None
        write_residual = has_residual and residual != x
        tag = f"{x}->{out}" + (f",residual={residual}" if has_residual else "")
        for block in BLOCKS:
            options = {"num_warps": num_warps(block)}
            register_compile_spec(CompileSpec(
                name=f"layer_norm.forward[{tag}].{block}",
                fn=_forward_kernel,
                signature={"x_ptr": f"*{x}", "residual_ptr": f"*{residual or x}", "weight_ptr": f"*{x}",
                           "bias_ptr": f"*{x}", "s_ptr": f"*{x}", "y_ptr": f"*{out}", "mean_ptr": "*fp32",
                           "rstd_ptr": "*fp32", "n_cols": "i32", "eps": "fp32",
                           "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr"},
                constexprs={"HAS_RESIDUAL": has_residual, "BLOCK": block},
                options=options,
                divisible=pointers_forward + ("n_cols",),
            ))
            register_compile_spec(CompileSpec(
                name=f"layer_norm.backward[{tag}].{block}",
                fn=_backward_kernel,
                signature={"dy_ptr": f"*{out}", "s_ptr": f"*{x}", "weight_ptr": f"*{x}", "mean_ptr": "*fp32",
                           "rstd_ptr": "*fp32", "skip_grad_ptr": f"*{x}", "dx_ptr": f"*{x}",
                           "dresidual_ptr": f"*{residual if write_residual else x}", "dweight_parts_ptr": "*fp32",
                           "dbias_parts_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
                           "HAS_SKIP_GRAD": "constexpr", "WRITE_RESIDUAL_GRAD": "constexpr", "BLOCK": "constexpr"},
                constexprs={"HAS_SKIP_GRAD": has_residual, "WRITE_RESIDUAL_GRAD": write_residual, "BLOCK": block},
                options=options,
                divisible=pointers_backward + ("n_cols",),
            ))
    for weight in DTYPES:
        register_compile_spec(CompileSpec(
            name=f"layer_norm.param_grads[{weight}]",
            fn=_param_grads_kernel,
            signature={"dweight_parts_ptr": "*fp32", "dbias_parts_ptr": "*fp32", "dweight_ptr": f"*{weight}",
                       "dbias_ptr": f"*{weight}", "n_parts": "i32", "n_cols": "i32", "PARTS": "constexpr",
                       "BLOCK": "constexpr"},
            constexprs={"PARTS": REDUCE_PARTS, "BLOCK": REDUCE_BLOCK},
            options={"num_warps": 4},
            divisible=("dweight_parts_ptr", "dbias_parts_ptr", "dweight_ptr", "dbias_ptr", "n_cols"),
        ))


_register_compile_specs()
