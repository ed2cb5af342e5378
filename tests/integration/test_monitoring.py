"""Metrics, notices, `check` and `status` against real things: a PostgreSQL server, Debian's
prometheus-node-exporter scraping the metrics file, a local HTTP receiver standing for healthchecks and
webhooks, the daemon's /metrics endpoint, a small tmpfs as a full disk."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, RedisEnv
from tests.support.node_exporter import NodeExporter, daemon_metrics, free_port, samples
from tests.support.receiver import Receiver

TOKEN = "0c6f3a2e-secret-ping-token"  # the part of the URLs that must never be logged


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def textfile_dir(workdir: Path) -> Path:
    folder = workdir / "node-exporter"
    folder.mkdir()
    return folder


def monitored(env: Env, receiver: Receiver, textfile_dir: Path, *, timeout: int = 2, **postgres: Any) -> None:
    """The test's config plus [notify] (both URLs, from 0600 files) and [metrics] (the textfile)."""
    env.write_config(**postgres)
    hc = env.root / "hc.url"
    hc.write_text(f"{receiver.url}/hc/{TOKEN}\n")
    webhook = env.root / "webhook.url"
    webhook.write_text(f"{receiver.url}/webhook/{TOKEN}\n")
    for path in (hc, webhook):
        path.chmod(0o600)
    with env.config_path.open("a") as fh:
        fh.write(f'\n[notify]\nhealthchecks_url_file = "{hc}"\nwebhook_url_file = "{webhook}"\ntimeout = {timeout}\n'
                 f'\n[metrics]\ntextfile = "{textfile_dir / "kkua_backup.prom"}"\n')


def no_token_anywhere(env: Env, *outputs: str) -> None:
    texts = list(outputs) + [p.read_text() for p in env.log_dir.glob("*.log")]
    texts.append(env.run("config", "check", "--json").stdout)
    for text in texts:
        assert TOKEN not in text


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, job: str = "postgres") -> float:
    return found[(name, (("backup_job", job),))]


def test_a_backup_pings_start_then_success_and_node_exporter_reads_its_metrics(
        env: Env, receiver: Receiver, textfile_dir: Path) -> None:
    monitored(env, receiver, textfile_dir)
    with NodeExporter(textfile_dir) as exporter:
        before = time.time()
        result = env.run("backup", "postgres", "--json", check=True)
        manifest = json.loads(result.stdout)

        pings = receiver.under("hc")
        assert [p.path for p in pings] == [f"/hc/{TOKEN}/start", f"/hc/{TOKEN}"]
        assert pings[0].query["rid"] == pings[1].query["rid"]
        hooks = receiver.under("webhook")
        assert len(hooks) == 1
        doc = json.loads(hooks[0].body)
        assert doc["event"] == "success" and doc["job"] == "postgres" and "succeeded" in doc["text"]

        path = textfile_dir / "kkua_backup.prom"
        assert path.stat().st_mode & 0o777 == 0o644
        assert not [p for p in textfile_dir.iterdir() if p != path]  # no temp file left
        found = exporter.scrape("kkua_backup")
        assert value(found, "kkua_backup_last_run_success") == 1
        assert before - 1 <= value(found, "kkua_backup_last_success_timestamp_seconds") <= time.time() + 1
        assert value(found, "kkua_backup_last_size_bytes") == sum(f["size"] for f in manifest["files"])
        assert value(found, "kkua_backup_last_rows") == sum(t["rows"] for t in manifest["details"]["tables"].values())
        assert value(found, "kkua_backup_runs_total") == 1
        assert value(found, "kkua_backup_failures_total") == 0
        assert value(found, "kkua_backup_last_duration_seconds") > 0
        # node_exporter itself says it read the file without error
        scrape_errors = samples(exporter.scrape_text(), "node_textfile_scrape_error")
        assert list(scrape_errors.values()) == [0]
    no_token_anywhere(env, result.stdout, result.stderr)


def test_a_failed_backup_sends_fail_with_the_log_tail(env: Env, receiver: Receiver, textfile_dir: Path) -> None:
    monitored(env, receiver, textfile_dir)
    env.run("backup", "postgres", check=True)
    (env.root / "pg.pass").write_text("wrong-password\n")
    result = env.run("backup", "postgres")
    assert result.returncode == 1
    assert "refused user" in result.stdout

    pings = receiver.under("hc")
    assert [p.path.removeprefix(f"/hc/{TOKEN}") for p in pings] == ["/start", "", "/start", "/fail"]
    failure = pings[-1].body.decode()
    assert "refused user 'postgres'" in failure  # the error line
    assert "INFO run started job=postgres runner=cli" in failure  # and the log lines before it
    doc = json.loads(receiver.under("webhook")[-1].body)
    assert doc["event"] == "failure" and "refused user 'postgres'" in doc["message"]
    assert any("run started" in line for line in doc["log_tail"])

    found = samples((textfile_dir / "kkua_backup.prom").read_text(), "kkua_backup")
    assert value(found, "kkua_backup_last_run_success") == 0
    assert value(found, "kkua_backup_runs_total") == 2
    assert value(found, "kkua_backup_failures_total") == 1
    assert value(found, "kkua_backup_last_success_timestamp_seconds") > 0  # the earlier success stays
    no_token_anywhere(env, result.stdout, result.stderr)


