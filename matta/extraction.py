"""Mix'n'Match: cut standalone models out of a trained nested model (paper 4.2.3).

Every layer of the TA's stack is taken "wide" (the TA's widths), "narrow" (the Student's
widths, the leading block of every weight) or is skipped. The result is a plain model of
ordinary nn.Linear layers holding copies of exactly the slices it uses, so its
state_dict carries no TA baggage; `model(idx) -> logits` and
`model.num_parameters(non_embedding=True)`.

A model with an unshared Student (`NestingConfig(share_weights=False)`) offers only
"student" (its own Dense weights) and "ta": nothing ties the two, so no mix is meaningful.

With d_model nesting the residual stream has one width for the whole extracted model:
`d_model="narrow"` (the Student's) or `"wide"` (the TA's). By default it is narrow unless
every kept layer is wide.

A nested Hugging Face model (`NestedHFCausalLM`) gives an `HFCausalLM`: the same transformers
class, holding copies of the kept layers, each FFN at its chosen width (in memory the widths may
differ per layer; `matta.hf.export_hf` explains how they are written).

A model spec is the string form of a choice, as the command line, results.json and
lm-evaluation-harness's `stream=` write it: "student", "ta", "wide_narrow_wide:K", or one
of wide/narrow/skip per TA layer joined by "/" (`parse_spec`, `extract_spec`, `spec_label`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .layers.nested_linear import plain_linear
from .models import GAU, GPT2, NestedGAU, NestedGPT2, NestedHFCausalLM, NestedLM
from .models.gau import GAULayerShape, gau_num_parameters
from .models.gpt2 import BlockShape, gpt2_num_parameters
from .nestify import Nestified

LAYER_CHOICES = ("wide", "narrow", "skip")
PRESETS = ("student", "ta", "wide_narrow_wide")


class SubModelSpec(NamedTuple):
    """One member of the wide-narrow-wide family."""

    k: int
    layers: tuple[str, ...]
    non_embedding_parameters: int


def wide_narrow_wide(n_layers: int, k: int) -> tuple[str, ...]:
    """The lowest k/2 and the highest k/2 of n_layers layers wide, the rest narrow."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0 or k > n_layers or k % 2:
        raise ValueError(f"wide_narrow_wide needs an even k in [0, {n_layers}], got k={k!r}")
    half = k // 2
    return tuple("wide" if i < half or i >= n_layers - half else "narrow" for i in range(n_layers))


def layer_choices(model, layers="student", *, k=None) -> tuple[str, ...]:
    """One of LAYER_CHOICES per layer of the TA's stack, for a preset name or a list."""
    if not isinstance(model, NestedLM):
        raise TypeError(f"layer_choices needs a nested model (a NestedGPT2, NestedGAU or NestedHFCausalLM), got "
                        f"{type(model).__name__}")
    depth = model.depth
    if not model.nest.share_weights and layers not in ("student", "ta"):
        raise ValueError(
            f"a model with an unshared Student (NestingConfig(share_weights=False)) offers only 'student' and "
            f"'ta', got {layers!r}"
        )
    if isinstance(layers, str):
        if layers not in PRESETS:
            raise ValueError(f"unknown extraction preset {layers!r}; use one of {PRESETS} or a list of {LAYER_CHOICES}")
        if layers != "wide_narrow_wide" and k is not None:
            raise ValueError(f"k is only used with 'wide_narrow_wide', got k={k!r} with {layers!r}")
        if layers == "student":
            return tuple("skip" if i in model.ta_only_layers else "narrow" for i in range(depth))
        if layers == "ta":
            return ("wide",) * depth
        if k is None:
            raise ValueError("'wide_narrow_wide' needs k (the number of wide layers, even)")
        return wide_narrow_wide(depth, k)
    choices = tuple(layers)
    if len(choices) != depth:
        raise ValueError(
            f"the layer choice list has {len(choices)} entries but the TA has {depth} layers "
            f"(one entry per TA layer, TA-only layers {tuple(model.ta_only_layers)} included)"
        )
    bad = [(i, c) for i, c in enumerate(choices) if c not in LAYER_CHOICES]
    if bad:
        raise ValueError(f"layer choices must be one of {LAYER_CHOICES}; got {bad[0][1]!r} at layer {bad[0][0]}")
    if all(c == "skip" for c in choices):
        raise ValueError("the layer choice list skips every layer")
    return choices


def _residual_width(model, choices, d_model):
    if d_model is None:
        d_model = "wide" if all(c in ("wide", "skip") for c in choices) else "narrow"
    if d_model not in ("narrow", "wide"):
        raise ValueError(f"d_model must be 'narrow', 'wide' or None, got {d_model!r}")
    return model.student_width if d_model == "narrow" else model.ta_width


# ----------------------------------------------------------------------------------------
# GPT-2


