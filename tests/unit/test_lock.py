"""Per-target locks: a second holder is refused with the first holder's pid; death frees the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kkua_backupd.errors import LockHeld
from kkua_backupd.store.lock import TargetLock, holder_of

HOLD = """
import sys, time
from pathlib import Path
from kkua_backupd.store.lock import TargetLock
lock = TargetLock(Path(sys.argv[1]), "postgres", "backup postgres")
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_second_holder_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {proc.pid}") as info:
            TargetLock(tmp_path, "postgres", "restore postgres").acquire()
        assert info.value.exit_code == 3
        assert "backup postgres" in str(info.value)
        holder = holder_of(tmp_path, "postgres")
        assert holder is not None
        assert holder["pid"] == proc.pid
    finally:
        proc.kill()  # like kill -9: the kernel drops the flock
        proc.wait()
    with TargetLock(tmp_path, "postgres", "backup postgres"):  # free again once the holder died
        holder = holder_of(tmp_path, "postgres")
        assert holder is not None
        assert holder["pid"] == os.getpid()
    assert holder_of(tmp_path, "postgres") is None


def test_targets_do_not_block_each_other(tmp_path: Path) -> None:
    with TargetLock(tmp_path, "postgres", "backup"), TargetLock(tmp_path, "redis", "backup"):
        pass
