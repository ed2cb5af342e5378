"""redis_values: RDB value decoders and encoders on hand-built vectors and on DUMP payloads captured from real
servers (Redis 6.2.14 and 7.0.15)."""

from __future__ import annotations

import math
import struct

import pytest

from kkua_backupd.errors import IntegrityError
from kkua_backupd.sources.redis.values import (
    Decoded,
    NotPortable,
    crc64,
    decode,
    dump_payload,
    encode_portable,
    intset_items,
    listpack_items,
    lzf_decompress,
    stream_as_v1,
    value_commands,
    ziplist_items,
    zipmap_pairs,
)

# DUMP payloads taken from real servers: SET s "kkua-backupd " * 5 (LZF), RPUSH l a 1 -200 70000 hello,
# ZADD z 1.5 x inf y, HSET h f v n 12.
REDIS_62 = {
    "s": "00c31540410d6b6b75612d6261636b757064206be0280c0164200900694aa72766a7159b",
    "l": "0e01202000000018000000050000016103f202c038ff04f0701101050568656c6c6fff0900e5736e1dc64138e4",
    "z": "0c1b1b0000001500000004000001780303312e350501790303696e66ff0900e07c3980c04e5ef6",
    "h": "0d161600000013000000040000016603017603016e03fdff0900622ff178b338a428",
}
REDIS_70 = {
    "s": "00c31540410d6b6b75612d6261636b757064206be0280c0164200a00b9b8f6eb3221762a",
    "l": "1201021b1b00000005008161020101df3802f2701101048568656c6c6f06ff0a00460c18e961215a93",
    "z": "111717000000040081780283312e350481790283696e6604ff0a004308dbe897ba34c8",
    "h": "1012120000000400816602817602816e020c01ff0a0001369481d35b8974",
}


def split(payload_hex: str) -> tuple[int, bytes, int]:
    payload = bytes.fromhex(payload_hex)
    return payload[0], payload[1:-10], int.from_bytes(payload[-10:-8], "little")


# --- hand encoders, written from the format descriptions (not from the module under test) -------------------

def rdb_len(n: int) -> bytes:
    if n < 64:
        return bytes([n])
    if n < 16384:
        return bytes([0x40 | n >> 8, n & 0xFF])
    if n < 2**32:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def rdb_str(s: bytes) -> bytes:
    return rdb_len(len(s)) + s


def lp_backlen(n: int) -> bytes:
    if n <= 127:
        return bytes([n])
    if n < 16383:
        return bytes([n >> 7, (n & 127) | 128])
    if n < 2097151:
        return bytes([n >> 14, ((n >> 7) & 127) | 128, (n & 127) | 128])
    return bytes([n >> 21, ((n >> 14) & 127) | 128, ((n >> 7) & 127) | 128, (n & 127) | 128])


def lp_entry(encoded: bytes) -> bytes:
    return encoded + lp_backlen(len(encoded))


def listpack(entries: list[bytes], count: int | None = None) -> bytes:
    body = b"".join(lp_entry(e) for e in entries)
    n = len(entries) if count is None else count
    return (6 + len(body) + 1).to_bytes(4, "little") + n.to_bytes(2, "little") + body + b"\xff"


def lp_str(s: bytes) -> bytes:
    if len(s) < 64:
        return bytes([0x80 | len(s)]) + s
    if len(s) < 4096:
        return bytes([0xE0 | len(s) >> 8, len(s) & 0xFF]) + s
    return b"\xf0" + len(s).to_bytes(4, "little") + s


def lp_int(v: int) -> bytes:
    if 0 <= v <= 127:
        return bytes([v])
    if -4096 <= v <= 4095:
        u = v & 0x1FFF
        return bytes([0xC0 | u >> 8, u & 0xFF])
    for code, width in ((0xF1, 2), (0xF2, 3), (0xF3, 4), (0xF4, 8)):
        if -(2 ** (8 * width - 1)) <= v < 2 ** (8 * width - 1):
            return bytes([code]) + v.to_bytes(width, "little", signed=True)
    raise AssertionError(v)


