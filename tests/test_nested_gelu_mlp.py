"""nested_gelu_mlp (two nested Dense layers with GELU in their kernels' epilogues) against
two nested_linear_reference calls around F.gelu and a float64 oracle, at the interpreter's
tiles and at every tile shape a GPU launches; its PyTorch path gives the bits of the
unfused layers (what the README demo and any CPU run compute)."""
import pytest
import torch
import torch.nn.functional as F

from matta import NestedLinear
from matta.kernels import LAUNCH_COUNTS
from matta.ops import gelu_mlp, nested_gelu_mlp, nested_gelu_mlp_reference
from test_nested_linear import KERNEL, assert_within_twice_torch_error, rel_err
from test_nested_linear_tiles import CONFIGS, kernel, pinned  # noqa: F401 (a fixture)

GELU_OUT, GELU_GRAD = "nested_linear.matmul.gelu_out", "nested_linear.matmul.gelu_grad"


def make_mlp(t, d_s, d_ta, f_s, f_ta, *, shared=True, bias=True, dtype=torch.float32, device="cpu", lead=()):
    """Inputs and the two layers' parameters of an FFN d -> f -> d, Student (d_s, f_s)."""
    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()

    def layer(n_s, m_s, n_ta, m_ta):
        scale = m_ta ** -0.5  # unit-scale pre-activations: GELU's curved part, not its linear tails
        return {"weight": rand(n_ta, m_ta, scale=scale), "bias": rand(n_ta) if bias else None,
                "student_features": (n_s, m_s),
                "student_weight": None if shared else rand(n_s, m_s, scale=m_s ** -0.5),
                "student_bias": rand(n_s) if bias and not shared else None}

    return rand(*lead, t, d_s), rand(*lead, t, d_ta), layer(f_s, d_s, f_ta, d_ta), layer(d_s, f_s, d_ta, f_ta)


def _detached(x_s, x_ta, fc, proj, dtype):
    def cast(v):
        return v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v

    return cast(x_s), cast(x_ta), {k: cast(v) for k, v in fc.items()}, {k: cast(v) for k, v in proj.items()}


def run(fn, x_s, x_ta, fc, proj, grads_out):
    """Outputs and the gradients of every tensor input."""
    y_s, y_ta = fn(x_s, x_ta, fc, proj)
    inputs = [x_s, x_ta] + [v for layer in (fc, proj) for v in layer.values() if isinstance(v, torch.Tensor)]
    loss = (y_s.float() * grads_out[0]).sum() + (y_ta.float() * grads_out[1]).sum()
    return [y_s, y_ta, *torch.autograd.grad(loss, inputs)]


def assert_matches_oracle(x_s, x_ta, fc, proj, dtype, *, kernel):
    """Outputs and gradients vs float64, within 2x PyTorch's error in `dtype`; with `kernel`
    the fused epilogues must have run (forward and backward), without it no kernel at all."""
    grads_out = (torch.randn(*x_s.shape[:-1], proj["student_features"][0], device=x_s.device),
                 torch.randn(*x_s.shape[:-1], proj["weight"].shape[0], device=x_s.device))
    before = LAUNCH_COUNTS[KERNEL], LAUNCH_COUNTS[GELU_OUT], LAUNCH_COUNTS[GELU_GRAD]
    got = run(nested_gelu_mlp, x_s, x_ta, fc, proj, grads_out)
    launched = [LAUNCH_COUNTS[name] - b for name, b in zip((KERNEL, GELU_OUT, GELU_GRAD), before)]
    # fc and proj forward, proj's input and weight gradients, fc's input and weight gradients
    assert launched == ([6, 1, 1] if kernel else [0, 0, 0]), launched
    torch_same = run(nested_gelu_mlp_reference, *_detached(x_s, x_ta, fc, proj, dtype), grads_out)
    oracle = run(nested_gelu_mlp_reference, *_detached(x_s, x_ta, fc, proj, torch.float64),
                 [g.double() for g in grads_out])
    assert_within_twice_torch_error(got, torch_same, oracle, dtype)


