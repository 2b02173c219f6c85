"""A benchmark's JSON results, saved whenever they grow, so a killed benchmark keeps its rows.

A lent GPU runs each benchmark under a time limit (benchmarks/gpu_check.sh); a benchmark
that wrote its JSON only at the end would leave nothing when killed. `PartialResults`
rewrites the whole file atomically (matta._atomic) after every change, so the file on disk
is always a complete JSON document holding every row measured so far, with
`"complete": false` until `finish()`. Without a path it only keeps the document in memory.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta._atomic import write_json_atomic  # noqa: E402


class PartialResults:
    def __init__(self, path: str | None, **header):
        self.path = path
        self.doc = {**header, "complete": False}
        self._save()

    def set(self, **fields) -> None:
        """Top-level fields (a device name, a summary computed from the rows)."""
        self.doc.update(fields)
        self._save()

    def add(self, key: str, row: dict, line: str | None = None) -> None:
        """Appends `row` to the list `key`, saves, and prints `line` (flushed) if given."""
        self.doc.setdefault(key, []).append(row)
        self._save()
        if line is not None:
            print(line, flush=True)

    def replace(self, key: str, rows: list) -> None:
        """Sets the list `key` anew (medians that improve with every round of an interleaved timing)."""
        self.doc[key] = list(rows)
        self._save()

    def finish(self) -> dict:
        self.doc["complete"] = True
        self._save()
        return self.doc

    def _save(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.doc)
