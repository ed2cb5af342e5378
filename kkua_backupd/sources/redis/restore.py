"""Redis restores: logical (streamed key by key into a live server) or file (place the RDB, restart).

Both modes are steps of the one restore flow (core/flows.restore), in its order: the set is checked (sha256,
full decompression, a full read of the RDB with its CRC-64) before anything changes; what the target
cannot hold is refused; the operator confirms (or --force); a safety backup of the current data is taken;
only then is the target changed. The report the CLI prints is built from key counts per database,
compared with the counts the backup recorded.

Logical mode (default, works over the network, any server version) streams the backup's RDB and sends
every key with RESTORE ... ABSTTL REPLACE, re-encoding what an older target cannot read (`redis_copy`);
no local redis-server is involved, except for an AOF backup, which is first loaded into a throwaway one.
File mode (same host) stops the server through the configured command, puts the RDB (and, when AOF is on,
an AOF built from it) in place and starts it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import redis
from pydantic import Field, SecretStr

from kkua_backupd.config import RedisConfig
from kkua_backupd.core.context import JobContext, RestorePlan, RestoreReport, SafetyBackup
from kkua_backupd.errors import (
    CommandFailed,
    ConnectionFailed,
    IntegrityError,
    Interrupted,
    JobError,
    KkuaError,
    Refused,
    UsageError,
    VersionTooNew,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.proc import execute
from kkua_backupd.sources import RestoreOptions
from kkua_backupd.sources.redis import protocol as redis_protocol
from kkua_backupd.sources.redis.backup import capture, check_files, compare_counts, same_sha256
from kkua_backupd.sources.redis.copy import Plan as CopyPlan
from kkua_backupd.sources.redis.copy import Target as TargetInfo
from kkua_backupd.sources.redis.copy import copy, describe_server, flush_databases, plan_copy
from kkua_backupd.sources.redis.local import LocalRedis
from kkua_backupd.sources.redis.manifest import details_of
from kkua_backupd.sources.redis.marker import interrupted_file_restore, marker_path, read_marker, undo_command
from kkua_backupd.sources.redis.rdb import NEWEST_REDIS_RDB, NEWEST_VALKEY_RDB, RdbScanner, RdbSummary, file_header
from kkua_backupd.store.storage import PREFIXES, BackupSet, ManifestFile, resolve
from kkua_backupd.stream.chain import compression_of, read_chain
from kkua_backupd.stream.pipeline import AtomicFile, fsync_dir, write_atomic

KIND = "redis"
_JOB = "redis-restore"
_TAR_MAGIC_OFFSET = 257


@dataclass(frozen=True)
class Source:
    """The file of the set a restore reads: the RDB, or the AOF with --aof."""

    name: str
    compression: str
    aof: bool
    expected: ManifestFile | None


# ----------------------------------------------------------------------------------------------
# Choosing and reading the backup file


def choose_source(backup_set: BackupSet, spec: str, *, aof: bool) -> Source:
    """The file to restore: the set's RDB, or its AOF with --aof (or when the AOF file was named).

    Raises UsageError when the set has no such file.
    """
    named = Path(spec).name
    manifest = backup_set.manifest
    if manifest is None:
        name = backup_set.name
        is_aof = ".aof" in name
        if aof and not is_aof:
            raise UsageError(f"{name} is not an AOF backup", hint="name the .aof.gz file, or leave out --aof")
        if not is_aof and ".rdb" not in name:
            raise UsageError(f"{name} is not a Redis backup (expected .rdb, .rdb.gz, .aof or .aof.gz)")
        return Source(name, compression_of(name), is_aof, None)
    aof_files = [f for f in manifest.files if f.role == "aof" or ".aof" in f.name]
    if aof or any(f.name == named for f in aof_files):
        if not aof_files:
            raise UsageError(f"set {manifest.id} has no AOF file (it was taken with aof off)",
                             hint="restore its RDB (leave out --aof), or choose a set taken with --aof")
        chosen = aof_files[0]
        return Source(chosen.name, chosen.compression, True, chosen)
    rdbs = [f for f in manifest.files if f.role in ("rdb", "data") and ".rdb" in f.name] or \
           [f for f in manifest.files if ".rdb" in f.name]
    if not rdbs:
        raise UsageError(f"set {manifest.id} has no RDB file", hint="see `kkua-backup list redis`")
    return Source(rdbs[0].name, rdbs[0].compression, False, rdbs[0])


def decompress_to(ctx: JobContext, src: Path, compression: str, dest: Any, progress: Progress | None = None) -> int:
    """Read `src` back through the byte chain into the writable `dest` (a file or an AtomicFile); returns
    the bytes written."""
    total = 0
    for chunk in read_chain(src, compression, progress=progress, readers=ctx.readers_for(src.name)):
        dest.write(chunk)
        total += len(chunk)
    return total


def _is_tar(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(_TAR_MAGIC_OFFSET)
        return fh.read(5) == b"ustar"


def unpack_aof(archive: Path, dest: Path) -> tuple[Path, str]:
    """Unpack an AOF backup into `dest`: a tar of Redis 7's appendonlydir, or one legacy appendonly.aof.

    Returns (the folder or file to install, the appendfilename it was made with). Raises IntegrityError
    for a tar without an AOF manifest.
    """
    if not _is_tar(archive):
        target = dest / "appendonly.aof"
        archive.rename(target)
        return target, "appendonly.aof"
    unpacked = dest / "unpacked"
    with tarfile.open(archive) as tar:
        safe_extract(tar, unpacked, name=archive.name)
    archive.unlink()
    manifests = sorted(unpacked.rglob("*.manifest"))
    if not manifests:
        raise IntegrityError(f"{archive.name} holds no AOF manifest (*.manifest)",
                             hint="this is not an archive of Redis 7's appendonlydir; use another backup")
    folder = manifests[0].parent
    return folder, manifests[0].name.removesuffix(".manifest")


def safe_extract(tar: tarfile.TarFile, dest: Path, *, name: str) -> None:
    """Extract an AOF archive: only regular files and folders, each strictly inside `dest` (no absolute
    path, no `..`, no link, device or fifo), written 0640/0750. Raises IntegrityError naming the first
    member that is not like that. (tarfile's own `filter=` is missing from Debian 12's Python 3.11.2.)"""
    dest.mkdir(mode=0o750, exist_ok=True)
    root = dest.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if member.name.startswith("/") or ".." in Path(member.name).parts or not target.is_relative_to(root):
            raise IntegrityError(f"{name} holds {member.name!r}, a path outside its folder; nothing was extracted",
                                 hint="this is not an AOF archive made by kkua-backup; use another backup")
        if not (member.isfile() or member.isdir()):
            raise IntegrityError(f"{name} holds {member.name!r}, which is not a plain file or folder (a link or "
                                 "device); nothing was extracted",
                                 hint="this is not an AOF archive made by kkua-backup; use another backup")
    for member in members:
        target = root / member.name
        if member.isdir():
            target.mkdir(mode=0o750, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)


# ----------------------------------------------------------------------------------------------
# The target


def _connect(rc: RedisConfig, db: int = 0) -> redis.Redis:
    return redis_protocol.connect(rc, db=db, timeout=rc.connect_timeout)


def _keyspace_counts(client: redis.Redis) -> dict[int, int]:
    """Keys per database (databases with keys only), from INFO keyspace."""
    return {int(db): c for db, c in redis_protocol.key_counts(client.info("keyspace")).items()}


def _target_info(rc: RedisConfig) -> TargetInfo:
    """Flavor, version, readable RDB version, databases, hash-field TTLs, largest bulk and key counts of the
    target; raises ConnectionFailed."""
    try:
        with _connect(rc) as client:
            flavor, version, rdb_max, hfe = describe_server(client.info("server"))
            settings: dict[str, Any] = {}
            for name in ("databases", "proto-max-bulk-len"):
                with contextlib.suppress(redis.ResponseError):  # CONFIG may be denied to the restoring user
                    settings.update(client.config_get(name))
            keyspace = _keyspace_counts(client)
            replication = client.info("replication")
    except (redis.RedisError, OSError) as exc:
        raise redis_protocol.connection_error(rc, exc) from None
    if replication.get("role") == "slave":
        master = f"{replication.get('master_host', '?')}:{replication.get('master_port', '?')}"
        raise Refused(f"{rc.host}:{rc.port} is a read-only replica of {master}: what is restored into it would "
                      "be replaced by its master's data; nothing was changed",
                      hint=f"restore into its master ({master}); the replica copies it from there")
    return TargetInfo(flavor, version, rdb_max, int(settings.get("databases", 16)), hfe,
                      int(settings.get("proto-max-bulk-len", 512 << 20)), keyspace)


def check_rdb_version(ctx: JobContext, path: Path, source: Source, target: TargetInfo, mode: str = "file") -> int:
    """The RDB version of the backup file; raises VersionTooNew when the target cannot read it: in file
    mode when the server itself would load a newer RDB, in logical mode (which re-encodes what the target
    lacks) only for a version newer than this tool reads. Raises IntegrityError when the file is not an RDB."""
    magic, version = file_header(path, source.compression, ctx.readers_for(path.name))
    too_new_for_us = version > (NEWEST_VALKEY_RDB if magic == "VALKEY" else NEWEST_REDIS_RDB)
    if too_new_for_us or (mode == "file" and (version > target.rdb_max or (magic == "VALKEY") != (
            target.flavor == "valkey" and version >= 80))):
        who = "neither this tool nor the server" if too_new_for_us else "the server"
        raise VersionTooNew(f"{source.name} is RDB version {version} ({_rdb_release(version, magic)}) but {who} can "
                            f"read it: the server is {target.name} (reads up to {target.rdb_max}); nothing was "
                            "changed",
                            hint="restore it into a server at least as new as the one it came from"
                                 + ("" if too_new_for_us or mode == "logical" else
                                    ", or use --mode logical, which carries it over key by key"))
    return version


def _rdb_release(version: int, magic: str = "REDIS") -> str:
    """The server release that introduced an RDB version, for messages."""
    if magic == "VALKEY":
        return {80: "Valkey 9.0+", 81: "Valkey 9.2+"}.get(version, "a Valkey newer than 9.2")
    releases = {13: "Redis 8.6+", 12: "Redis 7.4+", 11: "Redis 7.2+ or Valkey 7.2/8.x", 10: "Redis 7.0+",
                9: "Redis 5.0+", 8: "Redis 4.0+", 7: "Redis 3.2+", 6: "Redis 2.6+"}
    return releases.get(version, "a Redis newer than 8.6" if version > 13 else "an old Redis")


def _counts(data: dict[Any, Any]) -> dict[int, int]:
    """Manifest key counts ({"0": n} or {"db0": n} or {"db0": {"keys": n}}) as {0: n}."""
    out: dict[int, int] = {}
    for name, value in data.items():
        db = int(str(name).removeprefix("db"))
        out[db] = int(value["keys"] if isinstance(value, dict) else value)
    return out


# ----------------------------------------------------------------------------------------------
# The restore's steps (their order is core/flows.restore's)


class RedisRestoreReport(RestoreReport):
    """A Redis restore: how (mode, AOF, --flush), the server and the RDB version, what the copy or the file
    swap did, and the keys the server holds afterwards (`differences`: how they differ from the backup)."""

    ORDER: ClassVar[tuple[str, ...]] = (
        "kind", "file", "id", "mode", "aof", "flush", "safety_backup", "rdb_version", "server_version", "check",
        "aof_handling", "moved_aside", "keys", "databases", "expired_skipped", "converted", "by_commands",
        "functions", "copy_seconds", "keys_per_second", "flushed", "notes", "aof_enabled", "counts_match",
        "differences", "seconds")
    mode: str
    aof: bool
    flush: bool
    rdb_version: int | None = None  # the set's RDB (not for an AOF)
    server_version: str | None = None
    aof_handling: str | None = None  # file mode
    moved_aside: list[str] = Field(default_factory=list)  # file mode
    keys: int = 0
    databases: dict[str, int] = Field(default_factory=dict)
    expired_skipped: int = 0
    converted: int = 0  # logical mode
    by_commands: int = 0
    functions: int = 0
    copy_seconds: float = 0.0
    keys_per_second: int = 0
    flushed: list[int] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    aof_enabled: bool | None = None  # file mode
    counts_match: bool | None = None  # None: no manifest to compare with
    differences: list[str] = Field(default_factory=list)

    @property
    def safety_file(self) -> str | None:
        return self.safety_backup.file if self.safety_backup is not None else None


@dataclass(frozen=True)
class _Request:
    """One restore as asked and as checked: the set and the file chosen from it, the target as found, the
    options, and the report being filled in."""

    ctx: JobContext
    backup_set: BackupSet
    source: Source
    target: TargetInfo
    report: RedisRestoreReport
    flush: bool
    safety_backup: bool


def _mode(rc: RedisConfig, mode: str | None) -> str:
    """The restore mode asked for (or configured); raises UsageError for an unknown one, and for file mode
    without the commands that stop and start Redis."""
    mode = mode or rc.restore_mode
    if mode not in ("logical", "file"):
        raise UsageError(f"unknown restore mode {mode!r}", hint="use --mode logical or --mode file")
    if mode == "file":
        missing = [f"redis.{name}" for name in ("stop_command", "start_command") if not getattr(rc, name)]
        if missing:
            raise UsageError(f"--mode file needs {' and '.join(missing)} in the config to stop and start Redis",
                             hint='e.g. stop_command = ["systemctl", "stop", "redis-server"]; or use --mode logical')
    return mode


class RedisRestore:
    """A restore of a Redis set into the configured server, logical or file mode.

    Raises UsageError (bad mode, missing stop/start commands, no such file), IntegrityError, VersionTooNew
    and NotConfirmed before anything changes; ConnectionFailed when the server cannot be reached; JobError
    when a step of the restore fails.
    """

    checks = "a decompress test and its header"

    def __init__(self, ctx: JobContext, spec: str, options: RestoreOptions) -> None:
        rc = ctx.config.redis
        self.ctx, self.options = ctx, options
        self.mode = _mode(rc, options.mode)
        self.backup_set = resolve(ctx.config.backup_dir, KIND, spec)
        self.source = choose_source(self.backup_set, spec, aof=options.aof)
        self.name = self.source.name
        self.target = f"{rc.host}:{rc.port}"
        self.requested = {"mode": self.mode, "flush": options.flush, "host": rc.host, "port": rc.port}
        self.target_field = {"server": self.target}
        self.report = RedisRestoreReport(kind=KIND, file=self.name, id=self.backup_set.id, mode=self.mode,
                                         aof=self.source.aof, flush=options.flush, safety_backup=None)
        self._earlier: str | None = None
        self._summary: RdbSummary | None = None
        self._req: _Request | None = None
        self._rdb: Callable[[Callable[[bytes], None]], int] | None = None
        self._copy: CopyPlan | None = None
        self._layout: FileLayout | None = None
        self._stamp = ""

    @property
    def req(self) -> _Request:
        assert self._req is not None, "the steps after check"
        return self._req

    def prepare(self) -> None:
        """A file-mode restore killed while Redis was stopped is said first."""
        self._earlier = interrupted_file_restore(self.ctx.config)
        if self._earlier:
            self.ctx.log.warning(self._earlier)

    def check(self) -> None:
        ctx, backup_set, source, report = self.ctx, self.backup_set, self.source, self.report
        path = backup_set.path(source.name)
        try:
            target = _target_info(ctx.config.redis)
        except ConnectionFailed as exc:
            if self._earlier:
                raise ConnectionFailed(f"{exc.message}; {self._earlier}", hint=exc.hint) from None
            raise
        try:
            if not source.aof:
                report.rdb_version = check_rdb_version(ctx, path, source, target, self.mode)
            report.server_version = target.version
            report.check, self._summary = check_files(ctx, backup_set)
        except (IntegrityError, VersionTooNew):
            # A reader stopped at damage before any sha256 was complete: a file of the right size that is
            # not the one the backup wrote is named as such first (a wrong size has its own message).
            for entry in backup_set.manifest.files if backup_set.manifest else []:
                entry_path = backup_set.path(entry.name)
                if entry_path.is_file() and entry_path.stat().st_size == entry.size:
                    same_sha256(entry_path, entry.name, entry.sha256)
            raise
        self._req = _Request(ctx, backup_set, source, target, report, flush=self.options.flush,
                             safety_backup=self.options.safety_backup)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Logical mode reads an RDB: the set's own, or, for an AOF (or an RDB our reader could not
        summarise), the one of a throwaway local server that loaded the backup, captured over the
        replication protocol."""
        ctx, source = self.ctx, self.source
        if self.mode != "logical":
            yield
            return
        if not source.aof and self._summary is not None:
            path = self.backup_set.path(source.name)

            def from_file(sink: Callable[[bytes], None]) -> int:
                size = 0
                for chunk in read_chain(path, source.compression, readers=ctx.readers_for(path.name)):
                    sink(chunk)
                    size += len(chunk)
                return size

            self._rdb = from_file
            yield
            return
        with tempfile.TemporaryDirectory(prefix="kkua-redis-restore-") as tmp, \
                _throwaway(ctx, self.backup_set, source, Path(tmp), self.req.target) as staging:
            staged = RedisConfig(host="127.0.0.1", port=staging.port, password=SecretStr(staging.password or ""),
                                 connect_timeout=ctx.config.redis.connect_timeout,
                                 restore_timeout=ctx.config.redis.restore_timeout)
            scanner = RdbScanner(f"the RDB of {source.name}")
            redis_protocol.sync_rdb(staged, scanner.feed)
            self._summary = scanner.finish()
            self._rdb = lambda sink: redis_protocol.sync_rdb(staged, sink).size
            yield

    def plan(self) -> RestorePlan:
        if self.mode == "logical":
            assert self._summary is not None
            self._copy, lines = _logical_plan(self.req, self._summary)
        else:
            self._layout, self._stamp, lines = _file_plan(self.req)
        return RestorePlan(self.backup_set, self.target, True, True, self.options.safety_backup, lines)

    def safety_backup(self) -> SafetyBackup:
        return _safety_backup(self.req)

    def apply(self) -> None:
        if self.mode == "logical":
            assert self._summary is not None and self._rdb is not None and self._copy is not None
            _copy_logical(self.req, self._summary, self._rdb, self._copy)
        else:
            assert self._layout is not None
            _file_mode(self.req, self._layout, self._stamp)

    def counts_after(self) -> list[str]:
        _compare_counts(self.backup_set, self.report)
        if self._earlier:
            _clear_marker(self.ctx)  # the server answered and holds what this restore put there
        return self.report.differences

    def undo_hint(self) -> str:
        safety = self.report.safety_file
        return (f"the data from before is in {safety} (undo with: {undo_command(safety)})" if safety
                else "no safety backup was taken (--no-safety-backup)")

    def finished(self) -> None:
        report = self.report
        self.ctx.log.info("restore finished", file=self.name, mode=self.mode, keys=report.keys,
                          databases=report.databases, seconds=report.seconds,
                          counts="match the backup" if report.counts_match else
                          "not compared (no manifest)" if report.counts_match is None else
                          "differ from the backup")


