"""A restore into the configured or a new database: its checks, plan, safety backup, the load in one
transaction, and the comparison of what the target holds with what the backup recorded.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import ClassVar, cast

import psycopg
from pydantic import Field

from kkua_backupd.core.context import (
    CheckedSet,
    JobContext,
    RestorePlan,
    RestoreReport,
    SafetyBackup,
    one_pass_refusal,
)
from kkua_backupd.errors import (
    JobError,
    KkuaError,
    Refused,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.safefs import unlink_in
from kkua_backupd.sources import RestoreOptions
from kkua_backupd.sources.postgres.backup import dump, manifest_for
from kkua_backupd.sources.postgres.client import (
    KIND,
    archive_major_of,
    connect,
    connect_maintenance,
    database_exists,
    restore_bin_dir,
    server_info,
)
from kkua_backupd.sources.postgres.load import (
    NewDatabase,
    RowCountsDiffer,
    drop_unfinished_databases,
    restore_into,
    terminate_sessions,
)
from kkua_backupd.sources.postgres.manifest import PostgresDetails, details_of
from kkua_backupd.sources.postgres.stats import (
    RowCheck,
    compare_stats,
    count_objects,
    legacy_keys,
    lock_capacity,
    missing_roles,
    table_stats,
)
from kkua_backupd.sources.postgres.verify import check_directory, check_set, file_in_place, set_format
from kkua_backupd.store.signing import sign
from kkua_backupd.store.storage import (
    PREFIXES,
    BackupSet,
    kind_folder,
    resolve,
    scratch_folder,
    write_manifest,
)
from kkua_backupd.stream.chain import read_chain

# Restore


class PostgresRestoreReport(RestoreReport):
    """A PostgreSQL restore: the target database, the set's format, how long the load took, and what the
    database holds afterwards (`problems`: how it differs from what the backup recorded)."""

    ORDER: ClassVar[tuple[str, ...]] = ("kind", "file", "id", "database", "format", "compression", "check",
                                        "safety_backup", "load_seconds", "tables", "rows", "problems", "verified",
                                        "seconds")
    database: str
    format: str
    compression: str
    load_seconds: float | None = None
    tables: int = 0
    rows: int = 0
    problems: list[str] = Field(default_factory=list)
    verified: bool = False


class PostgresRestore:
    """A restore of a PostgreSQL set, in core/flows.restore's order: into the configured database in one
    transaction, so a failed restore leaves the old data in place, or into a new `--target-db` (dropped again
    on failure). A trusted set (core/context.one_pass_refusal) is checked while it loads, in one pass: the
    COMMIT is sent (or a new database kept) only once every file's sha256 and size, and the SQL or
    pg_restore's run, passed (docs/decisions/0018, 0023); any other set is read in full first."""

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
        self.report = PostgresRestoreReport(kind=KIND, file=self.name, id=self.backup_set.id,
                                            database=self.database, format=self.fmt, compression=self.compression)
        self._details: PostgresDetails | None = None  # read by check(), once the set is trusted
        self._admin: psycopg.Connection | None = None
        self._bin_dir = Path()
        self._exists = False
        self._transactional = True
        self._stack = contextlib.ExitStack()  # the scratch folder of a directory set, until the session ends
        self._unpacked: Path | None = None
        self._one_pass = False
        self._rows: RowCheck | None = None  # the manifest's row counts, when the load checks them itself

    @property
    def admin(self) -> psycopg.Connection:
        assert self._admin is not None, "plan and apply run inside the session"
        return self._admin

    def prepare(self) -> None:
        drop_unfinished_databases(self.ctx, lock_held=True)

    def check(self) -> None:
        """The pre-check (verify.check_set: every byte read, hashed, decompressed and scanned before anything
        changes), or for a trusted set only what costs nothing (its files there, their sizes, the first one
        opens with this host's key) and the rest while it loads (`apply`; a directory set's tables stream from their set
        files into COPY, load.DirectoryLoad). A pre-checked directory set is unpacked into a scratch folder here,
        each file checked, its table of contents listed, and the load reads that folder (removed when the session
        ends, or by the next run after a kill); its SQL is read by the load itself."""
        ctx, backup_set = self.ctx, self.backup_set
        self._details = details_of(backup_set)
        refusal = one_pass_refusal(ctx, backup_set)
        files = backup_set.manifest.files if backup_set.manifest is not None else []
        if refusal is None and self.fmt != "directory" and len(files) != 1:
            refusal = "it has more than one file"
        if refusal is None:
            for entry in files:
                file_in_place(backup_set, entry.name, entry)
            _opens(ctx, backup_set.path(files[0].name), files[0].compression)
            self._one_pass = True
            self.report.check = CheckedSet(mode="one pass", files=[])
            ctx.log.info("checking the set while it loads (one pass): the restore is done only if every file's "
                         "size and sha256 match and pg_restore or psql ran it to its end", file=self.name,
                         files=len(files))
            return
        ctx.log.info("reading the set in full before the restore (pre-check)", file=self.name, reason=refusal)
        if self.fmt == "directory" and backup_set.manifest is not None:
            scratch = self._stack.enter_context(scratch_folder(backup_set.folder))
            try:
                checked = CheckedSet(files=check_directory(ctx, backup_set, scratch, read_sql=False))
            except BaseException:
                self._stack.close()
                raise
            self._unpacked = scratch
        else:
            checked = check_set(ctx, backup_set)
        checked.mode, checked.reason = "pre-check", refusal
        self.report.check = checked

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A maintenance connection for the plan and the load; what PostgreSQL refuses becomes a JobError."""
        try:
            self._admin = connect_maintenance(self.ctx.config.postgres)
        except BaseException:
            self._stack.close()
            raise
        try:
            yield
        except psycopg.Error as exc:
            raise JobError(f"PostgreSQL refused a step of the restore into {self.database!r}: {str(exc).strip()}",
                           hint="the backup user needs CREATEDB and ownership of the database") from None
        finally:
            self._admin.close()
            self._admin = None
            self._stack.close()
            self._unpacked = None

    def plan(self) -> RestorePlan:
        ctx, backup_set, target, admin = self.ctx, self.backup_set, self.database, self.admin
        pg = ctx.config.postgres
        self._bin_dir = restore_bin_dir(pg, server_info(admin), archive_major=archive_major_of(backup_set))
        self._exists = exists = database_exists(admin, target)
        needed = self._details.roles if self._details is not None else []
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
        plan = _plan(ctx, backup_set, target, in_place=target_db is None, exists=exists,
                     safety=self.options.safety_backup and target_db is None and exists)
        plan.lines.append("  check:     " + ("while it loads (one pass); nothing is kept unless it matches"
                                             if self._one_pass else "done (the whole file was read)"))
        return plan

    def safety_backup(self) -> SafetyBackup:
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
        progress = Progress(f"restoring {backup_set.name}", total=backup_set.size,
                            enabled=ctx.interactive)
        load_started = time.monotonic()
        details = self._details
        self._rows = RowCheck(details.tables, legacy=legacy_keys(details)) \
            if details is not None and details.has("tables") else None
        try:
            loaded = restore_into(ctx, self._bin_dir, target, backup_set.path(), self.fmt, self.compression,
                                  wipe=created is None,
                                  expected=backup_set.manifest.files[0] if backup_set.manifest else None,
                                  new_database=created is not None, progress=progress,
                                  transactional=self._transactional or created is None,
                                  members=backup_set.manifest.files if backup_set.manifest else (),
                                  unpacked=self._unpacked, rows=self._rows)
        except KkuaError as exc:
            progress.clear()
            unrestorable = self._unrestorable(exc)
            if created is not None:
                created.drop()
                if unrestorable is not None:
                    raise type(unrestorable)(f"{unrestorable.message}; the new database {target!r} was dropped "
                                             "again", hint=unrestorable.hint) from None
                raise JobError(f"restore of {backup_set.name} into new database {target!r} failed; "
                               f"the database was dropped again: {exc}",
                               hint=exc.hint if isinstance(exc, RowCountsDiffer) else None) from None
            if unrestorable is not None:
                self._remove_safety_backup()
                raise type(unrestorable)(f"{unrestorable.message}; the restore was rolled back before its COMMIT: "
                                         f"database {target!r} still holds its previous data",
                                         hint=unrestorable.hint) from None
            raise JobError(f"restore of {backup_set.name} failed and was rolled back; database {target!r}"
                           f" still holds its previous data: {exc}", hint=restore_hint(exc)) from None
        progress.clear()
        if created is not None:
            created.finished()
        self.report.load_seconds = round(time.monotonic() - load_started, 2)
        if self._one_pass and loaded and self.report.check is not None:
            self.report.check.files = [{"name": name, "size": found.size, "sha256": found.sha256,
                                        "uncompressed": found.uncompressed, "checksum": "ok"} for name, found in loaded]
            ctx.log.info("checked while it loaded", file=self.name, files=len(loaded),
                         size=human_bytes(sum(found.size for _, found in loaded)), checksum="ok", decompress="ok")

    def _unrestorable(self, exc: KkuaError) -> Refused | None:
        """After a one-pass load failed (it stopped before its COMMIT): what the pre-check would have refused
        the set for, found by running it now (verify.check_set: a file that differs from its manifest, SQL
        cut short or with a meta-command), or None when the set passes it and the load failed for another
        reason (a statement the server refused, a missing role), which is said as it always was. Tables
        that differ from the manifest (RowCountsDiffer) were made by SQL that loaded to its end: no check."""
        if not self._one_pass or isinstance(exc, RowCountsDiffer):
            return None
        try:
            check_set(self.ctx, self.backup_set)
        except Refused as found:  # IntegrityError, WrongKey: what the check before the load would have said
            return found
        except KkuaError:
            pass  # unreadable now: the load's own error says what happened
        return exc if isinstance(exc, Refused) else None

    def _remove_safety_backup(self) -> None:
        """A one-pass restore rolled back for what the pre-check would have refused: the safety backup this
        run took holds what the database still holds, and the pre-check would not have taken it."""
        made = self.report.safety_backup
        if made is None:
            return
        self.report.safety_backup = None
        self.report.model_fields_set.discard("safety_backup")  # not in the report: no safety backup is left
        try:
            safety = resolve(self.ctx.config.backup_dir, KIND, made.file)
            for path in (safety.manifest_path, safety.path()):  # the manifest first: never half a set listed
                if path is not None:
                    unlink_in(path)
        except (KkuaError, OSError) as exc:
            self.ctx.log.warning("the safety backup taken for this restore could not be removed; it holds the "
                                 "data the database still holds", file=made.file, error=str(exc))
            return
        self.ctx.log.info("removed the safety backup taken for this restore: the restore was rolled back, and "
                          "the database still holds the data it saved", file=made.file)

    def counts_after(self) -> list[str]:
        """What the target holds against the manifest: checked by the load itself before its COMMIT when it
        could (`RowCheck`: the tables and rows are then the manifest's), counted now otherwise."""
        if self._rows is not None and self._rows.checked:
            report = self.report
            report.tables, report.rows = self._rows.totals()
            report.problems, report.verified = [], True
            self.ctx.log.info("row counts checked before the COMMIT", tables=report.tables, rows=report.rows)
            return []
        _verify_restored(self.ctx, self._details, self.database, self.report)
        return self.report.problems

    def undo_hint(self) -> str:
        if self.options.target_db:
            return (f"the original database was not touched; inspect {self.database!r}, or drop it "
                    "(DROP DATABASE) and restore another backup")
        return "inspect the database; the safety backup holds the data from before"

    def finished(self) -> None:
        report = self.report
        self.ctx.log.info("restore finished", file=self.name, database=self.database, tables=report.tables,
                          rows=report.rows, seconds=report.seconds, verified="row counts match the backup"
                          if self.backup_set.manifest else "no manifest to compare with")


def _opens(ctx: JobContext, path: Path, compression: str) -> None:
    """Before a one-pass restore changes anything: read the file's first chunk back through its chain, so a
    key this host lacks (KeyMissing, exit 2), one that does not open the file (WrongKey, exit 3), or data
    that is not what its name says is found as the full check would find it, before the safety backup."""
    chunks = cast(Generator[bytes, None, None], iter(read_chain(path, compression,
                                                                readers=ctx.readers_for(path.name))))
    with contextlib.closing(chunks):
        next(chunks, None)


def _fits_one_transaction(ctx: JobContext, admin: psycopg.Connection, backup_set: BackupSet, target: str, *,
                          in_place: bool) -> bool:
    """Whether the restore's locks fit in the server's lock table. A restore in place that does not fit is
    refused here, before any change, naming the setting to raise; a new database that does not fit is
    loaded statement by statement instead (it is dropped again if the load fails, so nothing is lost)."""
    details = details_of(backup_set)
    backup_objects = details.objects if details is not None else 0
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
    if isinstance(exc, RowCountsDiffer) and exc.hint:
        return exc.hint
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
    details = details_of(backup_set)
    tables = details.tables if details is not None else {}
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


def _safety_backup(ctx: JobContext, dbname: str) -> SafetyBackup:
    pg = ctx.config.postgres
    folder = kind_folder(ctx.config.backup_dir, KIND)
    prefix = PREFIXES[KIND]["safety"]
    ctx.log.info("taking safety backup before restore", database=dbname)
    result = dump(ctx, folder, prefix=prefix, fmt="plain", compression=pg.compression, dbname=dbname)
    write_manifest(folder, sign(manifest_for(result, set_type="safety", prefix=prefix, dbname=dbname),
                                ctx.keys.signing_key))
    ctx.log.info("safety backup written", file=result.file.name, size=human_bytes(result.file.size))
    return SafetyBackup(file=result.file.name, size=result.file.size, sha256=result.file.sha256)


def _verify_restored(ctx: JobContext, details: PostgresDetails | None, target: str,
                     report: PostgresRestoreReport) -> None:
    """What `target` holds now against the tables the backup recorded, into the report."""
    pg = ctx.config.postgres
    with connect(pg, target) as conn:
        found = table_stats(conn, checksums=False, legacy=legacy_keys(details))
    expected = details.tables if details is not None and details.has("tables") else None
    problems = compare_stats(expected, found) if expected is not None else []
    report.tables, report.rows = len(found), sum(t["rows"] for t in found.values())
    report.problems, report.verified = problems, not problems
