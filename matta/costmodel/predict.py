"""Pricing a traced step on a device card, and the report `matta cost` prints.

Per op: `time = max(FLOPs / (e * peak), bytes / (e_m * bandwidth)) + launches * launch`
(matta/costmodel/cards.py; a card with a `gemm_curve` scales a GEMM's peak by its share for
the GEMM's smallest dimension). Per step: the sum over the traced ops, plus a price per host sync
(`card.sync`), plus under DDP the all-reduce that the backward does not hide. Phases:
forward (the streams), loss (the fused LM head + MatTA loss), backward, optimizer (clipping,
the optimizer step, zero_grad, and Shampoo's root step amortised over its frequency),
communication (exposed all-reduce), other (the trainer's loss bookkeeping).

The overhead split (issue 19's goal): the **useful** time of a step is the FLOP time of its
GEMMs and attention kernels in the forward, loss and backward (FLOPs / (e_c or e_attn *
peak)); everything else (launches, memory-bound passes, the part of a GEMM's time its bytes
add, the whole optimizer, host syncs, exposed communication) is **overhead**.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .cards import DeviceCard
from .formulas import ATTENTION, COLLECTIVE, GEMM, OpCost
from .step import StepTrace

PHASES = ("forward", "loss", "backward", "optimizer", "communication", "other")
USEFUL_PHASES = ("forward", "loss", "backward")
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default
DDP_FIRST_BUCKET_BYTES = 1 * 2**20


@dataclass
class OpTime:
    total: float
    compute: float
    memory: float
    launch: float


def price(cost: OpCost, card: DeviceCard) -> OpTime:
    launch = cost.launches * card.launch
    if cost.kind == COLLECTIVE:
        if cost.wire and card.link <= 0:
            raise ValueError(f"card {card.name} has no interconnect bandwidth; it cannot price {cost.op}")
        network = cost.wire / (card.e_net * card.link) + cost.net_steps * card.net_latency if cost.wire else 0.0
        return OpTime(network + launch, 0.0, network, launch)
    if cost.kind == GEMM:
        compute = cost.flops / (card.e_c * card.gemm_share(cost.min_dim) * card.matmul_peak(cost.dtype))
    elif cost.kind == ATTENTION:
        compute = cost.flops / (card.e_attn * card.matmul_peak(cost.dtype))
    else:
        compute = cost.flops / (card.e_c * card.vector_flops) if card.vector_flops else 0.0
    memory = cost.bytes / (card.e_m * card.bandwidth)
    # Element-wise passes a GEMM op runs after its products (formulas.OpCost.element_flops).
    passes = cost.element_flops / (card.e_c * card.vector_flops) if cost.element_flops and card.vector_flops else 0.0
    return OpTime(max(compute, memory) + passes + launch, compute + passes, memory, launch)


def ring_all_reduce(nbytes: float, world: int, card: DeviceCard) -> float:
    """NCCL ring all-reduce of `nbytes` over `world` ranks: 2 (p-1)/p of the bytes over each link."""
    if world <= 1:
        return 0.0
    if card.link <= 0:
        raise ValueError(f"card {card.name} has no interconnect bandwidth; it cannot price --gpus {world}")
    return 2 * (world - 1) / world * nbytes / (card.e_net * card.link) + 2 * (world - 1) * card.net_latency


def ddp_buckets(grad_elements) -> list:
    """Bucket sizes in bytes as DDP fills them: parameters in reverse order, 1 MiB first, then 25 MiB."""
    buckets, current, cap = [], 0, DDP_FIRST_BUCKET_BYTES
    for numel, itemsize in reversed(grad_elements):
        current += numel * itemsize
        if current >= cap:
            buckets.append(current)
            current, cap = 0, DDP_BUCKET_BYTES
    if current:
        buckets.append(current)
    return buckets


@dataclass
class Prediction:
    """A priced step; every number is predicted."""

    card: DeviceCard
    world: int
    phases: dict  # phase -> seconds per optimizer step
    useful: float  # GEMM + attention FLOP time of forward, loss, backward
    launches: int  # per steady step
    syncs: int  # per steady step
    root_extra: float = 0.0  # seconds a root step adds (before amortising)
    root_launches: int = 0
    root_syncs: int = 0
    frequency: int = 1
    comm_total: float = 0.0  # all-reduce time, hidden or not
    top: list = field(default_factory=list)  # (seconds, launches, phase, op, shape, count, where)
    overhead_top: list = field(default_factory=list)  # (overhead seconds, phase, op, count): what is not FLOP time
    tokens: int = 0
    flops_per_token: float = 0.0
    by_kind: dict = field(default_factory=dict)  # "gemm"/"attention"/"memory" -> seconds

    @property
    def step_time(self) -> float:
        return sum(self.phases.values())

    @property
    def tokens_per_second(self) -> float:
        return self.world * self.tokens / self.step_time

    @property
    def mfu(self) -> float:
        peak = self.card.peak_flops.get("bf16") or max(self.card.peak_flops.values())
        return self.tokens_per_second * self.flops_per_token / (self.world * peak)

    @property
    def overhead(self) -> float:
        return self.step_time - self.useful


def _phase_sums(records, card):
    phases, useful, launches, kinds = defaultdict(float), 0.0, 0, defaultdict(float)
    groups = defaultdict(lambda: [0.0, 0, 0])
    overheads = defaultdict(lambda: [0.0, 0])
    for rec in records:
        t = price(rec.cost, card)
        phases[rec.phase] += t.total
        kinds[rec.cost.kind] += t.total
        launches += rec.cost.launches
        flop_time = t.compute if rec.cost.kind in (GEMM, ATTENTION) and rec.phase in USEFUL_PHASES else 0.0
        useful += flop_time
        g = groups[(rec.phase, rec.cost.op, rec.cost.shape, rec.where)]
        g[0] += t.total
        g[1] += rec.cost.launches
        g[2] += 1
        o = overheads[(rec.phase, rec.cost.op)]
        o[0] += t.total - flop_time
        o[1] += 1
    return phases, useful, launches, kinds, groups, overheads


def predict(trace: StepTrace, card: DeviceCard | None = None, world: int = 1, top: int = 12) -> Prediction:
    """Prices `trace` on `card` (default: the card it was traced for) for `world` DDP ranks."""
    card = card or trace.card
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be an int >= 1, got {world!r}")
    if trace.splits_over_ranks and trace.world != world:
        raise ValueError(f"this trace is of {trace.world} rank(s), and its optimizer shares its work over the ranks: "
                         f"trace with world={world} to price {world} GPUs")
    phases, useful, launches, kinds, groups, overheads = _phase_sums(trace.records, card)
    syncs = trace.syncs
    phases = {p: phases.get(p, 0.0) for p in PHASES}
    phases["optimizer"] += syncs * card.sync
    pred = Prediction(card, world, phases, useful, launches, syncs, tokens=trace.tokens,
                      flops_per_token=trace.model_flops_per_token, by_kind=dict(kinds))
    if trace.root_records:  # Shampoo: what a root step adds over a steady one, every `frequency` steps
        root_phases, _, root_launches, _, _, _ = _phase_sums(trace.root_records, card)
        steady_optimizer = sum(price(r.cost, card).total for r in trace.records if r.phase == "optimizer")
        # Under DDP the trace is rank 0's: it roots its share of the blocks (no fewer than any
        # other rank's), and its collectives are in the records.
        extra = root_phases["optimizer"] + trace.root_syncs * card.sync - steady_optimizer - syncs * card.sync
        pred.root_extra = max(0.0, extra)
        pred.root_launches = root_launches
        pred.root_syncs = trace.root_syncs
        pred.frequency = trace.cfg.precondition_frequency
        pred.phases["optimizer"] += pred.root_extra / pred.frequency
    if world > 1:
        buckets = ddp_buckets(trace.grad_elements)
        times = [ring_all_reduce(b, world, card) for b in buckets]
        pred.comm_total = sum(times)
        # Buckets all-reduce while the backward goes on; the last one (and what the backward
        # cannot cover) is exposed.
        pred.phases["communication"] = max(times[-1] if times else 0.0, pred.comm_total - phases["backward"])
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    pred.top = [(t, n, phase, op, shape, count, where) for (phase, op, shape, where), (t, n, count) in ranked]
    ranked = sorted(overheads.items(), key=lambda kv: -kv[1][0])[:top]
    pred.overhead_top = [(t, phase, op, count) for (phase, op), (t, count) in ranked]
    return pred


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms" if seconds < 100 else f"{seconds:,.1f} s"


def format_prediction(pred: Prediction, trace: StepTrace) -> str:
    """The report `matta cost` prints: every number labelled predicted."""
    cfg, card = trace.cfg, pred.card
    lines = [
        f"matta cost: PREDICTED by a traced cost model (not measured) for {card.name}"
        f"{f' x {pred.world} (DDP)' if pred.world > 1 else ''}",
        f"  step: model {cfg.model}, mode {cfg.mode}, optimizer {cfg.optimizer}, {trace.amp_dtype}, vocabulary "
        f"{trace.vocab_size}, {cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum} micro-step(s) per process",
        f"  card: e_c {card.e_c:g}, e_attn {card.e_attn:g}, e_m {card.e_m:g}, launch {card.launch * 1e6:g} us, "
        f"host sync {card.sync * 1e6:g} us" + (f", e_net {card.e_net:g}" if pred.world > 1 else "")
        + f" ({card.source})",
        f"  traced in {trace.seconds:.1f} s ({len(trace.records)} priced ops)",
        "",
        "  predicted time per step:",
    ]
    total = pred.step_time
    for phase in PHASES:
        t = pred.phases[phase]
        if phase in ("communication", "other") and t == 0:
            continue
        note = ""
        if phase == "optimizer" and pred.root_extra:
            note = f"  (steady step + root step's {_ms(pred.root_extra)} / {pred.frequency})"
        if phase == "communication":
            note = f"  (exposed; all-reduce {_ms(pred.comm_total)} in all)"
        lines.append(f"    {phase:<14} {_ms(t):>12}  {100 * t / total:5.1f}%{note}")
    lines += [
        f"    {'total':<14} {_ms(total):>12}",
        "",
        f"  predicted tokens/s: {pred.tokens_per_second:,.0f}   predicted MFU: {100 * pred.mfu:.1f}% "
        f"({pred.flops_per_token / 1e9:.2f} GFLOP per token, 6N + attention)",
        f"  launches per step: {pred.launches:,}" + (f" (a root step: {pred.root_launches:,} in its optimizer)"
                                                       if pred.root_launches else ""),
        f"  host syncs per step: {pred.syncs}" + (f" (a root step: {pred.root_syncs})" if trace.root_records else ""),
        f"  predicted overhead (all but GEMM and attention FLOP time): {_ms(pred.overhead)} = "
        f"{100 * pred.overhead / total:.1f}% of the step",
        "",
        "  ops that cost most (predicted):",
        f"    {'ms':>9} {'launches':>8}  {'phase':<9} op [shape] x count",
    ]
    for t, n, phase, op, shape, count, where in pred.top:
        lines.append(f"    {t * 1e3:9.3f} {n:8d}  {phase:<9} {op} [{shape}] x {count}" + (f"  {where}" if where else ""))
    lines += ["", "  what the overhead is made of (predicted; a root step's extra and communication not included):",
              f"    {'ms':>9} {'share':>6}  {'phase':<9} op x count"]
    for t, phase, op, count in pred.overhead_top:
        lines.append(f"    {t * 1e3:9.3f} {100 * t / total:5.1f}%  {phase:<9} {op} x {count}")
    return "\n".join(lines)


def summary(pred: Prediction) -> dict:
    """The prediction as plain numbers (for JSON and for gpu_check.sh)."""
    return {
        "card": pred.card.name, "world": pred.world, "step_s": pred.step_time,
        "phases_s": dict(pred.phases), "tokens_per_s": pred.tokens_per_second, "mfu": pred.mfu,
        "launches": pred.launches, "host_syncs": pred.syncs, "overhead_fraction": pred.overhead / pred.step_time,
        "root_step_extra_s": pred.root_extra, "predicted": True,
    }