def _plan_lines(req: _Request, effect: str) -> list[str]:
    ctx, backup_set, source, target, safety = req.ctx, req.backup_set, req.source, req.target, req.safety_backup
    rc = ctx.config.redis
    m = backup_set.manifest
    made = m.created_at.strftime("%Y-%m-%d %H:%M:%S %z") if m else "unknown (no manifest)"
    details = details_of(backup_set)
    counts = _counts(details.keyspace) if details is not None else {}
    now = ", ".join(f"db{db}: {n}" for db, n in sorted(target.keyspace.items())) or "empty"
    lines = [f"Restore {source.name}",
             f"  made:      {made}, {human_bytes(backup_set.size)}"
             + (f", {sum(counts.values())} keys" if counts else ""),
             f"  into:      Redis {target.version} at {rc.host}:{rc.port} (now {now})",
             f"  effect:    {effect}",
             "  safety:    " + ("a backup of the current data is taken first" if safety
                                else "NO safety backup (--no-safety-backup)")]
    ctx.log.info("restore plan", file=source.name, made=made, host=rc.host, port=rc.port, effect=effect,
                 safety_backup=safety)
    return lines


def _safety_backup(req: _Request) -> SafetyBackup:
    """The safety backup, taken after the confirmation: the last step before the first change."""
    ctx, backup_set = req.ctx, req.backup_set
    rc = ctx.config.redis
    ctx.log.info("taking safety backup before restore", server=f"{rc.host}:{rc.port}")
    try:
        manifest = capture(ctx, backup_set.folder, prefix=PREFIXES[KIND]["safety"], set_type="safety")
    except KkuaError as exc:
        raise JobError(f"the safety backup before the restore failed, so nothing was changed: {exc}",
                       hint="fix what stopped it (see above), or pass --no-safety-backup if you are sure"
                       ) from None
    main = manifest.files[0]
    ctx.log.info("safety backup written", file=main.name, size=human_bytes(main.size))
    return SafetyBackup(file=main.name, size=main.size, sha256=main.sha256)


