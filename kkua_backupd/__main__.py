"""`python -m kkua_backupd` runs the `kkua-backup` command line."""

from .cli import run

run()
