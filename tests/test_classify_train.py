"""`matta train --task classify`: the paper's production setting (a nested GAU classifier
trained on a Teacher's soft labels, scored by AucLoss) run by the same trainer as the
language models: its losses, its final table, exact resume, and the refusals."""
import dataclasses
import json

import pytest
import torch

from matta.classification import RelevanceTask, evaluate_classifier
from matta.extraction import extracted_models
from matta.losses import MatTALoss
from matta.ops.matta_loss import matta_loss_reference
from matta.train import load_run
from matta.train import ConfigError, Run, make_config, train
from matta.train.objective import Objective, mode_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def classify(tmp_path, name="run", **overrides):
    values = dict(
        out=str(tmp_path / name), task="classify", model="gau-tiny", n_layer=2, n_embd=16, ffn=8, ffn_ta=32,
        extra_layers=1, batch_size=32, max_steps=6, warmup_steps=1, log_interval=1, eval_interval=3,
        checkpoint_interval=0, progress=False, rampup_steps=2, lr=3e-3, threads=1, baseline=False,
    )
    values.update(overrides)
    return make_config(values)


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_the_final_table_scores_every_model_by_auc_loss(tmp_path):
    results = train(classify(tmp_path, baseline=True), log=lambda *a, **k: None)
    rows = {r["spec"]: r for r in results["models"]}
    assert {"student", "ta", "baseline"} <= set(rows) and any(s.startswith("wide_narrow_wide") for s in rows)
    evaluation = RelevanceTask().evaluation_set("val")
    assert results["val_examples"] == len(evaluation.ids)
    assert results["oracle_auc_loss"] == pytest.approx(evaluation.oracle_auc_loss(), abs=1e-12)
    # Each row is the AucLoss of the model cut from the saved run, on the task's validation set.
    cfg, nested, tokenizer = load_run(tmp_path / "run")
    assert tokenizer is None and cfg.block_size == RelevanceTask().seq_len
    for _, spec, model in extracted_models(nested):
        scores = evaluate_classifier(model, evaluation)
        assert rows[spec]["auc_loss"] == pytest.approx(scores["auc_loss"], abs=1e-12)
        assert rows[spec]["val_loss"] == pytest.approx(scores["teacher_loss"], abs=1e-9)
        assert results["oracle_auc_loss"] < rows[spec]["auc_loss"] < 0.5
    base_cfg, base_model, _ = load_run(tmp_path / "run" / "baseline")
    assert base_cfg.mode == "student"
    assert rows["baseline"]["auc_loss"] == pytest.approx(
        evaluate_classifier(base_model, evaluation, output=0)["auc_loss"], abs=1e-12)
    evals = records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["auc_loss_student"] == pytest.approx(rows["student"]["auc_loss"], abs=1e-12)
    assert (tmp_path / "run" / "report.png").is_file()


@pytest.mark.parametrize("mode", ["matta", "student", "ta"])
def test_the_objective_is_the_matta_loss_on_the_teachers_soft_labels(tmp_path, mode):
    cfg = classify(tmp_path, mode=mode)
    run = Run(cfg)
    run.setup()
    x, y = run.batches.take(0)[0]
    with torch.no_grad():  # a trained head's bias is not zero
        run.model.head.bias.copy_(torch.tensor([0.4, -0.3]))
    task = RelevanceTask()
    assert torch.equal(y, task.soft_labels(x))  # the targets are the Teacher's probabilities
    criterion = MatTALoss(mode_weights(mode, cfg.loss_weights), rampup_steps=2)
    criterion.ramp = criterion.ramp_at(1)
    out = Objective(run.task, run.model, criterion)(x, y)
    with torch.no_grad():
        logits_s, logits_ta = run.model(x)
    weights = {"matta": (1.0, 1.0, 1.0), "student": (1.0, 0.0, 0.0), "ta": (0.0, 1.0, 0.0)}[mode]
    expected = matta_loss_reference(logits_s.double(), logits_ta.double(), y.double(), weights=weights,
                                    ramp=criterion.ramp_at(1))
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    if mode != "ta":
        assert out.student.item() == pytest.approx(expected.student.item(), rel=1e-5)
    if mode != "student":
        assert out.ta.item() == pytest.approx(expected.ta.item(), rel=1e-5)


def test_a_killed_classifier_run_resumes_exactly(tmp_path, monkeypatch):
    straight = Run(classify(tmp_path, "straight", checkpoint_interval=3, optimizer="shampoo",
                            precondition_frequency=2, start_preconditioning_step=2))
    straight.train(report=False)
    cfg = classify(tmp_path, "broken", checkpoint_interval=3, optimizer="shampoo", precondition_frequency=2,
                   start_preconditioning_step=2)
    real_step = Run.train_step

    def crash_after_4(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Run, "train_step", crash_after_4)
    with pytest.raises(KeyboardInterrupt):
        Run(cfg).train()
    monkeypatch.setattr(Run, "train_step", real_step)
    resumed = Run(dataclasses.replace(cfg, threads=None), resume=True)
    resumed.train(report=False)
    a, b = records(tmp_path / "straight", "train"), records(tmp_path / "broken", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("changes, message", [
    (dict(model="gpt2-tiny"), "GAU classifier"),
    (dict(data="notes.txt"), "drop --data"),
    (dict(teacher="runs/teacher"), "drop --teacher"),
    (dict(task="ranking"), "--task must be one of lm, classify"),
])
def test_bad_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        cfg = classify(tmp_path, **changes)
        Run(cfg).setup()


def test_the_task_chooses_a_model_that_can_do_it(tmp_path):
    """--task classify without --model trains the task's own default, a GAU classifier."""
    assert make_config({"task": "classify"}).model == "gau-tiny" and make_config({}).model == "gpt2-tiny"
    values = {k: v for k, v in vars(classify(tmp_path, max_steps=1, eval_interval=0, family=False)).items()
              if k != "model"}
    run = Run(make_config({**values, "model": None}))
    run.setup()
    assert run.cfg.model == "gau-tiny" and run.model.architecture == "gau" and run.model.head is not None


def test_matta_loss_module_takes_soft_labels_of_a_classifier():
    """The public objective accepts (B, 2) logits and (B, 2) probabilities, as the trainer uses it."""
    logits_s, logits_ta = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    q = torch.rand(5, 1, dtype=torch.float64)
    target = torch.cat([1 - q, q], 1)
    out = MatTALoss((1.0, 1.0, 1.0))(logits_s, logits_ta, target)
    assert out.loss.item() == pytest.approx(matta_loss_reference(logits_s, logits_ta, target, weights=(1.0, 1.0, 1.0),
                                                                 ramp=1.0).loss.item(), rel=1e-9)
