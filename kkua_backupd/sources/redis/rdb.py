"""Reading Redis and Valkey RDB files ourselves, as their bytes stream by.

An RDB is a header (`REDIS0012`, or `VALKEY080` from Valkey 9), a sequence of records (auxiliary fields,
database selectors, expiry times and key/value pairs, functions, module data) and an EOF opcode followed by
the CRC-64 of everything before it. `RdbScanner` is fed the bytes in chunks of any size (from a replication
capture, a file being decompressed, ...) and checks all of it without any Redis tool: the header and
version, every opcode, every value's framing for every type Redis 6.0 to 8.x and Valkey 7.2 to 9.x write,
database numbers, expiries, the counts of keys and expiries per database, and the CRC-64 trailer.

Memory stays bounded by the largest value: records are parsed from a buffer that holds at most one
record, and a string value larger than `STREAM_THRESHOLD` is passed on in pieces without being held.
A value type or opcode this tool does not know is reported as exactly that (`RdbNotUnderstood`), naming
the type and the server that wrote it, never as corruption: a newer server may write what an older tool
cannot read.

The format notes in Redis's `src/rdb.h` and `src/rdb.c` (and Valkey's) are the truth this follows.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anycrc

from kkua_backupd.errors import IntegrityError, VersionTooNew

if TYPE_CHECKING:
    from kkua_backupd.stream.stages import Reader

_CRC = anycrc.Model("CRC64-REDIS")


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Redis's CRC-64 (Jones, reflected) of `data`, continuing from `crc`."""
    return int(_CRC.calc(data, crc))


HEADER_SIZE = 9
# A string value longer than this is passed on in pieces instead of being held whole.
STREAM_THRESHOLD = 8 << 20
_PIECE = 4 << 20

# Value types (src/rdb.h). The numbers 22 and up mean different things to Redis and to Valkey 9.
T_STRING, T_LIST, T_SET, T_ZSET, T_HASH, T_ZSET_2, T_MODULE_PRE_GA, T_MODULE_2 = 0, 1, 2, 3, 4, 5, 6, 7
T_HASH_ZIPMAP, T_LIST_ZIPLIST, T_SET_INTSET, T_ZSET_ZIPLIST, T_HASH_ZIPLIST = 9, 10, 11, 12, 13
T_LIST_QUICKLIST, T_STREAM, T_HASH_LISTPACK, T_ZSET_LISTPACK, T_LIST_QUICKLIST_2 = 14, 15, 16, 17, 18
T_STREAM_2, T_SET_LISTPACK, T_STREAM_3 = 19, 20, 21
# Redis 7.4+ hashes with field expiration (HFE); Valkey 9 uses 22 for its own HASH_2.
T_HASH_METADATA_PRE_GA, T_HASH_LISTPACK_EX_PRE_GA, T_HASH_METADATA, T_HASH_LISTPACK_EX = 22, 23, 24, 25
T_VALKEY_HASH_2 = 22

# Opcodes.
OP_SLOT_INFO, OP_FUNCTION2, OP_FUNCTION_PRE_GA, OP_MODULE_AUX = 244, 245, 246, 247
OP_IDLE, OP_FREQ, OP_AUX, OP_RESIZEDB, OP_EXPIRETIME_MS, OP_EXPIRETIME, OP_SELECTDB, OP_EOF = (
    248, 249, 250, 251, 252, 253, 254, 255)

