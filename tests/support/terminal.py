"""Running the real CLI on a pseudo-terminal, as an operator at a keyboard would: what it asks, and the
answer typed."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from kkua_backupd.proc.workers import descendants

if TYPE_CHECKING:
    from tests.conftest import Env, RedisEnv


def run_with_terminal(env: Env | RedisEnv, *args: str, answer: str | None, timeout: float = 120.0) -> tuple[int, str]:
    """Run `kkua-backup ARGS` on a real pseudo-terminal and type `answer` when it asks for confirmation
    (None: a command that must not ask)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kkua_backupd", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env.cli_env(), start_new_session=True, close_fds=True)
    os.close(slave)
    buf = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the CLI on a terminal did not finish in {timeout:.0f} s; output so far:\n"
                            + buf.decode("utf-8", "replace"))
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other end is gone
                    break
                if not data:
                    break
                buf += data
                if not answered and b"Type 'yes' to continue:" in buf:
                    assert answer is not None, "the CLI asked for confirmation: " + buf.decode("utf-8", "replace")
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None and not descendants(proc.pid):
                # Drain what is left, then stop.
                with contextlib.suppress(OSError):
                    while select.select([master], [], [], 0.05)[0]:
                        data = os.read(master, 65536)
                        if not data:
                            break
                        buf += data
                break
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = buf.decode("utf-8", "replace")
    assert answered or answer is None, f"the CLI never asked for confirmation on a terminal:\n{text}"
    return rc, text
