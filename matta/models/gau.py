"""Gated Attention Unit models, plain and M-nested (paper Figure 3; Hua et al. 2022).

One GAU layer (pre-LayerNorm, residual), with expansion width e and attention width s:

    U = silu(x W_u)   V = silu(x W_v)   Z = silu(x W_z)
    Q = Z * gamma_q + beta_q            K = Z * gamma_k + beta_k
    A = relu(Q K^T / n + rel_bias[j - i])^2     (causal mask for a language model)
    out = x + (U * (A V)) W_o

W_u, W_v and W_z are one projection `uvz`. In the nested layer every Dense is a
NestedLinear nested along e (U and V each nested separately): the rows of `uvz` are laid
out [U_S V_S Z U_X V_X] so that the Student's rows [U_S V_S Z] are the leading block;
Z (width s), the scales, offsets and the relative position bias are shared.
"""
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import NestedLayerNorm, NestedLinear
from ._common import (INIT_STD, check_tokens, copy_student_blocks_, count_parameters, embed_tokens, resolve_d_model_ta,
                      resolve_ffn_ta)
from .base import NestedLM, StreamShape
from .config import GAUConfig, NestingConfig, ta_only_layer_indices


@dataclass(frozen=True)
class GAULayerShape:
    """The width of one GAU layer: its expansion e (U and V).

    `uv_lead` names the row layout of the fused uvz projection: None is [U; V; Z]; an int
    g is the nested layout [U_g; V_g; Z; U_rest; V_rest] of a TA layer cut out whole (so
    every GEMM output column stays in place and the extracted TA equals the nested TA
    bit for bit).
    """

    expansion: int
    uv_lead: int | None = None


def gau_num_parameters(config: GAUConfig, shapes: Sequence[GAULayerShape], non_embedding: bool = True) -> int:
    """Parameter count of a GAU with residual width config.n_embd and these layers
    (non_embedding leaves out the token embedding, which is also the LM head)."""
    d, s = config.n_embd, config.attn_dim
    total = 2 * d  # norm_f
    for shape in shapes:
        e = shape.expansion
        total += 2 * d + (2 * e + s) * (d + 1) + 4 * s + (2 * config.n_positions - 1) + e * d + d
    if config.is_classifier:
        total += config.num_classes * (d + 1)
    if not non_embedding:
        total += config.padded_vocab_size * d
    return total


def relative_positions(t, n_positions, device):
    """Index into a relative bias of 2 * n_positions - 1 entries: (j - i) + n_positions - 1."""
    pos = torch.arange(t, device=device)
    return pos[None, :] - pos[:, None] + (n_positions - 1)


def gau_attention(q, k, v, rel_bias, n_positions, causal, key_mask):
    """relu(Q K^T / n + bias)^2 V with causal and key-padding masks; q, k (B,T,s), v (B,T,e)."""
    t = q.shape[1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / n_positions
    scores = scores + rel_bias[relative_positions(t, n_positions, q.device)]
    a = torch.relu(scores).square()
    if causal:
        a = a.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), 0.0)
    if key_mask is not None:
        a = a * key_mask[:, None, :].to(a.dtype)
    return torch.matmul(a, v)


def split_uvz(y, expansion, attn_dim, lead=None):
    """U, V, Z from a uvz output laid out [U V Z] (lead None) or [U_lead V_lead Z U_rest V_rest]."""
    if lead is None or lead == expansion:
        return y.split([expansion, expansion, attn_dim], dim=-1)
    rest = expansion - lead
    u_lead, v_lead, z = y[..., : 2 * lead + attn_dim].split([lead, lead, attn_dim], dim=-1)
    u_rest, v_rest = y[..., 2 * lead + attn_dim :].split(rest, dim=-1)
    return torch.cat([u_lead, u_rest], dim=-1), torch.cat([v_lead, v_rest], dim=-1), z


def _pool(x, key_mask):
    if key_mask is None:
        return x.mean(dim=1)
    weights = key_mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _check_mask(mask, idx):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, got {getattr(mask, 'shape', type(mask))}")
    return mask.bool()


