"""Tracing a step without computing it: fake device tensors, real host tensors, one record per op.

`StepTracer` runs code on FakeTensors (shapes, dtypes and strides, no data, no memory) and
records, per dispatched op, an `OpCost` (matta/costmodel/formulas.py) under the current
`phase`. Two kinds of tensor meet in a training step, and the tracer keeps them apart as a
GPU run does:

- device tensors (parameters, activations, gradients, optimizer state, anything made with a
  `device=` argument or from another device tensor): fake, priced;
- host tensors (bookkeeping made without a device, such as Shampoo's step counters and block
  tables, or the trainer's batch of token ids before it moves): real CPU tensors, computed
  for real and never priced. A factory call without `device=` makes one; an op whose tensor
  inputs are all real stays real.

A read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, an op
whose output shape depends on the values such as `nonzero`) is a **host sync** on a GPU: the
host waits until the device has caught up. The tracer records each with the Python line that
made it and answers it with a stand-in so the trace can go on: True for a bool, 0 for a number
(a finite-check passes, an error estimate is 0), an empty result for a data-dependent shape.
Consecutive reads with no device work between them count as one sync (one copy, then reads).
"""
from __future__ import annotations

import contextlib
import traceback
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from .formulas import OpCost, op_cost

aten = torch.ops.aten

# Factories whose result lives on the host when no device is given.
_FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.eye, torch.arange,
    torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.scalar_tensor,
})
# Ops whose output shape depends on the values: a GPU must sync to size the output.
_DATA_DEPENDENT = frozenset({
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default,
    aten.nonzero_static.default,
})


# Indexing with a bool mask sizes its work from the mask's values (a nonzero inside).
_INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                        aten._index_put_impl_.default})


def _masked_index(func, args) -> bool:
    return func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                      for i in (args[1] if len(args) > 1 else ()) if i is not None)


@dataclass
class HostRead:
    op: str
    shape: tuple
    where: str  # "file:line in function" of the first frame outside torch
    phase: str
    starts_sync: bool  # False when it follows another read with no device work between


@dataclass
class Record:
    phase: str
    cost: OpCost
    where: str = ""


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if "/torch/" in path or "/costmodel/" in path or "contextlib" in path or path.startswith("<"):
            continue
        return f"{path}:{frame.lineno} in {frame.name}"
    return "?"


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


class _HostFactories(TorchFunctionMode):
    """Factory calls without a device make real host tensors (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None and not any(_is_fake(t) for t in tree_leaves(args)):
            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class StepTracer(TorchDispatchMode):
    """Records the cost of every device op (see the module docstring).

    Args:
        card_kind: "gpu" or "cpu": how launches are counted (matta/costmodel/formulas.py).
        sm_count: the GPU's SMs, for the nested-linear split-K choice.
        with_locations: keep the Python line of every op (slower; for the top-ops table).
    """

    def __init__(self, card_kind: str = "gpu", sm_count: int = 132, with_locations: bool = False):
        super().__init__()
        self.card_kind, self.sm_count, self.with_locations = card_kind, sm_count, with_locations
        self.phase = "setup"
        self.records: list[Record] = []
        self.host_reads: list[HostRead] = []
        self._last_was_read = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = any(_is_fake(t) for t in tensors)
        if tensors and not fake:  # host work: computed for real, free on the device
            with _disable_current_modes():
                return func(*args, **kwargs)
        if fake and (func is aten._local_scalar_dense.default or func in _DATA_DEPENDENT or _masked_index(func, args)):
            return self._host_read(func, tensors[0], args)
        out = func(*args, **kwargs)
        cost = op_cost(func, args, kwargs, out, self.card_kind, self.sm_count)
        if cost is not None:
            self.records.append(Record(self.phase, cost, _caller() if self.with_locations else ""))
            self._last_was_read = False
        return out

    def _host_read(self, func, tensor, args):
        where = _caller()
        read = HostRead(str(func), tuple(tensor.shape), where, self.phase, starts_sync=not self._last_was_read)
        self.host_reads.append(read)
        self._last_was_read = True
        if func is aten._local_scalar_dense.default:
            return True if tensor.dtype == torch.bool else (0 if not tensor.is_floating_point() else 0.0)
        if func in (aten.equal.default, aten.is_nonzero.default):
            return True
        if func in _INDEX_OPS:
            if func is aten.index.Tensor:  # the masked dimensions become one empty dimension
                masked = sum(i.dim() for i in args[1] if i is not None)
                return tensor.new_empty((0, *tensor.shape[masked:]))
            return tensor  # x[mask] = v: the stand-in writes nothing
        if "nonzero" in str(func):
            return tensor.new_empty((0, tensor.dim()), dtype=torch.int64)
        return tensor.new_empty((0,))

    @property
    def syncs(self) -> int:
        """Host syncs: bursts of host reads (see the module docstring)."""
        return sum(r.starts_sync for r in self.host_reads)


@contextlib.contextmanager
def fake_device_tracing(fake_mode: FakeTensorMode, tracer: StepTracer):
    """Inside: ops on `fake_mode`'s tensors are recorded by `tracer`; host factories are real."""
    # PyTorch runs clipping and optimizers with foreach kernels for plain tensors on every
    # device; FakeTensors would otherwise take the per-tensor fallback a real step never takes.
    from torch.utils import _foreach_utils

    added = FakeTensor not in _foreach_utils._foreach_supported_types
    if added:
        _foreach_utils._foreach_supported_types.append(FakeTensor)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            with fake_mode, tracer, _HostFactories():
                yield tracer
    finally:
        if added:
            _foreach_utils._foreach_supported_types.remove(FakeTensor)


def new_fake_mode() -> FakeTensorMode:
    """A FakeTensorMode that accepts real (host) tensors beside fake ones."""
    return FakeTensorMode(allow_non_fake_inputs=True)

