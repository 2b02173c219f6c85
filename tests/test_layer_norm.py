"""The fused residual add + LayerNorm op against plain PyTorch and a float64 oracle, its
PyTorch path against unfused model code bit for bit, and its use in the nested GPT-2."""
import pytest
import torch
import torch.nn.functional as F

from matta.ops.backend import BackendError
from matta.ops.layer_norm import layer_norm, layer_norm_reference

KERNELS = ("layer_norm.forward", "layer_norm.backward", "layer_norm.param_grads")
# Floors under the 2x rule: in fp32 both may be exact to a few ulps (where a 2x ratio is
# noise); 16-bit errors are set by the output rounding, so no floor.
FLOOR = {torch.float32: 2e-6, torch.float16: 0.0, torch.bfloat16: 0.0}
# (rows, features): odd sizes; 1500 takes the 2048-lane block, 5000 the 8192-lane block whose
# backward keeps its running sums in memory.
SHAPES = [(37, 200), (9, 1500), (5, 5000)]


def rel_err(value, oracle):
    value, oracle = value.double(), oracle.double()
    return ((value - oracle).norm() / oracle.norm().clamp_min(1e-30)).item()


def make_problem(rows, width, *, x_dtype, residual_dtype, device, lead=()):
    def rand(*shape, dtype=x_dtype, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

    # A mean and spread away from 0 and 1, so that dropping either from the kernel shows.
    x = (3.0 + 2.0 * torch.randn(*lead, rows, width, device=device)).to(x_dtype).requires_grad_()
    return {"x": x, "residual": None if residual_dtype is None else rand(*lead, rows, width, dtype=residual_dtype),
            "weight": (1.0 + 0.5 * torch.randn(width, device=device)).to(x_dtype).requires_grad_(),
            "bias": rand(width, scale=0.5)}


def run(fn, problem, eps, out_dtype, grads_out):
    """[s?, y, then the gradient of every tensor input] for upstream gradients grads_out (y's, s's)."""
    out = fn(problem["x"], problem["weight"], problem["bias"], eps, residual=problem["residual"], out_dtype=out_dtype)
    outs = list(out) if problem["residual"] is not None else [out]
    loss = (outs[-1].double() * grads_out[0]).sum()
    if problem["residual"] is not None:
        loss = loss + (outs[0].double() * grads_out[1]).sum()
    inputs = [v for v in problem.values() if v is not None]
    return [*outs, *torch.autograd.grad(loss, inputs)]


def detached_as(problem, dtype=None):
    return {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in problem.items()}


def assert_matches_oracle(problem, out_dtype, *, kernel, check_launches):
    x = problem["x"]
    grads_out = (torch.randn(x.shape, dtype=torch.float64, device=x.device),
                 torch.randn(x.shape, dtype=torch.float64, device=x.device))
    eps = 1e-5
    with check_launches(kernel, *KERNELS):
        got = run(layer_norm, problem, eps, out_dtype, grads_out)
    torch_same = run(layer_norm_reference, detached_as(problem), eps, out_dtype, grads_out)
    oracle = run(layer_norm_reference, detached_as(problem, torch.float64), eps, torch.float64, grads_out)
    assert len(got) == len(torch_same) == len(oracle)
    for i, (g, ref, o) in enumerate(zip(got, torch_same, oracle)):
        assert g.shape == ref.shape and g.dtype == ref.dtype, (i, g.shape, ref.shape, g.dtype, ref.dtype)
        assert torch.isfinite(g).all(), f"output {i} has non-finite values"
        bound = max(2 * rel_err(ref, o), FLOOR[g.dtype])
        assert rel_err(g, o) <= bound, f"output {i}: error {rel_err(g, o):.3g} > {bound:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp32_rows(backend, device, check_launches, shape, residual, out_dtype):
    problem = make_problem(*shape, x_dtype=torch.float32, residual_dtype=torch.float32 if residual else None,
                           device=device)
    assert_matches_oracle(problem, out_dtype, kernel=backend == "triton", check_launches=check_launches)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_autocast_layout_fp32_stream_bf16_residual(backend, device, check_launches, shape):
    """What a block runs under bf16 autocast: an fp32 residual stream, a bf16 branch output
    added to it, bf16 normalised rows; d residual comes back in bf16."""
    problem = make_problem(*shape, x_dtype=torch.float32, residual_dtype=torch.bfloat16, device=device)
    assert_matches_oracle(problem, torch.bfloat16, kernel=backend == "triton", check_launches=check_launches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_half_precision_rows(backend, device, check_launches, dtype, residual):
    problem = make_problem(*SHAPES[0], x_dtype=dtype, residual_dtype=dtype if residual else None, device=device)
    assert_matches_oracle(problem, dtype, kernel=backend == "triton", check_launches=check_launches)


def test_leading_dimensions(backend, device, check_launches):
    problem = make_problem(7, 200, x_dtype=torch.float32, residual_dtype=torch.float32, device=device, lead=(3,))
    assert_matches_oracle(problem, torch.float32, kernel=backend == "triton", check_launches=check_launches)


def test_parameter_gradients_are_deterministic(backend, device):
    """Partial sums reduced in a fixed order: the same bits on every run."""
    problem = make_problem(37, 200, x_dtype=torch.float32, residual_dtype=torch.float32, device=device)
    grads_out = (torch.randn(37, 200, dtype=torch.float64, device=device),) * 2
    first, second = (run(layer_norm, problem, 1e-5, torch.float32, grads_out) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_many_partial_rows(backend, device, check_launches, monkeypatch):
    """As many backward programs as a GPU runs for these rows, so the partial sums take
    several steps of the summing kernel (the last one partial)."""
    kernel = pytest.importorskip("matta.kernels.layer_norm")
    monkeypatch.setattr(kernel, "INTERPRETER_PROGRAMS", 2 * kernel.REDUCE_PARTS + 9)
    problem = make_problem(300, 40, x_dtype=torch.float32, residual_dtype=torch.float32, device=device)
    assert_matches_oracle(problem, torch.float32, kernel=backend == "triton", check_launches=check_launches)


def test_without_parameter_gradients(backend, device, check_launches):
    problem = make_problem(37, 200, x_dtype=torch.float32, residual_dtype=torch.float32, device=device)
    problem["weight"].requires_grad_(False)
    problem["bias"].requires_grad_(False)
    s, y = layer_norm(problem["x"], problem["weight"], problem["bias"], 1e-5, residual=problem["residual"])
    with check_launches(False, "layer_norm.param_grads"):
        dx, dr = torch.autograd.grad(y.sum(), [problem["x"], problem["residual"]])
    s0, y0 = layer_norm_reference(problem["x"], problem["weight"], problem["bias"], 1e-5,
                                  residual=problem["residual"])
    dx0, dr0 = torch.autograd.grad(y0.sum(), [problem["x"], problem["residual"]])
    torch.testing.assert_close(dx, dx0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dr, dr0, rtol=1e-4, atol=1e-5)


def test_empty_rows(backend, device):
    problem = make_problem(0, 200, x_dtype=torch.float32, residual_dtype=torch.float32, device=device)
    s, y = layer_norm(problem["x"], problem["weight"], problem["bias"], 1e-5, residual=problem["residual"])
    assert s.shape == y.shape == (0, 200)
    dw, db = torch.autograd.grad(y.sum() + s.sum(), [problem["weight"], problem["bias"]])
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_gradcheck_float64(device):
    # float64 always takes the PyTorch path; gradcheck checks its hand-written backward.
    problem = make_problem(4, 6, x_dtype=torch.float64, residual_dtype=torch.float64, device=device)

    def fn(x, residual, weight, bias):
        return layer_norm(x, weight, bias, 1e-5, residual=residual)

    assert torch.autograd.gradcheck(fn, list(problem.values()))


# ----------------------------------------------------------------------------------------
# The PyTorch path is the unfused code's arithmetic


def test_torch_path_is_bit_identical_to_unfused_code(device, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    problem = make_problem(37, 96, x_dtype=torch.float32, residual_dtype=torch.float32, device=device, lead=(4,))
    x, residual, weight, bias = problem.values()
    grads_out = torch.randn(2, 4, 37, 96, device=device)
    s, y = layer_norm(x, weight, bias, 1e-5, residual=residual)
    s0 = x + residual
    y0 = F.layer_norm(s0, (96,), weight, bias, 1e-5)
    assert torch.equal(s, s0) and torch.equal(y, y0)
    inputs = list(problem.values())
    got = torch.autograd.grad((y * grads_out[0]).sum() + (s * grads_out[1]).sum(), inputs)
    unfused = torch.autograd.grad((y0 * grads_out[0]).sum() + (s0 * grads_out[1]).sum(), inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, unfused))


def test_nested_block_is_bit_identical_to_unfused_code(device, monkeypatch):
    """NestedBlock with fused norms against the add-then-norm code it replaced (fp32, CPU),
    alone and fed its own output pair (the next block's ln_1 takes the last add)."""
    from matta.models import GPT2Config, NestedGPT2, NestingConfig

    monkeypatch.setenv("MATTA_BACKEND", "torch")
    config = GPT2Config(vocab_size=64, n_positions=16, n_layer=1, n_embd=32, n_head=2, n_inner=64)
    for nest in (NestingConfig(ffn_ta=128), NestingConfig(ffn_ta=128, d_model_ta=48)):
        block = NestedGPT2(config, nest).blocks[0].to(device)
        with torch.no_grad():
            for norm in (block.ln_1, block.ln_2):
                norm.weight.normal_()
                norm.bias.normal_()
        x_ta = torch.randn(2, 16, block.ln_1.weight.shape[0], device=device, requires_grad=True)
        x_s = torch.randn(2, 16, config.n_embd, device=device, requires_grad=True)

        def unfused(x_s, x_ta):
            a_s, a_ta = block.attn(*block.ln_1(x_s, x_ta))
            x_s, x_ta = x_s + block.drop(a_s), x_ta + block.drop(a_ta)
            m_s, m_ta = block.mlp(*block.ln_2(x_s, x_ta))
            return x_s + block.drop(m_s), x_ta + block.drop(m_ta)

        def fused(x_s, x_ta):  # the block leaves its last add to the next norm: pairs (x, r)
            (x_s, r_s), (x_ta, r_ta) = block(x_s, x_ta)
            return x_s + r_s, x_ta + r_ta

        def twice_fused(x_s, x_ta):  # a pair into the block: its ln_1 takes the add
            (x_s, r_s), (x_ta, r_ta) = block(*block(x_s, x_ta))
            return x_s + r_s, x_ta + r_ta

        def twice_unfused(x_s, x_ta):
            return unfused(*unfused(x_s, x_ta))

        params = [x_s, x_ta, *block.parameters()]
        for pair in ((fused, unfused), (twice_fused, twice_unfused)):
            results = []
            for fn in pair:
                y_s, y_ta = fn(x_s, x_ta)
                grads = torch.autograd.grad(y_s.square().sum() + y_ta.square().sum(), params)
                results.append([y_s, y_ta, *grads])
            assert all(torch.equal(a, b) for a, b in zip(*results)), pair[0].__name__


def test_autocast_hands_the_next_dense_op_its_dtype(device):
    """Under autocast the norms write bf16 for the nested Dense ops (no cast pass forward),
    and the residual stream stays fp32."""
    from matta.models import GPT2Config, NestedGPT2, NestingConfig

    config = GPT2Config(vocab_size=64, n_positions=16, n_layer=1, n_embd=32, n_head=2, n_inner=64)
    block = NestedGPT2(config, NestingConfig(ffn_ta=128)).blocks[0].to(device)
    x_s, x_ta = (torch.randn(2, 16, 32, device=device) for _ in range(2))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = block.ln_1.norm_ta(x_ta)
        s, h = block.ln_2.norm_ta(x_ta, torch.randn(2, 16, 32, device=device, dtype=torch.bfloat16))
        (y_s, r_s), (y_ta, r_ta) = block(x_s, x_ta)
        (z_s, _), _ = block((y_s, r_s), (y_ta, r_ta))
    assert y.dtype == h.dtype == torch.bfloat16 and s.dtype == y_s.dtype == y_ta.dtype == z_s.dtype == torch.float32
    assert r_s.dtype == r_ta.dtype == torch.bfloat16  # the FFN's output, added by the next norm


# ----------------------------------------------------------------------------------------
# Bad calls: one line naming the problem


def test_bad_calls(device):
    x, w, b = torch.randn(3, 8, device=device), torch.ones(8, device=device), torch.zeros(8, device=device)
    cases = [
        (lambda: layer_norm(x.long(), w, b, 1e-5), TypeError, "x must be floating point"),
        (lambda: layer_norm(torch.tensor(1.0), w, b, 1e-5), ValueError, "at least one dimension"),
        (lambda: layer_norm(x, torch.ones(7), b, 1e-5), ValueError, r"weight must have shape \(8,\), got \(7,\)"),
        (lambda: layer_norm(x, w, b.double(), 1e-5), TypeError, "bias has dtype torch.float64 but weight"),
        (lambda: layer_norm(x, w, b, 1e-5, residual=torch.randn(3, 9)), ValueError, "residual must have shape"),
        (lambda: layer_norm(x, w, b, 0.0), ValueError, "eps must be a positive number"),
        (lambda: layer_norm(x, w, b, 1e-5, out_dtype=torch.int32), TypeError, "out_dtype must be a floating"),
        (lambda: layer_norm(x, w.to("meta"), b, 1e-5), ValueError, "weight is on meta but x is on"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_triton_backend_refuses_what_the_kernels_do_not_serve(device, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    wide = torch.randn(2, 8193, device=device)
    with pytest.raises(BackendError, match="rows of 8193 features"):
        layer_norm(wide, torch.ones(8193, device=device), torch.zeros(8193, device=device), 1e-5)
    x = torch.randn(2, 16, device=device, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="weight dtype torch.float32 with rows of dtype torch.bfloat16"):
        layer_norm(x, torch.ones(16, device=device), torch.zeros(16, device=device), 1e-5)
