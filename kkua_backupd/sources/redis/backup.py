"""Redis backups: the RDB captured over the replication protocol, plus AOF, INFO and CONFIG files.

A set is `redis_backup_ID.rdb.gz` (the RDB, first in the manifest, so it names the set),
`_memory.json.gz` (INFO as JSON), `_config.conf.gz` (CONFIG GET * as redis.conf lines, secrets redacted)
and, when asked, `.aof.gz` (the Redis 7 `appendonlydir/` as a tar, or the legacy single AOF). Every file
is written through the pipeline (compression, sha256, `.partial` then rename); the manifest comes last.
The RDB is checked (header, version, `redis-check-rdb` when installed) before the set exists.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from kkua_backupd.core.context import (
    CheckedSet,
    JobContext,
    VerifyReport,
    check_signed,
    checksums_only,
    verify_report,
)
from kkua_backupd.errors import (
    CommandFailed,
    IntegrityError,
    JobError,
    KeyMissing,
    KkuaError,
    UsageError,
    VersionTooNew,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.proc import execute
from kkua_backupd.safefs import open_folder
from kkua_backupd.sources import BackupOptions, RestoreOptions
from kkua_backupd.sources.redis.local import LocalRedis, find_redis_bin
from kkua_backupd.sources.redis.manifest import AofDetails, LoadTest, RdbDetails, RedisDetails, details_of
from kkua_backupd.sources.redis.protocol import (
    SyncRefused,
    bgsave,
    connect_checked,
    connection_error,
    keyspace,
    lastsave_time,
    max_rdb_version,
    plain_info,
    server_rdb_path,
    sync_rdb,
    where,
)
from kkua_backupd.sources.redis.rdb import RdbScanner, RdbSummary
from kkua_backupd.store.signing import sign
from kkua_backupd.store.storage import (
    PARTIAL_SUFFIX,
    PREFIXES,
    BackupSet,
    Kind,
    Manifest,
    ManifestFile,
    base_manifest,
    data_file_name,
    ensure_folder,
    new_set_id,
    now_local,
    write_manifest,
)
from kkua_backupd.stream.chain import (
    ChainWriter,
    check_file,
    compression_of,
    open_chain,
    read_chain,
    without_compression,
)
from kkua_backupd.stream.encrypt import encryption_of, without_encryption_suffix
from kkua_backupd.stream.pipeline import AtomicFile, FileInfo, file_chunks, storage_error

if TYPE_CHECKING:
    from kkua_backupd.sources.redis.restore import RedisRestore

KIND: Kind = "redis"
EXTENSIONS = {"rdb": ".rdb", "memory": "_memory.json", "config": "_config.conf", "aof": ".aof"}
REDACTED = "<redacted>"
# CONFIG parameters whose values are secrets (requirepass, masterauth, tls-key-file-pass, ...).
_SECRET_PARAM = re.compile(r"pass|auth|secret|token", re.IGNORECASE)
_ACL_SECRET = re.compile(r"(?<!\S)(?:#[0-9a-fA-F]{64}|>\S*|<\S*|![0-9a-fA-F]{64})(?!\S)")
_PLAIN_VALUE = re.compile(rb"^[A-Za-z0-9_./:@+,%-]+$")
_CHECK_KEYS = re.compile(r"\[info\] (\d+) keys read")
_CHECK_EXPIRES = re.compile(r"\[info\] (\d+) expires")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------
# Checking an RDB stream


class RdbChecker:
    """Checks an RDB as its bytes go by, with our own reader (`RdbScanner`: header, every record's framing,
    counts per database, the CRC-64 trailer), whatever the version of the host's redis tools. Where the
    local `redis-check-rdb` knows the RDB's version it reads the same bytes on its stdin in parallel, as a
    second opinion that costs no second pass."""

    def __init__(self, ctx: JobContext, name: str, group: execute.ProcessGroup, *, timeout: float) -> None:
        self.name = name
        self.size = 0
        self.scanner = RdbScanner(name)
        self.lines: list[str] = []
        self.check_rdb = "not installed"
        self._ctx = ctx
        self._timeout = timeout
        self._child: execute.Child | None = None
        self._reader: threading.Thread | None = None
        self._broken = False
        self._group = group
        self._started = False
        self._head = bytearray()

    def _start_check_rdb(self) -> None:
        """Start redis-check-rdb once the header is known, if it can read this RDB version."""
        self._started = True
        summary = self.scanner.summary
        exe = find_redis_bin("redis-check-rdb", self._ctx.config.redis.bin_dir)
        if exe is None:
            return
        local = local_server_version(self._ctx.config.redis.bin_dir)
        readable = max_rdb_version(local) if local else 0
        if summary.magic != "REDIS" or summary.version > readable:
            self.check_rdb = (f"skipped (the local redis-check-rdb {local or '?'} reads RDB up to {readable}; "
                              f"this is {summary.magic} {summary.version})")
            return
        self._child = self._group.spawn((str(exe), "/dev/stdin"), name="redis-check-rdb", stdin=execute.PIPE,
                                        stdout=execute.PIPE, timeout=self._timeout)
        assert self._child.stdin is not None
        # 1 MiB instead of 64 KiB: a 1 MiB chunk then goes to the checker in one write, not sixteen
        # round trips between it and us while the capture waits.
        execute.widen_pipe(self._child.stdin.fileno())
        self._reader = threading.Thread(target=self._read_output, name="redis-check-rdb-out", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._child is not None and self._child.stdout is not None
        for raw in iter(self._child.stdout.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip())

    def feed(self, data: bytes) -> None:
        """Check the next bytes; raises IntegrityError (or RdbNotUnderstood) as soon as something is wrong."""
        self.scanner.feed(data)
        self.size += len(data)
        if self._started:
            self._write(data)
            return
        self._head += data  # until the header says whether redis-check-rdb can read this version
        if self.scanner.summary.version:
            self._start_check_rdb()
            head, self._head = bytes(self._head), bytearray()
            self._write(head)

    def _write(self, data: bytes) -> None:
        if self._child is None or self._broken or not data:
            return
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(data)
        except (BrokenPipeError, ValueError):
            self._broken = True  # it stopped reading: its exit status and output say why

    def finish(self) -> dict[str, Any]:
        """End the check; returns {"rdb_version", "redis_check_rdb", "keys", "expires", "summary"}; raises
        IntegrityError if the RDB is short, malformed, fails its CRC-64 or fails redis-check-rdb."""
        summary = self.scanner.finish()
        result: dict[str, Any] = {"rdb_version": summary.version, "redis_check_rdb": self.check_rdb,
                                  "keys": summary.total_keys, "expires": sum(summary.expires.values()),
                                  "summary": summary}
        if self._child is None:
            return result
        assert self._child.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._child.stdin.close()
        try:
            self._group.wait(self._child, what="redis-check-rdb")
        except CommandFailed as exc:
            if self._reader is not None:
                self._reader.join(timeout=10)
            detail = [ln for ln in self.lines if "error" in ln.lower() or "unexpected" in ln.lower()] \
                or self.lines[-3:] or exc.stderr_tail[-3:]
            raise IntegrityError(f"{self.name} is not a valid RDB: redis-check-rdb: {' | '.join(detail[:3]) or exc}",
                                 hint="the backup is corrupt or cut short; it was not kept (use another one)") from None
        if self._reader is not None:
            self._reader.join(timeout=10)
        text = "\n".join(self.lines)
        keys = _CHECK_KEYS.search(text)
        if keys and int(keys.group(1)) != summary.total_keys:
            raise IntegrityError(f"{self.name}: redis-check-rdb read {keys.group(1)} keys but the RDB holds "
                                 f"{summary.total_keys}", hint="the backup is corrupt; use another one")
        result["redis_check_rdb"] = "ok"
        return result


class _RdbWriter:
    """The sink of a capture: raw RDB bytes into the checker and the byte chain."""

    def __init__(self, out: ChainWriter, checker: RdbChecker, progress: Progress) -> None:
        self.out = out
        self.checker = checker
        self.progress = progress

    def __call__(self, data: bytes) -> None:
        self.checker.feed(data)
        self.out.write(data)
        self.progress.add(len(data))


# ----------------------------------------------------------------------------------------------
# The RDB capture


@dataclass
class RdbCapture:
    """One captured RDB: the file written, how, and what the server held at that moment."""

    file: FileInfo
    compression: str
    method: str  # "sync" or "bgsave"
    form: str  # "len", "eof" (SYNC) or "file" (BGSAVE copy)
    raw_size: int
    rdb_version: int
    check: dict[str, Any]
    keyspace: dict[str, dict[str, int]]
    keyspace_before: dict[str, dict[str, int]]
    seconds: float
    wait_seconds: float
    fallback_reason: str | None = None


def _keyspace_now(client: redis.Redis) -> dict[str, dict[str, int]]:
    info: dict[str, Any] = client.info("keyspace")
    return keyspace(info)


def _capture_rdb(ctx: JobContext, client: redis.Redis, path: Path, compression: str) -> RdbCapture:
    """Capture the RDB into `path` (SYNC, else the configured fallback), checked before it is committed;
    raises JobError subclasses (nothing is left behind on failure)."""
    cfg = ctx.config.redis
    try:
        before = _keyspace_now(client)
    except redis.RedisError as exc:
        raise connection_error(cfg, exc) from None
    try:
        return _write_rdb(ctx, path, compression, "sync", lambda sink, state: _via_sync(ctx, client, sink, state),
                          before)
    except SyncRefused as exc:
        if cfg.sync_fallback == "none":
            raise JobError(f"{exc.message}, and redis.sync_fallback is \"none\"; no backup was made",
                           hint=f"allow replication for the backup user (ACL SETUSER {cfg.username or 'default'} "
                                "+sync +replconf) or set redis.sync_fallback = \"bgsave\"") from None
        ctx.log.warning("SYNC is not allowed; falling back to BGSAVE and a copy of the server's RDB file",
                        reason=exc.message)
        capture = _write_rdb(ctx, path, compression, "bgsave",
                             lambda sink, state: _via_bgsave(ctx, client, sink, state), before)
        capture.fallback_reason = exc.message
        return capture


def _write_rdb(ctx: JobContext, path: Path, compression: str, method: str,  # noqa: PLR0913, PLR0917 - capture options, grouped with the stream stages
               source: Callable[[Callable[[bytes], None], dict[str, Any]], None],
               before: dict[str, dict[str, int]]) -> RdbCapture:
    cfg = ctx.config.redis
    state: dict[str, Any] = {"form": "file", "wait": 0.0, "keyspace": None}
    progress = Progress(f"RDB from {cfg.host}:{cfg.port}", enabled=ctx.interactive)
    started = time.monotonic()
    with execute.ProcessGroup(KIND) as group, \
            open_chain(path, compression, cfg.compression_level, cfg.threads, ctx.stages) as out:
        checker = RdbChecker(ctx, path.name, group, timeout=cfg.capture_timeout)
        try:
            source(_RdbWriter(out, checker, progress), state)
        finally:
            progress.clear()
        check = checker.finish()
        info = out.close()
    seconds = time.monotonic() - started
    return RdbCapture(file=info, compression=compression, method=method, form=state["form"],
                      raw_size=checker.size, rdb_version=int(check["rdb_version"]), check=check,
                      keyspace=state["keyspace"] if state["keyspace"] is not None else before,
                      keyspace_before=before, seconds=seconds, wait_seconds=state["wait"])


def _via_sync(ctx: JobContext, client: redis.Redis, sink: Callable[[bytes], None], state: dict[str, Any]) -> None:
    cfg = ctx.config.redis
    started = time.monotonic()

    def on_start(form: str) -> None:
        # The snapshot is being (diskless) or was just (on disk) taken: the counts now are its counts
        # unless the data changed meanwhile, which comparing with the counts from before shows.
        state["form"] = form
        state["wait"] = time.monotonic() - started
        with contextlib.suppress(redis.RedisError):
            state["keyspace"] = _keyspace_now(client)
        ctx.log.info("server is sending its RDB", transfer="diskless ($EOF)" if form == "eof" else "from disk ($len)",
                     waited_s=round(state["wait"], 2))

    ctx.log.info("RDB capture started (replication protocol)", host=cfg.host, port=cfg.port)
    sync_rdb(cfg, sink, on_start=on_start, log=ctx.log)


def _via_bgsave(ctx: JobContext, client: redis.Redis, sink: Callable[[bytes], None], state: dict[str, Any]) -> None:
    cfg = ctx.config.redis
    path = server_rdb_path(client, cfg)
    if not path.parent.is_dir():
        raise JobError(f"BGSAVE fallback: the server's data folder {path.parent} is not reachable from here",
                       hint="run the backup on the Redis host, mount its dir and set redis.data_dir, or allow SYNC")
    result = bgsave(client, cfg, log=ctx.log)
    state["wait"] = result.seconds
    with contextlib.suppress(redis.RedisError):
        state["keyspace"] = _keyspace_now(client)
    ctx.log.info("BGSAVE finished; copying the server's RDB file", file=str(path),
                 lastsave=lastsave_time(result.lastsave), seconds=round(result.seconds, 2))
    try:
        fh = path.open("rb", buffering=0)  # one open file: a later save renames a new file over it, not into it
    except FileNotFoundError:
        raise JobError(f"BGSAVE fallback: {path} does not exist here although the server saved it",
                       hint="set redis.data_dir to where the server's dir is mounted") from None
    except OSError as exc:
        raise storage_error(exc, path, "read") from None
    with fh:
        mtime = int(os.fstat(fh.fileno()).st_mtime)
        if mtime + 2 < result.lastsave:
            raise JobError(f"BGSAVE fallback: {path} is older than the save the server just made "
                           f"({lastsave_time(mtime)} < {lastsave_time(result.lastsave)})",
                           hint="redis.data_dir points at another server's folder, or an old copy")
        while chunk := fh.read(1 << 20):
            sink(chunk)


# ----------------------------------------------------------------------------------------------
# INFO and CONFIG files


def memory_document(info: Mapping[str, Any] | None, error: str | None, captured_at: str) -> dict[str, Any]:
    """The `_memory.json` content: INFO server, memory, persistence and keyspace as typed values, plus
    per-database key counts (from INFO keyspace: no key is ever listed)."""
    doc: dict[str, Any] = {"captured_at": captured_at}
    if info is None:
        doc["error"] = error or "INFO unavailable"
        return doc
    sections = {"server": ("redis_version", "redis_mode", "os", "arch_bits", "process_id", "tcp_port",
                           "uptime_in_seconds", "executable", "config_file", "run_id"),
                "memory": ("used_memory", "used_memory_human", "used_memory_rss", "used_memory_peak",
                           "used_memory_peak_human", "used_memory_dataset", "maxmemory", "maxmemory_human",
                           "maxmemory_policy", "mem_fragmentation_ratio", "mem_allocator"),
                "persistence": ("loading", "rdb_changes_since_last_save", "rdb_bgsave_in_progress",
                                "rdb_last_save_time", "rdb_last_bgsave_status", "aof_enabled",
                                "aof_rewrite_in_progress", "aof_last_bgrewrite_status", "aof_last_write_status")}
    for section, keys in sections.items():
        doc[section] = {k: info[k] for k in keys if k in info}
    doc["info"] = plain_info(info)
    counts = keyspace(info)
    doc["keyspace"] = counts
    doc["total_keys"] = sum(c["keys"] for c in counts.values())
    return doc


def conf_value(value: str | bytes) -> str:
    """A value as redis.conf reads it: bare when it is a plain token, else double-quoted with the escapes
    Redis's config parser understands (\\\\, \\", \\n, \\r, \\t, \\xHH)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if data and _PLAIN_VALUE.match(data):
        return data.decode("ascii")
    out = []
    for byte in data:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def render_config(params: Mapping[str, str | bytes], *, acl: list[str] | None, header: list[str],
                  problems: list[str] | None = None) -> str:
    """CONFIG GET * as redis.conf lines, sorted; secret values (requirepass, masterauth, ...) and ACL
    passwords are replaced by a marker in a comment, so the file never holds a secret."""
    lines = [f"# {h}" for h in header]
    lines += [f"# {p}" for p in problems or []]
    lines.append("")
    for name in sorted(params):
        value = params[name]
        if _SECRET_PARAM.search(name) and value not in ("", b""):
            lines.append(f"# {name} {REDACTED}  (secret: not kept in backups; set it from your secret store)")
        else:
            lines.append(f"{name} {conf_value(value)}")
    if acl is not None:
        lines += ["", "# ACL users (ACL LIST), passwords redacted; recreate them with ACL SETUSER or an aclfile:"]
        lines += [f"# {_ACL_SECRET.sub(REDACTED, rule)}" for rule in acl]
    return "\n".join(lines) + "\n"


