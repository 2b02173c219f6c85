"""The micro-batches of each step on the training device, the next step's fetched early.

Step `step` reads one global batch, split over ranks and then micro-batches, so the batch
of a step does not depend on how it is divided; and a batch is a pure function of its
step, so nothing here needs saving for an exact resume. On a GPU the rows go through
pinned memory and `non_blocking` copies: the host cuts the next step's batch while the
device still runs this step.
"""
from __future__ import annotations

import torch


class StepBatches:
    def __init__(self, source, *, batch_size: int, grad_accum: int, rank: int, world: int, device: torch.device):
        self.source, self.batch_size, self.grad_accum = source, batch_size, grad_accum
        self.rank, self.world, self.device = rank, world, device
        self._ahead: tuple[int, list] | None = None

    def _load(self, step: int) -> list:
        out = []
        for micro in range(self.grad_accum):
            part, parts = self.rank * self.grad_accum + micro, self.world * self.grad_accum
            x, y = self.source.batch(step, self.batch_size, part, parts)
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            out.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        return out

    def take(self, step: int) -> list:
        """[(x, y)] per micro-batch of `step`, on the device."""
        if self._ahead is not None and self._ahead[0] == step:
            batches = self._ahead[1]
        else:
            batches = self._load(step)
        self._ahead = None
        return batches

    def prefetch(self, step: int) -> None:
        """Start fetching the batches of `step` (call once this step's work is queued)."""
        self._ahead = (step, self._load(step))
