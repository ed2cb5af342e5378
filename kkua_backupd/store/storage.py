"""The backup folder: names, manifests, and finding backup sets.

A backup set is one or more data files plus a manifest (`PREFIX+ID.manifest.json`) written last.
Only sets with a readable manifest exist for `list`, `restore latest` and retention; files without one
are shown by name only when asked for explicitly (backups made by the old shell scripts).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import functools
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from kkua_backupd import __version__
from kkua_backupd.errors import IntegrityError, KkuaError, Refused, StorageError, UsageError
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.safefs import open_folder, owner_problem, read_small
from kkua_backupd.store.kinds import FUTURE_TOLERANCE as FUTURE_TOLERANCE  # noqa: PLC0414 (re-exported)
from kkua_backupd.store.kinds import KINDS as KINDS  # noqa: PLC0414 (re-exported: the folder's kinds)
from kkua_backupd.store.kinds import MANIFEST_SUFFIX as MANIFEST_SUFFIX  # noqa: PLC0414 (re-exported)
from kkua_backupd.store.kinds import PREFIXES as PREFIXES  # noqa: PLC0414 (re-exported)
from kkua_backupd.store.kinds import Kind as Kind  # noqa: PLC0414 (re-exported)
from kkua_backupd.stream.pipeline import EXTENSIONS, storage_error, write_atomic

ID_FORMAT = "%Y%m%d_%H%M%S"
ID_RE = re.compile(r"^\d{8}_\d{6}$")
PARTIAL_SUFFIX = ".partial"
_NAME_RE = re.compile(r"^(?P<prefix>[a-z_]+?_)(?P<id>\d{8}_\d{6})(?P<rest>[._].*)$")
# The tool's own folders in backup_dir besides the kinds' (lock.LOCK_DIR, the default state folder).
LOCK_FOLDER_NAMES = (".locks", ".state")
# The scratch archive a parallel pg_restore unpacks next to the backup (sources/postgres/load.py).
RESTORE_SCRATCH_PREFIX = "kkua_restore_"
# A private scratch folder (0700) in a kind's folder: pg_dump -Fd writes its directory there, and a restore or
# verify of a directory set unpacks it there (`scratch_folder`). Named SCRATCH_PREFIX + ID + _PID + .partial.
SCRATCH_PREFIX = "kkua_scratch_"
_SCRATCH_RE = re.compile(r"^kkua_scratch_\d{8}_\d{6}_\d+\.partial$")
# The files of a PostgreSQL directory-format set: PREFIX+ID + this mark + pg_dump's own file name
# (toc.dat, NNNN.dat, blobs*.toc, blob_*.dat) + compression and encryption extensions (docs/decisions/0019).
DIRECTORY_MEMBER_MARK = ".pgdir."


def set_name_problem(kind: str, set_type: str, prefix: str, set_id: str, manifest_file: str,  # noqa: PLR0913, PLR0917 - the parts of a set name, as a manifest holds them
                     files: list[str] | tuple[str, ...]) -> str | None:
    """Why a manifest's names are not what kkua-backup writes (None when they are): every file must be a
    plain name in the kind's folder starting with the set's prefix+id, the prefix the one this tool uses for
    the kind and type, and the manifest named after them. Shared by list, verify, restore and retention."""
    expected_prefix = PREFIXES.get(kind, {}).get(set_type)
    if expected_prefix is None:
        return f"unknown kind/type {kind}/{set_type} in the manifest"
    if prefix != expected_prefix:
        return f"manifest prefix {prefix!r} is not {expected_prefix!r} for a {kind} {set_type}"
    if not ID_RE.match(set_id):
        return f"manifest id {set_id!r} is not YYYYMMDD_HHMMSS"
    if manifest_file != manifest_name(prefix, set_id):
        return f"manifest file {manifest_file} does not carry the set's name"
    if not files:
        return "manifest names no data file"
    stem = prefix + set_id
    for name in files:
        plain = "/" not in name and "\x00" not in name
        if not (plain and name.startswith(stem) and name[len(stem):len(stem) + 1] in (".", "_")
                and not name.endswith((PARTIAL_SUFFIX, MANIFEST_SUFFIX))):
            return f"manifest names {name!r}, which is not a {stem}* file"
    if len(set(files)) != len(files):
        return "manifest names the same file twice"
    return None


def file_problem(path: Path) -> str | None:
    """Why a file of a set must not be used (None when it is a plain file with a trusted owner, or absent)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None  # missing: the set is incomplete, not invalid
    except OSError as exc:
        return f"{path.name} cannot be examined: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path.name} is a symlink (kkua-backup never makes one)"
    if not stat.S_ISREG(info.st_mode):
        return f"{path.name} is not a regular file"
    problem = owner_problem(info, Path(path.name))
    return problem


