"""Saving extracted models: Hugging Face layouts, and matta's own format.

`export_hf(model, out_dir)` writes a plain `HFCausalLM` (what `extract` cuts out of a nested
Hugging Face model, `matta.nest_hf`) as a folder its own transformers class loads with
`from_pretrained`; see its docstring for models whose FFN widths differ per layer.

`export_hf_gpt2(model, out_dir)` writes a uniform-width plain `GPT2` (what `extract`
returns) as `config.json` + `model.safetensors` in the Hugging Face GPT-2 layout, so
`transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it and computes the same
logits. (Reading that layout: `NestedGPT2.from_hf_gpt2` and `matta.models.load_hf_gpt2`.)

Models whose layers have different widths (Mix'n'Match results) do not fit that layout.
`save_extracted(model, out_dir)` writes any plain `GPT2` or `GAU` in matta's own format:

    out_dir/matta_model.json   {"format": "matta-extracted", "version": 1,
                                "architecture": "gpt2" | "gau",
                                "config": {GPT2Config / GAUConfig fields},
                                "layers": [{"n_head", "head_dim", "n_inner", "qkv_lead"}
                                           per block (gpt2) | {"expansion", "uv_lead"}
                                           per layer (gau)]}   (see BlockShape / GAULayerShape)
    out_dir/model.safetensors  the model's state_dict, names as in `model.state_dict()`
                               (the embedding keeps its padded rows)

and `load_extracted(out_dir)` rebuilds the model (safetensors: nothing is unpickled).
"""
import dataclasses
import json
import os

import torch

from .models import GAU, GPT2, BlockShape, GAUConfig, GAULayerShape, GPT2Config, HFCausalLM
from .models.gpt2 import split_nested_qkv
from .nestify import is_conv1d

FORMAT_NAME = "matta-extracted"
FORMAT_VERSION = 1
FORMAT_FILE = "matta_model.json"
WEIGHTS_FILE = "model.safetensors"


def _save_tensors(tensors: dict, path: str):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def export_hf_gpt2(model: GPT2, out_dir) -> None:
    """Write a uniform-width plain GPT2 in the Hugging Face GPT-2 layout (config.json +
    model.safetensors, fp32 or the model's dtype, tied head, true vocabulary only)."""
    if not isinstance(model, GPT2):
        raise TypeError(f"export_hf_gpt2 needs a plain GPT2 (from matta.extract), got {type(model).__name__}")
    config, shapes = model.config, model.block_shapes
    d = config.n_embd
    widths = {(s.n_head, s.head_dim, s.n_inner) for s in shapes}
    if len(widths) != 1 or shapes[0].attn_dim != d:
        raise ValueError(
            f"the Hugging Face GPT-2 layout needs every block with attention width n_embd={d} and one FFN "
            f"width; this model has (n_head, head_dim, n_inner) = {sorted(widths)}. Use matta.save_extracted instead."
        )
    os.makedirs(out_dir, exist_ok=True)
    v = config.vocab_size
    eos = min(50256, v - 1)
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": v,
        "n_positions": config.n_positions,
        "n_embd": d,
        "n_layer": len(shapes),
        "n_head": shapes[0].n_head,
        "n_inner": shapes[0].n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    tensors = {"transformer.wte.weight": model.wte.weight[:v], "transformer.wpe.weight": model.wpe.weight}
    for i, block in enumerate(model.h):
        prefix = f"transformer.h.{i}"
        for name in ("ln_1", "ln_2"):
            norm = getattr(block, name)
            tensors[f"{prefix}.{name}.weight"], tensors[f"{prefix}.{name}.bias"] = norm.weight, norm.bias
        c_attn = block.attn.c_attn
        weight_t, bias = c_attn.weight.t(), c_attn.bias
        if block.attn.qkv_lead is not None:  # nested row layout -> GPT-2's [q k v]
            lead = block.attn.qkv_lead
            weight_t = torch.cat(split_nested_qkv(weight_t, lead), dim=-1)
            bias = torch.cat(split_nested_qkv(bias, lead), dim=-1)
        tensors[f"{prefix}.attn.c_attn.weight"], tensors[f"{prefix}.attn.c_attn.bias"] = weight_t, bias
        for name, linear in (
            ("attn.c_proj", block.attn.c_proj),
            ("mlp.c_fc", block.mlp.c_fc),
            ("mlp.c_proj", block.mlp.c_proj),
        ):
            tensors[f"{prefix}.{name}.weight"] = linear.weight.t()  # nn.Linear (out, in) -> Conv1D (in, out)
            tensors[f"{prefix}.{name}.bias"] = linear.bias
    tensors["transformer.ln_f.weight"], tensors["transformer.ln_f.bias"] = model.ln_f.weight, model.ln_f.bias
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _save_tensors(tensors, os.path.join(out_dir, WEIGHTS_FILE))