# ----------------------------------------------------------------------------------------------
# Logical mode


def _logical_plan(req: _Request, summary: RdbSummary) -> tuple[CopyPlan, list[str]]:
    """What a logical restore writes (plan_copy refuses here, before any change, what the target cannot
    hold), and the lines shown for the confirmation."""
    ctx, flush = req.ctx, req.flush
    plan = plan_copy(summary, req.target)
    written = sorted(summary.keys)
    effect = (f"keys of db {', '.join(map(str, written)) or '(none)'} are replaced by the backup's; "
              + (f"--flush empties db {', '.join(map(str, written))} first" if flush else
                 "other keys stay (merge; the backup wins on conflicts)"))
    lines = _plan_lines(req, effect)
    lines += [f"  note:      {note}" for note in plan.notes]
    for note in plan.notes:
        ctx.log.warning("restore note", note=note)
    return plan, lines


def _copy_logical(req: _Request, summary: RdbSummary, rdb: Callable[[Callable[[bytes], None]], int],
                  plan: CopyPlan) -> None:
    """Stream the RDB's keys into the target (after --flush of the databases it writes)."""
    ctx, source, target, report, flush = req.ctx, req.source, req.target, req.report, req.flush
    rc = ctx.config.redis
    written = sorted(summary.keys)
    flushed: list[int] = []
    try:
        if flush:
            for db in written:
                flushed.append(db)  # before the command: it may have run when its reply is lost
                ctx.log.info("database emptied before restore (--flush)", db=db,
                             keys_removed=flush_databases(rc, [db])[db])
        copy_started = time.monotonic()
        ctx.log.info("copying keys into the server", file=source.name, server=target.name,
                     converted_types=", ".join(sorted({summary.type_name(t) for t, how in plan.how.items()
                                                       if how != "native"})) or "none")
        stats = copy(rc, rdb, target, plan, name=source.name, interactive=ctx.interactive)
    except BaseException as exc:  # an error or a signal midway: say what the target holds and how to undo
        raise _logical_failure(req, written, flushed, exc) from None
    seconds = max(time.monotonic() - copy_started, 1e-6)
    total = sum(stats.restored.values())
    report.keys, report.databases = total, {str(db): n for db, n in sorted(stats.restored.items())}
    report.expired_skipped, report.converted, report.by_commands = stats.expired, stats.converted, stats.by_commands
    report.functions = stats.functions
    report.copy_seconds, report.keys_per_second = round(seconds, 2), round(total / seconds)
    report.flushed, report.notes = written if flush else [], plan.notes
    ctx.log.info("keys copied", keys=total, expired_skipped=stats.expired, converted=stats.converted,
                 size=human_bytes(stats.payload_bytes), seconds=round(seconds, 2),
                 keys_per_second=round(total / seconds))


