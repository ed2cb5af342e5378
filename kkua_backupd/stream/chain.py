"""The byte chain, built in one place: every backup file, safety backup and side file is written through
`open_chain`, and every check, verify, test restore and restore reads one back through `read_chain`.

On the way out: source -> compress -> [extra stages] -> sha256 + size -> atomic file. The extra stages are
the slot for encryption: a `Stage` is a function that takes the next `Sink` and returns a `Sink` wrapping it
(stream/stages.py), so adding one is passing it in `stages`, and the sources pass `ctx.stages`
(core/context.py), so it is set once for every file. They sit after compression (encrypted bytes do not
compress) and before the hash (the manifest's sha256 is of the bytes on disk, so a set can be checked
without a key).

On the way back: file -> sha256 + size -> [extra readers] -> decompress -> the source's bytes. An extra
`Reader` (decryption) gets the stored chunks and yields the chunks before its stage, in the reverse order
of the stages on the way out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from kkua_backupd.errors import IntegrityError
from kkua_backupd.obs.progress import Progress
from kkua_backupd.safefs import FILE_MODE
from kkua_backupd.stream.encrypt import without_encryption_suffix
from kkua_backupd.stream.pipeline import (
    EXTENSIONS,
    AtomicFile,
    Compression,
    FileInfo,
    decompress,
    file_chunks,
    make_compressor,
)
from kkua_backupd.stream.stages import Reader, Sink

Stage = Callable[[Sink], Sink]
"""An extra stage on the way out: given the next sink, the sink that writes through it."""


def compression_of(name: str) -> Compression:
    """The compression of a backup file named by its extension (.gz, .zst, else none; before any .age/.gpg):
    for files that have no manifest to say it."""
    compressed: tuple[Compression, ...] = ("gzip", "zstd")
    plain = without_encryption_suffix(name)
    return next((kind for kind in compressed if plain.endswith(EXTENSIONS[kind])), "none")


def without_compression(name: str) -> str:
    """The file name without its encryption and compression extensions (`x.sql.gz.age` -> `x.sql`)."""
    plain = without_encryption_suffix(name)
    extension = EXTENSIONS[compression_of(plain)]
    return plain[: len(plain) - len(extension)] if extension else plain


# ----------------------------------------------------------------------------------------------
# The way out


class FileSink:
    """The chain's last stage: the bytes hashed and counted into an AtomicFile (`NAME.partial`, renamed into
    place by `close`, removed by `abort`); after `close`, `info` holds the file's name, size and sha256.
    Every file of the chain belongs to a backup set: `close` fsyncs it and renames it, and the set's folder
    is fsynced once for all of them by store.storage.write_manifest, before the manifest exists (one fsync
    pass, docs/decisions/0020)."""

    def __init__(self, path: Path, mode: int = FILE_MODE) -> None:
        self.file = AtomicFile(path, mode)
        self.info: FileInfo | None = None

    def write(self, data: bytes, /) -> None:
        self.file.write(data)

    def close(self) -> None:
        self.info = self.file.commit(sync_folder=False)

    def abort(self) -> None:
        self.file.abort()


class CompressSink:
    """Compression as a stage (gzip in parallel, zstd, or none): compresses into the next sink; `raw` counts
    the bytes it was given."""

    def __init__(self, inner: Sink, compression: str, level: int | None, threads: int) -> None:
        self.inner = inner
        self.raw = 0
        self._compressor = make_compressor(compression, level, threads)

    def write(self, data: bytes, /) -> None:
        self.raw += len(data)
        out = self._compressor.compress(data)
        if out:
            self.inner.write(out)

    def close(self) -> None:
        try:
            self.inner.write(self._compressor.flush())
        finally:
            self._compressor.close()
        self.inner.close()

    def abort(self) -> None:
        self._compressor.close()
        self.inner.abort()


class ChainWriter:
    """A backup file being written through the chain. `write` the source's bytes; `close` finishes every
    stage and commits the file, returning its name, size and sha256; leaving the `with` block without
    `close` (an error, a kill) aborts every stage and removes the partial file."""

    def __init__(self, head: CompressSink, file: FileSink) -> None:
        self._head = head
        self._file = file
        self._open = True

    @property
    def path(self) -> Path:
        return self._file.file.path

    @property
    def raw(self) -> int:
        """The bytes written so far, before any stage."""
        return self._head.raw

    def write(self, data: bytes, /) -> None:
        self._head.write(data)

    def close(self) -> FileInfo:
        self._head.close()
        self._open = False
        assert self._file.info is not None
        return self._file.info

    def abort(self) -> None:
        if self._open:
            self._open = False
            self._head.abort()

    def __enter__(self) -> ChainWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


def open_chain(path: Path, compression: str, level: int | None, threads: int,
               stages: Sequence[Stage] = ()) -> ChainWriter:
    """Open `path` for a backup file: compressed as `compression` at `level` on `threads` (0: one per CPU),
    then through `stages` in order (the first one sees the compressed bytes), then hashed into the atomic
    file. Raises StorageError when the file cannot be created."""
    file = FileSink(path)
    try:
        inner: Sink = file
        for stage in reversed(stages):
            inner = stage(inner)
        head = CompressSink(inner, compression, level, threads)
    except BaseException:
        file.abort()
        raise
    return ChainWriter(head, file)


# ----------------------------------------------------------------------------------------------
# The way back


class Recorded(Protocol):
    """What a manifest recorded of a file (store.storage.ManifestFile)."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


