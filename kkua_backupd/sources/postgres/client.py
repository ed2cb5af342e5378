"""Talking to a PostgreSQL server: connections, the client binaries (pg_dump, pg_restore, psql) that fit
the server's version, and the command lines built for them (pure).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from kkua_backupd.config import PostgresConfig
from kkua_backupd.errors import (
    ConnectionFailed,
    KkuaError,
    VersionTooNew,
)
from kkua_backupd.proc import execute
from kkua_backupd.sources.postgres.manifest import details_of
from kkua_backupd.store.storage import (
    DIRECTORY_MEMBER_MARK,
    BackupSet,
    Kind,
)
from kkua_backupd.stream.chain import without_compression

KIND: Kind = "postgres"
PG_LIB = Path("/usr/lib/postgresql")
EXTENSIONS = {"plain": ".sql", "custom": ".dump", "directory": f"{DIRECTORY_MEMBER_MARK}toc.dat"}
# The names pg_dump -Fd -Z0 gives the files of its directory: toc.dat, NNNN.dat, and for large objects
# blobs.toc / blobs_NNNN.toc and blob_NNNN.dat; nothing else is taken into a set or unpacked from one.
DIRECTORY_MEMBER_RE = re.compile(r"^[A-Za-z0-9_]{1,64}\.(dat|toc)$")
MAINTENANCE_DBS = ("postgres", "template1")
VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")



T = TypeVar("T")
R = TypeVar("R")


def in_threads(work: Callable[[T], R], items: Sequence[T], workers: int, *,
               weight: Callable[[T], int] | None = None) -> list[R]:
    """`work` of each item on up to `workers` threads (the files of a directory set: compression, hashing and
    decompression release the GIL), the heaviest (`weight`) begun first, results in the items' order. On the
    first failure the items not begun are dropped, the running ones finish, and that failure is raised."""
    if workers <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -weight(items[i])) if weight else range(len(items))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pg-files") as pool:
        submitted = {i: pool.submit(work, items[i]) for i in order}
        futures = [submitted[i] for i in range(len(items))]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


@dataclass(frozen=True)
class ServerInfo:
    """The server's version as reported by `server_version`."""

    version: str
    major: int


