"""`nest_hf` on tiny random transformers models (built from configs, no downloads): the
Student is the original model bit for bit in fp32, both streams share one fused kernel launch
per FFN projection, gradients reach what they should, and every extracted model (Student,
TA, Mix'n'Match) equals its nested path in memory and after `export_hf` + `from_pretrained`."""
import dataclasses

import pytest
import torch

from matta import MatTALoss, extract, num_parameters_of
from matta.hf import export_hf
from matta.models import HFModelConfig, NestedHFCausalLM, NestingConfig, nest_hf
from matta.models import hf_causal
from matta.ops.matta_loss import matta_loss

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, FFN, LAYERS, POSITIONS = 83, 24, 37, 3, 32


def tiny_config(family, **changes):
    """A tiny config of `family` with odd sizes; sliding windows shorter than the test inputs."""
    llama_like = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
        "mistral": lambda: transformers.MistralConfig(**llama_like, sliding_window=5),
        "gemma": lambda: transformers.GemmaConfig(**llama_like, head_dim=6),
        "gemma2": lambda: transformers.Gemma2Config(**llama_like, head_dim=6, sliding_window=5),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_inner=FFN,
                                                n_positions=POSITIONS, bos_token_id=0, eos_token_id=0),
    }
    config = configs[family]()
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def perturb_(model, scale=0.05):
    """Random norms and biases too, so that nothing is left at a special value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def tiny_hf(family, **changes):
    return perturb_(transformers.AutoModelForCausalLM.from_config(tiny_config(family, **changes))).eval()


def ids(batch=3, length=13):
    return torch.randint(0, VOCAB, (batch, length))


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_student_is_the_original_bit_for_bit(family):
    original = tiny_hf(family)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    nested = nest_hf(original, ffn_ta=50, extra_layers=2).eval()
    idx = ids()
    with torch.no_grad():
        ref = original(idx).logits
        ref_hidden = original.base_model(input_ids=idx, use_cache=False).last_hidden_state
        logits_s, logits_ta = nested(idx)
        h_s, h_ta = nested(idx, return_hidden=True)
        alone_s, none = nested(idx, stream="student")
        none_too, alone_ta = nested(idx, stream="ta")
    assert torch.equal(logits_s, ref) and torch.equal(h_s, ref_hidden)
    assert torch.equal(alone_s, ref) and none is None and none_too is None
    assert torch.equal(alone_ta, logits_ta)  # one stream alone computes what the pair does
    # "preserve": the TA starts as the Student's function (to rounding: its FFN GEMMs are wider)
    torch.testing.assert_close(logits_ta, ref, rtol=1e-5, atol=1e-5)
    assert h_ta.shape == h_s.shape and nested.depth == LAYERS + 2 and len(nested.ta_only_layers) == 2
    # the original is copied, not changed
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    first = original.get_submodule(hf_causal.HF_FAMILIES[family].layers)[0]
    assert type(first.get_submodule("mlp")).__name__.endswith("MLP")


def test_one_fused_kernel_launch_carries_both_streams(monkeypatch, check_launches):
    """Under the Triton interpreter: per FFN projection of a Student layer, one launch of the
    nested kernel computes both streams (a TA-only layer's projections one launch each, as one
    stream); the result matches the PyTorch path."""
    original = tiny_hf("llama")
    nested = nest_hf(original, ffn_ta=50, extra_layers=1).eval()
    idx = ids(2)
    expected = nested(idx)
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    from matta.kernels import LAUNCH_COUNTS

    before = LAUNCH_COUNTS["nested_linear.matmul"]
    with check_launches(True, "nested_linear.matmul"):
        logits_s, logits_ta = nested(idx)
    # gate, up, down: one launch each, in the LAYERS shared layers and the one TA-only layer
    assert LAUNCH_COUNTS["nested_linear.matmul"] - before == (LAYERS + 1) * 3
    torch.testing.assert_close(logits_s, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_ta, expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["preserve", "random"])
def test_gradients_reach_the_units_they_should(init):
    """The Student's gradient is the original model's; with "preserve" the new units' output
    weights learn at once while their input weights wait (not both zero: that would never
    learn), and a TA-only layer learns through its zeroed output projections."""
    original = tiny_hf("llama")
    nested = nest_hf(original, ffn_ta=50, extra_layers=1, init=init)
    idx, target = ids(2), ids(2)
    criterion = MatTALoss((1.0, 0.0, 0.0))
    h_s, _ = nested(idx, return_hidden=True, stream="student")
    criterion.fused_linear(h_s, None, nested.lm_head_weight, target).loss.backward()
    torch.nn.functional.cross_entropy(original.train()(idx).logits.flatten(0, 1), target.flatten()).backward()
    layer, nested_layer = original.model.layers[1], nested.blocks[nested.student_layers[1]]
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"):
        grad = nested_layer.get_submodule(name)
        n, m = layer.get_submodule(name).weight.shape
        torch.testing.assert_close(grad.weight.grad[:n, :m], layer.get_submodule(name).weight.grad, rtol=1e-5,
                                   atol=1e-7, msg=name)
    nested.zero_grad()
    h_s, h_ta = nested(idx, return_hidden=True)
    MatTALoss().fused_linear(h_s, h_ta, nested.lm_head_weight, target).loss.backward()
    ffn, n_s = nested._ffn(nested_layer), FFN
    assert ffn.down_proj.weight.grad[:, n_s:].abs().sum() > 0
    new_inputs = ffn.gate_proj.weight.grad[n_s:].abs().sum()
    assert (new_inputs == 0) if init == "preserve" else (new_inputs > 0)
    ta_only = nested.blocks[nested.ta_only_layers[0]]
    assert ta_only.self_attn.o_proj.weight.grad.abs().sum() > 0
    assert ta_only.mlp.down_proj.weight.grad.abs().sum() > 0
    behind = ta_only.self_attn.q_proj.weight.grad.abs().sum()
    assert (behind == 0) if init == "preserve" else (behind > 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # an untied head, and GPT-2's tied one
def test_fused_loss_takes_the_models_own_head(family):
    nested = perturb_(nest_hf(tiny_hf(family, tie_word_embeddings=family == "gpt2"), ffn_ta=50, extra_layers=1))
    head = nested.lm_head_weight
    tied = head is nested.hf.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    idx, target = ids(2), ids(2)
    fused = MatTALoss().fused_linear(*nested(idx, return_hidden=True), head, target, step=None)
    fused.loss.backward()
    fused_grad = head.grad.clone()
    nested.zero_grad()
    full = matta_loss(*nested(idx), target)
    full.loss.backward()
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, head.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_extracted_models_equal_the_nested_paths_and_reload(family, tmp_path):
    nested = perturb_(nest_hf(tiny_hf(family), ffn_ta=50, extra_layers=2)).eval()  # the TA is its own model now
    idx = ids(3, 11)
    logits_s, logits_ta = nested(idx)
    mix = ["wide", "narrow", "skip", "narrow", "wide"]
    for spec, expected in (("student", logits_s), ("ta", logits_ta), (mix, None)):
        sub = extract(nested, spec).eval()
        assert type(sub.hf) is type(nested.hf)
        assert sub.num_parameters() == num_parameters_of(nested, spec)
        out = sub(idx)
        if expected is not None:
            assert torch.equal(out, expected), spec
        folder = tmp_path / str(len(spec))
        export_hf(sub, folder)
        loaded = type(nested.hf).from_pretrained(folder).eval()
        back = loaded(idx).logits
        if len(set(sub.ffn_widths)) == 1:
            assert torch.equal(back, out), spec
        else:  # zero padding adds exact zeros; the longer GEMMs may round differently
            torch.testing.assert_close(back, out, rtol=1e-5, atol=1e-6)
        family_info = hf_causal.HF_FAMILIES[family]
        assert getattr(loaded.config, family_info.n_layers) == len(sub.ffn_widths)
        assert getattr(loaded.config, family_info.ffn_width) == max(sub.ffn_widths)
    assert sub.ffn_widths == (50, FFN, FFN, 50)
    if getattr(nested.hf.config, "layer_types", None) is not None:  # the TA-only layers' kinds travel along
        sources = nested.layer_sources
        kept = [sources[i] for i, c in enumerate(mix) if c != "skip"]
        assert loaded.config.layer_types == [nested.hf.config.layer_types[k] for k in kept]
    padded = loaded.get_submodule(family_info.layers)[1].get_submodule(family_info.mlp)
    weight = padded.get_submodule(family_info.ffn_in[0]).weight
    units = weight[:, FFN:] if family == "gpt2" else weight[FFN:]  # Conv1D stores (in, out)
    assert units.shape[0 if family != "gpt2" else 1] == 50 - FFN and torch.count_nonzero(units) == 0


@pytest.mark.parametrize("positions, expected", [("bottom", (0, 1)), ("top", (3, 4)), ("interleave", (1, 3)),
                                                 ([0, 3], (0, 3))])
def test_ta_only_layers_go_where_they_are_asked(positions, expected):
    nested = nest_hf(tiny_hf("qwen2"), extra_layers=2, extra_layer_positions=positions).eval()
    assert nested.ta_only_layers == expected
    assert nested.ffn_widths == (FFN, 2 * FFN)  # the default TA width: twice the Student's
    assert all(nested.layer_sources[i] == k for k, i in enumerate(nested.student_layers))
    idx = ids(2)
    logits_s = nested(idx)[0]
    with torch.no_grad():  # the TA-only layers move; the Student must not
        for i in nested.ta_only_layers:
            perturb_(nested.blocks[i], 0.2)
    moved_s, moved_ta = nested(idx)
    assert torch.equal(moved_s, logits_s) and not torch.allclose(moved_ta, logits_s)
    assert torch.equal(extract(nested, "ta").eval()(idx), moved_ta)


def test_counts_match_the_original_model():
    original = tiny_hf("llama")
    nested = nest_hf(original, ffn_ta=50, extra_layers=1)
    embeddings = {id(original.get_input_embeddings().weight), id(original.lm_head.weight)}
    body = sum(p.numel() for p in original.parameters() if id(p) not in embeddings)
    assert num_parameters_of(nested, "student") == body
    matrices = sum(p.numel() for p in original.parameters() if p.dim() == 2 and id(p) not in embeddings)
    shape = nested.stream_shape("student")
    assert (shape.n_layer, shape.d_model, shape.ffn) == (LAYERS, WIDTH, FFN)
    assert shape.matmul_parameters == matrices + VOCAB * WIDTH
    ta = nested.stream_shape("ta")
    assert (ta.n_layer, ta.ffn) == (LAYERS + 1, 50)
    assert ta.matmul_parameters == shape.matmul_parameters + 3 * WIDTH * (50 - FFN) * LAYERS + (matrices // LAYERS
                                                                                               + 3 * WIDTH * (50 - FFN))
    assert nested.flops_per_token(13) > nested.flops_per_token(13, ("student",)) > 0


def test_random_init_moves_only_the_ta():
    original = tiny_hf("gpt2")
    nested = nest_hf(original, factor=1.5, extra_layers=1, init="random").eval()
    idx = ids(2)
    logits_s, logits_ta = nested(idx)
    with torch.no_grad():
        assert torch.equal(logits_s, original(idx).logits)
    assert nested.ffn_widths == (FFN, round(1.5 * FFN))
    assert (logits_ta - logits_s).abs().max() > 1e-3


def test_a_model_type_outside_the_registry_with_a_known_layout_is_nested():
    if not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                                      max_position_embeddings=POSITIONS)
    original = perturb_(transformers.Qwen3ForCausalLM(config)).eval()
    assert "qwen3" not in hf_causal.HF_FAMILIES
    nested = nest_hf(original, ffn_ta=40).eval()
    idx = ids(2)
    assert nested.family is hf_causal.LLAMA and torch.equal(nested(idx)[0], original(idx).logits)


def test_unsupported_models_and_settings_are_refused_in_one_line(monkeypatch):
    fused_gate_up = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=POSITIONS, pad_token_id=0))
    with pytest.raises(ValueError, match=r"model_type 'phi3'\) is not in matta.models.hf_causal.HF_FAMILIES and fits "
                                         r"none of its layouts \(as llama-like it has nothing at model.layers.0.mlp.gate_proj"):
        nest_hf(fused_gate_up)
    with pytest.raises(TypeError, match="expected a transformers causal LM"):
        nest_hf(torch.nn.Linear(3, 3))
    llama = tiny_hf("llama")
    for kwargs, message in [(dict(ffn_ta=20), "ffn_ta=20 is smaller than the Student's intermediate_size=37"),
                            (dict(ffn_ta=50, factor=2), "not both"), (dict(factor=0.5), "factor must be a number >= 1"),
                            (dict(init="zeros"), "init must be one of"), (dict(extra_layers=-1), "extra_layers")]:
        with pytest.raises(ValueError, match=message):
            nest_hf(llama, **kwargs)
    config = HFModelConfig(hf_causal.config_dict(llama.config))
    for nest, message in [(NestingConfig(d_model_ta=32), "d_model nesting"), (NestingConfig(share_weights=False),
                                                                              "share_weights=False is not supported")]:
        with pytest.raises(ValueError, match=message):
            NestedHFCausalLM(config, nest, model=llama)
    renamed = hasattr(llama, "activation_checkpointing_enable")  # transformers 5.x's name
    getattr(llama, "activation_checkpointing_enable" if renamed else "gradient_checkpointing_enable")()
    with pytest.raises(ValueError, match="gradient checkpointing on"):
        nest_hf(llama)
    getattr(llama, "activation_checkpointing_disable" if renamed else "gradient_checkpointing_disable")()
    nested = nest_hf(llama)
    with pytest.raises(ValueError, match="exceeds the context length"):
        nested(ids(1, POSITIONS + 1))
    # A layout that is registered but wrong for the model is caught by the probe batch.
    wrong = dataclasses.replace(hf_causal.LLAMA, ffn_kind="plain", ffn_in=("up_proj",))
    monkeypatch.setitem(hf_causal.HF_FAMILIES, "llama", wrong)
    with pytest.raises(ValueError, match="changed the Student's logits on a probe batch"):
        nest_hf(llama)


def test_a_rebuilt_model_loads_a_state_dict():
    """What a run directory's model.json rebuilds (fresh weights of the same shapes), and a
    model built on the meta device then materialised empty (FSDP's whole model), take the
    nested model's state_dict (rotary tables included) and then compute the same."""
    nested = perturb_(nest_hf(tiny_hf("mistral"), ffn_ta=45, extra_layers=1)).eval()
    rebuilt = NestedHFCausalLM(nested.config, nested.nest).eval()
    rebuilt.load_state_dict(nested.state_dict())
    with torch.device("meta"):
        empty = NestedHFCausalLM(nested.config, nested.nest)
    empty.to_empty(device="cpu").load_state_dict(nested.state_dict())
    assert any("rotary" in name for name in nested.state_dict())
    idx = ids(2)
    for model in (rebuilt, empty.eval()):
        for a, b in zip(model(idx), nested(idx)):
            assert torch.equal(a, b)


def test_a_sharded_folder_is_read(tmp_path):
    """Large models are saved in shards (model.safetensors.index.json); matta reads them too."""
    from matta.train.run_dir import is_hf_folder, load_hf_folder

    original = tiny_hf("qwen2")
    original.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").is_file()
    assert is_hf_folder(tmp_path)
    idx = ids(2)
    assert torch.equal(load_hf_folder(tmp_path).eval()(idx), original(idx).logits)
