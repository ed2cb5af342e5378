"""The shipped example config and systemd units are valid as they are."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kkua_backupd.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"


def test_example_config_is_valid() -> None:
    loaded = load_config(str(ROOT / "packaging" / "config.toml.example"),
                         {"DATABASE_PASSWORD": "x", "REDIS_PASSWORD": "y"})
    config = loaded.config
    assert config.backup_dir == Path("/var/backups/kkua")
    assert config.restore.force is False
    # The example spells out the defaults of the sections operators change most, so it must agree with them.
    defaults = Config()
    assert config.schedule == defaults.schedule
    assert config.daemon == defaults.daemon
    assert config.retention.days == defaults.retention.days and config.retention.keep_last == 3


def test_example_config_shows_every_schedule_and_daemon_key() -> None:
    text = (ROOT / "packaging" / "config.toml.example").read_text()
    for key in ("postgres", "redis", "retention", "timezone", "randomized_delay", "persistent", "job_timeout",
                "retries", "retry_backoff", "stop_grace"):
        assert re.search(rf"^#? ?{key} = ", text, re.M), key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    units = ["kkua-backupd.service", "kkua-backup@postgres.service", "kkua-backup@run.service",
             "kkua-postgres-backup.timer", "kkua-redis-backup.timer", "kkua-backup-retention.timer"]
    env = {"SYSTEMD_UNIT_PATH": f"{SYSTEMD}:", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, check=False,
                            env=env)
    # The shipped units name /opt/kkua-backupd/bin, which need not exist on the machine running the tests.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and not re.search(r"/opt/kkua-backupd/bin/kkua-backupd? is not executable", line)]
    assert problems == []
    for unit in ("kkua-backup@postgres.service", "kkua-backupd.service"):
        security = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                                  capture_output=True, text=True, check=False, env=env)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert match, security.stdout + security.stderr
        assert float(match.group(1)) <= 1.5


def test_sysusers_and_tmpfiles_entries() -> None:
    sysusers = (ROOT / "packaging" / "sysusers.d-kkua-backup.conf").read_text()
    assert 'u kkua-backup - "KKUA backups" /var/backups/kkua /usr/sbin/nologin' in sysusers
    tmpfiles = (ROOT / "packaging" / "tmpfiles.d-kkua-backup.conf").read_text()
    for folder in ("/var/backups/kkua", "/var/backups/kkua/postgres", "/var/backups/kkua/redis",
                   "/var/backups/kkua/.state", "/var/log/kkua-backup"):
        assert f"d {folder} 0750 kkua-backup kkua-backup -" in tmpfiles
    assert "d /etc/kkua-backup 0750 root kkua-backup -" in tmpfiles
