"""The `matta` command line: train, extract, eval, bench.

    matta train   --out RUN_DIR [--model ...] [--data ...] [--mode ...] [--optimizer ...] ...
    matta extract --run RUN_DIR --spec student|ta|wide_narrow_wide:K|all --out DIR [--hf]
    matta eval    --run RUN_DIR [--models student,ta,family] [--tasks val,lambada:PATH,choice:PATH]
    matta lm-eval --model matta --model_args run=RUN_DIR,stream=student --tasks ...   (lm-evaluation-harness)
    matta bench   [nested_linear loss shampoo models]
    matta cost    [matta train's model and batch flags] [--card h100|h200|a100|FILE] [--gpus N]   (predicted)
    matta study   --preset tiny|small|gpt2-medium --seeds N [--steps S | --tokens T] --out DIR [--arms ...] [--quick]

A usage problem (bad flag value, missing file, unknown model, memory, checkpoint) prints one
line naming the problem and the fix and exits with code 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ._atomic import write_json_atomic
from .data import DataError
from .evaluation import TaskError
from .ops.backend import BackendError, check_environment
from .study import StudyError
from .train.baseline import BaselineError
from .train.checkpoint import CheckpointError, checkpoint_folders, remove_dead_writes
from .train.config import (FIELDS, ConfigError, add_train_flags, check_folder, check_resume, check_threads, coerce,
                           load_toml, make_config)
from .train.context import default_threads

USAGE_ERRORS = (ConfigError, DataError, CheckpointError, TaskError, StudyError, BackendError)


class CLIError(ValueError):
    """A usage error found by the command line itself."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(f"{message}; see `{self.prog} --help`")


# ----------------------------------------------------------------------------------------
# train


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    add_train_flags(p)
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def _train_values(args) -> tuple[dict, bool]:
    flags = {name: coerce(name, getattr(args, name)) for name in FIELDS if hasattr(args, name)}
    from_file = load_toml(args.config) if args.config is not None else {}
    requested = {**from_file, **flags}
    out = Path(requested.get("out", FIELDS["out"].default))
    values = {}
    if args.resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise CheckpointError(f"--resume: {out} holds no run (no config.json); drop --resume to start a new run")
        try:
            values = {k: coerce(k, v) for k, v in json.loads(saved.read_text()).items() if k in FIELDS}
        except (json.JSONDecodeError, AttributeError, ConfigError) as exc:
            raise CheckpointError(f"--resume: {saved} is unreadable ({exc}); start a new run with --overwrite") from None
        check_resume(out, values, requested)
    values.update(requested)
    return values, args.resume


def cmd_train(args) -> int:
    from .train import train
    from .train.run_dir import RunDirLock

    values, resume = _train_values(args)
    cfg = make_config(values)
    check_threads(cfg.threads or default_threads(), "--threads" if cfg.threads else "$OMP_NUM_THREADS")
    run_dir = args.run_dir = Path(cfg.out)  # main() names what a failed write kept
    master = int(os.environ.get("RANK", "0")) == 0
    with RunDirLock(run_dir) if master else contextlib.nullcontext():  # before anything in the folder is touched
        if master:
            remove_dead_writes(run_dir)
            held = checkpoint_folders(run_dir)
            if held and not resume:
                if not args.overwrite:
                    raise CLIError(
                        f"{run_dir} holds a run with a checkpoint at step {held[0][0]}; pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --out"
                    )
                shutil.rmtree(run_dir / "checkpoints")
        train(cfg, resume=resume)
    return 0


# ----------------------------------------------------------------------------------------
# extract / eval


def _parse_specs(text: str, depth: int) -> list[str]:
    """Model specs from a comma list; `family` and `all` are this command line's own words."""
    from .extraction import parse_spec

    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "all":
            specs += ["student", "ta", "family"]
        elif item == "family":
            specs.append("family")
        else:
            try:
                parse_spec(item, depth)
            except ValueError as exc:
                raise CLIError(f"{exc}; or use family or all") from None
            specs.append(item)
    if not specs:
        raise CLIError("no model spec given; use student, ta, wide_narrow_wide:K, family or all")
    return list(dict.fromkeys(specs))


