"""Evaluation: validation loss, log-likelihood scoring (rolling windows, batches, devices),
generation options, LAMBADA-style and multiple-choice tasks, loading models from disk, and
lm-evaluation-harness (the adapter, the registered "matta" model, a real harness run)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matta import GPT2, GPT2Config, extract, save_extracted
from matta.data import ByteTokenizer
from matta.evaluation import (
    LMScorer,
    TaskError,
    generation_options,
    lambada_accuracy,
    load_run,
    load_scorer,
    load_tokenizer,
    multiple_choice_accuracy,
    parse_tasks,
    perplexity,
    stream_model,
    tokenizer_from_json,
    validation_loss,
)

try:
    import lm_eval
except ImportError:
    lm_eval = None
needs_lm_eval = pytest.mark.skipif(
    lm_eval is None, reason='lm-evaluation-harness is not installed (pip install -e ".[eval]"; CI installs it)'
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


# ----------------------------------------------------------------------------------------
# Rolling windows, batches, devices, progress


def sharp_gpt2(n_positions=8):
    """A random GPT-2 whose predictions depend strongly on the context (large weights)."""
    model = GPT2(GPT2Config(vocab_size=257, n_positions=n_positions, n_embd=16, n_layer=2, n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


def direct_logprob(model, inputs, targets):
    """float64: sum of log p(targets) when `inputs` are fed at once and the targets are the
    predictions of its last len(targets) positions."""
    logits = copy.deepcopy(model).double()(torch.tensor([inputs]))[0]
    logp = logits.log_softmax(-1)[len(inputs) - len(targets):]
    return logp[torch.arange(len(targets)), torch.tensor(targets)].sum().item()


def harness_windows(tokens, prefix, block):
    """lm-evaluation-harness's own rolling windows: (context, predicted tokens) pairs."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, block, 1)]


def test_long_continuation_is_scored_whole_not_cut():
    table = make_table("abcdefga")
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=8)
    context, continuation = "ab", "xyz cdefgabcdefgabcdefga"  # 24 tokens > 8; the unlikely ones first
    (lp, greedy), = scorer.loglikelihood([(context, continuation)])
    ref_lp, ref_greedy = oracle(table, context, continuation)
    assert lp == pytest.approx(ref_lp, rel=1e-5)
    assert greedy == ref_greedy is False
    (lp, greedy), = scorer.loglikelihood([("ab", "cdefgabcdefgabcdefg")])
    assert greedy is True and lp == pytest.approx(oracle(table, "ab", "cdefgabcdefgabcdefg")[0], abs=1e-4)


@needs_lm_eval
def test_rolling_windows_equal_the_harness():
    model, block = sharp_gpt2(), 8
    scorer = LMScorer(model, ByteTokenizer(), block_size=block, batch_size=3)
    text = "the quick brown fox jumps over the lazy dog, twice!"
    tokens = list(text.encode())
    ref = sum(direct_logprob(model, ctx + pred[:-1], pred) for ctx, pred in harness_windows(tokens, 256, block))
    assert scorer.loglikelihood_rolling([text, ""]) == pytest.approx([ref, 0.0], rel=1e-5)
    # A long continuation is the harness's rolling windows with the context's last token as prefix.
    context, continuation = "some context", " and a continuation longer than the block"
    ctx_ids, cont_ids = scorer._encode_pair(context, continuation)
    ref = sum(direct_logprob(model, c + p[:-1], p) for c, p in harness_windows(cont_ids, ctx_ids[-1], block))
    assert scorer.loglikelihood([(context, continuation)])[0][0] == pytest.approx(ref, rel=1e-5)
    # ...and the windows matter: one window over the last tokens gives another number.
    last = cont_ids[-block:]
    assert abs(direct_logprob(model, cont_ids[-block - 1:-1], last) - ref) > 1e-2


def test_short_continuation_sees_all_the_context_that_fits():
    model, block = sharp_gpt2(), 8
    scorer = LMScorer(model, ByteTokenizer(), block_size=block)
    for context, continuation in (("abcdefghijkl", " mn"), ("ab", "cd"), ("", "xyz")):
        ctx_ids, cont_ids = scorer._encode_pair(context, continuation)
        seq = (ctx_ids + cont_ids)[-(block + 1):]
        ref = direct_logprob(model, seq[:-1], cont_ids)
        assert scorer.loglikelihood([(context, continuation)])[0][0] == pytest.approx(ref, rel=1e-5)


