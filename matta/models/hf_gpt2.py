"""Reading GPT-2 checkpoints in the Hugging Face layout (no `transformers` needed).

A folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`torch.load(weights_only=True)`, which never unpickles arbitrary objects). Hugging Face
GPT-2 stores its projections as `Conv1D` weights of shape (in, out): they are transposed
into nn.Linear's (out, in) here. The models load through this module
(`GPT2`'s `load_hf_gpt2`, `NestedGPT2.from_hf_gpt2`); it knows their parameter names, not
their classes.
"""
import json
import os

import torch

from .config import GPT2Config

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HF_PREFIX = "transformer."


def gpt2_config_from_hf(hf: dict, **overrides) -> GPT2Config:
    """Our GPT2Config for a Hugging Face GPT-2 config.json dictionary."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"expected a GPT-2 checkpoint (model_type 'gpt2'), got model_type={hf.get('model_type')!r}")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise ValueError(f"only tanh-approximated GELU GPT-2 models are supported ({TANH_GELUS}), got {activation!r}")
    for flag, expected in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
        if hf.get(flag, expected) != expected:
            raise ValueError(f"unsupported GPT-2 option {flag}={hf[flag]!r} (expected {expected!r})")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("only GPT-2 checkpoints with tied input/output embeddings are supported")
    fields = dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf["n_positions"],
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    fields.update(overrides)
    return GPT2Config(**fields)


def read_hf_checkpoint(path) -> tuple[dict, dict]:
    """(config.json dictionary, state dict with the `transformer.` prefix removed)."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face GPT-2 checkpoint folder")
    with open(config_file) as f:
        hf_config = json.load(f)
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_file):
        from safetensors.torch import load_file

        state = load_file(st_file)
    elif os.path.isfile(bin_file):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")
    state = {k[len(HF_PREFIX) :] if k.startswith(HF_PREFIX) else k: v for k, v in state.items()}
    return hf_config, state


def linear_state_from_hf(state: dict, config: GPT2Config) -> dict:
    """Per-layer tensors in nn.Linear orientation: {name: tensor}, names as in our GPT2."""
    def get(name):
        if name not in state:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        return state[name]

    out = {"wte.weight": get("wte.weight"), "wpe.weight": get("wpe.weight")}
    expected_wte = (config.vocab_size, config.n_embd)
    if tuple(out["wte.weight"].shape) != expected_wte:
        raise ValueError(f"wte.weight has shape {tuple(out['wte.weight'].shape)}, config says {expected_wte}")
    for i in range(config.n_layer):
        for sub in ("ln_1", "ln_2"):
            for leaf in ("weight", "bias"):
                out[f"h.{i}.{sub}.{leaf}"] = get(f"h.{i}.{sub}.{leaf}")
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"h.{i}.{sub}.weight"] = get(f"h.{i}.{sub}.weight").t()  # Conv1D (in, out) -> (out, in)
            out[f"h.{i}.{sub}.bias"] = get(f"h.{i}.{sub}.bias")
    for leaf in ("weight", "bias"):
        out[f"ln_f.{leaf}"] = get(f"ln_f.{leaf}")
    return out


def read_gpt2(path) -> tuple[GPT2Config, dict]:
    """(our GPT2Config, tensors in nn.Linear orientation named as in our GPT2) of the
    Hugging Face GPT-2 checkpoint folder at `path`."""
    hf_config, state = read_hf_checkpoint(path)
    config = gpt2_config_from_hf(hf_config)
    return config, linear_state_from_hf(state, config)


def copy_into_plain(model, tensors: dict) -> None:
    """Load `read_gpt2`'s tensors into a plain GPT2 of the checkpoint's configuration."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            target = params[name]
            if name == "wte.weight":
                target = target[: model.config.vocab_size]
            target.copy_(value)


def copy_into_nested(model, tensors: dict, *, zero_init_extras: bool) -> None:
    """Make `read_gpt2`'s tensors the Student of a NestedGPT2 built on the checkpoint's
    configuration; with `zero_init_extras`, the TA's new units start with no effect on the
    residual stream."""
    config = model.config
    d_s, v = config.n_embd, config.vocab_size
    with torch.no_grad():
        model.wte.weight[:v, :d_s].copy_(tensors["wte.weight"])
        model.wpe.weight[:, :d_s].copy_(tensors["wpe.weight"])
        _copy_norm(model.ln_f, tensors, "ln_f")
        for student_index, ta_index in enumerate(model.student_layers):
            block, prefix = model.blocks[ta_index], f"h.{student_index}"
            _copy_norm(block.ln_1, tensors, f"{prefix}.ln_1")
            _copy_norm(block.ln_2, tensors, f"{prefix}.ln_2")
            _copy_linear(block.attn.c_attn, tensors, f"{prefix}.attn.c_attn")
            _copy_linear(block.attn.c_proj, tensors, f"{prefix}.attn.c_proj")
            _copy_linear(block.mlp.c_fc, tensors, f"{prefix}.mlp.c_fc")
            _copy_linear(block.mlp.c_proj, tensors, f"{prefix}.mlp.c_proj")
            if zero_init_extras:
                # The TA's new hidden units and heads start with no effect on the residual.
                block.mlp.c_proj.weight[:, config.n_inner :].zero_()
                block.attn.c_proj.weight[:, d_s:].zero_()
        if zero_init_extras:
            for ta_index in model.ta_only_layers:
                block = model.blocks[ta_index]
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()


def _copy_norm(norm, tensors, prefix):
    d_s = norm.d_s
    norm.weight[:d_s].copy_(tensors[f"{prefix}.weight"])
    norm.bias[:d_s].copy_(tensors[f"{prefix}.bias"])


def _copy_linear(layer, tensors, prefix):
    """The Student block of a NestedLinear := the checkpoint's layer; the TA's extra inputs
    to the Student rows start at zero, so the TA sees the Student's features plus new units."""
    n_s, m_s = layer.student_features
    weight = tensors[f"{prefix}.weight"]
    if tuple(weight.shape) != (n_s, m_s):
        raise ValueError(f"{prefix}.weight has shape {tuple(weight.shape)}, expected {(n_s, m_s)}")
    layer.weight[:n_s, m_s:].zero_()
    layer.weight[:n_s, :m_s].copy_(weight)
    layer.bias[:n_s].copy_(tensors[f"{prefix}.bias"])
