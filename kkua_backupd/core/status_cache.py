"""What `status` needs of the validated config, kept in the state folder like a .pyc for the config
(docs/decisions/0024).

A `status` that validated the config records, in `status-cache.json` beside the state file, the
few values it shows (folders, schedule, remote names and URLs; never a secret) under a key: the sha256
of everything validation read or depends on, namely the config file's bytes, the tool's version and the
sources that validate (config.py, schedule.py, stream/encrypt.py: their size and mtime), the environment
variables the loader reads (hashed into the key, never stored), the user and groups (what files it may read),
and the stat of every other file validation reads (env_file, password and URL files, credentials, keys, the
local zone's file): device, inode, mode, owner, size, mtime and ctime, so any change to one, content or mode,
changes the key. `status` computes the key without importing pydantic; on a match it shows the recorded
values, on anything else (no record, another key, a record it cannot read or does not trust) it validates as
before. Jobs, the daemon and every other command never read the record: what is acted on is always
validated afresh, and they do not write it either (a job's files and syscalls are what they were).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kkua_backupd import __version__, resolve_config_path
from kkua_backupd.errors import KkuaError
from kkua_backupd.safefs import FILE_MODE, open_at, open_folder, set_trusted_roots

if TYPE_CHECKING:
    from kkua_backupd.config import Config, LoadedConfig

CACHE_FILE = "status-cache.json"
CACHE_FORMAT = 1
# Records for this many keys are kept: the timers' environment and an operator's shell differ (variables set
# by systemd, not in a login shell), and each should find its own.
KEEP = 4
LIMIT = 1 << 20
# Every variable the loader (config.py) reads, and TZ (the local zone schedules are checked in): their values
# go into the key through one sha256, never into the file. tests/unit/test_status_cache.py checks this list
# against config.py's tables.
ENV_NAMES = ("KKUA_BACKUP_CONFIG", "DATABASE_HOST", "DATABASE_PORT", "DATABASE_NAME", "DATABASE_USER", "REDIS_HOST",
             "REDIS_PORT", "BACKUP_RETENTION_DAYS", "BACKUP_AOF", "FORCE_RESTORE", "TEST_RESTORE",
             "DATABASE_PASSWORD", "REDIS_PASSWORD", "KKUA_HEALTHCHECKS_URL", "KKUA_WEBHOOK_URL",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
             "TZ")
# The sources whose rules decide whether a config is valid: an edited checkout or an upgrade without a new
# version number changes their stat, and so the key.
VALIDATING_SOURCES = ("config.py", "schedule.py", "stream/encrypt.py")
# ... and the libraries' (their __init__ files, rewritten by every install or upgrade).
VALIDATING_LIBRARIES = ("pydantic", "pydantic_core")
# config.Config's defaults for the folders, read here from the raw file to find the record without pydantic
# (tests/unit/test_status_cache.py checks them against Config()); a record whose folders differ from the
# validated ones it holds is not used.
DEFAULT_BACKUP_DIR = "/var/backups/kkua"
DEFAULT_LOG_DIR = "/var/log/kkua-backup"
STATE_FOLDER = ".state"
STATE_NAME = "jobs.json"
LOCAL_ZONE_FILE = "/etc/localtime"
ZONEINFO_DIR = "/usr/share/zoneinfo"
# A file validation read whose ctime is this close to the start of the validation (or later) may have
# changed while it was read: no record is written then (the file system's clock is coarse, a few ms).
SETTLED_NS = 50_000_000
STALE_PARTIAL_S = 60


class ScheduleSettings(Protocol):
    """The part of [schedule] `status` uses (config.ScheduleConfig, or a record's)."""

    @property
    def timezone(self) -> str | None: ...
    @property
    def postgres(self) -> str: ...
    @property
    def redis(self) -> str: ...
    @property
    def retention(self) -> str: ...
    @property
    def randomized_delay(self) -> int: ...
    @property
    def overdue_after(self) -> int: ...


class RemoteSettings(Protocol):
    """The part of a [[remote]] `status` shows."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...


class StatusSettings(Protocol):
    """What `status` reads of the config: config.Config, or the record of one (`StatusView`)."""

    @property
    def backup_dir(self) -> Path: ...
    @property
    def state_file(self) -> Path: ...
    @property
    def schedule(self) -> ScheduleSettings: ...
    @property
    def remote(self) -> Sequence[RemoteSettings]: ...


@dataclass(frozen=True)
class ScheduleView:
    timezone: str | None
    postgres: str
    redis: str
    retention: str
    randomized_delay: int
    overdue_after: int


@dataclass(frozen=True)
class RemoteView:
    name: str
    url: str


@dataclass(frozen=True)
class StatusView:
    """The recorded values of a validated config that `status` shows (`log_dir`: to check the record is the
    one of the folders the config names, as the trusted roots)."""

    backup_dir: Path
    log_dir: Path
    state_file: Path
    schedule: ScheduleView
    remote: tuple[RemoteView, ...]

    def to_json(self) -> dict[str, Any]:
        return {"backup_dir": str(self.backup_dir), "log_dir": str(self.log_dir), "state_file": str(self.state_file),
                "schedule": {name: getattr(self.schedule, name) for name in ScheduleView.__dataclass_fields__},
                "remote": [{"name": r.name, "url": r.url} for r in self.remote]}

    @classmethod
    def from_json(cls, doc: object) -> StatusView:
        """The view in a record; raises ValueError for anything but exactly what `to_json` writes."""
        if not isinstance(doc, dict) or set(doc) != {"backup_dir", "log_dir", "state_file", "schedule", "remote"}:
            raise ValueError("not a status view")
        folders = [doc[k] for k in ("backup_dir", "log_dir", "state_file")]
        if not all(isinstance(v, str) and v for v in folders):
            raise ValueError("folders are not paths")
        sched, remotes = doc["schedule"], doc["remote"]
        fields = ScheduleView.__dataclass_fields__
        if not isinstance(sched, dict) or set(sched) != set(fields):
            raise ValueError("not a schedule")
        if not (sched["timezone"] is None or isinstance(sched["timezone"], str)) or not all(
                isinstance(sched[k], str) for k in ("postgres", "redis", "retention")) or not all(
                type(sched[k]) is int for k in ("randomized_delay", "overdue_after")):
            raise ValueError("not a schedule")
        if not isinstance(remotes, list) or not all(
                isinstance(r, dict) and set(r) == {"name", "url"} and all(isinstance(v, str) for v in r.values())
                for r in remotes):
            raise ValueError("not a list of remotes")
        return cls(Path(folders[0]), Path(folders[1]), Path(folders[2]), ScheduleView(**sched),
                   tuple(RemoteView(r["name"], r["url"]) for r in remotes))


def view_of(config: Config) -> StatusView:
    """What `status` needs of a validated config."""
    sched = config.schedule
    return StatusView(config.backup_dir, config.log_dir, config.state_file,
                      ScheduleView(sched.timezone, sched.postgres, sched.redis, sched.retention, sched.randomized_delay,
                                   sched.overdue_after),
                      tuple(RemoteView(r.name, r.url) for r in config.remote))


def files_read(config: Config, config_path: Path | None, environ: Mapping[str, str]) -> list[str]:
    """Every file besides the config that validation read or depends on, as the loader names them (relative
    ones stay relative: they are looked up from where the command runs, as the loader does)."""
    found: list[Path | str] = [LOCAL_ZONE_FILE]
    tz = environ.get("TZ", "").removeprefix(":")
    if tz.startswith("/"):
        found.append(tz)
    if config.schedule.timezone:
        found.append(f"{ZONEINFO_DIR}/{config.schedule.timezone}")
    if config.env_file is not None:
        env_file = config.env_file
        if not env_file.is_absolute() and config_path is not None:
            env_file = config_path.parent / env_file  # as load_config resolves it
        found.append(env_file)
    found += [p for p in (config.postgres.password_file, config.redis.password_file,
                          config.notify.healthchecks_url_file, config.notify.webhook_url_file) if p is not None]
    found += [r.credentials_file for r in config.remote if r.credentials_file is not None]
    enc = config.encryption
    if enc is not None:
        found += [p for p in (enc.recipients_file, enc.passphrase_file, enc.signing_key_file) if p is not None]
    return list(dict.fromkeys(str(p) for p in found))


def _stat_of(path: str) -> list[int] | str:
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"error {exc.errno}"
    except ValueError:  # a NUL in the name (a crafted record)
        return "error"
    return [info.st_dev, info.st_ino, info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns,
            info.st_ctime_ns]


def _sources() -> list[list[int] | str]:
    """The stat of the sources that validate: ours, and pydantic's (found without importing it)."""
    import importlib.util
    package = Path(__file__).resolve().parent.parent
    found = [_stat_of(str(package / name)) for name in VALIDATING_SOURCES]
    for library in VALIDATING_LIBRARIES:
        spec = importlib.util.find_spec(library)
        found.append(_stat_of(spec.origin) if spec is not None and spec.origin else f"no {library}")
    return found


def key_of(config_path: Path, digest: str | None, files: Sequence[str], environ: Mapping[str, str]) -> str:
    """The key of a record: a sha256 of everything the validation of the config at `config_path` (whose
    bytes have the sha256 `digest`; None: no file) read or depends on."""
    doc = {
        "format": CACHE_FORMAT, "version": __version__, "python": list(sys.version_info[:2]), "sources": _sources(),
        "config": [os.path.abspath(config_path), digest],
        "env": {name: hashlib.sha256(environ[name].encode("utf-8", "surrogateescape")).hexdigest()
                for name in ENV_NAMES if name in environ},
        "user": [os.geteuid(), os.getegid(), sorted(os.getgroups())],
        "files": {name: _stat_of(name) for name in files},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Reading (`status` only)


def _where(raw: dict[str, Any]) -> tuple[Path, Path, Path] | None:
    """backup_dir, log_dir and the state file as the raw config names them (config.Config's defaults
    otherwise); None when they are not plain strings (validation will say what is wrong)."""
    daemon = raw.get("daemon", {})
    backup_dir, log_dir = raw.get("backup_dir", DEFAULT_BACKUP_DIR), raw.get("log_dir", DEFAULT_LOG_DIR)
    state_file = daemon.get("state_file") if isinstance(daemon, dict) else None
    if not (isinstance(backup_dir, str) and backup_dir and isinstance(log_dir, str) and log_dir):
        return None
    if state_file is None:
        return Path(backup_dir), Path(log_dir), Path(backup_dir) / STATE_FOLDER / STATE_NAME
    if not (isinstance(state_file, str) and state_file):
        return None
    return Path(backup_dir), Path(log_dir), Path(state_file)


def user_folder(environ: Mapping[str, str]) -> Path | None:
    """Where a user who may not write the state folder (a member of the kkua-backup group) keeps the record
    instead: `$XDG_CACHE_HOME/kkua-backup`, else `~/.cache/kkua-backup`. None for root (who may write the
    state folder; a `sudo` that keeps the caller's HOME must not leave root's files in it) and without an
    absolute folder to use."""
    if os.geteuid() == 0:
        return None
    base = environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        home = environ.get("HOME") or ""
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "kkua-backup"


def _read_record(folder: Path, *, own: bool = False) -> Any:
    """The record in `folder`, read without following a symlink, from a folder and a file owned by root,
    kkua-backup or this user (`own`: this user only) that neither group nor others may write; raises OSError,
    KkuaError, ValueError for anything else."""
    dir_fd = open_folder(folder, root=folder)
    try:
        if stat.S_IMODE(os.fstat(dir_fd).st_mode) & 0o022:
            raise ValueError(f"{folder} is writable by others")
        if own and os.fstat(dir_fd).st_uid != os.geteuid():
            raise ValueError(f"{folder} is not this user's")
        fd = open_at(dir_fd, folder / CACHE_FILE, os.O_RDONLY)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as fh:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o022:
            raise ValueError(f"{CACHE_FILE} is writable by others")
        if own and os.fstat(fd).st_uid != os.geteuid():
            raise ValueError(f"{CACHE_FILE} is not this user's")
        try:
            return json.loads(fh.read(LIMIT).decode("utf-8"))
        except RecursionError:  # a crafted nest of brackets
            raise ValueError("nested too deeply") from None


def _entries(doc: object) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("entries"), list):
        raise ValueError("not a status cache")
    return [e for e in doc["entries"] if isinstance(e, dict)]


def cached(cli_path: str | None, environ: Mapping[str, str]) -> StatusView | None:
    """The recorded view of the config `status` would load, when a record of it under the key of what is
    there now exists and is trusted; None otherwise (then `status` validates). Declares the view's folders
    as the trusted roots (docs/security.md), as loading the config would."""
    path, explicit = resolve_config_path(cli_path, environ)
    try:
        with path.open("rb") as fh:
            data: bytes | None = fh.read()
    except FileNotFoundError:
        if explicit:
            return None  # validation says so
        data = None
    except OSError:
        return None
    digest = hashlib.sha256(data).hexdigest() if data is not None else None
    try:
        import tomllib
        where = _where(tomllib.loads(data.decode()) if data is not None else {})
    except (ValueError, UnicodeDecodeError):  # TOMLDecodeError is a ValueError
        return None
    if where is None:
        return None
    backup_dir, log_dir, state_file = where
    set_trusted_roots(backup_dir, log_dir, state_file.parent)
    mine = user_folder(environ)
    for folder, own in ((state_file.parent, False), *(((mine, True),) if mine is not None else ())):
        try:
            entries = _entries(_read_record(folder, own=own))
        except (OSError, KkuaError, ValueError):
            continue
        view = _matching(entries, path, digest, environ)
        if view is not None:
            return view if (view.backup_dir, view.log_dir, view.state_file) == where else None
    return None


def _matching(entries: Sequence[dict[str, Any]], path: Path, digest: str | None,
              environ: Mapping[str, str]) -> StatusView | None:
    """The view of the entry whose key is that of what is there now; None when there is none, or its view
    is malformed."""
    for entry in entries:
        files = entry.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            continue
        if entry.get("key") != key_of(path, digest, files, environ):
            continue
        try:
            return StatusView.from_json(entry.get("status"))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------------------
# Writing (`status`, after it validated)


def remember(loaded: LoadedConfig, cli_path: str | None, environ: Mapping[str, str], started_ns: int) -> None:
    """Record the view of the config `loaded` (validated from `started_ns` on, time.time_ns()) for `status`,
    when the state folder exists and this user may write it; never fails the command. Nothing is written when
    the record is there already, or when a file validation read changed around its reading."""
    try:
        _remember(loaded, cli_path, environ, started_ns)
    except Exception as exc:  # the record only saves `status` time: it never fails a job (-v says why)
        from kkua_backupd.obs.logs import get_logger
        get_logger().debug("status record not written", error=f"{type(exc).__name__}: {exc}")


def _remember(loaded: LoadedConfig, cli_path: str | None, environ: Mapping[str, str], started_ns: int) -> None:
    config = loaded.config
    path, _ = resolve_config_path(cli_path, environ)
    files = files_read(config, loaded.path, environ)
    for info in [*(_stat_of(name) for name in files), *_sources()]:
        if isinstance(info, list) and info[7] >= started_ns - SETTLED_NS:
            return  # changed while (or just before) validation read it: the next `status` looks again
    entry = {"key": key_of(path, loaded.digest, files, environ), "files": files,
             "status": view_of(config).to_json()}
    folder, own = config.state_file.parent, False
    if not os.path.isdir(folder):
        return  # no job ran yet: nothing to show but the schedule
    if not os.access(folder, os.W_OK):
        mine = user_folder(environ)
        if mine is None:
            return
        folder, own = mine, True
        with contextlib.suppress(FileExistsError):
            os.makedirs(mine.parent, mode=0o700, exist_ok=True)
            os.mkdir(mine, 0o700)
    try:
        entries = _entries(_read_record(folder, own=own))
    except FileNotFoundError:
        entries = []
    except (OSError, KkuaError, ValueError):
        entries = []  # replaced below when this user may write here
    if entries and entries[0] == entry:
        return
    if not os.access(folder, os.W_OK):
        return
    from kkua_backupd.stream.pipeline import write_atomic
    doc = {"format": CACHE_FORMAT, "entries": [entry, *[e for e in entries if e.get("key") != entry["key"]]][:KEEP]}
    try:
        _remove_stale_partial(folder)
        write_atomic(folder / CACHE_FILE, (json.dumps(doc, indent=1) + "\n").encode("utf-8"), FILE_MODE)
    except (OSError, KkuaError):
        return  # another command writing it now (its .partial exists), or a folder this user may not write


def _remove_stale_partial(folder: Path) -> None:
    """Remove the `.partial` of a writer killed before its rename (a write takes milliseconds; one a minute
    old is nobody's), so that a kill does not stop the record from ever being written again."""
    fd = open_folder(folder, root=folder)
    try:
        name = CACHE_FILE + ".partial"
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < time.time() - STALE_PARTIAL_S:
                os.unlink(name, dir_fd=fd)  # unlink never follows a symlink
    finally:
        os.close(fd)
