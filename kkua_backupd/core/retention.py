"""Retention: which backup sets to delete, decided from manifests only, and the deletion itself.

Two layers. `select` and `select_partials` are pure: they take what was found (plain values), the time
and the retention settings, and return one decision per set with the reason an operator reads in the log.
`prune` does the I/O: it scans each kind's folder under that kind's lock, builds the candidates, applies
the decisions and deletes exactly the files a deleted set's manifest names, then the manifest.

What retention never touches: a set whose manifest cannot be read, a file no manifest names (the old
scripts' backups, `notes.txt`), a symlink, anything whose name is not the set's prefix+id, anything
outside `backup_dir/postgres` and `backup_dir/redis`. See docs/retention.md.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kkua_backupd.config import RetentionConfig
from kkua_backupd.core.context import JobContext
from kkua_backupd.errors import LockHeld, StorageError
from kkua_backupd.sources import KINDS
from kkua_backupd.store.lock import TargetLock, holder_of
from kkua_backupd.store.storage import (
    FUTURE_TOLERANCE,
    MANIFEST_SUFFIX,
    PARTIAL_SUFFIX,
    BackupSet,
    file_problem,
    kind_folder,
    list_sets,
    manifest_name,
    own_partial,
    read_manifest,
    set_name_problem,
)
from kkua_backupd.stream.pipeline import fsync_dir, storage_error

Action = Literal["delete", "keep", "skip"]
PARTIAL_MAX_AGE = dt.timedelta(days=1)


# ----------------------------------------------------------------------------------------------
# The pure part: what was found -> what to do, and why


@dataclass(frozen=True)
class Candidate:
    """One backup set as retention sees it: values read from its manifest and from the folder.

    `status` is "ok", "failed" (the manifest says so), "incomplete" (a named file is missing) or
    "damaged" (a file's size differs from the manifest); only "ok" sets count toward keep_last.
    `problem` is set when something on disk means the set must not be touched (a symlink, ...).
    """

    kind: str
    type: str
    prefix: str
    id: str
    created_at: dt.datetime
    status: str
    files: tuple[str, ...]
    manifest: str
    bytes: int = 0
    problem: str | None = None

    @property
    def name(self) -> str:
        """The main data file's name, as `list` shows it (the manifest's name if it names no file)."""
        return self.files[0] if self.files else self.manifest

    @property
    def good(self) -> bool:
        return self.status == "ok" and self.problem is None


@dataclass(frozen=True)
class Decision:
    """What retention does with one candidate, and the reason it logs."""

    candidate: Candidate
    action: Action
    reason: str


@dataclass(frozen=True)
class Partial:
    """A `*.partial` file found in a kind's folder, with its modification time."""

    name: str
    mtime: dt.datetime
    bytes: int = 0


