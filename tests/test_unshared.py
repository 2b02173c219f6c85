"""NestingConfig(share_weights=False), the paper's Table 4 ablation: the same start as the
shared model of the same seed, independent Dense weights afterwards, Student/TA extraction
only, and clear errors for what it does not offer."""
import pytest
import torch

from matta.extraction import extract, wide_narrow_wide_family
from matta.layers import NestedLinear
from matta.models import GAUConfig, NestedGAU, NestedGPT2, NestingConfig
from test_models_gpt2 import NESTINGS, perturb_, tiny_config


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")


def _unshared(nest: NestingConfig) -> NestingConfig:
    return NestingConfig(**{**nest.__dict__, "share_weights": False})


GAU_CASES = {
    "gau-lm": (GAUConfig(vocab_size=53, n_positions=20, n_embd=20, n_layer=3, expansion=28, attn_dim=12),
               NestingConfig(ffn_ta=44, extra_layers=1)),
    "gau-classifier": (GAUConfig(vocab_size=53, n_positions=20, n_embd=20, n_layer=2, expansion=28, attn_dim=12, num_classes=3),
                       NestingConfig(ffn_ta=36, d_model_ta=28)),
}
CASES = {**{f"gpt2-{k}": (NestedGPT2, tiny_config(), v) for k, v in NESTINGS.items()},
         **{k: (NestedGAU, c, n) for k, (c, n) in GAU_CASES.items()}}


def build_pair(name):
    cls, config, nest = CASES[name]
    seed = torch.randint(1 << 30, ()).item()
    torch.manual_seed(seed)
    shared = cls(config, nest)
    torch.manual_seed(seed)
    unshared = cls(config, _unshared(nest))
    return shared, unshared


def dense_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NestedLinear)]


@pytest.mark.parametrize("name", list(CASES))
def test_starts_as_the_shared_model_of_the_same_seed(name):
    shared, unshared = build_pair(name)
    own = dict(unshared.named_parameters())
    for key, p in shared.named_parameters():  # every shared parameter: the very same numbers
        torch.testing.assert_close(own.pop(key), p, rtol=0, atol=0)
    assert own and all(k.rsplit(".", 1)[1] in ("student_weight", "student_bias") for k in own)
    for name_, layer in dense_layers(unshared):
        block = next(i for i, b in enumerate(unshared.blocks) if name_.startswith(f"blocks.{i}.")) if name_.startswith("blocks.") else None
        if block is not None and unshared.blocks[block].ta_only:
            assert layer.share_weights, "a TA-only layer has no Student to unshare"
            continue
        assert not layer.share_weights
        n_s, m_s = layer.student_features
        torch.testing.assert_close(layer.student_weight, layer.weight[:n_s, :m_s], rtol=0, atol=0)
    idx = torch.randint(0, shared.config.vocab_size, (2, 11))
    for a, b in zip(shared(idx), unshared(idx)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_student_uses_its_own_dense_weights_and_extracts_exactly(name):
    _, model = build_pair(name)
    model.eval()
    perturb_(model)  # the Student's own weights now differ from the TA's leading blocks
    idx = torch.randint(0, model.config.vocab_size, (3, 9))
    logits_s, logits_ta = model(idx)
    torch.testing.assert_close(extract(model, "student")(idx), logits_s, rtol=0, atol=0)
    torch.testing.assert_close(extract(model, "ta")(idx), logits_ta, rtol=0, atol=0)
    with torch.no_grad():  # the TA's leading blocks no longer feed the Student ...
        for _, layer in dense_layers(model):
            if not layer.share_weights:
                n_s, m_s = layer.student_features
                layer.weight[:n_s, :m_s].add_(1.0)
    again_s, again_ta = model(idx)
    torch.testing.assert_close(again_s, logits_s, rtol=0, atol=0)
    assert not torch.allclose(again_ta, logits_ta)  # ... but still the TA


@pytest.mark.parametrize("name", ["gpt2-layer+depth", "gau-lm"])
def test_student_loss_sends_no_gradient_into_the_ta_dense_weights(name):
    _, model = build_pair(name)
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    model(idx)[0].square().mean().backward()
    for _, layer in dense_layers(model):
        assert layer.weight.grad is None or not layer.weight.grad.any()
        if not layer.share_weights:
            assert layer.student_weight.grad is not None and layer.student_weight.grad.any()


def test_what_an_unshared_model_does_not_offer():
    _, model = build_pair("gpt2-layer+depth")
    for layers, kwargs in (("wide_narrow_wide", {"k": 2}), (["wide", "narrow", "narrow", "wide", "narrow"], {})):
        with pytest.raises(ValueError, match="offers only 'student' and 'ta'"):
            extract(model, layers, **kwargs)
    with pytest.raises(ValueError, match="offers only 'student' and 'ta'"):
        wide_narrow_wide_family(model)
    with pytest.raises(ValueError, match="share_weights must be True or False"):
        NestingConfig(share_weights="no")
    with pytest.raises(ValueError, match="shared model only"):
        NestedGPT2.from_hf_gpt2("unused", NestingConfig(share_weights=False))


def test_matta_train_runs_the_unshared_ablation(tmp_path):
    """`matta train --no-share-weights`: the Student trains its own Dense weights, the run
    reloads as an unshared model, and the table's Student row is that Student's loss."""
    from matta.train import load_run
    from matta.scoring import validation_loss
    from matta.train import ConfigError, make_config, train

    common = dict(data="builtin", tokenizer="bytes", n_layer=2, n_embd=32, n_head=2, ffn=64, ffn_ta=128,
                  block_size=16, batch_size=4, max_steps=3, warmup_steps=1, eval_interval=0, eval_tokens=256,
                  progress=False, threads=1, optimizer="shampoo", start_preconditioning_step=1,
                  precondition_frequency=1)
    cfg = make_config(dict(common, out=str(tmp_path / "run"), share_weights=False, family=False, baseline=False))
    results = train(cfg, log=lambda *a, **k: None)
    rows = {r["spec"]: r for r in results["models"]}
    assert set(rows) == {"student", "ta"} and "unshared" in rows["student"]["about"]
    run_cfg, model, _ = load_run(tmp_path / "run")
    assert not run_cfg.share_weights and not model.nest.share_weights
    layer = model.blocks[0].mlp.c_fc
    assert not torch.equal(layer.student_weight, layer.weight[: layer.student_weight.shape[0], : layer.student_weight.shape[1]])
    from matta.data import load_data

    val = load_data("builtin", block_size=16, tokenizer="bytes").val_blocks(256)
    assert rows["student"]["val_loss"] == pytest.approx(validation_loss(extract(model, "student"), val, batch_size=4), abs=1e-6)
    for changes, message in ((dict(mode="student"), "--mode matta"), (dict(family=True), "--no-family")):
        with pytest.raises(ConfigError, match=message):
            make_config({**common, "out": str(tmp_path / "bad"), "share_weights": False, "family": False, **changes})
