"""What operators see of each run, whoever runs it: notices (start, success, failure), the counters and last
results that metrics are made of, and the metrics text file, written after every job.

`observed()` wraps `state.track()`: every runner (timer, daemon worker, cron, a person) goes through
`cli.run_job`, so every run is seen the same way. A run that ends without saying so (SIGKILL, out of memory)
is reported by `report_unit_failure()`, which systemd's `OnFailure=` runs (`kkua-backup notify-failure UNIT`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

from kkua_backupd.config import Config
from kkua_backupd.core import state
from kkua_backupd.errors import IntegrityError, KkuaError, Refused
from kkua_backupd.obs import logs, metrics
from kkua_backupd.obs.notifications import Notice, Notifier, new_run_id
from kkua_backupd.proc import execute
from kkua_backupd.sources import JOBS, KINDS, details_of
from kkua_backupd.store.storage import list_sets


def notifier(config: Config, log: Any = None) -> Notifier:
    """The notifier of `config`'s [notify] section (does nothing when no URL is configured)."""
    cfg = config.notify
    return Notifier(healthchecks_url=cfg.healthchecks_url.get_secret_value() if cfg.healthchecks_url else None,
                    webhook_url=cfg.webhook_url.get_secret_value() if cfg.webhook_url else None,
                    timeout=cfg.timeout, log=log)


def job_records(config: Config) -> dict[str, dict[str, Any]]:
    """Every job's record in the state file (what metrics are made of); empty ones for jobs never run."""
    jobs = state.load(config)["jobs"]
    return {job: dict(jobs.get(job, {})) for job in JOBS}


def write_metrics(config: Config, log: Any = None) -> None:
    """Rewrite metrics.textfile from the state file, if configured; a failure is logged, never raised."""
    path = config.metrics.textfile
    if path is None:
        return
    try:
        metrics.write_textfile(path, job_records(config), state.remote_status(config))
    except KkuaError as exc:
        (log or logs.get_logger()).warning(f"metrics not written: {exc}")


def _set_facts(config: Config, job: str, since: dt.datetime) -> dict[str, Any]:
    """Rows or keys and the test restore of the set this run made (the newest of its kind since `since`)."""
    if job not in KINDS:
        return {}
    for backup_set in list_sets(config.backup_dir, job):
        manifest = backup_set.manifest
        if manifest is None or manifest.type != "backup" or manifest.created_at < since.replace(microsecond=0):
            continue
        facts: dict[str, Any] = {}
        try:
            details = details_of(manifest)
        except IntegrityError:  # not a manifest this tool wrote: nothing to tell from it
            return facts
        if details.rows is not None:
            facts["last_rows"] = details.rows
        if details.key_count is not None:
            facts["last_keys"] = details.key_count
        test = details.tested
        if test is not None and test.ran is not None:
            facts["test_restore_at"] = state.iso(manifest.finished_at or manifest.created_at)
            facts["test_restore_ok"] = test.ok
        return facts
    return {}


def record_outcome(config: Config, job: str, *, ok: bool, since: dt.datetime, notified: bool) -> None:
    """Add to the job's record what `state.track` does not keep: counters, the last success, the duration,
    what the set holds, whether the failure was already told (so `OnFailure=` does not tell it twice)."""
    facts = _set_facts(config, job, since)
    if not ok:  # a failed run's set (a failed test restore) tells its test, not the last good rows or keys
        facts = {key: value for key, value in facts.items() if key.startswith("test_restore")}
    with state.update(config) as data:
        entry = data["jobs"].setdefault(job, {})
        # now, not last_end: that one is to the second, `since` to the microsecond (the run ended just now)
        entry["runs_total"] = int(entry.get("runs_total") or 0) + 1
        entry["last_finished_result"] = "ok" if ok else "failed"
        entry["last_duration"] = round(max(0.0, (state.now() - since).total_seconds()), 3)
        if ok:
            entry["failures_total"] = int(entry.get("failures_total") or 0)
            entry["last_success"] = entry.get("last_end") or state.iso(state.now())
            if job in KINDS and isinstance(entry.get("size"), int):  # retention's size is what it freed
                entry["last_size"] = entry["size"]
        else:
            entry["failures_total"] = int(entry.get("failures_total") or 0) + 1
        entry.update(facts)
        entry["outcome_recorded"] = entry.get("last_start")
        entry["failure_notified"] = entry.get("last_start") if notified else None


class Observation:
    """One run being observed: its state record (`record.finish(...)` as with `state.track`)."""

    def __init__(self, record: state.RunRecord) -> None:
        self.record = record


