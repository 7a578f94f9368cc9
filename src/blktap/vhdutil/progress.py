"""A progress bar on standard error for long operations (coalesce, fill, check).

Shown only when standard error is a terminal (or when forced); silent otherwise, so that
scripts and logs see nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


class Progress:
    """``update(done)`` redraws ``label [#####.....]  42%`` at most ten times a second.

    ``enabled=None`` means: only when ``stream`` is a terminal.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = os.isatty(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                enabled = False
        self.enabled = enabled
        self.label = label
        self.total = max(total, 1)
        self._last = 0.0
        self._shown = False

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(max(done / self.total, 0.0), 1.0)
        width = 40
        fill = int(frac * width)
        bar = "#" * fill + "." * (width - fill)
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:3.0f}%")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if not self.enabled:
            return
        self.update(self.total, force=True)
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
