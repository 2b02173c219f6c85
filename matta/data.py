"""Training data: the builtin corpus, text files, pre-tokenised `.bin` files, HF streaming.

Every source turns into token ids and hands out batches of `(x, y)` blocks of
`block_size` tokens, `y` being `x` shifted by one. A batch is a pure function of the seed
and its index (`batch(index)`), so the data position saved in a checkpoint is one integer
and a resumed run reads exactly the batches an uninterrupted run would have read. Under
data parallelism every rank draws the same global batch and keeps its own rows.

Sources (`load_data(spec, ...)`):
- `builtin`: the English text of Python's `pydoc_data` module (ships with every Python),
  tokenised with a byte-level BPE trained on it at first use and cached, or with bytes.
- `stdlib`: the Python standard library's own source (about 12 MB of .py files outside test
  folders and site-packages, ~5x more tokens than `builtin`, for studies that must not run out of
  data); a BPE trained on it and cached likewise. It changes between Python versions, so
  `Data.provenance` records the version and a content hash (`stdlib_corpus()`).
- a text file, or a folder of them (read recursively; bytes that are not UTF-8 are
  replaced for the BPE and kept as they are by the byte tokenizer).
- a pre-tokenised `.bin` file of uint16 or uint32 ids (nanoGPT layout, memory-mapped), or a
  folder holding `train.bin` and `val.bin`.
- `hf:NAME[:CONFIG]`: a Hugging Face dataset streamed with `datasets`, tokenised with the
  GPT-2 BPE from `tiktoken` (C4, `hf:allenai/c4:en`, is the paper's setting).

The tokenizer choice `hf:FOLDER` is the tokenizer of a Hugging Face model folder
(`HFTokenizer`: its tokenizer.json, read with `tokenizers`); `matta train --model hf:FOLDER`
uses it for any of the sources above.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._atomic import write_atomic, write_text_atomic

BUILTIN = "builtin"
STDLIB = "stdlib"
# Folders of the standard library that are not its own source: test suites and installed packages.
STDLIB_SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
EOT = "<|endoftext|>"
TOKENIZER_CHOICES = ("auto", "bpe", "bytes", "gpt2")  # and "hf:FOLDER"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Larger than the vocabulary of any tokenizer in use (Gemma's has 262,144 ids); an inferred
# vocabulary beyond it means the ids were read with the wrong --bin-dtype.
MAX_INFERRED_VOCAB = 1 << 20
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".json", ".jsonl", ".csv", ".html", ".tex", ""}


class DataError(ValueError):
    """A data source that cannot be used as given; the message says how to fix it."""


def cache_dir() -> Path:
    """Where trained tokenizers are cached: $MATTA_CACHE_DIR, else ~/.cache/matta."""
    root = os.environ.get("MATTA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "matta"
    )
    return Path(root)


# ----------------------------------------------------------------------------------------
# Tokenizers: each can save itself as one JSON file and be loaded back from it.


class ByteTokenizer:
    """Token = byte (vocabulary 256, plus one end-of-text id)."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return list(data)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"matta_tokenizer": "bytes"})


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library (trained here, or loaded from JSON)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        trainer = ByteLevelBPETokenizer()
        trainer.train_from_iterator(
            texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
        )
        return cls.from_json(trainer._tokenizer.to_str())

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return self._tok.to_str()


class TiktokenGPT2:
    """The GPT-2 BPE (50257 ids) from `tiktoken`; its table is fetched once by tiktoken."""

    kind = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise DataError("the GPT-2 tokenizer needs tiktoken: pip install tiktoken") from None
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # network or cache failure inside tiktoken
            raise DataError(
                f"could not load tiktoken's GPT-2 encoding ({type(exc).__name__}: {exc}); "
                "connect to the internet once or set TIKTOKEN_CACHE_DIR to a folder holding it"
            ) from None

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return json.dumps({"matta_tokenizer": "gpt2"})


