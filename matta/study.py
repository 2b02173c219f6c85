"""`matta study`: the paper's claims as one resumable command.

A study is a set of ordinary `matta train` runs (one per arm and seed), run side by side as
subprocesses through the command line, so each is a run directory that `matta eval` and
`matta extract` accept, and the study depends on the trainer only through its flags, its
results.json and (for FLOP counts) `load_run` and the model's FLOP count. Then
`matta.study_report` turns the runs into DIR/RESULTS.md and DIR/study.png.

Layout of DIR:
    study.json                the settings (checked on resume), chosen learning rates, sweep
    runs/ARM/seedS-lrLR/      one `matta train` run directory per arm, seed and learning rate
    runs/ARM/seedS-lrLR.log   its output; seedS-lrLR.wall.json: its wall time (all segments)
    RESULTS.md, study.png     the report (and grid.json, every run's metrics, with --lr-sweep per-arm)

Fairness between arms: every arm of a seed trains the same nested model (the trainer seeds
the model's initialisation and the data order with --seed; --mode only changes the loss
weights), so the shared weights start identical and the batches come in the same order;
RESULTS.md checks this from the first logged loss of each run.

Learning rates (--lr-sweep): `student` (the default) sweeps a small grid per optimizer on the
Student-alone arm of seed 0 only and reuses the best rate for every arm and seed; `per-arm`
trains every arm and seed at every rate of the grid and gives each arm the rate with the
lowest mean over the seeds (`best_rate`), so that no arm is judged at a rate tuned for
another (the report reads the study both ways: the per-arm runs hold the Student-alone sweep
of seed 0).

A killed study resumes: a run with results.json is finished and never redone, a run with a
checkpoint continues from it (`matta train --resume`), any other run starts over.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import write_json_atomic
from .train.checkpoint import checkpoint_folders
from .train.config import config_from_flags
from .train.objective import streams_of
from .train.run_dir import load_run
from .train.tasks import TASKS

OPTIMIZERS = ("adamw", "shampoo")
LR_SWEEPS = ("student", "per-arm")


class StudyError(ValueError):
    """A study that cannot run as asked; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------
# Arms


@dataclass(frozen=True)
class ArmKind:
    """What an arm trains; `name` + "-" + optimizer is the arm's name."""

    name: str
    label: str
    mode: str
    flags: tuple[str, ...] = ()
    teacher: bool = False  # trains against `--teacher`
    in_paper: bool = True


ARM_KINDS = {
    k.name: k
    for k in (
        ArmKind("student", "Student alone", "student"),
        ArmKind("ta", "TA alone", "ta"),
        ArmKind("matta", "MatTA", "matta"),
        ArmKind("student-flops", "Student alone, FLOPs of MatTA", "student", in_paper=False),
        ArmKind("matta-unshared", "MatTA, unshared Student", "matta", ("--no-share-weights", "--no-family")),
        ArmKind("matta-wd0", "MatTA, w_D = 0", "matta", ("--loss-weights", "1,1,0"), in_paper=False),
        ArmKind("teacher-student", "Teacher-Student", "student", teacher=True),
        ArmKind("teacher-matta", "Teacher-TA-Student", "matta", teacher=True),
    )
}
CORE_ARMS = ("student-adamw", "student-shampoo", "ta-adamw", "ta-shampoo", "matta-adamw", "matta-shampoo")
EXTRA_ARMS = ("student-flops-adamw", "matta-unshared-adamw", "matta-wd0-adamw")
TEACHER_ARMS = ("teacher-student-adamw", "teacher-matta-adamw")


@dataclass(frozen=True)
class Arm:
    kind: ArmKind
    optimizer: str

    @property
    def name(self) -> str:
        return f"{self.kind.name}-{self.optimizer}"

    @property
    def label(self) -> str:
        return f"{self.kind.label} ({'AdamW' if self.optimizer == 'adamw' else 'Shampoo'})"


