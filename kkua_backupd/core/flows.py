"""The operations written once for every data source: a job as the timers and the daemon run it, a backup
(folder, lock, partial files of killed runs, the source's capture through the byte chain, its manifest),
the verification of a set, and a restore (lock, checks, plan, confirmation, safety backup, the change, the
result compared with the backup). A source (sources/<kind>/) supplies only what differs, as a `DataSource`
found in the registry (sources/__init__.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kkua_backupd.core import retention
from kkua_backupd.core.context import (
    JobContext,
    RestoreReport,
    VerifyReport,
    check_restorable,
    confirm,
    refuse_different_result,
    refuse_untrusted,
)
from kkua_backupd.errors import KkuaError
from kkua_backupd.sources import KINDS, RETENTION, BackupOptions, DataSource, RestoreOptions, source
from kkua_backupd.store.lock import TargetLock
from kkua_backupd.store.storage import BackupSet, Manifest, ensure_folder, kind_folder, remove_stale_partials

if TYPE_CHECKING:
    from kkua_backupd.core import state


def backup(ctx: JobContext, data_source: DataSource, options: BackupOptions) -> Manifest:
    """Back up a source's server into its kind's folder; returns the written manifest. Raises LockHeld when
    another run holds the kind's lock, JobError subclasses on failure (a set written but not good is kept,
    marked, and still raises)."""
    kind = data_source.kind
    ensure_folder(ctx.config.backup_dir)
    folder = ensure_folder(kind_folder(ctx.config.backup_dir, kind))
    started = time.monotonic()
    with TargetLock(ctx.config.backup_dir, kind, f"backup {kind}"):
        for name in remove_stale_partials(folder):
            ctx.log.warning("removed a partial file left by an interrupted run", file=name)
        manifest = data_source.capture(ctx, folder, options, started)
    data_source.finished(ctx, manifest, started)
    return manifest


JobResult = Manifest | retention.RetentionReport  # a kind's backup: its manifest; retention: its report


def result_json(result: JobResult) -> dict[str, Any]:
    """The JSON document of a job's result (`backup --json`, `run --json`)."""
    if isinstance(result, Manifest):
        return result.document()
    return result.to_json()


def _run(ctx: JobContext, job: str, options: BackupOptions, record: state.RunRecord) -> JobResult:
    from kkua_backupd.core import remotes  # not loaded by a restore or a verify (docs/decisions/0022)
    if job in KINDS:
        manifest = backup(ctx, source(job), options)
        record.finish(size=sum(f.size for f in manifest.files), files=[f.name for f in manifest.files])
        try:
            remotes.after_backup(ctx, BackupSet(kind_folder(ctx.config.backup_dir, job), manifest))
        except KkuaError:
            record.detail = remotes.UPLOAD_PENDING  # the daemon retries this run as a push
            raise
        return manifest
    if job != RETENTION:
        raise ValueError(f"unknown job {job!r}")
    report = retention.prune(ctx, dry_run=False)
    record.finish(size=report.freed_bytes, detail=f"{len(report.deleted)} set(s) deleted")
    if ctx.config.remote:
        report.remotes = remotes.prune_remotes(ctx, dry_run=False)
    return report


def run_job(ctx: JobContext, job: str, options: BackupOptions, *, runner: str) -> JobResult:
    """One job of the registry (a kind's backup, then its copies to the remotes; or retention, local and
    remote), observed (its start and end recorded for `status`, metrics and notices); returns the backup's
    manifest or retention's report (`result_json` is its JSON document)."""
    from kkua_backupd.core import observe
    with observe.observed(ctx.config, job, runner=runner) as seen:
        return _run(ctx, job, options, seen.record)


def verify(ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
    """`verify` of one set, whatever its kind: refused when the set is invalid, then its source's checks
    and, if asked, a test restore."""
    refuse_untrusted(backup_set)
    if backup_set.future:
        ctx.log.warning(backup_set.future_warning())
    return source(backup_set.kind).verify_set(ctx, backup_set, restore_test=restore_test)


def restore(ctx: JobContext, data_source: DataSource, spec: str, options: RestoreOptions) -> RestoreReport:
    """`restore` of one set into the source's server, in the same order whatever the source: under the
    kind's lock, clean up after killed runs; check the set (nothing changes before it passed); plan, and
    ask for confirmation when existing data is replaced; take the safety backup (or say there is none);
    apply; compare what the target holds with what the backup recorded, a difference failing the restore
    (refuse_different_result). Returns the report (its `to_json()` is what `restore --json` prints). Raises
    UsageError, Refused, IntegrityError, VersionTooNew, NotConfirmed before any change; LockHeld; JobError
    subclasses after."""
    run = data_source.restorer(ctx, spec, options)
    started = time.monotonic()
    with TargetLock(ctx.config.backup_dir, data_source.kind, f"restore {data_source.kind} {run.name}",
                    read_only_ok=not options.safety_backup):
        ctx.log.info("restore requested", file=run.name, **run.requested)
        run.prepare()
        check_restorable(ctx, run.backup_set, checks=run.checks)
        run.check()
        with run.session():
            plan = run.plan()
            replaces = plan.in_place and plan.target_exists
            if replaces:
                confirm(ctx, plan, force=options.force or ctx.config.restore.force)
            if plan.safety:
                run.report.safety_backup = run.safety_backup()
            elif replaces:
                ctx.log.warning("no safety backup taken (--no-safety-backup)", **run.target_field)
            run.apply()
        problems = run.counts_after()
    run.report.seconds = round(time.monotonic() - started, 2)
    refuse_different_result(ctx, run.name, run.target, problems, hint=run.undo_hint())
    run.finished()
    return run.report
