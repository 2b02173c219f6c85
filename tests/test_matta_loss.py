"""MatTALoss / matta_loss against a float64 oracle, the Triton row pass against its PyTorch
twin (at the interpreter's block and at the GPU's), target layouts, the ramp schedules,
value checks without a host sync, and bad inputs."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import launches

from matta.losses import RAMP_SCHEDULES, MatTALoss, MatTALossOutput, ramp_value
from matta.ops import DeferredReport
from matta.ops.matta_loss import _rows_torch, matta_loss, matta_loss_reference

ROW_KERNEL = "matta_loss_rows"
GPU_BLOCK_V = 4096  # kernels.matta_loss.GPU_BLOCK_V (not imported: Triton may be missing)
# Three vocabulary blocks at the GPU's block, the last one partial.
GPU_BLOCK_VOCAB = 2 * GPU_BLOCK_V + 357


def kernel_launches(expected, name=ROW_KERNEL):
    return launches(expected, name)


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
    same precision: values and the three parts (fp32 outputs, + floor relative: fp32 math),
    and both logit gradients (+ floor, but none for 16-bit gradients, so no error can hide
    in it)."""
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
        sixteen_bit = z.dtype in (torch.float16, torch.bfloat16)
        assert rel(g, w) <= 2 * rel(r, w) + (0.0 if sixteen_bit else floor)
        if sixteen_bit:
            # The gradients are fp32 math rounded once: within 2x of that rounding alone,
            # a bound that a 1% error cannot meet (PyTorch's own 16-bit error is ~3x larger).
            assert rel(g, w) <= 2 * rel(w.to(z.dtype), w)


def uses_kernel(backend, dtype=torch.float32):
    return backend == "triton" and dtype in (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_float64_oracle(backend, device, soft, tau):
    shape, n_classes = ((3, 5), 97) if backend == "triton" else ((5, 13), 301)  # the interpreter is slow
    z_s, z_ta, target, weights = random_case(shape, n_classes, soft, device)
    with kernel_launches(uses_kernel(backend)):
        check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.7, tau=tau)


def with_rising_logits(z):
    """Logits that rise along the vocabulary, so every block's max beats the previous one's
    and the online softmax must rescale its running sum at each new block."""
    ramp = torch.linspace(0.0, 4.0, z.shape[-1], device=z.device, dtype=z.dtype)
    return (z.detach() + ramp).requires_grad_()


