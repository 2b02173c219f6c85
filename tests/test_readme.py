"""The README is true: its code blocks run as written, and it describes the default run.

Blocks are found in README.md, whatever sections hold them:
- ```python blocks run, in order, in one scratch folder, each in a fresh namespace. A block
  that uses names it does not define (a model, logits) says so in an HTML comment right above
  it, `<!-- readme-test: NAME = EXPR; ... -->` (invisible on GitHub): that code runs first,
  with `torch` imported, and only the names it assigns reach the block. It may also put torch
  on the meta device, so that a model too large for CI is built and run on shapes alone.
- ```bash blocks marked `<!-- readme-test: run -->` run with bash in the same folder.
  Other bash blocks take too long here (installs, the main training job), so each of their
  commands is checked instead: `matta ...` with matta's argument parser, `lm_eval ...` with
  the harness's, `pip install -e ".[X]"` against pyproject.toml's extras, `pytest ...`
  against .ci/run. A `matta train --out DIR` there still leaves DIR behind for the blocks
  after it: the same command runs with a tiny model for two steps.
"""
import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest
import torch

from matta.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Appended to a parse-only `matta train` so that it leaves a small run of the same layout.
TINY_TRAIN = ["--tokenizer", "bytes", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--ffn", "64",
              "--ffn-ta", "128", "--extra-layers", "1", "--block-size", "16", "--batch-size", "4", "--max-steps", "2",
              "--warmup-steps", "1", "--eval-interval", "0", "--eval-tokens", "64", "--no-progress", "--threads", "1"]


def readme_blocks():
    """(language, code, line number, directive or None) of every fenced block."""
    blocks = []
    for m in re.finditer(r"(?:<!--\s*readme-test:\s*(.*?)\s*-->\s*\n)?```(\w*)\n(.*?)^```", README, re.S | re.M):
        line = README.count("\n", 0, m.start(2)) + 1
        blocks.append((m.group(2), m.group(3), line, m.group(1)))
    return blocks


BLOCKS = readme_blocks()
PARSE_ONLY = [b for b in BLOCKS if b[0] == "bash" and b[3] != "run"]


def shell_commands(code: str):
    """The simple commands of a shell snippet without heredocs, as argument lists."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def without_env(argv):
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def check_matta(args):
    parser = build_parser()
    if "lm-eval" in args:
        at = args.index("lm-eval")
        parser.parse_args(args[: at + 1])
        check_harness(args[at + 1 :])
    else:
        parser.parse_args(args)  # matta's parser raises CLIError on a bad command line


def check_harness(args):
    pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed (pip install -e ".[eval]")')
    from lm_eval._cli.harness import HarnessCLI

    cli = HarnessCLI()
    if not args or args[0] not in cli._subparsers.choices:
        args = ["run", *args]  # as the harness's own command inserts it
    try:
        cli._parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"lm_eval rejects {args}") from exc


def check_pip(args):
    assert args[:1] == ["install"], f"pip {args}: only `pip install` is checked"
    extras = metadata("matta").get_all("Provides-Extra")  # pyproject.toml's extras, as installed
    for arg in args[1:]:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if m:
            missing = [e for e in m.group(1).split(",") if e not in extras]
            assert not missing, f"pip install {arg}: no extra {missing} in pyproject.toml"


def check_command(argv):
    """Checks one command of a parse-only block without running it (AssertionError or the
    parser's own error if it would fail)."""
    argv = without_env(argv)
    cmd, args = argv[0], argv[1:]
    if cmd in (".", "source"):
        assert args == [".venv/bin/activate"], argv
    elif cmd in ("python", "python3") and args[:1] == ["-m"]:
        if args[1] == "matta":
            check_matta(args[2:])
        else:
            assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
    elif cmd == "matta":
        check_matta(args)
    elif cmd in ("lm_eval", "lm-eval"):
        check_harness(args)
    elif cmd == "pip":
        check_pip(args)
    elif cmd == "torchrun":
        assert "-m" in args and args[args.index("-m") + 1] == "matta", argv
        check_matta(args[args.index("-m") + 2 :])
    elif cmd == "pytest":
        assert " ".join(argv) in (ROOT / ".ci" / "run").read_text(), f"`{' '.join(argv)}` is not what .ci/run runs"
    elif cmd == "bash":
        assert (ROOT / args[0]).is_file(), f"no script {args[0]}"
    else:
        raise AssertionError(f"tests/test_readme.py has no check for `{cmd}`; add one to check_command")


@pytest.mark.parametrize("block", PARSE_ONLY, ids=[f"line{b[2]}" for b in PARSE_ONLY])
def test_long_bash_blocks_parse(block):
    for argv in shell_commands(block[1]):
        check_command(argv)


def stand_ins(setup: str) -> dict:
    """The names a directive's code assigns, after running it (with torch imported)."""
    namespace = {"torch": torch}
    exec(compile(setup, "<readme-test directive>", "exec"), namespace)
    names = set()
    for node in ast.parse(setup).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return {name: namespace[name] for name in names}


def run_block(block, env):
    language, code, line, directive = block
    if language == "python":
        namespace = {"__name__": "__readme__"}
        try:
            if directive:
                namespace.update(stand_ins(directive))
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        finally:
            torch.set_default_device(None)
    elif language == "bash" and directive == "run":
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    elif language == "bash":
        for argv in map(without_env, shell_commands(code)):
            if argv[0] == "matta" and argv[1:2] == ["train"]:
                assert main([*argv[1:], *TINY_TRAIN]) == 0


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path, monkeypatch):
    """Every python block and every bash block marked `run`, top to bottom, in one folder."""
    monkeypatch.chdir(tmp_path)
    bin_dir = str(Path(sys.executable).parent)  # `matta` as this interpreter's installation has it
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    failures, skipped = [], []
    harness = importlib.util.find_spec("lm_eval") is not None
    try:
        for block in BLOCKS:
            if not harness and re.search(r"\blm[_-]eval\b", block[1]):
                skipped.append(block[2])
                continue
            try:
                run_block(block, env)
            except Exception as exc:  # report every failing block, not only the first
                failures.append(f"README.md line {block[2]} ({block[0]}): {type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)
    assert not failures, "\n".join(failures)
    if skipped:
        pytest.skip(f"the other blocks ran; the blocks at README.md lines {skipped} need lm-evaluation-harness, "
                    'which is not installed (pip install -e ".[eval]")')


def test_readme_describes_the_default_run():
    from matta.train.config import make_config
    from matta.train import build_model

    text = " ".join(README.split())
    m = re.search(
        r"`matta train --out runs/demo` trains a tiny GPT-2 Student nested in its TA \((\d+) layers, d (\d+), "
        r"Student FFN (\d+), TA FFN (\d+) and (no|\d+) TA-only layers?\) for (\d+) steps on the built-in corpus, "
        r"tokenised with a \d+-token byte-level BPE.*? validation losses every (\d+) steps",
        text,
    )
    assert m, "the README no longer describes the default run in the form this test reads; update the test with it"
    layers, d, ffn, ffn_ta, extra, steps, every = m.groups()
    cfg = make_config({})
    model = build_model(cfg, 2048)
    assert (cfg.model, cfg.data, cfg.tokenizer) == ("gpt2-tiny", "builtin", "auto")
    assert int(layers) == model.config.n_layer and int(d) == model.config.n_embd
    assert int(ffn) == model.config.n_inner and int(ffn_ta) == model.ta_config.n_inner
    assert (0 if extra == "no" else int(extra)) == len(model.ta_only_layers)
    assert int(steps) == cfg.steps and int(every) == cfg.eval_interval