TYPE_NAMES = {
    0: "string", 1: "list (linked list)", 2: "set (hashtable)", 3: "zset (skiplist, text scores)",
    4: "hash (hashtable)", 5: "zset (skiplist)", 6: "module value (pre-GA)", 7: "module value",
    9: "hash (zipmap)", 10: "list (ziplist)", 11: "set (intset)", 12: "zset (ziplist)", 13: "hash (ziplist)",
    14: "list (quicklist)", 15: "stream", 16: "hash (listpack)", 17: "zset (listpack)",
    18: "list (quicklist 2)", 19: "stream (v2)", 20: "set (listpack)", 21: "stream (v3)",
    22: "hash with field TTLs (metadata, pre-GA)", 23: "hash with field TTLs (listpack, pre-GA)",
    24: "hash with field TTLs (metadata)", 25: "hash with field TTLs (listpack)",
}
VALKEY_TYPE_NAMES = {**{t: n for t, n in TYPE_NAMES.items() if t < 22}, 22: "hash with field TTLs (Valkey)"}
# Types whose value is exactly one RDB string (a listpack, ziplist, intset or zipmap blob).
_ONE_BLOB = frozenset({T_HASH_ZIPMAP, T_LIST_ZIPLIST, T_SET_INTSET, T_ZSET_ZIPLIST, T_HASH_ZIPLIST,
                       T_HASH_LISTPACK, T_ZSET_LISTPACK, T_SET_LISTPACK})
_MODULE_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# What the scanner's hot loop does with a record's first byte, one table look-up instead of comparisons:
# a value held in one string, a quicklist 2, another value type, a type it does not know, an opcode.
_BLOB, _QUICKLIST, _OTHER, _UNKNOWN, _OPCODE = 0, 1, 2, 3, 4


def _shapes(valkey: bool) -> tuple[int, ...]:
    def shape(t: int) -> int:
        if t >= OP_SLOT_INFO:
            return _OPCODE
        if t > 25 or t == 8 or (valkey and t > 22):
            return _UNKNOWN
        if t == T_STRING or t in _ONE_BLOB:
            return _BLOB
        return _QUICKLIST if t == T_LIST_QUICKLIST_2 else _OTHER
    return tuple(shape(t) for t in range(256))


_REDIS_SHAPE, _VALKEY_SHAPE = _shapes(False), _shapes(True)
NEWEST_REDIS_RDB = 13  # the newest versions this module reads (Redis 8.6 writes 13; its new types are refused
NEWEST_VALKEY_RDB = 81  # by name if they appear)


class RdbNotUnderstood(VersionTooNew):
    """The RDB holds a value type or opcode this version of kkua-backup does not know (written by a newer
    server); the file is not necessarily corrupt."""


class _Short(Exception):
    """Not enough bytes buffered for the record being read; `need` is the buffer length that would do."""

    def __init__(self, need: int = 0) -> None:
        self.need = need


def module_type_name(module_id: int) -> str:
    """The 9-character module type name encoded in the upper 54 bits of a module id."""
    value = module_id >> 10
    chars = []
    for _ in range(9):
        chars.append(_MODULE_CHARSET[value & 63])
        value >>= 6
    return "".join(reversed(chars))


def parse_header(head: bytes, *, name: str = "RDB") -> tuple[str, int]:
    """("REDIS" or "VALKEY", version) from the first 9 bytes; raises IntegrityError if they are not an RDB
    header."""
    head = bytes(head[:HEADER_SIZE])
    if len(head) < HEADER_SIZE:
        raise IntegrityError(f"{name} is not an RDB file: it has only {len(head)} bytes",
                             hint="the capture was cut short or the file is not a Redis backup")
    for magic in ("REDIS", "VALKEY"):
        digits = head[len(magic):]
        if head.startswith(magic.encode()) and digits.isdigit():
            return magic, int(digits)
    raise IntegrityError(f"{name} is not an RDB file (it starts with {head!r}, not REDISnnnn or VALKEYnnn)",
                         hint="use another backup; this one is corrupt or is not an RDB")


def file_header(path: Path, compression: str | None = None, readers: Sequence[Reader] = ()) -> tuple[str, int]:
    """("REDIS" or "VALKEY", version) of an RDB file read back through the byte chain, compressed as
    `compression` (else as its name says: .gz, .zst, or none); raises IntegrityError if it is not an RDB."""
    from kkua_backupd.stream.chain import compression_of, read_chain  # late: the reader itself needs no files

    head = bytearray()
    stream = iter(read_chain(path, compression or compression_of(path.name), readers=readers))
    try:
        for chunk in stream:
            head += chunk
            if len(head) >= HEADER_SIZE:
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return parse_header(bytes(head), name=path.name)