class HFTokenizer(BPETokenizer):
    """The tokenizer of a Hugging Face model folder: its `tokenizer.json` (a fast tokenizer),
    read with the `tokenizers` library. Text is encoded without the special tokens the
    tokenizer would add (a BOS per call would land inside scored continuations); documents
    end with the model's end-of-text token (`eos_token` of tokenizer_config.json, else
    `eos_token_id` of config.json). The folder's tokenizer files travel with it (`to_json`), so
    that `save_files` can put them beside an exported model for `AutoTokenizer`."""

    kind = "hf"

    def __init__(self, tokenizer, eot_id: int, files: dict):
        super().__init__(tokenizer)
        self.eot_id, self.files = eot_id, dict(files)

    @classmethod
    def from_folder(cls, path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path} is not a folder; hf:FOLDER names a Hugging Face model folder")
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"{path} has no tokenizer.json (a fast tokenizer): save one there with "
                            "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
        files = {name: (path / name).read_text() for name in HF_TOKENIZER_FILES if (path / name).is_file()}
        try:
            tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        except Exception as exc:  # tokenizers raises its own exception type for a malformed file
            raise DataError(f"{path / 'tokenizer.json'} cannot be read by the tokenizers library ({exc})") from None
        return cls(tokenizer, _eos_id(path, tokenizer), files)

    @classmethod
    def from_json(cls, text: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        saved = json.loads(text)
        return cls(Tokenizer.from_str(saved["files"]["tokenizer.json"]), saved["eot_id"], saved["files"])

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def to_json(self) -> str:
        return json.dumps({"matta_tokenizer": "hf", "eot_id": self.eot_id, "files": self.files})

    def save_files(self, folder) -> None:
        """Writes the Hugging Face tokenizer files it was read from into `folder`."""
        for name, text in self.files.items():
            write_text_atomic(Path(folder) / name, text)


def _eos_id(path: Path, tokenizer) -> int:
    """The end-of-text id of a Hugging Face folder's tokenizer (see HFTokenizer)."""
    def read(name):
        try:
            return json.loads((path / name).read_text()) if (path / name).is_file() else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{path / name} is not valid JSON ({exc})") from None

    token = read("tokenizer_config.json").get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    eos = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if eos is None:
        eos = read("config.json").get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int) or not 0 <= eos < tokenizer.get_vocab_size():
        raise DataError(f"{path} names no end-of-text token its tokenizer knows (eos_token in tokenizer_config.json "
                        "or eos_token_id in config.json); add one")
    return eos


def named_tokenizer(choice: str):
    """The tokenizer a choice names outright (bytes, gpt2, hf:FOLDER), or None (a BPE to train)."""
    if choice == "bytes":
        return ByteTokenizer()
    if choice == "gpt2":
        return TiktokenGPT2()
    if choice.startswith("hf:"):
        return HFTokenizer.from_folder(choice[3:])
    return None


