"""Copies of complete backup sets on the remotes: push, list, verify, fetch for restore, retention.

A set on a remote is its data files under `KIND/NAME` and its manifest, uploaded last, under
`KIND/PREFIX+ID.manifest.json`: a remote set without its manifest does not exist (a killed push leaves
files that nothing lists, and the next push completes them). A failed push never touches the local set:
the set stays `ok`, the upload is noted as pending in the state (`status` shows it) and the next push, run
or daemon retry sends it. Restores from a remote download the set into a staging folder, check every
file's sha256 against the downloaded manifest (and, through `check_authenticity`, that this tool's hosts
wrote it), and only then move it into the local backup folder, where the ordinary restore checks it again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kkua_backupd.config import Config, RemoteConfig, RetentionConfig
from kkua_backupd.core import observe, state
from kkua_backupd.core.context import JobContext, check_signed
from kkua_backupd.core.retention import Candidate, select
from kkua_backupd.errors import IntegrityError, KkuaError, LockHeld, Refused, StorageError, UsageError
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.remote import DeleteRefused, Remote, RemoteError, open_remote
from kkua_backupd.safefs import list_folder, read_small, unlink_in
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.storage import (
    ID_RE,
    KINDS,
    MANIFEST_SUFFIX,
    BackupSet,
    Manifest,
    ensure_folder,
    kind_folder,
    list_sets,
    manifest_name,
    now_local,
    set_name_problem,
    write_manifest,
)
from kkua_backupd.stream.pipeline import AtomicFile, fsync_dir

STAGING_FOLDER = ".remote-staging"
MANIFEST_LIMIT = 4 << 20  # a manifest is a few KiB; a bigger object under that name is not one of ours
# The `detail` a backup run records when its set is ok locally and only its upload failed: the daemon then
# retries with `kkua-backup push` instead of another backup.
UPLOAD_PENDING = "set ok locally; upload to a remote pending"
PUSH_LOCK_WAIT = 3600.0  # seconds a push waits for another push to the same remote


def set_key(kind: str, set_id: str) -> str:
    """How a set is named in the state's pending lists: `postgres/20240115_020000`."""
    return f"{kind}/{set_id}"


def remote_config(config: Config, name: str) -> RemoteConfig:
    """The [[remote]] called `name`; raises UsageError naming the configured ones."""
    found = config.remote_named(name)
    if found is None:
        names = ", ".join(r.name for r in config.remote) or "none"
        raise UsageError(f"no remote called {name!r} in the config (configured: {names})",
                         hint="add a [[remote]] entry (docs/remotes.md)")
    return found


@dataclass
class RemoteSet:
    """A set found on a remote: its manifest (as stored there) and the sizes of the files present."""

    kind: str
    manifest: Manifest
    raw: bytes
    present: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def manifest_file(self) -> str:
        return manifest_name(self.manifest.prefix, self.manifest.id)

    @property
    def missing(self) -> list[str]:
        return [f.name for f in self.manifest.files if self.present.get(f.name) != f.size]

    @property
    def status(self) -> str:
        if self.missing:
            return "incomplete"
        return self.manifest.status

    def to_json(self, remote: str) -> dict[str, Any]:
        data = self.manifest.document()
        data.update(status=self.status, remote=remote, missing=self.missing)
        return data


