"""The Debian package, for real: built by packaging/deb/build.sh, installed with `apt-get install ./….deb`
into a fresh Debian 12 (debootstrap, cached) booted with systemd, configured, run, upgraded to a rebuilt
package of another version, removed and purged. The container shares the machine's network, so the jobs
inside reach this session's throwaway PostgreSQL and Redis on 127.0.0.1 (nothing else of the machine is
visible to it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd import __version__
from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data
from kkua_backupd.sources.redis.local import LocalRedis

from ..conftest import REDIS_TEST_PASSWORD
from ..support.debian_root import bookworm_root
from ..support.wheels import BuildUnavailable
from .conftest import REPO, CannotBoot, Container, boot_container, skip_or_fail

pytestmark = pytest.mark.system

UNITS = ("kkua-backupd.service", "kkua-postgres-backup.timer", "kkua-redis-backup.timer",
         "kkua-backup-retention.timer")
TIMERS = UNITS[1:]
CONFIG = "/etc/kkua-backup/config.toml"
BACKUPS = "/var/backups/kkua"
OLD, NEW = f"{__version__}-1", f"{__version__}-2"


def build_debs(out: Path) -> dict[str, Path]:
    """Two packages of this tree, versions OLD and NEW, from one set of wheels (packaging/wheels.sh)."""
    wheels = out / "wheels"
    subprocess.run([str(REPO / "packaging" / "wheels.sh"), str(wheels)], check=True, capture_output=True,
                   timeout=900)
    debs = {}
    for version in (OLD, NEW):
        result = subprocess.run([str(REPO / "packaging" / "deb" / "build.sh"), str(out)], capture_output=True,
                                text=True, timeout=900, check=False,
                                env={**os.environ, "KKUA_WHEELS": str(wheels), "KKUA_DEB_VERSION": version})
        assert result.returncode == 0, result.stderr[-3000:]
        debs[version] = Path(result.stdout.strip().splitlines()[-1])
    return debs


@pytest.fixture(scope="module")
def debs() -> Iterator[dict[str, Path]]:
    if shutil.which("dpkg-deb") is None or shutil.which("fakeroot") is None:
        skip_or_fail("building the .deb needs dpkg-deb and fakeroot (scripts/setup.sh installs them)")
    with tempfile.TemporaryDirectory(prefix="kkua-deb-") as tmp:
        yield build_debs(Path(tmp))


@pytest.fixture(scope="module")
def fresh_debian() -> Iterator[Container]:
    """A Debian 12 booted with systemd: an overlay of the cached debootstrap root, the machine's network."""
    if os.geteuid() != 0:
        skip_or_fail("the package test boots a container with systemd-nspawn and needs root")
    try:
        lower = bookworm_root("systemd")
    except BuildUnavailable as exc:
        skip_or_fail(f"no Debian 12 root to boot: {exc}")
    try:
        container = boot_container(f"kkua-deb-{os.getpid()}", lower=lower, private_network=False)
        container.wait_booted()
    except CannotBoot as exc:
        skip_or_fail(f"cannot boot a container here: {exc}")
    try:
        yield container
    finally:
        container.shutdown()


def apt(c: Container, *args: str) -> str:
    result = c.run("apt-get", "-y", "-q", *args, env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    return result.stdout + result.stderr


def enabled(c: Container, unit: str) -> str:
    return c.run("systemctl", "is-enabled", unit, check=False).stdout.strip()


def active(c: Container, unit: str) -> str:
    return c.run("systemctl", "is-active", unit, check=False).stdout.strip()


def backup_files(c: Container) -> dict[str, str]:
    """sha256 of every file of the backup sets (names relative to the backup folder; the .state folder, which
    each run updates, is left out)."""
    out = c.run("sh", "-c", f"cd {BACKUPS} && find postgres redis -type f -print0 | xargs -0 -r sha256sum").stdout
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in out.splitlines())}


