"""Sizes the Python API takes are ints, never truncated floats or bools; token ids past the true
vocabulary of a padded embedding are an error (CPU) or NaN plus a deferred report (elsewhere),
never the zero padding row read silently."""
import numpy as np
import pytest
import torch

from matta import GAUConfig, GPT2Config, NestedGAU, NestedGPT2, NestedLinear, NestingConfig, nested_linear
from matta.layers import NestedLayerNorm
from matta.ops import DeferredReport


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: NestedLinear((8.9, 16), (4, 8)), TypeError, r"in_features must be a pair \(Student, TA\) of ints"),
        (lambda: NestedLinear((8, 16), (True, 8)), TypeError, r"out_features must be a pair \(Student, TA\) of ints"),
        (lambda: NestedLinear((8, 16), (4, 8, 2)), TypeError, "out_features must be a pair"),
        (lambda: NestedLinear(("8", 16), (4, 8)), TypeError, "in_features must be a pair"),
        (lambda: NestedLinear((8, 16), (4, 8), share_weights="no"), TypeError, "share_weights must be True or False"),
        (lambda: nested_linear(torch.randn(2, 8), None, torch.randn(8, 8), student_features=(True, 8)), TypeError,
         r"student_features must be a pair \(N_S, M_S\) of ints"),
        (lambda: nested_linear(torch.randn(2, 8), None, torch.randn(8, 8), student_features=(4.0, 8)), TypeError,
         "student_features must be a pair"),
        (lambda: NestingConfig(extra_layers=True), TypeError, "NestingConfig.extra_layers must be an int >= 0"),
        (lambda: NestingConfig(extra_layers=1.0), TypeError, "NestingConfig.extra_layers must be an int >= 0"),
        (lambda: NestingConfig(extra_layers=1, extra_layer_positions=[1.5]), TypeError,
         r"extra_layer_positions\[0\] must be an int >= 0"),
        (lambda: NestingConfig(extra_layers=1, extra_layer_positions=3), TypeError, "or a list of TA layer indices"),
        (lambda: NestingConfig(ffn_ta=64.0), TypeError, "NestingConfig.ffn_ta must be a positive int"),
        (lambda: GPT2Config(n_layer=2.0), TypeError, "GPT2Config.n_layer must be a positive int"),
        (lambda: GAUConfig(n_embd=True), TypeError, "GAUConfig.n_embd must be a positive int"),
        (lambda: NestedLayerNorm(4.5, 8, 1e-5), TypeError, "NestedLayerNorm d_s must be a positive int"),
        (lambda: NestedLayerNorm(8, 4, 1e-5), ValueError, "0 < d_s <= d_ta"),
    ],
)
def test_sizes_are_ints(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_integer_scalars_of_other_kinds_are_sizes():
    layer = NestedLinear((np.int64(3), torch.tensor(5)), (4, 7))
    assert layer.in_features == (3, 5) and all(type(v) is int for v in layer.in_features)
    assert NestingConfig(extra_layers=np.int32(2), extra_layer_positions=(np.int64(0), 3)).extra_layer_positions == (0, 3)


def _models():
    gpt2 = NestedGPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2), NestingConfig())
    gau = NestedGAU(GAUConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, attn_dim=8), NestingConfig())
    return {"gpt2": gpt2, "gau": gau}


@pytest.mark.parametrize("family", ["gpt2", "gau"])
@pytest.mark.parametrize("bad", [50, 63, 64, 1000, -1])  # padding rows 50..63, past the table, negative
def test_ids_past_the_vocabulary_are_an_error_on_the_cpu(family, bad):
    model = _models()[family]
    assert model.wte.weight.shape[0] == 64  # padded to a multiple of 64
    idx = torch.randint(0, 50, (2, 7))
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 50\)"):
        model(idx)
    from matta.extraction import extract

    with pytest.raises(ValueError, match="outside the vocabulary"):  # the plain models too
        extract(model, "student")(idx)


@pytest.mark.parametrize("family", ["gpt2", "gau"])
def test_where_checking_would_wait_ids_past_the_vocabulary_become_nan_and_a_report(family):
    """Under torch.compile (as on a GPU) the check runs on the device: the bad token's logits
    are NaN, other sequences are untouched, and the caller's report names the problem."""
    model = _models()[family].eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        clean = model(idx)
    bad = idx.clone()
    bad[1, 3] = 55
    report = DeferredReport()
    compiled = torch.compile(lambda i: model(i, report=report), backend="eager", fullgraph=True)
    with torch.no_grad():
        logits_s, logits_ta = compiled(bad)
        good_s, good_ta = compiled(idx)
    for poisoned, fine, ref in ((logits_s, good_s, clean[0]), (logits_ta, good_ta, clean[1])):
        torch.testing.assert_close(fine, ref)
        assert torch.isnan(poisoned[1, 3]).all()  # (attention spreads the NaN over the rest of its sequence)
        torch.testing.assert_close(poisoned[0], ref[0])
    with pytest.raises(ValueError, match=r"token ids outside the vocabulary \[0, 50\)"):
        report.check()
    compiled(idx)
    report.check()  # a clean batch files a passing check
