"""What both installers share: where things go, the schedules, where this installation is and what the
hardening would hide from it, the install record, and the running system (systemctl, root).

`--root DIR` installs into DIR instead of / (tests, image builds): paths are then DIR/etc/..., and every
command that would act on the running system (systemctl, systemd-sysusers, systemd-tmpfiles, chown,
crontab, runuser) is skipped and reported as skipped. With the root at /, they all run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import json
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kkua_backupd import __version__, schedule
from kkua_backupd.config import DEFAULT_CONFIG_PATH, Config, resolve_config_path
from kkua_backupd.core.context import JobContext
from kkua_backupd.core.health import CheckResult
from kkua_backupd.errors import KkuaError, UsageError
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.proc import execute
from kkua_backupd.sources import JOBS
from kkua_backupd.stream.pipeline import write_atomic

USER = "kkua-backup"
TIMERS = {"postgres": "kkua-postgres-backup.timer", "redis": "kkua-redis-backup.timer",
          "retention": "kkua-backup-retention.timer"}
TEMPLATE = "kkua-backup@.service"
DAEMON = "kkua-backupd.service"
FAILURE_UNIT = "kkua-backup-failure@.service"  # what OnFailure= starts: kkua-backup notify-failure UNIT
RUN_UNIT = "kkua-backup@run.service"
DOCS = "https://github.com/kkua/kkua-backupd/blob/main/docs/install.md"
DEFAULT_BIN_DIR = Path("/opt/kkua-backupd/bin")
# Where install puts things, relative to the root (/ normally; --root DIR in tests).
UNIT_DIR = Path("etc/systemd/system")
SYSUSERS_FILE = Path("etc/sysusers.d/kkua-backup.conf")
TMPFILES_FILE = Path("etc/tmpfiles.d/kkua-backup.conf")
CONFIG_FILE = Path(str(DEFAULT_CONFIG_PATH).lstrip("/"))
RECORD_FILE = Path("var/lib/kkua-backup/install.json")
CRON_FILE = Path("etc/cron.d/kkua-backup")
# What the services' sandbox hides from them, and the unit setting that does it: ProtectHome=yes the home
# folders; PrivateTmp=yes gives them an empty /tmp and /var/tmp of their own (a config there is not seen).
HIDDEN_PREFIXES = {Path("/home"): "ProtectHome=yes", Path("/root"): "ProtectHome=yes",
                   Path("/run/user"): "ProtectHome=yes", Path("/tmp"): "PrivateTmp=yes",  # noqa: S108 - names it, writes nothing
                   Path("/var/tmp"): "PrivateTmp=yes"}  # noqa: S108 - names it, writes nothing
UNIT_MODE = 0o644
SYSTEMCTL_TIMEOUT = 120.0
# Where systemd keeps the last trigger of Persistent=true timers.
STAMP_DIR = Path("/var/lib/systemd/timers")
# Beyond stop_grace, how long systemd waits before SIGKILL: the worker's own children get their grace
# inside that of the worker, and the daemon needs a moment to record the stop.
STOP_MARGIN = 30


# ----------------------------------------------------------------------------------------------------
# Schedules: validated and normalized by kkua_backupd.schedule, which follows systemd's own code.


def normalize_schedule(job: str, expr: str, timezone: str | None) -> str:
    """systemd's normalized form of `expr`, with [schedule] timezone appended when it has no zone of its
    own (what the timer must say to fire when the daemon would); raises UsageError naming the key."""
    try:
        return schedule.normalized(schedule.for_systemd(expr, timezone))
    except ValueError as exc:
        raise UsageError(f"schedule.{job}: {exc}") from None


def next_runs(expr: str, timezone: str | None, count: int = 1) -> list[str]:
    """The next `count` elapses of `expr` (ISO 8601 with UTC offset); empty when it never elapses again."""
    try:
        found = schedule.next_elapses(expr, dt.datetime.now(dt.UTC), count, timezone)
    except ValueError:
        return []
    return [t.isoformat() for t in found]


def _schedules(config: Config) -> dict[str, str]:
    return {job: normalize_schedule(job, getattr(config.schedule, job), config.schedule.timezone) for job in JOBS}


# ----------------------------------------------------------------------------------------------------
# Where this installation is, and what the hardening would hide from it.


@dataclass(frozen=True)
class Installation:
    """The executables install points the units at, and the config path to bake in (when explicit)."""

    bin_dir: Path
    config_path: Path | None

    @classmethod
    def current(cls, args: argparse.Namespace) -> Installation:
        """This installation: `kkua-backup` and `kkua-backupd` next to sys.executable; raises UsageError."""
        bin_dir = Path(sys.executable).parent.absolute()
        for program in ("kkua-backup", "kkua-backupd"):
            if not os.access(bin_dir / program, os.X_OK):
                raise UsageError(f"{program} is not installed in {bin_dir} (next to {sys.executable})",
                                 hint="install with pip into a virtual environment "
                                      "(python3 -m venv /opt/kkua-backupd; see docs/install.md) and run its "
                                      "bin/kkua-backup")
        path, explicit = resolve_config_path(getattr(args, "config", None), os.environ)
        return cls(bin_dir=bin_dir, config_path=path.absolute() if explicit else None)


def _interpreter(script: Path) -> Path | None:
    try:
        with script.open("rb") as fh:
            first = fh.readline(4096).decode("utf-8", "replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    return Path(words[0]) if words else None


def _hidden(path: Path) -> Path | None:
    """The folder of HIDDEN_PREFIXES that `path` is under, or None."""
    return next((prefix for prefix in HIDDEN_PREFIXES if path.is_relative_to(prefix)), None)


def _readable_by(path: Path, user: str) -> bool:
    """Whether `user` could read `path` (search every folder, read the file), by the mode bits alone."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        uid, gids = -1, set[int]()
    else:
        uid = entry.pw_uid
        gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    try:
        chain = [*reversed(path.parents), path]
        for i, part in enumerate(chain):
            st = part.stat()
            need = (stat.S_IRUSR if i == len(chain) - 1 and not stat.S_ISDIR(st.st_mode) else stat.S_IXUSR)
            if st.st_uid == uid:
                ok = bool(st.st_mode & need)
            elif st.st_gid in gids:
                ok = bool(st.st_mode & (need >> 3))
            else:
                ok = bool(st.st_mode & (need >> 6))
            if not ok:
                return False
    except OSError:
        return False
    return True


