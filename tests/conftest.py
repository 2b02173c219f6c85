"""Shared test set-up.

Tests run on the CPU by default. There the Triton kernels run through Triton's interpreter,
which must be switched on before any kernel module is imported, so it is done here, first.
On a GPU machine `MATTA_TEST_DEVICE=cuda` runs the same tests on compiled kernels.
Tests that pin the GPU's tile shapes or vocabulary block set the kernel knobs themselves
(the `knobs` fixture), so one session runs the interpreter's defaults and every GPU shape.

Every test gets fresh random inputs: the seed is drawn anew and printed, so a failure
shows it; `MATTA_TEST_SEED=N` replays one.
"""
import contextlib
import os
import random

TEST_DEVICE = os.environ.get("MATTA_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter runs each tl.dot as a small numpy matmul; OpenBLAS threads on such
    # products only contend with the other test worker (BENCHMARKS.md, "Choices in the
    # code"). Read when numpy loads, so set it first.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("MATTA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"MATTA_TEST_SEED={seed}")
    return seed


@pytest.fixture
def device():
    return torch.device(TEST_DEVICE)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend, with MATTA_BACKEND forced accordingly."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", request.param)
    return request.param


@contextlib.contextmanager
def launches(expected, *names):
    """`with launches(expected, "kernel_name", ...):` fails unless each named kernel launched
    inside the block (expected True) or none did (expected False), so a case that silently
    took the other backend cannot pass as coverage of this one."""
    from matta.kernels import LAUNCH_COUNTS

    before = {name: LAUNCH_COUNTS[name] for name in names}
    yield
    for name in names:
        launched = LAUNCH_COUNTS[name] - before[name]
        assert (launched > 0) == bool(expected), f"{name} launched {launched} times; expected a launch: {expected}"


@pytest.fixture
def check_launches():
    return launches


@pytest.fixture(autouse=TEST_DEVICE == "cpu")
def bf16_rounds_to_nearest(monkeypatch):
    """The Triton interpreter truncates fp32 -> bf16 where a GPU's cast rounds to nearest
    even, which doubles a kernel's bf16 rounding error on a CPU; this makes the interpreter
    round as a GPU does, so the 2x-PyTorch's-error bound tests the kernel, not the interpreter."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import numpy as np
    import triton.language as tl

    real = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype != tl.bfloat16:
            return real(data, input_dtype, output_dtype, rounding_mode)
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


CORPUS_WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def write_word_corpus(path):
    """3000 words drawn from 12 into `path`: the data of tiny training runs."""
    import numpy as np

    rng = np.random.default_rng(0)
    path.write_text(" ".join(CORPUS_WORDS[i] for i in rng.integers(0, len(CORPUS_WORDS), 3000)))
    return path


@pytest.fixture
def corpus(tmp_path):
    """A word corpus of one test's own (function scope)."""
    return write_word_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def knobs():
    """Sets kernel knobs (matta.ops.backend.KernelKnobs) for one test: `knobs(tiles=(64, 64, 32))`,
    `knobs(loss_block_v=4096)`; undone when the test ends."""
    from matta.ops import backend

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(backend.override_kernel_knobs(**changes))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and CI runs two test workers on two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory):
    """The same word corpus, shared by a module's tests (module scope)."""
    return write_word_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")
