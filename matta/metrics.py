"""Ranking metrics of binary classifiers: AUROC and AucLoss (the paper's Tables 1, 3, 4).

`auroc(scores, labels)` is the probability that a random positive example scores above a
random negative one, ties counting one half: the Mann-Whitney U statistic divided by
n_pos * n_neg. It is computed exactly from one sort (the rank-sum formula with tied scores
sharing the mean of the ranks they span), in float64, in O(n log n). With `sample_weight`, every
example counts with its weight in the pair sum: sum over (positive i, negative j) of
w_i w_j [s_i > s_j] (+ 1/2 on ties), divided by (sum of positive weights) (sum of
negative weights).

`auc_loss = 1 - auroc`: lower is better, as the paper reports it.
"""
from __future__ import annotations

import torch


def _as_vector(name: str, value) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per example), got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    return t.detach().to("cpu", torch.float64)


def auroc(scores, labels, sample_weight=None) -> float:
    """Exact area under the ROC curve of `scores` (higher = more likely positive) for
    binary `labels` (0/1 or False/True), ties counted one half.

    Raises ValueError for shapes that differ, NaN/inf scores, labels other than 0/1,
    negative or non-finite weights, or labels of one class only (AUROC is undefined then).
    """
    s = _as_vector("scores", scores)
    y = _as_vector("labels", labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; AUROC needs finite scores")
    if not ((y == 0) | (y == 1)).all():
        bad = y[(y != 0) & (y != 1)][0].item()
        raise ValueError(f"labels must be 0 or 1 (binary), got {bad!r}; threshold soft labels first")
    w = torch.ones_like(s) if sample_weight is None else _as_vector("sample_weight", sample_weight)
    if w.shape != s.shape:
        raise ValueError(f"sample_weight must have one entry per example ({s.shape[0]}), got {w.shape[0]}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and non-negative")
    pos = y == 1
    w_pos, w_neg = w[pos].sum().item(), w[~pos].sum().item()
    if w_pos == 0 or w_neg == 0:
        raise ValueError(
            f"AUROC needs both classes with positive weight; got {int(pos.sum())} positive and "
            f"{int((~pos).sum())} negative examples"
        )
    # U = sum over positives i of w_i * (negative weight scoring below s_i + half the
    # negative weight tied with s_i): one sort, then per group of equal scores the
    # negative weight below it and inside it (the rank-sum formula with average ranks).
    order = torch.argsort(s, stable=True)
    s_sorted, w_sorted, pos_sorted = s[order], w[order], pos[order]
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    neg_weight = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, w_sorted * ~pos_sorted)
    neg_credit = (torch.cumsum(neg_weight, 0) - 0.5 * neg_weight)[group]
    u = (w_sorted * pos_sorted * neg_credit).sum().item()
    return u / (w_pos * w_neg)


def auc_loss(scores, labels, sample_weight=None) -> float:
    """1 - AUROC (the paper's AucLoss; lower is better)."""
    return 1.0 - auroc(scores, labels, sample_weight)