class _QK(nn.Module):
    """Per-dimension scale and offset turning Z into Q (row 0) and K (row 1)."""

    def __init__(self, s):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))

    def forward(self, z):
        return z * self.gamma[0] + self.beta[0], z * self.gamma[1] + self.beta[1]


# ----------------------------------------------------------------------------------------
# Plain GAU


class GAULayer(nn.Module):
    def __init__(self, config: GAUConfig, d: int, shape: GAULayerShape):
        super().__init__()
        expansion = shape.expansion
        self.expansion, self.uv_lead = expansion, shape.uv_lead
        self.attn_dim, self.n_positions = config.attn_dim, config.n_positions
        self.causal = not config.is_classifier
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.uvz = nn.Linear(d, 2 * expansion + config.attn_dim)
        self.qk = _QK(config.attn_dim)
        self.rel_bias = nn.Parameter(torch.zeros(2 * config.n_positions - 1))
        self.o = nn.Linear(expansion, d)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, key_mask=None):
        u, v, z = split_uvz(F.silu(self.uvz(self.norm(x))), self.expansion, self.attn_dim, self.uv_lead)
        q, k = self.qk(z)
        a = gau_attention(q, k, v, self.rel_bias, self.n_positions, self.causal, key_mask)
        return x + self.drop(self.o(u * a))


class GAU(nn.Module):
    """A plain GAU model: a causal LM (tied embedding head, logits over vocab_size) or,
    with config.num_classes, a classifier over mean-pooled tokens.

    `model(idx, attention_mask=None)` -> logits (B, T, vocab_size) or (B, num_classes);
    `return_hidden=True` gives the final normalised hidden states (pooled for a classifier).
    """

    def __init__(self, config: GAUConfig, layers: Sequence[GAULayerShape] | None = None):
        super().__init__()
        self.config = config
        self.layer_shapes = tuple((GAULayerShape(config.expansion),) * config.n_layer if layers is None else layers)
        d = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(GAULayer(config, d, shape) for shape in self.layer_shapes)
        self.norm_f = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.head = nn.Linear(d, config.num_classes) if config.is_classifier else None
        gau_init_(self)
        with torch.no_grad():
            self.wte.weight[config.vocab_size :].zero_()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight[: self.config.vocab_size]

    def num_parameters(self, non_embedding: bool = True) -> int:
        return count_parameters(self, ("wte.weight",) if non_embedding else ())

    def forward(self, idx, return_hidden=False, attention_mask=None):
        check_tokens(idx, self.config.n_positions)
        key_mask = _check_mask(attention_mask, idx)
        x = self.drop(embed_tokens(self.wte, idx, self.config.vocab_size))
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm_f(x)
        if self.head is not None:
            x = _pool(x, key_mask)
            return x if return_hidden else self.head(x)
        return x if return_hidden else F.linear(x, self.lm_head_weight)


def gau_init_(module: nn.Module):
    """N(0, 0.02) Dense weights, embeddings and Q/K scales (as in Hua et al.'s code); zero
    biases and offsets; unit LayerNorms; relative position biases 1/sqrt(n).

    Why the bias is not zero: with N(0, 0.02) scales, Q K^T / n starts near 1e-7, so with a
    zero bias A = relu(.)^2 starts near 1e-14 and its gradient (2 relu(.)) near 1e-7.
    Adam moves the bias by about the learning rate from the first steps whatever the size of
    the gradient; where it moves below zero every score is negative, the ReLU passes no
    gradient, and that attention stays exactly zero for good (seen in a 2-layer classifier).
    Starting the bias at 1/sqrt(n) puts every score in the ReLU's active region: A starts as
    a uniform average over the context (1/n per key) with gradient 2/sqrt(n) per score, and
    the bias would have to fall by 1/sqrt(n) before a score could die.
    """
    for name, p in module.named_parameters():
        *path, leaf = name.split(".")
        if leaf.startswith("student_"):
            continue  # an unshared Student is copied from the TA afterwards (copy_student_blocks_)
        if any(part.startswith("norm") for part in path):
            nn.init.ones_(p) if leaf == "weight" else nn.init.zeros_(p)
        elif leaf == "rel_bias":  # 2 n - 1 relative offsets
            nn.init.constant_(p, ((p.numel() + 1) / 2) ** -0.5)
        elif leaf in ("bias", "beta"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, INIT_STD)