def connect(pg: PostgresConfig, dbname: str | None = None, *, autocommit: bool = True) -> psycopg.Connection:
    """Open a connection; raises ConnectionFailed saying what failed and what to check."""
    db = dbname or pg.database
    kwargs: dict[str, Any] = {"host": pg.host, "port": pg.port, "user": pg.user, "dbname": db,
                              "connect_timeout": pg.connect_timeout, "application_name": "kkua-backup"}
    if pg.password is not None:
        kwargs["password"] = pg.password.get_secret_value()
    try:
        return psycopg.connect(autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        raise connection_error(pg, db, exc) from None


def connection_error(pg: PostgresConfig, dbname: str, exc: Exception) -> ConnectionFailed:
    """Translate a libpq connection failure into a one-line, actionable error."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__
    text = re.sub(r"^connection failed: ", "", text)
    text = re.sub(r'^connection to server at "[^"]*" \([^)]*\), port \d+ failed: ', "", text)
    where = f"PostgreSQL at {pg.host}:{pg.port}"
    if "password authentication failed" in text or "no password supplied" in text:
        return ConnectionFailed(f"{where} refused user {pg.user!r}: {text}",
                                hint="check postgres.password_file or DATABASE_PASSWORD")
    if "does not exist" in text and "database" in text:
        return ConnectionFailed(f"{where}: database {dbname!r} does not exist",
                                hint="check postgres.database / DATABASE_NAME")
    if "role" in text and "does not exist" in text:
        return ConnectionFailed(f"{where}: user {pg.user!r} does not exist",
                                hint="check postgres.user / DATABASE_USER")
    return ConnectionFailed(f"cannot reach {where}: {text}",
                            hint="is the server running and reachable? check postgres.host and postgres.port")


def server_info(conn: psycopg.Connection) -> ServerInfo:
    """The server's version string and major version."""
    version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
    num = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    return ServerInfo(version, num // 10000 if num >= 100000 else num // 100)


def connect_maintenance(pg: PostgresConfig) -> psycopg.Connection:
    """A connection to a database that is not the one being restored (postgres, else template1)."""
    last: ConnectionFailed | None = None
    for db in MAINTENANCE_DBS:
        try:
            return connect(pg, db)
        except ConnectionFailed as exc:
            if "does not exist" not in str(exc) and "permission denied" not in str(exc):
                raise
            last = exc
    assert last is not None
    raise last


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None




def parse_tool_version(text: str) -> int | None:
    """The major version in `pg_dump --version` output ("pg_dump (PostgreSQL) 15.19 (Debian ...)")."""
    match = VERSION_RE.search(text)
    return int(match.group(1)) if match else None


@functools.cache
def tool_version(exe: Path) -> str:
    """What `exe --version` prints (asked once per process); raises CommandFailed if it cannot run."""
    return execute.run((str(exe), "--version"), job=KIND, timeout=30).decode().strip()


def choose_bin_dir(server_major: int, candidates: dict[int, Path]) -> Path | None:
    """The client folder for a server: the same major if present, else the oldest newer one (pg_dump
    must be at least as new as the server), else None."""
    if server_major in candidates:
        return candidates[server_major]
    newer = sorted(v for v in candidates if v > server_major)
    return candidates[newer[0]] if newer else None


def candidate_bin_dirs(override: Path | None) -> dict[int, Path]:
    """Folders holding pg_dump, pg_restore and psql, by major version."""
    found: dict[int, Path] = {}
    if override is not None:
        dirs = [override]
    else:
        dirs = sorted(PG_LIB.glob("*/bin")) if PG_LIB.is_dir() else []
        on_path = shutil.which("pg_dump")
        if on_path:
            dirs.append(Path(on_path).resolve().parent)
    for d in dirs:
        exe = d / "pg_dump"
        if not os.access(exe, os.X_OK):
            continue
        try:
            major = parse_tool_version(tool_version(exe))
        except KkuaError:
            continue
        if major is not None and major not in found:
            found[major] = d
    return found


def find_bin_dir(pg: PostgresConfig, server: ServerInfo) -> Path:
    """The client folder matching the server; raises VersionTooNew saying what to install."""
    return restore_bin_dir(pg, server)


def restore_bin_dir(pg: PostgresConfig, server: ServerInfo, *, archive_major: int | None = None) -> Path:
    """The client folder for a server and, when restoring, a backup made by pg_dump `archive_major`:
    pg_dump must be at least as new as the server, pg_restore (and psql, for pg_dump's newer commands)
    at least as new as the pg_dump that made the archive. Raises VersionTooNew saying what to install."""
    need = max(server.major, archive_major or 0)
    candidates = candidate_bin_dirs(pg.bin_dir)
    chosen = choose_bin_dir(need, candidates)
    if chosen is None:
        have = ", ".join(str(v) for v in sorted(candidates)) or "none"
        where = f"postgres.bin_dir ({pg.bin_dir})" if pg.bin_dir else f"{PG_LIB}/*/bin and PATH"
        if archive_major and archive_major > server.major:
            what = (f"the backup was made by pg_dump {archive_major} but no pg_restore/psql {archive_major} or "
                    f"newer is installed (found: {have}; looked in {where})")
        else:
            what = (f"PostgreSQL server is version {server.major} but no pg_dump {server.major} or newer is "
                    f"installed (found: {have}; looked in {where})")
        raise VersionTooNew(what, hint=client_hint(pg, need))
    return chosen


def tool_major(bin_dir: Path) -> int | None:
    return parse_tool_version(tool_version(bin_dir / "pg_dump"))


def client_hint(pg: PostgresConfig, need: int | None) -> str:
    version = str(need) if need else "N"
    return (f"install postgresql-client-{version} (it lands in {PG_LIB}/{version}/bin), or point postgres.bin_dir "
            f"at a folder holding pg_dump, pg_restore and psql {version} or newer")


def client_bin_dir(pg: PostgresConfig, made_by: int | None, *, doing: str) -> Path:
    """The client folder for reading an archive without a server: the oldest one at least as new as the
    pg_dump that made it (`made_by`), or the newest one when that is unknown. Raises VersionTooNew."""
    candidates = candidate_bin_dirs(pg.bin_dir)
    chosen = choose_bin_dir(made_by, candidates) if made_by else \
        (candidates[max(candidates)] if candidates else None)
    if chosen is None:
        have = ", ".join(str(v) for v in sorted(candidates)) or "none"
        where = f"postgres.bin_dir ({pg.bin_dir})" if pg.bin_dir else f"{PG_LIB}/*/bin and PATH"
        made = f"it was made by pg_dump {made_by} but no pg_restore {made_by} or newer" if made_by else \
            "no pg_restore"
        raise VersionTooNew(f"cannot {doing}: {made} is installed (found: {have}; looked in {where})",
                            hint=client_hint(pg, made_by))
    return chosen


def archive_major_of(backup_set: BackupSet) -> int | None:
    """The major version of the pg_dump that made a set (from its manifest; None when unknown)."""
    details = details_of(backup_set)
    if details is None:
        return None
    return parse_tool_version(details.pg_dump_version)




def connection_args(pg: PostgresConfig, dbname: str) -> tuple[str, ...]:
    """libpq connection options for a client; the password is never among them."""
    return ("--host", pg.host, "--port", str(pg.port), "--username", pg.user, "--dbname", dbname,
            "--no-password")


def child_env(pg: PostgresConfig) -> dict[str, str]:
    """The environment that carries the password and timeouts to a client."""
    env = {"PGCONNECT_TIMEOUT": str(pg.connect_timeout), "PGAPPNAME": "kkua-backup",
           "PGOPTIONS": "-c client_min_messages=warning"}
    if pg.password is not None:
        env["PGPASSWORD"] = pg.password.get_secret_value()
    return env


def member_name(name: str) -> str | None:
    """The pg_dump file name a file of a directory set holds (`kkua_backup_ID.pgdir.3456.dat.gz.age` ->
    `3456.dat`), or None when `name` is not such a file or what it names is not one pg_dump writes."""
    stem = without_compression(name)
    head, mark, member = stem.partition(DIRECTORY_MEMBER_MARK)
    if not mark or not head or not DIRECTORY_MEMBER_RE.match(member):
        return None
    return member


def pg_dump_argv(bin_dir: Path, pg: PostgresConfig, *, dbname: str, fmt: str,  # noqa: PLR0913 - keyword-only options of one command line
                 snapshot: str | None = None, directory: Path | None = None) -> tuple[str, ...]:
    """pg_dump writing the whole database: to stdout as plain SQL with DROP IF EXISTS (restorable by hand
    into an existing database) or an uncompressed custom archive (our pipeline compresses), or as an
    uncompressed directory archive into `directory` with postgres.dump_jobs parallel jobs."""
    argv: tuple[str, ...] = (str(bin_dir / "pg_dump"), *connection_args(pg, dbname))
    if fmt == "plain":
        argv += ("--format=plain", "--clean", "--if-exists")
    elif fmt == "custom":
        argv += ("--format=custom", "--compress=0")
    elif fmt == "directory":
        if directory is None:
            raise ValueError("the directory format needs a directory")
        argv += ("--format=directory", "--compress=0", f"--jobs={pg.dump_jobs}", "--file", str(directory))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if snapshot:
        argv += (f"--snapshot={snapshot}",)
    return argv


def psql_argv(bin_dir: Path, pg: PostgresConfig, dbname: str) -> tuple[str, ...]:
    """psql reading SQL on stdin and stopping at the first error."""
    return (str(bin_dir / "psql"), *connection_args(pg, dbname), "--no-psqlrc", "--quiet",
            "--set", "ON_ERROR_STOP=1", "--file", "-")


def pg_restore_script_argv(bin_dir: Path, archive: Path | None = None) -> tuple[str, ...]:
    """pg_restore turning a custom archive on stdin (or the directory archive `archive`) into SQL on stdout."""
    return (str(bin_dir / "pg_restore"), "--clean", "--if-exists", "--file", "-",
            *((str(archive),) if archive is not None else ()))


def pg_restore_list_argv(bin_dir: Path, archive: Path) -> tuple[str, ...]:
    """pg_restore printing the table of contents of the archive `archive` (a directory's toc.dat)."""
    return (str(bin_dir / "pg_restore"), "--list", str(archive))


def pg_restore_argv(bin_dir: Path, pg: PostgresConfig, dbname: str, archive: Path, jobs: int) -> tuple[str, ...]:
    """pg_restore loading a custom archive file (or a directory archive) into a new database with `jobs`
    parallel workers."""
    return (str(bin_dir / "pg_restore"), *connection_args(pg, dbname), "--exit-on-error",
            f"--jobs={max(1, jobs)}", str(archive))