def parse_arm(name: str) -> Arm:
    kind, _, optimizer = name.strip().rpartition("-")
    if kind not in ARM_KINDS or optimizer not in OPTIMIZERS:
        known = ", ".join(f"{k}-OPT" for k in ARM_KINDS)
        raise StudyError(f"unknown arm {name!r}; arms are {known} with OPT one of {', '.join(OPTIMIZERS)}, or core / all")
    return Arm(ARM_KINDS[kind], optimizer)


def parse_arms(text: str, teacher: str | None) -> list[Arm]:
    """Arms from a comma list of names and the keywords `core` (the 2x2 of Table 3 plus TA
    alone) and `all` (core, the compute-matched Student, the unshared and w_D = 0 ablations,
    and with a Teacher the Teacher-Student and Teacher-TA-Student arms)."""
    names: list[str] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "core":
            names += CORE_ARMS
        elif item == "all":
            names += CORE_ARMS + EXTRA_ARMS + (TEACHER_ARMS if teacher else ())
        else:
            names.append(item)
    if not names:
        raise StudyError("--arms names no arm; give a comma list of arms, core or all")
    arms = [parse_arm(n) for n in dict.fromkeys(names)]
    if teacher is None and any(a.kind.teacher for a in arms):
        raise StudyError("the teacher-* arms need --teacher PATH (a matta run directory or a Hugging Face GPT-2 folder)")
    return arms


# ----------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class TaskBudget:
    """A preset's setting for one task (`matta.train.TASKS`): the `matta train` flags of every
    run (the model, batch and bookkeeping) and the default number of steps."""

    flags: tuple[str, ...]
    steps: int


@dataclass(frozen=True)
class StudyPreset:
    """A study's model, data and budget per task."""

    name: str
    budgets: dict  # task name -> TaskBudget (the tasks the preset offers)
    data: str  # the data of a task that trains on --data (a task with data of its own ignores it)
    lr_grid: dict = field(default_factory=dict)  # optimizer -> learning rates of the sweep
    note: str = ""


def _train_flags(model, ffn_ta, extra_layers, block, batch, eval_tokens, checkpoint_every, *more) -> tuple[str, ...]:
    return ("--model", model, "--ffn-ta", str(ffn_ta), "--extra-layers", str(extra_layers),
            "--block-size", str(block), "--batch-size", str(batch), "--eval-tokens", str(eval_tokens),
            "--checkpoint-interval", str(checkpoint_every), *more,
            "--eval-interval", "0", "--log-interval", "10", "--keep-checkpoints", "1", "--no-progress")


def _grid(*rates) -> dict:
    return {"adamw": rates, "shampoo": rates}


PRESETS = {
    "tiny": StudyPreset(
        "tiny", {
            "lm": TaskBudget(_train_flags("gpt2-tiny", 1024, 2, 128, 16, 65536, 200, "--max-preconditioner-dim", "256"),
                             steps=400),
            # A 2-layer GAU classifier, d 32, expansion 16 (TA 64), at the budget that met the
            # margin > 2 x spread criterion (studies/README.md).
            "classify": TaskBudget(("--model", "gau-tiny", "--n-layer", "2", "--n-embd", "32", "--ffn", "16",
                                    "--ffn-ta", "64", "--batch-size", "64", "--checkpoint-interval", "250",
                                    "--eval-interval", "0", "--log-interval", "10", "--keep-checkpoints", "1",
                                    "--no-progress"), steps=2000),
        },
        data="stdlib", lr_grid=_grid(1e-3, 3e-3, 1e-2),
        note="GPT-2 tiny (4 layers, d 128, FFN 512) nested in a TA with FFN 1024 and 2 TA-only layers; "
             "sized for a 2-core CPU (studies/README.md says which budgets meet the study's criterion).",
    ),
    "small": StudyPreset(
        "small", {"lm": TaskBudget(_train_flags("gpt2-mini", 2048, 2, 256, 32, 262144, 250,
                                                "--max-preconditioner-dim", "512"), steps=3000)},
        data="stdlib", lr_grid=_grid(3e-4, 1e-3, 3e-3),
        note="GPT-2 mini (6 layers, d 256, FFN 1024) nested in a TA with FFN 2048 and 2 TA-only layers; "
             "a workstation or a GPU.",
    ),
    "gpt2-medium": StudyPreset(
        "gpt2-medium",
        {"lm": TaskBudget(_train_flags("gpt2-medium", 8192, 12, 1024, 16, 1048576, 500, "--grad-accum", "4",
                                       "--tokenizer", "gpt2"), steps=20000)},
        data="hf:allenai/c4:en", lr_grid=_grid(1e-4, 3e-4, 6e-4),
        note="The paper's GPT-2 Medium setting (TA: FFN 8192, 36 layers) on C4; GPUs.",
    ),
}

