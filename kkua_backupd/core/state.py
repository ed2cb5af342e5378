"""Last runs of each job, recorded by whichever runner ran it (daemon, timer, cron, a person); `status`.

One JSON file (`config.state_file`, default `backup_dir/.state/jobs.json`) holds, per job, the last
start, end, result, size, files, error and runner, and the last time a schedule triggered it (what
systemd keeps in a timer's stamp file, used for `persistent`). Every change is a read-modify-write under
an exclusive `flock` on a sibling `.lock` file, and the new file is written atomically (temp, fsync,
rename), so the daemon and a timer or cron run never lose each other's updates and a crash never leaves
half a file. A file that cannot be read as state is moved aside and a fresh one started, with a warning.
The daemon also leaves `daemon.json` (its pid) beside it, so `status` can say whether it runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kkua_backupd import schedule
from kkua_backupd.errors import KkuaError, Refused, StorageError
from kkua_backupd.obs import logs
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.safefs import FILE_MODE, open_file, open_folder, read_small
from kkua_backupd.sources import JOBS
from kkua_backupd.store import lock
from kkua_backupd.store.kinds import FUTURE_TOLERANCE, KINDS, MANIFEST_SUFFIX

if TYPE_CHECKING:  # `status` reads the state without pydantic (core/status_cache.py)
    from kkua_backupd.config import Config
    from kkua_backupd.core.status_cache import StatusSettings

STATE_VERSION = 1
DAEMON_FILE = "daemon.json"
FOLDER_MODE = 0o750
# The fields of one run; a refused run (lock held) puts back what was there before it.
RUN_KEYS = ("last_start", "last_end", "last_result", "error", "size", "files", "detail", "runner", "pid")


def now() -> dt.datetime:
    """The current time, aware, in the local zone (what state and status show)."""
    return dt.datetime.now().astimezone()


def iso(when: dt.datetime | None) -> str | None:
    """ISO 8601 with the UTC offset, to the second; None stays None."""
    return when.isoformat(timespec="seconds") if when is not None else None


def parse_iso(text: object) -> dt.datetime | None:
    """A datetime from our ISO text, or None when absent or unreadable."""
    if not isinstance(text, str):
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.astimezone()


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _empty() -> dict[str, Any]:
    return {"version": STATE_VERSION, "jobs": {}}


def _parse(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
        raise ValueError("not a state document (no 'jobs' object)")
    if any(not isinstance(v, dict) for v in data["jobs"].values()):
        raise ValueError("a job entry is not an object")
    return data


def _read(path: Path, *, repair: bool) -> dict[str, Any]:
    """The state in `path` (empty when missing). A corrupt file is moved aside when `repair` (the caller
    holds the lock), else only reported; raises StorageError when the file cannot be read at all."""
    try:
        raw = read_small(path, root=path.parent)  # never through a symlink (Refused, exit 3)
    except FileNotFoundError:
        return _empty()
    except OSError as exc:
        raise StorageError(f"cannot read state file {path}: {exc.strerror}",
                           hint="check the owner and mode of the state folder") from None
    try:
        return _parse(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log = get_logger()
        if not repair:
            log.warning("state file is corrupt; showing no last runs until the next run replaces it",
                        file=str(path), reason=str(exc))
            return _empty()
        aside = path.with_name(f"{path.name}.corrupt-{now().strftime('%Y%m%d_%H%M%S')}")
        try:
            os.rename(path, aside)
        except OSError as err:
            raise StorageError(f"state file {path} is corrupt ({exc}) and cannot be moved aside: {err.strerror}",
                               hint="move it away by hand") from None
        log.warning("state file was corrupt; kept it aside and started a fresh one",
                    file=str(path), kept_as=str(aside), reason=str(exc))
        return _empty()


@contextlib.contextmanager
def update(config: Config) -> Iterator[dict[str, Any]]:
    """Read the state under the exclusive lock, let the caller change it, write it back atomically.
    Raises StorageError when the folder, the lock or the file cannot be used."""
    path = config.state_file
    try:
        fd = open_file(_lock_path(path), os.O_RDWR | os.O_CREAT, FILE_MODE, root=path.parent)  # folders made 0750
    except OSError as exc:
        raise StorageError(f"cannot use the state folder {path.parent}: {exc.strerror}",
                           hint="check that it is writable by the backup user") from None
    try:
        # Blocking: every holder only reads and rewrites a small file, so waits are milliseconds.
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = _read(path, repair=True)
        yield data
        # A writer killed between creating and renaming its temp file left it behind; it is ours
        # (we hold the lock) and would make the exclusive create fail.
        _remove_partial(path)
        from kkua_backupd.stream.pipeline import write_atomic  # writers only: `status` just reads
        write_atomic(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _remove_partial(path: Path) -> None:
    """Remove `path.partial` left by a writer killed before its rename (the folder is made if missing)."""
    fd = open_folder(path.parent, create=True, root=path.parent)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name + ".partial", dir_fd=fd)  # unlink never follows a symlink
    finally:
        os.close(fd)


def load(config: StatusSettings) -> dict[str, Any]:
    """The state as it is now (no lock needed: the file is only ever replaced by a rename)."""
    return _read(config.state_file, repair=False)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie is not running anything
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def error_line(exc: BaseException) -> str:
    """The one line, secrets masked, that a failed run records (and its failure notice says)."""
    return _error_line(exc)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, KkuaError):
        text = str(exc).splitlines()[0]
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted (Ctrl-C)"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return logs.sink().mask(text)  # the state file is read by `status`: no secret in it either


class RunRecord:
    """One run of a job in progress; `finish` gives what it produced (written when the run ends)."""

    def __init__(self, config: Config, job: str, runner: str) -> None:
        self.config = config
        self.job = job
        self.runner = runner
        self.started = now()
        self.pid = os.getpid()
        self.size: int | None = None
        self.files: list[str] | None = None
        self.detail: str | None = None
        self.previous: dict[str, Any] = {}

    def finish(self, size: int | None = None, files: list[str] | None = None, detail: str | None = None) -> None:
        """What the run produced: total size in bytes, file names, a short detail for `status`."""
        self.size = size
        self.files = files
        self.detail = detail

    def _mine(self, entry: dict[str, Any]) -> bool:
        return bool(entry.get("pid") == self.pid and entry.get("last_start") == iso(self.started))


def _safely(what: str, job: str, action: Any) -> None:
    """Record something in the state; a state that cannot be written must not fail the job itself."""
    try:
        action()
    except (StorageError, OSError) as exc:
        get_logger(job=job).warning(f"cannot record the {what} in the state file; `status` will not show it",
                                    reason=str(exc))


@contextlib.contextmanager
def track(config: Config, job: str, *, runner: str) -> Iterator[RunRecord]:
    """Record a run of `job`: its start now, its end and result when the block ends (an exception marks it
    failed with its one-line message and is re-raised). A refused run (lock held) leaves the holder's
    record alone and is noted as `last_refused`."""
    record = RunRecord(config, job, runner)

    def start() -> None:
        with update(config) as data:
            entry = data["jobs"].setdefault(job, {})
            record.previous = {k: entry.get(k) for k in RUN_KEYS}
            entry.update(last_start=iso(record.started), last_end=None, last_result="running", error=None,
                         size=None, files=None, detail=None, runner=runner, pid=record.pid)

    def end(result: str, error: str | None) -> None:
        with update(config) as data:
            entry = data["jobs"].setdefault(job, {})
            entry.update(last_start=iso(record.started), last_end=iso(now()), last_result=result, error=error,
                         size=record.size, files=record.files, detail=record.detail, runner=runner,
                         pid=record.pid)

    def refused(reason: str) -> None:
        with update(config) as data:
            entry = data["jobs"].setdefault(job, {})
            if record._mine(entry):
                entry.update(record.previous)
            entry["last_refused"] = {"at": iso(now()), "reason": reason, "runner": runner}

    _safely("start of the run", job, start)
    try:
        yield record
    except Refused as exc:
        reason = _error_line(exc)
        _safely("refusal", job, lambda: refused(reason))
        raise
    except BaseException as exc:
        reason = _error_line(exc)
        _safely("failed run", job, lambda: end("failed", reason))
        raise
    _safely("end of the run", job, lambda: end("ok", None))


def record_trigger(config: Config, job: str, when: dt.datetime) -> None:
    """Note that a schedule triggered `job` at `when` (what `persistent` catches up from)."""
    with update(config) as data:
        data["jobs"].setdefault(job, {})["last_trigger"] = iso(when)


def last_trigger(data: dict[str, Any], job: str) -> dt.datetime | None:
    """When a schedule last triggered `job`, from a loaded state."""
    entry = data["jobs"].get(job, {})
    return parse_iso(entry.get("last_trigger"))


def mark_ended(config: Config, job: str, *, pid: int, error: str, override: bool = False) -> bool:
    """Close the record of run `pid` that ended without writing its own end (killed): failed with
    `error`; with `override` (the daemon stopped it for a reason the run could not know, a timeout)
    also replace the error it wrote itself. Returns whether the record was changed."""
    with update(config) as data:
        entry = data["jobs"].get(job)
        if not entry or entry.get("pid") != pid:
            return False
        if entry.get("last_result") == "running":
            entry.update(last_end=iso(now()), last_result="failed", error=error)
        elif override and entry.get("last_result") == "failed":
            entry["error"] = error
        else:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# the daemon's presence


def daemon_path(config: StatusSettings) -> Path:
    """Where the running daemon leaves its pid."""
    return config.state_file.parent / DAEMON_FILE


def write_daemon_info(config: Config, info: dict[str, Any]) -> None:
    """Record that this daemon runs (pid, start time, config); raises StorageError."""
    path = daemon_path(config)
    try:
        _remove_partial(path)
    except OSError as exc:
        raise StorageError(f"cannot use the state folder {path.parent}: {exc.strerror}",
                           hint="check that it is writable by the backup user") from None
    from kkua_backupd.stream.pipeline import write_atomic
    write_atomic(path, (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8"))


def clear_daemon_info(config: Config, pid: int) -> None:
    """Remove the daemon's pid file if it is still this daemon's."""
    info = _daemon_file(config)
    if info.get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            daemon_path(config).unlink()


def _daemon_file(config: StatusSettings) -> dict[str, Any]:
    try:
        data = json.loads(read_small(daemon_path(config), root=config.state_file.parent).decode("utf-8"))
    except (OSError, ValueError, KkuaError):
        return {}
    return data if isinstance(data, dict) else {}


def daemon_status(config: StatusSettings) -> dict[str, Any]:
    """Whether the daemon runs: its pid file names a live process (a dead pid means it does not)."""
    info = _daemon_file(config)
    pid = info.get("pid")
    running = _pid_alive(pid)
    return {"running": running, "pid": pid if running else None,
            "since": info.get("started") if running else None,
            "config": info.get("config") if running else None}


# ---------------------------------------------------------------------------------------------
# copies on the remotes


def record_push(config: Config, remote: str, *, sent: list[str], pending: list[str], error: str | None,  # noqa: PLR0913 - keyword-only facts of one push
                complete: bool) -> None:
    """Note a push to `remote`: the sets `sent`, those still `pending` (each keeps the time it first became
    pending), the error if it failed. `complete` means the remote was listed and everything wanted is
    there, so nothing else is pending. A state that cannot be written is a warning, not a failure."""
    def change() -> None:
        with update(config) as data:
            entry = data.setdefault("remotes", {}).setdefault(remote, {})
            before = _dict(entry.get("pending"))
            stamp = iso(now())
            still = {key: before.get(key, stamp) for key in pending}
            if not complete:  # the remote could not say what it holds: what was pending stays pending
                still.update({k: v for k, v in before.items() if k not in sent})
            entry["pending"] = dict(sorted(still.items()))
            entry["last_attempt"] = stamp
            entry["last_error"] = _mask(error) if error else None
            if error is None:
                entry["last_success"] = stamp
                entry["failures"] = 0
            else:
                entry["failures"] = int(entry.get("failures") or 0) + 1
            if sent:
                entry["last_sent"] = sent[-1]
    _safely(f"push to remote {remote}", "push", change)


def mark_pending(config: Config, remote: str, sets: list[str]) -> None:
    """Note `sets` as pending on `remote` before their upload starts, so a push killed midway leaves them
    pending in `status` (each keeps the time it first became pending)."""
    def change() -> None:
        with update(config) as data:
            entry = data.setdefault("remotes", {}).setdefault(remote, {})
            before = _dict(entry.get("pending"))
            stamp = iso(now())
            entry["pending"] = dict(sorted({**{key: stamp for key in sets}, **before}.items()))
    _safely(f"pending upload to remote {remote}", "push", change)


def _mask(text: str) -> str:
    return logs.sink().mask(text)


def remote_status(config: StatusSettings, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per configured remote: where it is, what is pending since when, the last attempt, success and error."""
    data = data if data is not None else load(config)
    recorded = _dict(data.get("remotes"))
    report: dict[str, Any] = {}
    for remote in config.remote:
        entry = _dict(recorded.get(remote.name))
        pending = _dict(entry.get("pending"))
        report[remote.name] = {
            "url": remote.url, "pending": [{"set": k, "since": v} for k, v in sorted(pending.items())],
            "pending_since": min(pending.values()) if pending else None, "last_attempt": entry.get("last_attempt"),
            "last_success": entry.get("last_success"), "last_error": entry.get("last_error"),
            "failures": entry.get("failures") or 0}
    return report


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def pending_uploads(config: Config) -> dict[str, list[str]]:
    """The sets still to be copied, per remote (what the daemon retries)."""
    return {name: [p["set"] for p in doc["pending"]] for name, doc in remote_status(config).items() if doc["pending"]}


