"""Coupled Newton iteration for the inverse p-th root of small SPD matrices, one program each.

For a batch of (n, n) matrices with n <= 128, each program loads one whole matrix into
registers and runs every iteration on chip (Guo & Higham's coupled iteration):

    X_0 = z^(1/p) I,  M_0 = z A                       (z = (p+1) / (2 lambda_max estimate))
    T_k = ((p+1) I - M_k) / p,  X_{k+1} = X_k T_k,  M_{k+1} = T_k^p M_k

M_k -> I and X_k -> A^(-1/p). A program stops when ||M - I||_F reaches the tolerance, stops
improving, or after `max_iterations`; it keeps the best iterate. Padding rows/columns
(n < BLOCK) start with M = I there, so they stay fixed and never touch the real block.

Products use `input_precision="tf32x3"`: tensor cores (wgmma on Hopper) at about fp32
accuracy, which the iteration needs. The launcher checks nothing (matta.ops does).
"""
import torch
import triton
import triton.language as tl

from ._compile_specs import CompileSpec, register_compile_spec

# Roots with a kernel: p is a power of two, so T^p is log2(p) squarings.
KERNEL_ROOTS = (2, 4)
MAX_KERNEL_DIM = 128


@triton.jit
def newton_inverse_root_kernel(
    a_ptr, z_ptr, x_ptr, residual_ptr, iterations_ptr,
    n, max_iterations, tolerance,
    ROOT: tl.constexpr, SQUARINGS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    inside = (rows < n) & (cols < n)
    offsets = pid.to(tl.int64) * n * n + rows * n + cols
    a = tl.load(a_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + pid).to(tl.float32)

    eye = tl.where(rows == cols, 1.0, 0.0)
    m = a * z + tl.where((rows == cols) & (rows >= n), 1.0, 0.0)
    x = eye * tl.exp(tl.log(z) / ROOT)
    diff = m - eye
    residual = tl.sqrt(tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    iterations = 0
    going = residual > tolerance
    while going & (iterations < max_iterations):
        t = ((ROOT + 1.0) * eye - m) / ROOT
        x_next = tl.dot(x, t, input_precision="tf32x3")
        t_power = t
        for _ in tl.static_range(SQUARINGS):
            t_power = tl.dot(t_power, t_power, input_precision="tf32x3")
        m_next = tl.dot(t_power, m, input_precision="tf32x3")
        diff = m_next - eye
        residual_next = tl.sqrt(tl.sum(tl.sum(diff * diff, axis=1), axis=0))
        # NaN compares False, so a blown-up step is never taken.
        better = residual_next < residual
        x = tl.where(better, x_next, x)
        m = tl.where(better, m_next, m)
        # In the quadratic phase, a step that does not halve the residual means fp32 noise.
        slow = (residual < 1e-2) & (residual_next > 0.5 * residual)
        going = better & (residual_next > tolerance) & (~slow)
        residual = tl.where(better, residual_next, residual)
        iterations += better.to(tl.int32)

    tl.store(x_ptr + offsets, x, mask=inside)
    tl.store(residual_ptr + pid, residual)
    tl.store(iterations_ptr + pid, iterations)


def _block_and_warps(n):
    block = max(64, triton.next_power_of_2(n))
    return block, (8 if block >= 128 else 4)


def newton_inverse_root(a, z, root, max_iterations, tolerance, x=None):
    """Launch on a (B, n, n) float32 contiguous batch `a` (already + eps I) and scales `z` (B,).

    Writes X into `x` when given (a (B, n, n) float32 contiguous buffer), else a new one.
    Returns (X (B, n, n) float32, residual (B,) float32, iterations (B,) int32).
    """
    batch, n, _ = a.shape
    block, num_warps = _block_and_warps(n)
    x = torch.empty_like(a) if x is None else x
    residual = torch.empty(batch, device=a.device, dtype=torch.float32)
    iterations = torch.empty(batch, device=a.device, dtype=torch.int32)
    if batch:
        newton_inverse_root_kernel[(batch,)](
            a, z, x, residual, iterations, n, max_iterations, tolerance,
            ROOT=root, SQUARINGS=root.bit_length() - 1, BLOCK=block, num_warps=num_warps,
        )
    return x, residual, iterations


for _root in KERNEL_ROOTS:
    for _block in (64, 128):
        _, _warps = _block_and_warps(_block)
        register_compile_spec(CompileSpec(
            name=f"newton_inverse_root_p{_root}_b{_block}",
            fn=newton_inverse_root_kernel,
            signature={
                "a_ptr": "*fp32", "z_ptr": "*fp32", "x_ptr": "*fp32", "residual_ptr": "*fp32",
                "iterations_ptr": "*i32", "n": "i32", "max_iterations": "i32", "tolerance": "fp32",
            },
            constexprs={"ROOT": _root, "SQUARINGS": _root.bit_length() - 1, "BLOCK": _block},
            options={"num_warps": _warps},
            uses_dot=True,
        ))
