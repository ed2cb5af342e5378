"""Progress on a terminal: bytes, rate and elapsed time on one self-rewriting stderr line.

Shown only when a person watches (stderr is a terminal, not under systemd, not with --json).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """Format a byte count the way `ls -h` does (1023 B, 1.5 KiB, 12.0 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Counts bytes of one step and redraws a status line at most four times a second."""

    def __init__(self, label: str, *, total: int | None = None, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """Count `n` more bytes and redraw if it is time."""
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._last_draw >= 0.25:
                self._last_draw = now
                self.draw()

    def draw(self) -> None:
        """Write the status line now."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {human_bytes(self.done)}"
        if self.total:
            text += f" of {human_bytes(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {human_bytes(rate)}/s, {elapsed:.0f} s"
        if not self._drawn:
            from kkua_backupd.obs.logs import sink  # log lines erase this line before they print

            sink().before_console = self.clear
        with self._lock:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        """Erase the status line (before a log line is printed, and at the end)."""
        if self._drawn:
            with self._lock:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._drawn = False


def interactive(stream: TextIO | None = None) -> bool:
    """True when a person is watching `stream` (a terminal, and not under systemd's journal)."""
    stream = stream or sys.stderr
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("KKUA_NO_PROGRESS"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