def zl_entry(prevlen: int, encoded: bytes) -> bytes:
    prev = bytes([prevlen]) if prevlen < 254 else b"\xfe" + prevlen.to_bytes(4, "little")
    return prev + encoded


def ziplist(encoded_entries: list[bytes]) -> bytes:
    body = b""
    prevlen = 0
    tail = 10
    for enc in encoded_entries:
        entry = zl_entry(prevlen, enc)
        tail = 10 + len(body)
        body += entry
        prevlen = len(entry)
    total = 10 + len(body) + 1
    return (total.to_bytes(4, "little") + tail.to_bytes(4, "little") + len(encoded_entries).to_bytes(2, "little")
            + body + b"\xff")


def zl_str(s: bytes) -> bytes:
    if len(s) < 64:
        return bytes([len(s)]) + s
    if len(s) < 16384:
        return bytes([0x40 | len(s) >> 8, len(s) & 0xFF]) + s
    return b"\x80" + len(s).to_bytes(4, "big") + s


# --- lengths and string encodings ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 63, 64, 16383, 16384, 70000])
def test_string_lengths(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    assert decode(0, rdb_str(data)) == Decoded("string", string=data)


def test_string_64bit_length_marker() -> None:
    assert decode(0, b"\x81" + (3).to_bytes(8, "big") + b"abc").string == b"abc"
    assert decode(0, b"\x80" + (3).to_bytes(4, "big") + b"abc").string == b"abc"


@pytest.mark.parametrize(("raw", "text"), [
    (b"\xc0\x7f", b"127"), (b"\xc0\x80", b"-128"),
    (b"\xc1" + (-300).to_bytes(2, "little", signed=True), b"-300"),
    (b"\xc1\xff\x7f", b"32767"),
    (b"\xc2" + (2**31 - 1).to_bytes(4, "little"), b"2147483647"),
    (b"\xc2" + (-(2**31)).to_bytes(4, "little", signed=True), b"-2147483648"),
])
def test_string_int_encodings(raw: bytes, text: bytes) -> None:
    assert decode(0, raw).string == text


def test_lzf_hand_vector_with_overlapping_reference() -> None:
    # literal "a", then a back reference of 7+0+2 = 9 bytes at distance 1 (overlapping copy)
    assert lzf_decompress(b"\x00a\xe0\x00\x00", 10) == b"a" * 10
    # literal "abc", then 3+2 = 5 bytes from distance 3, then literal "Z"
    assert lzf_decompress(b"\x02abc\x60\x02\x00Z", 9) == b"abcabcabZ"


def test_lzf_known_vector_from_a_real_dump() -> None:
    for payloads in (REDIS_62, REDIS_70):
        rdb_type, value, _ = split(payloads["s"])
        assert rdb_type == 0 and value[0] == 0xC3  # LZF-encoded
        assert decode(rdb_type, value).string == b"kkua-backupd " * 5


@pytest.mark.parametrize(("data", "size", "message"), [
    (b"\x05abc", 6, "literal run"),
    (b"\x00a\xe0", 10, "truncated inside a back reference"),
    (b"\x00a\x20\x05", 4, "before the start"),
    (b"\x00a\xe0\x00\x00", 9, "past its stated size"),
    (b"\x00a\xe0\x00\x00", 11, "expands to 10 bytes, not its stated 11"),
])
def test_lzf_corrupt(data: bytes, size: int, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        lzf_decompress(data, size)


def test_lzf_wrong_size_inside_a_value_names_the_type() -> None:
    value = b"\xc3" + rdb_len(5) + rdb_len(11) + b"\x00a\xe0\x00\x00"
    with pytest.raises(IntegrityError, match=r"value of type 0 \(string\) is malformed: LZF"):
        decode(0, value)


# --- listpack -----------------------------------------------------------------------------------------------

LP_CASES: list[tuple[bytes, bytes]] = [
    (bytes([5]), b"5"),  # 7-bit uint
    (bytes([127]), b"127"),
    (b"\x83abc", b"abc"),  # 6-bit string
    (b"\x80", b""),
    (lp_int(-4096), b"-4096"),  # 13-bit int
    (lp_int(4095), b"4095"),
    (lp_int(-1), b"-1"),
    (lp_str(b"x" * 100), b"x" * 100),  # 12-bit string
    (lp_str(b"y" * 4095), b"y" * 4095),
    (lp_int(-32768), b"-32768"),  # 16-bit
    (lp_int(8388607), b"8388607"),  # 24-bit
    (lp_int(-(2**31)), b"-2147483648"),  # 32-bit
    (lp_int(2**63 - 1), b"9223372036854775807"),  # 64-bit
    (lp_int(-(2**63)), b"-9223372036854775808"),
    (lp_str(b"z" * 20000), b"z" * 20000),  # 32-bit string, 3-byte back-length
]


def test_listpack_every_entry_encoding() -> None:
    assert [e[0] >> 4 for e, _ in LP_CASES[:1]] == [0]
    encodings = {e[0] & 0xF0 if e[0] >= 0xF0 else e[0] & 0xE0 for e, _ in LP_CASES}
    assert {0xC0, 0xE0, 0xF0} <= encodings
    blob = listpack([e for e, _ in LP_CASES])
    assert listpack_items(blob) == [text for _, text in LP_CASES]
    assert listpack_items(memoryview(blob)) == [text for _, text in LP_CASES]


def test_listpack_unknown_count_header() -> None:
    assert listpack_items(listpack([b"\x81a", b"\x07"], count=65535)) == [b"a", b"7"]


def test_listpack_known_vectors_from_real_dumps() -> None:
    rdb_type, value, version = split(REDIS_70["l"])
    assert (rdb_type, version) == (18, 10)
    assert decode(rdb_type, value).items == [b"a", b"1", b"-200", b"70000", b"hello"]
    rdb_type, value, _ = split(REDIS_70["z"])
    assert decode(rdb_type, value).scores == [(b"x", 1.5), (b"y", math.inf)]
    rdb_type, value, _ = split(REDIS_70["h"])
    assert decode(rdb_type, value).pairs == [(b"f", b"v"), (b"n", b"12")]


@pytest.mark.parametrize(("blob", "message"), [
    (listpack([b"\x81a"])[:-1] + b"\x00", "0xFF terminator"),
    (b"\x0b\x00\x00\x00\x01\x00\x81a\x02\xff\xff", "terminator at offset"),
    (listpack([b"\x81a"], count=2), "counts 2 entries but it holds 1"),
    (b"\x0c\x00\x00\x00\x01\x00\x81a\x02\xff", "header says 12 bytes"),
    (b"\x0a\x00\x00\x00\x01\x00\x81a\x03\xff", "bad back-length"),
    (b"\x0a\x00\x00\x00\x01\x00\xf5a\x03\xff", "unknown encoding byte 0xf5"),
    (b"\x0a\x00\x00\x00\x01\x00\x85a\x03\xff", "truncated"),
    (b"\x03\x00\x00", "shorter than"),
])
def test_listpack_corrupt(blob: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        listpack_items(blob)


# --- ziplist ------------------------------------------------------------------------------------------------

ZL_CASES: list[tuple[bytes, bytes]] = [
    (zl_str(b"abc"), b"abc"),  # 6-bit string
    (zl_str(b"s" * 300), b"s" * 300),  # 14-bit string (and the next entry gets a 5-byte prevlen)
    (zl_str(b"L" * 16384), b"L" * 16384),  # 32-bit string
    (b"\xfe\x85", b"-123"),  # int8
    (b"\xc0" + (-30000).to_bytes(2, "little", signed=True), b"-30000"),  # int16
    (b"\xf0" + (-8000000).to_bytes(3, "little", signed=True), b"-8000000"),  # int24
    (b"\xd0" + (2**31 - 1).to_bytes(4, "little"), b"2147483647"),  # int32
    (b"\xe0" + (-(2**63)).to_bytes(8, "little", signed=True), b"-9223372036854775808"),  # int64
    (b"\xf1", b"0"),  # 4-bit immediates 0..12
    (b"\xfd", b"12"),
]


def test_ziplist_every_entry_encoding() -> None:
    blob = ziplist([e for e, _ in ZL_CASES])
    assert ziplist_items(blob) == [text for _, text in ZL_CASES]


def test_ziplist_known_vectors_from_real_dumps() -> None:
    rdb_type, value, version = split(REDIS_62["l"])
    assert (rdb_type, version) == (14, 9)
    assert decode(rdb_type, value).items == [b"a", b"1", b"-200", b"70000", b"hello"]
    rdb_type, value, _ = split(REDIS_62["z"])
    assert decode(rdb_type, value) == Decoded("zset", scores=[(b"x", 1.5), (b"y", math.inf)])
    rdb_type, value, _ = split(REDIS_62["h"])
    assert decode(rdb_type, value) == Decoded("hash", pairs=[(b"f", b"v"), (b"n", b"12")])


def test_ziplist_corrupt() -> None:
    good = ziplist([zl_str(b"abc"), b"\xf2"])
    assert ziplist_items(good) == [b"abc", b"1"]
    bad_prev = bytearray(good)
    bad_prev[15] = 9  # the second entry's prevlen
    with pytest.raises(IntegrityError, match="previous entry has 9 bytes, it has 5"):
        ziplist_items(bytes(bad_prev))
    with pytest.raises(IntegrityError, match="0xFF terminator"):
        ziplist_items(good[:-1] + b"\x00")
    bad_count = good[:8] + (3).to_bytes(2, "little") + good[10:]
    with pytest.raises(IntegrityError, match="counts 3 entries but it holds 2"):
        ziplist_items(bad_count)
    bad_tail = good[:4] + (10).to_bytes(4, "little") + good[8:]
    with pytest.raises(IntegrityError, match="last entry at offset 10"):
        ziplist_items(bad_tail)
    with pytest.raises(IntegrityError, match="truncated"):
        ziplist_items(ziplist([b"\x0aabc"]))


# --- intset, zipmap -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "fmt", "values"), [
    (2, "h", [-32768, -1, 0, 5, 32767]),
    (4, "i", [-(2**31), 70000]),
    (8, "q", [-(2**63), 2**40, 2**63 - 1]),
])
def test_intset(width: int, fmt: str, values: list[int]) -> None:
    blob = struct.pack(f"<II{len(values)}{fmt}", width, len(values), *values)
    assert intset_items(blob) == [str(v).encode() for v in values]
    assert decode(11, rdb_str(blob)) == Decoded("set", items=[str(v).encode() for v in values])


def test_intset_corrupt() -> None:
    with pytest.raises(IntegrityError, match="unknown integer width of 3"):
        intset_items(struct.pack("<II", 3, 0))
    with pytest.raises(IntegrityError, match="counts 2 members"):
        intset_items(struct.pack("<IIh", 2, 2, 1))


def test_zipmap() -> None:
    # the example from zipmap.c, then one with free bytes after a value and a 5-byte length
    assert zipmap_pairs(b"\x02\x03foo\x03\x00bar\x05hello\x05\x00world\xff") == [(b"foo", b"bar"),
                                                                                (b"hello", b"world")]
    big = b"v" * 300
    blob = b"\x02\x01a\x02\x03hi---\xfe" + (3).to_bytes(4, "little") + b"key\xfe" + (300).to_bytes(4, "little") \
        + b"\x00" + big + b"\xff"
    assert zipmap_pairs(blob) == [(b"a", b"hi"), (b"key", big)]
    assert decode(9, rdb_str(blob)).pairs == [(b"a", b"hi"), (b"key", big)]
    with pytest.raises(IntegrityError, match="terminator"):
        zipmap_pairs(b"\x01\x01a\x01\x00b")
    with pytest.raises(IntegrityError, match="counts 3 pairs"):
        zipmap_pairs(b"\x03\x01a\x01\x00b\xff")


# --- every type ---------------------------------------------------------------------------------------------

def test_plain_types() -> None:
    items = [b"a", b"", "한국어".encode(), bytes(range(256))]
    assert decode(1, rdb_len(4) + b"".join(rdb_str(i) for i in items)) == Decoded("list", items=items)
    assert decode(2, rdb_len(4) + b"".join(rdb_str(i) for i in items)) == Decoded("set", items=items)
    assert decode(4, rdb_len(1) + rdb_str(b"f") + b"\xc0\x05") == Decoded("hash", pairs=[(b"f", b"5")])
    zset_2 = rdb_len(3) + b"".join(rdb_str(m) + struct.pack("<d", s)
                                   for m, s in ((b"a", 1e-300), (b"b", -math.inf), (b"c", 0.1)))
    assert decode(5, zset_2).scores == [(b"a", 1e-300), (b"b", -math.inf), (b"c", 0.1)]


def test_zset_with_string_scores() -> None:
    value = rdb_len(3) + rdb_str(b"a") + b"\x04-2.5" + rdb_str(b"b") + b"\xfe" + rdb_str(b"c") + b"\xff"
    assert decode(3, value).scores == [(b"a", -2.5), (b"b", math.inf), (b"c", -math.inf)]
    with pytest.raises(IntegrityError, match="NaN score"):
        decode(3, rdb_len(1) + rdb_str(b"a") + b"\xfd")


def test_list_ziplist_and_quicklists() -> None:
    zl = ziplist([zl_str(b"a"), b"\xf3"])
    assert decode(10, rdb_str(zl)).items == [b"a", b"2"]
    assert decode(14, rdb_len(2) + rdb_str(zl) + rdb_str(zl)).items == [b"a", b"2", b"a", b"2"]
    lp = listpack([b"\x81x", lp_int(-7)])
    value = rdb_len(3) + b"\x02" + rdb_str(lp) + b"\x01" + rdb_str(b"plain" * 20) + b"\x02" + rdb_str(lp)
    assert decode(18, value).items == [b"x", b"-7", b"plain" * 20, b"x", b"-7"]
    with pytest.raises(IntegrityError, match="unknown container kind 3"):
        decode(18, rdb_len(1) + b"\x03" + rdb_str(lp))


def test_listpack_types() -> None:
    lp = listpack([b"\x81f", lp_int(300), b"\x81g", b"\x82hi"])
    assert decode(16, rdb_str(lp)).pairs == [(b"f", b"300"), (b"g", b"hi")]
    assert decode(20, rdb_str(lp)).items == [b"f", b"300", b"g", b"hi"]
    zlp = listpack([b"\x81a", b"\x03", b"\x81b", lp_str(b"1.0000000000000001e-300"), b"\x81c", b"\x83inf"])
    assert decode(17, rdb_str(zlp)).scores == [(b"a", 3.0), (b"b", 1e-300), (b"c", math.inf)]
    with pytest.raises(IntegrityError, match="odd number of entries"):
        decode(16, rdb_str(listpack([b"\x81f"])))


MIN = 1_800_000_000_000


def test_redis_hashes_with_field_ttls() -> None:
    want = Decoded("hash", pairs=[(b"a", b"1"), (b"b", b"2")], field_ttls={b"a": MIN + 500})
    # 22 HASH_METADATA_PRE_GA: (absolute ttl, field, value) triples
    pre_ga = rdb_len(2) + rdb_len(MIN + 500) + rdb_str(b"a") + rdb_str(b"1") + b"\x00" + rdb_str(b"b") + rdb_str(b"2")
    assert decode(22, pre_ga) == want
    # 24 HASH_METADATA: min expire first, then ttl relative to it (+1; 0 = none)
    meta = struct.pack("<q", MIN) + rdb_len(2) + rdb_len(501) + rdb_str(b"a") + rdb_str(b"1") + b"\x00" \
        + rdb_str(b"b") + rdb_str(b"2")
    assert decode(24, meta) == want
    # 23 / 25 HASH_LISTPACK_EX(_PRE_GA): (field, value, absolute ttl or 0) triples; 25 has a min expire first
    lp = listpack([b"\x81a", b"\x01", lp_int(MIN + 500), b"\x81b", b"\x02", b"\x00"])
    assert decode(23, rdb_str(lp)) == want
    assert decode(25, struct.pack("<q", MIN) + rdb_str(lp)) == want
    with pytest.raises(IntegrityError, match="not \\(field, value, ttl\\) triples"):
        decode(23, rdb_str(listpack([b"\x81a", b"\x01"])))


def test_valkey_hash_2() -> None:
    value = rdb_len(2) + rdb_str(b"a") + rdb_str(b"1") + struct.pack("<q", MIN + 500) \
        + rdb_str(b"b") + rdb_str(b"2") + struct.pack("<q", -1)
    want = Decoded("hash", pairs=[(b"a", b"1"), (b"b", b"2")], field_ttls={b"a": MIN + 500})
    assert decode(22, value, valkey=True) == want
    with pytest.raises(IntegrityError):  # the same bytes are not a Redis type 22
        decode(22, value)
    with pytest.raises(IntegrityError, match="unknown value type 24"):
        decode(24, value, valkey=True)


@pytest.mark.parametrize("rdb_type", [8, 26, 200])
def test_unknown_types(rdb_type: int) -> None:
    with pytest.raises(IntegrityError, match=f"^unknown value type {rdb_type}"):
        decode(rdb_type, b"\x00")


@pytest.mark.parametrize(("rdb_type", "value", "message"), [
    (0, b"\x05ab", r"type 0 \(string\) is truncated: needs 5 bytes at offset 1, only 2 are left"),
    (0, b"\x01ab", "1 bytes left over"),
    (1, b"\x03\x01a", "claims 3 elements"),
    (1, b"\x02\x01a", "truncated: a length is missing"),
    (0, b"\xc5", "unknown string encoding 5"),
    (0, b"\x82", "unknown length encoding 0x82"),
    (16, b"\x0a" + b"\x0a\x00\x00\x00\x01\x00\x81a\x03\xff", r"type 16 \(hash_listpack\) is malformed: .*back-length"),
    (5, b"\x01\x01a\x00\x00", "truncated"),
])
def test_malformed_values(rdb_type: int, value: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        decode(rdb_type, value)


# --- encode_portable, dump_payload --------------------------------------------------------------------------

def test_crc64_check_value_and_real_payloads() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    assert crc64(b"6789", crc64(b"12345")) == 0xE9C6D914C4B8D9CA
    for payloads in (REDIS_62, REDIS_70):
        for payload_hex in payloads.values():
            rdb_type, value, version = split(payload_hex)
            assert dump_payload(rdb_type, value, version).hex() == payload_hex


@pytest.mark.parametrize("decoded", [
    Decoded("string", string=b"x" * 100),
    Decoded("string", string=b""),
    Decoded("list", items=[b"1", b"", "안녕".encode()] * 30),
    Decoded("set", items=[str(i).encode() for i in range(500)]),
    Decoded("zset", scores=[(b"a", 1e-300), (b"b", math.inf), (b"c", -math.inf), (b"d", -0.0), (b"e", 0.1)]),
    Decoded("hash", pairs=[(b"f" * 70, b"v" * 20000), (b"", b"")]),
])
def test_encode_portable_round_trip(decoded: Decoded) -> None:
    rdb_type, value = encode_portable(decoded)
    assert rdb_type in (0, 1, 2, 4, 5)
    assert decode(rdb_type, value) == decoded


def test_encode_portable_refuses() -> None:
    with pytest.raises(NotPortable, match="field TTLs"):
        encode_portable(Decoded("hash", pairs=[(b"a", b"1")], field_ttls={b"a": MIN}))
    with pytest.raises(NotPortable):
        encode_portable(Decoded("stream"))
    with pytest.raises(IntegrityError, match="empty list"):
        encode_portable(Decoded("list"))


# --- stream_as_v1 -------------------------------------------------------------------------------------------

def hand_stream(version: int) -> bytes:
    node = listpack([b"\x01", b"\x00", b"\x01", b"\x81f", b"\x00", b"\x01", b"\x00", b"\x00", b"\x81v", b"\x04",
                     b"\x01"])
    parts = [rdb_len(1), rdb_str(bytes(8) + (1).to_bytes(8, "big")), rdb_str(node),
             rdb_len(1), rdb_len(1), rdb_len(1)]  # length, last id
    if version >= 19:
        parts += [rdb_len(1), rdb_len(1), rdb_len(0), rdb_len(0), rdb_len(3)]  # first id, max deleted, added
    parts += [rdb_len(1), rdb_str(b"g"), rdb_len(1), rdb_len(1)]  # one group, last delivered id
    if version >= 19:
        parts += [rdb_len(1)]  # entries read
    pel_id = (1).to_bytes(8, "big") + (1).to_bytes(8, "big")
    parts += [rdb_len(1), pel_id, struct.pack("<q", MIN), rdb_len(2)]  # global PEL
    parts += [rdb_len(1), rdb_str(b"alice"), struct.pack("<q", MIN + 1)]  # consumer, seen time
    if version >= 21:
        parts += [struct.pack("<q", MIN + 2)]  # active time
    parts += [rdb_len(1), pel_id]
    return b"".join(parts)


def test_stream_as_v1() -> None:
    v1 = hand_stream(15)
    assert stream_as_v1(19, hand_stream(19)) == v1
    assert stream_as_v1(21, hand_stream(21)) == v1
    assert stream_as_v1(15, v1) == v1
    assert decode(21, hand_stream(21)).kind == "stream"
    with pytest.raises(IntegrityError, match="stream of type 21 is malformed"):
        stream_as_v1(21, hand_stream(21)[:-3])
    with pytest.raises(IntegrityError, match="not a stream"):
        stream_as_v1(4, b"")


# --- value_commands -----------------------------------------------------------------------------------------

def bulk(command: list[bytes]) -> int:
    return sum(len(a) for a in command)


def test_value_commands_string_pieces() -> None:
    data = bytes(range(256)) * 40
    commands = list(value_commands(b"k", Decoded("string", string=data), max_bulk=1000))
    assert commands[0][:2] == [b"SET", b"k"]
    assert all(c[:2] == [b"APPEND", b"k"] for c in commands[1:])
    assert all(bulk(c) <= 1000 for c in commands)
    assert b"".join(c[2] for c in commands) == data
    assert list(value_commands(b"k", Decoded("string"), max_bulk=10)) == [[b"SET", b"k", b""]]


def test_value_commands_batches() -> None:
    items = [str(i).encode() * 3 for i in range(1000)]
    commands = list(value_commands(b"key", Decoded("list", items=items), max_bulk=200))
    assert len(commands) > 10
    assert all(c[:2] == [b"RPUSH", b"key"] and bulk(c) <= 200 for c in commands)
    assert [i for c in commands for i in c[2:]] == items
    big = list(value_commands(b"key", Decoded("set", items=[b"x" * 500, b"y"]), max_bulk=200))
    assert big == [[b"SADD", b"key", b"x" * 500], [b"SADD", b"key", b"y"]]


def test_value_commands_zset_scores_are_exact() -> None:
    scores = [(b"a", 1e-300), (b"b", math.inf), (b"c", -math.inf), (b"d", 0.1), (b"e", 2.0**53 + 1)]
    (command,) = value_commands(b"z", Decoded("zset", scores=scores), max_bulk=10_000)
    assert command[:2] == [b"ZADD", b"z"]
    assert command[2::2] == [b"1e-300", b"inf", b"-inf", b"0.1", b"9007199254740992.0"]
    assert [float(s) for s in command[2::2]] == [s for _, s in scores]


def test_value_commands_hash_with_ttls() -> None:
    decoded = Decoded("hash", pairs=[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")],
                      field_ttls={b"a": MIN, b"c": MIN, b"b": MIN + 1})
    commands = list(value_commands(b"h", decoded, max_bulk=10_000))
    assert commands == [
        [b"HSET", b"h", b"a", b"1", b"b", b"2", b"c", b"3"],
        [b"HPEXPIREAT", b"h", str(MIN).encode(), b"FIELDS", b"2", b"a", b"c"],
        [b"HPEXPIREAT", b"h", str(MIN + 1).encode(), b"FIELDS", b"1", b"b"],
    ]
    assert list(value_commands(b"h", decoded, max_bulk=10_000, field_ttls=False)) == commands[:1]
    with pytest.raises(NotPortable):
        list(value_commands(b"s", Decoded("stream"), max_bulk=100))


def test_module_values_are_opaque() -> None:
    assert decode(7, b"\x81" + bytes(8) + b"anything") == Decoded("module")
    with pytest.raises(NotPortable):
        encode_portable(Decoded("module"))
