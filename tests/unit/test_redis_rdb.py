"""The streaming RDB reader on hand-built RDB files: counts, any chunking, and every way a file can be bad."""

from __future__ import annotations

import pytest

from kkua_backupd.errors import IntegrityError
from kkua_backupd.sources.redis import rdb as redis_rdb
from kkua_backupd.sources.redis.rdb import RdbNotUnderstood, RdbScanner, crc64, module_type_name, parse_header


def s(data: bytes) -> bytes:
    """An RDB string (lengths up to 63 bytes, or the 32-bit length form)."""
    if len(data) < 64:
        return bytes([len(data)]) + data
    return b"\x80" + len(data).to_bytes(4, "big") + data


def rdb(*records: bytes, header: bytes = b"REDIS0011", checksum: bool = True) -> bytes:
    body = header + b"".join(records) + b"\xff"
    return body + (crc64(body).to_bytes(8, "little") if checksum else bytes(8))


AUX = b"\xfa" + s(b"redis-ver") + s(b"7.2.4") + b"\xfa" + s(b"redis-bits") + b"\xc0\x40"
DB0 = b"\xfe\x00\xfb\x02\x01"
DB3 = b"\xfe\x03"
EXPIRE = b"\xfc" + (1_900_000_000_000).to_bytes(8, "little")
SET = b"\x02" + s(b"members") + b"\x02" + s(b"a") + b"\xc0\x07"  # a set of "a" and the integer 7


def sample() -> bytes:
    return rdb(AUX, DB0, b"\x00" + s(b"k1") + s(b"v1"), EXPIRE + b"\x00" + s(b"k2") + b"\xc1\x39\x30",
               DB3, SET)


def scan(data: bytes, chunk: int, sink: object = None) -> redis_rdb.RdbSummary:
    scanner = RdbScanner("test.rdb", sink)  # type: ignore[arg-type]
    for at in range(0, len(data), chunk):
        scanner.feed(data[at:at + chunk])
    return scanner.finish()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_counts_and_aux_are_the_same_for_any_chunking(chunk: int) -> None:
    summary = scan(sample(), chunk)
    assert (summary.magic, summary.version, summary.checksum) == ("REDIS", 11, "ok")
    assert summary.keys == {0: 2, 3: 1} and summary.expires == {0: 1}
    assert summary.types == {0: 2, 2: 1}
    assert summary.aux == {"redis-ver": "7.2.4", "redis-bits": "64"} and summary.writer == "Redis 7.2.4"
    assert summary.examples[0] == [b"k1", b"k2"]


def test_valkey_header_and_disabled_checksum() -> None:
    summary = scan(rdb(b"\xfa" + s(b"valkey-ver") + s(b"9.1.2"), DB0, b"\x00" + s(b"k") + s(b"v"),
                       header=b"VALKEY080", checksum=False), 5)
    assert (summary.magic, summary.version, summary.valkey, summary.checksum) == ("VALKEY", 80, True, "not written")
    assert summary.writer == "Valkey 9.1.2"
    assert parse_header(b"REDIS0009") == ("REDIS", 9)


def test_a_flipped_byte_fails_the_crc() -> None:
    data = bytearray(sample())
    data[data.index(b"v1")] ^= 0x01
    with pytest.raises(IntegrityError, match="fails its CRC-64 check"):
        scan(bytes(data), 4)


@pytest.mark.parametrize("cut", [5, 12, 40, -9, -1])
def test_a_file_cut_short_is_never_complete(cut: int) -> None:
    with pytest.raises(IntegrityError, match="cut short|not an RDB file"):
        scan(sample()[:cut], 3)


def test_bytes_after_the_end_are_refused() -> None:
    with pytest.raises(IntegrityError, match="bytes after its end"):
        scan(sample() + b"x", 1 << 20)


def test_not_an_rdb() -> None:
    with pytest.raises(IntegrityError, match="not an RDB file"):
        scan(b"PNG\x00" * 10, 8)


def test_an_unknown_type_is_named_with_the_server_not_called_corrupt() -> None:
    with pytest.raises(RdbNotUnderstood, match=r"a value of type 30, written by Redis 7.2.4") as caught:
        scan(rdb(AUX, DB0, b"\x1e" + s(b"k") + s(b"v")), 1 << 20)
    assert "not necessarily corrupt" in caught.value.message


def test_an_unknown_opcode_is_named() -> None:
    with pytest.raises(RdbNotUnderstood, match="opcode 243"):
        scan(rdb(AUX, b"\xf3\x00"), 1 << 20)


def test_module_names_decode() -> None:
    # The id of a module type "MODULE-AB" with encoding version 3, as Redis builds it.
    charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    value = 0
    for char in "MODULE-AB":
        value = (value << 6) | charset.index(char)
    assert module_type_name((value << 10) | 3) == "MODULE-AB"


class Collect:
    def __init__(self) -> None:
        self.keys: list[tuple[int, bytes, int, bytes, int | None]] = []
        self.big: list[object] = []

    def key(self, db: int, key: bytes, rdb_type: int, value: bytes, expire_ms: int | None) -> None:
        self.keys.append((db, key, rdb_type, value, expire_ms))

    def big_start(self, db: int, key: bytes, expire_ms: int | None, header: bytes, stored: int) -> None:
        self.big.append(("start", db, key, expire_ms, header, stored))

    def big_piece(self, data: bytes) -> None:
        self.big.append(len(data))

    def big_end(self) -> None:
        self.big.append("end")

    def function(self, code: bytes) -> None:
        self.big.append(("function", code))


def test_the_sink_gets_every_key_with_its_raw_value_and_the_functions() -> None:
    sink = Collect()
    code = b"#!lua name=lib\nredis.register_function('f', function() return 1 end)"
    summary = scan(rdb(AUX, b"\xf5" + s(code), DB0, b"\x00" + s(b"k1") + s(b"v1"),
                       EXPIRE + b"\x00" + s(b"k2") + b"\xc1\x39\x30", DB3, SET), 3, sink)
    assert summary.functions == 1 and sink.big == [("function", code)]
    assert sink.keys == [(0, b"k1", 0, s(b"v1"), None), (0, b"k2", 0, b"\xc1\x39\x30", 1_900_000_000_000),
                         (3, b"members", 2, b"\x02" + s(b"a") + b"\xc0\x07", None)]


def test_a_big_string_is_passed_on_in_pieces_never_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_rdb, "STREAM_THRESHOLD", 1000)
    big = bytes(range(256)) * 40  # 10,240 bytes
    data = rdb(AUX, DB0, EXPIRE + b"\x00" + s(b"big") + s(big), b"\x00" + s(b"after") + s(b"x"))
    sink = Collect()
    summary = scan(data, 512, sink)
    assert sink.big[0] == ("start", 0, b"big", 1_900_000_000_000, b"\x80" + len(big).to_bytes(4, "big"), len(big))
    assert summary.big_strings == [(b"big", len(big))]
    assert sink.big[-1] == "end" and sum(p for p in sink.big[1:-1] if isinstance(p, int)) == len(big)
    assert all(p <= 512 for p in sink.big[1:-1] if isinstance(p, int))
    assert sink.keys == [(0, b"after", 0, s(b"x"), None)]
    assert summary.keys == {0: 2} and summary.expires == {0: 1} and summary.checksum == "ok"
