"""The logical copy of a Redis backup into a live server, with no local redis-server in between.

The backup's RDB is decompressed and read as it streams (`RdbScanner`); every key goes to the target as
`RESTORE key ttl payload REPLACE ABSTTL`, whose payload is the value's own RDB encoding followed by an RDB
version and a CRC-64 (what DUMP would have produced). A target reads any payload whose version is not
newer than its own, and the encoding of a value is fixed by its type byte, so a value whose type the
target knows is sent as it is, labelled with the target's version. A value whose type the target does not
know is re-encoded (`redis_values`): lists, sets, sorted sets and hashes as their plain element-wise
types every Redis and Valkey reads, a newer stream as the Redis 5 stream type. Hash-field TTLs go to a
target that has them (as HSET + HPEXPIREAT when the two servers encode them differently) and are refused
before any change for one that has not. A value too large for one command (`proto-max-bulk-len`) is
rebuilt with bounded commands (SET + APPEND, RPUSH, SADD, ZADD, HSET), so memory stays bounded by the
largest value, and a big string never by more than a piece of it.

Commands are pipelined on one connection; every reply is one line (+OK, :n or an error), read in bulk.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kkua_backupd.config import RedisConfig
from kkua_backupd.errors import ConnectionFailed, IntegrityError, JobError, Refused
from kkua_backupd.obs.progress import Progress
from kkua_backupd.sources.redis import protocol as redis_protocol
from kkua_backupd.sources.redis import values as redis_values
from kkua_backupd.sources.redis.rdb import (
    T_HASH_LISTPACK_EX,
    T_HASH_LISTPACK_EX_PRE_GA,
    T_HASH_METADATA,
    T_HASH_METADATA_PRE_GA,
    T_MODULE_2,
    T_STREAM,
    T_STREAM_2,
    T_STREAM_3,
    T_VALKEY_HASH_2,
    RdbScanner,
    RdbSummary,
    crc64,
)

_PIPELINE_BYTES = 8 << 20  # send and read replies when this much is queued
_PIPELINE_COMMANDS = 20_000
_REDIS_HFE = frozenset({T_HASH_METADATA_PRE_GA, T_HASH_LISTPACK_EX_PRE_GA, T_HASH_METADATA, T_HASH_LISTPACK_EX})
_STREAMS = frozenset({T_STREAM, T_STREAM_2, T_STREAM_3})
_PORTABLE_MIN = {  # the lowest RDB version that knows each type (Redis and Valkey agree up to 21)
    0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 8, 7: 8, 9: 2, 10: 2, 11: 2, 12: 2, 13: 2, 14: 7, 15: 9, 16: 10, 17: 10,
    18: 10, 19: 10, 20: 11, 21: 11,
}


@dataclass(frozen=True)
class Target:
    """What the target server reads: its flavor and version, the newest RDB version it loads, its number
    of databases, whether it has hash-field TTLs, and the largest bulk string it takes."""

    flavor: str  # "redis" | "valkey"
    version: str
    rdb_max: int
    databases: int
    hash_field_ttl: bool
    max_bulk: int
    keyspace: dict[int, int]  # keys per database before the restore

    @property
    def name(self) -> str:
        return f"{'Valkey' if self.flavor == 'valkey' else 'Redis'} {self.version}"

    @property
    def functions(self) -> bool:
        """Whether the target has function libraries (Redis 7.0+, every Valkey)."""
        return self.flavor == "valkey" or self.rdb_max >= 10


def describe_server(info: dict[str, object]) -> tuple[str, str, int, bool]:
    """(flavor, version, newest readable RDB version, has hash-field TTLs) from INFO server. Valkey says
    `redis_version:7.2.4` for compatibility; its own version is `valkey_version`."""
    if info.get("server_name") == "valkey" or "valkey_version" in info:
        version = str(info.get("valkey_version", info.get("redis_version", "0")))
        release = redis_protocol.parse_server_version(version)
        rdb = 81 if release >= (9, 2) else 80 if release >= (9, 0) else 11
        return "valkey", version, rdb, release >= (9, 0)
    version = str(info.get("redis_version", "0"))
    release = redis_protocol.parse_server_version(version)
    return "redis", version, redis_protocol.max_rdb_version(version), release >= (7, 4)


@dataclass
class Plan:
    """How each value type of the backup reaches the target: "native" (the payload as it is),
    "portable" (re-encoded element-wise), "stream_v1", or "commands" (hash-field TTLs across flavors)."""

    how: dict[int, str]
    source_valkey: bool
    notes: list[str] = field(default_factory=list)


def plan_copy(summary: RdbSummary, target: Target) -> Plan:
    """Decide how every value type in the backup reaches the target; raises Refused (before any change)
    naming what the target cannot hold: hash-field TTLs it does not have, more databases than it has, a
    module type or newer type it cannot read."""
    how: dict[int, str] = {}
    problems: list[str] = []
    notes: list[str] = []
    source_valkey = summary.valkey
    for t, count in sorted(summary.types.items()):
        examples = ", ".join(repr(k.decode("utf-8", "replace")) for k in summary.examples.get(t, [])[:3])
        label = f"{count} {summary.type_name(t)} value(s) (e.g. {examples})"
        hfe = (t in _REDIS_HFE and not source_valkey) or (t == T_VALKEY_HASH_2 and source_valkey)
        if hfe:
            if not target.hash_field_ttl:
                problems.append(f"{label}: hash-field TTLs, which {target.name} does not have (Redis 7.4+ and "
                                "Valkey 9+ do)")
            elif (target.flavor == "valkey") == source_valkey:
                how[t] = "native"
            else:
                how[t] = "commands"  # the two encode field TTLs differently: HSET + HPEXPIREAT
        elif t == T_MODULE_2:
            how[t] = "native"
            notes.append(f"{label}: module data; {target.name} must have the module loaded")
        elif t in _PORTABLE_MIN and _PORTABLE_MIN[t] <= target.rdb_max:
            how[t] = "native"
        elif t == T_STREAM_3 and target.rdb_max >= 10:
            how[t] = "stream_v2"
            notes.append(f"{label}: written as the Redis 7.0 stream type, without the consumers' active-time, "
                         f"which {target.name} does not keep")
        elif t in (T_STREAM_2, T_STREAM_3) and target.rdb_max >= 9:
            how[t] = "stream_v1"
            notes.append(f"{label}: written as the Redis 5 stream type, without the entries-added and "
                         "max-deleted-id counters and consumers' active-time, which "
                         f"{target.name} does not keep")
        elif t in _PORTABLE_MIN:
            how[t] = "portable"
        else:
            problems.append(f"{label}: a type {target.name} cannot read")
    too_big = [(k, size) for k, size in summary.big_strings if size + 64 > target.max_bulk]
    if too_big:
        names = ", ".join(f"{k.decode('utf-8', 'replace')!r} ({size >> 20} MiB)" for k, size in too_big[:3])
        problems.append(f"{len(too_big)} string(s) larger than {target.name} takes in one value (proto-max-bulk-len "
                        f"{target.max_bulk >> 20} MiB): {names}; raise proto-max-bulk-len on it")
    if summary.keys and max(summary.keys) >= target.databases:
        problems.append(f"keys in db {max(summary.keys)}, but {target.name} has only {target.databases} databases "
                        f"(0 to {target.databases - 1}); raise `databases` in its redis.conf")
    if summary.functions and not target.functions:
        problems.append(f"{summary.functions} function librar{'y' if summary.functions == 1 else 'ies'} "
                        f"(FUNCTION LOAD), which {target.name} does not have (Redis 7.0+ and Valkey do)")
    if problems:
        raise Refused(f"the backup (from {summary.writer}) cannot be carried over to {target.name}: "
                      + "; ".join(problems) + "; nothing was changed",
                      hint="restore it into a server at least as new as the one it came from")
    return Plan(how, source_valkey, notes)


@dataclass
class CopyStats:
    """What a logical copy did."""

    restored: Counter[int] = field(default_factory=Counter)
    expired: int = 0
    converted: int = 0
    by_commands: int = 0
    functions: int = 0
    payload_bytes: int = 0


class _Connection:
    """One authenticated socket to the target, for pipelines of commands whose replies are one line each."""

    def __init__(self, rc: RedisConfig) -> None:
        self.rc = rc
        try:
            self.sock = socket.create_connection((rc.host, rc.port), timeout=rc.connect_timeout)
        except OSError as exc:
            raise redis_protocol.connection_error(rc, exc) from None
        self.sock.settimeout(max(rc.restore_timeout, 30))
        self.buffer = bytearray()
        if rc.password is not None:
            auth = ("AUTH", rc.username) if rc.username else ("AUTH",)
            self.send([redis_protocol.command(*auth, rc.password.get_secret_value())])
            reply = self.lines(1)[0]
            if reply.startswith(b"-"):
                import redis

                raise redis_protocol.connection_error(rc, redis.AuthenticationError(reply[1:].decode("utf-8",
                                                                                                        "replace")))

    def send(self, parts: list[bytes]) -> None:
        try:
            if len(parts) <= 16:  # a few big commands (pieces of a big value): no joined copy of them
                for part in parts:
                    self.sock.sendall(part)
            else:
                self.sock.sendall(b"".join(parts))
        except OSError as exc:
            raise redis_protocol.connection_error(self.rc, exc) from None

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except OSError as exc:
            raise redis_protocol.connection_error(self.rc, exc) from None
        if not data:
            raise ConnectionFailed(f"{redis_protocol.where(self.rc)} closed the connection during the restore",
                                   hint="see the server's log (out of memory? killed?); the safety backup "
                                        "holds the data from before")
        self.buffer += data

    def lines(self, count: int) -> list[bytes]:
        """The first line of each of the next `count` replies (without CRLF): `+OK`, `:1`, `-ERR ...`, or
        `*n` for an array (HPEXPIREAT's), whose elements are read and dropped."""
        out: list[bytes] = []
        start = 0
        buf = self.buffer
        while len(out) < count:
            end = buf.find(b"\r\n", start)
            if end < 0:
                del buf[:start]
                start = 0
                self._fill()
                continue
            line = bytes(buf[start:end])
            kind = line[:1]
            if kind in (b"+", b"-", b":"):
                out.append(line)
                start = end + 2
                continue
            skip = self._skip_reply(buf, start)
            if skip < 0:
                del buf[:start]
                start = 0
                self._fill()
                continue
            out.append(line)
            start = skip
        del buf[:start]
        return out

    @staticmethod
    def _skip_reply(buf: bytearray, start: int) -> int:
        """The end of the whole reply at `start` (bulk string or array, nested), or -1 if not all here."""
        end = buf.find(b"\r\n", start)
        if end < 0:
            return -1
        kind, size = bytes(buf[start:start + 1]), int(buf[start + 1:end] or b"0")
        if kind in (b"+", b"-", b":", b"_", b",", b"#"):
            return end + 2
        if kind == b"$":
            stop = end + 2 + max(size, 0) + (2 if size >= 0 else 0)
            return stop if len(buf) >= stop else -1
        at = end + 2
        for _ in range(max(size, 0)):
            at = _Connection._skip_reply(buf, at)
            if at < 0:
                return -1
        return at

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class TargetWriter:
    """The `KeySink` of a logical restore: turns each key of the backup into pipelined commands."""

    def __init__(self, rc: RedisConfig, target: Target, plan: Plan, progress: Progress) -> None:
        self.rc = rc
        self.target = target
        self.plan = plan
        self.progress = progress
        self.stats = CopyStats()
        self.conn = _Connection(rc)
        self.now_ms = int(time.time() * 1000)
        self._queue: list[bytes] = []
        self._queued = 0
        # Per queued command: the (db, key) it belongs to, for messages, and whether its +OK is a key restored.
        self._owners: list[tuple[int, bytes, bool] | None] = []
        self._db = -1
        self._big: tuple[int, bytes, bytes] | None = None  # (db, key, the RESTORE's arguments after the payload)
        self._big_crc = 0

    # -- KeySink --------------------------------------------------------------------------------

    def key(self, db: int, key: bytes, rdb_type: int, value: bytes, expire_ms: int | None) -> None:
        if expire_ms is not None and expire_ms <= self.now_ms:
            self.stats.expired += 1
            return
        self._select(db)
        how = self.plan.how.get(rdb_type, "native")
        self.progress.add(len(value))
        if how == "stream_v1":
            rdb_type, value = T_STREAM, redis_values.stream_as(rdb_type, value, T_STREAM)
            self.stats.converted += 1
        elif how == "stream_v2":
            rdb_type, value = T_STREAM_2, redis_values.stream_as(rdb_type, value, T_STREAM_2)
            self.stats.converted += 1
        elif how == "portable":
            rdb_type, value = redis_values.encode_portable(redis_values.decode(rdb_type, value))
            self.stats.converted += 1
        if how == "commands" or len(value) + 64 > self.target.max_bulk:
            self._by_commands(db, key, rdb_type, value, expire_ms)
            return
        payload = redis_values.dump_payload(rdb_type, value, self.target.rdb_max)
        self.stats.payload_bytes += len(payload)
        if expire_ms is not None:
            self._queue_command(redis_protocol.command(b"RESTORE", key, b"%d" % expire_ms, payload, b"REPLACE",
                                                       b"ABSTTL"), (db, key, True))
        else:
            self._queue_command(redis_protocol.command(b"RESTORE", key, b"0", payload, b"REPLACE"), (db, key, True))

    def big_start(self, db: int, key: bytes, expire_ms: int | None, header: bytes, stored: int) -> None:
        """Start one RESTORE whose payload streams through: the queue goes first, then the command's head;
        the value's pieces follow as they arrive (plan_copy refused strings larger than the target takes)."""
        self._select(db)
        self.flush()
        args = [b"REPLACE", b"ABSTTL"] if expire_ms is not None else [b"REPLACE"]
        size = 1 + len(header) + stored + 10  # type byte, encoding, RDB version and CRC-64
        # The command as command() would write it, with the payload's bulk length ahead of its bytes.
        head = redis_protocol.command(b"RESTORE", key, b"%d" % (expire_ms or 0))
        head = b"*%d" % (4 + len(args)) + head[head.index(b"\r\n"):]
        start = bytes((0,)) + header
        self.conn.send([head, b"$%d\r\n" % size, start])
        self._big = (db, key, redis_protocol.command(*args)[len(b"*%d\r\n" % len(args)):])
        self._big_crc = crc64(start)
        self.stats.payload_bytes += size

    def big_piece(self, data: bytes) -> None:
        self.progress.add(len(data))
        self._big_crc = crc64(data, self._big_crc)
        self.conn.send([data])

    def function(self, code: bytes) -> None:
        """A function library: loaded with FUNCTION LOAD REPLACE (one of the same name is replaced)."""
        self._queue_command(redis_protocol.command(b"FUNCTION", b"LOAD", b"REPLACE", code), None)
        self.stats.functions += 1

    def big_end(self) -> None:
        assert self._big is not None
        db, key, rest = self._big
        version = self.target.rdb_max.to_bytes(2, "little")
        crc = crc64(version, self._big_crc)
        self.conn.send([version, crc.to_bytes(8, "little"), b"\r\n", rest])
        self._owners.append((db, key, True))
        self.flush_replies()
        self._big = None

    # -- internals ------------------------------------------------------------------------------

    def _by_commands(self, db: int, key: bytes, rdb_type: int, value: bytes, expire_ms: int | None) -> None:
        decoded = redis_values.decode(rdb_type, value, valkey=self.plan.source_valkey)
        self._queue_command(redis_protocol.command(b"DEL", key), None)
        for argv in redis_values.value_commands(key, decoded, max_bulk=min(self.target.max_bulk // 2, 64 << 20),
                                                field_ttls=self.target.hash_field_ttl):
            self._queue_command(redis_protocol.command(*argv), (db, key, False))
        if expire_ms is not None:
            self._queue_command(redis_protocol.command(b"PEXPIREAT", key, b"%d" % expire_ms), (db, key, False))
        self.stats.by_commands += 1
        self.stats.restored[db] += 1

    def _select(self, db: int) -> None:
        if db != self._db:
            self._queue_command(redis_protocol.command(b"SELECT", b"%d" % db), None)
            self._db = db

    def _queue_command(self, data: bytes, owner: tuple[int, bytes, bool] | None) -> None:
        self._queue.append(data)
        self._owners.append(owner)
        self._queued += len(data)
        if self._queued >= _PIPELINE_BYTES or len(self._owners) >= _PIPELINE_COMMANDS:
            self.flush()

    def flush(self) -> None:
        """Send what is queued and check every reply; raises JobError naming the first key refused."""
        if not self._owners:
            return
        self.conn.send(self._queue)
        self.flush_replies()

    def flush_replies(self) -> None:
        """Read and check the replies of every command sent (see `flush`)."""
        owners = self._owners
        replies = self.conn.lines(len(owners))
        self._queue, self._owners, self._queued = [], [], 0
        restored = self.stats.restored
        failed: tuple[tuple[int, bytes, bool] | None, bytes] | None = None
        for owner, reply in zip(owners, replies, strict=True):
            if reply[:1] == b"-":
                if failed is None:
                    failed = (owner, reply)
            elif owner is not None and owner[2]:
                restored[owner[0]] += 1
        if failed is not None:
            owner, reply = failed
            text = reply[1:].decode("utf-8", "replace")
            what = f"key {owner[1]!r} in db {owner[0]}" if owner else "a command (SELECT, DEL or FUNCTION LOAD)"
            if "SELECT" in text or "DB index" in text:
                what = "SELECT"
            if text.startswith("READONLY"):
                raise JobError(f"{self.rc.host}:{self.rc.port} is a read-only replica ({text})",
                               hint="restore into its master; the replica copies it from there")
            raise JobError(f"{self.target.name} at {self.rc.host}:{self.rc.port} refused {what}: {text}",
                           hint="the restoring user needs RESTORE (ACL +restore), DEL and SELECT, and memory for the "
                                "data; the safety backup holds the data from before")

    def close(self) -> None:
        self.conn.close()


def copy(rc: RedisConfig, rdb: Callable[[Callable[[bytes], None]], int], target: Target, plan: Plan, *, name: str,  # noqa: PLR0913 - keyword-only: how the copy reports (the file's name in messages, progress on a terminal)
         interactive: bool) -> CopyStats:
    """Stream an RDB into the target: `rdb(sink)` passes the RDB's bytes to `sink` in chunks. Returns what
    was done; raises JobError/ConnectionFailed when the target refuses or goes away, IntegrityError if the
    bytes differ from the check made before."""
    progress = Progress("restoring keys", enabled=interactive)
    writer = TargetWriter(rc, target, plan, progress)
    try:
        scanner = RdbScanner(name, writer, examples=0)
        rdb(scanner.feed)
        scanner.finish()
        writer.flush()
    except IntegrityError as exc:
        raise IntegrityError(f"{exc.message} (it passed the check a moment ago: was it changed meanwhile?)",
                             hint="the target holds part of the backup now; the safety backup holds the data "
                                  "from before") from None
    finally:
        progress.clear()
        writer.close()
    # RESTORE replies +OK per key; keys rebuilt by commands were counted when queued.
    return writer.stats


def keys_per_db(rc: RedisConfig) -> dict[int, int]:
    """DBSIZE of every database that has keys, from INFO keyspace."""
    with redis_protocol.connect(rc, timeout=rc.connect_timeout) as client:
        return {int(db): c["keys"] for db, c in redis_protocol.keyspace(client.info("keyspace")).items()}


def flush_databases(rc: RedisConfig, dbs: Iterator[int] | list[int]) -> dict[int, int]:
    """FLUSHDB each database in `dbs`; returns the keys each held. Raises JobError when refused."""
    import redis

    removed = {}
    for db in dbs:
        try:
            with redis_protocol.connect(rc, db=db, timeout=rc.connect_timeout) as client:
                removed[db] = int(client.dbsize())
                client.flushdb()
        except redis.ReadOnlyError as exc:
            raise JobError(f"{rc.host}:{rc.port} is a read-only replica ({exc}); FLUSHDB on db {db} was refused",
                           hint="restore into its master; the replica copies it from there") from None
        except redis.ResponseError as exc:
            raise JobError(f"FLUSHDB on db {db} was refused: {exc}",
                           hint="the restoring user needs the FLUSHDB command (ACL +flushdb)") from None
        except (redis.RedisError, OSError) as exc:
            raise redis_protocol.connection_error(rc, exc) from None
    return removed
