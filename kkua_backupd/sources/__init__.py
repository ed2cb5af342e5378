"""Data sources: one folder per kind of server backed up (postgres/, redis/), and the one registry of kinds.

Every list of kinds or jobs comes from here: the command line's choices, the daemon's slots, the installed
timers, `status` and retention. The kinds themselves are the backup folder's (`store.storage.KINDS`: one
folder and one set of file prefixes each); this adds what runs on a schedule, what a kind's log lines name
as its target, and the `DataSource` that supplies what differs between kinds to the flows written once in
core/flows.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Protocol

from kkua_backupd.store.kinds import KINDS, Kind

if TYPE_CHECKING:
    from kkua_backupd.config import Config
    from kkua_backupd.core.context import JobContext, RestorePlan, RestoreReport, SafetyBackup, VerifyReport
    from kkua_backupd.store.storage import BackupSet, Manifest

RETENTION: Final = "retention"
# What runs on a schedule (a timer, a cron line, a daemon slot and a `status` entry each): one job per kind,
# then retention.
JOBS: Final[tuple[str, ...]] = (*KINDS, RETENTION)
# `kkua-backup backup TARGET` and `kkua-backup run JOB`: "all" runs every kind (and, for run, retention).
BACKUP_TARGETS: Final[tuple[str, ...]] = (*KINDS, "all")
RUN_JOBS: Final[tuple[str, ...]] = (*JOBS, "all")


@dataclass(frozen=True)
class BackupOptions:
    """What the command line can ask of one backup beyond its config; None keeps the configured value."""

    test_restore: bool | None = None  # postgres: --test-restore (TEST_RESTORE)
    aof: bool | None = None  # redis: --aof (BACKUP_AOF)


@dataclass(frozen=True)
class RestoreOptions:
    """What the command line asks of one restore (`kkua-backup restore KIND FILE ...`)."""

    force: bool = False  # --force (FORCE_RESTORE is the config's, read by the flow)
    safety_backup: bool = True  # not --no-safety-backup
    target_db: str | None = None  # postgres: --target-db
    flush: bool = False  # redis: --flush
    aof: bool = False  # redis: --aof
    mode: str | None = None  # redis: --mode (None: the configured restore_mode)


class Restore(Protocol):
    """One restore of one set as a source does it: the steps that differ between kinds. Their order, the
    lock, the checks every set passes, the confirmation, the safety backup's place and the one rule for a
    result that differs from the backup are core/flows.restore's, the same for every source."""

    backup_set: BackupSet
    name: str  # the file restored
    target: str  # what the last error line names as restored into
    checks: str  # what can still check a file without a manifest (check_restorable)
    requested: dict[str, Any]  # the fields of the "restore requested" log line
    target_field: dict[str, Any]  # how the log names the target ({"database": ...}, {"server": ...})
    report: RestoreReport  # what the restore did (`restore --json` prints its to_json()), filled in by the steps

    def prepare(self) -> None:
        """Under the lock, first: clean up after runs killed midway (and say so)."""
        ...

    def check(self) -> None:
        """Read the set as the restore will (checksums, decompression, what the target can hold); raises
        before anything changes."""
        ...

    def session(self) -> AbstractContextManager[None]:
        """What plan, safety backup and apply run inside (a connection to the server, a throwaway server)."""
        ...

    def plan(self) -> RestorePlan:
        """What the restore is about to do (logged; shown for the confirmation); raises what the target
        cannot take, before any change."""
        ...

    def safety_backup(self) -> SafetyBackup:
        """A backup of the target's current data (its main file), taken after the confirmation."""
        ...

    def apply(self) -> None:
        """The change itself; on failure, raises saying what the target holds now."""
        ...

    def counts_after(self) -> list[str]:
        """What the target holds now against what the backup recorded: the differences (empty: none)."""
        ...

    def undo_hint(self) -> str:
        """Where the data from before is, for the error of a result that differs."""
        ...

    def finished(self) -> None:
        """Log the restore's end."""
        ...


class StoredTest(Protocol):
    """A test restore recorded in a set's manifest (a PostgreSQL backup's `--test-restore`)."""

    ok: bool
    ran: bool | None  # False: it could not run (the set is ok but unverified); None: not recorded