def remote_sets(remote: Remote, kind: str | None = None) -> list[RemoteSet]:
    """The sets on `remote` with a readable manifest of ours, newest first; raises RemoteError. A manifest
    that does not parse or names files that are not its set's is logged and left out."""
    from kkua_backupd.obs.logs import get_logger

    log = get_logger(remote=remote.name)
    found: list[RemoteSet] = []
    for k in (kind,) if kind else KINDS:
        objects = {o.key.rsplit("/", 1)[-1]: o.size for o in remote.list(k)}
        for name, size in sorted(objects.items()):
            if not name.endswith(MANIFEST_SUFFIX):
                continue
            if size > MANIFEST_LIMIT:
                log.warning("remote object named like a manifest is too big to be one; ignored", key=f"{k}/{name}")
                continue
            raw = b"".join(remote.read(f"{k}/{name}"))
            try:
                manifest = Manifest.model_validate_json(raw)
            except ValidationError as exc:
                log.warning("remote manifest unreadable; set ignored", key=f"{k}/{name}",
                            error=str(exc).splitlines()[0])
                continue
            problem = (f"manifest says kind {manifest.kind}" if manifest.kind != k else
                       set_name_problem(manifest.kind, manifest.type, manifest.prefix, manifest.id, name,
                                        [f.name for f in manifest.files]))
            if problem:
                log.warning("remote manifest is not one of ours; set ignored", key=f"{k}/{name}", problem=problem)
                continue
            found.append(RemoteSet(k, manifest, raw, {f.name: objects[f.name] for f in manifest.files
                                                      if f.name in objects}))
    found.sort(key=lambda s: (s.manifest.created_at, s.id), reverse=True)
    return found


# ---------------------------------------------------------------------------------------------- push


def sets_present(remote: Remote) -> set[str]:
    """The sets `remote` holds, from the names of its manifests alone (no download): a manifest is uploaded
    only after every file of its set was checked there, so its presence means the set is complete."""
    found = set()
    for kind in KINDS:
        for obj in remote.list(kind):
            name = obj.key.rsplit("/", 1)[-1]
            stem = name[:-len(MANIFEST_SUFFIX)] if name.endswith(MANIFEST_SUFFIX) else ""
            if ID_RE.match(stem[-15:]) and obj.size <= MANIFEST_LIMIT:
                found.add(set_key(kind, stem[-15:]))
    return found


def _wanted(local: list[BackupSet], config: RemoteConfig, now: dt.datetime) -> list[BackupSet]:
    """The local sets a remote should hold: good regular backups that its own retention would keep (a set
    pushed only to be pruned again would go back and forth), newest first."""
    good = [s for s in local if s.manifest is not None and s.manifest.type == "backup" and s.status == "ok"
            and not s.future]
    wanted = []
    newer: dict[str, int] = {}
    for backup_set in good:
        assert backup_set.manifest is not None
        young = now - backup_set.manifest.created_at <= dt.timedelta(days=config.days)
        if young or newer.get(backup_set.kind, 0) < config.keep_last:
            wanted.append(backup_set)
        newer[backup_set.kind] = newer.get(backup_set.kind, 0) + 1
    return wanted