class KeySink(Protocol):
    """Receives the keys of an RDB as the scanner reads them (a restore sends them on)."""

    def key(self, db: int, key: bytes, rdb_type: int, value: bytes, expire_ms: int | None) -> None:
        """One key with its whole value encoding (the bytes after the type byte)."""

    def big_start(self, db: int, key: bytes, expire_ms: int | None, header: bytes, stored: int) -> None:
        """A string value follows in pieces: `header` is its RDB string encoding's header (length, or LZF
        lengths), `stored` the number of bytes after it."""

    def big_piece(self, data: bytes) -> None:
        """The next piece of the big string's stored bytes."""

    def big_end(self) -> None:
        """The big string is complete."""

    def function(self, code: bytes) -> None:
        """A function library (Redis 7+), its source code as FUNCTION LOAD takes it."""


@dataclass
class RdbSummary:
    """What a full read of an RDB found."""

    magic: str = "REDIS"
    version: int = 0
    size: int = 0
    aux: dict[str, str] = field(default_factory=dict)
    keys: dict[int, int] = field(default_factory=dict)
    expires: dict[int, int] = field(default_factory=dict)
    types: Counter[int] = field(default_factory=Counter)
    functions: int = 0
    module_aux: list[str] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)
    largest_value: int = 0
    checksum: str = "missing"  # "ok", or "not written" when the server has rdbchecksum off
    # A few key names per value type, for messages that must name what cannot be carried over.
    examples: dict[int, list[bytes]] = field(default_factory=dict)
    big_strings: list[tuple[bytes, int]] = field(default_factory=list)  # (key, length) of strings over 8 MiB

    @property
    def valkey(self) -> bool:
        """True when type numbers from 22 up are Valkey's (a `VALKEY` header)."""
        return self.magic == "VALKEY"

    @property
    def writer(self) -> str:
        """The server that wrote the file, as its aux fields say ("Valkey 9.1.2", "Redis 7.4.1")."""
        if "valkey-ver" in self.aux:
            return f"Valkey {self.aux['valkey-ver']}"
        if "redis-ver" in self.aux:
            return f"Redis {self.aux['redis-ver']}"
        return "an unknown server"

    @property
    def total_keys(self) -> int:
        return sum(self.keys.values())

    def type_name(self, rdb_type: int) -> str:
        return (VALKEY_TYPE_NAMES if self.valkey else TYPE_NAMES).get(rdb_type, f"type {rdb_type}")

    def as_details(self) -> dict[str, object]:
        """The manifest's view: versions, counts per database, value types and the checksum."""
        return {"rdb_version": self.version, "rdb_format": self.magic.lower(), "rdb_writer": self.writer,
                "keys": self.total_keys, "expires": sum(self.expires.values()),
                "keys_per_db": {str(db): n for db, n in sorted(self.keys.items())},
                "expires_per_db": {str(db): n for db, n in sorted(self.expires.items())},
                "value_types": {self.type_name(t): n for t, n in sorted(self.types.items())},
                "functions": self.functions, "modules": sorted(self.modules), "crc64": self.checksum,
                "largest_value_bytes": self.largest_value}


