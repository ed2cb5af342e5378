"""`kkua-backup cron install|uninstall|status|test`: the legacy cron entries, a marked block in
/etc/cron.d (or a user's crontab), converted from the same OnCalendar schedules (`oncalendar_to_cron`).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kkua_backupd.config import LoadedConfig
from kkua_backupd.core.context import JobContext
from kkua_backupd.errors import CommandFailed, KkuaError, UsageError
from kkua_backupd.install.common import (
    CRON_FILE,
    STOP_MARGIN,
    USER,
    Installation,
    Target,
    _log,
    _require_root,
    _run,
    _say,
    _schedules,
    next_runs,
)
from kkua_backupd.proc import execute
from kkua_backupd.sources import JOBS
from kkua_backupd.stream.pipeline import write_atomic

# ----------------------------------------------------------------------------------------------------
# Cron: OnCalendar -> cron conversion (pure), the marked block, install|uninstall|status|test.

BEGIN = "# BEGIN kkua-backup (managed; do not edit)"
END = "# END kkua-backup"
SHORTHANDS = {"minutely": "*-*-* *:*:00", "hourly": "*-*-* *:00:00", "daily": "*-*-* 00:00:00",
              "monthly": "*-*-01 00:00:00", "weekly": "Mon *-*-* 00:00:00", "yearly": "*-01-01 00:00:00",
              "annually": "*-01-01 00:00:00", "quarterly": "*-01,04,07,10-01 00:00:00",
              "semiannually": "*-01,07-01 00:00:00"}
WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 0}


class NotExpressible(ValueError):
    """An OnCalendar expression that cron cannot express exactly."""


def _refuse(expr: str, why: str) -> NotExpressible:
    return NotExpressible(f"schedule {expr!r} cannot be written as a cron line ({why}); simplify it, or use "
                          "systemd timers (`kkua-backup systemd install`), which take every OnCalendar expression")


def _cron_number(text: str, lo: int, hi: int, expr: str) -> int:
    if not text.isdigit():
        raise _refuse(expr, f"{text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise _refuse(expr, f"{value} is outside {lo}..{hi}")
    return value


def _cron_field(text: str, lo: int, hi: int, expr: str) -> str:
    """One cron field from one OnCalendar component (`*`, `5`, `1,3`, `1..5`, `0/15`, `1..10/3`)."""
    if text == "*":
        return "*"
    items = []
    for item in text.split(","):
        base, _, step = item.partition("/")
        step_value = _cron_number(step, 1, hi, expr) if step else None
        if ".." in base:
            first, last = (_cron_number(x, lo, hi, expr) for x in base.split("..", 1))
            if last < first:
                raise _refuse(expr, f"range {base} runs backwards")
            out = f"{first}-{last}"
        elif base == "*":
            out = "*"
        else:
            first = _cron_number(base, lo, hi, expr)
            out = str(first) if step_value is None else ("*" if first == lo else f"{first}-{hi}")
        items.append(out if step_value is None else f"{out}/{step_value}")
    return ",".join(items)


def _cron_weekdays(text: str, expr: str) -> str:
    parts = []
    for item in text.split(","):
        names = item.split("..")
        try:
            days = [WEEKDAYS[n.strip().lower()[:3]] for n in names]
        except KeyError:
            raise _refuse(expr, f"{item!r} is not a weekday") from None
        if len(days) == 1:
            parts.append(str(days[0]))
        else:
            first, last = days[0], days[1] or 7  # Sunday closes a range as 7
            if last < first:
                raise _refuse(expr, f"weekday range {item} wraps around the week")
            parts.append(f"{first}-{last}")
    return ",".join(parts)


def oncalendar_to_cron(expr: str) -> str:
    """The five cron fields firing exactly when systemd's OnCalendar `expr` does, in local time; raises
    NotExpressible (naming the expression) for what cron cannot express: seconds other than :00, years,
    `~` (last days), time zones, and a day of the month together with weekdays (cron ORs those)."""
    text = SHORTHANDS.get(expr.strip().lower(), expr.strip())
    words = text.split()
    weekdays = "*"
    if words and words[0][0].isalpha():
        weekdays = _cron_weekdays(words.pop(0), expr)
    dates = [w for w in words if "-" in w and ":" not in w]
    times = [w for w in words if ":" in w]
    others = [w for w in words if w not in dates and w not in times]
    if others:
        raise _refuse(expr, f"{others[0]!r} (a time zone?) is not understood; cron runs in the machine's local time")
    if len(dates) > 1 or len(times) > 1:
        raise _refuse(expr, "more than one date or time")
    date = dates[0] if dates else "*-*-*"
    time_of_day = times[0] if times else "00:00:00"
    if "~" in date:
        raise _refuse(expr, "'~' counts days from the end of the month")
    date_parts = date.split("-")
    if len(date_parts) == 2:
        date_parts.insert(0, "*")
    if len(date_parts) != 3:
        raise _refuse(expr, f"date {date!r} is not YEAR-MONTH-DAY")
    year, month, day = date_parts
    if year != "*":
        raise _refuse(expr, "cron has no year field")
    time_parts = time_of_day.split(":")
    if len(time_parts) == 2:
        time_parts.append("00")
    if len(time_parts) != 3:
        raise _refuse(expr, f"time {time_of_day!r} is not HOUR:MINUTE[:SECOND]")
    hour, minute, second = time_parts
    if not re.fullmatch(r"0+(\.0*)?", second):
        raise _refuse(expr, "cron cannot fire at a second other than :00")
    cron_day = _cron_field(day, 1, 31, expr)
    if cron_day != "*" and weekdays != "*":
        raise _refuse(expr, "cron runs a line when EITHER the day of the month OR the weekday matches")
    return " ".join((_cron_field(minute, 0, 59, expr), _cron_field(hour, 0, 23, expr), cron_day,
                     _cron_field(month, 1, 12, expr), weekdays))


def _cron_word(text: str) -> str:
    return shlex.quote(text).replace("%", "\\%")  # an unescaped % ends a cron command


def render_cron_block(schedules: dict[str, str], *, bin_dir: Path, config_path: Path | None, log_dir: Path,  # noqa: PLR0913 - keyword-only options of one rendering
                      randomized_delay: int, user: str | None) -> str:
    """The marked block: one line per job (`user` field only for /etc/cron.d); raises NotExpressible."""
    lines = [BEGIN,
             "# Rendered from [schedule] by `kkua-backup cron install`; change the config and run it again.",
             f"# Output of each run: {log_dir / 'cron.log'}; the jobs also write backup.log and redis_backup.log."]
    program = [str(bin_dir / "kkua-backup")] + (["--config", str(config_path)] if config_path else [])
    for job in JOBS:
        fields = oncalendar_to_cron(schedules[job])
        delay = f"sleep $(shuf -i 0-{randomized_delay} -n 1); " if randomized_delay else ""
        command = (f"{delay}KKUA_BACKUP_RUNNER=cron {' '.join(_cron_word(w) for w in program)} run {job} "
                   f">>{_cron_word(str(log_dir / 'cron.log'))} 2>&1")
        lines.append(f"{fields} {user + ' ' if user else ''}{command}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _split_block(text: str) -> tuple[list[str], list[str] | None, list[str]]:
    """(lines before, the managed block or None, lines after); raises KkuaError on a broken block."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if not starts and not ends:
        return lines, None, []
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise KkuaError(f"the kkua-backup block is broken ({len(starts)} BEGIN and {len(ends)} END markers)",
                        hint="fix or remove the lines between the markers by hand, then run the command again")
    return lines[:starts[0]], lines[starts[0]:ends[0] + 1], lines[ends[0] + 1:]


