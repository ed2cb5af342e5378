"""The `kkua-backupd` daemon entry point.

The scheduling daemon (Type=notify, watchdog, reload) is not part of this release yet; until it is,
schedules run through `kkua-backup run JOB` from systemd timers or cron, and this entry point says so
instead of pretending to run.
"""

from __future__ import annotations

import sys


def run() -> None:
    """Console-script wrapper: exits 2 with a message naming what to use instead."""
    sys.stderr.write("kkua-backupd: the scheduling daemon is not available in this version; "
                     "schedule `kkua-backup run postgres` with a systemd timer or cron instead\n")
    sys.exit(2)
