"""`kkua-backupd`: the scheduling daemon (systemd `Type=notify`).

One thread does everything: it sleeps in a single `select` on the signal wake-up pipe until the next
thing is due (a job's time, a retry, a timeout, the watchdog ping), so an idle daemon wakes only for the
watchdog and the next job. Jobs run as subprocess workers (`workers.spawn`), each in its own process
group, with `daemon.job_timeout`, retries with doubling backoff, and never two runs of one job at once.
READY=1 is sent once the config is valid, the state is loaded and the loop is about to run; WATCHDOG=1
comes from the loop itself, so a hung loop stops pinging and systemd kills and restarts it. SIGHUP
reloads (RELOADING=1 ... READY=1), keeping the old config when the new one is invalid. SIGTERM: no new
jobs, workers get `daemon.stop_grace` then SIGKILL, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import select
import signal
import sys
import threading
import time
import traceback
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from kkua_backupd import __version__, schedule
from kkua_backupd.config import Config, LoadedConfig, load_config, secrets_of, split_listen
from kkua_backupd.core import observe, state
from kkua_backupd.core.remotes import UPLOAD_PENDING
from kkua_backupd.daemon.notify import Notifier, watchdog_interval
from kkua_backupd.errors import ConfigError, KkuaError
from kkua_backupd.obs import logs
from kkua_backupd.obs.metrics import MetricsServer
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.proc.workers import Worker, spawn
from kkua_backupd.safefs import set_trusted_roots
from kkua_backupd.sources import JOBS

# Exit statuses of a worker that another attempt would not change: bad config (2), refused (3).
NOT_RETRIED = {2: "the configuration is invalid", 3: "refused (another run holds the lock, or a check refused it)"}
# Even with nothing due, look at the wall clock this often, so a clock step (NTP, suspend) is noticed.
MAX_SLEEP = 3600.0
TEST_HOOKS_ENV = "KKUA_BACKUPD_TEST_HOOKS"  # tests only: SIGUSR2 then hangs the loop (watchdog test)


@dataclass
class Slot:
    """One job's place in the scheduler: when it runs next, and its worker and retries."""

    job: str
    elapse: dt.datetime | None = None  # the schedule's next elapse
    due: dt.datetime | None = None  # when it runs (elapse plus the randomized delay)
    worker: Worker | None = None
    attempt: int = 0  # attempts made for the current trigger
    retry_at: float | None = None  # monotonic
    push_only: bool = False  # the running retry only pushes the set the job made (core/remotes.py)
    deadline: float | None = None  # monotonic: job_timeout
    kill_at: float | None = None  # monotonic: end of stop_grace after SIGTERM
    timed_out: bool = False
    started_wall: dt.datetime | None = None


def _tz(config: Config) -> dt.tzinfo | None:
    if config.schedule.timezone:
        with contextlib.suppress(zoneinfo.ZoneInfoNotFoundError, ValueError):
            return zoneinfo.ZoneInfo(config.schedule.timezone)
    return None


def clock(when: dt.datetime, moment: dt.datetime, tz: dt.tzinfo | None) -> str:
    """A short wall-clock time: `02:00`, `02:00:05`, `Sun 04:00` when more than a day away."""
    local = when.astimezone(tz)
    text = local.strftime("%H:%M:%S" if local.second else "%H:%M")
    if (when - moment).total_seconds() >= 86400:
        text = local.strftime("%a ") + text
    return text


def validate(config: Config) -> None:
    """Check every job's schedule; raises ConfigError naming each bad one."""
    problems = []
    for job in JOBS:
        expr = state.schedule_of(config, job)
        try:
            schedule.validate(expr, timezone=config.schedule.timezone)
        except (KkuaError, ValueError) as exc:
            problems.append(f"schedule.{job}: {exc}")
    if problems:
        raise ConfigError("invalid schedule", problems=problems)


def names_a_job(loaded: LoadedConfig) -> None:
    """Raise ConfigError when the config names no server to back up: an empty or missing file, or one without
    a [postgres] or [redis] section (nor DATABASE_*/REDIS_* settings). Every key has a default, so such a
    file is valid, but at a reload it is far more likely a mistake (a truncated or wrong file) than a wish
    to back up localhost's servers into /var/backups/kkua."""
    named = any(key == kind or key.startswith(f"{kind}.") for key in loaded.sources for kind in ("postgres", "redis"))
    if not named:
        where = str(loaded.path) if loaded.path else "no config file (it is missing)"
        raise ConfigError(f"the new configuration ({where}) names no job to run: it has no [postgres] or [redis] "
                          "section", hint="fix the file and reload again")


