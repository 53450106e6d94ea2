"""A one-line progress bar over epochs with the latest metrics (no dependency, quiet mode)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line per update on a terminal; prints one line per update elsewhere."""

    def __init__(self, total: int, desc: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, width: int = 20, start: int = 0):
        self.total, self.desc, self.width = total, desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = start
        self.t0 = time.perf_counter()
        self._open = False  # a partial line is on the terminal

    def update(self, done: int, metrics: str = "") -> None:
        """`done` of `total` epochs are finished; `metrics` is shown after the bar."""
        if not self.enabled:
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / max(done - self.start, 1)
        line = (f"{self.desc} {done:>{len(str(self.total))}}/{self.total} [{bar}] "
                f"{rate:5.2f}s/epoch {metrics}").rstrip()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if done == self.total else ""))
            self._open = done != self.total
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends a partly drawn line (after an interruption or an error)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