@pytest.mark.parametrize("soft, tau", [(False, 1.0), (False, 2.0), (True, 1.0), (True, 0.7)])
def test_gpu_block_size(device, monkeypatch, knobs, soft, tau):
    """The row kernel at the GPU's vocabulary block, over three blocks (the last partial)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    knobs(loss_block_v=GPU_BLOCK_V)
    z_s, z_ta, target, weights = random_case((5,), GPU_BLOCK_VOCAB, soft, device, n_ignored=1)
    z_s, z_ta = with_rising_logits(z_s), with_rising_logits(z_ta)
    with kernel_launches(True):
        check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.9, tau=tau)
    # Under no_grad the kernel takes its one-pass variant (sum q_TA z_S kept online), though
    # the logits require grad.
    from matta.kernels import matta_loss as kernel

    write_grad = []
    real = kernel.matta_loss_rows
    monkeypatch.setattr(kernel, "matta_loss_rows", lambda *a, **kw: write_grad.append(kw["write_grad"]) or real(*a, **kw))
    want, want_parts = oracle(z_s, z_ta, target, weights, 0.9, tau)
    with torch.no_grad():
        out = matta_loss(z_s, z_ta, target, weights=weights, ramp=0.9, temperature=tau)
    assert write_grad == [False]
    for got, w in zip(out[:4], [want, *want_parts]):
        assert abs(got.item() - w.item()) <= 1e-5 * abs(w.item())


def test_float64_is_exact(device):
    z_s, z_ta, target, weights = random_case((41,), 203, False, device, dtype=torch.float64)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.3, tau=1.7, floor=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    z_s, z_ta, target, weights = random_case((17 if backend == "triton" else 37,), 97, False, device, dtype=dtype)
    with kernel_launches(uses_kernel(backend, dtype)):
        check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=1.0, tau=2.0)


def test_bf16_at_gpu_block_size(device, monkeypatch, knobs):
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    knobs(loss_block_v=GPU_BLOCK_V)
    z_s, z_ta, target, weights = random_case((4,), GPU_BLOCK_VOCAB, True, device, dtype=torch.bfloat16)
    with kernel_launches(True):
        check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=0.5, tau=1.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row
@pytest.mark.parametrize("block_v", [None, GPU_BLOCK_V])
def test_rows_kernel_matches_torch_pass(device, monkeypatch, block_v):
    """The Triton row pass against its PyTorch twin (`_rows_torch`), on poisoned outputs."""
    pytest.importorskip("triton")
    from matta.kernels import matta_loss as kernel
    from matta.ops.backend import triton_interpreting

    rows, n_classes = (11, 97) if block_v is None else (4, GPU_BLOCK_VOCAB)
    tolerance = dict(rtol=1e-5 if block_v is None else 1e-4, atol=1e-5)  # fp32 sums over 97 or 8549 classes
    scale = torch.full((1,), 1 / 7, device=device)
    transposed = torch.softmax(torch.randn(n_classes, rows, device=device), 0).t()  # strides (1, rows)
    for hard, tau, write_grad, y_soft in [(True, 1.0, True, None), (False, 1.9, True, None),
                                          (True, 0.6, False, None), (False, 1.0, True, transposed),
                                          (False, 2.2, False, transposed)]:
        z_s, z_ta = (4 * torch.randn(2, rows, n_classes, device=device)).unbind()
        if hard:
            y = torch.randint(0, n_classes, (rows,), device=device)
            y[::3] = -100
            z_s[3] = float("nan")  # an ignored row: its garbage must not reach loss or gradient
        else:
            y = torch.softmax(torch.randn(rows, n_classes, device=device), -1) if y_soft is None else y_soft
        config = dict(hard=hard, ignore_index=-100, w_s=0.8, w_ta=1.3, w_d=0.45, temperature=tau,
                      write_grad=write_grad)
        results = []
        for run in (lambda *a: kernel.matta_loss_rows(*a, interpreting=triton_interpreting(), block_v=block_v,
                                                      **config),
                    lambda *a: _rows_torch(*a, **config)):
            zs, zta = z_s.clone(), z_ta.clone()
            out = torch.full((rows, 4), float("nan"), device=device)
            with kernel_launches(not results):  # the kernel first, then its twin
                run(zs, zta, y, out, scale)
            results.append((zs, zta, out))
        (ks, kta, kout), (ts, tta, tout) = results
        torch.testing.assert_close(kout[:, :3], tout[:, :3], **tolerance)
        assert not hard or torch.isnan(kout[3, 3]) and torch.isnan(tout[3, 3])
        keep = ~torch.isnan(tout[:, 3])
        torch.testing.assert_close(kout[keep, 3], tout[keep, 3], **tolerance)
        if write_grad:
            torch.testing.assert_close(ks[keep], ts[keep], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(kta, tta, rtol=1e-5, atol=1e-7)
            if hard:  # ignored rows: zero, even the one with NaN logits
                assert (ks[::3] == 0).all() and (kta[::3] == 0).all()
        else:  # the kernel leaves the logits alone (the PyTorch pass uses them as scratch)
            torch.testing.assert_close(ks, z_s, equal_nan=True)
            torch.testing.assert_close(kta, z_ta)


def soft_target_layouts(rows, n_classes, device, dtype=torch.float32):
    """The same kind of soft target in every layout a caller may hand over."""
    probs = torch.softmax(2 * torch.randn(rows, n_classes, device=device), -1).to(dtype)
    return {
        "contiguous": probs,
        "transposed": probs.t().contiguous().t(),  # strides (1, rows)
        "column_step": torch.stack([probs, torch.zeros_like(probs)], -1)[..., 0],  # strides (2V, 2)
        "broadcast_row": probs[:1].expand(rows, n_classes),  # strides (0, 1): one teacher row for all
        "uniform": torch.full((rows, 1), 1.0 / n_classes, device=device, dtype=dtype).expand(rows, n_classes),
        "one_value": torch.full((1, 1), 1.0 / n_classes, device=device, dtype=dtype).expand(rows, n_classes),
    }


@pytest.mark.parametrize("layout", ["transposed", "column_step", "broadcast_row", "uniform", "one_value"])
@pytest.mark.parametrize("block_v", [None, GPU_BLOCK_V])
def test_soft_target_any_strides(device, monkeypatch, knobs, layout, block_v):
    """Every target layout gives what its contiguous copy gives, on both paths, vs the oracle."""
    pytest.importorskip("triton")
    knobs(loss_block_v=block_v)
    rows, n_classes = (7, 101) if block_v is None else (3, GPU_BLOCK_VOCAB)
    target = soft_target_layouts(rows, n_classes, device)[layout]
    z_s, z_ta, _, weights = random_case((rows,), n_classes, True, device)
    want, _ = oracle(z_s, z_ta, target, weights, 1.0, 1.5)
    z64 = [z.detach().double().requires_grad_() for z in (z_s, z_ta)]
    want_grads = torch.autograd.grad(oracle(*z64, target, weights, 1.0, 1.5)[0], z64)
    results = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("MATTA_BACKEND", path)
        for name, y in (("given", target), ("contiguous", target.contiguous())):
            with kernel_launches(path == "triton"):
                out = matta_loss(z_s, z_ta, y, weights=weights, temperature=1.5)
                results[path, name] = (out.loss, *torch.autograd.grad(out.loss, (z_s, z_ta)))
    for key, (loss, g_s, g_ta) in results.items():
        assert abs(loss.item() - want.item()) <= 1e-5 * want.item(), key
        assert rel(g_s, want_grads[0]) <= 1e-5 and rel(g_ta, want_grads[1]) <= 1e-5, key
    for a, b in zip(results["triton", "given"], results["triton", "contiguous"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_what_target_layout_reaches_the_kernel(device, monkeypatch):
    """A broadcast target (here bf16) reaches the kernel as one fp32 row, still broadcast (an
    R x V copy would cost as much as the logits); a transposed one as one contiguous copy (the
    kernel reads the target twice, and strided reads waste most of each memory transaction)."""
    pytest.importorskip("triton")
    from matta.kernels import matta_loss as kernel

    seen = []
    real = kernel.matta_loss_rows
    monkeypatch.setattr(kernel, "matta_loss_rows", lambda z_s, z_ta, y, *a, **kw: seen.append(y) or real(z_s, z_ta, y, *a, **kw))
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    z_s, z_ta, _, weights = random_case((9,), 53, True, device)
    for dtype, layout in ((torch.bfloat16, "broadcast_row"), (torch.float32, "transposed")):
        target = soft_target_layouts(9, 53, device, dtype)[layout]
        out = matta_loss(z_s, z_ta, target, weights=weights)
        y = seen.pop()
        assert y.dtype == torch.float32
        if layout == "broadcast_row":
            assert y.stride() == (0, 1) and y.untyped_storage().nbytes() == 53 * 4
        else:
            assert y.is_contiguous()
        want, _ = oracle(z_s, z_ta, target, weights, 1.0, 1.0)
        assert abs(out.loss.item() - want.item()) <= 1e-5 * want.item()


def test_ignore_index_and_all_ignored(backend, device):
    z_s, z_ta, target, weights = random_case((29,), 53, False, device, n_ignored=9)
    with kernel_launches(uses_kernel(backend)):
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
    with kernel_launches(uses_kernel(backend)):
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


def test_backward_twice_is_refused(device):
    z_s, z_ta, target, _ = random_case((5,), 11, False, device)
    out = matta_loss(z_s, z_ta, target)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


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


def test_interpret_block_v_knob(device, monkeypatch, knobs):
    from matta.ops.backend import BackendError, KernelKnobs

    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    z_s, z_ta, target, weights = random_case((3,), 40, False, device)
    for bad in ("abc", "100", "0", "8", "131072", "-64", "64,64"):
        with pytest.raises(BackendError, match="MATTA_INTERPRET_BLOCK_V"):
            KernelKnobs.from_environment({"MATTA_INTERPRET_BLOCK_V": bad})
    assert KernelKnobs.from_environment({"MATTA_INTERPRET_BLOCK_V": " "}).loss_block_v is None  # the default
    assert KernelKnobs.from_environment({"MATTA_INTERPRET_BLOCK_V": "64"}).loss_block_v == 64
    want, _ = oracle(z_s, z_ta, target, (1, 1, 1), 1.0, 1.0)
    for block in (None, 16, 64):
        knobs(loss_block_v=block)
        with kernel_launches(True):
            loss = matta_loss(z_s, z_ta, target).loss
        assert abs(loss.item() - want.item()) <= 1e-5 * want.item()


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
    for step in (0, 3, 6, 11, 50, None):
        out = criterion(z_s, z_ta, target, step=step)
        r = ramp_value(step, rampup_steps=8, rampup_start=3, schedule=schedule)
        assert out.ramp == r == criterion.ramp_at(step)
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
# No host sync; bad input.


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    """Every way of reading a tensor's value on the host raises inside the block."""
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called: a host sync in the step")
        return read

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize("soft", [False, True])
def test_no_host_sync_in_forward_and_backward(backend, device, monkeypatch, soft):
    z_s, z_ta, target, weights = random_case((4, 5), 37, soft, device)
    target_bad = torch.full_like(target, 0.5) if soft else torch.full_like(target, 99)
    report = DeferredReport()
    with host_reads_forbidden(monkeypatch), kernel_launches(uses_kernel(backend)):
        out = matta_loss(z_s, z_ta, target, weights=weights, ramp=0.5, temperature=1.3, report=report)
        out.loss.backward()
        bad = matta_loss(z_s.detach(), z_ta, target_bad, report=report)  # a failing value check does not read either
        with torch.no_grad():
            matta_loss(z_s, z_ta, target, report=report)
    assert torch.isnan(bad.loss) and torch.isnan(bad.student)
    with pytest.raises(ValueError, match="sum to 1" if soft else r"class ids must be in \[0, 37\)"):
        report.check()
    want, _ = oracle(z_s, z_ta, target, weights, 0.5, 1.3)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * want.item()


