"""The paper's production setting in miniature: soft-label classification scored by AucLoss.

The deployed MatTA model of the paper (Section 4.1, Tables 1, 3, 4) is a GAU classifier of
{user, context, item} features, trained on soft labels from a large Teacher and scored by
AucLoss = 1 - AUROC. `RelevanceTask` is a synthetic stand-in with a known ground truth, so
that a study can run it anywhere, without data, and know how far every model is from the
best possible score.

The generator (all tables drawn once from `seed`; nothing is downloaded):
- An example is `user_len` user tokens, ids in [0, V/2), followed by `item_len` item
  tokens, ids in [V/2, V) (V = `vocab_size`), each drawn uniformly. The id tells a token's
  side, so a model without absolute positions (GAU) can tell the two apart.
- Every user id has `features` random values A[id, :], every item id B[id, :] (N(0, 1)).
  The user summary is u = sqrt(user_len) * mean of A over the user tokens, the item
  summary v likewise from B (each ~N(0, 1)).
- Relevance logit: f(x) = sharpness * standardise( sum_h s_h tanh(u_h) tanh(v_h)
  + unary_weight * sqrt(len) * mean_i c[x_i] ), with random signs s_h and a random
  per-id unary table c. The `features` products of user and item summaries are the
  interactions: a model needs a feature per product to score well, so a wider model
  (more features) does better, while the unary part is easy for every model.
  `standardise` subtracts the mean and divides by the standard deviation over a fixed
  reference sample (drawn from the task seed), so the classes are about balanced and
  `sharpness` alone sets how separable they are.
- Ground truth: p(x) = sigmoid(f(x)). Test labels are drawn once, y ~ Bernoulli(p(x)),
  from the task seed; AucLoss is measured against them. The ground-truth scorer itself
  reaches `oracle_auc_loss()` on them, the floor no model can beat except by luck.
- The Teacher, whose soft labels a Student is trained on, is the ground-truth scorer with
  an error of its own and a temperature: q(x) = sigmoid((f(x) + teacher_noise * e(x)) /
  teacher_temperature), where e(x) = sqrt(len) * mean_i E[x_i, i] / std is a fixed
  pseudo-random function of the tokens and their positions (E drawn from the seed): a
  consistent error, as a real Teacher's is, not fresh noise per call. We chose this over
  a large trained Teacher: it costs nothing, and the Teacher's quality is a known knob.
  Soft labels are the class probabilities (1 - q, q) for a two-class classifier.

Batches: `TaskBatches.batch(index, batch_size, rank, world_size)` is a pure function of the
run seed and the batch index, like `matta.data.TokenBatches`, so a resumed run reads what an
uninterrupted one would; there is no epoch, the data never runs out. The validation and
test sets are fixed by the task seed alone, so every run seed is scored on the same examples.

A model's score for an example is logit[1] - logit[0] of a two-class classifier (any
strictly increasing function of q gives the same AUROC).

The defaults (64 ids, 8 + 8 tokens, 16 interaction features) are sized for a CPU: after 750
steps a TA trained alone already scores better than the Student trained alone, and both are
far from the ground truth (BENCHMARKS.md, "Choices in the code").
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import auroc
from .models import pick_output

NUM_CLASSES = 2
_REFERENCE_EXAMPLES = 8192


def _generator(*parts) -> torch.Generator:
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class RelevanceTask:
    """A synthetic relevance task with a known ground-truth scorer (see the module docstring)."""

    vocab_size: int = 64
    user_len: int = 8
    item_len: int = 8
    features: int = 16
    unary_weight: float = 0.25
    sharpness: float = 3.0
    teacher_noise: float = 0.5
    teacher_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "user_len", "item_len", "features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RelevanceTask.{name} must be a positive int, got {value!r}")
        if self.vocab_size % 2 or self.vocab_size < 4:
            raise ValueError(f"RelevanceTask.vocab_size must be even and >= 4 (user and item halves), got {self.vocab_size}")
        for name in ("unary_weight", "teacher_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RelevanceTask.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("sharpness", "teacher_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RelevanceTask.{name} must be positive, got {getattr(self, name)!r}")
        gen = _generator("relevance-task", self.seed)
        half, h = self.vocab_size // 2, self.features
        tables = {
            "user": torch.randn(half, h, generator=gen, dtype=torch.float64),
            "item": torch.randn(half, h, generator=gen, dtype=torch.float64),
            "signs": torch.randint(0, 2, (h,), generator=gen).double() * 2 - 1,
            "unary": torch.randn(self.vocab_size, generator=gen, dtype=torch.float64),
            "teacher": torch.randn(self.vocab_size, self.seq_len, generator=gen, dtype=torch.float64),
        }
        object.__setattr__(self, "_tables", tables)
        reference = self.examples("reference", _REFERENCE_EXAMPLES)
        raw = self._raw_logit(reference)
        object.__setattr__(self, "_offset", raw.mean().item())
        object.__setattr__(self, "_scale", raw.std().item())
        object.__setattr__(self, "_teacher_scale", self._raw_teacher_error(reference).std().item())

    @property
    def seq_len(self) -> int:
        return self.user_len + self.item_len

    def describe(self) -> dict:
        """The task's settings (for config.json / results)."""
        return {"task": "relevance", **dataclasses.asdict(self)}

    # -- examples ------------------------------------------------------------------------------

    def _draw(self, gen: torch.Generator, n: int) -> torch.Tensor:
        half = self.vocab_size // 2
        user = torch.randint(0, half, (n, self.user_len), generator=gen)
        item = torch.randint(half, self.vocab_size, (n, self.item_len), generator=gen)
        return torch.cat([user, item], dim=1)

    def examples(self, split: str, n: int) -> torch.Tensor:
        """`n` fixed examples (token ids, (n, seq_len) int64) of a named split ("val", "test",
        ...), a function of the task seed and the split only."""
        return self._draw(_generator("relevance-examples", self.seed, split), n)

    def batches(self, seed: int) -> "TaskBatches":
        """The training stream of a run seeded `seed`."""
        return TaskBatches(self, seed)

    # -- the hidden scorer and the Teacher ------------------------------------------------------

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != self.seq_len:
            raise ValueError(f"ids must be a (n, {self.seq_len}) tensor of token ids, got {getattr(ids, 'shape', type(ids))}")
        half = self.vocab_size // 2
        ids = ids.to("cpu", torch.int64)
        user, item = ids[:, : self.user_len], ids[:, self.user_len :]
        if user.numel() and (user.min() < 0 or user.max() >= half) or item.numel() and (item.min() < half or item.max() >= self.vocab_size):
            raise ValueError(f"user tokens must be ids in [0, {half}) and item tokens ids in [{half}, {self.vocab_size})")
        return ids

    def _raw_logit(self, ids: torch.Tensor) -> torch.Tensor:
        t, half = self._tables, self.vocab_size // 2
        u = t["user"][ids[:, : self.user_len]].mean(1) * math.sqrt(self.user_len)
        v = t["item"][ids[:, self.user_len :] - half].mean(1) * math.sqrt(self.item_len)
        pairs = (torch.tanh(u) * torch.tanh(v) * t["signs"]).sum(1)
        unary = t["unary"][ids].mean(1) * math.sqrt(self.seq_len)
        return pairs + self.unary_weight * math.sqrt(self.features) * unary

    def _raw_teacher_error(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.seq_len).expand_as(ids)
        return self._tables["teacher"][ids, positions].mean(1) * math.sqrt(self.seq_len)

    def logit(self, ids: torch.Tensor) -> torch.Tensor:
        """The ground-truth relevance logit f(x), float64 (n,)."""
        return self.sharpness * (self._raw_logit(self._check_ids(ids)) - self._offset) / self._scale

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """The ground-truth probability of relevance p(x) = sigmoid(f(x))."""
        return torch.sigmoid(self.logit(ids))

    def teacher_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """The Teacher's probability q(x) (float64, (n,))."""
        ids = self._check_ids(ids)
        error = self._raw_teacher_error(ids) / self._teacher_scale
        return torch.sigmoid((self.logit(ids) + self.teacher_noise * error) / self.teacher_temperature)

    def soft_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """The Teacher's soft labels (1 - q, q), float32 (n, 2): the training targets."""
        q = self.teacher_probability(ids)
        return torch.stack([1 - q, q], dim=1).float()

    def labels(self, ids: torch.Tensor, split: str) -> torch.Tensor:
        """Binary labels y ~ Bernoulli(p(x)), drawn with a generator of the task seed and
        `split`: the same examples and split always get the same labels."""
        p = self.probability(ids)
        return (torch.rand(p.shape, generator=_generator("relevance-labels", self.seed, split), dtype=torch.float64) < p).long()

    def evaluation_set(self, split: str = "val", n: int = 8192) -> "EvaluationSet":
        ids = self.examples(split, n)
        return EvaluationSet(ids, self.labels(ids, split), self.soft_labels(ids), self.logit(ids))


