"""A Redis sample dataset for tests, the demo and the benchmark, and a way to compare two datasets.

`create_sample` writes every data type in every encoding Redis 7 has (small and large, so both the
compact and the general encodings appear), binary and Korean values, a 5 MiB value, streams with consumer
groups and pending entries, HyperLogLogs and keys with TTLs, spread over databases 0, 1 and 5.
`snapshot` reads a whole server back into plain comparable values (walking it with SCAN, never `KEYS *`)
and `compare` lists the differences between two snapshots.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import redis

# What a snapshot holds per key: (type, value in a comparable form, expiry time in Unix ms or -1 without
# one). The expiry is absolute (PEXPIRETIME), so two snapshots taken seconds apart still compare equal.
KeyState = tuple[str, Any, int]
Snapshot = dict[tuple[int, bytes], KeyState]

SAMPLE_DBS: tuple[int, ...] = (0, 1, 5)
LARGE_VALUE_SIZE = 5 * 1024 * 1024
_SCAN_COUNT = 1000
_FAR_TTL_MS = 30 * 24 * 3600 * 1000  # a month: still there long after any test
_SHORT_TTL_MS = 10 * 60 * 1000  # minutes: expires on a real server, not during a test
# Stream and consumer-group fields that change by themselves with time or are memory-layout details.
_VOLATILE_FIELDS = {"idle", "inactive", "seen-time", "active-time", "time_since_delivered", "radix-tree-keys",
                    "radix-tree-nodes", "first-entry", "last-entry"}


class _HasClient(Protocol):
    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis: ...


ClientSource = _HasClient | Callable[[int], redis.Redis]


def _client_for(source: ClientSource, db: int) -> redis.Redis:
    """A client on database `db` from a LocalRedis-like object or a factory `db -> redis.Redis`."""
    if hasattr(source, "client"):
        return source.client(db)
    assert callable(source)
    return source(db)


def _korean(i: int) -> str:
    names = ("김민준", "이서연", "박지호", "최수아", "정예준", "강하은")
    return f"{names[i % len(names)]}님의 점수 {i}점 — 끄아 게임"


def create_sample(source: ClientSource, *, large_value_size: int = LARGE_VALUE_SIZE) -> dict[int, int]:
    """Fill databases 0, 1 and 5 with the sample dataset (every type and encoding); returns keys per db.

    Existing keys with the same names are replaced. Raises redis.RedisError if the server refuses a write.
    """
    counts: dict[int, int] = {}
    for db in SAMPLE_DBS:
        client = _client_for(source, db)
        try:
            _fill_db(client, db, large_value_size)
            counts[db] = int(client.dbsize())
        finally:
            client.close()
    return counts


def _fill_db(r: Any, db: int, large_value_size: int) -> None:
    p = f"db{db}:"
    pipe = r.pipeline(transaction=False)
    # Strings: every byte value, an int-encoded number, a float, embstr/raw sizes, Korean text.
    pipe.set(f"{p}string:binary", bytes(range(256)) * 4)
    pipe.set(f"{p}string:zero-bytes", b"\x00\x00\r\n\x00")
    pipe.set(f"{p}string:int", 1234567890)
    pipe.set(f"{p}string:negative", -42)
    pipe.set(f"{p}string:float", "3.14159265358979")
    pipe.set(f"{p}string:embstr", "short")
    pipe.set(f"{p}string:raw", "x" * 200)
    pipe.set(f"{p}string:empty", b"")
    pipe.set(f"{p}문자열:한국어", "안녕하세요, 끄아 백업 테스트입니다 🎮".encode())
    pipe.incrby(f"{p}counter:visits", 1000 + db)
    # Lists: listpack (small) and quicklist (large, past list-max-listpack-size).
    pipe.rpush(f"{p}list:small", "a", "b", b"\xff\x00", 7, "한글")
    pipe.rpush(f"{p}list:large", *[f"item-{i}-{'y' * (i % 50)}" for i in range(5000)])
    # Hashes: listpack and hashtable.
    pipe.hset(f"{p}hash:small", mapping={"name": "끄아", "level": 12, "bin": bytes(range(32))})
    pipe.hset(f"{p}hash:large", mapping={f"field-{i}": f"value-{i}" * (1 + i % 5) for i in range(2000)})
    # Sets: intset, listpack (small strings), hashtable (large).
    pipe.sadd(f"{p}set:intset", *range(-50, 450))
    pipe.sadd(f"{p}set:small", "red", "green", "blue", "파랑")
    pipe.sadd(f"{p}set:large", *[f"member-{i}" for i in range(3000)])
    # Sorted sets: listpack and skiplist; scores include negatives, fractions and infinities.
    pipe.zadd(f"{p}zset:small", {"alice": 1.5, "bob": -2, "carol": float("inf"), "김철수": 0})
    pipe.zadd(f"{p}zset:large", {f"player-{i}": (i * 7919) % 10007 + i / 1000 for i in range(4000)})
    # HyperLogLog (a string in a special encoding, sparse then dense).
    pipe.pfadd(f"{p}hll:sparse", *[f"visitor-{i}" for i in range(100)])
    pipe.pfadd(f"{p}hll:dense", *[f"visitor-{i}" for i in range(20000)])
    pipe.execute()

    # A big value: 5 MiB of varied bytes (not a repeating pattern a compressor would reduce to nothing).
    rng = random.Random(db)  # noqa: S311 (test data, not a secret)
    pipe.set(f"{p}string:large", rng.randbytes(large_value_size))
    # TTLs: some a month away, some minutes away, set as absolute times so snapshots can compare them.
    now_ms = int(r.time()[0]) * 1000
    for i in range(20):
        key = f"{p}ttl:far:{i}"
        pipe.set(key, f"far {i}")
        pipe.pexpireat(key, now_ms + _FAR_TTL_MS + i * 1000)
    for i in range(10):
        key = f"{p}ttl:minutes:{i}"
        pipe.hset(key, mapping={"session": f"s{i}", "user": _korean(i)})
        pipe.pexpireat(key, now_ms + _SHORT_TTL_MS + i * 1000)
    pipe.set(f"{p}ttl:list", "x")
    pipe.rpush(f"{p}ttl:list-value", *range(10))
    pipe.pexpire(f"{p}ttl:list-value", _FAR_TTL_MS)
    for i in range(50):
        pipe.hset(f"{p}user:{1000 + i}", mapping={"nick": _korean(i), "score": i * 10, "db": db})
    pipe.execute()

    _fill_stream(r, f"{p}stream:events")
    r.xadd(f"{p}stream:empty-after-trim", {"x": "1"})
    r.xtrim(f"{p}stream:empty-after-trim", maxlen=0)


def _fill_stream(r: Any, key: str) -> None:
    """A stream with entries, a deleted entry, two consumer groups, consumers and pending entries."""
    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.xadd(key, {"event": "login" if i % 3 else "게임 시작", "user": str(i % 17), "n": str(i)})
    pipe.execute()
    first = r.xrange(key, count=1)[0][0]
    r.xdel(key, first)
    r.xgroup_create(key, "workers", id="0")
    r.xgroup_create(key, "audit", id="$")
    r.xgroup_createconsumer(key, "audit", "idle-consumer")
    # Two consumers read; one acknowledges part of what it read, the rest stays pending.
    read_a = r.xreadgroup("workers", "worker-a", {key: ">"}, count=40)
    r.xreadgroup("workers", "worker-b", {key: ">"}, count=25)
    ids = [entry_id for _, entries in read_a for entry_id, _ in entries]
    r.xack(key, "workers", *ids[:15])


def databases(client: redis.Redis) -> dict[int, int]:
    """Keys per database from INFO keyspace ({db: keys}), for the databases that have any."""
    info = client.info("keyspace")
    return {int(name[2:]): int(value["keys"]) for name, value in info.items()
            if name.startswith("db") and isinstance(value, dict)}


def scan_keys(client: redis.Redis, count: int = _SCAN_COUNT) -> Iterator[list[bytes]]:
    """The keys of the client's database in SCAN batches (a key may appear twice; callers dedupe)."""
    cursor: Any = 0
    while True:
        cursor, keys = client.scan(cursor=cursor, count=count)
        if keys:
            yield [bytes(k) if isinstance(k, bytes) else k.encode() for k in keys]
        if int(cursor) == 0:
            return


