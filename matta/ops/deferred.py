"""Checks of device values that a training step must not wait for: computed on the device
during the step, read later in one host sync, by whoever owns the report.

A producer (the MatTA loss, Shampoo) files a 0-dim bool tensor per check (True: the check
failed) with a message; the owner (a training loop, a user's own loop) reads the report where
it reads device values anyway, e.g. at a log step:

    report = DeferredReport()
    ...                                   # steps: producers call report.add(flag, message)
    report.check()                        # one host read; raises naming every failed check

Flags filed under the same messages are OR-ed into one tensor, so the report's memory stays
bounded however long nobody reads it. Nothing here is module state: a report belongs to
whoever made it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class DeferredReport:
    """Device-side checks, read once: see the module docstring."""

    def __init__(self):
        # (device, messages) -> bool flags, one per message
        self._flags: dict[tuple[torch.device, tuple[str, ...]], Tensor] = {}

    def add(self, flags: Tensor, messages: str | Sequence[str]) -> None:
        """Files `flags` (a bool tensor with one element per message, True where the check
        failed) under `messages` (one string, or one per flag). No host sync."""
        messages = (messages,) if isinstance(messages, str) else tuple(messages)
        if not isinstance(flags, Tensor) or flags.numel() != len(messages) or not messages:
            raise TypeError(f"deferred checks need a tensor of one flag per message ({len(messages)}), got "
                            f"{type(flags).__name__} {tuple(getattr(flags, 'shape', ()))}")
        flags = flags.reshape(-1).to(torch.bool)
        key = (flags.device, messages)
        held = self._flags.get(key)
        self._flags[key] = flags if held is None else held | flags

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
        return torch.cat([f.to(device) for f in flags]).any()

    def take(self) -> list[str]:
        """The messages of the failed checks, in filing order, each once; one host read.
        Clears the report."""
        items = list(self._flags.items())
        self._flags.clear()
        if not items:
            return []
        values = torch.cat([flags.to("cpu") for _, flags in items]).tolist()
        messages = [message for (_, call_messages), _ in items for message in call_messages]
        return list(dict.fromkeys(message for message, bad in zip(messages, values) if bad))

    def clear(self) -> None:
        """Drops what is filed without reading it (for an owner that knows nothing failed)."""
        self._flags.clear()

    def check(self, error: type[Exception] = ValueError, prefix: str = "") -> None:
        """Raises `error(prefix + messages)` if any filed check failed (one host read); clears."""
        failed = self.take()
        if failed:
            raise error(prefix + "; ".join(failed))