class Recorder(nn.Module):
    """Wraps a model and records the batch shapes it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.model(idx)


def test_batch_size_is_honoured_and_does_not_change_results():
    model = sharp_gpt2()
    requests = [("ctx %d" % i, " continuation number %d" % i) for i in range(7)]
    results = {}
    for batch_size in (1, 3, "auto"):
        recorder = Recorder(model)
        scorer = LMScorer(recorder, ByteTokenizer(), block_size=8, batch_size=batch_size, max_batch_size=5)
        results[batch_size] = scorer.loglikelihood(requests)
        rows = [shape[0] for shape in recorder.shapes]
        if batch_size == "auto":  # one probe of full windows, then batches of the size it found
            assert recorder.shapes[0] == (5, 8) and scorer._auto_batch_size == 5
            rows = rows[1:]
            batch_size = 5
        assert max(rows) == batch_size and sum(rows) == 21  # 7 requests x 3 windows each
    for other in results.values():
        assert [lp for lp, _ in other] == pytest.approx([lp for lp, _ in results[1]], rel=1e-6)
        assert [g for _, g in other] == [g for _, g in results[1]]
    for bad in (0, -2, "big", 1.5):
        with pytest.raises(TaskError, match="batch_size"):
            LMScorer(model, ByteTokenizer(), block_size=8, batch_size=bad)
    with pytest.raises(TaskError, match="exceeds the model's context of 8"):
        LMScorer(model, ByteTokenizer(), block_size=9)


def test_auto_batch_size_halves_on_out_of_memory():
    class TightMemory(nn.Module):
        def __init__(self, model, limit):
            super().__init__()
            self.model, self.limit = model, limit

        def forward(self, idx):
            if idx.shape[0] > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.model(idx)

    scorer = LMScorer(TightMemory(sharp_gpt2(), 6), ByteTokenizer(), block_size=8, batch_size="auto", max_batch_size=64)
    scorer.loglikelihood([("a", "b")])
    assert scorer._auto_batch_size == 4


def test_scorer_moves_the_model_to_its_device():
    model = sharp_gpt2()
    scorer = LMScorer(model, ByteTokenizer(), block_size=8, device="meta")
    assert scorer.device == torch.device("meta")
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}
    if not torch.cuda.is_available():
        with pytest.raises(TaskError, match="no CUDA device"):
            LMScorer(sharp_gpt2(), ByteTokenizer(), block_size=8, device="cuda")


def test_progress_bars_only_when_asked(capsys):
    scorer = LMScorer(sharp_gpt2(), ByteTokenizer(), block_size=8)
    capsys.readouterr()
    scorer.loglikelihood([("a", "b")])
    scorer.generate_until([("a", {"max_gen_toks": 2})])
    assert capsys.readouterr().err == ""
    scorer.loglikelihood([("a", "b")], progress=True)
    scorer.loglikelihood_rolling(["abc"], progress=True)
    scorer.generate_until([("a", {"max_gen_toks": 2})], progress=True)
    err = capsys.readouterr().err
    assert "loglikelihood:" in err and "loglikelihood_rolling:" in err and "generate_until:" in err


# ----------------------------------------------------------------------------------------
# Generation options


def test_generation_honours_max_gen_toks_and_until():
    table = make_table("abcdefghij")
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=4)  # contexts longer than the window
    assert scorer.generate_until([("xyza", {"until": ["f"], "max_gen_toks": 20})]) == ["bcde"]
    assert scorer.generate_until([("xyza", {"until": "de", "max_gen_toks": 20})]) == ["bc"]
    assert scorer.generate_until([("a", {"until": ["zz", "d"], "max_gen_toks": 2})]) == ["bc"]
    assert scorer.generate_until([("a", {"max_gen_toks": 0})]) == [""]
    assert scorer.generate_until([("a", {"do_sample": False, "temperature": 0.0, "max_gen_toks": 3})]) == ["bcd"]


def test_sampling_follows_the_temperature():
    table = torch.full((257, 257), -30.0)
    table[:, ord("x")] = 0.0
    table[:, ord("y")] = math.log(3.0)  # p(y) = 3/4 at temperature 1
    scorer = LMScorer(Bigram(table), ByteTokenizer(), block_size=4)
    n = 600
    for temperature, p_y in ((1.0, 0.75), (2.0, 3 ** 0.5 / (1 + 3 ** 0.5))):
        out = scorer.generate_until([("a", {"do_sample": True, "temperature": temperature, "max_gen_toks": 1})] * n)
        assert set(out) == {"x", "y"}
        freq = out.count("y") / n
        assert abs(freq - p_y) < 4 * math.sqrt(p_y * (1 - p_y) / n), (temperature, freq, p_y)
    torch.manual_seed(0)
    first = scorer.generate_until([("a", {"do_sample": True, "max_gen_toks": 8})])
    torch.manual_seed(0)
    assert scorer.generate_until([("a", {"do_sample": True, "max_gen_toks": 8})]) == first


def test_generation_options_are_honoured_or_refused():
    assert generation_options({"until": "\n", "max_gen_toks": 5}) == (["\n"], 5, None)
    assert generation_options(None) == ([], 256, None)
    assert generation_options({"do_sample": True}) == ([], 256, 1.0)
    assert generation_options({"do_sample": True, "temperature": 0.5})[2] == 0.5
    with pytest.raises(TaskError, match=r"\['top_p'\] are not supported"):
        generation_options({"top_p": 0.9})
    with pytest.raises(TaskError, match="without do_sample=True"):
        generation_options({"temperature": 0.7})
    with pytest.raises(TaskError, match="needs temperature > 0"):
        generation_options({"do_sample": True, "temperature": 0})
    with pytest.raises(TaskError, match="max_gen_toks"):
        generation_options({"max_gen_toks": -1})
    with pytest.raises(TaskError, match="until"):
        generation_options({"until": [""]})


# ----------------------------------------------------------------------------------------
# Models and tokenizers from disk


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
TINY = ["--tokenizer", "bytes", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--ffn", "64", "--ffn-ta", "128",
        "--extra-layers", "1", "--block-size", "16", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1",
        "--eval-interval", "0", "--eval-tokens", "64", "--no-progress", "--threads", "1", "--log-interval", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny `matta train` run (bytes tokenizer, 2 + 1 TA-only layers, 2 steps)."""
    from matta.cli import main

    folder = tmp_path_factory.mktemp("eval_run")
    rng = np.random.default_rng(0)
    (folder / "corpus.txt").write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 2000)))
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(folder / "run"), "--data", str(folder / "corpus.txt"), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "run"


