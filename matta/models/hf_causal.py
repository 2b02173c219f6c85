"""Hugging Face causal LMs as MatTA Students: `nest_hf` and `NestedHFCausalLM`.

`nest_hf(model, ffn_ta=... | factor=..., extra_layers=..., init=...)` takes a `transformers`
causal LM (Llama, Mistral, Qwen2, Gemma, Gemma 2, GPT-2, or a model laid out like one of them)
and returns a `NestedLM`: the model is the Student, and the TA has wider FFNs (every FFN
projection a `NestedLinear` whose Student block holds the original weights; GPT-2's `Conv1D`
weights are transposed into it) and, optionally, TA-only decoder layers (depth nesting). The
trainer, the MatTA loss and extraction treat it like matta's own models.

How both streams run. The base model (embeddings, masks, rotary tables) runs once on the batch
stacked twice, [Student; TA]. Each decoder layer is wrapped (`NestedDecoderLayer`), which
splits the halves and runs the original layer on each, so every GEMM, attention and norm of the
Student has the shapes the original model gives it (CPU BLAS rounds differently for different
row counts: stacking alone would cost the bit-exactness). The FFN is run for both streams at
once: in the Student's call of the layer it records its input and returns zeros; in the TA's
call one call of each nested projection computes both streams (the fused kernels on a GPU) and
returns the TA's output; the Student's, after the family's post-FFN norm (Gemma 2 has one), is
then added to the Student's layer output. (Inside the TA's call, so that FSDP, which gathers a
layer's weights for each of its calls, holds them.) This needs the layer to end in
`residual + post_ffn_norm(mlp(x))` with one FFN call: true of every registered family, and
checked on a probe batch whenever a model is nested. The final norm also runs per stream;
the head is the model's own, tied or not. With one stream (`stream="student"` or `"ta"`) the
base model runs on the plain batch and each FFN computes that stream alone.

Families are a registry, `HF_FAMILIES` (by `config.model_type`): where the decoder layers,
FFN projections, activation and final norm are, and which config fields hold the FFN width,
the depth and the context length. A model type not in it is matched against the registered
layouts; one that fits none is refused with a line naming what is missing.

The TA's initialisation (`init`):
- "preserve" (default): the TA starts out computing the Student's function. New FFN units get
  fresh input weights (rows of gate/up or c_fc, N(0, initializer_range)) and zero output
  weights (columns of down_proj / c_proj): they add nothing yet, but those output weights get
  gradient at once (zero weights on both sides would get none, ever). A TA-only layer is a copy
  of the Student layer below it (above it, at the bottom) whose residual-writing projections
  (attention output and FFN down) are zero: the identity, with gradient in those projections.
  The TA thus starts at the pretrained Student's quality, so the distillation term never pulls
  the Student towards a worse model, and MatTA and a Student-only baseline start from the same
  function.
- "random": new FFN units (both sides) and the matrices of TA-only layers are drawn
  N(0, initializer_range), biases zero, TA-only norms copied; the TA starts elsewhere.

Not nested: the attention, the residual width (no d_model nesting) and the embeddings; there is
no unshared ablation (`share_weights=False`) for these models.

Gemma 2 soft-caps its final logits (z -> c tanh(z / c)): `forward` and `lm_logits` do too, but
`lm_head_weight` with `fused_linear_matta_loss` computes linear logits, so `matta train` refuses
such a model (`logit_softcap` names the cap); train it on `model(idx)`'s logits with `MatTALoss`.

`matta.extract` cuts plain `HFCausalLM` models out of a nested one (the same transformers class,
each FFN at its true width), and `matta.hf.export_hf` writes them as `from_pretrained` folders.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import NestedLinear
from ..nestify import is_conv1d, nest_projection, plain_projection, projection_features
from ._common import check_ids_on_host, check_tokens, ids_checked_on_host, ids_outside, resolve_ffn_ta
from .base import NestedLM, StreamShape, check_stream
from .config import NestingConfig, ta_only_layer_indices

INITS = ("preserve", "random")
FFN_KINDS = ("gated", "plain")
PROBE_TOKENS = 8


@dataclass(frozen=True)
class HFFamily:
    """Where a family of transformers causal LMs keeps what nesting touches. `layers`,
    `final_norm` and `position_embedding` are submodule paths from the causal LM; `mlp` is the
    FFN inside a decoder layer, `ffn_in`/`ffn_out`/`act`/`dropout` are inside the FFN, and
    `post_ffn_norm`/`attn_out` inside a decoder layer. The other fields name config fields.

    `ffn_kind` "gated": mlp(x) = out(act(in_0(x)) * in_1(x)) (SwiGLU / GeGLU); "plain":
    mlp(x) = dropout(out(act(in_0(x)))). The layer must end in `residual +
    post_ffn_norm(mlp(x))` (no post_ffn_norm: the identity)."""

    name: str
    layers: str
    final_norm: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    ffn_kind: str = "gated"
    mlp: str = "mlp"
    act: str = "act_fn"
    dropout: str | None = None
    post_ffn_norm: str | None = None
    attn_out: str = "self_attn.o_proj"
    ffn_width: str = "intermediate_size"
    n_layers: str = "num_hidden_layers"
    positions: str = "max_position_embeddings"
    position_embedding: str | None = None
    logit_softcap: str | None = None

    def __post_init__(self):
        if self.ffn_kind not in FFN_KINDS or len(self.ffn_in) != (2 if self.ffn_kind == "gated" else 1):
            raise ValueError(f"HFFamily {self.name}: ffn_kind must be 'gated' (two ffn_in) or 'plain' (one)")


LLAMA = HFFamily("llama-like", layers="model.layers", final_norm="model.norm", ffn_in=("gate_proj", "up_proj"),
                 ffn_out="down_proj")
GEMMA2 = dataclasses.replace(LLAMA, name="gemma2-like", post_ffn_norm="post_feedforward_layernorm",
                             logit_softcap="final_logit_softcapping")
GPT2 = HFFamily("gpt2-like", layers="transformer.h", final_norm="transformer.ln_f", ffn_in=("c_fc",), ffn_out="c_proj",
                ffn_kind="plain", act="act", dropout="dropout", attn_out="attn.c_proj", ffn_width="n_inner",
                n_layers="n_layer", positions="n_positions", position_embedding="transformer.wpe")

# The supported families, by `config.model_type`. Another family is one entry (a new HFFamily
# where its layout differs); tests/test_hf_causal.py shows what to check.
HF_FAMILIES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gemma": LLAMA, "gemma2": GEMMA2, "gpt2": GPT2}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError('Hugging Face models need transformers: pip install -e ".[hf]"', name="transformers") from None
    return transformers


def _dtype_kwargs(dtype) -> dict:
    """The dtype argument of from_pretrained / from_config (`torch_dtype` before 4.56)."""
    major, minor = (int(part) for part in _transformers().__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _submodule(root: nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _is_projection(module) -> bool:
    return isinstance(module, (nn.Linear, NestedLinear)) or is_conv1d(module)


def _layout_problem(model, family: HFFamily) -> str | None:
    """What `model` lacks to be nested as `family`, in a few words; None if nothing."""
    layers = _submodule(model, family.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"has no decoder layer list {family.layers!r}"
    if _submodule(model, family.final_norm) is None:
        return f"has no final norm {family.final_norm!r}"
    for i, layer in enumerate(layers):
        where = f"{family.layers}.{i}"
        mlp = _submodule(layer, family.mlp)
        if mlp is None:
            return f"has no FFN {where}.{family.mlp}"
        for name in (*family.ffn_in, family.ffn_out):
            proj = _submodule(mlp, name)
            if not _is_projection(proj):
                kind = "nothing" if proj is None else f"a {type(proj).__name__}"
                return f"has {kind} at {where}.{family.mlp}.{name}, not an nn.Linear or Conv1D"
        if not callable(getattr(mlp, family.act, None)):
            return f"has no FFN activation {where}.{family.mlp}.{family.act}"
        if not _is_projection(_submodule(layer, family.attn_out)):
            return f"has no attention output projection {where}.{family.attn_out}"
        if family.post_ffn_norm is not None and _submodule(layer, family.post_ffn_norm) is None:
            return f"has no post-FFN norm {where}.{family.post_ffn_norm}"
    for field in (family.n_layers, family.positions):
        if not isinstance(getattr(model.config, field, None), int):
            return f"has no config field {field!r}"
    return None


def family_of(model) -> HFFamily:
    """The registered family of a transformers causal LM, or the registered layout it fits;
    ValueError naming what is missing when there is none."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"expected a transformers causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    what = f"{type(model).__name__} (model_type {model_type!r})"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{what} has no linear output head (get_output_embeddings()): not a causal LM matta can nest")
    if head.bias is not None:
        raise ValueError(f"{what}: its output head has a bias, which matta's LM head (lm_head_weight) does not take")
    if model_type in HF_FAMILIES:
        family = HF_FAMILIES[model_type]
        problem = _layout_problem(model, family)
        if problem is not None:
            raise ValueError(f"{what} {problem} (as its HF_FAMILIES entry {family.name} expects)")
        return family
    problems = []
    for family in dict.fromkeys(HF_FAMILIES.values()):
        problem = _layout_problem(model, family)
        if problem is None:
            return family
        problems.append(f"as {family.name} it {problem}")
    raise ValueError(f"{what} is not in matta.models.hf_causal.HF_FAMILIES and fits none of its layouts "
                     f"({'; '.join(problems)}); add an HFFamily entry for it")


