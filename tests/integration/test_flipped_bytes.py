"""A flipped byte in an uncompressed or zstd set (PostgreSQL and Redis) is caught by the sha256 comparison
with the manifest, and `verify`, `verify --restore-test` and `restore` all say the file does not match its
checksum. (gzip sets are covered elsewhere; gzip's own CRC would catch the flip without the sha256, which is
why these sets have none.) Nothing is changed and no safety backup is taken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.redis_sample import create_sample, snapshot
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