def test_install_run_upgrade_remove_purge(debs: dict[str, Path], fresh_debian: Container,
                                          pg_server: ThrowawayPostgres, tmp_path: Path) -> None:
    c = fresh_debian
    c.put(debs[OLD].parent, "/var/lib/kkua-test/debs")
    old_deb, new_deb = (f"/var/lib/kkua-test/debs/{debs[v].name}" for v in (OLD, NEW))

    # Install: from the file alone (the root has the dependencies; there is no package list to fetch from).
    apt(c, "install", old_deb)
    assert c.run("dpkg-query", "-W", "-f=${Version}", "kkua-backupd").stdout == OLD
    assert c.run("sh", "-c", "command -v kkua-backup; command -v kkua-backupd").stdout.split() == [
        "/usr/bin/kkua-backup", "/usr/bin/kkua-backupd"]
    assert __version__ in c.run("kkua-backup", "--version").stdout
    for unit in UNITS:  # installed, neither enabled nor started
        assert c.run("test", "-f", f"/lib/systemd/system/{unit}", check=False).returncode == 0, unit
        assert enabled(c, unit) == "disabled", unit
        assert active(c, unit) == "inactive", unit
    assert c.run("stat", "-c", "%U:%G %a", CONFIG).stdout.strip() == "root:kkua-backup 640"
    for folder in (BACKUPS, f"{BACKUPS}/postgres", f"{BACKUPS}/redis", "/var/log/kkua-backup"):
        assert c.run("stat", "-c", "%U:%G %a", folder).stdout.strip() == "kkua-backup:kkua-backup 750", folder
    assert c.run("getent", "passwd", "kkua-backup").stdout.split(":")[-1].strip() == "/usr/sbin/nologin"
    # Nothing the installed Python packages need comes from outside: the venv's own imports work.
    c.run("/opt/kkua-backupd/bin/python", "-c", "import psycopg, pydantic, zstandard, isal, redis, anycrc")

    # Configure, as docs/install.md says: password files and the conffile, then every job now.
    database = "kkua_deb"
    pg_server.create_database(database)
    with pg_server.connect(database) as conn:
        create_sample_data(conn)
    with LocalRedis(tmp_path / "redis", password=REDIS_TEST_PASSWORD) as redis_server:
        redis_server.client(0).set("session:1", "김철수")
        c.write("/etc/kkua-backup/pg.pass", pg_server.password + "\n", mode="0640", owner="root:kkua-backup")
        c.write("/etc/kkua-backup/redis.pass", REDIS_TEST_PASSWORD + "\n", mode="0640", owner="root:kkua-backup")
        config = c.run("cat", CONFIG).stdout
        config = (config.replace('database = "kkua"', f'database = "{database}"')
                  .replace("port = 5432", f"port = {pg_server.port}")
                  .replace("port = 6379", f"port = {redis_server.port}")
                  .replace('host = "localhost"', 'host = "127.0.0.1"'))
        config += "# edited by the operator\n"
        c.write(CONFIG, config, mode="0640", owner="root:kkua-backup")
        c.run("kkua-backup", "config", "check")
        c.run("systemctl", "start", "kkua-backup@run", timeout=300)
        sets = json.loads(c.run("runuser", "-u", "kkua-backup", "--", "kkua-backup", "list", "--json").stdout)
        assert {s["kind"] for s in sets if s["status"] == "ok"} == {"postgres", "redis"}, sets

        c.run("systemctl", "enable", "--now", *TIMERS)
        before = backup_files(c)

        # Upgrade to a rebuilt package: the edited config is kept, the timers stay enabled and active, jobs run.
        apt(c, "install", new_deb)
        assert c.run("dpkg-query", "-W", "-f=${Version}", "kkua-backupd").stdout == NEW
        assert c.run("cat", CONFIG).stdout == config
        assert c.run("stat", "-c", "%U:%G %a", CONFIG).stdout.strip() == "root:kkua-backup 640"
        for timer in TIMERS:
            assert (enabled(c, timer), active(c, timer)) == ("enabled", "active"), timer
        assert enabled(c, "kkua-backupd.service") == "disabled"
        c.run("systemctl", "start", "kkua-backup@redis", timeout=300)
        after_upgrade = backup_files(c)
        assert set(before) < set(after_upgrade)
        assert all(after_upgrade[name] == digest for name, digest in before.items())

    # Remove: the program and units go, the timers stop; the config and every backup stay.
    apt(c, "remove", "kkua-backupd")
    for path in ("/usr/bin/kkua-backup", "/opt/kkua-backupd", "/lib/systemd/system/kkua-backupd.service"):
        assert c.run("test", "-e", path, check=False).returncode != 0, path
    for timer in TIMERS:
        assert active(c, timer) == "inactive", timer
    assert c.run("cat", CONFIG).stdout == config
    assert backup_files(c) == after_upgrade

    # Purge: the config, the logs and the enable links go; the backups, their folder and the user stay.
    apt(c, "purge", "kkua-backupd")
    assert c.run("dpkg-query", "-W", "-f=${Status}", "kkua-backupd", check=False).stdout.strip() in (
        "", "unknown ok not-installed")
    for path in (CONFIG, "/var/log/kkua-backup"):
        assert c.run("test", "-e", path, check=False).returncode != 0, path
    links = c.run("sh", "-c", "ls /etc/systemd/system/*.wants/ 2>/dev/null | grep kkua || true").stdout
    assert links == ""
    assert backup_files(c) == after_upgrade
    assert c.run("stat", "-c", "%U:%G %a", BACKUPS).stdout.strip() == "kkua-backup:kkua-backup 750"
    # The password files are the operator's, not the package's: purge leaves them (docs/install.md).
    assert c.run("test", "-f", "/etc/kkua-backup/pg.pass", check=False).returncode == 0


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed (scripts/setup.sh installs it)")
def test_lintian_is_clean_but_for_the_explained_overrides(debs: dict[str, Path]) -> None:
    """lintian reports nothing, and every tag it overrides is one packaging/deb/lintian-overrides explains."""
    result = subprocess.run(["lintian", "--tag-display-limit", "0", str(debs[NEW])], capture_output=True,
                            text=True, timeout=600, check=False)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:")]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr
    overridden = subprocess.run(["lintian", "--tag-display-limit", "0", "--show-overrides", str(debs[NEW])],
                                capture_output=True, text=True, timeout=600, check=False).stdout
    explained = (REPO / "packaging" / "deb" / "lintian-overrides").read_text()
    for line in overridden.splitlines():
        if line.startswith("O: "):
            tag = line.split()[2]
            assert f"kkua-backupd: {tag} " in explained, line
