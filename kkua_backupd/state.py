"""Last runs of each job, recorded by whichever runner ran it (daemon, timer, cron, a person); `status`.

SKELETON: being written (issue 4). Interface the CLI relies on:
  track(config, job, runner) -> context manager yielding a record with
      .finish(size: int | None = None, files: list[str] | None = None, detail: str | None = None)
    records start, then end+result ("ok" / "failed: <error>"), written atomically to config.state_file;
    an exception inside marks the run failed (with the error line) and is re-raised.
  status_report(config) -> dict  ({"daemon": {...}, "jobs": {job: {schedule, next_run, last_run, last_result,...}}})
  format_status(report) -> list[str]  (lines for a person)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import Config


class RunRecord:
    def finish(self, size: int | None = None, files: list[str] | None = None, detail: str | None = None) -> None:
        pass


@contextlib.contextmanager
def track(config: Config, job: str, *, runner: str) -> Iterator[RunRecord]:
    yield RunRecord()


def status_report(config: Config) -> dict[str, Any]:
    raise NotImplementedError("status: being written (issue 4)")


def format_status(report: dict[str, Any]) -> list[str]:
    raise NotImplementedError
