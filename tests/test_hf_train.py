"""`matta train --model hf:FOLDER` on tiny random Hugging Face folders (made here, no
downloads): training with the folder's tokenizer, the baseline, exact resume, a Teacher,
`matta extract` to folders that `from_pretrained` loads and that compute the nested paths,
lm-evaluation-harness scoring an extracted folder, and one-line refusals."""
import json

import numpy as np
import pytest
import torch

from matta.cli import main
from matta.train import load_run
from matta.train import Run, make_config
from test_hf_causal import perturb_, tiny_config
from conftest import CORPUS_WORDS
from test_train import crash_and_resume, train_records

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):  # lines, unlike conftest's: documents for the folder's tokenizer
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(" ".join(CORPUS_WORDS[i] for i in rng.integers(0, len(CORPUS_WORDS), 12)) for _ in range(300)))
    return path


def hf_folder(root, family, corpus, *, vocab=280, model_vocab=300, eos="</s>", **changes):
    """A tiny random model of `family` and a BPE tokenizer trained on `corpus`, saved the
    way transformers saves them (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([corpus.read_text()], vocab_size=vocab, min_frequency=1, special_tokens=["<s>", eos],
                                  show_progress=False)
    # Like Llama's: a BOS before every text, unless asked not to add special tokens.
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    config = tiny_config(family, vocab_size=model_vocab, bos_token_id=0, eos_token_id=1, **changes)
    model = perturb_(transformers.AutoModelForCausalLM.from_config(config))
    folder = root / family
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "bos_token": "<s>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, corpus):
    return hf_folder(tmp_path_factory.mktemp("hf"), "llama", corpus)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, corpus):  # dropout 0.1 in its config: resume must restore the random streams
    return hf_folder(tmp_path_factory.mktemp("hf"), "gpt2", corpus, eos="<|endoftext|>")


TINY = ["--block-size", "16", "--batch-size", "2", "--ffn-ta", "64", "--extra-layers", "1", "--warmup-steps", "1",
        "--log-interval", "1", "--eval-interval", "0", "--eval-tokens", "64", "--no-progress", "--threads", "1"]


def tiny_cfg(tmp_path, folder, corpus, name="run", **overrides):
    values = dict(out=str(tmp_path / name), model=f"hf:{folder}", data=str(corpus), block_size=16, batch_size=2,
                  ffn_ta=64, extra_layers=1, max_steps=4, warmup_steps=1, log_interval=1, eval_interval=0,
                  checkpoint_interval=0, eval_tokens=64, progress=False, rampup_steps=2, lr=3e-3, threads=1,
                  baseline=False)
    values.update(overrides)
    return make_config(values)


def direct_logprob(model, ids, targets):
    """log p(targets | ids) from a transformers model's own logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -len(targets):].log_softmax(-1)
    return float(logits.gather(1, torch.tensor(targets)[:, None]).sum())


