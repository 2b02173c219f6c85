"""Data sources: builtin corpus, text files and folders, .bin memmaps, HF errors, batches."""
import json

import numpy as np
import pytest
import torch

from matta.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    TokenBatches,
    builtin_documents,
    load_data,
    tokenizer_from_json,
    val_blocks,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATTA_CACHE_DIR", str(tmp_path / "cache"))


def _text(n_words=400, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "x", "yy"]
    return " ".join(words[i] for i in rng.integers(0, len(words), n_words))


def test_builtin_corpus_is_english_help_text():
    docs = builtin_documents()
    text = "".join(docs)
    assert len(docs) > 10 and len(text) > 100_000
    assert "statement" in text and "class" in text


def test_builtin_bytes_tokens_are_the_utf8_of_the_corpus():
    data = load_data("builtin", block_size=32, tokenizer="bytes", val_fraction=0.05)
    expected = []
    for doc in builtin_documents():
        expected += list(doc.encode("utf-8")) + [256]
    got = np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val_tokens)])
    assert np.array_equal(got, np.asarray(expected))
    assert data.vocab_size == 257 and data.tokenizer.kind == "bytes"


def test_builtin_bpe_is_trained_once_then_cached(tmp_path):
    first = load_data("builtin", block_size=64, vocab_size=512)
    files = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(files) == 1
    second = load_data("builtin", block_size=64, vocab_size=512)
    assert first.tokenizer.to_json() == second.tokenizer.to_json()
    assert np.array_equal(np.asarray(first.train.tokens), np.asarray(second.train.tokens))
    assert first.vocab_size == 512
    # BPE compresses the text and decodes back to it.
    sample = builtin_documents()[3][:500]
    ids = first.tokenizer.encode(sample)
    assert len(ids) < len(sample.encode()) and first.tokenizer.decode(ids) == sample
    # A damaged cache file is rebuilt, not trusted.
    files[0].write_text("{broken")
    third = load_data("builtin", block_size=64, vocab_size=512)
    assert third.tokenizer.to_json() == first.tokenizer.to_json()


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text(_text(300, 1))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text(_text(300, 2))
    (sub / "image.png").write_bytes(b"\x89PNG not text")
    one = load_data(str(tmp_path / "a.txt"), block_size=16, tokenizer="bytes")
    both = load_data(str(tmp_path), block_size=16, tokenizer="bytes")
    n_one = len(one.train.tokens) + len(one.val_tokens)
    n_both = len(both.train.tokens) + len(both.val_tokens)
    assert n_one == len((tmp_path / "a.txt").read_bytes()) + 1
    assert n_both == n_one + len((sub / "b.md").read_bytes()) + 1  # the .png is not read
    bpe = load_data(str(tmp_path), block_size=16, vocab_size=300)
    assert bpe.tokenizer.kind == "bpe" and bpe.vocab_size <= 300


def test_non_utf8_bytes(tmp_path):
    raw = _text(200).encode() + b"\xff\xfe\x80 tail " + bytes(range(128, 256))
    path = tmp_path / "latin.txt"
    path.write_bytes(raw)
    data = load_data(str(path), block_size=8, tokenizer="bytes")
    tokens = np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val_tokens)])
    assert bytes(tokens[:-1].astype(np.uint8)) == raw  # bytes kept exactly
    bpe = load_data(str(path), block_size=8, vocab_size=300)  # replaced, not an error
    assert "\ufffd" in bpe.tokenizer.decode(np.concatenate([bpe.train.tokens, bpe.val_tokens]))


def test_empty_and_too_short_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_data(str(empty), block_size=8, tokenizer="bytes")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(DataError, match="smaller --block-size"):
        load_data(str(short), block_size=64, tokenizer="bytes")
    data = load_data(str(short), block_size=4, tokenizer="bytes")  # fits with a small block
    x, y = data.train.batch(0, 3)
    assert x.shape == (3, 4)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "nope.txt"), block_size=8)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_data(str(tmp_path / "empty_dir"), block_size=8)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_memmap(tmp_path, dtype):
    high = 60_000 if dtype == "uint16" else 100_000
    tokens = np.random.default_rng(0).integers(0, high, 5000).astype(dtype)
    path = tmp_path / "train_data.bin"
    tokens.tofile(path)
    data = load_data(str(path), block_size=32, bin_dtype=dtype, val_fraction=0.1)
    assert isinstance(data.train.tokens, np.memmap)
    assert data.vocab_size == int(tokens.max()) + 1
    assert np.array_equal(np.concatenate([data.train.tokens, data.val_tokens]), tokens)
    x, y = data.train.batch(5, 4)
    assert x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    # every row is a real slice of the file
    flat = tokens.astype(np.int64)
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        starts = np.flatnonzero(flat[: len(flat) - 32] == row[0])
        assert any(np.array_equal(flat[s : s + 33], row) for s in starts)
    with pytest.raises(DataError, match="raise --vocab-size"):
        load_data(str(path), block_size=32, bin_dtype=dtype, vocab_size=10)


