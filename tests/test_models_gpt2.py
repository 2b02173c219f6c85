"""NestedGPT2 and the plain GPT2: shapes, causality, an independent float64 GPT-2 oracle,
parameter counts, depth and d_model nesting, gradients, bad configurations."""
import math

import pytest
import torch

from matta.models import GPT2, BlockShape, GPT2Config, NestedGPT2, NestingConfig
from matta.models.gpt2 import gpt2_num_parameters

# ----------------------------------------------------------------------------------------
# An independent GPT-2 written from the formulas, in float64, reading the nested model's
# parameters by the documented layout (c_attn rows [q_S k_S v_S q_X k_X v_X]).


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _attention(q, k, v, n_head):
    b, t, a = q.shape
    hd = a // n_head
    q, k, v = (z.reshape(b, t, n_head, hd).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, a)


def reference_logits(model: NestedGPT2, idx, choices, d):
    """float64 logits of the sub-model of `model` taking, per TA layer, 'wide', 'narrow' or
    'skip', with residual width d."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    cfg, ta = model.config, model.ta_config
    d_s, d_ta, eps = cfg.n_embd, ta.n_embd, cfg.layer_norm_epsilon
    t = idx.shape[1]
    x = p["wte.weight"][idx][..., :d] + p["wpe.weight"][:t, :d]
    for i, choice in enumerate(choices):
        if choice == "skip":
            continue
        wide = choice == "wide"
        a = d_ta if wide else d_s
        n_head = ta.n_head if wide else cfg.n_head
        f = ta.n_inner if wide else cfg.n_inner
        pre = f"blocks.{i}."
        h = _ln(x, p[pre + "ln_1.weight"][:d], p[pre + "ln_1.bias"][:d], eps)
        w, bias = p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"]
        extra = d_ta - d_s
        parts = []
        for j in range(3):  # q, k, v
            rows = list(range(j * d_s, (j + 1) * d_s))
            if wide:
                rows += list(range(3 * d_s + j * extra, 3 * d_s + (j + 1) * extra))
            parts.append(h @ w[rows, :d].T + bias[rows])
        y = _attention(*parts, n_head)
        x = x + y @ p[pre + "attn.c_proj.weight"][:d, :a].T + p[pre + "attn.c_proj.bias"][:d]
        h = _ln(x, p[pre + "ln_2.weight"][:d], p[pre + "ln_2.bias"][:d], eps)
        h = _gelu_tanh(h @ p[pre + "mlp.c_fc.weight"][:f, :d].T + p[pre + "mlp.c_fc.bias"][:f])
        x = x + h @ p[pre + "mlp.c_proj.weight"][:d, :f].T + p[pre + "mlp.c_proj.bias"][:d]
    x = _ln(x, p["ln_f.weight"][:d], p["ln_f.bias"][:d], eps)
    return x @ p["wte.weight"][: cfg.vocab_size, :d].T


def student_choices(model):
    return ["skip" if i in model.ta_only_layers else "narrow" for i in range(len(model.blocks))]


def perturb_(model, scale=0.05):
    """Random values in every parameter (LayerNorms and biases included), so that no part
    of the comparison rests on the initial ones and zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        model.wte.weight[model.config.vocab_size :].zero_()


def tiny_config(**changes):
    base = dict(vocab_size=61, n_positions=24, n_embd=24, n_layer=3, n_head=3, n_inner=40)
    base.update(changes)
    return GPT2Config(**base)


NESTINGS = {
    "layer": NestingConfig(ffn_ta=72),
    "layer+depth": NestingConfig(ffn_ta=56, extra_layers=2, extra_layer_positions="interleave"),
    "depth-top": NestingConfig(ffn_ta=40, extra_layers=1, extra_layer_positions="top"),
    "d_model": NestingConfig(ffn_ta=64, extra_layers=1, extra_layer_positions="bottom", d_model_ta=40),
    "d_model+heads": NestingConfig(ffn_ta=64, extra_layers=1, extra_layer_positions=[1], d_model_ta=36, n_head_ta=4),
}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------