def _logical_failure(req: _Request, written: list[int], flushed: list[int], exc: BaseException) -> KkuaError:
    """The error for a logical restore that stopped after its first change: what failed, what the target
    holds now, and the exact command that puts back the data from before (the safety backup)."""
    ctx, target, report = req.ctx, req.target, req.report
    rc = ctx.config.redis
    why = _reason(exc)
    try:
        with _connect(rc) as client:
            now = _keyspace_counts(client)
        holds = ", ".join(f"db{db}: {n} keys" for db, n in sorted(now.items())) or "no keys"
        holds = f"it holds {holds} now"
    except (redis.RedisError, OSError, KkuaError) as problem:
        holds = f"what it holds now could not be read ({_reason(problem)})"
    state = (f"{rc.host}:{rc.port} may be HALF-RESTORED: it stopped while writing the backup's keys of db "
             f"{', '.join(map(str, written))}"
             + (f" after db {', '.join(map(str, flushed))} had been emptied (--flush)" if flushed else
                " over its previous data (the backup's keys replace those of the same name)")
             + f"; {holds}")
    safety = report.safety_file
    if safety:
        undo = f"to undo, restore the data from before: {undo_command(safety)}"
        fresh = [db for db in written if db not in target.keyspace]
        if fresh:  # the undo empties only the databases the safety backup has keys in
            undo += (f" (db {', '.join(map(str, fresh))} had no keys before: empty "
                     f"{'it' if len(fresh) == 1 else 'them'} afterwards with FLUSHDB)")
        hint = f"{undo}; or run this restore again to finish it"
    else:
        hint = "no safety backup was taken (--no-safety-backup): run this restore again to finish it"
    first = exc.hint if isinstance(exc, KkuaError) and not isinstance(exc, Interrupted) else None
    if first:  # what to do about the cause (an ACL, memory) comes first; the undo is said here
        hint = first.replace("; the safety backup holds the data from before", "") + f"; {hint}"
    message = f"the restore stopped before it finished: {why}; {state}"
    ctx.log.error("restore stopped midway", error=why, state=state)
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return Interrupted(message, hint=hint)
    if isinstance(exc, IntegrityError):
        return IntegrityError(message, hint=hint)
    if isinstance(exc, ConnectionFailed):
        return ConnectionFailed(message, hint=hint)
    return JobError(message, hint=hint)


