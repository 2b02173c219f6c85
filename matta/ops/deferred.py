"""Checks of device values that a training step must not wait for: computed on the device
during the step, read later in one host sync, by whoever owns the report.

A producer (the MatTA loss, Shampoo) files a 0-dim bool tensor per check (True: the check
failed) with a message; the owner (a training loop, a user's own loop) reads the report where
it reads device values anyway, e.g. at a log step:

    report = DeferredReport()
    ...                                   # steps: producers call report.add(flag, message)
    report.check()                        # one host read; raises naming every failed check

Flags filed under the same message are OR-ed into one tensor, so the report's memory stays
bounded however long nobody reads it. Nothing here is module state: a report belongs to
whoever made it.
"""
from __future__ import annotations

import torch
from torch import Tensor


class DeferredReport:
    """Device-side checks, read once: see the module docstring."""

    def __init__(self):
        self._flags: dict[tuple[torch.device, str], Tensor] = {}

    def add(self, flag: Tensor, message: str) -> None:
        """Files `flag` (a bool tensor with one element, True when the check failed) under
        `message`. No host sync."""
        if not isinstance(flag, Tensor) or flag.numel() != 1:
            raise TypeError(f"a deferred check needs a one-element tensor, got {type(flag).__name__} "
                            f"{tuple(getattr(flag, 'shape', ()))}")
        flag = flag.reshape(()).to(torch.bool)
        key = (flag.device, message)
        held = self._flags.get(key)
        self._flags[key] = flag if held is None else held | flag

    def __bool__(self) -> bool:
        """Whether anything is filed (not whether it failed: that takes a read)."""
        return bool(self._flags)

    def any_failed(self, device=None) -> Tensor:
        """A 0-dim bool tensor on `device` (default: that of the first filed check, else the
        CPU): whether any filed check failed. No host sync; to fold into a read the owner
        makes anyway."""
        flags = list(self._flags.values())
        if device is None:
            device = flags[0].device if flags else torch.device("cpu")
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=device)
        return torch.stack([f.to(device) for f in flags]).any()

    def take(self) -> list[str]:
        """The messages of the failed checks, in filing order, each once; one host read.
        Clears the report."""
        items = list(self._flags.items())
        self._flags.clear()
        if not items:
            return []
        values = torch.stack([flag.to("cpu") for _, flag in items]).tolist()
        return list(dict.fromkeys(message for ((_, message), _), bad in zip(items, values) if bad))

    def check(self, error: type[Exception] = ValueError, prefix: str = "") -> None:
        """Raises `error(prefix + messages)` if any filed check failed (one host read); clears."""
        failed = self.take()
        if failed:
            raise error(prefix + "; ".join(failed))
