"""The typed manifest details (sources/<kind>/manifest.py) and the typed results.

A manifest written through the real code (postgres `manifest_for`, redis `_manifest`) is byte for byte what
main wrote before the details were typed: tests/unit/manifests/*.json were written by main's code (commit
5ef2386) from the same inputs as below, with finished_at, host and the tool's version fixed afterwards (the
same is done here). Manifests of older versions (before `table_keys`, `roles`, `objects`, `ran`; Redis key
counts in older shapes) and of newer ones (unknown fields) still read, list, and keep what they hold when
rewritten; details no version wrote are refused with a clear error, and `list` still lists the set."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.core.context import CheckedSet, RestoreReport, SafetyBackup, VerifyReport
from kkua_backupd.errors import IntegrityError
from kkua_backupd.sources import details_of
from kkua_backupd.sources.postgres import backup as pg_backup
from kkua_backupd.sources.postgres.client import ServerInfo, archive_major_of
from kkua_backupd.sources.postgres.manifest import PostgresDetails, RestoreTest, TableStats
from kkua_backupd.sources.postgres.restore import PostgresRestoreReport
from kkua_backupd.sources.postgres.stats import legacy_keys
from kkua_backupd.sources.redis import backup as redis_backup
from kkua_backupd.sources.redis.manifest import AofDetails, LoadTest, RedisDetails
from kkua_backupd.sources.redis.rdb import RdbSummary
from kkua_backupd.sources.redis.restore import RedisRestoreReport
from kkua_backupd.store import storage
from kkua_backupd.store.storage import BackupSet, Manifest, ManifestFile
from kkua_backupd.stream.pipeline import FileInfo

MAIN = Path(__file__).parent / "manifests"
CREATED = dt.datetime(2026, 11, 29, 2, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))
TABLES = {"public.users": TableStats(rows=3, checksum="1234567"), 'public."Odd.Name"': TableStats(rows=0, checksum="0"),
          "app.words": TableStats(rows=120000, checksum="99")}


def _normalized(path: Path) -> str:
    """The manifest's text with what differs between runs and hosts fixed (as for the files from main)."""
    doc = json.loads(path.read_text())
    doc["finished_at"] = "2026-11-29T02:00:31+09:00"
    doc["host"] = "db1"
    doc["tool"]["version"] = "1.0"
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _dump(set_id: str, fmt: str = "plain", compression: str = "gzip",
          tables: dict[str, TableStats] | None = None) -> pg_backup.DumpResult:
    name = f"kkua_backup_{set_id}.sql.gz" if fmt == "plain" else f"kkua_backup_{set_id}.dump"
    return pg_backup.DumpResult(set_id, CREATED, FileInfo(name, 4242, "ab" * 32), 100000, 1.234567,
                                TABLES if tables is None else tables, ServerInfo("15.4 (Debian 15.4-1)", 15), "15.4",
                                fmt, compression, ["kkua", "reader"], [], 17, None)


def _test_outcome(*, ran: bool, ok: bool) -> RestoreTest:
    """An outcome built the way verify.test_restore_file builds it, step by step."""
    outcome = RestoreTest(ok=False, ran=False, database="kkua_verify_x", error=None, problems=[])
    if ran:
        outcome.ran = True
        outcome.problems = [] if ok else ["public.users: 2 rows, expected 3"]
        outcome.tables, outcome.rows = 3, 120003
        outcome.checksums = True
        outcome.ok = ok
        if not ok:
            outcome.error = "public.users: 2 rows, expected 3"
    else:
        outcome.error = "could not connect"
    outcome.seconds = 2.5
    return outcome


PG_CASES: dict[str, dict[str, Any]] = {
    "pg_plain": {"result": ("20261129_020000",), "total_seconds": 12.3456},
    "pg_tested": {"result": ("20261129_020001", "custom", "zstd"), "test": (True, True), "total_seconds": 20.0},
    "pg_test_failed": {"result": ("20261129_020002",), "test": (True, False), "status": "failed",
                       "error": "test restore failed: x", "total_seconds": 3.0},
    "pg_test_not_run": {"result": ("20261129_020003",), "test": (False, False), "total_seconds": 3.0},
    "pg_safety": {"result": ("20261129_020004",), "tables": {}, "set_type": "safety"},
}