def _gpt2_plan(model: NestedGPT2, choices, d):
    s, t = model.config, model.ta_config
    narrow = BlockShape(s.n_head, s.head_dim, s.n_inner)
    wide = BlockShape(t.n_head, t.head_dim, t.n_inner, qkv_lead=s.n_embd if t.n_embd > s.n_embd else None)
    shapes = [wide if c == "wide" else narrow for c in choices if c != "skip"]
    # The config's n_head / n_inner describe the blocks when they are uniform (as the
    # Hugging Face layout needs); otherwise the per-block shapes are what count.
    first = shapes[0]
    if all(shape == first for shape in shapes) and first.attn_dim == d:
        n_head, n_inner = first.n_head, first.n_inner
    else:
        nominal = s if d == s.n_embd else t
        n_head, n_inner = nominal.n_head, nominal.n_inner
    config = s.replace(n_embd=d, n_layer=len(shapes), n_head=n_head, n_inner=n_inner)
    return config, shapes


def _cut(layer, rows, cols, narrow):
    """An nn.Linear of the leading rows x cols of a NestedLinear, or for a narrow layer of an
    unshared model its Student's own weights (then rows x cols is the Student's shape)."""
    if narrow and not layer.share_weights:
        return layer.student_linear()
    return plain_linear(layer.weight[:rows, :cols], layer.bias[:rows])


def _extract_gpt2(model: NestedGPT2, choices, d):
    config, shapes = _gpt2_plan(model, choices, d)
    plain = GPT2(config, shapes)
    v = config.vocab_size
    kept = [(block, c == "narrow") for block, c in zip(model.blocks, choices) if c != "skip"]
    with torch.no_grad():
        plain.wte.weight.copy_(model.wte.weight[:, :d])
        plain.wte.weight[v:].zero_()
        plain.wpe.weight.copy_(model.wpe.weight[:, :d])
        plain.ln_f = model.ln_f.plain(d)
        for target, (source, narrow), shape in zip(plain.h, kept, shapes):
            a, f = shape.attn_dim, shape.n_inner
            target.ln_1 = source.ln_1.plain(d)
            target.ln_2 = source.ln_2.plain(d)
            # c_attn rows: the Student's [q k v] (narrow), or all rows in the nested layout (wide)
            target.attn.c_attn = _cut(source.attn.c_attn, 3 * a, d, narrow)
            target.attn.c_proj = _cut(source.attn.c_proj, d, a, narrow)
            target.mlp.c_fc = _cut(source.mlp.c_fc, f, d, narrow)
            target.mlp.c_proj = _cut(source.mlp.c_proj, d, f, narrow)
    return plain.train(model.training)


# ----------------------------------------------------------------------------------------
# GAU


def _gau_plan(model: NestedGAU, choices, d):
    s = model.config
    lead = s.expansion if model.ta_expansion > s.expansion else None
    wide, narrow = GAULayerShape(model.ta_expansion, uv_lead=lead), GAULayerShape(s.expansion)
    shapes = [wide if c == "wide" else narrow for c in choices if c != "skip"]
    return s.replace(n_embd=d, n_layer=len(shapes)), shapes


def _extract_gau(model: NestedGAU, choices, d):
    config, shapes = _gau_plan(model, choices, d)
    plain = GAU(config, shapes)
    kept = [(layer, c == "narrow") for layer, c in zip(model.blocks, choices) if c != "skip"]
    with torch.no_grad():
        plain.wte.weight.copy_(model.wte.weight[:, :d])
        plain.wte.weight[config.vocab_size :].zero_()
        plain.norm_f = model.norm_f.plain(d)
        if config.is_classifier:
            narrow = all(c != "wide" for c in choices)  # decides only for an unshared head
            plain.head = _cut(model.head, model.head.out_features[0], d, narrow)
        for target, (source, narrow), shape in zip(plain.blocks, kept, shapes):
            state = source.plain_state(d, shape.expansion)
            if narrow and not source.uvz.share_weights:
                for name in ("uvz", "o"):
                    own = getattr(source, name)
                    state.update({f"{name}.weight": own.student_weight.detach().clone(),
                                  f"{name}.bias": own.student_bias.detach().clone()})
            target.load_state_dict(state)
    return plain.train(model.training)


# ----------------------------------------------------------------------------------------


