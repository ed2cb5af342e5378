"""Jobs run as subprocess workers (`kkua-backup run JOB`), each in its own process group.

SKELETON: being written (issue 4). Interface the CLI relies on:
  run_all(config_path, jobs, *, command, json_mode, extra_args) -> (result, exit_code)
    runs `kkua-backup <command> <job>` for the backup jobs in parallel (retention after them),
    their log lines passing through; returns {"jobs": {job: {"exit_code": n, "result": doc}}} and the
    highest exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_all(config_path: Path | None, jobs: list[str], *, command: str, json_mode: bool,
            extra_args: list[str]) -> tuple[dict[str, Any], int]:
    raise NotImplementedError("backup all: being written (issue 4)")
