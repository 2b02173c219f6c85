"""One `matta train` step, traced: the harness that feeds the cost model.

`trace_training_step(cfg, vocab_size, card)` builds what `Run.setup` builds from the same
building blocks (`build_model`, `criterion_for` and the TA-only freeze of a one-stream run,
the task's `Objective`, `build_optimizer`) on fake tensors, and traces what `Run.train_step`
does:
per micro-batch the streams and the fused loss under the run's autocast, the backward of
`loss / grad_accum`, the trainer's loss bookkeeping; then gradient clipping, the optimizer
step and `zero_grad`. Nothing is allocated or computed.

Steps traced: the first (forward, loss, backward; its optimizer step initialises state and
is not priced), then optimizer steps alone on fake gradients: AdamW's steady step; for
Shampoo (started at step 2) the step that computes every inverse root, then a steady
preconditioned step. Data-parallel engines are not traced: `predict` models DDP's all-reduce.
Shampoo shares its matrix work over the ranks of a process group, so for `world` > 1 it is
traced as rank 0 of a fake process group of that size (torch's "fake" backend: collectives
that move nothing), its gathers and broadcasts recorded as collectives.

What this shares with the trainer: the model builder, the criterion and its `streams`, the
objective module called as `objective(x, y)` returning the loss output (the criterion's
ramp left at 1, fully ramped), `build_optimizer(cfg, model)`, the autocast dtype rule (bf16
on a GPU unless `--dtype fp32`) and the order of the step (micro-batches, clip, step,
zero_grad).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from ..train.config import ConfigError, TrainConfig
from ..train.objective import Objective, criterion_for
from ..train.optimizers import build_optimizer
from ..train.run_dir import build_model
from ..train.tasks import task_for
from ..train.trainer import LOSS_KEYS
from .cards import DeviceCard
from .lowering import device_lowering
from .trace import HostRead, Record, StepTracer, fake_device_tracing, new_fake_mode

@dataclass
class StepTrace:
    """The records of one traced training step (see the module docstring)."""

    cfg: TrainConfig
    card: DeviceCard
    vocab_size: int
    amp_dtype: str  # "bf16" or "fp32"
    records: list[Record]  # micro-batches, clipping and a steady optimizer step
    host_reads: list[HostRead]
    root_records: list[Record] = field(default_factory=list)  # clipping + optimizer of a root step (Shampoo)
    root_host_reads: list[HostRead] = field(default_factory=list)
    grad_elements: list = field(default_factory=list)  # (numel, itemsize) of each gradient, parameter order
    world: int = 1  # ranks of the process group the optimizer was traced in
    splits_over_ranks: bool = False  # the optimizer's work depends on `world` (Shampoo): price only that world
    model_flops_per_token: float = 0.0
    tokens: int = 0  # tokens per optimizer step of one process
    seconds: float = 0.0  # how long the trace took

    @property
    def syncs(self) -> int:
        return sum(r.starts_sync for r in self.host_reads)

    @property
    def root_syncs(self) -> int:
        return sum(r.starts_sync for r in self.root_host_reads)


def amp_dtype_for(cfg: TrainConfig, card: DeviceCard) -> torch.dtype | None:
    """The trainer's rule (matta/train/context.py): bf16 autocast on a GPU unless --dtype fp32."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if card.kind == "gpu" else "fp32")
    return torch.bfloat16 if dtype == "bf16" else None


def _phase_hooks(model, tracer):
    """The model's forward is phase "forward"; what the objective does after it, "loss"."""
    def before(*_):
        tracer.phase = "forward"

    def after(*_):
        tracer.phase = "loss"

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