def test_presets():
    small, medium = GPT2Config.preset("gpt2"), GPT2Config.preset("gpt2-medium")
    assert (small.n_layer, small.n_embd, small.n_head, small.n_inner) == (12, 768, 12, 3072)
    assert (medium.n_layer, medium.n_embd, medium.n_head, medium.n_inner) == (24, 1024, 16, 4096)
    assert small.padded_vocab_size % 64 == 0 and small.padded_vocab_size >= 50257 > small.padded_vocab_size - 64
    tiny = GPT2Config.preset("gpt2-tiny", n_layer=2)
    assert tiny.n_layer == 2 and tiny.n_embd < 256
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.preset("gpt3")


def test_published_parameter_counts():
    # Published sizes of the public checkpoints: 124,439,808 (gpt2), 354,823,168 (gpt2-medium),
    # with an unpadded 50257-token table and 1024 positions.
    for name, total in (("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)):
        cfg = GPT2Config.preset(name)
        shapes = [BlockShape(cfg.n_head, cfg.head_dim, cfg.n_inner)] * cfg.n_layer
        non_embedding = gpt2_num_parameters(cfg, shapes)
        assert non_embedding == total - (cfg.vocab_size + cfg.n_positions) * cfg.n_embd


@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_nested_parameter_count_formula(nesting):
    nest = NESTINGS[nesting]
    cfg = tiny_config()
    model = NestedGPT2(cfg, nest)
    t = model.ta_config
    d, a, f, L = t.n_embd, t.n_embd, t.n_inner, t.n_layer
    per_block = 4 * d + (3 * a * d + 3 * a) + (a * d + d) + (f * d + f) + (f * d + d)
    assert model.num_parameters() == L * per_block + 2 * d
    assert model.num_parameters(non_embedding=False) == L * per_block + 2 * d + (cfg.padded_vocab_size + cfg.n_positions) * d
    plain = GPT2(cfg)
    d, f = cfg.n_embd, cfg.n_inner
    assert plain.num_parameters() == cfg.n_layer * (4 * d * d + 2 * f * d + 9 * d + f) + 2 * d


@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_paths_match_float64_oracle(nesting, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    cfg = tiny_config()
    model = NestedGPT2(cfg, NESTINGS[nesting]).eval()
    perturb_(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    logits_s, logits_ta = model(idx)
    assert logits_s.shape == logits_ta.shape == (2, 11, cfg.vocab_size)
    ref_s = reference_logits(model, idx, student_choices(model), model.student_width)
    ref_ta = reference_logits(model, idx, ["wide"] * len(model.blocks), model.ta_width)
    assert rel_err(logits_s, ref_s) < 1e-5
    assert rel_err(logits_ta, ref_ta) < 1e-5
    h_s, h_ta = model(idx, return_hidden=True)
    assert h_s.shape == (2, 11, model.student_width) and h_ta.shape == (2, 11, model.ta_width)
    head = model.lm_head_weight
    assert head.shape == (cfg.vocab_size, model.ta_width)
    torch.testing.assert_close(h_s @ head[:, : model.student_width].T, logits_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_ta @ head.T, logits_ta, rtol=1e-5, atol=1e-5)


def test_padded_vocabulary_never_predicted():
    cfg = tiny_config(vocab_size=70, vocab_pad_multiple=32)
    model = NestedGPT2(cfg, NestingConfig(d_model_ta=30, n_head_ta=3))
    assert model.wte.weight.shape == (96, 30)
    assert torch.count_nonzero(model.wte.weight[70:]) == 0
    logits_s, logits_ta = model(torch.randint(0, 70, (1, 5)))
    assert logits_s.shape[-1] == logits_ta.shape[-1] == 70


@pytest.mark.parametrize("nesting", ["layer+depth", "d_model+heads"])
def test_causal(nesting):
    cfg = tiny_config()
    model = NestedGPT2(cfg, NESTINGS[nesting]).eval()
    perturb_(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, cfg.vocab_size, (2, 5))
    before, after = model(idx), model(changed)
    for b, a in zip(before, after):
        torch.testing.assert_close(b[:, :7], a[:, :7], rtol=0, atol=0)
        assert not torch.allclose(b[:, 7:], a[:, 7:])


def test_depth_nesting_positions():
    cfg = tiny_config(n_layer=4)
    inter = NestedGPT2(cfg, NestingConfig(extra_layers=2))
    assert len(inter.blocks) == 6 and len(inter.student_layers) == 4
    # interleaved: no two TA-only layers adjacent, none at the very bottom
    assert all(b - a > 1 for a, b in zip(inter.ta_only_layers, inter.ta_only_layers[1:]))
    assert 0 not in inter.ta_only_layers
    assert NestedGPT2(cfg, NestingConfig(extra_layers=2, extra_layer_positions="top")).ta_only_layers == (4, 5)
    assert NestedGPT2(cfg, NestingConfig(extra_layers=2, extra_layer_positions="bottom")).ta_only_layers == (0, 1)
    explicit = NestedGPT2(cfg, NestingConfig(extra_layers=2, extra_layer_positions=[5, 0]))
    assert explicit.ta_only_layers == (0, 5)
    assert [blk.ta_only for blk in explicit.blocks] == [True, False, False, False, False, True]


def test_student_ignores_ta_only_parameters():
    cfg = tiny_config()
    model = NestedGPT2(cfg, NESTINGS["d_model"]).eval()
    perturb_(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    logits_s, logits_ta = model(idx)
    with torch.no_grad():
        for i in model.ta_only_layers:
            for p in model.blocks[i].parameters():
                p.add_(1.0)
        for blk in model.blocks:
            blk.mlp.c_fc.weight[cfg.n_inner :].add_(1.0)
            blk.ln_1.weight[cfg.n_embd :].add_(1.0)
        model.wte.weight[:, cfg.n_embd :].add_(1.0)
    new_s, new_ta = model(idx)
    torch.testing.assert_close(new_s, logits_s, rtol=0, atol=0)
    assert not torch.allclose(new_ta, logits_ta)


@pytest.mark.parametrize("nesting", ["layer+depth", "d_model"])
def test_gradients_reach_shared_weights_from_both_paths(nesting):
    cfg = tiny_config()
    model = NestedGPT2(cfg, NESTINGS[nesting])
    perturb_(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    target = torch.randint(0, cfg.vocab_size, (2, 8))
    ce = torch.nn.functional.cross_entropy
    block = model.blocks[model.student_layers[0]]
    n_inner, d_s = cfg.n_inner, cfg.n_embd

    logits_s, logits_ta = model(idx)
    ce(logits_s.flatten(0, 1), target.flatten()).backward()
    g = block.mlp.c_fc.weight.grad
    assert torch.count_nonzero(g[:n_inner, :d_s]) > 0  # the Student block learns from the Student
    assert torch.count_nonzero(g[n_inner:]) == 0 and torch.count_nonzero(g[:, d_s:]) == 0
    for i in model.ta_only_layers:  # the Student never reaches the TA-only layers
        grad = model.blocks[i].mlp.c_fc.weight.grad
        assert grad is None or torch.count_nonzero(grad) == 0
    grad_from_s = g.clone()

    model.zero_grad(set_to_none=True)
    logits_s, logits_ta = model(idx)
    ce(logits_ta.flatten(0, 1), target.flatten()).backward()
    grad_from_ta = block.mlp.c_fc.weight.grad.clone()
    assert torch.count_nonzero(grad_from_ta[n_inner:]) > 0 and torch.count_nonzero(grad_from_ta[:n_inner, :d_s]) > 0

    model.zero_grad(set_to_none=True)
    logits_s, logits_ta = model(idx)
    (ce(logits_s.flatten(0, 1), target.flatten()) + ce(logits_ta.flatten(0, 1), target.flatten())).backward()
    torch.testing.assert_close(block.mlp.c_fc.weight.grad, grad_from_s + grad_from_ta, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        if name != "wte.weight":
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_training_mode_with_dropout_runs_and_differs():
    cfg = tiny_config(dropout=0.3)
    model = NestedGPT2(cfg, NESTINGS["layer+depth"]).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    first, second = model(idx), model(idx)
    assert not torch.equal(first[0], second[0])
    model.eval()
    torch.testing.assert_close(model(idx)[1], model(idx)[1], rtol=0, atol=0)


def test_plain_gpt2_matches_oracle_with_per_block_widths():
    cfg = tiny_config(n_layer=2)
    shapes = [BlockShape(3, 8, 40), BlockShape(5, 6, 17)]
    plain = GPT2(cfg, shapes).eval()
    assert plain.num_parameters() == gpt2_num_parameters(cfg, shapes)
    assert plain.num_parameters(non_embedding=False) == gpt2_num_parameters(cfg, shapes, non_embedding=False)
    idx = torch.randint(0, cfg.vocab_size, (3, 7))
    out = plain(idx)
    p = {k: v.detach().double() for k, v in plain.named_parameters()}
    x = p["wte.weight"][idx] + p["wpe.weight"][:7]
    for i, s in enumerate(shapes):
        pre = f"h.{i}."
        h = _ln(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], 1e-5)
        q, k, v = (h @ p[pre + "attn.c_attn.weight"].T + p[pre + "attn.c_attn.bias"]).split(s.attn_dim, -1)
        x = x + _attention(q, k, v, s.n_head) @ p[pre + "attn.c_proj.weight"].T + p[pre + "attn.c_proj.bias"]
        h = _ln(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], 1e-5)
        h = _gelu_tanh(h @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"])
        x = x + h @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
    ref = _ln(x, p["ln_f.weight"], p["ln_f.bias"], 1e-5) @ p["wte.weight"][: cfg.vocab_size].T
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: tiny_config(n_head=5), "n_head=5 does not divide n_embd=24"),
        (lambda: tiny_config(n_layer=0), "n_layer must be a positive int"),
        (lambda: tiny_config(dropout=1.0), "dropout must be in"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(ffn_ta=32)), "ffn_ta=32 is smaller than the Student's n_inner=40"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(d_model_ta=16)), "d_model_ta=16 is smaller"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(d_model_ta=30)), "not a multiple of the Student's head size 8"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(d_model_ta=30, n_head_ta=4)), "n_head_ta=4 does not divide d_model_ta=30"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(d_model_ta=32, n_head_ta=2)), "n_head_ta=2 is smaller"),
        (lambda: NestingConfig(extra_layer_positions="middle"), "extra_layer_positions must be one of"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(extra_layers=2, extra_layer_positions=[0])), "lists 1 indices"),
        (lambda: NestedGPT2(tiny_config(), NestingConfig(extra_layers=1, extra_layer_positions=[4])), r"indices in \[0, 4\)"),
        (lambda: NestingConfig(extra_layers=-1), "extra_layers must be an int >= 0"),
        (lambda: NestedGPT2(tiny_config(), "big"), "nest must be a NestingConfig"),
    ],
)
def test_bad_configs_raise_clear_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_bad_inputs_raise_clear_errors():
    model = NestedGPT2(tiny_config(), NestingConfig())
    with pytest.raises(ValueError, match="exceeds the context length n_positions=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"\(batch, time\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_backends_agree_with_oracle(backend, device):
    """The nested model on each NestedLinear backend (the Triton kernels run under the
    interpreter on a CPU): forward against the float64 oracle, gradients against float64."""
    cfg = tiny_config(n_layer=2)
    model = NestedGPT2(cfg, NestingConfig(ffn_ta=56, extra_layers=1, d_model_ta=32)).to(device).eval()
    perturb_(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 9), device=device)
    logits_s, logits_ta = model(idx)
    ref_s = reference_logits(model.cpu(), idx.cpu(), student_choices(model), model.student_width)
    ref_ta = reference_logits(model, idx.cpu(), ["wide"] * len(model.blocks), model.ta_width)
    model.to(device)
    # float32 (TF32 on a GPU) against float64: well inside 1e-3
    assert rel_err(logits_s.cpu(), ref_s) < 1e-3 and rel_err(logits_ta.cpu(), ref_ta) < 1e-3
    (logits_s.square().mean() + logits_ta.square().mean()).backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    model64 = NestedGPT2(cfg, model.nest).double()
    model64.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    s64, ta64 = model64(idx.cpu())
    (s64.square().mean() + ta64.square().mean()).backward()
    for name, p in model64.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-3, name
