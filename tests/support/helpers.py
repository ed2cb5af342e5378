"""Helpers shared by the integration tests: reading what the CLI printed, looking at processes in /proc,
and waiting for a condition by polling with a deadline (never a bare sleep)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def output(result: subprocess.CompletedProcess[str]) -> str:
    """Everything the CLI printed (logs go to stdout, --json logs to stderr)."""
    return result.stdout + result.stderr


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """A failed run, for an assertion message."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split(" ")
    return fields[0], int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.01) -> T:
    """Poll `condition()` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def crash(proc: subprocess.Popen[bytes] | subprocess.Popen[str], victims: list[int]) -> None:
    """SIGKILL the CLI `proc` (no cleanup of any kind) and the children in `victims` (pg_dump in its own process
    group, its workers), as a machine crash would."""
    our_group = os.getpgid(0)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in victims:
        stat = proc_stat(pid)
        if stat is not None and stat[2] != our_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stat[2], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