def _embedding_ids(model, family: HFFamily) -> set:
    """ids of the embedding parameters (token and position embeddings, the output head), which
    non-embedding counts leave out."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    if family.position_embedding is not None:
        modules.append(_submodule(model, family.position_embedding))
    return {id(p) for m in modules if m is not None for p in m.parameters()}


def config_dict(config) -> dict:
    """A transformers config as a JSON-able dictionary (all fields, not only non-defaults)."""
    return json.loads(config.to_json_string(use_diff=False))


def _first(output):
    """The hidden states in a decoder layer's output (a tensor, or a tuple starting with them)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def _split_halves(value, batch: int):
    """(Student half, TA half) of a value in a stacked [Student; TA] call: tensors of two or
    more dimensions whose leading size is the stacked batch (hidden states, per-sequence masks)
    are split; everything else (shared position tables, None, flags) goes to both."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 2 * batch:
        return value[:batch], value[batch:]
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        pairs = [_split_halves(v, batch) for v in value]
        return type(value)(p[0] for p in pairs), type(value)(p[1] for p in pairs)
    return value, value


# ----------------------------------------------------------------------------------------
# The nested pieces of a decoder layer


class NestedFFN(nn.Module):
    """A decoder layer's FFN with nested projections (Student width n_s, TA width n_ta).

    Its children are the original FFN's under the same names (the projections now
    NestedLinear), so parameter names inside a decoder layer stay those of transformers.
    `mode` "student" / "ta" computes that stream. "capture" records the input (the Student's)
    and returns zeros; "fuse" then computes both streams from the recorded input and this one
    (the TA's), one call per projection, returns the TA's output and keeps the Student's for
    `take_student`."""

    def __init__(self, mlp: nn.Module, family: HFFamily, ffn_ta: int):
        super().__init__()
        self.kind, self.in_names, self.out_name = family.ffn_kind, family.ffn_in, family.ffn_out
        self.act_name, self.dropout_name = family.act, family.dropout
        for name, child in mlp.named_children():
            setattr(self, name, child)
        setattr(self, self.act_name, getattr(mlp, self.act_name))  # may be a plain function
        n_s, d = projection_features(getattr(mlp, self.in_names[0]))
        self.widths = (n_s, ffn_ta)
        for name in self.in_names:
            setattr(self, name, nest_projection(getattr(mlp, name), (d, d), (n_s, ffn_ta)))
        setattr(self, self.out_name, nest_projection(getattr(mlp, self.out_name), (n_s, ffn_ta), (d, d)))
        self.mode = "student"
        self._captured: list = []  # the Student's input, then (by "fuse") its output

    def projections(self):
        """(name, NestedLinear) of the input projections, then the output projection."""
        return [(name, getattr(self, name)) for name in (*self.in_names, self.out_name)]

    def init_new_units(self, init: str, std: float) -> None:
        """Draws the TA's new units (see the module docstring; `from_linear` left the rest)."""
        n_s = self.widths[0]
        with torch.no_grad():
            for name in self.in_names:
                layer = getattr(self, name)
                layer.weight[n_s:].normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias[n_s:].zero_()
            out = getattr(self, self.out_name).weight[:, n_s:]
            out.normal_(0.0, std) if init == "random" else out.zero_()

    def _compute(self, xs, project):
        """The FFN of each stream in `xs`; `project(layer, inputs)` runs one projection."""
        act = getattr(self, self.act_name)
        if self.kind == "gated":
            gate, up = (project(getattr(self, name), xs) for name in self.in_names)
            hidden = tuple(act(g) * u for g, u in zip(gate, up))
        else:
            hidden = tuple(act(h) for h in project(getattr(self, self.in_names[0]), xs))
        out = project(getattr(self, self.out_name), hidden)
        if self.dropout_name is not None:
            drop = getattr(self, self.dropout_name)
            out = tuple(drop(o) for o in out)
        return out

    def forward(self, x):
        if self.mode == "capture":
            self._captured.append(x)
            return torch.zeros_like(x)
        if self.mode == "fuse":
            x_s = self._one_call("Student")
            y_s, y_ta = self._compute((x_s, x), lambda layer, xs: layer(*xs))
            self._captured.append(y_s)
            self.mode = "fused"  # a second call in the same layer call is an error
            return y_ta
        if self.mode == "student":
            return self._compute((x,), lambda layer, xs: (layer.forward_student(xs[0]),))[0]
        if self.mode == "ta":
            return self._compute((x,), lambda layer, xs: (layer.forward_ta(xs[0]),))[0]
        raise RuntimeError(self._calls_error(2))

    def _one_call(self, stream):
        captured, self._captured = self._captured, []
        if len(captured) != 1:
            raise RuntimeError(self._calls_error(len(captured), stream))
        return captured[0]

    @staticmethod
    def _calls_error(calls, stream="TA"):
        return (f"the decoder layer called its FFN {calls} times in the {stream}'s forward; nesting a Hugging Face "
                "model needs exactly one call (see matta.models.hf_causal)")

    def take_student(self):
        """The Student's FFN output computed by the last "fuse" call."""
        if self.mode != "fused":
            raise RuntimeError(self._calls_error(0))
        return self._one_call("TA")


class NestedDecoderLayer(nn.Module):
    """A Student decoder layer and the TA-only layers around it, run by `streams` ("both": the
    input is stacked [Student; TA]; "student" or "ta": that stream alone). See the module
    docstring for how "both" keeps the Student at the original model's shapes."""

    def __init__(self, layer: nn.Module, family: HFFamily, before=(), after=()):
        super().__init__()
        self.layer = layer
        self.before, self.after = nn.ModuleList(before), nn.ModuleList(after)
        self.mlp_name, self.post_name = family.mlp, family.post_ffn_norm
        self.streams = "both"

    def _post_ffn(self, x):
        return x if self.post_name is None else getattr(self.layer, self.post_name)(x)

    def forward(self, hidden_states, *args, **kwargs):
        ffn = getattr(self.layer, self.mlp_name)
        if self.streams == "student":
            ffn.mode = "student"
            return self.layer(hidden_states, *args, **kwargs)
        if self.streams == "ta":
            x = hidden_states
            for ta_layer in self.before:
                x = _first(ta_layer(x, *args, **kwargs))
            ffn.mode = "ta"
            out = self.layer(x, *args, **kwargs)
            x = _first(out)
            for ta_layer in self.after:
                x = _first(ta_layer(x, *args, **kwargs))
            return _with_first(out, x)
        batch = hidden_states.shape[0] // 2
        x_s, x_ta = _split_halves(hidden_states, batch)
        args_s, args_ta = _split_halves(list(args), batch)
        kw_pairs = {k: _split_halves(v, batch) for k, v in kwargs.items()}
        kwargs_s, kwargs_ta = ({k: p[i] for k, p in kw_pairs.items()} for i in (0, 1))
        for ta_layer in self.before:
            x_ta = _first(ta_layer(x_ta, *args_ta, **kwargs_ta))
        ffn.mode = "capture"
        out_s = self.layer(x_s, *args_s, **kwargs_s)
        ffn.mode = "fuse"
        out_ta = self.layer(x_ta, *args_ta, **kwargs_ta)
        # The Student's call added post_ffn(zeros) = 0 to its residual; add its FFN output now.
        y_s, y_ta = _first(out_s) + self._post_ffn(ffn.take_student()), _first(out_ta)
        for ta_layer in self.after:
            y_ta = _first(ta_layer(y_ta, *args_ta, **kwargs_ta))
        return _with_first(out_s, torch.cat([y_s, y_ta]))


# ----------------------------------------------------------------------------------------
# The nested model


class _OwnHead:
    """What a model reads off its transformers model (`hf`) and family: context and head."""

    @property
    def n_positions(self) -> int:
        return getattr(self.hf.config, self.family.positions)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The model's own output head (V, d): the tied token embedding or its own lm_head."""
        return self.hf.get_output_embeddings().weight

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-cap c (logits c tanh(z / c)), or None: Gemma 2's."""
        field = self.family.logit_softcap
        return None if field is None else getattr(self.hf.config, field, None)


@dataclass(frozen=True)
class HFModelConfig:
    """What rebuilds a nested Hugging Face model's shape: the Student's transformers config (its
    config.json as a dictionary) and, for the record, the folder it was read from."""

    hf_config: dict
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return self.hf_config["vocab_size"]


def _model_from_config(hf_config: dict, dtype=torch.float32):
    """A freshly initialised transformers causal LM of the configuration `hf_config`."""
    transformers = _transformers()
    fields = dict(hf_config)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    return transformers.AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))


