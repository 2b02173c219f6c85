"""The MatTA training loop (paper Algorithm 1), in the spirit of nanoGPT's train.py.

`Run(cfg).train()` does, in order: set up (device and process group, data, model, the
objective from `MatTALoss`, the parallel engine, optimizer, maybe a Teacher, maybe a
checkpoint to resume), the loop (per step: learning rate, micro-batches of the streams and
the fused MatTA loss, gradients averaged across ranks by the engine, clipping, optimizer
step; logging, evaluation and checkpoints at their intervals), and the final evaluation of
the Student, the TA and the wide-narrow-wide family, printed as a table and drawn into
RUN_DIR/report.png.

A step never waits on the host: the losses and the gradient norm stay on the device and
are read once per log interval (and before evaluations and checkpoints).

Run directory (see also matta/runs.py):
    config.json      the resolved TrainConfig (with the CPU thread count used)
    model.json       what rebuilds the model
    tokenizer.json   the tokenizer (absent for pre-tokenised data without one)
    metrics.jsonl    one JSON record per log step ("train") and per evaluation ("eval")
    checkpoints/     atomic checkpoints (see checkpoint.py), `latest` names the newest
    results.json     final table: per model, parameters, validation loss, perplexity
    report.png       loss curves and the size-vs-quality curve
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import runs
from .._atomic import write_json_atomic, write_text_atomic
from ..classification import ClassificationData, RelevanceTask, evaluate_classifier
from ..data import Data, load_data
from ..extraction import extracted_models
from ..losses import check_loss_inputs
from ..report import make_report
from ..scoring import perplexity, validation_loss
from . import parallel
from .batches import StepBatches
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .context import Context, available_memory, default_threads
from .objective import ClassifierObjective, LMObjective, criterion_for
from .progress import Progress
from .schedule import learning_rate

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
LOSS_KEYS = ("loss", "loss_student", "loss_ta", "loss_distill")


# ----------------------------------------------------------------------------------------
# Set-up helpers


def check_memory(cfg: TrainConfig, vocab_size: int, ctx: Context) -> None:
    """Refuses a configuration whose rough footprint exceeds the free memory, before building it."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = runs.build_model(cfg, vocab_size)
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


