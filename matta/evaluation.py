"""Evaluation of causal language models: validation loss, log-likelihood scoring, tasks.

Works on any module that maps token ids `(B, T)` to logits `(B, T, V)`, or to a tuple of
such logits (a nested model's `(logits_s, logits_ta)`: pick one with `output=`).

- `LMScorer(model, tokenizer, block_size=...)` scores and generates text the way
  lm-evaluation-harness asks (`loglikelihood`, `loglikelihood_rolling`, `generate_until`);
  `load_scorer(path, stream)` builds one for a run directory or an extracted model folder.
- lm-evaluation-harness: matta/lm_eval_model.py (the harness's model "matta", and
  `make_lm_eval_adapter(scorer)` for a model in memory).
- Task files for `matta eval` are local JSONL in their public formats:
  LAMBADA-style (`lambada:PATH`): `{"text": ...}` per line; the model must produce the
  last word (all of its tokens, greedily) from the text before it.
  Multiple choice (`choice:PATH`): `{"context": ..., "choices": [...], "label": i}` per line
  (also HellaSwag's `ctx`/`endings`, ARC's `question`/`choices.text`/`answerKey` and
  BoolQ's `passage`/`question`/`answer`); each choice is scored by its log-likelihood,
  unnormalised (`acc`) and per character (`acc_norm`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import tokenizer_from_json
from .extraction import extract_spec
from .hf import FORMAT_FILE, load_extracted
from .models import HFCausalLM, pick_output
from .scoring import perplexity, validation_loss
from .train.run_dir import is_hf_folder, load_hf_folder, load_run

__all__ = [
    "LMScorer", "TaskError", "load_run", "load_scorer", "load_tokenizer", "tokenizer_from_json", "stream_model",
    "generation_options", "validation_loss", "perplexity", "lambada_accuracy", "multiple_choice_accuracy",
    "parse_tasks", "read_jsonl",
]


class TaskError(ValueError):
    """A task file or spec that cannot be used; the message says what to fix."""


def _logits(model, idx, output):
    return pick_output(model(idx), output)


class LMScorer:
    """Log-likelihoods and generation from a causal LM and its tokenizer.

    The three methods follow lm-evaluation-harness's `LM` interface, on plain tuples:
    `loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]`,
    `loglikelihood_rolling([text, ...]) -> [logprob, ...]`,
    `generate_until([(context, {"until": [...], "max_gen_toks": n, ...}), ...]) -> [text, ...]`.

    The model sees at most `block_size` tokens at once. A continuation longer than that is
    scored in windows, as the harness's rolling log-likelihood is: every token predicted
    once, each window holding as much of the preceding text as fits. Requests are scored in
    batches of `batch_size` windows (`"auto"`: `max_batch_size`, halved until a batch of full
    windows fits in memory); generation runs one request at a time. The scorer moves the
    model to `device` and puts it in eval mode.
    """

    def __init__(self, model, tokenizer, *, block_size: int, device=None, output=None, batch_size=16, max_batch_size: int = 64):
        if tokenizer is None:
            raise TaskError("this run has no tokenizer (pre-tokenised .bin data); train with --tokenizer gpt2 to evaluate tasks")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"LMScorer needs a torch.nn.Module that maps token ids to logits, got {type(model).__name__}")
        for name, value in (("block_size", block_size), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TaskError(f"{name} must be a positive integer, got {value!r}")
        if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise TaskError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        positions = getattr(getattr(model, "config", None), "n_positions", None)
        if isinstance(positions, int) and block_size > positions:
            raise TaskError(f"block_size={block_size} exceeds the model's context of {positions} positions")
        self.device = _device(device, model)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.output = output
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self._auto_batch_size = None

    def _encode_pair(self, context: str, continuation: str):
        # Whitespace belongs to the continuation's first token in a byte-level BPE.
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        ctx_ids = self.tokenizer.encode(stripped) if stripped else [self.tokenizer.eot_id]
        return ctx_ids, self.tokenizer.encode(continuation)

    def _windows(self, ctx: list, cont: list):
        """(input ids, target ids) windows that predict each token of `cont` once."""
        seq = ctx + cont
        for start in range(len(ctx), len(seq), self.block_size):
            end = min(start + self.block_size, len(seq))
            yield seq[max(0, end - 1 - self.block_size) : end - 1], seq[start:end]

    @torch.no_grad()
    def _score_windows(self, windows):
        """(sum of target log-probabilities, all targets greedy?) for each (input, targets) window."""
        width = max(len(inp) for inp, _ in windows)
        idx = torch.zeros(len(windows), width, dtype=torch.long)
        for r, (inp, _) in enumerate(windows):
            idx[r, : len(inp)] = torch.tensor(inp)
        logits = _logits(self.model, idx.to(self.device), self.output)
        sums, greedy = [], []
        for r, (inp, tgt) in enumerate(windows):
            logp = logits[r, len(inp) - len(tgt) : len(inp)].float().log_softmax(-1)
            target = torch.tensor(tgt, device=logp.device)
            sums.append(logp.gather(1, target[:, None]).sum())
            greedy.append((logp.argmax(-1) == target).all())
        return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist()))

    def _resolved_batch_size(self) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        if self._auto_batch_size is None:
            size = self.max_batch_size
            widest = ([0] * self.block_size, [0] * self.block_size)  # every position scored
            while True:
                try:
                    self._score_windows([widest] * size)
                    break
                except (torch.cuda.OutOfMemoryError, MemoryError):
                    if size == 1:
                        raise
                    size //= 2
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            self._auto_batch_size = size
        return self._auto_batch_size

    def _score(self, pairs, progress: bool, desc: str):
        """(sum log-probability, greedy?) of each (context ids, continuation ids) pair."""
        windows = [(i, inp, tgt) for i, (ctx, cont) in enumerate(pairs) for inp, tgt in self._windows(ctx, cont)]
        windows.sort(key=lambda w: -len(w[1]))  # similar widths batch together
        totals, greedy = [0.0] * len(pairs), [True] * len(pairs)
        size = self._resolved_batch_size() if windows else 1
        for lo in _progress(range(0, len(windows), size), progress, desc):
            chunk = windows[lo : lo + size]
            for (i, _, _), (lp, g) in zip(chunk, self._score_windows([(inp, tgt) for _, inp, tgt in chunk])):
                totals[i] += lp
                greedy[i] = greedy[i] and g
        return list(zip(totals, greedy))

    def loglikelihood(self, requests, *, progress: bool = False):
        pairs = [self._encode_pair(c, x) for c, x in requests]
        if any(not cont for _, cont in pairs):
            raise TaskError("an empty continuation cannot be scored; check the task file")
        return self._score(pairs, progress, "loglikelihood")

    def loglikelihood_rolling(self, texts, *, progress: bool = False):
        pairs = [([self.tokenizer.eot_id], self.tokenizer.encode(text)) for text in texts]
        return [lp for lp, _ in self._score(pairs, progress, "loglikelihood_rolling")]

    @torch.no_grad()
    def generate_until(self, requests, *, progress: bool = False):
        out = []
        eot = self.tokenizer.eot_id
        for context, options in _progress(requests, progress, "generate_until"):
            until, max_new, temperature = generation_options(options)
            ids = self.tokenizer.encode(context) or [eot]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = torch.tensor([(ids + new)[-self.block_size :]], device=self.device)
                last = _logits(self.model, window, self.output)[0, -1].float()
                if temperature is None:
                    nxt = int(last.argmax())
                else:
                    nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1))
                if nxt == eot:
                    break
                new.append(nxt)
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            out.append(text[: min([text.find(s) for s in until if s in text], default=len(text))])
        return out


GENERATION_OPTIONS = ("until", "max_gen_toks", "do_sample", "temperature")
DEFAULT_MAX_GEN_TOKS = 256


def generation_options(options) -> tuple[list[str], int, float | None]:
    """(stop strings, token budget, sampling temperature or None for greedy) from the
    harness's generation kwargs; anything else is refused rather than ignored."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise TaskError(f"generation options {unknown} are not supported; matta generates with {', '.join(GENERATION_OPTIONS)}")
    until = options.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(s, str) and s for s in until):
        raise TaskError(f"'until' must be a string or a list of non-empty strings, got {options.get('until')!r}")
    max_new = options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
        raise TaskError(f"max_gen_toks must be an integer >= 0, got {max_new!r}")
    temperature = options.get("temperature")
    if options.get("do_sample"):
        temperature = 1.0 if temperature is None else float(temperature)
        if not temperature > 0:
            raise TaskError(f"do_sample=True needs temperature > 0, got {temperature}; use do_sample=False for greedy decoding")
        return until, max_new, temperature
    if temperature not in (None, 0, 0.0):
        raise TaskError(
            f"temperature={temperature} without do_sample=True: pass do_sample=True to sample, or temperature=0 for greedy"
        )
    return until, max_new, None


