"""Redis and Valkey RDB value encodings: decoded into plain elements, and encoded back in forms any server
can RESTORE.

A logical restore streams an RDB file and sends each key with `RESTORE key ttl payload ABSTTL REPLACE`. When
the target cannot take a value's encoding as it is (a listpack type an older server does not know, a stream
of a newer layout, a payload too large for one command), these pure functions (no I/O) turn the value's
bytes (what follows the type byte in the RDB file, or in a DUMP payload before its 10-byte trailer) into
elements, and the elements into element-wise encodings, DUMP payloads or commands.

The formats follow Redis's src/rdb.c, listpack.c, ziplist.c, intset.c, zipmap.c, lzf_d.c and t_stream.c,
and Valkey's src/rdb.c (RDB_TYPE_HASH_2 of Valkey 9, whose type number 22 Redis uses for something else).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal

from kkua_backupd.errors import IntegrityError, VersionTooNew
from kkua_backupd.sources.redis.rdb import crc64

Buffer = bytes | bytearray | memoryview
Kind = Literal["string", "list", "set", "zset", "hash", "stream", "module"]

# RDB value types (src/rdb.h). 22 means HASH_METADATA_PRE_GA in Redis and HASH_2 in Valkey >= 9.
TYPE_STRING = 0
TYPE_LIST = 1
TYPE_SET = 2
TYPE_ZSET = 3
TYPE_HASH = 4
TYPE_ZSET_2 = 5
TYPE_MODULE_PRE_GA = 6
TYPE_MODULE_2 = 7
TYPE_HASH_ZIPMAP = 9
TYPE_LIST_ZIPLIST = 10
TYPE_SET_INTSET = 11
TYPE_ZSET_ZIPLIST = 12
TYPE_HASH_ZIPLIST = 13
TYPE_LIST_QUICKLIST = 14
TYPE_STREAM_LISTPACKS = 15
TYPE_HASH_LISTPACK = 16
TYPE_ZSET_LISTPACK = 17
TYPE_LIST_QUICKLIST_2 = 18
TYPE_STREAM_LISTPACKS_2 = 19
TYPE_SET_LISTPACK = 20
TYPE_STREAM_LISTPACKS_3 = 21
TYPE_HASH_METADATA_PRE_GA = 22
TYPE_HASH_LISTPACK_EX_PRE_GA = 23
TYPE_HASH_METADATA = 24
TYPE_HASH_LISTPACK_EX = 25
VALKEY_TYPE_HASH_2 = 22

_TYPE_NAMES = {
    0: "string", 1: "list", 2: "set", 3: "zset", 4: "hash", 5: "zset_2", 6: "module_pre_ga", 7: "module_2",
    9: "hash_zipmap", 10: "list_ziplist", 11: "set_intset", 12: "zset_ziplist", 13: "hash_ziplist",
    14: "list_quicklist", 15: "stream_listpacks", 16: "hash_listpack", 17: "zset_listpack",
    18: "list_quicklist_2", 19: "stream_listpacks_2", 20: "set_listpack", 21: "stream_listpacks_3",
    22: "hash_metadata_pre_ga", 23: "hash_listpack_ex_pre_ga", 24: "hash_metadata", 25: "hash_listpack_ex",
}

_QUICKLIST_PLAIN = 1
_QUICKLIST_PACKED = 2
_EB_EXPIRE_TIME_MAX = (1 << 48) - 1  # Redis's largest field expiration time (ms)
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_PACK_DOUBLE = struct.Struct("<d").pack


class NotPortable(VersionTooNew):
    """A value has no element-wise encoding every server can RESTORE (field TTLs, streams, modules)."""


@dataclass
class Decoded:
    """A value's elements: `string` for a string; `items` for a list (in order) or a set; `scores` for a
    sorted set as (member, score); `pairs` for a hash as (field, value), with `field_ttls` holding absolute
    Unix-ms expiration times of the fields that have one. Streams and module values carry no elements."""

    kind: Kind
    string: bytes = b""
    items: list[bytes] = dc_field(default_factory=list)
    scores: list[tuple[bytes, float]] = dc_field(default_factory=list)
    pairs: list[tuple[bytes, bytes]] = dc_field(default_factory=list)
    field_ttls: dict[bytes, int] = dc_field(default_factory=dict)

    @property
    def count(self) -> int:
        """Number of elements (list items, set members, zset members or hash fields; 1 for a string)."""
        if self.kind == "string":
            return 1
        return len(self.items) + len(self.scores) + len(self.pairs)


def _bad(message: str) -> IntegrityError:
    return IntegrityError(message, hint="the backup file is damaged or not an RDB value of this type")


# --- LZF -------------------------------------------------------------------------------------------------------

def lzf_decompress(data: Buffer, expected_size: int) -> bytes:
    """Decompress an LZF block (lzf_d.c) that must expand to exactly `expected_size` bytes; raises
    IntegrityError when it is truncated, refers before its start or yields another size."""
    src = bytes(data)
    n = len(src)
    out = bytearray()
    i = 0
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:  # literal run of ctrl + 1 bytes
            run = ctrl + 1
            if i + run > n:
                raise _bad(f"LZF data is truncated: a literal run of {run} bytes at offset {i - 1} "
                           f"goes past its {n} bytes")
            out += src[i:i + run]
            i += run
        else:  # back reference of (ctrl >> 5) + 2 bytes, or (7 + next byte) + 2
            length = ctrl >> 5
            if length == 7:
                if i >= n:
                    raise _bad(f"LZF data is truncated inside a back reference at offset {i - 1}")
                length += src[i]
                i += 1
            if i >= n:
                raise _bad(f"LZF data is truncated inside a back reference at offset {i - 1}")
            distance = ((ctrl & 0x1F) << 8) + src[i] + 1
            i += 1
            length += 2
            ref = len(out) - distance
            if ref < 0:
                raise _bad(f"LZF back reference at offset {i - 2} points {distance} bytes back, before the "
                           f"start of the output ({len(out)} bytes so far)")
            if length <= distance:
                out += out[ref:ref + length]
            else:  # the copy overlaps what it writes: the last `distance` bytes repeat
                pattern = bytes(out[ref:])
                reps, rest = divmod(length, distance)
                out += pattern * reps + pattern[:rest]
        if len(out) > expected_size:
            raise _bad(f"LZF data expands past its stated size of {expected_size} bytes")
    if len(out) != expected_size:
        raise _bad(f"LZF data expands to {len(out)} bytes, not its stated {expected_size}")
    return bytes(out)


# --- the RDB reader ------------------------------------------------------------------------------------------

class _Reader:
    """Reads RDB lengths, strings, doubles and times from one value's bytes, raising IntegrityError."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, data: Buffer) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        self.buf = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.pos = 0
        self.size = len(self.buf)

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > self.size:
            raise _bad(f"{what} is truncated: needs {n} bytes at offset {self.pos}, "
                       f"only {self.size - self.pos} are left")
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def raw_length(self, what: str) -> tuple[int, bool]:
        """An RDB length and whether it is a special (encoded-string) marker."""
        if self.pos >= self.size:
            raise _bad(f"{what} is truncated: a length is missing at offset {self.pos}")
        first = self.buf[self.pos]
        kind = first >> 6
        if kind == 0:
            self.pos += 1
            return first & 0x3F, False
        if kind == 1:
            b = self.take(2, what)
            return ((b[0] & 0x3F) << 8) | b[1], False
        if kind == 3:
            self.pos += 1
            return first & 0x3F, True
        if first == 0x80:
            return int.from_bytes(self.take(5, what)[1:], "big"), False
        if first == 0x81:
            return int.from_bytes(self.take(9, what)[1:], "big"), False
        raise _bad(f"{what} has an unknown length encoding 0x{first:02x} at offset {self.pos}")

    def length(self, what: str) -> int:
        value, special = self.raw_length(what)
        if special:
            raise _bad(f"{what} has an encoded-string marker where a length belongs (offset {self.pos - 1})")
        return value

    def string(self, what: str) -> bytes:
        value, special = self.raw_length(what)
        if not special:
            return bytes(self.take(value, what))
        if value == 0:
            return str(int.from_bytes(self.take(1, what), "little", signed=True)).encode()
        if value == 1:
            return str(int.from_bytes(self.take(2, what), "little", signed=True)).encode()
        if value == 2:
            return str(int.from_bytes(self.take(4, what), "little", signed=True)).encode()
        if value == 3:
            compressed = self.length(what)
            size = self.length(what)
            return lzf_decompress(self.take(compressed, what), size)
        raise _bad(f"{what} has an unknown string encoding {value} at offset {self.pos - 1}")

    def ms_time(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little", signed=True)

    def binary_double(self, what: str) -> float:
        return float(_UNPACK_DOUBLE(self.take(8, what))[0])

    def string_double(self, what: str) -> float:
        size = self.take(1, what)[0]
        if size == 253:
            return math.nan
        if size == 254:
            return math.inf
        if size == 255:
            return -math.inf
        text = bytes(self.take(size, what))
        try:
            return float(text)
        except ValueError:
            raise _bad(f"{what} has a score that is not a number: {text[:40]!r}") from None

    def count(self, what: str, minimum_bytes: int) -> int:
        """A length that counts elements, checked against the bytes left (each takes >= minimum_bytes)."""
        n = self.length(what)
        if n * minimum_bytes > self.size - self.pos:
            raise _bad(f"{what} claims {n} elements but only {self.size - self.pos} bytes are left")
        return n

    def end(self, what: str) -> None:
        if self.pos != self.size:
            raise _bad(f"{what} has {self.size - self.pos} bytes left over after its end (offset {self.pos})")


def _as_bytes(blob: Buffer) -> bytes:
    return blob if isinstance(blob, bytes) else bytes(blob)


# --- listpack ------------------------------------------------------------------------------------------------

_BACKLEN_1 = [bytes([n]) for n in range(128)]


def _backlen(n: int) -> bytes:
    if n <= 127:
        return _BACKLEN_1[n]
    groups = []
    while True:
        groups.append(n & 127)
        n >>= 7
        if n == 0:
            break
    # most significant group first without the flag; every following group carries the 0x80 flag
    groups.reverse()
    return bytes([groups[0]] + [g | 128 for g in groups[1:]])


def listpack_items(blob: Buffer) -> list[bytes]:
    """The entries of a listpack (listpack.c), integers rendered as decimal ASCII; raises IntegrityError for
    a wrong header size or count, an unknown entry encoding, a bad back-length or a missing 0xFF terminator."""
    b = _as_bytes(blob)
    size = len(b)
    if size < 7:
        raise _bad(f"listpack of {size} bytes is shorter than its 7-byte header and terminator")
    total = int.from_bytes(b[0:4], "little")
    if total != size:
        raise _bad(f"listpack header says {total} bytes but the blob has {size}")
    count = int.from_bytes(b[4:6], "little")
    end = size - 1
    if b[end] != 0xFF:
        raise _bad(f"listpack does not end with its 0xFF terminator (last byte 0x{b[end]:02x})")
    items: list[bytes] = []
    append = items.append
    pos = 6
    while pos < end:
        start = pos
        e = b[pos]
        if e < 0x80:  # 7-bit unsigned int
            append(str(e).encode())
            pos += 1
        elif e < 0xC0:  # 6-bit string length
            pos += 1 + (e & 0x3F)
            append(b[start + 1:pos])
        elif e < 0xE0:  # 13-bit signed int
            pos += 2
            if pos > end:
                raise _bad(f"listpack entry at offset {start} is truncated")
            v = ((e & 0x1F) << 8) | b[start + 1]
            append(str(v - 8192 if v >= 4096 else v).encode())
        elif e < 0xF0:  # 12-bit string length
            if start + 2 > end:
                raise _bad(f"listpack entry at offset {start} is truncated")
            pos += 2 + (((e & 0x0F) << 8) | b[start + 1])
            append(b[start + 2:pos])
        elif e == 0xF0:  # 32-bit string length
            if start + 5 > end:
                raise _bad(f"listpack entry at offset {start} is truncated")
            pos += 5 + int.from_bytes(b[start + 1:start + 5], "little")
            append(b[start + 5:pos])
        elif 0xF1 <= e <= 0xF4:  # 16/24/32/64-bit signed int
            width = (2, 3, 4, 8)[e - 0xF1]
            pos += 1 + width
            if pos > end:
                raise _bad(f"listpack entry at offset {start} is truncated")
            append(str(int.from_bytes(b[start + 1:pos], "little", signed=True)).encode())
        elif e == 0xFF:
            raise _bad(f"listpack has its 0xFF terminator at offset {start}, before its last byte {end}")
        else:
            raise _bad(f"listpack entry at offset {start} has an unknown encoding byte 0x{e:02x}")
        if pos > end:
            raise _bad(f"listpack entry at offset {start} is truncated: it runs past the terminator")
        expected = _backlen(pos - start)
        back_end = pos + len(expected)
        if back_end > end or b[pos:back_end] != expected:
            raise _bad(f"listpack entry at offset {start} has a bad back-length "
                       f"(expected {expected.hex()} for {pos - start} bytes, found {b[pos:back_end].hex()})")
        pos = back_end
    if count != 65535 and count != len(items):
        raise _bad(f"listpack header counts {count} entries but it holds {len(items)}")
    return items


# --- ziplist -------------------------------------------------------------------------------------------------

def ziplist_items(blob: Buffer) -> list[bytes]:
    """The entries of a ziplist (ziplist.c, RDB <= 9), integers rendered as decimal ASCII; raises
    IntegrityError for a wrong header, prevlen, count or encoding, or a missing 0xFF terminator."""
    b = _as_bytes(blob)
    size = len(b)
    if size < 11:
        raise _bad(f"ziplist of {size} bytes is shorter than its 11-byte header and terminator")
    total = int.from_bytes(b[0:4], "little")
    if total != size:
        raise _bad(f"ziplist header says {total} bytes but the blob has {size}")
    tail = int.from_bytes(b[4:8], "little")
    count = int.from_bytes(b[8:10], "little")
    end = size - 1
    if b[end] != 0xFF:
        raise _bad(f"ziplist does not end with its 0xFF terminator (last byte 0x{b[end]:02x})")
    items: list[bytes] = []
    append = items.append
    pos = 10
    prev_len = 0
    last_start = 10
    while pos < end:
        start = pos
        if b[pos] < 254:
            stored_prev = b[pos]
            pos += 1
        else:
            if b[pos] == 0xFF or pos + 5 > end:
                raise _bad(f"ziplist entry at offset {start} has a bad previous-length field")
            stored_prev = int.from_bytes(b[pos + 1:pos + 5], "little")
            pos += 5
        if stored_prev != prev_len:
            raise _bad(f"ziplist entry at offset {start} says the previous entry has {stored_prev} bytes, "
                       f"it has {prev_len}")
        if pos >= end:
            raise _bad(f"ziplist entry at offset {start} is truncated")
        e = b[pos]
        top = e >> 6
        if top == 0:  # string, 6-bit length
            data = pos + 1
            pos = data + (e & 0x3F)
            append(b[data:pos])
        elif top == 1:  # string, 14-bit big-endian length
            if pos + 2 > end:
                raise _bad(f"ziplist entry at offset {start} is truncated")
            data = pos + 2
            pos = data + (((e & 0x3F) << 8) | b[pos + 1])
            append(b[data:pos])
        elif e == 0x80:  # string, 32-bit big-endian length
            if pos + 5 > end:
                raise _bad(f"ziplist entry at offset {start} is truncated")
            data = pos + 5
            pos = data + int.from_bytes(b[pos + 1:pos + 5], "big")
            append(b[data:pos])
        elif top == 2:
            raise _bad(f"ziplist entry at offset {start} has an unknown encoding byte 0x{e:02x}")
        else:
            if e == 0xC0:
                width = 2
            elif e == 0xD0:
                width = 4
            elif e == 0xE0:
                width = 8
            elif e == 0xF0:
                width = 3
            elif e == 0xFE:
                width = 1
            elif 0xF1 <= e <= 0xFD:  # 4-bit immediate 0..12
                width = 0
            else:
                raise _bad(f"ziplist entry at offset {start} has an unknown encoding byte 0x{e:02x}")
            data = pos + 1
            pos = data + width
            if width == 0:
                append(str((e & 0x0F) - 1).encode())
            elif pos <= end:
                append(str(int.from_bytes(b[data:pos], "little", signed=True)).encode())
        if pos > end:
            raise _bad(f"ziplist entry at offset {start} is truncated: it runs past the terminator")
        prev_len = pos - start
        last_start = start
    if items and tail != last_start:
        raise _bad(f"ziplist header puts its last entry at offset {tail}, it is at {last_start}")
    if count != 65535 and count != len(items):
        raise _bad(f"ziplist header counts {count} entries but it holds {len(items)}")
    return items


# --- intset, zipmap ------------------------------------------------------------------------------------------

def intset_items(blob: Buffer) -> list[bytes]:
    """The members of an intset (intset.c) as decimal ASCII; raises IntegrityError for an unknown width or a
    size that does not match its count."""
    b = _as_bytes(blob)
    if len(b) < 8:
        raise _bad(f"intset of {len(b)} bytes is shorter than its 8-byte header")
    width = int.from_bytes(b[0:4], "little")
    count = int.from_bytes(b[4:8], "little")
    if width not in (2, 4, 8):
        raise _bad(f"intset has an unknown integer width of {width} bytes")
    if len(b) != 8 + width * count:
        raise _bad(f"intset counts {count} members of {width} bytes but has {len(b) - 8} bytes of them")
    fmt = {2: "h", 4: "i", 8: "q"}[width]
    return [str(v).encode() for v in struct.unpack_from(f"<{count}{fmt}", b, 8)]


def zipmap_pairs(blob: Buffer) -> list[tuple[bytes, bytes]]:
    """The (field, value) pairs of a zipmap (zipmap.c, Redis <= 2.4); raises IntegrityError when it is
    truncated or lacks its 0xFF terminator."""
    b = _as_bytes(blob)
    size = len(b)
    if size < 2:
        raise _bad(f"zipmap of {size} bytes is too short")
    pairs: list[tuple[bytes, bytes]] = []
    pos = 1  # the first byte is a count hint (254 = unknown)

    def read_len(at: int) -> tuple[int, int]:
        if at >= size:
            raise _bad("zipmap is truncated: a length is missing")
        first = b[at]
        if first < 254:
            return first, at + 1
        if first == 254:
            if at + 5 > size:
                raise _bad("zipmap is truncated inside a 5-byte length")
            return int.from_bytes(b[at + 1:at + 5], "little"), at + 5
        raise _bad(f"zipmap has its terminator where a length belongs (offset {at})")

    while True:
        if pos >= size:
            raise _bad("zipmap does not end with its 0xFF terminator")
        if b[pos] == 0xFF:
            break
        key_len, pos = read_len(pos)
        key = b[pos:pos + key_len]
        pos += key_len
        value_len, pos = read_len(pos)
        if pos >= size:
            raise _bad("zipmap is truncated before a value's free-byte count")
        free = b[pos]
        pos += 1
        value = b[pos:pos + value_len]
        pos += value_len + free
        if pos > size:
            raise _bad("zipmap is truncated inside an entry")
        pairs.append((key, value))
    if pos != size - 1:
        raise _bad(f"zipmap has {size - 1 - pos} bytes after its terminator")
    if b[0] < 254 and b[0] != len(pairs):
        raise _bad(f"zipmap header counts {b[0]} pairs but it holds {len(pairs)}")
    return pairs


# --- decode --------------------------------------------------------------------------------------------------

def _pairs(items: list[bytes], what: str) -> list[tuple[bytes, bytes]]:
    if len(items) % 2:
        raise _bad(f"{what} holds an odd number of entries ({len(items)})")
    return list(zip(items[0::2], items[1::2], strict=True))


def _score(text: bytes, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(f"{what} has a score that is not a number: {text[:40]!r}") from None
    if math.isnan(value):
        raise _bad(f"{what} has a NaN score")
    return value


def _zset_from_flat(items: list[bytes], what: str) -> list[tuple[bytes, float]]:
    return [(member, _score(score, what)) for member, score in _pairs(items, what)]


def _hash_with_ttls_from_listpack(items: list[bytes], what: str) -> Decoded:
    if len(items) % 3:
        raise _bad(f"{what} holds {len(items)} entries, not (field, value, ttl) triples")
    out = Decoded("hash")
    for i in range(0, len(items), 3):
        name, value, ttl_text = items[i], items[i + 1], items[i + 2]
        try:
            ttl = int(ttl_text)
        except ValueError:
            raise _bad(f"{what} has a field TTL that is not an integer: {ttl_text[:40]!r}") from None
        out.pairs.append((name, value))
        if ttl != 0:  # HASH_LP_NO_TTL
            if not 0 < ttl <= _EB_EXPIRE_TIME_MAX:
                raise _bad(f"{what} has an invalid field expiration time {ttl}")
            out.field_ttls[name] = ttl
    return out


def _walk_stream(r: _Reader, rdb_type: int, drop: list[tuple[int, int]] | None,
                 into: int = TYPE_STREAM_LISTPACKS) -> None:
    """Walk a stream value (t_stream.c/rdb.c layout of types 15, 19 and 21), noting in `drop` the byte ranges
    that type `into` lacks; raises IntegrityError when the layout does not parse."""
    what = f"stream ({_TYPE_NAMES[rdb_type]})"
    nodes = r.count(what, 2)
    for _ in range(nodes):
        node_key = r.string(what)
        if len(node_key) != 16:
            raise _bad(f"{what} has a node key of {len(node_key)} bytes, not a 16-byte stream ID")
        blob = r.string(what)
        if not listpack_items(blob):
            raise _bad(f"{what} has an empty listpack node")
    r.length(what)  # number of entries
    r.length(what)  # last ID ms
    r.length(what)  # last ID seq
    if rdb_type >= TYPE_STREAM_LISTPACKS_2:
        start = r.pos
        for _ in range(5):  # first ID (ms, seq), max deleted ID (ms, seq), entries added
            r.length(what)
        if drop is not None and into < TYPE_STREAM_LISTPACKS_2:
            drop.append((start, r.pos))
    groups = r.count(what, 3)
    for _ in range(groups):
        r.string(what)  # group name
        r.length(what)  # last delivered ID ms
        r.length(what)  # last delivered ID seq
        if rdb_type >= TYPE_STREAM_LISTPACKS_2:
            start = r.pos
            r.length(what)  # entries read
            if drop is not None and into < TYPE_STREAM_LISTPACKS_2:
                drop.append((start, r.pos))
        pending = r.count(what, 25)
        for _ in range(pending):
            r.take(16, what)  # entry ID
            r.take(8, what)  # delivery time
            r.length(what)  # delivery count
        consumers = r.count(what, 10)
        for _ in range(consumers):
            r.string(what)  # consumer name
            r.take(8, what)  # seen time
            if rdb_type >= TYPE_STREAM_LISTPACKS_3:
                start = r.pos
                r.take(8, what)  # active time
                if drop is not None and into < TYPE_STREAM_LISTPACKS_3:
                    drop.append((start, r.pos))
            owned = r.count(what, 16)
            r.take(16 * owned, what)
    r.end(what)


def decode(rdb_type: int, value: Buffer, *, valkey: bool = False) -> Decoded:
    """Decode one value's RDB encoding (the bytes after its type byte) into elements; `valkey` says the file
    is Valkey >= 9's (type 22 is then HASH_2). Raises IntegrityError naming the type and what is wrong, or
    "unknown value type N"."""
    if rdb_type not in _TYPE_NAMES or (valkey and rdb_type > VALKEY_TYPE_HASH_2):
        raise IntegrityError(f"unknown value type {rdb_type}",
                             hint="the backup was made by a newer server than this tool knows")
    name = "hash_2" if valkey and rdb_type == VALKEY_TYPE_HASH_2 else _TYPE_NAMES[rdb_type]
    what = f"value of type {rdb_type} ({name})"
    try:
        return _decode(rdb_type, _Reader(value), what, valkey)
    except IntegrityError as exc:
        if exc.message.startswith(what):
            raise
        raise IntegrityError(f"{what} is malformed: {exc.message}", hint=exc.hint) from None


def _decode(t: int, r: _Reader, what: str, valkey: bool) -> Decoded:
    out: Decoded
    if t == TYPE_STRING:
        out = Decoded("string", string=r.string(what))
    elif t in (TYPE_LIST, TYPE_SET):
        n = r.count(what, 1)
        out = Decoded("list" if t == TYPE_LIST else "set", items=[r.string(what) for _ in range(n)])
    elif t in (TYPE_ZSET, TYPE_ZSET_2):
        n = r.count(what, 2)
        out = Decoded("zset")
        read_score = r.string_double if t == TYPE_ZSET else r.binary_double
        for _ in range(n):
            member = r.string(what)
            score = read_score(what)
            if math.isnan(score):
                raise _bad(f"{what} has a NaN score")
            out.scores.append((member, score))
    elif t == TYPE_HASH:
        n = r.count(what, 2)
        out = Decoded("hash", pairs=[(r.string(what), r.string(what)) for _ in range(n)])
    elif t in (TYPE_MODULE_PRE_GA, TYPE_MODULE_2):
        return Decoded("module")  # opaque: only its module can parse it
    elif t == TYPE_HASH_ZIPMAP:
        out = Decoded("hash", pairs=zipmap_pairs(r.string(what)))
    elif t == TYPE_LIST_ZIPLIST:
        out = Decoded("list", items=ziplist_items(r.string(what)))
    elif t == TYPE_SET_INTSET:
        out = Decoded("set", items=intset_items(r.string(what)))
    elif t == TYPE_ZSET_ZIPLIST:
        out = Decoded("zset", scores=_zset_from_flat(ziplist_items(r.string(what)), what))
    elif t == TYPE_HASH_ZIPLIST:
        out = Decoded("hash", pairs=_pairs(ziplist_items(r.string(what)), what))
    elif t == TYPE_LIST_QUICKLIST:
        out = Decoded("list")
        for _ in range(r.count(what, 1)):
            out.items += ziplist_items(r.string(what))
    elif t in (TYPE_STREAM_LISTPACKS, TYPE_STREAM_LISTPACKS_2, TYPE_STREAM_LISTPACKS_3):
        _walk_stream(r, t, None)
        return Decoded("stream")
    elif t == TYPE_HASH_LISTPACK:
        out = Decoded("hash", pairs=_pairs(listpack_items(r.string(what)), what))
    elif t == TYPE_ZSET_LISTPACK:
        out = Decoded("zset", scores=_zset_from_flat(listpack_items(r.string(what)), what))
    elif t == TYPE_LIST_QUICKLIST_2:
        out = Decoded("list")
        for _ in range(r.count(what, 2)):
            container = r.length(what)
            if container == _QUICKLIST_PLAIN:
                out.items.append(r.string(what))
            elif container == _QUICKLIST_PACKED:
                out.items += listpack_items(r.string(what))
            else:
                raise _bad(f"{what} has a quicklist node of unknown container kind {container}")
    elif t == TYPE_SET_LISTPACK:
        out = Decoded("set", items=listpack_items(r.string(what)))
    elif valkey and t == VALKEY_TYPE_HASH_2:
        out = Decoded("hash")
        for _ in range(r.count(what, 10)):
            name = r.string(what)
            out.pairs.append((name, r.string(what)))
            expiry = r.ms_time(what)
            if expiry >= 0:
                out.field_ttls[name] = expiry
            elif expiry != -1:  # EXPIRY_NONE
                raise _bad(f"{what} has an invalid field expiration time {expiry}")
    elif t in (TYPE_HASH_METADATA_PRE_GA, TYPE_HASH_METADATA):
        min_expire = r.ms_time(what) if t == TYPE_HASH_METADATA else 0
        out = Decoded("hash")
        for _ in range(r.count(what, 3)):
            ttl = r.length(what)
            name = r.string(what)
            out.pairs.append((name, r.string(what)))
            if ttl:
                expire_at = ttl + min_expire - 1 if t == TYPE_HASH_METADATA else ttl
                if expire_at > _EB_EXPIRE_TIME_MAX or expire_at <= 0:
                    raise _bad(f"{what} has an invalid field expiration time {expire_at}")
                out.field_ttls[name] = expire_at
    elif t in (TYPE_HASH_LISTPACK_EX_PRE_GA, TYPE_HASH_LISTPACK_EX):
        if t == TYPE_HASH_LISTPACK_EX:
            r.ms_time(what)  # the hash's next expiration, derived from the fields
        out = _hash_with_ttls_from_listpack(listpack_items(r.string(what)), what)
    else:  # pragma: no cover - _TYPE_NAMES and the branches above list the same types
        raise IntegrityError(f"unknown value type {t}")
    r.end(what)
    return out


# --- encode --------------------------------------------------------------------------------------------------

def _enc_len(n: int) -> bytes:
    if n < 64:
        return bytes([n])
    if n < 16384:
        return bytes([0x40 | (n >> 8), n & 0xFF])
    if n <= 0xFFFFFFFF:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def _enc_strings(parts: list[bytes], strings: Iterable[bytes]) -> None:
    for s in strings:
        parts.append(_enc_len(len(s)))
        parts.append(s)


def encode_portable(decoded: Decoded) -> tuple[int, bytes]:
    """The element-wise encoding of a value that every Redis >= 5 and Valkey can RESTORE: (type, value bytes)
    with type 0 string, 1 list, 2 set, 5 zset_2 or 4 hash. Raises NotPortable for hashes with field TTLs,
    streams and module values, IntegrityError for an empty collection (no server restores one)."""
    kind = decoded.kind
    if kind in ("stream", "module"):
        raise NotPortable(f"a {kind} value has no element-wise encoding",
                          hint="send it as it is, or as a type 15 stream for an older server")
    if decoded.field_ttls:
        raise NotPortable(f"a hash with {len(decoded.field_ttls)} field TTLs has no encoding every server can "
                          "restore", hint="restore it with commands (HSET, HPEXPIREAT) on Redis >= 7.4 or "
                          "Valkey >= 9, or into a server of the backup's own kind")
    parts: list[bytes] = []
    if kind == "string":
        _enc_strings(parts, (decoded.string,))
        return TYPE_STRING, b"".join(parts)
    if decoded.count == 0:
        raise IntegrityError(f"an empty {kind} cannot be restored", hint="servers never hold empty collections")
    if kind in ("list", "set"):
        parts.append(_enc_len(len(decoded.items)))
        _enc_strings(parts, decoded.items)
        return (TYPE_LIST if kind == "list" else TYPE_SET), b"".join(parts)
    if kind == "zset":
        parts.append(_enc_len(len(decoded.scores)))
        for member, score in decoded.scores:
            parts.append(_enc_len(len(member)))
            parts.append(member)
            parts.append(_PACK_DOUBLE(score))
        return TYPE_ZSET_2, b"".join(parts)
    parts.append(_enc_len(len(decoded.pairs)))
    for name, value in decoded.pairs:
        parts.append(_enc_len(len(name)))
        parts.append(name)
        parts.append(_enc_len(len(value)))
        parts.append(value)
    return TYPE_HASH, b"".join(parts)


def dump_payload(rdb_type: int, value: Buffer, rdb_version: int) -> bytes:
    """A DUMP/RESTORE payload: type byte, value, 2-byte little-endian RDB version and the little-endian
    CRC-64 of all of that. Raises ValueError for a type or version out of range."""
    if not 0 <= rdb_type <= 255 or not 0 <= rdb_version <= 0xFFFF:
        raise ValueError(f"type {rdb_type} or RDB version {rdb_version} is out of range")
    body = bytearray()
    body.append(rdb_type)
    body += value
    body += rdb_version.to_bytes(2, "little")
    body += crc64(body).to_bytes(8, "little")
    return bytes(body)


def stream_as_v1(rdb_type: int, value: Buffer) -> bytes:
    """A stream of type 19 or 21 re-encoded as type 15 (Redis 5-6.2) by dropping the first and max-deleted
    IDs, entries-added, groups' entries-read and consumers' active-time; listpack nodes are kept as they are.
    Raises IntegrityError when the value does not parse or is not a stream."""
    return stream_as(rdb_type, value, TYPE_STREAM_LISTPACKS)


def stream_as(rdb_type: int, value: Buffer, into: int) -> bytes:
    """A stream of type 15, 19 or 21 re-encoded as the older stream type `into` (19: Redis 7.0, which lacks
    only the consumers' active-time; 15: Redis 5-6.2), dropping the fields that type lacks. Raises
    IntegrityError when the value does not parse or is not a stream."""
    if rdb_type not in (TYPE_STREAM_LISTPACKS, TYPE_STREAM_LISTPACKS_2, TYPE_STREAM_LISTPACKS_3):
        raise IntegrityError(f"value type {rdb_type} is not a stream")
    drop: list[tuple[int, int]] = []
    reader = _Reader(value)
    try:
        _walk_stream(reader, rdb_type, drop, into)
    except IntegrityError as exc:
        raise IntegrityError(f"stream of type {rdb_type} is malformed: {exc.message}", hint=exc.hint) from None
    view = reader.buf
    parts: list[Buffer] = []
    mark = 0
    for start, stop in drop:
        parts.append(view[mark:start])
        mark = stop
    parts.append(view[mark:])
    return b"".join(parts)


# --- commands ------------------------------------------------------------------------------------------------

def _score_text(score: float) -> bytes:
    # repr() round-trips every double exactly; inf/-inf are what ZADD accepts.
    return repr(score).encode()


def _batches(command: bytes, key: bytes, groups: Iterable[tuple[bytes, ...]], max_bulk: int,
             ) -> Iterator[list[bytes]]:
    """`command key group...` commands whose arguments total at most max_bulk bytes; a single group larger
    than that goes alone in its command."""
    head = [command, key]
    base = len(command) + len(key)
    args: list[bytes] = []
    size = base
    for group in groups:
        group_size = sum(len(x) for x in group)
        if args and size + group_size > max_bulk:
            yield head + args
            args = []
            size = base
        args.extend(group)
        size += group_size
    if args:
        yield head + args


def value_commands(key: bytes, decoded: Decoded, *, max_bulk: int, field_ttls: bool = True,
                   ) -> Iterator[list[bytes]]:
    """Commands that rebuild a value into a key the caller has deleted (SET+APPEND, RPUSH, SADD, ZADD, HSET,
    then HPEXPIREAT per field TTL when `field_ttls`), each with at most max_bulk bytes of arguments unless a
    single element is larger on its own. Raises NotPortable for streams and module values."""
    if max_bulk < 1:
        raise ValueError(f"max_bulk must be positive, not {max_bulk}")
    kind = decoded.kind
    if kind in ("stream", "module"):
        raise NotPortable(f"a {kind} value cannot be rebuilt with commands",
                          hint="send it with RESTORE as it is")
    if kind == "string":
        data = decoded.string
        first = max(1, max_bulk - len(b"SET") - len(key))
        yield [b"SET", key, data[:first]]
        step = max(1, max_bulk - len(b"APPEND") - len(key))
        for at in range(first, len(data), step):
            yield [b"APPEND", key, data[at:at + step]]
        return
    if kind == "list":
        yield from _batches(b"RPUSH", key, ((item,) for item in decoded.items), max_bulk)
    elif kind == "set":
        yield from _batches(b"SADD", key, ((item,) for item in decoded.items), max_bulk)
    elif kind == "zset":
        yield from _batches(b"ZADD", key, ((_score_text(s), m) for m, s in decoded.scores), max_bulk)
    else:
        yield from _batches(b"HSET", key, decoded.pairs, max_bulk)
        if field_ttls and decoded.field_ttls:
            by_time: dict[int, list[bytes]] = {}
            for name, when in decoded.field_ttls.items():
                by_time.setdefault(when, []).append(name)
            for when, names in by_time.items():
                head = [b"HPEXPIREAT", key, str(when).encode(), b"FIELDS"]
                base = sum(len(x) for x in head) + 10
                batch: list[bytes] = []
                size = base
                for name in names:
                    if batch and size + len(name) > max_bulk:
                        yield [*head, str(len(batch)).encode(), *batch]
                        batch = []
                        size = base
                    batch.append(name)
                    size += len(name)
                yield [*head, str(len(batch)).encode(), *batch]
