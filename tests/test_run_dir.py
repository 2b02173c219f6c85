"""The run folder: one writer at a time, a baseline process that dies with its run, and a
metrics log that survives a torn last line. Faults are injected: a second writer, a kill -9
of the main process while its baseline trains, a half-written record."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from matta.cli import main
from matta.train import CheckpointError
from matta.train.run_dir import RunDirLock, keep_metrics_until, read_metrics

TINY = ["--tokenizer", "bytes", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--ffn", "32", "--ffn-ta", "64",
        "--block-size", "16", "--batch-size", "2", "--warmup-steps", "1", "--eval-interval", "0",
        "--eval-tokens", "64", "--no-progress", "--threads", "1", "--no-family"]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def holder(run_dir):
    """A process that holds `run_dir`'s lock until it is killed."""
    code = textwrap.dedent(f"""
        import time
        from matta.train.run_dir import RunDirLock
        with RunDirLock({str(run_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_has_one_writer_and_a_dead_one_holds_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    try:
        with pytest.raises(CheckpointError, match=rf"being written by another process \(pid {proc.pid}\)"):
            with RunDirLock(run_dir):
                pass
    finally:
        proc.kill()  # kill -9: no chance to clean up
        proc.wait()
    with RunDirLock(run_dir):  # the kernel dropped the dead holder's lock
        with RunDirLock(run_dir):  # re-entrant within a process
            pass
        other = subprocess.run([sys.executable, "-c", f"from matta.train.run_dir import RunDirLock\n"
                                                      f"with RunDirLock({str(run_dir)!r}): pass"],
                               capture_output=True, text=True, env=env())
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr  # held here: the other is refused


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_matta_train_into_a_busy_folder_is_one_line(tmp_path, corpus, capsys, resume):
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--data", str(corpus), "--max-steps", "2", "--no-baseline", *TINY]) == 0
    proc = holder(run_dir)
    try:
        capsys.readouterr()
        argv = ["train", "--out", str(run_dir), "--data", str(corpus), "--max-steps", "4", "--no-baseline", *TINY]
        assert main(argv + (["--resume"] if resume else ["--overwrite"])) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "being written by another process" in err, err
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"  # nothing was touched
    finally:
        proc.kill()
        proc.wait()


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="the baseline trains alongside only with a spare core; /proc is Linux's")
def test_the_baseline_process_dies_with_its_run(tmp_path, corpus):
    """kill -9 of the main `matta train` while its baseline trains alongside: the baseline
    process ends too (it would otherwise train on into RUN_DIR/baseline unowned)."""
    run_dir = tmp_path / "run"
    main_proc = subprocess.Popen([sys.executable, "-m", "matta", "train", "--out", str(run_dir), "--data", str(corpus),
                                  "--max-steps", "100000", *TINY], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.monotonic() + 300
        baseline_log = run_dir / "baseline" / "train.log"
        while not (baseline_log.is_file() and "steps of" in baseline_log.read_text()):
            assert main_proc.poll() is None, "the run ended before its baseline started"
            assert time.monotonic() < deadline, "the baseline never started"
            time.sleep(0.2)
        children = [pid for pid in _children(main_proc.pid) if _alive(pid)]
        assert children, "no baseline process found"
    finally:
        main_proc.kill()
        main_proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "the baseline process outlived its run"


def test_a_torn_last_record_is_dropped_and_a_damaged_one_named(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"kind": "train", "st')  # what a kill in the middle of an append leaves
    assert read_metrics(tmp_path) == records
    keep_metrics_until(tmp_path, 2)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
    path.write_text(text.replace('"step": 2', '"step": 2,,'))
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2, is not a JSON record"):
        read_metrics(tmp_path)


def test_resume_after_a_torn_metrics_line(tmp_path, corpus):
    """A kill or a full disk mid-append leaves half a line: --resume drops it and continues."""
    run_dir = tmp_path / "run"
    common = ["--out", str(run_dir), "--data", str(corpus), "--no-baseline", "--checkpoint-interval", "2",
              "--log-interval", "1", *TINY]
    assert main(["train", "--max-steps", "2", *common]) == 0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')
    assert main(["train", "--max-steps", "4", "--resume", *common]) == 0
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
