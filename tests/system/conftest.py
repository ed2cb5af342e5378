"""The system tier's world: a real systemd booted in a container, with this working tree installed in it.

How (DESIGN.md, "Tests, in three tiers"): the machine's own root is mounted as the lower layer of an
overlay (upper and work dirs in a temp dir on a real filesystem), and systemd-nspawn boots it with a
private network; commands run inside through `nsenter -t PID1 -a`. The container therefore has its own
copy of everything installed here (the PostgreSQL 15 cluster, Redis), and nothing written inside reaches
the machine. The project goes into /opt/kkua-backupd as operators install it (docs/install.md): a venv
made from the system Python, filled from wheels built on the host, since the container has no network.

The whole tier skips, saying why, when not root, when systemd-nspawn is missing, or when nspawn cannot
boot here; KKUA_REQUIRE_SYSTEM_TESTS=1 turns those skips into failures (for CI where it must work).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from ..conftest import REDIS_TEST_PASSWORD, _toml

log = logging.getLogger(__name__)
T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV = "/opt/kkua-backupd"
KKUA = f"{VENV}/bin/kkua-backup"
CONFIG = "/etc/kkua-backup/config.toml"
BACKUP_DIR = "/var/backups/kkua"
LOG_DIR = "/var/log/kkua-backup"
PG_PASS_FILE = "/etc/kkua-backup/pg.pass"
REDIS_PASS_FILE = "/etc/kkua-backup/redis.pass"
PG_TEST_PASSWORD = "pg-Pass-in-the-container"  # the container's own copy of the cluster; nothing else
STAGING = "/var/lib/kkua-test"  # inside: wheels and the packaging files, outside every system config dir
BOOT_TIMEOUT = 120.0
REQUIRE_ENV = "KKUA_REQUIRE_SYSTEM_TESTS"
WHEEL_CACHE_ENV = "KKUA_SYSTEM_WHEELS"

# The config every test starts from; a test rewrites sections with KkuaSystem.write_config(...).
BASE_CONFIG: dict[str, Any] = {
    "backup_dir": BACKUP_DIR,
    "log_dir": LOG_DIR,
    "postgres": {"host": "127.0.0.1", "port": 5432, "database": "kkua", "user": "postgres",
                 "password_file": PG_PASS_FILE},
    "redis": {"host": "127.0.0.1", "port": 6379, "password_file": REDIS_PASS_FILE},
    # No random delay, so timers and the daemon show the exact times of the schedules.
    "schedule": {"randomized_delay": 0},
    "daemon": {"job_timeout": 300, "retries": 0, "retry_backoff": 1, "stop_grace": 5},
}


class CannotBoot(Exception):
    """This machine cannot boot a container (not allowed, no overlay, nspawn refused)."""


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with `reason`, or fail when KKUA_REQUIRE_SYSTEM_TESTS=1 says the tier must run here."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires the system tests)")
    pytest.skip(reason)


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               describe: Callable[[], str] | None = None, interval: float = 0.25) -> T:
    """Poll `check` until it returns something truthy, and return that; raises AssertionError naming
    `what` (and the last state, from `describe`) when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f"; last state: {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{state}")
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (read from /proc; field 4 of stat, after the parenthesised name)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class Container:
    """One booted container: overlay of `lower` (the machine's own / unless told) at `root`, systemd-nspawn
    (with a network of its own unless `private_network` is off: then 127.0.0.1 is the machine's), and
    commands run inside with nsenter."""

    def __init__(self, base: Path, name: str, lower: Path = Path("/"), private_network: bool = True) -> None:
        self.base = base
        self.name = name
        self.lower = lower
        self.private_network = private_network
        self.root = base / "root"
        self.log_path = base / "nspawn.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.nspawn_pid = 0
        self.pid = 0
        self.failed_units: list[str] = []
        self._closed = False

    def mount(self) -> None:
        """Mount the overlay (lowerdir=`lower`); raises CannotBoot with mount's message when it is refused."""
        upper, work = self.base / "upper", self.base / "work"
        for path in (upper, work, self.root):
            path.mkdir(mode=0o755)
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                 f"lowerdir={self.lower},upperdir={upper},workdir={work}", str(self.root)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise CannotBoot(f"cannot mount an overlay of {self.lower} with its upper dir in {self.base.parent}: "
                             f"{result.stderr.strip()}")

    def start(self) -> None:
        """Start systemd-nspawn in the background (output to nspawn.log); the boot goes on without us."""
        network = ["--private-network"] if self.private_network else []
        argv = ["systemd-nspawn", f"--directory={self.root}", "--register=no", "--keep-unit", *network,
                "--boot", f"--machine={self.name}", "--console=passive", "--", "systemd.firstboot=off"]
        with self.log_path.open("wb") as out:
            # A session of its own: a Ctrl-C at the terminal must reach pytest (which tears down), not nspawn.
            self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        self.nspawn_pid = self.nspawn.pid
        # Who owns this container, for reap_leftovers() in a later session should this one be killed.
        (self.base / "owner").write_text(f"{os.getpid()} {self.nspawn_pid}\n")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-5:])
        return ""

    def _find_init(self) -> int:
        """The container's PID 1 as seen from here: nspawn's child once it has become systemd."""
        for pid in _children(self.nspawn_pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
        return 0

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait until `systemctl is-system-running` says running or degraded, and return which; raises
        CannotBoot when nspawn exits, AssertionError when the boot does not finish in time."""
        assert self.nspawn is not None
        last = "no systemd yet"

        def booted() -> str | None:
            nonlocal last
            if self.nspawn is not None and self.nspawn.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited with status {self.nspawn.returncode} before the "
                                 f"container booted: {self._log_tail()}")
            self.pid = self.pid or self._find_init()
            if not self.pid:
                return None
            result = self.run("systemctl", "is-system-running", check=False, timeout=10)
            last = result.stdout.strip() or result.stderr.strip()
            return last if last in ("running", "degraded") else None

        state = wait_until(booted, timeout=timeout, what=f"systemd in container {self.name} to finish booting",
                           describe=lambda: f"{last}; jobs: "
                           + self.run("systemctl", "list-jobs", "--no-legend", check=False).stdout.strip()[:500],
                           interval=0.5)
        if state == "degraded":
            out = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
            self.failed_units = [line.split()[0] for line in out.splitlines() if line.strip()]
            log.warning("container %s booted degraded; failed units: %s", self.name, " ".join(self.failed_units))
        return state

    @staticmethod
    def _environ(extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of commands run inside: nothing of ours (our PATH names .venv), plus `extra`."""
        return {"PATH": PATH_INSIDE, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(extra or {})}

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the container as root (a clean environment plus `env`); with `check`, a
        non-zero exit raises AssertionError carrying the command's output."""
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], input=input or "",
                                capture_output=True, text=True, env=self._environ(env), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in container {self.name}: {' '.join(argv)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start `argv` inside the container as root without waiting (stdout is a pipe)."""
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-a", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._environ())

    def write(self, path: str, text: str, *, mode: str = "0644", owner: str = "root:root") -> None:
        """Write a file inside with this mode and owner (user:group names of the container)."""
        self.run("sh", "-euc", 'umask 077; cat > "$1"; chown "$3" "$1"; chmod "$2" "$1"', "sh", path, mode, owner,
                 input=text)

    def put(self, source: Path, inside: str) -> None:
        """Copy a host folder into the container (through the overlay, which the container sees at once)."""
        shutil.copytree(source, self.root / inside.lstrip("/"), dirs_exist_ok=True)

    def _nspawn_alive(self) -> bool:
        """Whether our nspawn still runs (checked by its command line, which names our folder)."""
        if self.nspawn is not None:
            return self.nspawn.poll() is None
        try:
            return str(self.root) in Path(f"/proc/{self.nspawn_pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False

    def _nspawn_gone(self, timeout: float) -> bool:
        if self.nspawn is not None:
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not self._nspawn_alive(), timeout=timeout, what="systemd-nspawn to exit")
        return not self._nspawn_alive()

    def shutdown(self) -> None:
        """Stop the container (SIGTERM to nspawn, again when it lingers, then SIGKILL), unmount, remove the
        temp dirs. Safe to call twice (the fixture's finally and atexit)."""
        if self._closed:
            return
        self._closed = True
        if self.nspawn_pid and self._nspawn_alive():
            self.pid = self.pid or self._find_init()
            # The first SIGTERM asks for a clean poweroff. Units slow to stop (redis-server here) can hold it
            # for many seconds; as everything inside is thrown away, the second step pulls the plug
            # (poweroff -ff: no unit is stopped) besides nspawn's second SIGTERM.
            for step, grace in enumerate((3.0, 10.0, 10.0)):
                if step == 1 and self.pid:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.run("systemctl", "poweroff", "--force", "--force", check=False, timeout=5)
                if step == 2 and self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)  # PID 1 of the container takes every process with it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.nspawn_pid, signal.SIGKILL if step == 2 else signal.SIGTERM)
                if self._nspawn_gone(grace):
                    break
        if os.path.ismount(self.root) and subprocess.run(["umount", str(self.root)],
                                                         capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True)
        if os.path.ismount(self.root):
            log.warning("%s is still mounted; leaving %s in place", self.root, self.base)
            return
        shutil.rmtree(self.base, ignore_errors=True)


def reap_leftovers(parent: Path) -> None:
    """Stop and remove the containers of earlier sessions that were killed before their teardown ran
    (their `owner` file names a pytest process that is gone), so that none keeps running unnoticed."""
    for base in parent.glob("kkua-system-*"):
        try:
            owner, nspawn_pid = (int(word) for word in (base / "owner").read_text().split())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{owner}").exists():
            continue  # its session still runs
        log.warning("removing the container left by killed session %d in %s", owner, base)
        leftover = Container(base, "leftover")
        leftover.nspawn_pid = nspawn_pid
        leftover.shutdown()


def _tmp_candidates() -> list[Path]:
    """Where the overlay's upper dir may go: it must be a real filesystem (not an overlay itself)."""
    found: list[Path] = []
    for text in (os.environ.get("KKUA_SYSTEM_TMP"), "/var/tmp", tempfile.gettempdir()):
        if text and Path(text).is_dir() and Path(text).resolve() not in found:
            found.append(Path(text).resolve())
    return found


def boot_container(name: str, lower: Path = Path("/"), private_network: bool = True) -> Container:
    """Mount an overlay of `lower` (/ unless told) in the first temp dir that allows it and start booting it
    (see Container); raises CannotBoot."""
    problems = []
    for parent in _tmp_candidates():
        reap_leftovers(parent)
        container = Container(Path(tempfile.mkdtemp(prefix="kkua-system-", dir=parent)), name, lower, private_network)
        try:
            container.mount()
        except CannotBoot as exc:
            problems.append(str(exc))
            container.shutdown()
            continue
        atexit.register(container.shutdown)
        try:
            container.start()
        except OSError as exc:
            container.shutdown()
            raise CannotBoot(f"cannot start systemd-nspawn: {exc}") from None
        return container
    raise CannotBoot("; ".join(problems) or "no temp dir to put the overlay in")


def _pip(python: str, *args: str) -> None:
    result = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"pip {' '.join(args)} failed with status {result.returncode}:\n"
                             f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def _source_copy(dest: Path) -> Path:
    """Copy the working tree (what git would see: tracked and new files, not ignored ones) so that building
    the wheel leaves nothing behind in it and sees exactly the files a checkout would have."""
    src = dest / "src"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        path = REPO / name
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


def build_wheelhouse(dest: Path) -> Path:
    """Wheels of this working tree and of its pinned runtime dependencies, in `dest/wheels`.

    The dependencies are resolved by the system Python that the container's venv is made from, not by
    .venv's: markers differ between patch releases (redis needs async-timeout before 3.11.3, and Debian 12
    has 3.11.2). They are built once per lock file and Python version and kept in /var/tmp/kkua-system-wheels
    (or $KKUA_SYSTEM_WHEELS); the project's own wheel is built fresh each session."""
    wheels = dest / "wheels"
    wheels.mkdir()
    src = _source_copy(dest)
    system_python = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version)"],
                                   capture_output=True, text=True, check=True).stdout
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256((REPO / "requirements.lock").read_bytes() + json.dumps(dependencies).encode()
                         + system_python.encode()).hexdigest()[:16]
    cache = Path(os.environ.get(WHEEL_CACHE_ENV, "/var/tmp/kkua-system-wheels")) / key
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache.parent))
        try:
            builder = building / "venv"
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(builder)], check=True, capture_output=True)
            _pip(str(builder / "bin" / "python"), "wheel", "--quiet", "--wheel-dir", str(building / "wheels"),
                 "-c", str(REPO / "requirements.lock"), str(src))
            for own in (building / "wheels").glob("kkua_backupd-*.whl"):
                own.unlink()
            (building / "wheels").rename(cache)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        for stale in cache.parent.iterdir():  # the wheels of earlier lock files are never used again
            if stale != cache and re.fullmatch(r"[0-9a-f]{16}", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    for wheel in cache.glob("*.whl"):
        shutil.copy2(wheel, wheels / wheel.name)
    _pip(sys.executable, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src))
    return wheels


