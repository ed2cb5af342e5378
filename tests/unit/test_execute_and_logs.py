"""The execute module with real child processes, and the log format journald and operators read."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import structlog

from kkua_backupd.errors import CommandFailed, StepTimeout
from kkua_backupd.obs import logs
from kkua_backupd.proc import execute


def test_failure_carries_the_last_stderr_lines() -> None:
    with pytest.raises(CommandFailed, match="exited with status 3") as info:
        execute.run(("sh", "-c", "echo first >&2; echo 'the real reason' >&2; exit 3"), job="t")
    assert info.value.stderr_tail[-1] == "the real reason"
    assert "the real reason" in str(info.value)


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(CommandFailed, match="not found"):
        execute.run(("/nonexistent/pg_dump", "--version"), job="t")


def test_timeout_stops_the_step() -> None:
    started = time.monotonic()
    with pytest.raises(StepTimeout, match="timed out after"):
        execute.run(("sleep", "30"), job="t", timeout=0.5)
    assert time.monotonic() - started < 15


def test_grace_then_sigkill_for_a_child_that_ignores_sigterm() -> None:
    group = execute.ProcessGroup("t", grace=0.5)
    with group:
        child = group.spawn(("sh", "-c", "trap '' TERM; echo ready; sleep 30"))
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        started = time.monotonic()
        group.stop_all()
        assert child.popen.poll() is not None
        assert time.monotonic() - started < 10


def test_siblings_are_stopped_when_one_fails() -> None:
    with execute.ProcessGroup("t", grace=2) as group:
        sleeper = group.spawn(("sleep", "30"), stdout=execute.DEVNULL)
        failing = group.spawn(("sh", "-c", "exit 1"), stdout=execute.DEVNULL)
        with pytest.raises(CommandFailed):
            group.wait(failing)
        sleeper.popen.wait(timeout=10)  # raises TimeoutExpired if the sibling was not stopped
        assert sleeper.popen.poll() is not None


def test_children_do_not_inherit_secrets_or_the_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_PASSWORD", "nope")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    out = execute.run(("env",), job="t", env={"PGPASSWORD": "given"}).decode()
    assert "DATABASE_PASSWORD" not in out
    assert "NOTIFY_SOCKET" not in out
    assert "PGPASSWORD=given" in out


def test_children_share_one_process_group() -> None:
    with execute.ProcessGroup("t") as group:
        a = group.spawn(("sleep", "5"), stdout=execute.DEVNULL)
        b = group.spawn(("sleep", "5"), stdout=execute.DEVNULL)
        assert os.getpgid(a.pid) == os.getpgid(b.pid) == a.pid
        assert os.getpgid(a.pid) != os.getpgrp()
        group.stop_all()


def test_journald_lines_carry_priority_and_no_timestamp() -> None:
    out = io.StringIO()
    sink = logs.LogSink(out, journald=True)
    for level in ("info", "warning", "error"):
        with pytest.raises(structlog.DropEvent):  # the sink ends the chain once written
            sink(None, level, {"event": "backup finished", "level": level, "file": "a b.sql.gz", "bytes": 12})
    lines = out.getvalue().splitlines()
    assert lines == ['<6>backup finished file="a b.sql.gz" bytes=12',
                     '<4>backup finished file="a b.sql.gz" bytes=12',
                     '<3>backup finished file="a b.sql.gz" bytes=12']


def test_secrets_are_masked_in_console_and_files(tmp_path: Path) -> None:
    out = io.StringIO()
    sink = logs.LogSink(out, journald=False)
    sink.add_secret("hunter2-xyzzy")
    sink.open_file(tmp_path / "logs", "backup.log")
    with pytest.raises(structlog.DropEvent):
        sink(None, "error", {"event": "psql: password hunter2-xyzzy rejected", "level": "error"})
    sink.close()
    written = (tmp_path / "logs" / "backup.log").read_text()
    assert "hunter2-xyzzy" not in out.getvalue() + written
    assert "<redacted>" in written
    assert oct((tmp_path / "logs" / "backup.log").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "logs").stat().st_mode & 0o777) == oct(0o750)
