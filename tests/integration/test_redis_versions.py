"""Redis and Valkey of other versions, through the real CLI: Redis 6.2 (RDB 9), 7.0 (Debian's, RDB 10),
Valkey 8.1 (RDB 11), Redis 8.2 (RDB 12, standing in for the users' 7.4) and Valkey 9.1 (RDB 80), whatever
version the host's own redis tools are (Debian 12's 7.0.15 on PATH).

Each build is backed up, verified and restored into an empty server of the same build (identical: snapshot,
per-key DEBUG DIGEST-VALUE, encodings, hash-field TTLs) and into every other build (identical, or refused
with exit 3 before any change when the target cannot hold something, naming it and the target's version).
Then the users' own situation, a 600 MiB value restored with a small memory footprint, and kill -9 of a
restore midway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import Pipeline

from kkua_backupd.demo.redis_sample import Snapshot, compare, create_sample, scan_keys, snapshot
from kkua_backupd.proc.workers import descendants
from kkua_backupd.sources.redis.local import LocalRedis
from tests.conftest import RedisEnv
from tests.support.helpers import alive, cmdline, describe, output, wait_for
from tests.support.redis_bulk import fill_bulk
from tests.support.redis_versions import BUILD_NAMES, ServerBuild, build, build_or_skip

SMALL = 64 * 1024  # the sample's "large" value in the cross-version matrix (the full 5 MiB elsewhere)
MONTH_MS = 30 * 24 * 3600 * 1000
MIB = 1024 * 1024
HUGE_MIB = 600  # past proto-max-bulk-len (512 MB): written in pieces
RSS_LIMIT_KB = 100 * 1024

Restore = subprocess.CompletedProcess[str]


# ----------------------------------------------------------------------------------------------
# Reading a server of any build


_PEXPIRETIME_LUA = (
    "local t = redis.call('PTTL', KEYS[1]) "
    "if t < 0 then return t end "
    "local now = redis.call('TIME') "
    "return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + t")


class _Pipeline62(Pipeline):
    """Redis 6.2 has no PEXPIRETIME: the same absolute expiry, computed by the server from PTTL and TIME."""

    def pexpiretime(self, name: Any) -> Any:
        return self.execute_command("EVAL", _PEXPIRETIME_LUA, 1, name)


class _Redis62(redis.Redis):
    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _Pipeline62(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def client_source(server: LocalRedis, server_build: ServerBuild) -> Callable[[int], redis.Redis]:
    """What redis_sample wants to read a server: a client per database (PEXPIRETIME emulated on 6.2)."""
    cls = _Redis62 if server_build.version_tuple < (7, 0) else redis.Redis

    def make(db: int) -> redis.Redis:
        return cls(host="127.0.0.1", port=server.port, db=db, password=server.password)

    return make


def snap(server: LocalRedis, server_build: ServerBuild) -> Snapshot:
    return snapshot(client_source(server, server_build))


_STREAM_INFO_CORE = {"length", "last-generated-id", "groups"}
_STREAM_INFO_7 = {"entries-added", "max-deleted-entry-id"}
_GROUP_CORE = {"name", "consumers", "pending", "last-delivered-id"}
_GROUP_7 = {"entries-read", "lag"}


def _keep(frozen: Any, fields: set[str]) -> Any:
    return tuple((k, v) for k, v in frozen if k in fields)


def portable(snap_: Snapshot, *, both_7: bool) -> Snapshot:
    """A snapshot without what XINFO reports differently by server version (not data): streams keep their
    entries, groups, consumers and pending entries, and the 7.0+ counters only when both sides have them."""
    info_fields = _STREAM_INFO_CORE | (_STREAM_INFO_7 if both_7 else set())
    group_fields = _GROUP_CORE | (_GROUP_7 if both_7 else set())
    out: Snapshot = {}
    for where, (kind, value, ttl) in snap_.items():
        if kind != "stream":
            out[where] = (kind, value, ttl)
            continue
        info, entries, groups = value
        out[where] = (kind, (_keep(info, info_fields), entries,
                             tuple((_keep(group, group_fields), tuple(_keep(c, {"name", "pending"}) for c in consumers),
                                    pending) for group, consumers, pending in groups)), ttl)
    return out


def all_keys(server: LocalRedis) -> dict[int, list[bytes]]:
    """Every key per database that has any (SCAN, deduplicated, sorted)."""
    with server.client() as client:
        dbs = [int(name[2:]) for name in client.info("keyspace") if name.startswith("db")]
    found: dict[int, list[bytes]] = {}
    for db in dbs:
        with server.client(db) as client:
            found[db] = sorted({key for batch in scan_keys(client) for key in batch})
    return found


def per_key(server: LocalRedis, command: str) -> dict[tuple[int, bytes], Any]:
    """`DEBUG DIGEST-VALUE key` or `OBJECT ENCODING key` of every key (per database)."""
    out: dict[tuple[int, bytes], Any] = {}
    for db, keys in all_keys(server).items():
        with server.client(db) as client:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                if command == "digest":
                    pipe.execute_command("DEBUG", "DIGEST-VALUE", key)
                else:
                    pipe.execute_command("OBJECT", "ENCODING", key)
            for key, value in zip(keys, pipe.execute(), strict=True):
                out[(db, key)] = value[0] if isinstance(value, list) else value
    return out


def field_ttls(server: LocalRedis, server_build: ServerBuild) -> dict[tuple[int, bytes], dict[bytes, int]]:
    """HPEXPIRETIME of every field of every hash that has at least one field TTL ({} without the feature)."""
    if not server_build.hash_field_ttl:
        return {}
    out: dict[tuple[int, bytes], dict[bytes, int]] = {}
    for db, keys in all_keys(server).items():
        with server.client(db) as client:
            for key in keys:
                if client.type(key) != b"hash":
                    continue
                fields = client.hkeys(key)
                times = client.execute_command("HPEXPIRETIME", key, "FIELDS", len(fields), *fields)
                with_ttl = {f: int(t) for f, t in zip(fields, times, strict=True) if int(t) >= 0}
                if with_ttl:
                    out[(db, key)] = with_ttl
    return out


def is_empty(server: LocalRedis) -> bool:
    with server.client() as client:
        return not any(name.startswith("db") for name in client.info("keyspace"))


# ----------------------------------------------------------------------------------------------
# Data


def add_version_keys(server: LocalRedis, server_build: ServerBuild) -> None:
    """Keys in the small and the big encodings of every type, under names of their own."""
    with server.client(0) as r:
        pipe = r.pipeline(transaction=False)
        pipe.rpush("ver:list:small", *[f"e{i}" for i in range(5)])
        pipe.rpush("ver:list:big", *[f"element-{i}-{'z' * 30}" for i in range(20000)])
        pipe.hset("ver:hash:small", mapping={"a": "1", "b": "2"})
        pipe.hset("ver:hash:long-value", mapping={"short": "x", "long": "v" * 300})  # hashtable by value size
        pipe.hset("ver:hash:big", mapping={f"f{i}": f"v{i}" for i in range(3000)})
        pipe.sadd("ver:set:ints", *range(100))
        pipe.sadd("ver:set:big", *[f"m{i}" for i in range(5000)])
        pipe.zadd("ver:zset:small", {"a": 1, "b": 2})
        pipe.zadd("ver:zset:long-member", {"m" * 200: 1.0, "n": 2.0})  # skiplist by member size
        pipe.zadd("ver:zset:big", {f"p{i}": i / 3 for i in range(5000)})
        pipe.set("ver:string:int", 12345)
        pipe.execute()


def add_field_ttl_keys(server: LocalRedis, server_build: ServerBuild) -> int:
    """Hashes with field TTLs (a month away), small (listpackex) and big (hashtable), in db 0 and 1; returns
    how many hashes. Needs a build with hash_field_ttl."""
    assert server_build.hash_field_ttl, server_build
    with server.client(0) as r:
        far = int(r.time()[0]) * 1000 + MONTH_MS
        r.execute_command("HSETEX", "hfe:small", "PXAT", far, "FIELDS", 2, "a", "1", "b", "2")
        r.hset("hfe:small", "no-ttl", "3")
        r.hset("hfe:big", mapping={f"f{i}": f"value-{i}" for i in range(2000)})
        r.execute_command("HPEXPIREAT", "hfe:big", far + 5000, "FIELDS", 100, *[f"f{i}" for i in range(100)])
        r.hset("hfe:key-ttl-too", mapping={"x": "1", "y": "2"})
        r.execute_command("HPEXPIREAT", "hfe:key-ttl-too", far + 7000, "FIELDS", 1, "x")
        r.pexpireat("hfe:key-ttl-too", far + 60_000)
    with server.client(1) as r:
        r.hset("hfe:db1", mapping={"k": "v", "k2": "v2"})
        r.execute_command("HPEXPIREAT", "hfe:db1", far + 9000, "FIELDS", 2, "k", "k2")
    return 4


# ----------------------------------------------------------------------------------------------
# The CLI


def backup_set(world: RedisEnv) -> dict[str, Any]:
    """`backup redis` (exit 0), then the new set as `list --json` shows it, newest first."""
    result = world.run("backup", "redis")
    assert result.returncode == 0, describe(result)
    listing = world.run("--json", "list", "redis")
    assert listing.returncode == 0, describe(listing)
    sets = [s for s in json.loads(listing.stdout) if s.get("type", "backup") == "backup"]
    assert sets, f"backup redis made no set: {listing.stdout}"
    return sets[0]  # type: ignore[no-any-return]


def manifest_details(world: RedisEnv, entry: dict[str, Any]) -> dict[str, Any]:
    if "details" in entry:
        return entry["details"]  # type: ignore[no-any-return]
    path = world.folder / f"{entry['prefix']}{entry['id']}.manifest.json"
    return json.loads(path.read_text())["details"]  # type: ignore[no-any-return]


def rdb_name(entry: dict[str, Any]) -> str:
    return next(f["name"] for f in entry["files"] if ".rdb" in f["name"])


def restore_into(world: RedisEnv, target: LocalRedis, spec: str = "latest", **kwargs: Any) -> Restore:
    """`restore redis SPEC --force --flush` into `target` (the config is pointed at it, then back)."""
    source_port = world.server.port
    world.write_config(port=target.port)
    try:
        return world.run("restore", "redis", spec, "--force", "--flush", **kwargs)
    finally:
        world.write_config(port=source_port)


def refusal_problems(result: Restore, target: LocalRedis, target_build: ServerBuild, what: list[str]) -> list[str]:
    """What is wrong with a refusal: exit 3, the target still empty, a message naming `what` (regexes) and
    the target's version."""
    text = output(result)
    problems = []
    if result.returncode != 3:
        problems.append(f"exit {result.returncode}, expected 3 (refused)")
    if not is_empty(target):
        problems.append("the target was changed (it is no longer empty)")
    for pattern in what:
        if not re.search(pattern, text, re.IGNORECASE):
            problems.append(f"the message does not name {pattern!r}")
    if target_build.version not in text:
        problems.append(f"the message does not name the target's version {target_build.version}")
    if problems:
        problems.append(f"output: {text.strip()[-600:]}")
    return problems