@contextlib.contextmanager
def _fake_process_group(world: int):
    """torch.distributed initialised as rank 0 of `world` ranks that exchange nothing."""
    if world == 1:
        yield
        return
    import torch.distributed as dist
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    except ImportError:
        raise ConfigError(f"this torch ({torch.__version__}) has no fake process group, which tracing Shampoo on "
                          f"{world} GPUs needs; price it with --gpus 1") from None

    if dist.is_initialized():
        raise ConfigError("matta cost traces a multi-GPU Shampoo step in a process group of its own; "
                          "run it outside torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def trace_training_step(cfg: TrainConfig, vocab_size: int, card: DeviceCard, *, world: int = 1,
                        newton_iterations: int = 18, with_locations: bool = False) -> StepTrace:
    """Trace one training step of `cfg` with a `vocab_size` vocabulary as `card`'s device runs it,
    on rank 0 of `world` data-parallel ranks (what changes with `world` is Shampoo's share of work).

    `newton_iterations`: the coupled Newton iterations a GPU root step is traced with (the
    iteration stops on values the trace does not have; 12-17 were measured here on
    synthetic factors of condition 1e3-1e5). `with_locations` keeps each op's Python line.
    """
    if cfg.task != "lm":
        raise ConfigError("matta cost traces language-model steps (--task lm) only")
    if cfg.teacher:
        raise ConfigError("matta cost does not trace a Teacher yet; drop --teacher")
    if not isinstance(newton_iterations, int) or newton_iterations < 1:
        raise ConfigError(f"--newton-iterations must be an int >= 1, got {newton_iterations!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be an int >= 1, got {world!r}")
    started = time.perf_counter()
    shampoo = cfg.optimizer == "shampoo"
    with _fake_process_group(world if shampoo else 1):
        trace = _trace(cfg, vocab_size, card, shampoo, newton_iterations, with_locations)
    return dataclasses.replace(trace, world=world, splits_over_ranks=shampoo, seconds=time.perf_counter() - started)


def _trace(cfg, vocab_size, card, shampoo, newton_iterations, with_locations) -> StepTrace:
    if shampoo:  # step 1 grafts only, step 2 computes every root, step 3 is a steady preconditioned step
        cfg = dataclasses.replace(cfg, start_preconditioning_step=2)
    amp = amp_dtype_for(cfg, card)
    fake_mode = new_fake_mode()
    tracer = StepTracer(card.kind, card.sm_count, with_locations=with_locations)
    with device_lowering(card):
        with fake_mode:
            model = build_model(cfg, vocab_size)
            criterion = criterion_for(cfg)  # its ramp stays 1: the distillation term fully on
            if "ta" not in criterion.streams:  # as Run.setup: nothing reaches the TA-only layers
                for p in model.ta_only_parameters():
                    p.requires_grad_(False)
            objective = Objective(task_for(cfg), model, criterion)
            optimizer = build_optimizer(cfg, model)
            if shampoo:
                optimizer.root_settings = dataclasses.replace(optimizer.root_settings, max_iterations=newton_iterations)
            x = torch.empty(cfg.batch_size, cfg.block_size, dtype=torch.int64)
            losses = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
            all_finite = torch.ones((), dtype=torch.bool)
        autocast = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
        hooks = _phase_hooks(model, tracer)
        params = [p for p in model.parameters() if p.requires_grad]

        def optimizer_step():
            tracer.phase = "optimizer"
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def fake_gradients():
            with fake_mode:
                for p in params:
                    p.grad = torch.empty_like(p)

        try:
            with fake_device_tracing(fake_mode, tracer):
                for _ in range(cfg.grad_accum):
                    with autocast:
                        out = objective(x, x)
                    tracer.phase = "backward"
                    (out.loss / cfg.grad_accum).backward()
                    tracer.phase = "other"
                    losses += torch.stack([out.loss, out.student, out.ta, out.distill]).detach().double() / cfg.grad_accum
                all_finite &= torch.isfinite(losses).all()
                step_records, step_reads = list(tracer.records), list(tracer.host_reads)
                optimizer_step()  # initialises the optimizer state: not priced
        finally:
            for hook in hooks:
                hook.remove()

        def traced_optimizer_step():
            fake_gradients()
            tracer.records, tracer.host_reads = [], []
            with fake_device_tracing(fake_mode, tracer):
                optimizer_step()
            return tracer.records, tracer.host_reads

        root_records, root_reads = traced_optimizer_step() if shampoo else ([], [])
        steady_records, steady_reads = traced_optimizer_step()
    return StepTrace(
        cfg=cfg, card=card, vocab_size=vocab_size, amp_dtype="bf16" if amp is not None else "fp32",
        records=step_records + steady_records, host_reads=step_reads + steady_reads,
        root_records=root_records, root_host_reads=root_reads,
        grad_elements=[(p.numel(), p.element_size()) for p in params],
        model_flops_per_token=model.flops_per_token(cfg.block_size, criterion.streams),
        tokens=cfg.batch_size * cfg.block_size * cfg.grad_accum,
    )
