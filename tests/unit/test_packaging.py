"""The shipped example config and systemd units are valid as they are."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kkua_backupd.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_is_valid() -> None:
    loaded = load_config(str(ROOT / "packaging" / "config.toml.example"), {"DATABASE_PASSWORD": "x"})
    assert loaded.config.backup_dir == Path("/var/backups/kkua")
    assert loaded.config.restore.force is False


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    units = [ROOT / "systemd" / "kkua-backup@.service", ROOT / "systemd" / "kkua-postgres-backup.timer"]
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                            check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "/opt/kkua-backupd/bin/kkua-backup is not executable" not in line]
    assert problems == []
    instance = tmp_path / "kkua-backup@postgres.service"
    shutil.copy(units[0], instance)
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(instance)],
                              capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0