def identical_problems(source_build: ServerBuild, target: LocalRedis, target_build: ServerBuild, result: Restore,
                       expected: Snapshot, expected_field_ttls: dict[tuple[int, bytes], dict[bytes, int]]) -> list[str]:
    """What differs between the source's dataset (`expected`, and its hash-field TTLs, both taken when the
    backup was) and the restored target."""
    if result.returncode != 0:
        return [f"restore exited {result.returncode}: {output(result).strip()[-800:]}"]
    both_7 = min(source_build.version_tuple, target_build.version_tuple) >= (7, 0)
    found = snap(target, target_build)
    problems = compare(portable(expected, both_7=both_7), portable(found, both_7=both_7))
    if target_build.hash_field_ttl:
        found_ttls = field_ttls(target, target_build)
        if found_ttls != expected_field_ttls:
            wrong = sorted(k for k in found_ttls.keys() | expected_field_ttls.keys()
                           if found_ttls.get(k) != expected_field_ttls.get(k))
            problems.append(f"hash-field TTLs differ on {wrong}")
    return problems


# ----------------------------------------------------------------------------------------------
# Same build: backup, list, verify, restore, identical


def test_backup_verify_and_restore_into_the_same_build(server_build: ServerBuild,
                                                       build_env: Callable[..., RedisEnv],
                                                       start_build_server: Callable[..., LocalRedis]) -> None:
    world = build_env(server_build)
    create_sample(client_source(world.server, server_build))
    add_version_keys(world.server, server_build)
    hashes_with_ttls = add_field_ttl_keys(world.server, server_build) if server_build.hash_field_ttl else 0

    entry = backup_set(world)
    assert entry["status"] == "ok", entry
    details = manifest_details(world, entry)
    assert details["rdb_version"] == server_build.rdb_version, details
    result = world.run("verify", "latest")
    assert result.returncode == 0, describe(result)
    result = world.run("verify", "latest", "--restore-test")
    assert result.returncode == 0, describe(result)

    target = start_build_server(server_build, "target")
    assert is_empty(target)
    result = restore_into(world, target)
    assert result.returncode == 0, describe(result)

    assert compare(snap(world.server, server_build), snap(target, server_build)) == []
    digests = per_key(world.server, "digest")
    assert len(digests) > 300
    found = per_key(target, "digest")
    assert {k for k in digests if digests[k] != found.get(k)} == set()
    assert found.keys() == digests.keys()
    with world.server.client() as a, target.client() as b:
        assert a.execute_command("DEBUG", "DIGEST") == b.execute_command("DEBUG", "DIGEST")
    encodings = per_key(world.server, "encoding")
    assert per_key(target, "encoding") == encodings
    assert {encodings[(0, b"ver:list:big")], encodings[(0, b"ver:hash:big")],
            encodings[(0, b"ver:zset:big")]} == {b"quicklist", b"hashtable", b"skiplist"}
    ttls = field_ttls(world.server, server_build)
    assert len(ttls) == hashes_with_ttls
    assert field_ttls(target, server_build) == ttls