def export_hf(model: HFCausalLM, out_dir) -> None:
    """Write a plain HFCausalLM as a folder that its transformers class loads with
    `from_pretrained` (`save_pretrained`'s config.json and model.safetensors).

    The configs of these families state one FFN width for every layer. A Mix'n'Match model's
    narrower FFNs are written zero-padded to the widest one (`config.<ffn width field>`): the
    padded units' input weights and biases and their output weights are zero, so each adds an
    exact 0 and the folder computes what the model in memory computes. The price: the folder
    stores, and a plain transformers forward runs, every FFN at the widest width, so a layer of
    width w costs 3 d w_max (gated FFN; 2 d w_max + w_max for GPT-2) parameters and as many
    multiply-adds per token instead of 3 d w. `model.num_parameters()` counts the true widths.
    """
    if not isinstance(model, HFCausalLM):
        raise TypeError(f"export_hf needs a plain HFCausalLM (from matta.extract of a nested Hugging Face model), "
                        f"got {type(model).__name__}")
    hf, family = model.hf, model.family
    width = getattr(hf.config, family.ffn_width)
    state = hf.state_dict()
    for i, layer in enumerate(hf.get_submodule(family.layers)):
        mlp = layer.get_submodule(family.mlp)
        for name in (*family.ffn_in, family.ffn_out):
            proj, key = getattr(mlp, name), f"{family.layers}.{i}.{family.mlp}.{name}"
            # The FFN-unit axis: rows of an input projection's nn.Linear weight, columns of the
            # output projection's; Conv1D stores the transpose.
            unit_dim = (0 if name in family.ffn_in else 1) ^ int(is_conv1d(proj))
            for leaf, tensor in (("weight", proj.weight), ("bias", proj.bias)):
                dim = unit_dim if leaf == "weight" else 0
                if tensor is None or (leaf == "bias" and name == family.ffn_out) or tensor.shape[dim] == width:
                    continue
                pad = list(tensor.shape)
                pad[dim] = width - tensor.shape[dim]
                state[f"{key}.{leaf}"] = torch.cat([tensor.detach(), tensor.new_zeros(pad)], dim=dim)
    hf.save_pretrained(out_dir, state_dict=state)


def save_extracted(model, out_dir) -> None:
    """Write a plain GPT2 or GAU (any per-layer widths) in matta's own format."""
    if isinstance(model, GPT2):
        architecture, layers = "gpt2", model.block_shapes
    elif isinstance(model, GAU):
        architecture, layers = "gau", model.layer_shapes
    else:
        raise TypeError(f"save_extracted needs a plain GPT2 or GAU (from matta.extract), got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "architecture": architecture,
        "config": dataclasses.asdict(model.config),
        "layers": [dataclasses.asdict(s) for s in layers],
    }
    with open(os.path.join(out_dir, FORMAT_FILE), "w") as f:
        json.dump(header, f, indent=2)
    _save_tensors(model.state_dict(), os.path.join(out_dir, WEIGHTS_FILE))


def load_extracted(path, device=None):
    """Rebuild the GPT2 or GAU written by `save_extracted`."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    header_file = os.path.join(path, FORMAT_FILE)
    if not os.path.isfile(header_file):
        raise FileNotFoundError(f"no {FORMAT_FILE} in {path!r}: not a model written by matta.save_extracted")
    with open(header_file) as f:
        header = json.load(f)
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{header_file} has format {header.get('format')!r} version {header.get('version')!r}; "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    architecture = header.get("architecture")
    if architecture == "gpt2":
        model = GPT2(GPT2Config(**header["config"]), [BlockShape(**s) for s in header["layers"]])
    elif architecture == "gau":
        model = GAU(GAUConfig(**header["config"]), [GAULayerShape(**s) for s in header["layers"]])
    else:
        raise ValueError(f"{header_file}: unknown architecture {architecture!r} (expected 'gpt2' or 'gau')")
    state = load_file(os.path.join(path, WEIGHTS_FILE))
    model.to(dtype=state["wte.weight"].dtype)
    model.load_state_dict(state, strict=True)
    return model.to(device=device)
