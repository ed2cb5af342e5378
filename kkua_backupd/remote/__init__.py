"""Remotes: where complete backup sets are copied off the host (docs/remotes.md).

A `Remote` stores plain objects under keys such as `postgres/kkua_backup_20240115_020000.sql.gz`, below the
url's prefix or folder. Each implementation puts a local file so that a reader never sees half of it (an S3
multipart upload is invisible until completed; on an SSH host the file is written to a temporary name,
checked and renamed), streams with bounded memory, and raises RemoteError with a line an operator can act
on. What a set is (files, then the manifest last) is decided above, in core/remotes.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kkua_backupd.config import RemoteConfig
from kkua_backupd.errors import JobError

# Remote temporary names end with this (SSH hosts); listings never show them.
TEMP_SUFFIX = ".partial"


class RemoteError(JobError):
    """A remote could not be reached, refused our credentials, or failed an operation (exit 1)."""


class DeleteRefused(RemoteError):
    """The remote does not let these credentials delete (an immutable bucket, a read-only account)."""


@dataclass(frozen=True)
class RemoteObject:
    """One object as the remote lists it: its key below the remote's root, its size, and a checksum the
    remote computed when it has one cheaply (`md5:...` from an S3 ETag, `sha256:...` from an SSH host)."""

    key: str
    size: int
    checksum: str | None = None


@dataclass(frozen=True)
class PutResult:
    """What a put stored, as the remote reported it after the commit."""

    key: str
    size: int
    checked: str  # what was compared after the upload: "size", "size+md5", "size+sha256"


class Remote(Protocol):
    """What push, list, verify, restore --from and retention need of a remote."""

    name: str

    def describe(self) -> str:
        """Where the remote is, for log lines (no secret)."""
        ...

    def put(self, local: Path, key: str, *, size: int, sha256: str) -> PutResult:
        """Copy `local` to `key` so that it appears only complete, then compare the stored size (and a
        checksum where the remote has one) with `size` and `sha256`; raises RemoteError."""
        ...

    def stat(self, key: str) -> RemoteObject | None:
        """The object at `key`, or None when there is none; raises RemoteError."""
        ...

    def sha256(self, key: str) -> str | None:
        """The sha256 the remote computes of `key` itself, or None when it cannot (S3)."""
        ...

    def list(self, folder: str) -> list[RemoteObject]:
        """The complete objects directly in `folder` (temporary names left out); raises RemoteError."""
        ...

    def read(self, key: str) -> Iterator[bytes]:
        """The bytes of `key`, streamed in chunks; raises RemoteError."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key` (absent is fine); raises DeleteRefused when not allowed, else RemoteError."""
        ...

    def close(self) -> None:
        """Let go of connections kept for this remote's calls (an SSH master connection)."""
        ...


def open_remote(config: RemoteConfig, *, timeout: float = 60.0) -> Remote:
    """The remote a [[remote]] entry describes (nothing is contacted yet); use it in `contextlib.closing`."""
    if config.scheme == "s3":
        from kkua_backupd.remote.s3 import S3Remote
        return S3Remote(config, timeout=timeout)
    from kkua_backupd.remote.ssh import SshRemote
    return SshRemote(config, timeout=timeout)
