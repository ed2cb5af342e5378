"""Compression, decompression, integrity checks and atomic files, on real bytes and real gzip/zstd tools."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd.errors import IntegrityError, StorageError
from kkua_backupd.stream import chain, pipeline

KINDS = ("gzip", "zstd", "none")


def sample(size: int = 9 << 20) -> bytes:
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    text = b" ".join(rng.choice(words) for _ in range(size // 6))
    return text[:size] + os.urandom(1 << 20)


def compress_file(tmp_path: Path, kind: str, data: bytes, chunk: int = 100_000) -> Path:
    path = tmp_path / f"out{pipeline.EXTENSIONS[kind]}"
    with chain.open_chain(path, kind, None, 2) as out:
        for i in range(0, len(data), chunk):
            out.write(data[i:i + chunk])
        out.close()
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_check(tmp_path: Path, kind: str) -> None:
    data = sample()
    path = compress_file(tmp_path, kind, data)
    assert b"".join(pipeline.decompress(kind, pipeline.file_chunks(path))) == data
    result = chain.check_file(path, kind)
    assert result.uncompressed == len(data)
    assert result.size == path.stat().st_size
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)


def test_parallel_gzip_is_readable_by_gunzip_and_python(tmp_path: Path) -> None:
    data = sample()
    path = compress_file(tmp_path, "gzip", data)
    assert subprocess.run(["gzip", "-t", str(path)], check=False).returncode == 0
    assert subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True).stdout == data
    assert gzip.decompress(path.read_bytes()) == data


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command not installed")
def test_zstd_is_readable_by_the_zstd_tool(tmp_path: Path) -> None:
    data = sample(2 << 20)
    path = compress_file(tmp_path, "zstd", data)
    assert subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout == data


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_empty_input_gives_a_valid_file(tmp_path: Path, kind: str) -> None:
    path = compress_file(tmp_path, kind, b"")
    assert chain.check_file(path, kind).uncompressed == 0


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_file_is_detected(tmp_path: Path, kind: str) -> None:
    path = compress_file(tmp_path, kind, sample(3 << 20))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IntegrityError, match="truncated|corrupt"):
        chain.check_file(path, kind)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_flipped_byte_is_detected(tmp_path: Path, kind: str) -> None:
    path = compress_file(tmp_path, kind, sample(3 << 20))
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="corrupt"):
        chain.check_file(path, kind)


def test_flipped_byte_in_uncompressed_file_changes_the_sha256(tmp_path: Path) -> None:
    path = compress_file(tmp_path, "none", b"abc" * 1000)
    before = chain.check_file(path, "none").sha256
    blob = bytearray(path.read_bytes())
    blob[10] ^= 1
    path.write_bytes(bytes(blob))
    assert chain.check_file(path, "none").sha256 != before


def test_atomic_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "x.sql.gz"
    with pytest.raises(RuntimeError), pipeline.AtomicFile(target) as out:
        out.write(b"partial data")
        assert (tmp_path / "x.sql.gz.partial").exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_refuses_an_existing_partial(tmp_path: Path) -> None:
    (tmp_path / "x.partial").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create"):
        pipeline.AtomicFile(tmp_path / "x")


def test_commit_reports_size_and_sha256(tmp_path: Path) -> None:
    info = pipeline.write_atomic(tmp_path / "m.json", b"{}\n")
    assert info.size == 3
    assert info.sha256 == "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"
    assert not (tmp_path / "m.json.partial").exists()


def test_zlib_fallback_writes_the_same_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where python-isal has no wheel, the standard zlib is used; files stay interchangeable."""
    import zlib

    data = sample(2 << 20)
    fast = compress_file(tmp_path, "gzip", data)
    monkeypatch.setattr(pipeline, "deflate", zlib)
    assert pipeline.gzip_level(6) == 6
    slow_dir = tmp_path / "zlib"
    slow_dir.mkdir()
    slow = compress_file(slow_dir, "gzip", data)
    assert gzip.decompress(slow.read_bytes()) == data
    assert b"".join(pipeline.decompress("gzip", pipeline.file_chunks(fast))) == data


def test_gzip_levels_map_onto_isal_levels() -> None:
    if pipeline.deflate.__name__ == "zlib":
        pytest.skip("python-isal is not installed; zlib takes levels as they are")
    assert [pipeline.gzip_level(n) for n in range(1, 10)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_a_verified_read_raises_after_the_last_chunk_when_the_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    info = chain.check_file(path, "none")
    assert b"".join(chain.read_chain(path, "none", expected=info)) == b"x" * 3_000_000
    blob = bytearray(path.read_bytes())
    blob[-1] = ord("y")
    path.write_bytes(bytes(blob))
    received = []
    with pytest.raises(IntegrityError, match="changed while it was being read"):
        for chunk in chain.read_chain(path, "none", expected=info):
            received.append(chunk)
    assert sum(map(len, received)) == info.size  # every byte was handed on, the verdict comes last


# ----------------------------------------------------------------------------------------------
# read_ahead: the restore's reading, hashing and decompression on a thread of its own


def test_read_ahead_keeps_order_and_raises_after_the_chunks_before_the_error() -> None:
    def source() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        raise IntegrityError("bad byte")

    got: list[bytes] = []
    with pytest.raises(IntegrityError, match="bad byte"):
        for chunk in pipeline.read_ahead(source(), limit=1):
            got.append(chunk)
    assert got == [b"one", b"two"]


def test_read_ahead_stays_within_its_limit_and_stops_its_thread_when_the_consumer_stops() -> None:
    produced: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(1000):
            produced.append(i)
            yield bytes(100)

    ahead = pipeline.read_ahead(source(), limit=1000, name="test-read-ahead")
    for consumed, _ in enumerate(ahead, start=1):
        # at most `limit` bytes queued, one chunk being queued, one handed over
        assert len(produced) - consumed <= 1000 // 100 + 2
        if consumed == 50:
            break
    ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "test-read-ahead"], "the thread still runs"
    assert len(produced) < 1000


@pytest.mark.parametrize("kind", ("gzip", "zstd"))
def test_decompress_gives_bounded_pieces_of_a_big_compressed_chunk(tmp_path: Path, kind: str) -> None:
    """A 1 MiB chunk of the file is decompressed in pieces (of at most DECOMPRESS_PIECE compressed bytes):
    what comes out at once stays near a MiB however big the chunk, and the whole comes out unchanged."""
    data = sample(12 << 20)
    path = compress_file(tmp_path, kind, data)
    stored = path.read_bytes()
    assert len(stored) > 2 * pipeline.CHUNK  # the chunks given below are whole MiBs of compressed bytes
    chunks = [stored[i:i + pipeline.CHUNK] for i in range(0, len(stored), pipeline.CHUNK)]
    pieces = list(pipeline.decompress(kind, chunks))
    assert b"".join(pieces) == data
    ratio = len(data) / len(stored)
    assert ratio > 2  # one whole chunk would give more than 2 MiB at once
    assert max(len(p) for p in pieces) <= ratio * 2 * pipeline.DECOMPRESS_PIECE < pipeline.CHUNK