def age_text(age: dt.timedelta, *, precise: bool = False) -> str:
    """A duration for a log line: "9 days", "7 days 3 h", "5 h 12 min", "40 s".

    Two units at most: days and hours from a day on, hours and minutes from an hour on. `precise` keeps
    the two largest non-zero units whatever they are, so "7 days 1 s" never reads as "7 days".
    """
    seconds = max(int(age.total_seconds()), 0)
    if not precise:
        grain = 3600 if seconds >= 86400 else 60 if seconds >= 3600 else 1
        seconds -= seconds % grain
    units = ((seconds // 86400, "day", "days"), (seconds % 86400 // 3600, "h", "h"),
             (seconds % 3600 // 60, "min", "min"), (seconds % 60, "s", "s"))
    parts = [f"{value} {one if value == 1 else many}" for value, one, many in units if value][:2]
    return " ".join(parts) or "0 s"


def _over_text(age: dt.timedelta, limit: dt.timedelta) -> str:
    """The age of a set past `limit`, precise enough not to read as equal to the limit."""
    return age_text(age, precise=age - limit < dt.timedelta(hours=1))


def name_problem(candidate: Candidate) -> str | None:
    """Why the set's names forbid touching it (None when they are what kkua-backup writes); the check
    `list`, `verify` and `restore` make too (storage.set_name_problem)."""
    problem = set_name_problem(candidate.kind, candidate.type, candidate.prefix, candidate.id, candidate.manifest,
                               candidate.files)
    return f"{problem}; left alone" if problem else None


def _aware(moment: dt.datetime) -> dt.datetime:
    # A hand-written manifest may lack an offset: read it as local time, as the tool writes it.
    return moment if moment.tzinfo is not None else moment.astimezone()


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def select(candidates: Iterable[Candidate], now: dt.datetime, config: RetentionConfig) -> list[Decision]:
    """Decide, for every candidate, delete / keep / skip, each with its reason (pure; never raises).

    Per kind and type (regular backups: `days`/`keep_last`; safety backups: `safety_days`/
    `safety_keep_last`): the newest keep_last good sets are kept whatever their age; any other set older
    than the limit is deleted, failed/incomplete/damaged ones included (they never count toward
    keep_last); younger sets are kept. A set with a name or disk problem is skipped. Decisions come
    newest first within each kind and type.
    """
    decisions: list[Decision] = []
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for candidate in candidates:
        problem = candidate.problem or name_problem(candidate)
        if problem:
            decisions.append(Decision(candidate, "skip", problem))
            continue
        groups.setdefault((candidate.kind, candidate.type), []).append(candidate)
    for (kind, set_type), members in sorted(groups.items()):
        if set_type == "safety":
            days, keep_last, label = config.safety_days, config.safety_keep_last, "safety backup"
        else:
            days, keep_last, label = config.days, config.keep_last, "backup"
        limit = dt.timedelta(days=days)
        members.sort(key=lambda c: (_aware(c.created_at), c.id), reverse=True)
        good_kept = 0  # good sets newer than the one at hand that stay
        for candidate in members:
            age = now - _aware(candidate.created_at)
            if age < -FUTURE_TOLERANCE:
                # Not counted toward keep_last: with a wrong clock it would otherwise stand in for a real
                # recent set, and the sets it pushed out of keep_last could be deleted.
                decisions.append(Decision(candidate, "keep", "created_at is in the future (clock changed?); "
                                                             "kept until it is past, not counted toward keep_last"))
            elif candidate.good and good_kept < keep_last:
                good_kept += 1
                decisions.append(Decision(candidate, "keep", f"one of the newest {keep_last} good {kind} "
                                                             f"{label}s ({age_text(age)} old)"))
            elif age < dt.timedelta(0):
                if candidate.good:
                    good_kept += 1
                decisions.append(Decision(candidate, "keep", "created_at is in the future (clock changed?); "
                                                             "kept until it is past"))
            elif age <= limit:
                if candidate.good:
                    good_kept += 1
                what = "" if candidate.good else f"{candidate.status} {label}, "
                decisions.append(Decision(candidate, "keep", f"{what}{age_text(age)} old <= {days} days"))
            elif candidate.good:
                decisions.append(Decision(candidate, "delete",
                                          f"{_over_text(age, limit)} old > {days} days; "
                                          f"{_plural(good_kept, 'newer good set')} kept"))
            else:
                decisions.append(Decision(candidate, "delete",
                                          f"{candidate.status} {label}, {_over_text(age, limit)} old > {days} days; "
                                          f"{candidate.status} sets never count toward keep_last "
                                          f"({_plural(good_kept, 'newer good set')} kept)"))
    return decisions


def select_partials(partials: Iterable[Partial], now: dt.datetime) -> list[tuple[Partial, Action, str]]:
    """Which leftover `*.partial` files to delete: those not modified for more than a day (pure).

    A partial file is what a run that died left behind; one younger than a day is left alone, in case
    something other than this tool's own locked jobs is writing it.
    """
    result: list[tuple[Partial, Action, str]] = []
    for partial in partials:
        age = now - _aware(partial.mtime)
        if age > PARTIAL_MAX_AGE:
            result.append((partial, "delete", f"leftover partial file of an interrupted run, "
                                              f"{_over_text(age, PARTIAL_MAX_AGE)} old > 1 day"))
        else:
            result.append((partial, "keep", f"partial file only {age_text(age)} old; left for now"))
    return result


def partial_name_ok(kind: str, name: str) -> bool:
    """Whether `name` is a partial file this tool would write in `kind`'s folder (PREFIX+ID... .partial)."""
    return own_partial(kind, name)


# ----------------------------------------------------------------------------------------------
# The folder: scanning it into candidates


@dataclass
class FolderScan:
    """What one kind's folder holds, as retention sees it."""

    candidates: list[Candidate] = field(default_factory=list)
    partials: list[Partial] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _candidate(kind: str, backup_set: BackupSet) -> Candidate:
    """The candidate for a set `list_sets` returned, with its status and any disk problem found."""
    manifest = backup_set.manifest
    assert manifest is not None
    folder = backup_set.folder
    problem: str | None = None
    missing = damaged = 0
    size = 0
    mname = manifest_name(manifest.prefix, manifest.id)
    mstat = _lstat(folder / mname) if "/" not in mname else None
    if manifest.kind != kind:
        problem = f"manifest says kind {manifest.kind} but lies in the {kind} folder; left alone"
    elif mstat is not None and not stat.S_ISREG(mstat.st_mode):
        problem = f"{mname} is not a regular file (symlink?); left alone"
    elif mstat is not None and file_problem(folder / mname):
        problem = f"{file_problem(folder / mname)}; left alone"
    else:
        size += mstat.st_size if mstat else 0
    for entry in manifest.files:
        if problem or "/" in entry.name or entry.name in ("", ".", ".."):
            break  # select() reports the name problem; never stat outside the folder
        found = _lstat(folder / entry.name)
        if found is None:
            missing += 1
        elif not stat.S_ISREG(found.st_mode):
            problem = f"{entry.name} is a symlink or not a regular file (kkua-backup makes neither); left alone"
        elif file_problem(folder / entry.name):
            problem = f"{file_problem(folder / entry.name)}; left alone"
        else:
            size += found.st_size
            damaged += found.st_size != entry.size
    status = "failed" if manifest.status != "ok" else "incomplete" if missing else "damaged" if damaged else "ok"
    return Candidate(kind=kind, type=manifest.type, prefix=manifest.prefix, id=manifest.id,
                     created_at=manifest.created_at, status=status, files=tuple(f.name for f in manifest.files),
                     manifest=mname, bytes=size, problem=problem)


def _unlisted_manifest_reason(path: Path) -> str:
    """Why a `*.manifest.json` file in the folder is not a set retention may act on."""
    if path.is_symlink():
        return "manifest is a symlink; left alone"
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        return f"manifest cannot be read ({first}); the set is left alone"
    return (f"manifest describes {manifest_name(manifest.prefix, manifest.id)}, not this file; "
            "left alone")


def scan_folder(backup_dir: Path, kind: str) -> FolderScan:
    """Read one kind's folder: the sets `storage.list_sets` finds, the partial files, and every other
    entry retention leaves alone with the reason (unreadable manifests, files no manifest names)."""
    folder = kind_folder(backup_dir, kind)
    scan = FolderScan()
    seen: set[str] = set()
    for backup_set in list_sets(backup_dir, kind):
        assert backup_set.manifest is not None
        mname = manifest_name(backup_set.manifest.prefix, backup_set.manifest.id)
        if mname in seen or "/" in mname or _lstat(folder / mname) is None:
            continue  # a copy of another manifest, or one found under another name: reported below
        seen.add(mname)
        scan.candidates.append(_candidate(kind, backup_set))
    accounted = {c.manifest for c in scan.candidates} | {n for c in scan.candidates for n in c.files}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in accounted:
            continue
        info = _lstat(path)
        if info is None or stat.S_ISDIR(info.st_mode):
            continue
        if name.endswith(MANIFEST_SUFFIX):
            scan.skipped.append({"path": str(path), "reason": _unlisted_manifest_reason(path)})
        elif name.endswith(PARTIAL_SUFFIX) and stat.S_ISREG(info.st_mode) and partial_name_ok(kind, name):
            scan.partials.append(Partial(name, dt.datetime.fromtimestamp(info.st_mtime, dt.UTC), info.st_size))
        elif stat.S_ISLNK(info.st_mode):
            scan.skipped.append({"path": str(path), "reason": "symlink; retention never follows or deletes one"})
        else:
            scan.skipped.append({"path": str(path), "reason": "no manifest names this file (old script's "
                                 "backup or not a backup); retention never deletes it"})
    return scan


# ----------------------------------------------------------------------------------------------
# The deletion


def _delete_files(folder: Path, names: Sequence[str], log: Any) -> str | None:
    """Unlink `names` in order (never following a symlink); returns the first error, or None."""
    for name in names:
        try:
            os.unlink(folder / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            message = f"cannot delete {folder / name}: {exc.strerror}"
            log.error(message + "; check the folder's owner and mode (the backup user needs write access)")
            return message
    return None


class SkippedPath(BaseModel):
    """A file or folder retention left alone, and why."""

    model_config = ConfigDict(extra="forbid")
    path: str
    reason: str


class KeptSet(BaseModel):
    """A set retention kept, and why."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    id: str
    name: str
    type: str
    status: str
    reason: str


class DeletedSet(KeptSet):
    """A set (or a partial file left by a killed run: type "partial") retention deleted, or would delete."""

    files: list[str]
    bytes: int


class RetentionReport(BaseModel):
    """What a prune did (`prune --json`, `run retention --json`): per set, and the remotes' own reports
    when remotes are configured and the run was a retention job."""

    model_config = ConfigDict(extra="forbid")
    deleted: list[DeletedSet] = Field(default_factory=list)
    kept: list[KeptSet] = Field(default_factory=list)
    skipped: list[SkippedPath] = Field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = False
    remotes: dict[str, Any] | None = None  # core/remotes.prune_remotes, per remote

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


def _prune_kind(ctx: JobContext, kind: str, now: dt.datetime, report: RetentionReport, *,
                dry_run: bool) -> list[str]:
    """Scan, decide and (unless dry_run) delete in one kind's folder; the caller holds the lock.

    Returns the deletion errors (the other sets are still handled); raises StorageError if the folder
    cannot be read or synced."""
    errors: list[str] = []
    folder = kind_folder(ctx.config.backup_dir, kind)
    try:
        scan = scan_folder(ctx.config.backup_dir, kind)
    except OSError as exc:
        raise storage_error(exc, folder, "read the backup folder") from None
    for item in scan.skipped:
        ctx.log.debug(f"leaving {Path(item['path']).name} alone: {item['reason']}", kind=kind)
    report.skipped.extend(SkippedPath(**item) for item in scan.skipped)
    changed = False
    for decision in select(scan.candidates, now, ctx.config.retention):
        c = decision.candidate
        if decision.action == "skip":
            ctx.log.warning(f"not touching {c.name}: {decision.reason}", kind=kind, id=c.id)
            report.skipped.append(SkippedPath(path=str(folder / c.manifest), reason=decision.reason))
            continue
        if decision.action == "keep":
            ctx.log.debug(f"keeping {c.name}: {decision.reason}", kind=kind, id=c.id)
            report.kept.append(KeptSet(kind=kind, id=c.id, name=c.name, type=c.type, status=c.status,
                                       reason=decision.reason))
            continue
        # Data files first, the manifest last: a prune cut short leaves the manifest, so the set shows
        # as "incomplete" (never restored by `latest`, never counted as good) and the next prune
        # finishes it. Manifest first would leave data files no manifest names, which retention must
        # never delete and `restore` would take for a legacy backup.
        names = [*c.files, c.manifest]
        ctx.log.info(f"{'would delete' if dry_run else 'deleting'} {c.name}: {decision.reason}",
                     kind=kind, id=c.id, type=c.type, status=c.status, files=",".join(names), bytes=c.bytes)
        error = None if dry_run else _delete_files(folder, names, ctx.log)
        changed = changed or not dry_run
        if error:
            errors.append(error)
            continue
        report.deleted.append(DeletedSet(kind=kind, id=c.id, name=c.name, type=c.type, status=c.status,
                                         reason=decision.reason, files=names, bytes=c.bytes))
        report.freed_bytes += c.bytes
    for partial, action, reason in select_partials(scan.partials, now):
        if action == "keep":
            ctx.log.debug(f"keeping {partial.name}: {reason}", kind=kind)
            continue
        ctx.log.info(f"{'would delete' if dry_run else 'deleting'} {partial.name}: {reason}",
                     kind=kind, bytes=partial.bytes)
        error = None if dry_run else _delete_files(folder, [partial.name], ctx.log)
        changed = changed or not dry_run
        if error:
            errors.append(error)
            continue
        report.deleted.append(DeletedSet(kind=kind, id="", name=partial.name, type="partial", status="partial",
                                         reason=reason, files=[partial.name], bytes=partial.bytes))
        report.freed_bytes += partial.bytes
    if changed:
        # The unlinks are only durable once the folder itself is synced.
        try:
            fsync_dir(folder)
        except OSError as exc:
            raise storage_error(exc, folder, "sync the folder") from None
    return errors


def prune(ctx: JobContext, *, dry_run: bool) -> RetentionReport:
    """Apply retention to backup_dir/postgres and backup_dir/redis; returns the report the CLI prints.

    A real run holds the "retention" lock throughout (so two prunes never overlap and `status` sees it
    running; raises LockHeld, exit 3, if another prune holds it), and prunes each kind while holding
    that kind's lock, so a running backup or restore is never touched: if a kind's lock is held, that
    kind is skipped (logged, listed in "skipped") and the run still succeeds; the next run catches up.
    --dry-run takes no lock and deletes nothing. Raises StorageError (exit 1) if a file could not be
    deleted, after finishing everything else.
    """
    if dry_run:
        return _prune(ctx, dry_run=True)
    if not ctx.config.backup_dir.is_dir():
        # Nothing to prune, and no reason to create the folder just to lock it.
        return _prune(ctx, dry_run=False)
    with TargetLock(ctx.config.backup_dir, "retention", "retention"):
        return _prune(ctx, dry_run=False)


def _prune(ctx: JobContext, *, dry_run: bool) -> RetentionReport:
    """prune() once the retention lock is held (or for a dry run)."""
    backup_dir = ctx.config.backup_dir
    now = dt.datetime.now(dt.UTC)
    report = RetentionReport(deleted=[], kept=[], skipped=[], freed_bytes=0, dry_run=dry_run)
    errors: list[str] = []
    for kind in KINDS:
        folder = kind_folder(backup_dir, kind)
        if not folder.is_dir():
            continue
        if dry_run:
            holder = holder_of(backup_dir, kind)
            if holder:
                reason = (f"{kind} lock held now (pid {holder.get('pid')}, {holder.get('purpose')!r}); "
                          f"a real prune would skip {kind} until it is free")
                ctx.log.warning(reason, kind=kind)
                report.skipped.append(SkippedPath(path=str(folder), reason=reason))
            errors += _prune_kind(ctx, kind, now, report, dry_run=dry_run)
            continue
        lock = TargetLock(backup_dir, kind, "retention")
        try:
            lock.acquire()
        except LockHeld as exc:
            reason = f"{kind} not pruned this time: {exc.message}; the next retention run will do it"
            ctx.log.warning(reason, kind=kind)
            report.skipped.append(SkippedPath(path=str(folder), reason=reason))
            continue
        try:
            errors += _prune_kind(ctx, kind, now, report, dry_run=dry_run)
        finally:
            lock.release()
    ctx.log.info("retention would delete nothing" if dry_run and not report.deleted else
                 "retention dry run finished" if dry_run else "retention finished",
                 deleted=len(report.deleted), kept=len(report.kept), skipped=len(report.skipped),
                 freed_bytes=report.freed_bytes, days=ctx.config.retention.days,
                 keep_last=ctx.config.retention.keep_last)
    if errors:
        raise StorageError(f"retention could not delete {len(errors)} file(s), first: {errors[0]}",
                           hint="fix the folder's owner or mode and run `kkua-backup prune` again; "
                                "the other sets were handled")
    return report