def _checkpointing(model) -> bool:
    """Whether transformers' gradient (since 5.x: activation) checkpointing is on."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def _ids_probe(model) -> torch.Tensor:
    """A fixed batch of token ids for the nesting check (its own generator: no global RNG use)."""
    family = family_of(model)
    length = min(PROBE_TOKENS, getattr(model.config, family.positions))
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (2, length), generator=gen).to(model.get_output_embeddings().weight.device)


class NestedHFCausalLM(_OwnHead, NestedLM):
    """A transformers causal LM as the Student of a TA with wider FFNs and TA-only layers.

    `model(idx)` -> (logits_s, logits_ta); `model(idx, return_hidden=True)` -> (h_s, h_ta)
    after the final norm, for `fused_linear_matta_loss` with `lm_head_weight` (the model's
    head, tied or not); `stream="student"` or `"ta"` computes one stream. `hf` is the nested
    transformers model (its decoder layers wrapped, its final norm moved to `norm`); `blocks`
    the TA's stack of decoder layers, TA-only layers at `ta_only_layers`.

    Build it with `nest_hf(model, ...)` or `NestedHFCausalLM.from_folder(path, nest)`;
    `NestedHFCausalLM(config, nest)` builds a freshly initialised one of the same shapes (what
    a run directory's model.json rebuilds before loading a checkpoint). `nest` gives `ffn_ta`
    (None: twice the Student's), `extra_layers` and `extra_layer_positions`.
    """

    architecture = "hf"

    def __init__(self, config: HFModelConfig, nest: NestingConfig | None = None, *, model=None,
                 init: str = "preserve", check: bool = True):
        super().__init__()
        nest = NestingConfig() if nest is None else nest
        if not isinstance(config, HFModelConfig):
            raise TypeError(f"config must be an HFModelConfig, got {type(config).__name__}")
        if not isinstance(nest, NestingConfig):
            raise TypeError(f"nest must be a NestingConfig, got {type(nest).__name__}")
        if nest.d_model_ta is not None or nest.n_head_ta is not None:
            raise ValueError("d_model nesting (d_model_ta, n_head_ta) is not supported for Hugging Face models; "
                             "nest the FFNs (ffn_ta) and the depth (extra_layers)")
        if not nest.share_weights:
            raise ValueError("share_weights=False is not supported for Hugging Face models (their attention is "
                             "not nested, so no unshared ablation can be made of them)")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if model is None:
            model, check = _model_from_config(config.hf_config), False
        family = family_of(model)
        if _checkpointing(model):
            raise ValueError("the model has gradient checkpointing on; nesting needs it off (a recomputed layer would "
                             "replay its FFN's two-stream calls out of order)")
        training = model.training
        check = check and model.get_output_embeddings().weight.device.type != "meta"
        probe = _ids_probe(model) if check else None
        if check:
            with torch.no_grad():
                reference = model.eval()(input_ids=probe, use_cache=False).logits
        self.config, self.nest, self.family, self.hf = config, nest, family, model
        self._nest_layers(init, getattr(model.config, "initializer_range", None) or 0.02)
        self.norm = model.get_submodule(family.final_norm)
        _set_submodule(model, family.final_norm, nn.Identity())
        embedding_ids = _embedding_ids(model, family)
        self.embedding_parameters = tuple(n for n, p in self.named_parameters() if id(p) in embedding_ids)
        # Buffers transformers keeps out of its state dict (rotary tables) go into ours: a model
        # rebuilt on the meta device and filled from a state dict (FSDP's whole model) needs them.
        for module in self.modules():
            module._non_persistent_buffers_set.clear()
        if check:
            self._check_against(reference, probe, init)
        self.train(training)

    def _nest_layers(self, init: str, std: float) -> None:
        family, nest = self.family, self.nest
        layers = self.hf.get_submodule(family.layers)
        originals = list(layers)
        n_student = len(originals)
        ffn_ta = resolve_ffn_ta(projection_features(originals[0].get_submodule(f"{family.mlp}.{family.ffn_in[0]}"))[0],
                                nest, family.ffn_width)
        self.ta_only_layers = ta_only_layer_indices(n_student, nest)
        self.student_layers = tuple(i for i in range(n_student + nest.extra_layers) if i not in self.ta_only_layers)
        # Each TA-only layer is a copy of the Student layer below it (the first one, at the
        # bottom), taken before nesting so that its new FFN units are drawn afresh.
        source = {}
        for t in self.ta_only_layers:
            below = [k for k, pos in enumerate(self.student_layers) if pos < t]
            k = below[-1] if below else 0
            source[t] = (k, "after" if below else "before", copy.deepcopy(originals[k]))
        for layer in originals:
            self._nest_ffn(layer, ffn_ta, init, std)
        for _, _, layer in source.values():
            ffn = self._nest_ffn(layer, ffn_ta, init, std)
            ffn.mode = "ta"
            _init_ta_only_layer(layer, family, init, std)
        stack, sources = [], []
        student = iter(range(n_student))
        for pos in range(n_student + nest.extra_layers):
            if pos in source:
                k, _, layer = source[pos]
            else:
                k = next(student)
                layer = originals[k]
            stack.append(layer)
            sources.append(k)
        for k, layer in enumerate(originals):
            attached = {side: [source[t][2] for t in self.ta_only_layers if source[t][:2] == (k, side)]
                        for side in ("before", "after")}
            layers[k] = NestedDecoderLayer(layer, family, **attached)
        self.blocks = tuple(stack)  # plain references: the modules live in hf's layer list
        self.layer_sources = tuple(sources)  # the Student layer each TA layer is (or was copied from)
        self.ffn_widths = self._ffn(stack[0]).widths  # (Student, TA)

    def _nest_ffn(self, layer, ffn_ta, init, std) -> NestedFFN:
        ffn = NestedFFN(layer.get_submodule(self.family.mlp), self.family, ffn_ta)
        ffn.init_new_units(init, std)
        _set_submodule(layer, self.family.mlp, ffn)
        return ffn

    def _ffn(self, block) -> NestedFFN:
        return block.get_submodule(self.family.mlp)

    def _check_against(self, reference, probe, init) -> None:
        """The Student must compute the original model's logits (and, with init "preserve",
        so must the TA): a layer that does not decompose as the family assumes fails here.
        Leaves the model in eval mode (the caller sets the mode)."""
        try:
            with torch.no_grad():
                outputs = self.eval()(probe)
        except RuntimeError as exc:
            raise ValueError(f"nesting {type(self.hf).__name__} failed on a probe batch: {exc}") from None
        checks = [("Student", outputs[0])] + ([("TA", outputs[1])] if init == "preserve" else [])
        # Far above rounding (on a GPU the fused kernels round unlike cuBLAS), far below what a
        # misplaced FFN or norm does to the logits.
        tolerance = 1e-3 if reference.dtype in (torch.float32, torch.float64) else 3e-2
        causes = {"Student": "its decoder layers do not end in residual + post_ffn_norm(mlp(x)) as the "
                             f"{self.family.name} layout assumes",
                  "TA": f"with init 'preserve' the new units and TA-only layers must add nothing, so the "
                        f"{self.family.name} layout names the wrong residual projections (attn_out, ffn_out)"}
        for what, logits in checks:
            error = ((logits.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()
            if not error <= tolerance:
                raise ValueError(
                    f"nesting {type(self.hf).__name__} changed the {what}'s logits on a probe batch (relative error "
                    f"{error:.2g}): {causes[what]}; give the model type its own HF_FAMILIES entry")

    @classmethod
    def from_folder(cls, path, nest: NestingConfig | None = None, *, init: str = "preserve") -> "NestedHFCausalLM":
        """The Hugging Face model folder at `path` (config.json + weights; no network) as the
        Student, in fp32 and training mode. Under `torch.device("meta")` only the shapes are
        built (no weights read)."""
        transformers = _transformers()
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face model folder")
        if torch.get_default_device().type == "meta":
            hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(hf_config, **_dtype_kwargs(torch.float32))
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                      **_dtype_kwargs(torch.float32))
        return cls(HFModelConfig(config_dict(model.config), source=path), nest, model=model.train(), init=init)

    # -- widths, shapes, head --------------------------------------------------------------------

    @property
    def student_width(self) -> int:
        return self.lm_head_weight.shape[1]

    @property
    def ta_width(self) -> int:
        return self.lm_head_weight.shape[1]

    def _layer_matmul_parameters(self, block, wide: bool) -> int:
        ffn = self._ffn(block)
        nested = {id(p) for _, layer in ffn.projections() for p in layer.parameters()}
        total = sum(p.numel() for p in block.parameters() if p.dim() >= 2 and id(p) not in nested)
        for _, layer in ffn.projections():
            n_s, m_s = layer.student_features
            total += layer.weight.numel() if wide else n_s * m_s
        return total

    def stream_shape(self, stream: str) -> StreamShape:
        wide = stream == "ta"
        blocks = self.blocks if wide else [self.blocks[i] for i in self.student_layers]
        matmul = sum(self._layer_matmul_parameters(b, wide) for b in blocks) + self.lm_head_weight.numel()
        return StreamShape(len(blocks), self.student_width, self.ffn_widths[wide], matmul)

    # -- the streams ------------------------------------------------------------------------

    def hidden_states(self, idx, stream=None, report=None):
        """(h_s, h_ta) after the final norm; one stream alone with `stream` (None for the other).
        Token ids outside the vocabulary are checked as `embed_tokens` checks them (an error on
        the CPU; elsewhere NaN hidden states for those tokens, filed in `report`)."""
        check_stream(stream)
        check_tokens(idx, self.n_positions)
        outside = None
        if ids_checked_on_host(idx):
            check_ids_on_host(idx, self.config.vocab_size)
        else:
            outside = ids_outside(idx, self.config.vocab_size, report)
            idx = idx.masked_fill(outside, 0)  # an id past the table would be a device assert
        streams = "both" if stream is None else stream
        for layer in self.hf.get_submodule(self.family.layers):
            layer.streams = streams
        ids = torch.cat([idx, idx]) if stream is None else idx
        hidden = self.hf.base_model(input_ids=ids, use_cache=False)[0]
        if outside is not None:
            hidden = hidden.masked_fill((torch.cat([outside, outside]) if stream is None else outside)[..., None],
                                        float("nan"))
        if stream == "student":
            return self.norm(hidden), None
        if stream == "ta":
            return None, self.norm(hidden)
        batch = idx.shape[0]
        return self.norm(hidden[:batch]), self.norm(hidden[batch:])

    def _logits(self, hidden):
        logits = self.hf.get_output_embeddings()(hidden)
        cap = self.logit_softcap
        if cap is not None:  # as transformers computes it: z / c, tanh, * c
            logits = torch.tanh(logits / cap) * cap
        return logits

    def lm_logits(self, h_s, h_ta):
        return tuple(None if h is None else self._logits(h) for h in (h_s, h_ta))

    def forward(self, idx, return_hidden=False, *, stream=None, report=None):
        hidden = self.hidden_states(idx, stream, report)
        return hidden if return_hidden else self.lm_logits(*hidden)

    # -- Mix'n'Match: the plain models cut out of the TA ---------------------------------------

    def _non_layer_tensors(self):
        """(name, tensor) of the parameters and buffers outside the decoder layers, as named in
        a plain model of this family (the final norm under its own path)."""
        prefix = self.family.layers + "."
        for name, tensor in [*self.hf.named_parameters(), *self.hf.named_buffers()]:
            if not name.startswith(prefix):
                yield name, tensor
        for name, tensor in [*self.norm.named_parameters(), *self.norm.named_buffers()]:
            yield f"{self.family.final_norm}.{name}", tensor

    def _layer_tensors(self, block):
        """(name, tensor) of a decoder layer's parameters and buffers outside its FFN."""
        prefix = self.family.mlp + "."
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if not name.startswith(prefix):
                yield name, tensor

    def plain_model(self, choices) -> "HFCausalLM":
        """The plain model of one "wide" / "narrow" / "skip" per TA layer (see matta.extract):
        the same transformers class, each FFN at its chosen width, copies of the weights."""
        family = self.family
        kept = [(block, choice == "narrow", self.layer_sources[i])
                for i, (block, choice) in enumerate(zip(self.blocks, choices)) if choice != "skip"]
        widths = [self.ffn_widths[0] if narrow else self.ffn_widths[1] for _, narrow, _ in kept]
        config = copy.deepcopy(self.hf.config)
        setattr(config, family.n_layers, len(kept))
        setattr(config, family.ffn_width, max(widths))
        if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding windows)
            config.layer_types = [self.hf.config.layer_types[k] for _, _, k in kept]
        weight = self.lm_head_weight
        plain = type(self.hf)(config).to(device=weight.device, dtype=weight.dtype)
        targets = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
        with torch.no_grad():
            for name, tensor in self._non_layer_tensors():
                targets[name].copy_(tensor)
            for target, (block, narrow, _) in zip(plain.get_submodule(family.layers), kept):
                layer_targets = {**dict(target.named_parameters()), **dict(target.named_buffers())}
                for name, tensor in self._layer_tensors(block):
                    layer_targets[name].copy_(tensor)
                mlp = target.get_submodule(family.mlp)
                for name, layer in self._ffn(block).projections():
                    weight_, bias = layer.student_parameters() if narrow else (layer.weight, layer.bias)
                    setattr(mlp, name, plain_projection(layer.plain_type, weight_, bias))
        return HFCausalLM(plain.train(self.training))

    def plain_parameters(self, choices, non_embedding: bool = True) -> int:
        """Parameter count of `plain_model(choices)`, without building it."""
        skip = _embedding_ids(self.hf, self.family) if non_embedding else set()
        seen, total = set(), 0
        for _, tensor in self._non_layer_tensors():
            if isinstance(tensor, nn.Parameter) and id(tensor) not in skip | seen:
                seen.add(id(tensor))
                total += tensor.numel()
        for block, choice in zip(self.blocks, choices):
            if choice == "skip":
                continue
            total += sum(t.numel() for _, t in self._layer_tensors(block) if isinstance(t, nn.Parameter))
            for _, layer in self._ffn(block).projections():
                weight, bias = layer.student_parameters() if choice == "narrow" else (layer.weight, layer.bias)
                total += weight.numel() + (0 if bias is None else bias.numel())
        return total