class ManifestFile(BaseModel):
    """One data file of a set."""

    model_config = ConfigDict(extra="forbid")
    name: str
    size: int
    sha256: str
    role: str = "data"
    compression: str = "none"
    encryption: str | None = None  # "age" | "gpg": the stored bytes are compressed then encrypted


class StoredDetails(BaseModel):
    """A source's typed view of `Manifest.details` (sources/<kind>/manifest.py): fields missing in older
    manifests take their defaults, unknown ones from newer versions are kept. `stored()` is the dict written:
    only the fields given when the view was made, in the order the model declares them, so a manifest
    holds the same keys, order and values as when the details were a dict built by hand."""

    model_config = ConfigDict(extra="allow")

    def stored(self) -> dict[str, Any]:
        """The details as written into a manifest: no defaults or nulls that were not given."""
        return self.model_dump(exclude_unset=True)

    def has(self, name: str) -> bool:
        """Whether the manifest holds field `name` (a default is not the manifest's word)."""
        return name in self.model_fields_set


_Details = TypeVar("_Details", bound=StoredDetails)


class Manifest(BaseModel):
    """The record of a backup set, written last; unknown fields from newer versions are kept."""

    model_config = ConfigDict(extra="allow")
    format_version: int = 1
    kind: Kind
    type: Literal["backup", "safety"] = "backup"
    id: str
    prefix: str
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    files: list[ManifestFile]
    tool: dict[str, Any] = {}
    host: str = ""
    details: dict[str, Any] = {}
    timings: dict[str, float] = {}
    encryption: dict[str, Any] | None = None  # method and recipients (stream/encrypt.py Keys.record)
    mac: dict[str, str] | None = None  # store/signing.py
    # Set by this host when it downloaded the set from a remote (core/remotes.py fetch): the remote's name,
    # when, and whether its signature was checked. Outside the MAC; overwritten at every fetch, so a remote
    # cannot claim a set was made here. A set with it is not restored in one pass unless its signature
    # verified (core/context.py one_pass_refusal).
    fetched: dict[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        """The manifest as JSON (what is written, and printed by --json); `fetched` only on a set fetched
        from a remote, so every other manifest keeps the bytes it had."""
        return self.model_dump(mode="json", exclude={"fetched"} if self.fetched is None else None)

    @field_validator("created_at", "finished_at")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        """A hand-written time without an offset is local time (sets must sort against each other)."""
        return value if value is None or value.tzinfo else value.astimezone()

    def details_as(self, model: builtins.type[_Details]) -> _Details:
        """`details` as its source's typed view; raises IntegrityError when a field has a shape no version
        of the tool wrote (a crafted or damaged manifest)."""
        try:
            return model.model_validate(self.details)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise IntegrityError(f"manifest {self.prefix}{self.id}: details.{where}: {first['msg']}",
                                 hint="the manifest was damaged or not written by kkua-backup; use another "
                                      "backup") from None


@dataclass(frozen=True)
class BackupSet:
    """A set found in the backup folder: its manifest (None for a file made without one) and folder."""

    folder: Path
    manifest: Manifest | None
    legacy_file: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind if self.manifest else self.folder.name

    @property
    def id(self) -> str:
        if self.manifest:
            return self.manifest.id
        match = _NAME_RE.match(self.legacy_file or "")
        return match.group("id") if match else ""

    @property
    def name(self) -> str:
        """The main data file's name (what an operator types to restore it)."""
        if self.manifest:
            return self.manifest.files[0].name
        return self.legacy_file or ""

    @property
    def manifest_path(self) -> Path | None:
        if not self.manifest:
            return None
        return self.folder / f"{self.manifest.prefix}{self.manifest.id}{MANIFEST_SUFFIX}"

    def path(self, name: str | None = None) -> Path:
        return self.folder / (name or self.name)

    @property
    def missing_files(self) -> list[str]:
        if not self.manifest or self.problem:
            return []
        return [f.name for f in self.manifest.files if not os.path.lexists(self.folder / f.name)]

    @functools.cached_property
    def problem(self) -> str | None:
        """Why the set must not be used at all (a status of `invalid`): names outside the kind's folder or
        not the set's own, a symlink, something other than a plain file, a stranger as owner."""
        if self.manifest is None:
            return file_problem(self.folder / (self.legacy_file or ""))
        m = self.manifest
        if m.kind != self.folder.name:
            return f"manifest says kind {m.kind} but lies in the {self.folder.name} folder"
        names = [f.name for f in m.files]
        problem = set_name_problem(m.kind, m.type, m.prefix, m.id, manifest_name(m.prefix, m.id), names)
        if problem:
            return problem
        for name in [*names, manifest_name(m.prefix, m.id)]:
            problem = file_problem(self.folder / name)
            if problem:
                return problem
        return None

    @property
    def future(self) -> bool:
        """Whether the set is dated later than now (beyond FUTURE_TOLERANCE): a clock that was wrong."""
        return self.manifest is not None and self.manifest.created_at > now_local() + FUTURE_TOLERANCE

    @property
    def status(self) -> str:
        if self.problem:
            return "invalid"
        if not self.manifest:
            return "unverified"
        if self.missing_files:
            return "incomplete"
        return self.manifest.status

    @property
    def size(self) -> int:
        if self.manifest:
            return sum(f.size for f in self.manifest.files)
        try:
            return self.path().stat().st_size
        except OSError:
            return 0

    def to_json(self) -> dict[str, Any]:
        """The set as `list --json` shows it."""
        assert self.manifest is not None, "only sets with a manifest are listed"
        data = self.manifest.document()
        data["status"] = self.status
        data["problem"] = self.problem
        data["future"] = self.future
        data["folder"] = str(self.folder)
        return data

    def future_warning(self) -> str:
        """The warning for a set dated in the future."""
        assert self.manifest is not None
        return (f"{self.kind} set {self.id} is dated {self.manifest.created_at.isoformat(timespec='seconds')}, "
                "in the future (clock wrong now or when it was made?): it is not `latest` and does not count "
                "toward keep_last; check the clock, then restore it by name if it is the one you want")


def now_local() -> dt.datetime:
    """The current time with the local UTC offset, to the second."""
    return dt.datetime.now().astimezone().replace(microsecond=0)


def ensure_folder(path: Path) -> Path:
    """Create a backup folder and its missing parents (0750 whatever the umask) if missing, by the
    trusted-folder rules; raises StorageError, or Refused for a symlink or a stranger's folder."""
    try:
        os.close(open_folder(path, create=True))
    except OSError as exc:
        raise storage_error(exc, path, "create folder") from None
    return path


def kind_folder(backup_dir: Path, kind: str) -> Path:
    """backup_dir/postgres or backup_dir/redis."""
    return backup_dir / kind


def manifest_name(prefix: str, set_id: str) -> str:
    return f"{prefix}{set_id}{MANIFEST_SUFFIX}"


def new_set_id(folder: Path, prefix: str, clock: Any = now_local) -> tuple[str, dt.datetime]:
    """A fresh `YYYYMMDD_HHMMSS` id not yet used in `folder` (waits for the next second if needed)."""
    for _ in range(5):
        created = clock()
        set_id = created.strftime(ID_FORMAT)
        if not any(folder.glob(f"{prefix}{set_id}[._]*")):
            return set_id, created
        time.sleep(1.0 - (time.time() % 1.0) + 0.01)
    raise StorageError(f"cannot find a free backup name in {folder}")


def data_file_name(prefix: str, set_id: str, extension: str, compression: str, encrypted: str = "") -> str:
    """e.g. kkua_backup_20240115_020000.sql.gz, or .sql.gz.age when encrypted (`encrypted` is `.age`)."""
    return f"{prefix}{set_id}{extension}{EXTENSIONS[compression]}{encrypted}"


def own_partial(kind: str, name: str) -> bool:
    """Whether `name` is a `.partial` file this tool writes in `kind`'s folder: a backup, a safety backup
    (a killed restore's) or a restore's scratch archive, each PREFIX+YYYYMMDD_HHMMSS then `.` or `_`."""
    if not name.endswith(PARTIAL_SUFFIX) or "/" in name:
        return False
    prefixes = PREFIXES[kind].values() if kind in PREFIXES else [p for k in PREFIXES.values() for p in k.values()]
    for prefix in (*prefixes, RESTORE_SCRATCH_PREFIX):
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        if ID_RE.match(rest[:15]) and rest[15:16] in (".", "_"):
            return True
    return False


def run_alive(pid: object) -> bool:
    """Whether `pid` is still a kkua-backup process (a pid can be reused by anything after a kill)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return b"kkua" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def own_scratch_folder(name: str) -> bool:
    """Whether `name` is a scratch folder this tool makes in a kind's folder (`scratch_folder`)."""
    return bool(_SCRATCH_RE.match(name))


def orphan_member(names: set[str], name: str) -> bool:
    """Whether `name` (one of `names`, a kind folder's entries) is a file of a directory-format set whose
    manifest is not there: what a backup killed while moving the set's files into place leaves. Such files
    are never a set (a directory set is read only through its manifest)."""
    match = _NAME_RE.match(name)
    if match is None or not match.group("rest").startswith(DIRECTORY_MEMBER_MARK):
        return False
    if name.endswith(PARTIAL_SUFFIX) or name.endswith(MANIFEST_SUFFIX):
        return False
    return manifest_name(match.group("prefix"), match.group("id")) not in names


@contextlib.contextmanager
def scratch_folder(folder: Path) -> Iterator[Path]:
    """A new private folder (0700) in the kind's folder `folder`, removed with everything in it on leaving
    the block, whatever happened; one a killed run left is removed by `remove_stale_partials`. Raises
    StorageError when it cannot be made."""
    try:
        fd = open_folder(folder)
    except OSError as exc:
        raise storage_error(exc, folder, "open") from None
    for attempt in range(3):  # one of this process's from the same second is still there: the next second
        name = f"{SCRATCH_PREFIX}{now_local().strftime(ID_FORMAT)}_{os.getpid()}{PARTIAL_SUFFIX}"
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
            break
        except FileExistsError:
            if attempt == 2:
                os.close(fd)
                raise StorageError(f"cannot make a scratch folder in {folder}: {name} exists") from None
            time.sleep(1.0 - (time.time() % 1.0) + 0.01)
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, folder / name, "create folder") from None
    try:
        yield folder / name
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(name, dir_fd=fd)  # never follows a symlink (fd-based on Linux)
        os.close(fd)


