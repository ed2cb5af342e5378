"""Retention: which backup sets to delete, decided from manifests only.

SKELETON: being written (issue 4). Interface the CLI relies on:
  prune(ctx, *, dry_run) -> {"deleted": [{"kind","id","name","type","reason","files","bytes"}], "kept": [...],
                             "skipped": [...], "freed_bytes": int, "dry_run": bool}
"""

from __future__ import annotations

from typing import Any

from . import JobContext


def prune(ctx: JobContext, *, dry_run: bool) -> dict[str, Any]:
    raise NotImplementedError("prune: being written (issue 4)")
