"""Opening files under the tool's folders without being turned against root: trusted roots, no symlink
followed below them, owners and modes checked, folders made 0750 and files 0640 whatever the umask
(docs/security.md). The bottom of the package: it imports nothing of it but the errors."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from kkua_backupd.errors import Refused

FILE_MODE = 0o640
DIR_MODE = 0o750
SERVICE_USER = "kkua-backup"


# Trusted folders (docs/security.md). The configured folders (backup_dir, log_dir, the state folder) are
# the roots; below a root every component is opened with O_NOFOLLOW relative to its parent's descriptor
# (no window in which a checked folder can be swapped for a symlink) and must be owned by root, the
# kkua-backup user or whoever runs the tool. Above a root the path is the operator's choice and followed.

_trusted_roots: list[Path] = []


def set_trusted_roots(*roots: Path) -> None:
    """Declare the configured folders; paths below them are opened by the rules of this section. A root
    inside another is dropped, so its own components are checked as part of the outer one."""
    absolute = {Path(os.path.abspath(r)) for r in roots}
    kept = [r for r in absolute if not any(o != r and o in r.parents for o in absolute)]
    _trusted_roots[:] = sorted(kept, key=lambda p: len(p.parts), reverse=True)


def root_of(path: Path, default: Path | None = None) -> Path | None:
    """The configured folder `path` lies in (itself included); else `default` (the folder the caller knows
    as its root) when `path` lies in it; else None."""
    absolute = Path(os.path.abspath(path))
    for root in [*_trusted_roots, *([Path(os.path.abspath(default))] if default is not None else [])]:
        if absolute == root or root in absolute.parents:
            return root
    return None


def trusted_uids() -> frozenset[int]:
    """Who may own what the tool uses: root, the kkua-backup user (when it exists), and this process."""
    uids = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    return frozenset(uids)


def owner_name(uid: int) -> str:
    """`uid 65534 (nobody)`, or `uid 1234` for a uid without an account."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def owner_problem(info: os.stat_result, path: Path) -> str | None:
    """Why a file or folder's owner is not trusted (None when it is root, kkua-backup or this user)."""
    if info.st_uid in trusted_uids():
        return None
    return f"{path} is owned by {owner_name(info.st_uid)}, not root or {SERVICE_USER}"


