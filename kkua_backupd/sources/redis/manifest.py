"""The typed details of a Redis set's manifest (`Manifest.details`) and of a restore test of it.

Every field any version wrote is here, in the order backup.py's `_manifest` writes it; a manifest missing
some reads with the defaults, fields of newer versions are kept, and key counts written in older shapes
(`{"db0": n}`, `{"db0": {"keys": n, ...}}`) read as `{"0": n}` (store.storage.StoredDetails). The dict
written is `stored()`: only what was given, so the bytes are the same as when the details were a dict built
by hand.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kkua_backupd.store.storage import BackupSet, StoredDetails


def db_counts(data: Any) -> dict[str, int]:
    """Key counts per database in any shape a manifest held ({"0": n}, {"db0": n}, {"db0": {"keys": n}}) as
    {"0": n}; raises ValueError for anything else."""
    if not isinstance(data, dict):
        raise ValueError("expected key counts per database")
    out: dict[str, int] = {}
    for name, value in data.items():
        db = int(str(name).removeprefix("db"))
        out[str(db)] = int(value["keys"] if isinstance(value, dict) else value)
    return out


class RdbDetails(BaseModel):
    """What our reader found in the RDB (rdb.RdbSummary.as_details)."""

    model_config = ConfigDict(extra="allow")
    rdb_version: int = 0
    rdb_format: str = "redis"
    rdb_writer: str = ""
    keys: int = 0
    expires: int = 0
    keys_per_db: dict[str, int] = Field(default_factory=dict)
    expires_per_db: dict[str, int] = Field(default_factory=dict)
    value_types: dict[str, int] = Field(default_factory=dict)
    functions: int = 0
    modules: list[str] = Field(default_factory=list)
    crc64: str = "missing"
    largest_value_bytes: int = 0


class AofDetails(BaseModel):
    """The AOF archived with the set: a single file, or the multi-part folder as a tar (`members`: its
    manifest first, then the base and incr files it names)."""

    model_config = ConfigDict(extra="allow")
    form: str = "single"
    name: str = ""
    members: list[str] | None = None
    bytes: int = 0


class RedisDetails(StoredDetails):
    """`details` of a Redis set (a backup or a safety backup)."""

    server_version: str = "unknown"
    rdb_version: int | None = None
    capture: str = "sync"  # "sync" (the replication protocol) or "bgsave"
    transfer: str = ""  # "len", "eof" (SYNC) or "file" (a BGSAVE copy)
    compression: str = "none"
    uncompressed_bytes: int = 0
    keyspace: dict[str, int] = Field(default_factory=dict)  # keys per database, from the RDB itself
    expires_per_db: dict[str, int] = Field(default_factory=dict)
    keys: int | None = None
    expires: int | None = None
    keyspace_exact: bool = False
    keyspace_info: dict[str, int] = Field(default_factory=dict)  # INFO keyspace when the capture began
    redis_check_rdb: str | None = None
    rdb: RdbDetails | None = None
    sync_refused: str | None = None  # why BGSAVE was used
    aof: AofDetails | None = None

    @field_validator("keyspace", "expires_per_db", "keyspace_info", mode="before")
    @classmethod
    def _counts(cls, value: Any) -> dict[str, int]:
        return db_counts(value)

    @property
    def rows(self) -> int | None:
        return None

    @property
    def key_count(self) -> int | None:
        return self.keys

    @property
    def tested(self) -> None:
        return None


class LoadTest(BaseModel):
    """A restore test of a Redis set (`verify --restore-test`; a core.context.RestoreTestOutcome): every
    value decoded, key counts per database compared with the manifest, and, where a local redis-server can
    read the RDB, a load into a throwaway one (`loaded` says which). Fields in the order they are written."""

    model_config = ConfigDict(extra="forbid")
    ok: bool = False
    error: str | None = None
    problems: list[str] = Field(default_factory=list)
    loaded: str | None = None
    keys: int | None = None
    databases: dict[str, int] | None = None
    values_decoded: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The outcome as `verify --json` prints it."""
        return self.model_dump(exclude_unset=True)


def details_of(backup_set: BackupSet) -> RedisDetails | None:
    """The typed details of a set's manifest (None for a file made without one); raises IntegrityError for
    details no version of the tool wrote."""
    return backup_set.manifest.details_as(RedisDetails) if backup_set.manifest else None


DETAILS = RedisDetails
