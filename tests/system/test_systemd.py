"""kkua-backup under a real systemd: units, timers, the daemon, its watchdog and reloads, in a booted container.

All tests share one container (tests/system/conftest.py) and run in this file's order, each leaving the
system as the next expects it: test 1 uses the unit installed by hand (docs/install.md), the rest what
`kkua-backup systemd install` writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import REDIS_TEST_PASSWORD
from .conftest import CONFIG, PG_TEST_PASSWORD, REPO, KkuaSystem, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

TIMERS = {"kkua-postgres-backup.timer": "*-*-* 02:00:00", "kkua-redis-backup.timer": "*-*-* 03:00:00",
          "kkua-backup-retention.timer": "Sun *-*-* 04:00:00"}
DAEMON = "kkua-backupd.service"
SECURITY_THRESHOLD = 2.0  # `systemd-analyze security` exposure, 0 (locked down) to 10; 1.2 for both in Nov 2026


def assert_set_files(system: KkuaSystem, backup_set: dict[str, Any]) -> None:
    """Every file of the set (and its manifest) is 0640 kkua-backup:kkua-backup in a 0750 folder of that owner."""
    folder = backup_set["folder"]
    names = [f["name"] for f in backup_set["files"]] + [f"{backup_set['prefix']}{backup_set['id']}.manifest.json"]
    out = system.run("stat", "-c", "%a %U %G %n", folder, *(f"{folder}/{name}" for name in names)).stdout
    rows = [line.split(" ", 3) for line in out.splitlines()]
    assert rows[0][:3] == ["750", "kkua-backup", "kkua-backup"], f"backup folder: {rows[0]}"
    for mode, user, group, path in rows[1:]:
        assert (mode, user, group) == ("640", "kkua-backup", "kkua-backup"), f"{path}: {mode} {user}:{group}"


def journal_text(system: KkuaSystem, unit: str, cursor: str | None = None) -> str:
    return "\n".join(str(e.get("MESSAGE", "")) for e in system.journal(unit, since_cursor=cursor))


def assert_no_secret(system: KkuaSystem, text: str, where: str) -> None:
    for secret in (PG_TEST_PASSWORD, REDIS_TEST_PASSWORD):
        assert secret not in text, f"a password appears in {where}"


# 1. ------------------------------------------------------------------------------------------------------

def test_oneshot_unit_backs_up_postgres_as_the_service_user(kkua_system: KkuaSystem) -> None:
    """The unit from systemd/, installed by hand as docs/install.md says, backs up as kkua-backup."""
    s = kkua_system
    unit_path = "/etc/systemd/system/kkua-backup@.service"
    s.container.write(unit_path, (REPO / "systemd" / "kkua-backup@.service").read_text())
    s.run("systemctl", "daemon-reload")
    try:
        before = {b["id"] for b in s.sets("postgres")}
        cursor = s.journal_cursor()
        s.run("systemctl", "start", "kkua-backup@postgres", timeout=300)
        props = s.show("kkua-backup@postgres", "Result", "ExecMainStatus", "User")
        assert props == {"Result": "success", "ExecMainStatus": "0", "User": "kkua-backup"}, props

        new = [b for b in s.sets("postgres") if b["id"] not in before]
        assert len(new) == 1, f"expected one new PostgreSQL set, got {[b['id'] for b in new]}"
        assert new[0]["status"] == "ok" and new[0]["details"] is not None
        assert new[0]["files"][0]["name"].startswith("kkua_backup_")
        assert_set_files(s, new[0])
        # The dump holds the data (the CLI's own verify reads every byte against the manifest).
        verify = json.loads(s.kkua("verify", new[0]["id"], "--json").stdout)
        assert [r["ok"] for r in verify] == [True], verify
        text = journal_text(s, "kkua-backup@postgres.service", cursor)
        assert "backup" in text.lower(), f"no log line from the job in the journal:\n{text}"
        assert_no_secret(s, text, "the journal of kkua-backup@postgres")
        dump = s.run("zcat", f"{new[0]['folder']}/{new[0]['files'][0]['name']}").stdout
        assert "item 4999" in dump
        assert_no_secret(s, dump, "the dump")
    finally:
        s.run("rm", "-f", unit_path)
        s.run("systemctl", "daemon-reload")


# 2.-3. ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timers_installed(kkua_system: KkuaSystem) -> str:
    """`kkua-backup systemd install` (timers), run as root; returns what it printed."""
    result = kkua_system.kkua("systemd", "install", user="root", timeout=180)
    return result.stdout


def next_elapse(system: KkuaSystem, expr: str) -> str:
    """systemd's own next elapse of `expr` in the container, as `systemctl show` prints timestamps."""
    out = system.run("systemd-analyze", "calendar", expr).stdout
    match = re.search(r"Next elapse: (.+)", out)
    assert match, f"systemd-analyze calendar {expr!r} printed no next elapse:\n{out}"
    return match.group(1).strip()


