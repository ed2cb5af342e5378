"""`kkua-backup systemd ...` and `kkua-backup cron ...`: installing the units, timers or cron entries.

SKELETON: being written (issue 4). Interface the CLI relies on:
  systemd_command(ctx, args, loaded) -> result doc   (args.action, args.daemon, args.no_enable)
  cron_command(ctx, args, loaded) -> result doc      (args.action, args.user)
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import LoadedConfig
from .jobs import JobContext


def systemd_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    raise NotImplementedError("systemd: being written (issue 4)")


def cron_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    raise NotImplementedError("cron: being written (issue 4)")