# --quick: a plumbing check in a few steps of a very small model on byte-level builtin text.
QUICK_FLAGS = _train_flags("gpt2-tiny", 96, 2, 32, 4, 2048, 2, "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                           "--ffn", "64", "--warmup-steps", "1")
QUICK_STEPS = 4
QUICK_DATA = "builtin"
QUICK_DATA_FLAGS = ("--tokenizer", "bytes")
QUICK_PER_ARM_GRID = (3e-3, 1e-2)  # --quick --lr-sweep per-arm: two rates, so that there is a choice


# ----------------------------------------------------------------------------------------
# Settings and jobs


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides a study's runs (saved in study.json, checked on resume)."""

    preset: str
    seeds: int
    steps: int | None
    tokens: int | None
    data: str
    task: str
    quick: bool
    teacher: str | None
    lrs: dict  # optimizer -> fixed learning rate (no sweep), from --lr
    device: str
    threads: int
    lr_sweep: str = "student"

    def budget_flags(self) -> tuple[str, ...]:
        return ("--tokens", str(self.tokens)) if self.tokens is not None else ("--max-steps", str(self.steps))

    def base_flags(self) -> tuple[str, ...]:
        budget = PRESETS[self.preset].budgets[self.task]
        common = ("--task", self.task, "--device", self.device, "--threads", str(self.threads))
        if TASKS[self.task].own_data is not None:  # the task brings its data: no --data, no --quick model
            return (*budget.flags, *common)
        flags = QUICK_FLAGS if self.quick else budget.flags
        data_flags = QUICK_DATA_FLAGS if self.quick and self.data == QUICK_DATA else ()
        return (*flags, *data_flags, "--data", self.data, *common)

    def lr_grid(self, optimizer: str) -> tuple[float, ...]:
        if optimizer in self.lrs:
            return (self.lrs[optimizer],)
        if self.quick:
            return QUICK_PER_ARM_GRID if self.lr_sweep == "per-arm" else (3e-3,)
        return tuple(PRESETS[self.preset].lr_grid[optimizer])

    def invariant(self) -> dict:
        """The settings a resumed study must share with the one that made DIR (seeds may grow)."""
        d = dataclasses.asdict(self)
        d.pop("seeds")
        d.pop("threads")
        if d["lr_sweep"] == "student":  # studies made before --lr-sweep existed resume unchanged
            d.pop("lr_sweep")
        return d


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


@dataclass
class Job:
    arm: Arm
    seed: int
    lr: float
    flags: tuple[str, ...]
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm.name} seed {self.seed} lr {lr_tag(self.lr)}"

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def wall_file(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".wall.json")

    @property
    def pid_file(self) -> Path:
        """Holds the process id of the `matta train` working on this run, while it works."""
        return self.run_dir.with_name(self.run_dir.name + ".pid")

    def running_elsewhere(self) -> int | None:
        """The id of a live process still training this run (left by a study that was killed)."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def finished(self) -> bool:
        return (self.run_dir / "results.json").is_file()

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "matta", "train", *self.flags, "--out", str(self.run_dir)]
        if checkpoint_folders(self.run_dir):  # what is on disk decides, not the `latest` pointer
            return cmd + ["--resume"]
        return cmd + ["--overwrite"]


def run_dir_of(out: Path, arm_name: str, seed: int, lr: float) -> Path:
    return out / "runs" / arm_name / f"seed{seed}-lr{lr_tag(lr)}"


def job_for(settings: StudySettings, out: Path, arm: Arm, seed: int, lr: float, steps_override: int | None = None) -> Job:
    kind = arm.kind
    flags = [*settings.base_flags(), "--mode", kind.mode, "--optimizer", arm.optimizer, "--lr", repr(lr),
             "--seed", str(seed)]
    flags += ["--max-steps", str(steps_override)] if steps_override is not None else list(settings.budget_flags())
    flags += list(kind.flags)
    if kind.mode == "matta":  # the study's own Student-alone arms are the baseline
        flags.append("--no-baseline")
    if kind.teacher:
        flags += ["--teacher", str(settings.teacher)]
    return Job(arm, seed, lr, tuple(flags), run_dir_of(out, arm.name, seed, lr))


# ----------------------------------------------------------------------------------------
# Running jobs side by side

# The costliest runs first, so that side-by-side jobs end together.
RUN_COST = {"matta": 3, "ta": 2, "student": 1}


class Runner:
    """Runs `matta train` subprocesses, at most `jobs` at once; ends them all if interrupted."""

    def __init__(self, jobs: int, log=print):
        self.jobs = jobs
        self.log = log
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.failed: list[Job] = []
        self.stopping = False

    def run_all(self, jobs: list[Job]) -> None:
        todo = [j for j in jobs if not j.finished()]
        for j in jobs:
            if j.finished():
                self.log(f"matta study: {j.name}: finished before, kept ({j.run_dir})")
        for j in todo:
            pid = j.running_elsewhere()
            if pid is not None:
                raise StudyError(f"{j.run_dir} is still being trained by process {pid} (left by a study that was "
                                 "killed); wait for it to end or end it, then rerun the study")
        if not todo:
            return
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            for _ in pool.map(self._run, todo):
                pass
        except BaseException:  # Ctrl-C or SIGTERM: start nothing more, end what runs
            self.stopping = True
            self.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        if self.stopping:
            return
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = job.command()
        self.log(f"matta study: {job.name}: {'resuming' if '--resume' in cmd else 'starting'} -> {job.run_dir}")
        env = dict(os.environ, OMP_NUM_THREADS=cmd[cmd.index("--threads") + 1], TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        with open(job.log, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            job.pid_file.write_text(str(proc.pid))
            with self._lock:
                self._procs.add(proc)
            try:
                rc = proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)
                job.pid_file.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        add_wall_time(job.wall_file, seconds, rc)
        if self.stopping:
            self.log(f"matta study: {job.name}: stopped; a rerun continues it")
        elif rc != 0 or not job.finished():
            self.failed.append(job)
            self.log(f"matta study: {job.name}: FAILED (exit code {rc}); see {job.log}")
        else:
            self.log(f"matta study: {job.name}: done in {seconds:.0f} s")

    def terminate(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def add_wall_time(path: Path, seconds: float, rc: int) -> None:
    """Adds one segment (a start or a resume) to a run's wall-time record."""
    record = read_json(path) or {"seconds": 0.0, "segments": []}
    record["segments"].append({"seconds": round(seconds, 3), "exit_code": rc})
    record["seconds"] = round(sum(s["seconds"] for s in record["segments"]), 3)
    write_json_atomic(path, record)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------
