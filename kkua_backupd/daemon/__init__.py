"""The daemon, `kkua-backupd`: the schedule loop (loop) and sd_notify (notify)."""

from kkua_backupd.daemon.loop import run

__all__ = ["run"]
