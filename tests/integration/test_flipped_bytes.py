"""A flipped byte in an uncompressed or zstd set (PostgreSQL and Redis) is caught by the sha256 comparison
with the manifest, and `verify`, `verify --restore-test` and `restore` all say the file does not match its
checksum. (gzip sets are covered elsewhere; gzip's own CRC would catch the flip without the sha256, which is
why these sets have none.) Nothing is changed and no safety backup is taken."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.config import load_config
from kkua_backupd.core.context import JobContext
from kkua_backupd.demo.redis_sample import create_sample, snapshot
from kkua_backupd.errors import IntegrityError
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.sources.postgres import client as pg_client
from kkua_backupd.sources.postgres import load as pg_load
from kkua_backupd.store.storage import ManifestFile
from tests.conftest import Env, RedisEnv
from tests.support.helpers import describe, output
from tests.support.pg_data import contents_of

CHECKSUM = "does not match its checksum"


def flip(path: Path) -> None:
    """Flip one byte in the middle of the file; its size stays the same."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def data_file(world: Env | RedisEnv, kind: str) -> Path:
    (backup_set,) = [s for s in json.loads(world.run("--json", "list", kind, check=True).stdout)]
    name = backup_set["files"][0]["name"]
    assert ".rdb" in name or ".sql" in name, backup_set["files"]
    return world.folder / name


def assert_refused_everywhere(world: Env | RedisEnv, kind: str, unchanged: Any) -> None:
    for args in (("verify", "latest"), ("verify", "latest", "--restore-test"), ("verify", "all")):
        result = world.run(*args)
        assert result.returncode in (1, 3), f"{args}: {describe(result)}"
        assert "FAIL" in result.stdout and CHECKSUM in output(result), f"{args}: {describe(result)}"
    result = world.run("restore", kind, "latest", "--force")
    assert result.returncode == 3, describe(result)
    assert CHECKSUM in output(result), describe(result)
    unchanged()
    assert not list(world.folder.glob("safety_backup_before_restore_*")), "a safety backup was taken"


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_postgres_flipped_byte(env: Env, compression: str) -> None:
    env.write_config(compression=compression)
    env.run("backup", "postgres", check=True)
    path = data_file(env, "postgres")
    assert path.name.endswith(".sql" if compression == "none" else ".sql.zst"), path.name
    before = contents_of(env)
    flip(path)
    assert_refused_everywhere(env, "postgres", lambda: contents_of(env) == before or pytest.fail("data changed"))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_redis_flipped_byte(redis_env: RedisEnv, compression: str) -> None:
    create_sample(redis_env.server, large_value_size=64 * 1024)
    redis_env.write_config(compression=compression)
    redis_env.run("backup", "redis", check=True)
    path = data_file(redis_env, "redis")
    assert path.name.endswith(".rdb" if compression == "none" else ".rdb.zst"), path.name
    redis_env.client(0).set("marker", "after the backup")
    before = snapshot(redis_env.server)
    flip(path)

    def unchanged() -> None:
        assert snapshot(redis_env.server) == before, "the server's data changed"

    assert_refused_everywhere(redis_env, "redis", unchanged)


def make_manifest_match(world: Env, path: Path) -> None:
    """Rewrite the set's manifest for the file's new bytes, as whoever can write the folder could."""
    (manifest_path,) = world.folder.glob("*.manifest.json")
    doc = json.loads(manifest_path.read_text())
    doc["files"][0].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(doc))


