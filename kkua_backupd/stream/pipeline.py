"""Streaming stages between a source and the backup folder: compression, hashing and atomic files.

Data moves in chunks of about a megabyte, so memory stays flat whatever the database size. gzip runs
in parallel like pigz: blocks are deflated on a thread pool (the deflate call releases the GIL) and written
as consecutive gzip members, which every gzip reader, `gunzip -c` included, reads as one stream. Deflate
is Intel's ISA-L (python-isal) when installed, several times faster than zlib at the same ratio
(docs/decisions/0001-gzip-in-process.md); zlib otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

try:
    from isal import isal_zlib as _deflate

    deflate: ModuleType = _deflate
except ImportError:  # no wheel for this platform: the standard zlib gives the same format, slower
    deflate = zlib

from kkua_backupd.errors import IntegrityError, StorageError
from kkua_backupd.obs.progress import Progress
from kkua_backupd.safefs import (
    FILE_MODE,
    open_at,
    open_file,
    open_folder,
)

if TYPE_CHECKING:
    import zstandard  # imported where zstd is written or read

Compression = Literal["gzip", "zstd", "none"]
CHUNK = 1 << 20
# gzip members of 2 MiB: with up to 2 per thread in flight, 4 MiB ones made a 1 GB gzip backup peak at 89-102
# MiB; 2 MiB ones compress as small and as fast at about 75 (docs/performance.md, issue 14's night section)
GZIP_BLOCK = 2 << 20
EXTENSIONS: dict[str, str] = {"gzip": ".gz", "zstd": ".zst", "none": ""}
# zstd 1, not 3: on dump data it is as small (or smaller) for half the CPU (docs/decisions/0005).
DEFAULT_LEVELS: dict[str, int] = {"gzip": 6, "zstd": 1, "none": 0}


class Compressor(Protocol):
    """A streaming compressor: `compress` may hold data back; `flush` returns the rest and ends."""

    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def close(self) -> None: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _Zstd:
    def __init__(self, level: int, threads: int) -> None:
        import zstandard  # here, not at the top: only what writes or reads zstd loads it

        # 1 MiB jobs: zstd's default job size (8 MiB at level 1-3) costs ~60 MiB of buffers with two
        # threads; 1 MiB keeps memory near 10 MiB for a few percent more CPU and the same ratio.
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, job_size=1 << 20,
                                                               write_checksum=1)
        self._obj = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()

    def close(self) -> None:
        pass


def gzip_level(level: int) -> int:
    """The deflate level for a gzip level 1-9: ISA-L has levels 1-3, whose ratios match zlib's 1-3, 4-6
    and 7-9 on dump data; zlib takes the level as it is."""
    if deflate is zlib:
        return level
    return 1 if level <= 3 else 2 if level <= 6 else 3


def _gzip_member(block: bytes, level: int) -> bytes:
    obj = deflate.compressobj(gzip_level(level), zlib.DEFLATED, 31)
    member: bytes = obj.compress(block) + obj.flush()
    return member


class ParallelGzip:
    """gzip on a thread pool: independent members of GZIP_BLOCK bytes, emitted in order."""

    def __init__(self, level: int, threads: int, block: int = GZIP_BLOCK) -> None:
        self.level = level
        self.block = block
        self.window = max(2, threads * 2)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._buffer = bytearray()
        self._emitted = False

    def _submit(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(_gzip_member, data, self.level))

    def _collect(self, *, keep: int) -> bytes:
        out: list[bytes] = []
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            out.append(self._pending.popleft().result())
        if out:
            self._emitted = True
        return b"".join(out)

    def compress(self, data: bytes) -> bytes:
        self._buffer += data
        while len(self._buffer) >= self.block:
            self._submit(bytes(self._buffer[: self.block]))
            del self._buffer[: self.block]
        return self._collect(keep=self.window)

    def flush(self) -> bytes:
        if self._buffer or (not self._pending and not self._emitted):
            self._submit(bytes(self._buffer))  # an empty input still gives a valid (empty) gzip file
            self._buffer.clear()
        return self._collect(keep=0)

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_compressor(kind: str, level: int | None = None, threads: int = 0) -> Compressor:
    """A compressor for `kind` (gzip, zstd, none); `threads` 0 means one per CPU."""
    workers = threads or os.cpu_count() or 1
    if kind == "gzip":
        return ParallelGzip(min(level or DEFAULT_LEVELS["gzip"], 9), workers)
    if kind == "zstd":
        return _Zstd(level or DEFAULT_LEVELS["zstd"], workers)
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


DECOMPRESS_PIECE = 1 << 17


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytes | memoryview]:
    """The chunks cut into views of at most DECOMPRESS_PIECE bytes (no copy). One decompress call returns
    everything its input holds: a whole 1 MiB chunk of a dump is 4-8 MiB of SQL at once, which each
    consumer then holds, and libpq keeps its send buffer at the largest piece it was given for the life of
    the connection; with one loading connection per restore job that was ~11 MiB per job. A 128 KiB piece
    gives about 1 MiB out (docs/performance.md, "Memory of directory restores by restore job")."""
    for chunk in chunks:
        if len(chunk) <= DECOMPRESS_PIECE:
            yield chunk
            continue
        view = memoryview(chunk)
        for at in range(0, len(view), DECOMPRESS_PIECE):
            yield view[at:at + DECOMPRESS_PIECE]


def decompress(kind: str, chunks: Iterable[bytes], *, name: str = "backup") -> Iterator[bytes]:
    """Decompress a stream (multi-member gzip, multi-frame zstd, or none); raises IntegrityError if the
    data is corrupt or truncated."""
    if kind == "none":
        yield from chunks
        return
    if kind not in ("gzip", "zstd"):
        raise ValueError(f"unknown compression {kind!r}")
    dctx: zstandard.ZstdDecompressor | None = None
    zstd_error: type[Exception] = zlib.error
    if kind == "zstd":
        import zstandard  # only what reads zstd loads it

        dctx, zstd_error = zstandard.ZstdDecompressor(), zstandard.ZstdError

    def new() -> Any:
        return dctx.decompressobj() if dctx is not None else deflate.decompressobj(31)

    obj = new()
    started = False  # True once the current member/frame has received input
    try:
        for piece in _pieces(chunks):
            data = piece
            while data:
                out = obj.decompress(data)
                started = True
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj = new()
                    started = False
                else:
                    data = b""
    except (zlib.error, deflate.error, zstd_error) as exc:
        raise IntegrityError(f"{name} is corrupt: the {kind} data does not decompress ({exc})",
                             hint="use another backup; this one cannot be restored") from None
    if started:
        raise IntegrityError(f"{name} is truncated: the {kind} stream ends in the middle",
                             hint="use another backup; this one was cut short (disk full or copy interrupted?)")


@dataclass(frozen=True)
class FileInfo:
    """A file written to the backup folder: its name, size in bytes and sha256."""

    name: str
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, path: Path, action: str = "write") -> StorageError:
    """Turn an OSError on a backup file into an operator-actionable StorageError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
            free_text = f"{free} bytes free"
        except OSError:
            free_text = "free space unknown"
        return StorageError(f"disk full while writing {path} ({free_text})",
                            hint="free space or point backup_dir at a larger disk; earlier backups were not touched")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot {action} {path}: {exc.strerror}",
                            hint="check the folder's owner and mode (the backup user needs write access)")
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}")


