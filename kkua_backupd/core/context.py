"""What every job is given (one frozen context) and the steps every source's jobs share: the checks before a
restore, the confirmation, the verify report."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kkua_backupd.config import Config
from kkua_backupd.errors import NotConfirmed, Refused
from kkua_backupd.store.storage import BackupSet


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


@dataclass
class RestorePlan:
    """What a restore is about to do, shown to the operator before they confirm."""

    backup_set: BackupSet
    target: str
    in_place: bool
    target_exists: bool
    safety: bool
    lines: list[str] = field(default_factory=list)


def confirm(ctx: JobContext, plan: RestorePlan, *, force: bool) -> None:
    """Ask for `yes` unless forced; raises NotConfirmed when declined or when nobody can answer."""
    if force:
        ctx.log.info("restore confirmed by --force / FORCE_RESTORE", database=plan.target)
        return
    if not sys.stdin.isatty():
        raise NotConfirmed("restore needs confirmation but there is no terminal to ask",
                           hint="run it in a terminal, or pass --force (FORCE_RESTORE=true) if you are sure")
    out = sys.stderr if ctx.json_mode else sys.stdout
    out.write("\n".join(plan.lines) + "\nType 'yes' to continue: ")
    out.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer != "yes":
        raise NotConfirmed(f"restore cancelled (answer was {answer!r}, not 'yes'); nothing was changed")