def _init_ta_only_layer(layer, family: HFFamily, init: str, std: float) -> None:
    """A TA-only layer's start (see the module docstring): "preserve" zeroes the projections
    that write into the residual stream, "random" draws every matrix afresh."""
    with torch.no_grad():
        if init == "preserve":
            ffn = layer.get_submodule(family.mlp)
            for proj in (layer.get_submodule(family.attn_out), getattr(ffn, ffn.out_name)):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
            return
        for module in layer.modules():
            if _is_projection(module):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def nest_hf(model, *, ffn_ta: int | None = None, factor: float | None = None, extra_layers: int = 0,
            extra_layer_positions="interleave", init: str = "preserve") -> NestedHFCausalLM:
    """M-nest a transformers causal LM (copied, not changed): it becomes the Student of a TA.

    Args:
        model: e.g. a LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GemmaForCausalLM,
            Gemma2ForCausalLM or GPT2LMHeadModel (see HF_FAMILIES).
        ffn_ta: the TA's FFN width; or `factor`: the TA's FFN width as a multiple of the
            Student's (default: twice the Student's).
        extra_layers, extra_layer_positions: TA-only decoder layers and where they go
            ("interleave", "top", "bottom" or TA layer indices), as in NestingConfig.
        init: "preserve" (default: the TA starts as the Student's function) or "random"
            (see the module docstring for both and why "preserve" is the default).
    Returns:
        a NestedHFCausalLM whose Student computes exactly what `model` computes.
    """
    family = family_of(model)
    if factor is not None:
        if ffn_ta is not None:
            raise ValueError("give ffn_ta or factor, not both")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise ValueError(f"factor must be a number >= 1 (the TA's FFN width over the Student's), got {factor!r}")
        first = model.get_submodule(f"{family.layers}.0.{family.mlp}.{family.ffn_in[0]}")
        ffn_ta = round(factor * projection_features(first)[0])
    nest = NestingConfig(ffn_ta=ffn_ta, extra_layers=extra_layers, extra_layer_positions=extra_layer_positions)
    return NestedHFCausalLM(HFModelConfig(config_dict(model.config)), nest, model=copy.deepcopy(model), init=init)