# Metrics of finished runs


def run_results(run_dir: Path) -> dict:
    results = read_json(run_dir / "results.json")
    if results is None:
        raise StudyError(f"{run_dir} has no readable results.json; rerun the study to finish it")
    return results


def metric_of(run_dir: Path, spec: str, metric: str) -> float:
    """The metric of one model of a finished run (spec: student, ta, wide_narrow_wide:K)."""
    for row in run_results(run_dir)["models"]:
        if row["spec"] == spec:
            if metric not in row:
                raise StudyError(f"{run_dir}/results.json has no {metric!r} for {spec}; the trainer wrote {sorted(row)}")
            return float(row[metric])
    raise StudyError(f"{run_dir}/results.json has no model {spec!r}")


def scored_spec(arm: Arm) -> str:
    """The model an arm is judged by: its Student, or the TA of a TA-alone arm."""
    return "ta" if arm.kind.mode == "ta" else "student"


def best_rate(results: dict, seeds=None) -> float | None:
    """results: {lr: {seed: metric}}. The rate with the lowest mean metric over the seeds that
    finished at every rate (or over `seeds`, when given), ties to the smaller rate; None when no
    such seed exists."""
    common = set.intersection(*(set(v) for v in results.values())) if results else set()
    if seeds is not None:
        common &= set(seeds)
    if not common:
        return None
    return min(results, key=lambda lr: (sum(results[lr][s] for s in common) / len(common), lr))


