"""The daemon as systemd sees it, outside a container: the real `kkua-backupd` process, its sd_notify
datagrams on a test socket (sender checked with SO_PASSCRED), real PostgreSQL backups run by its workers,
signals (SIGHUP, SIGTERM), a job hung for real (pg_dump blocked by a table lock), persistence."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.proc.workers import descendants
from kkua_backupd.store.lock import holder_of
from tests.conftest import Env, RedisEnv
from tests.support.helpers import wait_for
from tests.support.receiver import Receiver

UTC = dt.UTC
SO_TIMESTAMPNS = 35  # Linux <asm-generic/socket.h>; also the ancillary type SCM_TIMESTAMPNS




@dataclass
class Message:
    at: float  # time.time() when received
    mono: float
    pid: int
    text: str
    kernel: float = 0.0  # when the datagram arrived (SO_TIMESTAMPNS, CLOCK_REALTIME)


class NotifySocket:
    """A test NOTIFY_SOCKET: an AF_UNIX datagram socket whose messages are collected with their sender pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            kernel = time.time()
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:  # SCM_TIMESTAMPNS
                    sec, nsec = struct.unpack("qq", payload[:16])
                    kernel = sec + nsec / 1e9
            self.messages.append(Message(time.time(), time.monotonic(), pid, data.decode("utf-8"), kernel))

    def find(self, prefix: str) -> list[Message]:
        return [m for m in list(self.messages) if any(f.startswith(prefix) for f in m.text.split("\n"))]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    notes: NotifySocket

    def find(self, prefix: str) -> list[Message]:
        """This daemon's messages with a field starting with `prefix` (the socket outlives a daemon)."""
        return [m for m in self.notes.find(prefix) if m.pid == self.proc.pid]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log().splitlines() if text in line]

    def wait_log(self, text: str, *, count: int = 1, timeout: float = 60) -> list[str]:
        def seen() -> list[str] | None:
            if self.proc.poll() is not None and len(self.lines(text)) < count:
                pytest.fail(f"the daemon exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()}")
            found = self.lines(text)
            return found if len(found) >= count else None
        try:
            return wait_for(seen, f"{text!r} in the daemon's log (x{count})", timeout)  # type: ignore[no-any-return]
        except pytest.fail.Exception:
            print(self.log())  # shown with the failure
            raise

    def wait_ready(self) -> None:
        wait_for(lambda: self.find("READY=1") or (self.proc.poll() is not None and pytest.fail(
            f"the daemon exited ({self.proc.returncode}) before READY=1:\n{self.log()}")), "READY=1", 60)

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def notify_socket(workdir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(workdir / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def start_daemon(env: Env, notify_socket: NotifySocket) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*, watchdog_usec: int | None = None, hooks: bool = False, extra_env: dict[str, str] | None = None,
              log_name: str = "daemon.out") -> Daemon:
        extra = {"NOTIFY_SOCKET": str(notify_socket.path)}
        if watchdog_usec:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        if hooks:
            extra["KKUA_BACKUPD_TEST_HOOKS"] = "1"
        extra.update(extra_env or {})
        log_path = env.root / log_name
        with log_path.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", "from kkua_backupd.daemon import run; run()",
                                     "--config", str(env.config_path)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env.cli_env(extra))
        daemon = Daemon(proc, log_path, notify_socket)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon.proc.pid, signal.SIGCONT)
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


def write_daemon_config(env: Env, *, schedule: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None,
                        extra: str = "", **postgres: Any) -> None:
    """The test's config with [schedule] (UTC; far-away defaults) and [daemon] sections."""
    env.write_config(**postgres)
    far = {"postgres": "*-01-01 00:00:00", "redis": "*-01-01 00:00:00", "retention": "*-01-01 00:00:00",
           "timezone": "UTC"}
    far.update(schedule or {})
    text = env.config_path.read_text() + "\n[schedule]\n"
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in far.items())
    text += "\n[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (daemon or {}).items())
    env.config_path.write_text(text + extra)


def at_utc(seconds_ahead: float) -> dt.datetime:
    return (dt.datetime.now(UTC) + dt.timedelta(seconds=seconds_ahead)).replace(microsecond=0)


def once_at(when: dt.datetime) -> str:
    return f"*-*-* {when:%H:%M:%S}"


