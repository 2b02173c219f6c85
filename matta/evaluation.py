"""Evaluation of causal language models: validation loss, zero-shot tasks, lm-eval adapter.

Works on any module that maps token ids `(B, T)` to logits `(B, T, V)`, or to a tuple of
such logits (a nested model's `(logits_s, logits_ta)`: pick one with `output=`).

Task files are local JSONL in their public formats:
- LAMBADA-style (`lambada:PATH`): `{"text": ...}` per line; the model must produce the
  last word (all of its tokens, greedily) from the text before it.
- multiple choice (`choice:PATH`): `{"context": ..., "choices": [...], "label": i}` per line
  (also HellaSwag's `ctx`/`endings`, ARC's `question`/`choices.text`/`answerKey` and
  BoolQ's `passage`/`question`/`answer`); each choice is scored by its log-likelihood,
  unnormalised (`acc`) and per character (`acc_norm`).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F


class TaskError(ValueError):
    """A task file or spec that cannot be used; the message says what to fix."""


def _logits(model, idx, output):
    out = model(idx)
    if isinstance(out, (tuple, list)):
        if output is None:
            raise TypeError("the model returns several logits; pass output=0 (Student) or output=1 (TA)")
        out = out[output]
    return out


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, *, batch_size: int = 16, device=None, output=None, autocast_dtype=None) -> float:
    """Mean next-token cross-entropy (nats) of `model` over `blocks` (N, T+1) of token ids.

    `output` picks one logits tensor of a model that returns several; `output="all"`
    returns one loss per returned tensor (a nested model's Student and TA in one pass).
    """
    if len(blocks) == 0:
        raise ValueError("no validation blocks to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = None
    count = 0
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        for i in range(0, len(blocks), batch_size):
            rows = blocks[i : i + batch_size].to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with ctx:
                out = model(x)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if output not in (None, "all"):
                outs = [outs[output]]
            losses = [
                F.cross_entropy(o.float().reshape(-1, o.shape[-1]), y.reshape(-1), reduction="sum").item() for o in outs
            ]
            totals = losses if totals is None else [a + b for a, b in zip(totals, losses)]
            count += y.numel()
    finally:
        model.train(was_training)
    means = [t / count for t in totals]
    if output == "all":
        return means
    if len(means) > 1:
        raise TypeError("the model returns several logits; pass output=0, 1 or 'all'")
    return means[0]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


class LMScorer:
    """Log-likelihoods and greedy generation from a causal LM and its tokenizer.

    The three methods follow lm-evaluation-harness's `LM` interface, on plain tuples:
    `loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]`,
    `loglikelihood_rolling([text, ...]) -> [logprob, ...]`,
    `generate_until([(context, {"until": [...], "max_gen_toks": n}), ...]) -> [text, ...]`.
    Inputs longer than `block_size` keep their last `block_size` tokens.
    """

    def __init__(self, model, tokenizer, *, block_size: int, device=None, output=None, batch_size: int = 16):
        if tokenizer is None:
            raise TaskError("this run has no tokenizer (pre-tokenised .bin data); train with --tokenizer gpt2 to evaluate tasks")
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.output = output
        self.batch_size = batch_size

    def _encode_pair(self, context: str, continuation: str):
        # Whitespace belongs to the continuation's first token in a byte-level BPE.
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        ctx_ids = self.tokenizer.encode(stripped) if stripped else [self.tokenizer.eot_id]
        return ctx_ids, self.tokenizer.encode(continuation)

    @torch.no_grad()
    def _continuation_scores(self, pairs):
        """For (context_ids, continuation_ids) pairs: (sum logprob, greedy?) of each continuation."""
        results = []
        self.model.eval()
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            seqs, spans = [], []
            for ctx, cont in chunk:
                if not cont:
                    raise TaskError("an empty continuation cannot be scored; check the task file")
                full = (ctx + cont)[-(self.block_size + 1) :]
                seqs.append(full[:-1])
                spans.append((min(len(cont), len(full) - 1), full))
            width = max(len(s) for s in seqs)
            idx = torch.zeros(len(seqs), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                idx[r, : len(s)] = torch.tensor(s)
            logp = F.log_softmax(_logits(self.model, idx.to(self.device), self.output).float(), dim=-1).cpu()
            for r, (n, full) in enumerate(spans):
                end = len(seqs[r])
                rows = logp[r, end - n : end]
                target = torch.tensor(full[-n:])
                results.append(
                    (rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all()))
                )
        return results

    def loglikelihood(self, requests):
        return self._continuation_scores([self._encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts):
        out = []
        for text in texts:
            ids = [self.tokenizer.eot_id] + self.tokenizer.encode(text)
            total = 0.0
            # Non-overlapping windows: each token is predicted once, with up to block_size context.
            for start in range(1, len(ids), self.block_size):
                window = ids[max(0, start - self.block_size) : start + self.block_size]
                n_new = min(self.block_size, len(ids) - start)
                ctx, cont = window[: len(window) - n_new], window[len(window) - n_new :]
                total += self._continuation_scores([(ctx, cont)])[0][0]
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests):
        out = []
        self.model.eval()
        for context, kwargs in requests:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = self.tokenizer.encode(context) or [self.tokenizer.eot_id]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = torch.tensor([(ids + new)[-self.block_size :]], device=self.device)
                nxt = int(_logits(self.model, window, self.output)[0, -1].argmax())
                if nxt == self.tokenizer.eot_id:
                    break
                new.append(nxt)
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; pass an existing JSONL file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path} line {n} is not JSON ({exc.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    if not rows:
        raise TaskError(f"task file {path} has no examples")
    return rows


def lambada_accuracy(scorer: LMScorer, path) -> dict:
    """Last-word accuracy and mean log-likelihood of the last word on a LAMBADA-style JSONL."""
    requests = []
    for n, row in enumerate(read_jsonl(path), 1):
        text = row.get("text")
        if not isinstance(text, str) or " " not in text.strip():
            raise TaskError(f"{path} example {n} needs a 'text' field of at least two words")
        context, word = text.rstrip().rsplit(" ", 1)
        requests.append((context, " " + word))
    scores = scorer.loglikelihood(requests)
    return {
        "acc": sum(greedy for _, greedy in scores) / len(scores),
        "loglikelihood": sum(lp for lp, _ in scores) / len(scores),
        "n": len(scores),
    }


def _choice_example(row: dict, path, n: int):
    if "choices" in row and isinstance(row["choices"], dict):  # ARC
        choices = list(row["choices"].get("text", []))
        labels = list(row["choices"].get("label", []))
        context = row.get("question", "")
        answer = row.get("answerKey")
        label = labels.index(answer) if answer in labels else None
        return f"Question: {context}\nAnswer:", [" " + c for c in choices], label
    if "endings" in row:  # HellaSwag
        return row.get("ctx", row.get("context", "")), [" " + c for c in row["endings"]], row.get("label")
    if "passage" in row and "answer" in row:  # BoolQ
        context = f"{row['passage']}\nQuestion: {row.get('question', '')}?\nAnswer:"
        return context, [" no", " yes"], int(bool(row["answer"]))
    if "choices" in row:
        return row.get("context", ""), list(row["choices"]), row.get("label")
    raise TaskError(f"{path} example {n} has no choices: give 'context', 'choices' (a list) and 'label'")


def multiple_choice_accuracy(scorer: LMScorer, path) -> dict:
    """Accuracy by summed log-likelihood (`acc`) and by log-likelihood per character (`acc_norm`)."""
    examples = []
    for n, row in enumerate(read_jsonl(path), 1):
        context, choices, label = _choice_example(row, path, n)
        if len(choices) < 2:
            raise TaskError(f"{path} example {n} has {len(choices)} choice(s); it needs at least 2")
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise TaskError(f"{path} example {n}: label must be a choice index, got {label!r}") from None
        if not 0 <= label < len(choices):
            raise TaskError(f"{path} example {n}: label {label} is outside 0..{len(choices) - 1}")
        examples.append((context, choices, label))
    flat = [(ctx, c) for ctx, choices, _ in examples for c in choices]
    scores = iter(scorer.loglikelihood(flat))
    acc = acc_norm = 0
    for _, choices, label in examples:
        lps = [next(scores)[0] for _ in choices]
        acc += max(range(len(lps)), key=lambda i: lps[i]) == label
        norm = [lp / max(1, len(c)) for lp, c in zip(lps, choices)]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == label
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "n": len(examples)}


def parse_tasks(spec: str) -> list[tuple[str, str | None]]:
    """'val,lambada:PATH,choice:PATH' -> [('val', None), ('lambada', PATH), ('choice', PATH)]."""
    tasks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, path = item.partition(":")
        if kind == "val" and not path:
            tasks.append(("val", None))
        elif kind in ("lambada", "choice") and path:
            tasks.append((kind, path))
        else:
            raise TaskError(f"unknown task {item!r}; use val, lambada:PATH or choice:PATH")
    if not tasks:
        raise TaskError("no tasks given; use --tasks val,lambada:PATH,choice:PATH")
    return tasks


def make_lm_eval_adapter(scorer: LMScorer):
    """An `lm_eval.api.model.LM` that evaluates `scorer`'s model with lm-evaluation-harness.

    Usage: `lm_eval.simple_evaluate(model=make_lm_eval_adapter(scorer), tasks=[...])`.
    Needs `lm_eval` installed (it is not a dependency of matta).
    """
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm_eval") from None

    class MattaLM(LM):
        def __init__(self):
            super().__init__()
            self.scorer = scorer

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.scorer.generate_until([(r.args[0], r.args[1]) for r in requests])

    return MattaLM()