@contextlib.contextmanager
def _throwaway(ctx: JobContext, backup_set: BackupSet, source: Source, tmp: Path,
               target: TargetInfo) -> Iterator[LocalRedis]:
    """A local redis-server that has loaded the backup (RDB or AOF), stopped and removed afterwards."""
    folder = tmp / "server"
    folder.mkdir(mode=0o700)
    details = details_of(backup_set)
    recorded = _counts(details.keyspace) if details is not None else {}
    # Enough databases to load every one the backup has; a target with fewer is refused afterwards.
    settings = {"databases": str(max(16, target.databases, max(recorded, default=0) + 1)), "appendonly": "no",
                "repl-diskless-sync-delay": "0"}
    path = backup_set.path(source.name)
    progress = Progress(f"unpacking {source.name}", enabled=ctx.interactive)
    try:
        if source.aof:
            with (tmp / "aof.raw").open("wb") as out:
                decompress_to(ctx, path, source.compression, out, progress)
            installed, appendfilename = unpack_aof(tmp / "aof.raw", tmp)
            if installed.is_dir():
                installed.rename(folder / "appendonlydir")
                settings.update({"appendonly": "yes", "appenddirname": "appendonlydir",
                                 "appendfilename": appendfilename})
            else:
                # Redis 7 upgrades a single legacy appendonly.aof found in `dir` into appendonlydir.
                installed.rename(folder / "appendonly.aof")
                settings.update({"appendonly": "yes", "appendfilename": "appendonly.aof",
                                 "appenddirname": "appendonlydir"})
        else:
            with (folder / "dump.rdb").open("wb") as out:
                decompress_to(ctx, path, source.compression, out, progress)
            settings["dbfilename"] = "dump.rdb"
    finally:
        progress.clear()
    server = LocalRedis(folder, password=secrets.token_urlsafe(24), settings=settings, bin_dir=ctx.config.redis.bin_dir,
                        ready_timeout=ctx.config.redis.restore_timeout, die_with_parent=True)
    ctx.log.info("loading the backup into a local redis-server", file=source.name)
    try:
        server.start()
    except JobError as exc:
        raise JobError(f"the local redis-server could not load {source.name}: {exc.message}; nothing was changed",
                       hint="the backup may be damaged or from a newer Redis; check it with `kkua-backup verify`"
                       ) from None
    try:
        yield server
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------
# File mode


@dataclass
class FileLayout:
    """Where the server keeps its files (CONFIG GET), as seen from here."""

    dir: Path
    dbfilename: str
    appendonly: bool
    appenddirname: str | None
    appendfilename: str


def _layout(rc: RedisConfig) -> FileLayout:
    """Read dir, dbfilename and the AOF settings; raises UsageError when they cannot be used from here."""
    values: dict[str, str] = {}
    try:
        with _connect(rc) as client:
            for name in ("dir", "dbfilename", "appendonly", "appenddirname", "appendfilename"):
                reply = client.config_get(name)
                if name in reply:
                    values[name] = str(reply[name].decode() if isinstance(reply[name], bytes) else reply[name])
    except redis.ResponseError as exc:
        raise UsageError(f"--mode file needs CONFIG GET on {rc.host}:{rc.port}, which was refused: {exc}",
                         hint="allow it to the restoring user (ACL +config|get) or use --mode logical") from None
    except (redis.RedisError, OSError) as exc:
        raise redis_protocol.connection_error(rc, exc) from None
    folder = rc.data_dir or Path(values.get("dir", ""))
    if not folder.is_dir():
        raise UsageError(f"the server's data folder {folder} is not reachable from here",
                         hint="--mode file runs on the Redis host; set redis.data_dir to where that folder is "
                              "mounted, or use --mode logical")
    return FileLayout(folder, values.get("dbfilename", "dump.rdb"), values.get("appendonly") == "yes",
                      values.get("appenddirname"), values.get("appendfilename", "appendonly.aof"))


