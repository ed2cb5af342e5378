"""Prometheus metrics of every job, from the last runs the state file records (core/state.py).

Two ways out, one set of metrics: a text file for node_exporter's textfile collector, replaced atomically after
every job (temp file in the same folder, fsync, rename), and the daemon's optional `/metrics` endpoint, which
reads the state at each scrape and so also serves `kkua_backup_since_last_completion_seconds`. Names follow
what operators already alert on (pgbackrest_exporter's `..._since_last_completion_seconds`,
`..._last_duration_seconds`, `..._last_size_bytes`; velero's `..._last_successful_timestamp`); the alert rules
that go with them are in docs/monitoring.md.

This module takes plain data (one mapping per job), not the config: obs sits below config in the layers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kkua_backupd.errors import StorageError

# prometheus_client is imported where metrics are rendered or served: a job without [metrics] never loads it.
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

PREFIX = "kkua_backup"
# Not `job`: Prometheus sets `job` on every target (node_exporter's), and a scraped `job` would be renamed.
LABEL = "backup_job"
# The text file is read by node_exporter (user `prometheus`), not by the backup group: it holds no secret,
# so it is world-readable, unlike everything else the tool writes (docs/decisions/0013-monitoring.md).
TEXTFILE_MODE = 0o644

# (name, help, key in the job's record) of the gauges taken as they are from a job's record.
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("last_run_timestamp_seconds", "Start of the job's last run, Unix time.", "last_start"),
    ("last_end_timestamp_seconds", "End of the job's last run, Unix time.", "last_end"),
    ("last_success_timestamp_seconds", "End of the job's last successful run, Unix time.", "last_success"),
    ("last_duration_seconds", "Duration of the job's last finished run.", "last_duration"),
    ("last_size_bytes", "Bytes written by the job's last successful run (all files of the set).", "last_size"),
    ("last_rows", "Rows in the PostgreSQL backup of the last successful run.", "last_rows"),
    ("last_keys", "Keys in the Redis backup of the last successful run.", "last_keys"),
    ("last_test_restore_timestamp_seconds", "When the last test restore of this job ran, Unix time.",
     "test_restore_at"),
)


def _seconds(value: object) -> float | None:
    """Unix time of an ISO 8601 text, or the number itself; None when absent or unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        return (when if when.tzinfo else when.astimezone()).timestamp()
    return None


class JobsCollector:
    """Metric families of every job from `load()`, a mapping job -> record (the state file's entries plus
    the counters core/observe.py keeps). With `live`, also the seconds since each job's last success."""

    def __init__(self, load: Callable[[], Mapping[str, Mapping[str, Any]]], *, live: bool = False) -> None:
        self.load = load
        self.live = live

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        jobs = self.load()
        for name, help_text, key in _GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=[LABEL])
            for job, record in jobs.items():
                value = _seconds(record.get(key))
                if value is not None:
                    family.add_metric([job], value)
            yield family
        result = GaugeMetricFamily(f"{PREFIX}_last_run_success",
                                   "1 if the job's last finished run succeeded, 0 if it failed.", labels=[LABEL])
        running = GaugeMetricFamily(f"{PREFIX}_running", "1 while the job runs.", labels=[LABEL])
        test = GaugeMetricFamily(f"{PREFIX}_last_test_restore_success",
                                 "1 if the last test restore passed, 0 if it failed or could not run.", labels=[LABEL])
        for job, record in jobs.items():
            last = record.get("last_finished_result") or record.get("last_result")
            if last in ("ok", "failed"):
                result.add_metric([job], 1.0 if last == "ok" else 0.0)
            running.add_metric([job], 1.0 if record.get("last_result") == "running" else 0.0)
            if isinstance(record.get("test_restore_ok"), bool):
                test.add_metric([job], 1.0 if record["test_restore_ok"] else 0.0)
        yield from (result, running, test)
        for name, help_text, key in (("runs", "Runs of the job that finished (ok or failed).", "runs_total"),
                                     ("failures", "Runs of the job that failed.", "failures_total")):
            counter = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[LABEL])
            for job, record in jobs.items():
                count = record.get(key)
                counter.add_metric([job], float(count if isinstance(count, int) else 0))
            yield counter
        if self.live:
            since = GaugeMetricFamily(f"{PREFIX}_since_last_completion_seconds",
                                      "Seconds since the job's last successful run ended.", labels=[LABEL])
            moment = time.time()
            for job, record in jobs.items():
                value = _seconds(record.get("last_success"))
                if value is not None:
                    since.add_metric([job], max(0.0, moment - value))
            yield since