def flops_per_token(run_dir: Path, mode: str) -> float:
    """Training FLOPs per token of a run's model when trained in `mode` (the model's count)."""
    cfg, model, _ = load_run(run_dir)
    return model.flops_per_token(cfg.block_size, streams_of(mode, cfg.loss_weights))


# ----------------------------------------------------------------------------------------
# The study


@dataclass
class Study:
    settings: StudySettings
    arms: list[Arm]
    out: Path
    jobs: int
    command: str
    log: object = print
    chosen_lr: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)  # optimizer -> {lr: Student metric} (seed 0)
    runs: dict = field(default_factory=dict)  # arm name -> {seed: run_dir}
    grid: dict = field(default_factory=dict)  # --lr-sweep per-arm: arm name -> {lr: {seed: run_dir}}
    arm_lr: dict = field(default_factory=dict)  # --lr-sweep per-arm: arm name -> its best rate
    failed: list = field(default_factory=list)
    data_provenance: dict = field(default_factory=dict)
    load_at_start: str = field(default_factory=lambda: ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    @property
    def metric(self) -> str:
        return TASKS[self.settings.task].metric

    def optimizers(self) -> list[str]:
        return list(dict.fromkeys(a.optimizer for a in self.arms))

    def check_directory(self) -> None:
        saved = read_json(self.out / "study.json")
        if saved is None:
            if (self.out / "runs").exists():
                raise StudyError(f"{self.out} holds runs but no study.json; choose another --out")
            return
        if saved.get("settings_invariant") != self.settings.invariant():
            raise StudyError(
                f"{self.out} holds a study with other settings ({saved.get('settings_invariant')}); resume it with "
                "the same preset, budget, data, task, --quick, --teacher and --lr, or choose another --out"
            )

    def save_state(self) -> None:
        state = {
            "command": self.command,
            "settings": dataclasses.asdict(self.settings),
            "settings_invariant": self.settings.invariant(),
            "arms": [a.name for a in self.arms],
            "metric": self.metric,
            "chosen_lr": self.chosen_lr,
            "sweep": {opt: {lr_tag(lr): v for lr, v in d.items()} for opt, d in self.sweep.items()},
            "runs": {arm: {str(s): str(p.relative_to(self.out)) for s, p in d.items()} for arm, d in self.runs.items()},
            "grid": {arm: {lr_tag(lr): {str(s): str(p.relative_to(self.out)) for s, p in d.items()}
                           for lr, d in rates.items()} for arm, rates in self.grid.items()},
            "arm_lr": self.arm_lr,
            "failed": [str(p) for p in self.failed],
            "data_provenance": self.data_provenance,
            "load_at_start": self.load_at_start,
        }
        write_json_atomic(self.out / "study.json", state)

    def run(self) -> bool:
        """Runs (or resumes) every run of the study; True if all finished."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_directory()
        self.save_state()
        runner = Runner(self.jobs, self.log)
        # A `kill` (SIGTERM) ends the runs in flight as Ctrl-C does; a rerun resumes them.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
        try:
            if self.settings.lr_sweep == "per-arm":
                self._per_arm(runner)
            else:
                self._sweep(runner)
                self._arms(runner)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            self.failed = [j.run_dir for j in runner.failed]
            self.save_state()
        return not self.failed

    def _sweep(self, runner: Runner) -> None:
        """Learning rates: per optimizer, the Student alone of seed 0 at each rate of the grid
        (a grid of one rate, from --lr or --quick, needs no runs)."""
        jobs = {}
        for opt in self.optimizers():
            grid = self.settings.lr_grid(opt)
            if len(grid) == 1:
                self.chosen_lr[opt] = grid[0]
                continue
            for lr in grid:
                jobs[(opt, lr)] = job_for(self.settings, self.out, Arm(ARM_KINDS["student"], opt), 0, lr)
        runner.run_all(list(jobs.values()))
        for (opt, lr), job in jobs.items():
            if job.finished():
                self.sweep.setdefault(opt, {})[lr] = metric_of(job.run_dir, "student", self.metric)
        for opt in (o for o in self.optimizers() if (o, self.settings.lr_grid(o)[0]) in jobs):
            results = self.sweep.get(opt, {})
            if len(results) < len(self.settings.lr_grid(opt)):
                raise StudyError(f"the learning-rate sweep for {opt} did not finish; see the logs under {self.out / 'runs'}")
            self.chosen_lr[opt] = min(results, key=lambda lr: (results[lr], lr))
            self.log(f"matta study: {opt}: learning rate {lr_tag(self.chosen_lr[opt])} "
                     f"(Student alone, seed 0: {', '.join(f'{lr_tag(k)} -> {v:.4f}' for k, v in sorted(results.items()))})")
        self.save_state()

    def _arms(self, runner: Runner) -> None:
        """Every arm and seed; the compute-matched Student last, as its budget is measured on
        a finished run of the study."""
        matched = [a for a in self.arms if a.kind.name == "student-flops"]
        jobs = [self._job(arm, seed) for seed in range(self.settings.seeds) for arm in self.arms if arm not in matched]
        jobs.sort(key=lambda j: (j.seed, -RUN_COST[j.arm.kind.mode]))
        self.save_state()
        runner.run_all(jobs)
        if matched:
            steps = self._compute_matched_steps()
            jobs = [self._job(arm, seed, steps) for seed in range(self.settings.seeds) for arm in matched]
            self.save_state()
            runner.run_all(jobs)

    def _per_arm(self, runner: Runner) -> None:
        """Every arm and seed at every rate of its optimizer's grid, seed by seed (a study cut
        short holds the whole grid on its first seeds); then each arm's best rate."""
        jobs = [job_for(self.settings, self.out, arm, seed, lr)
                for seed in range(self.settings.seeds) for arm in self.arms for lr in self.settings.lr_grid(arm.optimizer)]
        jobs.sort(key=lambda j: (j.seed, -RUN_COST[j.arm.kind.mode]))
        for job in jobs:
            self.grid.setdefault(job.arm.name, {}).setdefault(job.lr, {})[job.seed] = job.run_dir
        self.save_state()
        try:
            runner.run_all(jobs)
        finally:
            self._choose_per_arm()

    def _choose_per_arm(self) -> None:
        """Each arm's best rate over its finished runs (`runs` then holds the runs at it), and the
        rate the default sweep would have chosen: the Student alone's best on seed 0."""
        for arm in self.arms:
            results = {lr: {s: metric_of(p, scored_spec(arm), self.metric) for s, p in d.items()
                            if (p / "results.json").is_file()} for lr, d in self.grid[arm.name].items()}
            best = best_rate(results)
            if best is None:
                continue
            self.arm_lr[arm.name] = best
            self.runs[arm.name] = dict(self.grid[arm.name][best])
            self.log(f"matta study: {arm.name}: learning rate {lr_tag(best)} (mean over "
                     f"{len(set.intersection(*(set(v) for v in results.values())))} seed(s))")
            if arm.kind.name == "student" and all(0 in v for v in results.values()):
                self.sweep[arm.optimizer] = {lr: v[0] for lr, v in results.items()}
                self.chosen_lr[arm.optimizer] = min(results, key=lambda lr: (results[lr][0], lr))
        self.save_state()

    def _job(self, arm: Arm, seed: int, steps: int | None = None) -> Job:
        job = job_for(self.settings, self.out, arm, seed, self.chosen_lr[arm.optimizer], steps)
        self.runs.setdefault(arm.name, {})[seed] = job.run_dir
        return job

    def _compute_matched_steps(self) -> int:
        """Steps for a Student alone to spend the training FLOPs of a MatTA run of the budget
        (every arm trains the same model, so any finished run of the study can count them)."""
        finished = [p for p in sorted((self.out / "runs").glob("*/seed*"))
                    if (p / "results.json").is_file() and not p.parent.name.startswith("student-flops")]
        if not finished:
            raise StudyError("the compute-matched Student (student-flops-*) needs another arm or a learning-rate sweep "
                             "to finish first; add an arm such as student-adamw")
        reference = finished[0]
        ratio = flops_per_token(reference, "matta") / flops_per_token(reference, "student")
        return max(1, math.ceil(run_results(reference)["step"] * ratio))