def hardening_warnings(config: Config, install: Installation, *, check_access: bool) -> list[str]:
    """What the services could not reach: paths under /home, /root or /run/user (ProtectHome=) or /tmp and
    /var/tmp (PrivateTmp=), and,
    with `check_access`, files the kkua-backup user cannot read."""
    program = install.bin_dir / "kkua-backup"
    needed: list[tuple[str, Path]] = [("the program", program), ("the program (resolved)", program.resolve())]
    interpreter = _interpreter(program)
    if interpreter is not None:
        needed += [("its Python", interpreter), ("its Python (resolved)", interpreter.resolve())]
    needed.append(("the kkua_backupd package", Path(__file__).resolve().parent))  # an editable install's source
    software = len(needed)
    if install.config_path is not None:
        needed.append(("the config", install.config_path))
    for what, path in (("env_file", config.env_file), ("postgres.password_file", config.postgres.password_file),
                       ("redis.password_file", config.redis.password_file), ("backup_dir", config.backup_dir),
                       ("log_dir", config.log_dir)):
        if path is not None:
            needed.append((what, path))
    warnings: list[str] = []
    seen: set[Path] = set()
    for index, (what, path) in enumerate(needed):
        if path in seen:
            continue
        seen.add(path)
        hidden = _hidden(path)
        if hidden is not None:
            fix = ("install into /opt from the system Python (/usr/bin/python3 -m venv /opt/kkua-backupd)"
                   if index < software else
                   "move it (files to /etc/kkua-backup, folders under /var) and change the config")
            warnings.append(f"{what} {path} is under {hidden}, which the services cannot see "
                            f"({HIDDEN_PREFIXES[hidden]}); {fix}")
        elif check_access and what not in ("backup_dir", "log_dir") and path.exists() \
                and not _readable_by(path, USER):
            warnings.append(f"{what} {path} is not readable by the {USER} user; the services will fail to "
                            f"start; fix the owner or mode (e.g. chgrp {USER} and chmod g+r, folders g+x)")
    return warnings


# ----------------------------------------------------------------------------------------------------
# The install record: what install created, so that uninstall removes exactly that.


@dataclass
class Record:
    """Files and folders install created, the units it enabled, and the mode chosen."""

    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    mode: str = "timers"

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The record at `path`, None when there is none; raises KkuaError when it is unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KkuaError(f"install record {path} cannot be read: {exc}",
                            hint="remove the kkua-backup units by hand (docs/install.md lists them)") from None
        return cls(files=list(data.get("files", [])), dirs=list(data.get("dirs", [])),
                   enabled=list(data.get("enabled", [])), mode=str(data.get("mode", "timers")))

    def save(self, path: Path) -> None:
        """Write the record atomically (0640)."""
        doc = {"version": __version__, "written_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "mode": self.mode, "files": sorted(set(self.files)), "dirs": sorted(set(self.dirs)),
               "enabled": sorted(set(self.enabled))}
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def _make_dirs(root: Path, folder: Path, record: Record, mode: int = 0o755) -> None:
    """Create `folder` (relative to root) and its missing parents with `mode`, noting each one created."""
    missing = [p for p in [*reversed(folder.parents), folder] if p != Path(".") and not (root / p).exists()]
    for part in missing:
        (root / part).mkdir(mode=mode)
        record.dirs.append(str(part))


