"""PostgreSQL: backups with pg_dump, restores in one transaction, and test restores that prove them.

psycopg talks to the server (reachability, versions, sessions, counts); pg_dump, pg_restore and psql
do the dumping and loading as children run by `execute`. A dump and the row counts recorded in its
manifest come from the same exported snapshot, so they describe exactly the same data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from kkua_backupd.config import PostgresConfig
from kkua_backupd.core.context import (
    JobContext,
    RestorePlan,
    VerifyReport,
    check_signed,
    checksums_only,
    verify_report,
)
from kkua_backupd.errors import (
    CommandFailed,
    ConnectionFailed,
    IntegrityError,
    JobError,
    KeyMissing,
    KkuaError,
    LockHeld,
    Refused,
    StepTimeout,
    StorageError,
    UsageError,
    VersionTooNew,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.proc import execute
from kkua_backupd.safefs import list_folder, read_small, unlink_in
from kkua_backupd.sources import BackupOptions, RestoreOptions
from kkua_backupd.sources.postgres.pg_sql import MetaCommandRefused, SqlStream
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.signing import sign
from kkua_backupd.store.storage import (
    ID_FORMAT,
    PARTIAL_SUFFIX,
    PREFIXES,
    BackupSet,
    Kind,
    Manifest,
    ManifestFile,
    base_manifest,
    data_file_name,
    kind_folder,
    new_set_id,
    now_local,
    resolve,
    write_manifest,
)
from kkua_backupd.stream.chain import (
    CheckResult,
    check_file,
    compression_of,
    open_chain,
    read_chain,
    without_compression,
)
from kkua_backupd.stream.encrypt import encryption_of, without_encryption_suffix
from kkua_backupd.stream.pipeline import AtomicFile, FileInfo, stream_chunks, write_atomic

KIND: Kind = "postgres"
PG_LIB = Path("/usr/lib/postgresql")
EXTENSIONS = {"plain": ".sql", "custom": ".dump"}
MAINTENANCE_DBS = ("postgres", "template1")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")

# Every user table (not system, not owned by an extension): what counts and checksums cover.
TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

# Roles the dump will name (object owners and grantees): a restore onto a server without them fails, so
# the manifest records them and a restore checks for them before it changes anything.
ROLES_SQL = """
WITH objs(owner, acl) AS (
  SELECT c.relowner, c.relacl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT nspowner, nspacl FROM pg_namespace
   WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT p.proowner, p.proacl FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT t.typowner, t.typacl FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
)
SELECT DISTINCT r.rolname
FROM (SELECT owner AS oid FROM objs
      UNION SELECT (aclexplode(acl)).grantee FROM objs WHERE acl IS NOT NULL) x
JOIN pg_roles r ON r.oid = x.oid
ORDER BY 1
"""

# Objects a restore locks one by one in its transaction (dropping the old ones, creating the new):
# relations, their TOAST tables and indexes, types, constraints, functions, large objects.
OBJECTS_SQL = """
SELECT (SELECT count(*) + 2 * count(*) FILTER (WHERE c.reltoastrelid <> 0) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_largeobject_metadata)
"""

# The size of the server's shared lock table: max_locks_per_transaction x (backends + prepared xacts).
LOCK_SETTINGS = ("max_locks_per_transaction", "max_connections", "autovacuum_max_workers",
                 "max_worker_processes", "max_wal_senders", "max_prepared_transactions")


def lock_capacity(conn: psycopg.Connection) -> tuple[int, dict[str, int]]:
    """(lock slots the server has for all sessions together, the settings that size it)."""
    values = {name: int(str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]))  # type: ignore[index]
              for name in LOCK_SETTINGS}
    backends = (values["max_connections"] + values["autovacuum_max_workers"] + 1
                + values["max_worker_processes"] + values["max_wal_senders"])
    return values["max_locks_per_transaction"] * (backends + values["max_prepared_transactions"]), values


def count_objects(conn: psycopg.Connection) -> int:
    return int(conn.execute(OBJECTS_SQL).fetchone()[0])  # type: ignore[index]


# Run before the dump's SQL, inside the restore's transaction: every user schema and every large object
# goes, so objects created after the backup cannot block or survive the restore. `public` itself stays (its
# owner, privileges, comment and initial-privileges record, which pg_dump 14 and older compare its ACL with):
# what is in it is dropped object by object; only if something is left that way is it dropped and made
# again with the owner, privileges and comment it had. pg_dump then recreates everything else.
WIPE_SQL = """
DO $kkua_wipe$
DECLARE
  s record; g record; pub oid; objs text[]; extensions text[]; left_over bigint;
  pub_owner text; pub_acl aclitem[]; pub_comment text;
BEGIN
  FOR s IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')
             AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp\\_%'
  LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
  END LOOP;
  PERFORM pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
  SELECT oid INTO pub FROM pg_namespace WHERE nspname = 'public';
  IF pub IS NULL THEN
    RETURN;
  END IF;
  SELECT array_agg(format('DROP EXTENSION IF EXISTS %I CASCADE', extname)) INTO extensions
    FROM pg_extension WHERE extnamespace = pub;
  FOR i IN 1 .. coalesce(array_length(extensions, 1), 0) LOOP
    EXECUTE extensions[i];
  END LOOP;
  SELECT array_agg(format('DROP %s IF EXISTS %s CASCADE',
                          CASE x.type WHEN 'composite type' THEN 'TYPE' WHEN 'statistics object' THEN 'STATISTICS'
                                      ELSE upper(x.type) END, x.identity))
    INTO objs
    FROM pg_depend d, LATERAL pg_identify_object(d.classid, d.objid, 0) x
   WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = pub AND d.deptype = 'n'
     AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.classid AND e.objid = d.objid
                     AND e.deptype IN ('e', 'i'));
  FOR i IN 1 .. coalesce(array_length(objs, 1), 0) LOOP
    BEGIN
      EXECUTE objs[i];
    EXCEPTION WHEN OTHERS THEN
      NULL;  -- whatever cannot go this way makes the schema go as a whole below
    END;
  END LOOP;
  SELECT count(*) INTO left_over FROM pg_depend WHERE refclassid = 'pg_namespace'::regclass AND refobjid = pub;
  IF left_over = 0 THEN
    RETURN;
  END IF;
  SELECT nspowner::regrole::text, nspacl, obj_description(oid, 'pg_namespace')
    INTO pub_owner, pub_acl, pub_comment
    FROM pg_namespace WHERE oid = pub;
  DROP SCHEMA public CASCADE;
  EXECUTE format('CREATE SCHEMA public AUTHORIZATION %s', pub_owner);
  REVOKE ALL ON SCHEMA public FROM PUBLIC;
  FOR g IN SELECT * FROM aclexplode(pub_acl) LOOP
    EXECUTE format('GRANT %s ON SCHEMA public TO %s', g.privilege_type,
                   CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
  END LOOP;
  IF pub_comment IS NOT NULL THEN
    EXECUTE format('COMMENT ON SCHEMA public IS %L', pub_comment);
  END IF;
END
$kkua_wipe$;
"""


@dataclass(frozen=True)
class ServerInfo:
    """The server's version as reported by `server_version`."""

    version: str
    major: int


# ----------------------------------------------------------------------------------------------
# Connections


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


# ----------------------------------------------------------------------------------------------
# Client binaries


def parse_tool_version(text: str) -> int | None:
    """The major version in `pg_dump --version` output ("pg_dump (PostgreSQL) 15.19 (Debian ...)")."""
    match = _VERSION_RE.search(text)
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
        raise VersionTooNew(what, hint=_client_hint(pg, need))
    return chosen


def tool_major(bin_dir: Path) -> int | None:
    return parse_tool_version(tool_version(bin_dir / "pg_dump"))


def _client_hint(pg: PostgresConfig, need: int | None) -> str:
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
                            hint=_client_hint(pg, made_by))
    return chosen