def test_bad_inputs(device):
    z = torch.randn(6, 9, device=device)
    ids = torch.randint(0, 9, (6,), device=device)
    eager = [
        (lambda: matta_loss(z, torch.randn(6, 8, device=device), ids), "same shape"),
        (lambda: matta_loss(z, z, ids.float()), "integer"),
        (lambda: matta_loss(z, z, ids[:5]), "class ids of shape"),
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
    for call, message in eager:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="ignore_index"):
        matta_loss(z, z, ids, ignore_index=1.5)

    shift = torch.zeros(6, 9, device=device)
    shift[:, 0], shift[:, 1] = -1.5, 1.5  # rows still sum to 1, one entry below 0
    on_device = [
        (torch.full((6,), 9, device=device), r"in \[0, 9\)"),
        (-torch.ones(6, dtype=torch.long, device=device), "ignore_index=-100"),
        (torch.rand(6, 9, device=device), "sum to 1"),
        (torch.softmax(z, -1) + shift, "negative"),
        (torch.full((6, 9), float("nan"), device=device), "NaN"),
    ]
    report = DeferredReport()
    for target, message in on_device:
        logits = z.clone().requires_grad_()
        out = matta_loss(logits, z, target, report=report)
        out.loss.backward()
        assert all(torch.isnan(t) for t in out[:4]) and torch.isnan(logits.grad).all()
        with pytest.raises(ValueError, match=message):
            report.check()
        report.check()  # read and cleared


