"""Per-target locks: `flock` on a file that names its holder, so a second run can say who holds it.

The kernel drops the lock when its holder dies, even by kill -9, so a lock never outlives its run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from kkua_backupd.errors import KkuaError, LockHeld, StorageError
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.safefs import FILE_MODE, open_file

LOCK_DIR = ".locks"


class TargetLock:
    """An exclusive lock on one target (postgres, redis) for one purpose (backup, restore, ...)."""

    def __init__(self, backup_dir: Path, target: str, purpose: str, *, read_only_ok: bool = False) -> None:
        self.backup_dir = backup_dir
        self.path = backup_dir / LOCK_DIR / f"{target}.lock"
        self.target = target
        self.purpose = purpose
        self.read_only_ok = read_only_ok
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the holder; raises StorageError if the file cannot be made."""
        try:
            # No symlink, no stranger's file, no second hard link: a planted lock file cannot make this
            # run truncate something else (docs/security.md); a refusal is Refused, exit 3.
            fd = open_file(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE, root=self.backup_dir)
        except OSError as exc:
            if self.read_only_ok and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                # Nobody can write backups into a folder this run cannot even lock, so there is
                # nothing to collide with; a restore from a read-only copy goes on without the lock.
                get_logger().warning("backup folder is not writable; going on without the lock",
                                     lock=str(self.path), reason=exc.strerror)
                return
            raise StorageError(f"cannot create lock file {self.path}: {exc.strerror}",
                               hint="check that backup_dir exists and is writable by this user") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockHeld(f"another run holds the {self.target} lock ({holder})",
                               hint="wait for it to finish; the lock frees itself when that process ends") from None
            raise StorageError(f"cannot lock {self.path}: {exc.strerror}") from None
        record = {"pid": os.getpid(), "purpose": self.purpose, "host": socket.gethostname(),
                  "since": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder record and drop the lock (the file stays: unlinking it would race)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> TargetLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        value = json.loads(data) if data else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid')}"]
    if holder.get("purpose"):
        parts.append(f"'{holder['purpose']}'")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def holder_of(backup_dir: Path, target: str) -> dict[str, object] | None:
    """Who holds the target's lock now, or None when it is free (for `status`)."""
    path = backup_dir / LOCK_DIR / f"{target}.lock"
    try:
        fd = open_file(path, os.O_RDONLY, root=backup_dir)
    except (OSError, KkuaError):  # absent, or not ours to read (a symlink, a stranger's file)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
