"""The `matta` command line: end to end (train, extract, eval) and every usage error path."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from matta.cli import main

TINY = ["--tokenizer", "bytes", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--ffn", "64", "--ffn-ta", "128",
        "--extra-layers", "1", "--block-size", "16", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1",
        "--eval-interval", "0", "--eval-tokens", "256", "--no-progress", "--threads", "1", "--log-interval", "1"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, word_corpus):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--out", str(run), "--data", str(word_corpus), *TINY]) == 0
    return run


def run_error(capsys, argv):
    """Runs the CLI in-process; returns its one-line error message (checks code 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("matta")
    return err


def cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "matta", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_end_to_end_train_extract_eval(tmp_path, word_corpus):
    run = tmp_path / "run"
    out = cli("train", "--out", str(run), "--data", str(word_corpus), *TINY)
    assert out.returncode == 0, out.stderr
    assert "Student" in out.stdout and "TA" in out.stdout and "perplexity" in out.stdout
    assert "wide-narrow-wide k=" in out.stdout
    for name in ("config.json", "metrics.jsonl", "results.json", "report.png", "tokenizer.json", "model.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"

    models = tmp_path / "models"
    out = cli("extract", "--run", str(run), "--spec", "all", "--out", str(models))
    assert out.returncode == 0, out.stderr
    folders = sorted(p.name for p in models.iterdir())
    assert folders[:2] == ["student", "ta"] and any(f.startswith("wide_narrow_wide") for f in folders)

    from matta.extraction import extract
    from matta.hf import load_extracted
    from matta.train import load_run

    _, nested, _ = load_run(run)
    student = load_extracted(models / "student")
    idx = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(student(idx), extract(nested, "student")(idx))

    hf = tmp_path / "hf"
    out = cli("extract", "--run", str(run), "--spec", "student", "--out", str(hf), "--hf")
    assert out.returncode == 0, out.stderr
    assert (hf / "student" / "config.json").is_file() and (hf / "student" / "model.safetensors").is_file()

    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("\n".join(json.dumps({"text": t}) for t in ["the cat sat", "a dog ran far"]))
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"context": "the cat", "choices": [" sat", " xq"], "label": 0}) + "\n")
    out = cli("eval", "--run", str(run), "--models", "student,ta", "--tasks", f"val,lambada:{lambada},choice:{choice}")
    assert out.returncode == 0, out.stderr
    result = json.loads((run / "eval.json").read_text())
    assert [m["name"] for m in result["models"]] == ["Student", "TA"]
    row = result["models"][0]
    assert {"val_loss", "perplexity", "lambada:lambada acc", "choice:choice acc_norm"} <= set(row)
    final = json.loads((run / "results.json").read_text())["models"][0]
    assert row["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)  # same model, same validation set


def test_toml_config(tmp_path, word_corpus, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[train]\ndata = "{word_corpus}"\nmax-steps = 2\nmode = "student"\nloss_weights = [1.0, 0.0, 0.0]\n')
    run = tmp_path / "run"
    args = [a for a in TINY]
    i = args.index("--max-steps")
    del args[i : i + 2]
    assert main(["train", "--out", str(run), "--config", str(cfg), *args, "--no-family"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["mode"] == "student" and saved["data"] == str(word_corpus)
    # flags win over the file
    assert main(["train", "--out", str(tmp_path / "r2"), "--config", str(cfg), *args, "--max-steps", "1",
                 "--no-family"]) == 0
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["max_steps"] == 1


def test_resume_continues_a_finished_run(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--no-family"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--mode", "foo"], "invalid choice"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["train", "--parallel", "zero3"], "invalid choice"),
        ([], "required"),
        (["extract", "--spec", "student"], "required"),
    ],
)
def test_flag_errors(capsys, argv, message):
    """What argparse refuses; the values of the flags are tests/test_faults_cli.py's table."""
    assert message in run_error(capsys, argv)


def test_data_model_memory_device_errors(tmp_path, word_corpus, capsys):
    out = ["--out", str(tmp_path / "r")]
    err = run_error(capsys, ["train", *out, *TINY, "--data", str(tmp_path / "missing.txt")])
    assert "does not exist" in err and "--data" in err
    err = run_error(capsys, ["train", *out, *TINY, "--data", str(word_corpus), "--model", "gpt5"])
    assert "unknown model 'gpt5'" in err and "gpt2-tiny" in err
    err = run_error(capsys, ["train", *out, *TINY, "--data", str(word_corpus), "--batch-size", "50000000"])
    assert "GiB" in err and "smaller" in err
    err = run_error(capsys, ["train", *out, *TINY, "--data", str(word_corpus), "--n-head", "5"])
    assert "n_head" in err
    if not torch.cuda.is_available():
        err = run_error(capsys, ["train", *out, *TINY, "--data", str(word_corpus), "--device", "cuda"])
        assert "no CUDA" in err and "--device cpu" in err


def test_run_directory_errors(trained, tmp_path, word_corpus, capsys):
    err = run_error(capsys, ["train", "--out", str(trained), "--data", str(word_corpus), *TINY])
    assert "holds a run with a checkpoint at step 3" in err and "--resume" in err
    err = run_error(capsys, ["train", "--out", str(tmp_path / "fresh"), "--resume"])
    assert "no run" in err
    err = run_error(capsys, ["train", "--out", str(trained), "--resume", "--n-embd", "64", "--n-head", "2"])
    assert "--n-embd 64" in err and "started with --n-embd 32" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained, corrupt)
    weights = corrupt / "checkpoints" / "step_0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = run_error(capsys, ["train", "--out", str(corrupt), "--resume"])
    assert "is intact" in err and "model.safetensors" in err
    err = run_error(capsys, ["eval", "--run", str(corrupt)])
    assert "is intact" in err and "model.safetensors" in err
    err = run_error(capsys, ["eval", "--run", str(tmp_path)])
    assert "not a matta run directory" in err
    # --overwrite replaces an existing run
    assert main(["train", "--out", str(corrupt), "--data", str(word_corpus), *TINY, "--overwrite", "--no-family"]) == 0


def test_eval_and_extract_errors(trained, tmp_path, capsys):
    assert "unknown task" in run_error(capsys, ["eval", "--run", str(trained), "--tasks", "val,squad"])
    err = run_error(capsys, ["eval", "--run", str(trained), "--models", "student", "--tasks", "lambada:/no/file.jsonl"])
    assert "does not exist" in err
    err = run_error(capsys, ["extract", "--run", str(trained), "--spec", "medium", "--out", str(tmp_path / "x")])
    assert "unknown model spec" in err
    err = run_error(capsys, ["extract", "--run", str(trained), "--spec", "wide_narrow_wide:3", "--out", str(tmp_path)])
    assert "even number" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["train", "--debug", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")])


def test_bench_without_benchmarks(monkeypatch, tmp_path, capsys):
    import matta._source_tree

    monkeypatch.setattr(matta._source_tree, "REPO_ROOT", str(tmp_path))
    assert "no kernel benchmark" in run_error(capsys, ["bench"])
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_fake.py").write_text("print('fake table')\n")
    assert "choose from fake" in run_error(capsys, ["bench", "nothing"])
    capsys.readouterr()
    assert main(["bench", "fake"]) == 0


def test_python_dash_m_usage_error():
    out = cli("train", "--mode", "nope")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "invalid choice" in out.stderr