def move_into(source: Path, folder: Path, names: list[str]) -> None:
    """Move the files `names` from the folder `source` into `folder` (the same file system), then fsync
    `folder`; a name already in `folder` is never replaced. Raises StorageError."""
    src = dst = None
    try:
        src = open_folder(source)
        dst = open_folder(folder)
        for name in names:
            if os.path.lexists(folder / name):
                raise StorageError(f"{folder / name} exists already; the new set was not moved into place")
            os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
        os.fsync(dst)
    except OSError as exc:
        raise storage_error(exc, folder, "move files into") from None
    finally:
        for fd in (src, dst):
            if fd is not None:
                os.close(fd)


def remove_stale_partials(folder: Path) -> list[str]:
    """Delete the `*.partial` files this tool writes (own_partial) left in a kind's folder by a run that
    died, its scratch folders (`scratch_folder`) and the files of directory sets that never got their
    manifest (`orphan_member`); call only while holding the kind's lock. Plain files and folders with a
    trusted owner only: a symlink or a stranger's entry is left alone. Returns the names removed."""
    removed = []
    try:
        fd = open_folder(folder)
    except FileNotFoundError:
        return []
    try:
        names = set(os.listdir(fd))
        for name in sorted(names):
            if own_scratch_folder(name):
                info = os.lstat(name, dir_fd=fd)
                pid = int(name[len(SCRATCH_PREFIX) + 16:-len(PARTIAL_SUFFIX)])
                # a live run's (a `verify` unpacks without the kind's lock) is never touched
                if stat.S_ISDIR(info.st_mode) and not owner_problem(info, Path(name)) and not run_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(name, dir_fd=fd)
                        removed.append(name + "/")
                continue
            if not (own_partial(folder.name, name) or orphan_member(names, name)) or file_problem(folder / name):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
                removed.append(name)
        if removed:
            os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, folder, "clean") from None
    finally:
        os.close(fd)
    return removed


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write the manifest atomically; this is what makes the set exist. First the folder is fsynced once,
    making the renames of the set's data files durable (the byte chain fsyncs each file and renames it, and
    leaves the folder to this one pass): the manifest never exists before its data files do."""
    try:
        fd = open_folder(folder)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, folder, "sync") from None
    path = folder / manifest_name(manifest.prefix, manifest.id)
    body = json.dumps(manifest.document(), indent=2, ensure_ascii=False) + "\n"
    write_atomic(path, body.encode("utf-8"))
    return path


def base_manifest(kind: Kind, set_type: str, prefix: str, set_id: str, created: dt.datetime) -> dict[str, Any]:
    """The fields every manifest shares."""
    return {"kind": kind, "type": set_type, "prefix": prefix, "id": set_id, "created_at": created,
            "tool": {"name": "kkua-backupd", "version": __version__}, "host": socket.gethostname()}


def read_manifest(path: Path) -> Manifest:
    """Load one manifest; raises ValueError if it is unreadable or not a manifest."""
    try:
        return Manifest.model_validate_json(read_small(path, root=path.parent))  # never through a symlink
    except (OSError, ValidationError, KkuaError) as exc:
        raise ValueError(f"{path.name}: {exc}") from exc


def list_sets(backup_dir: Path, kind: str | None = None) -> list[BackupSet]:
    """Every set with a readable manifest, newest first; unreadable manifests are logged and skipped."""
    log = get_logger()
    sets: list[BackupSet] = []
    for k in (kind,) if kind else KINDS:
        folder = kind_folder(backup_dir, k)
        if not folder.is_dir():
            continue
        for path in folder.glob(f"*{MANIFEST_SUFFIX}"):
            try:
                sets.append(BackupSet(folder, read_manifest(path)))
            except ValueError as exc:
                log.warning("manifest unreadable; set ignored", file=str(path), error=str(exc).splitlines()[0])
    sets.sort(key=lambda s: (s.manifest.created_at if s.manifest else dt.datetime.min.replace(tzinfo=dt.UTC),
                             s.id), reverse=True)
    return sets


def unmanaged_files(backup_dir: Path, kind: str) -> list[str]:
    """Backup-like files in the kind's folder that no manifest names (made by the old scripts, copied in,
    or cut short before their manifest): never listed, restorable by explicit name only."""
    folder = kind_folder(backup_dir, kind)
    if not folder.is_dir():
        return []
    named = {f.name for s in list_sets(backup_dir, kind) if s.manifest for f in s.manifest.files}
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and _NAME_RE.match(p.name) and p.name not in named
                  and not p.name.endswith((PARTIAL_SUFFIX, MANIFEST_SUFFIX)))


def latest(backup_dir: Path, kind: str) -> BackupSet | None:
    """The newest good regular backup of `kind` (safety backups, failed or invalid sets and sets dated in
    the future are not candidates)."""
    for s in list_sets(backup_dir, kind):
        if s.manifest and s.manifest.type == "backup" and s.status == "ok" and not s.future:
            return s
    return None


def resolve(backup_dir: Path, kind: str, spec: str) -> BackupSet:
    """Find the set an operator named: `latest`, an id, a file name, or a path inside the kind's folder.

    Raises UsageError for anything outside the folder (`../`, other paths) or not found there.
    """
    folder = kind_folder(backup_dir, kind)
    if spec in ("", "latest"):
        ahead = [s for s in list_sets(backup_dir, kind)
                 if s.manifest and s.manifest.type == "backup" and s.status == "ok" and s.future]
        if ahead:
            # Neither the future-dated set nor an older one is picked silently: the clock is wrong now or
            # was when it was made, and only the operator knows which set holds the data they want.
            raise Refused(f"`latest` is ambiguous: {ahead[0].future_warning()}",
                          hint=f"name the set to restore (kkua-backup restore {kind} ID; see `kkua-backup list "
                               f"{kind}`)")
        found = latest(backup_dir, kind)
        if found is None:
            raise UsageError(f"no complete {kind} backup in {folder}",
                             hint=f"run `kkua-backup backup {kind}` first, or name a file")
        return found
    name = _inside(folder, spec)
    sets = list_sets(backup_dir, kind)
    if ID_RE.match(name):
        for s in sets:
            if s.id == name and s.manifest and s.manifest.type == "backup":
                return s
        for s in sets:
            if s.id == name:
                return s
        raise UsageError(f"no {kind} backup with id {name} in {folder}", hint=f"see `kkua-backup list {kind}`")
    for s in sets:
        if s.manifest and (name in {f.name for f in s.manifest.files} or name == s.manifest_path.name):  # type: ignore[union-attr]
            return s
    if (folder / name).is_file() and not name.endswith((PARTIAL_SUFFIX, MANIFEST_SUFFIX)):
        return BackupSet(folder, None, legacy_file=name)
    raise UsageError(f"{spec} is not a backup in {folder}", hint=f"see `kkua-backup list {kind}`")


def _inside(folder: Path, spec: str) -> str:
    """The file name `spec` designates inside `folder`; raises UsageError for anything else."""
    if "\x00" in spec:
        raise UsageError("refusing a file name with a NUL byte")
    candidate = Path(spec)
    if ".." in candidate.parts:
        raise UsageError(f"refusing {spec}: names with '..' are not allowed",
                         hint=f"give a file name from {folder} (see `kkua-backup list`)")
    if len(candidate.parts) == 1 and not candidate.is_absolute():
        return spec
    try:
        resolved = (candidate if candidate.is_absolute() else Path.cwd() / candidate).resolve()
        inside = resolved.parent == folder.resolve()
    except OSError:
        inside = False
    if not inside:
        raise UsageError(f"refusing {spec}: not a file in the backup folder {folder}",
                         hint="copy the file into that folder first if you mean to restore it")
    return resolved.name

