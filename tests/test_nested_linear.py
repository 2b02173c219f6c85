"""NestedLinear and the nested_linear op against slicing + F.linear and a float64 oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matta import NestedLinear, nested_linear, ops
from matta.kernels import LAUNCH_COUNTS
from matta.ops.nested_linear import nested_linear_reference

# (T, M_S, M_TA, N_S, N_TA): odd sizes that straddle the 32-wide interpreter tiles, plus the
# degenerate nestings N_S == N_TA and M_S == M_TA.
SHAPES = [
    (37, 19, 45, 23, 51),
    (5, 33, 33, 17, 70),
    (66, 40, 71, 41, 41),
]
# Floors under the 2x rule, per dtype: in fp32 a kernel and PyTorch may both be exact to
# within a few ulps (errors near 1e-7, where a 2x ratio is noise). 16-bit errors are set by
# the output rounding (~1e-3), so no floor: a 1% scaling of any output must fail.
FLOOR = {torch.float32: 2e-6, torch.float16: 0.0, torch.bfloat16: 0.0}
KERNEL = "nested_linear.matmul"


def rel_err(value, oracle):
    value, oracle = value.double(), oracle.double()
    return ((value - oracle).norm() / oracle.norm().clamp_min(1e-30)).item()


def make_problem(shape, *, one_input, shared, bias, dtype, device, lead=()):
    t, m_s, m_ta, n_s, n_ta = shape
    def rand(*size):
        return torch.randn(*size, dtype=dtype, device=device, requires_grad=True)
    weight = rand(n_ta, m_ta)
    problem = {
        "x_s": rand(*lead, t, m_ta if one_input else m_s),
        "x_ta": None if one_input else rand(*lead, t, m_ta),
        "weight": weight,
        "bias": rand(n_ta) if bias else None,
        "student_weight": None if shared else rand(n_s, m_s),
        "student_bias": rand(n_s) if bias and not shared else None,
    }
    return problem, (n_s, m_s)


def run(fn, problem, student_features, grads_out):
    """Outputs and gradients of every tensor input for upstream gradients grads_out."""
    args = (problem["x_s"], problem["x_ta"], problem["weight"], problem["bias"])
    y_s, y_ta = fn(*args, student_features=student_features, student_weight=problem["student_weight"],
                   student_bias=problem["student_bias"])
    inputs = [v for v in problem.values() if v is not None]
    loss = (y_s.float() * grads_out[0]).sum() + (y_ta.float() * grads_out[1]).sum()
    return [y_s, y_ta, *torch.autograd.grad(loss, inputs)]


def detached_as(problem, dtype):
    return {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in problem.items()}


def assert_matches_oracle(problem, student_features, dtype, *, kernel):
    """Output and gradients vs float64 oracle, within 2x PyTorch's error in `dtype`; `kernel`:
    whether the Triton kernel must have run (forward and backward) or must not have."""
    t_lead = problem["x_s"].shape[:-1]
    n_s, n_ta = student_features[0], problem["weight"].shape[0]
    grads_out = (torch.randn(*t_lead, n_s, device=problem["weight"].device),
                 torch.randn(*t_lead, n_ta, device=problem["weight"].device))
    before = LAUNCH_COUNTS[KERNEL]
    got = run(nested_linear, problem, student_features, grads_out)
    launched = LAUNCH_COUNTS[KERNEL] - before
    assert launched >= 2 if kernel else launched == 0, f"{KERNEL} launched {launched} times (kernel={kernel})"
    torch_same = run(nested_linear_reference, detached_as(problem, dtype), student_features, grads_out)
    oracle = run(nested_linear_reference, detached_as(problem, torch.float64), student_features,
                 [g.double() for g in grads_out])
    assert_within_twice_torch_error(got, torch_same, oracle, dtype)


def assert_within_twice_torch_error(got, torch_same, oracle, dtype):
    """Each of `got` is within 2x the error of PyTorch in `dtype` (`torch_same`) against the
    float64 `oracle` (or the dtype's floor), finite, and of the oracle's shape."""
    assert len(got) == len(oracle)
    for i, (g, ref, o) in enumerate(zip(got, torch_same, oracle)):
        assert g.shape == o.shape and g.dtype == dtype, (i, g.shape, o.shape, g.dtype)
        assert torch.isfinite(g).all(), f"output {i} has non-finite values"
        bound = max(2 * rel_err(ref, o), FLOOR[dtype])
        assert rel_err(g, o) <= bound, f"output {i}: error {rel_err(g, o):.3g} > {bound:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("one_input", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_forward_backward(backend, device, shape, one_input, shared, bias):
    problem, sf = make_problem(shape, one_input=one_input, shared=shared, bias=bias, dtype=torch.float32,
                               device=device)
    assert_matches_oracle(problem, sf, torch.float32, kernel=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("one_input", [False, True])
def test_half_precision(backend, device, dtype, one_input):
    problem, sf = make_problem(SHAPES[0], one_input=one_input, shared=True, bias=True, dtype=dtype, device=device)
    assert_matches_oracle(problem, sf, dtype, kernel=backend == "triton")


@pytest.mark.parametrize("one_input", [False, True])
def test_three_dim_inputs(backend, device, one_input):
    problem, sf = make_problem((7, 19, 45, 23, 51), one_input=one_input, shared=True, bias=True,
                               dtype=torch.float32, device=device, lead=(3,))
    assert_matches_oracle(problem, sf, torch.float32, kernel=backend == "triton")


def test_non_contiguous_inputs(backend, device):
    t, m_s, m_ta, n_s, n_ta = 29, 13, 35, 21, 40
    x_s = torch.randn(m_s, t, device=device).t().requires_grad_()
    x_ta = torch.randn(t, 2 * m_ta, device=device)[:, ::2].requires_grad_()
    weight = torch.randn(m_ta, n_ta, device=device).t().requires_grad_()
    problem = {"x_s": x_s, "x_ta": x_ta, "weight": weight, "bias": None, "student_weight": None,
               "student_bias": None}
    assert not (x_s.is_contiguous() or x_ta.is_contiguous() or weight.is_contiguous())
    assert_matches_oracle(problem, (n_s, m_s), torch.float32, kernel=backend == "triton")


def test_gradcheck_float64(device):
    # float64 always takes the PyTorch path (see matta.ops.nested_linear); gradcheck checks
    # that its hand-written backward is the derivative of its forward.
    for one_input in (False, True):
        problem, sf = make_problem((4, 3, 5, 2, 6), one_input=one_input, shared=True, bias=True,
                                   dtype=torch.float64, device=device)
        args = [v for v in (problem["x_s"], problem["x_ta"], problem["weight"], problem["bias"])]

        def fn(*tensors):
            it = iter(tensors)
            x_s = next(it)
            x_ta = None if one_input else next(it)
            return nested_linear(x_s, x_ta, next(it), next(it), student_features=sf)

        assert torch.autograd.gradcheck(fn, [a for a in args if a is not None])


def test_gradcheck_unshared_float64(device):
    problem, sf = make_problem((4, 3, 5, 2, 6), one_input=False, shared=False, bias=True, dtype=torch.float64,
                               device=device)
    names = ["x_s", "x_ta", "weight", "bias", "student_weight", "student_bias"]

    def fn(x_s, x_ta, weight, bias, student_weight, student_bias):
        return nested_linear(x_s, x_ta, weight, bias, student_features=sf, student_weight=student_weight,
                             student_bias=student_bias)

    assert torch.autograd.gradcheck(fn, [problem[n] for n in names])


@pytest.mark.parametrize("frozen", ["x", "weight", "bias"])
def test_partial_requires_grad(backend, device, check_launches, frozen):
    layer = NestedLinear((9, 21), (11, 30), device=device)
    x_s = torch.randn(13, 9, device=device, requires_grad=frozen != "x")
    x_ta = torch.randn(13, 21, device=device, requires_grad=frozen != "x")
    getattr(layer, frozen if frozen != "x" else "weight").requires_grad_(frozen == "x")
    with check_launches(backend == "triton", KERNEL):
        y_s, y_ta = layer(x_s, x_ta)
        (y_s.sum() + y_ta.square().sum()).backward()
    ref_s, ref_ta = nested_linear_reference(x_s.detach(), x_ta.detach(), layer.weight.detach(),
                                            layer.bias.detach(), student_features=(11, 9))
    torch.testing.assert_close(y_ta, ref_ta, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        param = getattr(layer, name)
        assert (param.grad is None) == (name == frozen)
    if frozen == "x":
        assert x_s.grad is None and x_ta.grad is None
    else:
        expected_dx_s = torch.ones(13, 11, device=device) @ layer.weight.detach()[:11, :9]
        torch.testing.assert_close(x_s.grad, expected_dx_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_input", [False, True])
def test_empty_batch(backend, device, one_input):
    layer = NestedLinear((4, 6), (3, 5), device=device)
    x = torch.randn(0, 6, device=device, requires_grad=True)
    y_s, y_ta = layer(x) if one_input else layer(torch.randn(0, 4, device=device, requires_grad=True), x)
    assert y_s.shape == (0, 3) and y_ta.shape == (0, 5)
    (y_s.sum() + y_ta.sum()).backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


# --------------------------------------------------------------------------------------
# The module.


def test_student_block_is_a_view_of_the_weight(device):
    layer = NestedLinear((3, 5), (4, 7), device=device)
    x = torch.randn(2, 5, device=device)
    y_s, _ = layer(x)
    with torch.no_grad():
        layer.weight[4:].add_(1.0)  # TA-only rows
        layer.weight[:4, 3:].add_(1.0)  # TA-only columns
    torch.testing.assert_close(layer(x)[0], y_s)
    with torch.no_grad():
        layer.weight[:4, :3].add_(1.0)
    assert not torch.allclose(layer(x)[0], y_s)


def test_plain_linear_copies_compute_the_same(backend, device, check_launches):
    for shared in (True, False):
        layer = NestedLinear((6, 10), (5, 12), share_weights=shared, device=device)
        x_s, x_ta = torch.randn(7, 6, device=device), torch.randn(7, 10, device=device)
        with check_launches(backend == "triton", KERNEL):
            y_s, y_ta = layer(x_s, x_ta)
        student, ta = layer.student_linear(), layer.ta_linear()
        assert isinstance(student, nn.Linear) and (student.in_features, student.out_features) == (6, 5)
        torch.testing.assert_close(student(x_s), y_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ta(x_ta), y_ta, rtol=1e-5, atol=1e-6)
        # copies, not views
        with torch.no_grad():
            student.weight.zero_()
        assert layer.weight.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_from_linear_copies_exactly(device, shared):
    linear = nn.Linear(6, 5, device=device)
    layer = NestedLinear.from_linear(linear, in_features=(6, 10), out_features=(5, 12), share_weights=shared)
    student = layer.student_linear()
    assert torch.equal(student.weight, linear.weight) and torch.equal(student.bias, linear.bias)
    assert torch.equal(layer.weight[:5, :6], linear.weight)
    # The TA starts as the Student on the shared units (extra inputs of Student rows are zero).
    assert torch.count_nonzero(layer.weight[:5, 6:]) == 0
    x = torch.randn(3, 10, device=device)
    _, y_ta = layer(x)
    torch.testing.assert_close(y_ta[:, :5], linear(x[:, :6]))
    with pytest.raises(ValueError, match="maps 6 -> 5"):
        NestedLinear.from_linear(linear, in_features=(4, 10), out_features=(5, 12))


def test_initialisation_scales(device):
    layer = NestedLinear((16, 400), (32, 64), device=device)
    student_bound = 1 / 16**0.5
    assert layer.weight[:32, :16].abs().max() <= student_bound
    assert layer.weight[:32, :16].abs().max() > 0.5 * student_bound
    assert layer.weight[32:].abs().max() <= 1 / 400**0.5


@pytest.mark.parametrize(
    "in_features, out_features, match",
    [
        ((5, 4), (2, 3), "Student size \\(5\\) must not exceed the TA size \\(4\\)"),
        ((2, 4), (4, 3), "Student size \\(4\\) must not exceed the TA size \\(3\\)"),
        ((0, 4), (2, 3), "must be positive"),
        ((2, 4), (-1, 3), "must be positive"),
    ],
)
def test_bad_construction(in_features, out_features, match):
    with pytest.raises(ValueError, match=match):
        NestedLinear(in_features, out_features)


def test_bad_construction_type():
    with pytest.raises(TypeError, match="pair"):
        NestedLinear(4, (2, 3))


def test_bad_calls(device):
    layer = NestedLinear((3, 5), (4, 7), device=device)
    with pytest.raises(ValueError, match="x must have last dimension 5, got shape \\(2, 3\\)"):
        layer(torch.randn(2, 3, device=device))
    with pytest.raises(ValueError, match="x_s must have last dimension 3"):
        layer(torch.randn(2, 4, device=device), torch.randn(2, 5, device=device))
    with pytest.raises(ValueError, match="x_ta must have last dimension 5"):
        layer(torch.randn(2, 3, device=device), torch.randn(2, 6, device=device))
    with pytest.raises(ValueError, match="leading dimensions \\(3,\\) but x_s has \\(2,\\)"):
        layer(torch.randn(2, 3, device=device), torch.randn(3, 5, device=device))
    with pytest.raises(TypeError, match="dtype torch.float64 but the weight has dtype torch.float32"):
        layer(torch.randn(2, 5, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="is on meta but the weight is on"):
        layer(torch.randn(2, 5, device="meta"))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        layer([[1.0] * 5])
    with pytest.raises(ValueError, match="student_bias needs student_weight"):
        nested_linear(torch.randn(2, 5), None, torch.randn(7, 5), student_features=(4, 3),
                      student_bias=torch.randn(4))
    with pytest.raises(ValueError, match="N_S must be in \\[1, N_TA=7\\], got 8"):
        nested_linear(torch.randn(2, 5), None, torch.randn(7, 5), student_features=(8, 3))


def test_cpu_autocast_runs_in_bf16():
    layer = NestedLinear((8, 16), (12, 24))
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_s, y_ta = layer(x)
    assert y_s.dtype == y_ta.dtype == torch.bfloat16
    (y_s.float().sum() + y_ta.float().sum()).backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # Inputs that an earlier op under autocast already made bf16 meet fp32 parameters.
    x_s, x_ta = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_s, y_ta = layer(x_s, x_ta)
    ref_s, ref_ta = nested_linear_reference(x_s.float(), x_ta.float(), layer.weight, layer.bias,
                                            student_features=(12, 8))
    torch.testing.assert_close(y_s.float(), ref_s, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y_ta.float(), ref_ta, rtol=3e-2, atol=3e-2)


def test_torch_compile_sees_one_op():
    """A compiled model with a NestedLinear runs, matches eager, and keeps the op whole."""
    from torch._dynamo.testing import CompileCounterWithBackend

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = NestedLinear((8, 8), (12, 20))
            self.down = NestedLinear((12, 20), (8, 8))

        def forward(self, x):
            h_s, h_ta = self.up(x)
            return self.down(torch.relu(h_s), torch.relu(h_ta))

    model = Model()
    x = torch.randn(2, 5, 8, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    outs = compiled(x)
    (outs[0].sum() + outs[1].sum()).backward()
    assert counter.frame_count == 1
    for got, ref in zip(outs, model(x)):
        torch.testing.assert_close(got, ref)
    grad = x.grad.clone()
    x.grad = None
    ref = model(x)
    (ref[0].sum() + ref[1].sum()).backward()
    torch.testing.assert_close(grad, x.grad)


def test_torch_compile_inductor_cpu():
    layer = NestedLinear((8, 16), (12, 24))
    x = torch.randn(6, 16)
    compiled = torch.compile(layer, fullgraph=True)
    for got, ref in zip(compiled(x), layer(x)):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("used", ["student", "ta"])
def test_backward_through_one_output(backend, device, check_launches, used):
    layer = NestedLinear((6, 10), (5, 12), device=device)
    x_s = torch.randn(9, 6, device=device, requires_grad=True)
    x_ta = torch.randn(9, 10, device=device, requires_grad=True)
    with check_launches(backend == "triton", KERNEL):
        y = layer(x_s, x_ta)[0 if used == "student" else 1]
        y.square().sum().backward()
    inputs = (x_s, x_ta, layer.weight, layer.bias)
    got = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in inputs]
    ref = nested_linear_reference(x_s, x_ta, layer.weight, layer.bias, student_features=(5, 6))
    expected = torch.autograd.grad(ref[0 if used == "student" else 1].square().sum(), inputs, allow_unused=True)
    for g, e, t in zip(got, expected, inputs):
        torch.testing.assert_close(g, torch.zeros_like(t) if e is None else e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# linear: one stream's Dense layer (the TA alone, the Student alone).


def _one_stream(t, m, n, *, bias=True, dtype=torch.float32, device="cpu", lead=(), strided=False):
    """x (..., T, M), weight (N, M) (with `strided`, a leading block of a larger weight, as
    the Student's shared block is), bias (N,) or None."""
    def rand(*size):
        return torch.randn(*size, device=device).to(dtype).requires_grad_()

    weight = rand(n + 5, m + 3)[:n, :m] if strided else rand(n, m)
    return rand(*lead, t, m), weight, rand(n) if bias else None


def _run_linear(fn, inputs, grad_out):
    y = fn(*inputs)
    tensors = [v for v in inputs if v is not None]
    return [y, *torch.autograd.grad((y.float() * grad_out).sum(), tensors)]


def _assert_linear_matches_oracle(inputs, dtype, *, kernel):
    grad_out = torch.randn(*inputs[0].shape[:-1], inputs[1].shape[0], device=inputs[0].device)
    before = LAUNCH_COUNTS[KERNEL]
    got = _run_linear(ops.linear, inputs, grad_out)
    launched = LAUNCH_COUNTS[KERNEL] - before
    assert launched == (3 if kernel else 0), launched  # forward, input gradient, weight gradient + bias sums

    def detached(to):
        return [None if v is None else v.detach().to(to).requires_grad_() for v in inputs]

    torch_same = _run_linear(F.linear, detached(dtype), grad_out)
    oracle = _run_linear(F.linear, detached(torch.float64), grad_out.double())
    assert_within_twice_torch_error(got, torch_same, oracle, dtype)


@pytest.mark.parametrize("shape", [(37, 45, 71), (9, 97, 33)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_one_stream_linear_fp32(backend, device, shape, bias, strided):
    inputs = _one_stream(*shape, bias=bias, device=device, lead=(2,), strided=strided)
    _assert_linear_matches_oracle(inputs, torch.float32, kernel=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_stream_linear_half_precision(backend, device, dtype):
    _assert_linear_matches_oracle(_one_stream(37, 45, 71, dtype=dtype, device=device), dtype,
                                  kernel=backend == "triton")


def test_one_stream_linear_pytorch_path_is_f_linear(monkeypatch, device):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    inputs = _one_stream(37, 45, 71, device=device, lead=(3,), strided=True)
    grad_out = torch.randn(3, 37, 71, device=device)
    got = _run_linear(ops.linear, inputs, grad_out)
    want = _run_linear(F.linear, inputs, grad_out)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_one_stream_linear_under_autocast(backend, device):
    """Under autocast: 16-bit outputs, and fp32 parameter gradients with the bits of the 16-bit
    ones cast up (what F.linear under autocast gives)."""
    x, weight, bias = _one_stream(37, 45, 71, device=device)
    x = x.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ops.linear(x, weight, bias)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), [x, weight, bias])
    y_ref = F.linear(x, weight.to(torch.bfloat16), bias.to(torch.bfloat16))
    want = torch.autograd.grad(y_ref.float().square().sum(), [x, weight, bias])
    if backend == "torch":
        assert torch.equal(y, y_ref) and all(torch.equal(g, w) for g, w in zip(grads, want))
    else:  # the kernel's own products, within bf16's rounding of them
        assert all(g.dtype == w.dtype for g, w in zip(grads, want))
        for g, w in zip((y, *grads), (y_ref, *want)):
            assert rel_err(g.float(), w.float()) < 2e-2


def test_one_stream_linear_bad_arguments(monkeypatch, device):
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    pytest.importorskip("triton")
    x, weight, bias = _one_stream(9, 33, 40, device=device)
    with pytest.raises(ValueError, match="bias must have last dimension 40"):
        ops.linear(x, weight, bias[:39])
    with pytest.raises(ValueError, match="x must have last dimension 33"):
        ops.linear(x[..., :32], weight, bias)
    with pytest.raises(TypeError, match="x has dtype torch.float16"):
        ops.linear(x.half(), weight, bias)
    with pytest.raises(TypeError, match="x and weight must be tensors"):
        ops.linear(x, [[1.0]])


def test_autocast_with_float64_parameters(backend, device):
    """Parameters of a dtype the kernels do not write (float64) under autocast: computed in
    the autocast dtype, their gradients cast back, as autograd's casts did."""
    problem, sf = make_problem((9, 19, 45, 23, 71), one_input=True, shared=True, bias=True, dtype=torch.float64,
                               device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y_s, y_ta = nested_linear(problem["x_s"], None, problem["weight"], problem["bias"], student_features=sf)
    assert y_s.dtype == y_ta.dtype == torch.bfloat16
    (y_s.float().sum() + y_ta.float().sum()).backward()
    assert problem["weight"].grad.dtype == problem["bias"].grad.dtype == torch.float64
    assert torch.isfinite(problem["weight"].grad).all()
