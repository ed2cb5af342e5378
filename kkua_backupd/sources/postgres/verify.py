"""Checking a set without changing anything (its archive, its SQL scanned for meta-commands) and test
restores into a scratch database that prove it loads and holds what the manifest recorded.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

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
    KeyMissing,
    KkuaError,
    StepTimeout,
    UsageError,
    VersionTooNew,
)
from kkua_backupd.obs.progress import Progress, human_bytes
from kkua_backupd.proc import execute
from kkua_backupd.sources.postgres.client import (
    KIND,
    archive_major_of,
    client_bin_dir,
    client_hint,
    connect,
    connect_maintenance,
    pg_restore_script_argv,
    restore_bin_dir,
    server_info,
    tool_major,
)
from kkua_backupd.sources.postgres.load import (
    NewDatabase,
    absent_data_files,
    checksum_error,
    dump_problems,
    feed_pipe,
    file_present,
    restore_into,
    scratch_name,
    script_from_archive,
    unpack_directory,
)
from kkua_backupd.sources.postgres.manifest import RestoreTest, TableStats, details_of
from kkua_backupd.sources.postgres.pg_sql import SqlStream
from kkua_backupd.sources.postgres.stats import compare_stats, legacy_keys, lock_capacity, table_stats
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.storage import (
    BackupSet,
    ManifestFile,
    scratch_folder,
    write_manifest,
)
from kkua_backupd.stream.chain import (
    CheckResult,
    check_file,
    compression_of,
    read_chain,
    without_compression,
)
from kkua_backupd.stream.encrypt import without_encryption_suffix
from kkua_backupd.stream.pipeline import stream_chunks

# Test restore and verification


def test_restore_file(ctx: JobContext, path: Path, fmt: str, compression: str, *, set_id: str,  # noqa: PLR0913 - keyword-only, typed with the flows
                       expected: dict[str, TableStats], expected_file: ManifestFile | None,
                       legacy: bool = False, archive_major: int | None = None, objects: int = 0,
                       members: Sequence[ManifestFile] = ()) -> RestoreTest:
    """Restore a file into a scratch database, compare its tables with `expected`, always drop it.

    Returns the outcome (ok, ran, database, tables, rows, seconds, problems, error); never raises.
    `ran` is False when the test could not run at all (server unreachable, no suitable client, no right
    to create the scratch database): that says nothing about the backup, which then stays ok but
    unverified. Only a restore that ran and failed, or a result that differs, is a failed test.
    """
    pg = ctx.config.postgres
    scratch = scratch_name(set_id)
    started = time.monotonic()
    outcome = RestoreTest(ok=False, ran=False, database=scratch, error=None, problems=[])
    ctx.log.info("test restore started", file=path.name, scratch_database=scratch)
    admin: psycopg.Connection | None = None
    try:
        admin = connect_maintenance(pg)
        bin_dir = restore_bin_dir(pg, server_info(admin), archive_major=archive_major)
        scratch_db = NewDatabase(ctx, admin, scratch, f"test restore of {path.name}")
        scratch_db.create()
    except (KkuaError, psycopg.Error) as exc:
        outcome.error = str(exc).strip().splitlines()[0]
        if admin is not None:
            admin.close()
        admin = None
    if admin is not None:
        outcome.ran = True
        try:
            progress = Progress(f"test restore {path.name}", enabled=ctx.interactive)
            restore_into(ctx, bin_dir, scratch, path, fmt, compression, wipe=False, new_database=True,
                         expected=expected_file, progress=progress,
                         transactional=objects + 100 <= lock_capacity(admin)[0], members=members)
            progress.clear()
            checksums = any("checksum" in t for t in expected.values())
            with connect(pg, scratch) as conn:
                found = table_stats(conn, checksums=checksums, legacy=legacy)
            outcome.problems = compare_stats(expected, found)
            outcome.tables, outcome.rows = len(found), sum(t["rows"] for t in found.values())
            outcome.checksums = checksums
            outcome.ok = not outcome.problems
            if outcome.problems:
                outcome.error = "; ".join(outcome.problems[:5])
        except (KkuaError, psycopg.Error) as exc:
            outcome.error = str(exc).strip().splitlines()[0]
        finally:
            try:
                scratch_db.drop()
            except psycopg.Error as exc:
                ctx.log.error("scratch database could not be dropped", database=scratch, error=str(exc).strip())
            admin.close()
    outcome.seconds = round(time.monotonic() - started, 2)
    if outcome.ok:
        ctx.log.info("test restore passed", file=path.name, tables=outcome.tables, rows=outcome.rows,
                     checksums="compared" if outcome.checksums else "not recorded",
                     seconds=outcome.seconds)
    elif not outcome.ran:
        ctx.log.error("test restore could not run", file=path.name, error=outcome.error)
    else:
        ctx.log.error("test restore failed", file=path.name, error=outcome.error)
    return outcome


def sql_problems(scanner: SqlStream, *, made_by_us: bool) -> list[str]:
    """What a restore of the SQL the scanner read would reject (empty when it would run to its end); for
    SQL the tool wrote, as a one-pass restore refuses it before its COMMIT (load.dump_problems)."""
    return dump_problems(scanner) if made_by_us else list(scanner.problems)


def set_format(backup_set: BackupSet) -> tuple[str, str]:
    """(format, compression) of a set, from its manifest or, for files made without one, its name."""
    if backup_set.manifest is not None:
        details = details_of(backup_set)
        assert details is not None
        return details.format, backup_set.manifest.files[0].compression
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
                feed_pipe(archive, child.stdin, errors, close=False)
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
                                    f"({reason})", hint=client_hint(pg, None)) from None
            # the whole file's checksum decides first
            return check_file(path, compression, readers=ctx.readers_for(path.name)), scanner, reason
    if errors:
        raise errors[0]
    return CheckResult(archive.size, archive.sha256, archive.raw), scanner, None


def file_in_place(backup_set: BackupSet, name: str, expected: ManifestFile | None) -> Path:
    """The path of the set's file `name`, once it is there with the size its manifest recorded; raises
    IntegrityError otherwise. What every restore checks before anything changes, even in one pass."""
    path = backup_set.path(name)
    file_present(path, expected)
    return path


def check_set(ctx: JobContext, backup_set: BackupSet) -> CheckedSet:
    """Check every file of a set against its manifest (size, sha256) and decompress it fully; a plain
    dump's SQL is read as psql would read it, a custom archive is read to its end by pg_restore (and its
    SQL read the same way), a directory set is unpacked and read the same way (`_check_directory`). Raises
    IntegrityError on any difference or anything a restore would reject, VersionTooNew when no pg_restore
    can read the archive. This is what gates a restore and what `verify` runs."""
    results = []
    files = backup_set.manifest.files if backup_set.manifest else None
    fmt = set_format(backup_set)[0]
    if fmt == "directory" and files:
        with scratch_folder(backup_set.folder) as scratch:
            return CheckedSet(files=check_directory(ctx, backup_set, scratch, read_sql=True))
    targets = [(f.name, f.compression, f) for f in files] if files else \
        [(backup_set.name, set_format(backup_set)[1], None)]
    for name, compression, expected in targets:
        path = file_in_place(backup_set, name, expected)
        progress = Progress(f"checking {name}", total=path.stat().st_size, enabled=ctx.interactive)
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
            raise checksum_error(name, result.sha256, expected.sha256)
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
    return CheckedSet(files=results)


def check_directory(ctx: JobContext, backup_set: BackupSet, scratch: Path, *, read_sql: bool) -> list[dict[str, Any]]:
    """A directory set read as a restore reads it: every file unpacked into the private folder `scratch` (as
    much disk as the uncompressed dump) and checked against the manifest, and `pg_restore --list` of the table
    of contents, whose every table's data file must be in the set; with `read_sql`, the whole archive turned
    into SQL by pg_restore and read to its end (as `_check_archive` does for a custom one). Raises as
    `check_set`."""
    assert backup_set.manifest is not None, "a directory set has a manifest"
    files = backup_set.manifest.files
    pg = ctx.config.postgres
    name = backup_set.name
    bin_dir = client_bin_dir(pg, archive_major_of(backup_set), doing=f"check {name}")
    progress = Progress(f"checking {name}", total=backup_set.size, enabled=ctx.interactive)
    scanner = SqlStream(refuse_meta=False)
    checked = unpack_directory(ctx, backup_set.folder, files, scratch, progress=progress)
    progress.clear()
    try:
        absent = absent_data_files(ctx, bin_dir, scratch, files)
        if absent:
            raise IntegrityError(f"{name} would not restore: its table of contents names {len(absent)} data "
                                 f"file(s) the set does not hold ({', '.join(absent[:3])})",
                                 hint="nothing was changed; use another backup")
        if read_sql:
            with execute.ProcessGroup(KIND) as group:
                for part in script_from_archive(ctx, group, bin_dir, (), [], directory=scratch):
                    scanner.feed(part)
            scanner.finish()
    except CommandFailed as exc:
        if isinstance(exc, StepTimeout):
            raise
        reason = " | ".join(line.strip() for line in exc.stderr_tail[-2:]) or exc.message
        if "unsupported version" in reason:
            raise VersionTooNew(f"cannot check {name}: pg_restore {tool_major(bin_dir)} cannot read it "
                                f"({reason})", hint=client_hint(pg, None)) from None
        raise IntegrityError(f"{name} would not restore: pg_restore cannot read the archive: {reason}",
                             hint="nothing was changed; use another backup") from None
    problems = sql_problems(scanner, made_by_us=True) if read_sql else []
    if problems:
        raise IntegrityError(f"{name} would not restore: {problems[0]}", hint="nothing was changed; use another backup")
    ctx.log.info("directory set checked", file=name, files=len(files), size=human_bytes(backup_set.size),
                 checksum="ok", decompress="ok", pg_restore="reads it to its end" if read_sql else "lists it")
    return [{"name": f.name, "size": r.size, "sha256": r.sha256, "uncompressed": r.uncompressed, "checksum": "ok"}
            for f, r in zip(files, checked, strict=True)]


def verify_set(ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
    """`verify`: check the files and, if asked, restore them into a scratch database and compare."""
    def test() -> RestoreTest:
        fmt, compression = set_format(backup_set)
        details = details_of(backup_set)
        with TargetLock(ctx.config.backup_dir, KIND, "verify --restore-test"):
            return test_restore_file(
                ctx, backup_set.path(), fmt, compression, set_id=backup_set.id or "adhoc",
                expected=details.tables if details is not None else {},
                legacy=legacy_keys(details),
                archive_major=archive_major_of(backup_set),
                objects=details.objects if details is not None else 0,
                expected_file=backup_set.manifest.files[0] if backup_set.manifest else None,
                members=backup_set.manifest.files if backup_set.manifest else ())

    signature = check_signed(ctx, backup_set)
    try:
        checked = check_set(ctx, backup_set)
    except KeyMissing as missing:  # an encrypted set on a host without its key: the checksums still say much
        if restore_test:
            raise
        checked = checksums_only(ctx, backup_set, missing)
        checked.signature = signature
        return verify_report(backup_set, checked, None)
    except IntegrityError as exc:
        if "would not restore" in exc.message:
            _mark_failed(ctx, backup_set, exc.message)
        raise
    checked.signature = signature
    report = verify_report(backup_set, checked, test if restore_test else None)
    outcome = report.restore_test
    if isinstance(outcome, RestoreTest) and outcome.ran and not outcome.ok:
        _mark_failed(ctx, backup_set, f"test restore failed: {outcome.error}")
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
