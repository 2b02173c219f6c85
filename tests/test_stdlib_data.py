"""`--data stdlib`: the standard library's source as a corpus: which files, their order, the
content hash and Python version a run records, and the token cache. Fast: the loading tests
read a small copy of a few stdlib modules, the real corpus is only listed and hashed."""
import shutil

import numpy as np
import pytest
import torch

import matta.data as data_module
from matta.data import STDLIB_SKIPPED_FOLDERS, DataError, load_data, stdlib_corpus, stdlib_root

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATTA_CACHE_DIR", str(tmp_path / "cache"))


def make_tree(root):
    files = {
        "b.py": "import os\n", "a.py": "x = 1\n", "pkg/__init__.py": "", "pkg/z.py": "def f():\n    return 2\n",
        "notes.txt": "not python\n", "test/test_a.py": "assert 1\n", "pkg/tests/t.py": "assert 2\n",
        "idlelib/idle_test/x.py": "pass\n", "site-packages/thirdparty.py": "bad\n", "pkg/__pycache__/z.py": "no\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_selects_source_outside_test_folders_and_packages_in_a_fixed_order(tmp_path):
    root = make_tree(tmp_path / "lib")
    corpus = stdlib_corpus(root)
    assert corpus.files == ("a.py", "b.py", "pkg/__init__.py", "pkg/z.py")
    assert corpus.bytes == sum((root / f).stat().st_size for f in corpus.files)
    assert corpus.documents()[1] == "import os\n"
    again = stdlib_corpus(root)
    assert again.sha256 == corpus.sha256 and len(corpus.sha256) == 64
    prov = corpus.provenance()
    assert prov["corpus"] == "stdlib" and prov["sha256"] == corpus.sha256 and prov["files"] == 4
    assert prov["python_version"].count(".") == 2
    # Changing one byte, renaming a file, or adding one changes the hash.
    hashes = {corpus.sha256}
    (root / "a.py").write_text("x = 2\n")
    hashes.add(stdlib_corpus(root).sha256)
    (root / "a.py").rename(root / "c.py")
    hashes.add(stdlib_corpus(root).sha256)
    (root / "pkg" / "new.py").write_text("")
    hashes.add(stdlib_corpus(root).sha256)
    assert len(hashes) == 4
    (root / "test" / "inside.py").write_text("changes nothing\n")
    assert stdlib_corpus(root).sha256 in hashes


def test_the_real_standard_library():
    corpus = stdlib_corpus()
    assert corpus.root == stdlib_root()
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= set(corpus.files)
    assert corpus.bytes > 5_000_000 and len(corpus.files) > 300
    assert not any(STDLIB_SKIPPED_FOLDERS.intersection(f.split("/")[:-1]) for f in corpus.files)
    assert list(corpus.files) == sorted(corpus.files)


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
    """A copy of a few real stdlib modules, standing in for the whole library."""
    root = tmp_path / "stdlib"
    for name in ("os.py", "json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "this.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_root() / name, root / name)
    monkeypatch.setattr(data_module, "stdlib_root", lambda: root)
    return root


def test_load_records_provenance_and_caches_tokens(small_stdlib, tmp_path, monkeypatch):
    data = load_data("stdlib", block_size=32, seed=3, vocab_size=300)
    assert data.provenance == stdlib_corpus(small_stdlib).provenance()
    assert "standard library" in data.description and data.provenance["sha256"][:12] in data.description
    assert data.vocab_size == 300 == data.tokenizer.vocab_size
    text = "".join((small_stdlib / f).read_text() for f in stdlib_corpus(small_stdlib).files)
    assert data.tokenizer.decode(data.tokenizer.encode(text[:500])) == text[:500]
    assert len(list((tmp_path / "cache" / "tokens").glob("stdlib_bpe_300_*.npy"))) == 1
    x, y = data.train.batch(5, 4)

    def no_encoding(*args):
        raise AssertionError("the tokens should come from the cache")

    monkeypatch.setattr(data_module, "_encode_documents", no_encoding)
    again = load_data("stdlib", block_size=32, seed=3, vocab_size=300)
    np.testing.assert_array_equal(np.asarray(again.val_tokens), np.asarray(data.val_tokens))
    x2, y2 = again.train.batch(5, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
    # A damaged cache file is rebuilt, not trusted.
    monkeypatch.undo()
    monkeypatch.setattr(data_module, "stdlib_root", lambda: small_stdlib)
    path = next((tmp_path / "cache" / "tokens").glob("*.npy"))
    path.write_bytes(b"garbage")
    rebuilt = load_data("stdlib", block_size=32, seed=3, vocab_size=300)
    np.testing.assert_array_equal(np.asarray(rebuilt.val_tokens), np.asarray(data.val_tokens))


def test_byte_tokenizer_and_changed_text(small_stdlib):
    data = load_data("stdlib", block_size=32, seed=0, tokenizer="bytes")
    assert data.vocab_size == 257
    before = data.provenance["sha256"]
    (small_stdlib / "this.py").write_text("print('changed')\n")
    changed = load_data("stdlib", block_size=32, seed=0, tokenizer="bytes")
    assert changed.provenance["sha256"] != before  # a new text is never read from the old cache
    assert changed.train_tokens != data.train_tokens


def test_missing_or_empty_library(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        stdlib_corpus(tmp_path / "nowhere")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "only_tests.py").write_text("")
    with pytest.raises(DataError, match="no .py files"):
        stdlib_corpus(tmp_path / "empty")