class Daemon:
    """The scheduler loop and its jobs."""

    def __init__(self, config_arg: str | None, loaded: LoadedConfig, notifier: Notifier) -> None:
        self.config_arg = config_arg
        self.loaded = loaded
        self.notifier = notifier
        self.log = logs.get_logger()
        self.slots = {job: Slot(job) for job in JOBS}
        self.stopping = False
        self.watchdog = watchdog_interval()
        self.next_ping = time.monotonic()
        self.last_status = ""
        self.last_runs: dict[str, Any] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def config_path(self) -> Path | None:
        return self.loaded.path

    # ------------------------------------------------------------------ signals

    def install_signals(self) -> None:
        """Every signal we care about only writes its number to the wake-up pipe; the loop acts on it."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD]
        if self._test_hooks:
            handled.append(signal.SIGUSR2)
        for sig in handled:
            signal.signal(sig, _noop)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or `timeout` seconds pass, then act on the signals received."""
        ready, _, _ = select.select([self._wake_r], [], [], max(timeout, 0.0))
        if not ready:
            return
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for number in data:
            if number in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(signal.Signals(number).name)
            elif number == signal.SIGHUP:
                self.reload()
            elif number == signal.SIGUSR2 and self._test_hooks:
                self.log.warning("test hook: the main loop hangs now (no more watchdog pings)")
                threading.Event().wait()

    # ------------------------------------------------------------------ start, reload, stop

    def start(self) -> None:
        """Load the state (repairing a corrupt one), plan every job, catch up missed runs; raises
        StorageError when the state folder cannot be used."""
        moment = state.now()
        with state.update(self.config) as data:
            for job in JOBS:
                # Where `persistent` counts missed runs from when a job never ran: the first start.
                data["jobs"].setdefault(job, {}).setdefault("schedule_since", state.iso(moment))
            snapshot = {job: dict(entry) for job, entry in data["jobs"].items()}
        state.write_daemon_info(self.config, {"pid": os.getpid(), "started": state.iso(moment),
                                              "config": str(self.config_path) if self.config_path else None,
                                              "version": __version__})
        self._read_last_runs()
        for job, slot in self.slots.items():
            entry = snapshot.get(job, {})
            reference = state.parse_iso(entry.get("last_trigger")) or state.parse_iso(entry.get("schedule_since"))
            missed = None
            if self.config.schedule.persistent and reference is not None:
                missed = state.planned_run(self.config, job, reference)
            if missed is not None and missed[0] <= moment:
                self.log.info("job missed while the daemon was not running; running it now", job=job,
                              missed=state.iso(missed[0]), last_trigger=state.iso(reference))
                self._trigger(slot, moment)
            else:
                self._plan(slot, moment)

    def reload(self) -> None:
        """Re-read the config; on any problem keep the running one and say why."""
        self.notifier.reloading()
        self.log.info("reloading the configuration", config=str(self.config_path or self.config_arg or ""))
        try:
            loaded = load_config(self.config_arg)
            validate(loaded.config)
            names_a_job(loaded)
        except ConfigError as exc:
            self.log.error(f"reload failed; keeping the running configuration: {exc.message}",
                           problems=len(exc.problems))
            for problem in exc.problems:
                self.log.error(problem)
        except KkuaError as exc:
            self.log.error(f"reload failed; keeping the running configuration: {exc}")
        else:
            self.loaded = loaded
            set_trusted_roots(*loaded.config.trusted_folders)
            moment = state.now()
            for slot in self.slots.values():
                self._plan(slot, moment)
            self.log.info("reload ok", config=str(loaded.path or ""), next_runs=self._next_runs_text())
        self.last_status = self.status_text()
        self.notifier.ready(self.last_status)

    def begin_stop(self, why: str) -> None:
        """No new jobs; SIGTERM every worker, whose stop_grace starts now."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping()
        running = [s for s in self.slots.values() if s.worker is not None]
        self.log.info("stopping", signal=why, waiting_for=",".join(s.job for s in running) or None,
                      grace_s=self.config.daemon.stop_grace if running else None)
        now_m = time.monotonic()
        for slot in self.slots.values():
            slot.retry_at = None
            if slot.worker is not None:
                slot.worker.terminate()
                slot.kill_at = now_m + self.config.daemon.stop_grace

    # ------------------------------------------------------------------ scheduling

    def _plan(self, slot: Slot, after: dt.datetime) -> None:
        try:
            planned = state.planned_run(self.config, slot.job, after)
        except (KkuaError, ValueError) as exc:  # validated before, so only a bug or an exotic zone
            self.log.error("cannot compute the next run; the job will not run", job=slot.job, error=str(exc))
            planned = None
        slot.elapse, slot.due = planned if planned else (None, None)

    def _trigger(self, slot: Slot, moment: dt.datetime) -> None:
        """The schedule says run: start the job, unless its previous run still goes on."""
        try:
            state.record_trigger(self.config, slot.job, moment)
        except KkuaError as exc:
            self.log.error("cannot record the trigger in the state file", job=slot.job, error=str(exc))
        if slot.worker is not None:
            self.log.warning("job skipped: its previous run is still going on", job=slot.job,
                             running_since=state.iso(slot.started_wall), pid=slot.worker.pid)
        else:
            slot.attempt = 0
            slot.retry_at = None
            self._start(slot)
        # Strictly after both the elapse and now: elapses missed while busy are not run twice.
        base = max(slot.elapse, moment) if slot.elapse is not None else moment
        self._plan(slot, base)
        if slot.due is not None:
            self.log.info("next run", job=slot.job, at=state.iso(slot.due))

    def _start(self, slot: Slot) -> None:
        slot.attempt += 1
        slot.timed_out = False
        slot.kill_at = None
        # A backup whose set is ok locally and only failed to reach a remote is retried as a push: another
        # backup would only add a set to the pile waiting for the same remote.
        push_only = slot.attempt > 1 and self.last_runs.get(slot.job, {}).get("detail") == UPLOAD_PENDING
        slot.push_only = push_only
        try:
            slot.worker = spawn("" if push_only else slot.job, self.config_path, runner="daemon",
                                command="push" if push_only else "run")
        except KkuaError as exc:
            self.log.error("job failed to start", job=slot.job, error=str(exc))
            self._after_failure(slot, str(exc))
            return
        slot.started_wall = state.now()
        slot.deadline = time.monotonic() + self.config.daemon.job_timeout
        self.log.info("job started", job=slot.job, pid=slot.worker.pid,
                      push_only=True if push_only else None,
                      attempt=slot.attempt if slot.attempt > 1 else None)

    def _after_failure(self, slot: Slot, reason: str) -> None:
        if self.stopping:
            return
        retries = self.config.daemon.retries
        if slot.attempt <= retries:
            delay = self.config.daemon.retry_backoff * 2 ** (slot.attempt - 1)
            slot.retry_at = time.monotonic() + delay
            self.log.warning("job will be retried", job=slot.job, attempt=slot.attempt + 1,
                             of=retries + 1, in_s=delay, reason=reason)
        else:
            self.log.error("job failed; no retries left, waiting for its next scheduled time", job=slot.job,
                           attempts=slot.attempt, reason=reason)

    def _reap(self, slot: Slot) -> None:
        worker = slot.worker
        if worker is None:
            return
        rc = worker.poll()
        if rc is None:
            return
        slot.worker = None
        slot.deadline = slot.kill_at = None
        seconds = round(time.monotonic() - worker.started, 1)
        if slot.timed_out:
            reason = f"timed out after {self.config.daemon.job_timeout} s (daemon.job_timeout) and was stopped"
        elif rc < 0:
            reason = f"worker was killed by signal {signal.Signals(-rc).name}"
        else:
            reason = f"worker exited with status {rc}"
        if rc != 0:
            try:  # a killed worker could not write its own end
                state.mark_ended(self.config, slot.job, pid=worker.pid, error=reason, override=slot.timed_out)
                if rc < 0 or slot.timed_out:  # nor, maybe, tell its failure
                    observe.report_killed(self.config, slot.job, error=reason, log_tail=[],
                                          details={"runner": "daemon", "seconds": seconds})
            except KkuaError as exc:
                self.log.error("cannot record the end of the run in the state file", job=slot.job, error=str(exc))
        self._read_last_runs()
        if rc == 0:
            entry = self.last_runs.get(slot.job, {})
            size = entry.get("size")
            if slot.push_only:
                self.log.info("pending uploads sent; the job's set is on every remote now", job=slot.job,
                              seconds=seconds)
                return
            self.log.info("job ended", job=slot.job, result="ok", seconds=seconds,
                          size=human_bytes(size) if isinstance(size, int) else None)
        elif self.stopping:
            self.log.warning("job stopped for shutdown", job=slot.job, exit_code=rc, seconds=seconds)
        elif rc in NOT_RETRIED and not slot.timed_out:
            self.log.warning(f"job skipped: {NOT_RETRIED[rc]}; not retried", job=slot.job, exit_code=rc,
                             error=self.last_runs.get(slot.job, {}).get("error"))
        else:
            self.log.error("job failed", job=slot.job, exit_code=rc, seconds=seconds, reason=reason,
                           error=self.last_runs.get(slot.job, {}).get("error"))
            self._after_failure(slot, reason)

    def _enforce(self, slot: Slot, now_m: float) -> None:
        worker = slot.worker
        if worker is None:
            return
        if slot.kill_at is not None and now_m >= slot.kill_at:
            self.log.warning("job did not stop within the grace period; killing its processes", job=slot.job,
                             pid=worker.pid, grace_s=self.config.daemon.stop_grace)
            worker.kill()
            slot.kill_at = None
        elif slot.deadline is not None and now_m >= slot.deadline and not slot.timed_out and slot.kill_at is None:
            self.log.error("job timed out; stopping it", job=slot.job, pid=worker.pid,
                           timeout_s=self.config.daemon.job_timeout,
                           hint="raise daemon.job_timeout or find what makes the job slow")
            slot.timed_out = True
            worker.terminate()
            slot.kill_at = now_m + self.config.daemon.stop_grace

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """The loop; returns the exit status once stopped (0) after its workers ended."""
        while True:
            now_m = time.monotonic()
            for slot in self.slots.values():
                self._reap(slot)
            if self.stopping and all(s.worker is None for s in self.slots.values()):
                break
            if not self.stopping:
                moment = state.now()
                for slot in self.slots.values():
                    if slot.due is not None and slot.due <= moment:
                        self._trigger(slot, moment)
                    elif slot.retry_at is not None and now_m >= slot.retry_at and slot.worker is None:
                        slot.retry_at = None
                        self._start(slot)
            for slot in self.slots.values():
                self._enforce(slot, now_m)
            now_m = time.monotonic()
            if self.watchdog is not None and now_m >= self.next_ping:
                self.notifier.watchdog()
                self.next_ping = now_m + self.watchdog
            text = self.status_text()
            if text != self.last_status:
                self.notifier.status(text)
                self.last_status = text
            self._wait(self._sleep_for())
        self.log.info("stopped")
        return 0

    def _sleep_for(self) -> float:
        """Seconds until the next thing is due (a job, retry, timeout, grace end, watchdog ping)."""
        now_m = time.monotonic()
        moment = state.now()
        waits = [MAX_SLEEP]
        if self.watchdog is not None:
            waits.append(self.next_ping - now_m)
        for slot in self.slots.values():
            if slot.due is not None and not self.stopping:
                # +1 ms: never wake a hair early and spin once more
                waits.append((slot.due - moment).total_seconds() + 0.001)
            for at in (slot.retry_at, slot.deadline, slot.kill_at):
                if at is not None:
                    waits.append(at - now_m)
        return max(min(waits), 0.0)

    # ------------------------------------------------------------------ status

    def _read_last_runs(self) -> None:
        try:
            self.last_runs = state.load(self.config)["jobs"]
        except KkuaError as exc:
            self.log.warning("cannot read the state file", error=str(exc))

    def _next_runs_text(self) -> str:
        return ",".join(f"{s.job}@{state.iso(s.due)}" for s in self.slots.values() if s.due is not None)

    def status_text(self) -> str:
        """What systemctl status shows: what runs, the next job, the last result."""
        moment = state.now()
        tz = _tz(self.config)
        running = [s for s in self.slots.values() if s.worker is not None]
        parts = []
        if self.stopping:
            parts.append("stopping" + (f"; waiting for {', '.join(s.job for s in running)}" if running else ""))
        elif running:
            parts.append("running " + ", ".join(
                f"{s.job} (since {s.started_wall.astimezone(tz).strftime('%H:%M:%S') if s.started_wall else '?'}"
                + (f", attempt {s.attempt}" if s.attempt > 1 else "") + ")" for s in running))
        else:
            parts.append("idle")
        retrying = [s for s in self.slots.values() if s.retry_at is not None and s.worker is None]
        for s in retrying:
            assert s.retry_at is not None
            at = moment + dt.timedelta(seconds=s.retry_at - time.monotonic())
            parts.append(f"retry {s.job} {_in(at, moment)}")
        upcoming = sorted((s for s in self.slots.values() if s.due is not None and s.worker is None),
                          key=lambda s: s.due or moment)
        if upcoming and not self.stopping:
            first = upcoming[0]
            assert first.due is not None
            parts.append(f"next {first.job} {clock(first.due, moment, tz)} ({_in(first.due, moment)})")
        last = max(((job, e) for job, e in self.last_runs.items() if state.parse_iso(e.get("last_end"))),
                   key=lambda item: state.parse_iso(item[1].get("last_end")) or moment, default=None)
        if last is not None:
            job, entry = last
            ended = state.parse_iso(entry.get("last_end"))
            assert ended is not None
            text = f"last {job} {entry.get('last_result')} {ended.astimezone(tz).strftime('%H:%M:%S')}"
            if isinstance(entry.get("size"), int) and entry.get("last_result") == "ok":
                text += f", {human_bytes(entry['size'])}"
            parts.append(text)
        return "; ".join(parts)


def _in(when: dt.datetime, moment: dt.datetime) -> str:
    distance = state.until(when, moment)
    return distance if distance == "now" else f"in {distance}"


def _noop(signum: int, frame: FrameType | None) -> None:
    """Signals are handled through the wake-up pipe; this handler only makes Python write to it."""


def build_parser() -> argparse.ArgumentParser:
    """`kkua-backupd [--config PATH] [-v]`."""
    parser = argparse.ArgumentParser(
        prog="kkua-backupd",
        description="Run the backup jobs on their schedules (systemd Type=notify service). "
                    "SIGHUP reloads the config; SIGTERM stops after the running jobs' grace period.")
    parser.add_argument("--config", metavar="PATH", help="config file (default: $KKUA_BACKUP_CONFIG or "
                                                         "/etc/kkua-backup/config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log debug lines")
    parser.add_argument("--version", action="version", version=f"kkua-backupd {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 after a clean stop, 2 for an invalid config, 1 when it cannot run."""
    args = build_parser().parse_args(argv)
    sink = logs.setup(verbose=args.verbose)
    log = logs.get_logger()
    notifier = Notifier()
    try:
        loaded = load_config(args.config)
        validate(loaded.config)
    except ConfigError as exc:
        log.error(f"{exc.message}; not starting", exit_code=2, hint=exc.hint)
        for problem in exc.problems:
            log.error(problem)
        notifier.status(f"not started: {exc.message}")
        return 2
    except KkuaError as exc:
        log.error(f"{exc}; not starting", exit_code=exc.exit_code)
        return exc.exit_code
    set_trusted_roots(*loaded.config.trusted_folders)
    for secret in secrets_of(loaded.config):  # the daemon never logs them; a worker's error line might
        sink.add_secret(secret)
    daemon = Daemon(args.config, loaded, notifier)
    server: MetricsServer | None = None
    try:
        daemon.install_signals()
        daemon.start()
        if loaded.config.metrics.listen is not None:  # a reload does not move it: restart to change it
            host, port = split_listen(loaded.config.metrics.listen)
            server = MetricsServer(host, port, lambda: observe.job_records(daemon.config),
                                   lambda: state.remote_status(daemon.config))
            server.start()
            log.info("serving /metrics", listen=f"{host}:{port}")
        status = daemon.status_text()
        notifier.ready(status)
        daemon.last_status = status
        log.info("daemon started", pid=os.getpid(), config=str(loaded.path or "(defaults)"),
                 next_runs=daemon._next_runs_text(), watchdog_s=daemon.watchdog)
        return daemon.run()
    except KkuaError as exc:
        log.error(f"{exc}; the daemon stops", exit_code=1)
        return 1
    except Exception as exc:  # a bug: one line, the traceback at debug level, and let systemd restart us
        for line in traceback.format_exc().splitlines():
            log.debug(line)
        log.error(f"unexpected {type(exc).__name__}: {exc}; the daemon stops (this is a bug)", exit_code=1)
        for slot in daemon.slots.values():
            if slot.worker is not None:
                slot.worker.stop(daemon.config.daemon.stop_grace)
        return 1
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(OSError):
            state.clear_daemon_info(daemon.config, os.getpid())
        notifier.close()
        sink.close()


def run() -> None:
    """Console-script wrapper (`kkua-backupd`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