def test_checks_collect_until_read(device):
    z = torch.randn(6, 9, device=device)
    report = DeferredReport()
    matta_loss(z, z, torch.full((6,), 9, device=device), report=report)
    matta_loss(z, z, torch.rand(6, 9, device=device), report=report)
    good = matta_loss(z, z, torch.randint(0, 9, (6,), device=device), report=report)
    assert torch.isfinite(good.loss)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 9\).*; soft target rows must sum to 1"):
        report.check()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN
def test_nan_is_reported_and_never_reaches_a_gradient(backend, device):
    z_s, z_ta, target, _ = random_case((15,), 37, False, device)
    ignored_row = int((target == -100).nonzero()[0])
    cases = [(row, bad, float("nan")) for row in (0, ignored_row) for bad in ("s", "ta")] + [(1, "s", float("inf"))]
    for row, which, value in cases:
        logits = {"s": z_s.detach().clone(), "ta": z_ta.detach().clone()}
        logits[which][row, 3] = value
        for t in logits.values():
            t.requires_grad_()
        report = DeferredReport()
        with kernel_launches(uses_kernel(backend)):
            out = matta_loss(logits["s"], logits["ta"], target, report=report)
        out.loss.backward()
        assert torch.isnan(out.loss)
        assert torch.isnan(logits["s"].grad).all() and torch.isnan(logits["ta"].grad).all()
        with pytest.raises(ValueError, match="not finite"):
            report.check()