def snapshot(source: ClientSource, dbs: Iterable[int] | None = None, *, group_counters: bool = True) -> Snapshot:
    """Every key of `dbs` (default: every database with keys) as {(db, key): (type, value, ttl_ms)}.

    Expiry times are absolute Unix milliseconds (Redis 7's PEXPIRETIME), -1 for keys without one.
    Values are comparable: bytes for strings, tuples for lists, dicts for hashes, frozensets for sets,
    (member, score) tuples for sorted sets, and for streams their entries, counters, groups, consumers and
    pending entries (idle times left out). `group_counters=False` leaves out each consumer group's
    `entries-read` and `lag`, which a server that replayed an AOF reports as unknown (Redis 7.0's AOF does
    not carry them), so a dataset restored from an AOF can be compared. Raises redis.RedisError.
    """
    if dbs is None:
        first = _client_for(source, 0)
        try:
            dbs = sorted(databases(first))
        finally:
            first.close()
    result: Snapshot = {}
    for db in dbs:
        client = _client_for(source, db)
        try:
            for keys in scan_keys(client):
                found = _read_keys(client, keys, group_counters)
                result.update({(db, key): state for key, state in found.items()})
        finally:
            client.close()
    return result


def _read_keys(client: Any, keys: list[bytes], group_counters: bool) -> dict[bytes, KeyState]:
    pipe: Any = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.pexpiretime(key)
    meta = pipe.execute()
    kinds: list[tuple[bytes, str, int]] = []
    for i, key in enumerate(keys):
        kind = meta[2 * i].decode() if isinstance(meta[2 * i], bytes) else str(meta[2 * i])
        ttl = int(meta[2 * i + 1])
        if kind != "none" and ttl != -2:  # gone between SCAN and now
            kinds.append((key, kind, ttl))
    out: dict[bytes, KeyState] = {}
    pipe = client.pipeline(transaction=False)
    readers: dict[str, Callable[[bytes], Any]] = {
        "string": pipe.get, "list": lambda k: pipe.lrange(k, 0, -1), "hash": pipe.hgetall, "set": pipe.smembers,
        "zset": lambda k: pipe.zrange(k, 0, -1, withscores=True)}
    simple = [(key, kind, ttl) for key, kind, ttl in kinds if kind in readers]
    for key, kind, _ in simple:
        readers[kind](key)
    for (key, kind, ttl), value in zip(simple, pipe.execute(), strict=True):
        out[key] = (kind, _comparable(kind, value), ttl)
    for key, kind, ttl in kinds:
        if kind == "stream":
            out[key] = (kind, _stream_state(client, key, group_counters), ttl)
        elif kind not in readers:
            out[key] = (kind, client.dump(key), ttl)  # a module type: its serialized form
    return out


