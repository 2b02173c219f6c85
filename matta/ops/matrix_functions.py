"""Inverse p-th roots of batches of symmetric positive semi-definite matrices.

`matrix_inverse_root(A, root=4, epsilon=..., method=...)` returns (A + epsilon I)^(-1/root)
for every matrix of a (..., n, n) batch. Methods:

- "eigh": one batched `torch.linalg.eigh` call (which reads the lower triangle); if it
  raises, or some matrices come out non-finite, those are redone in float64.
- "eigh_loop": the same, one `eigh` call per matrix (what DistributedShampoo does).
- "newton": the coupled Newton iteration (matrix products only), batched; on CUDA (or under
  the Triton interpreter with MATTA_BACKEND=triton) matrices of n <= 128 run in one Triton
  program each with every iteration on chip (kernels/newton_root.py), larger ones as
  batched GEMMs here. It stops per matrix at a tolerance, when it stops improving, or at
  a cap on iterations; it is scaled by an estimate of the largest eigenvalue.
- "auto": per (device, n, batch size, dtype, root), times the candidates once on a
  synthetic SPD batch of that shape, caches the fastest and uses it from then on
  (`choose_root_method`).

Diagnostics (`return_diagnostics=True`) give, per matrix, an error and an iteration count:
for eigh the relative backward error ||Q diag(w) Q^T - (A + eps I)||_F / ||A + eps I||_F
of the decomposition; for Newton the distance ||X^p (A + eps I) - I||_F that the coupled
iterate M tracks. Both are ~0 for a good root; non-finite or large means failure.
"""
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import triton_interpreting, use_triton

METHODS = ("auto", "eigh", "eigh_loop", "newton")
_CANDIDATES = ("eigh_loop", "eigh", "newton")
_POWER_ITERATIONS = 12


@dataclass(frozen=True)
class RootDiagnostics:
    """Per-matrix outcome of `matrix_inverse_root` (leading shape of the input batch).

    method: the method that ran ("eigh", "eigh_loop" or "newton"; never "auto").
    error: float32 error estimate (see the module docstring); NaN/inf when it failed.
    iterations: int32 Newton iterations taken (0 for eigh).
    finite: bool, True where every entry of the root is finite.
    """

    method: str
    error: Tensor
    iterations: Tensor
    finite: Tensor


def matrix_inverse_root_reference(A: Tensor, root: int = 4, epsilon: float = 0.0) -> Tensor:
    """The float64 oracle: (A + eps I)^(-1/root) by eigendecomposition, returned in float64."""
    a = A.to(torch.float64)
    a = 0.5 * (a + a.mT) + epsilon * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    w, q = torch.linalg.eigh(a)
    return (q * w.clamp_min(torch.finfo(torch.float64).tiny).pow(-1.0 / root).unsqueeze(-2)) @ q.mT


def _inverse_root_elementwise(w: Tensor, root: int) -> Tensor:
    """w^(-1/root) elementwise, the same bits for a value wherever it sits in the tensor.

    `Tensor.pow` rounds differently in its vectorised body and its scalar tail, so a matrix's
    root would depend on which batch it was computed in (and single-process Shampoo would
    differ from distributed Shampoo). For roots that are powers of two, repeated `sqrt` and
    one division are correctly rounded everywhere; other roots go through float64.
    """
    if root & (root - 1) == 0:
        for _ in range(root.bit_length() - 1):
            w = w.sqrt()
        return 1.0 / w
    return w.to(torch.float64).pow(-1.0 / root).to(w.dtype)


def _with_epsilon(a: Tensor, epsilon: float) -> Tensor:
    a = 0.5 * (a + a.mT)
    if epsilon:
        a = a + epsilon * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a


# ---------------------------------------------------------------------------------------
# eigh


def _eigh_batched(a: Tensor, sync_free: bool):
    """eigh of a (B, n, n) batch in one call; what raises or comes out non-finite is redone in
    float64 (the non-finite ones only without `sync_free`: finding them is a host read)."""
    try:
        w, q = torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        return _eigh_each(a, sync_free)
    return (w, q) if sync_free else _redo_non_finite(a, w, q)