# (T, d_s, d_ta, f_s, f_ta): odd sizes over several 32-wide interpreter tiles; d and f nested
# or not.
SHAPES = [(37, 19, 45, 23, 71), (50, 33, 33, 40, 40), (9, 40, 71, 65, 97)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32(backend, device, shape, shared, bias):
    problem = make_mlp(*shape, shared=shared, bias=bias, device=device)
    assert_matches_oracle(*problem, torch.float32, kernel=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, device, dtype):
    problem = make_mlp(*SHAPES[0], dtype=dtype, device=device, lead=(2,))
    assert_matches_oracle(*problem, dtype, kernel=backend == "triton")


def moved_gelu_launches(kind, tiles, dtype):
    """{tiles: launches} of the two GELU launches that cannot run the pinned tiles and run
    their kind's first config instead (kernel.tile_configs)."""
    precision, size = ("tf32", 4) if kind == "tf32" else ("ieee", dtype.itemsize)
    moved = {}
    for gelu in (kernel.GELU_OUT, kernel.GELU_GRAD):
        configs = [c[:3] for c in kernel.tile_configs(size, precision, gelu)]
        if tuple(tiles) not in configs:
            moved[configs[0]] = moved.get(configs[0], 0) + 1
    return moved


@pytest.mark.parametrize("kind, tiles", [pytest.param(*c, id=f"{c[0]}-{'x'.join(map(str, c[1]))}") for c in CONFIGS])
@pytest.mark.parametrize("shared", [True, False])
def test_gpu_tiles(pinned, device, kind, tiles, shared):  # noqa: F811 (the fixture)
    """Every GPU tile shape: tokens and both widths over two tiles with partial edge tiles,
    the Student's blocks ending inside a tile."""
    dtype = pinned(kind, tiles, torch.bfloat16)
    block_m, block_n, _ = tiles
    t, d_ta, f_ta = 2 * block_m + 13, 2 * block_n + 7, 2 * max(block_m, block_n) + 19
    problem = make_mlp(t, block_n + 11, d_ta, max(block_m, block_n) + 5, f_ta, shared=shared, device=device,
                       dtype=dtype)
    name = f"{KERNEL}.{'x'.join(map(str, tiles))}"
    moved = moved_gelu_launches(kind, tiles, dtype)
    before = LAUNCH_COUNTS[name], {t: LAUNCH_COUNTS[f"{KERNEL}.{'x'.join(map(str, t))}"] for t in moved}
    assert_matches_oracle(*problem, dtype, kernel=True)
    assert LAUNCH_COUNTS[name] - before[0] == 6 - sum(moved.values())
    for t, count in moved.items():
        assert LAUNCH_COUNTS[f"{KERNEL}.{'x'.join(map(str, t))}"] - before[1][t] == count


def _unfused_mlp(x_s, x_ta, fc, proj):
    """What NestedMLP computed before the fusion: two NestedLinear calls around F.gelu."""
    layers = []
    for p in (fc, proj):
        (n_s, m_s), (n_ta, m_ta) = p["student_features"], p["weight"].shape
        layer = NestedLinear((m_s, m_ta), (n_s, n_ta), bias=p["bias"] is not None,
                             share_weights=p["student_weight"] is None)
        for name in ("weight", "bias", "student_weight", "student_bias"):
            if p[name] is not None:
                setattr(layer, name, torch.nn.Parameter(p[name].detach().clone()))
        layers.append(layer)
    h_s, h_ta = layers[0](x_s, x_ta)
    y = layers[1](F.gelu(h_s, approximate="tanh"), F.gelu(h_ta, approximate="tanh"))
    return y, layers


@pytest.mark.parametrize("shared", [True, False])
def test_pytorch_path_gives_the_unfused_bits(monkeypatch, device, shared):
    """On the PyTorch path the fused FFN runs the unfused layers' aten ops: same bits in the
    outputs and every gradient (so training on a CPU computes what it computed before)."""
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    x_s, x_ta, fc, proj = make_mlp(*SHAPES[0], shared=shared, device=device, lead=(3,))
    grads_out = [torch.randn(3, SHAPES[0][0], n, device=device) for n in (SHAPES[0][1], SHAPES[0][2])]
    got = run(nested_gelu_mlp, x_s, x_ta, fc, proj, grads_out)
    xs2, xta2 = x_s.detach().clone().requires_grad_(), x_ta.detach().clone().requires_grad_()
    (y_s, y_ta), layers = _unfused_mlp(xs2, xta2, fc, proj)
    loss = (y_s * grads_out[0]).sum() + (y_ta * grads_out[1]).sum()
    params = [v for layer in layers for v in (layer.weight, layer.bias, layer.student_weight, layer.student_bias)
              if v is not None]
    want = [y_s, y_ta, *torch.autograd.grad(loss, [xs2, xta2, *params])]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} differs from the unfused layers"


