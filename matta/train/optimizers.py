"""The optimizer a run asks for (`--optimizer adamw | shampoo`), over the model's own groups."""
from __future__ import annotations

import torch

from ..ops import DeferredReport
from ..optim import Shampoo, nested_block_splits
from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, model, report: DeferredReport | None = None) -> torch.optim.Optimizer:
    """AdamW or Shampoo over the model's groups; Shampoo files its device-side checks in
    `report` (the run's, read at log steps)."""
    groups = model.optimizer_groups(cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # The fused kernel keeps its step counts on the device: no host read per step.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return Shampoo(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        max_preconditioner_dim=cfg.max_preconditioner_dim,
        precondition_frequency=cfg.precondition_frequency,
        start_preconditioning_step=cfg.start_preconditioning_step,
        grafting="adam",
        grafting_beta2=cfg.beta2,
        factor_matmul_dtype=cfg.shampoo_factor_matmul,
        block_splits=nested_block_splits(model) if cfg.shampoo_nested_blocks else None,
        report=report,
    )
