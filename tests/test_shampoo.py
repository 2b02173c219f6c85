"""matta.optim.Shampoo: grafting equivalence, a float64 hand computation, the per-block reference,
failures, checkpoints, DDP. (Host reads and op counts: test_shampoo_sync_free.py.)"""
import copy
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from matta.layers import NestedLinear
from matta.ops.matrix_functions import matrix_inverse_root_reference
from matta.optim import RootSettings, Shampoo, block_bounds, matrix_view_shape, nested_block_splits
from matta.ops import DeferredReport
from matta.optim import shampoo as shampoo_module
from matta.train import Run
from shampoo_naive import NaiveShampoo
from test_train import tiny


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
    state = opt.state_dict()["state"][0]
    assert state["root_ready"].all() and state["block_bounds"].tolist() == [
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
    bounds = opt.state_dict()["state"][0]["block_bounds"].tolist()
    covered = torch.zeros(9, 11, dtype=torch.int64)
    for r0, r1, c0, c1 in bounds:
        assert r1 - r0 <= 4 and c1 - c0 <= 4
        assert (r1 <= 5 or r0 >= 5) and (c1 <= 6 or c0 >= 6)  # never straddles the Student block
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()


# -------------------------------------------------------------------------------------
# The batched step against the per-block reference (tests/shampoo_naive.py)


class Odd(torch.nn.Module):
    """Odd and ragged shapes: blocks of several shapes, 1-D, 0-D and 3-D parameters."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        shapes = {"w1": (13, 7), "w2": (9, 11), "w3": (5, 3, 2), "w4": (4, 4), "b1": (13,), "scale": ()}
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(shape, dtype=dtype) * 0.5))


def reference_pair(dtype=torch.float32, split=False, **kwargs):
    """(model, Shampoo) and (copy, NaiveShampoo) with the same settings, two param groups."""
    model = Odd(dtype)
    twin = copy.deepcopy(model)
    settings = dict(lr=2e-2, max_preconditioner_dim=4, start_preconditioning_step=3, precondition_frequency=2,
                    root_method="eigh", **kwargs)

    def groups(m):
        return [{"params": [m.w1, m.b1, m.w3]}, {"params": [m.w2, m.w4, m.scale], "lr": 1e-2}]

    splits = (lambda m: {m.w1: ((6,), (2,)), m.w2: ((), (5,))}) if split else (lambda m: {})
    return (model, Shampoo(groups(model), block_splits=splits(model), **settings),
            twin, NaiveShampoo(groups(twin), block_splits=splits(twin), **settings))


def step_both(pairs, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) for p in pairs[0].parameters()]
        for model, opt in ((pairs[0], pairs[1]), (pairs[2], pairs[3])):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.to(p.dtype)
            opt.step()


REFERENCE_CASES = [
    dict(grafting="adam"),
    dict(grafting="adam", momentum=0.9, weight_decay=0.1),
    dict(grafting="adagrad", betas=(0.5, 1.0), momentum=0.5, nesterov=True),
    dict(grafting="rmsprop", betas=(0.0, 0.9)),
    dict(grafting="sgd", betas=(0.9, 0.99), use_bias_correction=False),
    dict(grafting="none", betas=(0.0, 0.99), momentum=0.9),
]


@pytest.mark.parametrize("split", [False, True], ids=["ragged", "block_splits"])
@pytest.mark.parametrize("kwargs", REFERENCE_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_batched_step_matches_the_per_block_reference(kwargs, split, fresh_seed):
    model, opt, twin, naive = reference_pair(split=split, **kwargs)
    step_both((model, opt, twin, naive), 8, fresh_seed)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        # Measured: <= 1e-7 on these shapes. Batched norms sum in another order (more
        # accurately: BENCHMARKS.md, "Shampoo step"), tiny bmm and mm round differently.
        assert ((p - q).norm() / q.norm()).item() <= 1e-5, name
    # The factors in the state dict are the reference's, block for block.
    state = opt.state_dict()["state"]
    for index, p in enumerate(q for g in naive.param_groups for q in g["params"]):
        ref = naive.state[p]
        if "blocks" in ref:
            assert state[index]["block_bounds"].tolist() == [list(b) for b in ref["blocks"]]
            for i, left in enumerate(ref["left"]):
                torch.testing.assert_close(state[index][f"factor_left.{i}"], left, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(state[index][f"factor_right.{i}"], ref["right"][i], rtol=1e-5, atol=1e-6)


def test_bfloat16_parameters_match_the_reference(fresh_seed):
    model, opt, twin, naive = reference_pair(dtype=torch.bfloat16, grafting="adam", momentum=0.5)
    step_both((model, opt, twin, naive), 6, fresh_seed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16
        # bf16 has 8 bits: a one-ulp flip of a direction element is 4e-3 of it.
        assert ((p.float() - q.float()).norm() / q.float().norm()).item() <= 2e-2
    assert opt.state_dict()["state"][0]["factor_left.0"].dtype == torch.float32


def test_factor_matmul_dtype(fresh_seed):
    runs = {}
    for option in FACTOR_OPTIONS:
        torch.manual_seed(fresh_seed)  # the same initial weights for each
        model, opt, twin, naive = reference_pair(factor_matmul_dtype=option)
        step_both((model, opt, twin, naive), 5, fresh_seed)
        runs[option] = (model, opt.state_dict()["state"][0]["factor_left.0"], naive.state[twin.w1]["left"][0])
    # TF32 is a CUDA mode: on a CPU the products are float32 ones, bit for bit.
    assert all(torch.equal(p, q) for p, q in zip(runs["tf32"][0].parameters(), runs["float32"][0].parameters()))
    exact, bf16, bf16_reference = runs["float32"][1], runs["bfloat16"][1], runs["bfloat16"][2]
    error = ((bf16 - exact).norm() / exact.norm()).item()
    assert 1e-6 < error <= 2e-2  # bf16 products: rounded, not wrong
    torch.testing.assert_close(bf16, bf16_reference, rtol=1e-5, atol=1e-6)


FACTOR_OPTIONS = ("float32", "tf32", "bfloat16")


# -------------------------------------------------------------------------------------
# Failures: decided on the device, read from the report


def test_nan_gradient_skips_the_whole_step_and_is_reported(device):
    model = Tiny().to(device)
    opt = Shampoo(model.parameters(), start_preconditioning_step=2, precondition_frequency=1, momentum=0.9,
                  weight_decay=0.1, max_preconditioner_dim=4)
    train(model, opt, batches(3, device))
    opt.report.check()  # nothing failed so far
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    loss_of(model, *batches(1, device)[0]).backward()
    model.b1.grad[4] = float("inf")
    model.w2.grad[0, 1, 0] = float("nan")
    opt.step()  # a root step too (precondition_frequency=1): nothing is read, nothing raised
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k]), k
    for key, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            if name != "step":  # host bookkeeping: it counts the skipped step
                assert torch.equal(value, before_state["state"][key][name]), name
    assert opt.nonfinite_gradient_counts() == [[0, 1, 1, 0]]
    with pytest.raises(FloatingPointError, match=r"^Shampoo: non-finite \(NaN/inf\) gradient.*skipped"):
        opt.report.check(FloatingPointError)
    train(model, opt, batches(2, device))  # and it goes on
    opt.report.check()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_roots_keep_previous_preconditioner_and_are_reported(device, monkeypatch):
    w = torch.nn.Parameter(torch.randn(6, 5, device=device))
    report = DeferredReport()
    opt = Shampoo([w], start_preconditioning_step=1, precondition_frequency=1, max_preconditioner_dim=3,
                  root_method="eigh", root_settings=RootSettings(max_consecutive_failures=3), report=report)
    assert opt.report is report
    w.grad = torch.randn_like(w)
    opt.step()
    good = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if k.startswith("root_")}
    assert good["root_ready"].all()

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
        state = opt.state_dict()["state"][0]
        for k, v in good.items():
            assert torch.equal(state[k], v), k  # previous root kept
        assert (state["failures_total"] == expected_failures).all()
        report.check()  # not yet 3 in a row
    assert (opt.root_failure_counts()[0][0] == 2).all()
    w.grad = torch.randn_like(w)
    opt.step()  # the third failure in a row: filed, not raised
    with pytest.raises(RuntimeError, match="failed 3 times in a row"):
        report.check(RuntimeError)
    # A success resets the consecutive count but not the total.
    monkeypatch.setattr(shampoo_module, "matrix_inverse_root", real)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert (state["failures_consecutive"] == 0).all() and (state["failures_total"] == 3).all()
    report.check()


def test_sparse_gradients_and_several_devices_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([w])
    w.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = Shampoo([w, meta])
    w.grad, meta.grad = torch.randn(4, 3), torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="one device; parameter 1 of param group 0 is on meta"):
        opt.step()


def test_bad_configuration_is_rejected():
    w = [torch.nn.Parameter(torch.randn(3, 3))]
    for kwargs, match in [
        (dict(grafting="adamw"), "grafting"), (dict(betas=(0.9, 1.5)), "betas"), (dict(lr=-1.0), "lr"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"), (dict(root_method="svd"), "root_method"),
        (dict(nesterov=True), "nesterov"), (dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (dict(block_splits={torch.nn.Parameter(torch.ones(2, 2)): ((1,), (1,))}), "does not hold"),
        (dict(factor_matmul_dtype="float16"), "factor_matmul_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            Shampoo(w, **kwargs)
    with pytest.raises(TypeError, match="DeferredReport"):
        Shampoo(w, report=[])


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
    saved, back = opt.state_dict()["state"], back_opt.state_dict()["state"]
    assert saved.keys() == back.keys()
    for key, values in saved.items():
        assert values.keys() == back[key].keys()
        for name, value in values.items():
            assert torch.equal(value, back[key][name]) and value.device == back[key][name].device, name


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


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as caught:
        fn()
    assert "\n" not in str(caught.value)


def test_load_rejects_another_optimizers_state():
    # Issue 16: these used to load and fail later, deep in step() (KeyError: 'graft_sq').
    model, opt = make_run(torch.device("cpu"), method="eigh")
    adamw = torch.optim.AdamW([{"params": [model.w1, model.b1]}, {"params": [model.w2, model.scale]}])
    train(model, adamw, batches(2, "cpu"))
    one_line_error(lambda: opt.load_state_dict(adamw.state_dict()), r"param group 0 .* lacks Shampoo's settings")
    # AdamW's state under Shampoo's group settings: named per parameter.
    hybrid = adamw.state_dict()
    hybrid["param_groups"] = opt.state_dict()["param_groups"]
    one_line_error(lambda: opt.load_state_dict(hybrid),
                   r"param group 0, parameter 0 \(shape \(13, 7\)\): .*missing .*'graft_sq'.*unexpected \['exp_avg_sq'")
    one_line_error(lambda: opt.load_state_dict({"weights": 1}), "not an optimizer state dict")


def test_load_rejects_other_shapes_and_settings():
    model, opt = make_run(torch.device("cpu"), method="eigh")
    train(model, opt, batches(4, "cpu"))
    saved = opt.state_dict()

    def edited(change):
        state = copy.deepcopy(saved)
        change(state)
        return lambda: make_run(torch.device("cpu"), method="eigh")[1].load_state_dict(state)

    def shrink(state):
        state["state"][0]["exp_avg"] = torch.zeros(13, 6)

    one_line_error(edited(shrink), r"parameter 0 \(shape \(13, 7\)\): exp_avg has shape \(13, 6\), expected \(13, 7\)")

    def bigger_factor(state):
        state["state"][0]["factor_right.1"] = torch.zeros(4, 4)

    one_line_error(edited(bigger_factor), r"factor_right.1 has shape \(4, 4\), expected \(3, 3\)")

    def no_momentum(state):
        state["param_groups"][0]["momentum"] = 0.0  # the saved momentum buffers no longer fit

    one_line_error(edited(no_momentum), r"parameter 0 .*unexpected \['momentum_buffer'\]")

    def float_step(state):
        state["state"][1]["step"] = torch.tensor(4.0)

    one_line_error(edited(float_step), r"parameter 1 \(shape \(13,\)\): step is a torch.float32 tensor")

    def unknown_parameter(state):
        state["state"][9] = state["state"][0]

    one_line_error(edited(unknown_parameter), "parameter id 9")


# -------------------------------------------------------------------------------------
# Distributed: 2 CPU processes (gloo) give the single-process result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_run(method, steps=7):
    torch.manual_seed(99)
    model = Tiny()
    model.w3 = torch.nn.Parameter(torch.randn(9, 6))  # blocks of other sizes
    model.w4 = torch.nn.Parameter(torch.randn(16, 12))
    opt = Shampoo(model.parameters(), lr=1e-2, max_preconditioner_dim=4, start_preconditioning_step=2,
                  precondition_frequency=2, root_method=method, momentum=0.5)
    generator = torch.Generator().manual_seed(7)
    flops = None
    for step in range(1, steps + 1):
        x, y = torch.randn(32, 7, generator=generator), torch.randn(32, 3, generator=generator)
        opt.zero_grad()
        (loss_of(model, x, y) + (model.w3.sin().sum() + model.w4.cos().sum()) * 1e-2).backward()
        if step == 3:  # a steady preconditioned step: the matrix work of this rank
            with FlopCounterMode(display=False) as counter:
                opt.step()
            flops = counter.get_total_flops()
        else:
            opt.step()
    return model, opt, flops


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
            model, opt, flops = distributed_run(method)
            assert opt.distributed
            results[method] = {"params": [p.detach().clone() for p in model.parameters()], "flops": flops,
                               "rooted": sum(rooted), "choices": dict(opt._root_methods),
                               "state": opt.state_dict()}  # a collective: every rank gets the whole state
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_half_the_matrix_work(monkeypatch):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]

    rooted = []
    real = shampoo_module.matrix_inverse_root
    monkeypatch.setattr(shampoo_module, "matrix_inverse_root", lambda a, **kw: rooted.append(a.shape[0]) or real(a, **kw))
    single, single_opt, single_flops = distributed_run("eigh")
    assert not single_opt.distributed
    # Tolerance 1e-6 relative: a rank's matmuls run on its share of a batch; measured here
    # they are bit-identical (BENCHMARKS.md), and the test holds them to the tolerance.
    for r in range(2):
        for p, q in zip(single.parameters(), ranks[r]["eigh"]["params"]):
            assert ((p.detach() - q).norm() / p.norm()).item() <= 1e-6
    # The matrix work was divided: each rank did about half of the matmul FLOPs of one process,
    # and rooted part of the matrices, together all of them.
    for r in range(2):
        assert 0.3 * single_flops <= ranks[r]["eigh"]["flops"] <= 0.7 * single_flops
    assert ranks[0]["eigh"]["rooted"] + ranks[1]["eigh"]["rooted"] == sum(rooted)
    assert 0 < ranks[0]["eigh"]["rooted"] < sum(rooted) and 0 < ranks[1]["eigh"]["rooted"] < sum(rooted)
    # With "auto", rank 0's measured choice is shared, so the ranks agree exactly.
    assert ranks[0]["auto"]["choices"] == ranks[1]["auto"]["choices"] != {}
    for p, q in zip(ranks[0]["auto"]["params"], ranks[1]["auto"]["params"]):
        assert torch.equal(p, q)
    # Every rank's state dict is the whole state, the same on both and as one process's.
    single_state = single_opt.state_dict()["state"]
    for r in range(2):
        state = ranks[r]["eigh"]["state"]["state"]
        assert state.keys() == single_state.keys()
        for key, values in single_state.items():
            assert values.keys() == state[key].keys()
            for name, value in values.items():
                torch.testing.assert_close(state[key][name], value, rtol=1e-6, atol=1e-7)
    # A checkpoint of the 2-process run resumes in one process.
    resumed, resumed_opt, _ = distributed_run("eigh", steps=0)
    resumed_opt.load_state_dict(ranks[0]["eigh"]["state"])
    for p, q in zip(resumed.parameters(), ranks[0]["eigh"]["params"]):
        p.data.copy_(q)
    p = next(resumed.parameters())
    for q in resumed.parameters():
        q.grad = torch.randn_like(q)
    resumed_opt.step()
    assert torch.isfinite(p).all()


# -------------------------------------------------------------------------------------
# The trainer reads Shampoo's report at its log read


def test_a_nan_gradient_under_shampoo_stops_the_run_at_the_next_read(tmp_path, corpus, monkeypatch):
    run = Run(tiny(tmp_path, corpus, optimizer="shampoo", max_steps=4))
    run.setup()
    run.read_record(run.train_step())
    params = [p for p in run.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    real_step = run.optimizer.step

    def poisoned_step(*args, **kwargs):
        params[-1].grad.view(-1)[0] = float("nan")  # after clipping: the loss stays finite
        return real_step(*args, **kwargs)

    monkeypatch.setattr(run.optimizer, "step", poisoned_step)
    rec = run.train_step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))  # the step was skipped
    with pytest.raises(FloatingPointError, match=r"by step 2: Shampoo: non-finite \(NaN/inf\) gradient"):
        run.read_record(rec)