def _file_plan(req: _Request) -> tuple[FileLayout, str, list[str]]:
    """Where the server keeps its files, the stamp of what is moved aside, and the lines shown for the
    confirmation; raises UsageError for an AOF restore into a server with AOF off."""
    rc = req.ctx.config.redis
    source = req.source
    layout = _layout(rc)
    if source.aof and not layout.appendonly:
        raise UsageError("--aof --mode file needs appendonly yes on the server (with it off Redis loads the RDB "
                         "and ignores the AOF)", hint="use --mode logical, or restore the RDB")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if source.aof:
        how = "the backup's AOF is put in place of the server's AOF (moved aside)"
    elif layout.appendonly:
        how = ("AOF is on, so Redis would load its AOF and ignore the RDB: the AOF is moved aside and rebuilt "
               "from the backup's RDB (installed as the new AOF base file)")
    else:
        how = "the RDB is put in place of the server's RDB"
    effect = (f"Redis is stopped ({' '.join(rc.stop_command or [])}), everything in it is replaced by the "
              f"backup; {how}; then it is started ({' '.join(rc.start_command or [])})")
    return layout, stamp, _plan_lines(req, effect)


def _file_mode(req: _Request, layout: FileLayout, stamp: str) -> None:
    """Stop Redis, put the backup's files in place (what was there moved aside), start it again."""
    ctx, backup_set, source, report = req.ctx, req.backup_set, req.source, req.report
    rc = ctx.config.redis
    path = backup_set.path(source.name)
    undo = _Undo(layout.dir)
    # Written before the stop, removed once the server answers again: if we are killed (kill -9 runs no
    # `finally`) while Redis is down, the next `restore` and `status` say so (interrupted_file_restore).
    _write_marker(ctx, source, layout, report.safety_file)
    in_place = False
    try:
        # Stop first: a server stopped after the file is placed would save its own data over it (SIGTERM save).
        _run_command(ctx, rc, rc.stop_command or [], "stop")
        _wait_port_closed(rc)
        ctx.log.info("redis stopped", host=rc.host, port=rc.port)
        owner = _owner_of(layout)
        install = _Install(ctx, layout, stamp, owner, undo)
        moved: list[str] = []
        if source.aof:
            moved = _install_aof(install, path, source)
            report.aof_handling = "backup AOF installed"
        else:
            _install_rdb(install, path, source)
            if layout.appendonly:
                moved = _rebuild_aof_from_rdb(ctx, layout, stamp, owner, undo)
                report.aof_handling = "AOF moved aside and rebuilt from the restored RDB (as its base file)"
            else:
                report.aof_handling = "AOF off; nothing to do"
        report.moved_aside = moved
        in_place = True
        ctx.log.info("files in place", dir=str(layout.dir), aof=report.aof_handling,
                     moved_aside=", ".join(moved) or "-")
        _run_command(ctx, rc, rc.start_command or [], "start")
        _wait_loaded(rc)
    except BaseException as exc:  # whatever stopped us, Redis must not stay down
        raise _after_failure(ctx, layout, undo, exc, in_place=in_place) from None
    _clear_marker(ctx)
    try:
        with _connect(rc) as client:
            counts = _keyspace_counts(client)
            persistence = client.info("persistence")
    except (redis.RedisError, OSError) as exc:
        raise redis_protocol.connection_error(rc, exc) from None
    report.keys, report.databases = sum(counts.values()), {str(db): n for db, n in sorted(counts.items())}
    report.expired_skipped = int(persistence.get("rdb_last_load_keys_expired", 0) or 0)
    report.aof_enabled = bool(persistence.get("aof_enabled"))
    ctx.log.info("redis started with the restored data", keys=report.keys, aof_enabled=report.aof_enabled)


