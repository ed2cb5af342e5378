"""redis_values against real servers of every build (Redis 6.2, 7.0, 8.2; Valkey 8.1, 9.1): DUMP payloads of
every type and encoding are decoded and compared with what the server returns, re-encoded element-wise and
RESTOREd into every other build, rebuilt with commands, and 7.x streams are RESTOREd into Redis 6.2."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kkua_backupd.sources.redis.local import LocalRedis
from kkua_backupd.sources.redis.values import (
    Decoded,
    NotPortable,
    _Reader,  # to look at quicklist nodes' string encodings
    decode,
    dump_payload,
    encode_portable,
    stream_as_v1,
    value_commands,
)
from tests.support.redis_versions import BUILD_NAMES, BuildUnavailable, ServerBuild, build, local_redis
from tests.support.wheels import on_ci

Servers = dict[str, tuple[ServerBuild, LocalRedis]]
TARGET_DB = 1
# Far enough in the future that no field expires during the test, fixed so the expected values are known.
FIELD_EXPIRY_MS = int(time.time() * 1000) + 10 * 86_400_000


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One running server per available build, sample keys in db 0 (quicklist nodes LZF-compressed)."""
    running: Servers = {}
    try:
        for name in BUILD_NAMES:
            try:
                server_build = build(name)
            except BuildUnavailable as exc:
                if on_ci():
                    pytest.fail(f"server build unavailable on CI: {exc}", pytrace=False)
                continue
            server = local_redis(server_build, tmp_path_factory.mktemp(name), password=None,
                                 settings={"list-compress-depth": "1"})
            server.start()
            running[name] = (server_build, server)
            populate(server.client(), server_build)
        if len(running) < 2:
            pytest.skip("fewer than two server builds are available")
        yield running
    finally:
        for _, server in running.values():
            server.close()


def populate(c: redis.Redis, server_build: ServerBuild) -> None:
    """Keys of every type in each of its encodings (small: listpack/ziplist/intset; large: hashtable,
    skiplist, several quicklist nodes), with integers, binary and Korean UTF-8 data."""
    korean = "안녕하세요, 백업 세계".encode()
    binary = bytes(range(256))
    c.set("str:short", "hello")
    c.set("str:int", 12345)
    c.set("str:neg", -7)
    c.set("str:int64", 1234567890123)
    c.set("str:lzf", b"a" * 100 + b"b" * 50)
    c.set("str:korean", korean * 3)
    c.set("str:binary", binary)
    c.set("str:big", (korean + binary) * 800)
    c.set("str:empty", b"")
    c.set(korean, "a Korean key name")
    ints = [0, 12, 13, 127, 128, -1, -4096, 4095, 32767, -32768, 8388607, -8388608, 2**31 - 1, -(2**31),
            2**63 - 1, -(2**63)]
    strings = [b"", b"x", b"s" * 63, b"m" * 64, b"t" * 4095, b"u" * 4096, korean, binary]
    c.rpush("list:small", *ints, *strings[:3], korean)
    c.rpush("list:mixed", *ints, *strings)
    c.rpush("list:big", *[f"item-{i}-".encode() * 3 for i in range(3000)])
    c.rpush("list:bigstr", b"L" * 20000, b"z")
    if server_build.has_debug_directive:  # PLAIN quicklist nodes (Redis/Valkey >= 7.0)
        c.execute_command("DEBUG", "QUICKLIST-PACKED-THRESHOLD", "1000")
        c.rpush("list:plain", b"p" * 5000, b"small", b"q" * 3000)
        c.execute_command("DEBUG", "QUICKLIST-PACKED-THRESHOLD", str(2**30))
    c.sadd("set:int16", 1, 2, 3, -5)
    c.sadd("set:int32", 1, 100000)
    c.sadd("set:int64", 1, 2**40, -(2**62))
    c.sadd("set:small", "a", "b", korean, binary[:10])
    c.sadd("set:big", *[f"member-{i}" for i in range(1000)])
    c.sadd("set:bigints", *range(1000))
    scores = {"inf": math.inf, "-inf": -math.inf, "tiny": 1e-300, "tenth": 0.1, "int": 3, "neg": -2.5,
              korean.decode(): 1 / 3}
    c.zadd("zset:small", scores)
    c.zadd("zset:big", {**scores, **{f"m{i}": i / 7 for i in range(500)}})
    c.zadd("zset:longmember", {"x" * 100: 1.5, "y": 2})
    c.hset("hash:small", mapping={"f": "v", "n": 12, "neg": -99999, "k": korean})
    c.hset("hash:big", mapping={f"field-{i}": f"value-{i}" for i in range(600)})
    c.hset("hash:longvalue", mapping={"f": "v" * 100, "b": binary})
    if server_build.hash_field_ttl:
        c.hset("hashttl:small", mapping={"a": "1", "b": "2", "c": "3"})
        c.hset("hashttl:big", mapping={f"f{i}": f"v{i}" for i in range(700)})
        for key, fields in (("hashttl:small", ["a", "c"]), ("hashttl:big", [f"f{i}" for i in range(0, 700, 7)])):
            for n, name in enumerate(fields):
                c.execute_command("HPEXPIREAT", key, FIELD_EXPIRY_MS + n, "FIELDS", 1, name)


