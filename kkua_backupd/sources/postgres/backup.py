"""A backup: pg_dump through the byte chain into the set, its row counts taken from the same exported
snapshot, and the manifest that records them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from kkua_backupd.config import PostgresConfig
from kkua_backupd.core.context import (
    JobContext,
)
from kkua_backupd.errors import (
    CommandFailed,
    JobError,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.proc import execute
from kkua_backupd.safefs import list_folder, unlink_in
from kkua_backupd.sources.postgres.client import (
    DIRECTORY_MEMBER_RE,
    EXTENSIONS,
    KIND,
    ServerInfo,
    child_env,
    connect,
    find_bin_dir,
    in_threads,
    pg_dump_argv,
    server_info,
    tool_version,
)
from kkua_backupd.sources.postgres.manifest import PostgresDetails, RestoreTest, TableStats
from kkua_backupd.sources.postgres.pg_sql import SqlStream
from kkua_backupd.sources.postgres.stats import PLAIN_IDENT, TABLE_KEYS, count_objects, referenced_roles, table_stats
from kkua_backupd.sources.postgres.verify import sql_problems
from kkua_backupd.store.storage import (
    DIRECTORY_MEMBER_MARK,
    Manifest,
    ManifestFile,
    base_manifest,
    data_file_name,
    move_into,
    new_set_id,
    now_local,
    scratch_folder,
)
from kkua_backupd.stream.chain import (
    open_chain,
)
from kkua_backupd.stream.encrypt import encryption_of
from kkua_backupd.stream.pipeline import FileInfo, file_chunks, stream_chunks


@dataclass
class DumpResult:
    """What one pg_dump run produced."""

    set_id: str
    created: Any
    file: FileInfo
    uncompressed: int
    seconds: float
    tables: dict[str, TableStats]
    server: ServerInfo
    pg_dump_version: str
    fmt: str
    compression: str
    roles: list[str]
    problems: list[str] = field(default_factory=list)
    objects: int = 0
    encryption: dict[str, Any] | None = None  # encrypt.Keys.record()
    parts: list[FileInfo] = field(default_factory=list)  # a directory set's files after its toc


class _StatsThread(threading.Thread):
    """Counts rows (and reads roles) in pg_dump's snapshot, on a connection of its own."""

    def __init__(self, conn: psycopg.Connection, checksums: bool) -> None:
        super().__init__(name="table-stats", daemon=True)
        self.conn = conn
        self.checksums = checksums
        self.snapshot = ""
        self.result: dict[str, TableStats] = {}
        self.roles: list[str] = []
        self.objects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.conn.transaction():
                self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                self.conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
                self.roles = referenced_roles(self.conn)
                self.objects = count_objects(self.conn)
            self.result = table_stats(self.conn, checksums=self.checksums, snapshot=self.snapshot)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def dump(ctx: JobContext, folder: Path, *, prefix: str, fmt: str, compression: str, dbname: str,  # noqa: PLR0913 - keyword-only options, typed with the flows
         checksums: bool = False) -> DumpResult:
    """Dump `dbname` into a new file in `folder` (no manifest yet); raises a JobError subclass.

    The caller holds the postgres lock. Row counts come from the snapshot pg_dump uses.
    """
    pg = ctx.config.postgres
    log = ctx.log
    snap_conn = connect(pg, dbname, autocommit=False)
    stats = _StatsThread(connect(pg, dbname), checksums)
    progress = Progress(f"pg_dump {dbname}", enabled=ctx.interactive)
    started = time.monotonic()
    try:
        server = server_info(snap_conn)
        snap_conn.rollback()
        bin_dir = find_bin_dir(pg, server)
        pg_dump_version = tool_version(bin_dir / "pg_dump")
        snap_conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap_conn.read_only = True
        snapshot = str(snap_conn.execute("SELECT pg_export_snapshot()").fetchone()[0])  # type: ignore[index]
        stats.snapshot = snapshot
        set_id, created = new_set_id(folder, prefix)
        keys = ctx.keys
        path = folder / data_file_name(prefix, set_id, EXTENSIONS[fmt], compression, keys.extension)
        log.info("dump started", database=dbname, file=path.name, server_version=server.version,
                 pg_dump=str(bin_dir / "pg_dump"), format=fmt, compression=compression)
        started = time.monotonic()
        scanner = SqlStream(refuse_meta=False) if fmt == "plain" else None
        parts: list[FileInfo] = []
        if fmt == "directory":
            stored = _dump_directory(ctx, folder, bin_dir, stats, dbname=dbname, snapshot=snapshot,
                                     compression=compression, name_of=lambda member: data_file_name(
                                         prefix, set_id, DIRECTORY_MEMBER_MARK + member, compression, keys.extension))
            info, parts, uncompressed = stored[0][0], stored[0][1:], stored[1]
        else:
            with execute.ProcessGroup(KIND) as group, \
                    open_chain(path, compression, pg.compression_level, pg.threads, ctx.stages) as out:
                child = group.spawn(pg_dump_argv(bin_dir, pg, dbname=dbname, fmt=fmt, snapshot=snapshot),
                                    env=child_env(pg), timeout=pg.dump_timeout)
                stats.start()
                assert child.stdout is not None
                for chunk in _scanned(stream_chunks(child.read, progress), scanner):
                    out.write(chunk)
                uncompressed = out.raw
                progress.clear()
                _wait_dump(group, child, stats, pg, dbname)
                info = out.close()
    except psycopg.Error as exc:
        denied = permission_error(pg, dbname, str(exc))
        if denied is not None:
            raise denied from None
        raise JobError(f"PostgreSQL error during the backup of {dbname}: {str(exc).strip()}") from None
    finally:
        progress.clear()
        if stats.is_alive():
            stats.conn.cancel_safe()
            stats.join(timeout=10)
        stats.conn.close()
        snap_conn.close()
    seconds = time.monotonic() - started
    stored_bytes = info.size + sum(p.size for p in parts)
    log.info("dump finished", database=dbname, file=info.name, bytes=stored_bytes, size=human_bytes(stored_bytes),
             uncompressed=human_bytes(uncompressed), seconds=round(seconds, 2),
             rate=f"{human_bytes(uncompressed / max(seconds, 1e-6))}/s", tables=len(stats.result),
             rows=sum(t["rows"] for t in stats.result.values()), files=1 + len(parts))
    problems = sql_problems(scanner, made_by_us=True) if scanner is not None else []
    return DumpResult(set_id, created, info, uncompressed, seconds, stats.result, server, pg_dump_version,
                      fmt, compression, stats.roles, problems, stats.objects, keys.record(), parts)


