"""The synthetic relevance task: determinism, batches, the ground truth and the Teacher, and
AucLoss evaluation of classifiers."""
import math

import pytest
import torch
from torch import nn

from matta.classification import RelevanceTask, classifier_scores, evaluate_classifier
from matta.metrics import auroc
from matta.models import GAUConfig, NestedGAU, NestingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return RelevanceTask()


class FixedScorer(nn.Module):
    """A 'classifier' whose logits are (0, score(ids)) for a given scoring function."""

    def __init__(self, score):
        super().__init__()
        self.score = score
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        s = self.score(ids).float()
        return torch.stack([torch.zeros_like(s), s], dim=1) + 0 * self.dummy


def test_deterministic_by_task_seed(task):
    again = RelevanceTask()
    ids = task.examples("val", 64)
    assert torch.equal(ids, again.examples("val", 64))
    assert torch.equal(task.logit(ids), again.logit(ids))
    assert torch.equal(task.labels(ids, "val"), again.labels(ids, "val"))
    other = RelevanceTask(seed=1)
    assert not torch.equal(other.examples("val", 64), ids)
    assert not torch.allclose(other.logit(ids), task.logit(ids))
    assert not torch.equal(task.examples("test", 64), ids)
    half = task.vocab_size // 2
    assert ids.shape == (64, task.seq_len) and ids.dtype == torch.int64
    assert ids[:, : task.user_len].max() < half <= ids[:, task.user_len :].min()


def test_batches_are_pure_functions_of_seed_and_index(task):
    stream = task.batches(seed=7)
    x, y = stream.batch(3, 8)
    x2, y2 = task.batches(seed=7).batch(3, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(task.batches(seed=8).batch(3, 8)[0], x)
    assert not torch.equal(stream.batch(4, 8)[0], x)
    whole, whole_y = stream.batch(5, 6)  # three ranks of two rows each see the same six examples
    parts = [stream.batch(5, 2, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
    assert y.shape == (8, 2) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    torch.testing.assert_close(y[:, 1].double(), task.teacher_probability(x), atol=1e-7, rtol=0)


def test_ground_truth_teacher_and_interactions(task):
    ev = task.evaluation_set("val", 8192)
    assert ev.labels.float().mean().item() == pytest.approx(0.5, abs=0.05)
    logit = task.logit(task.examples("reference", 8192))
    assert logit.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert logit.std().item() == pytest.approx(task.sharpness, rel=1e-9)
    oracle, teacher = ev.oracle_auc_loss(), ev.teacher_auc_loss()
    unary = 1 - auroc(task._tables["unary"][ev.ids].mean(1), ev.labels)
    assert 0.02 < oracle < teacher < unary  # the Teacher errs a little; the interactions matter most
    assert unary > 2 * oracle
    perfect = evaluate_classifier(FixedScorer(task.logit), ev)
    assert perfect["auc_loss"] == pytest.approx(oracle, abs=1e-12)
    assert perfect["auroc"] == pytest.approx(1 - oracle, abs=1e-12)
    # A model that outputs the Teacher's log-odds has the Teacher's entropy as its loss.
    q = ev.soft_labels[:, 1].double()
    as_teacher = evaluate_classifier(FixedScorer(lambda ids: torch.logit(task.teacher_probability(ids))), ev)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).mean().item()
    assert as_teacher["teacher_loss"] == pytest.approx(entropy, abs=1e-5)
    assert as_teacher["auc_loss"] == pytest.approx(teacher, abs=1e-6)


def test_nested_classifier_scores(task):
    ev = task.evaluation_set("val", 100)
    model = NestedGAU(GAUConfig(vocab_size=task.vocab_size, n_positions=task.seq_len, n_embd=16, n_layer=1,
                                expansion=16, attn_dim=8, num_classes=2), NestingConfig())
    with pytest.raises(TypeError, match="output=0"):
        classifier_scores(model, ev.ids)
    scores = classifier_scores(model, ev.ids, batch_size=33, output=1)
    logits = model(ev.ids)[1]
    torch.testing.assert_close(scores, (logits[:, 1] - logits[:, 0]).double())
    result = evaluate_classifier(model, ev, output=0)
    assert 0 <= result["auc_loss"] <= 1 and math.isfinite(result["teacher_loss"])
    three = NestedGAU(GAUConfig(vocab_size=task.vocab_size, n_positions=task.seq_len, n_embd=16, n_layer=1,
                                expansion=16, attn_dim=8, num_classes=3))
    with pytest.raises(ValueError, match="two-class"):
        classifier_scores(three, ev.ids, output=0)


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": 7}, "even"),
    ({"features": 0}, "positive int"),
    ({"sharpness": 0.0}, "positive"),
    ({"teacher_noise": -1.0}, ">= 0"),
])
def test_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        RelevanceTask(**changes)


def test_bad_ids(task):
    ids = task.examples("val", 4)
    with pytest.raises(ValueError, match="tensor of token ids"):
        task.logit(ids[:, :-1])
    swapped = torch.cat([ids[:, task.user_len :], ids[:, : task.user_len]], dim=1)
    with pytest.raises(ValueError, match="user tokens"):
        task.logit(swapped)
