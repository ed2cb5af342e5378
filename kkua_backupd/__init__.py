"""kkua-backupd: backups and restores of the KKUA backend's PostgreSQL and Redis, under systemd."""

__version__ = "0.1.0"
