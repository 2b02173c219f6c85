"""The training loop on tiny models: modes, optimizers, schedule, accumulation, exact resume, Teacher."""
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from matta.data import load_data
from matta.train import load_run
from matta.train import Run, latest_checkpoint, learning_rate, load_checkpoint, make_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, corpus, name="run", **overrides):
    values = dict(
        out=str(tmp_path / name), data=str(corpus), tokenizer="bytes", n_layer=2, n_embd=32, n_head=2, ffn=64,
        ffn_ta=128, extra_layers=1, block_size=16, batch_size=4, max_steps=4, warmup_steps=1, log_interval=1,
        eval_interval=0, checkpoint_interval=0, eval_tokens=256, progress=False, rampup_steps=2, lr=3e-3, threads=1,
    )
    values.update(overrides)
    return make_config(values)


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]


def test_learning_rate_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    warm = [learning_rate(s, **kw) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] < 1.0 and warm[0] > 0
    assert learning_rate(4, **kw) == pytest.approx(1.0)
    assert learning_rate(12, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(20, **kw) == pytest.approx(0.1) and learning_rate(99, **kw) == pytest.approx(0.1)
    decay = [learning_rate(s, **kw) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)


@pytest.mark.parametrize("mode", ["matta", "student", "ta"])
@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])
def test_modes_and_optimizers_train_end_to_end(tmp_path, corpus, mode, optimizer):
    cfg = tiny(tmp_path, corpus, mode=mode, optimizer=optimizer, max_steps=5, precondition_frequency=2,
               start_preconditioning_step=2, eval_interval=5)
    results = Run(cfg).train()
    run_dir = tmp_path / "run"
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        expected = {"matta": r["loss_student"] + r["loss_ta"] + r["ramp"] * r["loss_distill"],
                    "student": r["loss_student"], "ta": r["loss_ta"]}[mode]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert all(math.isfinite(r[k]) for k in ("loss_student", "loss_ta", "loss_distill"))
    assert [r["ramp"] for r in records] == [0.0, 0.5, 1.0, 1.0, 1.0]
    trained = {"matta": ("loss_student", "loss_ta"), "student": ("loss_student",), "ta": ("loss_ta",)}[mode]
    assert sum(records[-1][k] for k in trained) < sum(records[0][k] for k in trained)
    names = [m["name"] for m in results["models"]]
    if mode == "student":  # the rest of the TA was never trained, so only the Student is reported
        assert names == ["Student"]
    else:
        assert names[:2] == ["Student", "TA"] and any(n.startswith("wide-narrow-wide") for n in names)
        params = {m["name"]: m["params"] for m in results["models"]}
        assert params["Student"] < params["TA"]
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert json.loads((run_dir / "config.json").read_text())["mode"] == mode


def test_final_table_losses_match_the_models(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_steps=3, family=False)
    results = Run(cfg).train()
    _, model, _ = load_run(tmp_path / "run")
    data = load_data(str(corpus), block_size=16, tokenizer="bytes", seed=cfg.seed)
    blocks = data.val_blocks(256)
    logits_s, logits_ta = model(blocks[:, :-1])
    for row, logits in zip(results["models"], (logits_s, logits_ta)):
        ref = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
        assert row["val_loss"] == pytest.approx(ref, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, corpus):
    full = Run(tiny(tmp_path, corpus, "full", batch_size=4, grad_accum=1, family=False))
    full.train()
    accum = Run(tiny(tmp_path, corpus, "accum", batch_size=2, grad_accum=2, family=False))
    accum.train()
    a, b = train_records(tmp_path / "full"), train_records(tmp_path / "accum")
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    for (name, p), q in zip(full.model.named_parameters(), accum.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)


