"""`kkua-backup systemd ...` and `kkua-backup cron ...` through the real command line, into a temporary
root (`--root DIR`: files only, no systemctl), checked with the real `systemd-analyze`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd.install.cron import BEGIN, END

BIN_DIR = Path(sys.executable).parent
HAS_ANALYZE = shutil.which("systemd-analyze") is not None
SYSTEMD_RUNNING = Path("/run/systemd/system").is_dir()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "KKUA_BACKUP_CONFIG"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "kkua_backupd", *args], capture_output=True, text=True,
                          env=environ, timeout=120, check=False)


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root with its mode and content (None for folders)."""
    found: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode),
                                              path.read_bytes() if path.is_file() else None)
    return found


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A root with foreign files already in the folders install writes to, and a config outside it."""
    root = tmp_path / "root"
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/systemd/system/other.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "etc/tmpfiles.d").mkdir(parents=True)
    (root / "etc/tmpfiles.d/other.conf").write_text("d /run/other 0755 root root -\n")
    config = tmp_path / "conf" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'backup_dir = "{tmp_path}/backups"\nlog_dir = "{tmp_path}/logs"\n\n'
                      '[schedule]\npostgres = "daily"\nredis = "Mon..Fri 03:30"\nretention = "Sun *-*-* 04:00:00"\n'
                      'randomized_delay = 90\n')
    return root, config


def test_install_then_uninstall_leaves_the_tree_as_it_was(world: tuple[Path, Path]) -> None:
    root, config = world
    before = tree(root)
    result = cli("--config", str(config), "--json", "systemd", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    units = root / "etc/systemd/system"
    template = (units / "kkua-backup@.service").read_text()
    assert f"ExecStart={BIN_DIR}/kkua-backup --config {config} run %i\n" in template
    assert f"ExecStart={BIN_DIR}/kkua-backupd --config {config}\n" in (units / "kkua-backupd.service").read_text()
    assert f"ReadWritePaths={config.parent.parent}/backups {config.parent.parent}/logs\n" in template
    postgres_timer = (units / "kkua-postgres-backup.timer").read_text()
    assert "RandomizedDelaySec=90\n" in postgres_timer
    # systemd's normalized form, what `systemctl list-timers` and `systemd-analyze calendar` show.
    assert "OnCalendar=*-*-* 00:00:00\n" in postgres_timer
    assert "OnCalendar=Mon..Fri *-*-* 03:30:00\n" in (units / "kkua-redis-backup.timer").read_text()
    assert stat.S_IMODE((units / "kkua-backupd.service").stat().st_mode) == 0o644
    assert any("skipped (root is" in step for step in doc["steps"])
    assert doc["enabled"] == []
    # This test's Python may live under /root (pyenv): then install must say the services cannot see it.
    hidden = any(p.resolve().is_relative_to(h) for p in (BIN_DIR, Path(sys.executable))
                 for h in (Path("/root"), Path("/home")))
    assert any("ProtectHome" in w for w in doc["warnings"]) == hidden, doc["warnings"]
    # The config is in pytest's temp folder: under /tmp, the services would see their own empty /tmp.
    if config.is_relative_to("/tmp"):
        assert any(w.startswith(f"the config {config} is under /tmp, which the services cannot see "
                                "(PrivateTmp=yes)") for w in doc["warnings"]), doc["warnings"]
    record = json.loads((root / "var/lib/kkua-backup/install.json").read_text())
    assert "etc/systemd/system/other.service" not in record["files"]

    again = cli("--config", str(config), "--json", "systemd", "install", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["changed"] == []

    removed = cli("--config", str(config), "systemd", "uninstall", "--root", str(root))
    assert removed.returncode == 0, removed.stderr
    assert "the config, backups, logs and the kkua-backup user were left alone" in removed.stdout
    assert tree(root) == before
    assert config.exists()


def test_install_without_config_installs_the_example_and_uninstall_keeps_it(world: tuple[Path, Path]) -> None:
    if Path("/etc/kkua-backup/config.toml").exists():
        pytest.skip("this machine has /etc/kkua-backup/config.toml, which the CLI would load")
    root, _ = world
    config = root / "etc/kkua-backup/config.toml"
    result = cli("systemd", "install", "--root", str(root), "--no-enable")
    assert result.returncode == 0, result.stderr
    assert f"installed the example as {config}" in result.stdout
    assert "Not enabled (--no-enable)" in result.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o750
    assert f"ExecStart={BIN_DIR}/kkua-backup run %i\n" in (root / "etc/systemd/system/kkua-backup@.service").read_text()
    config.write_text(config.read_text() + "# edited by the operator\n")
    again = cli("systemd", "install", "--root", str(root))
    assert f"{config} exists and was left alone" in again.stdout
    assert cli("systemd", "uninstall", "--root", str(root)).returncode == 0
    assert config.read_text().endswith("# edited by the operator\n")
    assert not (root / "etc/systemd/system/kkua-backupd.service").exists()
    assert not (root / "var/lib").exists()


@pytest.mark.skipif(not HAS_ANALYZE, reason="systemd-analyze not installed")
def test_installed_units_verify(world: tuple[Path, Path]) -> None:
    root, config = world
    assert cli("--config", str(config), "systemd", "install", "--root", str(root)).returncode == 0
    units = root / "etc/systemd/system"
    verify = subprocess.run(["systemd-analyze", "verify", "kkua-backupd.service", "kkua-backup@run.service",
                             "kkua-backup@retention.service", "kkua-postgres-backup.timer",
                             "kkua-redis-backup.timer", "kkua-backup-retention.timer"],
                            capture_output=True, text=True, check=False,
                            env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_invalid_schedule_is_refused_before_writing(world: tuple[Path, Path]) -> None:
    root, config = world
    config.write_text(config.read_text().replace('postgres = "daily"', 'postgres = "every day at two"'))
    before = tree(root)
    result = cli("--config", str(config), "systemd", "install", "--root", str(root))
    assert result.returncode == 2
    assert "schedule.postgres: invalid calendar expression 'every day at two'" in result.stdout + result.stderr
    assert tree(root) == before


@pytest.mark.skipif(SYSTEMD_RUNNING, reason="systemd runs here: the live commands would act on this machine")
@pytest.mark.parametrize("action", ["install", "status", "run", "uninstall"])
def test_live_commands_say_systemd_is_missing(world: tuple[Path, Path], action: str) -> None:
    _, config = world
    result = cli("--config", str(config), "systemd", action)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "systemd is not running as PID 1" in out or "systemctl is not installed" in out
    assert "cron install" in out


# ---- cron ----------------------------------------------------------------------------------------

def test_cron_block_replaced_and_removed_foreign_lines_kept(world: tuple[Path, Path]) -> None:
    root, config = world
    crontab = root / "etc/cron.d/kkua-backup"
    crontab.parent.mkdir(parents=True)
    foreign_top = "MAILTO=ops@example.com\n17 * * * * root /usr/local/bin/theirs\n"
    foreign_end = "# keep me\n"
    crontab.write_text(foreign_top + foreign_end)
    result = cli("--config", str(config), "cron", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    text = crontab.read_text()
    assert text.startswith(foreign_top + foreign_end) and text.count(BEGIN) == 1 and text.count(END) == 1
    assert stat.S_IMODE(crontab.stat().st_mode) == 0o644
    log = config.parent.parent / "logs" / "cron.log"
    assert (f"0 0 * * * kkua-backup sleep $(shuf -i 0-90 -n 1); KKUA_BACKUP_RUNNER=cron {BIN_DIR}/kkua-backup "
            f"--config {config} run postgres >>{log} 2>&1\n") in text
    assert "30 3 * * 1-5 kkua-backup " in text and "0 4 * * 0 kkua-backup " in text

    # The operator adds a line after the block; a reinstall with another schedule keeps it.
    crontab.write_text(text + "5 5 * * * root /usr/local/bin/after\n")
    config.write_text(config.read_text().replace('postgres = "daily"', 'postgres = "*-*-* 01:15:00"'))
    assert cli("--config", str(config), "cron", "install", "--root", str(root)).returncode == 0
    text = crontab.read_text()
    assert "15 1 * * * kkua-backup" in text and "0 0 * * * kkua-backup" not in text
    assert text.startswith(foreign_top + foreign_end) and text.endswith("5 5 * * * root /usr/local/bin/after\n")

    status = cli("--config", str(config), "--json", "cron", "status", "--root", str(root))
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["installed"] and BEGIN in doc["block"]
    assert doc["jobs"]["postgres"]["next_run"].endswith(("01:15:00+00:00", "01:15:00Z")) or \
        "T01:15:00" in doc["jobs"]["postgres"]["next_run"]

    assert cli("--config", str(config), "cron", "uninstall", "--root", str(root)).returncode == 0
    assert crontab.read_text() == foreign_top + foreign_end + "5 5 * * * root /usr/local/bin/after\n"


def test_cron_file_of_our_own_is_removed_with_the_block(world: tuple[Path, Path]) -> None:
    root, config = world
    assert cli("--config", str(config), "cron", "install", "--root", str(root)).returncode == 0
    assert (root / "etc/cron.d/kkua-backup").exists()
    result = cli("--config", str(config), "cron", "uninstall", "--root", str(root))
    assert result.returncode == 0
    assert not (root / "etc/cron.d/kkua-backup").exists()
    again = cli("--config", str(config), "cron", "uninstall", "--root", str(root))
    assert again.returncode == 0 and "Nothing to remove" in again.stdout


def test_cron_refuses_what_it_cannot_express(world: tuple[Path, Path]) -> None:
    root, config = world
    config.write_text(config.read_text().replace('retention = "Sun *-*-* 04:00:00"',
                                                 'retention = "*-*~01 04:00:00"'))
    result = cli("--config", str(config), "cron", "install", "--root", str(root))
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "cannot be written as a cron line" in out and "systemd timers" in out
    assert not (root / "etc/cron.d/kkua-backup").exists()


def test_cron_test_reports_each_job(world: tuple[Path, Path], tmp_path: Path) -> None:
    root, config = world
    # Nothing listens on port 1: both backups fail quickly; retention of an empty folder works.
    config.write_text(config.read_text() + '\n[postgres]\nport = 1\nconnect_timeout = 2\n'
                                           '\n[redis]\nport = 1\nconnect_timeout = 2\n')
    result = cli("--config", str(config), "--json", "cron", "test", "--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert set(doc["jobs"]) == {"postgres", "redis", "retention"}
    postgres = doc["jobs"]["postgres"]
    assert postgres["ok"] is False and "run postgres exited with status 1" in postgres["error"]
    assert any("cannot reach PostgreSQL at localhost:1" in line for line in doc["jobs"]["postgres"]["output"])
    assert doc["jobs"]["redis"]["ok"] is False
    assert any("cannot reach Redis at localhost:1" in line for line in doc["jobs"]["redis"]["output"])
    assert doc["jobs"]["retention"]["ok"] is True  # an empty backup folder: nothing to delete


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A system user made for this test and removed afterwards (its crontab with it): the test never
    touches the crontab of a real user, root's included, even when it is killed midway."""
    name = f"kkua-cron-{os.getpid()}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a throwaway user here (needs root): {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["crontab", "-u", name, "-r"], capture_output=True, check=False)
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.mark.skipif(shutil.which("crontab") is None, reason="crontab is not installed (apt-get install cron)")
def test_user_crontab(world: tuple[Path, Path], throwaway_user: str) -> None:
    _, config = world
    readable = Path(tempfile.mkdtemp(prefix="kkua-cron-"))  # pytest's tmp_path is root's alone
    try:
        readable.chmod(0o755)
        shutil.copy(config, readable / "config.toml")
        (readable / "config.toml").chmod(0o644)

        def as_user(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", throwaway_user, "--", *args], input=stdin, capture_output=True,
                                  text=True, timeout=120, check=False, cwd="/",
                                  env={k: v for k, v in os.environ.items() if k != "KKUA_BACKUP_CONFIG"})

        def crontab() -> str:
            return as_user("crontab", "-l").stdout

        assert as_user("crontab", "-", stdin="# mine\n").returncode == 0
        installed = as_user(sys.executable, "-m", "kkua_backupd", "--config", str(readable / "config.toml"), "cron",
                            "install", "--user")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        text = crontab()
        assert text.startswith("# mine\n") and BEGIN in text and " kkua-backup " not in text.split(BEGIN)[1]
        removed = as_user(sys.executable, "-m", "kkua_backupd", "--config", str(readable / "config.toml"), "cron",
                          "uninstall", "--user")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert crontab() == "# mine\n"
    finally:
        shutil.rmtree(readable, ignore_errors=True)


def test_uninstall_removes_nothing_the_record_cannot_have_written(world: tuple[Path, Path]) -> None:
    root, config = world
    assert cli("--config", str(config), "systemd", "install", "--root", str(root)).returncode == 0
    record_path = root / "var/lib/kkua-backup/install.json"
    record = json.loads(record_path.read_text())
    record["files"] += ["etc/systemd/system/other.service", "../outside"]
    record["dirs"] += ["etc/tmpfiles.d"]
    record_path.write_text(json.dumps(record))
    (root.parent / "outside").write_text("precious\n")
    result = cli("--config", str(config), "systemd", "uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "names paths install never writes; left alone" in result.stdout + result.stderr
    assert (root / "etc/systemd/system/other.service").exists()
    assert (root.parent / "outside").read_text() == "precious\n"
    assert (root / "etc/tmpfiles.d/other.conf").exists()
    assert not (root / "etc/systemd/system/kkua-backupd.service").exists()
