"""The byte chain built in one place (stream/chain.py): the slot for an extra stage after compression, the
order of stages both ways, and that an error anywhere leaves no file."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from kkua_backupd.errors import IntegrityError, StorageError
from kkua_backupd.stream.chain import check_file, compression_of, open_chain, read_chain, without_compression
from kkua_backupd.stream.stages import Reader, Sink

DATA = b"one line of a dump\n" * 50_000


class Xor:
    """A stand-in for encryption: a real stage that changes every byte, so a reader must undo it."""

    def __init__(self, inner: Sink, key: int, seen: list[str]) -> None:
        self.inner, self.key, self.seen = inner, key, seen

    def write(self, data: bytes, /) -> None:
        self.seen.append(f"write {data[:2].hex()}")
        self.inner.write(bytes(b ^ self.key for b in data))

    def close(self) -> None:
        self.seen.append("close")
        self.inner.close()

    def abort(self) -> None:
        self.seen.append("abort")
        self.inner.abort()


def unxor(key: int) -> Reader:
    def reader(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            yield bytes(b ^ key for b in chunk)
    return reader


def test_an_extra_stage_sees_compressed_bytes_and_the_hash_is_of_the_stored_file(tmp_path: Path) -> None:
    seen: list[str] = []
    path = tmp_path / "x.sql.gz"
    with open_chain(path, "gzip", 6, 2, [lambda inner: Xor(inner, 0x5A, seen)]) as out:
        out.write(DATA)
        info = out.close()
    assert out.raw == len(DATA)
    assert seen[0] == f"write {bytes([0x1F, 0x8B]).hex()}"  # gzip's magic: compression came first
    assert seen[-1] == "close"
    stored = path.read_bytes()
    assert info.sha256 == hashlib.sha256(stored).hexdigest() and info.size == len(stored)
    assert gzip.decompress(bytes(b ^ 0x5A for b in stored)) == DATA
    reader = read_chain(path, "gzip", expected=info, readers=[unxor(0x5A)])
    assert b"".join(reader) == DATA
    assert (reader.size, reader.sha256, reader.raw) == (info.size, info.sha256, len(DATA))
    with pytest.raises(IntegrityError, match="corrupt"):  # without the stage's reader the bytes are not gzip
        check_file(path, "gzip")


def test_two_stages_are_applied_in_order_and_undone_in_reverse(tmp_path: Path) -> None:
    path = tmp_path / "x.rdb.zst"
    stages = [lambda inner: Xor(inner, 1, []), lambda inner: Xor(inner, 2, [])]
    with open_chain(path, "zstd", 1, 1, stages) as out:
        out.write(DATA)
        out.close()
    assert b"".join(read_chain(path, "zstd", readers=[unxor(1), unxor(2)])) == DATA


def test_an_error_mid_stream_aborts_every_stage_and_leaves_no_file(tmp_path: Path) -> None:
    seen: list[str] = []
    path = tmp_path / "x.sql.gz"
    with pytest.raises(RuntimeError), open_chain(path, "gzip", 6, 2, [lambda inner: Xor(inner, 7, seen)]) as out:
        out.write(DATA * 20)  # more than one gzip block: bytes reached the stage and the partial file
        assert (tmp_path / "x.sql.gz.partial").exists()
        raise RuntimeError("the source died")
    assert seen[-1] == "abort"
    assert list(tmp_path.iterdir()) == []


def test_a_stage_that_cannot_start_leaves_no_partial_file(tmp_path: Path) -> None:
    def broken(inner: Sink) -> Sink:
        raise StorageError("no key")

    with pytest.raises(StorageError, match="no key"):
        open_chain(tmp_path / "x.sql", "none", None, 1, [broken])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "compression", "stem"), [
    ("kkua_backup_20240115_020000.sql.gz", "gzip", "kkua_backup_20240115_020000.sql"),
    ("kkua_backup_20240115_020000.dump.zst", "zstd", "kkua_backup_20240115_020000.dump"),
    ("redis_backup_20240115_030000.rdb", "none", "redis_backup_20240115_030000.rdb"),
    ("dump.gzip", "none", "dump.gzip"),
])
def test_compression_from_a_file_name(name: str, compression: str, stem: str) -> None:
    assert compression_of(name) == compression
    assert without_compression(name) == stem