def _comparable(kind: str, value: Any) -> Any:
    if kind == "list":
        return tuple(value)
    if kind == "set":
        return frozenset(value)
    if kind == "zset":
        return tuple((member, float(score)) for member, score in value)
    if kind == "hash":
        return dict(value)
    return value


def _freeze(value: Any, skip: frozenset[str] = frozenset()) -> Any:
    """Nested dicts and lists as sorted tuples, without the fields that change by themselves (and `skip`)."""
    if isinstance(value, dict):
        return tuple(sorted(((str(k), _freeze(v, skip)) for k, v in value.items()
                             if str(k) not in _VOLATILE_FIELDS and str(k) not in skip), key=lambda kv: kv[0]))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, skip) for v in value)
    return value


def _stream_state(client: Any, key: bytes, group_counters: bool) -> Any:
    skip = frozenset() if group_counters else frozenset({"entries-read", "lag"})
    info = client.xinfo_stream(key)
    groups = []
    for group in client.xinfo_groups(key):
        name = group["name"]
        consumers = client.xinfo_consumers(key, name)
        pending = client.xpending_range(key, name, min="-", max="+", count=1_000_000) if group["pending"] else []
        groups.append((_freeze(group, skip), _freeze(sorted(consumers, key=lambda c: c["name"])), _freeze(pending)))
    return (_freeze(info), tuple(client.xrange(key)), tuple(sorted(groups, key=lambda g: repr(g[0]))))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def compare(expected: Snapshot, found: Snapshot, ttl_tolerance_ms: int = 1500) -> list[str]:
    """The differences between two snapshots, one line each (empty when they are equal).

    Expiry times are equal when both are absent or they differ by at most `ttl_tolerance_ms`.
    """
    problems: list[str] = []
    for db, key in sorted(expected.keys() - found.keys()):
        problems.append(f"db{db} {_short(key)}: missing")
    for db, key in sorted(found.keys() - expected.keys()):
        problems.append(f"db{db} {_short(key)}: unexpected ({found[(db, key)][0]})")
    for where in sorted(expected.keys() & found.keys()):
        (kind_a, value_a, ttl_a), (kind_b, value_b, ttl_b) = expected[where], found[where]
        name = f"db{where[0]} {_short(where[1])}"
        if kind_a != kind_b:
            problems.append(f"{name}: type {kind_a} expected, found {kind_b}")
            continue
        if value_a != value_b:
            problems.append(f"{name}: {kind_a} value differs: expected {_short(value_a)}, found {_short(value_b)}")
        if (ttl_a < 0) != (ttl_b < 0) or abs(ttl_a - ttl_b) > ttl_tolerance_ms:
            problems.append(f"{name}: expiry expected at {ttl_a} ms, found {ttl_b} ms (Unix time)")
    return problems
