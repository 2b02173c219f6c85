"""The nested-linear kernel at the tile shapes a GPU launches.

Under the interpreter, the `tiles` kernel knob pins each GPU tile shape in turn; with
`MATTA_TEST_DEVICE=cuda` the same tests pin the same configs compiled. Shapes span at least
two tiles per side with partial edge tiles, and the Student block ends inside a tile, on a
tile edge, or is the whole weight. Split-K over tokens runs at every tile shape too (its
threshold lowered so that small token counts split), and must give the same bits every run.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from matta import nested_linear
from matta.kernels import LAUNCH_COUNTS
from matta.ops.backend import triton_interpreting
from test_nested_linear import KERNEL, assert_matches_oracle, make_problem

kernel = pytest.importorskip("matta.kernels.nested_linear")
REDUCE = "nested_linear.split_k_reduce"

# Every config the autotuner can launch, with the dtype and TF32 setting that select it. The
# interpreter ignores the dot's precision, so there each tile shape runs once.
CONFIGS = []
for _kind in ("16-bit", "tf32", "ieee"):
    for _tiles in kernel.TILES[_kind]:
        if not (triton_interpreting() and any(c[1] == _tiles[:3] for c in CONFIGS)):
            CONFIGS.append((_kind, _tiles[:3]))
# (one input, shared weight, split-K): every combination, rotated over the tile shapes so that
# each shape runs three of them, one per Student boundary.
MODES = [(False, True, False), (True, True, True), (True, True, False), (False, False, True),
         (False, True, True), (True, False, False), (False, False, False), (True, False, True)]


def _mode_name(one_input, shared, split):
    return f"{'one_input' if one_input else 'two_inputs'}-{'shared' if shared else 'unshared'}{'-split' if split else ''}"


CASES = [
    pytest.param(kind, tiles, boundary, *MODES[(3 * i + j) % len(MODES)], (torch.bfloat16, torch.float16)[(i + j) % 2],
                 id=f"{kind}-{'x'.join(map(str, tiles))}-{boundary}-{_mode_name(*MODES[(3 * i + j) % len(MODES)])}")
    for i, (kind, tiles) in enumerate(CONFIGS) for j, boundary in enumerate(("inside", "edge", "full"))
]


@pytest.fixture
def pinned(monkeypatch, knobs, device):
    """Pins a GPU config: the tiles knob, the TF32 switch, and the Triton backend."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    tf32 = torch.backends.cuda.matmul.allow_tf32

    def pin(kind, tiles, dtype16):
        knobs(tiles=tuple(tiles))
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        return dtype16 if kind == "16-bit" else torch.float32

    yield pin
    torch.backends.cuda.matmul.allow_tf32 = tf32


def tile_shape(tiles, boundary):
    """(T, M_S, M_TA, N_S, N_TA), every output side over two tiles with a partial last one:
    T is tiled by BLOCK_M (y, dx), M_TA by BLOCK_N (dx, dW), N_TA by both (y, dW)."""
    block_m, block_n, _ = tiles
    side = max(block_m, block_n)
    t, m_ta, n_ta = 2 * block_m + 13, 2 * block_n + 7, 2 * side + 19
    m_s, n_s = {"inside": (block_n + 11, side + 5), "edge": (block_n, side), "full": (m_ta, n_ta)}[boundary]
    return t, m_s, m_ta, n_s, n_ta


@pytest.mark.parametrize("kind, tiles, boundary, one_input, shared, split, dtype16", CASES)
def test_gpu_tiles(pinned, device, monkeypatch, kind, tiles, boundary, one_input, shared, split, dtype16):
    dtype = pinned(kind, tiles, dtype16)
    if split:  # small token counts split too: T // 64 slices, some of them partial or empty
        monkeypatch.setattr(kernel, "MIN_TOKENS_PER_SPLIT", 64)
    shape = tile_shape(tiles, boundary)
    problem, sf = make_problem(shape, one_input=one_input, shared=shared, bias=True, dtype=dtype, device=device)
    name = f"{KERNEL}.{'x'.join(map(str, tiles))}"
    before = LAUNCH_COUNTS[name], LAUNCH_COUNTS[REDUCE]
    assert_matches_oracle(problem, sf, dtype, kernel=True)
    assert LAUNCH_COUNTS[name] - before[0] >= 3, f"{name} did not run forward, input and weight gradients"
    assert (LAUNCH_COUNTS[REDUCE] > before[1]) == split