def test_train_extract_serve_and_score(tmp_path, llama, corpus, monkeypatch):
    run, models = tmp_path / "run", tmp_path / "models"
    assert main(["train", "--model", f"hf:{llama}", "--data", str(corpus), "--out", str(run), *TINY,
                 "--max-steps", "3", "--optimizer", "shampoo", "--precondition-frequency", "2",
                 "--start-preconditioning-step", "2"]) == 0
    results = json.loads((run / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names[:2] == ["Student", "TA"] and names[-1] == "Student alone"  # the baseline: --mode student
    assert json.loads((run / "baseline" / "config.json").read_text())["mode"] == "student"
    info = json.loads((run / "model.json").read_text())
    assert info["kind"] == "hf" and info["config"]["hf_config"]["model_type"] == "llama"
    assert json.loads((run / "tokenizer.json").read_text())["matta_tokenizer"] == "hf"

    assert main(["extract", "--run", str(run), "--spec", "all", "--out", str(models)]) == 0
    _, nested, tokenizer = load_run(run)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    logits = dict(zip(("student", "ta"), nested(idx)))
    folders = sorted(p.name for p in models.iterdir())
    assert folders[:2] == ["student", "ta"] and "wide_narrow_wide_k0" in folders
    for name in folders:
        served = transformers.AutoModelForCausalLM.from_pretrained(models / name).eval()
        assert type(served) is transformers.LlamaForCausalLM
        if name in logits:
            with torch.no_grad():
                assert torch.equal(served(idx).logits, logits[name]), name
    served_tokenizer = transformers.AutoTokenizer.from_pretrained(models / "student")
    text = "the cat sat on a mat"
    assert served_tokenizer(text)["input_ids"][0] == 0 and tokenizer.encode(text)[0] != 0  # no BOS inside the data
    assert served_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert tokenizer.eot_id == served_tokenizer.convert_tokens_to_ids("</s>")

    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import matta.lm_eval_model  # noqa: F401  registers "matta"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "the cat sat on the", "choices": ["mat", "far"], "label": 0}))
    (tmp_path / "mc.yaml").write_text(
        f"task: hf_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(model="matta", model_args=f"run={models / 'student'}", tasks=["hf_mc"], device="cpu",
                                  log_samples=True, task_manager=TaskManager(include_path=str(tmp_path),
                                                                             include_defaults=False))
    sample = out["samples"]["hf_mc"][0]
    assert sample["arguments"][0] == ("the cat sat on the", " mat")
    ctx, cont = tokenizer.encode("the cat sat on the"), tokenizer.encode(" mat")
    student = transformers.AutoModelForCausalLM.from_pretrained(models / "student").eval()
    assert sample["resps"][0][0][0] == pytest.approx(direct_logprob(student, ctx + cont[:-1], cont), rel=1e-5)
    assert main(["eval", "--run", str(run), "--models", "student", "--tasks", "val"]) == 0
    row = json.loads((run / "eval.json").read_text())["models"][0]
    assert row["val_loss"] == pytest.approx(results["models"][0]["val_loss"], rel=1e-5)


def test_resume_is_bit_identical(tmp_path, gpt2, corpus, monkeypatch):
    """Killed after step 4 (checkpoint at 3) and resumed: the run ends bit-identical to an
    uninterrupted one, Shampoo's state and GPT-2's dropout (0.1 in its config) included."""
    def config(tmp_path, corpus, name, **common):
        return tiny_cfg(tmp_path, gpt2, corpus, name, **common)

    straight, _ = crash_and_resume(tmp_path, corpus, monkeypatch, config=config, max_steps=6, checkpoint_interval=3,
                                   optimizer="shampoo", precondition_frequency=2, start_preconditioning_step=2,
                                   family=False)
    assert straight.model.hf.training and straight.model.hf.config.resid_pdrop > 0


def test_student_mode_and_a_teacher(tmp_path, llama, corpus):
    student = Run(tiny_cfg(tmp_path, llama, corpus, "student", mode="student", max_steps=2))
    rows = student.train(report=False)["models"]
    assert [r["name"] for r in rows] == ["Student"]
    assert not any(p.requires_grad for p in student.model.ta_only_parameters())
    taught = Run(tiny_cfg(tmp_path, llama, corpus, "taught", teacher=str(llama), max_steps=2))
    taught.train(report=False)
    records = train_records(tmp_path / "taught")
    assert taught.teacher is not None and len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)


def test_bad_folders_and_flags_are_refused_in_one_line(tmp_path, llama, corpus, capsys):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((llama / name).read_bytes())
    small = hf_folder(tmp_path / "small", "gpt2", corpus, model_vocab=270, eos="<|endoftext|>")  # 280 ids, 270 rows
    softcap = hf_folder(tmp_path / "softcap", "gemma2", corpus)
    fused = tmp_path / "phi3"
    transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=300, hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)).save_pretrained(fused)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (fused / name).write_text((llama / name).read_text())
    capsys.readouterr()  # transformers' progress bars while saving
    cases = [
        (["--model", f"hf:{no_tokenizer}"], "has no tokenizer.json"),
        (["--model", f"hf:{small}"], "the tokenizer has 280 ids but the model only 270 embedding rows"),
        (["--model", f"hf:{llama}", "--n-layer", "1"], "--n-layer does not apply to --model hf:"),
        (["--model", f"hf:{llama}", "--tokenizer", "bytes"], "reads its folder's own tokenizer; drop --tokenizer"),
        (["--model", f"hf:{llama}", "--dropout", "0.1"], "keeps the dropout of its config.json"),
        (["--model", f"hf:{llama}", "--block-size", "64"], "--block-size 64 exceeds the 32 positions"),
        (["--model", f"hf:{softcap}"], "soft-caps its logits"),
        (["--model", f"hf:{fused}"], "fits none of its layouts"),
        (["--model", f"hf:{tmp_path / 'missing'}"], "is not a folder"),
    ]
    for flags, message in cases:
        args = ["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--max-steps", "1", "--no-progress",
                "--no-baseline", "--block-size", "16", "--batch-size", "2"]
        code = main([*args, *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, (flags, err)



@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, llama, corpus):
    """torchrun with 2 gloo processes, DistributedDataParallel and FSDP2: the losses and
    gradient norms of one process on the same global batch. (FSDP gathers a decoder layer's
    weights for each of its two calls per step, one per stream.)"""
    from test_ddp_train import _records, _train

    common = ["--model", f"hf:{llama}", "--data", str(corpus), *TINY, "--max-steps", "3", "--no-family", "--no-baseline"]
    _train([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"], 1, tmp_path)  # flags given last win
    one = _records(tmp_path / "one")
    for parallel in ("ddp", "fsdp"):
        _train([*common, "--out", str(tmp_path / parallel), "--batch-size", "2", "--parallel", parallel], 2, tmp_path)
        for a, b in zip(one, _records(tmp_path / parallel)):
            for key in ("loss", "loss_student", "loss_ta", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=2e-5), (parallel, key)
