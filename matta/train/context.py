"""Where this process trains: rank and world size (from torchrun), device, CPU threads,
autocast precision, the process group, random state, and whether a model fits in memory.

Several processes train one model through PyTorch's own engines (matta/train/parallel.py);
`torchrun` starts them and its rendezvous joins machines, e.g. on each of two nodes:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=RUN -m matta train --out RUN_DIR ...
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig


def default_threads() -> int:
    """CPU threads when --threads is not given: $OMP_NUM_THREADS (torchrun sets 1), else 1.

    Never the machine's load: OpenMP splits work by the thread count, so a different count
    gives different rounding, and the same command must give the same numbers whatever
    else runs. One thread is also the fastest for the small models CPUs train here on a
    shared machine (BENCHMARKS.md, "Choices in the code").
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(value)) if value.isdigit() else 1


class Context:
    """Rank, world size, device and autocast dtype of this process; joins the process group."""

    def __init__(self, cfg: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif cfg.device == "cuda" and self.world > 1:
            device = f"cuda:{local_rank}"
        else:
            device = cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.amp_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.master = self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `values` over all processes (a collective: every rank calls it)."""
        if self.world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (a collective: every rank calls it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def rng_state(self) -> dict:
        """This process's random state (the CPU generator's, and the device's on a GPU)."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def close(self):
        """Leaves the process group (every rank calls it, after its last collective).

        The barrier first lets gloo's worker threads finish with every earlier operation:
        destroying the group while one still releases a Python-owned tensor deadlocks (the
        destructor joins the thread while holding the GIL that thread waits for; seen with
        torch 2.13 at the end of a compiled DDP run)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60


def check_memory(cfg: TrainConfig, model, ctx: Context) -> None:
    """Refuses a configuration whose rough footprint exceeds the free memory, before the
    model is built for real; `model` is its shapes (built on the meta device)."""
    params = model.num_parameters(non_embedding=False)
    state_bytes = params * (4 + 4 + (12 if cfg.optimizer == "shampoo" else 8))
    if cfg.parallel == "fsdp":
        state_bytes //= ctx.world
    ta = model.stream_shape("ta")
    elem = 2 if ctx.amp_dtype is not None else 4
    tokens = cfg.batch_size * cfg.block_size
    # Saved activations per layer and token (~12 d + 2 ffn values), bounded by twice the
    # TA's for the two streams, plus attention scores where SDPA has no fused kernel (CPU).
    act = 2 * tokens * ta.n_layer * (12 * ta.d_model + 2 * ta.ffn) * elem
    if ctx.device.type == "cpu":
        act += 2 * cfg.batch_size * cfg.block_size * cfg.block_size * ta.n_layer * 4 * 2
    need = state_bytes + act
    have = available_memory(ctx.device)
    if need > 0.9 * have:
        raise ConfigError(
            f"model {cfg.model} with --batch-size {cfg.batch_size} --block-size {cfg.block_size} needs about "
            f"{need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is free on {ctx.device}; use a smaller "
            "--model, --batch-size or --block-size (and --grad-accum to keep the batch)"
        )
