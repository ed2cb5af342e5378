"""Monitoring of the remote copies against real things: an S3 store (`rclone serve s3`) and an SSH host (Debian's
sshd) from tests/support/remotes.py, Debian's prometheus-node-exporter scraping the per-remote metrics after a
push that failed (the store down) and one that succeeded, `status` exiting 1 for an upload pending too long, and
`check` listing each remote with the configured credentials (a wrong secret, an unknown host key, a store down)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import Env
from tests.support.helpers import describe
from tests.support.node_exporter import NodeExporter, daemon_metrics, free_port, samples
from tests.support.remotes import RcloneS3, Sshd, add_remotes

# The remote test's fixtures (the S3 store and the SSH host), used here by name.
from .test_remotes import s3, sshd  # noqa: F401

Found = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def remote_value(found: Found, name: str, remote: str) -> float | None:
    """The sample of `name` for `remote` as node_exporter serves it (its own labels are none here)."""
    return found.get((name, (("remote", remote),)))


def age_pending(env: Env, remote: str, hours: float) -> None:
    """Move the times `remote`'s pending sets became pending `hours` into the past in the state file."""
    path = env.backup_dir / ".state" / "jobs.json"
    data = json.loads(path.read_text())
    pending = data["remotes"][remote]["pending"]
    shift = dt.timedelta(hours=hours)
    for key, since in pending.items():
        pending[key] = (dt.datetime.fromisoformat(since) - shift).isoformat(timespec="seconds")
    path.write_text(json.dumps(data))


def test_node_exporter_reads_the_remote_metrics_after_a_failed_then_a_good_push_and_status_flags_a_late_upload(
        env: Env, s3: RcloneS3, workdir: Path) -> None:  # noqa: F811 - the fixture imported above
    textfile_dir = workdir / "node-exporter"
    textfile_dir.mkdir()
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir))
    with env.config_path.open("a") as fh:
        fh.write(f'\n[metrics]\ntextfile = "{textfile_dir / "kkua_backup.prom"}"\n')
    prefix = "kkua_backup_remote_"
    with NodeExporter(textfile_dir) as exporter:
        s3.stop()  # the remote is down
        before = time.time()
        failed = env.run("--json", "backup", "postgres")
        assert failed.returncode == 1, describe(failed)
        found = exporter.scrape(prefix)
        assert remote_value(found, f"{prefix}pending_sets", "offsite") == 1
        since = remote_value(found, f"{prefix}pending_since_timestamp_seconds", "offsite")
        assert since is not None and before - 1 <= since <= time.time() + 1
        assert remote_value(found, f"{prefix}last_push_success", "offsite") == 0
        assert remote_value(found, f"{prefix}last_push_timestamp_seconds", "offsite") is not None
        assert remote_value(found, f"{prefix}last_push_success_timestamp_seconds", "offsite") is None  # never

        status = env.run("--json", "status")
        assert json.loads(status.stdout)["remotes"]["offsite"]["ok"] is True  # pending, but not for long yet
        age_pending(env, "offsite", 2.5)
        status = env.run("--json", "status")
        assert status.returncode == 1, describe(status)
        doc = json.loads(status.stdout)["remotes"]["offsite"]
        assert doc["ok"] is False
        assert doc["problems"][0].startswith("upload pending for more than 2 h: 1 set(s) since ")
        assert "last push failed: " in doc["problems"][0]
        human = env.run("status")
        assert human.returncode == 1 and "PROBLEM: remote offsite: upload pending for more than 2 h" in human.stdout

        s3.start()
        pushed = env.run("push")
        assert pushed.returncode == 0, describe(pushed)
        found = exporter.scrape(prefix)
        assert remote_value(found, f"{prefix}pending_sets", "offsite") == 0
        assert remote_value(found, f"{prefix}pending_since_timestamp_seconds", "offsite") is None
        assert remote_value(found, f"{prefix}last_push_success", "offsite") == 1
        good = remote_value(found, f"{prefix}last_push_success_timestamp_seconds", "offsite")
        assert good is not None and before - 1 <= good <= time.time() + 1
    status = env.run("--json", "status")
    assert json.loads(status.stdout)["remotes"]["offsite"] | {"ok": True, "problems": []} == \
        json.loads(status.stdout)["remotes"]["offsite"]

    port = free_port()  # the daemon's /metrics serves the same per-remote metrics
    with env.config_path.open("a") as fh:
        fh.write(f'listen = "127.0.0.1:{port}"\n')  # [metrics] is the config's last section
    daemon = subprocess.Popen([sys.executable, "-m", "kkua_backupd.daemon"], env=env.cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        served = samples(daemon_metrics(daemon, port), prefix)
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert remote_value(served, f"{prefix}pending_sets", "offsite") == 0
    assert remote_value(served, f"{prefix}last_push_success", "offsite") == 1
    assert remote_value(served, f"{prefix}last_push_success_timestamp_seconds", "offsite") == good


def checks_of(env: Env) -> tuple[int, dict[str, dict[str, Any]], str]:
    human = env.run("check")
    result = env.run("--json", "check")
    assert result.returncode == human.returncode, describe(result)
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["checks"]}, human.stdout


def test_check_reaches_each_remote_and_says_why_not(
        env: Env, s3: RcloneS3, sshd: Sshd, workdir: Path) -> None:  # noqa: F811 - the fixtures imported above
    base = env.config_path.read_text()
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    env.run("backup", "postgres", check=True)
    code, checks, text = checks_of(env)
    assert checks["remote.offsite"]["level"] == "OK", checks["remote.offsite"]
    assert checks["remote.offsite"]["message"].endswith("reachable, 1 set(s) there")
    assert checks["remote.box"]["level"] == "OK", checks["remote.box"]
    assert "OK   remote.box: sftp://root@127.0.0.1:" in text

    # a wrong secret
    env.config_path.write_text(base)
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir, secret="not-the-secret-0000000000"),
                sshd.remote_toml("box"))
    code, checks, text = checks_of(env)
    assert code == 2
    offsite = checks["remote.offsite"]
    assert offsite["level"] == "FAIL" and "refused list" in offsite["message"] and "403" in offsite["message"]
    assert "credentials" in offsite["fix"], offsite
    assert checks["remote.box"]["level"] == "OK"
    assert "not-the-secret" not in text

    # an unknown host key
    env.config_path.write_text(base)
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    good_hosts = sshd.known_hosts.read_text()
    other = workdir / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2])
                                + "\n")
    code, checks, text = checks_of(env)
    assert code == 2
    box = checks["remote.box"]
    assert box["level"] == "FAIL", box
    assert "host's key is not in" in box["message"] or "Host key verification failed" in box["message"], box
    assert box["fix"]
    assert checks["remote.offsite"]["level"] == "OK"
    sshd.known_hosts.write_text(good_hosts)

    # a store that is down
    s3.stop()
    started = time.monotonic()
    code, checks, text = checks_of(env)
    assert code == 2
    assert checks["remote.offsite"]["level"] == "FAIL", checks["remote.offsite"]
    assert checks["remote.offsite"]["fix"]
    assert checks["remote.box"]["level"] == "OK"
    assert time.monotonic() - started < 2 * 45  # two runs of check, each giving the remote 30 s at most
    assert "FAIL remote.offsite: " in text and "; fix: " in text
