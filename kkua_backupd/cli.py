"""The `kkua-backup` command line: parses arguments, loads the config, runs a job, maps errors to exit codes.

Exit codes: 0 success; 1 the job failed; 2 bad usage or invalid config; 3 refused (lock held,
confirmation declined, checksum mismatch, version too new). With --json, stdout carries exactly one
JSON document (the result, or {"error": ...}) and log lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from . import __version__, logs
from .config import CONFIG_ENV, DEFAULT_CONFIG_PATH, LoadedConfig, load_config, redacted
from .errors import ConfigError, Interrupted, KkuaError, UsageError
from .jobs import JobContext
from .jobs import postgres as pg_job
from .progress import human_bytes, interactive
from .storage import KINDS, BackupSet, list_sets, resolve, unmanaged_files

LOG_FILES = {"backup": "backup.log", "run": "backup.log", "verify": "backup.log", "restore": "restore.log"}
BACKUP_TARGETS = ("postgres", "all")

EPILOG = f"""\
Config: --config PATH, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}.
Exit codes: 0 ok, 1 job failed, 2 bad usage or config, 3 refused (lock held, not confirmed,
checksum mismatch, version too new).
Examples:
  kkua-backup backup postgres --test-restore
  kkua-backup list postgres
  kkua-backup restore postgres latest
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
        description="Back up, verify and restore the KKUA backend's PostgreSQL database.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kkua-backup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("backup", "back up now",
                "Back up now into backup_dir/postgres/kkua_backup_YYYYMMDD_HHMMSS.sql.gz (or .dump, .zst),\n"
                "with a manifest written last. Logs to log_dir/backup.log.")
    p.add_argument("target", choices=BACKUP_TARGETS, help="what to back up")
    p.add_argument("--test-restore", action="store_true",
                   help="restore the new backup into a scratch database and compare every table "
                        "(also TEST_RESTORE=true); a failed test marks the set failed")

    p = command("run", "run a job as configured (what timers and cron run)",
                "Run a job exactly as configured: a backup, with a test restore if postgres.test_restore\n"
                "(TEST_RESTORE) is on.")
    p.add_argument("job", choices=BACKUP_TARGETS, help="which job")

    p = command("restore", "restore a backup",
                "Restore a backup into the configured database, replacing its contents.\n\n"
                "The file is checked (sha256, full decompression) before anything changes; you are asked\n"
                "to type 'yes' unless --force or FORCE_RESTORE=true; a safety backup of the current data\n"
                "is taken; the restore runs in one transaction, so a failure leaves the old data.\n"
                "Without a terminal and without --force it refuses (exit 3).")
    p.add_argument("target", choices=("postgres",), help="what to restore")
    p.add_argument("file", nargs="?", default="latest",
                   help="'latest' (default), a backup id (YYYYMMDD_HHMMSS) or a file name in backup_dir/postgres")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation (FORCE_RESTORE=true)")
    p.add_argument("--target-db", metavar="NAME",
                   help="restore into this new database instead (the configured one is not touched)")
    p.add_argument("--no-safety-backup", action="store_true",
                   help="skip the backup of the current data taken before the restore")

    p = command("list", "list complete backup sets, newest first",
                "List backup sets that have a complete manifest, newest first.")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")

    p = command("verify", "check backups (sha256, full decompression, optional restore test)",
                "Check backup files against their manifests and decompress them fully;\n"
                "--restore-test also restores into a scratch database and compares every table.")
    p.add_argument("which", nargs="?", default="latest", help="'latest' (default), 'all', an id or a file name")
    p.add_argument("--restore-test", action="store_true", help="also restore into a scratch database")

    p = command("config", "check the configuration", "Validate the config and print it, secrets redacted.")
    p.add_argument("action", choices=("check",))
    return parser


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")


def _human(ctx: JobContext, text: str) -> None:
    if not ctx.json_mode:
        sys.stdout.write(text + "\n")


def cmd_backup(ctx: JobContext, args: argparse.Namespace) -> Any:
    test = True if getattr(args, "test_restore", False) else None
    manifest = pg_job.backup(ctx, test_restore=test)
    return manifest.model_dump(mode="json")


def cmd_restore(ctx: JobContext, args: argparse.Namespace) -> Any:
    report = pg_job.restore(ctx, args.file, force=args.force, target_db=args.target_db,
                            safety_backup=not args.no_safety_backup)
    safety = report.get("safety_backup")
    _human(ctx, f"Restored {report['file']} into database {report['database']!r}: {report['tables']} tables, "
                f"{report['rows']} rows, {report['seconds']} s; row counts "
                + ("match the backup." if report.get("check", {}).get("files", [{}])[0].get("checksum") == "ok"
                   else "not compared (no manifest)."))
    if safety:
        _human(ctx, f"The data from before is in {safety['file']} "
                    f"(undo with: kkua-backup restore postgres {safety['file']})")
    return report


