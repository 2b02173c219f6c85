"""Hugging Face GPT-2 import/export (tiny random checkpoints built here, no network) and
matta's own safetensors + JSON format for models with per-layer widths."""
import json
import os

import pytest
import torch

from matta.extraction import extract
from matta.hf import export_hf_gpt2, load_extracted, save_extracted
from matta.models import GPT2, GAUConfig, NestedGAU, NestedGPT2, NestingConfig, load_hf_gpt2
from test_models_gpt2 import perturb_, tiny_config


def _hf_checkpoint(tmp_path, safetensors=True, **changes):
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=83, n_positions=24, n_embd=24, n_layer=2, n_head=3, n_inner=None, bos_token_id=0, eos_token_id=0)
    fields.update(changes)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).eval()
    with torch.no_grad():  # random LayerNorms and biases too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "hf"
    if safetensors:
        hf.save_pretrained(folder)
    else:
        folder.mkdir()
        hf.config.to_json_file(folder / "config.json")
        torch.save({k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, folder / "pytorch_model.bin")
    return hf, folder


def _hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("safetensors", [True, False])
def test_import_makes_the_checkpoint_the_student(tmp_path, safetensors):
    hf, folder = _hf_checkpoint(tmp_path, safetensors=safetensors)
    model = NestedGPT2.from_hf_gpt2(folder, NestingConfig(ffn_ta=150, extra_layers=1)).eval()
    assert (model.config.n_embd, model.config.n_layer, model.config.n_inner) == (24, 2, 96)
    idx = torch.randint(0, 83, (2, 10))
    ref = _hf_logits(hf, idx)
    logits_s, logits_ta = model(idx)
    torch.testing.assert_close(logits_s, ref, rtol=1e-4, atol=1e-5)
    # with zero-initialised extras and no d_model nesting, the TA starts as the Student
    torch.testing.assert_close(logits_ta, ref, rtol=1e-4, atol=1e-5)
    plain = load_hf_gpt2(folder).eval()
    torch.testing.assert_close(plain(idx), ref, rtol=1e-4, atol=1e-5)


def test_import_with_d_model_nesting(tmp_path):
    hf, folder = _hf_checkpoint(tmp_path)
    model = NestedGPT2.from_hf_gpt2(folder, NestingConfig(ffn_ta=120, extra_layers=2, d_model_ta=32), zero_init_extras=False)
    idx = torch.randint(0, 83, (3, 9))
    logits_s, logits_ta = model(idx)
    torch.testing.assert_close(logits_s, _hf_logits(hf, idx), rtol=1e-4, atol=1e-5)
    assert logits_ta.shape == logits_s.shape


def test_export_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = NestedGPT2(tiny_config(vocab_size=90), NestingConfig(ffn_ta=64, extra_layers=2)).eval()
    perturb_(model)
    idx = torch.randint(0, 90, (2, 12))
    for name in ("student", "ta"):
        sub = extract(model, name)
        out = tmp_path / name
        export_hf_gpt2(sub, out)
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        torch.testing.assert_close(_hf_logits(hf, idx), sub(idx), rtol=1e-4, atol=1e-5)
        # and back in
        again = NestedGPT2.from_hf_gpt2(out, NestingConfig(ffn_ta=sub.config.n_inner)).eval()
        torch.testing.assert_close(again(idx)[0], sub(idx), rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "ta" / "config.json").read_text())
    assert config["n_layer"] == 5 and config["n_inner"] == 64 and config["vocab_size"] == 90


def test_export_d_model_nested_ta(tmp_path):
    """A TA cut out whole under d_model nesting keeps the nested q/k/v row layout; the
    export reorders it into GPT-2's [q k v]."""
    transformers = pytest.importorskip("transformers")
    model = NestedGPT2(tiny_config(), NestingConfig(ffn_ta=64, extra_layers=1, d_model_ta=40)).eval()
    perturb_(model)
    ta = extract(model, "ta")
    assert ta.h[0].attn.qkv_lead == 24
    export_hf_gpt2(ta, tmp_path / "ta")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ta").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    torch.testing.assert_close(_hf_logits(hf, idx), model(idx)[1], rtol=1e-4, atol=1e-5)


def test_export_refuses_per_layer_widths(tmp_path):
    model = NestedGPT2(tiny_config(), NestingConfig(ffn_ta=64, extra_layers=1))
    mixed = extract(model, "wide_narrow_wide", k=2)
    with pytest.raises(ValueError, match="Use matta.save_extracted"):
        export_hf_gpt2(mixed, tmp_path / "x")
    with pytest.raises(TypeError, match="needs a plain GPT2"):
        export_hf_gpt2(model, tmp_path / "x")


@pytest.mark.parametrize("kind", ["gpt2", "gau"])
def test_own_format_round_trip(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    if kind == "gpt2":
        model = NestedGPT2(tiny_config(), NestingConfig(ffn_ta=64, extra_layers=2, d_model_ta=32)).eval()
    else:
        cfg = GAUConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, expansion=20, attn_dim=8)
        model = NestedGAU(cfg, NestingConfig(ffn_ta=30, extra_layers=1)).eval()
    perturb_(model)
    sub = extract(model, ["wide", "narrow", "skip", "wide"][: len(model.blocks) - 1] + ["narrow"])
    save_extracted(sub, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["matta_model.json", "model.safetensors"]
    loaded = load_extracted(tmp_path / "m").eval()
    assert type(loaded) is type(sub)
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    torch.testing.assert_close(loaded(idx), sub(idx), rtol=0, atol=0)
    assert loaded.num_parameters() == sub.num_parameters()


def test_own_format_keeps_dtype_and_checks_header(tmp_path):
    model = GPT2(tiny_config()).to(torch.bfloat16)
    save_extracted(model, tmp_path / "m")
    assert load_extracted(tmp_path / "m").wte.weight.dtype == torch.bfloat16
    header = json.loads((tmp_path / "m" / "matta_model.json").read_text())
    header["version"] = 99
    (tmp_path / "m" / "matta_model.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="expected 'matta-extracted' version 1"):
        load_extracted(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a model written by matta.save_extracted"):
        load_extracted(tmp_path)


def test_import_rejects_unsupported_checkpoints(tmp_path):
    _, folder = _hf_checkpoint(tmp_path, activation_function="relu")
    with pytest.raises(ValueError, match="tanh-approximated GELU"):
        NestedGPT2.from_hf_gpt2(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NestedGPT2.from_hf_gpt2(tmp_path / "missing")
