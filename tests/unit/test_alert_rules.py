"""The alert rules of docs/monitoring.md, as an operator copies them: valid for Prometheus (`promtool check
rules`) and firing when, and only when, they should (`promtool test rules` on series that stop and go on)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing (Debian package prometheus; "
                                                           "scripts/setup.sh installs it)")


def rules_file(tmp_path: Path) -> Path:
    match = re.search(r"```yaml\n(groups:.*?)```", DOC.read_text(), re.S)
    assert match, "docs/monitoring.md has no ```yaml block starting with groups:"
    path = tmp_path / "kkua-backup.rules.yml"
    path.write_text(match.group(1))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_rules_are_valid(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(rules_file(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def passes_rule_tests(tmp_path: Path, series: list[dict[str, str]], cases: list[dict[str, object]]) -> None:
    """`promtool test rules` of the doc's rules on `series` (one sample per hour from time 0) passes `cases`."""
    tests = {"rule_files": [str(rules_file(tmp_path))], "evaluation_interval": "1m",
             "tests": [{"interval": "1h", "input_series": series, "alert_rule_test": cases}]}
    spec = tmp_path / "tests.yml"
    spec.write_text(json.dumps(tests))  # JSON is YAML
    result = promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _alert(labels: dict[str, str], summary: str, description: str) -> dict[str, object]:
    return {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}


def _fires_between(alertname: str, quiet: str, firing: str, alert: dict[str, object]) -> list[dict[str, object]]:
    """The cases of one rule: silent at `quiet`, firing with `alert` at `firing`."""
    return [{"eval_time": quiet, "alertname": alertname, "exp_alerts": []},
            {"eval_time": firing, "alertname": alertname, "exp_alerts": [alert]}]


def test_the_rules_fire_when_backups_stop_or_fail(tmp_path: Path) -> None:
    prom = "/var/lib/prometheus/node-exporter/kkua_backup.prom"
    # One sample per hour from time 0. PostgreSQL succeeded once, at 0, and never again; Redis every hour.
    series = [
        {"series": 'kkua_backup_last_success_timestamp_seconds{backup_job="postgres",instance="db1"}',
         "values": "0x30"},
        {"series": 'kkua_backup_last_success_timestamp_seconds{backup_job="redis",instance="db1"}',
         "values": "0+3600x30"},
        {"series": f'node_textfile_mtime_seconds{{file="{prom}",instance="db1"}}', "values": "0x30"},
        {"series": f'node_textfile_mtime_seconds{{file="{prom}",instance="db2"}}', "values": "0+3600x30"},
        {"series": 'kkua_backup_last_run_success{backup_job="postgres",instance="db1"}', "values": "1 1 0x28"},
        {"series": 'kkua_backup_last_run_success{backup_job="redis",instance="db1"}', "values": "1x30"},
        {"series": 'kkua_backup_last_test_restore_success{backup_job="postgres",instance="db1"}',
         "values": "1 1 1 0x27"},
    ]
    stale = _alert({"severity": "critical", "backup_job": "postgres", "instance": "db1"},
                   "db1: no successful postgres backup for more than 26 h",
                   "Run `kkua-backup status` and `kkua-backup check` on the host.")
    not_run = _alert({"severity": "critical", "file": prom, "instance": "db1"},
                     "db1: kkua-backup has not run for more than 26 h",
                     "Check `systemctl list-timers 'kkua-*'` or `systemctl status kkua-backupd`.")
    failed = _alert({"severity": "warning", "backup_job": "postgres", "instance": "db1"},
                    "db1: the last postgres job failed",
                    "`kkua-backup status` says why; `journalctl -u kkua-backup@postgres`.")
    test_failed = _alert({"severity": "critical", "backup_job": "postgres", "instance": "db1"},
                         "db1: the last test restore of postgres failed",
                         "The newest set is marked failed and is not used by `restore latest`; see `kkua-backup list`.")
    passes_rule_tests(tmp_path, series, [
        *_fires_between("KkuaBackupNoRecentSuccess", "25h", "27h", stale),
        *_fires_between("KkuaBackupMetricsNotUpdated", "25h", "27h", not_run),
        *_fires_between("KkuaBackupLastRunFailed", "1h", "2h", failed),
        *_fires_between("KkuaBackupTestRestoreFailed", "2h", "3h", test_failed),
    ])


def test_the_remote_rules_fire_when_an_upload_waits_or_pushes_stop(tmp_path: Path) -> None:
    # One sample per hour from time 0. offsite: a set pending since 0, the last good push at 0. box: pushed
    # every hour, nothing pending (no pending_since sample, as the metrics file has none then).
    series = [
        {"series": 'kkua_backup_remote_pending_since_timestamp_seconds{remote="offsite",instance="db1"}',
         "values": "0x30"},
        {"series": 'kkua_backup_remote_last_push_success_timestamp_seconds{remote="offsite",instance="db1"}',
         "values": "0x30"},
        {"series": 'kkua_backup_remote_last_push_success_timestamp_seconds{remote="box",instance="db1"}',
         "values": "0+3600x30"},
    ]
    pending = _alert({"severity": "warning", "remote": "offsite", "instance": "db1"},
                     "db1: an upload to remote offsite has been pending for more than 2 h",
                     "`kkua-backup status` shows what and the last error; `kkua-backup check` tests the remote; "
                     "then `kkua-backup push offsite`.")
    no_push = _alert({"severity": "critical", "remote": "offsite", "instance": "db1"},
                     "db1: no successful push to remote offsite for more than 26 h",
                     "`kkua-backup status` shows the last push's error; `kkua-backup check` tests the remote.")
    passes_rule_tests(tmp_path, series, [
        *_fires_between("KkuaBackupUploadPending", "2h", "2h1m", pending),
        *_fires_between("KkuaBackupNoRecentPush", "26h", "26h1m", no_push),
    ])