def build_optimizer(cfg: TrainConfig, model):
    groups = model.optimizer_groups(cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # The fused kernel keeps its step counts on the device: no host read per step.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
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


def total_steps(cfg: TrainConfig, world: int) -> int:
    if cfg.tokens is not None:
        per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
        return max(1, math.ceil(cfg.tokens / per_step))
    return cfg.steps


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
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

    def _settle_threads(self) -> None:
        """The CPU thread count: as given, else the one the run recorded (on --resume), else
        the default; then recorded in the config. A count that differs from the recorded one
        changes rounding, so the resumed run would not end where an uninterrupted one does."""
        recorded = runs.read_config(self.run_dir).threads if self.resume else None
        threads = self.cfg.threads or recorded or default_threads()
        if recorded is not None and threads != recorded:
            warnings.warn(f"--threads {threads} differs from the {recorded} thread(s) this run started with: "
                          "it will not end bit-identical to an uninterrupted run", stacklevel=2)
        torch.set_num_threads(threads)
        self.cfg = dataclasses.replace(self.cfg, threads=threads)

    def setup(self):
        ctx = self.ctx
        ckpt_path = latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and ckpt_path is None:
            raise CheckpointError(f"--resume: {self.run_dir} has no checkpoint yet; drop --resume to start a new run")
        self._settle_threads()
        cfg = self.cfg
        if cfg.task == "classify":
            self.data = ClassificationData(RelevanceTask(), cfg.seed)
            cfg = self.cfg = dataclasses.replace(cfg, block_size=self.data.block_size)  # the task's length
        else:
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
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = runs.build_model(cfg, self.data.vocab_size).to(ctx.device)
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # but each rank its own dropout masks
        criterion = criterion_for(cfg.mode, cfg.loss_weights, rampup_steps=cfg.rampup_steps,
                                  rampup_start=cfg.rampup_start, rampup=cfg.rampup, temperature=cfg.temperature)
        if "ta" not in criterion.streams:  # nothing reaches the TA-only layers: no gradient to wait for
            for p in self.model.ta_only_parameters():
                p.requires_grad_(False)
        objective = ClassifierObjective if cfg.task == "classify" else LMObjective
        self.objective = objective(self.model, criterion)
        self.engine = parallel.wrap(self.objective, ctx, cfg)
        if cfg.compile:
            self.model.compile()
        self.optimizer = build_optimizer(cfg, self.model)
        self.teacher = runs.load_teacher(cfg.teacher, self.data.vocab_size, ctx.device) if cfg.teacher else None
        self.max_steps = total_steps(cfg, ctx.world)
        self.step = 0
        if ckpt_path is not None:
            self._restore(ckpt_path)
        elif ctx.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").write_text("")
        if ctx.master:
            write_json_atomic(self.run_dir / "config.json", json.loads(cfg.to_json()))
            if self.data.tokenizer is not None:
                write_text_atomic(self.run_dir / "tokenizer.json", self.data.tokenizer.to_json())
            runs.write_model_info(self.run_dir, self.model, self.data.vocab_size)
        self.val = self.data.validation if cfg.task == "classify" else self.data.val_blocks(cfg.eval_tokens or None)
        self.flops_per_token = self.model.flops_per_token(cfg.block_size, criterion.streams)
        self.peak = peak_flops(ctx.device)
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
        _set_rng_state(states[self.ctx.rank % len(states)], self.ctx.device)
        if self.ctx.master:  # drop records written after the checkpoint by the interrupted run
            metrics = self.run_dir / "metrics.jsonl"
            kept = []
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    if line.strip() and json.loads(line)["step"] <= self.step:
                        kept.append(line)
            write_text_atomic(metrics, "".join(k + "\n" for k in kept))
        self.log(f"matta: resumed from {path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step. Returns its record with the losses and the gradient norm still
        on the device (`read_record` brings them to the host)."""
        cfg = self.cfg
        step = self.step
        lr = learning_rate(step, lr=cfg.lr, min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
                           warmup_steps=cfg.warmup_steps, max_steps=self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=self.ctx.device)
        batches = self.batches.take(step)
        for micro, (x, y) in enumerate(batches):
            with parallel.gradient_sync(self.engine, sync=micro == len(batches) - 1):
                with self.ctx.autocast():
                    out = self.engine(x, y, step, teacher=self.teacher)
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
        return {"step": self.step, "lr": lr, "ramp": out.ramp, "losses": losses, "grad_norm": grad_norm}

    def read_record(self, rec: dict) -> dict:
        """The step record with plain numbers: one host read (and one all-reduce across ranks).
        Raises FloatingPointError if any loss since the start was NaN or inf, or if the
        optimizer's report (Shampoo's: NaN/inf gradients, roots failing again and again) holds
        a failed check."""
        norm = rec["grad_norm"]
        report = getattr(self.optimizer, "report", None)  # Shampoo's device-side checks, read here with the rest
        optimizer_ok = torch.ones((), device=self.ctx.device) if report is None else ~report.any_failed(self.ctx.device)
        flags = [torch.zeros(1, dtype=torch.float64, device=self.ctx.device) if norm is None else norm.reshape(1).double(),
                 optimizer_ok.reshape(1).double(), self._all_finite.reshape(1).double()]
        values = self.ctx.mean_over_ranks(torch.cat([rec["losses"], *flags])).tolist()
        if values[-1] < 1.0:
            check_loss_inputs()  # a loss input at fault (NaN, a bad target) is named; else the loss itself overflowed
            raise FloatingPointError(
                f"the loss became NaN or inf by step {rec['step']}; lower --lr or raise --warmup-steps"
            )
        if values[-2] < 1.0 and report is not None:
            report.check(FloatingPointError, prefix=f"by step {rec['step']}: ")
        out = {"step": rec["step"], "lr": rec["lr"], "ramp": rec["ramp"], **dict(zip(LOSS_KEYS, values))}
        out["grad_norm"] = None if norm is None else values[len(LOSS_KEYS)]
        return out

    # -- bookkeeping --------------------------------------------------------------------------

    def _record(self, rec: dict):
        if self.ctx.master:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def whole_model(self):
        """The nested model with whole weights on rank 0 (None elsewhere); a collective under FSDP."""
        model = parallel.whole_model(self.engine, self.objective, lambda: runs.build_model(self.cfg, self.data.vocab_size),
                                     self.ctx.device)
        return model if self.ctx.master else None

    def evaluate_nested(self, model) -> dict:
        """The eval record of the nested model: validation loss of the Student and the TA (for
        a classifier, cross-entropy against the Teacher's soft labels, and AucLoss)."""
        if self.cfg.task == "classify":
            s, ta = (evaluate_classifier(model, self.val, output=i, device=self.ctx.device) for i in (0, 1))
            return {"val_student": s["teacher_loss"], "val_ta": ta["teacher_loss"],
                    "auc_loss_student": s["auc_loss"], "auc_loss_ta": ta["auc_loss"]}
        batch = max(1, min(self.cfg.batch_size, 64))
        ls, lt = validation_loss(
            model, self.val, batch_size=batch, device=self.ctx.device,
            output="all", autocast_dtype=self.ctx.amp_dtype,
        )
        return {"val_student": ls, "val_ta": lt}

    def score(self, model) -> dict:
        """The final table's numbers for one extracted model."""
        if self.cfg.task == "classify":
            out = evaluate_classifier(model, self.val, device=self.ctx.device)
            return {"auc_loss": out["auc_loss"], "auroc": out["auroc"], "val_loss": out["teacher_loss"]}
        batch = max(1, min(self.cfg.batch_size, 64))
        loss = validation_loss(model, self.val, batch_size=batch, device=self.ctx.device, autocast_dtype=self.ctx.amp_dtype)
        return {"val_loss": loss, "perplexity": perplexity(loss)}

    def save(self):
        """Writes a checkpoint: the whole model and optimizer state, the step (which fixes the
        data position and the schedules) and every rank's random state. Every rank calls it."""
        model_state, optimizer_state = parallel.full_state(self.engine, self.objective, self.optimizer)
        rng = self.ctx.gather(_rng_state(self.ctx.device))
        if self.ctx.master:
            save_checkpoint(self.run_dir, self.step, model_state, optimizer_state, {"rng": rng},
                            keep=max(1, self.cfg.keep_checkpoints))

    def train(self, report: bool = True) -> dict:
        """Trains to the last step, then evaluates and (with `report`) prints the table and draws
        report.png; returns the results (empty on ranks other than 0)."""
        self.setup()
        cfg, ctx = self.cfg, self.ctx
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * ctx.world
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
                    mfu = tok_s * self.flops_per_token / self.peak if self.peak else None
                    values.update({"kind": "train", "tokens": self.step * tokens_per_step, "tokens_per_s": tok_s,
                                   "mfu": mfu})
                    self._record(values)
                    progress.show(values)
                model = self.whole_model() if eval_now else None
                if model is not None:
                    scores = self.evaluate_nested(model)
                    self._record({"kind": "eval", "step": self.step, **scores})
                    key, what = ("auc_loss", "AucLoss") if cfg.task == "classify" else ("val", "val loss")
                    shown = {"student": f"Student {scores[key + '_student']:.4f}", "ta": f"TA {scores[key + '_ta']:.4f}"}
                    progress.write(f"step {self.step}: {what} "
                                   + ", ".join(shown[s] for s in self.objective.criterion.streams))
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
            self.report(results)
        return results

    # -- the end ---------------------------------------------------------------------------------

    def final_evaluation(self, nested) -> dict:
        """Rank 0: the models cut out of `nested` (the Student alone for a Student-only run; else
        the Student, the TA and the family) on the validation set, written to results.json."""
        cfg, ctx = self.cfg, self.ctx
        rows = []
        for name, spec, model in extracted_models(nested, family=cfg.family):
            if cfg.mode == "student" and spec != "student":  # the rest of the TA was never trained
                continue
            model.to(ctx.device)
            rows.append({"name": name, "spec": spec, "about": describe(spec, cfg.mode, cfg.share_weights),
                         "params": model.num_parameters(non_embedding=True),
                         "total_params": sum(p.numel() for p in model.parameters()), **self.score(model)})
            model.to("cpu")
        results = {"step": self.step, "models": rows}
        if cfg.task == "classify":
            results.update(task=self.data.provenance, val_examples=len(self.val.ids),
                           oracle_auc_loss=self.val.oracle_auc_loss(), teacher_auc_loss=self.val.teacher_auc_loss())
        else:
            results["val_tokens"] = int(self.val[:, 1:].numel())
        write_json_atomic(self.run_dir / "results.json", results)
        return results

    def report(self, results: dict) -> None:
        """Prints the final table and draws RUN_DIR/report.png."""
        if "val_examples" in results:
            title = (f"validation ({results['val_examples']:,} examples; AucLoss of the ground truth "
                     f"{results['oracle_auc_loss']:.4f}, of the Teacher {results['teacher_auc_loss']:.4f}) "
                     f"after {results['step']} steps")
        else:
            title = f"validation ({results['val_tokens']:,} tokens) after {results['step']} steps"
        self.log(format_table(results["models"], title=title))
        path = make_report(self.run_dir)
        self.log(f"matta: wrote {path} (loss curves, size vs quality) and {self.run_dir / 'results.json'}")


BASELINE_DIR = "baseline"


def describe(spec: str, mode: str, shared: bool = True) -> str:
    """What a row of the final table is, in words."""
    if spec == "student" and not shared:
        return "Student of the unshared MatTA run (its own weights)"
    if spec == "student":
        return {"matta": "Student cut from the MatTA TA", "ta": "Student slice of a TA trained alone",
                "student": "Student trained alone"}[mode]
    if spec == "ta":
        return "TA trained alone" if mode == "ta" else "TA of the MatTA run"
    k = int(spec.split(":")[1])
    return f"lowest {k // 2} and highest {k // 2} layers wide, the rest narrow"


def spare_core() -> bool:
    """Whether this process may use at least two cores (so a second one-thread run fits)."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2


def _train_baseline_process(cfg: TrainConfig, resume: bool, log_path: str) -> None:
    """The baseline run in a process of its own (a `spawn` child), its output in `log_path`."""
    with open(log_path, "a", buffering=1) as out:
        sys.stdout = sys.stderr = out
        Run(cfg, resume=resume).train(report=False)


def train(cfg: TrainConfig, *, resume: bool = False, log=print, alongside: bool | None = None) -> dict:
    """`matta train`: the run in `cfg.out`, then (for a single-process MatTA run with
    `cfg.baseline`) the Student trained alone on the same data, steps and seed in
    RUN_DIR/baseline, whose row joins the final table. `resume` continues whichever of the
    two was interrupted.

    `alongside` (default: when a one-thread CPU run leaves a core spare) trains the baseline in
    a second process at the same time instead of afterwards, writing its output to
    RUN_DIR/baseline/train.log. Both runs are one-thread and deterministic, so the numbers
    are the same either way; only the wall time halves (about)."""
    run = Run(cfg, resume=resume, log=log)
    with_baseline = cfg.baseline and cfg.mode == "matta" and run.ctx.world == 1
    if not with_baseline:
        return run.train()
    base_dir = Path(cfg.out) / BASELINE_DIR
    # The baseline's thread count is the run's: as given, else (on resume) the recorded one, else the default.
    threads = cfg.threads or (runs.read_config(base_dir).threads if resume and (base_dir / "config.json").is_file()
                              else None) or default_threads()
    base_cfg = dataclasses.replace(cfg, out=str(base_dir), mode="student", baseline=False, family=False, threads=threads)
    base_resume = resume and latest_checkpoint(base_dir) is not None
    if not base_resume:  # a fresh baseline must not inherit the checkpoints of an older one
        shutil.rmtree(base_dir / "checkpoints", ignore_errors=True)
    if alongside is None:
        alongside = run.ctx.device.type == "cpu" and threads == 1 and spare_core()
    what = f"matta: baseline: the Student trained alone, same data, steps and seed, in {base_dir}"
    child = None
    if alongside:
        base_dir.mkdir(parents=True, exist_ok=True)
        log_path = base_dir / "train.log"
        log(f"{what}, alongside in a second process (its log: {log_path})")
        base_cfg = dataclasses.replace(base_cfg, progress=False)
        child = multiprocessing.get_context("spawn").Process(
            target=_train_baseline_process, args=(base_cfg, base_resume, str(log_path)), name="matta-baseline")
        child.start()
    try:
        results = run.train(report=False)
        if child is not None:
            child.join()
            if child.exitcode != 0:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:]) if log_path.is_file() else ""
                raise RuntimeError(f"the baseline run (the Student trained alone, {base_dir}) failed with exit code "
                                   f"{child.exitcode}; its log {log_path} ends:\n{tail}rerun with --resume to continue it")
            base = json.loads((base_dir / "results.json").read_text())
        else:
            log(what)
            base = Run(base_cfg, resume=base_resume, log=lambda *a, **k: log("baseline:", *a, **k)).train(report=False)
    finally:
        if child is not None and child.is_alive():  # the main run stopped: so does the baseline
            child.terminate()
            child.join()
    row = dict(base["models"][0], name="Student alone", spec=BASELINE_DIR, about="baseline: " + describe("student", "student"))
    results["models"].append(row)
    write_json_atomic(Path(cfg.out) / "results.json", results)
    run.report(results)
    return results


def format_table(rows: list[dict], title: str = "") -> str:
    """The final table: model, parameters (non-embedding), validation loss and perplexity (for
    a classifier: AucLoss, AUROC and cross-entropy against the Teacher), what it is."""
    if rows and "auc_loss" in rows[0]:
        head = ("model", "params (non-emb)", "AucLoss", "AUROC", "CE vs Teacher", "what it is")
        lines = [[r["name"], f"{r['params'] / 1e6:.3f}M", f"{r['auc_loss']:.4f}", f"{r['auroc']:.4f}",
                  f"{r['val_loss']:.4f}", r.get("about", "")] for r in rows]
    else:
        head = ("model", "params (non-emb)", "val loss", "perplexity", "what it is")
        lines = [[r["name"], f"{r['params'] / 1e6:.3f}M", f"{r['val_loss']:.4f}", f"{r['perplexity']:.2f}",
                  r.get("about", "")] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    rule = "-" * len(fmt(head))
    out = ([title] if title else []) + [fmt(head), rule] + [fmt(l) for l in lines]
    return "\n".join(out)
