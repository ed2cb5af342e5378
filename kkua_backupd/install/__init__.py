"""`kkua-backup systemd …` and `kkua-backup cron …`: the installers (systemd, cron) and what they share
(common). The command line reaches them through the two commands below."""

from kkua_backupd.install.cron import cron_command
from kkua_backupd.install.systemd import systemd_command

__all__ = ["cron_command", "systemd_command"]