class KkuaSystem:
    """The booted container with the project installed, its servers ready, and helpers for the tests."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.config: dict[str, Any] = json.loads(json.dumps(BASE_CONFIG))

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside as root (see Container.run)."""
        return self.container.run(*argv, check=check, timeout=timeout, input=input, env=env)

    def kkua(self, *args: str, user: str = "kkua-backup", check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the installed `kkua-backup ARGS` inside, as `user` (the service user unless told)."""
        prefix = ["runuser", "-u", user, "--"] if user != "root" else []
        return self.run(*prefix, KKUA, *args, check=check, timeout=timeout)

    def sets(self, kind: str) -> list[dict[str, Any]]:
        """The complete backup sets of `kind`, newest first (`kkua-backup list KIND --json`)."""
        found: list[dict[str, Any]] = json.loads(self.kkua("list", kind, "--json").stdout)
        return found

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` of a unit, as a dict."""
        args = [arg for prop in props for arg in ("-p", prop)]
        out = self.run("systemctl", "show", *args, unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *, since_cursor: str | None = None) -> list[dict[str, Any]]:
        """The journal entries of a unit (journalctl -o json), oldest first."""
        args = ["journalctl", "--no-pager", "-o", "json", "-u", unit]
        if since_cursor:
            args += ["--after-cursor", since_cursor]
        out = self.run(*args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_cursor(self) -> str:
        """The cursor of the newest journal entry, to read only what comes after it."""
        entries = self.run("journalctl", "--no-pager", "-o", "json", "-n", "1").stdout.splitlines()
        cursor: str = json.loads(entries[-1])["__CURSOR"] if entries else ""
        return cursor

    def render_config(self) -> str:
        """The current config as TOML."""
        lines = [f"{key} = {_toml(value)}" for key, value in self.config.items() if not isinstance(value, dict)]
        for section, keys in self.config.items():
            if isinstance(keys, dict):
                lines += ["", f"[{section}]"] + [f"{key} = {_toml(value)}" for key, value in keys.items()]
        return "\n".join(lines) + "\n"

    def write_config(self, **sections: dict[str, Any]) -> None:
        """Update these sections' keys and write /etc/kkua-backup/config.toml (root:kkua-backup 0640)."""
        for section, keys in sections.items():
            self.config.setdefault(section, {}).update(keys)
        self.container.write(CONFIG, self.render_config(), mode="0640", owner="root:kkua-backup")

    def now(self) -> float:
        """The container's clock (the same kernel clock as here, read inside to make that plain)."""
        return float(self.run("date", "+%s.%N").stdout.strip())


def _prepare(system: KkuaSystem, wheels: Path) -> None:
    """Install the project as docs/install.md says and get PostgreSQL and Redis ready for it."""
    c = system.container
    c.put(wheels, f"{STAGING}/wheels")
    c.put(REPO / "packaging", f"{STAGING}/packaging")
    # 2. The program: a venv from the system Python (not the host's .venv, which lives under /root).
    c.run("/usr/bin/python3", "-m", "venv", VENV, timeout=120)
    c.run(f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links", f"{STAGING}/wheels",
          "kkua-backupd", timeout=300)
    # 3. The user and folders, from the packaging files named on the command line (not copied into
    # /etc/*.d, so that `kkua-backup systemd install` later finds a machine without them).
    c.run("systemd-sysusers", f"{STAGING}/packaging/sysusers.d-kkua-backup.conf")
    c.run("systemd-tmpfiles", "--create", f"{STAGING}/packaging/tmpfiles.d-kkua-backup.conf")

    # PostgreSQL: the container's copy of the machine's cluster starts through crash recovery.
    wait_until(lambda: c.run("pg_isready", "-q", check=False).returncode == 0, timeout=60,
               what="PostgreSQL in the container to accept connections")

    def psql(sql: str, database: str = "postgres") -> str:
        return c.run("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                     "-d", database, input=sql).stdout

    psql("DROP DATABASE IF EXISTS kkua;\nCREATE DATABASE kkua;\n"
         f"ALTER ROLE postgres PASSWORD '{PG_TEST_PASSWORD}';\n")
    psql("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, note text);\n"
         "INSERT INTO items SELECT i, 'item ' || i, repeat('백업 ', i % 7) FROM generate_series(1, 5000) i;\n",
         database="kkua")
    # TCP connections must show the password, as on a server (the copy of this machine's cluster trusts them).
    hba = psql("SHOW hba_file;").strip()
    c.run("sed", "-i", r"s/^\(host\s\+all\s\+all\s\+\S\+\s\+\)trust\s*$/\1scram-sha-256/", hba)
    psql("SELECT pg_reload_conf();")
    check = c.run("psql", "-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "kkua", "-w", "-Atc", "SELECT 1",
                  check=False)
    assert check.returncode != 0, "PostgreSQL in the container still lets TCP clients in without a password"

    # Redis: the machine's redis-server.service, copied; a password like a production server.
    if c.run("systemctl", "is-active", "redis-server", check=False).stdout.strip() != "active":
        c.run("systemctl", "start", "redis-server")
    wait_until(lambda: c.run("redis-cli", "ping", check=False).stdout.strip() == "PONG", timeout=30,
               what="redis-server in the container to answer PING")
    c.run("redis-cli", "CONFIG", "SET", "requirepass", REDIS_TEST_PASSWORD)
    auth = {"REDISCLI_AUTH": REDIS_TEST_PASSWORD}
    c.run("redis-cli", "FLUSHALL", env=auth)
    for i in range(50):
        c.run("redis-cli", "SET", f"session:{i}", f"value {i}", env=auth)
    c.run("redis-cli", "HSET", "user:1", "name", "김철수", "plan", "pro", env=auth)

    # 4.-5. Secrets and config, readable by the service's group only.
    c.write(PG_PASS_FILE, PG_TEST_PASSWORD + "\n", mode="0640", owner="root:kkua-backup")
    c.write(REDIS_PASS_FILE, REDIS_TEST_PASSWORD + "\n", mode="0640", owner="root:kkua-backup")
    system.write_config()


@pytest.fixture(scope="session")
def kkua_system() -> Iterator[KkuaSystem]:
    """A booted container (one per session) with the project in /opt/kkua-backupd, the user and folders
    made, PostgreSQL (database `kkua`) and Redis ready with passwords, and /etc/kkua-backup/config.toml."""
    if os.geteuid() != 0:
        skip_or_fail("system tests boot a container with systemd-nspawn and need root")
    missing = [tool for tool in ("systemd-nspawn", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"system tests need {', '.join(missing)} (Debian package systemd-container; "
                     "scripts/setup.sh installs it)")
    started = time.monotonic()
    try:
        container = boot_container(f"kkua-test-{os.getpid()}")
    except CannotBoot as exc:
        skip_or_fail(f"cannot boot a container here: {exc}")
    try:
        # The wheels are built on the host while the container boots.
        with tempfile.TemporaryDirectory(prefix="kkua-wheels-") as tmp:
            wheels = build_wheelhouse(Path(tmp))
            try:
                state = container.wait_booted()
            except CannotBoot as exc:
                skip_or_fail(f"cannot boot a container here: {exc}")
            log.info("container %s %s after %.1f s", container.name, state, time.monotonic() - started)
            system = KkuaSystem(container)
            _prepare(system, wheels)
        log.info("container %s ready after %.1f s", container.name, time.monotonic() - started)
        yield system
    finally:
        container.shutdown()