class TaskBatches:
    """Training batches of a RelevanceTask: `batch(index, batch_size, rank, world_size)` ->
    (ids (B, seq_len) int64, soft labels (B, 2) float32). Batch `index` holds
    batch_size * world_size examples drawn from a generator seeded by (run seed, index);
    rank r keeps rows r*batch_size ... (r+1)*batch_size - 1 (as `TokenBatches` does)."""

    def __init__(self, task: RelevanceTask, seed: int):
        self.task, self.seed = task, seed
        self.block_size = task.seq_len

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1):
        ids = self.task._draw(_generator("relevance-train", self.task.seed, self.seed, index), batch_size * world_size)
        ids = ids[rank * batch_size : (rank + 1) * batch_size].contiguous()
        return ids, self.task.soft_labels(ids)


@dataclass(frozen=True)
class EvaluationSet:
    """Fixed examples with their binary labels, the Teacher's soft labels and the true logits."""

    ids: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor
    true_logits: torch.Tensor

    def oracle_auc_loss(self) -> float:
        """AucLoss of the ground-truth scorer on these labels: the floor."""
        return 1.0 - auroc(self.true_logits, self.labels)

    def teacher_auc_loss(self) -> float:
        return 1.0 - auroc(self.soft_labels[:, 1].double(), self.labels)