def _models_for(model, specs):
    """(name, spec, plain model) for each spec; 'family' expands to the wide-narrow-wide family."""
    from .extraction import extract_spec, extracted_models, spec_label

    out = []
    for spec in specs:
        if spec == "family":
            out += [m for m in extracted_models(model, family=True) if m[1].startswith("wide_narrow_wide")]
        else:
            try:
                out.append((spec_label(spec), spec, extract_spec(model, spec)))
            except ValueError as exc:
                raise CLIError(f"{spec}: {exc}") from None
    seen, unique = set(), []
    for item in out:
        if item[1] not in seen:
            seen.add(item[1])
            unique.append(item)
    return unique


def cmd_extract(args) -> int:
    from .models import HFCausalLM
    from .train.run_dir import load_run

    check_folder("--out", args.out)
    out = Path(args.out)
    cfg, model, tokenizer = load_run(args.run)
    specs = _parse_specs(args.spec, model.depth)
    for name, spec, sub in _models_for(model, specs):
        folder = out / spec.replace(":", "_k")
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(sub, HFCausalLM):  # a Hugging Face run: its own class's layout, --hf or not
            from .hf import export_hf

            export_hf(sub, folder)
            if hasattr(tokenizer, "save_files"):
                tokenizer.save_files(folder)  # the model folder's tokenizer files, for AutoTokenizer
        elif args.hf:
            from .hf import export_hf_gpt2

            try:
                export_hf_gpt2(sub, folder)
            except (TypeError, ValueError) as exc:
                raise CLIError(f"{name} cannot be written in the Hugging Face GPT-2 layout ({exc}); drop --hf") from None
        else:
            from .hf import save_extracted

            save_extracted(sub, folder)
        if tokenizer is not None:
            (folder / "matta_tokenizer.json").write_text(tokenizer.to_json())
        padded = isinstance(sub, HFCausalLM) and len(set(sub.ffn_widths)) > 1
        print(f"{name}: {sub.num_parameters(non_embedding=True) / 1e6:.3f}M non-embedding parameters -> {folder}"
              + (f" (stored with every FFN zero-padded to {max(sub.ffn_widths)})" if padded else ""))
    return 0


