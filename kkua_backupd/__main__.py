"""`python -m kkua_backupd` runs the `kkua-backup` command line."""

from kkua_backupd.cli import run

run()
