"""Mix'n'Match extraction: exact paths, standalone state, parameter counts, the
wide-narrow-wide family, and bad layer choices. MATTA_BACKEND=torch: the bit-for-bit
comparisons are against the nested model's PyTorch path (the Triton kernels are
compared with their reference in the layer's own tests)."""
import pytest
import torch
from torch import nn

from matta.extraction import extract, layer_choices, num_parameters_of, wide_narrow_wide_family
from matta.models import GPT2, NestedGPT2, NestingConfig
from matta.models.gpt2 import gpt2_num_parameters
from test_models_gpt2 import NESTINGS, perturb_, reference_logits, rel_err, student_choices, tiny_config


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")


def nested(nesting, **config_changes):
    model = NestedGPT2(tiny_config(**config_changes), NESTINGS[nesting]).eval()
    perturb_(model)
    return model


@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_student_and_ta_equal_nested_paths_bit_for_bit(nesting):
    model = nested(nesting)
    idx = torch.randint(0, model.config.vocab_size, (3, 13))
    logits_s, logits_ta = model(idx)
    student, ta = extract(model, "student"), extract(model, "ta")
    assert type(student) is GPT2 and type(ta) is GPT2
    assert len(student.h) == model.config.n_layer and len(ta.h) == len(model.blocks)
    torch.testing.assert_close(student(idx), logits_s, rtol=0, atol=0)
    torch.testing.assert_close(ta(idx), logits_ta, rtol=0, atol=0)
    h_s, _ = model(idx, return_hidden=True)
    torch.testing.assert_close(student(idx, return_hidden=True), h_s, rtol=0, atol=0)


@pytest.mark.parametrize("nesting", ["layer+depth", "d_model+heads"])
def test_mixed_sub_models_match_oracle(nesting):
    model = nested(nesting)
    depth = len(model.blocks)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    cases = [("wide_narrow_wide", 2, None), ("wide_narrow_wide", 0, None)]
    choices = ["wide", "skip"] + ["narrow"] * (depth - 3) + ["wide"]
    for layers, k, d_model in cases + [(choices, None, "wide"), (choices, None, "narrow")]:
        sub = extract(model, layers, k=k, d_model=d_model)
        chosen = layer_choices(model, layers, k=k)
        d = model.ta_width if d_model == "wide" else model.student_width
        ref = reference_logits(model, idx, chosen, d)
        assert rel_err(sub(idx), ref) < 1e-5, (layers, k, d_model)
        assert len(sub.h) == sum(c != "skip" for c in chosen)


def test_wide_narrow_wide_choices():
    model = nested("layer+depth")  # 5 TA layers
    assert layer_choices(model, "wide_narrow_wide", k=0) == ("narrow",) * 5
    assert layer_choices(model, "wide_narrow_wide", k=2) == ("wide", "narrow", "narrow", "narrow", "wide")
    assert layer_choices(model, "wide_narrow_wide", k=4) == ("wide", "wide", "narrow", "wide", "wide")
    assert layer_choices(model, "ta") == ("wide",) * 5
    assert layer_choices(model, "student") == tuple(student_choices(model))


def test_extracted_model_is_standalone():
    model = nested("d_model")
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    student = extract(model, "student")
    before = student(idx)
    cfg = model.config
    assert not any(isinstance(m, nn.Module) and "Nested" in type(m).__name__ for m in student.modules())
    for name, tensor in student.state_dict().items():
        assert tensor.is_contiguous(), name
        if tensor.dim() == 2 and name != "wpe.weight":
            assert tensor.shape[1] <= max(cfg.n_embd, cfg.n_inner), name
    nested_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(t.untyped_storage().data_ptr() not in nested_storages for t in student.state_dict().values())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    torch.testing.assert_close(student(idx), before, rtol=0, atol=0)
    assert sum(t.numel() for t in student.state_dict().values()) == student.num_parameters(non_embedding=False)


@pytest.mark.parametrize("nesting", ["layer+depth", "d_model+heads"])
def test_parameter_counts(nesting):
    model = nested(nesting)
    cfg, ta = model.config, model.ta_config
    student, full = extract(model, "student"), extract(model, "ta")
    d, f = cfg.n_embd, cfg.n_inner
    assert student.num_parameters() == cfg.n_layer * (4 * d * d + 2 * f * d + 9 * d + f) + 2 * d
    d, f = ta.n_embd, ta.n_inner
    assert full.num_parameters() == ta.n_layer * (4 * d * d + 2 * f * d + 9 * d + f) + 2 * d
    assert full.num_parameters(non_embedding=False) - full.num_parameters() == (cfg.padded_vocab_size + cfg.n_positions) * d
    family = wide_narrow_wide_family(model)
    assert [m.k for m in family] == list(range(0, len(model.blocks) + 1, 2))
    counts = [m.non_embedding_parameters for m in family]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for member in family:
        built = extract(model, "wide_narrow_wide", k=member.k)
        assert built.num_parameters() == member.non_embedding_parameters
        assert member.layers == layer_choices(model, "wide_narrow_wide", k=member.k)
        assert num_parameters_of(model, member.layers, non_embedding=False) == built.num_parameters(non_embedding=False)
    assert family[0].non_embedding_parameters == gpt2_num_parameters(*_narrow_plan(model))


def _narrow_plan(model):
    built = extract(model, "wide_narrow_wide", k=0)
    return built.config, built.block_shapes


def test_gpt2_medium_matta_family_parameter_counts():
    """The paper's setting: Student 24 layers FFN 4096, TA 36 layers FFN 8192 (built on the meta device)."""
    from matta.models import GPT2Config

    cfg = GPT2Config.preset("gpt2-medium")
    with torch.device("meta"):
        model = NestedGPT2(cfg, NestingConfig(ffn_ta=8192, extra_layers=12))
    family = wide_narrow_wide_family(model, ks=[0, 36])
    d = cfg.n_embd
    narrow_block = 4 * d * d + 2 * 4096 * d + 9 * d + 4096
    wide_block = 4 * d * d + 2 * 8192 * d + 9 * d + 8192
    assert family[0].non_embedding_parameters == 36 * narrow_block + 2 * d
    assert family[1].non_embedding_parameters == 36 * wide_block + 2 * d
    assert num_parameters_of(model, "student") == 24 * narrow_block + 2 * d


@pytest.mark.parametrize(
    "layers, kwargs, message",
    [
        (["wide"] * 4, {}, "has 4 entries but the TA has 5 layers"),
        (["wide", "narrow", "thin", "wide", "wide"], {}, "got 'thin' at layer 2"),
        (["skip"] * 5, {}, "skips every layer"),
        ("wide_narrow_wide", {"k": 3}, "even k in"),
        ("wide_narrow_wide", {"k": 6}, "even k in"),
        ("wide_narrow_wide", {}, "needs k"),
        ("student", {"k": 2}, "k is only used"),
        ("teacher", {}, "unknown extraction preset 'teacher'"),
        ("ta", {"d_model": "medium"}, "d_model must be"),
    ],
)
def test_bad_layer_choices(layers, kwargs, message):
    model = nested("layer+depth")
    with pytest.raises(ValueError, match=message):
        extract(model, layers, **kwargs)


def test_extract_rejects_other_modules():
    with pytest.raises(TypeError, match="NestedGPT2, NestedGAU or NestedHFCausalLM"):
        extract(nn.Linear(3, 4), "student")