def mode_problem(info: os.stat_result, path: Path) -> str | None:
    """Why a folder's mode lets others replace what it holds (group- or world-writable)."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = "group and others" if mode & 0o022 == 0o022 else "others" if mode & 0o002 else "its group"
        return f"{path} is writable by {who} (mode {mode:04o}); fix: chmod 750 {path}"
    return None


def _untrusted(message: str, path: Path) -> Refused:
    return Refused(message, hint=f"kkua-backup never uses a path under its folders that is a symlink or that a "
                                 f"stranger owns; remove or fix {path} (see docs/security.md)")


def _symlink_refusal(path: Path) -> Refused:
    return _untrusted(f"refusing {path}: it is a symlink", path)


def make_folders(path: Path) -> None:
    """Create `path` and its missing parents as 0750 whatever the umask (mkdir, then chmod of exactly the
    folders made here); existing folders are left as they are. Raises OSError."""
    missing: list[Path] = []
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)


def _check_owner(fd: int, path: Path) -> os.stat_result:
    info = os.fstat(fd)
    problem = owner_problem(info, path)
    if problem:
        raise _untrusted(f"refusing {path}: {problem}", path)
    return info


def open_folder(path: Path, *, create: bool = False, root: Path | None = None) -> int:
    """A descriptor of folder `path`. Below its configured root each component is opened without following
    symlinks and must have a trusted owner; with `create` missing folders (and the root with its parents)
    are made 0750. `root` is the caller's root when no configured one applies. Raises Refused (symlink,
    stranger's folder), OSError otherwise."""
    root = root_of(path, root)
    if create:
        make_folders(root if root is not None else path)
    if root is None:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_owner(fd, root)
        current = root
        for part in Path(os.path.abspath(path)).relative_to(root).parts:
            current = current / part
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            made = False
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    made = True
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise _symlink_refusal(current) from None
                raise
            os.close(fd)
            fd = child
            if made:
                os.fchmod(fd, DIR_MODE)
            _check_owner(fd, current)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_at(dir_fd: int, path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """Open `path.name` in the folder `dir_fd` without following a symlink; a file this call creates gets
    `mode` whatever the umask. The file must be a regular file with a trusted owner, and one opened for
    writing must have no other hard link. Raises Refused for anything else, OSError otherwise."""
    name = path.name
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    created = False
    try:
        if flags & os.O_CREAT and not flags & os.O_EXCL:
            try:
                fd = os.open(name, flags | os.O_EXCL, mode, dir_fd=dir_fd)
                created = True
            except FileExistsError:
                fd = os.open(name, flags & ~os.O_CREAT, mode, dir_fd=dir_fd)
        else:
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
            created = bool(flags & os.O_CREAT)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_refusal(path) from None
        raise
    try:
        if created:
            os.fchmod(fd, mode)
        info = _check_owner(fd, path)
        if not stat.S_ISREG(info.st_mode):
            raise _untrusted(f"refusing {path}: not a regular file", path)
        if flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink > 1:
            raise _untrusted(f"refusing {path}: it has {info.st_nlink} hard links (another name for some other "
                             "file?)", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path, flags: int, mode: int = FILE_MODE, *, root: Path | None = None) -> int:
    """Open a file the way everything under the tool's folders is opened (`open_folder` for its folder,
    `open_at` for the file; with O_CREAT the folders are made too). Outside the configured folders it is a
    plain open. `root` is the caller's root when no configured one applies. Raises Refused (symlink,
    stranger's file), OSError otherwise."""
    root = root_of(path, root)
    if root is None:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        if flags & os.O_CREAT:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_uid == os.geteuid():
                    os.fchmod(fd, mode)
        return fd
    dir_fd = open_folder(path.parent, create=bool(flags & os.O_CREAT), root=root)
    try:
        return open_at(dir_fd, path, flags, mode)
    finally:
        os.close(dir_fd)


def read_small(path: Path, limit: int = 64 << 20, *, root: Path | None = None) -> bytes:
    """The content of a small file (manifest, state) opened by the rules above; raises Refused, OSError."""
    fd = open_file(path, os.O_RDONLY, root=root)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit)


def list_folder(path: Path, *, root: Path | None = None) -> list[str]:
    """The names in folder `path`, opened by the rules above; raises FileNotFoundError, Refused, OSError."""
    fd = open_folder(path, root=root if root is not None else path)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def unlink_in(path: Path) -> None:
    """Remove the file `path` from its folder, opened by the rules above (unlink never follows a symlink)."""
    fd = open_folder(path.parent, root=path.parent)
    try:
        os.unlink(path.name, dir_fd=fd)
    finally:
        os.close(fd)


def folder_problems(path: Path, *, root: Path | None = None) -> list[str]:
    """What makes an existing folder under the tool's care untrustworthy: a symlink below its configured
    root, a stranger as owner, or write access for group or others (on the folder and each one between it
    and its root; ancestors above the root only when others can write them without the sticky bit)."""
    problems: list[str] = []
    absolute = Path(os.path.abspath(path))
    root = root_of(absolute, root) or absolute
    for ancestor in reversed(root.parents):
        with contextlib.suppress(OSError):
            info = os.stat(ancestor)
            if stat.S_IMODE(info.st_mode) & 0o002 and not info.st_mode & stat.S_ISVTX:
                problems.append(f"{ancestor} is writable by others without the sticky bit; anyone can replace "
                                f"{root}; fix: chmod o-w {ancestor}")
    chain = [root, *[root / Path(*absolute.relative_to(root).parts[:i + 1])
                     for i in range(len(absolute.relative_to(root).parts))]]
    for index, folder in enumerate(chain):
        try:
            info = os.stat(folder) if index == 0 else os.lstat(folder)
        except FileNotFoundError:
            break  # made 0750 at first use
        except OSError as exc:
            problems.append(f"{folder} cannot be examined: {exc.strerror}")
            break
        if stat.S_ISLNK(info.st_mode):
            problems.append(f"{folder} is a symlink; kkua-backup refuses to follow it (replace it by a folder)")
            break
        problems += [p for p in (owner_problem(info, folder), mode_problem(info, folder)) if p]
    return problems


