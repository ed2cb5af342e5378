"""kkua-backupd: backups and restores of the KKUA backend's PostgreSQL and Redis, under systemd."""

import os
from collections.abc import Mapping
from pathlib import Path

__version__ = "0.1.0"
# pydantic looks for plugins (the `pydantic` entry points of every installed distribution) when it builds its
# first model: a scan of all of site-packages, 10-25 ms of every command that reads the config, for plugins
# this tool never uses. Its documented switch turns that off (docs/performance.md, "Start-up").
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
# Where the config is looked for (`--config`, else $KKUA_BACKUP_CONFIG, else this file): here rather than in
# config.py so that `kkua-backup --help` can name them, and `status` find its config record
# (core/status_cache.py), without importing pydantic.
DEFAULT_CONFIG_PATH = Path("/etc/kkua-backup/config.toml")
CONFIG_ENV = "KKUA_BACKUP_CONFIG"


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """Return the config path and whether it was asked for explicitly (`--config` or the variable)."""
    if cli_path:
        return Path(cli_path), True
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), True
    return DEFAULT_CONFIG_PATH, False
