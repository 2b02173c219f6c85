"""`matta train`: the run, and beside a MatTA run the same Student trained alone as its baseline.

`train(cfg)` runs `Run(cfg)` in `cfg.out` and then (for a single-process MatTA run with
`cfg.baseline`) the Student alone (`--mode student`, same data, steps and seed) in
RUN_DIR/baseline, an ordinary run folder, whose row joins the final table. On a CPU with a
core to spare and one thread per run, the baseline trains at the same time in a second
process (`multiprocessing` spawn; its output in RUN_DIR/baseline/train.log), else
afterwards: both runs are one-thread and deterministic, so the numbers are the same either
way; only the wall time halves (about).

The second process never outlives the first: it watches its parent and exits when the
parent is gone, however the parent ended (kill -9 included), and the parent ends it when
it stops early. Each folder has one writer at a time (`RunDirLock`).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import sys
import threading
from multiprocessing.connection import wait
from pathlib import Path

from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .context import default_threads
from .report import describe
from .run_dir import RunDirLock, read_config, read_results, write_results
from .trainer import Run

BASELINE_DIR = "baseline"


class BaselineError(RuntimeError):
    """The baseline run beside a MatTA run failed; the message names its log."""


def spare_core() -> bool:
    """Whether this process may use at least two cores (so a second one-thread run fits)."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2


def _exit_with_parent() -> None:
    """In a child process: exit at once when the parent process is gone (its sentinel fires)."""
    parent = multiprocessing.parent_process()

    def watch():
        wait([parent.sentinel])
        os._exit(1)  # what is on disk is consistent at every moment: checkpoints are atomic

    threading.Thread(target=watch, name="matta-parent-watch", daemon=True).start()


def _train_baseline_process(cfg: TrainConfig, resume: bool, log_path: str) -> None:
    """The baseline run in a process of its own (a `spawn` child), its output in `log_path`."""
    _exit_with_parent()
    with open(log_path, "a", buffering=1) as out:
        sys.stdout = sys.stderr = out
        Run(cfg, resume=resume).train(report=False)


def baseline_config(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """The Student-alone run beside `cfg`: same data, steps, seed and thread count (as
    given, else on resume the one the baseline recorded, else the default)."""
    base_dir = Path(cfg.out) / BASELINE_DIR
    recorded = read_config(base_dir).threads if resume and (base_dir / "config.json").is_file() else None
    return dataclasses.replace(cfg, out=str(base_dir), mode="student", baseline=False, family=False,
                               threads=cfg.threads or recorded or default_threads())


def train(cfg: TrainConfig, *, resume: bool = False, log=print, alongside: bool | None = None) -> dict:
    """`matta train` (see the module docstring); `resume` continues whichever of the two runs
    was interrupted. `alongside` (default: when a one-thread CPU run leaves a core spare)
    trains the baseline in a second process at the same time instead of afterwards."""
    run = Run(cfg, resume=resume, log=log)
    if not (cfg.baseline and cfg.mode == "matta" and run.ctx.world == 1):
        return run.train()
    with RunDirLock(cfg.out):
        return _train_with_baseline(run, cfg, resume, log, alongside)


def _train_with_baseline(run: Run, cfg: TrainConfig, resume: bool, log, alongside: bool | None) -> dict:
    base_cfg = baseline_config(cfg, resume)
    base_dir = Path(base_cfg.out)
    base_resume = resume and latest_checkpoint(base_dir) is not None
    if not base_resume:  # a fresh baseline must not inherit the checkpoints of an older one
        shutil.rmtree(base_dir / "checkpoints", ignore_errors=True)
    if alongside is None:
        alongside = run.ctx.device.type == "cpu" and base_cfg.threads == 1 and spare_core()
    what = f"matta: baseline: the Student trained alone, same data, steps and seed, in {base_dir}"
    child = None
    if alongside:
        base_dir.mkdir(parents=True, exist_ok=True)
        log_path = base_dir / "train.log"
        log(f"{what}, alongside in a second process (its log: {log_path})")
        child = multiprocessing.get_context("spawn").Process(
            target=_train_baseline_process, args=(dataclasses.replace(base_cfg, progress=False), base_resume,
                                                  str(log_path)), name="matta-baseline")
        child.start()
    try:
        results = run.train(report=False)
        if child is not None:
            child.join()
            if child.exitcode != 0:
                lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()] \
                    if log_path.is_file() else []
                raise BaselineError(f"the baseline run (the Student trained alone, {base_dir}) failed with exit code "
                                    f"{child.exitcode}{f' ({lines[-1].strip()})' if lines else ''}; see {log_path}, "
                                    "and rerun with --resume to continue it")
            base = read_results(base_dir)
        else:
            log(what)
            base = Run(base_cfg, resume=base_resume, log=lambda *a, **k: log("baseline:", *a, **k)).train(report=False)
    finally:
        if child is not None and child.is_alive():  # the main run stopped: so does the baseline
            child.terminate()
            child.join()
    row = dict(base["models"][0], name="Student alone", spec=BASELINE_DIR, about="baseline: " + describe("student", "student"))
    results["models"].append(row)
    write_results(cfg.out, results)
    run.report_results(results)
    return results
