"""`python -m kkua_backupd.daemon`: the daemon, as `kkua-backupd` runs it."""

from kkua_backupd.daemon.loop import run

run()