# ----------------------------------------------------------------------------------------
# The command


def warm_data_cache(settings: StudySettings) -> dict:
    """Loads the data once here, as every run's task loads it, so that runs started side by
    side find the tokenizer and tokens cached instead of all building them at once; returns
    its provenance."""
    cfg = config_from_flags(settings.base_flags())
    data = TASKS[cfg.task].load_data(cfg)
    return dict(getattr(data, "provenance", {}) or {})


def parse_lrs(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        opt, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if opt.strip() not in OPTIMIZERS or not lr > 0:
            raise StudyError(f"--lr takes OPTIMIZER=RATE pairs such as adamw=3e-3,shampoo=1e-3, got {item!r}")
        out[opt.strip()] = lr
    return out


def run_from_args(args, log=print) -> Study:
    """`matta study`'s runs: checks the arguments, then runs (or resumes) every run of the
    study; returns it (`study.failed` lists the runs that failed)."""
    if args.preset not in PRESETS:
        raise StudyError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        raise StudyError("--seeds, --jobs and --threads must be at least 1")
    if args.steps is not None and args.tokens is not None:
        raise StudyError("give --steps or --tokens, not both")
    if (args.steps is not None and args.steps < 1) or (args.tokens is not None and args.tokens < 1):
        raise StudyError("--steps and --tokens must be at least 1")
    lr_sweep = getattr(args, "lr_sweep", "student")
    if lr_sweep not in LR_SWEEPS:
        raise StudyError(f"--lr-sweep must be one of {', '.join(LR_SWEEPS)}, got {lr_sweep!r}")
    if lr_sweep == "per-arm" and args.lr:
        raise StudyError("--lr fixes the rates, --lr-sweep per-arm sweeps them; give one of the two")
    if args.task not in TASKS:
        raise StudyError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    preset, task = PRESETS[args.preset], TASKS[args.task]
    if args.task not in preset.budgets:
        offering = [name for name, p in PRESETS.items() if args.task in p.budgets]
        raise StudyError(f"preset {args.preset} has no setting for --task {args.task}; use --preset "
                         f"{' or '.join(offering)} with --task {args.task}")
    if task.own_data is not None and args.data:
        raise StudyError(f"--task {args.task} trains on {task.own_data}; drop --data")
    default_steps = QUICK_STEPS if args.quick else preset.budgets[args.task].steps
    steps = args.steps if args.steps is not None or args.tokens is not None else default_steps
    data = task.own_data or args.data or (QUICK_DATA if args.quick else preset.data)
    settings = StudySettings(args.preset, args.seeds, steps, args.tokens, data, args.task, bool(args.quick),
                             str(Path(args.teacher).resolve()) if args.teacher else None, parse_lrs(args.lr),
                             args.device, args.threads, lr_sweep)
    arms = parse_arms(args.arms, settings.teacher)
    if lr_sweep == "per-arm" and any(a.kind.name == "student-flops" for a in arms):
        raise StudyError("--lr-sweep per-arm does not take the student-flops-* arms (their budget comes from a "
                         "finished run at the shared rate); run them in a study with the default sweep")
    out = Path(args.out)
    command = "matta study " + " ".join(getattr(args, "argv", []) or [])
    study = Study(settings, arms, out, args.jobs, command.strip(), log)
    study.check_directory()
    log(f"matta study: preset {settings.preset}, {settings.seeds} seed(s), arms {', '.join(a.name for a in arms)}, "
        f"{args.jobs} job(s) side by side -> {out}")
    if task.own_data is None:
        study.data_provenance = warm_data_cache(settings)
    study.run()
    return study