def _weight_grad_problem(tiles, dtype, device):
    # dW (N_TA x M_TA) over two tiles per side, the Student block ending inside the second;
    # five BLOCK_K steps of tokens and a partial one, over three slices.
    side = max(tiles[:2])
    t, m_s, m_ta, n_s, n_ta = 5 * tiles[2] + 13, side - 9, side + 7, side + 5, side + 19
    g = {name: torch.randn(*size, device=device).to(dtype)
         for name, size in (("dy", (t, n_ta)), ("x", (t, m_ta)), ("dy_s", (t, n_s)), ("x_s", (t, m_s)))}
    return g, (n_s, m_s, t)


def _weight_grad(g, sub_shape, options, out_dtype, split_k, tokens=slice(None)):
    """The shared dW with its bias gradient: (dW, db) in out_dtype / fp32."""
    n_s, m_s, _ = sub_shape
    dy, x, dy_s, x_s = (g[k][tokens] for k in ("dy", "x", "dy_s", "x_s"))
    dw = torch.full((dy.shape[1], x.shape[1]), float("nan"), device=dy.device, dtype=out_dtype)
    db = torch.full((dy.shape[1],), float("nan"), device=dy.device, dtype=torch.float32)
    kernel.nested_matmul(dy.t(), x, dw, options=options, sub_mode=kernel.ADD, sub_shape=(n_s, m_s, dy.shape[0]),
                         a2=dy_s.t(), b2=x_s, row_sums=db, token_axis=2, split_k=split_k)
    return dw, db


