"""The typed details of a PostgreSQL set's manifest (`Manifest.details`) and of its test restore.

Every field any version wrote is here, in the order `manifest_for` writes it; a manifest missing some (made
before `table_keys`, `roles` or `objects` existed) reads with the defaults, and fields of newer versions are
kept (store.storage.StoredDetails). The dict written is `stored()`: only what was given, so the bytes are
the same as when the details were a dict built by hand.
"""

from __future__ import annotations

from typing import Any, NotRequired

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from kkua_backupd.store.storage import BackupSet, StoredDetails


class TableStats(TypedDict):
    """One table's row count in the dump's snapshot, and its content checksum when one was taken. A typed
    dict, not a model: a manifest may list thousands of tables, read several times by a restore (a model
    per table costs about four times as much to read)."""

    rows: int
    checksum: NotRequired[str]


class RestoreTest(BaseModel):
    """A test restore into a scratch database (`backup --test-restore`, `verify --restore-test`; a
    core.context.RestoreTestOutcome): `ran` is False when it could not run at all (that says nothing against
    the backup); `tables`, `rows` and `checksums` are there when the restore loaded. Fields in the order
    they are written."""

    model_config = ConfigDict(extra="allow")
    ok: bool = False
    ran: bool | None = None  # None: not recorded (manifests older than the field)
    database: str = ""
    error: str | None = None
    problems: list[str] = Field(default_factory=list)
    tables: int | None = None
    rows: int | None = None
    checksums: bool | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The outcome as the manifest and `verify --json` hold it."""
        return self.model_dump(exclude_unset=True)


class PostgresDetails(StoredDetails):
    """`details` of a PostgreSQL set (a backup or a safety backup)."""

    database: str = ""
    format: str = "plain"
    compression: str = "none"
    server_version: str = ""
    pg_dump_version: str = ""
    uncompressed_bytes: int = 0
    table_keys: str | None = None  # "quoted" (stats.TABLE_KEYS); absent before table keys were quoted
    objects: int = 0  # what one transaction of the restore locks; 0 before it was recorded
    tables: dict[str, TableStats] = Field(default_factory=dict)
    roles: list[str] = Field(default_factory=list)
    test_restore: RestoreTest | None = None

    @property
    def rows(self) -> int | None:
        """The rows of every table in the dump's snapshot (None when the manifest has no tables)."""
        return sum(t["rows"] for t in self.tables.values()) if self.has("tables") else None

    @property
    def key_count(self) -> int | None:
        return None

    @property
    def tested(self) -> RestoreTest | None:
        return self.test_restore


def details_of(backup_set: BackupSet) -> PostgresDetails | None:
    """The typed details of a set's manifest (None for a file made without one); raises IntegrityError for
    details no version of the tool wrote."""
    return backup_set.manifest.details_as(PostgresDetails) if backup_set.manifest else None


DETAILS = PostgresDetails
