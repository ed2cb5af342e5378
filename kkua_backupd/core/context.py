"""What every job is given (one frozen context) and the steps every source's jobs share: the checks before a
restore, the confirmation, the verify report."""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from kkua_backupd.config import Config
from kkua_backupd.errors import IntegrityError, JobError, KeyMissing, LockHeld, NotConfirmed, Refused, StorageError
from kkua_backupd.safefs import folder_problems
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.signing import check_signature
from kkua_backupd.store.storage import BackupSet, kind_folder, remove_stale_partials
from kkua_backupd.stream.chain import Stage
from kkua_backupd.stream.encrypt import Keys, encryption_of
from kkua_backupd.stream.pipeline import file_chunks
from kkua_backupd.stream.stages import Reader


@dataclass(frozen=True)
class JobContext:
    """Everything a job needs: the effective config, a bound logger, and how it was started."""

    config: Config
    log: Any
    interactive: bool = False  # a person at a terminal: progress lines and questions
    json_mode: bool = False
    # The byte chain's slot after compression (stream/chain.py): every backup file is written through
    # `stages` (the host's encryption, when [encryption] is set; empty: compression only) and read back
    # through `readers_for(file)`, chosen per file: a set may hold files made before encryption was set.
    stages: tuple[Stage, ...] = ()
    keys: Keys = field(default_factory=Keys)

    def readers_for(self, name: str) -> tuple[Reader, ...]:
        """The way back of the stages the stored file `name` was written with: its decryption when the name
        (as the manifest lists it, under its MAC) ends .age or .gpg, else none. Raises KeyMissing when this
        host lacks the key."""
        method = encryption_of(name)
        return (self.keys.reader(method, name),) if method else ()


def context_for(config: Config, log: Any, *, job: str, interactive: bool = False,
                json_mode: bool = False) -> JobContext:
    """The context of one job, its byte chain set from the config: encryption is made here, once."""
    keys = config.keys(job)
    return JobContext(config=config, log=log, interactive=interactive, json_mode=json_mode,
                      stages=(keys.sink,) if keys.method else (), keys=keys)


def refuse_untrusted(backup_set: BackupSet) -> None:
    """Raise Refused (exit 3) when the set is invalid: a manifest naming anything but plain files of its own
    directly in its kind's folder, a symlink, a stranger's file. What verify and restore load must pass."""
    if backup_set.problem:
        raise Refused(f"{backup_set.name} is invalid: {backup_set.problem}; it was not read",
                      hint="kkua-backup only loads plain files it could have written, owned by root or "
                           "kkua-backup; find out who made this set, then remove it (see docs/security.md)")


def refuse_writable_folders(ctx: JobContext, kind: str) -> None:
    """Raise Refused (exit 3) when the backup folder or the kind's folder can be written by others than root
    and kkua-backup (group- or world-writable, a stranger's, a symlink): a backup in it could have been
    replaced by anyone, and a restore would load it as root."""
    problems = folder_problems(kind_folder(ctx.config.backup_dir, kind), root=ctx.config.backup_dir)
    if problems:
        raise Refused(f"restore refused: {problems[0]}",
                      hint="only root and kkua-backup may write the backup folders; fix it, then check the "
                           "sets in it (`kkua-backup verify all`) before restoring (see docs/security.md)")


def clean_stale(ctx: JobContext, kind: str) -> None:
    """Remove the kind's `.partial` files left by runs that died (a killed backup's, a killed restore's
    safety backup, a restore's scratch archive), one log line each. Only while nobody holds the kind's
    lock: a running backup or restore's partial files are alive."""
    folder = kind_folder(ctx.config.backup_dir, kind)
    if not folder.is_dir():
        return
    lock = TargetLock(ctx.config.backup_dir, kind, "clean partial files")
    try:
        lock.acquire()
    except (LockHeld, StorageError):  # busy, or a read-only folder that nothing can have written to
        return
    try:
        for name in remove_stale_partials(folder):
            ctx.log.warning("removed a partial file left by an interrupted run", file=name, kind=kind)
    finally:
        lock.release()


def check_restorable(ctx: JobContext, backup_set: BackupSet, *, checks: str) -> None:
    """Say what an operator should know about the set about to be restored; raises Refused when the backup
    folders can be written by strangers, when the set is invalid (refuse_untrusted) or when files of the
    set are missing. `checks` names what can still check a file without a manifest."""
    refuse_writable_folders(ctx, backup_set.folder.name)
    refuse_untrusted(backup_set)
    check_signed(ctx, backup_set)
    if backup_set.future:
        ctx.log.warning(backup_set.future_warning())
    if backup_set.manifest is None:
        ctx.log.warning(f"this file has no manifest (not made by kkua-backup): only {checks} can check it",
                        file=backup_set.name)
    elif backup_set.status == "failed":
        ctx.log.warning("this set is marked failed; restoring it because it was named explicitly",
                        file=backup_set.name, reason=backup_set.manifest.error)
    elif backup_set.status != "ok":
        raise Refused(f"{backup_set.name} is {backup_set.status}: missing {', '.join(backup_set.missing_files)}",
                      hint=f"choose another backup (see `kkua-backup list {backup_set.kind}`)")


