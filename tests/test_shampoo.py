"""matta.optim.Shampoo: grafting equivalence, a float64 hand computation, failures, checkpoints, DDP."""
import copy
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from matta.layers import NestedLinear
from matta.ops.matrix_functions import matrix_inverse_root_reference
from matta.optim import RootSettings, Shampoo, block_bounds, matrix_view_shape, nested_block_splits
from matta.optim import shampoo as shampoo_module


class Tiny(torch.nn.Module):
    """Matrix, 1-D and 3-D (conv-like) parameters with odd sizes."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(13, 7) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(13) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(3, 13, 1) * 0.3)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = torch.tanh(x @ self.w1.T + self.b1)
        return self.scale * (h @ self.w2.squeeze(-1).T)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def batches(steps, device, seed_batch=32):
    return [(torch.randn(seed_batch, 7, device=device), torch.randn(seed_batch, 3, device=device)) for _ in range(steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()


def max_rel_diff(a, b):
    return max(((p - q).norm() / q.norm().clamp_min(1e-12)).item() for p, q in zip(a.parameters(), b.parameters()))


# -------------------------------------------------------------------------------------
# Before start_preconditioning_step: exactly the grafting optimizer

REFERENCES = [
    ("adam", dict(betas=(0.9, 0.99), grafting_beta2=0.999, grafting_epsilon=1e-8),
     lambda p: torch.optim.Adam(p, lr=3e-2, betas=(0.9, 0.999), eps=1e-8)),
    ("adam", dict(betas=(0.8, 0.99), grafting_beta2=0.99, grafting_epsilon=1e-6, weight_decay=0.1),
     lambda p: torch.optim.AdamW(p, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adagrad", dict(betas=(0.0, 1.0), grafting_epsilon=1e-10),
     lambda p: torch.optim.Adagrad(p, lr=3e-2, eps=1e-10)),
    ("rmsprop", dict(betas=(0.0, 0.99), grafting_beta2=0.95, grafting_epsilon=1e-7),
     lambda p: torch.optim.RMSprop(p, lr=3e-2, alpha=0.95, eps=1e-7)),
    ("sgd", dict(betas=(0.0, 0.99), momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=3e-2, momentum=0.9, nesterov=True)),
    ("sgd", dict(betas=(0.0, 0.99), momentum=0.5),
     lambda p: torch.optim.SGD(p, lr=3e-2, momentum=0.5)),
    ("none", dict(betas=(0.0, 0.99)), lambda p: torch.optim.SGD(p, lr=3e-2)),
]


@pytest.mark.parametrize("grafting, kwargs, make_reference", REFERENCES)
def test_before_preconditioning_it_is_the_grafting_optimizer(grafting, kwargs, make_reference, device):
    model = Tiny().to(device)
    reference = copy.deepcopy(model)
    opt = Shampoo(model.parameters(), lr=3e-2, grafting=grafting, start_preconditioning_step=100,
                  max_preconditioner_dim=5, **kwargs)
    ref_opt = make_reference(reference.parameters())
    data = batches(12, device)
    for x, y in data:
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    assert max_rel_diff(model, reference) <= 1e-5
    assert max_rel_diff(model, Tiny().to(device)) > 1e-2  # it did train


# -------------------------------------------------------------------------------------
# A preconditioned trajectory against a direct float64 computation


def float64_shampoo(w0, grads, *, lr, betas, epsilon, momentum, weight_decay, max_dim, start, every, grafting):
    w = w0.double().clone()
    exp_avg = torch.zeros_like(w)
    graft_sq = torch.zeros_like(w)
    buffer = torch.zeros_like(w)
    rows, cols = block_bounds(w.shape[0], (), max_dim), block_bounds(w.shape[1], (), max_dim)
    blocks = [(r, c) for r in rows for c in cols]
    left = [torch.zeros(r[1] - r[0], r[1] - r[0], dtype=torch.float64) for r, _ in blocks]
    right = [torch.zeros(c[1] - c[0], c[1] - c[0], dtype=torch.float64) for _, c in blocks]
    roots = [None] * len(blocks)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = g.double()
        exp_avg = b1 * exp_avg + (1 - b1) * g
        filtered = exp_avg / (1 - b1**t)
        if grafting == "adam":
            graft_sq = 0.999 * graft_sq + 0.001 * g * g
            graft = filtered / ((graft_sq / (1 - 0.999**t)).sqrt() + 1e-8)
        elif grafting == "rmsprop":
            graft_sq = 0.999 * graft_sq + 0.001 * g * g
            graft = filtered / (graft_sq.sqrt() + 1e-8)
        elif grafting == "adagrad":
            graft_sq = graft_sq + g * g
            graft = filtered / (graft_sq.sqrt() + 1e-8)
        else:  # sgd, none
            graft = filtered
        direction = graft.clone()
        correction = 1 - b2**t if b2 < 1 else 1.0
        for i, ((r0, r1), (c0, c1)) in enumerate(blocks):
            gb = g[r0:r1, c0:c1]
            left[i] = b2 * left[i] + (1 - b2) * gb @ gb.T if b2 < 1 else left[i] + gb @ gb.T
            right[i] = b2 * right[i] + (1 - b2) * gb.T @ gb if b2 < 1 else right[i] + gb.T @ gb
            if t >= start and (t - start) % every == 0:
                roots[i] = (matrix_inverse_root_reference(left[i] / correction, 4, epsilon),
                            matrix_inverse_root_reference(right[i] / correction, 4, epsilon))
            if t >= start:
                pre = roots[i][0] @ filtered[r0:r1, c0:c1] @ roots[i][1]
                graft_scale = graft[r0:r1, c0:c1].norm() / pre.norm() if grafting != "none" else 1.0
                direction[r0:r1, c0:c1] = pre * graft_scale
        buffer = momentum * buffer + direction
        w = w * (1 - lr * weight_decay) - lr * buffer
    return w


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize(
    "grafting, betas", [("adam", (0.9, 0.99)), ("adagrad", (0.5, 1.0)), ("rmsprop", (0.9, 0.9)), ("sgd", (0.9, 0.99)),
                        ("none", (0.9, 0.99))],
)
def test_preconditioned_steps_match_float64_computation(method, grafting, betas, device):
    w = torch.nn.Parameter(torch.randn(7, 5, device=device))
    grads = [torch.randn(7, 5, device=device) for _ in range(6)]
    settings = dict(lr=0.05, betas=betas, epsilon=1e-3, momentum=0.5, weight_decay=0.1, max_dim=4,
                    start=3, every=2, grafting=grafting)
    expected = float64_shampoo(w.detach().cpu(), [g.cpu() for g in grads], **settings)
    opt = Shampoo([w], lr=0.05, betas=betas, epsilon=1e-3, momentum=0.5, weight_decay=0.1,
                  max_preconditioner_dim=4, start_preconditioning_step=3, precondition_frequency=2,
                  grafting=grafting, root_method=method)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    # The same steps without preconditioning differ by far more than the tolerance.
    adam_only = float64_shampoo(w.detach().cpu(), [g.cpu() for g in grads], **{**settings, "start": 100})
    error = ((w.detach().double().cpu() - expected).norm() / expected.norm()).item()
    assert error <= 1e-5
    assert ((adam_only - expected).norm() / expected.norm()).item() > 1e-3
    assert opt.state[w]["root_ready"].all() and opt.state[w]["block_bounds"].tolist() == [
        [0, 4, 0, 4], [0, 4, 4, 5], [4, 7, 0, 4], [4, 7, 4, 5]]


# -------------------------------------------------------------------------------------
# Blocking


def test_block_bounds_split_points_then_max_dim():
    assert block_bounds(10, (), 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(10, (3,), 4) == [(0, 3), (3, 7), (7, 10)]
    assert block_bounds(10, (0, 10, 6, 6), 100) == [(0, 6), (6, 10)]
    assert matrix_view_shape((4, 3, 2)) == (4, 6) and matrix_view_shape((5,)) == ()


def test_nested_block_splits_align_with_the_student_block(device):
    model = torch.nn.Sequential(NestedLinear((6, 11), (5, 9)), NestedLinear((5, 9), (5, 9), share_weights=False))
    model = model.to(device)
    splits = nested_block_splits(model)
    assert list(splits) == [model[0].weight] and splits[model[0].weight] == ((5,), (6,))
    opt = Shampoo(model.parameters(), max_preconditioner_dim=4, block_splits=splits, start_preconditioning_step=1,
                  precondition_frequency=1, root_method="eigh")
    x = torch.randn(16, 11, device=device)
    y_s, y_ta = model[0](x)
    (y_s.square().mean() + y_ta.square().mean()).backward()
    opt.step()
    bounds = opt.state[model[0].weight]["block_bounds"].tolist()
    covered = torch.zeros(9, 11, dtype=torch.int64)
    for r0, r1, c0, c1 in bounds:
        assert r1 - r0 <= 4 and c1 - c0 <= 4
        assert (r1 <= 5 or r0 >= 5) and (c1 <= 6 or c0 >= 6)  # never straddles the Student block
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()


# -------------------------------------------------------------------------------------
# Failures


def test_nan_gradient_raises_and_changes_nothing(device):
    model = Tiny().to(device)
    opt = Shampoo(model.parameters(), start_preconditioning_step=2, precondition_frequency=1)
    train(model, opt, batches(3, device))
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    loss_of(model, *batches(1, device)[0]).backward()
    model.b1.grad[4] = float("inf")
    with pytest.raises(FloatingPointError, match="parameter 1 of param group 0"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k])
    for key, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, before_state["state"][key][name]), name


def test_failed_roots_keep_previous_preconditioner_then_raise(device, monkeypatch):
    w = torch.nn.Parameter(torch.randn(6, 5, device=device))
    opt = Shampoo([w], start_preconditioning_step=1, precondition_frequency=1, max_preconditioner_dim=3,
                  root_method="eigh", root_settings=RootSettings(max_consecutive_failures=3))
    w.grad = torch.randn_like(w)
    opt.step()
    good = {k: v.clone() for k, v in opt.state[w].items() if k.startswith("root_")}
    assert opt.state[w]["root_ready"].all()

    real = shampoo_module.matrix_inverse_root
    mode = {"kind": "nan"}

    def broken(a, **kwargs):
        x, diag = real(a, **kwargs)
        if mode["kind"] == "nan":
            x = torch.full_like(x, float("nan"))
            diag = type(diag)(diag.method, diag.error, diag.iterations, torch.zeros_like(diag.finite))
        else:  # finite but inaccurate
            diag = type(diag)(diag.method, torch.ones_like(diag.error), diag.iterations, diag.finite)
        return x, diag

    monkeypatch.setattr(shampoo_module, "matrix_inverse_root", broken)
    for kind, expected_failures in (("nan", 1), ("inaccurate", 2)):
        mode["kind"] = kind
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        opt.step()
        assert torch.isfinite(w).all() and not torch.equal(w, before)
        for k, v in good.items():
            assert torch.equal(opt.state[w][k], v), k  # previous root kept
        assert (opt.state[w]["failures_total"] == expected_failures).all()
    assert (opt.root_failure_counts()[0][0] == 2).all()
    w.grad = torch.randn_like(w)
    with pytest.raises(RuntimeError, match="failed 3 times in a row"):
        opt.step()
    # A success resets the consecutive count but not the total.
    monkeypatch.setattr(shampoo_module, "matrix_inverse_root", real)
    opt.state[w]["failures_consecutive"].zero_()
    w.grad = torch.randn_like(w)
    opt.step()
    assert (opt.state[w]["failures_consecutive"] == 0).all() and (opt.state[w]["failures_total"] == 3).all()


def test_bad_configuration_is_rejected():
    w = [torch.nn.Parameter(torch.randn(3, 3))]
    for kwargs, match in [
        (dict(grafting="adamw"), "grafting"), (dict(betas=(0.9, 1.5)), "betas"), (dict(lr=-1.0), "lr"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"), (dict(root_method="svd"), "root_method"),
        (dict(nesterov=True), "nesterov"), (dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (dict(block_splits={torch.nn.Parameter(torch.ones(2, 2)): ((1,), (1,))}), "does not hold"),
    ]:
        with pytest.raises(ValueError, match=match):
            Shampoo(w, **kwargs)


# -------------------------------------------------------------------------------------
# Checkpoints


def make_run(device, dtype=torch.float32, method="auto"):
    torch.manual_seed(1234)
    model = Tiny().to(device=device, dtype=dtype)
    opt = Shampoo(
        [{"params": [model.w1, model.b1]}, {"params": [model.w2, model.scale], "lr": 5e-3, "grafting": "adagrad"}],
        lr=1e-2, momentum=0.9, weight_decay=0.01, max_preconditioner_dim=4, start_preconditioning_step=3,
        precondition_frequency=2, root_method=method,
    )
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(device, dtype):
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(9, device)]
    model, opt = make_run(device, dtype)
    train(model, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[4:])

    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)  # plain tensors and scalars only
    resumed, resumed_opt = make_run(device, dtype, method="eigh")  # "auto"'s choice comes back from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    state = resumed_opt.state[resumed.w1]
    assert state["factor_left.0"].dtype == torch.float32 and state["factor_left.0"].device.type == device.type
    assert state["step"].device.type == "cpu" and resumed_opt.param_groups[0]["root_method"] == "auto"
    train(resumed, resumed_opt, data[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for (k1, s1), (k2, s2) in zip(opt.state_dict()["state"].items(), resumed_opt.state_dict()["state"].items()):
        assert k1 == k2 and s1.keys() == s2.keys()
        assert all(torch.equal(s1[name].cpu(), s2[name].cpu()) for name in s1)


def test_load_state_dict_onto_another_device(device):
    # Saved on `device`, loaded onto a CPU model (on a GPU box: cuda -> cpu), and back.
    model, opt = make_run(device, method="eigh")
    train(model, opt, batches(4, device))
    cpu_model, cpu_opt = make_run(torch.device("cpu"), method="eigh")
    cpu_model.load_state_dict(model.state_dict())
    cpu_opt.load_state_dict(opt.state_dict())
    for p in cpu_model.parameters():
        for name, value in cpu_opt.state[p].items():
            assert value.device.type == "cpu"
    back_model, back_opt = make_run(device, method="eigh")
    back_model.load_state_dict(cpu_model.state_dict())
    back_opt.load_state_dict(cpu_opt.state_dict())
    for p, q in zip(model.parameters(), back_model.parameters()):
        for name, value in opt.state[p].items():
            assert torch.equal(value, back_opt.state[q][name]) and value.device == back_opt.state[q][name].device


def test_load_rejects_a_different_block_layout():
    model, opt = make_run(torch.device("cpu"), method="eigh")
    train(model, opt, batches(2, "cpu"))
    other = Shampoo(
        [{"params": [model.w1, model.b1]}, {"params": [model.w2, model.scale]}], max_preconditioner_dim=8,
    )
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["max_preconditioner_dim"] = 8
    with pytest.raises(ValueError, match="block layout"):
        other.load_state_dict(saved)


# -------------------------------------------------------------------------------------
# Distributed: 2 CPU processes (gloo) give the single-process result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_run(method, steps=7):
    torch.manual_seed(99)
    model = Tiny()
    model.w3 = torch.nn.Parameter(torch.randn(9, 6))  # blocks of another size
    opt = Shampoo(model.parameters(), lr=1e-2, max_preconditioner_dim=4, start_preconditioning_step=2,
                  precondition_frequency=2, root_method=method)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(32, 7, generator=generator), torch.randn(32, 3, generator=generator)
        opt.zero_grad()
        (loss_of(model, x, y) + model.w3.sin().sum() * 1e-2).backward()
        opt.step()
    return model, opt


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rooted = []
        real = shampoo_module.matrix_inverse_root

        def counting(a, **kwargs):
            rooted.append(a.shape[0])
            return real(a, **kwargs)

        shampoo_module.matrix_inverse_root = counting
        results = {}
        for method in ("eigh", "auto"):
            rooted.clear()
            model, opt = distributed_run(method)
            assert opt.distributed
            results[method] = {"params": [p.detach().clone() for p in model.parameters()],
                               "rooted": sum(rooted), "choices": dict(opt._root_methods)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(monkeypatch):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    rooted = []
    real = shampoo_module.matrix_inverse_root
    monkeypatch.setattr(shampoo_module, "matrix_inverse_root", lambda a, **kw: rooted.append(a.shape[0]) or real(a, **kw))
    single, single_opt = distributed_run("eigh")
    assert not single_opt.distributed
    for r in range(2):
        for p, q in zip(single.parameters(), ranks[r]["eigh"]["params"]):
            assert torch.equal(p.detach(), q)
    # The root work was divided: each rank rooted part of the matrices, together all of them.
    assert ranks[0]["eigh"]["rooted"] + ranks[1]["eigh"]["rooted"] == sum(rooted)
    assert 0 < ranks[0]["eigh"]["rooted"] < sum(rooted) and 0 < ranks[1]["eigh"]["rooted"] < sum(rooted)
    # With "auto", rank 0's measured choice is shared, so the ranks agree exactly.
    assert ranks[0]["auto"]["choices"] == ranks[1]["auto"]["choices"] != {}
    for p, q in zip(ranks[0]["auto"]["params"], ranks[1]["auto"]["params"]):
        assert torch.equal(p, q)
