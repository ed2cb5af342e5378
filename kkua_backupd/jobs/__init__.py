"""Jobs: what a backup, restore or verification of one target does, given one frozen context."""

from __future__ import annotations

from collections.abc import Callable
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


def verify_report(backup_set: BackupSet, checked: dict[str, Any],
                  restore_test: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """`verify` of one set, for either kind: the file checks already done (`checked`), whether the set is
    marked good, and the outcome of `restore_test` when one is asked for."""
    report: dict[str, Any] = {"kind": backup_set.kind, "id": backup_set.id, "name": backup_set.name,
                              "status": backup_set.status}
    report.update(checked)
    report["ok"] = backup_set.status in ("ok", "unverified")
    if backup_set.manifest is not None and backup_set.status != "ok":
        report["error"] = f"marked {backup_set.status}: {backup_set.manifest.error or 'see its manifest'}"
    if restore_test is not None:
        outcome = restore_test()
        report["restore_test"] = outcome
        report["ok"] = report["ok"] and outcome["ok"]
    return report
