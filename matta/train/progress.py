"""Progress of a run on stderr: a tqdm bar on a terminal; elsewhere (a log file, CI, nohup)
one plain line per log interval instead of every bar refresh."""
from __future__ import annotations

import sys


def summary(rec: dict) -> str:
    """The loss terms and speed of a train record, as the bar and the log lines show them."""
    text = (f"L_S {rec['loss_student']:.3f}  L_TA {rec['loss_ta']:.3f}  L_D {rec['loss_distill']:.3f}  "
            f"{rec['tokens_per_s']:,.0f} tok/s")
    return text + (f"  MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "")


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, log):
        self.total, self.enabled, self.log = total, enabled, log
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr, desc="train")

    def advance(self):
        """One step done (no host sync: the bar only counts)."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, rec: dict):
        """A logged train record: the bar's postfix, or one line on stderr."""
        if self.bar is not None:
            self.bar.set_postfix_str(summary(rec))
        elif self.enabled:
            print(f"train step {rec['step']}/{self.total}: {summary(rec)}", file=sys.stderr, flush=True)

    def write(self, line: str):
        """A message that must not be overwritten by the bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