class _Undo:
    """What a file-mode restore changed in the server's folder, so a failure before the new files are all
    in place can put the previous ones back: the RDB kept under another name, AOFs moved aside, new paths."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rdb: tuple[Path, Path | None] | None = None  # (dbfilename, its previous file kept as) once placed
        self.moved: list[tuple[Path, Path]] = []  # (where it was, where it is now)
        self.created: list[Path] = []

    def kept(self) -> list[str]:
        """The names the previous files are kept under."""
        return ([self.rdb[1].name] if self.rdb and self.rdb[1] else []) + [aside.name for _, aside in self.moved]

    def rollback(self, ctx: JobContext) -> None:
        """Put the previous files back where they were; raises OSError when one cannot be."""
        for path in reversed(self.created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for was, aside in reversed(self.moved):
            aside.rename(was)
        if self.rdb is not None:
            dest, kept = self.rdb
            if kept is not None:
                os.replace(kept, dest)
            else:
                dest.unlink(missing_ok=True)
        fsync_dir(self.folder)
        ctx.log.info("the previous files were put back", dir=str(self.folder))
        self.created, self.moved, self.rdb = [], [], None


def _reason(exc: BaseException) -> str:
    """One line saying what stopped a step (without the hint, which was about something else)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, CommandFailed):
        return exc.message + (": " + " | ".join(exc.stderr_tail[-3:]) if exc.stderr_tail else "")
    if isinstance(exc, KkuaError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"unexpected {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _signals_deferred(ctx: JobContext) -> Iterator[list[int]]:
    """SIGTERM and SIGINT are noted, not acted on, while a stopped server is being started again (the
    start must not be cut short); the list holds the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        ctx.log.warning("signal received while Redis is being started again; stopping after that",
                        signal=signal.Signals(signum).name)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _answers(rc: RedisConfig) -> bool:
    """Whether something accepts connections on the server's port."""
    try:
        with socket.create_connection((rc.host, rc.port), timeout=2):
            return True
    except OSError:
        return False


def _after_failure(ctx: JobContext, layout: FileLayout, undo: _Undo, exc: BaseException, *,
                   in_place: bool) -> KkuaError:
    """A file-mode restore failed or was stopped: undo what is half done, start Redis again whatever happens
    (the start command has its own timeout), and return the error saying what failed and in which state
    the server is now, and where the previous files are."""
    rc = ctx.config.redis
    why = _reason(exc)
    server = f"Redis at {rc.host}:{rc.port}"
    start = " ".join(rc.start_command or [])
    safety = _safety_note(ctx)
    with _signals_deferred(ctx) as deferred:
        undone = ""
        changed = undo.rdb is not None or bool(undo.moved or undo.created)
        if not in_place and changed:
            try:
                undo.rollback(ctx)
            except OSError as problem:
                undone = f"the previous files could not all be put back ({_reason(problem)})"
        start_error = None
        if _answers(rc):
            ctx.log.info("redis answers", host=rc.host, port=rc.port)
        else:
            ctx.log.warning("starting Redis again after the failure", error=why)
            try:
                _run_command(ctx, rc, rc.start_command or [], "start")
                _wait_loaded(rc)
            except BaseException as second:  # reported in the message below
                start_error = _reason(second)
        up = start_error is None and _answers(rc)
    if not in_place and not undone and up:
        state = (f"{server} runs again with its previous data "
                 + ("(the restore was undone)" if changed else "(no file had been changed yet)"))
        _clear_marker(ctx)
    elif up:
        state = (f"{server} runs with the restored data; the previous files are kept in {layout.dir} as "
                 f"{', '.join(undo.kept()) or '(none: there were none)'}")
        _clear_marker(ctx)
    else:
        where = (f"{undone}; they are kept in {layout.dir} as {', '.join(undo.kept())}" if undone else
                 f"its previous data is back in place in {layout.dir}" if not in_place else
                 f"the restored files are in place in {layout.dir}; the previous ones are kept as "
                 f"{', '.join(undo.kept()) or '(none: there were none)'}")
        state = f"{server} is still DOWN ({start_error or 'it does not answer'}); {where}; start it with: {start}"
    message = f"the file-mode restore failed: {why}; {state}"
    back = not in_place and not undone and up  # nothing to undo: the server holds what it held
    hint = f"{safety}; see the Redis log" if safety and not back else "see the Redis log"
    ctx.log.error("file-mode restore failed", error=why, state=state)
    if deferred or isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return Interrupted(message, hint=hint)
    return JobError(message, hint=hint)


def _safety_note(ctx: JobContext) -> str:
    """Where the data from before this restore is, with the command that brings it back, when known."""
    marker = read_marker(ctx.config)
    name = (marker or {}).get("safety_backup")
    if not name:
        return ""
    return f"the data from before is in {name} (undo with: {undo_command(name)})"


def _write_marker(ctx: JobContext, source: Source, layout: FileLayout, safety: str | None) -> None:
    rc = ctx.config.redis
    path = marker_path(ctx.config)
    doc = {"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "file": source.name,
           "server": f"{rc.host}:{rc.port}", "dir": str(layout.dir), "start_command": rc.start_command or [],
           "safety_backup": safety}
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc).encode())
    except (OSError, KkuaError) as exc:  # only a notice for later; the restore itself does not need it
        ctx.log.warning("cannot record the restore in progress", file=str(path), error=str(exc))


def _clear_marker(ctx: JobContext) -> None:
    with contextlib.suppress(OSError):
        marker_path(ctx.config).unlink(missing_ok=True)




def _owner_of(layout: FileLayout) -> tuple[int, int]:
    """The uid/gid the server's files belong to (the RDB's, else its folder's), so Redis can read ours."""
    for candidate in (layout.dir / layout.dbfilename, layout.dir):
        with contextlib.suppress(OSError):
            st = candidate.stat()
            return st.st_uid, st.st_gid
    return os.getuid(), os.getgid()


def _chown(path: Path, owner: tuple[int, int]) -> None:
    if (os.getuid(), os.getgid()) != owner:
        with contextlib.suppress(PermissionError):
            os.chown(path, *owner)


@dataclass(frozen=True)
class _Install:
    """Where and how a file-mode restore puts files: the server's layout, the stamp of names moved aside,
    the owner the server's files have, and the record of what to undo."""

    ctx: JobContext
    layout: FileLayout
    stamp: str
    owner: tuple[int, int]
    undo: _Undo


def _install_rdb(install: _Install, src: Path, source: Source) -> None:
    """Decompress the backup atomically to dir/dbfilename, keeping the old file as NAME.before-restore-ID."""
    ctx, layout, stamp, owner, undo = install.ctx, install.layout, install.stamp, install.owner, install.undo
    dest = layout.dir / layout.dbfilename
    progress = Progress(f"writing {dest.name}", enabled=ctx.interactive)
    with AtomicFile(dest) as out:
        size = decompress_to(ctx, src, source.compression, out, progress)
        progress.clear()
        _chown(out.partial, owner)
        kept = None
        if dest.exists():
            kept = dest.with_name(f"{dest.name}.before-restore-{stamp}")
            os.link(dest, kept)  # the old data stays, under another name
            ctx.log.info("previous RDB kept", file=str(kept))
        try:
            out.commit()
        except BaseException:
            if kept is not None and dest.exists() and os.path.samefile(dest, kept):
                kept.unlink()  # the old file was not replaced: no second name for it
            raise
        undo.rdb = (dest, kept)
    ctx.log.info("RDB placed", file=str(dest), size=human_bytes(size))


def _aof_paths(layout: FileLayout) -> tuple[Path, Path]:
    """(Redis 7's AOF folder, the legacy single AOF file)."""
    return layout.dir / (layout.appenddirname or "appendonlydir"), layout.dir / layout.appendfilename