def _collect(ctx: JobContext, client: redis.Redis, what: str, call: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run one informational query; a refusal (ACL) becomes a logged note instead of a failed backup."""
    try:
        return call(), None
    except redis.RedisError as exc:
        reason = connection_error(ctx.config.redis, exc).message
        ctx.log.warning(f"{what} is not available; the set records why", reason=reason)
        return None, reason


def _write_small(ctx: JobContext, path: Path, data: bytes, compression: str) -> FileInfo:
    cfg = ctx.config.redis
    with open_chain(path, compression, cfg.compression_level, cfg.threads, ctx.stages) as out:
        out.write(data)
        return out.close()


# ----------------------------------------------------------------------------------------------
# AOF


@dataclass
class AofSource:
    """Where the server's AOF is, as seen from here."""

    form: str  # "multi-part" (Redis 7 appendonlydir) or "single" (appendonly.aof)
    base: Path  # the server's dir
    name: str  # appenddirname or appendfilename
    manifest: str | None = None  # the multi-part manifest's file name
    members: list[str] = field(default_factory=list)


def locate_aof(ctx: JobContext, client: redis.Redis) -> AofSource:
    """Find the AOF: appendonly must be on and its files reachable here (redis.data_dir overrides CONFIG
    GET dir); waits out an AOF rewrite in progress; raises JobError saying what is missing."""
    cfg = ctx.config.redis
    server = where(cfg)
    try:
        conf = {_text(k): _text(v) for k, v in client.config_get("append*").items()}
        if cfg.data_dir is None:
            conf["dir"] = _text(client.config_get("dir").get("dir", ""))
    except redis.RedisError as exc:
        raise JobError(f"AOF backup: cannot ask {server} where its AOF is: {connection_error(cfg, exc).message}",
                       hint="allow CONFIG GET for the backup user, or set redis.data_dir") from None
    if conf.get("appendonly") != "yes":
        raise JobError(f"AOF backup asked for, but {server} has AOF off (appendonly no): there is no AOF to back up",
                       hint="set redis.aof = false (BACKUP_AOF=false, no --aof), or enable appendonly on the server")
    base = cfg.data_dir if cfg.data_dir is not None else Path(conf["dir"])
    deadline = time.monotonic() + cfg.bgsave_timeout
    with contextlib.suppress(redis.RedisError):
        while True:  # a rewrite replaces the files we are about to read: let it finish first
            info: dict[str, Any] = client.info("persistence")
            if not int(info.get("aof_rewrite_in_progress", 0)) and not int(info.get("aof_rewrite_scheduled", 0)):
                break
            if time.monotonic() > deadline:
                raise JobError(f"AOF backup: an AOF rewrite on {server} did not finish within "
                               f"redis.bgsave_timeout ({cfg.bgsave_timeout} s)", hint="try again later")
            time.sleep(0.1)
    filename = conf.get("appendfilename", "appendonly.aof")
    if "appenddirname" in conf:  # Redis 7: a folder with a manifest and base/incr files
        folder = base / conf["appenddirname"]
        manifest = f"{filename}.manifest"
        if not (folder / manifest).is_file():
            raise JobError(f"AOF backup: {folder / manifest} is not reachable from here",
                           hint="run the backup on the Redis host, or mount the server's dir and set redis.data_dir")
        return AofSource("multi-part", base, conf["appenddirname"], manifest)
    if not (base / filename).is_file():
        raise JobError(f"AOF backup: {base / filename} is not reachable from here",
                       hint="run the backup on the Redis host, or mount the server's dir and set redis.data_dir")
    return AofSource("single", base, filename)


def aof_manifest_files(text: str) -> list[tuple[str, str]]:
    """(file name, type) of each line of a Redis 7 AOF manifest (`file NAME seq N type b|h|i`)."""
    found = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = shlex.split(line)
        pairs = dict(zip(parts[::2], parts[1::2], strict=False))
        if "file" in pairs:
            found.append((pairs["file"], pairs.get("type", "")))
    return found


class _ChainFile(io.RawIOBase):
    """A write-only file object over the byte chain (for tarfile's stream mode)."""

    def __init__(self, out: ChainWriter) -> None:
        super().__init__()
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.out.write(chunk)
        return len(chunk)


def write_aof(ctx: JobContext, source: AofSource, path: Path, compression: str) -> tuple[FileInfo, AofDetails]:
    """Archive the AOF into `path`: the multi-part folder as a tar (manifest first, then the base and incr
    files it names), the single file as it is; raises JobError if the files change under us."""
    cfg = ctx.config.redis
    details = AofDetails(form=source.form, name=source.name)
    with open_chain(path, compression, cfg.compression_level, cfg.threads, ctx.stages) as out:
        try:
            if source.form == "single":
                for chunk in file_chunks(source.base / source.name):
                    out.write(chunk)
            else:
                folder = source.base / source.name
                assert source.manifest is not None
                manifest = (folder / source.manifest).read_bytes()
                members = [source.manifest]
                with tarfile.open(fileobj=_ChainFile(out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    entry = tarfile.TarInfo(f"{source.name}/{source.manifest}")
                    entry.size, entry.mtime, entry.mode = len(manifest), int(time.time()), 0o640
                    tar.addfile(entry, io.BytesIO(manifest))
                    for name, kind in aof_manifest_files(manifest.decode("utf-8", "replace")):
                        member = folder / name
                        if kind == "h" and not member.exists():
                            continue  # history files are deleted once a rewrite is done; not needed to load
                        try:
                            tar.add(member, arcname=f"{source.name}/{name}", recursive=False)
                        except FileNotFoundError:
                            raise JobError(f"AOF backup: {member} disappeared while it was archived (an AOF "
                                           "rewrite ran)", hint="run the backup again") from None
                        members.append(name)
                details.members = members
            details.bytes = out.raw
        except OSError as exc:
            raise storage_error(exc, source.base / source.name, "read") from None
        return out.close(), details


# ----------------------------------------------------------------------------------------------
# Backup


def _make_set(ctx: JobContext, folder: Path, *, prefix: str, set_type: str, want_aof: bool,  # noqa: PLR0913 - keyword-only options, typed with the flows
              extras: bool) -> Manifest:
    """Capture a set into `folder` and write its manifest; on failure, remove the files this run made."""
    cfg = ctx.config.redis
    compression = cfg.compression
    started = time.monotonic()
    made: list[Path] = []
    client = connect_checked(cfg)
    try:
        server_info, info_error = _collect(ctx, client, "INFO", lambda: client.info("all"))
        version = str(server_info.get("redis_version", "unknown")) if server_info else "unknown"
        aof_source = locate_aof(ctx, client) if want_aof else None
        set_id, created = new_set_id(folder, prefix)
        ctx.log.info("backup started", id=set_id, server_version=version, compression=compression,
                     aof="yes" if want_aof else "no")

        keys = ctx.keys

        def name(role: str) -> Path:
            return folder / data_file_name(prefix, set_id, EXTENSIONS[role], compression, keys.extension)

        files: list[ManifestFile] = []
        side: _SideFiles | None = None
        try:
            if extras:  # written while the RDB streams: their queries and fsyncs then add no time of their own
                side = _SideFiles(ctx, client, (server_info, info_error, version), name, compression)
            rdb = _capture_rdb(ctx, client, name("rdb"), compression)
            made.append(folder / rdb.file.name)
            files.append(ManifestFile(name=rdb.file.name, size=rdb.file.size, sha256=rdb.file.sha256, role="rdb",
                                      compression=compression))
            ctx.log.info("RDB captured", file=rdb.file.name, method=rdb.method, rdb_version=rdb.rdb_version,
                         redis_check_rdb=rdb.check["redis_check_rdb"], bytes=rdb.file.size,
                         uncompressed=human_bytes(rdb.raw_size), seconds=round(rdb.seconds, 2),
                         rate=f"{human_bytes(rdb.raw_size / max(rdb.seconds, 1e-6))}/s")
            if side is not None:
                for role, info in side.publish():
                    files.append(ManifestFile(name=info.name, size=info.size, sha256=info.sha256, role=role,
                                              compression=compression))
            aof_details: AofDetails | None = None
            aof_seconds = 0.0
            if aof_source is not None:
                aof_started = time.monotonic()
                info, aof_details = write_aof(ctx, aof_source, name("aof"), compression)
                aof_seconds = time.monotonic() - aof_started
                made.append(folder / info.name)
                files.append(ManifestFile(name=info.name, size=info.size, sha256=info.sha256, role="aof",
                                          compression=compression))
                ctx.log.info("AOF archived", file=info.name, form=aof_details.form, bytes=info.size,
                             members=len(aof_details.members or []) or None)
            manifest = _manifest(prefix, set_type, set_id, created, files, rdb, version, compression, aof_details,
                                 timings={"capture_seconds": round(rdb.seconds, 3),
                                          "server_wait_seconds": round(rdb.wait_seconds, 3),
                                          "aof_seconds": round(aof_seconds, 3),
                                          "total_seconds": round(time.monotonic() - started, 3)})
            manifest = sign(manifest.model_copy(update={
                "encryption": keys.record(),
                "files": [f.model_copy(update={"encryption": encryption_of(f.name)}) for f in manifest.files]}),
                keys.signing_key)
            write_manifest(folder, manifest)
        except BaseException:
            if side is not None:
                made += side.stop()
            for path in made:  # files of this set that will never get a manifest: ours to remove
                path.unlink(missing_ok=True)
            raise
    finally:
        client.close()
    return manifest


class _SideFiles:
    """The INFO and CONFIG files of a set, written on a thread of their own while the RDB is captured.

    They are written complete and fsynced, but under `NAME.partial`: a run killed during the capture leaves
    only partial files (which the next run removes), never a side file without its RDB. `publish`, called
    once the RDB is committed, waits for them, renames them to their names and returns [(role, FileInfo)]
    in the manifest's order (memory, config), or raises what stopped them; `stop` (after a failed capture)
    waits for them and returns the paths they wrote, for the caller to remove."""

    def __init__(self, ctx: JobContext, client: redis.Redis, server: tuple[Mapping[str, Any] | None, str | None, str],
                 name: Callable[[str], Path], compression: str) -> None:
        self._ctx = ctx
        self._client = client
        self._server = server
        self._name = name
        self._compression = compression
        self._written: list[tuple[str, FileInfo]] = []
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-side-files", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx, compression = self._ctx, self._compression
        server_info, info_error, version = self._server
        try:
            stamp = now_local().isoformat()
            doc = memory_document(server_info, info_error, stamp)
            info = _write_small(ctx, self._unpublished("memory"),
                                (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), compression)
            self._written.append(("memory", info))
            if self._stopped.is_set():
                return
            text = _config_text(ctx, self._client, version, stamp)
            self._written.append(("config", _write_small(ctx, self._unpublished("config"), text.encode("utf-8"),
                                                         compression)))
        except BaseException as exc:  # handed to the capturing thread, which raises it
            self._error = exc

    def _unpublished(self, role: str) -> Path:
        path = self._name(role)
        return path.with_name(path.name + PARTIAL_SUFFIX)

    def publish(self) -> list[tuple[str, FileInfo]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        published = []
        folder = self._name("memory").parent
        try:
            fd = open_folder(folder)
        except OSError as exc:
            raise storage_error(exc, folder, "open") from None
        try:
            for role, info in self._written:
                final = self._name(role).name
                os.rename(info.name, final, src_dir_fd=fd, dst_dir_fd=fd)
                published.append((role, FileInfo(final, info.size, info.sha256)))
            # the renames are made durable by write_manifest's one folder fsync before the manifest (decision 0020)
        except OSError as exc:
            raise storage_error(exc, folder) from None
        finally:
            os.close(fd)
        return published

    def stop(self) -> list[Path]:
        self._stopped.set()  # no further file is started; the one being written is finished, then removed
        self._thread.join()
        return [path for role, _ in self._written for path in (self._name(role), self._unpublished(role))]


def _config_text(ctx: JobContext, client: redis.Redis, version: str, stamp: str) -> str:
    params, error = _collect(ctx, client, "CONFIG GET *", lambda: client.config_get("*"))
    acl, acl_error = _collect(ctx, client, "ACL LIST", client.acl_list)
    cfg = ctx.config.redis
    header = [f"CONFIG GET * of {cfg.host}:{cfg.port} (Redis {version}) at {stamp}, written by kkua-backup.",
              f"Secret values are replaced by {REDACTED}; set them again before using this file."]
    problems = [f"CONFIG GET * was refused: {error}"] if error else []
    if acl_error:
        problems.append(f"ACL LIST was refused: {acl_error}")
    values = {_text(k): v for k, v in (params or {}).items()}
    return render_config(values, acl=[_text(r) for r in acl] if acl is not None else None, header=header,
                         problems=problems)


def _manifest(prefix: str, set_type: str, set_id: str, created: Any, files: list[ManifestFile], rdb: RdbCapture,  # noqa: PLR0913, PLR0917 - manifest fields, typed with the flows
              version: str, compression: str, aof: AofDetails | None, *, timings: dict[str, float]) -> Manifest:
    summary: RdbSummary = rdb.check["summary"]
    # Counts per database come from the RDB itself: exactly what the backup holds (keys already past their
    # expiry included, which a server drops when it loads them).
    details = RedisDetails(
        server_version=version, rdb_version=rdb.rdb_version, capture=rdb.method, transfer=rdb.form,
        compression=compression, uncompressed_bytes=rdb.raw_size,
        keyspace={str(db): n for db, n in sorted(summary.keys.items())},
        expires_per_db={str(db): n for db, n in sorted(summary.expires.items())},
        keys=summary.total_keys, expires=sum(summary.expires.values()),
        keyspace_exact=True, keyspace_info={db: c["keys"] for db, c in rdb.keyspace.items()},
        redis_check_rdb=rdb.check["redis_check_rdb"], rdb=RdbDetails.model_validate(summary.as_details()),
    )
    if rdb.fallback_reason:
        details.sync_refused = rdb.fallback_reason
    if aof is not None:
        details.aof = aof
    data = base_manifest(KIND, set_type, prefix, set_id, created)
    data.update(finished_at=now_local(), details=details.stored(), timings=timings, files=files)
    return Manifest.model_validate(data)


class RedisSource:
    """The Redis data source of the flows (core/flows.py): the RDB over the replication protocol (or BGSAVE),
    INFO and CONFIG as side files, and the AOF when asked."""

    kind: Kind = KIND

    def capture(self, ctx: JobContext, folder: Path, options: BackupOptions, started: float) -> Manifest:
        """Back up the configured Redis server into `folder` (RDB, INFO, CONFIG, and the AOF if asked) and write
        the manifest; a failed run leaves no file behind (a run killed outright leaves only `.partial` files,
        removed by the next run)."""
        want_aof = ctx.config.redis.aof if options.aof is None else options.aof
        return _make_set(ctx, folder, prefix=PREFIXES[KIND]["backup"], set_type="backup", want_aof=want_aof,
                         extras=True)

    def finished(self, ctx: JobContext, manifest: Manifest, started: float) -> None:
        details = manifest.details_as(RedisDetails)
        if details.capture == "bgsave":
            ctx.log.warning("this backup used BGSAVE because SYNC is not allowed", reason=details.sync_refused)
        ctx.log.info("backup finished", file=manifest.files[0].name, id=manifest.id,
                     bytes=sum(f.size for f in manifest.files), keys=details.keys,
                     databases=len(details.keyspace), capture=details.capture,
                     rdb_version=details.rdb_version, seconds=round(time.monotonic() - started, 2))

    def verify_set(self, ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
        return verify_set(ctx, backup_set, restore_test=restore_test)

    def restorer(self, ctx: JobContext, spec: str, options: RestoreOptions) -> RedisRestore:
        from kkua_backupd.sources.redis.restore import RedisRestore  # it builds on this module's capture
        return RedisRestore(ctx, spec, options)


SOURCE = RedisSource()


def capture(ctx: JobContext, folder: Path, *, prefix: str, set_type: str) -> Manifest:
    """An RDB-only set of the configured server in `folder` (the safety backup before a restore), with its
    manifest; the caller holds the redis lock. Raises like `backup`."""
    ensure_folder(folder)
    return _make_set(ctx, folder, prefix=prefix, set_type=set_type, want_aof=False, extras=False)


# ----------------------------------------------------------------------------------------------
# Checking and verifying sets


def set_files(backup_set: BackupSet) -> list[tuple[str, str, str, ManifestFile | None]]:
    """(name, role, compression, manifest entry) of each file of a set; a file without a manifest is
    taken by its name (.rdb[.gz|.zst] is an RDB, .aof[...] an AOF)."""
    if backup_set.manifest is not None:
        return [(f.name, f.role, f.compression, f) for f in backup_set.manifest.files]
    name = backup_set.name
    plain_name = without_encryption_suffix(name)
    compression = compression_of(plain_name)
    stem = without_compression(plain_name)
    role = {".rdb": "rdb", ".aof": "aof"}.get(Path(stem).suffix)
    if role is None:
        raise UsageError(f"{name} is not a Redis backup (expected .rdb, .rdb.gz, .rdb.zst or .aof.gz)")
    return [(name, role, compression, None)]


def _check_rdb_file(ctx: JobContext, path: Path, compression: str, progress: Progress) -> dict[str, Any]:
    source = read_chain(path, compression, progress=progress, readers=ctx.readers_for(path.name))
    with execute.ProcessGroup(KIND) as group:
        checker = RdbChecker(ctx, path.name, group, timeout=ctx.config.redis.restore_timeout)
        for chunk in source:
            checker.feed(chunk)
        result = checker.finish()
    result.update(size=source.size, sha256=source.sha256, uncompressed=checker.size)
    return result


def check_set(ctx: JobContext, backup_set: BackupSet) -> CheckedSet:
    """`check_files` as a JSON-ready report: {"files": [{name, role, size, sha256, uncompressed, checksum,
    ...}], "rdb_version": n | None}."""
    return check_files(ctx, backup_set)[0]


def check_files(ctx: JobContext, backup_set: BackupSet) -> tuple[CheckedSet, RdbSummary | None]:
    """Check every file of a set against its manifest (size, sha256) and decompress it fully; the RDB is
    read through by our own reader (every record, counts, CRC-64), and by `redis-check-rdb` too where the
    local one knows its version. Raises IntegrityError on any difference, RdbNotUnderstood for a type this
    tool does not know. This gates a restore and is what `verify` runs; returns the report and what the
    read of the RDB found."""
    results: list[dict[str, Any]] = []
    version: int | None = None
    summary: RdbSummary | None = None
    for name, role, compression, expected in set_files(backup_set):
        path = backup_set.path(name)
        if not path.is_file():
            raise IntegrityError(f"{path} is missing", hint="the set is incomplete; use another backup")
        size = path.stat().st_size
        if expected is not None and size != expected.size:
            raise IntegrityError(f"{name} has {size} bytes but its manifest says {expected.size}",
                                 hint="the file was truncated or replaced; use another backup")
        progress = Progress(f"checking {name}", total=size, enabled=ctx.interactive)
        try:
            if role == "rdb":
                entry = _check_rdb_file(ctx, path, compression, progress)
                version = entry["rdb_version"]
                summary = entry.pop("summary")
                entry["rdb"] = summary.as_details()
            else:
                found = check_file(path, compression, progress, ctx.readers_for(path.name))
                entry = {"size": found.size, "sha256": found.sha256, "uncompressed": found.uncompressed}
        except (IntegrityError, VersionTooNew):
            # The reader (gzip/zstd framing, the RDB's CRC-64, a type byte it does not know) stops at a flipped
            # byte before the sha256 is complete: a file that is not the one the backup wrote is named first.
            if expected is not None:
                same_sha256(path, name, expected.sha256)
            raise
        finally:
            progress.clear()
        if expected is not None and entry["sha256"] != expected.sha256:
            raise IntegrityError(f"{name} does not match its checksum (sha256 {entry['sha256'][:12]}..., "
                                 f"manifest {expected.sha256[:12]}...)", hint="the file is corrupt; use another backup")
        entry.update(name=name, role=role, checksum="ok" if expected is not None else "no manifest")
        results.append(entry)
        ctx.log.info("file checked", file=name, size=human_bytes(entry["size"]),
                     checksum="ok" if expected is not None else "not recorded (no manifest)", decompress="ok",
                     rdb_version=entry.get("rdb_version"), keys=entry.get("keys"), crc64=(entry.get("rdb") or {}).get(
                         "crc64"), redis_check_rdb=entry.get("redis_check_rdb"))
    return CheckedSet(files=results, rdb_version=version), summary


def same_sha256(path: Path, name: str, expected: str) -> None:
    """Raise IntegrityError (the checksum message) when the file's sha256 differs from its manifest's."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    found = digest.hexdigest()
    if found != expected:
        raise IntegrityError(f"{name} does not match its checksum (sha256 {found[:12]}..., "
                             f"manifest {expected[:12]}...)", hint="the file is corrupt; use another backup")


@functools.lru_cache(maxsize=8)
def local_server_version(bin_dir: Path | None = None) -> str | None:
    """The version of the local `redis-server` (what a throwaway server would run), or None."""
    exe = find_redis_bin("redis-server", bin_dir)
    if exe is None:
        return None
    match = re.search(r"v=(\d+\.\d+\.\d+)", execute.run((str(exe), "--version"), job=KIND, timeout=30).decode())
    return match.group(1) if match else None


def compare_counts(expected: Mapping[str, int], expires: Mapping[str, int], found: Mapping[str, int]) -> list[str]:
    """Differences between the key counts of a backup and of a server that loaded it, one line each; a
    database may hold fewer keys by at most its keys with a TTL (they expire), never more."""
    problems = []
    for db in sorted(set(expected) | set(found), key=int):
        want, got = int(expected.get(db, 0)), int(found.get(db, 0))
        if got > want or got < want - int(expires.get(db, 0)):
            problems.append(f"db{db}: {got} keys, expected {want}")
    return problems


class _DecodeEverything:
    """A `KeySink` that decodes every value as a logical restore re-encoding it would (every listpack,
    ziplist, intset and stream node walked), so a restore test finds what only a load would find."""

    def __init__(self, valkey: bool) -> None:
        # Imported here: a backup never decodes values, and the module costs its start-up time.
        from kkua_backupd.sources.redis.values import decode

        self._decode = decode
        self.valkey = valkey
        self.values = 0

    def key(self, db: int, key: bytes, rdb_type: int, value: bytes, expire_ms: int | None) -> None:
        self._decode(rdb_type, value, valkey=self.valkey)
        self.values += 1

    def big_start(self, db: int, key: bytes, expire_ms: int | None, header: bytes, stored: int) -> None:
        self.values += 1

    def big_piece(self, data: bytes) -> None:
        return

    def big_end(self) -> None:
        return

    def function(self, code: bytes) -> None:
        return


def test_load(ctx: JobContext, backup_set: BackupSet, summary: RdbSummary | None = None) -> LoadTest:
    """The restore test of a set: every value of its RDB decoded by the reader a logical restore uses (no
    local server needed), key counts per database compared with the manifest, and, where a local
    redis-server can read this RDB, a load into a throwaway one with its counts compared too. Returns the
    outcome (ok, keys, databases, seconds, problems, error, loaded); never raises for a backup that does not
    pass (that is the result)."""
    started = time.monotonic()
    outcome = LoadTest(ok=False, error=None, problems=[], loaded=None)
    name, _, compression, expected = next(f for f in set_files(backup_set) if f[1] == "rdb")
    details = details_of(backup_set)
    folder = Path(tempfile.mkdtemp(prefix="kkua-verify-redis-"))
    try:
        valkey = summary.valkey if summary is not None else False
        decoder = _DecodeEverything(valkey)
        scanner = RdbScanner(name, decoder, examples=0)
        for chunk in read_chain(backup_set.path(name), compression, expected=expected, readers=ctx.readers_for(name)):
            scanner.feed(chunk)
        read = scanner.finish()
        found = {str(db): n for db, n in sorted(read.keys.items())}
        outcome.keys, outcome.databases, outcome.values_decoded = read.total_keys, found, decoder.values
        if details is not None and details.has("keyspace"):
            outcome.problems = compare_counts(details.keyspace, details.expires_per_db, found)
        ctx.log.info("every value decoded", file=name, values=decoder.values, crc64=read.checksum)
        local = local_server_version(ctx.config.redis.bin_dir)
        readable = max_rdb_version(local) if local else 0
        if local is None or read.magic != "REDIS" or read.version > readable:
            outcome.loaded = (f"not loaded into a server: the local redis-server {local or '(none)'} reads RDB up "
                                 f"to {readable}, this is {read.magic} {read.version}")
        else:
            with AtomicFile(folder / "dump.rdb", 0o600) as out:
                for chunk in read_chain(backup_set.path(name), compression, readers=ctx.readers_for(name)):
                    out.write(chunk)
                out.commit()
            ctx.log.info("test load started", file=name, server=f"redis-server {local}")
            with LocalRedis(folder, settings={"dbfilename": "dump.rdb"},
                            bin_dir=ctx.config.redis.bin_dir) as server, server.client() as client:
                loaded = {db: c["keys"] for db, c in keyspace(client.info("keyspace")).items()}
            outcome.loaded = f"loaded by redis-server {local}"
            outcome.problems += [f"loaded by redis-server: {p}" for p in compare_counts(
                found, {str(db): n for db, n in read.expires.items()}, loaded)]
        outcome.ok = not outcome.problems
        if outcome.problems:
            outcome.error = "; ".join(outcome.problems[:5])
    except (KkuaError, redis.RedisError, OSError) as exc:
        outcome.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    outcome.seconds = round(time.monotonic() - started, 2)
    if outcome.ok:
        ctx.log.info("test load passed", file=name, keys=outcome.keys, seconds=outcome.seconds,
                     server=outcome.loaded)
    else:
        ctx.log.error("test load failed", file=name, error=outcome.error)
    return outcome


def verify_set(ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
    """`verify`: check the files and, if asked, load the RDB into a throwaway server and compare key counts."""
    signature = check_signed(ctx, backup_set)
    try:
        report, summary = check_files(ctx, backup_set)
    except KeyMissing as missing:  # an encrypted set on a host without its key: the checksums still say much
        if restore_test:
            raise
        checked = checksums_only(ctx, backup_set, missing)
        checked.signature = signature
        return verify_report(backup_set, checked, None)
    report.signature = signature
    return verify_report(backup_set, report,
                         (lambda: test_load(ctx, backup_set, summary)) if restore_test else None)
