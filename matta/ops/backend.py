"""Which implementation runs an op, the Triton kernels or plain PyTorch, and the knobs of both.

`MATTA_BACKEND` chooses:
- `auto` (default): PyTorch for CPU tensors or without Triton. For CUDA tensors the dispatch
  table decides per (op, device capability, dtype, token bucket): `use_triton_for`.
- `triton`: always Triton. CPU tensors then need `TRITON_INTERPRET=1` (set before matta is
  imported), which runs the kernels through Triton's numpy interpreter: slow, but it is how
  the kernels are tested on machines without a GPU.
- `torch`: always the PyTorch path.

The dispatch table (`dispatch_table.json` beside this file, or the file `MATTA_DISPATCH_TABLE`
names) holds what benchmarks/gpu_check.sh measured: per op, capability (`sm_90`), dtype key
(`bf16`, `fp16`, `tf32` = fp32 with TF32 allowed, `fp32` = without) and token bucket (a
power of two), the faster backend. A lookup takes the nearest measured bucket of its (op,
capability, dtype); with none measured, the default rule: Triton, except fp32 without TF32,
where the kernels run FMA-only while cuBLAS is tuned for it.

Kernel knobs for tests and GPU checks (`KernelKnobs`): the nested-linear tile shape, the
loss kernel's vocabulary block under the interpreter, and autotuning on or off. Read from
the environment once (`MATTA_INTERPRET_TILES`, `MATTA_INTERPRET_BLOCK_V`, `MATTA_AUTOTUNE`),
changed in a test by `override_kernel_knobs(...)`; the op layer passes them to the kernels
in their launch options, so no launch reads the environment.

A bad value of any of these variables is a `BackendError` naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path

import torch

BACKENDS = ("auto", "triton", "torch")
DISPATCH_TABLE = Path(__file__).with_name("dispatch_table.json")
DTYPE_KEYS = ("bf16", "fp16", "tf32", "fp32")


class BackendError(ValueError):
    """A backend setting (environment variable or dispatch table) that cannot work."""


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def requested_backend() -> str:
    choice = os.environ.get("MATTA_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise BackendError(f"MATTA_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run on these tensors (all on one device)."""
    choice = requested_backend()
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise BackendError("MATTA_BACKEND=triton but Triton is not installed (pip install triton)")
    if any(t.device.type == "meta" for t in tensors):  # shapes only (tracing): nothing for a kernel to compute
        return False
    if not on_cuda and not triton_interpreting():
        raise BackendError(
            "MATTA_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
            "matta is imported (or move the tensors to a CUDA device)"
        )
    return True


def use_triton_for(op: str, *tensors: torch.Tensor, tokens: int, dtype: torch.dtype | None = None) -> bool:
    """`use_triton`, with the dispatch table deciding CUDA tensors under MATTA_BACKEND=auto;
    the table is keyed by `dtype` (default: the first tensor's)."""
    if not use_triton(*tensors):
        return False
    if requested_backend() == "triton":
        return True
    device = tensors[0].device
    capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    return lookup(op, capability, dtype_key(tensors[0].dtype if dtype is None else dtype), tokens) == "triton"


def dtype_key(dtype: torch.dtype) -> str:
    """The dispatch table's name for a compute dtype; fp32 splits by PyTorch's TF32 switch."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def token_bucket(tokens: int) -> int:
    """The next power of two (the dispatch table's and the autotuner's shape bucket)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def default_backend(dtype: str) -> str:
    return "torch" if dtype == "fp32" else "triton"


def lookup(op: str, capability: str, dtype: str, tokens: int, path=None) -> str:
    """"triton" or "torch" for one call, from the table (nearest measured bucket) or the default."""
    measured = load_dispatch_table(path).get((op, capability, dtype))
    if not measured:
        return default_backend(dtype)
    b = token_bucket(tokens).bit_length()
    nearest = min(measured, key=lambda m: (abs(m.bit_length() - b), m))
    return measured[nearest]


def dispatch_table_path(path=None) -> Path:
    return Path(path or os.environ.get("MATTA_DISPATCH_TABLE") or DISPATCH_TABLE)