def crash_and_resume(tmp_path, corpus, monkeypatch, busy=None, config=tiny, **common):
    """An uninterrupted run, and one killed after step 4 (checkpoint at 3) then resumed
    (with `busy` entered around the broken run and the resume); returns both Runs.
    `config(tmp_path, corpus, name, **common)` makes their TrainConfigs."""
    straight = Run(config(tmp_path, corpus, "straight", **common))
    straight.train()

    cfg = config(tmp_path, corpus, "broken", **common)
    real_step = Run.train_step

    def crash_after_4(self):
        if self.step == 4:  # step 4 ran and was logged after the checkpoint at 3: a kill now
            raise KeyboardInterrupt
        return real_step(self)

    with busy if busy is not None else contextlib.nullcontext():
        monkeypatch.setattr(Run, "train_step", crash_after_4)
        with pytest.raises(KeyboardInterrupt):
            Run(cfg).train()
        monkeypatch.setattr(Run, "train_step", real_step)
        assert [r["step"] for r in train_records(tmp_path / "broken")] == [1, 2, 3, 4]
        resumed = Run(dataclasses.replace(cfg, threads=None), resume=True)  # the thread count comes from the run
        resumed.train()
    a, b = train_records(tmp_path / "straight"), train_records(tmp_path / "broken")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    return straight, resumed


@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])
def test_resume_equals_uninterrupted(tmp_path, corpus, monkeypatch, optimizer):
    crash_and_resume(tmp_path, corpus, monkeypatch, max_steps=6, checkpoint_interval=3, optimizer=optimizer,
                     precondition_frequency=2, start_preconditioning_step=2, family=False, dropout=0.1)


