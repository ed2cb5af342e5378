"""Data sources: one folder per kind of server backed up (postgres/, redis/), and the one registry of kinds.

Every list of kinds or jobs comes from here: the command line's choices, the daemon's slots, the installed
timers, `status` and retention. The kinds themselves are the backup folder's (`store.storage.KINDS`: one
folder and one set of file prefixes each); this adds what runs on a schedule and which module does a kind's
work.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Final

from kkua_backupd.store.storage import KINDS, Kind

RETENTION: Final = "retention"
# What runs on a schedule (a timer, a cron line, a daemon slot and a `status` entry each): one job per kind,
# then retention.
JOBS: Final[tuple[str, ...]] = (*KINDS, RETENTION)
# `kkua-backup backup TARGET` and `kkua-backup run JOB`: "all" runs every kind (and, for run, retention).
BACKUP_TARGETS: Final[tuple[str, ...]] = (*KINDS, "all")
RUN_JOBS: Final[tuple[str, ...]] = (*JOBS, "all")
# The module that backs up and verifies each kind: backup(ctx, ...), verify_set(ctx, backup_set, ...).
JOB_MODULES: Final[dict[str, str]] = {
    "postgres": "kkua_backupd.sources.postgres.job",
    "redis": "kkua_backupd.sources.redis.backup",
}

__all__ = ["BACKUP_TARGETS", "JOBS", "JOB_MODULES", "KINDS", "RETENTION", "RUN_JOBS", "Kind", "job_module"]


def job_module(kind: str) -> ModuleType:
    """The module that does `kind`'s backups and verifications, imported when first needed."""
    return importlib.import_module(JOB_MODULES[kind])