def _wait_dump(group: execute.ProcessGroup, child: execute.Child, stats: _StatsThread, pg: PostgresConfig,
               dbname: str) -> None:
    """Wait for pg_dump, then for the row counts; raises JobError (a permission the backup role lacks named
    with its GRANT) or CommandFailed."""
    try:
        group.wait(child, what="pg_dump",
                   hint="the backup user needs read access to every object; see the lines above")
    except CommandFailed as exc:
        denied = permission_error(pg, dbname, " ".join(exc.stderr_tail))
        if denied is not None:
            raise denied from None
        raise
    stats.join()
    if stats.error is not None:
        denied = permission_error(pg, dbname, str(stats.error))
        if denied is not None:
            raise denied
        raise JobError(f"counting rows in {dbname} failed: {str(stats.error).strip()}")


def _dump_directory(ctx: JobContext, folder: Path, bin_dir: Path, stats: _StatsThread, *, dbname: str,  # noqa: PLR0913 - keyword-only, typed with the flows
                    snapshot: str, compression: str, name_of: Callable[[str], str]) -> tuple[list[FileInfo], int]:
    """pg_dump -Fd -j N (uncompressed) into a private scratch folder in `folder`, then each of its files through
    the byte chain under the name `name_of(pg_dump's name)`, toc.dat first; the set's files are moved into
    `folder` only once every one is written (a run killed before leaves a scratch folder, one killed while
    they move leaves files without a manifest: both removed by the next run, remove_stale_partials). Returns
    the files written and the bytes pg_dump wrote. The disk holds pg_dump's uncompressed output once, less
    each file as soon as it is compressed."""
    pg = ctx.config.postgres
    with scratch_folder(folder) as scratch:
        raw_dir = scratch / "dump"
        with execute.ProcessGroup(KIND) as group:
            child = group.spawn(pg_dump_argv(bin_dir, pg, dbname=dbname, fmt="directory", snapshot=snapshot,
                                             directory=raw_dir),
                                env=child_env(pg), stdout=execute.DEVNULL, timeout=pg.dump_timeout)
            stats.start()
            _wait_dump(group, child, stats, pg, dbname)
        names = sorted(list_folder(raw_dir))
        unknown = [n for n in names if not DIRECTORY_MEMBER_RE.match(n) or not (raw_dir / n).is_file()
                   or (raw_dir / n).is_symlink()]
        if unknown or "toc.dat" not in names:
            raise JobError(f"pg_dump wrote {unknown[0] if unknown else 'no toc.dat'!r} into its directory, which "
                           "kkua-backup does not know how to keep; no backup was written",
                           hint="report this with the pg_dump version (see the log)")
        progress = Progress("compressing the dump's files", enabled=ctx.interactive)

        def store(member: str) -> tuple[FileInfo, int]:
            with open_chain(scratch / name_of(member), compression, pg.compression_level, pg.threads,
                            ctx.stages) as out:
                for chunk in file_chunks(raw_dir / member, progress):
                    out.write(chunk)
                raw = out.raw
                info = out.close()
            unlink_in(raw_dir / member)  # the disk holds pg_dump's output once at most
            return info, raw

        stored = in_threads(store, ["toc.dat", *(n for n in names if n != "toc.dat")], pg.dump_jobs,
                            weight=lambda member: (raw_dir / member).stat().st_size)
        progress.clear()
        written = [info for info, _ in stored]
        move_into(scratch, folder, [f.name for f in written])
    return written, sum(raw for _, raw in stored)


