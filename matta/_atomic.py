"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The content goes to a temporary sibling, is flushed to disk, and is renamed over the target;
then the folder entry is flushed too, so the rename survives a power cut. A write that fails
(a full disk, a read-only folder) removes the temporary file and raises OSError naming the
file it was writing (a failed `write()` or `fsync()` alone would not say which).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def fsync_dir(path) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path, write: Callable[[Path], None]) -> None:
    """`write(path)`, then flush the file to disk (no rename: for files inside a temporary folder)."""
    path = Path(path)
    try:
        write(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def write_atomic(path, write: Callable[[Path], None]) -> None:
    """Replace `path` atomically by what `write(tmp_path)` writes; makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename == str(tmp) and exc.errno is not None:  # name the file the caller asked for
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
