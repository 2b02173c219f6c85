"""Validation loss and perplexity of causal language models: the scoring that training and
evaluation share (the trainer's periodic and final evaluations, `matta eval`'s `val` task).

Works on any module that maps token ids `(B, T)` to logits `(B, T, V)`, or to a tuple of
such logits (a nested model's `(logits_s, logits_ta)`: pick one with `output=`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .models import pick_output


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, *, batch_size: int = 16, device=None, output=None,
                    autocast_dtype=None):
    """Mean next-token cross-entropy (nats) of `model` over `blocks` (N, T+1) of token ids.

    `output` picks one logits tensor of a model that returns several; `output="all"`
    returns one loss per returned tensor (a nested model's Student and TA in one pass).
    The sums stay on the device until the end: one host read per call.
    """
    if len(blocks) == 0:
        raise ValueError("no validation blocks to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = None
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        for i in range(0, len(blocks), batch_size):
            rows = blocks[i : i + batch_size].to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with ctx:
                out = model(x)
            if output == "all":
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
            else:
                outs = [pick_output(out, output)]
            sums = torch.stack([F.cross_entropy(o.float().reshape(-1, o.shape[-1]), y.reshape(-1), reduction="sum")
                                for o in outs]).double()
            totals = sums if totals is None else totals + sums
    finally:
        model.train(was_training)
    means = (totals / blocks[:, 1:].numel()).tolist()
    return means if output == "all" else means[0]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
