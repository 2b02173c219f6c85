"""Evaluation: validation loss, log-likelihood scoring, LAMBADA-style and multiple-choice tasks."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matta.data import ByteTokenizer
from matta.evaluation import (
    LMScorer,
    TaskError,
    lambada_accuracy,
    make_lm_eval_adapter,
    multiple_choice_accuracy,
    parse_tasks,
    perplexity,
    validation_loss,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the current token only."""

    def __init__(self, table, pair=False):
        super().__init__()
        self.table = nn.Parameter(table)
        self.pair = pair

    def forward(self, idx):
        logits = self.table[idx]
        return (logits, 2 * logits) if self.pair else logits


def oracle(table, context: str, continuation: str):
    """float64 log-likelihood and greedy-ness of a continuation under a bigram table (bytes)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = list(stripped.encode()) or [256]
    cont = list(continuation.encode())
    seq = ctx + cont
    logp = torch.log_softmax(table.double(), -1)
    total, greedy = 0.0, True
    for i in range(len(ctx), len(seq)):
        prev, tok = seq[i - 1], seq[i]
        total += logp[prev, tok].item()
        greedy &= int(table[prev].argmax()) == tok
    return total, greedy


def make_table(favoured: str = "", seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(257, 257, generator=g)
    data = favoured.encode()
    for a, b in zip(data, data[1:]):
        table[a, b] += 20.0
    return table


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_validation_loss_matches_cross_entropy():
    table = make_table()
    blocks = torch.randint(0, 257, (7, 10))
    ref = F.cross_entropy(table.double()[blocks[:, :-1]].reshape(-1, 257), blocks[:, 1:].reshape(-1)).item()
    assert validation_loss(Bigram(table), blocks, batch_size=3) == pytest.approx(ref, rel=1e-6)
    both = validation_loss(Bigram(table, pair=True), blocks, batch_size=4, output="all")
    ref2 = F.cross_entropy(2 * table.double()[blocks[:, :-1]].reshape(-1, 257), blocks[:, 1:].reshape(-1)).item()
    assert both == pytest.approx([ref, ref2], rel=1e-6)
    assert validation_loss(Bigram(table, pair=True), blocks, output=1) == pytest.approx(ref2, rel=1e-6)
    with pytest.raises(TypeError, match="output"):
        validation_loss(Bigram(table, pair=True), blocks)
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)


def test_loglikelihood_matches_the_oracle():
    table = make_table("abc def")
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=64, batch_size=2)
    requests = [("abc", " def"), ("hello ", "world"), ("", "x"), ("a" * 100, " end")]
    got = scorer.loglikelihood(requests)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        ref_lp, ref_greedy = oracle(table, ctx, cont)
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4)
        assert greedy == ref_greedy
    assert got[0][1] is True  # the favoured continuation is the greedy one


def test_loglikelihood_rolling_sums_every_token():
    table = make_table()
    text = "some text that is longer than one block of context"
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=8)
    ids = [256] + list(text.encode())
    logp = torch.log_softmax(table.double(), -1)
    ref = sum(logp[a, b].item() for a, b in zip(ids, ids[1:]))
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(ref, rel=1e-5)


def test_generate_until_is_greedy_and_stops():
    table = make_table("abcdefg")
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=16)
    assert scorer.generate_until([("a", {"until": ["e"], "max_gen_toks": 20})]) == ["bcd"]
    out = scorer.generate_until([("a", {"until": [], "max_gen_toks": 3})])[0]
    assert out == "bcd"


def test_lambada_accuracy(tmp_path):
    texts = ["one two", "one two three", "zebra quux", "the big dog"]
    table = make_table("one two")
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    result = lambada_accuracy(LMScorer(Bigram(table), ByteTokenizer(), block_size=32), path)
    refs = [oracle(table, *t.rsplit(" ", 1)[0:1], " " + t.rsplit(" ", 1)[1]) for t in texts]
    assert result["n"] == 4
    assert result["acc"] == pytest.approx(sum(g for _, g in refs) / 4)
    assert result["loglikelihood"] == pytest.approx(sum(lp for lp, _ in refs) / 4, rel=1e-5)
    assert result["acc"] >= 0.25  # "two" after "one" is favoured


def test_multiple_choice_formats_and_accuracy(tmp_path):
    table = make_table("the cat sat on the mat")
    rows = [
        {"context": "the cat", "choices": [" sat", " zzzzzzzz", " q"], "label": 0},
        {"ctx": "on the", "endings": ["mat", "zebra"], "label": 1},  # HellaSwag
        {"question": "the cat", "choices": {"text": ["sat", "flew"], "label": ["A", "B"]}, "answerKey": "A"},  # ARC
        {"passage": "cats sit", "question": "do cats sit", "answer": True},  # BoolQ
    ]
    path = write_jsonl(tmp_path / "choice.jsonl", rows)
    result = multiple_choice_accuracy(LMScorer(Bigram(table), ByteTokenizer(), block_size=64), path)
    examples = [
        ("the cat", [" sat", " zzzzzzzz", " q"], 0),
        ("on the", [" mat", " zebra"], 1),
        ("Question: the cat\nAnswer:", [" sat", " flew"], 0),
        ("cats sit\nQuestion: do cats sit?\nAnswer:", [" no", " yes"], 1),
    ]
    acc = acc_norm = 0
    for ctx, choices, label in examples:
        lps = [oracle(table, ctx, c)[0] for c in choices]
        acc += max(range(len(lps)), key=lps.__getitem__) == label
        norm = [lp / len(c) for lp, c in zip(lps, choices)]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == label
    assert result == {"acc": acc / 4, "acc_norm": acc_norm / 4, "n": 4}


def test_task_file_errors(tmp_path):
    scorer = LMScorer(Bigram(make_table()), ByteTokenizer(), block_size=16)
    with pytest.raises(TaskError, match="does not exist"):
        lambada_accuracy(scorer, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    with pytest.raises(TaskError, match="line 2"):
        lambada_accuracy(scorer, bad)
    with pytest.raises(TaskError, match="at least two words"):
        lambada_accuracy(scorer, write_jsonl(tmp_path / "one.jsonl", [{"text": "single"}]))
    with pytest.raises(TaskError, match="outside"):
        multiple_choice_accuracy(scorer, write_jsonl(tmp_path / "l.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 5}]))
    with pytest.raises(TaskError, match="no choices"):
        multiple_choice_accuracy(scorer, write_jsonl(tmp_path / "n.jsonl", [{"context": "a"}]))
    with pytest.raises(TaskError, match="no tokenizer"):
        LMScorer(Bigram(make_table()), None, block_size=8)


def test_parse_tasks():
    assert parse_tasks("val,lambada:a.jsonl, choice:b.jsonl") == [("val", None), ("lambada", "a.jsonl"), ("choice", "b.jsonl")]
    for bad in ("val,nope", "lambada", ""):
        with pytest.raises(TaskError):
            parse_tasks(bad)


def test_lm_eval_adapter():
    scorer = LMScorer(Bigram(make_table("the cat")), ByteTokenizer(), block_size=16)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm_eval"):
            make_lm_eval_adapter(scorer)
        return
    from lm_eval.api.instance import Instance

    lm = make_lm_eval_adapter(scorer)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("the", " cat"), idx=0)
    assert lm.loglikelihood([req]) == scorer.loglikelihood([("the", " cat")])
