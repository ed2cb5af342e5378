"""Rendering of the systemd units, timers, sysusers/tmpfiles entries and cron lines (pure functions),
checked with the real `systemd-analyze verify` / `security` where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kkua_backupd.config import Config
from kkua_backupd.install import common as install
from kkua_backupd.install.cron import (
    BEGIN,
    END,
    NotExpressible,
    find_block,
    oncalendar_to_cron,
    remove_block,
    render_cron_block,
    replace_block,
)
from kkua_backupd.install.systemd import UnitParams, rendered_files

ROOT = Path(__file__).resolve().parents[2]
HAS_ANALYZE = shutil.which("systemd-analyze") is not None
needs_analyze = pytest.mark.skipif(not HAS_ANALYZE, reason="systemd-analyze not installed")
# The exposure `systemd-analyze security` gives the services (0 best, 10 worst; "OK" up to 4.9). They
# score 1.2: what is left is the network (PrivateNetwork=, IPAddressDeny=, AF_INET*), which the jobs
# need, PrivateUsers= and RootDirectory=, each commented in the unit. 1.5 leaves room for the next
# systemd's scoring tweaks but fails as soon as a real protection is dropped (each is worth 0.1-0.5).
EXPOSURE_LIMIT = 1.5


def shipped(rel: Path) -> Path:
    """Where the source tree keeps the default rendering of an installed file."""
    if rel.is_relative_to(install.UNIT_DIR):
        return ROOT / "systemd" / rel.relative_to(install.UNIT_DIR)
    return ROOT / "packaging" / {install.SYSUSERS_FILE: "sysusers.d-kkua-backup.conf",
                                 install.TMPFILES_FILE: "tmpfiles.d-kkua-backup.conf"}[rel]


def test_shipped_files_are_the_default_rendering() -> None:
    config = Config()
    params = UnitParams.from_config(config, install.DEFAULT_BIN_DIR, None,
                                    {job: getattr(config.schedule, job) for job in install.JOBS})
    for rel, text in rendered_files(params).items():
        assert shipped(rel).read_text() == text, f"{shipped(rel)} differs from the rendering; regenerate it"


def test_units_carry_config_and_paths() -> None:
    params = UnitParams(bin_dir=Path("/opt/with space/bin"), config_path=Path("/srv/conf/kkua 100%.toml"),
                        backup_dir=Path("/srv/backups"), log_dir=Path("/srv/backups/logs"),
                        state_dir=Path("/var/lib/kkua-state"), job_timeout=1234, stop_grace=45,
                        schedules={"postgres": "*-*-* 01:30:00", "redis": "Mon..Fri *-*-* 05:00:00",
                                   "retention": "*-*-01 04:00:00 Europe/Seoul"},
                        randomized_delay=300, persistent=False)
    files = {str(rel): text for rel, text in rendered_files(params).items()}
    template = files["etc/systemd/system/kkua-backup@.service"]
    assert 'ExecStart="/opt/with space/bin/kkua-backup" --config "/srv/conf/kkua 100%%.toml" run %i' in template
    assert "ReadWritePaths=/srv/backups /var/lib/kkua-state\n" in template  # logs are inside backup_dir
    assert "TimeoutStartSec=1234s" in template and "TimeoutStopSec=75s" in template
    assert "run all" in files["etc/systemd/system/kkua-backup@run.service.d/run-all.conf"]
    daemon = files["etc/systemd/system/kkua-backupd.service"]
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60", "Restart=on-failure",
                 "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed", "User=kkua-backup", "UMask=0027"):
        assert f"\n{line}\n" in daemon
    timer = files["etc/systemd/system/kkua-backup-retention.timer"]
    assert "OnCalendar=*-*-01 04:00:00 Europe/Seoul\n" in timer
    assert "Persistent=false" in timer and "RandomizedDelaySec=300" in timer
    assert not re.search(r"^On(Boot|Startup|Active)Sec=", timer, re.M)  # nothing fires on boot or install
    assert "d /var/lib/kkua-state 0750 kkua-backup kkua-backup -" in files["etc/tmpfiles.d/kkua-backup.conf"]
    assert "/srv/backups /usr/sbin/nologin" in files["etc/sysusers.d/kkua-backup.conf"]


def _render_into(folder: Path, bin_dir: Path) -> None:
    for rel, text in rendered_files(UnitParams(bin_dir=bin_dir)).items():
        if rel.is_relative_to(install.UNIT_DIR):
            dest = folder / rel.relative_to(install.UNIT_DIR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The rendered units in a folder, their ExecStart= pointing at executables that exist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("kkua-backup", "kkua-backupd"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    units = tmp_path / "units"
    _render_into(units, bin_dir)
    return units


UNITS_TO_CHECK = ("kkua-backupd.service", "kkua-backup@postgres.service", "kkua-backup@run.service",
                  "kkua-postgres-backup.timer", "kkua-redis-backup.timer", "kkua-backup-retention.timer",
                  "kkua-backup-failure@kkua-backup@postgres.service")


@needs_analyze
def test_systemd_analyze_verify_passes(unit_dir: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", *UNITS_TO_CHECK], capture_output=True, text=True,
                            env={"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", ["kkua-backupd.service", "kkua-backup@postgres.service", "kkua-backup@run.service",
                                  "kkua-backup-failure@kkua-backup@postgres.service"])
def test_exposure_stays_low(unit_dir: Path, unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", unit], capture_output=True,
                            text=True, env={"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin"},
                            check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= EXPOSURE_LIMIT, result.stdout


@needs_analyze
def test_run_instance_runs_every_job(unit_dir: Path) -> None:
    """systemd loads the drop-in for the `run` instance only: pointed at a missing program, only
    kkua-backup@run.service fails to verify."""
    dropin = unit_dir / "kkua-backup@run.service.d" / "run-all.conf"
    text = dropin.read_text()
    assert re.search(r"^ExecStart=$", text, re.M) and re.search(r"^ExecStart=\S+/kkua-backup run all$", text, re.M)
    dropin.write_text(text.replace(str(unit_dir.parent / "bin"), "/nonexistent"))
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(["systemd-analyze", "verify", "kkua-backup@run.service"], capture_output=True, text=True,
                         env=env, check=False)
    assert "/nonexistent/kkua-backup is not executable" in run.stdout + run.stderr
    other = subprocess.run(["systemd-analyze", "verify", "kkua-backup@postgres.service"], capture_output=True,
                           text=True, env=env, check=False)
    assert other.returncode == 0, other.stdout + other.stderr


# ---- cron ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "cron"), [
    ("*-*-* 02:00:00", "0 2 * * *"),
    ("Sun *-*-* 04:00:00", "0 4 * * 0"),
    ("daily", "0 0 * * *"),
    ("weekly", "0 0 * * 1"),
    ("monthly", "0 0 1 * *"),
    ("hourly", "0 * * * *"),
    ("quarterly", "0 0 1 1,4,7,10 *"),
    ("02:30", "30 2 * * *"),
    ("Mon..Fri 22:15", "15 22 * * 1-5"),
    ("Mon,Wed,Fri *-*-* 03:00:00", "0 3 * * 1,3,5"),
    ("Sat..Sun *-*-* 06:00:00", "0 6 * * 6-7"),
    ("*-*-* *:00/15:00", "*/15 * * * *"),
    ("*-*-* *:05/20:00", "5-59/20 * * * *"),
    ("*-*-* 00/6:00:00", "0 */6 * * *"),
    ("*-*-* 1..5:30:00", "30 1-5 * * *"),
    ("*-*-01/2 04:00:00", "0 4 */2 * *"),
    ("*-*-1,15 04:00:00", "0 4 1,15 * *"),
    ("*-06-01 00:00:00", "0 0 1 6 *"),
    ("12-25 08:00", "0 8 25 12 *"),
    ("*-*-* 02:00:00.000000", "0 2 * * *"),
])
def test_oncalendar_to_cron(expr: str, cron: str) -> None:
    assert oncalendar_to_cron(expr) == cron


@pytest.mark.parametrize(("expr", "why"), [
    ("*-*-* 02:00:30", "second"),
    ("*-*-* *:*:0/10", "second"),
    ("*-02~01 04:00:00", "'~'"),
    ("2027-*-* 04:00:00", "year"),
    ("*-*-* 02:00:00 Europe/Berlin", "time zone"),
    ("Mon *-*-01 04:00:00", "EITHER"),
    ("Fri..Mon 04:00", "wraps"),
])
def test_oncalendar_refused_for_cron(expr: str, why: str) -> None:
    with pytest.raises(NotExpressible) as caught:
        oncalendar_to_cron(expr)
    message = str(caught.value)
    assert repr(expr) in message and why in message and "systemd timers" in message


def test_cron_block_lines() -> None:
    block = render_cron_block({"postgres": "*-*-* 02:00:00", "redis": "*-*-* 03:00:00",
                               "retention": "Sun *-*-* 04:00:00"}, bin_dir=Path("/opt/kkua-backupd/bin"),
                              config_path=Path("/etc/kkua 50%.toml"), log_dir=Path("/var/log/kkua-backup"),
                              randomized_delay=120, user="kkua-backup")
    lines = block.splitlines()
    assert lines[0] == BEGIN and lines[-1] == END
    jobs = [line for line in lines if not line.startswith("#")]
    assert jobs[0] == ("0 2 * * * kkua-backup sleep $(shuf -i 0-120 -n 1); KKUA_BACKUP_RUNNER=cron "
                       "/opt/kkua-backupd/bin/kkua-backup --config '/etc/kkua 50\\%.toml' run postgres "
                       ">>/var/log/kkua-backup/cron.log 2>&1")
    assert jobs[2].startswith("0 4 * * 0 kkua-backup ") and jobs[2].endswith("run retention >>/var/log/kkua-backup/"
                                                                               "cron.log 2>&1")
    no_delay = render_cron_block({"postgres": "daily", "redis": "daily", "retention": "weekly"},
                                 bin_dir=Path("/b"), config_path=None, log_dir=Path("/l"), randomized_delay=0,
                                 user=None)
    assert "sleep" not in no_delay and "0 0 * * * KKUA_BACKUP_RUNNER=cron /b/kkua-backup run redis" in no_delay


def test_block_replacement_keeps_foreign_lines() -> None:
    foreign = "MAILTO=ops@example.com\n# their comment\n*/5 * * * * root /usr/local/bin/other-job\n"
    first = "\n".join([BEGIN, "0 2 * * * a", END]) + "\n"
    second = "\n".join([BEGIN, "0 3 * * * b", END]) + "\n"
    text = replace_block(foreign, first)
    assert text == foreign + first
    text = replace_block(text + "15 1 * * * root after\n", second)
    assert text == foreign + second + "15 1 * * * root after\n"
    assert find_block(text) == second
    assert remove_block(text) == foreign + "15 1 * * * root after\n"
    assert replace_block("no newline at end", first) == "no newline at end\n" + first


def test_broken_block_is_refused() -> None:
    with pytest.raises(install.KkuaError, match="block is broken"):
        replace_block(f"{BEGIN}\n0 2 * * * x\n", "new")


if __name__ == "__main__":  # regenerate the shipped files: .venv/bin/python tests/unit/test_units.py
    _defaults = Config()
    _params = UnitParams.from_config(_defaults, install.DEFAULT_BIN_DIR, None,
                                     {job: getattr(_defaults.schedule, job) for job in install.JOBS})
    for _rel, _text in rendered_files(_params).items():
        shipped(_rel).parent.mkdir(exist_ok=True)
        shipped(_rel).write_text(_text)


def test_jobs_and_the_daemon_tell_their_failure_through_on_failure() -> None:
    files = rendered_files(UnitParams())
    for unit in ("kkua-backup@.service", "kkua-backupd.service"):
        assert "\nOnFailure=kkua-backup-failure@%N.service\n" in files[install.UNIT_DIR / unit], unit
    failure = files[install.UNIT_DIR / "kkua-backup-failure@.service"]
    assert "\nExecStart=/opt/kkua-backupd/bin/kkua-backup notify-failure %i\n" in failure
    assert "\nOnFailure=" not in failure  # a failing notice does not start another
    assert "\nSupplementaryGroups=systemd-journal\n" in failure