def archive_major_of(backup_set: BackupSet) -> int | None:
    """The major version of the pg_dump that made a set (from its manifest; None when unknown)."""
    if backup_set.manifest is None:
        return None
    return parse_tool_version(str(backup_set.manifest.details.get("pg_dump_version", "")))


# ----------------------------------------------------------------------------------------------
# Command builders (pure)


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


def pg_dump_argv(bin_dir: Path, pg: PostgresConfig, *, dbname: str, fmt: str,
                 snapshot: str | None = None) -> tuple[str, ...]:
    """pg_dump writing the whole database to stdout: plain SQL with DROP IF EXISTS (restorable by hand
    into an existing database) or an uncompressed custom archive (our pipeline compresses)."""
    argv: tuple[str, ...] = (str(bin_dir / "pg_dump"), *connection_args(pg, dbname))
    if fmt == "plain":
        argv += ("--format=plain", "--clean", "--if-exists")
    elif fmt == "custom":
        argv += ("--format=custom", "--compress=0")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if snapshot:
        argv += (f"--snapshot={snapshot}",)
    return argv


def psql_argv(bin_dir: Path, pg: PostgresConfig, dbname: str) -> tuple[str, ...]:
    """psql reading SQL on stdin and stopping at the first error."""
    return (str(bin_dir / "psql"), *connection_args(pg, dbname), "--no-psqlrc", "--quiet",
            "--set", "ON_ERROR_STOP=1", "--file", "-")


def pg_restore_script_argv(bin_dir: Path) -> tuple[str, ...]:
    """pg_restore turning a custom archive on stdin into SQL on stdout."""
    return (str(bin_dir / "pg_restore"), "--clean", "--if-exists", "--file", "-")


def pg_restore_argv(bin_dir: Path, pg: PostgresConfig, dbname: str, archive: Path, jobs: int) -> tuple[str, ...]:
    """pg_restore loading a custom archive file into a new database with `jobs` parallel workers."""
    return (str(bin_dir / "pg_restore"), *connection_args(pg, dbname), "--exit-on-error",
            f"--jobs={max(1, jobs)}", str(archive))


# ----------------------------------------------------------------------------------------------
# Table statistics


_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
STATS_BATCH = 100  # tables counted per transaction: each holds a lock on its tables until it ends
TABLE_KEYS = "quoted"  # details.table_keys of manifests whose table keys quote odd names


def table_key(schema: str, name: str, *, legacy: bool = False) -> str:
    """A table's key in manifests: `schema.table`, each part double-quoted (quotes doubled) unless it is
    a plain lower-case name, so `public."a.b"` and `"public.a".b` stay apart. Plain names read as
    before, so manifests written before keys were quoted (`legacy`: parts joined as they are) still match
    for them."""
    if legacy:
        return f"{schema}.{name}"

    def ident(part: str) -> str:
        return part if _PLAIN_IDENT.fullmatch(part) else '"' + part.replace('"', '""') + '"'
    return f"{ident(schema)}.{ident(name)}"


def legacy_keys(details: dict[str, Any] | None) -> bool:
    """Whether a manifest's table keys were written before they were quoted."""
    return bool(details) and details.get("table_keys") != TABLE_KEYS  # type: ignore[union-attr]


def table_stats(conn: psycopg.Connection, *, checksums: bool, snapshot: str | None = None,
                legacy: bool = False) -> dict[str, dict[str, Any]]:
    """Row count (and an order-independent content checksum) of every user table.

    Tables are counted STATS_BATCH at a time, each batch in a transaction of its own (importing
    `snapshot` when given), so the locks held at once stay few however many tables there are:
    pg_dump already holds one per table. `conn` must be in autocommit mode."""
    tables = [(str(a), str(b)) for a, b in conn.execute(TABLES_SQL).fetchall()]
    stats: dict[str, dict[str, Any]] = {}
    for first in range(0, len(tables), STATS_BATCH):
        batch = tables[first:first + STATS_BATCH]
        parts = []
        for schema, name in batch:
            ident = sql.Identifier(schema, name)
            if checksums:
                parts.append(sql.SQL("(SELECT ARRAY[count(*)::text, coalesce(sum(('x' || left(md5(t::text), 15))"
                                     "::bit(60)::bigint::numeric), 0)::text] FROM ONLY {} AS t)").format(ident))
            else:
                parts.append(sql.SQL("(SELECT ARRAY[count(*)::text] FROM ONLY {})").format(ident))
        query = sql.SQL("SELECT ") + sql.SQL(", ").join(parts)
        with conn.transaction():
            if snapshot:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            row = conn.execute(query).fetchone()
        assert row is not None
        for (schema, name), values in zip(batch, row, strict=True):
            entry: dict[str, Any] = {"rows": int(values[0])}
            if checksums:
                entry["checksum"] = values[1]
            stats[table_key(schema, name, legacy=legacy)] = entry
    return stats


def referenced_roles(conn: psycopg.Connection) -> list[str]:
    """Roles that own or are granted something in the database (what the dump's OWNER/GRANT lines name)."""
    return [str(row[0]) for row in conn.execute(ROLES_SQL).fetchall()]


def missing_roles(conn: psycopg.Connection, roles: list[str]) -> list[str]:
    """Which of `roles` the server does not have."""
    if not roles:
        return []
    present = {str(r[0]) for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                               (roles,)).fetchall()}
    return [r for r in roles if r not in present]


