"""Bad values for `matta train` and `matta extract`, flag by flag and key by key: each row is
the arguments, a fragment of the one-line error, exit code 2 and no traceback.

Every row fails before a model is built (the numbers, paths and TOML files are checked by
matta.train.config; the data by matta.data), so the table runs in seconds.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import matta
from matta.cli import main

SOURCE_ROOT = str(Path(matta.__file__).resolve().parents[1])

TOML = {
    "max_steps_true": "max_steps = true\n",
    "max_steps_float": "max_steps = 2.5\n",
    "model_table": "[model]\nn_layer = 1\n",
    "unknown_table": "[train]\nmax_steps = 2\n[wandb]\nproject = \"x\"\n",
    "out_number": "out = 5\n",
    "bool_weights": "loss_weights = [true, 1, 1]\n",
    "share_one": "share_weights = 1\n",
    "twice": "max_steps = 2\n[train]\nmax-steps = 3\n",
    "lr_inf": "lr = inf\n",
    "not_toml": "max_steps = [\n",
    "misspelt": "learning_rat = 3\n",
    "many": 'batch_size = "many"\n',
}

ROWS = [
    # integers: integral, finite, in range
    (["train", "--max-steps", "abc"], "--max-steps must be an integer, got 'abc'"),
    (["train", "--max-steps", "2.5e0"], "--max-steps must be an integer, got '2.5e0'"),
    (["train", "--max-steps", "1e400"], "--max-steps must be an integer, got '1e400'"),
    (["train", "--max-steps", "0x10"], "--max-steps must be an integer"),
    (["train", "--tokens", "nan"], "--tokens must be an integer"),
    (["train", "--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 2**63 - 1"),
    (["train", "--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1"),
    (["train", "--batch-size", "0"], "--batch-size must be an integer from 1"),
    (["train", "--vocab-size", "0"], "--vocab-size must be an integer from 1"),
    (["train", "--optimizer", "shampoo", "--start-preconditioning-step", "0"],
     "--start-preconditioning-step must be an integer from 1"),
    (["train", "--threads", "-1"], "--threads must be an integer from 0"),
    (["train", "--config", "{max_steps_true}"], "--max-steps must be an integer, got True"),
    (["train", "--config", "{max_steps_float}"], "--max-steps must be an integer, got 2.5"),
    # real numbers: finite, in range
    (["train", "--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["train", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["train", "--config", "{lr_inf}"], "--lr must be a finite number > 0, got inf"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["train", "--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["train", "--dropout", "nan"], "--dropout must be a finite number in [0, 1)"),
    (["train", "--beta2", "inf"], "--beta2 must be a finite number in (0, 1]"),
    (["train", "--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["train", "--val-fraction", "1.5"], "--val-fraction must be a finite number in (0, 1)"),
    (["train", "--lr", "0.1", "--min-lr", "1"], "--min-lr must be in [0, --lr=0.1], got 1.0"),
    (["train", "--loss-weights", "1,2"], "--loss-weights must be three numbers w_S,w_TA,w_D, got '1,2'"),
    (["train", "--loss-weights", "inf,1,1"], "--loss-weights must be three finite numbers >= 0"),
    (["train", "--loss-weights", "1,-1,1"], "--loss-weights must be three finite numbers >= 0"),
    (["train", "--loss-weights", "0,0,0"], "with --mode matta, one of w_S, w_TA, w_D must be > 0"),
    (["train", "--mode", "student", "--loss-weights", "0,1,1"], "with --mode student, w_S must be > 0"),
    (["train", "--config", "{bool_weights}"], "--loss-weights must be three numbers"),
    # combinations
    (["train", "--max-steps", "3", "--tokens", "100"], "give --max-steps or --tokens, not both"),
    (["train", "--parallel", "fsdp", "--optimizer", "shampoo"], "--parallel fsdp works with --optimizer adamw only"),
    # text, choices, switches
    (["train", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    (["train", "--config", "{out_number}"], "--out must be a string, got 5"),
    (["train", "--config", "{share_one}"], "--share-weights must be true or false, got 1"),
    # paths
    (["train", "--out", ""], "--out must be a non-empty string"),
    (["train", "--out", "{file}"], "a_file is a file, not a folder"),
    (["train", "--out", "{file}/run"], "a_file is a file, not a folder"),
    (["extract", "--run", "{tmp}", "--out", "{file}"], "a_file is a file, not a folder"),
    (["extract", "--run", "{tmp}", "--out", "{file}/models"], "a_file is a file, not a folder"),
    (["extract", "--run", "{tmp}", "--out", ""], "--out must name a folder, got ''"),
    # TOML files, tables and keys
    (["train", "--config", "{tmp}/none.toml"], "does not exist"),
    (["train", "--config", "{not_toml}"], "is not valid TOML"),
    (["train", "--config", "{misspelt}"], "unknown key 'learning_rat'"),
    (["train", "--config", "{many}"], "--batch-size must be an integer, got 'many'"),
    (["train", "--config", "{model_table}"], "unknown table [model]"),
    (["train", "--config", "{unknown_table}"], "unknown table [wandb]"),
    (["train", "--config", "{twice}"], "'max-steps' is given twice"),
    # data
    (["train", "--data", "{train_only}"], "has train.bin but no val.bin"),
    (["train", "--data", "{val_only}"], "has val.bin but no train.bin"),
    (["train", "--data", "{uint16_bin}", "--bin-dtype", "uint32"], "pass --bin-dtype uint16"),
    (["train", "--data", "{uint32_bin}"], "pass --bin-dtype uint32"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    out = {"tmp": str(tmp), "file": str(tmp / "a_file")}
    (tmp / "a_file").write_text("not a folder\n")
    for name, text in TOML.items():
        (tmp / f"{name}.toml").write_text(text)
        out[name] = str(tmp / f"{name}.toml")
    ids = np.random.default_rng(0).integers(1, 300, 4000)
    ids.astype(np.uint16).tofile(tmp / "u16.bin")
    ids.astype(np.uint32).tofile(tmp / "u32.bin")
    out.update(uint16_bin=str(tmp / "u16.bin"), uint32_bin=str(tmp / "u32.bin"))
    for name, present in (("train_only", "train.bin"), ("val_only", "val.bin")):
        (tmp / name).mkdir()
        ids.astype(np.uint16).tofile(tmp / name / present)
        out[name] = str(tmp / name)
    return out


def _argv(row, paths):
    """The row's arguments; `train` rows first get an --out of their own and a short run, so that
    a row that wrongly passes trains one step there, not the default 200 steps into ./runs."""
    argv = [a.format(**paths) for a in row]
    if argv[0] == "train":
        out = os.path.join(paths["tmp"], "run-" + "-".join(row[1:]).replace("/", "_").replace("{", "").replace("}", ""))
        argv[1:1] = ["--out", out, "--max-steps", "1", "--no-baseline"]
    return argv


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row, message", ROWS, ids=[" ".join(r[1:]) for r, _ in ROWS])
def test_bad_value_is_one_line_and_exit_2(capsys, paths, row, message):
    capsys.readouterr()
    assert main(_argv(row, paths)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"matta {row[0]}: error: ") and message in err, err


def test_threads_beyond_the_machine(paths):
    """libgomp crashes (SIGSEGV) creating 100000 threads: a subprocess, so that a regression
    cannot take the test session down with it."""
    argv = _argv(["train", "--threads", "100000"], paths)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "matta", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and f"more than the {os.cpu_count()} CPUs of this machine" in err, err
    env["OMP_NUM_THREADS"] = "100000"
    done = subprocess.run([sys.executable, "-m", "matta", *argv[:-2]], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 2 and "$OMP_NUM_THREADS 100000 is more than" in done.stderr, done.stderr[-2000:]