@pytest.mark.parametrize("case", PG_CASES)
def test_a_postgres_manifest_is_written_as_main_wrote_it(case: str, tmp_path: Path) -> None:
    spec = PG_CASES[case]
    test = _test_outcome(ran=spec["test"][0], ok=spec["test"][1]) if "test" in spec else None
    safety = spec.get("set_type") == "safety"
    manifest = pg_backup.manifest_for(
        _dump(*spec["result"], tables=spec.get("tables")), set_type=spec.get("set_type", "backup"),
        prefix="safety_backup_before_restore_" if safety else "kkua_backup_", dbname="kkua",
        status=spec.get("status", "ok"), error=spec.get("error"), test_restore=test,
        total_seconds=spec.get("total_seconds"))
    written = storage.write_manifest(tmp_path, manifest)
    assert _normalized(written) == (MAIN / f"{case}.manifest.json").read_text()
    details = manifest.details_as(PostgresDetails)
    assert details.stored() == manifest.details
    assert details.tables == ({} if safety else TABLES)
    assert (details.test_restore is None) == (test is None)


def _rdb_capture(fallback: str | None) -> redis_backup.RdbCapture:
    summary = RdbSummary(magic="REDIS", version=11, size=5000, aux={"redis-ver": "7.2.4"}, keys={0: 5, 3: 1},
                         expires={0: 2}, types=Counter({0: 4, 4: 2}), functions=1, modules={"ReJSON"},
                         largest_value=5242880, checksum="ok")
    return redis_backup.RdbCapture(
        file=FileInfo("redis_backup_20261129_030000.rdb.gz", 999, "cd" * 32), compression="gzip",
        method="bgsave" if fallback else "sync", form="file" if fallback else "eof", raw_size=5000, rdb_version=11,
        check={"rdb_version": 11, "redis_check_rdb": "ok", "keys": 6, "expires": 2, "summary": summary},
        keyspace={"0": {"keys": 5, "expires": 2}, "3": {"keys": 1, "expires": 0}},
        keyspace_before={"0": {"keys": 5, "expires": 2}}, seconds=0.5, wait_seconds=0.1, fallback_reason=fallback)


def _aof(form: str | None) -> AofDetails | None:
    """AOF details built the way write_aof builds them."""
    if form is None:
        return None
    details = AofDetails(form="multi-part" if form == "multi" else "single",
                         name="appendonlydir" if form == "multi" else "appendonly.aof")
    if form == "multi":
        details.members = ["appendonly.aof.manifest", "appendonly.aof.1.base.rdb", "appendonly.aof.1.incr.aof"]
    details.bytes = 7777
    return details


@pytest.mark.parametrize(("case", "aof", "fallback"), [
    ("redis_plain", None, None),
    ("redis_aof_bgsave", "multi", "SYNC is not allowed (replica-read-only)"),
    ("redis_aof_single", "single", None),
])
def test_a_redis_manifest_is_written_as_main_wrote_it(case: str, aof: str | None, fallback: str | None,
                                                      tmp_path: Path) -> None:
    files = [ManifestFile(name="redis_backup_20261129_030000.rdb.gz", size=999, sha256="cd" * 32, role="rdb",
                          compression="gzip")]
    manifest = redis_backup._manifest(
        "redis_backup_", "backup", "20261129_030000", CREATED, files, _rdb_capture(fallback), "7.2.4", "gzip",
        _aof(aof), timings={"capture_seconds": 0.5, "server_wait_seconds": 0.1, "aof_seconds": 0.0,
                            "total_seconds": 0.7})
    written = storage.write_manifest(tmp_path, manifest)
    assert _normalized(written) == (MAIN / f"{case}.manifest.json").read_text()
    details = manifest.details_as(RedisDetails)
    assert details.keyspace == {"0": 5, "3": 1} and details.key_count == 6
    assert details.rdb is not None and details.rdb.modules == ["ReJSON"] and details.rdb.crc64 == "ok"
    assert (details.aof is None) == (aof is None) and details.sync_refused == fallback


