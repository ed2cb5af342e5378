"""Jobs: what a backup, restore or verification of one target does, given one frozen context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config


@dataclass(frozen=True)
class JobContext:
    """Everything a job needs: the effective config, a bound logger, and how it was started."""

    config: Config
    log: Any
    interactive: bool = False  # a person at a terminal: progress lines and questions
    json_mode: bool = False