def test_receivers_that_hang_or_answer_500_do_not_fail_or_hold_up_the_backup(
        env: Env, receiver: Receiver, textfile_dir: Path) -> None:
    monitored(env, receiver, textfile_dir, timeout=1)
    receiver.mode.update(hc="hang", webhook="500")
    started = time.monotonic()
    result = env.run("backup", "postgres", check=True)
    elapsed = time.monotonic() - started
    # start in the background; success: 2 attempts of 1 s + 1 s pause (hc) and two quick 500s (webhook)
    assert elapsed < 20, elapsed
    assert len(receiver.under("webhook")) == 2  # tried, then retried once
    assert len(receiver.under("hc")) == 4  # start twice, success twice
    assert "webhook notice failed; retrying once" in result.stdout
    assert "webhook notice failed again; the job goes on without it" in result.stdout
    assert "healthchecks notice failed again" in result.stdout
    assert list(env.folder.glob("*.manifest.json")) or list(env.folder.glob("*manifest*"))
    no_token_anywhere(env, result.stdout, result.stderr)


def test_the_daemon_serves_metrics_only_when_asked(env: Env, receiver: Receiver, textfile_dir: Path) -> None:
    monitored(env, receiver, textfile_dir)
    env.run("backup", "postgres", check=True)
    port = free_port()
    with env.config_path.open("a") as fh:
        fh.write(f'listen = "127.0.0.1:{port}"\n')
    daemon = subprocess.Popen([sys.executable, "-m", "kkua_backupd.daemon"], env=env.cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = samples(daemon_metrics(daemon, port), "kkua_backup")
        assert value(found, "kkua_backup_last_run_success") == 1
        assert 0 <= value(found, "kkua_backup_since_last_completion_seconds") < 300
    finally:
        daemon.terminate()
        daemon.wait(30)


# ---------------------------------------------------------------------------------------------
# check


def check(env: Env) -> tuple[int, dict[str, dict[str, Any]], str]:
    human = env.run("check")
    result = env.run("check", "--json")
    assert result.returncode == human.returncode
    doc = json.loads(result.stdout)
    assert doc["status"] == result.returncode
    return result.returncode, {c["name"]: c for c in doc["checks"]}, human.stdout


def check_fails(env: Env, name: str, text: str) -> None:
    """`check` exits 2 (critical) with check `name` FAIL saying `text`."""
    code, checks, _ = check(env)
    assert code == 2
    assert checks[name]["level"] == "FAIL"
    assert text in checks[name]["message"]


def test_check_a_server_that_is_down(env: Env) -> None:
    env.write_config(port=free_port())
    code, checks, text = check(env)
    assert code == 2
    assert checks["postgres.connect"]["level"] == "FAIL"
    assert "cannot reach PostgreSQL" in checks["postgres.connect"]["message"]
    assert "FAIL postgres.connect: cannot reach PostgreSQL" in text and "; fix: is the server running" in text


def test_check_a_wrong_password(env: Env) -> None:
    (env.root / "pg.pass").write_text("not-the-password\n")
    code, checks, text = check(env)
    assert code == 2
    assert "refused user 'postgres'" in checks["postgres.connect"]["message"]
    assert "not-the-password" not in text


def test_check_a_missing_table_permission(env: Env) -> None:
    role = f"{env.database}_ro"
    with env.connect() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'ro-pass-123'")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
        table = conn.execute("SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
                             "'public'::regnamespace ORDER BY 1 LIMIT 1").fetchone()[0]
        conn.execute(f"REVOKE SELECT ON public.{table} FROM {role}")
    try:
        (env.root / "ro.pass").write_text("ro-pass-123\n")
        (env.root / "ro.pass").chmod(0o600)
        env.write_config(user=role, password_file=str(env.root / "ro.pass"), test_restore=True)
        code, checks, _ = check(env)
        assert code == 2
        assert checks["postgres.connect"]["level"] == "OK"
        assert checks["postgres.read"]["level"] == "FAIL"
        assert f"public.{table}" in checks["postgres.read"]["message"]
        assert checks["postgres.scratch-db"]["level"] == "FAIL"
        assert "CREATEDB" in checks["postgres.scratch-db"]["fix"]
        backup = env.run("backup", "postgres")  # what check foretold
        assert backup.returncode != 0
    finally:
        with env.connect() as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    folder = workdir / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0750", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_check_a_full_disk_and_the_backup_that_follows(env: Env, small_disk: Path) -> None:
    env.backup_dir = small_disk / "backups"
    env.write_config()
    first = json.loads(env.run("backup", "postgres", "--json", check=True).stdout)
    _, checks, _ = check(env)
    assert checks["backup-dir.space"]["level"] == "OK", checks["backup-dir.space"]
    # fill the disk but for less than the last set's size
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    size = sum(f["size"] for f in first["files"])
    with (small_disk / "filler").open("wb") as fh:
        fh.write(b"\0" * max(0, free - size // 2))
    check_fails(env, "backup-dir.space", "free, the next backups need about")
    result = env.run("backup", "postgres")
    assert result.returncode == 1
    sets = json.loads(env.run("list", "--json", check=True).stdout)
    assert [s["id"] for s in sets] == [first["id"]]  # the earlier backup is intact
    assert env.run("verify", first["id"]).returncode == 0


def age_state(env: Env, job: str, days: float) -> None:
    """Move `job`'s last run `days` into the past in the state file (as after a machine off that long)."""
    path = env.backup_dir / ".state" / "jobs.json"
    data = json.loads(path.read_text())
    entry = data["jobs"][job]
    shift = dt.timedelta(days=days)
    for key in ("last_start", "last_end", "last_success"):
        if entry.get(key):
            entry[key] = (dt.datetime.fromisoformat(entry[key]) - shift).isoformat(timespec="seconds")
    path.write_text(json.dumps(data))


def test_a_stale_backup_fails_check_and_status(env: Env) -> None:
    env.run("backup", "postgres", check=True)
    _, checks, _ = check(env)
    assert checks["postgres.last-run"]["level"] == "OK"
    status = env.run("status", "--json")
    assert status.returncode == 0, status.stdout
    assert json.loads(status.stdout)["jobs"]["postgres"]["ok"] is True

    age_state(env, "postgres", 3)
    check_fails(env, "postgres.last-run", "no successful run since")
    status = env.run("status", "--json")
    assert status.returncode == 1
    doc = json.loads(status.stdout)
    assert doc["ok"] is False and doc["jobs"]["postgres"]["ok"] is False
    assert doc["jobs"]["postgres"]["problems"][0].startswith("overdue: scheduled at ")
    assert doc["jobs"]["redis"]["ok"] is True  # never ran: not overdue
    human = env.run("status")
    assert human.returncode == 1 and "PROBLEM: postgres: overdue" in human.stdout
    assert human.stdout.startswith("times in ")


def test_status_after_a_failed_run(env: Env) -> None:
    env.run("backup", "postgres", check=True)
    (env.root / "pg.pass").write_text("wrong\n")
    assert env.run("backup", "postgres").returncode == 1
    status = env.run("status", "--json")
    assert status.returncode == 1
    doc = json.loads(status.stdout)
    problems = doc["jobs"]["postgres"]["problems"]
    assert problems and problems[0].startswith("last run failed: PostgreSQL at")
    offsets = {doc["jobs"]["postgres"][k][-6:] for k in ("last_run", "last_end", "next_run")}
    assert len(offsets) == 1  # one zone


def test_check_redis_sync_refused_and_redis_down(redis_env: RedisEnv) -> None:
    """A backup user whose ACL refuses SYNC: WARN (the BGSAVE fallback is on) or FAIL (fallback off); a Redis
    that is down: FAIL, with the fix."""
    password = "backup-user-pass-1"
    redis_env.client().execute_command("ACL", "SETUSER", "backup", "on", f">{password}", "~*", "&*", "+@all", "-sync",
                                       "-psync")
    user_pass = redis_env.root / "backup.pass"
    user_pass.write_text(password + "\n")
    user_pass.chmod(0o600)
    redis_env.write_config(username="backup", password_file=str(user_pass))
    checks = {c["name"]: c for c in json.loads(redis_env.run("check", "--json").stdout)["checks"]}
    assert checks["redis.connect"]["level"] == "OK"
    assert checks["redis.sync"]["level"] == "WARN", checks["redis.sync"]
    assert checks["redis.sync"]["fix"] == "ACL SETUSER backup +sync"
    redis_env.write_config(username="backup", password_file=str(user_pass), sync_fallback="none")
    checks = {c["name"]: c for c in json.loads(redis_env.run("check", "--json").stdout)["checks"]}
    assert checks["redis.sync"]["level"] == "FAIL"

    redis_env.write_config(port=free_port())
    result = redis_env.run("check", "--json")
    assert result.returncode == 2
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["redis.connect"]["level"] == "FAIL" and "cannot reach Redis" in checks["redis.connect"]["message"]
    assert "is redis-server running?" in checks["redis.connect"]["fix"]
