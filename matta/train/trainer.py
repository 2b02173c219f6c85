"""The MatTA training loop (paper Algorithm 1), in the spirit of nanoGPT's train.py.

`train(cfg)` does, in order: set up (distributed, device, data, model, optimizer, maybe a
Teacher, maybe a checkpoint to resume), the loop (per step: learning rate and ramp, micro-
batches of Student + TA forward and the fused MatTA loss, gradient all-reduce across ranks,
clipping, optimizer step; logging, evaluation and checkpoints at their intervals), and the
final evaluation of the Student, the TA and the wide-narrow-wide family, which it prints as
a table and draws into RUN_DIR/report.png.

Run directory:
    config.json      the resolved TrainConfig
    tokenizer.json   the tokenizer (absent for pre-tokenised data without one)
    metrics.jsonl    one JSON record per log step ("train") and per evaluation ("eval")
    checkpoints/     atomic checkpoints (see checkpoint.py), `latest` names the newest
    results.json     final table: per model, parameters, validation loss, perplexity
    report.png       loss curves and the size-vs-quality curve
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import Data, load_data, tokenizer_from_json
from ..evaluation import perplexity, validation_loss
from . import modeling
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, make_config
from .schedule import distill_ramp, learning_rate

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


# ----------------------------------------------------------------------------------------
# Set-up helpers


class Context:
    """Where this process runs: rank, world size, device, autocast dtype."""

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
        else:
            torch.set_num_threads(cpu_threads(cfg.threads))
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

    def all_mean(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def cpu_threads(requested: int) -> int:
    """Threads for CPU math: as asked, else $OMP_NUM_THREADS, else the cores not already busy.

    Tiny GEMMs on cores that other processes keep busy run several times slower with two
    OpenMP threads than with one (measured on a loaded 2-core machine), so a busy machine
    gets fewer threads.
    """
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


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


def check_memory(cfg: TrainConfig, vocab_size: int, ctx: Context) -> None:
    """Refuses a configuration whose rough footprint exceeds the free memory, before building it."""
    _, m, nest = modeling.model_configs(cfg, vocab_size)
    params = modeling.estimate_parameters(cfg, vocab_size)
    state_bytes = params * (4 + 4 + (12 if cfg.optimizer == "shampoo" else 8))
    d = nest.d_model_ta or m.n_embd
    width = nest.ffn_ta or 2 * (getattr(m, "n_inner", None) or m.expansion)
    layers = m.n_layer + nest.extra_layers
    elem = 2 if ctx.amp_dtype is not None else 4
    tokens = cfg.batch_size * cfg.block_size
    # Saved activations per layer and token (~12 d + 2 ffn values), bounded by twice the
    # TA's for the two streams, plus attention scores where SDPA has no fused kernel (CPU).
    act = 2 * tokens * layers * (12 * d + 2 * width) * elem
    if ctx.device.type == "cpu":
        act += 2 * cfg.batch_size * cfg.block_size * cfg.block_size * layers * 4 * 2
    need = state_bytes + act
    have = available_memory(ctx.device)
    if need > 0.9 * have:
        raise ConfigError(
            f"model {cfg.model} with --batch-size {cfg.batch_size} --block-size {cfg.block_size} needs about "
            f"{need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is free on {ctx.device}; use a smaller "
            "--model, --batch-size or --block-size (and --grad-accum to keep the batch)"
        )


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model, ctx: Context):
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        fused = ctx.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    from ..optim import Shampoo, nested_block_splits

    return Shampoo(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        max_preconditioner_dim=cfg.max_preconditioner_dim,
        precondition_frequency=cfg.precondition_frequency,
        start_preconditioning_step=cfg.start_preconditioning_step,
        grafting="adam",
        grafting_beta2=cfg.beta2,
        block_splits=nested_block_splits(model) if cfg.shampoo_nested_blocks else None,
    )


def loss_weights(cfg: TrainConfig) -> tuple[float, float, float]:
    w_s, w_ta, w_d = cfg.loss_weights
    return {"matta": (w_s, w_ta, w_d), "student": (w_s, 0.0, 0.0), "ta": (0.0, w_ta, 0.0)}[cfg.mode]


def total_steps(cfg: TrainConfig, world: int) -> int:
    if cfg.tokens is not None:
        per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
        return max(1, math.ceil(cfg.tokens / per_step))
    return cfg.steps


def flops_per_token(model, cfg: TrainConfig) -> float:
    """Training FLOPs per token counted over the streams the mode trains (6 N + attention)."""
    counts = modeling.stream_sizes(model)
    streams = {"matta": ("student", "ta"), "student": ("student",), "ta": ("ta",)}[cfg.mode]
    total = 0.0
    for s in streams:
        n_params, n_layer, width = counts[s]
        total += 6 * n_params + 12 * n_layer * width * cfg.block_size
    return total


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------
# The run


class Run:
    """One training run; `Run(cfg).train()` is what `matta train` calls."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, log=print):
        self.cfg = cfg
        self.resume = resume
        self.ctx = Context(cfg)
        self.log = log if self.ctx.master else (lambda *a, **k: None)
        self.run_dir = Path(cfg.out)

    # -- set-up ---------------------------------------------------------------------------

    def setup(self):
        cfg, ctx = self.cfg, self.ctx
        ckpt_path = latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and ckpt_path is None:
            raise CheckpointError(f"--resume: {self.run_dir} has no checkpoint yet; drop --resume to start a new run")
        self.data: Data = load_data(
            cfg.data,
            block_size=cfg.block_size,
            seed=cfg.seed,
            tokenizer=cfg.tokenizer,
            vocab_size=cfg.vocab_size,
            val_fraction=cfg.val_fraction,
            bin_dtype=cfg.bin_dtype,
        )
        check_memory(cfg, self.data.vocab_size, ctx)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = modeling.build_model(cfg, self.data.vocab_size).to(ctx.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(cfg, self.model, ctx)
        self.teacher = modeling.load_teacher(cfg.teacher, self.data.vocab_size, ctx.device) if cfg.teacher else None
        self.max_steps = total_steps(cfg, ctx.world)
        self.step = 0
        if ckpt_path is not None:
            self._restore(ckpt_path)
        elif ctx.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").write_text("")
        if ctx.master:
            _write_json_atomic(self.run_dir / "config.json", json.loads(cfg.to_json()))
            if self.data.tokenizer is not None:
                (self.run_dir / "tokenizer.json").write_text(self.data.tokenizer.to_json())
            modeling.save_model_info(self.run_dir, self.model, self.data.vocab_size)
        self.val = self.data.val_blocks(cfg.eval_tokens or None)
        self.flops_per_token = flops_per_token(self.model, cfg)
        self.peak = peak_flops(ctx.device)

    def _restore(self, path: Path):
        ckpt = load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"checkpoint {path} does not fit the model ({first[1].strip() if len(first) > 1 else first[0]}); "
                "resume with the run's own model settings (drop the model flags) or start a new --out"
            ) from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} has optimizer state that does not fit --optimizer {self.cfg.optimizer} ({exc}); "
                "resume with the run's own --optimizer"
            ) from None
        state = ckpt["state"]
        self.step = int(state["step"])
        _set_rng_state(state["rng"], self.ctx.device)
        if self.ctx.master:  # drop records written after the checkpoint by the interrupted run
            metrics = self.run_dir / "metrics.jsonl"
            kept = []
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    if line.strip() and json.loads(line)["step"] <= self.step:
                        kept.append(line)
            metrics.write_text("".join(k + "\n" for k in kept))
        self.log(f"matta: resumed from {path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------

    def _micro_step(self, x, y, ramp: float, scale: float):
        cfg = self.cfg
        with self.ctx.autocast():
            out = modeling.matta_loss(
                self.forward, self.model, x, y,
                weights=loss_weights(cfg), ramp=ramp, temperature=cfg.temperature,
                mode=cfg.mode, teacher=self.teacher,
            )
        (out.loss * scale).backward()
        return [out.loss.item(), out.student.item(), out.ta.item(), out.distill.item()]

    def _sync_gradients(self):
        if self.ctx.world == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.ctx.world
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def train_step(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        step = self.step
        lr = learning_rate(step, lr=cfg.lr, min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
                           warmup_steps=cfg.warmup_steps, max_steps=self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ramp = distill_ramp(step, start=cfg.rampup_start, steps=cfg.rampup_steps, shape=cfg.rampup)
        sums = [0.0] * 4
        for micro in range(cfg.grad_accum):
            # Step `step` reads one global batch, split over ranks and then micro-batches, so
            # the batch of a step does not depend on how it is divided.
            part, parts = ctx.rank * cfg.grad_accum + micro, ctx.world * cfg.grad_accum
            x, y = self.data.train.batch(step, cfg.batch_size, part, parts)
            parts = self._micro_step(x.to(ctx.device), y.to(ctx.device), ramp, 1.0 / cfg.grad_accum)
            sums = [a + b / cfg.grad_accum for a, b in zip(sums, parts)]
        self._sync_gradients()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss, l_s, l_ta, l_d = ctx.all_mean(sums)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss} at step {step}; lower --lr or raise --warmup-steps"
            )
        return {"step": self.step, "lr": lr, "ramp": ramp, "loss": loss, "loss_student": l_s,
                "loss_ta": l_ta, "loss_distill": l_d, "grad_norm": grad_norm}

    # -- bookkeeping --------------------------------------------------------------------------

    def _record(self, rec: dict):
        if self.ctx.master:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def evaluate_nested(self) -> tuple[float, float]:
        batch = max(1, min(self.cfg.batch_size, 64))
        ls, lt = validation_loss(
            self.model, self.val, batch_size=batch, device=self.ctx.device,
            output="all", autocast_dtype=self.ctx.amp_dtype,
        )
        return ls, lt

    def save(self):
        if not self.ctx.master:
            return
        state = {"step": self.step, "data_index": self.step, "rng": _rng_state(self.ctx.device),
                 "max_steps": self.max_steps}
        save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.optimizer.state_dict(), state,
                        keep=max(1, self.cfg.keep_checkpoints))

    def train(self) -> dict:
        """Trains to the last step, then evaluates and reports; returns the results."""
        self.setup()
        cfg, ctx = self.cfg, self.ctx
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * ctx.world
        self.log(f"matta: data: {self.data.description}")
        sizes = modeling.stream_sizes(self.model)
        self.log(
            f"matta: model {cfg.model}: Student {sizes['student'][0] / 1e6:.2f}M, TA {sizes['ta'][0] / 1e6:.2f}M "
            f"parameters (non-embedding + head); mode {cfg.mode}, optimizer {cfg.optimizer}, device {ctx.device}"
            f"{'' if ctx.device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}, "
            f"{ctx.world} process(es), {self.max_steps} steps of {tokens_per_step} tokens"
        )
        from tqdm.auto import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (cfg.progress and ctx.master),
                   dynamic_ncols=True, file=sys.stderr, desc="train")
        t_last, tokens_since = time.perf_counter(), 0
        try:
            while self.step < self.max_steps:
                rec = self.train_step()
                tokens_since += tokens_per_step
                now = time.perf_counter()
                tok_s = tokens_since / max(now - t_last, 1e-9)
                mfu = tok_s * self.flops_per_token / self.peak if self.peak else None
                postfix = {"L_S": f"{rec['loss_student']:.3f}", "L_TA": f"{rec['loss_ta']:.3f}",
                           "L_D": f"{rec['loss_distill']:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    postfix["MFU"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                last = self.step == self.max_steps
                if self.step % cfg.log_interval == 0 or last or self.step == 1:
                    rec.update({"kind": "train", "tokens": self.step * tokens_per_step, "tokens_per_s": tok_s, "mfu": mfu})
                    self._record(rec)
                    t_last, tokens_since = time.perf_counter(), 0
                if ctx.master and ((cfg.eval_interval and self.step % cfg.eval_interval == 0) or last):
                    ls, lt = self.evaluate_nested()
                    self._record({"kind": "eval", "step": self.step, "val_student": ls, "val_ta": lt})
                    bar.write(f"step {self.step}: val loss Student {ls:.4f}, TA {lt:.4f}")
                if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or last:
                    self.save()
        finally:
            bar.close()
        results = self.final_evaluation()
        self.ctx.close()
        return results

    # -- the end ---------------------------------------------------------------------------------

    def final_evaluation(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        if not ctx.master:
            return {}
        rows = []
        batch = max(1, min(cfg.batch_size, 64))
        for name, spec, model in modeling.extracted_models(self.model, family=cfg.family):
            model.to(ctx.device)
            loss = validation_loss(model, self.val, batch_size=batch, device=ctx.device, autocast_dtype=ctx.amp_dtype)
            rows.append({"name": name, "spec": spec, "params": modeling.non_embedding_parameters(model),
                         "total_params": sum(p.numel() for p in model.parameters()),
                         "val_loss": loss, "perplexity": perplexity(loss)})
            model.to("cpu")
        results = {"step": self.step, "val_tokens": int(self.val[:, 1:].numel()), "models": rows}
        _write_json_atomic(self.run_dir / "results.json", results)
        self.log(format_table(rows, title=f"validation ({results['val_tokens']:,} tokens) after {self.step} steps"))
        from ..report import make_report

        path = make_report(self.run_dir)
        self.log(f"matta: wrote {path} (loss curves, size vs quality) and {self.run_dir / 'results.json'}")
        return results


def format_table(rows: list[dict], title: str = "") -> str:
    """The final table: model, parameters (non-embedding), validation loss, perplexity."""
    head = ("model", "params (non-emb)", "val loss", "perplexity")
    lines = [[r["name"], f"{r['params'] / 1e6:.3f}M", f"{r['val_loss']:.4f}", f"{r['perplexity']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    rule = "-" * len(fmt(head))
    out = ([title] if title else []) + [fmt(head), rule] + [fmt(l) for l in lines]
    return "\n".join(out)


def load_run(run_dir, device="cpu"):
    """(config, model with the latest checkpoint's weights, tokenizer) of a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a matta run directory (no config.json); pass the --out of `matta train`")
    try:
        cfg = make_config({k: tuple(v) if k == "loss_weights" else v for k, v in json.loads(cfg_path.read_text()).items()})
    except (json.JSONDecodeError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{cfg_path} is unreadable ({exc}); rerun `matta train` for this run") from None
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint; train it first (`matta train --out {run_dir}`)")
    ckpt = load_checkpoint(ckpt_path)
    tok_path = run_dir / "tokenizer.json"
    tokenizer = tokenizer_from_json(tok_path.read_text()) if tok_path.is_file() else None
    try:
        vocab = int(json.loads((run_dir / "model.json").read_text())["vocab_size"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError):
        raise CheckpointError(f"{run_dir / 'model.json'} is missing or unreadable; the run directory is incomplete") from None
    model = modeling.build_model(cfg, vocab)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit the model in {cfg_path}; the run directory is mixed up") from None
    return cfg, model.to(device).eval(), tokenizer
