"""GPT-2, plain and M-nested (paper Sections 3.2 and 4.2).

`GPT2` is an ordinary GPT-2 built from nn.Linear layers, whose blocks may have different
widths (`BlockShape` per block): what Mix'n'Match extraction produces, and the baselines.

`NestedGPT2` holds a Student GPT-2 inside a larger TA and runs both on the same tokens:
- layer nesting: every FFN is a pair of NestedLinear layers (Student width n_inner, TA
  width ffn_ta); the attention projections are NestedLinear layers too, whose Student and
  TA shapes agree unless d_model is nested, so both streams go through one op call
  (one fused kernel launch on a GPU);
- depth nesting: TA-only blocks at chosen positions, which the Student skips;
- d_model nesting: the Student uses the first n_embd features of every residual vector;
  embeddings, LayerNorms, attention heads, FFN and the tied head are nested accordingly.

Row layout of a nested attention input projection `c_attn` (3 d_TA, d_TA): the Student's
q, k, v rows come first, then the TA's extra q, k, v rows, so the Student block is the
weight's top-left corner: [q_S; k_S; v_S; q_X; k_X; v_X]. Without d_model nesting this is
exactly GPT-2's [q; k; v]. The TA's heads are the Student's heads followed by its extra heads.

Vocabulary: the embedding has `padded_vocab_size` rows (zero beyond `vocab_size`); logits
are computed against `lm_head_weight` = the first `vocab_size` rows only, so padded ids
are never predicted and no masking is needed. The fused MatTA loss takes the hidden states
from `model(idx, return_hidden=True)` and `model.lm_head_weight` (V, d_TA); the Student's
head is `model.lm_head_weight[:, :model.student_width]`.
"""
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import NestedLayerNorm, NestedLinear
from ..ops import gelu_mlp, nested_gelu_mlp
from . import hf_gpt2
from ._common import (check_tokens, copy_student_blocks_, count_parameters, embed_tokens, gpt2_init_, resolve_d_model_ta,
                      resolve_ffn_ta)
from .base import NestedLM, StreamShape
from .config import GPT2Config, NestingConfig, ta_only_layer_indices

EMBEDDING_PARAMETERS = ("wte.weight", "wpe.weight")


@dataclass(frozen=True)
class BlockShape:
    """The widths of one transformer block: attention heads x head size, and FFN width.

    `qkv_lead` names the row layout of the fused q/k/v projection: None is GPT-2's
    [q; k; v]; an int g is the nested layout [q_g; k_g; v_g; q_rest; k_rest; v_rest] of a
    TA block cut out whole under d_model nesting (its first g attention features are the
    Student's). Keeping the nested layout keeps every GEMM output column in place, which
    is what makes the extracted TA equal the nested TA bit for bit.
    """

    n_head: int
    head_dim: int
    n_inner: int
    qkv_lead: int | None = None

    @property
    def attn_dim(self) -> int:
        return self.n_head * self.head_dim


def block_shapes_of(config: GPT2Config) -> tuple[BlockShape, ...]:
    return (BlockShape(config.n_head, config.head_dim, config.n_inner),) * config.n_layer


def gpt2_num_parameters(config: GPT2Config, shapes: Sequence[BlockShape], non_embedding: bool = True) -> int:
    """Parameter count of a GPT2 with residual width config.n_embd and these blocks.

    Non-embedding excludes the token and position embeddings (the tied head included)."""
    d = config.n_embd
    total = 2 * d  # ln_f
    for s in shapes:
        a, f = s.attn_dim, s.n_inner
        total += 4 * d  # ln_1, ln_2
        total += 3 * a * d + 3 * a + a * d + d  # c_attn, attn.c_proj
        total += f * d + f + f * d + d  # c_fc, mlp.c_proj
    if not non_embedding:
        total += config.padded_vocab_size * d + config.n_positions * d
    return total


