"""What a run learns: a `Task` owns its data, the model settings it needs, the loss of one
micro-batch, its validation and scoring, and how its results are shown, so the trainer,
the report and the study never ask which task they run (torchtitan's TrainSpec, in small).

- `LanguageModelTask` (`--task lm`, the default): next-token prediction on `--data`, the
  fused LM-head MatTA loss over the tied embedding, scored by validation loss.
- `ClassificationTask` (`--task classify`): the synthetic relevance task of
  `matta.classification`, a GAU classifier trained on a Teacher's soft labels with the
  MatTA loss on its two logits, scored by AucLoss = 1 - AUROC.

A third task is one more subclass in `TASKS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..classification import NUM_CLASSES, ClassificationData, RelevanceTask, evaluate_classifier
from ..data import load_data
from ..losses import MatTALoss, MatTALossOutput
from ..models import NestedLM
from ..scoring import perplexity, validation_loss


@dataclass(frozen=True)
class Column:
    """A column of the final table: its title, the results key and the number format."""

    title: str
    key: str
    fmt: str


class Task:
    name = ""
    what = ""  # what a run of it trains, in words (for messages)
    default_model = ""
    architectures: tuple[str, ...] = ()  # the model families (`NestedLM.architecture`) that can do it
    metric = ""  # the results key a model is judged by (lower is better)
    metric_label = ""  # the metric in words, for plots
    eval_key = ""  # eval records hold `{eval_key}_student` and `{eval_key}_ta`
    eval_label = ""
    columns: tuple[Column, ...] = ()
    own_data: str | None = None  # a task with data of its own (no --data) names it here

    def load_data(self, cfg):
        """The training batches (`.train.batch(step, batch_size, part, parts)`), validation
        data, vocabulary and tokenizer of a run."""
        raise NotImplementedError

    def configure(self, cfg, data):
        """`cfg` with the settings the data fixes (the same `cfg` when none)."""
        return cfg

    def model_overrides(self, cfg, preset) -> dict:
        """Model config fields this task sets, given the preset's config."""
        return {}

    def validation(self, data, cfg):
        raise NotImplementedError

    def loss(self, model: NestedLM, criterion: MatTALoss, x, y, teacher=None) -> MatTALossOutput:
        """The MatTA loss of one micro-batch: the streams `criterion` reads, then the loss."""
        raise NotImplementedError

    def evaluate_nested(self, model, val, *, device, batch_size: int, autocast_dtype) -> dict:
        """The eval record of a nested model: `{eval_key}_student` and `_ta`, and more."""
        raise NotImplementedError

    def score(self, model, val, *, device, batch_size: int, autocast_dtype) -> dict:
        """The final table's numbers for one extracted model (`metric` among them)."""
        raise NotImplementedError

    def results_fields(self, data, val) -> dict:
        """What results.json records about the validation data."""
        return {}

    def table_title(self, results: dict) -> str:
        raise NotImplementedError


def teacher_inputs(teacher: torch.nn.Module, x):
    """(hidden, head) of a Teacher for the fused loss: a nested model's TA stream, or a plain LM."""
    if isinstance(teacher, NestedLM):
        hidden = teacher(x, return_hidden=True, stream="ta")[1]
    else:
        hidden = teacher(x, return_hidden=True)
    return hidden, teacher.lm_head_weight


