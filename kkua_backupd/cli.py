"""The `kkua-backup` command line: parses arguments, loads the config, runs a job, maps errors to exit codes.

Exit codes: 0 success; 1 the job failed; 2 bad usage or invalid config; 3 refused (lock held,
confirmation declined, checksum mismatch, version too new). With --json, stdout carries exactly one
JSON document (the result, or {"error": ...}) and log lines go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

# Only what parsing the command line needs is imported here: `--help`, `--version` and usage errors load
# no pydantic, structlog, psycopg, redis-py or compressor, and each command imports what it uses inside its
# function (tests/unit/test_startup.py; docs/performance.md, start-up).
from kkua_backupd import CONFIG_ENV, DEFAULT_CONFIG_PATH, __version__
from kkua_backupd.errors import ConfigError, IntegrityError, Interrupted, JobError, KkuaError, Refused, UsageError
from kkua_backupd.obs import logs
from kkua_backupd.obs.progress import human_bytes, interactive
from kkua_backupd.safefs import set_trusted_roots
from kkua_backupd.sources import (
    BACKUP_TARGETS,
    KINDS,
    RETENTION,
    RUN_JOBS,
    BackupOptions,
    RestoreOptions,
    backup_log,
    details_of,
    job_target,
    source,
)

if TYPE_CHECKING:
    from kkua_backupd.config import Config, LoadedConfig
    from kkua_backupd.core.context import JobContext
    from kkua_backupd.core.status_cache import StatusSettings
    from kkua_backupd.store.storage import BackupSet

LOG_FILES = {"backup": "backup.log", "run": "backup.log", "verify": "backup.log", "restore": "restore.log",
             "prune": "backup.log", "push": "backup.log"}

EPILOG = f"""\
Config: --config PATH, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}.
Exit codes: 0 ok, 1 job failed, 2 bad usage or config, 3 refused (lock held, not confirmed,
checksum mismatch, version too new).
Examples:
  kkua-backup backup postgres --test-restore
  kkua-backup backup all                     # PostgreSQL and Redis in parallel
  kkua-backup list postgres
  kkua-backup restore postgres latest
  kkua-backup restore redis latest --flush
  kkua-backup restore postgres kkua_backup_20240115_020000.sql.gz --target-db kkua_check
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; global options are accepted before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout (logs go to stderr)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also log debug lines (every line of the tools' stderr)")

    parser = argparse.ArgumentParser(
        prog="kkua-backup", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Back up, verify and restore the KKUA backend's PostgreSQL database and Redis server.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kkua-backup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("backup", "back up now",
                "Back up now into backup_dir/postgres/kkua_backup_YYYYMMDD_HHMMSS.sql.gz (or .dump, .zst)\n"
                "or backup_dir/redis/redis_backup_YYYYMMDD_HHMMSS.rdb.gz (+ _memory.json.gz, _config.conf.gz,\n"
                ".aof.gz), with a manifest written last. `all` backs up both in parallel.\n"
                "Logs to log_dir/backup.log (PostgreSQL) and log_dir/redis_backup.log (Redis).")
    p.add_argument("target", choices=BACKUP_TARGETS, help="what to back up")
    p.add_argument("--test-restore", action="store_true",
                   help="restore the new backup into a scratch database and compare every table "
                        "(also TEST_RESTORE=true); a failed test marks the set failed")
    p.add_argument("--aof", action="store_true", help="Redis: also archive the AOF (also BACKUP_AOF=true)")

    p = command("run", "run a job as configured (what timers, cron and the daemon run)",
                "Run a job exactly as configured: a backup (with a test restore if postgres.test_restore /\n"
                "TEST_RESTORE is on), or retention. `all` runs every job, the backups in parallel.")
    p.add_argument("job", choices=RUN_JOBS, help="which job")

    p = command("restore", "restore a backup",
                "Restore a backup into the configured PostgreSQL database or Redis server.\n\n"
                "The file is checked (sha256, full decompression, RDB version) before anything changes; you\n"
                "are asked to type 'yes' unless --force or FORCE_RESTORE=true; a safety backup of the current\n"
                "data is taken. PostgreSQL restores run in one transaction, so a failure leaves the old data;\n"
                "Redis restores copy every key with its TTL (logical) or place the RDB (file).\n"
                "Without a terminal and without --force it refuses (exit 3).")
    p.add_argument("target", choices=KINDS, help="what to restore")
    p.add_argument("file", nargs="?", default="latest",
                   help="'latest' (default), a backup id (YYYYMMDD_HHMMSS) or a file name in backup_dir/<target>")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation (FORCE_RESTORE=true)")
    p.add_argument("--target-db", metavar="NAME",
                   help="PostgreSQL: restore into this new database instead (the configured one is not touched)")
    p.add_argument("--no-safety-backup", action="store_true",
                   help="skip the backup of the current data taken before the restore")
    p.add_argument("--flush", action="store_true",
                   help="Redis: empty the target first (without it, keys are merged and the backup wins)")
    p.add_argument("--aof", action="store_true", help="Redis: restore from the set's AOF backup instead of the RDB")
    p.add_argument("--mode", choices=("logical", "file"), default=None,
                   help="Redis: logical (default: copy every key over the network) or file (stop the server, "
                        "place the RDB, start it; same host only)")
    p.add_argument("--from", dest="from_remote", metavar="REMOTE", default=None,
                   help="download the set from this remote first (checked against its manifest, then kept in "
                        "backup_dir like a local set)")

    p = command("list", "list complete backup sets, newest first",
                "List backup sets that have a complete manifest, newest first.")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    p.add_argument("--remote", metavar="NAME", default=None, help="list the sets on this remote instead")

    p = command("verify", "check backups (sha256, full decompression, optional restore test)",
                "Check backup files against their manifests and decompress them fully;\n"
                "--restore-test also restores into a scratch database and compares every table.")
    p.add_argument("which", nargs="?", default="latest", help="'latest' (default), 'all', an id or a file name")
    p.add_argument("--restore-test", action="store_true", help="also restore into a scratch database")
    p.add_argument("--remote", metavar="NAME", default=None,
                   help="check every set on this remote instead: sizes (and sha256 where the remote computes it)")
    p.add_argument("--download", action="store_true", help="with --remote: download every file and hash it")

    p = command("push", "copy complete sets to the remotes (what every backup does)",
                "Copy every complete local set that a remote lacks to it (or to REMOTE), data files first and\n"
                "the manifest last; sets made before the remote was configured, or whose upload failed.\n"
                "Sets the remote's own retention (keep_last, days) would delete are not sent unless --all.")
    p.add_argument("remote", nargs="?", default=None, help="only this remote")
    p.add_argument("--all", action="store_true", help="also send sets older than the remote's retention")

    p = command("prune", "delete backup sets past retention (never the newest keep_last good ones)",
                "Delete sets older than retention.days (BACKUP_RETENTION_DAYS), keeping the newest\n"
                "retention.keep_last good sets of each kind; safety backups follow retention.safety_days.\n"
                "Only sets with a readable manifest are considered; nothing else is ever deleted.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted, and why")
    p.add_argument("--remote", metavar="NAME", default=None,
                   help="apply the retention of this remote (its keep_last and days) to its sets instead")

    command("status", "last result and next run of each job, and whether the daemon runs",
            "Show, per job: schedule, next run, last start, end, result and size; and the daemon's state.\n"
            "Times are in the schedule's zone (schedule.timezone, else local), named on the first line.\n"
            "Exits 1 when a job's last run failed or a job is overdue (no success within its schedule plus\n"
            "schedule.overdue_after), or an upload to a remote has been pending longer than twice\n"
            "schedule.overdue_after; --json says which in each job's and remote's `problems`.")

    p = command("systemd", "install, remove or inspect the systemd units and timers",
                "install: write the units (ExecStart= is this installation), create the user and folders,\n"
                "render the timers from [schedule], enable them (or the daemon with --daemon).\n"
                "uninstall: remove exactly what install added. status: timers' next runs and last results.\n"
                "run: start kkua-backup@run.service now and report.")
    p.add_argument("action", choices=("install", "uninstall", "status", "run"))
    p.add_argument("--daemon", action="store_true",
                   help="install: run kkua-backupd.service instead of the three timers")
    p.add_argument("--no-enable", action="store_true", help="install: write the units but do not enable them")
    p.add_argument("--root", metavar="DIR", default=None,
                   help="install into DIR instead of / (tests, image builds): only files are written; systemctl, "
                        "systemd-sysusers, systemd-tmpfiles and chown are skipped")

    p = command("cron", "install, remove or inspect the cron entries (legacy; systemd timers are preferred)",
                "install: write a marked block rendered from [schedule] into /etc/cron.d/kkua-backup (as root)\n"
                "or the user's crontab; lines it did not write are never touched. Output goes to\n"
                "log_dir/cron.log. test: run each job once and report.")
    p.add_argument("action", choices=("install", "uninstall", "status", "test"))
    p.add_argument("--user", action="store_true", help="use this user's crontab instead of /etc/cron.d")
    p.add_argument("--root", metavar="DIR", default=None,
                   help="use DIR/etc/cron.d instead of /etc/cron.d (tests, image builds)")

    p = command("config", "check the configuration", "Validate the config and print it, secrets redacted.")
    p.add_argument("action", choices=("check",))

    command("check", "connect to everything configured and check it; Nagios exit codes",
            "Connect to PostgreSQL and Redis with the configured credentials and check the client versions,\n"
            "table permissions, SYNC, backup_dir (owner, modes, room for the next backups), the last runs, the\n"
            "metrics folder, and that the timers or the daemon are enabled. One line per check:\n"
            "OK, WARN, FAIL or UNKNOWN, with the fix. Exit codes (Nagios): 0 all OK, 1 a warning,\n"
            "2 a failure, 3 a check could not tell.")

    p = command("notify-failure", "tell the failure of a systemd unit (what OnFailure= runs)",
                "Send the failure notice ([notify]) for UNIT, with its last journal lines, unless its job already\n"
                "did; a run it left `running` (killed) is recorded as failed. Run by kkua-backup-failure@.service.")
    p.add_argument("unit", help="the unit that failed, e.g. kkua-backup@postgres.service")

    p = command("key", "make the keys of [encryption]: an age identity, or the manifests' signing key",
                "generate: write a new age identity (secret key) to --out, mode 0600, and print its public\n"
                "recipient for [encryption] recipients. Keep the identity off the database host if that host\n"
                "should not read its own backups, and keep a copy somewhere safe: a lost key means lost backups.\n"
                "signing-key: write a new key for the manifests' HMAC ([encryption] signing_key_file), 0600;\n"
                "every host that makes or restores backups needs the same one, never the backup store.\n"
                "Neither overwrites an existing file. Needs no config.")
    p.add_argument("action", choices=("generate", "signing-key"))
    p.add_argument("--out", metavar="PATH", required=True, help="the file to create (refused if it exists)")
    return parser


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")


def _human(ctx: JobContext, text: str) -> None:
    if not ctx.json_mode:
        sys.stdout.write(text + "\n")


# Job modules are imported by the command that needs them: a Redis backup need not load psycopg, nor a
# PostgreSQL one redis-py and the installers. It saves a fifth of a second on every timer run.


def job_context(config: Config, job: str, *, json_mode: bool) -> JobContext:
    """The context of one job, its log lines carrying the job and its target."""
    from kkua_backupd.core.context import context_for
    return context_for(config, logs.get_logger(job=job, target=job_target(config, job)), job=job,
                       interactive=interactive() and not json_mode, json_mode=json_mode)


def run_job(ctx: JobContext, job: str, args: argparse.Namespace, runner: str) -> Any:
    """One job of the registry (a kind's backup or retention), its start and end recorded for `status`."""
    from kkua_backupd.core import flows
    if job in KINDS:
        warn_future_sets(ctx, job)
    options = BackupOptions(test_restore=True if getattr(args, "test_restore", False) else None,
                            aof=True if getattr(args, "aof", False) else None)
    return flows.result_json(flows.run_job(ctx, job, options, runner=runner))


def warn_future_sets(ctx: JobContext, kind: str | None = None) -> list[str]:
    """Log (and return) a warning for each set dated in the future: a clock that is or was wrong."""
    from kkua_backupd.store.storage import list_sets
    warnings = [s.future_warning() for s in list_sets(ctx.config.backup_dir, kind) if s.future]
    for text in warnings:
        ctx.log.warning(text)
    return warnings


def cmd_backup(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    job = args.target if args.command == "backup" else args.job
    if job == "all":
        from kkua_backupd.proc import workers
        return workers.run_all(loaded.path, [[*KINDS], [RETENTION] if args.command == "run" else []],
                               command=args.command, json_mode=ctx.json_mode,
                               extra_args=[a for a in ("--test-restore", "--aof")
                                           if getattr(args, a[2:].replace("-", "_"), False)])
    return run_job(job_context(ctx.config, job, json_mode=ctx.json_mode), job, args,
                   runner=os.environ.get("KKUA_BACKUP_RUNNER", "cli"))


def cmd_restore(ctx: JobContext, args: argparse.Namespace) -> Any:
    from kkua_backupd.core.context import clean_stale
    from kkua_backupd.store.storage import resolve
    clean_stale(ctx, args.target)  # a killed restore's safety backup, a scratch archive
    if args.from_remote:
        from kkua_backupd.core import remotes
        # Downloaded, checked against the remote's manifest and moved into backup_dir; from here on the
        # ordinary restore checks it again like any local set (docs/remotes.md).
        fetched = remotes.fetch(ctx, args.from_remote, args.target, args.file)
        _human(ctx, f"Fetched {args.target} set {fetched.id} from remote {args.from_remote} into {fetched.folder}.")
        args.file = fetched.id
    if args.target == "redis":
        return cmd_restore_redis(job_context(ctx.config, "redis", json_mode=ctx.json_mode), args)
    if args.flush or args.aof or args.mode:
        raise UsageError("--flush, --aof and --mode are for `restore redis`")
    from kkua_backupd.core import flows
    started = dt.datetime.now(dt.UTC)
    try:
        report = flows.restore(ctx, source("postgres"), args.file, _restore_options(args))
    except IntegrityError as exc:
        try:
            backup_set = resolve(ctx.config.backup_dir, "postgres", args.file)
        except KkuaError:
            raise exc from None
        raise _checksum_first(ctx, backup_set, exc) from None
    except JobError as exc:  # after the safety backup: say where the data from before is
        safety = _safety_made_since(ctx, "postgres", started)
        if safety is None:
            raise
        note = f"the data from before is in {safety} (undo with: kkua-backup restore postgres {safety} --force)"
        exc.hint = f"{exc.hint}; {note}" if exc.hint else note
        raise
    from kkua_backupd.sources.postgres.restore import PostgresRestoreReport
    assert isinstance(report, PostgresRestoreReport)
    kept = report.safety_backup
    checked = report.check.files if report.check is not None else []
    _human(ctx, f"Restored {report.file} into database {report.database!r}: {report.tables} tables, "
                f"{report.rows} rows, {report.seconds} s; row counts "
                + ("match the backup." if checked and checked[0].get("checksum") == "ok"
                   else "not compared (no manifest)."))
    if kept:
        _human(ctx, f"The data from before is in {kept.file} "
                    f"(undo with: kkua-backup restore postgres {kept.file})")
    return report.to_json()


def _restore_options(args: argparse.Namespace) -> RestoreOptions:
    return RestoreOptions(force=args.force, safety_backup=not args.no_safety_backup, target_db=args.target_db,
                          flush=args.flush, aof=args.aof, mode=args.mode)


def _checksum_first(ctx: JobContext, backup_set: BackupSet, exc: IntegrityError) -> IntegrityError:
    """The checksum error when a file of the set differs from its manifest's sha256, else `exc`: a
    decompressor stops at a flipped byte before the sha256 is complete, and the operator should read that
    the file is not the one the backup wrote. (For PostgreSQL sets; Redis's check_files does it itself.)"""
    for entry in backup_set.manifest.files if backup_set.manifest else []:
        path = backup_set.path(entry.name)
        if not path.is_file() or path.stat().st_size != entry.size:
            return exc  # missing or truncated: `exc` says so exactly
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            return IntegrityError(f"{entry.name} does not match its checksum (sha256 {digest.hexdigest()[:12]}..., "
                                  f"manifest {entry.sha256[:12]}...)", hint="the file is corrupt; use another backup")
    return exc


def _safety_made_since(ctx: JobContext, kind: str, since: dt.datetime) -> str | None:
    """The safety backup of `kind` a restore started at `since` took, if it took one."""
    from kkua_backupd.store.storage import list_sets
    for backup_set in list_sets(ctx.config.backup_dir, kind):
        m = backup_set.manifest
        if m is not None and m.type == "safety" and m.created_at >= since.replace(microsecond=0):
            return backup_set.name
    return None


def cmd_restore_redis(ctx: JobContext, args: argparse.Namespace) -> Any:
    if args.target_db:
        raise UsageError("--target-db is for `restore postgres`",
                         hint="to look at a Redis backup without touching the server, use `verify --restore-test`")
    from kkua_backupd.core import flows
    from kkua_backupd.sources.redis.restore import RedisRestoreReport
    report = flows.restore(ctx, source("redis"), args.file, _restore_options(args))
    assert isinstance(report, RedisRestoreReport)
    counts = ", ".join(f"db{db}: {n}" for db, n in sorted(report.databases.items(), key=lambda item: int(item[0])))
    _human(ctx, f"Restored {report.file} ({report.mode} mode) into {ctx.config.redis.host}:"
                f"{ctx.config.redis.port}: {report.keys} keys ({counts or 'none'}), {report.seconds} s; "
                + ("key counts match the backup." if report.counts_match else
                   "key counts not compared (no manifest)."))
    safety = report.safety_backup
    if safety:
        _human(ctx, f"The data from before is in {safety.file} "
                    f"(undo with: kkua-backup restore redis {safety.file} --flush)")
    return report.to_json()


def _drop_unfinished_databases(ctx: JobContext) -> None:
    """Databases that a killed restore created and did not finish are dropped at the start of `list` and
    `verify` too (backup and restore do it under their lock); nothing is asked of the server without a note,
    and psycopg is not even imported."""
    from kkua_backupd.sources.postgres import unfinished_notes_present
    if not unfinished_notes_present(ctx.config.state_file.parent):
        return
    from kkua_backupd.sources.postgres import load as pg_load

    pg_load.drop_unfinished_databases(ctx)


def cmd_list_remote(ctx: JobContext, args: argparse.Namespace) -> Any:
    from kkua_backupd.core import remotes
    from kkua_backupd.remote import open_remote
    name = args.remote
    with contextlib.closing(open_remote(remotes.remote_config(ctx.config, name))) as remote:
        sets = remotes.remote_sets(remote, args.kind)
        where = remote.describe()
    if not sets:
        _human(ctx, f"no backup sets on remote {name} ({where})")
    else:
        rows = [("KIND", "ID", "CREATED", "STATUS", "SIZE", "FILE")]
        rows += [(s.kind, s.id, s.manifest.created_at.strftime("%Y-%m-%d %H:%M:%S %z"), s.status,
                  human_bytes(sum(f.size for f in s.manifest.files)), s.manifest.files[0].name) for s in sets]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            _human(ctx, "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return [s.to_json(name) for s in sets]


def cmd_push(ctx: JobContext, args: argparse.Namespace) -> tuple[Any, int]:
    from kkua_backupd.core import remotes
    if not ctx.config.remote:
        raise UsageError("no remote is configured", hint="add a [[remote]] entry (docs/remotes.md)")
    report = remotes.push(ctx, [args.remote] if args.remote else None, push_all=args.all)
    for name, doc in report["remotes"].items():
        sent = ", ".join(d["set"] for d in doc["sent"]) or "nothing new"
        _human(ctx, f"{name}: sent {sent}" + (f"; FAILED: {doc['error']}" if doc["error"] else "")
                    + (f"; pending: {', '.join(doc['pending'])}" if doc["pending"] else ""))
    return report, 1 if report["failed"] else 0


def cmd_verify_remote(ctx: JobContext, args: argparse.Namespace) -> tuple[Any, int]:
    from kkua_backupd.core import remotes
    if args.restore_test:
        raise UsageError("--restore-test checks local sets; restore a remote set with `restore ... --from`",
                         hint="or run `verify --remote NAME --download`")
    reports, code = remotes.verify_remote(ctx, args.remote, download=args.download)
    if not reports:
        _human(ctx, f"no backup sets on remote {args.remote}")
    for report in reports:
        _human(ctx, f"{'OK  ' if report['ok'] else 'FAIL'}  {report['kind']} {report['id']}  ({report['checked']})"
                    + (f"  {'; '.join(report['problems'])}" if report["problems"] else ""))
    return reports, code


def cmd_list(ctx: JobContext, args: argparse.Namespace) -> Any:
    from kkua_backupd.store.storage import list_sets, unmanaged_files
    if args.remote:
        return cmd_list_remote(ctx, args)
    _drop_unfinished_databases(ctx)
    sets = list_sets(ctx.config.backup_dir, args.kind)
    if not ctx.json_mode:
        if not sets:
            _human(ctx, f"no backup sets in {ctx.config.backup_dir}")
        rows = [("KIND", "ID", "CREATED", "TYPE", "STATUS", "SIZE", "FILE")]
        for s in sets:
            assert s.manifest is not None
            try:
                test = details_of(s.manifest).tested
            except IntegrityError:  # details no version wrote: verify and restore say so; list lists it
                test = None
            status = "ok, unverified" if s.status == "ok" and test is not None and test.ran is False else s.status
            rows.append((s.kind, s.id, s.manifest.created_at.strftime("%Y-%m-%d %H:%M:%S %z"), s.manifest.type,
                         status, human_bytes(s.size), s.name))
        if sets:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                _human(ctx, "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        for s in sets:
            if s.problem:
                _human(ctx, f"invalid: {s.kind} {s.id}: {s.problem}; verify and restore refuse it")
        needs: dict[str, list[str]] = {}
        for s in sets:
            record = s.manifest.encryption if s.manifest else None
            if record:
                what = (f"the age identity of {', '.join(record.get('recipients') or ['?'])}"
                        if record.get("method") == "age" else f"the {record.get('method')} passphrase")
                needs.setdefault(what, []).append(s.id)
        for what, ids in needs.items():
            _human(ctx, f"encrypted: {len(ids)} set(s) ({ids[0]}{', ...' if len(ids) > 1 else ''}) need {what} "
                        "to be read ([encryption] identity_file / passphrase_file)")
        for kind in (args.kind,) if args.kind else KINDS:
            others = unmanaged_files(ctx.config.backup_dir, kind)
            if others:
                _human(ctx, f"{len(others)} {kind} file(s) without a manifest are not listed (e.g. {others[-1]}); "
                            f"restore one by name: kkua-backup restore {kind} FILE")
    for text in warn_future_sets(ctx, args.kind):
        _human(ctx, f"warning: {text}")
    return [s.to_json() for s in sets]


def _sets_to_verify(ctx: JobContext, which: str) -> list[BackupSet]:
    from kkua_backupd.store.storage import latest, list_sets, resolve
    backup_dir = ctx.config.backup_dir
    if which == "all":
        sets = list_sets(backup_dir)
    elif which in ("", "latest"):
        sets = [found for kind in KINDS if (found := latest(backup_dir, kind)) is not None]
    else:
        errors: list[UsageError] = []
        for kind in KINDS:
            try:
                return [resolve(backup_dir, kind, which)]
            except UsageError as exc:
                errors.append(exc)
        if any("outside" in str(e) or ".." in str(e) for e in errors):
            raise errors[0]
        raise UsageError(f"{which} is not a backup in {backup_dir}/postgres or {backup_dir}/redis",
                         hint="see `kkua-backup list`")
    if not sets:
        raise UsageError(f"no complete backup sets in {backup_dir} to verify",
                         hint="run `kkua-backup backup all` first")
    return sets


def cmd_verify(ctx: JobContext, args: argparse.Namespace) -> tuple[Any, int]:
    from kkua_backupd.core.context import VerifyReport, clean_stale
    if args.remote:
        return cmd_verify_remote(ctx, args)
    if args.download:
        raise UsageError("--download goes with --remote NAME")
    reports = []
    code = 0
    for kind in KINDS:
        clean_stale(ctx, kind)
    _drop_unfinished_databases(ctx)
    from kkua_backupd.core import flows
    for backup_set in _sets_to_verify(ctx, args.which):
        try:
            report = flows.verify(job_context(ctx.config, backup_set.kind, json_mode=ctx.json_mode), backup_set,
                                  restore_test=args.restore_test)
        except KkuaError as exc:
            if isinstance(exc, IntegrityError) and backup_set.kind == "postgres":
                exc = _checksum_first(ctx, backup_set, exc)
            ctx.log.error("verification failed", file=backup_set.name, error=str(exc))
            report = VerifyReport.failed(backup_set, str(exc))
            code = max(code, exc.exit_code)
        if not report.ok:
            code = max(code, 1)
        _human(ctx, f"{'OK  ' if report.ok else 'FAIL'}  {report.name}"
                    + (f"  ({report.error})" if report.error else "")
                    + (f"  (checksums ok; {report.checked.warning})" if report.checked.warning else "")
                    + (f"  restore test: {'passed' if report.restore_test.ok else 'failed'}"
                       if report.restore_test is not None else ""))
        reports.append(report.to_json())
    return reports, code


def _install() -> Any:
    from kkua_backupd import install
    return install


def cmd_prune(ctx: JobContext, args: argparse.Namespace) -> Any:
    from kkua_backupd.core import remotes
    if args.remote:
        report = remotes.prune_remote(ctx, args.remote, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for item in report["deleted"]:
            _human(ctx, f"{verb}  {args.remote}: {item['name']}  ({item['reason']})")
        if report["skipped"]:
            _human(ctx, f"skipped: {report['skipped']}")
        _human(ctx, f"{len(report['deleted'])} set(s) {'would be deleted' if args.dry_run else 'deleted'} on "
                    f"{args.remote}; {len(report['kept'])} kept")
        return report
    from kkua_backupd.core import retention
    pruned = retention.prune(ctx, dry_run=args.dry_run)
    if not ctx.json_mode:
        verb = "would delete" if args.dry_run else "deleted"
        for item in pruned.deleted:
            _human(ctx, f"{verb}  {item.name}  ({item.reason})")
        sets = sum(item.type != "partial" for item in pruned.deleted)
        partials = len(pruned.deleted) - sets
        _human(ctx, f"{sets} set(s) {'would be deleted' if args.dry_run else 'deleted'}"
                    + (f", {partials} leftover partial file(s)" if partials else "")
                    + f", {human_bytes(pruned.freed_bytes)}; {len(pruned.kept)} kept")
    return pruned.to_json()


def cmd_status(config: StatusSettings, *, json_mode: bool) -> Any:
    """`status`, from the validated config or, when it is unchanged, the record of it (core/status_cache.py):
    nothing here imports pydantic unless a set may be dated in the future."""
    from kkua_backupd.core import health, state
    from kkua_backupd.sources.redis.marker import interrupted_file_restore
    report = state.status_report(config)
    report["warnings"] = []
    if state.maybe_future_sets(config.backup_dir):
        from kkua_backupd.store.storage import list_sets
        report["warnings"] = [s.future_warning() for s in list_sets(config.backup_dir) if s.future]
    notice = interrupted_file_restore(config)
    report["redis_restore"] = notice
    problems = health.mark_problems(config, report)
    if not json_mode:
        lines = [f"times in {report['timezone']}", *state.format_status(report)]
        lines += [f"warning: {text}" for text in report["warnings"]]
        lines += [f"WARNING: {notice}"] if notice else []
        lines += [f"PROBLEM: {job}: {text}" for job, found in problems.items() for text in found]
        sys.stdout.write("".join(line + "\n" for line in lines))
    return (report, 1) if problems or (notice and "was killed" in notice) else report


def cmd_check(ctx: JobContext) -> tuple[Any, int]:
    """`kkua-backup check`: every check of core.health.CHECKS and the installation's, one line each."""
    from kkua_backupd.core import health
    from kkua_backupd.install.common import check_installed
    results = health.run_checks(ctx.config, [*health.CHECKS, check_installed])
    code = health.exit_code(results)
    for result in results:
        _human(ctx, result.line())
    _human(ctx, {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}[code]
           + f": {sum(r.level == 'OK' for r in results)} of {len(results)} checks OK")
    return {"status": code, "checks": [r.to_json() for r in results]}, code


def cmd_notify_failure(ctx: JobContext, args: argparse.Namespace) -> Any:
    """What `OnFailure=` runs: tell the failure of UNIT unless its job already did."""
    from kkua_backupd.core import observe
    told = observe.report_unit_failure(ctx.config, args.unit)
    _human(ctx, f"failure of {args.unit} told for: {', '.join(told)}" if told else
           f"{args.unit}: its jobs already told their failure (or none failed)")
    return {"unit": args.unit, "told": told}


def cmd_config(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> tuple[Any, int]:
    from kkua_backupd.config import redacted
    from kkua_backupd.core import health
    problems = health.trust_problems(ctx.config)
    doc = {"path": str(loaded.path) if loaded.path else None, "config": redacted(ctx.config),
           "sources": loaded.sources, "problems": problems}
    for problem in problems:
        ctx.log.error(problem)
    if not ctx.json_mode:
        _human(ctx, f"config OK: {loaded.path or 'no file (built-in defaults and environment)'}")
        for line in _flatten(redacted(ctx.config)):
            key = line.split(" = ", 1)[0]
            source = loaded.sources.get(key)
            _human(ctx, f"{line}  # from {source}" if source and source != str(loaded.path) else line)
        if problems:
            _human(ctx, f"config is valid, but {len(problems)} folder problem(s) above: restores refuse to run "
                        "until they are fixed (see docs/security.md)")
    return doc, 2 if problems else 0


def cmd_key(args: argparse.Namespace) -> dict[str, Any]:
    """`key generate|signing-key --out PATH`: a new key in a new file, 0600; refuses an existing file."""
    import secrets

    from kkua_backupd.config import SIGNING_KEY_BYTES
    from kkua_backupd.stream.encrypt import generate_identity
    path = Path(args.out)
    if args.action == "generate":
        text, recipient = generate_identity()
        result = {"identity_file": str(path), "recipient": recipient}
    else:
        text = secrets.token_hex(SIGNING_KEY_BYTES) + "\n"
        result = {"signing_key_file": str(path)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise Refused(f"{path} exists; refusing to overwrite a key", hint="a replaced key can no longer read the "
                      "backups made for it; choose another --out, or move the old file away yourself") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o600)  # whatever the umask
        fh.write(text)
        fh.flush()
        os.fsync(fd)
    if args.action == "generate":
        lines = [f"identity written to {path} (mode 0600)", f"recipient: {result['recipient']}",
                 "Put the recipient in [encryption] recipients, and identity_file = the file above on the hosts "
                 "that restore.",
                 "WARNING: without this identity file the backups encrypted to its recipient cannot be read by "
                 "anyone. Keep a copy off this machine (a password manager, a safe); a lost key means lost backups."]
    else:
        lines = [f"signing key written to {path} (mode 0600); set [encryption] signing_key_file to it on every "
                 "host that backs up or restores, and never copy it to the backup store"]
    result["warning"] = lines[-1] if args.action == "generate" else ""
    if not getattr(args, "json", False):
        sys.stdout.write("\n".join(lines) + "\n")
    return result


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.extend(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            lines.append(f"{prefix}{key} = {json.dumps(value, ensure_ascii=False)}")
    return lines


# What a SIGTERM leaves is said by the command it stops: a backup keeps no partial file; a restore's own
# error says what the target holds and how to undo it (so no generic hint there).
_SIGTERM_HINT = {"restore": None}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}",
                      hint=_SIGTERM_HINT.get(_COMMAND[0], "no partial file was kept; run the job again"))


_COMMAND = [""]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kkua-backup`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    json_mode = getattr(args, "json", False)
    sink = logs.setup(to_stderr=json_mode, verbose=getattr(args, "verbose", False))
    log = logs.get_logger()
    _COMMAND[0] = args.command
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "key":  # before the config: keys are made before [encryption] can name them
            key_result = cmd_key(args)
            if json_mode:
                _print_json(key_result)
            return 0
        from kkua_backupd.core import status_cache  # no pydantic: `status` may not need it
        if args.command == "status" and (view := status_cache.cached(getattr(args, "config", None),
                                                                     os.environ)) is not None:
            return _print_result(cmd_status(view, json_mode=json_mode), json_mode)
        from kkua_backupd.config import secrets_of  # after parsing: --help and usage errors load no pydantic
        started = time.time_ns()
        loaded, validated = _load_config(args, log)
        config = loaded.config
        set_trusted_roots(*config.trusted_folders)
        for secret in secrets_of(config):
            sink.add_secret(secret)
        if validated and args.command == "status":  # what the next `status` reads; nothing that acts reads it
            status_cache.remember(loaded, getattr(args, "config", None), os.environ, started)
        main_job = {"backup": getattr(args, "target", ""), "run": getattr(args, "job", ""),
                    "restore": getattr(args, "target", ""), "prune": "retention",
                    "push": "push"}.get(args.command, "")
        ctx = job_context(config, main_job or "postgres", json_mode=json_mode)
        if args.command in LOG_FILES:
            log_file = backup_log(main_job) if args.command in ("backup", "run") else LOG_FILES[args.command]
            sink.open_file(config.log_dir, log_file)
        handlers: dict[str, Callable[[], Any]] = {
            "backup": lambda: cmd_backup(ctx, args, loaded),
            "run": lambda: cmd_backup(ctx, args, loaded),
            "restore": lambda: cmd_restore(ctx, args),
            "list": lambda: cmd_list(ctx, args),
            "verify": lambda: cmd_verify(ctx, args),
            "prune": lambda: cmd_prune(ctx, args),
            "push": lambda: cmd_push(ctx, args),
            "status": lambda: cmd_status(config, json_mode=json_mode),
            "systemd": lambda: _install().systemd_command(ctx, args, loaded),
            "cron": lambda: _install().cron_command(ctx, args, loaded),
            "config": lambda: cmd_config(ctx, args, loaded),
            "check": lambda: cmd_check(ctx),
            "notify-failure": lambda: cmd_notify_failure(ctx, args),
        }
        return _print_result(handlers[args.command](), json_mode)
    except KeyboardInterrupt:
        return _fail(Interrupted("interrupted (Ctrl-C)", hint="no partial file was kept"), json_mode, log)
    except KkuaError as exc:
        return _fail(exc, json_mode, log)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for the report
        import traceback

        for line in traceback.format_exc().splitlines():
            log.debug(line)
        return _fail(KkuaError(f"unexpected {type(exc).__name__}: {exc}",
                               hint="this is a bug in kkua-backup; run again with -v for the traceback"),
                     json_mode, log)
    finally:
        sink.close()


def _print_result(result: Any, json_mode: bool) -> int:
    """Print a command's result (with --json) and return its exit code: a result is `doc` or `(doc, code)`."""
    code = 0
    if isinstance(result, tuple):
        result, code = result
    if json_mode:
        _print_json(result)
    return code


# Commands that must work with a broken or half-written config (taking an installation away, looking at it).
CONFIG_OPTIONAL = {("systemd", "uninstall"), ("systemd", "status"), ("cron", "uninstall"), ("cron", "status")}


def _load_config(args: argparse.Namespace, log: Any) -> tuple[LoadedConfig, bool]:
    """The config, and whether it is the one validated (False: the built-in defaults a command that does not
    need it goes on with)."""
    from kkua_backupd.config import Config, LoadedConfig, load_config
    try:
        return load_config(getattr(args, "config", None)), True
    except ConfigError as exc:
        if (args.command, getattr(args, "action", None)) not in CONFIG_OPTIONAL:
            raise
        log.warning(f"{exc.message}; going on with built-in defaults, which `{args.command} {args.action}` "
                    "does not need", problems=len(exc.problems))
        return LoadedConfig(Config(), None, {}), False


def _fail(exc: KkuaError, json_mode: bool, log: Any) -> int:
    fields: dict[str, Any] = {"exit_code": exc.exit_code}
    if isinstance(exc, ConfigError):
        log.error(f"{exc.message}; {exc.hint}" if exc.hint else exc.message, **fields)
        for problem in exc.problems:
            log.error(problem)
    else:
        log.error(str(exc), **fields)
    if json_mode:
        doc: dict[str, Any] = {"error": str(exc), "type": type(exc).__name__, "exit_code": exc.exit_code}
        if isinstance(exc, ConfigError):
            doc["problems"] = exc.problems
        _print_json(doc)
    return exc.exit_code


def run() -> None:
    """Console-script wrapper; a closed stdout (`kkua-backup list | head`) ends quietly."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    # The process ends here: what the command made (pydantic's schemas, psycopg, the config) is freed by the
    # exit itself. Out of the collector's reach, the interpreter's last collection has nothing to walk: about
    # 0.05 s less at the end of a command that loaded them (docs/decisions/0022). Files and connections were
    # closed by their context managers and main's `finally`; stdout is flushed above and at exit.
    gc.freeze()
    sys.exit(code)
