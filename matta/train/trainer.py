"""The MatTA training loop (paper Algorithm 1), in the spirit of nanoGPT's train.py.

`Run(cfg).train()` does, in order: set up (device and process group, the task's data, the
model, the objective, the parallel engine, the optimizer, the schedule, maybe a Teacher,
maybe a checkpoint to resume), the loop (per step: learning rate and distillation ramp,
micro-batches through the objective, gradients averaged across ranks by the engine,
clipping, optimizer step; logging, evaluation and checkpoints at their intervals), and the
final evaluation of the Student, the TA and the wide-narrow-wide family, printed as a table
and drawn into RUN_DIR/report.png. What the run learns and how it is scored is its task's
(tasks.py); the run folder is run_dir.py's; a baseline run beside it is baseline.py's.

A step never waits on the host: the losses, the gradient norm and the step's value checks
(a DeferredReport) stay on the device and are read once per log interval (and before
evaluations and checkpoints).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import torch

from ..extraction import extracted_models
from ..ops import DeferredReport
from . import parallel
from .batches import StepBatches
from .checkpoint import (CheckpointError, check_fits, latest_checkpoint, load_checkpoint, remove_dead_writes,
                         run_identity, save_checkpoint)
from .config import TrainConfig, check_threads
from .context import Context, check_memory, default_threads
from .objective import Objective, criterion_for
from .optimizers import build_optimizer
from .progress import Progress
from .report import describe, format_table, make_report
from .run_dir import (RunDirLock, append_metrics, build_model, keep_metrics_until, load_teacher, model_info,
                      read_config, start_metrics, write_results, write_run_files)
from .schedule import Schedule
from .tasks import task_for

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
LOSS_KEYS = ("loss", "loss_student", "loss_ta", "loss_distill")


def total_steps(cfg: TrainConfig, world: int) -> int:
    if cfg.tokens is not None:
        per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
        return max(1, -(-cfg.tokens // per_step))
    return cfg.steps


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def settled_threads(cfg: TrainConfig, recorded: int | None) -> int:
    """The CPU thread count: as given, else the one the run recorded (on --resume), else the
    default. A count other than the recorded one changes rounding, so a resumed run would
    not end where an uninterrupted one does: that is warned about."""
    threads = cfg.threads or recorded or default_threads()
    check_threads(threads, "--threads" if cfg.threads else "the run's recorded threads" if recorded
                  else "$OMP_NUM_THREADS")
    if recorded is not None and threads != recorded:
        warnings.warn(f"--threads {threads} differs from the {recorded} thread(s) this run started with: "
                      "it will not end bit-identical to an uninterrupted run", stacklevel=3)
    return threads


class Run:
    """One training run; `Run(cfg).train()` is what `matta train` calls for each run."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, log=print):
        self.cfg = cfg
        self.resume = resume
        self.ctx = Context(cfg)
        self.task = task_for(cfg)
        self.log = log if self.ctx.master else (lambda *a, **k: None)
        self.run_dir = Path(cfg.out)
        self._lock = None

    # -- set-up ---------------------------------------------------------------------------

    def setup(self):
        ctx, task = self.ctx, self.task
        if ctx.master and self._lock is None:
            self._lock = RunDirLock(self.run_dir).__enter__()
            remove_dead_writes(self.run_dir)  # temp folders of killed checkpoint writes
        ckpt_path = latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and ckpt_path is None:
            raise CheckpointError(f"--resume: {self.run_dir} has no checkpoint yet; drop --resume to start a new run")
        recorded = read_config(self.run_dir).threads if self.resume else None
        torch.set_num_threads(threads := settled_threads(self.cfg, recorded))
        self.data = task.load_data(self.cfg)
        self.cfg = cfg = task.configure(dataclasses.replace(self.cfg, threads=threads), self.data)
        vocab = self.data.vocab_size
        with torch.device("meta"):  # shapes only: nothing is allocated
            check_memory(cfg, build_model(cfg, vocab), ctx)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg, vocab).to(ctx.device)
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # but each rank its own dropout masks

        self.report = DeferredReport()  # the step's value checks, read at log steps
        criterion = criterion_for(cfg, self.report)
        if "ta" not in criterion.streams:  # nothing reaches the TA-only layers: no gradient to wait for
            for p in self.model.ta_only_parameters():
                p.requires_grad_(False)
        self.objective = Objective(task, self.model, criterion)
        self.engine = parallel.wrap(self.objective, ctx, cfg)
        if cfg.compile:
            self.model.compile()
        self.optimizer = build_optimizer(cfg, self.model, self.report)
        self.max_steps = total_steps(cfg, ctx.world)
        self.schedule = Schedule(cfg, self.max_steps, self.optimizer, criterion)
        # A Teacher predicts the rows of the Student's head (a transformers head may have more than the tokenizer's ids).
        self.teacher = load_teacher(cfg.teacher, self.model.lm_head_weight.shape[0], ctx.device) if cfg.teacher else None
        self.identity = run_identity(cfg.optimizer, model_info(self.model, vocab))
        self.step = 0
        if ckpt_path is not None:
            check_fits(ckpt_path, identity=self.identity, model_state=self.model.state_dict(), max_steps=self.max_steps)
            self._restore(ckpt_path)
        elif ctx.master:
            start_metrics(self.run_dir)
        if ctx.master:
            write_run_files(self.run_dir, cfg, self.model, vocab, self.data.tokenizer)
        self.val = task.validation(self.data, cfg)
        self.batches = StepBatches(self.data.train, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                   rank=ctx.rank, world=ctx.world, device=ctx.device)
        self._all_finite = torch.ones((), dtype=torch.bool, device=ctx.device)

    def _restore(self, path: Path):
        ckpt = load_checkpoint(path)
        try:
            parallel.load_model_state(self.engine, self.objective, ckpt["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"checkpoint {path} does not fit the model ({first[1].strip() if len(first) > 1 else first[0]}); "
                "resume with the run's own model settings (drop the model flags) or start a new --out"
            ) from None
        try:
            parallel.load_optimizer_state(self.engine, self.objective, self.optimizer, ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} has optimizer state that does not fit --optimizer {self.cfg.optimizer} ({exc}); "
                "resume with the run's own --optimizer"
            ) from None
        self.step = ckpt["step"]
        states = ckpt["state"].get("rng")  # one per rank of the run that wrote it
        if not isinstance(states, list):
            raise CheckpointError(f"checkpoint {path} was written by an older matta and cannot be resumed exactly; "
                                  "start a new run (--overwrite) or use the older matta to finish it")
        if len(states) != self.ctx.world:
            warnings.warn(f"{path} was written by {len(states)} process(es), this run has {self.ctx.world}: "
                          "it continues, but not bit-identical to an uninterrupted run", stacklevel=2)
        self.ctx.set_rng_state(states[self.ctx.rank % len(states)])
        if self.ctx.master:  # drop what the interrupted run logged after its checkpoint
            keep_metrics_until(self.run_dir, self.step)
        self.log(f"matta: resumed from {path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step. Returns its record with the losses and the gradient norm still
        on the device (`read_record` brings them to the host)."""
        cfg = self.cfg
        lr, ramp = self.schedule.apply(self.step)
        losses = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=self.ctx.device)
        batches = self.batches.take(self.step)
        for micro, (x, y) in enumerate(batches):
            with parallel.gradient_sync(self.engine, sync=micro == len(batches) - 1):
                with self.ctx.autocast():
                    out = self.engine(x, y, teacher=self.teacher)
                (out.loss / cfg.grad_accum).backward()
            losses += torch.stack([out.loss, out.student, out.ta, out.distill]).detach().double() / cfg.grad_accum
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = parallel.local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.step < self.max_steps:
            self.batches.prefetch(self.step)
        self._all_finite &= torch.isfinite(losses).all()
        return {"step": self.step, "lr": lr, "ramp": ramp, "losses": losses, "grad_norm": grad_norm}

    def read_record(self, rec: dict) -> dict:
        """The step record with plain numbers: one host read (and one all-reduce across ranks).
        Raises FloatingPointError if a value check of a step since the last read failed
        (naming it: a bad loss input, whose loss and gradients were NaN; Shampoo's NaN/inf
        gradients, whose steps it skipped, or roots failing again and again), or if any
        loss since the start was NaN or inf."""
        device = self.ctx.device
        norm = rec["grad_norm"]
        checks = [torch.zeros(1, dtype=torch.float64, device=device) if norm is None else norm.reshape(1).double(),
                  self._all_finite.reshape(1).double(), self.report.any_failed(device).reshape(1).double()]
        values = self.ctx.mean_over_ranks(torch.cat([rec["losses"], *checks])).tolist()
        grad_norm, finite, check_failed = values[len(LOSS_KEYS):]
        if check_failed > 0:
            self.report.check(FloatingPointError, f"a check of the training step failed by step {rec['step']}: ")
            raise FloatingPointError(f"a check of the training step failed on another rank by step {rec['step']}; "
                                     "its log names it")
        self.report.clear()  # nothing failed: drop the checks read
        if finite < 1.0:
            raise FloatingPointError(
                f"the loss became NaN or inf by step {rec['step']}; lower --lr or raise --warmup-steps"
            )
        if values[-2] < 1.0 and report is not None:
            report.check(FloatingPointError, prefix=f"by step {rec['step']}: ")
        out = {"step": rec["step"], "lr": rec["lr"], "ramp": rec["ramp"], **dict(zip(LOSS_KEYS, values))}
        out["grad_norm"] = None if norm is None else grad_norm
        return out

    # -- bookkeeping --------------------------------------------------------------------------

    def _record(self, rec: dict):
        if self.ctx.master:
            append_metrics(self.run_dir, rec)

    def whole_model(self):
        """The nested model with whole weights on rank 0 (None elsewhere); a collective under FSDP."""
        model = parallel.whole_model(self.engine, self.objective, lambda: build_model(self.cfg, self.data.vocab_size),
                                     self.ctx.device)
        return model if self.ctx.master else None

    def _scoring(self) -> dict:
        return dict(device=self.ctx.device, batch_size=max(1, min(self.cfg.batch_size, 64)),
                    autocast_dtype=self.ctx.amp_dtype)

    def save(self):
        """Writes a checkpoint: the whole model and optimizer state, the step (which fixes the
        data position and the schedules) and every rank's random state. Every rank calls it."""
        model_state, optimizer_state = parallel.full_state(self.engine, self.objective, self.optimizer)
        rng = self.ctx.gather(self.ctx.rng_state())
        if self.ctx.master:
            save_checkpoint(self.run_dir, self.step, model_state, optimizer_state, {"rng": rng},
                            keep=max(1, self.cfg.keep_checkpoints), identity=self.identity)

    def train(self, report: bool = True) -> dict:
        """Trains to the last step, then evaluates and (with `report`) prints the table and draws
        report.png; returns the results (empty on ranks other than 0)."""
        try:
            return self._train(report)
        finally:
            self.close()

    def close(self):
        """Lets go of the run folder (its lock); `train` does this itself."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _train(self, report: bool) -> dict:
        self.setup()
        cfg, ctx, task = self.cfg, self.ctx, self.task
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * ctx.world
        flops_per_token = self.model.flops_per_token(cfg.block_size, self.objective.criterion.streams)
        peak = peak_flops(ctx.device)
        self.log(f"matta: data: {self.data.description}")
        student, ta = self.model.stream_shape("student"), self.model.stream_shape("ta")
        self.log(
            f"matta: model {cfg.model}: Student {student.matmul_parameters / 1e6:.2f}M, TA {ta.matmul_parameters / 1e6:.2f}M "
            f"parameters (non-embedding + head); mode {cfg.mode}, optimizer {cfg.optimizer}, device {ctx.device}"
            f"{'' if ctx.device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}, "
            f"{ctx.world} process(es){f' ({cfg.parallel})' if ctx.world > 1 else ''}, "
            f"{self.max_steps} steps of {tokens_per_step} tokens"
        )
        progress = Progress(self.max_steps, self.step, cfg.progress and ctx.master, self.log)
        t_last, steps_since = time.perf_counter(), 0
        try:
            while self.step < self.max_steps:
                rec = self.train_step()
                steps_since += 1
                progress.advance()
                last = self.step == self.max_steps
                log_now = self.step % cfg.log_interval == 0 or last or self.step == 1
                eval_now = (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last
                save_now = (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or last
                if not (log_now or eval_now or save_now):
                    continue
                values = self.read_record(rec)  # the one host sync of these steps
                if log_now:
                    tok_s = steps_since * tokens_per_step / max(time.perf_counter() - t_last, 1e-9)
                    mfu = tok_s * flops_per_token / peak if peak else None
                    values.update({"kind": "train", "tokens": self.step * tokens_per_step, "tokens_per_s": tok_s,
                                   "mfu": mfu})
                    self._record(values)
                    progress.show(values)
                model = self.whole_model() if eval_now else None
                if model is not None:
                    scores = task.evaluate_nested(model, self.val, **self._scoring())
                    self._record({"kind": "eval", "step": self.step, **scores})
                    shown = {s: f"{'Student' if s == 'student' else 'TA'} {scores[f'{task.eval_key}_{s}']:.4f}"
                             for s in self.objective.criterion.streams}
                    progress.write(f"step {self.step}: {task.eval_label} " + ", ".join(shown.values()))
                if save_now:
                    self.save()
                if log_now:  # tokens/s counts training only, not evaluations or checkpoints
                    t_last, steps_since = time.perf_counter(), 0
        finally:
            progress.close()
        nested = self.whole_model()  # a collective under FSDP, so before the group closes
        self.engine = self.objective  # drop DDP's hold on the process group before it closes
        self.ctx.close()
        if nested is None:
            return {}
        results = self.final_evaluation(nested)
        if report:
            self.report_results(results)
        return results

    # -- the end ---------------------------------------------------------------------------------

    def final_evaluation(self, nested) -> dict:
        """Rank 0: the models cut out of `nested` (the Student alone for a Student-only run; else
        the Student, the TA and the family) on the validation set, written to results.json."""
        cfg = self.cfg
        rows = []
        for name, spec, model in extracted_models(nested, family=cfg.family):
            if cfg.mode == "student" and spec != "student":  # the rest of the TA was never trained
                continue
            model.to(self.ctx.device)
            rows.append({"name": name, "spec": spec, "about": describe(spec, cfg.mode, cfg.share_weights),
                         "params": model.num_parameters(non_embedding=True),
                         "total_params": sum(p.numel() for p in model.parameters()),
                         **self.task.score(model, self.val, **self._scoring())})
            model.to("cpu")
        results = {"step": self.step, "models": rows, **self.task.results_fields(self.data, self.val)}
        write_results(self.run_dir, results)
        return results

    def report_results(self, results: dict) -> None:
        """Prints the final table and draws RUN_DIR/report.png."""
        self.log(format_table(results["models"], self.task.columns, title=self.task.table_title(results)))
        path = make_report(self.run_dir)
        self.log(f"matta: wrote {path} (loss curves, size vs quality) and {self.run_dir / 'results.json'}")
