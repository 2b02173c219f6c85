"""No fault loses a run: `matta train` killed at each point of a checkpoint write, a disk that
fills during one, a read-only run folder and damaged checkpoints, all through the real CLI.

After each fault the run continues (with --resume, or by rerunning the same command when no
checkpoint was complete) and ends bit-identical to a run that never failed; an I/O failure
ends in one line naming the file and what the run keeps, with exit code 2 and no partial
files left behind.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import matta
import matta.train.checkpoint as ckpt_mod
from matta.cli import main
from matta.train.checkpoint import latest_checkpoint, load_checkpoint

# Checkpoints at steps 2 and 4; the faults strike the first one.
TINY = ["--tokenizer", "bytes", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--ffn", "32", "--ffn-ta", "64",
        "--block-size", "8", "--batch-size", "2", "--max-steps", "4", "--checkpoint-interval", "2",
        "--warmup-steps", "1", "--eval-interval", "0", "--eval-tokens", "64", "--no-progress", "--threads", "1",
        "--log-interval", "1", "--no-baseline", "--no-family"]
SOURCE_ROOT = str(Path(matta.__file__).resolve().parents[1])  # the matta under test, for subprocesses

# Runs `matta train` and SIGKILLs it at one point of writing checkpoint step 2.
KILLER = r"""
import os, signal, sys
import matta.train.checkpoint as ck
from matta.cli import main

point, argv = sys.argv[1], sys.argv[2:]
first = ".step_0000002.tmp-"
real_save, real_replace = ck.save_file, os.replace
saved = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_file(tensors, filename, *args, **kwargs):
    if first in str(filename):
        saved.append(filename)
        if point == "before_weights" or (point == "between_files" and len(saved) == 2):
            die()
        if point == "mid_weights":
            real_save(tensors, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)
            die()
    return real_save(tensors, filename, *args, **kwargs)

def replace(src, dst):
    if point == "torn_latest" and os.path.basename(str(dst)) == "latest":
        with open(dst, "w") as f:
            f.write("step_00")
        die()
    real_replace(src, dst)
    if point == "after_rename" and first in os.path.basename(str(src)):
        die()

ck.save_file = save_file
os.replace = replace
sys.exit(main(argv))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, word_corpus):
    """The final weights of the run that nothing interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--out", str(run), "--data", str(word_corpus), *TINY]) == 0
    return load_checkpoint(latest_checkpoint(run))["model"]


def final_weights(run):
    return load_checkpoint(latest_checkpoint(run))["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(run):
    """What killed or failed writes left: temporary folders and files."""
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name) if root.is_dir() else []


def one_line_error(capsys, argv):
    """Runs the CLI in-process; returns its error line (checks exit code 2, one line, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("matta"), err
    return err


@pytest.mark.parametrize("point", ["before_weights", "mid_weights", "between_files", "after_rename", "torn_latest"])
def test_kill_at_each_point_of_a_checkpoint_write(tmp_path, word_corpus, reference, capsys, point):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--data", str(word_corpus), *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")])))
    killed = subprocess.run([sys.executable, "-c", KILLER, point, *argv], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point in ("after_rename", "torn_latest"):  # step 2 is complete: a plain rerun says to resume it
        err = one_line_error(capsys, argv)
        assert "checkpoint at step 2" in err and "--resume" in err
        assert main([*argv, "--resume"]) == 0
        assert "resumed from" in capsys.readouterr().out
    else:  # nothing complete to resume: --resume says so, the same command starts over
        assert "no checkpoint" in one_line_error(capsys, [*argv, "--resume"])
        assert main(argv) == 0
    assert same_weights(final_weights(run), reference)
    assert leftovers(run) == []


def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, word_corpus, reference, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(word_corpus), *TINY, "--checkpoint-interval", "1"]) == 0
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # one bit of one weight changed on disk
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.warns(UserWarning, match="step_0000004.*SHA-256"):
        assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "step_0000003 at step 3" in capsys.readouterr().out
    assert same_weights(final_weights(run), reference)
    # with no intact checkpoint left, one line names the damage and the way out
    for step in ("step_0000003", "step_0000004"):
        (run / "checkpoints" / step / "rng.safetensors").write_bytes(b"damaged")
    err = one_line_error(capsys, ["train", "--out", str(run), "--resume"])
    assert "is intact" in err and "rng.safetensors" in err and "--overwrite" in err