def check_signed(ctx: JobContext, backup_set: BackupSet, *, required: bool = False) -> str | None:
    """Check the set's signature (store/signing.py) with the hosts' signing key before any byte of it is
    used; raises IntegrityError when it does not match, or when `required` (a set fetched from a remote) and
    it cannot be checked. Returns what was found, None for a file without a manifest."""
    if backup_set.manifest is None:
        return None
    key = ctx.keys.signing_key
    found = check_signature(backup_set.manifest, key, required=required)
    if found == "unsigned" and key is not None:
        ctx.log.warning("this set carries no signature (made before signing_key_file was set?); its sha256s are "
                        "checked, but nothing shows this host's tool wrote them", file=backup_set.name)
    return found


class CheckedSet(BaseModel):
    """What the checks of a set's files found (the `check` of a restore, the files part of a verify): each
    file's name, size, sha256, what it decompressed to and its checksum verdict (a source adds its own keys
    per file: an RDB's version, counts, redis-check-rdb), and per source: the RDB's version; whether the
    set could be decrypted here; its signature. Only what was given is printed, in this order."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = None  # postgres restore: "one pass" (checked while it loads) or "pre-check"
    reason: str | None = None  # why a pre-check (core/context.one_pass_refusal)
    files: list[dict[str, Any]] = Field(default_factory=list)
    rdb_version: int | None = None  # redis
    decrypted: bool | None = None  # False: the checksums only (no key on this host)
    warning: str | None = None
    signature: str | None = None  # store/signing.py's verdict; None for a file without a manifest

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class RestoreTestOutcome(Protocol):
    """A test restore's outcome, whatever the source (`verify --restore-test`; a PostgreSQL backup's
    `--test-restore`): whether it passed, why not, and its JSON document."""

    ok: bool
    error: str | None
    problems: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]: ...


class SafetyBackup(BaseModel):
    """The safety backup a restore took before its first change: its main file."""

    model_config = ConfigDict(extra="forbid")
    file: str
    size: int
    sha256: str


class RestoreReport(BaseModel):
    """What a restore did, for any source (the document `restore --json` prints): the fields every restore
    has; a source's report (sources/<kind>/restore.py) adds its own and the order they are printed in."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    ORDER: ClassVar[tuple[str, ...]] = ("kind", "file", "id", "check", "safety_backup", "seconds")
    kind: str
    file: str
    id: str
    check: CheckedSet | None = None
    safety_backup: SafetyBackup | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields set by the restore's steps, in the source's order (`ORDER`)."""
        doc = self.model_dump(mode="json", exclude_unset=True)
        return {key: doc[key] for key in self.ORDER if key in doc} | doc


def one_pass_refusal(ctx: JobContext, backup_set: BackupSet) -> str | None:
    """Why the set must be read in full before a restore loads any byte of it (the pre-check), or None when
    it may be restored in one pass: its bytes hashed, decrypted and decompressed while they load, the COMMIT
    sent only once they matched the manifest (docs/restore.md, docs/decisions/0018). One pass needs bytes
    whose authenticity is settled before the first one loads, since a crafted file can do harm inside a
    transaction that is later rolled back: a set with a manifest, status ok, in folders that pass the
    ownership checks (only root and kkua-backup can have written it), made on this host (or, fetched from a
    remote, with a signature that verified), and signed when a signing key is configured. Call it after
    check_restorable (which raises on a bad signature)."""
    manifest = backup_set.manifest
    if manifest is None:
        return "it has no manifest"
    if backup_set.status != "ok":
        return f"it is marked {backup_set.status}"
    if backup_set.future:
        return "it is dated in the future"
    problems = folder_problems(backup_set.folder, root=ctx.config.backup_dir)
    if problems:
        return problems[0]
    key = ctx.keys.signing_key
    signed = check_signature(manifest, key, required=False) == "ok" if key is not None else False
    if key is not None and not signed:
        return "a signing key is configured and the set carries no signature"
    if manifest.fetched is not None and not signed:
        return (f"it was fetched from remote {manifest.fetched.get('remote', '?')} and no signature proves who "
                "made it")
    if manifest.host != socket.gethostname() and not signed:
        return f"it was made on host {manifest.host or '(unknown)'}, not this one, and carries no signature"
    return None


def checksums_only(ctx: JobContext, backup_set: BackupSet, missing: KeyMissing) -> CheckedSet:
    """`verify` of an encrypted set on a host without its key: each file's size and sha256 against the
    manifest (raises IntegrityError on a difference), and a report that says it could not be decrypted."""
    files = compare_checksums(backup_set)
    ctx.log.warning(f"checksums match, but the set could not be decrypted here: {missing.message}",
                    file=backup_set.name)
    return CheckedSet(files=files, decrypted=False, warning=f"could not decrypt: {missing.message}")


def compare_checksums(backup_set: BackupSet) -> list[dict[str, Any]]:
    """Each file's size and sha256, read as stored, against the manifest; raises IntegrityError ("does not
    match its checksum") on a difference, StorageError when a file cannot be read."""
    files = []
    for entry in backup_set.manifest.files if backup_set.manifest else []:
        digest, size = hashlib.sha256(), 0
        for chunk in file_chunks(backup_set.path(entry.name)):
            digest.update(chunk)
            size += len(chunk)
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{entry.name} does not match its checksum (size {size}, sha256 "
                                 f"{digest.hexdigest()[:12]}..., manifest {entry.size} bytes, "
                                 f"{entry.sha256[:12]}...)", hint="the file is corrupt; use another backup")
        files.append({"name": entry.name, "size": size, "sha256": digest.hexdigest(), "checksum": "ok",
                      "decrypted": False})
    return files