def compare_stats(expected: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[str]:
    """Differences between two table_stats results, one readable line each (empty when equal)."""
    problems = []
    for table in sorted(set(expected) - set(found)):
        problems.append(f"{table}: missing")
    for table in sorted(set(found) - set(expected)):
        problems.append(f"{table}: not in the backup")
    for table in sorted(set(expected) & set(found)):
        want, got = expected[table], found[table]
        if want.get("rows") != got.get("rows"):
            problems.append(f"{table}: {got.get('rows')} rows, expected {want.get('rows')}")
        elif want.get("checksum") and got.get("checksum") and want["checksum"] != got["checksum"]:
            problems.append(f"{table}: content differs ({got['rows']} rows)")
    return problems


# ----------------------------------------------------------------------------------------------
# Backup


@dataclass
class DumpResult:
    """What one pg_dump run produced."""

    set_id: str
    created: Any
    file: FileInfo
    uncompressed: int
    seconds: float
    tables: dict[str, dict[str, Any]]
    server: ServerInfo
    pg_dump_version: str
    fmt: str
    compression: str
    roles: list[str]
    problems: list[str] = field(default_factory=list)
    objects: int = 0
    encryption: dict[str, Any] | None = None  # encrypt.Keys.record()


class _StatsThread(threading.Thread):
    """Counts rows (and reads roles) in pg_dump's snapshot, on a connection of its own."""

    def __init__(self, conn: psycopg.Connection, checksums: bool) -> None:
        super().__init__(name="table-stats", daemon=True)
        self.conn = conn
        self.checksums = checksums
        self.snapshot = ""
        self.result: dict[str, dict[str, Any]] = {}
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
        with execute.ProcessGroup(KIND) as group, \
                open_chain(path, compression, pg.compression_level, pg.threads, ctx.stages) as out:
            child = group.spawn(pg_dump_argv(bin_dir, pg, dbname=dbname, fmt=fmt, snapshot=snapshot),
                                env=child_env(pg), timeout=pg.dump_timeout)
            stats.start()
            assert child.stdout is not None
            scanner = SqlStream(refuse_meta=False) if fmt == "plain" else None
            for chunk in _scanned(stream_chunks(child.read, progress), scanner):
                out.write(chunk)
            uncompressed = out.raw
            progress.clear()
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
    log.info("dump finished", database=dbname, file=info.name, bytes=info.size, size=human_bytes(info.size),
             uncompressed=human_bytes(uncompressed), seconds=round(seconds, 2),
             rate=f"{human_bytes(uncompressed / max(seconds, 1e-6))}/s", tables=len(stats.result),
             rows=sum(t["rows"] for t in stats.result.values()))
    problems = sql_problems(scanner, made_by_us=True) if scanner is not None else []
    return DumpResult(set_id, created, info, uncompressed, seconds, stats.result, server, pg_dump_version,
                      fmt, compression, stats.roles, problems, stats.objects, keys.record())


_DENIED = re.compile(r"permission denied for (schema|table|sequence|view|materialized view|foreign table|"
                     r"large object|function|type|database) \"?([^\"\s|]+)\"?")
_LOCKED = re.compile(r"LOCK TABLE (\S+) IN ")


def _ident(name: str) -> str:
    return name if _PLAIN_IDENT.fullmatch(name) else '"' + name.replace('"', '""') + '"'


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


def _manifest_for(result: DumpResult, *, set_type: str, prefix: str, dbname: str, status: str = "ok",  # noqa: PLR0913 - keyword-only fields, typed with the flows
                  error: str | None = None, extra: dict[str, Any] | None = None,
                  total_seconds: float | None = None) -> Manifest:
    data = base_manifest(KIND, set_type, prefix, result.set_id, result.created)
    details: dict[str, Any] = {"database": dbname, "format": result.fmt, "compression": result.compression,
                               "server_version": result.server.version, "pg_dump_version": result.pg_dump_version,
                               "uncompressed_bytes": result.uncompressed, "table_keys": TABLE_KEYS,
                               "objects": result.objects,
                               "tables": result.tables,
                               "roles": result.roles}
    details.update(extra or {})
    timings = {"dump_seconds": round(result.seconds, 3)}
    if total_seconds is not None:
        timings["total_seconds"] = round(total_seconds, 3)
    data.update(status=status, error=error, finished_at=now_local(), details=details, timings=timings,
                files=[ManifestFile(name=result.file.name, size=result.file.size, sha256=result.file.sha256,
                                    role="dump", compression=result.compression,
                                    encryption=encryption_of(result.file.name))],
                encryption=result.encryption)
    return Manifest.model_validate(data)


class PostgresSource:
    """The PostgreSQL data source of the flows (core/flows.py): a pg_dump set, its row counts, and a test
    restore when asked."""

    kind: Kind = KIND

    def capture(self, ctx: JobContext, folder: Path, options: BackupOptions, started: float) -> Manifest:
        """Dump the configured database into `folder` (and test-restore it if asked) and write its manifest;
        a failed test restore still writes the set, marked failed (`finished` raises for it)."""
        pg = ctx.config.postgres
        want_test = pg.test_restore if options.test_restore is None else options.test_restore
        drop_unfinished_databases(ctx, lock_held=True)
        prefix = PREFIXES[KIND]["backup"]
        result = dump(ctx, folder, prefix=prefix, fmt=pg.format, compression=pg.compression,
                      dbname=pg.database, checksums=want_test)
        extra: dict[str, Any] = {}
        status, error = "ok", None
        if result.problems:
            status, error = "failed", f"dump would not restore: {result.problems[0]}"
        elif want_test:
            written = ManifestFile(name=result.file.name, size=result.file.size, sha256=result.file.sha256)
            outcome = _test_restore_file(ctx, folder / result.file.name, result.fmt, result.compression,
                                         set_id=result.set_id, expected=result.tables, expected_file=written,
                                         objects=result.objects)
            extra["test_restore"] = outcome
            if outcome["ran"] and not outcome["ok"]:
                status, error = "failed", f"test restore failed: {outcome['error']}"
        manifest = _manifest_for(result, set_type="backup", prefix=prefix, dbname=pg.database, status=status,
                                 error=error, extra=extra, total_seconds=time.monotonic() - started)
        manifest = sign(manifest, ctx.keys.signing_key)
        write_manifest(folder, manifest)
        return manifest

    def finished(self, ctx: JobContext, manifest: Manifest, started: float) -> None:
        """Raises JobError when the set is marked failed, or ok but unverified (its test restore could not
        run); else logs the backup's end."""
        file = manifest.files[0]
        test = manifest.details.get("test_restore")
        if test is not None and not test["ok"] and not test["ran"]:
            ctx.log.error("backup is ok but unverified: its test restore could not run", file=file.name,
                          reason=test["error"])
            raise JobError(f"backup {file.name} is ok but unverified: its test restore could not run: "
                           f"{test['error']}", hint="the set stays usable; fix the cause, then run `kkua-backup "
                                                    f"verify {manifest.id} --restore-test`")
        if manifest.status != "ok":
            ctx.log.error("backup marked failed", file=file.name, reason=manifest.error)
            raise JobError(f"backup {file.name} was written but its {manifest.error}",
                           hint="the set is marked failed and is never used by `restore latest`")
        ctx.log.info("backup finished", file=file.name, id=manifest.id, bytes=file.size,
                     size=human_bytes(file.size), seconds=round(time.monotonic() - started, 2),
                     sha256=file.sha256, test_restore="passed" if test is not None else "skipped")

    def verify_set(self, ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
        return verify_set(ctx, backup_set, restore_test=restore_test)

    def restorer(self, ctx: JobContext, spec: str, options: RestoreOptions) -> _Restore:
        return _Restore(ctx, spec, options)


SOURCE = PostgresSource()


# ----------------------------------------------------------------------------------------------
# Loading SQL and archives


def _scratch_name(set_id: str) -> str:
    return f"kkua_backup_test_{set_id}_{os.getpid()}"[:63]


def _feed(chunks: Iterable[bytes], dest: Any, errors: list[BaseException], close: bool = True) -> None:
    try:
        for chunk in chunks:
            dest.write(chunk)
        if close:
            dest.close()
    except BaseException as exc:  # re-raised by the caller
        errors.append(exc)


def transaction_frame(nonce: str, *, pending: bool = True) -> tuple[bytes, bytes, bytes]:
    """The SQL around a restored stream: (opening, closing, marker).

    The opening makes every transaction the SQL might start on its own read-only, opens ours read-write,
    and arms a deferred trigger that fails any COMMIT not preceded by the closing's permission, so a
    COMMIT inside the file cannot make half a restore permanent. The closing gives that permission (and
    fails if the file ended our transaction with ROLLBACK), commits, and prints the marker, which psql
    prints only after a successful COMMIT: a file cut inside a COPY block swallows it.

    The closing starts with `;` only when the SQL ends inside an unterminated statement (`pending`):
    psql stops reading, and exits 0, at an empty statement right after a COPY data block.
    """
    opening = f"""SET default_transaction_read_only = on;
BEGIN READ WRITE;
CREATE TEMP TABLE kkua_restore_guard (armed boolean);
CREATE FUNCTION pg_temp.kkua_restore_guard() RETURNS trigger LANGUAGE plpgsql AS $kkua_guard$
BEGIN
  IF pg_catalog.current_setting('kkua.restore_may_commit', true) IS DISTINCT FROM '{nonce}' THEN
    RAISE EXCEPTION 'the restored SQL tried to commit before its end (COMMIT in the file); nothing was kept';
  END IF;
  RETURN NULL;
END
$kkua_guard$;
CREATE CONSTRAINT TRIGGER kkua_restore_guard AFTER INSERT ON pg_temp.kkua_restore_guard
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.kkua_restore_guard();
INSERT INTO pg_temp.kkua_restore_guard VALUES (true);
"""
    closing = ("\n;\n" if pending else "\n") + (
        f"SELECT pg_catalog.set_config('kkua.restore_may_commit', '{nonce}', true) "
        "FROM pg_temp.kkua_restore_guard;\nCOMMIT;\n")
    marker = f"kkua-restore-committed-{nonce}"
    return opening.encode(), (closing + f"SELECT '{marker}';\n").encode(), marker.encode()


# psql releases that have `\restrict KEY` (which makes psql refuse every meta-command until
# `\unrestrict KEY`): 13.22, 14.19, 15.14, 16.10, 17.6 and every 18 or newer.
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
_warned_no_restrict: set[str] = set()


def supports_restrict(version_text: str) -> bool:
    """Whether the psql whose `--version` printed `version_text` knows `\\restrict`."""
    match = _VERSION_RE.search(version_text)
    if match is None:
        return False
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= 18:
        return True
    return major in RESTRICT_SINCE and minor >= RESTRICT_SINCE[major]


def restrict_frame(key: str) -> tuple[bytes, bytes]:
    """(first line, last line) of what a restore feeds psql: `\\restrict KEY` before any byte of the file,
    so psql itself refuses every meta-command that follows (`\\!`, `\\connect`, `\\copy ... program`, ...),
    and `\\unrestrict KEY` after the last one. `key` is random per restore, so the file cannot lift it."""
    if not re.fullmatch(r"[A-Za-z0-9]+", key):
        raise ValueError("a restrict key is letters and digits")
    return f"\\restrict {key}\n".encode(), f"\n\\unrestrict {key}\n".encode()


def run_psql(ctx: JobContext, bin_dir: Path, dbname: str, parts: Iterable[bytes], *, marker: bytes) -> bool:
    """Feed `parts` to psql (ON_ERROR_STOP) on `dbname` inside the restrict frame (`restrict_frame`) when
    this psql has it; returns whether psql printed `marker`. Raises CommandFailed when psql exits non-zero
    (a failed statement, a refused meta-command), and whatever `parts` raises (psql is then stopped before
    it reads the rest, so nothing the caller did not finish is committed). Every restore's SQL goes through
    here; `load_sql` reads it first and refuses meta-commands before they are sent (the pre-scan)."""
    pg = ctx.config.postgres
    psql = bin_dir / "psql"
    version = tool_version(psql)
    frame = restrict_frame(secrets.token_hex(16)) if supports_restrict(version) else None
    if frame is None and str(psql) not in _warned_no_restrict:
        _warned_no_restrict.add(str(psql))
        ctx.log.warning("this psql has no \\restrict (13.22+, 14.19+, 15.14+, 16.10+, 17.6+, 18+): restored SQL "
                        "is kept from psql meta-commands by the tool's own reading of it only; upgrade the "
                        "PostgreSQL client for psql to refuse them too", psql=str(psql), version=version)
    with execute.ProcessGroup(KIND) as group:
        child = group.spawn(psql_argv(bin_dir, pg, dbname), env=child_env(pg), stdin=execute.PIPE,
                            stdout=execute.PIPE, timeout=pg.restore_timeout)
        assert child.stdin is not None
        seen = threading.Event()
        watcher = threading.Thread(target=_watch_for, args=(child, marker, seen), daemon=True)
        watcher.start()
        try:
            if frame is not None:
                child.stdin.write(frame[0])
            for part in parts:
                child.stdin.write(part)
            if frame is not None:
                child.stdin.write(frame[1])
            child.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at an error; its status and stderr say which
        group.wait(child, what="psql", hint="the transaction was rolled back")
        watcher.join(timeout=30)
    return seen.is_set()


def load_sql(ctx: JobContext, bin_dir: Path, dbname: str, sql_chunks: Iterable[bytes], *, wipe: bool,  # noqa: PLR0913 - keyword-only options, typed with the flows
             transactional: bool = True) -> None:
    """Run SQL into `dbname` in one transaction (see `transaction_frame`), with an optional wipe first;
    COMMIT is sent only once every byte was read and sent. Raises CommandFailed if a statement fails and
    JobError if the SQL did not run to its end; either way nothing was kept.

    The SQL is read on its way (`SqlStream`): a psql meta-command other than pg_dump's own
    `\\restrict`/`\\unrestrict` stops the load before it is sent, and those two are dropped, since
    `run_psql` frames the whole stream in a `\\restrict` of its own.

    `transactional=False` (only for a new database, which the caller drops again on failure) runs the
    statements as they come, for restores too big for one transaction's locks; the file's own
    BEGIN/COMMIT pairs then stay as they are, and only the marker proves the SQL ran to its end."""
    nonce = secrets.token_hex(8)
    scanner = SqlStream(fold_transactions=transactional, drop_restrict=True)
    refused: list[MetaCommandRefused] = []
    marker = f"kkua-restore-committed-{nonce}".encode()

    def parts() -> Iterator[bytes]:
        if transactional:
            yield transaction_frame(nonce)[0]
        if wipe:
            yield WIPE_SQL.encode()
        try:
            for chunk in sql_chunks:
                yield scanner.feed(chunk)
            yield scanner.finish()
        except MetaCommandRefused as exc:
            refused.append(exc)
            return
        # only reached when the whole stream was read and sent, and it did not stop inside something
        if scanner.truncated is None:
            if transactional:
                yield transaction_frame(nonce, pending=scanner.pending)[1]
            else:
                yield (";\n" if scanner.pending else "\n").encode() + f"SELECT '{marker.decode()}';\n".encode()

    seen = run_psql(ctx, bin_dir, dbname, parts(), marker=marker)
    if refused:
        raise JobError(f"{refused[0]}; nothing was kept")
    if scanner.truncated is not None:
        raise JobError(f"{scanner.truncated}; nothing was kept")
    if not seen:
        raise JobError("psql reached the end of the SQL without committing it (the file is truncated inside a "
                       "data block, or ends the session itself); the transaction was rolled back")


def _watch_for(child: execute.Child, marker: bytes, seen: threading.Event) -> None:
    """Drain psql's stdout, noting whether the commit marker went by."""
    tail = b""
    while chunk := child.read(1 << 16):
        window = tail + chunk
        if marker in window:
            seen.set()
        tail = window[-len(marker):]


def _script_from_archive(ctx: JobContext, group: execute.ProcessGroup, bin_dir: Path,
                         archive_chunks: Iterable[bytes], feed_errors: list[BaseException]) -> Iterator[bytes]:
    """SQL produced by pg_restore from a custom archive streamed on its stdin."""
    child = group.spawn(pg_restore_script_argv(bin_dir), stdin=execute.PIPE,
                        timeout=ctx.config.postgres.restore_timeout)
    feeder = threading.Thread(target=_feed, args=(archive_chunks, child.stdin, feed_errors), daemon=True)
    feeder.start()
    assert child.stdout is not None
    yield from stream_chunks(child.read)
    feeder.join()
    if feed_errors:
        raise feed_errors[0]
    group.wait(child, what="pg_restore")


def restore_into(ctx: JobContext, bin_dir: Path, dbname: str, path: Path, fmt: str, compression: str, *,  # noqa: PLR0913, PLR0917 - grouped with the flows written once
                 wipe: bool, new_database: bool, expected: ManifestFile | None,
                 progress: Progress | None = None, transactional: bool = True) -> None:
    """Load a backup file into `dbname`: in one transaction, or with pg_restore -j for a custom archive
    going into a new database. The bytes are hashed as they are read; if they do not match `expected`
    the load stops before its COMMIT. Raises CommandFailed/StepTimeout/IntegrityError on failure."""
    pg = ctx.config.postgres
    chunks = read_chain(path, compression, progress=progress, expected=expected, readers=ctx.readers_for(path.name))
    transactional = transactional or not new_database  # only a new database may load statement by statement
    if fmt == "plain":
        load_sql(ctx, bin_dir, dbname, chunks, wipe=wipe, transactional=transactional)
        return
    jobs = pg.restore_jobs or os.cpu_count() or 1
    if new_database and jobs > 1:
        _parallel_restore(ctx, bin_dir, dbname, path, chunks, jobs)
        return
    with execute.ProcessGroup(KIND) as group:
        errors: list[BaseException] = []
        load_sql(ctx, bin_dir, dbname, _script_from_archive(ctx, group, bin_dir, chunks, errors), wipe=wipe,
                 transactional=transactional)


def _parallel_restore(ctx: JobContext, bin_dir: Path, dbname: str, path: Path, chunks: Iterable[bytes],  # noqa: PLR0913, PLR0917 - grouped with the flows written once
                      jobs: int) -> None:
    pg = ctx.config.postgres
    # pg_restore -j needs a seekable archive: unpack it next to the backup. Its name ends in .partial, so
    # if this process dies, the next run under the lock removes it (remove_stale_partials).
    scratch = path.with_name(f"kkua_restore_{now_local().strftime(ID_FORMAT)}_{os.getpid()}.dump")
    try:
        with AtomicFile(scratch, 0o600) as out:  # writes scratch + ".partial"; never committed
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            archive = out.partial
            with execute.ProcessGroup(KIND) as group:
                child = group.spawn(pg_restore_argv(bin_dir, pg, dbname, archive, jobs), env=child_env(pg),
                                    stdout=execute.DEVNULL, timeout=pg.restore_timeout)
                group.wait(child, what="pg_restore")
    finally:  # leaving the AtomicFile without commit removed it; make sure even if that failed
        scratch.with_name(scratch.name + PARTIAL_SUFFIX).unlink(missing_ok=True)


def create_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


# ----------------------------------------------------------------------------------------------
# Databases a run creates (a --target-db restore, a test restore's scratch database, a lost database made
# again): killed midway (kill -9 runs no cleanup), such a run leaves a half-made database behind. Before it
# creates one, a run leaves a note in the state folder (NEW_DB_NOTE + pid + nonce + .json: the database, the
# server, the pid, the time); the database is created under a name carrying the nonce, marked with a comment
# carrying it too, and only then renamed to its real name, so a database with that name either does not
# carry our mark (someone else's: never touched) or is ours from its first moment. A finished load removes
# the mark, then the note. Every postgres command starts by dropping the marked databases of notes whose run
# is gone (`drop_unfinished_databases`), one log line each.

NEW_DB_NOTE = "postgres-new-database-"
_MARK = "kkua-backup: unfinished restore {nonce}; dropped by the next kkua-backup run if this restore died"


def _note_folder(ctx: JobContext) -> Path:
    return ctx.config.state_file.parent


class NewDatabase:
    """A database this run creates and may leave half-made: `create`, then `finished` or `drop`."""

    def __init__(self, ctx: JobContext, admin: psycopg.Connection, name: str, purpose: str) -> None:
        self.ctx, self.admin, self.name, self.purpose = ctx, admin, name, purpose
        self.nonce = secrets.token_hex(8)
        self.mark = _MARK.format(nonce=self.nonce)
        self.temp = f"kkua_new_{self.nonce}"
        self.note = _note_folder(ctx) / f"{NEW_DB_NOTE}{os.getpid()}-{self.nonce}.json"

    def create(self) -> None:
        pg = self.ctx.config.postgres
        doc = {"database": self.name, "temporary_name": self.temp, "server": f"{pg.host}:{pg.port}",
               "pid": os.getpid(), "started_at": now_local().isoformat(timespec="seconds"), "nonce": self.nonce,
               "purpose": self.purpose}
        try:
            write_atomic(self.note, json.dumps(doc).encode())  # before the database exists: never a gap
        except (StorageError, OSError) as exc:  # a read-only state folder (--no-safety-backup from a copy)
            self.ctx.log.warning(f"cannot note the new database {self.name!r} in the state folder; if this run "
                                 f"is killed, nothing drops it: drop it by hand then", error=str(exc))
        create_database(self.admin, self.temp)
        try:
            self.admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(self.temp),
                                                                              sql.Literal(self.mark)))
            self.admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(self.temp),
                                                                                sql.Identifier(self.name)))
        except psycopg.Error:
            drop_database(self.admin, self.temp)
            self._forget()
            raise

    def finished(self) -> None:
        """The load ran to its end: the database is the operator's now (mark, then note removed)."""
        if _comment_of(self.admin, self.name) == self.mark:
            self.admin.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(self.name)))
        self._forget()

    def drop(self) -> None:
        drop_database(self.admin, self.name)
        self._forget()

    def _forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            unlink_in(self.note)