def _eigh_each(a: Tensor, sync_free: bool):
    """One eigh call per matrix, each retried in float64 if it raises or (without
    `sync_free`) is non-finite."""
    ws, qs = [], []
    for matrix in a:
        try:
            w, q = torch.linalg.eigh(matrix)
        except torch.linalg.LinAlgError:
            w, q = _eigh_float64(matrix)
        ws.append(w)
        qs.append(q)
    if not ws:
        return a.new_empty(a.shape[:-1]), torch.empty_like(a)
    w, q = torch.stack(ws), torch.stack(qs)
    return (w, q) if sync_free else _redo_non_finite(a, w, q)


def _eigh_float64(matrix: Tensor):
    """eigh in float64, cast back; NaN where even that fails (reported, never raised)."""
    try:
        w, q = torch.linalg.eigh(matrix.to(torch.float64))
        return w.to(matrix.dtype), q.to(matrix.dtype)
    except torch.linalg.LinAlgError:
        return torch.full(matrix.shape[:-1], float("nan"), dtype=matrix.dtype, device=matrix.device), \
            torch.full_like(matrix, float("nan"))


def _redo_non_finite(a: Tensor, w: Tensor, q: Tensor):
    # One check for the whole batch (a single sync on CUDA); eigenvalues suffice: LAPACK and
    # cuSOLVER failures poison them along with the vectors.
    bad = ~torch.isfinite(w).all(-1)
    if a.dtype != torch.float64 and bool(bad.any()):
        w, q = w.clone(), q.clone()
        for i in bad.nonzero().flatten().tolist():
            w[i], q[i] = _eigh_float64(a[i])
    return w, q


def _eigh_root(a: Tensor, root: int, epsilon: float, loop: bool, diagnostics: bool, sync_free: bool):
    """Roots from eigh of `a` itself (its lower triangle, as eigh reads it); epsilon is added to
    the eigenvalues, which is adding epsilon I to the matrix without another pass over it."""
    w, q = (_eigh_each if loop else _eigh_batched)(a, sync_free)
    # Rounding can leave eigenvalues of a PSD matrix slightly below 0: floor them at epsilon.
    floor = max(epsilon, torch.finfo(a.dtype).tiny)
    x = (q * _inverse_root_elementwise((w + epsilon).clamp_min(floor), root).unsqueeze(-2)) @ q.mT
    error = None
    if diagnostics:
        symmetric = a.tril() + a.tril(-1).mT
        rebuilt = (q * w.unsqueeze(-2)) @ q.mT
        error = torch.linalg.matrix_norm(rebuilt - symmetric) / torch.linalg.matrix_norm(symmetric).clamp_min(floor)
    iterations = torch.zeros(a.shape[:1], dtype=torch.int32, device=a.device)
    return x, error, iterations


# ---------------------------------------------------------------------------------------
# Coupled Newton