def test_load_scorer_streams_of_a_run(run):
    cfg, nested, tokenizer = load_run(run)
    assert load_tokenizer(run).to_json() == tokenizer.to_json() == tokenizer_from_json(tokenizer.to_json()).to_json()
    idx = torch.randint(0, 257, (2, 16))
    depth = len(nested.blocks)
    for stream, layers in (("student", "student"), ("ta", "ta"), ("wide_narrow_wide:2", ["wide", "narrow", "wide"]),
                           ("narrow/skip/wide", ["narrow", "skip", "wide"])):
        scorer = load_scorer(run, stream, device="cpu")
        assert scorer.block_size == cfg.block_size == 16
        expected = extract(nested, layers) if isinstance(layers, list) else extract(nested, layers)
        torch.testing.assert_close(scorer.model(idx), expected(idx), rtol=0, atol=0)
    assert depth == 3
    student = load_scorer(run, device="cpu", max_length=8)
    assert student.block_size == 8
    torch.testing.assert_close(student.model(idx), extract(nested, "student")(idx), rtol=0, atol=0)
    for stream, message in (("tiny", "unknown model spec"), ("wide_narrow_wide:1", "even"),
                            ("wide/narrow", "3 layers"), ("wide_narrow_wide:x", "even number")):
        with pytest.raises(TaskError, match=message):
            load_scorer(run, stream)
    with pytest.raises(TaskError, match="max_length"):
        load_scorer(run, max_length=10_000)
    with pytest.raises(TaskError, match="stream"):
        stream_model(nested, "")


def test_load_scorer_extracted_folders(run, tmp_path):
    _, nested, tokenizer = load_run(run)
    sub = extract(nested, "wide_narrow_wide", k=2)
    save_extracted(sub, tmp_path / "mnm")
    with pytest.raises(TaskError, match="no matta_tokenizer.json"):
        load_scorer(tmp_path / "mnm")
    (tmp_path / "mnm" / "matta_tokenizer.json").write_text(tokenizer.to_json())
    scorer = load_scorer(tmp_path / "mnm", device="cpu")
    assert scorer.block_size == sub.config.n_positions
    idx = torch.randint(0, 257, (1, 12))
    torch.testing.assert_close(scorer.model(idx), sub(idx), rtol=0, atol=0)
    with pytest.raises(TaskError, match="drop stream="):
        load_scorer(tmp_path / "mnm", "ta")
    with pytest.raises(TaskError, match="neither a matta run directory"):
        load_scorer(tmp_path)


# ----------------------------------------------------------------------------------------
# lm-evaluation-harness