def _move_aside(ctx: JobContext, layout: FileLayout, stamp: str, undo: _Undo) -> list[str]:
    moved = []
    for current in _aof_paths(layout):
        if current.exists():
            aside = current.with_name(f"{current.name}.before-restore-{stamp}")
            current.rename(aside)
            undo.moved.append((current, aside))
            moved.append(aside.name)
            ctx.log.info("previous AOF moved aside", was=str(current), now=str(aside))
    fsync_dir(layout.dir)
    return moved


def _rebuild_aof_from_rdb(ctx: JobContext, layout: FileLayout, stamp: str, owner: tuple[int, int],
                          undo: _Undo) -> list[str]:
    """With appendonly yes Redis loads the AOF and ignores the RDB, and with no AOF at all it starts EMPTY
    (checked on 7.0.15). So the old AOF goes aside and a new one is made whose base is the restored RDB,
    exactly what Redis itself writes after a rewrite; Redis before 7 reads an RDB-preamble AOF the same way."""
    moved = _move_aside(ctx, layout, stamp, undo)
    rdb = layout.dir / layout.dbfilename
    if layout.appenddirname is None:  # Redis 6: one file, loaded as an RDB preamble
        target = layout.dir / layout.appendfilename
        undo.created.append(target)
        _link_or_copy(rdb, target)
        _chown(target, owner)
    else:
        folder = layout.dir / layout.appenddirname
        folder.mkdir(mode=0o750)
        undo.created.append(folder)
        _chown(folder, owner)
        base = f"{layout.appendfilename}.1.base.rdb"
        _link_or_copy(rdb, folder / base)
        manifest = folder / f"{layout.appendfilename}.manifest"
        manifest.write_text(f"file {base} seq 1 type b\n")
        manifest.chmod(0o640)
        _chown(manifest, owner)
        fsync_dir(folder)
    fsync_dir(layout.dir)
    ctx.log.info("AOF rebuilt from the restored RDB (it is the new AOF's base file)", dir=str(layout.dir))
    return moved


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same folder tree, same file system: no second copy of the data
    except OSError:
        shutil.copy2(src, dest)


def _install_aof(install: _Install, src: Path, source: Source) -> list[str]:
    """Put the backup's AOF (Redis 7's folder, or one legacy file) where the server looks for it."""
    ctx, layout, stamp, owner, undo = install.ctx, install.layout, install.stamp, install.owner, install.undo
    staging = Path(tempfile.mkdtemp(prefix=".kkua-aof-", dir=layout.dir))
    try:
        with (staging / "aof.raw").open("wb") as out:
            decompress_to(ctx, src, source.compression, out)
        installed, appendfilename = unpack_aof(staging / "aof.raw", staging)
        if installed.is_dir() and appendfilename != layout.appendfilename:
            ctx.log.warning("the backup's AOF files are named differently from appendfilename; Redis reads "
                            "them through their manifest", backup=appendfilename, server=layout.appendfilename)
        moved = _move_aside(ctx, layout, stamp, undo)
        folder, single = _aof_paths(layout)
        dest = folder if installed.is_dir() else single
        for path in [installed, *installed.rglob("*")] if installed.is_dir() else [installed]:
            _chown(path, owner)
        installed.rename(dest)
        undo.created.append(dest)
        fsync_dir(layout.dir)
        ctx.log.info("AOF placed", path=str(dest))
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_command(ctx: JobContext, rc: RedisConfig, argv: list[str], what: str) -> None:
    """Run the configured stop or start command; redis-cli gets the password in REDISCLI_AUTH only."""
    env: dict[str, str] = {}
    if rc.password is not None and Path(argv[0]).name == "redis-cli":
        env["REDISCLI_AUTH"] = rc.password.get_secret_value()
    ctx.log.info(f"running the {what} command", command=" ".join(argv))
    try:
        # A stop can take long: Redis saves its whole dataset before it exits (systemd's TimeoutStopSec
        # bounds that on its side); restore_timeout bounds it on ours.
        execute.run(argv, job=_JOB, env=env, timeout=rc.restore_timeout, what=f"redis.{what}_command")
    except Interrupted:
        raise
    except KkuaError as exc:
        # What state the server is in is said by the caller (_after_failure), which knows.
        raise JobError(f"redis.{what}_command failed: {_reason(exc)}",
                       hint=f"check redis.{what}_command and the Redis log") from None


def _wait_port_closed(rc: RedisConfig) -> None:
    """Wait until nothing listens on the server's port any more (the stop command may return early)."""
    deadline = time.monotonic() + rc.restore_timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((rc.host, rc.port), timeout=1):
                pass
        except OSError:
            return
        time.sleep(0.1)
    raise JobError(f"Redis at {rc.host}:{rc.port} still accepts connections {rc.restore_timeout} s after the "
                   "stop command; nothing was changed",
                   hint="check redis.stop_command (is it stopping this server?)")


def _wait_loaded(rc: RedisConfig) -> None:
    """Wait until the restarted server answers with its dataset loaded (INFO persistence loading:0)."""
    deadline = time.monotonic() + rc.restore_timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with _connect(rc) as client:
                if not int(client.info("persistence").get("loading", 1)):
                    return
                last = "still loading"
        except ConnectionFailed as exc:
            # Refused (not listening yet) and LOADING are waited out; a refused password is not.
            if "password" in exc.message:
                raise
            last = exc.message
        except redis.BusyLoadingError:
            last = "still loading"
        except (redis.RedisError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ConnectionFailed(f"Redis at {rc.host}:{rc.port} was not ready {rc.restore_timeout} s after the start "
                           f"command ({last})", hint="see the Redis log; the restored files are in place")


# ----------------------------------------------------------------------------------------------
# After


def _compare_counts(backup_set: BackupSet, report: RedisRestoreReport) -> None:
    """Compare key counts per database with what the backup recorded (a database may hold fewer keys by at
    most its keys with a TTL: they expire); the differences go into the report (refuse_different_result
    decides on them, as for every source)."""
    details = details_of(backup_set)
    if details is None or not details.has("keyspace"):
        report.counts_match = None
        report.differences = []
        return
    differences = compare_counts(details.keyspace, details.expires_per_db, report.databases)
    report.counts_match = not differences
    report.differences = differences
