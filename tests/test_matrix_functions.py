"""matrix_inverse_root against a float64 eigh oracle; the Triton Newton kernel under the interpreter."""
import pytest
import torch

from matta.ops import matrix_functions as mf
from matta.ops.matrix_functions import matrix_inverse_root, matrix_inverse_root_reference

CONCRETE = ("eigh", "eigh_loop", "newton")


def random_spd(batch, n, condition, device, rank=None, dtype=torch.float32):
    """SPD (or PSD of the given rank) matrices with eigenvalues log-spaced over [1/condition, 1]."""
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64))
    w = torch.logspace(-torch.log10(torch.tensor(float(condition))).item(), 0, n, dtype=torch.float64)
    w = w[torch.randperm(n)]
    if rank is not None:
        w[rank:] = 0.0
    scale = 10 ** torch.empty(batch, 1, dtype=torch.float64).uniform_(-2, 2)  # factors of any size
    return ((q * (w * scale).unsqueeze(-2)) @ q.mT).to(device=device, dtype=dtype)


def torch_fp32_root(a, root, epsilon):
    """What a user writes with plain PyTorch in float32: the yardstick for our float32 error."""
    a = a.float() + epsilon * torch.eye(a.shape[-1], device=a.device)
    w, q = torch.linalg.eigh(a)
    return (q * w.clamp_min(max(epsilon, 1e-30)).pow(-1.0 / root).unsqueeze(-2)) @ q.mT


def fp32_floor(condition):
    """Absolute error floor: 1e-5 plus the inherent float32 sensitivity of A^(-1/4), about
    kappa * u / 4 (one rounding of A moves lambda_min by u * lambda_max). For tiny n the
    float32 error fluctuates around that, so PyTorch's own error is no steady yardstick there."""
    return 1e-5 + 0.25 * condition * 2.0**-24


def rel_error(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return (torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref)).max().item()


@pytest.mark.parametrize("method", CONCRETE + ("auto",))
@pytest.mark.parametrize("n", [1, 2, 7, 33, 130])
@pytest.mark.parametrize("condition", [10.0, 1e5])
def test_matches_float64_oracle(method, n, condition, device):
    # 8 matrices: the max error over a batch is a steadier statistic than over a few.
    a = random_spd(8, n, condition, device)
    epsilon = 1e-9
    ref = matrix_inverse_root_reference(a, root=4, epsilon=epsilon)
    x, diag = matrix_inverse_root(a, root=4, epsilon=epsilon, method=method, return_diagnostics=True)
    assert x.shape == a.shape and x.dtype == a.dtype and x.device == a.device
    # PyTorch's own float32 path is the yardstick: its error in the same precision.
    torch_fp32 = rel_error(torch_fp32_root(a, 4, epsilon), ref)
    assert torch.isfinite(x).all()
    assert rel_error(x, ref) <= 2 * torch_fp32 + fp32_floor(condition)
    assert diag.method in CONCRETE and (method == "auto" or diag.method == method)
    assert diag.finite.all() and (diag.error < 1e-3).all()
    assert diag.error.shape == (8,) and diag.iterations.shape == (8,)
    if diag.method == "newton" and n > 1:
        assert (diag.iterations > 0).all()


@pytest.mark.parametrize("method", CONCRETE)
def test_rank_deficient_plus_epsilon(method, device):
    n, epsilon = 11, 1e-3
    a = random_spd(4, n, 100.0, device, rank=5)
    ref = matrix_inverse_root_reference(a, root=4, epsilon=epsilon)
    x = matrix_inverse_root(a, root=4, epsilon=epsilon, method=method)
    torch_fp32 = rel_error(torch_fp32_root(a, 4, epsilon), ref)
    condition = (torch.linalg.eigvalsh(a.double().cpu())[:, -1].max().item() + epsilon) / epsilon
    assert rel_error(x, ref) <= 2 * torch_fp32 + fp32_floor(condition)


@pytest.mark.parametrize("method", CONCRETE)
@pytest.mark.parametrize("root", [1, 2, 3, 4])
def test_other_roots_and_leading_dims(method, root, device):
    a = random_spd(6, 9, 50.0, device).reshape(2, 3, 9, 9)
    ref = matrix_inverse_root_reference(a, root=root, epsilon=0.0)
    x = matrix_inverse_root(a, root=root, epsilon=0.0, method=method)
    assert x.shape == (2, 3, 9, 9)
    assert rel_error(x.reshape(6, 9, 9), ref.reshape(6, 9, 9)) <= 1e-4


