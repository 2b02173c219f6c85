"""Data parallelism on PyTorch's engines: DistributedDataParallel, or FSDP2's fully_shard.

`wrap(objective, ctx, cfg)` returns the module a training step calls:
- one process: the objective itself;
- `--parallel ddp`: DistributedDataParallel (bucketed all-reduce overlapped with the
  backward; gradients written straight into the buckets). `gradient_sync(engine, False)`
  is `no_sync()` for the micro-batches before the last, so an accumulated step all-reduces
  once. `static_graph` only without accumulation: DDP refuses a static graph whose first
  backward runs under no_sync (torch 2.13). Shampoo, given identical gradients on every
  rank, splits its inverse roots across the ranks by itself.
- `--parallel fsdp`: each block, then the whole objective, is `fully_shard`ed: every rank
  holds 1/world of the weights, gradients and AdamW state, gathering a block's weights
  for its forward and backward. Shampoo needs whole matrices and is refused with FSDP.

`full_state` / `load_model_state` / `load_optimizer_state` move the model and optimizer
state between the engines and a checkpoint in one layout (the full, unsharded tensors).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .context import Context
from .objective import Objective


def wrap(objective: Objective, ctx: Context, cfg: TrainConfig) -> nn.Module:
    """The engine around `objective` (see the module docstring). Call before building the
    optimizer: FSDP replaces the parameters by their shards."""
    if ctx.world == 1:
        return objective
    if cfg.parallel == "fsdp":
        for block in objective.model.blocks:
            fully_shard(block)
        fully_shard(objective)
        return objective
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, gradient_as_bucket_view=True,
                                   static_graph=cfg.grad_accum == 1)


@contextmanager
def gradient_sync(engine: nn.Module, sync: bool):
    """Inside: forward and backward of a micro-batch; without `sync` its gradients stay local
    (summed into the next micro-batch's), so only the last of a step communicates."""
    if isinstance(engine, DistributedDataParallel) and not sync:
        with engine.no_sync():
            yield
    elif isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `tensor`'s full value (a DTensor, like FSDP's gradient norm, is gathered)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(engine: nn.Module, objective: Objective, optimizer) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict) with whole tensors, for a checkpoint.

    Under FSDP this is a collective (every rank calls it) and only rank 0 gets the tensors;
    elsewhere each rank returns its own (identical) state.
    """
    if not isinstance(engine, FSDPModule):
        return objective.model.state_dict(), optimizer.state_dict()
    model_state = get_model_state_dict(objective.model, options=_FULL)
    return model_state, get_optimizer_state_dict(objective, optimizer, options=_FULL)


def whole_model(engine: nn.Module, objective: Objective, build, device) -> nn.Module | None:
    """The model with whole weights, for evaluation on rank 0: itself, or under FSDP a copy
    `build()` makes and fills from the gathered shards (a collective; None on other ranks)."""
    if not isinstance(engine, FSDPModule):
        return objective.model
    state = get_model_state_dict(objective.model, options=_FULL)
    if not state:
        return None
    with torch.device("meta"):  # no initialisation: it would draw from rank 0's random stream only
        model = build()
    model.to_empty(device=device).load_state_dict(state)
    return model


def load_model_state(engine: nn.Module, objective: Objective, state: dict) -> None:
    """Inverse of `full_state`'s model half: every rank passes the checkpoint's full tensors."""
    if isinstance(engine, FSDPModule):
        set_model_state_dict(objective.model, state, options=StateDictOptions(full_state_dict=True))
    else:
        objective.model.load_state_dict(state)


def load_optimizer_state(engine: nn.Module, objective: Objective, optimizer, state: dict) -> None:
    """Inverse of `full_state`'s optimizer half (after `load_model_state`)."""
    if isinstance(engine, FSDPModule):
        set_optimizer_state_dict(objective, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