def source_keys(c: redis.Redis) -> list[bytes]:
    return sorted(k for k in c.scan_iter(count=1000) if c.type(k) != b"stream")


def server_view(c: redis.Redis, key: bytes, *, field_ttls: bool) -> tuple[Any, ...]:
    """What the server returns for a key, in a comparable form."""
    kind = c.type(key).decode()
    if kind == "string":
        return ("string", c.get(key))
    if kind == "list":
        return ("list", c.lrange(key, 0, -1))
    if kind == "set":
        return ("set", sorted(c.smembers(key)))
    if kind == "zset":
        return ("zset", sorted(c.zrange(key, 0, -1, withscores=True)))
    assert kind == "hash", kind
    pairs = c.hgetall(key)
    ttls: dict[bytes, int] = {}
    if field_ttls:
        names = list(pairs)
        times = c.execute_command("HPEXPIRETIME", key, "FIELDS", len(names), *names)
        ttls = {name: int(when) for name, when in zip(names, times, strict=True) if int(when) >= 0}
    return ("hash", sorted(pairs.items()), ttls)


def decoded_view(d: Decoded, *, field_ttls: bool) -> tuple[Any, ...]:
    if d.kind == "string":
        return ("string", d.string)
    if d.kind == "list":
        return ("list", d.items)
    if d.kind == "set":
        return ("set", sorted(d.items))
    if d.kind == "zset":
        return ("zset", sorted(d.scores))
    assert d.kind == "hash", d.kind
    return ("hash", sorted(d.pairs), dict(d.field_ttls) if field_ttls else {})


def dump_and_decode(c: redis.Redis, key: bytes, server_build: ServerBuild) -> tuple[int, Decoded]:
    payload = c.dump(key)
    assert isinstance(payload, bytes)
    rdb_type, value, version = payload[0], payload[1:-10], int.from_bytes(payload[-10:-8], "little")
    assert version == server_build.rdb_version
    assert dump_payload(rdb_type, value, version) == payload  # our CRC-64 and trailer match the server's
    return rdb_type, decode(rdb_type, value, valkey=server_build.rdb_version >= 80)


def lzf_nodes(rdb_type: int, value: bytes) -> int:
    """How many quicklist nodes of a type 14/18 list are stored LZF-compressed."""
    r = _Reader(value)
    compressed = 0
    for _ in range(r.length("quicklist")):
        if rdb_type == 18:
            r.length("container")
        compressed += r.buf[r.pos] == 0xC3
        r.string("node")
    return compressed


# The encodings each build must have produced, so the test proves it covered them.
EXPECTED_TYPES = {
    "redis-6.2": {0, 2, 4, 5, 11, 12, 13, 14},
    "redis-7.0": {0, 2, 4, 5, 11, 16, 17, 18},
    "valkey-8.1": {0, 2, 4, 5, 11, 16, 17, 18, 20},
    "redis-8.2": {0, 2, 4, 5, 11, 16, 17, 18, 20, 24, 25},
    "valkey-9.1": {0, 2, 4, 5, 11, 16, 17, 18, 20, 22},
}


@pytest.mark.parametrize("source", BUILD_NAMES)
def test_decode_matches_server(servers: Servers, source: str) -> None:
    if source not in servers:
        pytest.skip(f"{source} is not available")
    server_build, server = servers[source]
    c = server.client()
    seen: set[int] = set()
    big_list = c.dump("list:big")
    assert isinstance(big_list, bytes)
    assert lzf_nodes(big_list[0], big_list[1:-10]) >= 2  # list-compress-depth 1: inner nodes are LZF
    for key in source_keys(c):
        rdb_type, decoded = dump_and_decode(c, key, server_build)
        seen.add(rdb_type)
        assert decoded_view(decoded, field_ttls=server_build.hash_field_ttl) == \
            server_view(c, key, field_ttls=server_build.hash_field_ttl), key
    assert EXPECTED_TYPES[source] <= seen, f"{source} produced types {sorted(seen)}"


def other_targets(servers: Servers, source: str) -> Iterator[tuple[ServerBuild, redis.Redis]]:
    for name, (target_build, target) in servers.items():
        if name != source:
            client = target.client(db=TARGET_DB)
            client.flushdb()
            yield target_build, client


@pytest.mark.parametrize("source", BUILD_NAMES)
def test_portable_restore_into_every_other_build(servers: Servers, source: str) -> None:
    if source not in servers:
        pytest.skip(f"{source} is not available")
    server_build, server = servers[source]
    c = server.client()
    keys = source_keys(c)
    decoded = {key: dump_and_decode(c, key, server_build)[1] for key in keys}
    expected = {key: server_view(c, key, field_ttls=False) for key in keys}
    restored = 0
    for target_build, target in other_targets(servers, source):
        for key, value in decoded.items():
            if value.field_ttls:
                with pytest.raises(NotPortable):
                    encode_portable(value)
                continue
            rdb_type, body = encode_portable(value)
            target.restore(key, 0, dump_payload(rdb_type, body, target_build.rdb_version), replace=True)
            assert server_view(target, key, field_ttls=False) == expected[key], (target_build.name, key)
            restored += 1
    assert restored >= len(keys)


