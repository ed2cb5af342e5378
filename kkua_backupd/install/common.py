"""`kkua-backup systemd ...` and `kkua-backup cron ...`: installing the units, timers or cron entries.

Everything written is rendered here, from the config and from where this installation actually is
(ExecStart= names the `kkua-backup` / `kkua-backupd` next to the running Python), by pure functions
(`render_*`, `oncalendar_to_cron`, `replace_block`) that the tests call directly. The files in the
source tree's systemd/ and packaging/ are these renderings for the default config and
/opt/kkua-backupd/bin (a unit test keeps them equal).

`--root DIR` installs into DIR instead of / (tests, image builds): paths are then DIR/etc/..., and every
command that would act on the running system (systemctl, systemd-sysusers, systemd-tmpfiles, chown,
crontab, runuser) is skipped and reported as skipped. With the root at /, they all run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kkua_backupd import __version__, schedule
from kkua_backupd.config import DEFAULT_CONFIG_PATH, Config, LoadedConfig, resolve_config_path
from kkua_backupd.core import state
from kkua_backupd.core.context import JobContext
from kkua_backupd.errors import CommandFailed, KkuaError, UsageError
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.proc import execute
from kkua_backupd.stream.pipeline import write_atomic

USER = "kkua-backup"
JOBS = ("postgres", "redis", "retention")
TIMERS = {"postgres": "kkua-postgres-backup.timer", "redis": "kkua-redis-backup.timer",
          "retention": "kkua-backup-retention.timer"}
TEMPLATE = "kkua-backup@.service"
DAEMON = "kkua-backupd.service"
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
# ProtectHome=yes hides these from the services.
HIDDEN_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))
UNIT_MODE = 0o644
SYSTEMCTL_TIMEOUT = 120.0
# Where systemd keeps the last trigger of Persistent=true timers.
STAMP_DIR = Path("/var/lib/systemd/timers")
# Beyond stop_grace, how long systemd waits before SIGKILL: the worker's own children get their grace
# inside that of the worker, and the daemon needs a moment to record the stop.
STOP_MARGIN = 30


# ----------------------------------------------------------------------------------------------------
# What gets rendered: pure functions of the config and the installation's paths.


@dataclass(frozen=True)
class UnitParams:
    """Everything the unit files depend on."""

    bin_dir: Path = DEFAULT_BIN_DIR
    config_path: Path | None = None  # baked into ExecStart= as --config when given explicitly
    backup_dir: Path = Path("/var/backups/kkua")
    log_dir: Path = Path("/var/log/kkua-backup")
    state_dir: Path = Path("/var/backups/kkua/.state")
    job_timeout: int = 6 * 3600
    stop_grace: int = 30
    schedules: dict[str, str] = field(default_factory=lambda: {
        "postgres": "*-*-* 02:00:00", "redis": "*-*-* 03:00:00", "retention": "Sun *-*-* 04:00:00"})
    randomized_delay: int = 0
    persistent: bool = True

    @classmethod
    def from_config(cls, config: Config, bin_dir: Path, config_path: Path | None,
                    schedules: dict[str, str]) -> UnitParams:
        """The parameters for `config`, with already normalized `schedules` (job -> OnCalendar)."""
        return cls(bin_dir=bin_dir, config_path=config_path, backup_dir=config.backup_dir, log_dir=config.log_dir,
                   state_dir=config.state_file.parent, job_timeout=config.daemon.job_timeout,
                   stop_grace=config.daemon.stop_grace, schedules=schedules,
                   randomized_delay=config.schedule.randomized_delay, persistent=config.schedule.persistent)


def _unit_word(text: str) -> str:
    """One word of a unit file setting: `%` and `$` escaped, quoted when it holds a space."""
    text = text.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() for c in text) or '"' in text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _command(params: UnitParams, program: str, *args: str) -> str:
    words = [str(params.bin_dir / program)]
    if params.config_path is not None:
        words += ["--config", str(params.config_path)]
    return " ".join([*(_unit_word(w) for w in words), *args])


def writable_paths(params: UnitParams) -> list[Path]:
    """The folders the jobs write (backup_dir, log_dir, the state folder), without nested duplicates."""
    wanted = list(dict.fromkeys((params.backup_dir, params.log_dir, params.state_dir)))
    return [p for p in wanted if not any(p != other and p.is_relative_to(other) for other in wanted)]


HARDENING = """\
# Hardening (`systemd-analyze security` rates it; see docs/install.md). The job reads its config and
# password files, writes only the folders in ReadWritePaths=, and talks to PostgreSQL and Redis over
# TCP or Unix sockets.
ProtectSystem=strict
ReadWritePaths={rw}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Nothing here reads other processes or /proc's system files: os.cpu_count() reads
# /sys/devices/system/cpu/online, and the lock names its holder from its own file.
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython, zstandard and isal (ISA-L is compiled ahead of time) never need writable+executable memory.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# Relaxed on purpose:
# PrivateNetwork= and IPAddressDeny= stay off: jobs reach PostgreSQL and Redis, often on another host or
#   container, by names resolved at run time, so no address list can be written here.
# PrivateUsers= stays off: password files are owned by root with group kkua-backup, which a user
#   namespace would map to nobody.
# RootDirectory= stays unset: the jobs run the host's pg_dump, chosen to match the server's version.
# UMask=0027 leaves files group-readable on purpose: the kkua-backup group (operators) reads backups and logs.
"""


def _hardening(params: UnitParams) -> str:
    return HARDENING.format(rw=" ".join(_unit_word(str(p)) for p in writable_paths(params)))


def _service_common(params: UnitParams) -> str:
    return (f"User={USER}\nGroup={USER}\nUMask=0027\n"
            f"# KillMode=mixed: SIGTERM reaches only the main process, which stops its workers and their\n"
            f"# children in order (grace, then SIGKILL) and removes partial files; systemd SIGKILLs whatever\n"
            f"# is left after TimeoutStopSec=, which is longer than daemon.stop_grace ({params.stop_grace} s).\n"
            f"KillMode=mixed\nTimeoutStopSec={params.stop_grace + STOP_MARGIN}s\n"
            f"Nice=10\nIOSchedulingClass=best-effort\nIOSchedulingPriority=7\n\n")


def render_template_service(params: UnitParams) -> str:
    """kkua-backup@.service: the oneshot job the timers start (`%i` = postgres, redis, retention, run)."""
    return (
        "# One KKUA backup job, started by its timer or by hand:\n"
        "#   systemctl start kkua-backup@postgres   (or @redis, @retention; @run runs every job)\n"
        "# Written by `kkua-backup systemd install` from the config; run it again after changing the config.\n"
        "[Unit]\n"
        "Description=KKUA backup job %i\n"
        f"Documentation={DOCS}\n"
        "Wants=network-online.target\n"
        "After=network-online.target postgresql.service redis-server.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={_command(params, 'kkua-backup', 'run', '%i')}\n"
        "Environment=KKUA_BACKUP_RUNNER=timer\n"
        f"# daemon.job_timeout: the same limit the daemon gives a job.\n"
        f"TimeoutStartSec={params.job_timeout}s\n"
        + _service_common(params) + _hardening(params))


def render_run_dropin(params: UnitParams) -> str:
    """The drop-in that makes kkua-backup@run.service run every job (`kkua-backup run all`)."""
    return (
        "# kkua-backup@run.service: `systemctl start kkua-backup@run` runs every job now (kkua-backup run all).\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={_command(params, 'kkua-backup', 'run', 'all')}\n")


def render_daemon_service(params: UnitParams) -> str:
    """kkua-backupd.service: the scheduling daemon (Type=notify, watchdog, reload on SIGHUP)."""
    return (
        "# The KKUA backup daemon: runs the jobs on the [schedule] of its config, each in a worker process.\n"
        "# Use it or the timers (kkua-*-backup.timer), not both: `kkua-backup systemd install --daemon`.\n"
        "[Unit]\n"
        "Description=KKUA backup daemon (PostgreSQL and Redis backups on schedules)\n"
        f"Documentation={DOCS}\n"
        "Wants=network-online.target\n"
        "After=network-online.target postgresql.service redis-server.service\n"
        "# A daemon that keeps failing stops being restarted after 5 tries in 10 minutes (then: systemctl status).\n"
        "StartLimitIntervalSec=10min\n"
        "StartLimitBurst=5\n\n"
        "[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f"ExecStart={_command(params, 'kkua-backupd')}\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "# The daemon pings every 30 s (half of this) from its main loop, which wakes at least that often;\n"
        "# a hung loop is restarted within a minute, and a slow disk or a busy machine cannot stall the loop\n"
        "# that long, since jobs run in worker processes. A longer period would only delay the restart.\n"
        "WatchdogSec=60\n"
        "Restart=on-failure\n"
        "# Exit 2 is an invalid config: restarting cannot fix it, so it is not restarted in a loop.\n"
        "RestartPreventExitStatus=2\n"
        "RestartSec=10s\n"
        "TimeoutStartSec=60s\n"
        + _service_common(params) + _hardening(params)
        + "\n[Install]\nWantedBy=multi-user.target\n")


TIMER_TEXT = {"postgres": "PostgreSQL backup", "redis": "Redis backup", "retention": "KKUA backup retention"}


def render_timer(params: UnitParams, job: str) -> str:
    """The timer of one job, its OnCalendar= from [schedule]."""
    return (
        f"# {TIMER_TEXT[job]} on the schedule [schedule] {job} of the config; written by\n"
        "# `kkua-backup systemd install`. Nothing fires on installing or booting: there is no OnBootSec=, and\n"
        "# Persistent= only catches up a run missed since the last one it recorded (none right after install).\n"
        "[Unit]\n"
        f"Description={TIMER_TEXT[job]} ({params.schedules[job]})\n"
        f"Documentation={DOCS}\n\n"
        "[Timer]\n"
        f"OnCalendar={params.schedules[job]}\n"
        f"Persistent={'true' if params.persistent else 'false'}\n"
        f"RandomizedDelaySec={params.randomized_delay}\n"
        "# The same delay every day on one host (not a new one each time): runs stay a fixed time apart.\n"
        "FixedRandomDelay=true\n"
        "# Fire on the second, not within systemd's default minute: `list-timers` and the logs then agree.\n"
        "AccuracySec=1s\n"
        f"Unit=kkua-backup@{job}.service\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n")


def render_sysusers(params: UnitParams) -> str:
    """The sysusers.d entry for the kkua-backup system user (home: backup_dir)."""
    return (f"# /etc/sysusers.d/kkua-backup.conf: the system user the backup jobs run as.\n"
            f'u {USER} - "KKUA backups" {params.backup_dir} /usr/sbin/nologin\n')


def render_tmpfiles(params: UnitParams) -> str:
    """The tmpfiles.d entries for the folders the jobs write (0750, owned by the backup user)."""
    lines = ["# /etc/tmpfiles.d/kkua-backup.conf: the folders the jobs write, 0750, owned by the backup user."]
    folders = [params.backup_dir, params.backup_dir / "postgres", params.backup_dir / "redis", params.state_dir,
               params.log_dir]
    for folder in dict.fromkeys(folders):
        lines.append(f"d {folder} 0750 {USER} {USER} -")
    lines.append(f"d {DEFAULT_CONFIG_PATH.parent} 0750 root {USER} -")
    return "\n".join(lines) + "\n"


def rendered_files(params: UnitParams) -> dict[Path, str]:
    """Every file `systemd install` writes, by path relative to the root."""
    files = {UNIT_DIR / TEMPLATE: render_template_service(params),
             UNIT_DIR / f"{RUN_UNIT}.d" / "run-all.conf": render_run_dropin(params),
             UNIT_DIR / DAEMON: render_daemon_service(params)}
    for job in JOBS:
        files[UNIT_DIR / TIMERS[job]] = render_timer(params, job)
    files[SYSUSERS_FILE] = render_sysusers(params)
    files[TMPFILES_FILE] = render_tmpfiles(params)
    return files


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


def _hidden(path: Path) -> bool:
    return any(path.is_relative_to(prefix) for prefix in HIDDEN_PREFIXES)


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
    """What the services could not reach: paths under /home, /root or /run/user (ProtectHome=), and,
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
        if _hidden(path):
            fix = ("install into /opt from the system Python (/usr/bin/python3 -m venv /opt/kkua-backupd)"
                   if index < software else
                   "move it (files to /etc/kkua-backup, folders under /var) and change the config")
            warnings.append(f"{what} {path} is under {next(p for p in HIDDEN_PREFIXES if path.is_relative_to(p))}, "
                            f"which the services cannot see (ProtectHome=yes); {fix}")
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