# ----------------------------------------------------------------------------------------
# Nested GAU


class NestedGAULayer(nn.Module):
    """A GAU layer run by both streams (or by the TA alone when `ta_only`, or by one stream
    in a run that trains one model)."""

    def __init__(self, config: GAUConfig, d_ta, expansion_ta, ta_only, share=True):
        super().__init__()
        share = share or ta_only  # a TA-only layer has no Student to unshare
        d_s, e_s, s = config.n_embd, config.expansion, config.attn_dim
        self.ta_only, self.d_s, self.e_s, self.e_ta, self.attn_dim = ta_only, d_s, e_s, expansion_ta, s
        self.n_positions, self.causal = config.n_positions, not config.is_classifier
        self.norm = NestedLayerNorm(d_s, d_ta, config.layer_norm_epsilon)
        self.uvz = NestedLinear((d_s, d_ta), (2 * e_s + s, 2 * expansion_ta + s), share_weights=share)
        self.qk = _QK(s)
        self.rel_bias = nn.Parameter(torch.zeros(2 * config.n_positions - 1))
        self.o = NestedLinear((e_s, expansion_ta), (d_s, d_ta), share_weights=share)
        self.drop = nn.Dropout(config.dropout)

    def _ta_uvz(self, y):
        return split_uvz(y, self.e_ta, self.attn_dim, self.e_s)

    def _gated_attention(self, u, v, z, key_mask):
        """U * (A V), A the squared-ReLU attention of Q, K made from Z."""
        q, k = self.qk(z)
        return u * gau_attention(q, k, v, self.rel_bias, self.n_positions, self.causal, key_mask)

    def forward_student(self, x_s, key_mask=None):
        y = F.silu(self.uvz.forward_student(self.norm.forward_student(x_s)))
        h = self._gated_attention(*y.split([self.e_s, self.e_s, self.attn_dim], dim=-1), key_mask)
        return x_s + self.drop(self.o.forward_student(h))

    def forward_ta(self, x_ta, key_mask=None):
        y = F.silu(self.uvz.forward_ta(self.norm.forward_ta(x_ta)))
        h = self._gated_attention(*self._ta_uvz(y), key_mask)
        return x_ta + self.drop(self.o.forward_ta(h))

    def forward(self, x_s, x_ta, key_mask=None):
        """(y_s, y_ta); a stream whose input is None is not computed (its output is None)."""
        if x_s is None:
            return None, self.forward_ta(x_ta, key_mask)
        if x_ta is None:
            return self.forward_student(x_s, key_mask), None
        y_s, y_ta = self.uvz(*self.norm(x_s, x_ta))
        h_s = self._gated_attention(*F.silu(y_s).split([self.e_s, self.e_s, self.attn_dim], dim=-1), key_mask)
        h_ta = self._gated_attention(*self._ta_uvz(F.silu(y_ta)), key_mask)
        o_s, o_ta = self.o(h_s, h_ta)
        return x_s + self.drop(o_s), x_ta + self.drop(o_ta)

    def plain_state(self, d: int, expansion: int) -> dict:
        """The state_dict of a plain GAULayer of residual width d cut out of this layer, with
        the Student's expansion (rows [U_S V_S Z]) or the TA's (all rows, nested layout)."""
        rows = 2 * expansion + self.attn_dim
        return {
            "norm.weight": self.norm.weight[:d].clone(),
            "norm.bias": self.norm.bias[:d].clone(),
            "uvz.weight": self.uvz.weight[:rows, :d].clone(),
            "uvz.bias": self.uvz.bias[:rows].clone(),
            "qk.gamma": self.qk.gamma.detach().clone(),
            "qk.beta": self.qk.beta.detach().clone(),
            "rel_bias": self.rel_bias.detach().clone(),
            "o.weight": self.o.weight[:d, :expansion].clone(),
            "o.bias": self.o.bias[:d].clone(),
        }