@dataclass(frozen=True)
class VerifyReport:
    """`verify` of one set, for any kind: whether it passed, what its source's checks found (`checked`:
    its files, per source), why it failed, and the test restore's outcome when one was asked for.
    `to_json` is the document `verify --json` prints."""

    kind: str
    id: str
    name: str
    ok: bool
    status: str | None = None
    checked: CheckedSet = field(default_factory=CheckedSet)
    error: str | None = None
    restore_test: RestoreTestOutcome | None = None

    @classmethod
    def failed(cls, backup_set: BackupSet, error: str) -> VerifyReport:
        """A set whose checks raised: `error` says why."""
        return cls(kind=backup_set.kind, id=backup_set.id, name=backup_set.name, ok=False, error=error)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "id": self.id, "name": self.name}
        if self.status is not None:
            doc["status"] = self.status
        doc.update(self.checked.to_json())
        doc["ok"] = self.ok
        if self.error is not None:
            doc["error"] = self.error
        if self.restore_test is not None:
            doc["restore_test"] = self.restore_test.to_json()
        return doc


def verify_report(backup_set: BackupSet, checked: CheckedSet,
                  restore_test: Callable[[], RestoreTestOutcome] | None) -> VerifyReport:
    """`verify` of one set, for either kind: the file checks already done (`checked`), whether the set is
    marked good, and the outcome of `restore_test` when one is asked for."""
    ok = backup_set.status in ("ok", "unverified")
    error = None
    if backup_set.manifest is not None and backup_set.status != "ok":
        error = f"marked {backup_set.status}: {backup_set.manifest.error or 'see its manifest'}"
    outcome = restore_test() if restore_test is not None else None
    if outcome is not None:
        ok = ok and outcome.ok
    return VerifyReport(kind=backup_set.kind, id=backup_set.id, name=backup_set.name, ok=ok,
                        status=backup_set.status, checked=checked, error=error, restore_test=outcome)


def refuse_different_result(ctx: JobContext, name: str, target: str, problems: list[str], hint: str) -> None:
    """The one rule after every restore, whatever the source (docs/decisions/0011): when what the target holds
    differs from what the backup recorded (tables or rows; keys per database, less those that expired), the
    restore failed: each difference is logged as an error and JobError (exit 1) says so, with `hint` (where
    the data from before is). The data stays as restored: undoing it is the operator's call."""
    if not problems:
        return
    for line in problems:
        ctx.log.error("restored data differs from the backup", detail=line)
    raise JobError(f"restore of {name} into {target} finished, but the result differs from the backup: "
                   f"{'; '.join(problems[:5])}", hint=hint)


@dataclass
class RestorePlan:
    """What a restore is about to do, shown to the operator before they confirm."""

    backup_set: BackupSet
    target: str
    in_place: bool
    target_exists: bool
    safety: bool
    lines: list[str] = field(default_factory=list)


def confirm(ctx: JobContext, plan: RestorePlan, *, force: bool) -> None:
    """Ask for `yes` unless forced; raises NotConfirmed when declined or when nobody can answer."""
    if force:
        ctx.log.info("restore confirmed by --force / FORCE_RESTORE", database=plan.target)
        return
    if not sys.stdin.isatty():
        raise NotConfirmed("restore needs confirmation but there is no terminal to ask",
                           hint="run it in a terminal, or pass --force (FORCE_RESTORE=true) if you are sure")
    out = sys.stderr if ctx.json_mode else sys.stdout
    out.write("\n".join(plan.lines) + "\nType 'yes' to continue: ")
    out.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer != "yes":
        raise NotConfirmed(f"restore cancelled (answer was {answer!r}, not 'yes'); nothing was changed")