# ----------------------------------------------------------------------------------------------
# Across builds


def test_cross_version_restores_are_identical_or_refused_before_any_change(
        server_build: ServerBuild, build_env: Callable[..., RedisEnv],
        start_build_server: Callable[..., LocalRedis]) -> None:
    """The backup of this build into an empty server of every other build: identical, or refused (exit 3)
    with the target untouched. Hash-field TTLs cannot go into a server without them."""
    source = server_build
    world = build_env(source)
    create_sample(client_source(world.server, source), large_value_size=SMALL)
    add_version_keys(world.server, source)
    plain = backup_set(world)
    assert manifest_details(world, plain)["rdb_version"] == source.rdb_version
    plain_snapshot = snap(world.server, source)

    with_ttls: dict[str, Any] | None = None
    if source.hash_field_ttl:
        add_field_ttl_keys(world.server, source)
        with_ttls = backup_set(world)
        assert with_ttls["id"] != plain["id"]
    ttl_snapshot = snap(world.server, source)
    source_field_ttls = field_ttls(world.server, source)
    assert len(source_field_ttls) == (4 if source.hash_field_ttl else 0)

    problems: list[str] = []
    for name in BUILD_NAMES:
        if name == source.name:
            continue
        target_build = build_or_skip(name)
        cell = f"{source.name} -> {name}"
        target = start_build_server(target_build, f"target-{name}")
        # The dataset as it was at the plain backup: the field-TTL keys are not in it.
        result = restore_into(world, target, rdb_name(plain))
        expected = {k: v for k, v in plain_snapshot.items() if not k[1].startswith(b"hfe:")}
        problems += [f"{cell} (plain): {p}" for p in
                     identical_problems(source, target, target_build, result, expected, {})]
        if with_ttls is not None:
            with target.client() as client:
                client.flushall()
            result = restore_into(world, target, rdb_name(with_ttls))
            if not target_build.hash_field_ttl:
                problems += [f"{cell} (field TTLs): {p}" for p in
                             refusal_problems(result, target, target_build, [r"field", r"TTL|expir"])]
            elif result.returncode == 3:  # allowed: a format the other family cannot take, said clearly
                problems += [f"{cell} (field TTLs, refused): {p}" for p in
                             refusal_problems(result, target, target_build, [r"field"])]
            else:
                problems += [f"{cell} (field TTLs): {p}" for p in
                             identical_problems(source, target, target_build, result, ttl_snapshot,
                                                source_field_ttls)]
        target.close()
    assert problems == [], "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# The users' situation: a Redis newer than the host's redis-tools