# ----------------------------------------------------------------------------------------------------
# kkua-backup systemd install|uninstall|status|run


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


def systemd_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    """Dispatch `kkua-backup systemd ACTION`; returns the result document (or (doc, exit code))."""
    target = Target.from_args(args)
    actions: dict[str, Callable[[], Any]] = {
        "install": lambda: systemd_install(ctx, args, target),
        "uninstall": lambda: systemd_uninstall(ctx, target),
        "status": lambda: systemd_status(ctx),
        "run": lambda: systemd_run(ctx),
    }
    return actions[args.action]()


def systemd_install(ctx: JobContext, args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Write the units, the user and folders, the config if absent; enable the timers or the daemon."""
    config = ctx.config
    if target.live:
        _require_root("`kkua-backup systemd install`")
        require_systemd()
    _check_paths(config)
    install = Installation.current(args)
    params = UnitParams.from_config(config, install.bin_dir, install.config_path, _schedules(config))
    record_path = target.root / RECORD_FILE
    record = Record.load(record_path) or Record()
    record.mode = "daemon" if args.daemon else "timers"
    changed = [str(rel) for rel, text in rendered_files(params).items()
               if _write(target.root, rel, text, record)]
    steps: list[str] = []
    if target.live:
        _run(("systemd-sysusers", str(target.root / SYSUSERS_FILE)))
        _run(("systemd-tmpfiles", "--create", str(target.root / TMPFILES_FILE)))
        steps += ["systemd-sysusers", "systemd-tmpfiles --create"]
    config_note = _install_config(target, install, record)
    _make_dirs(target.root, RECORD_FILE.parent, record, 0o750)
    if str(RECORD_FILE) not in record.files:
        record.files.append(str(RECORD_FILE))
    record.save(record_path)

    wanted = [DAEMON] if args.daemon else [TIMERS[j] for j in JOBS]
    others = [TIMERS[j] for j in JOBS] if args.daemon else [DAEMON]
    if target.live:
        _systemctl("daemon-reload")
        steps.append("systemctl daemon-reload")
        if not args.no_enable:
            # Never both: the daemon and the timers would each run every job.
            _systemctl("disable", "--now", *others)
            if not args.daemon:
                _clean_stale_stamps()
            _systemctl("enable", "--now", *wanted)
            steps += [f"systemctl disable --now {' '.join(others)}", f"systemctl enable --now {' '.join(wanted)}"]
            record.enabled = wanted
            record.save(record_path)
    else:
        steps.append(f"skipped (root is {target.root}, not /): systemd-sysusers, systemd-tmpfiles, chown, "
                     "systemctl daemon-reload/enable")
    warnings = hardening_warnings(config, install, check_access=target.live)
    for warning in warnings:
        _log().warning(warning)
    _say(ctx, f"Installed units in {target.root / UNIT_DIR} (ExecStart= {install.bin_dir}/kkua-backup"
              + (f" --config {install.config_path}" if install.config_path else "") + ").")
    for job in JOBS:
        _say(ctx, f"  {TIMERS[job]}: OnCalendar={params.schedules[job]}")
    if config_note:
        _say(ctx, config_note)
    if target.live and not args.no_enable:
        _say(ctx, f"Enabled and started: {', '.join(wanted)}. Check with `kkua-backup systemd status`.")
    elif args.no_enable:
        _say(ctx, f"Not enabled (--no-enable); enable with: systemctl enable --now {' '.join(wanted)}")
    return {"root": str(target.root), "mode": record.mode, "bin_dir": str(install.bin_dir),
            "config_path": str(install.config_path) if install.config_path else None,
            "schedules": params.schedules, "files": sorted(record.files), "changed": changed,
            "enabled": record.enabled, "steps": steps, "config": config_note, "warnings": warnings}


def _clean_stale_stamps() -> None:
    """Forget the last-run stamps of timers that are not active (left by an earlier install), so that
    Persistent= does not fire a catch-up run just because of this install."""
    for job in JOBS:
        timer = TIMERS[job]
        if not (STAMP_DIR / f"stamp-{timer}").exists():
            continue
        try:
            if _show(timer, ("ActiveState",)).get("ActiveState") == "active":
                continue
            _systemctl("clean", "--what=state", timer)
        except CommandFailed:
            continue  # a stale stamp only means one catch-up run


def example_config() -> Path | None:
    """The shipped config.toml.example: share/kkua-backupd in the environment, or the source tree."""
    for candidate in (Path(sys.prefix) / "share" / "kkua-backupd" / "config.toml.example",
                      Path(__file__).resolve().parents[1] / "packaging" / "config.toml.example"):
        if candidate.is_file():
            return candidate
    return None


def _install_config(target: Target, install: Installation, record: Record) -> str:
    """Install the example as /etc/kkua-backup/config.toml (0640 root:kkua-backup) when there is none."""
    if install.config_path is not None:
        return f"Config: {install.config_path} (given with --config; baked into ExecStart=)."
    path = target.root / CONFIG_FILE
    if path.exists():
        return f"Config: {path} exists and was left alone."
    example = example_config()
    if example is None:
        return (f"Config: {path} does not exist and no example is shipped with this installation; write it "
                "(docs/configuration.md) before the first run.")
    _make_dirs(target.root, CONFIG_FILE.parent, record, 0o750)  # live, systemd-tmpfiles made it already
    write_atomic(path, example.read_bytes(), 0o640)
    if target.live:
        os.chown(path, 0, grp.getgrnam(USER).gr_gid)
    # The config is the operator's from now on: uninstall never removes it, so it is not recorded.
    return f"Config: installed the example as {path} (0640 root:{USER}); edit it, then `kkua-backup config check`."


def systemd_uninstall(ctx: JobContext, target: Target) -> dict[str, Any]:
    """Stop and disable what install enabled, remove exactly the files and folders it created."""
    if target.live:
        _require_root("`kkua-backup systemd uninstall`")
        require_systemd()
    record_path = target.root / RECORD_FILE
    record = Record.load(record_path)
    if record is None:
        _say(ctx, f"Nothing to remove: no install record at {record_path}.")
        return {"root": str(target.root), "removed": [], "note": "no install record"}
    steps: list[str] = []
    # Only units whose files are still there: systemctl refuses to disable a unit it cannot find.
    units = [u for u in (DAEMON, *(TIMERS[j] for j in JOBS))
             if str(UNIT_DIR / u) in record.files and (target.root / UNIT_DIR / u).exists()]
    if target.live:
        if units:
            _systemctl("disable", "--now", *units)
            steps.append(f"systemctl disable --now {' '.join(units)}")
        _systemctl("stop", "kkua-backup@*.service")  # a pattern: no error when none is loaded
        steps.append("systemctl stop kkua-backup@*.service")
        for job in JOBS:  # forget the timers' stamps, so a later install does not fire a catch-up run
            if (STAMP_DIR / f"stamp-{TIMERS[job]}").exists():
                with contextlib.suppress(CommandFailed):
                    _systemctl("clean", "--what=state", TIMERS[job])
        with contextlib.suppress(CommandFailed):
            _systemctl("reset-failed", "kkua-backup*")
    # Only paths install can write: a damaged or edited record must not make this delete anything else.
    known = {str(rel) for rel in rendered_files(UnitParams())} | {str(RECORD_FILE)}
    known_dirs = {str(parent) for rel in known for parent in Path(rel).parents if parent != Path(".")}
    strange = sorted((set(record.files) - known) | (set(record.dirs) - known_dirs))
    if strange:
        _log().warning(f"install record {record_path} names paths install never writes; left alone: "
                       f"{', '.join(strange)}")
    removed: list[str] = []
    for rel in sorted(set(record.files) & known, key=lambda r: r == str(RECORD_FILE)):
        path = target.root / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(rel)
    for rel in sorted(set(record.dirs) & known_dirs, key=lambda r: -len(Path(r).parts)):
        try:
            (target.root / rel).rmdir()
            removed.append(rel + "/")
        except OSError:
            continue  # not empty: something else lives there now, so it stays
    if target.live:
        _systemctl("daemon-reload")
        steps.append("systemctl daemon-reload")
    else:
        steps.append(f"skipped (root is {target.root}, not /): systemctl disable/stop/daemon-reload")
    _say(ctx, f"Removed {len(removed)} file(s) and folder(s) that install created; the config, backups, "
              f"logs and the {USER} user were left alone.")
    for rel in removed:
        _say(ctx, f"  {target.root / rel}")
    return {"root": str(target.root), "removed": removed, "steps": steps}


def systemd_status(ctx: JobContext) -> dict[str, Any]:
    """The timers' next runs, the last results of the jobs, and the daemon's state."""
    require_systemd()
    timers: dict[str, Any] = {}
    for job in JOBS:
        t = _show(TIMERS[job], ("UnitFileState", "ActiveState", "NextElapseUSecRealtime", "LastTriggerUSec"))
        s = _show(f"kkua-backup@{job}.service", ("ActiveState", "Result", "ExecMainStatus",
                                                 "ExecMainStartTimestamp", "ExecMainExitTimestamp"))
        timers[job] = {"timer": TIMERS[job], "enabled": t.get("UnitFileState"), "active": t.get("ActiveState"),
                       "next_run": t.get("NextElapseUSecRealtime") or None,
                       "last_trigger": t.get("LastTriggerUSec") or None,
                       "last_result": s.get("Result"), "last_exit_status": s.get("ExecMainStatus"),
                       "last_start": s.get("ExecMainStartTimestamp") or None,
                       "last_end": s.get("ExecMainExitTimestamp") or None}
    d = _show(DAEMON, ("UnitFileState", "ActiveState", "SubState", "StatusText", "Result"))
    daemon = {"enabled": d.get("UnitFileState"), "active": d.get("ActiveState"), "sub": d.get("SubState"),
              "status": d.get("StatusText") or None, "result": d.get("Result")}
    # The last run by any runner (timer, daemon, cron, a person), from the state file the jobs keep.
    try:
        jobs = state.status_report(ctx.config)["jobs"]
    except (KkuaError, OSError) as exc:
        _log().warning(f"last runs unknown: {exc}")
        jobs = {}
    _say(ctx, f"{'JOB':<10} {'TIMER':<28} {'STATE':<18} {'NEXT RUN (timer)':<28} LAST RUN (any runner)")
    for job, info in timers.items():
        unit_state = f"{info['enabled']}/{info['active']}"
        run = jobs.get(job, {})
        info["last_run"] = {k: run.get(k) for k in ("last_run", "last_end", "last_result", "runner", "size")}
        last = (f"{run['last_result']} {run.get('last_end') or run.get('last_run')} by {run.get('runner')}"
                if run.get("last_result") else "never ran")
        _say(ctx, f"{job:<10} {info['timer']:<28} {unit_state:<18} {info['next_run'] or '-':<28} {last}")
    _say(ctx, f"daemon     {DAEMON:<28} {daemon['enabled']}/{daemon['active']}"
              + (f"  {daemon['status']}" if daemon["status"] else ""))
    return {"timers": timers, "daemon": daemon}


def _journal_tail(unit: str, since: float, count: int = 20, wait: float = 5.0) -> list[str]:
    """The last lines `unit` logged since the wall-clock time `since` (a unit that ended well is
    unloaded at once, taking its InvocationID along). journald stores a stream's last lines a moment
    after the process ends, so this polls until two reads agree (or `wait` seconds pass)."""
    if shutil.which("journalctl") is None:
        return []
    deadline = time.monotonic() + wait
    previous: list[str] | None = None
    while True:
        try:
            lines = _run(("journalctl", "-u", unit, f"--since=@{int(since)}", "-n", str(count), "--no-pager",
                          "-o", "cat"), timeout=30).splitlines()
        except CommandFailed:
            return previous or []
        if (lines and lines == previous) or time.monotonic() > deadline:
            return lines
        previous = lines
        time.sleep(0.3)


def systemd_run(ctx: JobContext) -> tuple[dict[str, Any], int]:
    """`systemctl start kkua-backup@run.service` (waits: oneshot), then its result and journal lines."""
    require_systemd()
    _require_root("`kkua-backup systemd run`")
    started = time.monotonic()
    since = time.time()
    error: str | None = None
    try:
        _run(("systemctl", "start", RUN_UNIT), timeout=ctx.config.daemon.job_timeout + STOP_MARGIN * 4)
    except CommandFailed as exc:
        error = str(exc)
    info = _show(RUN_UNIT, ("Result", "ExecMainStatus"))
    lines = _journal_tail(RUN_UNIT, since)
    ok = error is None and info.get("Result") == "success"
    seconds = round(time.monotonic() - started, 1)
    _say(ctx, f"{RUN_UNIT}: {'succeeded' if ok else 'FAILED'} in {seconds} s (result {info.get('Result')}, "
              f"exit status {info.get('ExecMainStatus')})")
    for line in lines:
        _say(ctx, f"  {line}")
    if not ok:
        _log().error(f"{RUN_UNIT} failed (result {info.get('Result')}); "
                      f"see journalctl -u {RUN_UNIT} and kkua-backup status")
    return ({"unit": RUN_UNIT, "ok": ok, "result": info.get("Result"), "exit_status": info.get("ExecMainStatus"),
             "seconds": seconds, "journal": lines, "error": error}, 0 if ok else 1)


# ----------------------------------------------------------------------------------------------------
# Cron: OnCalendar -> cron conversion (pure), the marked block, install|uninstall|status|test.

BEGIN = "# BEGIN kkua-backup (managed; do not edit)"
END = "# END kkua-backup"
SHORTHANDS = {"minutely": "*-*-* *:*:00", "hourly": "*-*-* *:00:00", "daily": "*-*-* 00:00:00",
              "monthly": "*-*-01 00:00:00", "weekly": "Mon *-*-* 00:00:00", "yearly": "*-01-01 00:00:00",
              "annually": "*-01-01 00:00:00", "quarterly": "*-01,04,07,10-01 00:00:00",
              "semiannually": "*-01,07-01 00:00:00"}
WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 0}


class NotExpressible(ValueError):
    """An OnCalendar expression that cron cannot express exactly."""


def _refuse(expr: str, why: str) -> NotExpressible:
    return NotExpressible(f"schedule {expr!r} cannot be written as a cron line ({why}); simplify it, or use "
                          "systemd timers (`kkua-backup systemd install`), which take every OnCalendar expression")


def _cron_number(text: str, lo: int, hi: int, expr: str) -> int:
    if not text.isdigit():
        raise _refuse(expr, f"{text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise _refuse(expr, f"{value} is outside {lo}..{hi}")
    return value


def _cron_field(text: str, lo: int, hi: int, expr: str) -> str:
    """One cron field from one OnCalendar component (`*`, `5`, `1,3`, `1..5`, `0/15`, `1..10/3`)."""
    if text == "*":
        return "*"
    items = []
    for item in text.split(","):
        base, _, step = item.partition("/")
        step_value = _cron_number(step, 1, hi, expr) if step else None
        if ".." in base:
            first, last = (_cron_number(x, lo, hi, expr) for x in base.split("..", 1))
            if last < first:
                raise _refuse(expr, f"range {base} runs backwards")
            out = f"{first}-{last}"
        elif base == "*":
            out = "*"
        else:
            first = _cron_number(base, lo, hi, expr)
            out = str(first) if step_value is None else ("*" if first == lo else f"{first}-{hi}")
        items.append(out if step_value is None else f"{out}/{step_value}")
    return ",".join(items)


def _cron_weekdays(text: str, expr: str) -> str:
    parts = []
    for item in text.split(","):
        names = item.split("..")
        try:
            days = [WEEKDAYS[n.strip().lower()[:3]] for n in names]
        except KeyError:
            raise _refuse(expr, f"{item!r} is not a weekday") from None
        if len(days) == 1:
            parts.append(str(days[0]))
        else:
            first, last = days[0], days[1] or 7  # Sunday closes a range as 7
            if last < first:
                raise _refuse(expr, f"weekday range {item} wraps around the week")
            parts.append(f"{first}-{last}")
    return ",".join(parts)


def oncalendar_to_cron(expr: str) -> str:
    """The five cron fields firing exactly when systemd's OnCalendar `expr` does, in local time; raises
    NotExpressible (naming the expression) for what cron cannot express: seconds other than :00, years,
    `~` (last days), time zones, and a day of the month together with weekdays (cron ORs those)."""
    text = SHORTHANDS.get(expr.strip().lower(), expr.strip())
    words = text.split()
    weekdays = "*"
    if words and words[0][0].isalpha():
        weekdays = _cron_weekdays(words.pop(0), expr)
    dates = [w for w in words if "-" in w and ":" not in w]
    times = [w for w in words if ":" in w]
    others = [w for w in words if w not in dates and w not in times]
    if others:
        raise _refuse(expr, f"{others[0]!r} (a time zone?) is not understood; cron runs in the machine's local time")
    if len(dates) > 1 or len(times) > 1:
        raise _refuse(expr, "more than one date or time")
    date = dates[0] if dates else "*-*-*"
    time_of_day = times[0] if times else "00:00:00"
    if "~" in date:
        raise _refuse(expr, "'~' counts days from the end of the month")
    date_parts = date.split("-")
    if len(date_parts) == 2:
        date_parts.insert(0, "*")
    if len(date_parts) != 3:
        raise _refuse(expr, f"date {date!r} is not YEAR-MONTH-DAY")
    year, month, day = date_parts
    if year != "*":
        raise _refuse(expr, "cron has no year field")
    time_parts = time_of_day.split(":")
    if len(time_parts) == 2:
        time_parts.append("00")
    if len(time_parts) != 3:
        raise _refuse(expr, f"time {time_of_day!r} is not HOUR:MINUTE[:SECOND]")
    hour, minute, second = time_parts
    if not re.fullmatch(r"0+(\.0*)?", second):
        raise _refuse(expr, "cron cannot fire at a second other than :00")
    cron_day = _cron_field(day, 1, 31, expr)
    if cron_day != "*" and weekdays != "*":
        raise _refuse(expr, "cron runs a line when EITHER the day of the month OR the weekday matches")
    return " ".join((_cron_field(minute, 0, 59, expr), _cron_field(hour, 0, 23, expr), cron_day,
                     _cron_field(month, 1, 12, expr), weekdays))


def _cron_word(text: str) -> str:
    return shlex.quote(text).replace("%", "\\%")  # an unescaped % ends a cron command


def render_cron_block(schedules: dict[str, str], *, bin_dir: Path, config_path: Path | None, log_dir: Path,
                      randomized_delay: int, user: str | None) -> str:
    """The marked block: one line per job (`user` field only for /etc/cron.d); raises NotExpressible."""
    lines = [BEGIN,
             "# Rendered from [schedule] by `kkua-backup cron install`; change the config and run it again.",
             f"# Output of each run: {log_dir / 'cron.log'}; the jobs also write backup.log and redis_backup.log."]
    program = [str(bin_dir / "kkua-backup")] + (["--config", str(config_path)] if config_path else [])
    for job in JOBS:
        fields = oncalendar_to_cron(schedules[job])
        delay = f"sleep $(shuf -i 0-{randomized_delay} -n 1); " if randomized_delay else ""
        command = (f"{delay}KKUA_BACKUP_RUNNER=cron {' '.join(_cron_word(w) for w in program)} run {job} "
                   f">>{_cron_word(str(log_dir / 'cron.log'))} 2>&1")
        lines.append(f"{fields} {user + ' ' if user else ''}{command}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _split_block(text: str) -> tuple[list[str], list[str] | None, list[str]]:
    """(lines before, the managed block or None, lines after); raises KkuaError on a broken block."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if not starts and not ends:
        return lines, None, []
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise KkuaError(f"the kkua-backup block is broken ({len(starts)} BEGIN and {len(ends)} END markers)",
                        hint="fix or remove the lines between the markers by hand, then run the command again")
    return lines[:starts[0]], lines[starts[0]:ends[0] + 1], lines[ends[0] + 1:]


def replace_block(text: str, block: str) -> str:
    """`text` with the managed block replaced by `block` (appended when absent); other lines untouched."""
    before, _, after = _split_block(text)
    if before and not before[-1].endswith("\n"):
        before[-1] += "\n"
    return "".join(before) + block + "".join(after)


def remove_block(text: str) -> str:
    """`text` without the managed block; other lines untouched."""
    before, _, after = _split_block(text)
    return "".join(before) + "".join(after)


def find_block(text: str) -> str | None:
    """The managed block in `text`, if any."""
    return "".join(block) if (block := _split_block(text)[1]) is not None else None


@dataclass(frozen=True)
class CronTarget:
    """A crontab: /etc/cron.d/kkua-backup under the root, or the user's crontab (`crontab -l` / `-`)."""

    root: Path
    user_mode: bool

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    @property
    def path(self) -> Path:
        return self.root / CRON_FILE

    def describe(self) -> str:
        return "your crontab" if self.user_mode else str(self.path)

    def read(self) -> str:
        """The crontab's text ("" when there is none); raises KkuaError."""
        if self.user_mode:
            try:
                return _run(("crontab", "-l"), timeout=30)
            except CommandFailed as exc:
                if any("no crontab" in line for line in exc.stderr_tail):
                    return ""
                raise
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def write(self, text: str) -> None:
        """Replace the crontab's text; an empty /etc/cron.d file is removed."""
        if self.user_mode:
            _run(("crontab", "-"), timeout=30, input_bytes=text.encode())
            return
        if not text.strip():
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # cron ignores files in /etc/cron.d that are group- or world-writable.
        write_atomic(self.path, text.encode(), 0o644)


def _cron_target(args: argparse.Namespace) -> CronTarget:
    target = CronTarget(root=Target.from_args(args).root, user_mode=bool(args.user))
    if target.user_mode and shutil.which("crontab") is None:
        raise KkuaError("the crontab command is not installed", hint="apt-get install cron, or use systemd timers")
    if not target.user_mode and target.live:
        _require_root("`kkua-backup cron install` for /etc/cron.d (or use --user for your own crontab)")
    return target


def cron_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    """Dispatch `kkua-backup cron ACTION`; returns the result document (or (doc, exit code))."""
    target = _cron_target(args)
    actions: dict[str, Callable[[], Any]] = {
        "install": lambda: cron_install(ctx, args, target),
        "uninstall": lambda: cron_uninstall(ctx, target),
        "status": lambda: cron_status(ctx, target),
        "test": lambda: cron_test(ctx, args, target),
    }
    return actions[args.action]()


def cron_install(ctx: JobContext, args: argparse.Namespace, target: CronTarget) -> dict[str, Any]:
    """Write (or replace) the marked block, rendered from [schedule]; raises UsageError when a schedule
    cannot be written for cron."""
    config = ctx.config
    install = Installation.current(args)
    schedules = _schedules(config)
    if config.schedule.timezone:
        raise UsageError(f"schedule.timezone = {config.schedule.timezone!r} cannot be used with cron, which runs in "
                         "the machine's local time", hint="remove it, or use `kkua-backup systemd install`")
    try:
        block = render_cron_block(schedules, bin_dir=install.bin_dir, config_path=install.config_path,
                                  log_dir=config.log_dir, randomized_delay=config.schedule.randomized_delay,
                                  user=None if target.user_mode else USER)
    except NotExpressible as exc:
        raise UsageError(str(exc)) from None
    old = target.read()
    target.write(replace_block(old, block))
    warnings: list[str] = []
    if not target.user_mode and target.live:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            warnings.append(f"the {USER} user does not exist, so cron cannot run the jobs; create it with "
                            "`kkua-backup systemd install --no-enable` or the sysusers step in docs/install.md")
    for warning in warnings:
        _log().warning(warning)
    _say(ctx, f"{'Replaced' if find_block(old) else 'Added'} the kkua-backup block in {target.describe()}:")
    for line in block.splitlines():
        _say(ctx, f"  {line}")
    return {"crontab": target.describe(), "block": block, "replaced": find_block(old) is not None,
            "warnings": warnings}


def cron_uninstall(ctx: JobContext, target: CronTarget) -> dict[str, Any]:
    """Remove the marked block; every other line stays."""
    old = target.read()
    if find_block(old) is None:
        _say(ctx, f"Nothing to remove: no kkua-backup block in {target.describe()}.")
        return {"crontab": target.describe(), "removed": False}
    target.write(remove_block(old))
    _say(ctx, f"Removed the kkua-backup block from {target.describe()}; other lines were left as they were.")
    return {"crontab": target.describe(), "removed": True}


def cron_status(ctx: JobContext, target: CronTarget) -> dict[str, Any]:
    """The block as installed and the next run of each job."""
    block = find_block(target.read())
    if block is None:
        _say(ctx, f"No kkua-backup block in {target.describe()} (install it with `kkua-backup cron install`).")
    else:
        _say(ctx, f"{target.describe()}:")
        for line in block.splitlines():
            _say(ctx, f"  {line}")
    jobs: dict[str, Any] = {}
    for job in JOBS:
        expr = getattr(ctx.config.schedule, job)
        runs = next_runs(expr, ctx.config.schedule.timezone) if block is not None else []
        jobs[job] = {"schedule": expr, "next_run": runs[0] if runs else None}
        if block is not None:
            _say(ctx, f"  next {job}: {runs[0] if runs else 'unknown'}")
    return {"crontab": target.describe(), "installed": block is not None, "block": block, "jobs": jobs}


def cron_test(ctx: JobContext, args: argparse.Namespace, target: CronTarget) -> tuple[dict[str, Any], int]:
    """Run each job once, as cron would (as kkua-backup for /etc/cron.d at the root /), and report per job."""
    install = Installation.current(args)
    program = [str(install.bin_dir / "kkua-backup")] + (["--config", str(install.config_path)]
                                                        if install.config_path else [])
    prefix: list[str] = []
    if target.live and not target.user_mode and os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise KkuaError("runuser is not installed, so the jobs cannot be run as kkua-backup",
                            hint="install util-linux, or test with --user")
        prefix = ["runuser", "-u", USER, "--"]
    results: dict[str, Any] = {}
    code = 0
    for job in JOBS:
        results[job] = _test_job(job, (*prefix, *program, "run", job), ctx.config.daemon.job_timeout + STOP_MARGIN)
        info = results[job]
        if not info["ok"]:
            code = 1
        _say(ctx, f"{'OK  ' if info['ok'] else 'FAIL'}  run {job} ({info['seconds']} s)"
                  + (f": {info['error']}" if not info["ok"] else ""))
        for line in info["output"] if not info["ok"] else []:
            _say(ctx, f"      {line}")
    if code:
        _log().error("a job failed when run as cron would run it; fix it before relying on cron (lines above)")
    return {"jobs": results, "ok": code == 0}, code


def _test_job(job: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run one job to completion; its console output goes to a temporary file whose last lines are kept."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        error: str | None = None
        try:
            # Like cron: the environment without DATABASE_PASSWORD/REDIS_PASSWORD (execute withholds
            # them), so a job that only works with them in the operator's shell fails here too.
            with execute.ProcessGroup("install") as group:
                child = group.spawn(argv, env={"KKUA_BACKUP_RUNNER": "cron"}, stdout=out, timeout=timeout,
                                    name=f"kkua-backup run {job}")
                group.wait(child)
        except KkuaError as exc:
            error = str(exc)
        out.seek(0)
        lines = out.read().decode("utf-8", "replace").splitlines()
    doc: dict[str, Any] = {"ok": error is None, "seconds": round(time.monotonic() - started, 1),
                           "output": lines[-5:]}
    if error is not None:
        doc["error"] = error
    return doc


def _log() -> Any:
    return get_logger(job="install")


__all__ = ["cron_command", "oncalendar_to_cron", "render_cron_block", "rendered_files",
           "replace_block", "systemd_command"]