class LanguageModelTask(Task):
    name = "lm"
    what = "a language model"
    default_model = "gpt2-tiny"
    architectures = ("gpt2", "gau", "hf")
    metric = "val_loss"
    metric_label = "validation loss"
    eval_key = "val"
    eval_label = "val loss"
    columns = (Column("val loss", "val_loss", ".4f"), Column("perplexity", "perplexity", ".2f"))

    def load_data(self, cfg):
        return load_data(cfg.data, block_size=cfg.block_size, seed=cfg.seed, tokenizer=cfg.data_tokenizer,
                         vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction, bin_dtype=cfg.bin_dtype)

    def model_overrides(self, cfg, preset) -> dict:
        return {"n_positions": cfg.block_size} if cfg.block_size > preset.n_positions else {}

    def validation(self, data, cfg):
        return data.val_blocks(cfg.eval_tokens or None)

    def loss(self, model, criterion, x, y, teacher=None):
        h_s, h_ta = model(x, return_hidden=True, stream=criterion.stream, report=criterion.report)
        soft_labels = None
        if teacher is not None:
            with torch.no_grad():
                soft_labels = teacher_inputs(teacher, x)
        return criterion.fused_linear(h_s, h_ta, model.lm_head_weight, y, teacher=soft_labels)

    def evaluate_nested(self, model, val, *, device, batch_size, autocast_dtype):
        loss_s, loss_ta = validation_loss(model, val, batch_size=batch_size, device=device, output="all",
                                          autocast_dtype=autocast_dtype)
        return {"val_student": loss_s, "val_ta": loss_ta}

    def score(self, model, val, *, device, batch_size, autocast_dtype):
        loss = validation_loss(model, val, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
        return {"val_loss": loss, "perplexity": perplexity(loss)}

    def results_fields(self, data, val):
        return {"val_tokens": int(val[:, 1:].numel())}

    def table_title(self, results):
        return f"validation ({results['val_tokens']:,} tokens) after {results['step']} steps"


class ClassificationTask(Task):
    name = "classify"
    what = "a GAU classifier"
    default_model = "gau-tiny"
    architectures = ("gau",)
    metric = "auc_loss"
    metric_label = "validation AucLoss (1 - AUROC)"
    eval_key = "auc_loss"
    eval_label = "AucLoss"
    columns = (Column("AucLoss", "auc_loss", ".4f"), Column("AUROC", "auroc", ".4f"),
               Column("CE vs Teacher", "val_loss", ".4f"))
    own_data = "relevance (synthetic)"

    def load_data(self, cfg):
        return ClassificationData(RelevanceTask(), cfg.seed)

    def configure(self, cfg, data):
        return dataclasses.replace(cfg, block_size=data.block_size)  # the task's sequence length

    def model_overrides(self, cfg, preset):
        return {"num_classes": NUM_CLASSES, "n_positions": cfg.block_size}

    def validation(self, data, cfg):
        return data.validation

    def loss(self, model, criterion, x, y, teacher=None):
        """`y` holds the Teacher's soft labels (B, 2); the head is two wide, so the MatTA loss
        runs on the full logits."""
        if teacher is not None:
            raise ValueError("a classifier is trained on the task's own Teacher; pass teacher=None")
        logits_s, logits_ta = model(x, stream=criterion.stream, report=criterion.report)
        return criterion(logits_s, logits_ta, y)

    def evaluate_nested(self, model, val, *, device, batch_size, autocast_dtype):
        s, ta = (evaluate_classifier(model, val, output=i, device=device) for i in (0, 1))
        return {"val_student": s["teacher_loss"], "val_ta": ta["teacher_loss"],
                "auc_loss_student": s["auc_loss"], "auc_loss_ta": ta["auc_loss"]}

    def score(self, model, val, *, device, batch_size, autocast_dtype):
        out = evaluate_classifier(model, val, device=device)
        return {"auc_loss": out["auc_loss"], "auroc": out["auroc"], "val_loss": out["teacher_loss"]}

    def results_fields(self, data, val):
        return {"task": data.provenance, "val_examples": len(val.ids), "oracle_auc_loss": val.oracle_auc_loss(),
                "teacher_auc_loss": val.teacher_auc_loss()}

    def table_title(self, results):
        return (f"validation ({results['val_examples']:,} examples; AucLoss of the ground truth "
                f"{results['oracle_auc_loss']:.4f}, of the Teacher {results['teacher_auc_loss']:.4f}) "
                f"after {results['step']} steps")


TASKS = {task.name: task for task in (LanguageModelTask(), ClassificationTask())}


def task_for(cfg) -> Task:
    """The task a TrainConfig (or its `task` name) asks for."""
    name = cfg if isinstance(cfg, str) else cfg.task
    return TASKS[name]
