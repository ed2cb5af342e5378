"""Loading a set into a database: the plain format's SQL through psql inside our transaction framing, the
custom format through pg_restore, and the databases a run creates (noted first, so that a run killed
midway leaves nothing behind that the next one does not drop).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from kkua_backupd.core.context import (
    JobContext,
)
from kkua_backupd.errors import (
    CommandFailed,
    IntegrityError,
    JobError,
    KkuaError,
    LockHeld,
    StepTimeout,
    StorageError,
    VersionTooNew,
)
from kkua_backupd.obs.progress import Progress
from kkua_backupd.proc import execute
from kkua_backupd.safefs import list_folder, read_small, unlink_in
from kkua_backupd.sources.postgres import NEW_DB_NOTE
from kkua_backupd.sources.postgres.client import (
    KIND,
    VERSION_RE,
    child_env,
    client_hint,
    connect,
    connect_maintenance,
    in_threads,
    member_name,
    pg_restore_argv,
    pg_restore_list_argv,
    pg_restore_script_argv,
    psql_argv,
    tool_major,
    tool_version,
)
from kkua_backupd.sources.postgres.pg_sql import MetaCommandRefused, SqlStream
from kkua_backupd.sources.postgres.split import PsqlEnded, SplitLoad
from kkua_backupd.sources.postgres.stats import LOADED_BEFORE_SQL, RowCheck, row_count_differences
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.storage import (
    ID_FORMAT,
    PARTIAL_SUFFIX,
    ManifestFile,
    now_local,
    run_alive,
    scratch_folder,
)
from kkua_backupd.stream.chain import (
    CheckResult,
    read_chain,
)
from kkua_backupd.stream.pipeline import AtomicFile, read_ahead, stream_chunks, write_atomic

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




def scratch_name(set_id: str) -> str:
    return f"kkua_backup_test_{set_id}_{os.getpid()}"[:63]


def feed_pipe(chunks: Iterable[bytes], dest: Any, errors: list[BaseException], close: bool = True) -> None:
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
    match = VERSION_RE.search(version_text)
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


def run_psql(ctx: JobContext, bin_dir: Path, dbname: str, parts: Iterable[bytes | memoryview], *, marker: bytes,  # noqa: PLR0913 - keyword-only options
             also: Callable[[bytes], None] | None = None) -> bool:
    """Feed `parts` to psql (ON_ERROR_STOP) on `dbname` inside the restrict frame (`restrict_frame`) when
    this psql has it; returns whether psql printed `marker`. Raises CommandFailed when psql exits non-zero
    (a failed statement, a refused meta-command), and whatever `parts` raises (psql is then stopped before
    it reads the rest, so nothing the caller did not finish is committed). Every restore's SQL goes through
    here; `load_sql` reads it first and refuses meta-commands before they are sent (the pre-scan). `also` is
    given everything psql prints (b"" at its end)."""
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
        execute.widen_pipe(child.stdin.fileno())  # 1 MiB writes land at once, psql reads them in one go
        seen = threading.Event()
        watcher = threading.Thread(target=_watch_for, args=(child, marker, seen, also), daemon=True)
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
             transactional: bool = True, whole_dump: bool = False, rows: RowCheck | None = None,
             connections: int = 1) -> None:
    """Run SQL into `dbname` in one transaction (see `transaction_frame`), with an optional wipe first;
    COMMIT is sent only once every byte was read and sent. Raises CommandFailed if a statement fails,
    IntegrityError if the SQL is one a restore refuses (a meta-command, cut short, or with `whole_dump` not
    the whole of a pg_dump dump: its closing comment missing, a COMMIT or ROLLBACK of its own) and JobError
    if psql did not run it to its end; whichever, nothing was kept. `whole_dump` is for SQL the tool
    wrote (a set with a manifest): what the pre-check (verify.check_set) refuses is refused before COMMIT.

    The SQL is read on its way (`SqlStream`): a psql meta-command other than pg_dump's own
    `\\restrict`/`\\unrestrict` stops the load before it is sent, and those two are dropped, since
    `run_psql` frames the whole stream in a `\\restrict` of its own.

    `rows` (in one transaction only): the tables and row counts the manifest recorded, compared with what
    the transaction holds before its COMMIT (`RowCheck.check_sql`); a difference raises RowCountsDiffer,
    nothing kept, and a load that committed sets `rows.checked`.

    `transactional=False` (only for a new database, which the caller drops again on failure) runs the
    statements as they come, for restores too big for one transaction's locks; the file's own
    BEGIN/COMMIT pairs then stay as they are, and only the marker proves the SQL ran to its end. With
    `connections` > 1 as well, each big table's rows are shared between psql and that many connections less
    one (split.SplitLoad, decision 0026)."""
    nonce = secrets.token_hex(8)
    splitting = not transactional and connections > 1
    scanner = SqlStream(fold_transactions=transactional, drop_restrict=True, freeze_created=transactional,
                        sync_nonce=nonce if splitting else None)
    split = SplitLoad(ctx.config.postgres, dbname, scanner, connections) if splitting else None
    refused: list[MetaCommandRefused] = []
    marker = f"kkua-restore-committed-{nonce}".encode()
    rows = rows if transactional else None

    def scanned(out: bytes) -> Iterator[bytes | memoryview]:
        if split is None:
            yield out
        else:
            yield from split.route(out)

    def parts() -> Iterator[bytes | memoryview]:
        if transactional:
            yield transaction_frame(nonce)[0]
        if wipe:
            yield WIPE_SQL.encode()
        if rows is not None:
            yield LOADED_BEFORE_SQL.encode()
        try:
            for chunk in sql_chunks:
                yield from scanned(scanner.feed(chunk))
            yield from scanned(scanner.finish())
            if split is not None:
                split.close()  # every other connection's rows committed before the end is proven
        except MetaCommandRefused as exc:
            refused.append(exc)
            return
        except PsqlEnded:
            return  # psql's exit status says why (run_psql)
        # only reached when the whole stream was read and sent, and it did not stop inside something
        if scanner.truncated is None and not (whole_dump and dump_problems(scanner)):
            if rows is not None:
                yield (("\n;\n" if scanner.pending else "\n") + rows.check_sql(nonce)).encode()
                yield transaction_frame(nonce, pending=False)[1]
            elif transactional:
                yield transaction_frame(nonce, pending=scanner.pending)[1]
            else:
                yield (";\n" if scanner.pending else "\n").encode() + f"SELECT '{marker.decode()}';\n".encode()

    try:
        seen = run_psql(ctx, bin_dir, dbname, parts(), marker=marker,
                        also=split.sync.feed if split is not None else None)
    except CommandFailed as exc:
        differences = row_count_differences(exc.stderr_tail) if rows is not None else None
        if differences is None:
            raise
        for line in differences:
            ctx.log.error("restored data differs from the backup", detail=line)
        raise RowCountsDiffer(differences) from None
    finally:
        if split is not None:
            split.stop()  # after a failure: the other connections' open COPYs fail (the database is dropped)
    problems = [str(refused[0])] if refused else \
        dump_problems(scanner) if whole_dump else [scanner.truncated] if scanner.truncated else []
    if problems:
        raise IntegrityError(f"the SQL would not restore: {problems[0]}; the load stopped before its COMMIT",
                             hint="nothing was kept; use another backup")
    if not seen:
        raise JobError("psql reached the end of the SQL without committing it (the file is truncated inside a "
                       "data block, or ends the session itself); the transaction was rolled back")
    if rows is not None:
        rows.checked = True
    if split is not None and split.helpers:
        ctx.log.info("rows loaded over several connections", connections=1 + len(split.helpers),
                     tables_shared=len({n for h in split.helpers for n in h.rows_from}),
                     blocks_shared=split.shared)


class RowCountsDiffer(JobError):
    """The tables a load left in its transaction differ from the manifest's (`differences`, one line each, as
    `compare_stats` words them); the load stopped before its COMMIT, so nothing was kept."""

    def __init__(self, differences: list[str]) -> None:
        shown = "; ".join(differences[:5]) + (f" (and {len(differences) - 5} more)" if len(differences) > 5 else "")
        super().__init__(f"the loaded tables differ from the backup: {shown}; the load stopped before its COMMIT",
                         hint="nothing was kept; the backup's SQL does not make the tables its manifest records: "
                              "use another backup, and see restore.log for each difference")
        self.differences = differences


def dump_problems(scanner: SqlStream) -> list[str]:
    """What a restore refuses in SQL pg_dump wrote, once the scanner read all of it: what it found (a
    meta-command, a COMMIT or ROLLBACK of the file's own, the stream cut short) and, pg_dump ending every
    dump with its "dump complete" comment, a dump without it."""
    problems = list(scanner.problems)
    if not scanner.complete and scanner.truncated is None:
        problems.append("the SQL ends before pg_dump's closing comment: the dump is truncated")
    return problems


def _watch_for(child: execute.Child, marker: bytes, seen: threading.Event,
               also: Callable[[bytes], None] | None = None) -> None:
    """Drain psql's stdout, noting whether the commit marker went by (and giving it to `also`)."""
    tail = b""
    try:
        while chunk := child.read(1 << 16):
            window = tail + chunk
            if marker in window:
                seen.set()
            tail = window[-len(marker):]
            if also is not None:
                also(chunk)
    finally:
        if also is not None:
            also(b"")


def script_from_archive(ctx: JobContext, group: execute.ProcessGroup, bin_dir: Path,  # noqa: PLR0913 - keyword-only archive
                         archive_chunks: Iterable[bytes], feed_errors: list[BaseException], *,
                         directory: Path | None = None) -> Iterator[bytes]:
    """SQL produced by pg_restore from a custom archive streamed on its stdin, or from the directory archive
    `directory` (then `archive_chunks` is not read)."""
    child = group.spawn(pg_restore_script_argv(bin_dir, directory),
                        stdin=execute.PIPE if directory is None else execute.DEVNULL,
                        timeout=ctx.config.postgres.restore_timeout)
    feeder = None
    if directory is None:
        feeder = threading.Thread(target=_feed_archive, args=(archive_chunks, child, feed_errors, group.stop_all),
                                  name="archive-feed", daemon=True)
        feeder.start()
    assert child.stdout is not None
    yield from stream_chunks(child.read)
    if feeder is not None:
        feeder.join()
    if feed_errors:
        raise feed_errors[0]
    group.wait(child, what="pg_restore")


def _feed_archive(chunks: Iterable[bytes], child: execute.Child, errors: list[BaseException],
                  stop: Callable[[], None]) -> None:
    """Write an archive into pg_restore's stdin. When reading it fails (a file that does not decrypt or
    decompress, or whose size or sha256 differs from its manifest), pg_restore is stopped, so the SQL it
    printed ends early, and the failure is noted for the caller to raise. When pg_restore stops reading
    first (it read the archive's last data block, or it failed), the rest is still read, so the whole
    file's size and sha256 are compared before the caller may commit."""
    stream = iter(chunks)
    stdin = child.stdin
    assert stdin is not None
    try:
        for chunk in stream:
            try:
                stdin.write(chunk)
            except BrokenPipeError:
                for _ in stream:
                    pass
                break
        with contextlib.suppress(OSError):
            stdin.close()
    except BaseException as exc:  # re-raised by the caller, after pg_restore was stopped
        errors.append(exc)
        stop()


def file_present(path: Path, expected: ManifestFile | None) -> None:
    """Raises IntegrityError when a set's file is missing or its size is not the manifest's."""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing", hint="the set is incomplete; use another backup")
    if expected is not None and path.stat().st_size != expected.size:
        raise IntegrityError(f"{path.name} has {path.stat().st_size} bytes but its manifest says {expected.size}",
                             hint="the file was truncated or replaced; use another backup")


def checksum_error(name: str, found: str, expected: str) -> IntegrityError:
    return IntegrityError(f"{name} does not match its checksum (sha256 {found[:12]}..., manifest {expected[:12]}...)",
                          hint="the file is corrupt; use another backup")


def directory_members(folder: Path, files: Sequence[ManifestFile]) -> list[tuple[ManifestFile, str]]:
    """Each file of a directory set (in `folder`) with the pg_dump name it holds, once every one is there with
    its manifest's size; raises IntegrityError (a file missing or of another size, a name pg_dump does not
    write or named twice, no toc.dat)."""
    pairs: list[tuple[ManifestFile, str]] = []
    seen: set[str] = set()
    for entry in files:
        member = member_name(entry.name)
        if member is None or member in seen:
            raise IntegrityError(f"{entry.name} is not a file of a directory-format set (or names one twice)",
                                 hint="the manifest was not written by kkua-backup; use another backup")
        pairs.append((entry, member))
        seen.add(member)
        file_present(folder / entry.name, entry)
    if "toc.dat" not in seen:
        raise IntegrityError("the set has no toc.dat (the directory archive's table of contents)",
                             hint="the set is incomplete; use another backup")
    return pairs


def unpack_directory(ctx: JobContext, folder: Path, files: Sequence[ManifestFile], into: Path, *,
                     progress: Progress | None = None) -> list[CheckResult]:
    """The files of a directory set (in `folder`) read back through the chain into the folder `into` under
    pg_dump's names, each one's size and sha256 compared with its manifest entry as it ends: raises
    IntegrityError (a file missing, changed or corrupt, a name pg_dump does not write, no toc.dat) before the
    caller lets pg_restore read `into`; StorageError. Returns what each file held."""
    return _unpack(ctx, folder, directory_members(folder, files), into, progress)


def _unpack(ctx: JobContext, folder: Path, pairs: Sequence[tuple[ManifestFile, str]], into: Path,
            progress: Progress | None) -> list[CheckResult]:
    def unpack(pair: tuple[ManifestFile, str]) -> CheckResult:
        entry, member = pair
        source = read_chain(folder / entry.name, entry.compression, progress=progress,
                            readers=ctx.readers_for(entry.name))
        with AtomicFile(into / member, 0o600) as out:
            for chunk in source:
                out.write(chunk)
            if source.size != entry.size or source.sha256 != entry.sha256:
                raise checksum_error(entry.name, source.sha256, entry.sha256)
            out.commit()
        return CheckResult(source.size, source.sha256, source.raw)

    jobs = ctx.config.postgres.restore_jobs or os.cpu_count() or 1
    return in_threads(unpack, list(pairs), jobs, weight=lambda pair: pair[0].size)


_TABLE_DATA = re.compile(rb"^(\d+); \d+ \d+ TABLE DATA ", re.MULTILINE)


def absent_data_files(ctx: JobContext, bin_dir: Path, archive: Path, files: Sequence[ManifestFile]) -> list[str]:
    """The data files the table of contents in the folder `archive` names (`pg_restore --list`, which reads
    toc.dat alone) that the set `files` does not hold. Raises CommandFailed when pg_restore cannot list it."""
    listing = execute.run(pg_restore_list_argv(bin_dir, archive), job=KIND, timeout=ctx.config.postgres.restore_timeout,
                          what="pg_restore --list")
    held = {member_name(f.name) for f in files}
    return [f"{i.decode()}.dat" for i in _TABLE_DATA.findall(listing) if f"{i.decode()}.dat" not in held]


_COPY_OF_ENTRY = re.compile(rb"^-- Data for Name: ([^\n]*); Type: TABLE DATA; Schema: ([^\n]*); Owner: [^\n]*\n"
                            rb"--\n\n(COPY [^\n]+ FROM stdin;)$", re.MULTILINE)
_IDENT = rb'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_COPY_TABLE = re.compile(rb"COPY (" + _IDENT + rb"\." + _IDENT + rb") ")
_SESSION_LINE = re.compile(rb"^(?:SET [^\n]+;|SELECT pg_catalog\.set_config\([^\n]+\);)$", re.MULTILINE)
_LIST_ENTRY = re.compile(rb"^\d+; \d+ \d+ ")
_ENTRY_HEADER = re.compile(rb"^--\n-- Name: ([^\n]*); Type: ([^\n]*); Schema: ([^\n]*); Owner: [^\n]*\n--\n\n",
                           re.MULTILINE)
_DUMP_END = b"\n--\n-- PostgreSQL database dump complete\n--\n"
_PLACEMENT = re.compile(rb"^SET (default_tablespace|default_table_access_method) = [^\n]*;$")
_QUALIFIED = rb"(" + _IDENT + rb"\." + _IDENT + rb")"
_EARLY_SQL = {b"INDEX": re.compile(rb"CREATE (?:UNIQUE )?INDEX " + _IDENT + rb" ON " + _QUALIFIED + rb" "),
              b"CONSTRAINT": re.compile(rb"ALTER TABLE ONLY " + _QUALIFIED + rb"\n    ADD CONSTRAINT ")}


class PostDataEntry(NamedTuple):
    """One entry of a post-data section: its `pg_restore --list` line, DESC and TAG, the `SET default_tablespace`
    / `default_table_access_method` lines in force for it (`placement`) and its SQL."""

    line: bytes
    desc: bytes
    tag: bytes
    placement: bytes
    sql: bytes


def post_data_entries(listing: bytes, script: bytes) -> list[PostDataEntry] | None:
    """Each entry of `pg_restore --list --section=post-data` (`listing`) with its SQL in pg_restore's script of
    that section (`script`), which prints the placement SETs before an entry's header only when they change.
    None when the two do not match one to one (counts, DESC, SCHEMA, TAG, the script's end)."""
    lines = [line for line in listing.split(b"\n") if _LIST_ENTRY.match(line)]
    headers = list(_ENTRY_HEADER.finditer(script))
    end = script.rfind(_DUMP_END)
    if len(lines) != len(headers) or end < 0 or (headers and headers[-1].end() > end):
        return None
    placement: dict[bytes, bytes] = {}

    def body(text: bytes) -> bytes:
        """`text` without the placement SETs at its end, which are noted in `placement` for what follows."""
        kept = text.rstrip().split(b"\n")
        peeled = []
        while kept and (not kept[-1].strip() or _PLACEMENT.match(kept[-1])):
            peeled.append(kept.pop())
        for line in reversed(peeled):
            if (found := _PLACEMENT.match(line)) is not None:
                placement[found.group(1)] = line
        return b"\n".join(kept).strip()

    body(script[:headers[0].start()] if headers else b"")
    entries = []
    for i, (line, header) in enumerate(zip(lines, headers, strict=True)):
        tag, desc, schema = header.groups()
        if b" %s %s %s " % (desc, schema, tag) not in line + b" ":
            return None
        prefix = b"".join(setting + b"\n" for setting in placement.values())
        stop = headers[i + 1].start() if i + 1 < len(headers) else end
        entries.append(PostDataEntry(line, desc, tag, prefix, body(script[header.end():stop]) + b"\n"))
    return entries


class _Stopped(Exception):
    """Another table's load failed: this one stops too."""


class DirectoryLoad:
    """A directory set into a new database in three steps, each table's data streamed from its set file into
    a COPY on its own connection, never written to disk (docs/decisions/0023): pg_restore cannot read a data
    file from a pipe (since 15.14 and the other July 2025 releases it refuses any file that is not a regular
    one), so the data section is ours. First everything but the tables' data (toc.dat, the large objects'
    files) is unpacked into the scratch folder and checked; `pg_restore --list` names the tables' data files
    (each must be in the set) and `pg_restore --file -` of their entries, with empty stand-ins,
    gives each one's COPY statement and the session settings pg_dump wrote. Then: `pg_restore
    --section=pre-data`; the tables' data on `restore_jobs` connections, the biggest first, each file
    hashed, decrypted and decompressed into its COPY, which is ended only when its size and sha256 matched
    (a difference fails the COPY and stops the others), a plain table's COPY with FREEZE after a TRUNCATE, and
    then, on the same connection, that table's own indexes and keys (its "early" post-data entries, as
    pg_restore -j overlaps them with the other tables' data); the rest of the data section (sequence values,
    large objects) by pg_restore; `pg_restore --section=post-data --jobs=N` of the other post-data entries."""

    def __init__(self, ctx: JobContext, bin_dir: Path, dbname: str, folder: Path,  # noqa: PLR0913 - keyword-only options
                 members: Sequence[ManifestFile], *, scratch: Path, jobs: int, progress: Progress | None) -> None:
        self.ctx, self.bin_dir, self.dbname, self.folder = ctx, bin_dir, dbname, folder
        self.scratch, self.jobs, self.progress = scratch, jobs, progress
        self.members = members
        self.pairs = directory_members(folder, members)
        self.failed = threading.Event()
        self.failures: list[BaseException] = []
        self.checked: dict[str, CheckResult] = {}
        self.listing = b""
        self.preamble: list[bytes] = []
        self.statements: dict[str, bytes] = {}
        self.tables: list[tuple[ManifestFile, str]] = []
        self.early: dict[str, list[PostDataEntry]] = {}

    def prepare(self) -> None:
        """Everything but the tables' data unpacked and checked, the tables' data files named and their COPY
        statements read; raises IntegrityError (a file missing or changed, a table of contents that names a
        file the set does not hold or that pg_restore cannot read) before anything is loaded."""
        pairs, scratch = self.pairs, self.scratch
        toc = [(e, m) for e, m in pairs if m == "toc.dat"]
        for (entry, _), found in zip(toc, _unpack(self.ctx, self.folder, toc, scratch, self.progress), strict=True):
            self.checked[entry.name] = found
        self.listing = listing = self._pg_restore_output(pg_restore_list_argv(self.bin_dir, scratch),
                                                         "pg_restore --list")
        data_ids = [i.decode() for i in _TABLE_DATA.findall(listing)]
        held = {m for _, m in pairs}
        absent = [f"{i}.dat" for i in data_ids if f"{i}.dat" not in held]
        if absent:
            raise IntegrityError(f"{self.members[0].name} would not restore: its table of contents names "
                                 f"{len(absent)} data file(s) the set does not hold ({', '.join(absent[:3])})",
                                 hint="nothing was changed; use another backup")
        tables = {f"{i}.dat" for i in data_ids}
        rest = [(e, m) for e, m in pairs if m not in tables and m != "toc.dat"]
        for (entry, _), found in zip(rest, _unpack(self.ctx, self.folder, rest, scratch, self.progress), strict=True):
            self.checked[entry.name] = found
        self.preamble, self.statements = self._copy_statements(listing, tables)
        self.tables = [(e, m) for e, m in pairs if m in tables]

    def run(self) -> list[tuple[str, CheckResult]]:
        """Into the new database: pre-data, the tables' data on `jobs` connections (each table's own indexes
        and keys right after it, `_early_entries`), the rest of the data, the rest of post-data with pg_restore
        -j; returns what each file of the set held."""
        self.prepare()
        scratch = self.scratch
        post_listing, entries = self._post_data()
        self.early = self._early_entries(entries)
        early = {e.line for found in self.early.values() for e in found}
        self.ctx.log.info("post-data entries built right after their table's data, and after all of it",
                          early=len(early), rest=len(entries) - len(early))
        _pg_restore_jobs(self.ctx, self.bin_dir, self.dbname, scratch, 1, extra=("--section=pre-data",))
        for (entry, _), found in zip(self.tables, self._load_tables(self.tables), strict=True):
            self.checked[entry.name] = found
        others = self._list_file(self.listing, keep=lambda line: not _TABLE_DATA.match(line), name="other-data.list")
        _pg_restore_jobs(self.ctx, self.bin_dir, self.dbname, scratch, 1, extra=("--section=data", "--use-list",
                                                                                 str(others)))
        rest = ("--use-list", str(self._list_file(post_listing, keep=lambda line: line not in early,
                                                  name="post-data.list"))) if early else ()
        _pg_restore_jobs(self.ctx, self.bin_dir, self.dbname, scratch, self.jobs, extra=("--section=post-data", *rest))
        return self.results()

    def _post_data(self) -> tuple[bytes, list[PostDataEntry]]:
        """(`pg_restore --list` of the post-data section, its entries paired with their SQL); no entries when
        the listing and the script do not match one to one."""
        pg_restore, scratch = str(self.bin_dir / "pg_restore"), str(self.scratch)
        listing = self._pg_restore_output((pg_restore, "--list", "--section=post-data", scratch), "pg_restore --list")
        script = self._pg_restore_output((pg_restore, "--section=post-data", "--file", "-", scratch),
                                         "pg_restore --file -")
        return listing, post_data_entries(listing, script) or []

    def _early_entries(self, entries: Sequence[PostDataEntry]) -> dict[str, list[PostDataEntry]]:
        """The post-data entries to run right after a table's data, by the table's data file: the plain
        indexes (not `ON ONLY`) and the keys (`CONSTRAINT`: primary, unique, exclusion) of a table whose data
        this load streams, the COPY statement naming it (in pg_dump's quoting) and no other data file's."""
        files: dict[bytes, list[str]] = {}
        for member, statement in self.statements.items():
            if (table := _COPY_TABLE.match(statement)) is not None:
                files.setdefault(table.group(1), []).append(member)
        early: dict[str, list[PostDataEntry]] = {}
        for entry in entries:
            pattern = _EARLY_SQL.get(entry.desc)
            found = pattern.match(entry.sql) if pattern is not None else None
            if found is not None and len(files.get(found.group(1), ())) == 1:
                early.setdefault(files[found.group(1)][0], []).append(entry)
        return early

    def results(self) -> list[tuple[str, CheckResult]]:
        return [(e.name, self.checked[e.name]) for e, _ in self.pairs]

    def script(self) -> Iterator[bytes]:
        """The whole set as SQL for our transaction, with no file of it written out: pg_restore's script of
        the pre-data section, each table's COPY statement followed by its file read through the chain (its
        size and sha256 compared as it ends, before anything after it is given), pg_restore's script of the
        rest of the data section and of the post-data section. Call `prepare` first."""
        def section(*options: str) -> bytes:
            return self._pg_restore_output((*pg_restore_script_argv(self.bin_dir), *options, str(self.scratch)),
                                           "pg_restore --file -")

        yield section("--section=pre-data")
        for entry, member in self.tables:
            source = read_chain(self.folder / entry.name, entry.compression, progress=self.progress,
                                readers=self.ctx.readers_for(entry.name))
            yield b"\n" + self.statements[member] + b"\n"
            yield from source
            if source.size != entry.size or source.sha256 != entry.sha256:
                raise checksum_error(entry.name, source.sha256, entry.sha256)
            self.checked[entry.name] = CheckResult(source.size, source.sha256, source.raw)
        others = self._list_file(self.listing, keep=lambda line: not _TABLE_DATA.match(line), name="other-data.list")
        yield section("--section=data", "--use-list", str(others))
        yield section("--section=post-data")

    def _pg_restore_output(self, argv: Sequence[str], what: str) -> bytes:
        try:
            return execute.run(argv, job=KIND, timeout=self.ctx.config.postgres.restore_timeout, what=what)
        except CommandFailed as exc:
            if isinstance(exc, StepTimeout):
                raise
            reason = " | ".join(line.strip() for line in exc.stderr_tail[-2:]) or exc.message
            if "unsupported version" in reason:  # says nothing against the set: a newer pg_restore reads it
                raise VersionTooNew(f"cannot restore {self.members[0].name}: pg_restore {tool_major(self.bin_dir)} "
                                    f"cannot read it ({reason})", hint=client_hint(self.ctx.config.postgres, None)) \
                    from None
            raise IntegrityError(f"{self.members[0].name} would not restore: pg_restore cannot read its table of "
                                 f"contents: {reason}", hint="nothing was changed; use another backup") from None

    def _list_file(self, listing: bytes, *, keep: Callable[[bytes], bool], name: str) -> Path:
        """A `--use-list` file of the entries of `listing` that `keep` accepts (the others commented out)."""
        lines = [line if line.startswith(b";") or keep(line) else b";" + line for line in listing.split(b"\n")]
        path = self.scratch / name
        with AtomicFile(path, 0o600) as out:
            out.write(b"\n".join(lines))
            out.commit(sync_folder=False)
        return path

    def _copy_statements(self, listing: bytes, tables: set[str]) -> tuple[list[bytes], dict[str, bytes]]:
        """(the session settings pg_dump's script starts with, each table data file's COPY statement), from
        pg_restore's script of the tables' data entries over empty stand-ins of their files: it prints them
        in the order of the list it is given, each after a comment naming the table, checked against the
        list line."""
        if not tables:
            return [], {}
        for member in tables:
            os.close(os.open(self.scratch / member, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        entries = [line for line in listing.split(b"\n") if _TABLE_DATA.match(line)]
        only = self._list_file(listing, keep=lambda line: bool(_TABLE_DATA.match(line)), name="table-data.list")
        try:
            script = self._pg_restore_output(
                (str(self.bin_dir / "pg_restore"), "--section=data", "--use-list", str(only), "--file", "-",
                 str(self.scratch)), "pg_restore --file -")
        finally:
            for member in tables:
                unlink_in(self.scratch / member)
        found = _COPY_OF_ENTRY.findall(script)
        if len(found) != len(entries) or not all(b" TABLE DATA %s %s " % (schema, name) in line
                                                 for (name, schema, _), line in zip(found, entries, strict=False)):
            raise IntegrityError(f"{self.members[0].name} would not restore: pg_restore's script of its tables' "
                                 "data does not match its table of contents",
                                 hint="nothing was changed; use another backup")
        statements = {f"{int(line.split(b';', 1)[0])}.dat": copy for (_, _, copy), line in zip(found, entries,
                                                                                                 strict=True)}
        head = script.split(b"\n-- Data for Name: ", 1)[0]
        return _SESSION_LINE.findall(head), statements

    def _load_tables(self, fed: Sequence[tuple[ManifestFile, str]]) -> list[CheckResult]:
        pg = self.ctx.config.postgres
        preamble, statements = self.preamble, self.statements

        def load(pair: tuple[ManifestFile, str]) -> CheckResult:
            entry, member = pair
            try:
                source = read_chain(self.folder / entry.name, entry.compression, progress=self.progress,
                                    readers=self.ctx.readers_for(entry.name))
                with connect(pg, self.dbname) as conn:
                    for line in preamble:
                        conn.execute(line)
                    statement = statements[member]
                    table = _COPY_TABLE.match(statement)
                    plain = table is not None and conn.execute(  # the name as the COPY has it, quoted as text
                        b"SELECT relkind FROM pg_class WHERE oid = to_regclass('%s')"
                        % table.group(1).replace(b"'", b"''")).fetchone() == ("r",)
                    with conn.transaction():
                        if plain and table is not None:
                            # as pg_restore -j does: the table is new, the COPY may skip the FSM; and made
                            # empty in this transaction, its rows may be written frozen (no hint-bit writes later)
                            conn.execute(b"TRUNCATE TABLE ONLY " + table.group(1))
                            statement = statement.removesuffix(b";") + b" WITH (FREEZE);"
                        with conn.cursor() as cur, cur.copy(statement) as copy:
                            for chunk in source:
                                if self.failed.is_set():
                                    raise _Stopped
                                copy.write(chunk)
                            if source.size != entry.size or source.sha256 != entry.sha256:
                                raise checksum_error(entry.name, source.sha256, entry.sha256)  # the COPY fails
                    self._build_early(conn, member, table.group(1).decode(conn.info.encoding, "replace")
                                      if table is not None else member)
                return CheckResult(source.size, source.sha256, source.raw)
            except _Stopped:
                raise
            except psycopg.Error as exc:
                self._fail(JobError(f"loading {member} into {self.dbname!r} failed: {str(exc).strip()}"))
                raise _Stopped from None
            except BaseException as exc:
                self._fail(exc)
                raise

        try:
            return in_threads(load, list(fed), self.jobs, weight=lambda pair: pair[0].size)
        except BaseException:
            if self.failures:
                raise self.failures[0] from None
            raise

    def _build_early(self, conn: psycopg.Connection, member: str, table: str) -> None:
        """The early post-data entries of the data file `member` (into `table`), each in a transaction of its
        own on `conn` (autocommit, the session settings set); raises _Stopped when another load failed or this
        one's build failed (noted in `failures`, naming the entry)."""
        for entry in self.early.get(member, ()):
            if self.failed.is_set():
                raise _Stopped
            try:
                conn.execute(entry.placement + entry.sql)
            except psycopg.Error as exc:
                tag = entry.tag.decode(conn.info.encoding, "replace")
                self._fail(JobError(f'building {entry.desc.decode().lower()} "{tag}" of {table} failed: '
                                    f"{str(exc).strip()}"))
                raise _Stopped from None

    def _fail(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.failed.set()


def restore_into(ctx: JobContext, bin_dir: Path, dbname: str, path: Path, fmt: str, compression: str, *,  # noqa: PLR0913, PLR0917 - grouped with the flows written once
                 wipe: bool, new_database: bool, expected: ManifestFile | None,
                 progress: Progress | None = None, transactional: bool = True,
                 members: Sequence[ManifestFile] = (), unpacked: Path | None = None,
                 rows: RowCheck | None = None) -> list[tuple[str, CheckResult]]:
    """Load a backup file into `dbname`: in one transaction, or with pg_restore -j for a custom archive
    going into a new database. The bytes are hashed as they are read; if they do not match `expected`
    the load stops before its COMMIT (a new database: before pg_restore reads the unpacked archive), and so
    does a dump the tool wrote whose SQL does not end as pg_dump ends it (`load_sql`'s whole_dump). A
    directory set (`members`: every file of it, `path` its first) is read from `unpacked` when the restore's
    check left it there, unpacked and checked; otherwise its tables' data streams from the set files into
    COPY statements (`DirectoryLoad`, decision 0023), every file checked before the restore is done. `rows`: the
    manifest's row counts, checked before the COMMIT of any load in one transaction (`load_sql`, decision 0022);
    pg_restore -j's loads are counted after, by the caller. Returns what was checked on the way: each file's name,
    size, sha256 and the bytes it held (empty when the set was read from `unpacked`). Raises
    CommandFailed/StepTimeout/IntegrityError/RowCountsDiffer on failure."""
    pg = ctx.config.postgres
    chunks = read_chain(path, compression, progress=progress, expected=expected, readers=ctx.readers_for(path.name))
    transactional = transactional or not new_database  # only a new database may load statement by statement
    jobs = pg.restore_jobs or os.cpu_count() or 1
    if fmt == "plain":
        # read, hashed, decrypted and decompressed on a thread of its own while this one scans and sends; into
        # a new database, statement by statement with each big table's rows over `jobs` connections
        split = new_database and jobs > 1
        load_sql(ctx, bin_dir, dbname, read_ahead(chunks, name="restore-read"), wipe=wipe,
                 transactional=transactional and not split, whole_dump=expected is not None, rows=rows,
                 connections=jobs if split else 1)
        return [(path.name, CheckResult(chunks.size, chunks.sha256, chunks.raw))]
    if fmt == "directory":
        return _restore_directory(ctx, bin_dir, dbname, path.parent, members, wipe=wipe,
                                  parallel=new_database and jobs > 1, transactional=transactional,
                                  progress=progress, unpacked=unpacked, rows=rows)
    if new_database and jobs > 1:
        _parallel_restore(ctx, bin_dir, dbname, path, chunks, jobs)
    else:
        with execute.ProcessGroup(KIND) as group:
            load_sql(ctx, bin_dir, dbname, script_from_archive(ctx, group, bin_dir, chunks, []), wipe=wipe,
                     transactional=transactional, whole_dump=expected is not None, rows=rows)
    return [(path.name, CheckResult(chunks.size, chunks.sha256, chunks.raw))] if expected is not None else []


def _restore_directory(ctx: JobContext, bin_dir: Path, dbname: str, folder: Path,  # noqa: PLR0913 - keyword-only, as restore_into
                       members: Sequence[ManifestFile], *, wipe: bool, parallel: bool, transactional: bool,
                       progress: Progress | None, unpacked: Path | None,
                       rows: RowCheck | None) -> list[tuple[str, CheckResult]]:
    """A directory set into `dbname`: a new database in three steps with the tables' data streamed
    (`parallel`, `DirectoryLoad.run`), or as SQL in our transaction (`DirectoryLoad.script`); from the folder
    `unpacked` the check left, unpacked and checked, the way pg_restore reads a directory archive."""
    jobs = ctx.config.postgres.restore_jobs or os.cpu_count() or 1
    if unpacked is not None and parallel:
        _pg_restore_jobs(ctx, bin_dir, dbname, unpacked, jobs)
        return []
    if unpacked is not None:
        with execute.ProcessGroup(KIND) as group:
            load_sql(ctx, bin_dir, dbname, script_from_archive(ctx, group, bin_dir, (), [], directory=unpacked),
                     wipe=wipe, transactional=transactional, rows=rows)
        return []
    with scratch_folder(folder) as scratch:
        load = DirectoryLoad(ctx, bin_dir, dbname, folder, members, scratch=scratch, jobs=jobs, progress=progress)
        if parallel:
            return load.run()
        load.prepare()
        load_sql(ctx, bin_dir, dbname, load.script(), wipe=wipe, transactional=transactional, rows=rows)
        return load.results()


def _pg_restore_jobs(ctx: JobContext, bin_dir: Path, dbname: str, archive: Path, jobs: int, *,  # noqa: PLR0913 - keyword-only option
                     extra: Sequence[str] = ()) -> None:
    """pg_restore -j `jobs` of the archive file or directory `archive` into the new database `dbname`, with
    the options `extra` (a section, a list of entries)."""
    pg = ctx.config.postgres
    argv = pg_restore_argv(bin_dir, pg, dbname, archive, jobs)
    with execute.ProcessGroup(KIND) as group:
        child = group.spawn((*argv[:-1], *extra, argv[-1]), env=child_env(pg), stdout=execute.DEVNULL,
                            timeout=pg.restore_timeout)
        group.wait(child, what="pg_restore")


def _parallel_restore(ctx: JobContext, bin_dir: Path, dbname: str, path: Path, chunks: Iterable[bytes],  # noqa: PLR0913, PLR0917 - grouped with the flows written once
                      jobs: int) -> None:
    # pg_restore -j needs a seekable archive: unpack it next to the backup. Its name ends in .partial, so
    # if this process dies, the next run under the lock removes it (remove_stale_partials). The chain
    # checks size and sha256 as it ends, before pg_restore reads any of it.
    scratch = path.with_name(f"kkua_restore_{now_local().strftime(ID_FORMAT)}_{os.getpid()}.dump")
    try:
        with AtomicFile(scratch, 0o600) as out:  # writes scratch + ".partial"; never committed
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            _pg_restore_jobs(ctx, bin_dir, dbname, out.partial, jobs)
    finally:  # leaving the AtomicFile without commit removed it; make sure even if that failed
        scratch.with_name(scratch.name + PARTIAL_SUFFIX).unlink(missing_ok=True)


def create_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


# Databases a run creates (a --target-db restore, a test restore's scratch database, a lost database made
# again): killed midway (kill -9 runs no cleanup), such a run leaves a half-made database behind. Before it
# creates one, a run leaves a note in the state folder (NEW_DB_NOTE + pid + nonce + .json: the database, the
# server, the pid, the time); the database is created under a name carrying the nonce, marked with a comment
# carrying it too, and only then renamed to its real name, so a database with that name either does not
# carry our mark (someone else's: never touched) or is ours from its first moment. A finished load removes
# the mark, then the note. Every postgres command starts by dropping the marked databases of notes whose run
# is gone (`drop_unfinished_databases`), one log line each.

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
        if not isinstance(doc, dict) or doc.get("server") != f"{pg.host}:{pg.port}" or run_alive(doc.get("pid")):
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