def load_dispatch_table(path=None) -> dict:
    """{(op, capability, dtype): {bucket: backend}}, validated; re-read when the file changes."""
    path = dispatch_table_path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise BackendError(f"dispatch table {path} does not exist (MATTA_DISPATCH_TABLE)") from None
    return _parse_dispatch_table(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse_dispatch_table(path: str, mtime_ns: int, size: int) -> dict:
    def bad(problem):
        return BackendError(f"dispatch table {path}: {problem}")

    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise bad(f"not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise bad('expected an object with a list "entries"')
    table = {}
    for i, entry in enumerate(data["entries"]):
        if not isinstance(entry, dict):
            raise bad(f"entry {i} is not an object")
        missing = [k for k in ("op", "capability", "dtype", "tokens", "backend") if k not in entry]
        if missing:
            raise bad(f"entry {i} lacks {', '.join(missing)}")
        op, capability, dtype, tokens, backend = (entry[k] for k in ("op", "capability", "dtype", "tokens", "backend"))
        if not (isinstance(op, str) and op):
            raise bad(f"entry {i}: op must be a non-empty string, got {op!r}")
        if not (isinstance(capability, str) and capability.startswith("sm_") and capability[3:].isdigit()):
            raise bad(f"entry {i}: capability must look like 'sm_90', got {capability!r}")
        if dtype not in DTYPE_KEYS:
            raise bad(f"entry {i}: dtype must be one of {DTYPE_KEYS}, got {dtype!r}")
        if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1 and token_bucket(tokens) == tokens):
            raise bad(f"entry {i}: tokens must be a power of two >= 1 (a bucket), got {tokens!r}")
        if backend not in ("triton", "torch"):
            raise bad(f"entry {i}: backend must be 'triton' or 'torch', got {backend!r}")
        buckets = table.setdefault((op, capability, dtype), {})
        if tokens in buckets:
            raise bad(f"entry {i} repeats ({op}, {capability}, {dtype}, tokens {tokens})")
        buckets[tokens] = backend
    return table


# ----------------------------------------------------------------------------------------
# Kernel knobs


def _powers_of_two(values, low, high) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high and not v & (v - 1) for v in values)


@dataclasses.dataclass(frozen=True)
class KernelKnobs:
    """How tests and GPU checks want the kernels launched (training leaves the defaults).

    tiles: (BLOCK_M, BLOCK_N, BLOCK_K) of the nested-linear kernel: under the interpreter any
        powers of two from 16 to 256 (None: 32, 32, 32), so the tests run a GPU's tile
        shapes on a CPU; on a GPU one of the kernel's own tile shapes, in place of
        autotuning (checked at launch). `MATTA_INTERPRET_TILES=BLOCK_M,BLOCK_N,BLOCK_K`.
    loss_block_v: the MatTA-loss row kernel's vocabulary block under the interpreter, a power
        of two from 16 to 65536 (None: 32; a GPU runs 4096). `MATTA_INTERPRET_BLOCK_V=N`.
    autotune: False launches the nested-linear kernel's first tile config instead of tuning
        (GPU test runs, where tuning every test shape would cost minutes). `MATTA_AUTOTUNE=0`.
    """

    tiles: tuple | None = None
    loss_block_v: int | None = None
    autotune: bool = True

    def __post_init__(self):
        if self.tiles is not None and (len(tuple(self.tiles)) != 3 or not _powers_of_two(self.tiles, 16, 256)):
            raise BackendError(f"the nested-linear tiles (MATTA_INTERPRET_TILES) must be three powers of two from 16 "
                               f"to 256 as BLOCK_M,BLOCK_N,BLOCK_K (for example 128,128,64), got {self.tiles!r}")
        if self.loss_block_v is not None and not _powers_of_two((self.loss_block_v,), 16, 65536):
            raise BackendError(f"the loss kernel's block (MATTA_INTERPRET_BLOCK_V) must be a power of two from 16 to "
                               f"65536 (a GPU runs 4096), got {self.loss_block_v!r}")
        if not isinstance(self.autotune, bool):
            raise BackendError(f"autotune (MATTA_AUTOTUNE) must be true or false, got {self.autotune!r}")

    @classmethod
    def from_environment(cls, environ=os.environ) -> "KernelKnobs":
        def ints(name):
            raw = environ.get(name, "").strip()
            if not raw:
                return None
            try:
                return tuple(int(p) for p in raw.split(","))
            except ValueError:
                raise BackendError(f"{name} must be integers, got {raw!r}") from None

        tiles, block_v = ints("MATTA_INTERPRET_TILES"), ints("MATTA_INTERPRET_BLOCK_V")
        if block_v is not None and len(block_v) != 1:
            raise BackendError(f"MATTA_INTERPRET_BLOCK_V must be one number, got {environ['MATTA_INTERPRET_BLOCK_V']!r}")
        autotune = environ.get("MATTA_AUTOTUNE", "1").strip() or "1"
        if autotune not in ("0", "1"):
            raise BackendError(f"MATTA_AUTOTUNE must be 0 or 1, got {autotune!r}")
        return cls(tiles=tiles, loss_block_v=None if block_v is None else block_v[0], autotune=autotune == "1")


_knobs: KernelKnobs | None = None


def kernel_knobs() -> KernelKnobs:
    """The knobs in force: the environment's, read on first use, unless a test overrides them."""
    global _knobs
    if _knobs is None:
        _knobs = KernelKnobs.from_environment()
    return _knobs


@contextlib.contextmanager
def override_kernel_knobs(**changes):
    """Inside: the knobs with `changes` (KernelKnobs fields), e.g. `tiles=(128, 128, 64)`."""
    global _knobs
    previous = kernel_knobs()
    _knobs = dataclasses.replace(previous, **changes)
    try:
        yield _knobs
    finally:
        _knobs = previous


def check_environment() -> None:
    """Raises BackendError for a bad MATTA_BACKEND or kernel knob, before any work starts."""
    requested_backend()
    kernel_knobs()