class SetDetails(Protocol):
    """What any source's typed manifest details (sources/<kind>/manifest.py) tell `status`, the metrics and
    `list` about a set."""

    @property
    def rows(self) -> int | None:
        """Rows in every table (PostgreSQL), else None."""
        ...

    @property
    def key_count(self) -> int | None:
        """Keys in every database (Redis), else None."""
        ...

    @property
    def tested(self) -> StoredTest | None:
        """The test restore the backup ran, if one did."""
        ...


class DataSource(Protocol):
    """What a kind of server supplies to the flows (core/flows.py); the flows do the rest (folders, the lock,
    partial files left by killed runs, the status record)."""

    kind: Kind

    def capture(self, ctx: JobContext, folder: Path, options: BackupOptions, started: float) -> Manifest:
        """Write one backup set and its manifest into `folder` (the kind's folder, under its lock, partial
        files already removed; `started` is the flow's time.monotonic() start); raises JobError subclasses
        and leaves no file of its own on failure."""
        ...

    def finished(self, ctx: JobContext, manifest: Manifest, started: float) -> None:
        """After the lock: log the backup's outcome; raise JobError when the set was written but is not
        good (marked failed, or unverified)."""
        ...

    def verify_set(self, ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
        """`verify` of one set: check its files (raising IntegrityError and the like) and, if asked, test
        a restore of it; the report's `ok` says whether it passed."""
        ...

    def restorer(self, ctx: JobContext, spec: str, options: RestoreOptions) -> Restore:
        """The restore of the set `spec` names (an id, a file, `latest`), for core/flows.restore; raises
        UsageError for options this kind cannot take and what `resolve` raises."""
        ...


@dataclass(frozen=True)
class Registered:
    """One kind in the registry: the module whose `SOURCE` is its DataSource (imported when first needed,
    so a Redis backup does not load psycopg), what its log lines name as the target, and the file in
    log_dir its `backup` and `run` write to."""

    module: str
    target: Callable[[Config], str]
    details: str  # the module whose `DETAILS` is the typed view of its manifests' details
    backup_log: str = "backup.log"


REGISTRY: Final[dict[str, Registered]] = {
    "postgres": Registered("kkua_backupd.sources.postgres.source",
                           lambda c: f"{c.postgres.host}:{c.postgres.port}/{c.postgres.database}",
                           details="kkua_backupd.sources.postgres.manifest"),
    "redis": Registered("kkua_backupd.sources.redis.backup", lambda c: f"{c.redis.host}:{c.redis.port}",
                        details="kkua_backupd.sources.redis.manifest", backup_log="redis_backup.log"),
}
assert tuple(REGISTRY) == KINDS, "every kind of the backup folder has its source, in the same order"
# The module that backs up and verifies each kind (its `SOURCE`).
JOB_MODULES: Final[dict[str, str]] = {kind: entry.module for kind, entry in REGISTRY.items()}

__all__ = [
    "BACKUP_TARGETS",
    "JOBS",
    "JOB_MODULES",
    "KINDS",
    "REGISTRY",
    "RETENTION",
    "RUN_JOBS",
    "BackupOptions",
    "DataSource",
    "Kind",
    "Restore",
    "RestoreOptions",
    "SetDetails",
    "StoredTest",
    "details_of",
    "job_module",
    "job_target",
    "source",
]


def job_module(kind: str) -> ModuleType:
    """The module that does `kind`'s backups and verifications, imported when first needed."""
    return importlib.import_module(JOB_MODULES[kind])


def source(kind: str) -> DataSource:
    """The DataSource of `kind`."""
    found: DataSource = job_module(kind).SOURCE
    return found


def details_of(manifest: Manifest) -> SetDetails:
    """The typed details of a manifest, read by its kind's model (fields missing in older manifests take
    their defaults); raises IntegrityError for details no version of the tool wrote."""
    model = importlib.import_module(REGISTRY[manifest.kind].details).DETAILS
    found: SetDetails = manifest.details_as(model)
    return found


def backup_log(job: str) -> str:
    """The file in log_dir a job's `backup` or `run` writes to: its kind's, else backup.log (retention, all)."""
    entry = REGISTRY.get(job)
    return entry.backup_log if entry is not None else "backup.log"


def job_target(config: Config, job: str) -> str:
    """What a job's log lines name as its target: the server of a kind, the backup folder for retention."""
    entry = REGISTRY.get(job)
    return entry.target(config) if entry is not None else str(config.backup_dir)