def parse_spec(spec: str, depth: int | None = None) -> tuple:
    """(layers, k) for `extract` from a model spec string (see the module docstring); with
    `depth`, K of wide_narrow_wide:K must be at most that many layers. ValueError otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a model spec is student, ta, wide_narrow_wide:K or a per-layer list like wide/narrow/wide, "
                         f"got {spec!r}")
    if spec in ("student", "ta"):
        return spec, None
    if spec.startswith("wide_narrow_wide:"):
        k = spec.split(":", 1)[1]
        if not k.isdigit() or int(k) % 2 or (depth is not None and int(k) > depth):
            upto = f"from 0 to the TA's {depth} layers" if depth is not None else "of wide layers"
            raise ValueError(f"{spec}: K must be an even number {upto}")
        return "wide_narrow_wide", int(k)
    if "/" in spec:
        return tuple(spec.split("/")), None
    raise ValueError(f"unknown model spec {spec!r}; use student, ta, wide_narrow_wide:K or a per-layer list like "
                     "wide/narrow/wide")


def spec_label(spec: str) -> str:
    """How tables name the model of a spec: Student, TA, wide-narrow-wide k=K."""
    layers, k = parse_spec(spec)
    if layers == "wide_narrow_wide":
        return f"wide-narrow-wide k={k}"
    return {"student": "Student", "ta": "TA"}.get(layers, spec) if isinstance(layers, str) else spec


def extract_spec(model, spec: str):
    """`extract` of the model a spec string names."""
    layers, k = parse_spec(spec, model.depth if isinstance(model, NestedLM) else None)
    return extract(model, layers, k=k)


def extract(model, layers="student", *, k=None, d_model=None):
    """A standalone plain model cut out of a nested one (Mix'n'Match).

    Args:
        model: a NestedGPT2, NestedGAU or NestedHFCausalLM (any layer choice), or a
            `nestify` result ("student" or "ta" only).
        layers: "student", "ta", "wide_narrow_wide" (with k), or a list with one of
            "wide" / "narrow" / "skip" per layer of the TA's stack (TA-only layers included).
        k: number of wide layers for "wide_narrow_wide": the lowest k/2 and highest k/2.
        d_model: residual width under d_model nesting: "narrow", "wide", or None (narrow
            unless every kept layer is wide; "student" is always narrow).
    Returns:
        GPT2 or GAU (plain nn.Linear layers), HFCausalLM for a NestedHFCausalLM, or for a
        nestified model a copy of the original module with the chosen widths. Same train/eval
        mode as `model`.
    """
    if isinstance(model, Nestified):
        if layers not in ("student", "ta") or k is not None or d_model is not None:
            raise ValueError(f"a nestified model offers only 'student' and 'ta', got layers={layers!r}")
        return model.student() if layers == "student" else model.ta()
    extract_as, _, choices, d = _resolve(model, layers, k, d_model)
    return extract_as(model, choices, d)


def num_parameters_of(model, layers="student", *, k=None, d_model=None, non_embedding=True) -> int:
    """Parameter count of `extract(model, layers, ...)` without building it."""
    _, count, choices, d = _resolve(model, layers, k, d_model)
    return count(model, choices, d, non_embedding)


def _count_gpt2(model, choices, d, non_embedding):
    return gpt2_num_parameters(*_gpt2_plan(model, choices, d), non_embedding=non_embedding)


def _count_gau(model, choices, d, non_embedding):
    return gau_num_parameters(*_gau_plan(model, choices, d), non_embedding=non_embedding)


def _extract_hf(model: NestedHFCausalLM, choices, d):
    return model.plain_model(choices)  # no d_model nesting: d is the model's width


def _count_hf(model: NestedHFCausalLM, choices, d, non_embedding):
    return model.plain_parameters(choices, non_embedding)


# Per family: how to extract a model, and how to count its parameters without building it.
_FAMILIES = ((NestedGPT2, _extract_gpt2, _count_gpt2), (NestedGAU, _extract_gau, _count_gau),
             (NestedHFCausalLM, _extract_hf, _count_hf))


def _resolve(model, layers, k, d_model):
    """(extract function, count function, layer choices, residual width) for a request."""
    choices = layer_choices(model, layers, k=k)
    if layers == "student":
        d_model = "narrow" if d_model is None else d_model
    d = _residual_width(model, choices, d_model)
    for cls, extract_as, count in _FAMILIES:
        if isinstance(model, cls):
            return extract_as, count, choices, d
    raise TypeError(f"extract knows NestedGPT2, NestedGAU and NestedHFCausalLM, not {type(model).__name__}")


def wide_narrow_wide_family(model, ks: Sequence[int] | None = None, *, d_model=None) -> list[SubModelSpec]:
    """The wide-narrow-wide sub-models (paper 4.2.3, Figure 5's x axis): for each even k
    (default every even k from 0 to the TA's depth), the layer choices and the
    non-embedding parameter count of the extracted model."""
    ks = range(0, model.depth + 1, 2) if ks is None else ks
    family = []
    for k in ks:
        choices = layer_choices(model, "wide_narrow_wide", k=k)
        count = num_parameters_of(model, choices, d_model=d_model)
        family.append(SubModelSpec(k, choices, count))
    return family


def extracted_models(model, family: bool = True):
    """Yields (display name, spec, plain model): the Student, the TA, then (with `family`)
    the wide-narrow-wide members that differ from both."""
    yield spec_label("student"), "student", extract(model, "student")
    yield spec_label("ta"), "ta", extract(model, "ta")
    if not family:
        return
    known = {layer_choices(model, "student"), layer_choices(model, "ta")}
    for member in wide_narrow_wide_family(model):
        if member.layers not in known:
            spec = f"wide_narrow_wide:{member.k}"
            yield spec_label(spec), spec, extract(model, list(member.layers))