def test_install_enables_timers_with_the_configured_schedules(kkua_system: KkuaSystem, timers_installed: str) -> None:
    """The three timers are enabled, active and due at 02:00, 03:00 and Sunday 04:00; none fired on install."""
    s = kkua_system
    listing = s.run("systemctl", "list-timers", "--all", "--no-pager").stdout
    for timer, expr in TIMERS.items():
        expected = next_elapse(s, expr)
        assert expected.split()[2] == expr.split()[-1], (timer, expected)
        if expr.startswith("Sun"):
            assert expected.startswith("Sun "), (timer, expected)
        props = s.show(timer, "ActiveState", "UnitFileState", "NextElapseUSecRealtime", "Persistent",
                       "RandomizedDelayUSec")
        assert props == {"ActiveState": "active", "UnitFileState": "enabled", "NextElapseUSecRealtime": expected,
                         "Persistent": "yes", "RandomizedDelayUSec": "0"}, (timer, props)
        status = s.run("systemctl", "status", timer, "--no-pager").stdout
        assert re.search(rf"Trigger: {re.escape(expected)};", status), f"{timer}: no Trigger line:\n{status}"
        assert any(timer in line and expected in line for line in listing.splitlines()), \
            f"{timer} not listed with {expected}:\n{listing}"
    # Installing fired nothing: the instances the timers start have never run.
    for job in ("redis", "retention"):
        props = s.show(f"kkua-backup@{job}.service", "ActiveState", "ExecMainStartTimestampMonotonic")
        assert props == {"ActiveState": "inactive", "ExecMainStartTimestampMonotonic": "0"}, (job, props)
    assert "kkua-postgres-backup.timer" in timers_installed, timers_installed


def test_run_unit_backs_up_postgres_and_redis(kkua_system: KkuaSystem, timers_installed: str) -> None:
    """`systemctl start kkua-backup@run` makes one good set of each kind and exits 0."""
    s = kkua_system
    before = {kind: {b["id"] for b in s.sets(kind)} for kind in ("postgres", "redis")}
    cursor = s.journal_cursor()
    s.run("systemctl", "start", "kkua-backup@run", timeout=300)
    props = s.show("kkua-backup@run", "Result", "ExecMainStatus", "User")
    assert props == {"Result": "success", "ExecMainStatus": "0", "User": "kkua-backup"}, props
    for kind, prefix in (("postgres", "kkua_backup_"), ("redis", "redis_backup_")):
        new = [b for b in s.sets(kind) if b["id"] not in before[kind]]
        assert len(new) == 1, f"expected one new {kind} set, got {[b['id'] for b in new]}"
        assert new[0]["status"] == "ok", new[0]
        assert new[0]["files"][0]["name"].startswith(prefix), new[0]["files"]
        assert_set_files(s, new[0])
        verify = json.loads(s.kkua("verify", new[0]["files"][0]["name"], "--json").stdout)
        assert [r["ok"] for r in verify] == [True], verify
    assert_no_secret(s, journal_text(s, "kkua-backup@run.service", cursor), "the journal of kkua-backup@run")