class RdbScanner:
    """Checks an RDB fed in chunks (`feed`, then `finish`), optionally handing every key to a `KeySink`.

    Raises IntegrityError (corrupt or cut short: bad framing, an impossible length, a CRC-64 mismatch,
    bytes after the end) or RdbNotUnderstood (a type or opcode from a newer server) as soon as it sees it.
    """

    def __init__(self, name: str = "RDB", sink: KeySink | None = None, *, examples: int = 3) -> None:
        self.name = name
        self.sink = sink
        self.summary = RdbSummary()
        self._examples = examples
        self._buf = bytearray()
        self._pos = 0
        self._need = 0
        self._crc = 0
        self._header = False
        self._done = False
        self._db = 0
        self._expire: int | None = None
        self._big_left = 0  # bytes of a big string value still to come
        self._types = [0] * 256  # keys per value type, counted in a list: the hot loop's cheapest counter
        self._wanted = set(range(256)) if examples else set()  # types still short of example key names

    # -- feeding --------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Check the next bytes of the RDB."""
        if not data:
            return
        self.summary.size += len(data)
        if self._done:
            raise self._corrupt("has bytes after its end (EOF opcode and checksum)")
        view = memoryview(data)
        if self._big_left:
            view = self._big_feed(view)
            if not view:
                return
        self._buf += view
        if len(self._buf) < self._need:
            return
        if not self._header:
            if len(self._buf) < HEADER_SIZE:
                return
            self._read_header()
        self._run()
        self._compact()

    def finish(self) -> RdbSummary:
        """End of input: raises IntegrityError when the RDB stopped before its EOF opcode and checksum."""
        if not self._header:
            parse_header(bytes(self._buf), name=self.name)  # raises: too short or not an RDB
        if not self._done and not self._big_left and self._buf:
            self._need = 0  # a record waiting for more bytes than the file had: read what there is
            self._run()
        self.summary.types = Counter({t: count for t, count in enumerate(self._types) if count})
        if not self._done:
            where = "a value" if self._big_left or self._pos < len(self._buf) else "a record boundary"
            raise IntegrityError(f"{self.name} is cut short: it ends inside {where}, before the RDB's end "
                                 f"(after {self.summary.size} bytes)",
                                 hint="the capture or the file is incomplete; use another backup")
        return self.summary

    # -- internals ------------------------------------------------------------------------------

    def _corrupt(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.name} is not a valid RDB: it {what}",
                              hint="the backup is corrupt or cut short; use another one")

    def _read_header(self) -> None:
        magic, version = parse_header(bytes(self._buf[:HEADER_SIZE]), name=self.name)
        if magic == "REDIS" and version < 6:
            raise RdbNotUnderstood(f"{self.name} is RDB version {version}, from a Redis older than 2.6, which "
                                   "this tool does not read", hint="load it into a Redis of its time and back it "
                                                                   "up again from there")
        self.summary.magic, self.summary.version = magic, version
        self._header = True
        self._pos = HEADER_SIZE

    def _compact(self) -> None:
        if self._pos:
            if not self._done:
                self._crc = crc64(memoryview(self._buf)[: self._pos], self._crc)
            del self._buf[: self._pos]
            self._pos = 0

    def _big_feed(self, view: memoryview) -> memoryview:
        """Pass on the pieces of a big string value; returns what comes after it."""
        take = min(self._big_left, len(view))
        piece = view[:take]
        self._crc = crc64(piece, self._crc)
        if self.sink is not None:
            self.sink.big_piece(bytes(piece))
        self._big_left -= take
        if not self._big_left and self.sink is not None:
            self.sink.big_end()
        return view[take:]

    def _not_understood(self, what: str) -> RdbNotUnderstood:
        return RdbNotUnderstood(f"{self.name} holds {what}, written by {self.summary.writer} (RDB "
                                f"{self.summary.magic} {self.summary.version}), which this version of kkua-backup "
                                "does not know; the file is not necessarily corrupt",
                                hint="upgrade kkua-backup; keep this backup")

    def _run(self) -> None:
        # The hot loop: one pass per record. Everything it touches per key lives in local variables (the
        # current database's key and expiry counts, the largest value, the pending expiry), written back to
        # the object only when the database changes and when the loop returns: attribute and dict writes per
        # key cost more than the parsing of a small key.
        b = self._buf
        n = len(b)
        p = self._pos
        summary = self.summary
        sink = self.sink
        valkey = summary.magic == "VALKEY"
        types = self._types
        wanted = self._wanted
        shape = _VALKEY_SHAPE if valkey else _REDIS_SHAPE
        skip_string = _skip_string
        db = self._db
        expire = self._expire
        counted = expired = 0  # keys, and keys with an expiry, of `db` not yet added to the summary
        largest = summary.largest_value
        start = p
        try:
            while p < n:
                start = p
                t = b[p]
                p += 1
                k = shape[t]
                if k < _OPCODE:  # a key and its value
                    if k == _UNKNOWN:
                        raise self._not_understood(f"a value of type {t}" if t < 200 else f"opcode {t}")
                    kstart = p
                    c = b[p]
                    p = p + 1 + c if c < 64 else skip_string(b, p, n)  # most keys: a 6-bit length
                    vstart = p
                    if k == _BLOB:  # a string, or a type held in one string (listpack, ...)
                        c = b[p]
                        if c < 64:
                            p += 1 + c
                        elif t == 0 and (c < 0xC0 or c == 0xC3) and c >= 0x80 and \
                                (big := _big_string(b, p, n)) is not None:
                            self._db, self._expire = db, expire
                            self._flush_counts(counted, expired, largest)
                            counted = expired = 0
                            self._begin_big(b, kstart, vstart, big, n)
                            expire, start = None, 0  # it took the expiry and left its buffer at 0
                            return
                        else:
                            p = skip_string(b, p, n)
                        if p > n:
                            raise _Short(p)
                    elif k == _QUICKLIST:
                        p = self._skip_quicklist(b, p, n)
                    else:
                        p = self._skip_value(t, b, p, n, valkey)
                    counted += 1
                    if expire is not None:
                        expired += 1
                    types[t] += 1
                    if p - vstart > largest:  # noqa: PLR1730 - no call in the hot loop
                        largest = p - vstart
                    if t in wanted:
                        seen = summary.examples.setdefault(t, [])
                        seen.append(_string_at(b, kstart))
                        if len(seen) >= self._examples:
                            wanted.discard(t)
                    if sink is not None:
                        sink.key(db, _string_at(b, kstart), t, bytes(b[vstart:p]), expire)
                    expire = None
                elif t == OP_EXPIRETIME_MS:
                    if p + 8 > n:
                        raise _Short(p + 8)
                    expire = int.from_bytes(b[p:p + 8], "little", signed=True)
                    p += 8
                elif t == OP_SELECTDB:
                    selected, p = _length(b, p)
                    if selected > 1 << 20:
                        raise self._corrupt(f"selects database {selected}")
                    self._db = db
                    self._flush_counts(counted, expired, largest)
                    counted = expired = 0
                    db = selected
                elif t == OP_RESIZEDB:
                    _, p = _length(b, p)
                    _, p = _length(b, p)
                elif t == OP_AUX:
                    key, p = _aux_string(b, p, n)
                    value, p = _aux_string(b, p, n)
                    summary.aux[key] = value
                elif t == OP_EOF:
                    if p + 8 > n:
                        raise _Short(p + 8)
                    self._crc = crc64(memoryview(b)[:p], self._crc)
                    stored = int.from_bytes(b[p:p + 8], "little")
                    p += 8
                    if stored == 0:
                        summary.checksum = "not written"  # rdbchecksum no
                    elif stored != self._crc:
                        raise self._corrupt(f"fails its CRC-64 check (stored {stored:016x}, computed "
                                            f"{self._crc:016x})")
                    else:
                        summary.checksum = "ok"
                    self._done = True
                    if p < n:
                        raise self._corrupt("has bytes after its end (EOF opcode and checksum)")
                    start = p
                    self._need = 0
                    return
                elif t == OP_EXPIRETIME:
                    if p + 4 > n:
                        raise _Short(p + 4)
                    expire = int.from_bytes(b[p:p + 4], "little", signed=True) * 1000
                    p += 4
                elif t == OP_IDLE:
                    _, p = _length(b, p)
                elif t == OP_FREQ:
                    if p + 1 > n:
                        raise _Short(p + 1)
                    p += 1
                elif t == OP_FUNCTION2:
                    code_at = p
                    p = skip_string(b, p, n)
                    summary.functions += 1
                    if sink is not None:
                        sink.function(_string_at(b, code_at))
                elif t == OP_MODULE_AUX:
                    module_id, p = _length(b, p)
                    when_opcode, p = _length(b, p)
                    if when_opcode != 2:
                        raise self._corrupt(f"has module aux data with a bad 'when' opcode {when_opcode}")
                    _, p = _length(b, p)
                    p = _skip_module_value(b, p, n)
                    summary.module_aux.append(module_type_name(module_id))
                elif t == OP_SLOT_INFO:
                    for _ in range(3):
                        _, p = _length(b, p)
                elif t == OP_FUNCTION_PRE_GA:
                    raise self._not_understood("functions in the pre-release format of Redis 7.0 RC1/RC2")
                else:
                    raise self._not_understood(f"opcode {t}")
            start = p
            self._need = 0
        except (_Short, IndexError) as short:
            # Wait for more bytes; retry this record only once it can be complete (or the buffer has
            # doubled), so a large record costs no quadratic re-reads. The record's own effects (an expiry
            # read, a database selected) are all made after its last read, so none of them happened.
            need = short.need if isinstance(short, _Short) else 0
            self._need = max(need - start, 2 * (n - start)) if need else 2 * (n - start)
            self._need = max(self._need, 1)
        except struct.error:
            self._need = 2 * (n - start)
        finally:
            self._pos = start
            self._db, self._expire = db, expire
            self._flush_counts(counted, expired, largest)

    def _flush_counts(self, counted: int, expired: int, largest: int) -> None:
        """Add the hot loop's counts for the current database (`self._db`) to the summary."""
        summary = self.summary
        db = self._db
        if counted:
            summary.keys[db] = summary.keys.get(db, 0) + counted
        if expired:
            summary.expires[db] = summary.expires.get(db, 0) + expired
        summary.largest_value = max(summary.largest_value, largest)

    def _begin_big(self, b: bytearray, kstart: int, vstart: int, big: tuple[int, int, int | None], n: int) -> None:
        """Start passing on a string value too big to hold: its header is read, its bytes follow."""
        data_start, size, lzf_size = big
        stored = lzf_size if lzf_size is not None else size
        db = self._db
        summary = self.summary
        summary.keys[db] = summary.keys.get(db, 0) + 1
        if self._expire is not None:
            summary.expires[db] = summary.expires.get(db, 0) + 1
        self._types[T_STRING] += 1
        summary.largest_value = max(summary.largest_value, stored)
        key = _string_at(b, kstart)
        summary.big_strings.append((key, size))
        if self.sink is not None:
            self.sink.big_start(db, key, self._expire, bytes(b[vstart:data_start]), stored)
        self._expire = None
        have = n - data_start
        self._big_left = stored
        # CRC of everything up to the value's bytes, which _big_feed hashes as they pass.
        self._crc = crc64(memoryview(b)[:data_start], self._crc)
        del b[:data_start]
        self._pos = 0
        self._need = 0
        rest = self._big_feed(memoryview(bytes(b[:have])))
        del b[:have]
        assert not rest or not self._big_left

    def _skip_quicklist(self, b: bytearray, p: int, n: int) -> int:
        """The end of a quicklist 2 value at p (what Redis 7 writes for every list): its node count, then
        per node a container kind (1 plain, 2 listpack) and one string."""
        c = b[p]
        if c < 64:
            count, p = c, p + 1
        else:
            count, p = _length(b, p)
        for _ in range(count):
            c = b[p]
            if c == 1 or c == 2:  # noqa: PLR1714 - two compares beat building a tuple per node
                p += 1
            else:
                container, p = _length(b, p)
                if container not in (1, 2):
                    raise self._corrupt(f"has a quicklist node with container {container}")
            c = b[p]
            p = p + 1 + c if c < 64 else _skip_string(b, p, n)
        if p > n:
            raise _Short(p)
        return p

    def _skip_value(self, t: int, b: bytearray, p: int, n: int, valkey: bool) -> int:
        """The end of a value of type `t` that starts at `p` (not a plain string or one-blob type)."""
        if t in (T_LIST, T_SET, T_LIST_QUICKLIST):
            count, p = _length(b, p)
            for _ in range(count):
                p = _skip_string(b, p, n)
            return p
        if t == T_HASH:
            count, p = _length(b, p)
            for _ in range(2 * count):
                p = _skip_string(b, p, n)
            return p
        if t == T_ZSET_2:
            count, p = _length(b, p)
            for _ in range(count):
                p = _skip_string(b, p, n) + 8
            if p > n:
                raise _Short(p)
            return p
        if t == T_ZSET:
            count, p = _length(b, p)
            for _ in range(count):
                p = _skip_string(b, p, n)
                score_len = b[p]
                p += 1 if score_len >= 253 else 1 + score_len
            if p > n:
                raise _Short(p)
            return p
        if t == T_LIST_QUICKLIST_2:
            count, p = _length(b, p)
            for _ in range(count):
                container, p = _length(b, p)
                if container not in (1, 2):
                    raise self._corrupt(f"has a quicklist node with container {container}")
                p = _skip_string(b, p, n)
            return p
        if t in (T_STREAM, T_STREAM_2, T_STREAM_3):
            return _skip_stream(t, b, p, n)
        if valkey and t == T_VALKEY_HASH_2:
            count, p = _length(b, p)
            for _ in range(count):
                p = _skip_string(b, p, n)
                p = _skip_string(b, p, n) + 8
            if p > n:
                raise _Short(p)
            return p
        if t in (T_HASH_METADATA, T_HASH_METADATA_PRE_GA):
            if t == T_HASH_METADATA:
                p += 8
            count, p = _length(b, p)
            for _ in range(count):
                _, p = _length(b, p)
                p = _skip_string(b, p, n)
                p = _skip_string(b, p, n)
            return p
        if t == T_HASH_LISTPACK_EX:
            return _skip_string(b, p + 8, n)
        if t == T_HASH_LISTPACK_EX_PRE_GA:
            return _skip_string(b, p, n)
        if t == T_MODULE_2:
            module_id, p = _length(b, p)
            self.summary.modules.add(module_type_name(module_id))
            return _skip_module_value(b, p, n)
        raise self._not_understood(f"a value of type {t}")