def push_set(ctx: JobContext, remote: Remote, backup_set: BackupSet) -> dict[str, Any]:
    """Copy one complete local set to `remote`: each data file (skipped when the remote already holds it
    with the manifest's size, and its sha256 where the remote computes one), then the manifest, last.
    Raises RemoteError; the local set is never changed."""
    manifest = backup_set.manifest
    assert manifest is not None and backup_set.manifest_path is not None
    started = time.monotonic()
    sent = 0
    checked: list[str] = []
    for entry in manifest.files:
        key = f"{backup_set.kind}/{entry.name}"
        there = remote.stat(key)
        if there is not None and there.size == entry.size and remote.sha256(key) in (entry.sha256, None):
            ctx.log.info("remote already holds this file", remote=remote.name, key=key)
            checked.append("present")
            continue
        result = remote.put(backup_set.path(entry.name), key, size=entry.size, sha256=entry.sha256)
        sent += entry.size
        checked.append(result.checked)
    raw = read_small(backup_set.manifest_path, root=backup_set.folder)
    key = f"{backup_set.kind}/{backup_set.manifest_path.name}"
    remote.put(backup_set.manifest_path, key, size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    seconds = time.monotonic() - started
    ctx.log.info("set copied to remote", remote=remote.name, set=set_key(backup_set.kind, backup_set.id),
                 bytes=human_bytes(sent), seconds=round(seconds, 1), checked=",".join(sorted(set(checked))))
    return {"set": set_key(backup_set.kind, backup_set.id), "bytes": sent, "seconds": round(seconds, 2),
            "checked": sorted(set(checked))}


def push(ctx: JobContext, names: Iterable[str] | None = None, *, made: BackupSet | None = None,
         push_all: bool = False) -> dict[str, Any]:
    """Copy every complete local set missing on each remote (or on `names`), manifests last, and record the
    outcome in the state: what was sent, and what is still pending since when. `made` is the set a backup
    just wrote: it is pending even when the remote cannot be listed at all. `push_all` also sends sets the
    remote's retention would delete. Never raises for a remote's failure: the report's `failed` says it."""
    config = ctx.config
    chosen = [remote_config(config, n) for n in names] if names else list(config.remote)
    local = list_sets(config.backup_dir)
    report: dict[str, Any] = {"remotes": {}, "failed": []}
    for remote_cfg in chosen:
        with _push_lock(ctx, remote_cfg.name), contextlib.closing(open_remote(remote_cfg)) as remote:
            _push_one(ctx, remote, remote_cfg, local, made, push_all, report)
    observe.write_metrics(config, ctx.log)  # the per-remote metrics, after every push (a backup's, too)
    return report


@contextlib.contextmanager
def _push_lock(ctx: JobContext, name: str) -> Iterator[None]:
    """One push per remote at a time (`backup all` pushes from two workers): the second waits for the first,
    then finds the sets the first sent already there."""
    lock = TargetLock(ctx.config.backup_dir, f"remote-{name}", f"push to remote {name}")
    deadline = time.monotonic() + PUSH_LOCK_WAIT
    while True:
        try:
            lock.acquire()
            break
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.release()


def _push_one(ctx: JobContext, remote: Remote, remote_cfg: RemoteConfig, local: list[BackupSet],  # noqa: PLR0913, PLR0917 - one remote's share of push(), which owns these
              made: BackupSet | None, push_all: bool, report: dict[str, Any]) -> None:
    config = ctx.config
    done: list[dict[str, Any]] = []
    wanted = [s for s in local if s.manifest is not None and s.manifest.type == "backup" and s.status == "ok"] \
        if push_all else _wanted(local, remote_cfg, now_local())
    wanted_keys = [set_key(s.kind, s.id) for s in wanted]
    pending = set(wanted_keys if made is None else [*wanted_keys, set_key(made.kind, made.id)])
    error: str | None = None
    listed = False
    if made is not None:
        state.mark_pending(config, remote_cfg.name, [set_key(made.kind, made.id)])
    try:
        there = sets_present(remote)
        listed = True
        pending -= there
        for backup_set in reversed(wanted):  # oldest first: a later failure leaves the newest pending
            key = set_key(backup_set.kind, backup_set.id)
            if key in there:
                continue
            done.append(push_set(ctx, remote, backup_set))
            pending.discard(key)
    except RemoteError as exc:
        error = str(exc)
        ctx.log.error("copy to remote failed; the local set is kept and the upload is pending",
                      remote=remote_cfg.name, error=error, pending=len(pending))
        report["failed"].append({"remote": remote_cfg.name, "error": error})
    state.record_push(config, remote_cfg.name, sent=[d["set"] for d in done], pending=sorted(pending),
                      error=error, complete=listed)
    report["remotes"][remote_cfg.name] = {"sent": done, "pending": sorted(pending), "error": error}


def after_backup(ctx: JobContext, made: BackupSet) -> None:
    """What every backup does once its set is complete: push to every remote. Raises RemoteError (the job
    exits 1) when a copy failed; the set itself stays ok."""
    if not ctx.config.remote:
        return
    report = push(ctx, made=made)
    if report["failed"]:
        first = report["failed"][0]
        raise RemoteError(f"set {set_key(made.kind, made.id)} is complete and ok locally, but its copy to remote "
                          f"{first['remote']} failed: {first['error']}",
                          hint="the upload is pending: `kkua-backup status` shows it, and the next run, the "
                               "daemon or `kkua-backup push` sends it")


# ---------------------------------------------------------------------------------------------- verify


def verify_remote(ctx: JobContext, name: str, *, download: bool) -> tuple[list[dict[str, Any]], int]:
    """Check every set on remote `name`: sizes (and the remote's own sha256 where it computes one), or with
    `download` every byte hashed here. Returns the reports and the exit code (0, 1 or 3 for a mismatch)."""
    with contextlib.closing(open_remote(remote_config(ctx.config, name))) as remote:
        return _verify(remote, name, download=download)


def _verify(remote: Remote, name: str, *, download: bool) -> tuple[list[dict[str, Any]], int]:
    reports = []
    code = 0
    for remote_set in remote_sets(remote):
        problems: list[str] = [f"{n} is missing or has the wrong size" for n in remote_set.missing]
        hashed = 0
        for entry in remote_set.manifest.files:
            if entry.name in remote_set.missing:
                continue
            key = f"{remote_set.kind}/{entry.name}"
            if download:
                digest = hashlib.sha256()
                for chunk in remote.read(key):
                    digest.update(chunk)
                found: str | None = digest.hexdigest()
            else:
                found = remote.sha256(key)
            if found is not None:
                hashed += 1
                if found != entry.sha256:
                    problems.append(f"{entry.name}: sha256 {found[:12]}... is not the manifest's "
                                    f"{entry.sha256[:12]}...")
        ok = not problems and remote_set.manifest.status == "ok"
        if problems:
            code = 3 if any("sha256" in p for p in problems) else max(code, 1)
        elif not ok:
            code = max(code, 1)
        reports.append({"remote": name, "kind": remote_set.kind, "id": remote_set.id,
                        "name": remote_set.manifest.files[0].name, "ok": ok, "problems": problems,
                        "checked": "sha256 (downloaded)" if download else
                        ("size+sha256 (on the remote)" if hashed else "size")})
    return reports, code


# ---------------------------------------------------------------------------------------------- restore


def choose(sets: list[RemoteSet], kind: str, spec: str, name: str) -> RemoteSet:
    """The remote set an operator named (`latest`, an id or a file name); raises UsageError or Refused."""
    candidates = [s for s in sets if s.kind == kind]
    if spec in ("", "latest"):
        now = now_local()
        for s in candidates:
            if s.manifest.type == "backup" and s.status == "ok" and s.manifest.created_at <= now + dt.timedelta(
                    minutes=5):
                return s
        raise UsageError(f"no complete {kind} backup on remote {name}", hint=f"see `kkua-backup list --remote {name}`")
    for s in candidates:
        if spec == s.id or spec in {f.name for f in s.manifest.files} or spec == s.manifest_file:
            if s.status == "incomplete":
                raise Refused(f"{kind} set {s.id} on remote {name} is incomplete: missing {', '.join(s.missing)}",
                              hint="push it again from a host that has it, or choose another set")
            return s
    if not ID_RE.match(spec) and "/" in spec:
        raise UsageError(f"refusing {spec}: name a set on the remote by id or file name")
    raise UsageError(f"no {kind} set {spec} on remote {name}", hint=f"see `kkua-backup list --remote {name}`")


def check_authenticity(ctx: JobContext, manifest_bytes: bytes, staged: BackupSet) -> None:
    """Where a set fetched from a remote must prove it was written by this tool's hosts before any byte of
    it is used. The remote is not trusted: anyone who can write there can write a manifest whose hashes
    match their own files (and encrypt them to the public age recipient). With [encryption]
    signing_key_file configured, the manifest's MAC (store/signing.py) must be there and match: an unsigned
    or badly signed set raises IntegrityError (exit 3) and nothing is moved or restored. Without a signing
    key nothing can prove it; the set is used with a warning (docs/remotes.md, docs/security.md)."""
    del manifest_bytes  # the MAC covers the parsed manifest's identity and files (signing.signed_content)
    if staged.problem:
        raise Refused(f"set {staged.id} from the remote is invalid: {staged.problem}; nothing was restored")
    if ctx.keys.signing_key is not None:
        check_signed(ctx, staged, required=True)
        ctx.log.info("the set's signature matches this host's signing key", set=set_key(staged.kind, staged.id))
        return
    ctx.log.warning("the set's authenticity cannot be proven: no [encryption] signing_key_file is configured, so "
                    "its files only match the manifest found next to them on the remote, which anyone who can "
                    "write the remote can write too", set=set_key(staged.kind, staged.id))


def _clear_staging(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for name in list_folder(folder):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                unlink_in(folder / name)


def fetch(ctx: JobContext, name: str, kind: str, spec: str) -> BackupSet:
    """Download the remote set `spec` of `kind` into backup_dir/.remote-staging/KIND, check every file's size
    and sha256 against the downloaded manifest, then `check_authenticity`, then move it into the kind's
    folder (data files, then the manifest) and return it as a local set. A set of the same id already there
    is used when its files are the same. Raises IntegrityError (exit 3) for a file that does not match:
    nothing is moved, nothing restored."""
    with contextlib.closing(open_remote(remote_config(ctx.config, name))) as remote:
        return _fetch(ctx, remote, name, kind, spec)


def _fetch(ctx: JobContext, remote: Remote, name: str, kind: str, spec: str) -> BackupSet:
    chosen = choose(remote_sets(remote, kind), kind, spec, name)
    manifest = chosen.manifest
    backup_dir = ctx.config.backup_dir
    folder = ensure_folder(kind_folder(backup_dir, kind))
    existing = next((s for s in list_sets(backup_dir, kind) if s.id == chosen.id and s.manifest is not None
                     and s.manifest.type == manifest.type), None)
    if existing is not None:
        assert existing.manifest is not None
        if [(f.name, f.sha256) for f in existing.manifest.files] != [(f.name, f.sha256) for f in manifest.files]:
            raise Refused(f"a different local {kind} set {chosen.id} exists in {folder}; the remote's copy was not "
                          "downloaded", hint="restore the local one by id, or move it away first")
        ctx.log.info("the local set is the same as the remote's; using the local copy", set=set_key(kind, chosen.id))
        return existing
    with TargetLock(backup_dir, kind, f"download {kind} set {chosen.id} from remote {name}"):
        staging = ensure_folder(backup_dir / STAGING_FOLDER / kind)
        _clear_staging(staging)
        try:
            started = time.monotonic()
            total = 0
            for entry in manifest.files:
                with AtomicFile(staging / entry.name) as out:
                    for chunk in remote.read(f"{kind}/{entry.name}"):
                        out.write(chunk)
                        if out.size > entry.size:
                            break
                    info = out.commit()
                if info.size != entry.size or info.sha256 != entry.sha256:
                    raise IntegrityError(
                        f"{entry.name} on remote {name} does not match its manifest ({info.size} bytes, sha256 "
                        f"{info.sha256[:12]}...; the manifest says {entry.size} bytes, {entry.sha256[:12]}...); "
                        "nothing was restored",
                        hint="the remote copy was changed or damaged; restore another set, or a local one")
                total += info.size
            with AtomicFile(staging / chosen.manifest_file) as out:
                out.write(chosen.raw)
                out.commit()
            check_authenticity(ctx, chosen.raw, BackupSet(staging, manifest))
            # The local copy says where it came from (outside the MAC, set here whatever the remote's copy
            # says): a restore then knows it was not made on this host (core/context.py one_pass_refusal).
            manifest = manifest.model_copy(update={"fetched": {
                "remote": name, "at": now_local().isoformat(timespec="seconds"),
                "signature": "ok" if ctx.keys.signing_key is not None else "not checked (no signing key)"}})
            write_manifest(staging, manifest)
            ctx.log.info("set downloaded and checked", remote=name, set=set_key(kind, chosen.id),
                         bytes=human_bytes(total), seconds=round(time.monotonic() - started, 1))
            for entry_name in [*(f.name for f in manifest.files), chosen.manifest_file]:  # the manifest last
                os.rename(staging / entry_name, folder / entry_name)
            fsync_dir(folder)
        except OSError as exc:
            raise StorageError(f"cannot stage the set from remote {name} in {staging}: {exc.strerror or exc}",
                               hint="check the free space and permissions of backup_dir") from None
        finally:
            _clear_staging(staging)
    return BackupSet(folder, manifest)


# ---------------------------------------------------------------------------------------------- retention


def prune_remote(ctx: JobContext, name: str, *, dry_run: bool) -> dict[str, Any]:
    """Retention on one remote, decided from the remote's own manifests with its `keep_last` and `days`:
    the manifest goes first (the set stops existing), then its files. A remote that refuses or fails a
    delete makes retention stop there with a log line (`skipped` in the report), never an error; raises
    RemoteError only when the remote cannot be listed."""
    remote_cfg = remote_config(ctx.config, name)
    with contextlib.closing(open_remote(remote_cfg)) as remote:
        return _prune_remote(ctx, remote, remote_cfg, dry_run=dry_run)


def _prune_remote(ctx: JobContext, remote: Remote, remote_cfg: RemoteConfig, *, dry_run: bool) -> dict[str, Any]:
    name = remote_cfg.name
    sets = remote_sets(remote)
    candidates = [Candidate(kind=s.kind, type=s.manifest.type, prefix=s.manifest.prefix, id=s.id,
                            created_at=s.manifest.created_at, status=s.status,
                            files=tuple(f.name for f in s.manifest.files), manifest=s.manifest_file,
                            bytes=sum(f.size for f in s.manifest.files)) for s in sets]
    limits = RetentionConfig(days=remote_cfg.days, keep_last=remote_cfg.keep_last)
    report: dict[str, Any] = {"remote": name, "deleted": [], "kept": [], "skipped": None, "dry_run": dry_run}
    for decision in select(candidates, now_local(), limits):
        c = decision.candidate
        item = {"kind": c.kind, "id": c.id, "name": c.name, "reason": decision.reason}
        if decision.action != "delete":
            report["kept"].append(item)
            continue
        if not dry_run:
            try:
                for key in [c.manifest, *c.files]:
                    remote.delete(f"{c.kind}/{key}")
            except RemoteError as exc:  # DeleteRefused (403: an immutable bucket), or a store that cannot delete
                what = "refuses deletes" if isinstance(exc, DeleteRefused) else "could not delete"
                ctx.log.warning(f"remote {what}; its retention is skipped until it can", remote=name, error=str(exc))
                report["skipped"] = str(exc)
                break
            ctx.log.info("remote set deleted", remote=name, set=set_key(c.kind, c.id), reason=decision.reason)
        report["deleted"].append(item)
    return report


def prune_remotes(ctx: JobContext, *, dry_run: bool) -> dict[str, Any]:
    """Retention on every remote; a remote that cannot be reached is logged and reported, never raised:
    local retention has already run."""
    reports: dict[str, Any] = {}
    for remote_cfg in ctx.config.remote:
        try:
            reports[remote_cfg.name] = prune_remote(ctx, remote_cfg.name, dry_run=dry_run)
        except KkuaError as exc:
            ctx.log.error("retention on the remote failed; nothing was deleted there", remote=remote_cfg.name,
                          error=str(exc))
            reports[remote_cfg.name] = {"remote": remote_cfg.name, "error": str(exc), "deleted": [], "kept": []}
    return reports