def status_json(env: Env) -> dict[str, Any]:
    """`status --json`, which exits 1 exactly when a job's last run failed (none is overdue in these tests)."""
    result = env.run("status", "--json")
    doc: dict[str, Any] = json.loads(result.stdout)
    failed = any(job["last_result"] == "failed" for job in doc["jobs"].values())
    assert result.returncode == (1 if failed else 0), result.stdout + result.stderr
    return doc


def listed(env: Env) -> list[dict[str, Any]]:
    result = env.run("list", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc: list[dict[str, Any]] = json.loads(result.stdout)
    return doc


def partials(env: Env) -> list[Path]:
    return list(env.folder.glob("*.partial")) if env.folder.is_dir() else []


def worker_pid(line: str) -> int:
    match = re.search(r"\bpid=(\d+)", line)
    assert match, line
    return int(match.group(1))


@contextlib.contextmanager
def table_locked(env: Env) -> Iterator[None]:
    """Hold ACCESS EXCLUSIVE on a table: pg_dump then waits forever, a real hang."""
    with env.connect() as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            blocker.rollback()


# ----------------------------------------------------------------------------------------------


def test_invalid_config_never_sends_ready(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    write_daemon_config(env, schedule={"postgres": "*-*-* 25:00:00"}, daemon={"retries": "two"})
    daemon = start_daemon()
    assert daemon.proc.wait(timeout=60) == 2
    text = daemon.log()
    assert "schedule.postgres" in text or "daemon.retries" in text, text
    assert "not starting" in text
    assert daemon.find("READY=1") == []


def test_ready_status_watchdog_from_the_loop_and_stop(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    write_daemon_config(env, schedule={"postgres": "*-*-* 02:00:00"})
    daemon = start_daemon(watchdog_usec=600_000, hooks=True)  # a ping every 0.3 s
    daemon.wait_ready()
    ready = daemon.find("READY=1")[0]
    assert re.search(r"STATUS=idle; next postgres (\w{3} )?02:00 \(in \d+", ready.text), ready.text
    assert status_json(env)["daemon"]["running"] is True  # state loaded and pid file written before READY

    # What the code promises: pings keep coming, from the loop, one per WATCHDOG_USEC/2 (0.3 s) and never
    # faster. How late a ping is on a loaded machine is the scheduler's doing, not the daemon's, so there is
    # no upper bound per gap here (the hang below shows that the pings stop when the loop does). Times are
    # the kernel's arrival stamps (SO_TIMESTAMPNS), so the collector thread's own delays do not count.
    pings = wait_for(lambda: (p := daemon.find("WATCHDOG=1")) and len(p) >= 9 and p, "9 watchdog pings", 60)
    gaps = [b.kernel - a.kernel for a, b in itertools.pairwise(pings)]
    assert all(g >= 0.15 for g in gaps), gaps  # never two pings for one interval
    assert pings[-1].kernel - pings[0].kernel >= 0.3 * len(gaps) - 0.1, gaps  # not faster than promised
    assert {m.pid for m in daemon.notes.messages} == {daemon.proc.pid}  # never a worker, never another process

    # The loop itself hangs (test hook): the pings stop although the process lives on, so systemd would kill it.
    os.kill(daemon.proc.pid, signal.SIGUSR2)
    daemon.wait_log("test hook: the main loop hangs now")
    count = len(daemon.find("WATCHDOG=1"))
    quiet_until = time.monotonic() + 2.0  # more than six ping intervals
    while time.monotonic() < quiet_until:
        assert daemon.proc.poll() is None
        assert len(daemon.find("WATCHDOG=1")) <= count + 1, "pings went on while the loop hung"
        time.sleep(0.05)
    daemon.proc.kill()
    daemon.proc.wait()

    # A healthy one stops on SIGTERM: STOPPING=1, exit 0, no longer shown as running.
    daemon = start_daemon(watchdog_usec=600_000, log_name="daemon2.out")
    daemon.wait_ready()
    assert daemon.stop() == 0
    wait_for(lambda: daemon.find("STOPPING=1"), "STOPPING=1", 10)
    assert status_json(env)["daemon"]["running"] is False


def test_reload_keeps_the_old_config_when_the_new_one_is_broken(env: Env,
                                                                  start_daemon: Callable[..., Daemon]) -> None:
    write_daemon_config(env, schedule={"postgres": "*-*-* 01:00:00"})
    daemon = start_daemon()
    daemon.wait_ready()
    daemon.wait_log("daemon started")
    good = env.config_path.read_text()

    env.config_path.write_text(good.replace('postgres = "*-*-* 01:00:00"', 'postgres = "*-*-* 99:00:00"')
                               + "surprise = 1\n")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    failed = daemon.wait_log("reload failed; keeping the running configuration")
    assert "ERROR" in failed[0]
    text = daemon.log()
    assert "surprise" in text or "schedule.postgres" in text, text
    wait_for(lambda: len(daemon.find("READY=1")) >= 2, "READY=1 after the failed reload", 10)
    texts = [m.text for m in daemon.notes.messages if m.pid == daemon.proc.pid]
    reloading = next(i for i, t in enumerate(texts) if t.startswith("RELOADING=1"))
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", texts[reloading]), texts[reloading]
    assert any(t.startswith("READY=1") for t in texts[reloading + 1:])
    assert daemon.proc.poll() is None

    # An empty file, and one without a [postgres] or [redis] section, are valid TOML whose every key has a
    # default: a reload to them is refused as well (not "reload ok" with /var/backups/kkua made).
    default_dir = Path("/var/backups/kkua")
    existed = default_dir.exists()
    for count, text in ((2, ""), (3, "[retention]\ndays = 7\n")):
        env.config_path.write_text(text)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        failed = daemon.wait_log("reload failed; keeping the running configuration", count=count)
        assert "names no job to run" in failed[-1] and "[postgres] or [redis]" in failed[-1], failed[-1]
        wait_for(lambda c=count: len(daemon.find("READY=1")) >= c + 1, "READY=1 after the refused reload", 10)
    assert daemon.log().count("reload ok") == 0
    assert default_dir.exists() == existed, "the refused reload created the default backup_dir"
    assert daemon.proc.poll() is None

    env.config_path.write_text(good.replace('postgres = "*-*-* 01:00:00"', 'postgres = "*-*-* 05:30:00"'))
    os.kill(daemon.proc.pid, signal.SIGHUP)
    (line,) = daemon.wait_log("reload ok")
    assert re.search(r"postgres@\d{4}-\d\d-\d\dT05:30:00\+00:00", line), line
    wait_for(lambda: len(daemon.find("READY=1")) >= 5, "READY=1 after the good reload", 10)
    assert daemon.stop() == 0


def test_a_schedule_fires_the_job_on_time_and_status_shows_it(env: Env,
                                                                start_daemon: Callable[..., Daemon]) -> None:
    """The daemon promises to start a job at its time, never before: the time is set by a reload once the
    daemon runs (not guessed ahead of a start-up of unknown length), and the test checks that the daemon
    planned it for that time before it came; how late the start is on a loaded machine is not the daemon's
    promise, so the bound after it is generous."""
    write_daemon_config(env)
    daemon = start_daemon()
    daemon.wait_ready()
    for attempt in range(1, 6):
        when = at_utc(2 + 2 * attempt)
        write_daemon_config(env, schedule={"postgres": once_at(when)})
        os.kill(daemon.proc.pid, signal.SIGHUP)
        line = daemon.wait_log("reload ok", count=attempt)[-1]
        if f"postgres@{when.isoformat()}" in line:
            break  # planned for `when` before `when` came
    else:
        pytest.fail(f"the daemon never planned a run a few seconds ahead: {line}")
    running = wait_for(lambda: [m for m in daemon.find("STATUS=running postgres")], "the job to start", 90)
    assert when.timestamp() - 0.05 <= running[0].kernel <= when.timestamp() + 60, (running[0].kernel, when)
    (started,) = daemon.wait_log("job started job=postgres")
    daemon.wait_log("job ended job=postgres", timeout=120)
    ended = dt.datetime.now(UTC)
    assert "result=ok" in daemon.lines("job ended job=postgres")[0]

    (backup_set,) = listed(env)
    report = status_json(env)
    assert report["daemon"]["running"] is True and report["daemon"]["pid"] == daemon.proc.pid
    pg = report["jobs"]["postgres"]
    assert pg["last_result"] == "ok" and pg["runner"] == "daemon" and not pg["running"]
    assert pg["size"] == sum(f["size"] for f in backup_set["files"])
    assert dt.datetime.fromisoformat(pg["next_run"]) == when + dt.timedelta(days=1)
    last_run = dt.datetime.fromisoformat(pg["last_run"])
    assert when - dt.timedelta(seconds=1) <= last_run <= ended
    assert dt.datetime.fromisoformat(pg["last_trigger"]) >= when
    assert report["jobs"]["redis"]["last_result"] is None
    wait_for(lambda: [m for m in daemon.find("STATUS=idle") if "last postgres ok" in m.text],
             "STATUS with the last result", 10)
    assert {m.pid for m in daemon.notes.messages} == {daemon.proc.pid}
    assert worker_pid(started) != daemon.proc.pid
    assert daemon.stop() == 0


def test_sigterm_during_a_running_job(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    """systemctl stop mid-dump: the worker stops its pg_dump and removes its partial file, the daemon exits 0."""
    write_daemon_config(env, schedule={"postgres": once_at(at_utc(4))}, daemon={"stop_grace": 20})
    with table_locked(env):
        daemon = start_daemon()
        daemon.wait_ready()
        (started,) = daemon.wait_log("job started job=postgres")
        worker = worker_pid(started)
        wait_for(lambda: partials(env), "the worker's partial file", 60)
        dumps = wait_for(lambda: [p for p in descendants(worker) if "pg_dump" in _cmdline(p)], "pg_dump", 60)
        began = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - began < 20  # the worker stopped on SIGTERM, no SIGKILL needed
    assert daemon.find("STOPPING=1")
    assert "job stopped for shutdown job=postgres" in daemon.log()
    wait_for(lambda: not any(_alive(p) for p in [worker, *dumps]), "the worker and pg_dump to be gone", 10)
    assert partials(env) == []
    assert listed(env) == []
    assert holder_of(env.backup_dir, "postgres") is None
    pg = status_json(env)["jobs"]["postgres"]
    assert pg["last_result"] == "failed" and "SIGTERM" in pg["error"], pg


def test_a_hung_job_hits_its_timeout_and_is_retried(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    # 6 s: long enough that a loaded machine still reads the hung worker's environment before the timeout
    # stops it (at 3 s a busy run once found it already gone).
    write_daemon_config(env, schedule={"postgres": once_at(at_utc(4))},
                        daemon={"job_timeout": 6, "stop_grace": 2, "retries": 1, "retry_backoff": 1})
    with table_locked(env):
        daemon = start_daemon(watchdog_usec=1_000_000)
        daemon.wait_ready()
        (started,) = daemon.wait_log("job started job=postgres")
        worker = worker_pid(started)
        # The worker: no systemd variables, no password on its command line, marked as the daemon's.
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{worker}/environ").read_bytes().decode().split("\0") if "=" in item)
        assert "NOTIFY_SOCKET" not in environ and "WATCHDOG_USEC" not in environ
        assert environ.get("KKUA_BACKUP_RUNNER") == "daemon"
        assert env.server.password not in _cmdline(worker)
        assert os.getpgid(worker) == worker  # its own process group

        daemon.wait_log("job timed out; stopping it job=postgres", timeout=30)
        pings_before = len(daemon.find("WATCHDOG=1"))
        daemon.wait_log("job will be retried job=postgres attempt=2", timeout=30)
        daemon.wait_log("job started job=postgres", count=2, timeout=30)
        daemon.wait_log("job timed out; stopping it job=postgres", count=2, timeout=30)
        daemon.wait_log("job failed; no retries left", timeout=30)
        assert len(daemon.find("WATCHDOG=1")) >= pings_before + 2  # the loop stayed healthy meanwhile
        assert daemon.proc.poll() is None
    pg = status_json(env)["jobs"]["postgres"]
    assert pg["last_result"] == "failed" and "daemon.job_timeout" in pg["error"], pg
    assert partials(env) == [] and listed(env) == []
    assert daemon.stop() == 0


def test_a_run_missed_while_down_runs_once_at_start(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    write_daemon_config(env, schedule={"postgres": "*-*-* 02:00:00", "persistent": True})
    state_file = env.backup_dir / ".state" / "jobs.json"
    state_file.parent.mkdir(parents=True)
    two_days_ago = (dt.datetime.now(UTC) - dt.timedelta(days=2)).replace(hour=1, minute=0, second=0, microsecond=0)
    state_file.write_text(json.dumps({"version": 1, "jobs": {"postgres": {"last_trigger": two_days_ago.isoformat()}}}))

    daemon = start_daemon()
    daemon.wait_ready()
    daemon.wait_log("job ended job=postgres", timeout=120)
    assert len(daemon.lines("job missed while the daemon was not running")) == 1
    assert len(daemon.lines("job started job=postgres")) == 1  # once, not once per missed day
    assert daemon.lines("job started job=redis") == []
    assert len(listed(env)) == 1
    trigger = dt.datetime.fromisoformat(status_json(env)["jobs"]["postgres"]["last_trigger"])
    assert trigger > dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    assert daemon.stop() == 0

    # Started again: nothing was missed since that trigger, so nothing runs.
    daemon = start_daemon(log_name="daemon2.out")
    daemon.wait_log("daemon started")
    assert daemon.lines("job started") == []
    assert daemon.stop() == 0


def test_not_persistent_means_no_catch_up(env: Env, start_daemon: Callable[..., Daemon]) -> None:
    write_daemon_config(env, schedule={"postgres": "*-*-* 02:00:00", "persistent": False})
    state_file = env.backup_dir / ".state" / "jobs.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"version": 1, "jobs": {"postgres": {
        "last_trigger": (dt.datetime.now(UTC) - dt.timedelta(days=3)).isoformat()}}}))
    daemon = start_daemon()
    daemon.wait_log("daemon started")  # catch-up runs would have started before this line
    assert daemon.lines("job started") == [] and daemon.lines("job missed") == []
    assert daemon.stop() == 0


def test_backup_all_runs_workers_and_reports_each(env: Env) -> None:
    """`backup all`: PostgreSQL and Redis workers side by side; an unreachable Redis fails alone."""
    env.write_config()
    env.config_path.write_text(env.config_path.read_text() + '\n[redis]\nhost = "127.0.0.1"\nport = 1\n'
                                                             "connect_timeout = 1\n")
    result = env.run("backup", "all", "--json")
    doc = json.loads(result.stdout)
    assert set(doc["jobs"]) == {"postgres", "redis"}
    assert doc["jobs"]["postgres"]["exit_code"] == 0, result.stderr
    assert doc["jobs"]["postgres"]["result"]["files"]
    assert doc["jobs"]["redis"]["exit_code"] != 0
    assert "error" in doc["jobs"]["redis"]["result"]
    assert result.returncode == max(j["exit_code"] for j in doc["jobs"].values())
    assert "127.0.0.1:1" in result.stderr  # the worker's own log line passed through
    assert len(listed(env)) == 1
    report = status_json(env)["jobs"]
    assert report["postgres"]["last_result"] == "ok" and report["postgres"]["runner"] == "cli"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_sigterm_to_backup_all_stops_its_workers(env: Env) -> None:
    """systemctl stop kkua-backup@run / Ctrl-C: the workers (own process groups) are stopped too."""
    env.write_config()
    with table_locked(env):
        proc = env.popen("backup", "all", "--json")
        dumps = wait_for(lambda: [p for p in descendants(proc.pid) if "pg_dump" in _cmdline(p)], "pg_dump", 60)
        wait_for(lambda: partials(env), "the partial file", 60)
        workers = [p for p in descendants(proc.pid) if "kkua_backupd" in _cmdline(p)]
        assert workers
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "stopped by signal SIGTERM" in err
    assert json.loads(out)["error"].startswith("stopped by signal SIGTERM")
    wait_for(lambda: not any(_alive(p) for p in [*workers, *dumps]), "the workers and pg_dump to be gone", 10)
    assert partials(env) == [] and listed(env) == []
    assert holder_of(env.backup_dir, "postgres") is None


def test_a_worker_that_ignores_sigterm_is_killed_with_its_children(env: Env, workdir: Path,
                                                                    start_daemon: Callable[..., Daemon]) -> None:
    """A pg_dump that ignores SIGTERM keeps the worker busy past stop_grace: the daemon SIGKILLs the worker's
    group and every descendant (pg_dump leads a group of its own), and still exits 0."""
    fake = workdir / "fakebin"
    fake.mkdir()
    real = env.server.bin_dir / "pg_dump"
    (fake / "pg_dump").write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && exec {real} --version\n'
                                  "trap '' TERM\nexec sleep 600\n")
    (fake / "pg_dump").chmod(0o755)
    receiver = Receiver().__enter__()  # the killed worker cannot tell its failure: the daemon does
    hc = workdir / "hc.url"
    hc.write_text(f"{receiver.url}/hc/x\n")
    hc.chmod(0o600)
    write_daemon_config(env, schedule={"postgres": once_at(at_utc(4))}, daemon={"stop_grace": 1},
                        bin_dir=str(fake), extra=f'\n[notify]\nhealthchecks_url_file = "{hc}"\ntimeout = 2\n')
    try:
        daemon = start_daemon()
        daemon.wait_ready()
        (started,) = daemon.wait_log("job started job=postgres")
        worker = worker_pid(started)
        sleeper = wait_for(lambda: [p for p in descendants(worker) if _cmdline(p).startswith("sleep 600")],
                           "the fake pg_dump", 60)
        assert daemon.stop() == 0
        assert [r.path for r in receiver.requests] == ["/hc/x/start", "/hc/x/fail"]
        assert "worker was killed by signal SIGKILL" in receiver.requests[-1].body.decode()
    finally:
        receiver.__exit__()
    assert "job did not stop within the grace period; killing its processes job=postgres" in daemon.log()
    wait_for(lambda: not any(_alive(p) for p in [worker, *sleeper]), "the worker and its pg_dump to be gone", 10)
    assert listed(env) == []  # a partial file may stay; it is never a set, and the next backup removes it
    pg = status_json(env)["jobs"]["postgres"]
    assert pg["last_result"] == "failed" and "SIGKILL" in pg["error"], pg