def tokenizer_from_json(text: str):
    """Loads a tokenizer saved with `to_json()` (a run directory's tokenizer.json)."""
    try:
        head = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer file is not valid JSON ({exc}); rerun `matta train` to rewrite it") from None
    kind = head.get("matta_tokenizer") if isinstance(head, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenGPT2()
    if kind == "hf":
        return HFTokenizer.from_json(text)
    return BPETokenizer.from_json(text)


# ----------------------------------------------------------------------------------------
# Raw text of each source


def builtin_documents() -> list[str]:
    """The English help topics of `pydoc_data` (about 465k characters), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_root() -> Path:
    """The folder of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class StdlibCorpus:
    """The standard library's .py files in a fixed order (sorted relative POSIX paths), with
    what identifies them: the Python version and a SHA-256 over every path and its bytes."""

    root: Path
    files: tuple[str, ...]
    sha256: str
    python_version: str
    bytes: int

    def documents(self) -> list[str]:
        return [(self.root / f).read_bytes().decode("utf-8", errors="replace") for f in self.files]

    def provenance(self) -> dict:
        """What a run records about its data: enough to tell whether two runs saw the same text."""
        return {"corpus": STDLIB, "python_version": self.python_version, "sha256": self.sha256,
                "files": len(self.files), "bytes": self.bytes, "root": str(self.root)}


def stdlib_corpus(root: Path | None = None) -> StdlibCorpus:
    """The .py files under `root` (default: this Python's standard library), leaving out
    test folders and installed packages (STDLIB_SKIPPED_FOLDERS)."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} does not exist; use --data builtin or a text folder")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIPPED_FOLDERS]
        rel = Path(folder).relative_to(root)
        files += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise DataError(f"no .py files under {root}; use --data builtin or a text folder")
    digest, total = hashlib.sha256(), 0
    for f in files:
        data = (root / f).read_bytes()
        digest.update(f.encode() + b"\x00" + len(data).to_bytes(8, "little") + data)
        total += len(data)
    return StdlibCorpus(root, tuple(files), digest.hexdigest(), platform.python_version(), total)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DataError(f"folder {path} holds no text files (*.txt, *.md, ...); point --data at a text file or folder")
    return files


def _read_bytes(files: list[Path]) -> list[bytes]:
    return [f.read_bytes() for f in files]


# ----------------------------------------------------------------------------------------
# Batches


def _seed_for(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TokenBatches:
    """Random blocks of an in-memory or memory-mapped token array.

    `batch(index, batch_size, rank, world_size)`: batch `index` is `batch_size *
    world_size` block starts drawn from a generator seeded by (seed, index); rank r keeps
    rows r*batch_size ... (r+1)*batch_size - 1. One process with the global batch sees the
    same rows as all ranks together.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens = tokens
        self.block_size = block_size
        self.seed = seed

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1):
        gen = torch.Generator().manual_seed(_seed_for(self.seed, index))
        high = len(self.tokens) - self.block_size  # start + block_size + 1 <= len
        starts = torch.randint(high, (batch_size * world_size,), generator=gen)
        starts = starts[rank * batch_size : (rank + 1) * batch_size].tolist()
        rows = np.stack([np.asarray(self.tokens[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def val_blocks(tokens: np.ndarray, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping blocks of `block_size + 1` tokens (inputs + shifted targets)."""
    n = (len(tokens) - 1) // block_size
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // block_size))
    rows = [np.asarray(tokens[i * block_size : i * block_size + block_size + 1], dtype=np.int64) for i in range(n)]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, block_size + 1, dtype=torch.long)


class StreamingBatches:
    """Blocks cut from a stream of documents (HF streaming); read in order only.

    Batch k is the k-th run of `batch_size * world_size` blocks; rank r keeps rows
    r*batch_size ... (r+1)*batch_size - 1, as in TokenBatches. Resuming at batch k re-reads the stream
    from its start and skips what the first k batches used: slow for large k, but exact.
    """

    def __init__(self, documents_factory, tokenizer, block_size: int):
        self._factory = documents_factory
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._blocks = None
        self._next = 0
        self._cached = None

    def _block_stream(self):
        buf: list[int] = []
        for doc in self._factory():
            buf.extend(self.tokenizer.encode(doc))
            buf.append(self.tokenizer.eot_id)
            while len(buf) >= self.block_size + 1:
                yield buf[: self.block_size + 1]
                buf = buf[self.block_size :]

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1):
        per_batch = batch_size * world_size
        if self._cached is None or self._cached[0] != (index, per_batch):
            self._cached = ((index, per_batch), self._read(index, per_batch))
        rows = torch.tensor(self._cached[1][rank * batch_size : (rank + 1) * batch_size], dtype=torch.long)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _read(self, index: int, per_batch: int) -> list[list[int]]:
        if self._blocks is None or index < self._next:
            self._blocks, self._next = self._block_stream(), 0
        try:
            while self._next < index:  # skip to the wanted batch (resume)
                for _ in range(per_batch):
                    next(self._blocks)
                self._next += 1
            rows = [next(self._blocks) for _ in range(per_batch)]
        except StopIteration:
            raise DataError("the streamed dataset ran out of text; lower --max-steps or --tokens") from None
        self._next += 1
        return rows


@dataclass
class Data:
    """What `load_data` returns: the batch source, the validation tokens and the tokenizer."""

    train: TokenBatches | StreamingBatches
    val_tokens: np.ndarray
    tokenizer: object | None
    vocab_size: int
    description: str
    train_tokens: int | None  # None for a stream
    provenance: dict = field(default_factory=dict)  # what identifies the text (stdlib: version, hash)

    def val_blocks(self, max_tokens: int | None = None) -> torch.Tensor:
        return val_blocks(self.val_tokens, self.train.block_size, max_tokens)


# ----------------------------------------------------------------------------------------
# Loading


def _builtin_tokenizer(choice: str, vocab_size: int):
    return named_tokenizer(choice) or _cached_bpe(builtin_documents(), vocab_size, "pydoc")


def _cached_bpe(texts: list[str], vocab_size: int, name: str) -> BPETokenizer:
    """A BPE trained on `texts`, cached under cache_dir() by a hash of the texts."""
    key = hashlib.sha256("\x00".join(texts).encode("utf-8", errors="replace")).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"{name}_bpe_{vocab_size}_{key}.json"
    if path.is_file():
        try:
            return BPETokenizer.from_json(path.read_text())
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    tok = BPETokenizer.train(texts, vocab_size)
    write_text_atomic(path, tok.to_json())
    return tok


def _cached_tokens(tokenizer, documents: list[str], text_key: str, name: str) -> np.ndarray:
    """The encoded `documents`, cached under cache_dir() by the text's key and the tokenizer
    (encoding 12 MB takes tens of seconds on a busy CPU; a study loads the data once per run)."""
    key = hashlib.sha256((text_key + "\x00" + tokenizer.to_json()).encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{name}_{tokenizer.kind}_{tokenizer.vocab_size}_{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # a damaged cache file is rebuilt, never trusted
            pass
    tokens = _encode_documents(tokenizer, documents)

    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, tokens)

    write_atomic(path, save)
    return tokens


def _encode_documents(tokenizer, documents) -> np.ndarray:
    ids: list[int] = []
    encoded = tokenizer.encode_batch(documents) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, documents)
    for doc_ids in encoded:
        ids.extend(doc_ids)
        ids.append(tokenizer.eot_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _split(tokens: np.ndarray, val_fraction: float, block_size: int, what: str):
    need = 2 * (block_size + 1)
    if len(tokens) < need:
        raise DataError(
            f"{what} has {len(tokens)} tokens, fewer than the {need} needed for one training and one "
            f"validation block of --block-size {block_size}; use more text or a smaller --block-size"
        )
    n_val = max(block_size + 1, int(len(tokens) * val_fraction))
    n_val = min(n_val, len(tokens) - (block_size + 1))
    return tokens[:-n_val], tokens[-n_val:]


def _check_length(tokens: np.ndarray, block_size: int, what: str) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(
            f"{what} has {len(tokens)} tokens, fewer than one block of --block-size {block_size} (+1); "
            "use more text or a smaller --block-size"
        )


def _load_bin(path: Path, dtype: str, block_size: int, val_fraction: float, vocab_size: int | None):
    np_dtype = {"uint16": np.uint16, "uint32": np.uint32}.get(dtype)
    if np_dtype is None:
        raise DataError(f"--bin-dtype must be uint16 or uint32, got {dtype!r}")

    def mm(p: Path) -> np.ndarray:
        size = p.stat().st_size
        itemsize = np.dtype(np_dtype).itemsize
        if size == 0:
            raise DataError(f"{p} is empty; point --data at a non-empty .bin file")
        if size % itemsize:
            raise DataError(
                f"{p} has {size} bytes, not a multiple of {itemsize} ({dtype}); pass the right --bin-dtype"
            )
        return np.memmap(p, dtype=np_dtype, mode="r")

    if path.is_dir():
        for name, other in (("train.bin", "val.bin"), ("val.bin", "train.bin")):
            if not (path / name).is_file():
                raise DataError(f"folder {path} has {other} but no {name}; add {name} (token ids of the same dtype)"
                                + (f", or pass --data {path / other} to hold out --val-fraction of it"
                                   if name == "val.bin" else ""))
        train, val = mm(path / "train.bin"), mm(path / "val.bin")
        _check_length(train, block_size, str(path / "train.bin"))
        _check_length(val, block_size, str(path / "val.bin"))
    else:
        train, val = _split(mm(path), val_fraction, block_size, str(path))
    for part in (train, val):
        _check_dtype(part, dtype, path)
    top = int(max(train.max(), val.max())) + 1
    if vocab_size is None:
        if top > MAX_INFERRED_VOCAB:
            raise DataError(
                f"{path} read as {dtype} holds token id {top - 1:,}, which would make a vocabulary of {top:,}: "
                + ("uint16 data read as uint32 looks like this; pass --bin-dtype uint16, or " if dtype == "uint32"
                   else "") + "pass --vocab-size if the ids are right"
            )
        vocab_size = top
    elif vocab_size < top:
        raise DataError(f"{path} holds token id {top - 1} but --vocab-size is {vocab_size}; raise --vocab-size")
    return train, val, vocab_size


def _check_dtype(tokens: np.ndarray, dtype: str, path: Path) -> None:
    """uint32 ids (below 65536) read as uint16 are every id followed by a 0: refuse that."""
    head = np.asarray(tokens[: 1 << 16])
    if dtype == "uint16" and len(head) >= 64 and not head[1::2].any() and head[0::2].any():
        raise DataError(f"{path} read as uint16 has a 0 at every second position, as uint32 data read as uint16 "
                        "does; pass --bin-dtype uint32")


def _hf_documents(name: str, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the `datasets` package: pip install datasets (and network access)") from None
    repo, _, config = name.partition(":")
    text_field = "text"

    def factory():
        try:
            stream = datasets.load_dataset(repo, config or None, split=split, streaming=True)
            for row in stream:
                yield row[text_field]
        except KeyError:
            raise DataError(f"dataset {repo} has no '{text_field}' field; choose a text dataset") from None
        except Exception as exc:
            raise DataError(
                f"could not stream hf:{name} split {split} ({type(exc).__name__}: {exc}); "
                "check the name and that the Hugging Face hub is reachable"
            ) from None

    return factory


def load_data(
    spec: str = BUILTIN,
    *,
    block_size: int,
    seed: int = 0,
    tokenizer: str = "auto",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    bin_dtype: str = "uint16",
    hf_val_tokens: int = 262144,
) -> Data:
    """Opens the data source `spec` (see the module docstring) for training and validation."""
    if tokenizer not in TOKENIZER_CHOICES and not tokenizer.startswith("hf:"):
        raise DataError(f"--tokenizer must be one of {', '.join(TOKENIZER_CHOICES)} or hf:FOLDER, got {tokenizer!r}")
    if block_size < 1:
        raise DataError(f"--block-size must be positive, got {block_size}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    bpe_vocab = vocab_size or 2048

    if spec.startswith("hf:"):
        name = spec[3:]
        if not name:
            raise DataError("hf: needs a dataset name, e.g. --data hf:allenai/c4:en")
        if tokenizer not in ("auto", "gpt2") and not tokenizer.startswith("hf:"):
            raise DataError(f"hf: data is tokenised with the GPT-2 BPE or a model folder's tokenizer; drop "
                            f"--tokenizer {tokenizer} or use gpt2")
        tok = named_tokenizer("gpt2" if tokenizer == "auto" else tokenizer)
        train = StreamingBatches(_hf_documents(name, "train"), tok, block_size)
        val_docs = _hf_documents(name, "validation")
        val_ids: list[int] = []
        for doc in val_docs():
            val_ids.extend(tok.encode(doc) + [tok.eot_id])
            if len(val_ids) >= hf_val_tokens:
                break
        val = np.asarray(val_ids, dtype=np.uint16)
        _check_length(val, block_size, f"hf:{name} validation split")
        return Data(train, val, tok, tok.vocab_size, f"hf:{name} (streamed, {tok.kind} tokenizer)", None)

    if spec == STDLIB:
        corpus = stdlib_corpus()
        documents = corpus.documents()
        tok = named_tokenizer(tokenizer) or _cached_bpe(documents, bpe_vocab, "stdlib")
        tokens = _cached_tokens(tok, documents, corpus.sha256, STDLIB)
        train, val = _split(tokens, val_fraction, block_size, "the stdlib corpus")
        desc = (f"Python {corpus.python_version} standard library source ({len(corpus.files)} files, "
                f"{len(tokens):,} tokens, {tok.kind} tokenizer, vocab {tok.vocab_size}, sha256 {corpus.sha256[:12]})")
        return Data(TokenBatches(train, block_size, seed), val, tok, tok.vocab_size, desc, len(train), corpus.provenance())

    if spec == BUILTIN:
        tok = _builtin_tokenizer("bpe" if tokenizer == "auto" else tokenizer, bpe_vocab)
        tokens = _encode_documents(tok, builtin_documents())
        train, val = _split(tokens, val_fraction, block_size, "the builtin corpus")
        desc = f"builtin pydoc_data corpus ({len(tokens):,} tokens, {tok.kind} tokenizer, vocab {tok.vocab_size})"
        return Data(TokenBatches(train, block_size, seed), val, tok, tok.vocab_size, desc, len(train))

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {spec} does not exist; pass an existing text file, folder or .bin, or --data builtin")
    is_bin = path.suffix == ".bin" or (path.is_dir() and any((path / n).is_file() for n in ("train.bin", "val.bin")))
    if is_bin:
        if tokenizer in ("bpe", "bytes"):
            raise DataError(f".bin data is already tokenised; use --tokenizer auto or gpt2, not {tokenizer}")
        tok = None if tokenizer == "auto" else named_tokenizer(tokenizer)
        if tok is not None and vocab_size is not None and vocab_size < tok.vocab_size:
            raise DataError(f"--vocab-size {vocab_size} is smaller than the {tok.kind} tokenizer's {tok.vocab_size} "
                            "ids; drop --vocab-size")
        train, val, vocab = _load_bin(path, bin_dtype, block_size, val_fraction,
                                      vocab_size or (tok.vocab_size if tok is not None else None))
        desc = f"{path} ({len(train) + len(val):,} tokens, {bin_dtype}, vocab {vocab})"
        return Data(TokenBatches(train, block_size, seed), val, tok, vocab, desc, len(train))

    files = _text_files(path)
    raw = _read_bytes(files)
    if sum(len(r) for r in raw) == 0:
        raise DataError(f"{spec} is empty; point --data at a file or folder with text in it")
    tok = named_tokenizer(tokenizer) or _cached_bpe([r.decode("utf-8", errors="replace") for r in raw], bpe_vocab, "text")
    tokens = _encode_documents(tok, raw if tok.kind == "bytes" else [r.decode("utf-8", errors="replace") for r in raw])
    train, val = _split(tokens, val_fraction, block_size, str(path))
    desc = f"{path} ({len(files)} file(s), {len(tokens):,} tokens, {tok.kind} tokenizer, vocab {tok.vocab_size})"
    return Data(TokenBatches(train, block_size, seed), val, tok, tok.vocab_size, desc, len(train))