def _write(root: Path, rel: Path, text: str, record: Record, mode: int = UNIT_MODE) -> bool:
    """Write one file atomically; returns whether it changed."""
    path = root / rel
    _make_dirs(root, rel.parent, record)
    try:
        changed = path.read_text(encoding="utf-8") != text
    except OSError:
        changed = True
    if changed:
        write_atomic(path, text.encode(), mode)
    os.chmod(path, mode)  # write_atomic keeps the umask-free mode; an existing file may have had another
    if str(rel) not in record.files:
        record.files.append(str(rel))
    return changed


# ----------------------------------------------------------------------------------------------------
# The running system.


@dataclass(frozen=True)
class Target:
    """Where to install: `root` (/ unless --root), and whether to act on the running system."""

    root: Path

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Target:
        root = Path(getattr(args, "root", None) or "/").absolute()
        return cls(root=root)


def _run(argv: Sequence[str], *, timeout: float = SYSTEMCTL_TIMEOUT, input_bytes: bytes | None = None) -> str:
    # SYSTEMD_LOG_LEVEL: systemd's tools report what they created on stderr, which would reach our log
    # as warnings; only their real warnings and errors should.
    return execute.run(argv, job="install", timeout=timeout, input_bytes=input_bytes,
                       env={"SYSTEMD_LOG_LEVEL": "warning"}, what=" ".join(argv[:3])).decode("utf-8", "replace")


def require_systemd() -> None:
    """Raise KkuaError (exit 1) unless systemctl exists and systemd runs as PID 1."""
    if shutil.which("systemctl") is None:
        raise KkuaError("systemctl is not installed on this machine",
                        hint="use `kkua-backup cron install`, or run kkua-backupd under your own supervisor")
    if not Path("/run/systemd/system").is_dir():
        raise KkuaError("systemd is not running as PID 1 here (no /run/systemd/system; a container?)",
                        hint="use `kkua-backup cron install`, run kkua-backupd under your own supervisor, or "
                             "pass --root DIR to only write the files")


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} must run as root (it writes under /etc and runs systemctl)",
                         hint="run it with sudo")


def _show(unit: str, props: Sequence[str]) -> dict[str, str]:
    out = _run(("systemctl", "show", unit, "-p", ",".join(props)), timeout=30)
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def _systemctl(*args: str) -> None:
    _run(("systemctl", "--quiet", *args))


def _say(ctx: JobContext, text: str) -> None:
    if not ctx.json_mode:
        sys.stdout.write(text + "\n")


def _check_paths(config: Config) -> None:
    for what, path in (("backup_dir", config.backup_dir), ("log_dir", config.log_dir),
                       ("daemon.state_file", config.state_file)):
        if not path.is_absolute():
            raise UsageError(f"{what} {path} is not an absolute path; the units need one",
                             hint="write it as an absolute path in the config")
        if any(c.isspace() for c in str(path)):
            raise UsageError(f"{what} {path!r} contains white space, which tmpfiles.d cannot express",
                             hint="choose a path without spaces")


def _log() -> Any:
    return get_logger(job="install")



def check_installed(config: Config) -> list[CheckResult]:
    """For `kkua-backup check`: the timers or the daemon are installed and enabled (or the cron block)."""
    fix = "kkua-backup systemd install (or --daemon; or kkua-backup cron install without systemd)"
    cron = Path("/") / CRON_FILE
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        if cron.is_file():
            return [CheckResult("installed", "OK", f"cron entries in {cron} (no systemd here)")]
        return [CheckResult("installed", "WARN", "no systemd here and no cron entries: nothing runs the jobs "
                                                 "unless kkua-backupd runs under another supervisor", fix)]
    units = [DAEMON, *(TIMERS[job] for job in JOBS)]
    try:
        states = {unit: _show(unit, ("UnitFileState", "ActiveState")) for unit in units}
    except KkuaError as exc:
        return [CheckResult("installed", "UNKNOWN", f"systemctl show failed: {exc.message}")]
    enabled = {unit for unit, props in states.items() if props.get("UnitFileState") == "enabled"}
    timers = [TIMERS[job] for job in JOBS]
    if DAEMON in enabled:
        active = states[DAEMON].get("ActiveState")
        return [CheckResult("installed", "OK" if active == "active" else "FAIL",
                            f"{DAEMON} is enabled and {active}",
                            None if active == "active" else f"systemctl start {DAEMON}; see journalctl -u {DAEMON}")]
    missing = [t for t in timers if t not in enabled]
    if not missing:
        return [CheckResult("installed", "OK", f"timers enabled: {', '.join(timers)}")]
    if cron.is_file():
        return [CheckResult("installed", "OK", f"cron entries in {cron}")]
    return [CheckResult("installed", "WARN", f"not enabled: {', '.join(missing)}; nothing runs those jobs", fix)]