# ----------------------------------------------------------------------------------------------
# Primitive reads. Each takes the buffer, a position and the buffer's length, and raises _Short (or
# IndexError) when the buffer ends first.


def _length(b: bytearray, p: int) -> tuple[int, int]:
    """A length (6, 14, 32 or 64 bits) at p: (value, position after it)."""
    c = b[p]
    kind = c >> 6
    if kind == 0:
        return c, p + 1
    if kind == 1:
        return ((c & 0x3F) << 8) | b[p + 1], p + 2
    if c == 0x80:
        if p + 5 > len(b):
            raise _Short(p + 5)
        return int.from_bytes(b[p + 1:p + 5], "big"), p + 5
    if c == 0x81:
        if p + 9 > len(b):
            raise _Short(p + 9)
        return int.from_bytes(b[p + 1:p + 9], "big"), p + 9
    raise IntegrityError(f"not a valid RDB: an encoded value (0x{c:02x}) stands where a length belongs",
                         hint="the backup is corrupt; use another one")


def _skip_string(b: bytearray, p: int, n: int) -> int:
    """The end of the RDB string at p (plain, integer-encoded or LZF-compressed)."""
    c = b[p]
    kind = c >> 6
    if kind == 0:
        end = p + 1 + c
    elif kind == 1:
        end = p + 2 + (((c & 0x3F) << 8) | b[p + 1])
    elif kind == 2:
        size, q = _length(b, p)
        end = q + size
    else:
        enc = c & 0x3F
        if enc == 0:
            end = p + 2
        elif enc == 1:
            end = p + 3
        elif enc == 2:
            end = p + 5
        elif enc == 3:
            stored, q = _length(b, p + 1)
            _, q = _length(b, q)
            end = q + stored
        else:
            raise IntegrityError(f"not a valid RDB: unknown string encoding {enc}",
                                 hint="the backup is corrupt; use another one")
    if end > n:
        raise _Short(end)
    return end