def cmd_list(ctx: JobContext, args: argparse.Namespace) -> Any:
    sets = list_sets(ctx.config.backup_dir, args.kind)
    if not ctx.json_mode:
        if not sets:
            _human(ctx, f"no backup sets in {ctx.config.backup_dir}")
        rows = [("KIND", "ID", "CREATED", "TYPE", "STATUS", "SIZE", "FILE")]
        for s in sets:
            assert s.manifest is not None
            rows.append((s.kind, s.id, s.manifest.created_at.strftime("%Y-%m-%d %H:%M:%S %z"), s.manifest.type,
                         s.status, human_bytes(s.size), s.name))
        if sets:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                _human(ctx, "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        for kind in (args.kind,) if args.kind else KINDS:
            others = unmanaged_files(ctx.config.backup_dir, kind)
            if others:
                _human(ctx, f"{len(others)} {kind} file(s) without a manifest are not listed (e.g. {others[-1]}); "
                            f"restore one by name: kkua-backup restore {kind} FILE")
    return [s.to_json() for s in sets]


def _sets_to_verify(ctx: JobContext, which: str) -> list[BackupSet]:
    backup_dir = ctx.config.backup_dir
    if which == "all":
        sets = [s for s in list_sets(backup_dir) if s.kind == "postgres"]
        if not sets:
            raise UsageError(f"no complete backup sets in {backup_dir} to verify",
                             hint="run `kkua-backup backup postgres` first")
        return sets
    return [resolve(backup_dir, "postgres", which)]


def cmd_verify(ctx: JobContext, args: argparse.Namespace) -> tuple[Any, int]:
    reports = []
    code = 0
    for backup_set in _sets_to_verify(ctx, args.which):
        try:
            report = pg_job.verify_set(ctx, backup_set, restore_test=args.restore_test)
        except KkuaError as exc:
            ctx.log.error("verification failed", file=backup_set.name, error=str(exc))
            report = {"kind": backup_set.kind, "id": backup_set.id, "name": backup_set.name, "ok": False,
                      "error": str(exc)}
            code = max(code, exc.exit_code)
        if not report["ok"]:
            code = max(code, 1)
        _human(ctx, f"{'OK  ' if report['ok'] else 'FAIL'}  {report['name']}"
                    + (f"  ({report['error']})" if report.get("error") else "")
                    + (f"  restore test: {'passed' if report['restore_test']['ok'] else 'failed'}"
                       if "restore_test" in report else ""))
        reports.append(report)
    return reports, code


def cmd_config(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    doc = {"path": str(loaded.path) if loaded.path else None, "config": redacted(ctx.config),
           "sources": loaded.sources}
    if not ctx.json_mode:
        _human(ctx, f"config OK: {loaded.path or 'no file (built-in defaults and environment)'}")
        for line in _flatten(redacted(ctx.config)):
            key = line.split(" = ", 1)[0]
            source = loaded.sources.get(key)
            _human(ctx, f"{line}  # from {source}" if source and source != str(loaded.path) else line)
    return doc


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.extend(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            lines.append(f"{prefix}{key} = {json.dumps(value, ensure_ascii=False)}")
    return lines


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}",
                      hint="no partial file was kept; run the job again")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kkua-backup`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    json_mode = getattr(args, "json", False)
    sink = logs.setup(to_stderr=json_mode, verbose=getattr(args, "verbose", False))
    log = logs.get_logger()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        loaded = load_config(getattr(args, "config", None))
        config = loaded.config
        for section in (config.postgres, config.redis):
            if section.password is not None:
                sink.add_secret(section.password.get_secret_value())
        pg = config.postgres
        ctx = JobContext(config=config, log=logs.get_logger(job="postgres",
                                                            target=f"{pg.host}:{pg.port}/{pg.database}"),
                         interactive=interactive() and not json_mode, json_mode=json_mode)
        if args.command in LOG_FILES:
            sink.open_file(config.log_dir, LOG_FILES[args.command])
        handlers: dict[str, Callable[[], Any]] = {
            "backup": lambda: cmd_backup(ctx, args),
            "run": lambda: cmd_backup(ctx, args),
            "restore": lambda: cmd_restore(ctx, args),
            "list": lambda: cmd_list(ctx, args),
            "verify": lambda: cmd_verify(ctx, args),
            "config": lambda: cmd_config(ctx, args, loaded),
        }
        result = handlers[args.command]()
        code = 0
        if isinstance(result, tuple):
            result, code = result
        if json_mode:
            _print_json(result)
        return code
    except KeyboardInterrupt:
        return _fail(Interrupted("interrupted (Ctrl-C)", hint="no partial file was kept"), json_mode, log)
    except KkuaError as exc:
        return _fail(exc, json_mode, log)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for the report
        for line in traceback.format_exc().splitlines():
            log.debug(line)
        return _fail(KkuaError(f"unexpected {type(exc).__name__}: {exc}",
                               hint="this is a bug in kkua-backup; run again with -v for the traceback"),
                     json_mode, log)
    finally:
        sink.close()


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
    sys.exit(code)
