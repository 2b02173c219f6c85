"""AUROC / AucLoss against a float64 brute-force pair count and, where installed, sklearn."""
import pytest
import torch

from matta.metrics import auc_loss, auroc


def pairwise_auroc(scores, labels, weights=None):
    """The definition: over all (positive, negative) pairs, 1 if the positive scores higher,
    1/2 on a tie, weighted by w_i w_j; float64, O(n^2)."""
    s, y = scores.double(), labels.bool()
    w = torch.ones_like(s) if weights is None else weights.double()
    sp, sn, wp, wn = s[y], s[~y], w[y], w[~y]
    wins = (sp[:, None] > sn[None, :]).double() + 0.5 * (sp[:, None] == sn[None, :]).double()
    return ((wp[:, None] * wn[None, :]) * wins).sum().item() / (wp.sum() * wn.sum()).item()


def random_case(n, n_distinct=None, dtype=torch.float32):
    labels = torch.rand(n) < torch.rand(()).clamp(0.1, 0.9)
    labels[0], labels[1] = True, False  # both classes present
    if n_distinct is None:
        scores = torch.randn(n, dtype=dtype) + labels.to(dtype)
    else:  # few distinct values: many ties, within and across classes
        scores = torch.randint(n_distinct, (n,)).to(dtype) + 0.5 * labels.to(dtype) * torch.randint(2, (n,)).to(dtype)
    return scores, labels


@pytest.mark.parametrize("n", [2, 3, 17, 1001])
@pytest.mark.parametrize("n_distinct", [None, 1, 3, 40])
def test_matches_pairwise_definition(n, n_distinct):
    scores, labels = random_case(n, n_distinct)
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    weights = torch.rand(n) * 3
    assert auroc(scores, labels, weights) == pytest.approx(pairwise_auroc(scores, labels, weights), abs=1e-12)


def test_known_values_and_loss():
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's documented example
    assert auc_loss([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.25
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([False, True])) == 1.0


def test_invariant_to_monotone_transforms_and_order():
    scores, labels = random_case(300, 20)
    perm = torch.randperm(300)
    base = auroc(scores, labels)
    assert auroc(scores[perm], labels[perm]) == pytest.approx(base, abs=1e-12)
    assert auroc(torch.exp(scores.double() / 10) * 7 - 2, labels) == pytest.approx(base, abs=1e-12)
    assert auroc(-scores, labels) == pytest.approx(1 - base, abs=1e-12)
    integer_weights = torch.randint(0, 4, (300,))
    integer_weights[:2] = 1
    repeated = auroc(scores.repeat_interleave(integer_weights), labels.repeat_interleave(integer_weights))
    assert auroc(scores, labels, integer_weights) == pytest.approx(repeated, abs=1e-12)


def test_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    for n_distinct in (None, 2, 25):
        scores, labels = random_case(2001, n_distinct)
        weights = torch.rand(2001)
        assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
        expected = metrics.roc_auc_score(labels.numpy(), scores.numpy(), sample_weight=weights.numpy())
        assert auroc(scores, labels, weights) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "scores, labels, kwargs, message",
    [
        ([0.1, 0.2], [1, 1], {}, "both classes"),
        ([0.1, 0.2], [0, 0], {}, "both classes"),
        ([], [], {}, "both classes"),
        ([0.1, 0.2, 0.3], [0, 1], {}, "same length"),
        ([0.1, float("nan")], [0, 1], {}, "NaN"),
        ([0.1, float("inf")], [0, 1], {}, "NaN or inf"),
        ([0.1, 0.2], [0, 0.7], {}, "0 or 1"),
        ([[0.1, 0.2]], [[0, 1]], {}, "one-dimensional"),
        ([0.1, 0.2], [0, 1], {"sample_weight": [1.0]}, "one entry per example"),
        ([0.1, 0.2], [0, 1], {"sample_weight": [1.0, -1.0]}, "non-negative"),
        ([0.1, 0.2], [0, 1], {"sample_weight": [0.0, 1.0]}, "both classes"),
    ],
)
def test_bad_input_is_refused(scores, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels, **kwargs)
