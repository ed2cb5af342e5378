"""Redis restores: logical (DUMP/RESTORE through a throwaway server) or file (place the RDB, restart).

SKELETON: being written (issue 3). Interface the CLI relies on:
  restore(ctx, spec, *, force, flush, aof, mode, safety_backup) -> dict with at least
    file, mode, keys, databases {"0": n, ...}, seconds, counts_match (bool|None), differences [str],
    safety_backup {"file": ...} | None
"""

from __future__ import annotations

from typing import Any

from . import JobContext


def restore(ctx: JobContext, spec: str, *, force: bool, flush: bool, aof: bool, mode: str | None,
            safety_backup: bool = True) -> dict[str, Any]:
    raise NotImplementedError("restore redis: being written (issue 3)")
