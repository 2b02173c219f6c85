"""Which implementation runs an op: the Triton kernels or plain PyTorch.

`MATTA_BACKEND` chooses:
- `auto` (default): Triton for CUDA tensors when Triton is installed, PyTorch otherwise.
- `triton`: always Triton. CPU tensors then need `TRITON_INTERPRET=1` (set before matta is
  imported), which runs the kernels through Triton's numpy interpreter: slow, but it is how
  the kernels are tested on machines without a GPU.
- `torch`: always the PyTorch path.
"""
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


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
        raise ValueError(f"MATTA_BACKEND must be one of {BACKENDS}, got {choice!r}")
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
        raise RuntimeError("MATTA_BACKEND=triton but Triton is not installed (pip install triton)")
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            "MATTA_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
            "matta is imported (or move the tensors to a CUDA device)"
        )
    return True
