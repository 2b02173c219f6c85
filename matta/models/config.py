"""Frozen configurations of the Student models and of their M-nesting into a TA.

`GPT2Config` / `GAUConfig` describe the Student (the model you serve); `NestingConfig` says
how the TA grows out of it (paper Section 3.2): a wider FFN (layer nesting), extra TA-only
layers (depth nesting) and a wider residual stream (d_model nesting).
"""
import dataclasses
from dataclasses import dataclass
from typing import Sequence

from .._sizes import as_size

EXTRA_LAYER_PLACEMENTS = ("interleave", "top", "bottom")


def _positive(owner, **values):
    for name, value in values.items():
        as_size(f"{owner}.{name}", value)


def _check_dropout(owner, dropout):
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}.dropout must be in [0, 1), got {dropout!r}")


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """The vocabulary rounded up to a multiple (tensor-core friendly embedding rows)."""
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class GPT2Config:
    """A GPT-2 (Radford et al. 2019; the Hugging Face `gpt2*` checkpoints): pre-LN blocks,
    learned positions, tied embeddings, tanh-GELU FFN, LayerNorm eps 1e-5, causal SDPA.

    `n_inner` is the FFN width (None: 4 * n_embd). The embedding table has
    `padded_vocab_size` rows (vocab rounded up to `vocab_pad_multiple`) for fast GEMMs; the
    padded rows are zero and never predicted: models return logits for the true
    `vocab_size` only.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    vocab_pad_multiple: int = 64

    def __post_init__(self):
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        _positive(
            "GPT2Config",
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            vocab_pad_multiple=self.vocab_pad_multiple,
        )
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_head={self.n_head} does not divide n_embd={self.n_embd}")
        _check_dropout("GPT2Config", self.dropout)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab(self.vocab_size, self.vocab_pad_multiple)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """A named configuration; keyword overrides replace single fields."""
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(GPT2_PRESETS)}")
        return dataclasses.replace(GPT2_PRESETS[name], **overrides)

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)


GPT2_PRESETS = {
    "gpt2": GPT2Config(n_layer=12, n_embd=768, n_head=12),  # 124M
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),  # 355M
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),  # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),  # 1.5B
    # CPU-sized models with the GPT-2 tokenizer's vocabulary, for tests and quick runs.
    "gpt2-tiny": GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=256),
    "gpt2-mini": GPT2Config(n_layer=6, n_embd=256, n_head=8, n_positions=512),
}


@dataclass(frozen=True)
class GAUConfig:
    """A stack of Gated Attention Units (Hua et al. 2022, "Transformer Quality in Linear Time").

    Per layer (pre-LayerNorm, residual): U = silu(x W_u), V = silu(x W_v) of width
    `expansion` (None: 2 * n_embd), Z = silu(x W_z) of width `attn_dim` (s), per-dim scale
    and offset give Q and K, A = relu(Q K^T / n_positions + rel_bias)^2, out = (U * A V) W_o.
    The attention normaliser is the context length `n_positions` (the paper's n when
    sequences are full length), so a prefix's outputs never depend on later tokens.

    `num_classes=None` makes a causal language model (tied embeddings, logits over
    `vocab_size`); an int makes a classifier: bidirectional attention, mean pooling over
    the (unmasked) tokens, then a linear head to `num_classes` logits.
    """

    vocab_size: int = 50257
    n_positions: int = 512
    n_embd: int = 512
    n_layer: int = 8
    expansion: int | None = None
    attn_dim: int = 128
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    vocab_pad_multiple: int = 64
    num_classes: int | None = None

    def __post_init__(self):
        if self.expansion is None:
            object.__setattr__(self, "expansion", 2 * self.n_embd)
        _positive(
            "GAUConfig",
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            expansion=self.expansion,
            attn_dim=self.attn_dim,
            vocab_pad_multiple=self.vocab_pad_multiple,
        )
        if self.num_classes is not None:
            _positive("GAUConfig", num_classes=self.num_classes)
        _check_dropout("GAUConfig", self.dropout)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab(self.vocab_size, self.vocab_pad_multiple)

    @property
    def is_classifier(self) -> bool:
        return self.num_classes is not None

    @classmethod
    def preset(cls, name: str, **overrides) -> "GAUConfig":
        if name not in GAU_PRESETS:
            raise ValueError(f"unknown GAU preset {name!r}; choose one of {sorted(GAU_PRESETS)}")
        return dataclasses.replace(GAU_PRESETS[name], **overrides)

    def replace(self, **changes) -> "GAUConfig":
        return dataclasses.replace(self, **changes)


GAU_PRESETS = {
    "gau-base": GAUConfig(n_layer=24, n_embd=768, n_positions=512),
    "gau-small": GAUConfig(n_layer=8, n_embd=512, n_positions=512),
    "gau-tiny": GAUConfig(n_layer=4, n_embd=128, attn_dim=64, n_positions=256),
}


@dataclass(frozen=True)
class NestingConfig:
    """How the TA is M-nested around the Student (paper 3.2).

    ffn_ta: TA FFN width (GPT-2) or TA expansion width e (GAU); None doubles the Student's
        (the paper's GPT-2 Medium setting); equal to the Student's means no layer nesting.
    extra_layers: number of TA-only layers (depth nesting); the Student skips them.
    extra_layer_positions: "interleave" (spread evenly among the Student layers), "top"
        (after them), "bottom" (before them), or explicit indices into the TA's layer stack.
    d_model_ta: TA residual width (d_model nesting; None: the Student's). The Student uses
        the first n_embd features of every residual vector.
    n_head_ta: TA attention heads (GPT-2; None keeps the Student's head size). The Student's
        heads are the TA's first heads when the head sizes agree.
    share_weights: False gives every Dense layer (NestedLinear) of the Student its own
        weight and bias (the paper's Table 4 ablation). As in the paper's ablation the
        token (and position) embedding, and with it the tied LM head, stays shared; so do
        the small per-feature vectors (LayerNorm scale and shift, GAU's Q/K scales and
        offsets and relative position bias). The Student's Dense layers start as copies of
        the TA's leading blocks, so a model starts out computing exactly what the shared
        model of the same seed computes; only training tells them apart. Only the Student
        and the TA can be extracted from such a model.
    """

    ffn_ta: int | None = None
    extra_layers: int = 0
    extra_layer_positions: str | Sequence[int] = "interleave"
    d_model_ta: int | None = None
    n_head_ta: int | None = None
    share_weights: bool = True

    def __post_init__(self):
        if not isinstance(self.share_weights, bool):
            raise ValueError(f"NestingConfig.share_weights must be True or False, got {self.share_weights!r}")
        as_size("NestingConfig.extra_layers", self.extra_layers, minimum=0)
        positions = self.extra_layer_positions
        if isinstance(positions, str):
            if positions not in EXTRA_LAYER_PLACEMENTS:
                raise ValueError(
                    f"NestingConfig.extra_layer_positions must be one of {EXTRA_LAYER_PLACEMENTS} or a "
                    f"list of TA layer indices, got {positions!r}"
                )
        else:
            try:
                indices = tuple(positions)
            except TypeError:
                raise TypeError(f"NestingConfig.extra_layer_positions must be one of {EXTRA_LAYER_PLACEMENTS} or a "
                                f"list of TA layer indices, got {positions!r}") from None
            object.__setattr__(self, "extra_layer_positions", tuple(
                as_size(f"NestingConfig.extra_layer_positions[{i}]", p, minimum=0) for i, p in enumerate(indices)))
        for name in ("ffn_ta", "d_model_ta", "n_head_ta"):
            value = getattr(self, name)
            if value is not None:
                _positive("NestingConfig", **{name: value})


def ta_only_layer_indices(n_student_layers: int, nest: NestingConfig) -> tuple[int, ...]:
    """Indices, in the TA's stack of n_student_layers + extra_layers, of the TA-only layers."""
    n_extra = nest.extra_layers
    total = n_student_layers + n_extra
    positions = nest.extra_layer_positions
    if positions == "top":
        return tuple(range(n_student_layers, total))
    if positions == "bottom":
        return tuple(range(n_extra))
    if positions == "interleave":
        # Extra layer j goes after the first round((j + 1) * L / (E + 1)) Student layers.
        slots = [round((j + 1) * n_student_layers / (n_extra + 1)) for j in range(n_extra)]
        return tuple(slot + j for j, slot in enumerate(slots))
    indices = tuple(positions)
    if len(indices) != n_extra:
        raise ValueError(
            f"NestingConfig.extra_layer_positions lists {len(indices)} indices but extra_layers={n_extra}"
        )
    if len(set(indices)) != len(indices) or any(not 0 <= i < total for i in indices):
        raise ValueError(
            f"NestingConfig.extra_layer_positions must be distinct indices in [0, {total}), got {list(indices)}"
        )
    return tuple(sorted(indices))
