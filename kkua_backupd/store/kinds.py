"""The kinds of the backup folder (one folder and one set of file prefixes each), with no import beyond the
standard library: the command line's choices come from here, and `kkua-backup --help` loads nothing heavy.
store/storage.py re-exports them; its docstring's rules apply."""

from __future__ import annotations

import datetime as dt
from typing import Literal

Kind = Literal["postgres", "redis"]
KINDS: tuple[Kind, ...] = ("postgres", "redis")
PREFIXES: dict[str, dict[str, str]] = {
    "postgres": {"backup": "kkua_backup_", "safety": "safety_backup_before_restore_"},
    "redis": {"backup": "redis_backup_", "safety": "safety_backup_before_restore_"},
}

# Every set's manifest is named PREFIX + ID + this (store/storage.py).
MANIFEST_SUFFIX = ".manifest.json"
# A set dated later than now + this is "in the future" (clock skew, a hand-made manifest): warned about,
# never `latest`, never counted toward keep_last (docs/security.md).
FUTURE_TOLERANCE = dt.timedelta(minutes=5)