def test_without_the_harness_the_error_says_what_to_install(monkeypatch, capsys):
    import sys

    import matta

    monkeypatch.delitem(sys.modules, "matta.lm_eval_model", raising=False)
    monkeypatch.delattr(matta, "lm_eval_model", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        import matta.lm_eval_model  # noqa: F401
    from matta.cli import main

    capsys.readouterr()
    assert main(["lm-eval", "--model", "matta", "--tasks", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("matta lm-eval: error: matta.lm_eval_model needs lm-evaluation-harness") and "\n" not in err


@needs_lm_eval
def test_adapter_and_registered_model():
    from importlib.metadata import entry_points

    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from matta.lm_eval_model import MattaLM, make_lm_eval_adapter

    with pytest.raises(TypeError, match="needs an LMScorer, got Bigram"):
        make_lm_eval_adapter(Bigram(make_table()))
    assert get_model("matta") is MattaLM
    assert get_model("dummy").__name__ == "DummyLM"  # the harness's own models stay reachable
    declared = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "matta"]
    assert declared and declared[0].load() is MattaLM
    scorer = LMScorer(Bigram(make_table("the cat")), ByteTokenizer(), block_size=16)
    lm = make_lm_eval_adapter(scorer)
    assert isinstance(lm, MattaLM) and lm.device == scorer.device
    req = Instance(request_type="loglikelihood", doc={}, arguments=("the", " cat"), idx=0)
    assert lm.loglikelihood([req], disable_tqdm=True) == scorer.loglikelihood([("the", " cat")])
    for method in (lambda: lm.chat_template(True), lambda: lm.apply_chat_template([]), lambda: lm.tokenizer_name):
        with pytest.raises(TaskError, match="no chat template"):
            method()
    assert lm.chat_template(False) is None
    with pytest.raises(TaskError, match="unknown model_args pretrained"):
        MattaLM(run="x", pretrained="gpt2")
    with pytest.raises(TaskError, match="needs run="):
        MattaLM()
    with pytest.raises(TaskError, match="batch_size"):
        MattaLM(run="x", batch_size="many")


def write_tasks(folder):
    """Three tiny local tasks, one per request type (JSONL data, harness YAML)."""
    write_jsonl(folder / "mc.jsonl", [
        {"context": "the cat sat on the", "choices": ["mat", "dog", "far away"], "label": 0},
        {"context": "a dog ran", "choices": ["home", "the"], "label": 0},
    ])
    write_jsonl(folder / "text.jsonl", [{"text": "the cat sat on a mat and the dog ran far away home"}])
    write_jsonl(folder / "gen.jsonl", [{"context": "the cat sat", "answer": " on"}])
    common = f"dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: matta_test_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        f"task: matta_test_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    (folder / "gen.yaml").write_text(
        f"task: matta_test_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@needs_lm_eval
def test_the_harness_evaluates_a_run_by_name(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    import matta.lm_eval_model  # noqa: F401  registers "matta"

    write_tasks(tmp_path)
    tasks = ["matta_test_mc", "matta_test_ppl", "matta_test_gen"]
    out = lm_eval.simple_evaluate(
        model="matta", model_args=f"run={run},stream=ta", tasks=tasks, batch_size=2, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    assert set(tasks) <= set(out["results"])
    _, nested, tokenizer = load_run(run)
    ta = extract(nested, "ta")
    # One log-likelihood, computed directly: " mat" after "the cat sat on the" (18 + 4 tokens,
    # so the window of 16 holds the last 12 of the context).
    sample = next(s for s in out["samples"]["matta_test_mc"] if s["doc"]["context"] == "the cat sat on the")
    assert sample["arguments"][0] == ("the cat sat on the", " mat")
    ctx, cont = tokenizer.encode("the cat sat on the"), tokenizer.encode(" mat")
    window = (ctx + cont)[-17:-1]
    direct = direct_logprob(ta, window, cont)
    assert sample["resps"][0][0][0] == pytest.approx(direct, rel=1e-5, abs=1e-5)
    # The rolling log-likelihood over a 50-token text (block 16) is the harness's windows.
    text = "the cat sat on a mat and the dog ran far away home"
    rolled = out["samples"]["matta_test_ppl"][0]["resps"][0][0]
    ref = sum(direct_logprob(ta, c + p[:-1], p) for c, p in harness_windows(tokenizer.encode(text), 256, 16))
    assert rolled == pytest.approx(ref, rel=1e-5)
    generated = out["samples"]["matta_test_gen"][0]["resps"][0][0]
    assert generated == LMScorer(ta, tokenizer, block_size=16).generate_until([("the cat sat", {"until": ["\n"], "max_gen_toks": 6})])[0]
    with pytest.raises(TaskError, match="no chat template"):
        lm_eval.simple_evaluate(model="matta", model_args=f"run={run}", tasks=tasks[:1], device="cpu",
                                apply_chat_template=True,
                                task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