def test_run_unit_with_zstd_and_the_custom_format(kkua_system: KkuaSystem, timers_installed: str) -> None:
    """zstd's threads and pg_dump's custom format work under the unit's hardening (MemoryDenyWriteExecute=,
    SystemCallFilter=, ...): `kkua-backup@run` makes a good .zst set of each kind."""
    s = kkua_system
    original = {section: dict(s.config.get(section, {})) for section in ("postgres", "redis")}
    before = {kind: {b["id"] for b in s.sets(kind)} for kind in ("postgres", "redis")}
    s.write_config(postgres={"compression": "zstd", "format": "custom"}, redis={"compression": "zstd"})
    try:
        s.run("systemctl", "start", "kkua-backup@run", timeout=300)
        props = s.show("kkua-backup@run", "Result", "ExecMainStatus")
        assert props == {"Result": "success", "ExecMainStatus": "0"}, props
        for kind, suffix in (("postgres", ".dump.zst"), ("redis", ".rdb.zst")):
            new = [b for b in s.sets(kind) if b["id"] not in before[kind]]
            assert len(new) == 1 and new[0]["status"] == "ok", new
            assert new[0]["files"][0]["name"].endswith(suffix), new[0]["files"]
            verify = json.loads(s.kkua("verify", new[0]["files"][0]["name"], "--json").stdout)
            assert [r["ok"] for r in verify] == [True], verify
    finally:
        for section, keys in original.items():
            s.config[section] = keys
        s.write_config()


# 4.-7. The daemon ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(kkua_system: KkuaSystem, timers_installed: str) -> str:
    """`kkua-backup systemd install --daemon`, then the daemon idle; returns install's output."""
    result = kkua_system.kkua("systemd", "install", "--daemon", user="root", timeout=180)
    wait_idle(kkua_system)
    return result.stdout