def replace_block(text: str, block: str) -> str:
    """`text` with the managed block replaced by `block` (appended when absent); other lines untouched."""
    before, _, after = _split_block(text)
    if before and not before[-1].endswith("\n"):
        before[-1] += "\n"
    return "".join(before) + block + "".join(after)


def remove_block(text: str) -> str:
    """`text` without the managed block; other lines untouched."""
    before, _, after = _split_block(text)
    return "".join(before) + "".join(after)


def find_block(text: str) -> str | None:
    """The managed block in `text`, if any."""
    return "".join(block) if (block := _split_block(text)[1]) is not None else None


@dataclass(frozen=True)
class CronTarget:
    """A crontab: /etc/cron.d/kkua-backup under the root, or the user's crontab (`crontab -l` / `-`)."""

    root: Path
    user_mode: bool

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    @property
    def path(self) -> Path:
        return self.root / CRON_FILE

    def describe(self) -> str:
        return "your crontab" if self.user_mode else str(self.path)

    def read(self) -> str:
        """The crontab's text ("" when there is none); raises KkuaError."""
        if self.user_mode:
            try:
                return _run(("crontab", "-l"), timeout=30)
            except CommandFailed as exc:
                if any("no crontab" in line for line in exc.stderr_tail):
                    return ""
                raise
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def write(self, text: str) -> None:
        """Replace the crontab's text; an empty /etc/cron.d file is removed."""
        if self.user_mode:
            _run(("crontab", "-"), timeout=30, input_bytes=text.encode())
            return
        if not text.strip():
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # cron ignores files in /etc/cron.d that are group- or world-writable.
        write_atomic(self.path, text.encode(), 0o644)