def test_only_parameter_gradients_when_inputs_need_none(backend, device):
    x_s, x_ta, fc, proj = make_mlp(*SHAPES[0], device=device)
    x_s, x_ta = x_s.detach(), x_ta.detach()
    y_s, y_ta = nested_gelu_mlp(x_s, x_ta, fc, proj)
    (y_s.sum() + y_ta.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for layer in (fc, proj) for p in (layer["weight"], layer["bias"]))
    _, _, fc_ref, proj_ref = _detached(x_s, x_ta, fc, proj, torch.float64)
    y_s, y_ta = nested_gelu_mlp_reference(x_s.double(), x_ta.double(), fc_ref, proj_ref)
    (y_s.sum() + y_ta.sum()).backward()
    assert rel_err(fc["weight"].grad, fc_ref["weight"].grad) < 1e-5


def test_autocast_runs_in_the_autocast_dtype(backend, device):
    x_s, x_ta, fc, proj = make_mlp(*SHAPES[0], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y_s, y_ta = nested_gelu_mlp(x_s, x_ta, fc, proj)
    assert y_s.dtype == y_ta.dtype == torch.bfloat16
    (y_s.float().sum() + y_ta.float().sum()).backward()
    assert fc["weight"].grad.dtype == torch.float32 and x_s.grad.dtype == torch.float32


def test_bad_arguments_name_the_problem(device):
    x_s, x_ta, fc, proj = make_mlp(*SHAPES[0], device=device)
    with pytest.raises(ValueError, match="proj's input sizes"):
        nested_gelu_mlp(x_s, x_ta, fc, {**proj, "student_features": (19, 22)})
    with pytest.raises(ValueError, match="fc must hold weight"):
        nested_gelu_mlp(x_s, x_ta, {"weight": fc["weight"]}, proj)
    with pytest.raises(ValueError, match="x_ta has leading dimensions"):
        nested_gelu_mlp(x_s, x_ta[:-1], fc, proj)
    with pytest.raises(TypeError, match="x_s has dtype"):
        nested_gelu_mlp(x_s.double(), x_ta, fc, proj)
    with pytest.raises(ValueError, match="proj.student_weight must have shape"):
        nested_gelu_mlp(x_s, x_ta, fc, {**proj, "student_weight": torch.zeros(3, 3)})


# ----------------------------------------------------------------------------------------
# gelu_mlp: one stream's FFN (a TA-only block, a run that trains one model).


def make_one_stream(t, d, f, *, bias=True, dtype=torch.float32, device="cpu", lead=()):
    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()

    return (rand(*lead, t, d), rand(f, d, scale=d ** -0.5), rand(f) if bias else None, rand(d, f, scale=f ** -0.5),
            rand(d) if bias else None)


def unfused_one_stream(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def run_one_stream(fn, inputs, grad_out):
    y = fn(*inputs)
    tensors = [v for v in inputs if v is not None]
    return [y, *torch.autograd.grad((y.float() * grad_out).sum(), tensors)]


def assert_one_stream_matches_oracle(inputs, dtype, *, kernel):
    """gelu_mlp vs the unfused ops in `dtype` and in float64: within 2x PyTorch's error; with
    `kernel` the six products ran in the nested kernel, GELU in two of their epilogues."""
    grad_out = torch.randn(*inputs[0].shape[:-1], inputs[3].shape[0], device=inputs[0].device)
    before = LAUNCH_COUNTS[KERNEL], LAUNCH_COUNTS[GELU_OUT], LAUNCH_COUNTS[GELU_GRAD]
    got = run_one_stream(gelu_mlp, inputs, grad_out)
    launched = [LAUNCH_COUNTS[name] - b for name, b in zip((KERNEL, GELU_OUT, GELU_GRAD), before)]
    assert launched == ([6, 1, 1] if kernel else [0, 0, 0]), launched

    def detached(to):
        return [None if v is None else v.detach().to(to).requires_grad_() for v in inputs]

    torch_same = run_one_stream(unfused_one_stream, detached(dtype), grad_out)
    oracle = run_one_stream(unfused_one_stream, detached(torch.float64), grad_out.double())
    assert_within_twice_torch_error(got, torch_same, oracle, dtype)


@pytest.mark.parametrize("shape", [(37, 45, 71), (9, 33, 97)])
@pytest.mark.parametrize("bias", [True, False])
def test_one_stream_fp32(backend, device, shape, bias):
    inputs = make_one_stream(*shape, bias=bias, device=device, lead=(2,))
    assert_one_stream_matches_oracle(inputs, torch.float32, kernel=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_stream_half_precision(backend, device, dtype):
    inputs = make_one_stream(37, 45, 71, dtype=dtype, device=device)
    assert_one_stream_matches_oracle(inputs, dtype, kernel=backend == "triton")


@pytest.mark.parametrize("kind, tiles", [pytest.param(*c, id=f"{c[0]}-{'x'.join(map(str, c[1]))}") for c in CONFIGS])
def test_one_stream_gpu_tiles(pinned, device, kind, tiles):  # noqa: F811 (the fixture)
    """Every GPU tile shape, tokens and both widths over two tiles with partial edge tiles."""
    dtype = pinned(kind, tiles, torch.bfloat16)
    block_m, block_n, _ = tiles
    inputs = make_one_stream(2 * block_m + 13, 2 * block_n + 7, 2 * max(block_m, block_n) + 19, dtype=dtype,
                             device=device)
    moved = sum(moved_gelu_launches(kind, tiles, dtype).values())
    name = f"{KERNEL}.{'x'.join(map(str, tiles))}"
    before = LAUNCH_COUNTS[name]
    assert_one_stream_matches_oracle(inputs, dtype, kernel=True)
    assert LAUNCH_COUNTS[name] - before == 6 - moved


def test_one_stream_pytorch_path_is_the_unfused_ops(monkeypatch, device):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    inputs = make_one_stream(37, 45, 71, device=device, lead=(3,))
    grad_out = torch.randn(3, 37, 45, device=device)
    got = run_one_stream(gelu_mlp, inputs, grad_out)
    want = run_one_stream(unfused_one_stream, [v.detach().clone().requires_grad_() for v in inputs], grad_out)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} differs from the unfused ops"


def test_one_stream_autocast_and_parameter_gradients_only(backend, device):
    x, w1, b1, w2, b2 = make_one_stream(37, 45, 71, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = gelu_mlp(x.detach(), w1, b1, w2, b2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in (w1, b1, w2, b2))


def test_one_stream_bad_arguments_name_the_problem(monkeypatch, device):
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    pytest.importorskip("triton")
    x, w1, b1, w2, b2 = make_one_stream(9, 33, 40, device=device)
    with pytest.raises(ValueError, match="proj_weight .* must take 40 inputs \\(fc_weight's outputs\\)"):
        gelu_mlp(x, w1, b1, w2[:, :39], b2)
    with pytest.raises(ValueError, match="fc_bias must have last dimension 40"):
        gelu_mlp(x, w1, b1[:39], w2, b2)
    with pytest.raises(ValueError, match="x must have last dimension 33"):
        gelu_mlp(x[..., :32], w1, b1, w2, b2)
    with pytest.raises(TypeError, match="proj_weight has dtype torch.float16"):
        gelu_mlp(x, w1, b1, w2.half(), b2)


def test_every_ffn_of_a_model_runs_the_fused_kernels(monkeypatch, device):
    """A nested GPT-2 with TA-only layers under MATTA_BACKEND=triton: each of the two-stream
    blocks and each TA-only block computes GELU in a kernel epilogue, forward and backward,
    and the loss and gradients match the PyTorch path's."""
    pytest.importorskip("triton")
    from matta.models import GPT2Config, NestedGPT2, NestingConfig

    config = GPT2Config(vocab_size=61, n_positions=16, n_layer=2, n_embd=32, n_head=2, n_inner=48)
    model = NestedGPT2(config, NestingConfig(ffn_ta=80, extra_layers=1)).to(device)
    idx = torch.randint(0, 61, (2, 9), device=device)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MATTA_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        before = LAUNCH_COUNTS[GELU_OUT], LAUNCH_COUNTS[GELU_GRAD]
        logits_s, logits_ta = model(idx)
        (logits_s.square().mean() + logits_ta.square().mean()).backward()
        launched = [LAUNCH_COUNTS[GELU_OUT] - before[0], LAUNCH_COUNTS[GELU_GRAD] - before[1]]
        assert launched == ([model.depth] * 2 if backend == "triton" else [0, 0]), (backend, launched)
        results.append([logits_s, logits_ta] + [p.grad for p in model.parameters()])
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-5