def _big_string(b: bytearray, p: int, n: int) -> tuple[int, int, int | None] | None:
    """(data start, size, LZF size or None) when the string at p is larger than STREAM_THRESHOLD and not
    yet all buffered; None otherwise (read it the usual way)."""
    c = b[p]
    kind = c >> 6
    if kind == 2:
        size, q = _length(b, p)
        if size > STREAM_THRESHOLD and q + size > n:
            return q, size, None
    elif kind == 3 and c & 0x3F == 3:
        stored, q = _length(b, p + 1)
        size, q = _length(b, q)
        if stored > STREAM_THRESHOLD and q + stored > n:
            return q, size, stored
    return None


def _string_at(b: bytearray, p: int) -> bytes:
    """The RDB string at p as bytes (integers as their decimal text, LZF decompressed)."""
    c = b[p]
    kind = c >> 6
    if kind == 0:
        return bytes(b[p + 1:p + 1 + c])
    if kind == 1:
        return bytes(b[p + 2:p + 2 + (((c & 0x3F) << 8) | b[p + 1])])
    if kind == 2:
        size, q = _length(b, p)
        return bytes(b[q:q + size])
    enc = c & 0x3F
    if enc == 0:
        return str(int.from_bytes(b[p + 1:p + 2], "little", signed=True)).encode()
    if enc == 1:
        return str(int.from_bytes(b[p + 1:p + 3], "little", signed=True)).encode()
    if enc == 2:
        return str(int.from_bytes(b[p + 1:p + 5], "little", signed=True)).encode()
    from kkua_backupd.sources.redis.values import lzf_decompress

    stored, q = _length(b, p + 1)
    size, q = _length(b, q)
    return lzf_decompress(bytes(b[q:q + stored]), size)


