"""MatTALoss / matta_loss against a float64 oracle, the Triton row pass against its PyTorch
twin, the ramp schedules, and bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from matta.losses import RAMP_SCHEDULES, MatTALoss, MatTALossOutput, ramp_value
from matta.ops.matta_loss import _rows_torch, matta_loss, matta_loss_reference


def oracle(z_s, z_ta, target, weights, ramp, tau, ignore_index=-100):
    """float64: log_softmax and the three sums, mean over kept tokens (0 when none is kept)."""
    n_classes = z_s.shape[-1]
    z_s, z_ta = z_s.double().reshape(-1, n_classes), z_ta.double().reshape(-1, n_classes)
    if target.is_floating_point():
        y = target.double().reshape(-1, n_classes)
        keep = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    else:
        ids = target.reshape(-1)
        keep = ids != ignore_index
        y = F.one_hot(ids.clamp(min=0), n_classes).double() * keep.unsqueeze(1)
    l_s = -(y * torch.log_softmax(z_s, -1)).sum(-1)
    l_ta = -(y * torch.log_softmax(z_ta, -1)).sum(-1)
    p_ta = torch.softmax(z_ta.detach() / tau, -1)
    l_d = -(tau**2) * (p_ta * torch.log_softmax(z_s / tau, -1)).sum(-1)
    n = max(int(keep.sum()), 1)
    parts = [(l * keep).sum() / n for l in (l_s, l_ta, l_d)]
    return weights[0] * parts[0] + weights[1] * parts[1] + ramp * weights[2] * parts[2], parts


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def random_case(shape, n_classes, soft, device, dtype=torch.float32, n_ignored=2):
    z_s = (3 * torch.randn(*shape, n_classes, device=device)).to(dtype).requires_grad_()
    z_ta = (3 * torch.randn(*shape, n_classes, device=device)).to(dtype).requires_grad_()
    if soft:
        target = torch.softmax(2 * torch.randn(*shape, n_classes, device=device), -1)
    else:
        target = torch.randint(0, n_classes, shape, device=device)
        target.view(-1)[torch.randperm(target.numel(), device=device)[:n_ignored]] = -100
    weights = tuple(0.2 + w for w in torch.rand(3).tolist())
    return z_s, z_ta, target, weights


def check_against_oracle(fn, z_s, z_ta, target, weights, ramp, tau, floor=1e-6):
    """fn's error vs the float64 oracle must be <= 2x the error of matta_loss_reference in the
    same precision (+ floor): values, the three parts, and both logit gradients."""
    z64 = [z.detach().double().requires_grad_() for z in (z_s, z_ta)]
    want, want_parts = oracle(*z64, target, weights, ramp, tau)
    want_grads = torch.autograd.grad(want, z64)

    z_ref = [z.detach().clone().requires_grad_() for z in (z_s, z_ta)]
    ref = matta_loss_reference(*z_ref, target, weights=weights, ramp=ramp, temperature=tau)
    ref_grads = torch.autograd.grad(ref.loss, z_ref)

    out = fn(z_s, z_ta, target, weights=weights, ramp=ramp, temperature=tau)
    grads = torch.autograd.grad(out.loss, (z_s, z_ta))
    assert isinstance(out, MatTALossOutput) and out.ramp == ramp
    for got, r, w in zip([out.loss, out.student, out.ta, out.distill], [ref.loss, *ref[1:4]], [want, *want_parts]):
        assert got.dim() == 0
        assert abs(got.item() - w.item()) <= 2 * abs(r.item() - w.item()) + floor * max(1.0, abs(w.item()))
    for g, r, w, z in zip(grads, ref_grads, want_grads, (z_s, z_ta)):
        assert g.dtype == z.dtype and g.shape == z.shape
        assert rel(g, w) <= 2 * rel(r, w) + floor


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_float64_oracle(backend, device, soft, tau):
    shape, n_classes = ((3, 11), 97) if backend == "triton" else ((5, 13), 301)
    z_s, z_ta, target, weights = random_case(shape, n_classes, soft, device)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.7, tau=tau)


def test_float64_is_exact(device):
    z_s, z_ta, target, weights = random_case((41,), 203, False, device, dtype=torch.float64)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.3, tau=1.7, floor=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    z_s, z_ta, target, weights = random_case((37,), 97, False, device, dtype=dtype)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=1.0, tau=2.0, floor=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row
def test_rows_kernel_matches_torch_pass(device):
    """The Triton row pass against its PyTorch twin (`_rows_torch`), on poisoned outputs."""
    from matta.kernels import matta_loss as kernel
    from matta.ops.backend import triton_interpreting

    rows, n_classes = 23, 97
    for hard, tau, write_grad in [(True, 1.0, True), (False, 1.9, True), (True, 0.6, False)]:
        z_s, z_ta = (4 * torch.randn(2, rows, n_classes, device=device)).unbind()
        if hard:
            y = torch.randint(0, n_classes, (rows,), device=device)
            y[::5] = -100
            z_s[5] = float("nan")  # an ignored row: its garbage must not reach loss or gradient
        else:
            y = torch.softmax(torch.randn(rows, n_classes, device=device), -1)
        config = dict(hard=hard, ignore_index=-100, w_s=0.8, w_ta=1.3, w_d=0.45, temperature=tau, scale=1 / 7,
                      write_grad=write_grad)
        results = []
        for run in (lambda *a: kernel.matta_loss_rows(*a, interpreting=triton_interpreting(), **config),
                    lambda *a: _rows_torch(*a, **config)):
            zs, zta = z_s.clone(), z_ta.clone()
            out = torch.full((rows, 4), float("nan"), device=device)
            run(zs, zta, y, out)
            results.append((zs, zta, out))
        (ks, kta, kout), (ts, tta, tout) = results
        torch.testing.assert_close(kout[:, :3], tout[:, :3], rtol=1e-5, atol=1e-5)
        assert not hard or torch.isnan(kout[5, 3]) and torch.isnan(tout[5, 3])
        keep = ~torch.isnan(tout[:, 3])
        torch.testing.assert_close(kout[keep, 3], tout[keep, 3], rtol=1e-5, atol=1e-5)
        if write_grad:
            torch.testing.assert_close(ks, ts, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(kta, tta, rtol=1e-5, atol=1e-7)
            if hard:
                assert (ks[::5] == 0).all() and (kta[::5] == 0).all()
        else:  # the kernel leaves the logits alone (the PyTorch pass uses them as scratch)
            torch.testing.assert_close(ks, z_s, equal_nan=True)
            torch.testing.assert_close(kta, z_ta)


def test_ignore_index_and_all_ignored(backend, device):
    z_s, z_ta, target, weights = random_case((29,), 53, False, device, n_ignored=9)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=1.0, tau=1.0)
    z_s.grad = None
    out = matta_loss(z_s, z_ta, torch.full_like(target, -100), weights=weights)
    out.loss.backward()
    assert out.loss.item() == 0 and out.student.item() == out.ta.item() == out.distill.item() == 0
    assert (z_s.grad == 0).all() and (z_ta.grad == 0).all()
    custom = target.clone()
    custom[custom == -100] = 7
    want, _ = oracle(z_s, z_ta, torch.where(custom == 7, -100, custom), weights, 1.0, 1.0)
    got = matta_loss(z_s, z_ta, custom, weights=weights, ignore_index=7)
    assert abs(got.loss.item() - want.item()) <= 1e-5 * abs(want.item())


def test_ta_gets_no_gradient_from_distillation(backend, device):
    z_s, z_ta, target, _ = random_case((19,), 41, False, device)
    out = matta_loss(z_s, z_ta, target, weights=(0.0, 0.0, 1.0), temperature=1.5)
    g_s, g_ta = torch.autograd.grad(out.loss, (z_s, z_ta))
    assert (g_ta == 0).all() and g_s.abs().sum() > 0 and out.distill > 0
    # with w_TA > 0 the TA's gradient is exactly that of w_TA L_TA alone
    both = matta_loss(z_s, z_ta, target, weights=(0.5, 0.8, 2.0))
    ta_only = matta_loss(z_s, z_ta, target, weights=(0.0, 0.8, 0.0))
    torch.testing.assert_close(torch.autograd.grad(both.loss, z_ta)[0], torch.autograd.grad(ta_only.loss, z_ta)[0])


def test_parts_are_logged_not_differentiated(device):
    z_s, z_ta, target, weights = random_case((7, 3), 31, True, device)
    out = MatTALoss(weights=weights, temperature=3.0)(z_s, z_ta, target)
    assert out.loss.requires_grad
    assert not any(p.requires_grad for p in (out.student, out.ta, out.distill))
    total = weights[0] * out.student + weights[1] * out.ta + weights[2] * out.distill
    assert math.isclose(out.loss.item(), total.item(), rel_tol=1e-6)
    (2.5 * out.loss).backward()  # a non-unit upstream gradient scales the logit gradients
    z2 = z_s.detach().double().requires_grad_()
    want, _ = oracle(z2, z_ta, target, weights, 1.0, 3.0)
    (2.5 * want).backward()
    assert rel(z_s.grad, z2.grad) < 1e-5


def test_autocast_logits(device):
    h = torch.randn(17, 24, device=device)
    head_s, head_ta = torch.randn(61, 24, device=device), torch.randn(61, 24, device=device)
    target = torch.randint(0, 61, (17,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z_s, z_ta = h @ head_s.T, h @ head_ta.T
        out = matta_loss(z_s, z_ta, target)
    assert z_s.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    want, _ = oracle(z_s, z_ta, target, (1, 1, 1), 1.0, 1.0)
    assert abs(out.loss.item() - want.item()) < 1e-4 * want.item()


# ----------------------------------------------------------------------------------------
# Ramp-up.


def test_ramp_schedules_and_edges():
    start, steps = 10, 20
    for schedule in RAMP_SCHEDULES:
        shape = (lambda t: t) if schedule == "linear" else (lambda t: math.exp(-5 * (1 - t) ** 2))
        kw = dict(rampup_steps=steps, rampup_start=start, schedule=schedule)
        assert ramp_value(None, **kw) == 1.0
        assert ramp_value(0, **kw) == 0.0 and ramp_value(start - 1, **kw) == 0.0
        for step in range(start, start + steps + 5):
            t = min(1.0, (step - start) / steps)
            assert math.isclose(ramp_value(step, **kw), shape(t), rel_tol=1e-12)
        assert ramp_value(start + steps, **kw) == 1.0
        values = [ramp_value(s, **kw) for s in range(start, start + steps + 1)]
        assert all(b > a for a, b in zip(values, values[1:]))
        # no ramp: a step at rampup_start
        assert ramp_value(start - 1, rampup_steps=0, rampup_start=start, schedule=schedule) == 0.0
        assert ramp_value(start, rampup_steps=0, rampup_start=start, schedule=schedule) == 1.0
        assert ramp_value(0, schedule=schedule) == 1.0
    assert math.isclose(ramp_value(start, rampup_steps=steps, rampup_start=start, schedule="sigmoid"), math.exp(-5))


@pytest.mark.parametrize("schedule", RAMP_SCHEDULES)
def test_module_applies_ramp(device, schedule):
    z_s, z_ta, target, weights = random_case((13,), 29, False, device)
    criterion = MatTALoss(weights=weights, rampup_steps=8, rampup_start=3, rampup=schedule, temperature=1.3)
    assert criterion.last_ramp is None
    for step in (0, 3, 6, 11, 50, None):
        out = criterion(z_s, z_ta, target, step=step)
        r = ramp_value(step, rampup_steps=8, rampup_start=3, schedule=schedule)
        assert out.ramp == r == criterion.last_ramp == criterion.ramp_at(step)
        want, _ = oracle(z_s, z_ta, target, weights, r, 1.3)
        assert abs(out.loss.item() - want.item()) <= 1e-5 * want.item()
    assert "sigmoid" in repr(MatTALoss(rampup="sigmoid"))


def test_ramp_zero_means_no_distillation_gradient(device):
    z_s, z_ta, target, _ = random_case((11,), 23, False, device)
    out = MatTALoss(weights=(1.0, 1.0, 5.0), rampup_steps=10, rampup_start=4)(z_s, z_ta, target, step=2)
    no_d = matta_loss(z_s, z_ta, target, weights=(1.0, 1.0, 0.0))
    assert out.ramp == 0.0 and out.distill > 0
    torch.testing.assert_close(torch.autograd.grad(out.loss, z_s)[0], torch.autograd.grad(no_d.loss, z_s)[0])


# ----------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs(device):
    z = torch.randn(6, 9, device=device)
    ids = torch.randint(0, 9, (6,), device=device)
    shift = torch.zeros(6, 9, device=device)
    shift[:, 0], shift[:, 1] = -1.5, 1.5  # rows still sum to 1, one entry below 0
    bad = [
        (lambda: matta_loss(z, torch.randn(6, 8, device=device), ids), "same shape"),
        (lambda: matta_loss(z, z, ids.float()), "integer"),
        (lambda: matta_loss(z, z, ids[:5]), "class ids of shape"),
        (lambda: matta_loss(z, z, torch.full((6,), 9, device=device)), r"in \[0, 9\)"),
        (lambda: matta_loss(z, z, -torch.ones(6, dtype=torch.long, device=device)), "ignore_index"),
        (lambda: matta_loss(z, z, torch.rand(6, 9, device=device)), "sum to 1"),
        (lambda: matta_loss(z, z, torch.softmax(z, -1) + shift), "negative"),
        (lambda: matta_loss(z, z, torch.full((6, 9), float("nan"), device=device)), "NaN"),
        (lambda: matta_loss(z, z, ids, weights=(1, 1)), "three"),
        (lambda: matta_loss(z, z, ids, weights=(1, -1, 1)), "three"),
        (lambda: matta_loss(z, z, ids, ramp=1.5), "ramp"),
        (lambda: matta_loss(z, z, ids, temperature=0.0), "temperature"),
        (lambda: matta_loss(z.long(), z, ids), "floating-point"),
        (lambda: MatTALoss(rampup="cosine"), "rampup must be one of"),
        (lambda: MatTALoss(rampup_steps=-1), "rampup_steps"),
        (lambda: MatTALoss(temperature=-2), "temperature"),
        (lambda: ramp_value(1.5, rampup_steps=3), "step"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="ignore_index"):
        matta_loss(z, z, ids, ignore_index=1.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN
def test_nan_raises_and_never_reaches_a_gradient(backend, device):
    z_s, z_ta, target, _ = random_case((15,), 37, False, device)
    ignored_row = int((target == -100).nonzero()[0])
    for row in (0, ignored_row):
        for bad in (z_s, z_ta):
            poisoned = bad.detach().clone()
            poisoned[row, 3] = float("nan")
            args = (poisoned, z_ta) if bad is z_s else (z_s, poisoned)
            with pytest.raises(ValueError, match="not finite"):
                matta_loss(*args, target)
    inf = z_s.detach().clone()
    inf[1, 1] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        matta_loss(inf, z_ta, target)
