"""PostgreSQL: backup, restore and verify of one database (job), and the SQL stream follower (pg_sql)."""

from __future__ import annotations

from pathlib import Path

from kkua_backupd.errors import KkuaError
from kkua_backupd.safefs import list_folder

# The note a restore leaves in the state folder while it creates a database (load.NewDatabase), named here
# so that `list` and `verify` can see there is none without importing psycopg and the restore.
NEW_DB_NOTE = "postgres-new-database-"


def unfinished_notes_present(folder: Path) -> bool:
    """Whether the state folder `folder` may hold a note of a database a restore created: True when it holds
    one, or cannot be listed (load.drop_unfinished_databases then says why); False when it holds none or does
    not exist. A listing only: the notes are read, and the server asked, by load.drop_unfinished_databases."""
    try:
        names = list_folder(folder)
    except FileNotFoundError:
        return False
    except (OSError, KkuaError):
        return True
    return any(name.startswith(NEW_DB_NOTE) and name.endswith(".json") for name in names)