def test_resume_refuses_another_optimizer_before_training(tmp_path, word_corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(word_corpus), *TINY, "--max-steps", "2"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "4", "--optimizer", "shampoo"])
    assert "--optimizer shampoo" in err and "started with --optimizer adamw" in err
    err = one_line_error(capsys, ["train", "--out", str(run), "--resume", "--n-embd", "32"])
    assert "--n-embd 32" in err and "started with --n-embd 16" in err
    assert "matta: resumed" not in capsys.readouterr().out
    # the same data file named another way is the same data
    other_name = f"{word_corpus.parent}/./{word_corpus.name}"
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--data", other_name]) == 0
    assert "resumed from" in capsys.readouterr().out


def _raise_full_disk(real_save, at):
    """A save_file that fills the disk in the middle of the `at`-th file of checkpoint step 4."""
    calls = []

    def save(tensors, filename, *args, **kwargs):
        if ".step_0000004.tmp-" not in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        calls.append(filename)
        if len(calls) == at:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 100)
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                                  f'path "{filename}"')
        return real_save(tensors, filename, *args, **kwargs)

    return save


def test_full_disk_during_a_checkpoint_is_one_line_and_resumable(tmp_path, word_corpus, reference, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--data", str(word_corpus), *TINY]
    monkeypatch.setattr(ckpt_mod, "save_file", _raise_full_disk(ckpt_mod.save_file, at=2))
    err = one_line_error(capsys, argv)
    assert "No space left on device" in err and "optimizer.safetensors" in err
    assert f"{run} keeps its checkpoint at step 2" in err and "--resume" in err
    assert leftovers(run) == []
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert same_weights(final_weights(run), reference)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (root only: where mounting is not allowed, the test is skipped)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_really_full_disk(tmp_path, word_corpus, capsys):
    """A 96 KiB tmpfs holds the run's small files and the model weights of the first
    checkpoint, but not its optimizer state."""
    with tmpfs(tmp_path / "disk", "96k") as disk:
        run = disk / "run"
        err = one_line_error(capsys, ["train", "--out", str(run), "--data", str(word_corpus), *TINY])
        assert "No space left on device" in err and str(run) in err and "no checkpoint" in err
        assert leftovers(run) == []
        assert not any(p.name.startswith(".") and p.name != ".lock" for p in run.rglob("*")), sorted(run.rglob("*"))


def _make_read_only(folder: Path):
    """Real EROFS/EACCES: a tmpfs remounted read-only (root ignores file modes), else chmod."""
    if os.geteuid() == 0:
        result = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
        assert result.returncode == 0, result.stderr
    else:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)


def test_read_only_run_folder(tmp_path, word_corpus, capsys):
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(tmp_path / "disk", "4m")) if os.geteuid() == 0 else tmp_path / "disk"
        disk.mkdir(exist_ok=True)
        run = disk / "run"
        assert main(["train", "--out", str(run), "--data", str(word_corpus), *TINY, "--max-steps", "2"]) == 0
        before = sorted(str(p) for p in run.rglob("*"))
        if os.geteuid() == 0:  # root ignores file modes: remount the tmpfs read-only
            result = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
            assert result.returncode == 0, result.stderr
        else:
            for p in [disk, *disk.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            stack.callback(lambda: [p.chmod(0o755) for p in [disk, *disk.rglob("*")] if p.is_dir()])
        err = one_line_error(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "4"])
        assert ("Read-only file system" in err or "Permission denied" in err) and str(run) in err
        assert f"{run} keeps its checkpoint at step 2" in err
        assert sorted(str(p) for p in run.rglob("*")) == before