def _comment_of(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute("SELECT coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database "
                       "WHERE datname = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


def _run_alive(pid: object) -> bool:
    """Whether `pid` is still a kkua-backup process (a pid can be reused by anything after a kill)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return b"kkua" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _unfinished_notes(ctx: JobContext) -> list[tuple[Path, dict[str, Any]]]:
    """The notes in the state folder whose run is gone and whose server is the configured one."""
    folder = _note_folder(ctx)
    pg = ctx.config.postgres
    try:
        names = sorted(n for n in list_folder(folder) if n.startswith(NEW_DB_NOTE) and n.endswith(".json"))
    except FileNotFoundError:
        return []
    except OSError as exc:  # a state folder this user may not read: the runs that can will clean up
        ctx.log.debug("cannot look for notes of databases restores created", folder=str(folder), error=str(exc))
        return []
    notes = []
    for name in names:
        path = folder / name
        try:
            doc = json.loads(read_small(path, 1 << 16, root=folder))
        except (OSError, ValueError) as exc:
            ctx.log.warning("unreadable note of a database a restore created; left alone", file=str(path),
                            error=str(exc))
            continue
        if not isinstance(doc, dict) or doc.get("server") != f"{pg.host}:{pg.port}" or _run_alive(doc.get("pid")):
            continue
        notes.append((path, doc))
    return notes


def drop_unfinished_databases(ctx: JobContext, *, lock_held: bool = False) -> None:
    """Drop the databases that runs killed midway created and did not finish (see NewDatabase), one log line
    each; a database of the same name without the run's mark is never touched. Only while nobody holds the
    postgres lock (`lock_held`: the caller does). Costs nothing when there is no note; a server that cannot be
    reached is only a warning (the notes stay for the next run)."""
    try:
        notes = _unfinished_notes(ctx)
    except KkuaError as exc:  # a symlink or a stranger's file in the state folder: said, not followed
        ctx.log.warning("cannot read the notes of databases restores created", error=str(exc))
        return
    if not notes:
        return
    lock = None if lock_held else TargetLock(ctx.config.backup_dir, KIND, "drop unfinished databases")
    if lock is not None:
        try:
            lock.acquire()
        except (LockHeld, StorageError):
            return  # a run holds the lock: its databases are alive; the next command looks again
    try:
        admin = connect_maintenance(ctx.config.postgres)
    except KkuaError as exc:
        ctx.log.warning("cannot check for databases left half-made by a killed restore", error=str(exc))
        if lock is not None:
            lock.release()
        return
    try:
        for path, doc in notes:
            _drop_unfinished(ctx, admin, doc)
            with contextlib.suppress(FileNotFoundError):
                unlink_in(path)
    except psycopg.Error as exc:
        ctx.log.warning("cannot drop a database left half-made by a killed restore", error=str(exc).strip())
    finally:
        admin.close()
        if lock is not None:
            lock.release()


def _drop_unfinished(ctx: JobContext, admin: psycopg.Connection, doc: dict[str, Any]) -> None:
    name, nonce = str(doc.get("database", "")), str(doc.get("nonce", ""))
    mark = _MARK.format(nonce=nonce)
    who = f"pid {doc.get('pid')}, started {doc.get('started_at')}"
    temp = str(doc.get("temporary_name", ""))
    if temp == f"kkua_new_{nonce}" and _comment_of(admin, temp) is not None:
        drop_database(admin, temp)
        ctx.log.warning("dropped a database a killed restore had begun to create", database=temp, meant_as=name,
                        run=who)
    comment = _comment_of(admin, name)
    if comment is None:
        return
    if comment == mark:
        drop_database(admin, name)
        ctx.log.warning(f"dropped database {name!r}, left half-made by a restore that was killed ({who})",
                        database=name)
    else:
        ctx.log.info(f"database {name!r} exists but is not the one a killed restore ({who}) was making; "
                     "left alone", database=name)


def drop_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def terminate_sessions(conn: psycopg.Connection, dbname: str) -> int:
    """End every other session on `dbname`; returns how many were ended."""
    row = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchone()
    return int(row[0]) if row else 0


# ----------------------------------------------------------------------------------------------
# Test restore and verification


def _test_restore_file(ctx: JobContext, path: Path, fmt: str, compression: str, *, set_id: str,  # noqa: PLR0913 - keyword-only, typed with the flows
                       expected: dict[str, dict[str, Any]], expected_file: ManifestFile | None,
                       legacy: bool = False, archive_major: int | None = None, objects: int = 0) -> dict[str, Any]:
    """Restore a file into a scratch database, compare its tables with `expected`, always drop it.

    Returns {"ok", "ran", "database", "tables", "rows", "seconds", "problems", "error"}; never raises.
    `ran` is False when the test could not run at all (server unreachable, no suitable client, no right
    to create the scratch database): that says nothing about the backup, which then stays ok but
    unverified. Only a restore that ran and failed, or a result that differs, is a failed test.
    """
    pg = ctx.config.postgres
    scratch = _scratch_name(set_id)
    started = time.monotonic()
    outcome: dict[str, Any] = {"ok": False, "ran": False, "database": scratch, "error": None, "problems": []}
    ctx.log.info("test restore started", file=path.name, scratch_database=scratch)
    admin: psycopg.Connection | None = None
    try:
        admin = connect_maintenance(pg)
        bin_dir = restore_bin_dir(pg, server_info(admin), archive_major=archive_major)
        scratch_db = NewDatabase(ctx, admin, scratch, f"test restore of {path.name}")
        scratch_db.create()
    except (KkuaError, psycopg.Error) as exc:
        outcome["error"] = str(exc).strip().splitlines()[0]
        if admin is not None:
            admin.close()
        admin = None
    if admin is not None:
        outcome["ran"] = True
        try:
            progress = Progress(f"test restore {path.name}", enabled=ctx.interactive)
            restore_into(ctx, bin_dir, scratch, path, fmt, compression, wipe=False, new_database=True,
                         expected=expected_file, progress=progress,
                         transactional=objects + 100 <= lock_capacity(admin)[0])
            progress.clear()
            checksums = any("checksum" in t for t in expected.values())
            with connect(pg, scratch) as conn:
                found = table_stats(conn, checksums=checksums, legacy=legacy)
            outcome["problems"] = compare_stats(expected, found)
            outcome.update(tables=len(found), rows=sum(t["rows"] for t in found.values()),
                           checksums=checksums)
            outcome["ok"] = not outcome["problems"]
            if outcome["problems"]:
                outcome["error"] = "; ".join(outcome["problems"][:5])
        except (KkuaError, psycopg.Error) as exc:
            outcome["error"] = str(exc).strip().splitlines()[0]
        finally:
            try:
                scratch_db.drop()
            except psycopg.Error as exc:
                ctx.log.error("scratch database could not be dropped", database=scratch, error=str(exc).strip())
            admin.close()
    outcome["seconds"] = round(time.monotonic() - started, 2)
    if outcome["ok"]:
        ctx.log.info("test restore passed", file=path.name, tables=outcome["tables"], rows=outcome["rows"],
                     checksums="compared" if outcome.get("checksums") else "not recorded",
                     seconds=outcome["seconds"])
    elif not outcome["ran"]:
        ctx.log.error("test restore could not run", file=path.name, error=outcome["error"])
    else:
        ctx.log.error("test restore failed", file=path.name, error=outcome["error"])
    return outcome


def sql_problems(scanner: SqlStream, *, made_by_us: bool) -> list[str]:
    """What a restore of the SQL the scanner read would reject (empty when it would run to its end).
    pg_dump ends every dump with its "dump complete" comment; one of ours without it was cut short."""
    problems = list(scanner.problems)
    if made_by_us and not scanner.complete and scanner.truncated is None:
        problems.append("the SQL ends before pg_dump's closing comment: the dump is truncated")
    return problems


def set_format(backup_set: BackupSet) -> tuple[str, str]:
    """(format, compression) of a set, from its manifest or, for files made without one, its name."""
    if backup_set.manifest is not None:
        return backup_set.manifest.details.get("format", "plain"), backup_set.manifest.files[0].compression
    name = without_encryption_suffix(backup_set.name)
    compression = compression_of(name)
    stem = without_compression(name)
    if stem.endswith(".sql"):
        return "plain", compression
    if stem.endswith(".dump"):
        return "custom", compression
    raise UsageError(f"{backup_set.name} is not a PostgreSQL backup (expected .sql, .sql.gz, .sql.zst or .dump, each "
                     "perhaps with .age or .gpg)")


def _check_archive(ctx: JobContext, backup_set: BackupSet, path: Path, compression: str,
                   progress: Progress) -> tuple[CheckResult, SqlStream, str | None]:
    """Read a custom archive as a restore does: decompressed into `pg_restore --file -`, whose SQL is read
    by a SqlStream. Returns (size and sha256 of the file, the scanner, why pg_restore could not read the
    archive or None). Raises VersionTooNew when no pg_restore at least as new as the archive's pg_dump is
    installed (that says nothing against the set), IntegrityError when it does not decompress."""
    pg = ctx.config.postgres
    made_by = archive_major_of(backup_set)
    bin_dir = client_bin_dir(pg, made_by, doing=f"check {path.name}")
    archive = read_chain(path, compression, progress=progress, readers=ctx.readers_for(path.name))
    scanner = SqlStream(refuse_meta=False)
    errors: list[BaseException] = []
    with execute.ProcessGroup(KIND) as group:
        child = group.spawn(pg_restore_script_argv(bin_dir), stdin=execute.PIPE, timeout=pg.restore_timeout)

        def feed() -> None:
            try:
                _feed(archive, child.stdin, errors, close=False)
            finally:  # pg_restore must see the end of its input whatever happened here
                with contextlib.suppress(OSError):
                    child.stdin.close()  # type: ignore[union-attr]

        feeder = threading.Thread(target=feed, name="archive-feed", daemon=True)
        feeder.start()
        for part in stream_chunks(child.read):
            scanner.feed(part)
        scanner.finish()
        feeder.join()
        try:
            group.wait(child, what="pg_restore")
        except StepTimeout:
            raise
        except CommandFailed as exc:
            decode = [e for e in errors if not isinstance(e, BrokenPipeError)]
            if decode:  # it stopped because the file did not decompress: that is the error to report
                raise decode[0] from None
            reason = " | ".join(line.strip() for line in exc.stderr_tail[-2:]) or exc.message
            if "unsupported version" in reason:  # made by a newer pg_dump than the manifest says (or none)
                raise VersionTooNew(f"cannot check {path.name}: pg_restore {tool_major(bin_dir)} cannot read it "
                                    f"({reason})", hint=_client_hint(pg, None)) from None
            # the whole file's checksum decides first
            return check_file(path, compression, readers=ctx.readers_for(path.name)), scanner, reason
    if errors:
        raise errors[0]
    return CheckResult(archive.size, archive.sha256, archive.raw), scanner, None


def check_set(ctx: JobContext, backup_set: BackupSet) -> dict[str, Any]:
    """Check every file of a set against its manifest (size, sha256) and decompress it fully; a plain
    dump's SQL is read as psql would read it, a custom archive is read to its end by pg_restore (and its
    SQL read the same way). Raises IntegrityError on any difference or anything a restore would reject,
    VersionTooNew when no pg_restore can read the archive. This is what gates a restore and what `verify`
    runs."""
    results = []
    files = backup_set.manifest.files if backup_set.manifest else None
    targets = [(f.name, f.compression, f) for f in files] if files else \
        [(backup_set.name, set_format(backup_set)[1], None)]
    for name, compression, expected in targets:
        path = backup_set.path(name)
        if not path.is_file():
            raise IntegrityError(f"{path} is missing", hint="the set is incomplete; use another backup")
        if expected is not None and path.stat().st_size != expected.size:
            raise IntegrityError(f"{name} has {path.stat().st_size} bytes but its manifest says {expected.size}",
                                 hint="the file was truncated or replaced; use another backup")
        progress = Progress(f"checking {name}", total=path.stat().st_size, enabled=ctx.interactive)
        fmt = set_format(backup_set)[0]
        if fmt == "plain":
            source = read_chain(path, compression, progress=progress, readers=ctx.readers_for(path.name))
            scanner = SqlStream(refuse_meta=False)
            for part in source:
                scanner.feed(part)
            scanner.finish()
            result = CheckResult(source.size, source.sha256, source.raw)
        else:
            result, scanner, unreadable = _check_archive(ctx, backup_set, path, compression, progress)
        progress.clear()
        if expected is not None and result.sha256 != expected.sha256:
            raise IntegrityError(f"{name} does not match its checksum (sha256 {result.sha256[:12]}..., "
                                 f"manifest {expected.sha256[:12]}...)",
                                 hint="the file is corrupt; use another backup")
        if fmt == "custom" and unreadable:
            raise IntegrityError(f"{name} would not restore: pg_restore cannot read the archive: {unreadable}",
                                 hint="nothing was changed; use another backup")
        problems = sql_problems(scanner, made_by_us=expected is not None or fmt == "custom")
        if problems:
            raise IntegrityError(f"{name} would not restore: {problems[0]}",
                                 hint="nothing was changed; use another backup")
        results.append({"name": name, "size": result.size, "sha256": result.sha256,
                        "uncompressed": result.uncompressed,
                        "checksum": "ok" if expected is not None else "no manifest"})
        ctx.log.info("file checked", file=name, size=human_bytes(result.size),
                     checksum="ok" if expected is not None else "not recorded (no manifest)", decompress="ok",
                     **({"pg_restore": "reads it to its end"} if fmt == "custom" else {}))
    return {"files": results}


def verify_set(ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
    """`verify`: check the files and, if asked, restore them into a scratch database and compare."""
    def test() -> dict[str, Any]:
        fmt, compression = set_format(backup_set)
        expected = backup_set.manifest.details.get("tables", {}) if backup_set.manifest else {}
        with TargetLock(ctx.config.backup_dir, KIND, "verify --restore-test"):
            return _test_restore_file(
                ctx, backup_set.path(), fmt, compression, set_id=backup_set.id or "adhoc", expected=expected,
                legacy=legacy_keys(backup_set.manifest.details if backup_set.manifest else None),
                archive_major=archive_major_of(backup_set),
                objects=int(backup_set.manifest.details.get("objects", 0)) if backup_set.manifest else 0,
                expected_file=backup_set.manifest.files[0] if backup_set.manifest else None)

    signature = check_signed(ctx, backup_set)
    try:
        checked = check_set(ctx, backup_set)
    except KeyMissing as missing:  # an encrypted set on a host without its key: the checksums still say much
        if restore_test:
            raise
        return verify_report(backup_set, {**checksums_only(ctx, backup_set, missing), "signature": signature}, None)
    except IntegrityError as exc:
        if "would not restore" in exc.message:
            _mark_failed(ctx, backup_set, exc.message)
        raise
    report = verify_report(backup_set, {**checked, "signature": signature}, test if restore_test else None)
    outcome = report.restore_test
    if outcome and outcome.get("ran") and not outcome["ok"]:
        _mark_failed(ctx, backup_set, f"test restore failed: {outcome['error']}")
    return report


def _mark_failed(ctx: JobContext, backup_set: BackupSet, reason: str) -> None:
    """A set found unrestorable must not stay ok: its manifest says failed from now on."""
    manifest = backup_set.manifest
    if manifest is None or manifest.status == "failed":
        return
    with TargetLock(ctx.config.backup_dir, KIND, "verify"):
        write_manifest(backup_set.folder, manifest.model_copy(update={"status": "failed", "error": reason}))
    ctx.log.error("set marked failed", file=backup_set.name, reason=reason)


# ----------------------------------------------------------------------------------------------
# Restore


class _Restore:
    """A restore of a PostgreSQL set, in core/flows.restore's order: into the configured database in one
    transaction (the file checked before anything changes, so a failed restore leaves the old data in
    place), or into a new `--target-db` (dropped again on failure)."""

    checks = "a decompress test"

    def __init__(self, ctx: JobContext, spec: str, options: RestoreOptions) -> None:
        pg = ctx.config.postgres
        self.ctx, self.options = ctx, options
        self.backup_set = resolve(ctx.config.backup_dir, KIND, spec)
        self.name = self.backup_set.name
        self.fmt, self.compression = set_format(self.backup_set)
        self.database = options.target_db or pg.database
        self.target = repr(self.database)
        self.requested = {"database": self.database, "host": pg.host, "port": pg.port}
        self.target_field = {"database": self.database}
        self.report: dict[str, Any] = {"kind": KIND, "file": self.name, "id": self.backup_set.id,
                                       "database": self.database, "format": self.fmt,
                                       "compression": self.compression}
        self._admin: psycopg.Connection | None = None
        self._bin_dir = Path()
        self._exists = False
        self._transactional = True

    @property
    def admin(self) -> psycopg.Connection:
        assert self._admin is not None, "plan and apply run inside the session"
        return self._admin

    def prepare(self) -> None:
        drop_unfinished_databases(self.ctx, lock_held=True)

    def check(self) -> None:
        self.report["check"] = check_set(self.ctx, self.backup_set)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A maintenance connection for the plan and the load; what PostgreSQL refuses becomes a JobError."""
        self._admin = connect_maintenance(self.ctx.config.postgres)
        try:
            yield
        except psycopg.Error as exc:
            raise JobError(f"PostgreSQL refused a step of the restore into {self.database!r}: {str(exc).strip()}",
                           hint="the backup user needs CREATEDB and ownership of the database") from None
        finally:
            self._admin.close()
            self._admin = None

    def plan(self) -> RestorePlan:
        ctx, backup_set, target, admin = self.ctx, self.backup_set, self.database, self.admin
        pg = ctx.config.postgres
        self._bin_dir = restore_bin_dir(pg, server_info(admin), archive_major=archive_major_of(backup_set))
        self._exists = exists = database_exists(admin, target)
        needed = backup_set.manifest.details.get("roles", []) if backup_set.manifest else []
        absent = missing_roles(admin, needed)
        if absent:
            raise Refused(f"the backup's objects belong to or are granted to role(s) {', '.join(absent)}, "
                          f"which {pg.host}:{pg.port} does not have; nothing was changed",
                          hint=f"create them first (e.g. CREATE ROLE {absent[0]} LOGIN PASSWORD '...'), "
                               "then restore again")
        target_db = self.options.target_db
        if target_db and exists:
            raise Refused(f"database {target!r} already exists",
                          hint="--target-db restores into a new database: choose another name or drop it")
        self._transactional = _fits_one_transaction(ctx, admin, backup_set, target, in_place=exists)
        return _plan(ctx, backup_set, target, in_place=target_db is None, exists=exists,
                     safety=self.options.safety_backup and target_db is None and exists)

    def safety_backup(self) -> dict[str, Any]:
        return _safety_backup(self.ctx, self.database)

    def apply(self) -> None:
        ctx, backup_set, target, admin = self.ctx, self.backup_set, self.database, self.admin
        created: NewDatabase | None = None
        if not self._exists:
            created = NewDatabase(ctx, admin, target, f"restore of {backup_set.name}")
            created.create()
            ctx.log.info("database created", database=target)
        else:
            ended = terminate_sessions(admin, target)
            if ended:
                ctx.log.info("ended other sessions on the database", database=target, sessions=ended)
        progress = Progress(f"restoring {backup_set.name}", total=backup_set.path().stat().st_size,
                            enabled=ctx.interactive)
        load_started = time.monotonic()
        try:
            restore_into(ctx, self._bin_dir, target, backup_set.path(), self.fmt, self.compression,
                         wipe=created is None,
                         expected=backup_set.manifest.files[0] if backup_set.manifest else None,
                         new_database=created is not None, progress=progress,
                         transactional=self._transactional or created is None)
        except KkuaError as exc:
            progress.clear()
            if created is not None:
                created.drop()
                raise JobError(f"restore of {backup_set.name} into new database {target!r} failed; "
                               f"the database was dropped again: {exc}") from None
            raise JobError(f"restore of {backup_set.name} failed and was rolled back; database {target!r}"
                           f" still holds its previous data: {exc}", hint=restore_hint(exc)) from None
        progress.clear()
        if created is not None:
            created.finished()
        self.report["load_seconds"] = round(time.monotonic() - load_started, 2)

    def counts_after(self) -> list[str]:
        self.report.update(_verify_restored(self.ctx, self.backup_set, self.database))
        problems: list[str] = self.report["problems"]
        return problems

    def undo_hint(self) -> str:
        return "inspect the database; the safety backup holds the data from before"

    def finished(self) -> None:
        report = self.report
        self.ctx.log.info("restore finished", file=self.name, database=self.database, tables=report["tables"],
                          rows=report["rows"], seconds=report["seconds"], verified="row counts match the backup"
                          if self.backup_set.manifest else "no manifest to compare with")


def _fits_one_transaction(ctx: JobContext, admin: psycopg.Connection, backup_set: BackupSet, target: str, *,
                          in_place: bool) -> bool:
    """Whether the restore's locks fit in the server's lock table. A restore in place that does not fit is
    refused here, before any change, naming the setting to raise; a new database that does not fit is
    loaded statement by statement instead (it is dropped again if the load fails, so nothing is lost)."""
    backup_objects = int(backup_set.manifest.details.get("objects", 0)) if backup_set.manifest else 0
    if not backup_objects:
        return True
    now = 0
    if in_place:
        with connect(ctx.config.postgres, target) as conn:
            now = count_objects(conn)
    needed = backup_objects + now + 100
    capacity, settings = lock_capacity(admin)
    if needed <= capacity:
        return True
    if not in_place:
        ctx.log.info("the backup has more objects than one transaction can lock; loading the new database "
                     "statement by statement (it is dropped again if the load fails)", objects=backup_objects,
                     lock_slots=capacity)
        return False
    sessions = capacity // settings["max_locks_per_transaction"]
    raise_to = -(-needed // sessions)
    raise Refused(
        f"restoring {backup_set.name} in place needs about {needed} locks in one transaction ({backup_objects} "
        f"objects in the backup, {now} in {target!r} now) but the server's lock table has about {capacity} "
        f"(max_locks_per_transaction {settings['max_locks_per_transaction']} x {sessions} sessions); "
        "nothing was changed",
        hint=f"set max_locks_per_transaction = {raise_to} (or more) in postgresql.conf and restart PostgreSQL, "
             f"or restore into a new database with --target-db, which needs no single transaction")


_MISSING_ROLE = re.compile(r'role "([^"]+)" does not exist')


def restore_hint(exc: KkuaError) -> str:
    """What to do about a failed load, read from the tool's last error lines."""
    text = " ".join(getattr(exc, "stderr_tail", [])) + " " + exc.message
    missing = sorted(set(_MISSING_ROLE.findall(text)))
    if missing:
        names = ", ".join(missing)
        return (f"the backup's objects belong to role(s) {names}, which this server does not have: create "
                f"them (CREATE ROLE {missing[0]} LOGIN ...), then restore again")
    if "permission denied" in text or "must be owner" in text:
        return "the restoring user must own the database's objects (or be a superuser)"
    return "see restore.log for the failing statement"


def _plan(ctx: JobContext, backup_set: BackupSet, target: str, *, in_place: bool, exists: bool,  # noqa: PLR0913 - keyword-only plan facts, typed with the flows
          safety: bool) -> RestorePlan:
    pg = ctx.config.postgres
    plan = RestorePlan(backup_set, target, in_place, exists, safety)
    m = backup_set.manifest
    created = m.created_at.strftime("%Y-%m-%d %H:%M:%S %z") if m else "unknown (no manifest)"
    tables = m.details.get("tables", {}) if m else {}
    plan.lines = [
        f"Restore {backup_set.name}",
        f"  made:      {created}, {human_bytes(backup_set.size)}"
        + (f", {len(tables)} tables, {sum(t['rows'] for t in tables.values())} rows" if tables else ""),
        f"  into:      database {target!r} on {pg.host}:{pg.port}"
        + ("" if exists else " (new database)"),
    ]
    if in_place and exists:
        plan.lines.append(f"  effect:    everything now in {target!r} is replaced by the backup; "
                          "other sessions on it are ended")
        plan.lines.append("  safety:    " + ("a backup of the current data is taken first" if safety
                                             else "NO safety backup (--no-safety-backup)"))
    ctx.log.info("restore plan", file=backup_set.name, made=created, database=target, host=pg.host, port=pg.port,
                 replaces_current_data=in_place and exists, safety_backup=safety)
    return plan


def _safety_backup(ctx: JobContext, dbname: str) -> dict[str, Any]:
    pg = ctx.config.postgres
    folder = kind_folder(ctx.config.backup_dir, KIND)
    prefix = PREFIXES[KIND]["safety"]
    ctx.log.info("taking safety backup before restore", database=dbname)
    result = dump(ctx, folder, prefix=prefix, fmt="plain", compression=pg.compression, dbname=dbname)
    write_manifest(folder, sign(_manifest_for(result, set_type="safety", prefix=prefix, dbname=dbname),
                                ctx.keys.signing_key))
    ctx.log.info("safety backup written", file=result.file.name, size=human_bytes(result.file.size))
    return {"file": result.file.name, "size": result.file.size, "sha256": result.file.sha256}


def _verify_restored(ctx: JobContext, backup_set: BackupSet, target: str) -> dict[str, Any]:
    pg = ctx.config.postgres
    with connect(pg, target) as conn:
        found = table_stats(conn, checksums=False,
                            legacy=legacy_keys(backup_set.manifest.details if backup_set.manifest else None))
    expected = backup_set.manifest.details.get("tables") if backup_set.manifest else None
    problems = compare_stats(expected, found) if expected is not None else []
    return {"tables": len(found), "rows": sum(t["rows"] for t in found.values()), "problems": problems,
            "verified": not problems}