def largest_eigenvalue_estimate(a: Tensor, iterations: int = _POWER_ITERATIONS) -> Tensor:
    """An upper-biased estimate of lambda_max of each SPD matrix of a (B, n, n) batch.

    The Rayleigh quotient after a few power iterations (from a fixed pseudo-random start, so
    results are reproducible) is at most lambda_max and usually close; twice it, capped by
    the Frobenius norm (an upper bound), keeps z * lambda_max inside Newton's convergence
    region (0, p + 1) even when the power iteration has not converged.
    """
    batch, n, _ = a.shape
    generator = torch.Generator().manual_seed(n)
    v = torch.randn(n, 1, generator=generator, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
    v = v.expand(batch, n, 1)
    for _ in range(iterations):
        v = a @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    rayleigh = (v.mT @ a @ v).reshape(batch)
    return torch.minimum(torch.linalg.matrix_norm(a), 2.0 * rayleigh)


def _newton_root_torch(a: Tensor, z: Tensor, root: int, max_iterations: int, tolerance: float,
                       sync_free: bool = False):
    """Batched coupled Newton with per-matrix stopping; same rules as the Triton kernel.
    Stopped matrices stay as they are, so with `sync_free` (no early exit once all have
    stopped, which would read the device) the result is the same, at the cost of the
    iterations up to `max_iterations`."""
    batch, n, _ = a.shape
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand(batch, n, n)
    x = eye * (1.0 / _inverse_root_elementwise(z, root)).view(batch, 1, 1)
    m = a * z.view(batch, 1, 1)
    residual = torch.linalg.matrix_norm(m - eye)
    iterations = torch.zeros(batch, dtype=torch.int32, device=a.device)
    going = residual > tolerance
    for _ in range(max_iterations):
        if not sync_free and not bool(going.any()):
            break
        t = ((root + 1.0) * eye - m) / root
        x_next = x @ t
        m_next = torch.linalg.matrix_power(t, root) @ m
        residual_next = torch.linalg.matrix_norm(m_next - eye)
        better = going & (residual_next < residual)
        x = torch.where(better.view(batch, 1, 1), x_next, x)
        m = torch.where(better.view(batch, 1, 1), m_next, m)
        slow = (residual < 1e-2) & (residual_next > 0.5 * residual)
        going = better & (residual_next > tolerance) & ~slow
        residual = torch.where(better, residual_next, residual)
        iterations += better.to(torch.int32)
    return x, residual, iterations


def _newton_root(a: Tensor, root: int, max_iterations: int, tolerance: float, sync_free: bool = False):
    from ..kernels import newton_root as kernel

    z = ((root + 1.0) / (2.0 * largest_eigenvalue_estimate(a))).to(a.dtype)
    on_kernel = (
        a.dtype == torch.float32 and a.shape[-1] <= kernel.MAX_KERNEL_DIM
        and root in kernel.KERNEL_ROOTS and use_triton(a)
    )
    if on_kernel:
        return kernel.newton_inverse_root(a.contiguous(), z.contiguous(), root, max_iterations, tolerance,
                                          interpreting=triton_interpreting())
    return _newton_root_torch(a, z, root, max_iterations, tolerance, sync_free)


# ---------------------------------------------------------------------------------------
# auto: measured choice

_CHOICES: dict = {}


def _choice_key(n, batch, device, dtype, root):
    device = torch.device(device)
    bucket = 1 << max(0, int(batch) - 1).bit_length()
    return (device.type, device.index, int(n), bucket, str(dtype), int(root))


def _synthetic_spd(batch, n, device, dtype):
    """SPD matrices with eigenvalues log-spaced over 1e-4..1 (a typical Shampoo factor)."""
    generator = torch.Generator().manual_seed(1234 + n)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    w = torch.logspace(-4, 0, n, dtype=torch.float64)
    return ((q * w) @ q.mT).to(device=device, dtype=dtype)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_root_method(n: int, batch: int, device, dtype=torch.float32, root: int = 4) -> str:
    """The fastest of "eigh_loop", "eigh" and "newton" for this shape, measured once and cached.

    Times each candidate on a synthetic SPD batch of up to `batch` matrices (fewer for big n:
    they are timed per matrix anyway). Three interleaved rounds, the best time of each kept, so
    a noisy neighbour on a shared machine rarely decides; a candidate 3x slower than the best
    in the first round is dropped. On CUDA a warm-up run comes first (compilation). The cache
    key buckets `batch` to powers of two. Candidates run `sync_free`, as a training step runs
    them: all their iterations, no device value read on the host.
    """
    key = _choice_key(n, batch, device, dtype, root)
    if key not in _CHOICES:
        device = torch.device(device)
        sample = int(min(batch, max(2, 2**29 // max(1, n) ** 3)))
        a = _synthetic_spd(sample, n, device, dtype)
        timings = dict.fromkeys(_CANDIDATES, math.inf)
        if device.type == "cuda":
            for method in _CANDIDATES:
                _run(a, root, 0.0, method, 100, 1e-6, False, sync_free=True)
        for round_ in range(3):
            for method in list(timings):
                _synchronize(device)
                start = time.perf_counter()
                _run(a, root, 0.0, method, 100, 1e-6, False, sync_free=True)
                _synchronize(device)
                timings[method] = min(timings[method], time.perf_counter() - start)
            if round_ == 0:
                fastest = min(timings.values())
                timings = {m: t for m, t in timings.items() if t <= 3 * fastest}
        _CHOICES[key] = min(timings, key=timings.get)
    return _CHOICES[key]


def root_method_choices() -> dict:
    """The measured choices of this process: {(device type, index, n, batch bucket, dtype, root): method}."""
    return dict(_CHOICES)


# ---------------------------------------------------------------------------------------
# Public API


def _run(a, root, epsilon, method, max_iterations, tolerance, diagnostics, sync_free=False):
    """(x, error or None, iterations) for a (B, n, n) batch in a computing dtype; no checks."""
    if method == "newton":
        return _newton_root(_with_epsilon(a, epsilon), root, max_iterations, tolerance, sync_free)
    return _eigh_root(a, root, epsilon, method == "eigh_loop", diagnostics, sync_free)


def matrix_inverse_root(
    A: Tensor,
    root: int = 4,
    epsilon: float = 1e-12,
    method: str = "auto",
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    return_diagnostics: bool = False,
    sync_free: bool = False,
):
    """(A + epsilon I)^(-1/root) for every matrix of a (..., n, n) symmetric PSD batch.

    Args:
        A: (..., n, n) floating tensor, symmetric positive semi-definite (eigh methods read
            its lower triangle, Newton its symmetric part). float16/bfloat16 are computed in
            float32.
        root: the integer p of the inverse p-th root (Shampoo uses 4 for matrices).
        epsilon: added to the diagonal first; eigenvalues are floored at it.
        method: "auto", "eigh", "eigh_loop" or "newton" (see the module docstring).
        max_iterations, tolerance: Newton's cap and its stopping threshold on ||M - I||_F.
        return_diagnostics: also return a `RootDiagnostics`.
        sync_free: never read a device value on the host (for a step that must not wait):
            eigh's float64 retry of matrices that came out non-finite is skipped (they stay
            non-finite, and `diagnostics.finite` says so), and Newton runs `max_iterations`
            iterations (the result is the same: stopped matrices are frozen). On CUDA,
            `torch.linalg.eigh` itself still checks cuSOLVER's status on the host.

    Returns:
        X with the shape and dtype of A; with `return_diagnostics`, `(X, RootDiagnostics)`.
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] == 0:
        raise ValueError(f"A must be a batch of square matrices (..., n, n) with n >= 1, got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"A must be a floating tensor (float32/float64/float16/bfloat16), got {A.dtype}")
    if isinstance(root, bool) or not isinstance(root, int) or root < 1:
        raise ValueError(f"root must be an int >= 1, got {root!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite float >= 0, got {epsilon!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an int >= 0, got {max_iterations!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a float >= 0, got {tolerance!r}")

    lead, n = A.shape[:-2], A.shape[-1]
    compute_dtype = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
    a = A.reshape(-1, n, n).to(compute_dtype)
    if method == "auto":
        method = choose_root_method(n, a.shape[0], a.device, compute_dtype, root)
    x, error, iterations = _run(a, root, float(epsilon), method, max_iterations, float(tolerance), return_diagnostics,
                                bool(sync_free))
    x = x.to(A.dtype).reshape(A.shape)
    if not return_diagnostics:
        return x
    finite = torch.isfinite(x).reshape(-1, n * n).all(-1)
    diagnostics = RootDiagnostics(
        method=method,
        error=error.to(torch.float32).reshape(lead),
        iterations=iterations.to(torch.int32).reshape(lead),
        finite=finite.reshape(lead),
    )
    return x, diagnostics