def test_redis_newer_than_the_host_tools(build_env: Callable[..., RedisEnv],
                                         start_build_server: Callable[..., LocalRedis]) -> None:
    """Redis 8.2 (RDB 12, as the users' 7.4 in docker) with Debian's redis-tools 7.0.15 first on PATH."""
    newer = build_or_skip("redis-8.2")
    host_tools = subprocess.run(["redis-check-rdb", "--version"], capture_output=True, text=True, check=False)
    assert "7.0.15" in host_tools.stdout + host_tools.stderr, "this test wants Debian 12's redis-tools on PATH"
    path = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    world = build_env(newer)
    create_sample(world.server, large_value_size=SMALL)
    add_field_ttl_keys(world.server, newer)

    result = world.run("backup", "redis", env=path)
    assert result.returncode == 0, describe(result)
    entry = json.loads(world.run("--json", "list", "redis", env=path, check=True).stdout)[0]
    assert entry["status"] == "ok" and manifest_details(world, entry)["rdb_version"] == 12
    for args in (("verify", "latest"), ("verify", "latest", "--restore-test")):
        result = world.run(*args, env=path)
        assert result.returncode == 0, describe(result)

    target = start_build_server(newer, "target")
    result = restore_into(world, target, env=path)
    assert result.returncode == 0, describe(result)
    assert compare(snap(world.server, newer), snap(target, newer)) == []
    assert field_ttls(target, newer) == field_ttls(world.server, newer) != {}