def _cron_target(args: argparse.Namespace) -> CronTarget:
    target = CronTarget(root=Target.from_args(args).root, user_mode=bool(args.user))
    if target.user_mode and shutil.which("crontab") is None:
        raise KkuaError("the crontab command is not installed", hint="apt-get install cron, or use systemd timers")
    if not target.user_mode and target.live:
        _require_root("`kkua-backup cron install` for /etc/cron.d (or use --user for your own crontab)")
    return target


def cron_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    """Dispatch `kkua-backup cron ACTION`; returns the result document (or (doc, exit code))."""
    target = _cron_target(args)
    actions: dict[str, Callable[[], Any]] = {
        "install": lambda: cron_install(ctx, args, target),
        "uninstall": lambda: cron_uninstall(ctx, target),
        "status": lambda: cron_status(ctx, target),
        "test": lambda: cron_test(ctx, args, target),
    }
    return actions[args.action]()


def cron_install(ctx: JobContext, args: argparse.Namespace, target: CronTarget) -> dict[str, Any]:
    """Write (or replace) the marked block, rendered from [schedule]; raises UsageError when a schedule
    cannot be written for cron."""
    config = ctx.config
    install = Installation.current(args)
    schedules = _schedules(config)
    if config.schedule.timezone:
        raise UsageError(f"schedule.timezone = {config.schedule.timezone!r} cannot be used with cron, which runs in "
                         "the machine's local time", hint="remove it, or use `kkua-backup systemd install`")
    try:
        block = render_cron_block(schedules, bin_dir=install.bin_dir, config_path=install.config_path,
                                  log_dir=config.log_dir, randomized_delay=config.schedule.randomized_delay,
                                  user=None if target.user_mode else USER)
    except NotExpressible as exc:
        raise UsageError(str(exc)) from None
    old = target.read()
    target.write(replace_block(old, block))
    warnings: list[str] = []
    if not target.user_mode and target.live:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            warnings.append(f"the {USER} user does not exist, so cron cannot run the jobs; create it with "
                            "`kkua-backup systemd install --no-enable` or the sysusers step in docs/install.md")
    for warning in warnings:
        _log().warning(warning)
    _say(ctx, f"{'Replaced' if find_block(old) else 'Added'} the kkua-backup block in {target.describe()}:")
    for line in block.splitlines():
        _say(ctx, f"  {line}")
    return {"crontab": target.describe(), "block": block, "replaced": find_block(old) is not None,
            "warnings": warnings}