class NestedGAU(NestedLM):
    """A Student GAU model (`config`) M-nested inside a TA (`nest`: ffn_ta is the TA's
    expansion width e; extra_layers / extra_layer_positions and d_model_ta as for GPT-2).

    `model(idx, attention_mask=None)` -> (logits_s, logits_ta): (B, T, vocab_size) each
    for a language model, (B, num_classes) each for a classifier;
    `return_hidden=True` -> (h_s, h_ta), the final normalised (for a classifier, pooled)
    hidden states, for the fused loss with `lm_head_weight`;
    `stream="student"` or `"ta"` computes that stream alone (None in the other's place).
    """

    architecture = "gau"
    embedding_parameters = ("wte.weight",)

    def __init__(self, config: GAUConfig, nest: NestingConfig | None = None):
        super().__init__()
        nest = NestingConfig() if nest is None else nest
        if not isinstance(config, GAUConfig):
            raise TypeError(f"config must be a GAUConfig, got {type(config).__name__}")
        if not isinstance(nest, NestingConfig):
            raise TypeError(f"nest must be a NestingConfig, got {type(nest).__name__}")
        if nest.n_head_ta is not None:
            raise ValueError("NestingConfig.n_head_ta does not apply to GAU models (single-head attention); leave it None")
        self.config, self.nest = config, nest
        d_s = config.n_embd
        d_ta = resolve_d_model_ta(d_s, nest)
        self.ta_expansion = resolve_ffn_ta(config.expansion, nest, "expansion")
        n_layer_ta = config.n_layer + nest.extra_layers
        self.ta_only_layers = ta_only_layer_indices(config.n_layer, nest)
        self.student_layers = tuple(i for i in range(n_layer_ta) if i not in self.ta_only_layers)
        self.ta_config = config.replace(n_embd=d_ta, n_layer=n_layer_ta, expansion=self.ta_expansion)

        self.wte = nn.Embedding(config.padded_vocab_size, d_ta)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            NestedGAULayer(config, d_ta, self.ta_expansion, ta_only=i in self.ta_only_layers, share=nest.share_weights)
            for i in range(n_layer_ta)
        )
        self.norm_f = NestedLayerNorm(d_s, d_ta, config.layer_norm_epsilon)
        classes = config.num_classes
        self.head = NestedLinear((d_s, d_ta), (classes, classes), share_weights=nest.share_weights) if config.is_classifier else None
        gau_init_(self)
        copy_student_blocks_(self)
        with torch.no_grad():
            self.wte.weight[config.vocab_size :].zero_()

    @property
    def final_norm(self) -> NestedLayerNorm:
        return self.norm_f

    def embed(self, idx, report=None):
        return embed_tokens(self.wte, idx, self.config.vocab_size, report)

    def stream_shape(self, stream: str) -> StreamShape:
        config = self.config if stream == "student" else self.ta_config
        body = gau_num_parameters(config, (GAULayerShape(config.expansion),) * config.n_layer)
        head = 0 if config.is_classifier else config.vocab_size * config.n_embd  # a classifier's is in `body`
        return StreamShape(config.n_layer, config.n_embd, config.expansion, body + head)

    def attention_flops_per_token(self, stream: str, seq_len: int) -> float:
        config = self.config if stream == "student" else self.ta_config
        # Q K^T (width s) and A V (width e), forward and backward: 6 FLOPs per multiply-add pair.
        return 6.0 * config.n_layer * seq_len * (config.attn_dim + config.expansion)

    def forward(self, idx, return_hidden=False, attention_mask=None, *, stream=None, report=None):
        check_tokens(idx, self.config.n_positions)
        key_mask = _check_mask(attention_mask, idx)
        h_s, h_ta = self.hidden_states(idx, stream, report, key_mask=key_mask)
        if self.head is None:
            return (h_s, h_ta) if return_hidden else self.lm_logits(h_s, h_ta)
        h_s = None if h_s is None else _pool(h_s, key_mask)
        h_ta = None if h_ta is None else _pool(h_ta, key_mask)
        if return_hidden:
            return h_s, h_ta
        if h_s is not None and h_ta is not None:
            return self.head(h_s, h_ta)
        return (None if h_s is None else self.head.forward_student(h_s),
                None if h_ta is None else self.head.forward_ta(h_ta))
