"""The marker a file-mode Redis restore leaves while the server may be stopped, and what `status` and the
next `restore` say about it. Apart from restore.py (which writes and clears it) so that `status` reads it
without importing redis-py and the restore itself (docs/performance.md, start-up)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


class HasStateFile(Protocol):
    """What the marker needs of the config: config.Config, or `status`'s record of it (core/status_cache.py)."""

    @property
    def state_file(self) -> Path: ...


def undo_command(safety_file: str) -> str:
    """The command that puts back the data a safety backup holds."""
    return f"kkua-backup restore redis {safety_file} --force --flush"


# A file-mode restore in progress (or killed while Redis was stopped): written before the stop command,
# removed once the server answers again.
_MARKER = "redis-file-restore.json"


def marker_path(config: HasStateFile) -> Path:
    """Where a file-mode restore records itself while Redis may be stopped."""
    return config.state_file.parent / _MARKER


def read_marker(config: HasStateFile) -> dict[str, Any] | None:
    """The marker of a file-mode restore in progress (or killed), or None."""
    try:
        doc = json.loads(marker_path(config).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def interrupted_file_restore(config: HasStateFile) -> str | None:
    """A line for `status` and `restore` when a file-mode restore was killed (kill -9 runs no cleanup)
    after it may have stopped Redis, or None. Says that Redis may be down, how to start it, and where the
    data from before is."""
    marker = read_marker(config)
    if marker is None:
        return None
    pid = marker.get("pid")
    if isinstance(pid, int) and Path(f"/proc/{pid}").exists() and _is_ours(pid):
        return (f"a file-mode restore of {marker.get('file')} runs now (pid {pid}, since {marker.get('started_at')}); "
                f"Redis at {marker.get('server')} may be stopped until it ends")
    safety = marker.get("safety_backup")
    return (f"a file-mode restore of {marker.get('file')} (pid {pid}, started {marker.get('started_at')}) was killed "
            f"before it ended, after which Redis at {marker.get('server')} may be DOWN: if it is, start it with: "
            f"{' '.join(marker.get('start_command') or [])}; files in {marker.get('dir')} named *.before-restore-* "
            "are the previous ones"
            + (f"; the data from before is in {safety} (undo with: {undo_command(safety)})" if safety else "")
            + "; this notice goes away after the next successful restore")


def _is_ours(pid: int) -> bool:
    """Whether `pid` is still a kkua-backup process (a pid can be reused by anything after a kill)."""
    try:
        return b"kkua" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