@pytest.mark.parametrize("source", BUILD_NAMES)
def test_value_commands_into_every_other_build(servers: Servers, source: str) -> None:
    if source not in servers:
        pytest.skip(f"{source} is not available")
    server_build, server = servers[source]
    c = server.client()
    max_bulk = 2000
    keys = source_keys(c)
    decoded = {key: dump_and_decode(c, key, server_build)[1] for key in keys}
    for target_build, target in other_targets(servers, source):
        with_ttls = target_build.hash_field_ttl
        for key, value in decoded.items():
            target.delete(key)
            for command in value_commands(key, value, max_bulk=max_bulk, field_ttls=with_ttls):
                assert sum(len(a) for a in command) <= max_bulk or len(command) <= 4  # one element alone
                target.execute_command(*command)
            source_view = server_view(c, key, field_ttls=with_ttls and server_build.hash_field_ttl)
            assert server_view(target, key, field_ttls=with_ttls and server_build.hash_field_ttl) == source_view, \
                (target_build.name, key)


def make_stream(c: redis.Redis, key: str) -> None:
    """A stream over several listpack nodes with deleted entries, two groups, pending entries and consumers."""
    for i in range(1, 251):
        c.xadd(key, {"n": i, "text": f"항목 {i}", "bin": bytes([i % 256]) * 3}, id=f"{1000 + i}-{i % 3}")
    c.xgroup_create(key, "workers", id="0")
    c.xgroup_create(key, "late", id="$")
    c.xreadgroup("workers", "alice", {key: ">"}, count=5)
    c.xreadgroup("workers", "bob", {key: ">"}, count=3)
    first_ids = [entry_id for entry_id, _ in c.xrange(key, count=2)]
    c.xack(key, "workers", first_ids[0])
    c.xdel(key, first_ids[1], "1100-1")


def stream_view(c: redis.Redis, key: str) -> dict[str, Any]:
    """XINFO STREAM FULL without what Redis 6.2 lacks (entries-added, max-deleted id, entries-read, lag,
    active-time, recorded-first-entry-id)."""
    info = c.xinfo_stream(key, full=True)

    def consumers(group: dict[Any, Any]) -> list[tuple[Any, ...]]:
        return [(x[b"name"] if b"name" in x else x["name"],
                 x.get(b"seen-time", x.get("seen-time")), x.get(b"pel-count", x.get("pel-count")),
                 x.get(b"pending", x.get("pending"))) for x in group[next(k for k in group
                                                                          if k in (b"consumers", "consumers"))]]

    def get(d: dict[Any, Any], name: str) -> Any:
        return d[name] if name in d else d[name.encode()]

    groups = [(get(g, "name"), get(g, "last-delivered-id"), get(g, "pel-count"), get(g, "pending"), consumers(g))
              for g in get(info, "groups")]
    return {"length": get(info, "length"), "last": get(info, "last-generated-id"),
            "entries": get(info, "entries"), "groups": groups}


@pytest.mark.parametrize("source", [name for name in BUILD_NAMES if name != "redis-6.2"])
def test_stream_as_v1_restores_into_redis_62(servers: Servers, source: str) -> None:
    if source not in servers or "redis-6.2" not in servers:
        pytest.skip(f"{source} or redis-6.2 is not available")
    server_build, server = servers[source]
    old_build, old = servers["redis-6.2"]
    c = server.client()
    c.delete("stream:s")
    make_stream(c, "stream:s")
    payload = c.dump("stream:s")
    assert isinstance(payload, bytes)
    rdb_type, value = payload[0], payload[1:-10]
    assert rdb_type in (19, 21)
    assert decode(rdb_type, value, valkey=server_build.rdb_version >= 80).kind == "stream"
    target = old.client(db=TARGET_DB)
    target.delete("stream:s")
    with pytest.raises(redis.ResponseError):  # as it is, 6.2 refuses it (unknown type or version)
        target.restore("stream:s", 0, dump_payload(rdb_type, value, old_build.rdb_version))
    target.restore("stream:s", 0, dump_payload(15, stream_as_v1(rdb_type, value), old_build.rdb_version))
    assert stream_view(target, "stream:s") == stream_view(c, "stream:s")
    # and the type-15 form is still a valid stream for the newer server itself
    c.restore("stream:v1", 0, dump_payload(15, stream_as_v1(rdb_type, value), server_build.rdb_version),
              replace=True)
    assert stream_view(c, "stream:v1") == stream_view(c, "stream:s")
    c.delete("stream:s", "stream:v1")


def test_builds_available_path(servers: Servers) -> None:
    for server_build, _ in servers.values():
        assert Path(server_build.bin_dir, "redis-server").exists()
