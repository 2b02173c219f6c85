"""Shampoo's step reads nothing on the host, and its op count does not grow with its block count.

On the meta device every host read raises (a meta tensor has no data), so a step that runs
there with parameters, gradients and state all on meta cannot contain a `.item()`,
`.tolist()`, `.cpu()`, `bool(tensor)` or a branch on a device value. The dispatch mode below
also fails on any `_local_scalar_dense` or copy to the CPU of a device tensor, naming it.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from matta.ops import DeferredReport
from matta.ops.matrix_functions import matrix_inverse_root
from matta.optim import RootSettings, Shampoo


class NoHostReads(TorchDispatchMode):
    """Fails on a read of a non-CPU tensor's value by the host; counts the ops it sees."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and tensors[0].device.type != "cpu":
            raise AssertionError(f"host read of a {tensors[0].device} tensor ({func})")
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            target = kwargs.get("device", args[0].device if func is torch.ops.aten.copy_.default else None)
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu":
                raise AssertionError(f"copy of a {source.device} tensor to the CPU ({func})")
        return func(*args, **kwargs)


SHAPES = [(13, 7), (13,), (3, 13, 1), (), (9, 6), (4, 4)]

CASES = [
    dict(),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(grafting="adagrad", betas=(0.0, 1.0), momentum=0.5),
    dict(grafting="rmsprop", factor_matmul_dtype="bfloat16"),
    dict(grafting="sgd", use_bias_correction=False),
    dict(grafting="none", factor_matmul_dtype="tf32"),
]


@pytest.mark.parametrize("method", ["eigh", "eigh_loop", "newton"])
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "adam")
def test_steady_and_root_steps_on_meta_read_nothing(method, kwargs):
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in SHAPES]
    report = DeferredReport()
    opt = Shampoo([{"params": params[:3]}, {"params": params[3:], "lr": 1e-2}], max_preconditioner_dim=4,
                  start_preconditioning_step=2, precondition_frequency=2, root_method=method,
                  root_settings=RootSettings(max_iterations=3), report=report, **kwargs)
    with NoHostReads():
        for step in range(1, 6):  # 1: grafting only; 2, 4: roots; 3, 5: steady preconditioned steps
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
    assert report  # the checks were filed, on the device
    assert report.any_failed().device.type == "meta"


def test_a_cpu_step_reads_no_device_value_either():
    # On the CPU the dispatch mode sees every op of the real path (eigh's float64 retry
    # aside, which reads CPU values only, and only on a CPU).
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Shampoo(params, max_preconditioner_dim=4, start_preconditioning_step=2, precondition_frequency=2,
                  root_method="eigh", momentum=0.9)
    with NoHostReads():
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    opt.report.check()


def steady_step_ops(shape, max_dim, params=1):
    ps = [torch.nn.Parameter(torch.empty(shape, device="meta")) for _ in range(params)]
    opt = Shampoo(ps, max_preconditioner_dim=max_dim, start_preconditioning_step=2, precondition_frequency=100,
                  root_method="eigh")
    for _ in range(2):
        for p in ps:
            p.grad = torch.empty_like(p)
        opt.step()
    counter = NoHostReads()
    with counter:
        opt.step()
    return counter.ops


def test_steady_step_op_count_does_not_grow_with_the_block_count():
    # One 64 x 96 matrix in 6, 24 or 96 blocks of one shape: the same ops.
    counts = {dim: steady_step_ops((64, 96), dim) for dim in (32, 16, 8)}
    assert len(set(counts.values())) == 1, counts
    # Ragged last blocks add packs (one per block shape), not ops per block.
    assert steady_step_ops((65, 96), 8) < counts[8] + 40
    # More parameters cost one strided view of the gradient each.
    assert steady_step_ops((64, 96), 8, params=5) == counts[8] + 4


@pytest.mark.parametrize("method", ["eigh", "eigh_loop", "newton"])
def test_sync_free_roots_equal_the_usual_ones(method):
    q, _ = torch.linalg.qr(torch.randn(5, 9, 9, dtype=torch.float64))
    a = ((q * torch.logspace(-4, 0, 9, dtype=torch.float64)) @ q.mT).float()
    usual, usual_diag = matrix_inverse_root(a, epsilon=1e-6, method=method, return_diagnostics=True)
    free, free_diag = matrix_inverse_root(a, epsilon=1e-6, method=method, return_diagnostics=True, sync_free=True)
    assert torch.equal(usual, free) and torch.equal(usual_diag.error, free_diag.error)
    assert torch.equal(usual_diag.iterations, free_diag.iterations)


def test_sync_free_reports_a_failed_eigh_instead_of_retrying(monkeypatch):
    a = torch.eye(3).expand(2, 3, 3).contiguous()
    real = torch.linalg.eigh

    def poisoned(x, *args, **kwargs):
        w, v = real(x, *args, **kwargs)
        return (w * float("nan"), v) if x.dtype == torch.float32 else (w, v)

    monkeypatch.setattr(torch.linalg, "eigh", poisoned)
    _, retried = matrix_inverse_root(a, method="eigh", return_diagnostics=True)
    _, reported = matrix_inverse_root(a, method="eigh", return_diagnostics=True, sync_free=True)
    assert retried.finite.all() and not reported.finite.any()