def cmd_eval(args) -> int:
    import torch

    from .evaluation import LMScorer, lambada_accuracy, multiple_choice_accuracy, parse_tasks
    from .train.run_dir import load_run
    from .train.tasks import task_for

    tasks = parse_tasks(args.tasks)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, tokenizer = load_run(args.run, device)
    specs = _parse_specs(args.models, model.depth)
    val = None
    task = task_for(cfg)
    if any(kind == "val" for kind, _ in tasks):  # the run's own validation, scored as its final table is
        val_tokens = cfg.eval_tokens if args.val_tokens is None else args.val_tokens
        val = task.validation(task.load_data(cfg), dataclasses.replace(cfg, eval_tokens=val_tokens))
    rows = []
    for name, spec, sub in _models_for(model, specs):
        sub.to(device).eval()
        row = {"name": name, "spec": spec, "params": sub.num_parameters(non_embedding=True)}
        for kind, path in tasks:
            if kind == "val":
                row.update(task.score(sub, val, device=device, batch_size=16, autocast_dtype=None))
                continue
            scorer = LMScorer(sub, tokenizer, block_size=cfg.block_size, device=device)
            result = lambada_accuracy(scorer, path) if kind == "lambada" else multiple_choice_accuracy(scorer, path)
            tag = f"{kind}:{Path(path).stem}"
            row.update({f"{tag} {k}": v for k, v in result.items() if k != "n"})
        rows.append(row)
        sub.to("cpu")
    columns = [c for c in rows[0] if c not in ("name", "spec")]
    widths = [max(len(c), 12) for c in columns]
    print("  ".join(["model".ljust(24)] + [c.rjust(w) for c, w in zip(columns, widths)]))
    for r in rows:
        cells = [f"{r[c] / 1e6:.3f}M" if c == "params" else f"{r[c]:.4f}" for c in columns]
        print("  ".join([r["name"].ljust(24)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    path = Path(args.run) / "eval.json"
    write_json_atomic(path, {"tasks": args.tasks, "models": rows})
    print(f"wrote {path}")
    return 0


def cmd_lm_eval(harness_args: list[str]) -> int:
    """lm-evaluation-harness's own command line, run with matta registered as `--model matta`."""
    try:
        from . import lm_eval_model  # noqa: F401  registers the model
    except ImportError as exc:
        if exc.name != "lm_eval":
            raise
        raise CLIError(str(exc)) from None
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *harness_args]  # the harness reads its arguments from sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


# ----------------------------------------------------------------------------------------
# bench


KERNEL_BENCHMARKS = ("nested_linear", "loss", "shampoo")


def cmd_bench(args) -> int:
    """Runs benchmarks/bench_<name>.py for each name (their own tables) and sums up."""
    from ._source_tree import REPO_ROOT

    folder = Path(REPO_ROOT) / "benchmarks"
    names = args.names or list(KERNEL_BENCHMARKS)
    scripts = [folder / f"bench_{name}.py" for name in names]
    missing = [str(s) for s in scripts if not s.is_file()]
    if missing:
        available = sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py")) if folder.is_dir() else []
        raise CLIError(
            f"no kernel benchmark {', '.join(missing)}; run `matta bench` from a matta source checkout"
            + (f" and choose from {', '.join(available)}" if available else "")
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    failed = []
    for name, script in zip(names, scripts):
        print(f"== {name}: {sys.executable} {script}", flush=True)
        if subprocess.call([sys.executable, str(script)], cwd=REPO_ROOT, env=env) != 0:
            failed.append(name)
    if failed:
        print(f"matta bench: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------
# cost: a traced cost model of one training step (matta/costmodel)


def cmd_cost(args) -> int:
    from .costmodel.cli import run

    values, _ = _train_values(args)  # with --resume: the configuration a run in --out recorded
    return run(args, values)


# ----------------------------------------------------------------------------------------
# study


def cmd_study(args) -> int:
    from .study import run_from_args
    from .study_report import write_report

    def log(message):
        print(message, flush=True)

    study = run_from_args(args, log=log)
    path = write_report(study.out)
    log(f"matta study: wrote {path} and {study.out / 'study.png'}")
    if study.failed:
        log(f"matta study: {len(study.failed)} run(s) failed; rerun the same command to retry them")
        return 1
    return 0


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    from .study import LR_SWEEPS, PRESETS
    from .train.tasks import TASKS

    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model, data and budget (default: tiny, a CPU)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    budget.add_argument("--tokens", type=int, default=None, help="training tokens per run instead of --steps")
    p.add_argument("--out", required=True, help="study directory (runs, study.json, RESULTS.md, study.png)")
    p.add_argument("--data", default=None, help="data of every run (default: the preset's; see `matta train --data`)")
    p.add_argument("--arms", default="core",
                   help="comma list of arms (student|ta|matta|student-flops|matta-unshared|matta-wd0|teacher-student|"
                        "teacher-matta, each -adamw or -shampoo), core (default) or all")
    p.add_argument("--task", default="lm", choices=list(TASKS), help="lm (validation loss) or classify (AucLoss)")
    p.add_argument("--teacher", default=None, help="a Teacher for the teacher-* arms (run directory or HF GPT-2 folder)")
    p.add_argument("--lr", default=None, help="fixed rates instead of the sweep: adamw=3e-3,shampoo=1e-3")
    p.add_argument("--lr-sweep", default="student", choices=list(LR_SWEEPS),
                   help="student (default): the best rate of the Student alone on seed 0, for every arm; per-arm: "
                        "every arm and seed at every rate, each arm at its best mean over the seeds")
    p.add_argument("--quick", action="store_true", help="a plumbing check in a few steps of a very small model; claims nothing")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
                   help="runs side by side (default: the CPU cores)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run (default 1)")
    p.add_argument("--device", default="auto", help="device of every run: auto, cpu, cuda")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="matta", description="Matryoshka Teaching-Assistant (MatTA) training.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{train,extract,eval,lm-eval,bench,cost,study}",
                                parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a Student nested in a TA (defaults: a tiny GPT-2 on the builtin corpus)")
    _add_train_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("extract", help="cut plain models out of a trained run (Mix'n'Match)")
    p.add_argument("--run", required=True, help="run directory of `matta train`")
    p.add_argument("--spec", default="student", help="student, ta, wide_narrow_wide:K, family or all (comma list)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per model)")
    p.add_argument("--hf", action="store_true", help="write the Hugging Face GPT-2 layout (uniform-width GPT-2 only; "
                                                     "a run of --model hf:FOLDER is always written in its own layout)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("eval", help="evaluate a run's extracted models")
    p.add_argument("--run", required=True, help="run directory of `matta train`")
    p.add_argument("--models", default="student,ta,family", help="student, ta, wide_narrow_wide:K, family, all")
    p.add_argument("--tasks", default="val", help="comma list of val, lambada:PATH.jsonl, choice:PATH.jsonl")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="validation tokens (0: all; default: the run's --eval-tokens, as in its final table)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    sub.add_parser("lm-eval", add_help=False,
                   help="run lm-evaluation-harness with matta registered (arguments as for `lm_eval`: "
                        "--model matta --model_args run=RUN_DIR,stream=student --tasks ...)")

    p = sub.add_parser("bench", help="run the kernel microbenchmarks (benchmarks/bench_*.py) and print their tables")
    p.add_argument("names", nargs="*", help=f"which (default: {' '.join(KERNEL_BENCHMARKS)}; also models)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("cost", help="predict one training step on a GPU card without one (a traced cost model)")
    _add_train_flags(p)
    from .costmodel.cli import add_arguments

    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("study", help="the paper's claims as one resumable set of runs, with RESULTS.md and a plot")
    _add_study_flags(p)
    return parser


def _io_failure(exc: OSError, run_dir: Path | None) -> str:
    """One line for a failed read or write: the file, the system's reason, and (for a
    training run) the newest checkpoint it still holds."""
    where = exc.filename if exc.filename is not None else "a file"
    line = f"cannot use {where}: {exc.strerror or exc}"
    if run_dir is None:
        return line
    try:
        held = checkpoint_folders(run_dir)
    except OSError:
        held = []
    if held:
        return f"{line}; {run_dir} keeps its checkpoint at step {held[0][0]}: fix that and continue with --resume"
    return f"{line}; {run_dir} holds no checkpoint of this run yet: fix that and run the command again"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = None
    parser = build_parser()
    command = next((a for a in argv if a in ("train", "extract", "eval", "lm-eval", "bench", "cost", "study")), None)
    prog = f"matta {command}" if command else "matta"
    try:
        if command == "lm-eval":  # everything after it belongs to the harness's own parser
            at = argv.index("lm-eval")
            parser.parse_args(argv[: at + 1])
            return cmd_lm_eval(argv[at + 1 :])
        args = parser.parse_args(argv)
        args.argv = argv[argv.index(command) + 1 :] if command else []
        check_environment()
        commands = {"train": cmd_train, "extract": cmd_extract, "eval": cmd_eval, "bench": cmd_bench, "cost": cmd_cost,
                    "study": cmd_study}
        return commands[args.command](args)
    except (CLIError, *USAGE_ERRORS, FloatingPointError, BaselineError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a permission: where, and what is left
        if debug:
            raise
        print(f"{prog}: error: {_io_failure(exc, getattr(args, 'run_dir', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        hint = ("rerun the same `matta study` command to resume it" if command == "study"
                else "continue a training run with `matta train --out RUN_DIR --resume`")
        print(f"{prog}: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