# ---------------------------------------------------------------------------------------------
# schedules and status


def schedule_of(config: StatusSettings, job: str) -> str:
    """The OnCalendar expression of `job`."""
    value: str = getattr(config.schedule, job)
    return value


def planned_run(config: StatusSettings, job: str, after: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """The next elapse of `job`'s schedule strictly after `after`, and when it runs once the randomized
    delay is added (the same for the daemon and `status`); None when the schedule never elapses again."""
    elapse = schedule.next_elapse(schedule_of(config, job), after, timezone=config.schedule.timezone)
    if elapse is None:
        return None
    delay = config.schedule.randomized_delay
    return elapse, (schedule.randomized(elapse, delay, job) if delay else elapse)


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def maybe_future_sets(backup_dir: Path) -> bool:
    """Whether a set in `backup_dir` may be dated in the future, read without the manifest model (pydantic):
    True when a manifest's `created_at` is later than now plus FUTURE_TOLERANCE, or when a manifest cannot
    be read this way; `status` then lists the sets as `list` does (store.storage.list_sets) to say which."""
    limit = dt.datetime.now().astimezone() + FUTURE_TOLERANCE
    for kind in KINDS:
        folder = backup_dir / kind
        if not folder.is_dir():
            continue
        for path in folder.glob(f"*{MANIFEST_SUFFIX}"):
            try:
                created = dt.datetime.fromisoformat(json.loads(read_small(path, root=folder))["created_at"])
            except (OSError, KkuaError, ValueError, KeyError, TypeError):
                return True
            if (created if created.tzinfo is not None else created.astimezone()) > limit:
                return True
    return False


def status_report(config: StatusSettings) -> dict[str, Any]:
    """Per job: schedule, next run, last start/end/result/size, whether it runs now; and the daemon."""
    data = load(config)
    moment = now()
    jobs: dict[str, Any] = {}
    for job in JOBS:
        entry: dict[str, Any] = data["jobs"].get(job, {})
        expr = schedule_of(config, job)
        next_run: str | None = None
        schedule_error: str | None = None
        try:
            planned = planned_run(config, job, moment)
            next_run = iso(planned[1]) if planned else None
        except (KkuaError, ValueError) as exc:
            schedule_error = str(exc)
        holder = lock.holder_of(config.backup_dir, job)
        result = entry.get("last_result")
        error = entry.get("error")
        if result == "running" and holder is None and not _pid_alive(entry.get("pid")):
            result = "failed"
            error = error or "the run ended without recording a result (killed?)"
        doc: dict[str, Any] = {
            "schedule": expr, "next_run": next_run, "last_run": entry.get("last_start"),
            "last_end": entry.get("last_end"), "last_result": result, "error": error,
            "size": _size(entry.get("size")), "files": entry.get("files"), "detail": entry.get("detail"),
            "runner": entry.get("runner"), "last_trigger": entry.get("last_trigger"),
            "running": holder is not None or result == "running", "holder": holder,
        }
        if schedule_error:
            doc["schedule_error"] = schedule_error
        if entry.get("last_refused"):
            doc["last_refused"] = entry["last_refused"]
        jobs[job] = doc
    return {"daemon": daemon_status(config), "state_file": str(config.state_file), "jobs": jobs,
            "remotes": remote_status(config, data)}


def _short(text: str | None) -> str:
    when = parse_iso(text)
    return when.strftime("%Y-%m-%d %H:%M:%S %z") if when else "-"


def until(when: dt.datetime, moment: dt.datetime) -> str:
    """A rough distance such as `5h`, `12m`, `2d 3h`, `now`."""
    seconds = int((when - moment).total_seconds())
    if seconds <= 0:
        return "now"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours}h" if hours >= 10 or not minutes else f"{hours}h {minutes}m"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def format_status(report: dict[str, Any]) -> list[str]:
    """Lines for a person: the daemon, then one block per job."""
    daemon = report["daemon"]
    lines = [f"daemon: running (pid {daemon['pid']}, since {_short(daemon['since'])})" if daemon["running"]
             else "daemon: not running (jobs run from systemd timers, cron or by hand)"]
    moment = now()
    for job, doc in report["jobs"].items():
        next_when = parse_iso(doc.get("next_run"))
        next_text = (f"{_short(doc['next_run'])} (in {until(next_when, moment)})" if next_when
                     else doc.get("schedule_error") or "never")
        result = doc.get("last_result") or "never run"
        if doc.get("running"):
            holder = doc.get("holder") or {}
            result = (f"running now (pid {holder.get('pid', '?')}, {holder.get('purpose', '?')})" if holder
                      else "running now")
        elif doc.get("error"):
            result = f"{result}: {doc['error']}"
        size = f", {human_bytes(doc['size'])}" if doc.get("size") is not None else ""
        lines.append(f"{job}:")
        lines.append(f"  schedule  {doc['schedule']}")
        lines.append(f"  next run  {next_text}")
        lines.append(f"  last run  {_short(doc.get('last_run'))} -> {_short(doc.get('last_end'))}"
                     + (f" ({doc['runner']})" if doc.get("runner") else ""))
        lines.append(f"  result    {result}{size}" + (f" ({doc['detail']})" if doc.get("detail") else ""))
        if doc.get("last_refused"):
            lines.append(f"  refused   {_short(doc['last_refused'].get('at'))}: {doc['last_refused'].get('reason')}")
    for name, doc in report.get("remotes", {}).items():
        lines.append(f"remote {name} ({doc['url']}):")
        if doc["pending"]:
            sets = ", ".join(p["set"] for p in doc["pending"][:3]) + (", ..." if len(doc["pending"]) > 3 else "")
            lines.append(f"  pending   {len(doc['pending'])} set(s) since {_short(doc['pending_since'])}: {sets}")
        else:
            lines.append("  pending   nothing" if doc["last_success"] else "  pending   not pushed yet")
        lines.append(f"  last push {_short(doc['last_attempt'])}"
                     + (f" failed: {doc['last_error']}" if doc["last_error"] else " ok" if doc["last_attempt"] else ""))
    return lines
