"""The state file: runs recorded by any runner, atomic and locked updates, corrupt files set aside, status."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kkua_backupd.config import Config
from kkua_backupd.core import state
from kkua_backupd.errors import JobError, LockHeld
from kkua_backupd.obs import logs
from kkua_backupd.store.lock import TargetLock


def make_config(tmp_path: Path, **schedule: object) -> Config:
    data: dict[str, object] = {"backup_dir": str(tmp_path / "backups"), "log_dir": str(tmp_path / "logs")}
    if schedule:
        data["schedule"] = schedule
    return Config.model_validate(data)


def test_a_successful_run_is_recorded_with_size_and_files(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with state.track(config, "postgres", runner="timer") as record:
        entry = state.load(config)["jobs"]["postgres"]
        assert entry["last_result"] == "running" and entry["pid"] == os.getpid()
        record.finish(size=4096, files=["kkua_backup_20240115_020000.sql.gz"])
    entry = state.load(config)["jobs"]["postgres"]
    assert entry["last_result"] == "ok" and entry["error"] is None
    assert entry["size"] == 4096 and entry["files"] == ["kkua_backup_20240115_020000.sql.gz"]
    assert entry["runner"] == "timer"
    start, end = state.parse_iso(entry["last_start"]), state.parse_iso(entry["last_end"])
    assert start is not None and end is not None and start <= end
    assert start.utcoffset() is not None  # ISO 8601 with the offset
    assert config.state_file.stat().st_mode & 0o777 == 0o640
    assert config.state_file.parent.stat().st_mode & 0o777 == 0o750


def test_a_failed_run_keeps_the_one_line_error_and_reraises(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(JobError), state.track(config, "redis", runner="cli"):
        raise JobError("cannot reach 127.0.0.1:6379: connection refused", hint="start redis")
    entry = state.load(config)["jobs"]["redis"]
    assert entry["last_result"] == "failed"
    assert entry["error"] == "cannot reach 127.0.0.1:6379: connection refused; start redis"


def test_a_refused_run_leaves_the_holders_record(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with state.track(config, "postgres", runner="daemon") as record:
        record.finish(size=1)
    before = state.load(config)["jobs"]["postgres"]
    with pytest.raises(LockHeld), state.track(config, "postgres", runner="cron"):
        raise LockHeld("another run holds the postgres lock (pid 1)")
    after = state.load(config)["jobs"]["postgres"]
    assert after["last_refused"]["reason"].startswith("another run holds the postgres lock")
    assert after["last_refused"]["runner"] == "cron"
    del after["last_refused"]
    assert after == before


def test_corrupt_state_is_kept_aside_and_a_fresh_one_started(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup()  # log to this test's captured stdout
    config = make_config(tmp_path)
    config.state_file.parent.mkdir(parents=True)
    config.state_file.write_text('{"jobs": {"postgres": {"last_res')
    assert state.load(config)["jobs"] == {}  # reading alone reports, never moves
    assert config.state_file.exists()
    with state.track(config, "postgres", runner="cli"):
        pass
    assert state.load(config)["jobs"]["postgres"]["last_result"] == "ok"
    kept = list(config.state_file.parent.glob("jobs.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text().startswith('{"jobs"')
    out = capsys.readouterr().out
    assert "state file was corrupt" in out and str(kept[0]) in out


def test_a_leftover_temp_file_does_not_block_writes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.state_file.parent.mkdir(parents=True)
    config.state_file.with_name("jobs.json.partial").write_text("half")
    state.record_trigger(config, "redis", dt.datetime(2024, 1, 15, 3, 0, tzinfo=dt.UTC))
    assert state.last_trigger(state.load(config), "redis") == dt.datetime(2024, 1, 15, 3, 0, tzinfo=dt.UTC)


WRITER = """
import sys
from pathlib import Path
from kkua_backupd.core import state
from kkua_backupd.obs import logs
from kkua_backupd.config import Config
config = Config.model_validate({"backup_dir": sys.argv[1]})
for _ in range(int(sys.argv[3])):
    with state.update(config) as data:
        entry = data["jobs"].setdefault(sys.argv[2], {})
        entry["count"] = entry.get("count", 0) + 1
"""


def test_concurrent_writers_never_lose_updates(tmp_path: Path) -> None:
    """Four processes (as the daemon, a timer and cron could be) update the file 25 times each."""
    config = make_config(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(config.backup_dir), job, "25"])
             for job in ("postgres", "postgres", "redis", "retention")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    jobs = state.load(config)["jobs"]
    assert jobs["postgres"]["count"] == 50
    assert jobs["redis"]["count"] == 25 and jobs["retention"]["count"] == 25
    json.loads(config.state_file.read_text())  # whole, valid JSON


def test_status_report_matches_the_contract(tmp_path: Path) -> None:
    config = make_config(tmp_path, postgres="*-*-* 02:00:00", redis="*-*-* 03:00:00")
    with state.track(config, "redis", runner="timer") as record:
        record.finish(size=41 * 1024 * 1024)
    report = state.status_report(config)
    assert set(report["jobs"]) == {"postgres", "redis", "retention"}
    assert report["daemon"]["running"] is False
    pg = report["jobs"]["postgres"]
    assert pg["schedule"] == "*-*-* 02:00:00"
    next_run = state.parse_iso(pg["next_run"])
    assert next_run is not None and next_run.utcoffset() is not None
    assert next_run > state.now() and next_run.astimezone().strftime("%H:%M:%S") == "02:00:00"
    assert pg["last_run"] is None and pg["last_result"] is None
    redis = report["jobs"]["redis"]
    assert redis["last_result"] == "ok" and redis["size"] == 41 * 1024 * 1024 and redis["last_run"]
    retention = state.parse_iso(report["jobs"]["retention"]["next_run"])
    assert retention is not None and retention.astimezone().strftime("%a %H:%M") == "Sun 04:00"
    json.dumps(report)
    lines = state.format_status(report)
    assert lines[0].startswith("daemon: not running")
    assert any("41.0 MiB" in line and "ok" in line for line in lines)


def test_status_shows_a_running_job_and_a_dead_daemon(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.write_daemon_info(config, {"pid": dead.pid, "started": state.iso(state.now())})
    with TargetLock(config.backup_dir, "postgres", "backup postgres"):
        report = state.status_report(config)
    assert report["daemon"]["running"] is False  # a pid file naming a dead process
    assert report["jobs"]["postgres"]["running"] is True
    assert report["jobs"]["postgres"]["holder"]["pid"] == os.getpid()
    state.write_daemon_info(config, {"pid": os.getpid(), "started": state.iso(state.now())})
    assert state.status_report(config)["daemon"]["running"] is True
    state.clear_daemon_info(config, os.getpid())
    assert not state.daemon_path(config).exists()


def test_a_run_killed_without_its_end_shows_as_failed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with state.update(config) as data:
        data["jobs"]["postgres"] = {"last_start": state.iso(state.now()), "last_result": "running",
                                    "pid": dead.pid}
    doc = state.status_report(config)["jobs"]["postgres"]
    assert doc["last_result"] == "failed" and "without recording" in doc["error"] and not doc["running"]
    assert state.mark_ended(config, "postgres", pid=dead.pid, error="killed after daemon.job_timeout")
    assert state.load(config)["jobs"]["postgres"]["error"] == "killed after daemon.job_timeout"