@torch.no_grad()
def classifier_scores(model, ids: torch.Tensor, *, batch_size: int = 512, output=None, device=None) -> torch.Tensor:
    """Scores logit[1] - logit[0] of a two-class classifier over `ids`, float64 on the CPU.

    `output` picks one logits tensor of a model that returns several (a nested model's
    Student = 0, TA = 1)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for i in range(0, len(ids), batch_size):
            out = pick_output(model(ids[i : i + batch_size].to(device)), output)
            if out.dim() != 2 or out.shape[1] != NUM_CLASSES:
                raise ValueError(f"a two-class classifier must return (batch, {NUM_CLASSES}) logits, got {tuple(out.shape)}")
            parts.append((out[:, 1] - out[:, 0]).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


def evaluate_classifier(model, evaluation: EvaluationSet, *, batch_size: int = 512, output=None, device=None) -> dict:
    """AucLoss (vs the binary labels), AUROC, and the cross-entropy against the Teacher's
    soft labels (nats, what training minimises) of a two-class classifier."""
    scores = classifier_scores(model, evaluation.ids, batch_size=batch_size, output=output, device=device)
    logp = F.logsigmoid(torch.stack([-scores, scores], dim=1))  # log softmax of (0, score)
    teacher_loss = -(evaluation.soft_labels.double() * logp).sum(1).mean().item()
    area = auroc(scores, evaluation.labels)
    return {"auc_loss": 1.0 - area, "auroc": area, "teacher_loss": teacher_loss}


class ClassificationData:
    """A RelevanceTask as training data, in the shape the trainer reads (`matta train --task
    classify`): `train.batch(index, batch_size, rank, world_size)` -> (ids, the Teacher's soft
    labels), and a fixed validation set of `validation_examples` examples with binary labels."""

    tokenizer = None

    def __init__(self, task: RelevanceTask, seed: int, validation_examples: int = 8192):
        self.task = task
        self.train = task.batches(seed)
        self.validation = task.evaluation_set("val", validation_examples)
        self.vocab_size = task.vocab_size
        self.block_size = task.seq_len

    @property
    def provenance(self) -> dict:
        return self.task.describe()

    @property
    def description(self) -> str:
        t, v = self.task, self.validation
        return (f"synthetic relevance task ({t.user_len} user + {t.item_len} item tokens, {t.vocab_size} ids, "
                f"{t.features} interaction features, task seed {t.seed}); the Teacher's soft labels; AucLoss on "
                f"{len(v.ids):,} fixed validation examples (ground truth {v.oracle_auc_loss():.4f}, "
                f"Teacher {v.teacher_auc_loss():.4f})")
