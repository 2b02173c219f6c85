"""Pieces shared by the plain and the nested models."""
import math

import torch
from torch import nn

from ..layers import NestedLinear
from .config import NestingConfig

INIT_STD = 0.02


def count_parameters(module: nn.Module, exclude=()) -> int:
    """Number of distinct parameter elements, leaving out the parameters named in `exclude`."""
    seen, total = set(), 0
    for name, p in module.named_parameters():
        if name in exclude or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def check_tokens(idx, n_positions):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError(f"idx must be a (batch, time) tensor of token ids, got {getattr(idx, 'shape', type(idx))}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must hold integer token ids (int64 or int32), got {idx.dtype}")
    if idx.shape[1] > n_positions:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds the context length n_positions={n_positions}")


def ids_checked_on_host(idx) -> bool:
    """Whether token ids are checked with the CPU's gather (which raises at once) rather than
    on the device (a GPU, or inside torch.compile: NaN outputs and a deferred report)."""
    return idx.device.type == "cpu" and not torch.compiler.is_compiling()


def check_ids_on_host(idx, vocab_size: int) -> None:
    """Raises ValueError for a token id outside [0, vocab_size): a gather from a zero-width
    table of vocab_size rows checks every id's bounds in C++ without reading the ids into
    Python (a training step still never reads a tensor on the host)."""
    try:
        torch.index_select(idx.new_empty(vocab_size, 0, dtype=torch.float32), 0, idx.reshape(-1))
    except (IndexError, RuntimeError):
        outside = (idx < 0) | (idx >= vocab_size)
        if not outside.any():
            raise
        raise ValueError(f"token id {idx[outside][0].item()} is outside the vocabulary [0, {vocab_size}); "
                         "the ids must come from the model's tokenizer") from None


def ids_outside(idx, vocab_size: int, report=None):
    """On the device: the mask of ids outside [0, vocab_size), filed in `report` (a
    DeferredReport) when one is given; the caller makes those tokens' outputs NaN."""
    outside = (idx < 0) | (idx >= vocab_size)
    if report is not None:
        report.add(outside.any(), f"token ids outside the vocabulary [0, {vocab_size})")
    return outside


def embed_tokens(wte: nn.Embedding, idx, vocab_size: int, report=None):
    """The rows of `wte` for the ids in `idx`, which must lie in the true vocabulary
    [0, vocab_size): the table's padding rows beyond it are never read.

    On the CPU an id outside raises ValueError at once (`check_ids_on_host`). Elsewhere (a
    GPU, or inside torch.compile) checking would stall the step on a host read, so the row of
    such an id becomes NaN instead (its logits and the loss with it) and, when the caller
    passes a `DeferredReport` (matta.ops.deferred), the failed check is filed there for the
    caller to read where it reads device values anyway.
    """
    if ids_checked_on_host(idx):
        check_ids_on_host(idx, vocab_size)
        return wte(idx)
    outside = ids_outside(idx, vocab_size, report)
    rows = wte(idx.masked_fill(outside, 0))  # an id past the table would be a device assert
    return rows.masked_fill(outside.unsqueeze(-1), float("nan"))


def gpt2_init_(module: nn.Module, n_layer: int):
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms; the
    projections that write into the residual stream scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        *path, leaf = name.split(".")
        if leaf.startswith("student_"):
            continue  # an unshared Student is copied from the TA afterwards (copy_student_blocks_)
        if any(part.startswith(("ln", "norm")) for part in path):
            nn.init.ones_(p) if leaf == "weight" else nn.init.zeros_(p)
        elif leaf == "bias":
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else INIT_STD
            nn.init.normal_(p, 0.0, std)


def copy_student_blocks_(module: nn.Module) -> None:
    """Sets the own weights of every unshared Student Dense layer to the TA's leading block.

    The init functions skip those weights and draw nothing for them, so every shared
    parameter gets the very numbers it gets in the shared model of the same seed."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, NestedLinear) and not layer.share_weights:
                n_s, m_s = layer.student_features
                layer.student_weight.copy_(layer.weight[:n_s, :m_s])
                if layer.student_bias is not None:
                    layer.student_bias.copy_(layer.bias[:n_s])


def resolve_ffn_ta(n_inner: int, nest: NestingConfig, what: str) -> int:
    ffn_ta = 2 * n_inner if nest.ffn_ta is None else nest.ffn_ta
    if ffn_ta < n_inner:
        raise ValueError(f"NestingConfig.ffn_ta={ffn_ta} is smaller than the Student's {what}={n_inner}")
    return ffn_ta


def resolve_d_model_ta(n_embd: int, nest: NestingConfig) -> int:
    d_ta = n_embd if nest.d_model_ta is None else nest.d_model_ta
    if d_ta < n_embd:
        raise ValueError(f"NestingConfig.d_model_ta={d_ta} is smaller than the Student's n_embd={n_embd}")
    return d_ta