# What older versions wrote (shapes from main's history) and what a newer one might add.
PG_BEFORE_ROLES = {  # c7506b4^: no table_keys, objects, roles; a test restore without `ran`
    "database": "kkua", "format": "plain", "compression": "gzip", "server_version": "15.4",
    "pg_dump_version": "pg_dump (PostgreSQL) 15.4", "uncompressed_bytes": 1000, "tables": {"public.users": {"rows": 3}},
    "test_restore": {"ok": True, "database": "kkua_verify_x", "error": None, "problems": [], "tables": 1,
                     "rows": 3, "seconds": 0.5},
}
PG_NEWER = {**json.loads((MAIN / "pg_tested.manifest.json").read_text())["details"],
            "format": "directory", "jobs": 4, "something": {"new": [1, 2]}}
REDIS_FIRST = {  # 7a3499e: counts from INFO, no rdb, no keyspace_info
    "server_version": "7.0.15", "rdb_version": 10, "capture": "sync", "transfer": "eof", "compression": "gzip",
    "uncompressed_bytes": 500, "keyspace": {"0": 5, "3": 1}, "expires_per_db": {"0": 2, "3": 0}, "keys": 6,
    "expires": 2, "keyspace_exact": True, "redis_check_rdb": "ok",
}
REDIS_DB_SHAPES = {"keyspace": {"db0": {"keys": 5, "expires": 2}, "db3": 1}, "keys": 6}


def _manifest(kind: str, details: dict[str, Any]) -> Manifest:
    prefix = storage.PREFIXES[kind]["backup"]
    name = f"{prefix}20261129_020000{'.sql.gz' if kind == 'postgres' else '.rdb.gz'}"
    return Manifest.model_validate({
        "kind": kind, "id": "20261129_020000", "prefix": prefix, "created_at": CREATED.isoformat(),
        "files": [{"name": name, "size": 10, "sha256": "ab" * 32}], "details": details})


def test_postgres_manifests_of_older_and_newer_versions_read_with_defaults() -> None:
    old = _manifest("postgres", PG_BEFORE_ROLES)
    details = old.details_as(PostgresDetails)
    assert details.roles == [] and details.objects == 0 and details.table_keys is None
    assert legacy_keys(details) is True and details.rows == 3
    assert details.test_restore is not None and details.test_restore.ok and details.test_restore.ran is None
    tested = details_of(old).tested
    assert tested is not None and tested.ran is None  # `list` does not call it unverified
    assert details.stored() == PG_BEFORE_ROLES  # nothing added when it is written back
    assert archive_major_of(BackupSet(Path("/nonexistent"), old)) == 15
    newer = _manifest("postgres", PG_NEWER).details_as(PostgresDetails)
    assert newer.format == "directory" and newer.model_extra == {"jobs": 4, "something": {"new": [1, 2]}}
    assert newer.stored() == PG_NEWER and list(newer.stored()) == list(PG_NEWER)
    assert legacy_keys(newer) is False
    empty = _manifest("postgres", {}).details_as(PostgresDetails)
    assert empty.format == "plain" and empty.rows is None and not legacy_keys(empty) and empty.stored() == {}


def test_redis_manifests_of_older_versions_read_their_key_counts() -> None:
    first = _manifest("redis", REDIS_FIRST).details_as(RedisDetails)
    assert first.keyspace == {"0": 5, "3": 1} and first.rdb is None and first.keyspace_info == {}
    assert first.has("keyspace") and not first.has("rdb")
    shapes = _manifest("redis", REDIS_DB_SHAPES).details_as(RedisDetails)
    assert shapes.keyspace == {"0": 5, "3": 1} and shapes.expires_per_db == {} and shapes.key_count == 6
    none = _manifest("redis", {}).details_as(RedisDetails)
    assert not none.has("keyspace") and none.key_count is None and none.tested is None