def _device(device, model) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TaskError(f"device={device} but no CUDA device is available; pass device=cpu")
    return device


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


# ----------------------------------------------------------------------------------------
# Models and tokenizers from disk


def load_tokenizer(folder):
    """The tokenizer saved beside a model: the `matta_tokenizer.json` that `matta extract`
    writes (beside a Hugging Face tokenizer.json, if any) or a run directory's `tokenizer.json`;
    None when there is none."""
    for name in ("matta_tokenizer.json", "tokenizer.json"):
        path = Path(folder) / name
        if path.is_file():
            return tokenizer_from_json(path.read_text())
    return None


def stream_model(model, stream: str = "student"):
    """The plain model a stream spec names, cut out of a nested model: `student`, `ta`,
    `wide_narrow_wide:K`, or one `wide`/`narrow`/`skip` per TA layer joined by `/`."""
    try:
        return extract_spec(model, stream)
    except ValueError as exc:
        raise TaskError(f"stream={stream}: {exc}") from None


def load_scorer(path, stream: str | None = None, *, device=None, batch_size=16, max_batch_size: int = 64,
                max_length: int | None = None) -> LMScorer:
    """An LMScorer for one model on disk: a stream of a `matta train` run directory (default
    the Student), or a folder written by `matta extract` (matta's format or a Hugging Face
    layout: GPT-2's, or that of the run's transformers model). The context window is the run's block size, or for a folder the
    model's n_positions; `max_length` lowers it. `device` None: CUDA when available."""
    path = Path(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        cfg, nested, tokenizer = load_run(path, "cpu")
        model, window = stream_model(nested, stream or "student"), cfg.block_size
    else:
        if stream is not None:
            raise TaskError(f"{path} holds one extracted model; drop stream= (it picks a model out of a run directory)")
        if (path / FORMAT_FILE).is_file():
            model = load_extracted(path)
        elif is_hf_folder(path):
            model = load_hf_folder(path)
        else:
            raise TaskError(
                f"{path} is neither a matta run directory (config.json and checkpoints/) nor a model folder "
                "written by `matta extract`"
            )
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise TaskError(f"{path} has no matta_tokenizer.json; `matta extract` writes it beside the model it extracts")
        window = _positions(model)
    if max_length is not None:
        limit = _positions(model)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= limit:
            raise TaskError(f"max_length must be an integer from 1 to the model's {limit} positions, got {max_length!r}")
        window = max_length
    return LMScorer(model, tokenizer, block_size=window, device=device, batch_size=batch_size,
                    max_batch_size=max_batch_size)


def _positions(model) -> int:
    """The context length of a plain model (a transformers model names it its own way)."""
    return model.n_positions if isinstance(model, HFCausalLM) else model.config.n_positions


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