_DENIED = re.compile(r"permission denied for (schema|table|sequence|view|materialized view|foreign table|"
                     r"large object|function|type|database) \"?([^\"\s|]+)\"?")
_LOCKED = re.compile(r"LOCK TABLE (\S+) IN ")


def _ident(name: str) -> str:
    return name if PLAIN_IDENT.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def permission_error(pg: PostgresConfig, dbname: str, text: str) -> JobError | None:
    """The one-line error for a backup role that may not read something (pg_dump's or the row counts'
    `permission denied for schema|table|... NAME`), naming the object and the GRANT that fixes it; None when
    `text` is not about a permission. What pg_dump read last (`Query was: LOCK TABLE s.t ...`) names the table
    when the server names only its schema or its bare name."""
    match = _DENIED.search(text)
    if match is None:
        return None
    what, name = match.group(1), match.group(2)
    locked = _LOCKED.search(text)
    table = locked.group(1) if locked else None
    role = _ident(pg.user)
    alternative = ("or set postgres.user to a role that can read the whole database (its owner, or one in "
                   "pg_read_all_data on PostgreSQL 14+)")
    if what == "schema":
        on = f" (at table {table})" if table else ""
        schema = _ident(name)
        grant = (f"GRANT USAGE ON SCHEMA {schema} TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO "
                 f"{role}; GRANT SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
        obj = f"schema {name}{on}"
    elif what == "database":
        grant = f"GRANT CONNECT ON DATABASE {_ident(name)} TO {role}"
        obj = f"database {name}"
    elif what == "large object":
        grant = f"GRANT SELECT ON LARGE OBJECT {name} TO {role}"
        obj = f"large object {name}"
    elif what == "function":
        grant = f"GRANT EXECUTE ON FUNCTION {name} TO {role}"
        obj = f"function {name}"
    elif what == "type":
        grant = f"GRANT USAGE ON TYPE {name} TO {role}"
        obj = f"type {name}"
    else:
        qualified = table if table and table.rsplit(".", 1)[-1].strip('"') == name else name
        keyword = "SEQUENCE " if what == "sequence" else ""
        grant = f"GRANT SELECT ON {keyword}{qualified} TO {role}"
        obj = f"{what} {qualified}"
    return JobError(f"backup of {dbname} failed: the backup role {pg.user!r} may not read {obj} (permission denied "
                    f"for {what} {name}); no backup was written",
                    hint=f"as the object's owner or a superuser run: {grant}; {alternative}")


def _scanned(chunks: Iterable[bytes], scanner: SqlStream | None) -> Iterator[bytes]:
    """The chunks unchanged, read by `scanner` on the way (what a restore would reject is found here)."""
    for chunk in chunks:
        if scanner is not None:
            scanner.feed(chunk)
        yield chunk
    if scanner is not None:
        scanner.finish()


def manifest_for(result: DumpResult, *, set_type: str, prefix: str, dbname: str, status: str = "ok",  # noqa: PLR0913 - keyword-only fields, typed with the flows
                  error: str | None = None, test_restore: RestoreTest | None = None,
                  total_seconds: float | None = None) -> Manifest:
    data = base_manifest(KIND, set_type, prefix, result.set_id, result.created)
    details = PostgresDetails(database=dbname, format=result.fmt, compression=result.compression,
                              server_version=result.server.version, pg_dump_version=result.pg_dump_version,
                              uncompressed_bytes=result.uncompressed, table_keys=TABLE_KEYS,
                              objects=result.objects,
                              tables=result.tables,
                              roles=result.roles)
    if test_restore is not None:
        details.test_restore = test_restore
    timings = {"dump_seconds": round(result.seconds, 3)}
    if total_seconds is not None:
        timings["total_seconds"] = round(total_seconds, 3)
    data.update(status=status, error=error, finished_at=now_local(), details=details.stored(), timings=timings,
                files=manifest_files(result),
                encryption=result.encryption)
    return Manifest.model_validate(data)


def manifest_files(result: DumpResult) -> list[ManifestFile]:
    """The manifest's entries for the files a dump wrote: the dump (a directory set's toc.dat), then the
    other files of a directory set."""
    return [ManifestFile(name=f.name, size=f.size, sha256=f.sha256, role="dump" if i == 0 else "dump-part",
                         compression=result.compression, encryption=encryption_of(f.name))
            for i, f in enumerate([result.file, *result.parts])]