REMOTE_LABEL = "remote"


class RemotesCollector:
    """Metric families of every configured remote from `load()`, a mapping remote -> its status (what
    core/state.py's `remote_status` says: `pending` sets, `pending_since`, `last_attempt`, `last_success`,
    `last_error`). A remote with nothing pending has no `..._pending_since_...` sample (alert on its presence)."""

    def __init__(self, load: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.load = load

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        remotes = self.load()
        labels = [REMOTE_LABEL]
        count = GaugeMetricFamily(f"{PREFIX}_remote_pending_sets",
                                  "Complete local sets not yet copied to the remote.", labels=labels)
        since = GaugeMetricFamily(f"{PREFIX}_remote_pending_since_timestamp_seconds",
                                  "Since when the oldest pending set waits for its upload, Unix time.", labels=labels)
        attempt = GaugeMetricFamily(f"{PREFIX}_remote_last_push_timestamp_seconds",
                                    "When the last push to the remote ended, Unix time.", labels=labels)
        success = GaugeMetricFamily(f"{PREFIX}_remote_last_push_success_timestamp_seconds",
                                    "When the last successful push to the remote ended, Unix time.", labels=labels)
        result = GaugeMetricFamily(f"{PREFIX}_remote_last_push_success",
                                   "1 if the last push to the remote succeeded, 0 if it failed.", labels=labels)
        for name, doc in remotes.items():
            pending = doc.get("pending")
            count.add_metric([name], float(len(pending) if isinstance(pending, list) else 0))
            for family, key in ((since, "pending_since"), (attempt, "last_attempt"), (success, "last_success")):
                value = _seconds(doc.get(key))
                if value is not None:
                    family.add_metric([name], value)
            if doc.get("last_attempt"):
                result.add_metric([name], 0.0 if doc.get("last_error") else 1.0)
        yield from (count, since, attempt, success, result)


def _registry(jobs: Callable[[], Mapping[str, Mapping[str, Any]]],
              remotes: Callable[[], Mapping[str, Mapping[str, Any]]], *, live: bool) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(jobs, live=live))
    registry.register(RemotesCollector(remotes))
    return registry


def render(jobs: Mapping[str, Mapping[str, Any]], *, live: bool = False,
           remotes: Mapping[str, Mapping[str, Any]] | None = None) -> bytes:
    """The metrics of `jobs` (and of `remotes`, per remote) in the Prometheus text format."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(lambda: jobs, lambda: remotes or {}, live=live))


def write_textfile(path: Path, jobs: Mapping[str, Mapping[str, Any]],
                   remotes: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Replace `path` atomically with the metrics of `jobs` and `remotes` (what node_exporter's textfile
    collector reads: it must never see half a file). The folder must exist (it is node_exporter's); a symlink
    at `path` is replaced, never written through. Raises StorageError saying what to fix."""
    data = render(jobs, remotes=remotes)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no .prom suffix: the collector skips it
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, TEXTFILE_MODE)
    except FileExistsError:
        os.unlink(temp)  # left by a run of the same pid killed before its rename
        return write_textfile(path, jobs, remotes)
    except OSError as exc:
        raise StorageError(f"cannot write the metrics file {path}: {exc.strerror}",
                           hint=f"make {path.parent} writable by the backup user, or change metrics.textfile") \
            from None
    try:
        os.fchmod(fd, TEXTFILE_MODE)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise StorageError(f"cannot write the metrics file {path}: {exc.strerror}",
                           hint="is the disk full?") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return None


class MetricsServer:
    """The daemon's `/metrics` endpoint on (host, port), serving `load()` (and `remotes()`) at every scrape,
    in a thread."""

    def __init__(self, host: str, port: int, load: Callable[[], Mapping[str, Mapping[str, Any]]],
                 remotes: Callable[[], Mapping[str, Mapping[str, Any]]] = dict) -> None:
        from http.server import ThreadingHTTPServer  # the daemon's endpoint only, not the text file

        from prometheus_client.exposition import MetricsHandler

        handler = MetricsHandler.factory(_registry(load, remotes, live=True))
        family = ThreadingHTTPServer
        if ":" in host:  # an IPv6 address
            import socket

            class _Server6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            family = _Server6
        try:
            self.server = family((host, port), handler)
        except OSError as exc:
            raise StorageError(f"cannot listen on {host}:{port} for /metrics: {exc.strerror}",
                               hint="another process uses it? change metrics.listen") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