@contextlib.contextmanager
def observed(config: Config, job: str, *, runner: str) -> Iterator[Observation]:
    """Run the block as one run of `job`: recorded by `state.track`, announced (start in the background,
    then success or failure with the last log lines), counted, and the metrics file rewritten at the end.
    A refused run (another holds the lock) is not a run: only its start ping was sent."""
    log = logs.get_logger(job=job)
    tell = notifier(config, log)
    run_id = new_run_id()
    tell.send_in_background(Notice(job, "start", run_id, "started", at=state.iso(state.now()) or ""))
    started = state.now()
    clock = time.monotonic()
    log.info("run started", runner=runner)
    try:
        with state.track(config, job, runner=runner) as record:
            yield Observation(record)
    except Refused:
        tell.wait()
        raise
    except BaseException as exc:
        error = state.error_line(exc)
        tell.send(Notice(job, "failure", run_id, f"failed: {error}",
                         log_tail=logs.sink().recent(config.notify.log_lines), at=state.iso(state.now()) or "",
                         details={"runner": runner, "seconds": round(time.monotonic() - clock, 3)}))
        _finish(config, job, ok=False, since=started, notified=tell.enabled)
        raise
    tell.send(Notice(job, "success", run_id, "succeeded", at=state.iso(state.now()) or "",
                     details={"runner": runner, "seconds": round(time.monotonic() - clock, 3),
                              "size": record.size, "detail": record.detail}))
    _finish(config, job, ok=True, since=started, notified=False)


def _finish(config: Config, job: str, *, ok: bool, since: dt.datetime, notified: bool) -> None:
    log = logs.get_logger(job=job)
    try:
        record_outcome(config, job, ok=ok, since=since, notified=notified)
    except (KkuaError, OSError) as exc:
        log.warning("cannot record the run's counters in the state file; metrics will miss it", reason=str(exc))
    write_metrics(config, log)


# ---------------------------------------------------------------------------------------------
# OnFailure=: a unit that failed without its job telling it (killed by a timeout, OOM, the watchdog)

DAEMON_UNIT = "kkua-backupd.service"


def unit_jobs(unit: str) -> list[str]:
    """The jobs a unit runs: `kkua-backup@postgres.service` -> [postgres]; `@run` -> every job; the daemon
    -> none of its own (its workers report themselves). Raises KkuaError for a unit that is not ours."""
    name = unit.removesuffix(".service")
    if name.startswith("kkua-backup@"):
        instance = name.removeprefix("kkua-backup@")
        if instance == "run":
            return list(JOBS)
        if instance in JOBS:
            return [instance]
    if name == DAEMON_UNIT.removesuffix(".service"):
        return []
    raise KkuaError(f"{unit} is not a kkua-backup unit", hint="expected kkua-backup@JOB.service or kkua-backupd")


def journal_tail(unit: str, lines: int) -> list[str]:
    """The last lines `unit` logged in its last invocation (journalctl), or [] when the journal cannot say."""
    if lines <= 0:
        return []
    try:
        out = execute.run(("journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit), job="notify",
                          timeout=10)
    except (KkuaError, OSError):
        return []
    return [logs.sink().mask(line) for line in out.decode("utf-8", "replace").splitlines()][-lines:]


def report_killed(config: Config, job: str, *, error: str, log_tail: list[str], details: dict[str, Any]) -> bool:
    """Tell and count the failure of `job`'s last run when the run could not (killed); what it did tell is not
    told again. Returns whether a notice was sent (or would have been, with no URL configured)."""
    entry = state.load(config)["jobs"].get(job, {})
    start = entry.get("last_start")
    if entry.get("outcome_recorded") == start and entry.get("failure_notified") == start:
        return False  # the run told its own failure
    tell = notifier(config)
    if entry.get("outcome_recorded") != start:
        since = state.parse_iso(start) or state.now()
        with contextlib.suppress(KkuaError, OSError):
            record_outcome(config, job, ok=False, since=since, notified=tell.enabled)
    tell.send(Notice(job, "failure", new_run_id(), f"failed: {error}", log_tail=log_tail,
                     at=state.iso(state.now()) or "", details=details))
    write_metrics(config)
    return True


def report_unit_failure(config: Config, unit: str) -> list[str]:
    """Tell the failure of `unit` (what `OnFailure=` runs): each of its jobs whose last run failed or was left
    `running` (killed) and was not told is closed as failed, counted, and told with the unit's last journal
    lines; with no job to blame (the daemon), the unit's failure is told. Returns the jobs told."""
    unit = unit if unit.endswith(".service") else f"{unit}.service"  # OnFailure= passes %N, without it
    jobs = unit_jobs(unit)
    tail = journal_tail(unit, config.notify.log_lines)
    records = state.load(config)["jobs"]
    told: list[str] = []
    for job in jobs:
        entry = records.get(job, {})
        if entry.get("last_result") == "running":
            error = f"{unit} failed while the job ran; it did not record its end (killed by systemd?)"
            with contextlib.suppress(KkuaError, OSError):
                state.mark_ended(config, job, pid=int(entry.get("pid") or 0), error=error)
        elif entry.get("last_result") == "failed":
            error = str(entry.get("error") or f"{unit} failed")
        else:
            continue  # this job's run succeeded; another job of the unit failed
        if report_killed(config, job, error=error, log_tail=tail, details={"unit": unit}):
            told.append(job)
    if not jobs:
        notifier(config).send(Notice("daemon", "failure", new_run_id(), f"failed: {unit} failed", log_tail=tail,
                                     at=state.iso(state.now()) or "", details={"unit": unit}))
        told.append("daemon")
    return told
