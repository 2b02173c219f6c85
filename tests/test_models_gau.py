"""NestedGAU: against a plain float64 GAU written here from the formulas, as a language
model and as a classifier; extraction; causality; masks; parameter counts; bad configs."""
import pytest
import torch

from matta.extraction import extract, wide_narrow_wide_family
from matta.models import GAU, GAUConfig, GAULayerShape, NestedGAU, NestingConfig
from matta.models.gau import gau_num_parameters
from test_models_gpt2 import perturb_, rel_err


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def reference_gau(model: NestedGAU, idx, choices, d, mask=None):
    """float64 output of the sub-model with per-layer 'wide' / 'narrow' / 'skip', residual d.

    Reads the nested rows [U_S V_S Z U_X V_X] of each uvz weight by the documented layout."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    cfg = model.config
    e_s, e_ta, s, n = cfg.expansion, model.ta_expansion, cfg.attn_dim, cfg.n_positions
    t = idx.shape[1]
    x = p["wte.weight"][idx][..., :d]
    i_pos = torch.arange(t)[:, None]
    j_pos = torch.arange(t)[None, :]
    for i, choice in enumerate(choices):
        if choice == "skip":
            continue
        e = e_ta if choice == "wide" else e_s
        pre = f"blocks.{i}."
        h = _ln(x, p[pre + "norm.weight"][:d], p[pre + "norm.bias"][:d])
        w, b = p[pre + "uvz.weight"], p[pre + "uvz.bias"]
        extra = e - e_s
        u_rows = list(range(e_s)) + list(range(2 * e_s + s, 2 * e_s + s + extra))
        v_start = 2 * e_s + s + (e_ta - e_s)
        v_rows = list(range(e_s, 2 * e_s)) + list(range(v_start, v_start + extra))
        z_rows = list(range(2 * e_s, 2 * e_s + s))
        u, v, z = (_silu(h @ w[rows, :d].T + b[rows]) for rows in (u_rows, v_rows, z_rows))
        gamma, beta = p[pre + "qk.gamma"], p[pre + "qk.beta"]
        q, k = z * gamma[0] + beta[0], z * gamma[1] + beta[1]
        bias = p[pre + "rel_bias"][j_pos - i_pos + n - 1]
        a = torch.relu(q @ k.transpose(-1, -2) / n + bias) ** 2
        if not cfg.is_classifier:
            a = a * (j_pos <= i_pos)
        if mask is not None:
            a = a * mask[:, None, :]
        x = x + (u * (a @ v)) @ p[pre + "o.weight"][:d, :e].T + p[pre + "o.bias"][:d]
    x = _ln(x, p["norm_f.weight"][:d], p["norm_f.bias"][:d])
    if cfg.is_classifier:
        m = torch.ones(idx.shape, dtype=torch.float64) if mask is None else mask.double()
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return pooled @ p["head.weight"][:, :d].T + p["head.bias"]
    return x @ p["wte.weight"][: cfg.vocab_size, :d].T


def tiny_gau(**changes):
    base = dict(vocab_size=53, n_positions=20, n_embd=16, n_layer=3, expansion=24, attn_dim=8)
    base.update(changes)
    return GAUConfig(**base)


NESTINGS = {
    "expansion": NestingConfig(ffn_ta=40),
    "expansion+depth": NestingConfig(ffn_ta=36, extra_layers=2),
    "d_model": NestingConfig(ffn_ta=40, extra_layers=1, extra_layer_positions="top", d_model_ta=28),
}


def make(nesting, **changes):
    model = NestedGAU(tiny_gau(**changes), NESTINGS[nesting]).eval()
    perturb_(model, scale=0.3)
    return model


def paths(model):
    student = ["skip" if i in model.ta_only_layers else "narrow" for i in range(len(model.blocks))]
    return (student, model.student_width), (["wide"] * len(model.blocks), model.ta_width)


@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_language_model_paths_match_reference(nesting, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    model = make(nesting)
    idx = torch.randint(0, model.config.vocab_size, (2, 11))
    logits_s, logits_ta = model(idx)
    assert logits_s.shape == logits_ta.shape == (2, 11, model.config.vocab_size)
    (cs, ds), (ct, dt) = paths(model)
    assert rel_err(logits_s, reference_gau(model, idx, cs, ds)) < 1e-5
    assert rel_err(logits_ta, reference_gau(model, idx, ct, dt)) < 1e-5
    h_s, h_ta = model(idx, return_hidden=True)
    assert h_s.shape[-1] == model.student_width and h_ta.shape[-1] == model.ta_width
    # extraction: bit-for-bit on the PyTorch path
    student, ta = extract(model, "student"), extract(model, "ta")
    assert type(student) is GAU
    torch.testing.assert_close(student(idx), logits_s, rtol=0, atol=0)
    torch.testing.assert_close(ta(idx), logits_ta, rtol=0, atol=0)
    sub = extract(model, "wide_narrow_wide", k=2)
    chosen = ["wide"] + ["narrow"] * (len(model.blocks) - 2) + ["wide"]
    assert rel_err(sub(idx), reference_gau(model, idx, chosen, model.student_width)) < 1e-5


@pytest.mark.parametrize("nesting", ["expansion+depth", "d_model"])
def test_classifier_with_padding_mask(nesting, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    model = make(nesting, num_classes=5)
    idx = torch.randint(0, model.config.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    logits_s, logits_ta = model(idx, attention_mask=mask)
    assert logits_s.shape == logits_ta.shape == (3, 5)
    (cs, ds), (ct, dt) = paths(model)
    assert rel_err(logits_s, reference_gau(model, idx, cs, ds, mask.double())) < 1e-5
    assert rel_err(logits_ta, reference_gau(model, idx, ct, dt, mask.double())) < 1e-5
    # padded tokens change nothing
    other = idx.clone()
    other[~mask] = (other[~mask] + 1) % model.config.vocab_size
    for a, b in zip(model(other, attention_mask=mask), (logits_s, logits_ta)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # bidirectional: a late token changes the pooled output
    later = idx.clone()
    later[0, -1] = (later[0, -1] + 1) % model.config.vocab_size
    assert not torch.allclose(model(later, attention_mask=mask)[0][0], logits_s[0])
    student = extract(model, "student")
    torch.testing.assert_close(student(idx, attention_mask=mask), logits_s, rtol=0, atol=0)
    # soft Teacher labels train both heads
    soft = torch.softmax(torch.randn(3, 5), -1)
    model.train()
    ls, lt = model(idx, attention_mask=mask)
    loss = -(soft * ls.log_softmax(-1)).sum(-1).mean() - (soft * lt.log_softmax(-1)).sum(-1).mean()
    loss.backward()
    assert torch.count_nonzero(model.head.weight.grad[:, : model.student_width]) > 0
    assert torch.count_nonzero(model.blocks[0].uvz.weight.grad) > 0


def test_causal_language_model():
    model = make("d_model")
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % model.config.vocab_size
    for b, a in zip(model(idx), model(changed)):
        torch.testing.assert_close(b[:, :8], a[:, :8], rtol=0, atol=0)
        assert not torch.allclose(b[:, 8:], a[:, 8:])


def test_parameter_counts_and_family():
    model = make("expansion+depth")
    cfg = model.config
    d, e, s, n = cfg.n_embd, cfg.expansion, cfg.attn_dim, cfg.n_positions
    per_layer = 2 * d + (2 * e + s) * d + (2 * e + s) + 4 * s + (2 * n - 1) + e * d + d
    student = extract(model, "student")
    assert student.num_parameters() == cfg.n_layer * per_layer + 2 * d
    assert gau_num_parameters(cfg, [GAULayerShape(e)] * cfg.n_layer) == student.num_parameters()
    family = wide_narrow_wide_family(model)
    for member in family:
        assert extract(model, member.layers).num_parameters() == member.non_embedding_parameters
    plain = GAU(tiny_gau(num_classes=3), [GAULayerShape(10), GAULayerShape(30)])
    assert plain.num_parameters() == gau_num_parameters(plain.config, plain.layer_shapes)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NestedGAU(tiny_gau(), NestingConfig(ffn_ta=16)), "ffn_ta=16 is smaller than the Student's expansion=24"),
        (lambda: NestedGAU(tiny_gau(), NestingConfig(n_head_ta=4)), "n_head_ta does not apply"),
        (lambda: NestedGAU(tiny_gau(), NestingConfig(d_model_ta=8)), "d_model_ta=8 is smaller"),
        (lambda: tiny_gau(num_classes=0), "num_classes must be a positive int"),
        (lambda: GAUConfig.preset("gau-huge"), "unknown GAU preset"),
    ],
)
def test_bad_configs(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_mask():
    model = make("expansion", num_classes=2)
    with pytest.raises(ValueError, match="attention_mask must have the shape of idx"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def _ta_only_units(model):
    """Views of every weight entry that only the TA's wider layers read: the U_X / V_X rows
    of uvz and the matching columns of o."""
    e_s, s = model.config.expansion, model.config.attn_dim
    for block in model.blocks:
        yield block.uvz.weight[2 * e_s + s :]
        yield block.uvz.bias[2 * e_s + s :]
        yield block.o.weight[:, e_s:]


def test_narrow_layers_read_no_ta_only_units(monkeypatch):
    """Every layer narrow (TA-only layers included) is its own sub-model: not the TA, not the
    Student; it reads none of the TA's extra expansion units, and the Student path given as
    an explicit list is the nested Student bit for bit."""
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    model = make("expansion+depth")
    depth, d = len(model.blocks), model.student_width
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    logits_s, _ = model(idx)
    narrow = extract(model, ["narrow"] * depth)
    before = narrow(idx)
    assert rel_err(before, reference_gau(model, idx, ["narrow"] * depth, d)) < 1e-5
    assert rel_err(before, reference_gau(model, idx, ["wide"] * depth, d)) > 1e-2
    assert not torch.allclose(before, extract(model, "ta")(idx), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(before, extract(model, "student")(idx), rtol=1e-3, atol=1e-3)
    student_list = ["skip" if i in model.ta_only_layers else "narrow" for i in range(depth)]
    torch.testing.assert_close(extract(model, student_list)(idx), logits_s, rtol=0, atol=0)
    ta_before = extract(model, "ta")(idx)
    with torch.no_grad():
        for units in _ta_only_units(model):
            units.add_(torch.randn_like(units))
    torch.testing.assert_close(extract(model, ["narrow"] * depth)(idx), before, rtol=0, atol=0)
    assert not torch.allclose(extract(model, "ta")(idx), ta_before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("length", [3, 4, 6])
def test_choice_list_length_must_count_ta_only_layers(length):
    model = make("expansion+depth")  # 3 Student layers + 2 TA-only = 5
    message = rf"has {length} entries but the TA has 5 layers \(one entry per TA layer, TA-only layers \(1, 3\) included\)"
    with pytest.raises(ValueError, match=message):
        extract(model, ["narrow"] * length)
