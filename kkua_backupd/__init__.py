"""kkua-backupd: backups and restores of the KKUA backend's PostgreSQL and Redis, under systemd."""

from pathlib import Path

__version__ = "0.1.0"
# Where the config is looked for (`--config`, else $KKUA_BACKUP_CONFIG, else this file): here rather than in
# config.py so that `kkua-backup --help` can name them without importing pydantic.
DEFAULT_CONFIG_PATH = Path("/etc/kkua-backup/config.toml")
CONFIG_ENV = "KKUA_BACKUP_CONFIG"