def wait_idle(system: KkuaSystem, timeout: float = 60) -> dict[str, str]:
    """Wait until kkua-backupd is active (running) and its STATUS says idle; returns its properties."""
    last: dict[str, str] = {}

    def idle() -> dict[str, str] | None:
        nonlocal last
        last = system.show(DAEMON, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        ok = last["ActiveState"] == "active" and last["SubState"] == "running" and \
            last["StatusText"].startswith("idle")
        return last if ok else None

    return wait_until(idle, timeout=timeout, what="kkua-backupd to be active (running) and idle",
                      describe=lambda: str(last))


def daemon_lines(system: KkuaSystem, cursor: str | None = None) -> list[dict[str, Any]]:
    """The daemon's own journal lines (not systemd's about it)."""
    return [e for e in system.journal(DAEMON, since_cursor=cursor) if e.get("SYSLOG_IDENTIFIER") == "kkua-backupd"]


def wait_line(system: KkuaSystem, cursor: str, needle: str, timeout: float = 30) -> dict[str, Any]:
    """Wait for a daemon journal line containing `needle` after `cursor`, and return it."""
    def found() -> dict[str, Any] | None:
        return next((e for e in daemon_lines(system, cursor) if needle in str(e.get("MESSAGE", ""))), None)

    return wait_until(found, timeout=timeout, what=f"a kkua-backupd journal line with {needle!r}",
                      describe=lambda: " | ".join(str(e.get("MESSAGE")) for e in daemon_lines(system, cursor)[-8:]))


def test_daemon_runs_with_status_and_journal_priorities(kkua_system: KkuaSystem, daemon: str) -> None:
    """The daemon is active (running), says what it does in STATUS=, and logs one readable line per event
    with the right PRIORITY; the timers are off, since the daemon runs the schedules."""
    s = kkua_system
    props = wait_idle(s)
    # The next job is the one whose schedule systemd itself says elapses first, at its hour and minute.
    elapses = {expr: next_elapse(s, expr) for expr in TIMERS.values()}
    first = min(TIMERS.values(), key=lambda expr: int(s.run("date", "-d", elapses[expr], "+%s").stdout))
    job = {"*-*-* 02:00:00": "postgres", "*-*-* 03:00:00": "redis", "Sun *-*-* 04:00:00": "retention"}[first]
    assert props["StatusText"].startswith(f"idle; next {job} "), (props, elapses)
    assert first.split()[-1][:5] in props["StatusText"], (props, elapses)
    status = s.run("systemctl", "status", DAEMON, "--no-pager", "--lines=0").stdout
    assert "Active: active (running)" in status, status
    assert f'Status: "idle; next {job} ' in status, status
    assert s.run("systemctl", "is-enabled", DAEMON, check=False).stdout.strip() == "enabled"
    for timer in TIMERS:
        assert s.run("systemctl", "is-active", timer, check=False).stdout.strip() == "inactive", timer

    lines = daemon_lines(s)
    started = [e for e in lines if str(e.get("MESSAGE", "")).startswith("daemon started")]
    assert started, [e.get("MESSAGE") for e in lines]
    assert {e["PRIORITY"] for e in started} == {"6"}, started
    for entry in lines:
        message = str(entry.get("MESSAGE", ""))
        # journald took the <N> prefix as the priority: nothing of it is left in the text, no colour codes.
        assert not message.startswith("<") and "\x1b[" not in message and "\n" not in message, message
        assert entry["PRIORITY"] in {"3", "4", "5", "6"}, entry
    assert_no_secret(s, "\n".join(str(e.get("MESSAGE")) for e in lines), "the daemon's journal")
    report = json.loads(s.kkua("status", "--json").stdout)
    assert report["daemon"]["running"] is True and report["daemon"]["pid"] == int(props["MainPID"]), report["daemon"]


WATCHDOG_DROPIN = "/etc/systemd/system/kkua-backupd.service.d/zz-system-test-watchdog.conf"


@pytest.fixture
def short_watchdog(kkua_system: KkuaSystem, daemon: str) -> Iterator[dict[str, str]]:
    """The daemon restarted with a 3 s watchdog (the unit's 60 s would make a test wait a minute), a quick
    restart, and its test hook (SIGUSR2 hangs the main loop); yields its properties. Undone afterwards."""
    s = kkua_system
    s.run("mkdir", "-p", WATCHDOG_DROPIN.rsplit("/", 1)[0])
    s.container.write(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=3\nRestartSec=1\n"
                                       "Environment=KKUA_BACKUPD_TEST_HOOKS=1\n")
    try:
        s.run("systemctl", "daemon-reload")
        s.run("systemctl", "restart", DAEMON, timeout=90)
        props = wait_idle(s)
        assert s.show(DAEMON, "WatchdogUSec")["WatchdogUSec"] == "3s"
        yield props
    finally:
        s.run("rm", "-f", WATCHDOG_DROPIN)
        s.run("rmdir", WATCHDOG_DROPIN.rsplit("/", 1)[0])
        s.run("systemctl", "daemon-reload")
        s.run("systemctl", "restart", DAEMON, timeout=90)
        wait_idle(s)
    assert s.show(DAEMON, "WatchdogUSec")["WatchdogUSec"] != "3s"


def assert_watchdog_restarts(system: KkuaSystem, before: dict[str, str], *, signal: str) -> None:
    """Send `signal` to the daemon and see systemd's watchdog kill it and start a new one, once."""
    cursor = system.journal_cursor()
    system.run("kill", f"-{signal}", before["MainPID"])

    def restarted() -> dict[str, str] | None:
        props = system.show(DAEMON, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        return props if int(props["NRestarts"]) > int(before["NRestarts"]) and props["MainPID"] not in (
            before["MainPID"], "0") else None

    after = wait_until(restarted, timeout=45, what=f"systemd to restart kkua-backupd after SIG{signal}",
                       describe=lambda: str(system.show(DAEMON, "ActiveState", "SubState", "MainPID", "NRestarts")))
    text = journal_text(system, DAEMON, cursor)
    assert "Watchdog timeout" in text, text
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    wait_idle(system)


def test_watchdog_restarts_a_frozen_daemon(kkua_system: KkuaSystem, short_watchdog: dict[str, str]) -> None:
    """SIGSTOP stops the daemon's pings; systemd's watchdog kills it and Restart= brings a new one."""
    assert_watchdog_restarts(kkua_system, short_watchdog, signal="STOP")


def test_watchdog_restarts_a_daemon_whose_loop_hangs(kkua_system: KkuaSystem,
                                                     short_watchdog: dict[str, str]) -> None:
    """Only the healthy main loop pings: with the loop hung (test hook) and the process otherwise alive,
    the pings stop and systemd restarts it."""
    s = kkua_system
    cursor = s.journal_cursor()
    assert_watchdog_restarts(s, short_watchdog, signal="USR2")
    hung = [e for e in daemon_lines(s, cursor) if "the main loop hangs now" in str(e.get("MESSAGE"))]
    assert hung, "the daemon did not log that its loop hangs (test hook not armed?)"


def test_reload_with_a_broken_config_keeps_the_old_one(kkua_system: KkuaSystem, daemon: str) -> None:
    """SIGHUP with an invalid config: still running on the old config, an error line saying why; a good
    config then reloads."""
    s = kkua_system
    before = wait_idle(s)
    good = s.render_config()
    cursor = s.journal_cursor()
    s.container.write(CONFIG, good.replace("port = 5432", 'port = "five"'), mode="0640", owner="root:kkua-backup")
    try:
        s.run("systemctl", "reload", DAEMON, timeout=60)
        failed = wait_line(s, cursor, "reload failed; keeping the running configuration")
        assert failed["PRIORITY"] == "3", failed
        text = journal_text(s, DAEMON, cursor)
        assert "postgres.port" in text, f"the reason (postgres.port) is not logged:\n{text}"
        after = wait_idle(s)
        assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"], (before, after)
        assert after["StatusText"].split(" (in ")[0] == before["StatusText"].split(" (in ")[0], (before, after)
    finally:
        s.container.write(CONFIG, good, mode="0640", owner="root:kkua-backup")
    cursor = s.journal_cursor()
    s.run("systemctl", "reload", DAEMON, timeout=60)
    ok = wait_line(s, cursor, "reload ok")
    assert ok["PRIORITY"] == "6", ok
    assert wait_idle(s)["MainPID"] == before["MainPID"]


def test_a_schedule_seconds_ahead_fires_on_time(kkua_system: KkuaSystem, daemon: str) -> None:
    """A postgres schedule ~10 s ahead (container clock), reloaded: the job starts on the second and makes
    a set; `status --json` records it."""
    s = kkua_system
    wait_idle(s)
    before = {b["id"] for b in s.sets("postgres")}
    at = int(s.now()) + 12
    hms = s.run("date", "-d", f"@{at}", "+%H:%M:%S").stdout.strip()
    original = dict(s.config["schedule"])
    s.write_config(schedule={"postgres": f"*-*-* {hms}"})
    try:
        cursor = s.journal_cursor()
        s.run("systemctl", "reload", DAEMON, timeout=60)
        wait_line(s, cursor, "reload ok")
        assert f"next postgres {hms[:5]}" in s.show(DAEMON, "StatusText")["StatusText"] or at - s.now() < 2

        def finished() -> dict[str, Any] | None:
            doc: dict[str, Any] = json.loads(s.kkua("status", "--json").stdout)["jobs"]["postgres"]
            last = doc.get("last_run")
            fired = last and dt.datetime.fromisoformat(last).timestamp() >= at - 1
            return doc if fired and doc["last_result"] not in (None, "running") else None

        # While the job runs, no process inside shows a password in /proc/PID/cmdline.
        with command_lines(s) as seen:
            job = wait_until(finished, timeout=90, what=f"the postgres job scheduled at {hms} to run and end",
                             interval=0.5)
        assert any("pg_dump" in line for line in seen), "no pg_dump seen while the job ran"
        assert_no_secret(s, "\n".join(seen), "a command line")
        started = dt.datetime.fromisoformat(job["last_run"]).timestamp()
        assert at - 1 <= started <= at + 3, f"scheduled {at}, started {started} ({job['last_run']})"
        assert job["last_result"] == "ok", job
        assert job["runner"] == "daemon", job
        new = [b for b in s.sets("postgres") if b["id"] not in before]
        assert len(new) == 1 and new[0]["status"] == "ok", new
        assert_set_files(s, new[0])
        started_line = wait_line(s, cursor, "job started")
        assert started_line["PRIORITY"] == "6"
    finally:
        s.write_config(schedule=original)
        cursor = s.journal_cursor()
        s.run("systemctl", "reload", DAEMON, timeout=60)
        wait_line(s, cursor, "reload ok")


SAMPLER = """
import os, sys, time
seen = set()
deadline = time.monotonic() + 90
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    seen.add(fh.read().replace(b"\\0", b" ").decode(errors="replace").strip())
            except OSError:
                pass
    time.sleep(0.01)
print("\\n".join(sorted(line for line in seen if line)))
"""


@contextlib.contextmanager
def command_lines(system: KkuaSystem) -> Iterator[list[str]]:
    """Collect the command line of every process inside (every 10 ms, as root sees them in /proc) while
    the block runs; the list is filled when the block ends."""
    stop = "/run/kkua-test-sampler.stop"
    system.run("rm", "-f", stop)
    sampler = system.container.popen("/usr/bin/python3", "-c", SAMPLER, stop)
    found: list[str] = []
    try:
        yield found
    finally:
        system.run("touch", stop)
        out, _ = sampler.communicate(timeout=30)
        found.extend(out.splitlines())


# 8. ------------------------------------------------------------------------------------------------------

def test_units_verify_and_security_exposure(kkua_system: KkuaSystem, timers_installed: str) -> None:
    """`systemd-analyze verify` accepts every installed unit; `security` rates the services below the threshold."""
    s = kkua_system
    units = ["kkua-backupd.service", "kkua-backup@postgres.service", "kkua-backup@run.service", *TIMERS,
             "kkua-backup-failure@kkua-backup@postgres.service"]
    result = s.run("systemd-analyze", "verify", *units, check=False, timeout=120)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "kkua" in line]
    assert result.returncode == 0 and not ours, f"verify:\n{result.stdout}\n{result.stderr}"
    for unit in ("kkua-backupd.service", "kkua-backup@postgres.service",
                 "kkua-backup-failure@kkua-backup@postgres.service"):
        out = s.run("systemd-analyze", "security", unit, "--no-pager", check=False).stdout
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, out[-2000:]
        exposure = float(match.group(1))
        print(f"systemd-analyze security {unit}: exposure {exposure}")
        assert exposure < SECURITY_THRESHOLD, f"{unit}: exposure {exposure}\n{out}"



# 8b. -----------------------------------------------------------------------------------------------------

# Inside the container (private network): an HTTP receiver standing for healthchecks, writing one JSON line per
# request, and a port that accepts connections and never answers (a server that hangs).
RECEIVER = """
import json, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out = sys.argv[3]
hole = socket.socket()
hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
hole.bind(("127.0.0.1", int(sys.argv[2])))
hole.listen(64)
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        with open(out, "a") as fh:
            fh.write(json.dumps({"path": self.path, "body": body}) + "\\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
HC_PORT, HOLE_PORT = 18093, 18094
RECEIVED = "/run/kkua-test-received.jsonl"
TOKEN = "hc-token-in-the-container"  # the URL's secret part, never to be logged
DROPIN = "/etc/systemd/system/kkua-backup@postgres.service.d/zz-test-timeout.conf"


def received(system: KkuaSystem) -> list[dict[str, str]]:
    out = system.run("cat", RECEIVED, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def run_failing(system: KkuaSystem, unit: str) -> dict[str, str]:
    """Start `unit` (which fails), wait for the OnFailure= unit it starts to end; return that unit's props."""
    failure_unit = f"kkua-backup-failure@{unit.removesuffix('.service')}.service"
    before = system.show(failure_unit, "InvocationID")["InvocationID"]
    system.run("systemctl", "reset-failed", unit, check=False)
    system.run("systemctl", "start", unit, check=False, timeout=120)

    def ended() -> dict[str, str] | None:
        props = system.show(failure_unit, "InvocationID", "ActiveState", "Result", "ExecMainStatus", "User")
        done = props["InvocationID"] not in ("", before) and props["ActiveState"] in ("inactive", "failed")
        return props if done else None

    props = wait_until(ended, timeout=60, what=f"{failure_unit} to run and end")
    return {key: props[key] for key in ("Result", "ExecMainStatus", "User")}


@pytest.fixture
def notified(kkua_system: KkuaSystem, timers_installed: str) -> Iterator[KkuaSystem]:
    """The receiver running inside, [notify] pointing at it; afterwards the config, units and files as before."""
    s = kkua_system
    original = {section: dict(s.config.get(section, {})) for section in ("postgres", "notify")}
    s.run("rm", "-f", RECEIVED)
    s.container.write("/run/kkua-test-receiver.py", RECEIVER)
    s.run("systemd-run", "--unit=kkua-test-receiver", "/usr/bin/python3", "/run/kkua-test-receiver.py",
          str(HC_PORT), str(HOLE_PORT), RECEIVED)
    wait_until(lambda: s.run("python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {HC_PORT}))",
                             check=False).returncode == 0 or None, timeout=20, what="the receiver to listen")
    s.container.write("/etc/kkua-backup/hc.url", f"http://127.0.0.1:{HC_PORT}/hc/{TOKEN}\n", mode="0640",
                      owner="root:kkua-backup")
    s.write_config(notify={"healthchecks_url_file": "/etc/kkua-backup/hc.url", "timeout": 2})
    try:
        yield s
    finally:
        s.run("systemctl", "stop", "kkua-test-receiver", check=False)
        s.run("rm", "-rf", DROPIN.rsplit("/", 1)[0], "/etc/kkua-backup/hc.url", "/run/kkua-test-receiver.py")
        s.run("systemctl", "daemon-reload")
        s.run("systemctl", "reset-failed", check=False)
        s.config["notify"] = original["notify"]
        if not original["notify"]:
            del s.config["notify"]
        s.config["postgres"] = original["postgres"]
        s.write_config()
        s.kkua("run", "postgres", timeout=300)  # the next tests expect a last run that succeeded (`status` exits 0)


def test_on_failure_tells_a_failed_job_once_and_a_job_killed_by_its_timeout(notified: KkuaSystem) -> None:
    """A job that fails tells it itself (/start, /fail) and its OnFailure= unit adds nothing; a job that systemd
    kills at TimeoutStartSec= with SIGKILL cannot, and its OnFailure= unit tells it with the journal's lines."""
    s = notified
    unit = "kkua-backup@postgres.service"
    # 1. A failure the job reports: nothing listens on the port.
    s.write_config(postgres={"port": 1})
    props = run_failing(s, unit)
    assert props == {"Result": "success", "ExecMainStatus": "0", "User": "kkua-backup"}, props
    paths = [r["path"].split("?")[0] for r in received(s)]
    assert paths == [f"/hc/{TOKEN}/start", f"/hc/{TOKEN}/fail"], paths
    assert "cannot reach PostgreSQL" in received(s)[-1]["body"]

    # 2. Killed by its timeout, with SIGKILL: the job says nothing; OnFailure= does.
    s.write_config(postgres={"port": HOLE_PORT, "connect_timeout": 120})
    s.run("mkdir", "-p", DROPIN.rsplit("/", 1)[0])
    s.container.write(DROPIN, "[Service]\nTimeoutStartSec=4s\nKillSignal=SIGKILL\n")
    s.run("systemctl", "daemon-reload")
    props = run_failing(s, unit)
    assert props["Result"] == "success", props
    assert s.show(unit, "Result")["Result"] == "timeout"
    got = received(s)[2:]
    assert [r["path"].split("?")[0] for r in got] == [f"/hc/{TOKEN}/start", f"/hc/{TOKEN}/fail"], got
    body = got[-1]["body"]
    assert f"{unit} failed while the job ran; it did not record its end" in body, body
    assert "run started" in body, body  # a line of the killed job's journal
    status = json.loads(s.kkua("status", "--json", check=False).stdout)
    assert status["jobs"]["postgres"]["last_result"] == "failed"
    assert status["jobs"]["postgres"]["problems"][0].startswith("last run failed: kkua-backup@postgres.service")

    # 3. Killed by its timeout with systemd's SIGTERM: the job tells it itself, once.
    s.container.write(DROPIN, "[Service]\nTimeoutStartSec=4s\n")
    s.run("systemctl", "daemon-reload")
    run_failing(s, unit)
    got = received(s)[4:]
    assert [r["path"].split("?")[0] for r in got] == [f"/hc/{TOKEN}/start", f"/hc/{TOKEN}/fail"], got
    assert "stopped by signal SIGTERM" in got[-1]["body"]
    assert TOKEN not in journal_text(s, unit) + journal_text(s, f"kkua-backup-failure@{unit[:-8]}.service")


# 9. ------------------------------------------------------------------------------------------------------

def test_stop_and_uninstall_leave_config_and_backups(kkua_system: KkuaSystem, daemon: str) -> None:
    """`systemctl stop` ends the daemon cleanly (exit 0); `kkua-backup systemd uninstall` then removes every
    unit it installed and nothing else: the config, the backups and their folders stay."""
    s = kkua_system
    wait_idle(s)
    cursor = s.journal_cursor()
    s.run("systemctl", "stop", DAEMON, timeout=90)
    props = s.show(DAEMON, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, \
        props
    assert wait_line(s, cursor, "stopped")["PRIORITY"] == "6"
    assert json.loads(s.kkua("status", "--json").stdout)["daemon"]["running"] is False
    if not s.sets("postgres"):  # when run alone: something uninstall must not touch
        s.kkua("backup", "postgres")
    sets = {kind: [b["id"] for b in s.sets(kind)] for kind in ("postgres", "redis")}

    out = s.kkua("systemd", "uninstall", user="root", timeout=180).stdout
    assert "Removed" in out, out
    left = s.run("systemctl", "list-unit-files", "--no-legend", "kkua*", check=False).stdout.strip()  # 1: none
    assert left == "", f"units left after uninstall:\n{left}"
    # (install may have created /etc/sysusers.d and /etc/tmpfiles.d, and then uninstall removes them too)
    files = s.run("find", "/etc/systemd/system", "/etc/sysusers.d", "/etc/tmpfiles.d", "-name", "*kkua*",
                  check=False).stdout
    assert files.strip() == "", f"files left after uninstall:\n{files}"
    assert s.run("cat", CONFIG).stdout == s.render_config(), "uninstall changed the config"
    assert {kind: [b["id"] for b in s.sets(kind)] for kind in ("postgres", "redis")} == sets
    partial = s.run("find", "/var/backups/kkua", "-name", "*.partial").stdout
    assert partial.strip() == "", partial