@contextlib.contextmanager
def busy_machine():
    """Every core kept busy by another process (what other jobs on a shared machine do)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in burners:
            p.kill()
            p.wait()


def test_resume_equals_uninterrupted_on_a_busy_machine(tmp_path, corpus, monkeypatch):
    # Two threads: OpenMP's split of the work, and so the rounding, follows the thread count;
    # the count is fixed by the run (config.json), not by the load, so the numbers are too.
    straight, resumed = crash_and_resume(tmp_path, corpus, monkeypatch, busy=busy_machine(), max_steps=6,
                                         checkpoint_interval=3, threads=2, family=False, dropout=0.1)
    assert resumed.cfg.threads == 2 and json.loads((tmp_path / "broken" / "config.json").read_text())["threads"] == 2


def test_thread_count_is_recorded_and_reused(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = Run(tiny(tmp_path, corpus, "default", threads=None, max_steps=1, family=False))
    run.train()
    assert json.loads((tmp_path / "default" / "config.json").read_text())["threads"] == 1  # the default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = tiny(tmp_path, corpus, "env", threads=None, max_steps=2, checkpoint_interval=1, family=False)
    Run(cfg).train()
    assert json.loads((tmp_path / "env" / "config.json").read_text())["threads"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # another environment later: the run's own count wins
    resumed = Run(dataclasses.replace(cfg, max_steps=3), resume=True)
    resumed.setup()
    assert torch.get_num_threads() == 2 and resumed.cfg.threads == 2
    with pytest.warns(UserWarning, match="--threads 1 differs from the 2"):
        Run(dataclasses.replace(cfg, threads=1, max_steps=3), resume=True).setup()


class _Batches:
    """A data source whose batches were cut beforehand: cutting runs on the host by design."""

    def __init__(self, source, steps, batch_size, parts):
        self.block_size = source.block_size
        self.rows = {(s, p): source.batch(s, batch_size, p, parts) for s in range(steps) for p in range(parts)}

    def batch(self, index, batch_size, rank=0, world_size=1):
        return self.rows[(index, rank)]


@pytest.mark.parametrize("mode", ["matta", "student"])  # both streams with the fused loss; one stream
def test_a_training_step_never_reads_the_device(tmp_path, corpus, monkeypatch, mode):
    run = Run(tiny(tmp_path, corpus, mode=mode, grad_accum=2, batch_size=2, max_steps=4, dropout=0.1))
    run.setup()
    run.batches.source = _Batches(run.data.train, 4, 2, 2)
    records = []
    with monkeypatch.context() as guard:
        def host_read(self, *args, **kwargs):
            raise AssertionError("a training step read a tensor on the host")

        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            guard.setattr(torch.Tensor, name, host_read)
        for _ in range(3):
            records.append(run.train_step())
    for rec in records:
        assert rec["losses"].device == run.ctx.device and rec["grad_norm"].device == run.ctx.device
    values = run.read_record(records[-1])
    assert values["step"] == 3 and all(math.isfinite(values[k]) for k in ("loss", "loss_student", "grad_norm"))


@pytest.mark.parametrize("mode", ["matta", "student"])
def test_a_nan_loss_stops_the_run_at_the_next_read(tmp_path, corpus, mode):
    run = Run(tiny(tmp_path, corpus, mode=mode, max_steps=4))
    run.setup()
    run.read_record(run.train_step())
    with torch.no_grad():
        run.model.ln_f.weight.fill_(float("nan"))
    # the fused loss may refuse NaN inputs itself (ValueError); otherwise the next read does
    with pytest.raises((FloatingPointError, ValueError), match="NaN"):
        rec = run.train_step()
        run.train_step()
        run.read_record(rec)


def test_each_step_reads_its_own_batch(tmp_path, corpus):
    """Step k trains on the k-th global batch, whether it was fetched ahead or not."""
    run = Run(tiny(tmp_path, corpus, batch_size=2, grad_accum=2, max_steps=4))
    run.setup()
    for step in range(3):
        run.schedule.apply(step)  # the step's distillation ramp, as train_step sets it
        with torch.no_grad():
            expected = [run.objective(*run.data.train.batch(step, 2, part, 2)).loss for part in (0, 1)]
        rec = run.read_record(run.train_step())
        assert rec["step"] == step + 1
        assert rec["loss"] == pytest.approx(sum(e.item() for e in expected) / 2, rel=1e-6)


def test_student_run_trains_only_the_student_stream(tmp_path, corpus):
    run = Run(tiny(tmp_path, corpus, mode="student", max_steps=2, family=False))
    run.setup()
    frozen = {id(p) for p in run.model.ta_only_parameters()}
    assert frozen and all(not p.requires_grad for p in run.model.ta_only_parameters())
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not frozen & optimized
    run.train_step()
    assert all(p.grad is None for p in run.model.ta_only_parameters())


def test_log_lines_without_a_terminal(tmp_path, corpus, capsys):
    Run(tiny(tmp_path, corpus, max_steps=6, log_interval=2, progress=True, family=False)).train()
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("train step")]
    assert [l.split()[2] for l in lines] == ["1/6:", "2/6:", "4/6:", "6/6:"]  # one per log record, no bar
    assert "\r" not in err and all("L_S" in l and "tok/s" in l for l in lines)


def test_checkpoint_holds_what_resume_reads(tmp_path, corpus):
    Run(tiny(tmp_path, corpus, max_steps=2, checkpoint_interval=1, family=False)).train()
    path = latest_checkpoint(tmp_path / "run")
    meta = json.loads((path / "state.json").read_text())
    assert set(meta) == {"format", "step", "optimizer", "state"} and meta["step"] == 2
    state = load_checkpoint(path)["state"]
    assert set(state) == {"rng"} and len(state["rng"]) == 1 and set(state["rng"][0]) == {"torch"}


def test_teacher_soft_labels_replace_the_targets(tmp_path, corpus):
    Run(tiny(tmp_path, corpus, "teacher", max_steps=3, family=False)).train()
    cfg = tiny(tmp_path, corpus, "pupil", teacher=str(tmp_path / "teacher"), max_steps=2, family=False)
    run = Run(cfg)
    run.setup()
    x, y = run.data.train.batch(0, 4)
    out = run.objective(x, y, teacher=run.teacher)  # before any step the distillation term is fully ramped
    # float64 oracle: the Teacher is the teacher run's TA; its softmax is the label of L_S and L_TA
    _, teacher_model, _ = load_run(tmp_path / "teacher")
    with torch.no_grad():
        p_t = torch.softmax(teacher_model(x)[1].double(), -1)
        z_s, z_ta = (z.double() for z in run.model(x))
    ls = -(p_t * torch.log_softmax(z_s, -1)).sum(-1).mean()
    lta = -(p_t * torch.log_softmax(z_ta, -1)).sum(-1).mean()
    assert out.student.item() == pytest.approx(ls.item(), rel=1e-4)
    assert out.ta.item() == pytest.approx(lta.item(), rel=1e-4)
    hard = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), y.reshape(-1)).item()
    assert abs(out.student.item() - hard) > 1e-3  # the one-hot targets are not used
    run.train()
    assert all(p.grad is None for p in run.teacher.parameters())


def test_teacher_with_another_vocabulary_is_refused(tmp_path, corpus):
    Run(tiny(tmp_path, corpus, "teacher", max_steps=1, family=False)).train()
    cfg = tiny(tmp_path, corpus, "pupil", teacher=str(tmp_path / "teacher"), tokenizer="auto", vocab_size=300)
    with pytest.raises(ValueError, match="same tokenizer"):
        Run(cfg).setup()


def test_tokens_budget_sets_the_steps(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_steps=None, tokens=200, family=False)  # 64 tokens per step
    run = Run(cfg)
    run.train()
    assert run.step == 4


def test_the_default_run_ends_with_the_student_trained_alone(tmp_path, corpus):
    """`train` adds the baseline row: a Student-only run on the same data, steps and seed,
    whose numbers equal those of that run made on its own."""
    results = train(tiny(tmp_path, corpus, max_steps=3, family=False), alongside=False)
    alone = Run(tiny(tmp_path, corpus, "alone", mode="student", max_steps=3, family=False)).train()
    rows = {m["spec"]: m for m in results["models"]}
    assert list(rows) == ["student", "ta", "baseline"]
    assert rows["baseline"]["val_loss"] == alone["models"][0]["val_loss"]  # bit-identical
    assert rows["baseline"]["params"] == rows["student"]["params"]
    assert all(m["about"] for m in results["models"])
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert json.loads((tmp_path / "run" / "baseline" / "config.json").read_text())["mode"] == "student"
    assert [m["spec"] for m in alone["models"]] == ["student"]  # a Student-only run reports its Student only


def test_the_baseline_alongside_in_a_second_process_gives_the_same_numbers(tmp_path, corpus):
    """With a spare core the baseline trains in a second process while the MatTA run trains:
    the same results, bit for bit, as one after the other; its output goes to its log."""
    after = train(tiny(tmp_path, corpus, "after", max_steps=3, family=False), alongside=False)
    said = []
    beside = train(tiny(tmp_path, corpus, "beside", max_steps=3, family=False), alongside=True, log=said.append)
    assert beside["models"] == after["models"]
    assert any("alongside in a second process" in line for line in said)
    assert "val loss Student" in (tmp_path / "beside" / "baseline" / "train.log").read_text()


def test_a_failed_baseline_process_is_named(tmp_path, corpus, monkeypatch):
    cfg = tiny(tmp_path, corpus, max_steps=2, family=False)
    (tmp_path / "run" / "baseline").mkdir(parents=True)
    (tmp_path / "run" / "baseline" / "checkpoints").write_text("not a folder")  # the child cannot checkpoint
    with pytest.raises(RuntimeError, match="baseline run .* failed"):
        train(cfg, alongside=True, log=lambda *a: None)


def test_no_baseline_for_single_stream_runs_or_when_switched_off(tmp_path, corpus):
    for name, overrides in (("ta", dict(mode="ta")), ("off", dict(baseline=False))):
        results = train(tiny(tmp_path, corpus, name, max_steps=1, family=False, **overrides))
        assert "baseline" not in [m["spec"] for m in results["models"]]
        assert not (tmp_path / name / "baseline").exists()


def test_a_run_killed_in_its_baseline_resumes_exactly(tmp_path, corpus, monkeypatch):
    common = dict(max_steps=4, checkpoint_interval=2, family=False)
    straight = train(tiny(tmp_path, corpus, "straight", **common))
    cfg = tiny(tmp_path, corpus, "broken", **common)
    real_step = Run.train_step

    def crash_in_baseline(self):
        if self.cfg.mode == "student" and self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Run, "train_step", crash_in_baseline)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, alongside=False)  # in this process, where the crash is patched in
    monkeypatch.setattr(Run, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert resumed == straight | {"models": resumed["models"]}
    assert [m["val_loss"] for m in resumed["models"]] == [m["val_loss"] for m in straight["models"]]
    losses = lambda run: [(r["step"], r["loss"]) for r in train_records(tmp_path / run / "baseline")]  # noqa: E731
    assert losses("broken") == losses("straight")
