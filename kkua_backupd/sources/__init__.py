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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Final, Protocol

from kkua_backupd.store.storage import KINDS, Kind

if TYPE_CHECKING:
    from kkua_backupd.config import Config
    from kkua_backupd.core.context import JobContext, VerifyReport
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


@dataclass(frozen=True)
class Registered:
    """One kind in the registry: the module whose `SOURCE` is its DataSource (imported when first needed,
    so a Redis backup does not load psycopg), and what its log lines name as the target."""

    module: str
    target: Callable[[Config], str]


REGISTRY: Final[dict[str, Registered]] = {
    "postgres": Registered("kkua_backupd.sources.postgres.job",
                           lambda c: f"{c.postgres.host}:{c.postgres.port}/{c.postgres.database}"),
    "redis": Registered("kkua_backupd.sources.redis.backup", lambda c: f"{c.redis.host}:{c.redis.port}"),
}
assert tuple(REGISTRY) == KINDS, "every kind of the backup folder has its source, in the same order"
# The module that backs up and verifies each kind (its `SOURCE`).
JOB_MODULES: Final[dict[str, str]] = {kind: entry.module for kind, entry in REGISTRY.items()}

__all__ = ["BACKUP_TARGETS", "JOBS", "JOB_MODULES", "KINDS", "REGISTRY", "RETENTION", "RUN_JOBS", "BackupOptions",
           "DataSource", "Kind", "job_module", "job_target", "source"]


def job_module(kind: str) -> ModuleType:
    """The module that does `kind`'s backups and verifications, imported when first needed."""
    return importlib.import_module(JOB_MODULES[kind])


def source(kind: str) -> DataSource:
    """The DataSource of `kind`."""
    found: DataSource = job_module(kind).SOURCE
    return found


def job_target(config: Config, job: str) -> str:
    """What a job's log lines name as its target: the server of a kind, the backup folder for retention."""
    entry = REGISTRY.get(job)
    return entry.target(config) if entry is not None else str(config.backup_dir)