def test_bin_folder_and_bad_sizes(tmp_path):
    rng = np.random.default_rng(1)
    rng.integers(0, 500, 1000).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 500, 200).astype(np.uint16).tofile(tmp_path / "val.bin")
    data = load_data(str(tmp_path), block_size=16, vocab_size=512)
    assert len(data.train.tokens) == 1000 and len(data.val_tokens) == 200 and data.vocab_size == 512
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="--bin-dtype"):
        load_data(str(odd), block_size=4)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_data(str(empty), block_size=4)


def test_bin_data_read_the_wrong_way_is_refused(tmp_path):
    ids = np.random.default_rng(2).integers(1, 300, 4000)
    ids.astype(np.uint16).tofile(tmp_path / "u16.bin")
    ids.astype(np.uint32).tofile(tmp_path / "u32.bin")
    for dtype in ("uint16", "uint32"):  # each the right way round
        data = load_data(str(tmp_path / f"u{dtype[4:]}.bin"), block_size=16, bin_dtype=dtype)
        assert data.vocab_size == int(ids.max()) + 1
    # uint16 ids read as uint32 pair up into ids near 300 * 65536: no vocabulary is that large
    with pytest.raises(DataError, match=r"vocabulary of [\d,]+: uint16 data read as uint32 .* --bin-dtype uint16"):
        load_data(str(tmp_path / "u16.bin"), block_size=16, bin_dtype="uint32")
    # ...unless the caller says the vocabulary is real
    assert load_data(str(tmp_path / "u16.bin"), block_size=16, bin_dtype="uint32", vocab_size=1 << 25).vocab_size == 1 << 25
    # uint32 ids read as uint16 have a 0 at every second position
    with pytest.raises(DataError, match="--bin-dtype uint32"):
        load_data(str(tmp_path / "u32.bin"), block_size=16)
    for present, missing in (("train.bin", "val.bin"), ("val.bin", "train.bin")):
        folder = tmp_path / present.replace(".", "_")
        folder.mkdir()
        ids.astype(np.uint16).tofile(folder / present)
        with pytest.raises(DataError, match=f"has {present} but no {missing}"):
            load_data(str(folder), block_size=16)


def test_batches_are_deterministic_and_sharded():
    tokens = np.arange(10_000, dtype=np.uint16)
    batches = TokenBatches(tokens, block_size=12, seed=3)
    x, y = batches.batch(7, 8)
    x2, _ = batches.batch(7, 8)
    assert torch.equal(x, x2)
    assert torch.equal(y, x + 1)  # arange: targets are the next ids
    assert not torch.equal(x, batches.batch(8, 8)[0])
    assert not torch.equal(x, TokenBatches(tokens, 12, seed=4).batch(7, 8)[0])
    parts = [batches.batch(7, 2, rank, 4)[0] for rank in range(4)]
    assert torch.equal(torch.cat(parts), x)  # ranks together read the global batch


def test_val_blocks_are_consecutive():
    tokens = np.arange(100, dtype=np.uint16)
    blocks = val_blocks(tokens, 10)
    assert blocks.shape == (9, 11)
    assert torch.equal(blocks[:, 0], torch.arange(0, 90, 10))
    assert val_blocks(tokens, 10, max_tokens=30).shape == (3, 11)


def test_tokenizer_json_round_trip():
    tok = BPETokenizer.train([_text(500)], 300)
    again = tokenizer_from_json(tok.to_json())
    text = "gamma delta über"
    assert again.encode(text) == tok.encode(text)
    assert isinstance(tokenizer_from_json(ByteTokenizer().to_json()), ByteTokenizer)
    assert json.loads(ByteTokenizer().to_json()) == {"matta_tokenizer": "bytes"}
    with pytest.raises(DataError, match="not valid JSON"):
        tokenizer_from_json("{nope")


def test_hf_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install"):
            load_data("hf:allenai/c4:en", block_size=16)
    with pytest.raises(DataError, match="dataset name"):
        load_data("hf:", block_size=16)


def test_bad_arguments():
    with pytest.raises(DataError, match="--tokenizer"):
        load_data("builtin", block_size=8, tokenizer="word")
    with pytest.raises(DataError, match="--val-fraction"):
        load_data("builtin", block_size=8, val_fraction=1.5)