def _aux_string(b: bytearray, p: int, n: int) -> tuple[str, int]:
    end = _skip_string(b, p, n)
    c = b[p]
    if c >> 6 == 3 and c & 0x3F == 3:
        return "<compressed>", end
    return _string_at(b, p).decode("utf-8", "replace"), end


def _skip_module_value(b: bytearray, p: int, n: int) -> int:
    """The end of a module value's opcodes (up to its EOF opcode)."""
    while True:
        opcode, p = _length(b, p)
        if opcode == 0:
            return p
        if opcode in (1, 2):
            _, p = _length(b, p)
        elif opcode == 3:
            p += 4
        elif opcode == 4:
            p += 8
        elif opcode == 5:
            p = _skip_string(b, p, n)
        else:
            raise IntegrityError(f"not a valid RDB: unknown module value opcode {opcode}",
                                 hint="the backup is corrupt; use another one")
        if p > n:
            raise _Short(p)


def _skip_stream(t: int, b: bytearray, p: int, n: int) -> int:
    """The end of a stream value (types 15, 19 and 21 differ only in a few fields)."""
    nodes, p = _length(b, p)
    for _ in range(nodes):
        p = _skip_string(b, p, n)  # the node key: a 128-bit stream id
        p = _skip_string(b, p, n)  # the node's listpack
    for _ in range(3 if t == T_STREAM else 8):  # length, last id; first id, max deleted id, entries added
        _, p = _length(b, p)
    groups, p = _length(b, p)
    for _ in range(groups):
        p = _skip_string(b, p, n)
        for _ in range(2 if t == T_STREAM else 3):  # last delivered id (, entries read)
            _, p = _length(b, p)
        pending, p = _length(b, p)
        for _ in range(pending):
            p += 24  # raw id + delivery time
            _, p = _length(b, p)  # delivery count
        consumers, p = _length(b, p)
        for _ in range(consumers):
            p = _skip_string(b, p, n)
            p += 16 if t == T_STREAM_3 else 8  # seen time (, active time)
            pending, p = _length(b, p)
            p += 16 * pending
            if p > n:
                raise _Short(p)
    if p > n:
        raise _Short(p)
    return p