class ChainReader:
    """The bytes of a backup file before its stages, read back: iterate over it once. While it reads, the
    file's own bytes are counted (`size`) and hashed (`sha256`); `raw` counts what came out. With `expected`,
    it raises IntegrityError after the file's last chunk when size or sha256 differ from it (so a consumer
    that commits only at the end never commits changed data); decompression raises IntegrityError for
    corrupt or truncated data, StorageError when the file cannot be read."""

    def __init__(self, path: Path, compression: str, progress: Progress | None, expected: Recorded | None,
                 readers: Sequence[Reader]) -> None:
        self.path = path
        self.compression = compression
        self.progress = progress
        self.expected = expected
        self.readers = tuple(readers)
        self.size = 0
        self.raw = 0
        self._digest = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _stored(self) -> Iterator[bytes]:
        for chunk in file_chunks(self.path, self.progress):
            self._digest.update(chunk)
            self.size += len(chunk)
            yield chunk
        expected = self.expected
        if expected is not None and (self.size != expected.size or self.sha256 != expected.sha256):
            raise IntegrityError(f"{self.path.name} changed while it was being read (size or sha256 differs from "
                                 "its manifest); nothing was committed",
                                 hint="check what else writes to the backup folder")

    def __iter__(self) -> Iterator[bytes]:
        chunks: Iterable[bytes] = self._stored()
        for reader in reversed(self.readers):
            chunks = reader(chunks)
        for chunk in decompress(self.compression, chunks, name=self.path.name):
            self.raw += len(chunk)
            yield chunk


def read_chain(path: Path, compression: str, *, progress: Progress | None = None,
               expected: Recorded | None = None, readers: Sequence[Reader] = ()) -> ChainReader:
    """Read a backup file back through the chain (see ChainReader). `readers` are the way back of the extra
    stages it was written with, in the same order as those stages."""
    return ChainReader(path, compression, progress, expected, readers)


@dataclass(frozen=True)
class CheckResult:
    """What a full read of a backup file found."""

    size: int
    sha256: str
    uncompressed: int


def check_file(path: Path, compression: str, progress: Progress | None = None,
               readers: Sequence[Reader] = ()) -> CheckResult:
    """Read the whole file once: its size, sha256, and a full read back through the chain (no output kept);
    raises IntegrityError if it does not decompress, StorageError if it cannot be read."""
    source = read_chain(path, compression, progress=progress, readers=readers)
    for _ in source:
        pass
    return CheckResult(source.size, source.sha256, source.raw)