def cron_uninstall(ctx: JobContext, target: CronTarget) -> dict[str, Any]:
    """Remove the marked block; every other line stays."""
    old = target.read()
    if find_block(old) is None:
        _say(ctx, f"Nothing to remove: no kkua-backup block in {target.describe()}.")
        return {"crontab": target.describe(), "removed": False}
    target.write(remove_block(old))
    _say(ctx, f"Removed the kkua-backup block from {target.describe()}; other lines were left as they were.")
    return {"crontab": target.describe(), "removed": True}


def cron_status(ctx: JobContext, target: CronTarget) -> dict[str, Any]:
    """The block as installed and the next run of each job."""
    block = find_block(target.read())
    if block is None:
        _say(ctx, f"No kkua-backup block in {target.describe()} (install it with `kkua-backup cron install`).")
    else:
        _say(ctx, f"{target.describe()}:")
        for line in block.splitlines():
            _say(ctx, f"  {line}")
    jobs: dict[str, Any] = {}
    for job in JOBS:
        expr = getattr(ctx.config.schedule, job)
        runs = next_runs(expr, ctx.config.schedule.timezone) if block is not None else []
        jobs[job] = {"schedule": expr, "next_run": runs[0] if runs else None}
        if block is not None:
            _say(ctx, f"  next {job}: {runs[0] if runs else 'unknown'}")
    return {"crontab": target.describe(), "installed": block is not None, "block": block, "jobs": jobs}


def cron_test(ctx: JobContext, args: argparse.Namespace, target: CronTarget) -> tuple[dict[str, Any], int]:
    """Run each job once, as cron would (as kkua-backup for /etc/cron.d at the root /), and report per job."""
    install = Installation.current(args)
    program = [str(install.bin_dir / "kkua-backup")] + (["--config", str(install.config_path)]
                                                        if install.config_path else [])
    prefix: list[str] = []
    if target.live and not target.user_mode and os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise KkuaError("runuser is not installed, so the jobs cannot be run as kkua-backup",
                            hint="install util-linux, or test with --user")
        prefix = ["runuser", "-u", USER, "--"]
    results: dict[str, Any] = {}
    code = 0
    for job in JOBS:
        results[job] = _test_job(job, (*prefix, *program, "run", job), ctx.config.daemon.job_timeout + STOP_MARGIN)
        info = results[job]
        if not info["ok"]:
            code = 1
        _say(ctx, f"{'OK  ' if info['ok'] else 'FAIL'}  run {job} ({info['seconds']} s)"
                  + (f": {info['error']}" if not info["ok"] else ""))
        for line in info["output"] if not info["ok"] else []:
            _say(ctx, f"      {line}")
    if code:
        _log().error("a job failed when run as cron would run it; fix it before relying on cron (lines above)")
    return {"jobs": results, "ok": code == 0}, code


def _test_job(job: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run one job to completion; its console output goes to a temporary file whose last lines are kept."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        error: str | None = None
        try:
            # Like cron: the environment without DATABASE_PASSWORD/REDIS_PASSWORD (execute withholds
            # them), so a job that only works with them in the operator's shell fails here too.
            with execute.ProcessGroup("install") as group:
                child = group.spawn(argv, env={"KKUA_BACKUP_RUNNER": "cron"}, stdout=out, timeout=timeout,
                                    name=f"kkua-backup run {job}")
                group.wait(child)
        except KkuaError as exc:
            error = str(exc)
        out.seek(0)
        lines = out.read().decode("utf-8", "replace").splitlines()
    doc: dict[str, Any] = {"ok": error is None, "seconds": round(time.monotonic() - started, 1),
                           "output": lines[-5:]}
    if error is not None:
        doc["error"] = error
    return doc