@pytest.mark.parametrize("kind, tiles", [pytest.param(*c, id=f"{c[0]}-{'x'.join(map(str, c[1]))}") for c in CONFIGS])
def test_split_k_is_the_in_order_sum_of_its_slices(pinned, device, kind, tiles):
    """Split-K gives the same bits on every run, equal to summing the slices in order 0, 1, 2."""
    dtype = pinned(kind, tiles, torch.bfloat16)
    options = kernel.LaunchOptions(precision="tf32" if kind == "tf32" else "ieee",
                                   interpreting=triton_interpreting(), tiles=tiles)
    g, sub_shape = _weight_grad_problem(tiles, dtype, device)
    reduces = LAUNCH_COUNTS[REDUCE]
    first = _weight_grad(g, sub_shape, options, dtype, split_k=3)
    assert LAUNCH_COUNTS[REDUCE] == reduces + 2  # dW and db
    again = _weight_grad(g, sub_shape, options, dtype, split_k=3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # The slices: whole BLOCK_K steps, ceil(ceil(T / 3) / BLOCK_K) of them each.
    t, k = sub_shape[2], tiles[2]
    chunk = -(-(-(-t // 3)) // k) * k
    slices = [_weight_grad(g, sub_shape, options, torch.float32, 1, slice(s * chunk, (s + 1) * chunk))
              for s in range(3)]
    for i, got in enumerate(first):
        total = slices[0][i].clone()
        for s in slices[1:]:
            total += s[i]
        assert torch.equal(got, total.to(got.dtype)), f"output {i} is not the in-order sum of the slices"
    # And it is the product: dW = dy^T x + embed(dy_s^T x_s) in float64.
    d = {k: v.double() for k, v in g.items()}
    oracle = d["dy"].t() @ d["x"]
    oracle[: sub_shape[0], : sub_shape[1]] += d["dy_s"].t() @ d["x_s"]
    err = ((first[0].double() - oracle).norm() / oracle.norm()).item()
    assert err < 1e-2, err


@pytest.mark.slow
def test_offsets_past_two_to_the_31(monkeypatch, device):
    """An input whose rows sit 2^30 elements apart (4 GiB of fp16 address space, a few rows
    touched): int32 offsets wrap there; the kernel must compute what it computes on a copy."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    t, m_s, m_ta, n_s, n_ta = 3, 19, 45, 23, 51
    storage = torch.empty((t - 1) * 2**30 + m_ta, dtype=torch.float16, device=device)
    x = storage.as_strided((t, m_ta), (2**30, 1))
    x.copy_(torch.randn(t, m_ta, device=device))
    x.requires_grad_()
    x_copy = x.detach().clone().requires_grad_()
    weight = torch.randn(n_ta, m_ta, dtype=torch.float16, device=device, requires_grad=True)
    bias = torch.randn(n_ta, dtype=torch.float16, device=device, requires_grad=True)
    grads_out = (torch.randn(t, n_s, device=device).half(), torch.randn(t, n_ta, device=device).half())
    results = []
    for inp in (x, x_copy):
        y = nested_linear(inp, None, weight, bias, student_features=(n_s, m_s))
        results.append([*y, *torch.autograd.grad(y, (inp, weight, bias), grads_out)])
    for i, (far, near) in enumerate(zip(*results)):
        assert torch.equal(far, near), f"output {i} differs for the strided input"


def test_split_k_choice():
    """Few output tiles and a long token range split; the count fills waves of one tile per SM."""
    choose = kernel.choose_split_k
    assert choose(1024, 1024, 16384, 132) == 2  # 64 tiles of 128 x 128: two slices fill 128 of 132 SMs
    assert choose(3072, 1024, 16384, 132) == 2  # 192 tiles: 384 programs, 97% of three waves
    assert choose(768, 768, 8192, 132) == 7  # 36 tiles: 252 programs, 95% of two waves
    assert choose(8192, 1024, 16384, 132) == 1  # 512 tiles fill the GPU already
    assert choose(1024, 1024, 1000, 132) == 1  # a slice would be shorter than MIN_TOKENS_PER_SPLIT
    assert choose(128, 128, 10**6, 132) == kernel.MAX_SPLIT_K  # one tile: the most slices allowed


def test_autotune_key_buckets_the_token_count(monkeypatch):
    """Compiled launches key the autotuner on the token count's power-of-two bucket, so a new
    batch size reuses the tuning (the launch itself is recorded here, not run)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **flags: launches.append(dict(zip(kernel._nested_matmul_kernel.arg_names, args)))

    monkeypatch.setattr(kernel, "_nested_matmul_tuned", Recorder())
    options = kernel.LaunchOptions(interpreting=False)
    for t in (300, 500):
        x, w = torch.zeros(t, 40), torch.zeros(40, 24)
        kernel.nested_matmul(x, w, torch.zeros(t, 24), options=options, token_axis=0)  # forward: P tokens
        kernel.nested_matmul(w.t(), x.t(), torch.zeros(24, t), options=options, token_axis=1)
        kernel.nested_matmul(x.t(), x, torch.zeros(40, 40), options=options, token_axis=2)  # dW: R tokens
    keys = [(k["key_p"], k["key_q"], k["key_r"]) for k in launches]
    assert keys[:3] == [(512, 24, 40), (24, 512, 40), (40, 40, 512)]
    assert keys[3:] == keys[:3]


# ----------------------------------------------------------------------------------------
# fp32 parameters trained in 16 bits (autocast): the kernels write their gradients in fp32.


class _Casts(TorchDispatchMode):
    """The shapes of the tensors that aten::_to_copy casts while it is on."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _autocast_run(problem, sf, dtype16, grads_out, *, cast_outside):
    """Outputs and gradients of a nested layer with fp32 parameters and 16-bit inputs: under
    autocast, or (`cast_outside`) with the parameters cast to 16 bits by autograd-tracked casts
    before the call, as `nested_linear` did before it cast them itself. Also the shapes cast
    in the backward."""
    params = {k: problem[k] for k in ("weight", "bias", "student_weight", "student_bias")}
    x_s, x_ta = problem["x_s"], problem["x_ta"]
    if cast_outside:
        y_s, y_ta = nested_linear(x_s, x_ta, **{k: None if v is None else v.to(dtype16) for k, v in params.items()},
                                  student_features=sf)
    else:
        with torch.autocast("cpu" if x_s.device.type == "cpu" else "cuda", dtype=dtype16):
            y_s, y_ta = nested_linear(x_s, x_ta, **params, student_features=sf)
    inputs = [v for v in problem.values() if v is not None]
    loss = (y_s.float() * grads_out[0]).sum() + (y_ta.float() * grads_out[1]).sum()
    with _Casts() as casts:
        grads = torch.autograd.grad(loss, inputs)
    return [y_s, y_ta, *grads], casts.shapes


def _16_bit_inputs(problem, dtype16):
    """The inputs as an earlier op under autocast hands them on: 16-bit."""
    for name in ("x_s", "x_ta"):
        if problem[name] is not None:
            problem[name] = problem[name].detach().to(dtype16).requires_grad_()


@pytest.mark.parametrize("one_input, shared, split", [pytest.param(*m, id=_mode_name(*m)) for m in MODES])
def test_fp32_parameter_gradients_are_the_16_bit_ones_cast_up(pinned, device, monkeypatch, one_input, shared,
                                                               split):
    """Under autocast the kernels write fp32 weight and bias gradients (rounded to 16 bits in
    the epilogue, or in split-K's reduction): the same bits as the 16-bit gradients that a
    cast before the layer gives autograd to cast back, without those casts in the backward."""
    i = MODES.index((one_input, shared, split))
    tiles = kernel.TILES["16-bit"][i % len(kernel.TILES["16-bit"])][:3]
    dtype16 = (torch.bfloat16, torch.float16)[i % 2]
    pinned("16-bit", tiles, dtype16)
    if split:
        monkeypatch.setattr(kernel, "MIN_TOKENS_PER_SPLIT", 64)
    shape = tile_shape(tiles, ("inside", "edge", "full")[i % 3])
    problem, sf = make_problem(shape, one_input=one_input, shared=shared, bias=True, dtype=torch.float32,
                               device=device)
    _16_bit_inputs(problem, dtype16)
    grads_out = (torch.randn(shape[0], sf[0], device=device), torch.randn(shape[0], shape[4], device=device))
    before = LAUNCH_COUNTS[REDUCE]
    got, casts = _autocast_run(problem, sf, dtype16, grads_out, cast_outside=False)
    assert (LAUNCH_COUNTS[REDUCE] > before) == split
    want, casts_before = _autocast_run(problem, sf, dtype16, grads_out, cast_outside=True)
    names = ["y_s", "y_ta"] + [k for k, v in problem.items() if v is not None]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name} differs from the 16-bit gradient cast up"
    param_shapes = {tuple(problem[k].shape) for k in ("weight", "bias", "student_weight", "student_bias")
                    if problem[k] is not None}
    assert param_shapes <= set(casts_before)  # the old path did cast them back
    assert not param_shapes & set(casts), f"the backward still casts parameter gradients: {casts}"


def test_fp32_parameter_gradients_of_the_pytorch_path(monkeypatch, device):
    """The same bits where the PyTorch path runs (it casts inside the op)."""
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    problem, sf = make_problem((37, 19, 45, 23, 71), one_input=False, shared=True, bias=True, dtype=torch.float32,
                               device=device)
    _16_bit_inputs(problem, torch.bfloat16)
    grads_out = (torch.randn(37, 23, device=device), torch.randn(37, 71, device=device))
    got, _ = _autocast_run(problem, sf, torch.bfloat16, grads_out, cast_outside=False)
    want, _ = _autocast_run(problem, sf, torch.bfloat16, grads_out, cast_outside=True)
    assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


def test_fp32_parameter_gradients_through_the_fused_ffn(monkeypatch, device):
    """The same bits through the fused FFN of both streams and of one, with its kernels."""
    from matta.ops import gelu_mlp, nested_gelu_mlp

    monkeypatch.setenv("MATTA_BACKEND", "triton")
    x_s, x_ta = (torch.randn(37, d, device=device).to(torch.bfloat16).requires_grad_() for d in (19, 45))
    fc = {"weight": torch.randn(71, 45, device=device, requires_grad=True),
          "bias": torch.randn(71, device=device, requires_grad=True), "student_features": (23, 19)}
    proj = {"weight": torch.randn(45, 71, device=device, requires_grad=True), "student_features": (19, 23)}
    params = [fc["weight"], fc["bias"], proj["weight"]]

    def ffn_grads(cast_outside):
        def cast(layer):
            return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in layer.items()}

        if cast_outside:
            y_s, y_ta = nested_gelu_mlp(x_s, x_ta, cast(fc), cast(proj))
            y = gelu_mlp(x_ta, *(p.to(torch.bfloat16) for p in params), None)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y_s, y_ta = nested_gelu_mlp(x_s, x_ta, fc, proj)
                y = gelu_mlp(x_ta, *params, None)
        loss = y_s.float().square().sum() + y_ta.float().sum() + y.float().square().sum()
        with _Casts() as casts:
            grads = torch.autograd.grad(loss, [x_s, x_ta, *params])
        return grads, casts.shapes

    got, casts = ffn_grads(False)
    want, _ = ffn_grads(True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"gradient {i} differs"
    assert not {(71, 45), (71,), (45, 71)} & set(casts), casts