def test_postgres_and_redis_run_in_parallel(env: Env, redis_env: RedisEnv,
                                            start_daemon: Callable[..., Daemon]) -> None:
    """Both scheduled for the same second: two workers at once (the guide's 병렬 백업), both sets made."""
    redis_env.client().set("k", "v")
    when = at_utc(5)
    redis_section = (f'\n[redis]\nhost = "127.0.0.1"\nport = {redis_env.server.port}\n'
                     f'password_file = "{redis_env.password_file}"\n')
    write_daemon_config(env, schedule={"postgres": once_at(when), "redis": once_at(when)}, extra=redis_section)
    daemon = start_daemon()
    daemon.wait_ready()
    both = wait_for(lambda: [m for m in daemon.find("STATUS=running")
                             if "postgres (" in m.text and "redis (" in m.text], "a STATUS with both jobs running", 60)
    assert both[0].at >= when.timestamp() - 0.05
    daemon.wait_log("job ended job=postgres", timeout=120)
    daemon.wait_log("job ended job=redis", timeout=120)
    kinds = sorted(s["kind"] for s in listed(env))
    assert kinds == ["postgres", "redis"], kinds
    report = status_json(env)["jobs"]
    assert report["postgres"]["last_result"] == "ok" and report["redis"]["last_result"] == "ok", report
    assert daemon.stop() == 0


def test_encryption_that_cannot_be_set_up_stops_the_daemon_and_its_reload(env: Env,
                                                                          start_daemon: Callable[..., Daemon]) -> None:
    """Fail closed: recipients that cannot be read mean no start (exit 2, never READY), and a reload to them
    keeps the running config; never a backup in clear text (docs/decisions/0015-encryption.md)."""
    missing = env.root / "recipients.txt"
    broken = f'\n[encryption]\nmethod = "age"\nrecipients_file = "{missing}"\n'
    write_daemon_config(env, extra=broken)
    daemon = start_daemon()
    assert daemon.proc.wait(timeout=60) == 2
    assert "encryption.recipients_file: cannot read" in daemon.log() and "not starting" in daemon.log()
    assert daemon.find("READY=1") == []

    write_daemon_config(env)
    daemon = start_daemon()
    daemon.wait_ready()
    write_daemon_config(env, extra=broken)
    os.kill(daemon.proc.pid, signal.SIGHUP)
    failed = daemon.wait_log("reload failed; keeping the running configuration")
    assert "encryption.recipients_file" in daemon.log(), failed
    assert daemon.proc.poll() is None