# ----------------------------------------------------------------------------------------
# Plain models


class HFCausalLM(_OwnHead, nn.Module):
    """A plain transformers causal LM with matta's plain-model interface: `model(idx)` ->
    logits (B, T, V), `model(idx, return_hidden=True)` -> the final hidden states,
    `lm_head_weight`, `num_parameters(non_embedding=True)`. `hf` is the transformers model.
    Its FFNs may have different widths per layer (a Mix'n'Match model; `ffn_widths`), which
    `matta.hf.export_hf` zero-pads to one width so that `from_pretrained` loads the folder."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.family = family_of(hf)

    @property
    def config(self):
        return self.hf.config

    @property
    def ffn_widths(self) -> tuple[int, ...]:
        family = self.family
        return tuple(projection_features(layer.get_submodule(f"{family.mlp}.{family.ffn_in[0]}"))[0]
                     for layer in self.hf.get_submodule(family.layers))

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Distinct parameter elements; non_embedding leaves out the token and position
        embeddings and the output head."""
        skip = _embedding_ids(self.hf, self.family) if non_embedding else set()
        return sum(p.numel() for p in self.hf.parameters() if id(p) not in skip)

    def forward(self, idx, return_hidden=False):
        check_tokens(idx, self.n_positions)
        if return_hidden:
            return self.hf.base_model(input_ids=idx, use_cache=False)[0]
        return self.hf(input_ids=idx, use_cache=False).logits


def load_hf_causal(path) -> HFCausalLM:
    """The transformers causal LM in the folder at `path` (fp32, no network), as an HFCausalLM."""
    transformers = _transformers()
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face model folder")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwargs(torch.float32))
    return HFCausalLM(model)