def cut_in_copy_data(sql: bytes) -> bytes:
    """The dump cut inside its first COPY block's data."""
    start = sql.index(b"FROM stdin;\n") + len(b"FROM stdin;\n")
    return sql[: start + (sql.index(b"\n\\.\n", start) - start) // 2]


def cut_before_the_end(sql: bytes) -> bytes:
    """The dump cut after a whole statement, before pg_dump's closing comment."""
    return sql[: sql.rindex(b";\n", 0, sql.index(b"-- PostgreSQL database dump complete")) + 2]


@pytest.mark.parametrize(("damage", "words"), [
    ("flipped byte", (CHECKSUM,)),
    ("cut inside COPY data, manifest to match", ("truncated",)),
    ("cut before the end, manifest to match", ("truncated",)),
])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_postgres_one_pass_rolls_back_a_damaged_set_and_keeps_the_data(env: Env, compression: str, damage: str,
                                                                      words: tuple[str, ...]) -> None:
    """A set made here is restored in one pass (checked while it loads): a flipped byte, or a dump cut short
    whose manifest was made to match, is found inside the restore's transaction, which is rolled back before
    its COMMIT: exit 3, the rows written after the backup still there, the safety backup taken for it
    removed again (the database still holds what it saved); into a new database, that database dropped."""
    env.write_config(compression=compression)
    env.run("backup", "postgres", check=True)
    path = data_file(env, "postgres")
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.after_backup (x int)")
        conn.execute("INSERT INTO public.after_backup VALUES (1), (2)")
    before = contents_of(env)
    if damage == "flipped byte":
        flip(path)
    else:
        sql = gzip.decompress(path.read_bytes()) if compression == "gzip" else path.read_bytes()
        cut = cut_in_copy_data(sql) if "COPY" in damage else cut_before_the_end(sql)
        path.write_bytes(gzip.compress(cut) if compression == "gzip" else cut)
        make_manifest_match(env, path)
    for args in ((), ("--target-db", "kkua_one_pass_copy")):
        result = env.run("restore", "postgres", "latest", "--force", *args)
        assert result.returncode == 3, describe(result)
        text = output(result)
        assert "while it loads (one pass)" in text, text  # the in-transaction check found it, not a pre-check
        assert any(w in text for w in words), text
        assert contents_of(env) == before, "the database changed"
        assert not list(world_safety(env)), "the safety backup of a rolled-back restore was kept"
        with env.connect() as conn:
            assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'kkua_one_pass_copy'").fetchall()


def world_safety(env: Env) -> list[Path]:
    return list(env.folder.glob("safety_backup_*"))


@pytest.mark.parametrize("change", ["a comment appended", "the last byte cut"])
def test_the_load_commits_only_when_what_it_read_matches_the_manifest(env: Env, change: str) -> None:
    """Below the restore's own checks (a file that changed after the restore looked at its size): the load
    hashes and counts what it sends, and the COMMIT waits for size and sha256 to match the manifest. Both
    changes leave SQL that would run; the load still stops before its COMMIT and the data stays."""
    env.write_config(compression="none")
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    path = env.folder / manifest["files"][0]["name"]
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.after_backup (x int)")
        server = pg_client.server_info(conn)
    before = contents_of(env)
    data = path.read_bytes()
    assert data.endswith(b"\n")
    path.write_bytes(data + b"-- appended\n" if change == "a comment appended" else data[:-1])
    ctx = JobContext(config=load_config(str(env.config_path), environ={}).config, log=get_logger(job="postgres"))
    bin_dir = pg_client.find_bin_dir(ctx.config.postgres, server)
    with pytest.raises(IntegrityError, match="changed while it was being read"):
        pg_load.restore_into(ctx, bin_dir, env.database, path, "plain", "none", wipe=True, new_database=False,
                             expected=ManifestFile.model_validate(manifest["files"][0]))
    assert contents_of(env) == before
    path.write_bytes(data)  # as the manifest says: the same call loads it
    loaded = pg_load.restore_into(ctx, bin_dir, env.database, path, "plain", "none", wipe=True,
                                  new_database=False, expected=ManifestFile.model_validate(manifest["files"][0]))
    assert [(name, found.sha256) for name, found in loaded] == [(path.name, manifest["files"][0]["sha256"])]
    with env.connect() as conn:
        assert not conn.execute("SELECT 1 FROM pg_class WHERE relname = 'after_backup'").fetchall()
