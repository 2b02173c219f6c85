"""Coupled Newton iteration for the inverse p-th root of small SPD matrices, one program each.

For a batch of (n, n) matrices with n <= 128, a program takes one matrix at a time and runs
every iteration of it without leaving the kernel (Guo & Higham's coupled iteration):

    X_0 = z^(1/p) I,  M_0 = z A                       (z = (p+1) / (2 lambda_max estimate))
    T_k = ((p+1) I - M_k) / p,  X_{k+1} = X_k T_k,  M_{k+1} = T_k^p M_k

M_k -> I and X_k -> A^(-1/p). A program stops when ||M - I||_F reaches the tolerance, stops
improving, or after `max_iterations`; it keeps the best iterate. Matrices are padded to
BLOCK x BLOCK (M = I on the padding), so the padding stays fixed and never touches the real
block.

Registers cannot hold the iterates: with three-pass TF32 (`tf32x3`, about fp32 accuracy on
tensor cores, which the iteration needs) two 128 x 128 fp32 matrices plus a product's
operands took all 255 registers and spilled kilobytes. So X, M and the powers of T live in
a per-program scratch buffer (four BLOCK x BLOCK fp32 slots, resident in L1/L2), and every
product is computed one BLOCK_M-row panel at a time with a K loop over BLOCK_K-wide slices:
only one panel's accumulator and one slice of each operand are ever in registers. T is never
stored: it is formed from M as M's slices are loaded. Each phase ends with a CTA barrier, so
the next phase reads what every thread wrote; a product may overwrite its left operand,
because a panel's rows are read (barrier) before they are written. Programs loop over the
batch (a persistent grid), so the scratch is sized by programs, not by matrices.
The launcher checks nothing (matta.ops does).
"""
import torch
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, register_compile_spec
from ._launches import count_launch

# Roots with a kernel: p is a power of two, so T^p is log2(p) squarings.
KERNEL_ROOTS = (2, 4)
MAX_KERNEL_DIM = 128
SCRATCH_SLOTS = 4  # X, and M with the two buffers of T's powers, in rotation
BLOCK_M = 64
BLOCK_K = 16
NUM_WARPS = 8
NUM_STAGES = 2


