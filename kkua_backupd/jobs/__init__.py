"""Jobs: what a backup, restore or verification of one target does, given one frozen context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import Refused
from ..storage import BackupSet


@dataclass(frozen=True)
class JobContext:
    """Everything a job needs: the effective config, a bound logger, and how it was started."""

    config: Config
    log: Any
    interactive: bool = False  # a person at a terminal: progress lines and questions
    json_mode: bool = False


def check_restorable(ctx: JobContext, backup_set: BackupSet, *, checks: str) -> None:
    """Say what an operator should know about the set about to be restored; raises Refused when files of
    the set are missing. `checks` names what can still check a file without a manifest."""
    if backup_set.manifest is None:
        ctx.log.warning(f"this file has no manifest (not made by kkua-backup): only {checks} can check it",
                        file=backup_set.name)
    elif backup_set.status == "failed":
        ctx.log.warning("this set is marked failed; restoring it because it was named explicitly",
                        file=backup_set.name, reason=backup_set.manifest.error)
    elif backup_set.status != "ok":
        raise Refused(f"{backup_set.name} is {backup_set.status}: missing {', '.join(backup_set.missing_files)}",
                      hint=f"choose another backup (see `kkua-backup list {backup_set.kind}`)")