def causal_attention(q, k, v, n_head, dropout_p):
    """Causal multi-head SDPA on (B, T, n_head * head_dim) tensors."""
    b, t, width = q.shape
    heads = [z.view(b, t, n_head, width // n_head).transpose(1, 2) for z in (q, k, v)]
    y = F.scaled_dot_product_attention(*heads, dropout_p=dropout_p, is_causal=True)
    return y.transpose(1, 2).reshape(b, t, width)


def gelu(x):
    return F.gelu(x, approximate="tanh")


# ----------------------------------------------------------------------------------------
# Plain GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, shape: BlockShape, dropout: float):
        super().__init__()
        self.n_head, self.attn_dim, self.dropout = shape.n_head, shape.attn_dim, dropout
        self.qkv_lead = shape.qkv_lead
        self.c_attn = nn.Linear(d_model, 3 * shape.attn_dim)
        self.c_proj = nn.Linear(shape.attn_dim, d_model)

    def forward(self, x):
        qkv = self.c_attn(x)
        q, k, v = qkv.split(self.attn_dim, dim=-1) if self.qkv_lead is None else split_nested_qkv(qkv, self.qkv_lead)
        p = self.dropout if self.training else 0.0
        return self.c_proj(causal_attention(q, k, v, self.n_head, p))


class MLP(nn.Module):
    def __init__(self, d_model: int, n_inner: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, n_inner)
        self.c_proj = nn.Linear(n_inner, d_model)

    def forward(self, x):
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, shape: BlockShape):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        self.shape = shape
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = CausalSelfAttention(d, shape, config.dropout)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, shape.n_inner)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT2(nn.Module):
    """A plain GPT-2 language model; `blocks` may give each block its own widths.

    `model(idx)` returns logits (B, T, vocab_size); `model(idx, return_hidden=True)` the
    final hidden states (after ln_f). The token embedding is the tied output head.
    """

    def __init__(self, config: GPT2Config, blocks: Sequence[BlockShape] | None = None):
        super().__init__()
        self.config = config
        self.block_shapes = tuple(block_shapes_of(config) if blocks is None else blocks)
        d = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab_size, d)
        self.wpe = nn.Embedding(config.n_positions, d)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, shape) for shape in self.block_shapes)
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        gpt2_init_(self, len(self.block_shapes))
        with torch.no_grad():
            self.wte.weight[config.vocab_size :].zero_()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied output head over the true vocabulary: (vocab_size, n_embd)."""
        return self.wte.weight[: self.config.vocab_size]

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out token and position embeddings."""
        return count_parameters(self, EMBEDDING_PARAMETERS if non_embedding else ())

    def forward(self, idx, return_hidden=False):
        check_tokens(idx, self.config.n_positions)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(embed_tokens(self.wte, idx, self.config.vocab_size) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return x if return_hidden else F.linear(x, self.lm_head_weight)


# ----------------------------------------------------------------------------------------
# Nested GPT-2


def split_nested_qkv(y, d_s):
    """Split a nested c_attn output [q_S k_S v_S q_X k_X v_X] into the TA's q, k, v."""
    extra = (y.shape[-1] - 3 * d_s) // 3
    if extra == 0:
        return y.split(d_s, dim=-1)
    student, ta_extra = y[..., : 3 * d_s].split(d_s, dim=-1), y[..., 3 * d_s :].split(extra, dim=-1)
    return tuple(torch.cat(pair, dim=-1) for pair in zip(student, ta_extra))


class NestedCausalSelfAttention(nn.Module):
    def __init__(self, d_s, d_ta, n_head_s, n_head_ta, dropout, share=True):
        super().__init__()
        self.d_s, self.n_head_s, self.n_head_ta, self.dropout = d_s, n_head_s, n_head_ta, dropout
        self.c_attn = NestedLinear((d_s, d_ta), (3 * d_s, 3 * d_ta), share_weights=share)
        self.c_proj = NestedLinear((d_s, d_ta), (d_s, d_ta), share_weights=share)

    def _attention_dropout(self):
        return self.dropout if self.training else 0.0

    def forward_student(self, x_s):
        q, k, v = self.c_attn.forward_student(x_s).split(self.d_s, dim=-1)
        return self.c_proj.forward_student(causal_attention(q, k, v, self.n_head_s, self._attention_dropout()))

    def forward_ta(self, x_ta):
        q, k, v = split_nested_qkv(self.c_attn.forward_ta(x_ta), self.d_s)
        return self.c_proj.forward_ta(causal_attention(q, k, v, self.n_head_ta, self._attention_dropout()))

    def forward(self, x_s, x_ta):
        qkv_s, qkv_ta = self.c_attn(x_s, x_ta)
        y_s = causal_attention(*qkv_s.split(self.d_s, dim=-1), self.n_head_s, self._attention_dropout())
        y_ta = causal_attention(*split_nested_qkv(qkv_ta, self.d_s), self.n_head_ta, self._attention_dropout())
        return self.c_proj(y_s, y_ta)


class NestedMLP(nn.Module):
    def __init__(self, d_s, d_ta, ffn_s, ffn_ta, share=True):
        super().__init__()
        self.c_fc = NestedLinear((d_s, d_ta), (ffn_s, ffn_ta), share_weights=share)
        self.c_proj = NestedLinear((ffn_s, ffn_ta), (d_s, d_ta), share_weights=share)

    # One stream (a TA-only block, or a run that trains one model): `gelu_mlp`, with GELU in
    # the kernels' epilogues where they run, else the unfused ops.
    def forward_student(self, x_s):
        return gelu_mlp(x_s, *self.c_fc.student_parameters(), *self.c_proj.student_parameters())

    def forward_ta(self, x_ta):
        return gelu_mlp(x_ta, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)

    def forward(self, x_s, x_ta):
        # One fused op: GELU rides in the nested Dense kernels' epilogues.
        return nested_gelu_mlp(x_s, x_ta, self.c_fc.nested_parameters(), self.c_proj.nested_parameters())


class NestedBlock(nn.Module):
    """A transformer block run by both streams, or by the TA alone when `ta_only`, or (in a
    run that trains one model) by one stream."""

    def __init__(self, config: GPT2Config, d_ta, n_head_ta, ffn_ta, ta_only, share=True):
        super().__init__()
        d_s, eps = config.n_embd, config.layer_norm_epsilon
        self.ta_only = ta_only
        share = share or ta_only  # a TA-only block has no Student to unshare
        self.ln_1 = NestedLayerNorm(d_s, d_ta, eps)
        self.attn = NestedCausalSelfAttention(d_s, d_ta, config.n_head, n_head_ta, config.dropout, share)
        self.ln_2 = NestedLayerNorm(d_s, d_ta, eps)
        self.mlp = NestedMLP(d_s, d_ta, config.n_inner, ffn_ta, share)
        self.drop = nn.Dropout(config.dropout)

    # The norms run as fused ops (NestedLayerNorm.norm_student / norm_ta) that take the
    # residual add in front of them, and under autocast write the autocast dtype the nested
    # Dense ops read. So a block leaves its last add to whoever reads it next: each stream's
    # output is a pair (x, r) meaning x + r (NestedLM.hidden_states), which the next block's
    # ln_1 adds in its own pass. A block takes either form.

    @staticmethod
    def _first_norm(norm, x):
        """(x + r, norm(x + r)) of a pair (x, r) as one op; (x, norm(x)) of a tensor."""
        return norm(*x) if isinstance(x, tuple) else (x, norm(x))

    def forward_student(self, x_s):
        x_s, h_s = self._first_norm(self.ln_1.norm_student, x_s)
        x_s, h_s = self.ln_2.norm_student(x_s, self.drop(self.attn.forward_student(h_s)))
        return x_s, self.drop(self.mlp.forward_student(h_s))

    def forward_ta(self, x_ta):
        x_ta, h_ta = self._first_norm(self.ln_1.norm_ta, x_ta)
        x_ta, h_ta = self.ln_2.norm_ta(x_ta, self.drop(self.attn.forward_ta(h_ta)))
        return x_ta, self.drop(self.mlp.forward_ta(h_ta))

    def forward(self, x_s, x_ta):
        """((x_s, r_s), (x_ta, r_ta)), each stream's output x + r; a stream whose input is None
        is not computed (its output is None). Inputs are tensors or such pairs."""
        if x_s is None:
            return None, self.forward_ta(x_ta)
        if x_ta is None:
            return self.forward_student(x_s), None
        (x_s, h_s), (x_ta, h_ta) = self._first_norm(self.ln_1.norm_student, x_s), self._first_norm(
            self.ln_1.norm_ta, x_ta)
        a_s, a_ta = self.attn(h_s, h_ta)
        (x_s, h_s), (x_ta, h_ta) = self.ln_2.norm_student(x_s, self.drop(a_s)), self.ln_2.norm_ta(x_ta, self.drop(a_ta))
        m_s, m_ta = self.mlp(h_s, h_ta)
        return (x_s, self.drop(m_s)), (x_ta, self.drop(m_ta))


class NestedGPT2(NestedLM):
    """A Student GPT-2 (`config`) M-nested inside a TA (`nest`), trained together.

    `model(idx)` -> (logits_s, logits_ta), each (B, T, vocab_size);
    `model(idx, return_hidden=True)` -> (h_s, h_ta) after the final LayerNorm, of widths
    `student_width` and `ta_width`, for the fused loss with `lm_head_weight`;
    `stream="student"` or `"ta"` computes that stream alone (None in the other's place).
    """

    architecture = "gpt2"
    embedding_parameters = EMBEDDING_PARAMETERS

    def __init__(self, config: GPT2Config, nest: NestingConfig | None = None):
        super().__init__()
        nest = NestingConfig() if nest is None else nest
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        if not isinstance(nest, NestingConfig):
            raise TypeError(f"nest must be a NestingConfig, got {type(nest).__name__}")
        self.config, self.nest = config, nest
        d_s = config.n_embd
        d_ta = resolve_d_model_ta(d_s, nest)
        if nest.n_head_ta is not None:
            n_head_ta = nest.n_head_ta
        elif d_ta % config.head_dim == 0:
            n_head_ta = d_ta // config.head_dim
        else:
            raise ValueError(
                f"d_model_ta={d_ta} is not a multiple of the Student's head size {config.head_dim}; "
                "set NestingConfig.n_head_ta"
            )
        if d_ta % n_head_ta:
            raise ValueError(f"NestingConfig: n_head_ta={n_head_ta} does not divide d_model_ta={d_ta}")
        if n_head_ta < config.n_head:
            raise ValueError(f"NestingConfig.n_head_ta={n_head_ta} is smaller than the Student's n_head={config.n_head}")
        ffn_ta = resolve_ffn_ta(config.n_inner, nest, "n_inner")
        n_layer_ta = config.n_layer + nest.extra_layers
        self.ta_only_layers = ta_only_layer_indices(config.n_layer, nest)
        self.student_layers = tuple(i for i in range(n_layer_ta) if i not in self.ta_only_layers)
        self.ta_config = config.replace(n_embd=d_ta, n_layer=n_layer_ta, n_head=n_head_ta, n_inner=ffn_ta)

        self.wte = nn.Embedding(config.padded_vocab_size, d_ta)
        self.wpe = nn.Embedding(config.n_positions, d_ta)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            NestedBlock(config, d_ta, n_head_ta, ffn_ta, ta_only=i in self.ta_only_layers, share=nest.share_weights)
            for i in range(n_layer_ta)
        )
        self.ln_f = NestedLayerNorm(d_s, d_ta, config.layer_norm_epsilon)
        gpt2_init_(self, n_layer_ta)
        copy_student_blocks_(self)
        with torch.no_grad():
            self.wte.weight[config.vocab_size :].zero_()

    @property
    def student_config(self) -> GPT2Config:
        return self.config

    @property
    def final_norm(self) -> NestedLayerNorm:
        return self.ln_f

    def embed(self, idx, report=None):
        check_tokens(idx, self.config.n_positions)
        tokens = embed_tokens(self.wte, idx, self.config.vocab_size, report)
        return tokens + self.wpe(torch.arange(idx.shape[1], device=idx.device))

    def stream_shape(self, stream: str) -> StreamShape:
        config = self.config if stream == "student" else self.ta_config
        body = gpt2_num_parameters(config, block_shapes_of(config))
        return StreamShape(config.n_layer, config.n_embd, config.n_inner, body + config.vocab_size * config.n_embd)

    def forward(self, idx, return_hidden=False, *, stream=None, report=None):
        hidden = self.hidden_states(idx, stream, report)
        return hidden if return_hidden else self.lm_logits(*hidden)

    @classmethod
    def from_hf_gpt2(cls, path, nest: NestingConfig | None = None, *, zero_init_extras: bool = True):
        """A nested model whose Student is the GPT-2 checkpoint in the Hugging Face layout at
        `path` (config.json + model.safetensors or pytorch_model.bin).

        The Student then computes exactly what the checkpoint computes. With
        `zero_init_extras`, the projections that write the TA's new units (extra FFN units,
        extra heads, TA-only blocks) into the residual stream start at zero, so without
        d_model nesting the TA starts out computing the Student's function too.
        """
        if nest is not None and not nest.share_weights:
            raise ValueError("from_hf_gpt2 builds a shared model only; drop NestingConfig(share_weights=False)")
        config, tensors = hf_gpt2.read_gpt2(path)
        model = cls(config, nest)
        hf_gpt2.copy_into_nested(model, tensors, zero_init_extras=zero_init_extras)
        return model


def load_hf_gpt2(path) -> GPT2:
    """A plain `GPT2` holding the Hugging Face GPT-2 checkpoint at `path`."""
    config, tensors = hf_gpt2.read_gpt2(path)
    model = GPT2(config)
    hf_gpt2.copy_into_plain(model, tensors)
    return model
