"""Redis backups: the RDB captured over the replication protocol, plus AOF, INFO and CONFIG files.

SKELETON: being written (issue 3). Interface the CLI relies on:
  backup(ctx, *, aof: bool | None = None) -> Manifest
  verify_set(ctx, backup_set, *, restore_test: bool) -> dict (like jobs.postgres.verify_set)
"""

from __future__ import annotations

from typing import Any

from ..storage import BackupSet, Manifest
from . import JobContext


def backup(ctx: JobContext, *, aof: bool | None = None) -> Manifest:
    raise NotImplementedError("backup redis: being written (issue 3)")


def verify_set(ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> dict[str, Any]:
    raise NotImplementedError("verify of a redis set: being written (issue 3)")