@triton.jit
def _product(dst, a_src, b_src, A_IS_T: tl.constexpr, B_IS_T: tl.constexpr, RESIDUAL: tl.constexpr,
             ROOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst = f(A) @ g(B) for BLOCK x BLOCK row-major scratch matrices, where f / g form
    T = ((p + 1) I - M) / p from M when flagged. Returns ||dst - I||_F^2 when RESIDUAL
    (else 0). dst may be a_src."""
    panel_rows = tl.arange(0, BLOCK_M)[:, None]
    slice_cols = tl.arange(0, BLOCK_K)[None, :]
    slice_rows = tl.arange(0, BLOCK_K)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    a_offsets = panel_rows * BLOCK + slice_cols
    b_offsets = slice_rows * BLOCK + cols
    b_diagonal = cols - slice_rows  # == k on the diagonal of the slice starting at row k
    total = 0.0
    for i in range(0, BLOCK, BLOCK_M):
        a_diagonal = panel_rows + i - slice_cols  # == k on the diagonal of the slice at column k
        acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
        for k in range(0, BLOCK, BLOCK_K):
            a = tl.load(a_src + i * BLOCK + k + a_offsets)
            if A_IS_T:
                a = (tl.where(a_diagonal == k, ROOT + 1.0, 0.0) - a) * (1.0 / ROOT)
            b = tl.load(b_src + k * BLOCK + b_offsets)
            if B_IS_T:
                b = (tl.where(b_diagonal == k, ROOT + 1.0, 0.0) - b) * (1.0 / ROOT)
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        rows = i + panel_rows
        if RESIDUAL:
            diff = acc - tl.where(rows == cols, 1.0, 0.0)
            total += tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        tl.debug_barrier()  # every thread has read these rows of a_src before any is overwritten
        tl.store(dst + rows * BLOCK + cols, acc)
    tl.debug_barrier()  # the next phase reads what every thread wrote
    return total


@triton.jit
def newton_inverse_root_kernel(
    a_ptr, z_ptr, x_ptr, residual_ptr, iterations_ptr, scratch_ptr,
    batch, n, max_iterations, tolerance,
    ROOT: tl.constexpr, SQUARINGS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = BLOCK * BLOCK
    # SCRATCH_SLOTS = 4 slots per program: X in slot 0; slots 1-3 rotate M and T's powers.
    x_buf = scratch_ptr + pid.to(tl.int64) * 4 * slot
    panel_rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    for matrix in range(pid, batch, tl.num_programs(0)):
        offset = tl.cast(matrix, tl.int64) * n * n
        z = tl.load(z_ptr + matrix).to(tl.float32)
        x_0 = tl.exp(tl.log(z) / ROOT)
        m_slot = 0
        squares = 0.0
        for i in range(0, BLOCK, BLOCK_M):
            rows = i + panel_rows
            inside = (rows < n) & (cols < n)
            a = tl.load(a_ptr + offset + rows * n + cols, mask=inside, other=0.0).to(tl.float32)
            m = a * z + tl.where((rows == cols) & (rows >= n), 1.0, 0.0)
            diff = m - tl.where(rows == cols, 1.0, 0.0)
            squares += tl.sum(tl.sum(diff * diff, axis=1), axis=0)
            tl.store(x_buf + slot + rows * BLOCK + cols, m)
            tl.store(x_buf + rows * BLOCK + cols, tl.where(rows == cols, x_0, 0.0))
        tl.debug_barrier()
        residual = tl.sqrt(squares)
        iterations = 0
        going = residual > tolerance
        while going & (iterations < max_iterations):
            m_buf = x_buf + slot * (1 + m_slot)
            # T^p by squarings into the two free slots, alternately; then M_next = T^p M over it.
            power = x_buf + slot * (1 + (m_slot + 1) % 3)
            _product(power, m_buf, m_buf, True, True, False, ROOT, BLOCK, BLOCK_M, BLOCK_K)
            for s in tl.static_range(1, SQUARINGS):
                square = x_buf + slot * (1 + (m_slot + 1 + s % 2) % 3)
                _product(square, power, power, False, False, False, ROOT, BLOCK, BLOCK_M, BLOCK_K)
                power = square
            squares = _product(power, power, m_buf, False, False, True, ROOT, BLOCK, BLOCK_M, BLOCK_K)
            residual_next = tl.sqrt(squares)
            # NaN compares False, so a blown-up step is never taken.
            better = residual_next < residual
            if better:
                _product(x_buf, x_buf, m_buf, False, True, False, ROOT, BLOCK, BLOCK_M, BLOCK_K)
                m_slot = (m_slot + 1 + (SQUARINGS - 1) % 2) % 3
            # In the quadratic phase, a step that does not halve the residual means fp32 noise.
            slow = (residual < 1e-2) & (residual_next > 0.5 * residual)
            going = better & (residual_next > tolerance) & (~slow)
            residual = tl.where(better, residual_next, residual)
            iterations += better.to(tl.int32)

        for i in range(0, BLOCK, BLOCK_M):
            rows = i + panel_rows
            x = tl.load(x_buf + rows * BLOCK + cols)
            tl.store(x_ptr + offset + rows * n + cols, x, mask=(rows < n) & (cols < n))
        tl.store(residual_ptr + matrix, residual)
        tl.store(iterations_ptr + matrix, iterations)
        tl.debug_barrier()  # the next matrix overwrites the scratch this one just read


def block_for(n):
    return max(64, triton.next_power_of_2(n))


# On a GPU two programs per SM (a program's scratch is 4 x 64 KiB at block 128); the
# interpreter runs two, so that tests see a program take several matrices in turn.
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 2


def newton_inverse_root(a, z, root, max_iterations, tolerance, x=None, interpreting=False):
    """Launch on a (B, n, n) float32 contiguous batch `a` (already + eps I) and scales `z` (B,).

    Writes X into `x` when given (a (B, n, n) float32 contiguous buffer), else a new one.
    Returns (X (B, n, n) float32, residual (B,) float32, iterations (B,) int32).
    """
    batch, n, _ = a.shape
    block = block_for(n)
    x = torch.empty_like(a) if x is None else x
    residual = torch.empty(batch, device=a.device, dtype=torch.float32)
    iterations = torch.empty(batch, device=a.device, dtype=torch.int32)
    if batch:
        count_launch("newton_inverse_root")
        if interpreting:
            programs = INTERPRETER_PROGRAMS
        else:
            programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(a.device).multi_processor_count
        programs = min(batch, programs)
        scratch = torch.empty(programs, SCRATCH_SLOTS, block, block, device=a.device, dtype=torch.float32)
        newton_inverse_root_kernel[(programs,)](
            a, z, x, residual, iterations, scratch, batch, n, max_iterations, tolerance,
            ROOT=root, SQUARINGS=root.bit_length() - 1, BLOCK=block, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return x, residual, iterations


for _root in KERNEL_ROOTS:
    for _block in (64, 128):
        register_compile_spec(CompileSpec(
            name=f"newton_inverse_root_p{_root}_b{_block}",
            fn=newton_inverse_root_kernel,
            signature={
                "a_ptr": "*fp32", "z_ptr": "*fp32", "x_ptr": "*fp32", "residual_ptr": "*fp32",
                "iterations_ptr": "*i32", "scratch_ptr": "*fp32", "batch": "i32", "n": "i32",
                "max_iterations": "i32", "tolerance": "fp32",
            },
            constexprs={"ROOT": _root, "SQUARINGS": _root.bit_length() - 1, "BLOCK": _block,
                        "BLOCK_M": BLOCK_M, "BLOCK_K": BLOCK_K},
            options={"num_warps": NUM_WARPS, "num_stages": NUM_STAGES},
            divisible=("a_ptr", "x_ptr", "scratch_ptr"),
            uses_dot=True,
        ))