def test_float64_input_stays_float64(device):
    a = random_spd(2, 6, 1e3, device, dtype=torch.float64)
    for method in CONCRETE:
        x = matrix_inverse_root(a, epsilon=0.0, method=method)
        assert x.dtype == torch.float64
        assert rel_error(x, matrix_inverse_root_reference(a)) <= 1e-9


def test_bfloat16_is_computed_in_float32(device):
    a = random_spd(2, 5, 10.0, device).to(torch.bfloat16)
    x = matrix_inverse_root(a, epsilon=0.0, method="eigh")
    assert x.dtype == torch.bfloat16
    assert rel_error(x, matrix_inverse_root_reference(a)) <= 1e-2


def test_eigh_retries_in_float64(monkeypatch, device):
    a = random_spd(3, 8, 1e3, device)
    calls = []
    real_eigh = torch.linalg.eigh

    def flaky_eigh(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    for method in ("eigh", "eigh_loop"):
        calls.clear()
        x, diag = matrix_inverse_root(a, epsilon=0.0, method=method, return_diagnostics=True)
        assert torch.float64 in calls and x.dtype == torch.float32
        assert diag.finite.all()
        assert rel_error(x, matrix_inverse_root_reference(a)) <= 1e-5


def test_non_finite_eigh_output_is_redone_in_float64(monkeypatch, device):
    a = random_spd(3, 8, 1e3, device)
    real_eigh = torch.linalg.eigh

    def poisoned_eigh(m):
        w, q = real_eigh(m)
        if m.dtype == torch.float32:
            w = w.clone()
            w[..., 0] = float("nan")
        return w, q

    monkeypatch.setattr(torch.linalg, "eigh", poisoned_eigh)
    x = matrix_inverse_root(a, epsilon=0.0, method="eigh")
    assert rel_error(x, matrix_inverse_root_reference(a)) <= 1e-5


@pytest.mark.parametrize("method", CONCRETE)
def test_nan_input_is_reported_not_raised(method, device):
    a = random_spd(3, 6, 10.0, device)
    a[1, 2, 3] = a[1, 3, 2] = float("nan")  # symmetric: eigh reads one triangle only
    x, diag = matrix_inverse_root(a, method=method, return_diagnostics=True)
    assert not bool(diag.finite[1]) or not torch.isfinite(diag.error[1])
    assert diag.finite[0] and diag.finite[2]
    assert rel_error(x[[0, 2]], matrix_inverse_root_reference(a[[0, 2]], epsilon=1e-12)) <= 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(A=torch.ones(3, 4)), "square"),
        (dict(A=torch.ones(3)), "square"),
        (dict(A=torch.ones(2, 2, dtype=torch.int64)), "floating"),
        (dict(A=torch.eye(2), root=0), "root"),
        (dict(A=torch.eye(2), root=2.0), "root"),
        (dict(A=torch.eye(2), epsilon=-1.0), "epsilon"),
        (dict(A=torch.eye(2), method="svd"), "method"),
        (dict(A=torch.eye(2), max_iterations=-1), "max_iterations"),
        (dict(A=[[1.0]]), "Tensor"),
    ],
)
def test_bad_arguments_name_expected_and_received(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        matrix_inverse_root(**kwargs)


def test_auto_is_measured_once_and_cached(monkeypatch):
    timed = []
    real_run = mf._run
    monkeypatch.setattr(mf, "_run", lambda a, root, eps, method, *rest, **kw:
                        timed.append(method) or real_run(a, root, eps, method, *rest, **kw))
    monkeypatch.setattr(mf, "_CHOICES", {})
    a = random_spd(5, 12, 10.0, "cpu")
    _, diag = matrix_inverse_root(a, method="auto", return_diagnostics=True)
    assert set(timed) >= set(CONCRETE)  # every candidate was timed, then one ran
    assert diag.method in CONCRETE
    timed.clear()
    _, again = matrix_inverse_root(a, method="auto", return_diagnostics=True)
    assert timed == [again.method] and again.method == diag.method
    assert list(mf.root_method_choices().values()) == [diag.method]


def test_newton_scaling_estimate_bounds_the_spectrum(device):
    a = random_spd(8, 20, 1e4, device)
    top = torch.linalg.eigvalsh(a.double())[:, -1].to(a.device)
    estimate = mf.largest_eigenvalue_estimate(a).double()
    # z * lambda_max must stay inside Newton's region of convergence (0, p + 1).
    assert (estimate >= 0.5 * top).all() and (estimate <= 1.0001 * torch.linalg.matrix_norm(a.double())).all()


# -------------------------------------------------------------------------------------
# The Triton kernel (interpreter on CPU, compiled on a GPU)


# n -> the kernel's block: 1, 13, 64 -> 64 and 77, 128 -> 128 (both blocks a GPU runs, with
# padding and without), each root in each block; 3 matrices on the interpreter's 2 programs,
# so one program roots two matrices in turn through its scratch.
@pytest.mark.parametrize("n, root", [(1, 2), (13, 4), (64, 2), (77, 4), (128, 2)])
def test_triton_newton_kernel_matches_oracle_and_torch(n, root, device):
    pytest.importorskip("triton")
    from matta.kernels import LAUNCH_COUNTS, newton_root
    from matta.ops.backend import triton_interpreting

    a = mf._with_epsilon(random_spd(3, n, 1e3, device), 0.0)
    z = ((root + 1.0) / (2.0 * mf.largest_eigenvalue_estimate(a))).contiguous()
    poisoned = torch.full_like(a, float("nan"))
    launches = LAUNCH_COUNTS["newton_inverse_root"]
    x, residual, iterations = newton_root.newton_inverse_root(a.contiguous(), z, root, 100, 1e-6, x=poisoned,
                                                              interpreting=triton_interpreting())
    assert LAUNCH_COUNTS["newton_inverse_root"] == launches + 1
    x_torch, residual_torch, _ = mf._newton_root_torch(a, z, root, 100, 1e-6)
    ref = matrix_inverse_root_reference(a, root=root)
    assert torch.isfinite(x).all()
    assert rel_error(x, ref) <= 2 * rel_error(x_torch, ref) + 1e-5
    assert (residual < 1e-3).all() and (residual_torch < 1e-3).all()
    assert ((iterations > 0) | (n == 1)).all() and (iterations <= 100).all()


def test_triton_newton_kernel_follows_torch_step_by_step(device):
    """After each of the first iterations the kernel's X equals the PyTorch iteration's: every
    product of the panel/slice schedule is right before convergence can hide a slip."""
    pytest.importorskip("triton")
    from matta.kernels import newton_root
    from matta.ops.backend import triton_interpreting

    a = mf._with_epsilon(random_spd(2, 70, 1e2, device), 0.0)
    z = (5.0 / (2.0 * mf.largest_eigenvalue_estimate(a))).contiguous()
    for steps in (1, 3):
        x, _, iterations = newton_root.newton_inverse_root(a.contiguous(), z, 4, steps, 0.0,
                                                           interpreting=triton_interpreting())
        x_torch, _, iterations_torch = mf._newton_root_torch(a, z, 4, steps, 0.0)
        assert (iterations == steps).all() and (iterations_torch == steps).all()
        assert rel_error(x, x_torch) <= 1e-5


def test_newton_dispatches_to_triton_when_forced(backend, device):
    pytest.importorskip("triton")
    from matta.kernels import LAUNCH_COUNTS

    launches = LAUNCH_COUNTS["newton_inverse_root"]
    a = random_spd(2, 10, 100.0, device)
    x = matrix_inverse_root(a, epsilon=0.0, method="newton")
    launched = LAUNCH_COUNTS["newton_inverse_root"] > launches
    assert launched == (backend == "triton" or device.type == "cuda" and backend != "torch")
    assert rel_error(x, matrix_inverse_root_reference(a)) <= 1e-4


def test_kernel_compile_specs_are_registered():
    pytest.importorskip("triton")
    from matta.kernels import COMPILE_SPECS, newton_root

    names = {spec.name for spec in COMPILE_SPECS if spec.fn is newton_root.newton_inverse_root_kernel}
    assert names == {f"newton_inverse_root_p{p}_b{b}" for p in newton_root.KERNEL_ROOTS for b in (64, 128)}


@pytest.mark.parametrize("method", CONCRETE)
def test_a_root_does_not_depend_on_its_batch(method, device):
    # Distributed Shampoo roots different batches on each rank; results must still be equal.
    a = random_spd(7, 6, 1e3, device)
    together = matrix_inverse_root(a, method=method)
    for index in (0, 3, 6):
        alone = matrix_inverse_root(a[index:index + 1], method=method)
        assert torch.equal(alone[0], together[index])
    assert torch.equal(matrix_inverse_root(a[2:5], method=method), together[2:5])