def test_old_and_new_manifests_keep_what_they_hold_when_rewritten(tmp_path: Path) -> None:
    for kind, details in (("postgres", PG_BEFORE_ROLES), ("postgres", PG_NEWER), ("redis", REDIS_FIRST)):
        manifest = _manifest(kind, details)
        folder = tmp_path / kind
        folder.mkdir(exist_ok=True)
        path = storage.write_manifest(folder, manifest.model_copy(update={"status": "failed", "error": "x"}))
        assert json.loads(path.read_text())["details"] == details
        assert list(json.loads(path.read_text())["details"]) == list(details)
        (found,) = storage.list_sets(tmp_path, kind)
        assert found.manifest is not None and found.manifest.details == details
        path.unlink()


@pytest.mark.parametrize(("kind", "details", "where"), [
    ("postgres", {"tables": {"public.t": {"rows": "many"}}}, "details.tables.public.t.rows"),
    ("postgres", {"roles": "kkua"}, "details.roles"),
    ("redis", {"keyspace": ["0", 5]}, "details.keyspace"),
    ("redis", {"rdb": {"keys": {"a": 1}}}, "details.rdb.keys"),
])
def test_details_no_version_wrote_are_refused_clearly(kind: str, details: dict[str, Any], where: str,
                                                      tmp_path: Path) -> None:
    manifest = _manifest(kind, details)
    with pytest.raises(IntegrityError) as raised:
        details_of(manifest)
    assert where in raised.value.message and "20261129_020000" in raised.value.message
    assert "another backup" in (raised.value.hint or "")
    folder = tmp_path / kind
    folder.mkdir()
    storage.write_manifest(folder, manifest)
    assert [s.id for s in storage.list_sets(tmp_path, kind)] == ["20261129_020000"]  # still listed


def test_results_print_the_keys_they_printed_as_dicts() -> None:
    pg = PostgresRestoreReport(kind="postgres", file="f.sql.gz", id="1", database="kkua", format="plain",
                               compression="gzip")
    pg.check = CheckedSet(files=[{"name": "f.sql.gz", "checksum": "ok"}])
    pg.safety_backup = SafetyBackup(file="s.sql.gz", size=1, sha256="0" * 64)
    pg.load_seconds = 1.5
    pg.tables, pg.rows, pg.problems, pg.verified = 2, 3, [], True
    pg.seconds = 2.0
    assert list(pg.to_json()) == ["kind", "file", "id", "database", "format", "compression", "check", "safety_backup",
                                  "load_seconds", "tables", "rows", "problems", "verified", "seconds"]
    assert pg.to_json()["check"] == {"files": [{"name": "f.sql.gz", "checksum": "ok"}]}
    redis = RedisRestoreReport(kind="redis", file="r.rdb.gz", id="1", mode="file", aof=False, flush=False,
                               safety_backup=None)
    redis.rdb_version, redis.server_version = 11, "7.2.4"
    redis.check = CheckedSet(files=[], rdb_version=11)
    redis.aof_handling, redis.moved_aside = "AOF off; nothing to do", []
    redis.keys, redis.databases, redis.expired_skipped, redis.aof_enabled = 1, {"0": 1}, 0, False
    redis.counts_match, redis.differences = True, []
    redis.seconds = 1.0
    assert list(redis.to_json()) == ["kind", "file", "id", "mode", "aof", "flush", "safety_backup", "rdb_version",
                                     "server_version", "check", "aof_handling", "moved_aside", "keys", "databases",
                                     "expired_skipped", "aof_enabled", "counts_match", "differences", "seconds"]
    assert redis.to_json()["safety_backup"] is None and redis.to_json()["check"] == {"files": [], "rdb_version": 11}
    base = RestoreReport(kind="redis", file="r", id="1")
    assert base.to_json() == {"kind": "redis", "file": "r", "id": "1"}
    load = LoadTest(ok=False, error=None, problems=[], loaded=None)
    load.seconds = 0.1
    report = VerifyReport(kind="redis", id="1", name="r", ok=False, status="ok",
                          checked=CheckedSet(files=[], rdb_version=None, signature=None), restore_test=load)
    assert report.to_json() == {"kind": "redis", "id": "1", "name": "r", "status": "ok", "files": [],
                                "rdb_version": None, "signature": None, "ok": False,
                                "restore_test": {"ok": False, "error": None, "problems": [], "loaded": None,
                                                 "seconds": 0.1}}