# ----------------------------------------------------------------------------------------------
# A 600 MiB value, restored without holding it in memory


_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("KKUA_MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _mib(block: bytes, i: int) -> bytes:
    """MiB number i of the huge value: a random block made distinct per MiB (LZF and gzip cannot shrink it)."""
    return i.to_bytes(8, "big") + block[8:]


def _write_huge(client: redis.Redis, key: str) -> str:
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    client.set(key, b"")
    for i in range(HUGE_MIB):
        piece = _mib(block, i)
        client.append(key, piece)
        digest.update(piece)
    return digest.hexdigest()


def _read_huge(client: redis.Redis, key: str) -> tuple[int, str]:
    length = int(client.strlen(key))
    digest = hashlib.sha256()
    for start in range(0, length, 8 * MIB):
        digest.update(client.getrange(key, start, min(start + 8 * MIB, length) - 1))
    return length, digest.hexdigest()


@pytest.mark.timeout(900)
def test_600_mib_value_is_restored_with_a_small_memory_footprint(
        build_env: Callable[..., RedisEnv], start_build_server: Callable[..., LocalRedis]) -> None:
    server_build = build_or_skip("redis-8.2")
    # APPEND and RESTORE both check the whole value against proto-max-bulk-len (512 MB by default): a server
    # that holds a 600 MiB string has it raised, and so must the server it is restored into.
    big = {"proto-max-bulk-len": "1gb"}
    world = build_env(server_build, settings=big)
    with world.server.client(socket_timeout=120) as client:
        want = _write_huge(client, "huge")
        client.set("small", "beside it")
    result = world.run("backup", "redis", timeout=600)
    assert result.returncode == 0, describe(result)

    target = start_build_server(server_build, "target", big)
    world.write_config(port=target.port)
    command = [sys.executable, "-c", _RSS_WRAPPER, sys.executable, "-m", "kkua_backupd",
               "restore", "redis", "latest", "--force", "--flush"]
    run = subprocess.run(command, capture_output=True, text=True, env=world.cli_env(), timeout=600, check=False)
    assert run.returncode == 0, describe(run)
    peak = re.search(r"KKUA_MAXRSS_KB (\d+)", run.stderr)
    assert peak is not None, run.stderr
    print(f"restore of a {HUGE_MIB} MiB value: peak RSS {int(peak.group(1)) // 1024} MiB")  # shown with -s
    with target.client(socket_timeout=120) as client:
        assert _read_huge(client, "huge") == (HUGE_MIB * MIB, want)
        assert client.get("small") == b"beside it"
    assert int(peak.group(1)) < RSS_LIMIT_KB, (
        f"the restore's processes peaked at {int(peak.group(1)) // 1024} MiB resident (limit "
        f"{RSS_LIMIT_KB // 1024} MiB) for a {HUGE_MIB} MiB value")


# ----------------------------------------------------------------------------------------------
# kill -9 midway


def test_kill_9_midway_through_a_logical_restore_leaves_nothing_behind(
        build_env: Callable[..., RedisEnv], start_build_server: Callable[..., LocalRedis], workdir: Path) -> None:
    server_build = build("redis-7.0")  # Debian's: always here
    world = build_env(server_build)
    with world.server.client() as client:
        fill_bulk(client, 300_000, seed=7)
        pipe = client.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"blob:{i}", os.urandom(256 * 1024))
        pipe.execute()
    entry = backup_set(world)

    target = start_build_server(server_build, "target")
    tmp = workdir / "tmp"
    tmp.mkdir()
    world.write_config(port=target.port)
    proc = world.popen("restore", "redis", "latest", "--force", "--flush", env={"TMPDIR": str(tmp)})
    ours: set[int] = set()

    def keys_arrived() -> bool:
        ours.update(descendants(proc.pid))
        if proc.poll() is not None:
            return True
        with target.client() as client:
            return int(client.dbsize()) > 0

    try:
        wait_for(keys_arrived, "the first restored keys on the target", timeout=120)
        ours.update(descendants(proc.pid))
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the restore ended (exit {proc.returncode}) before keys arrived or it could be "
                        f"killed:\n{out}\n{err}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    with target.client() as client:
        assert 0 < int(client.dbsize()) < 300_200, "the restore was not midway when killed"

    left: dict[int, str] = {}

    def all_gone() -> bool:
        left.clear()
        left.update({pid: " ".join(cmdline(pid)) or "?" for pid in ours if alive(pid)})
        return not left

    try:
        wait_for(all_gone, "the killed restore's processes to go", timeout=15)
    except pytest.fail.Exception:
        pytest.fail(f"the killed restore left processes behind: {left}")
    finally:
        for pid in left:  # ours: the killed CLI's descendants
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("kkua-redis-restore-"))
    assert left == [], f"temporary folders left behind in {tmp}: {left}"

    world.write_config()
    result = world.run("verify", rdb_name(entry))
    assert result.returncode == 0, describe(result)


# ----------------------------------------------------------------------------------------------
# Function libraries


LIBRARY = "#!lua name=kkualib\nredis.register_function('kkua_one', function(keys, args) return 1 end)"


def test_function_libraries_are_restored_or_refused(build_env: Callable[..., RedisEnv],
                                                    start_build_server: Callable[..., LocalRedis]) -> None:
    """A logical restore loads the backup's function libraries (FUNCTION LOAD REPLACE); a target without
    functions (Redis 6.2) is refused before any change, naming them."""
    source_build = build("redis-7.0")
    world = build_env(source_build)
    with world.server.client() as client:
        client.execute_command("FUNCTION", "LOAD", LIBRARY)
        client.set("k", "v")
    backup_set(world)

    target = start_build_server(build_or_skip("valkey-9.1"), "target")
    result = restore_into(world, target)
    assert result.returncode == 0, describe(result)
    with target.client() as client:
        assert client.fcall("kkua_one", 0) == 1 and client.get("k") == b"v"

    old_build = build_or_skip("redis-6.2")
    old = start_build_server(old_build, "old")
    result = restore_into(world, old)
    assert refusal_problems(result, old, old_build, [r"function librar", r"6\.2\.14"]) == []