class AtomicFile:
    """A file that appears under its name only once complete: written to `NAME.partial`, fsynced,
    renamed, and the folder fsynced. Leaving the `with` block on an error removes the partial file.
    The folder is opened once by the trusted-folder rules and every step works relative to it, so a
    folder swapped for a symlink meanwhile changes nothing; the file gets `mode` whatever the umask."""

    def __init__(self, path: Path, mode: int = FILE_MODE) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.size = 0
        self._hash = hashlib.sha256()
        self._dir_fd: int | None = None
        try:
            self._dir_fd = open_folder(path.parent)
            fd = open_at(self._dir_fd, self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            self._close_dir()
            raise storage_error(exc, self.partial, "create") from None
        except BaseException:
            self._close_dir()
            raise
        self._fh: IO[bytes] | None = os.fdopen(fd, "wb", buffering=CHUNK)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or self._fh is not None:
            self.abort()

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = None

    def write(self, data: bytes) -> None:
        """Append `data`, hashing it; raises StorageError (disk full, I/O error)."""
        if not data:
            return
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise storage_error(exc, self.path) from None
        self._hash.update(data)
        self.size += len(data)

    def flush(self) -> None:
        """Push buffered bytes to the partial file (so another process can read it); raises StorageError."""
        assert self._fh is not None
        try:
            self._fh.flush()
        except OSError as exc:
            raise storage_error(exc, self.path) from None

    def commit(self, *, sync_folder: bool = True) -> FileInfo:
        """fsync, rename into place and fsync the folder; returns the file's name, size and sha256.
        `sync_folder=False` leaves the folder's fsync (what makes the rename survive a power loss) to the
        caller, who does it once for several files: a backup set's data files get theirs from
        store.storage.write_manifest, before the manifest is written (docs/decisions/0020)."""
        assert self._fh is not None and self._dir_fd is not None
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.rename(self.partial.name, self.path.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            if sync_folder:
                os.fsync(self._dir_fd)
        except OSError as exc:
            raise storage_error(exc, self.path) from None  # the partial file goes in abort()
        self._close_dir()
        return FileInfo(self.path.name, self.size, self._hash.hexdigest())

    def abort(self) -> None:
        """Close and remove the partial file; safe to call more than once."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._dir_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial.name, dir_fd=self._dir_fd)
        self._close_dir()


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> FileInfo:
    """Write small content (manifests, state) atomically."""
    with AtomicFile(path, mode) as out:
        out.write(data)
        return out.commit()


def stream_chunks(read: Callable[[int], bytes], progress: Progress | None = None) -> Iterator[bytes]:
    """Yield chunks from `read(n)` until it returns b"", counting them on `progress`."""
    while True:
        data = read(CHUNK)
        if not data:
            return
        if progress is not None:
            progress.add(len(data))
        yield data


def file_chunks(path: Path, progress: Progress | None = None) -> Iterator[bytes]:
    """Yield the bytes of a file in chunks; raises StorageError if it cannot be read."""
    try:
        fh = os.fdopen(open_file(path, os.O_RDONLY), "rb", buffering=0)
    except OSError as exc:
        raise storage_error(exc, path, "read") from None
    with fh:
        yield from stream_chunks(fh.read, progress)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def read_ahead(chunks: Iterable[bytes], *, limit: int = 4 * CHUNK, name: str = "read-ahead") -> Iterator[bytes]:
    """Iterate `chunks` on a thread of its own, up to `limit` bytes (and at least one chunk) ahead of the
    consumer, so that reading, hashing, decrypting and decompressing (which release the GIL) run while the
    consumer works on the chunks before; memory stays bounded by `limit` and one chunk. Whatever the
    iteration raises is raised here, where the consumer would have met it, after the chunks that came before
    it. When the consumer stops early, the thread stops at its next chunk."""
    ready: deque[object] = deque()
    queued = 0
    stopped = False
    cond = threading.Condition()

    def put(item: object, size: int) -> bool:
        nonlocal queued
        with cond:
            while queued >= limit and not stopped:
                cond.wait()
            if stopped:
                return False
            ready.append(item)
            queued += size
            cond.notify_all()
            return True

    def run() -> None:
        try:
            for chunk in chunks:
                if not put(chunk, len(chunk)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc), 0)
            return
        put(_DONE, 0)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not ready:
                    cond.wait()
                item = ready.popleft()
                if isinstance(item, bytes):
                    queued -= len(item)
                cond.notify_all()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            assert isinstance(item, bytes)
            yield item
    finally:
        with cond:
            stopped = True
            cond.notify_all()
        thread.join()
