"""Is everything in order? `kkua-backup check` (one line per check, Nagios exit codes) and the overdue and
failed jobs that make `status` exit non-zero.

`CHECKS` is a list of functions, each taking the config and returning its results; a new concern (remotes,
encryption) adds one function to the list. A check that cannot tell (an unexpected error) is UNKNOWN, never
silently OK. Exit code: 2 if any FAIL, else 3 if any UNKNOWN, else 1 if any WARN, else 0.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from kkua_backupd import schedule
from kkua_backupd.core import state
from kkua_backupd.errors import KeyMissing, KkuaError
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.safefs import folder_problems
from kkua_backupd.sources import JOBS, KINDS

if TYPE_CHECKING:  # `status` marks its problems without pydantic (core/status_cache.py); the checks import more
    from kkua_backupd.config import Config
    from kkua_backupd.core.status_cache import StatusSettings

T = TypeVar("T")
Level = Literal["OK", "WARN", "FAIL", "UNKNOWN"]
EXIT_CODES: dict[Level, int] = {"OK": 0, "WARN": 1, "FAIL": 2, "UNKNOWN": 3}
# A disk must hold the next backups with this margin (a set grows between two runs).
SPACE_MARGIN = 1.2
# Seconds `check` gives a remote to answer (a push gives it 60).
CHECK_TIMEOUT = 30.0


@dataclass(frozen=True)
class CheckResult:
    """One line of `check`: what was checked, how it went, what was found, and what to do about it."""

    name: str
    level: Level
    message: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.level:<4} {self.name}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "message": self.message, "fix": self.fix}


Check = Callable[["Config"], list[CheckResult]]


def exit_code(results: list[CheckResult]) -> int:
    """Nagios' convention: critical before unknown before warning."""
    levels = {r.level for r in results}
    for level in ("FAIL", "UNKNOWN", "WARN"):
        if level in levels:
            return EXIT_CODES[level]
    return 0


def run_checks(config: Config, checks: list[Check]) -> list[CheckResult]:
    """Every check's results, in order; a check that raises is UNKNOWN with its error."""
    results: list[CheckResult] = []
    for check in checks:
        name = check.__name__.removeprefix("check_").replace("_", "-")
        try:
            results.extend(check(config))
        except KkuaError as exc:
            results.append(CheckResult(name, "UNKNOWN", exc.message, exc.hint))
        except Exception as exc:  # a check must not hide the others
            results.append(CheckResult(name, "UNKNOWN", f"the check itself failed: {type(exc).__name__}: {exc}",
                                       "this is a bug in kkua-backup; run with -v"))
    return results


# ---------------------------------------------------------------------------------------------
# Jobs: failed last run, overdue


def last_success(entry: dict[str, Any]) -> dt.datetime | None:
    """When a job last succeeded, from its record in the state file (None: never, as far as it knows; sets
    copied in from elsewhere or made before the state file was are not runs of this host's schedule)."""
    when = state.parse_iso(entry.get("last_success"))
    if when is None and entry.get("last_result") == "ok":
        when = state.parse_iso(entry.get("last_end"))
    return when


def overdue_since(config: StatusSettings, job: str, entry: dict[str, Any], moment: dt.datetime) -> dt.datetime | None:
    """The scheduled run after `job`'s last success when it is more than schedule.overdue_after (plus the
    randomized delay) in the past without a newer success; None when the job is not overdue or never ran."""
    success = last_success(entry)
    if success is None:
        return None
    try:
        planned = state.planned_run(config, job, success)
    except (KkuaError, ValueError):
        return None
    if planned is None:
        return None
    due = planned[0] + dt.timedelta(seconds=config.schedule.randomized_delay + config.schedule.overdue_after)
    return planned[0] if moment > due else None


def job_problems(config: StatusSettings, jobs: dict[str, dict[str, Any]], moment: dt.datetime) -> dict[str, list[str]]:
    """For `status`: per job (of a status report's `jobs`), why it is not in order: its last run failed, or
    it is overdue. Jobs in order are absent."""
    records = state.load(config)["jobs"]
    found: dict[str, list[str]] = {}
    for job, doc in jobs.items():
        problems = []
        if doc.get("last_result") == "failed":
            problems.append(f"last run failed: {doc.get('error') or 'no reason recorded'}")
        since = overdue_since(config, job, records.get(job, {}), moment)
        if since is not None:
            success = last_success(records.get(job, {}))
            zone = schedule.resolve_zone(config.schedule.timezone)
            problems.append(f"overdue: scheduled at {state.iso(since)} ({doc.get('schedule')}), no success since "
                            f"{_in_zone(state.iso(success), zone)}")
        if problems:
            found[job] = problems
    return found


def pending_limit(config: StatusSettings) -> dt.timedelta:
    """How long an upload may stay pending before `status` and `check` call it a problem: twice
    schedule.overdue_after (2 h by default, the alert rule's threshold). The next run, the daemon's retries
    and `push` send a pending set within that unless the remote stays unreachable (docs/decisions/0016)."""
    return dt.timedelta(seconds=2 * config.schedule.overdue_after)


def upload_problems(config: StatusSettings, remotes: dict[str, dict[str, Any]],
                    moment: dt.datetime) -> dict[str, list[str]]:
    """For `status`: per remote (of a status report's `remotes`), an upload pending longer than
    `pending_limit`, with the last push's error. Remotes in order are absent."""
    limit = pending_limit(config)
    zone = schedule.resolve_zone(config.schedule.timezone)
    found: dict[str, list[str]] = {}
    for name, doc in remotes.items():
        since = state.parse_iso(doc.get("pending_since"))
        if since is None or moment - since <= limit:
            continue
        error = f"; last push failed: {doc['last_error']}" if doc.get("last_error") else ""
        found[name] = [f"upload pending for more than {_hours(limit)}: {len(doc.get('pending') or [])} set(s) "
                       f"since {_in_zone(state.iso(since), zone)}{error}"]
    return found


def _hours(span: dt.timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} h"


def _in_zone(text: object, zone: dt.tzinfo) -> object:
    when = state.parse_iso(text)
    return state.iso(when.astimezone(zone)) if when is not None else text


def mark_problems(config: StatusSettings, report: dict[str, Any]) -> dict[str, list[str]]:
    """Complete a `status` report: each job's and remote's `problems` and `ok`, the report's `ok`, and every
    time shown in the schedule's zone (named in `timezone`). Returns the problems by job and by `remote NAME`
    (none: everything in order)."""
    zone = schedule.resolve_zone(config.schedule.timezone)
    problems = job_problems(config, report["jobs"], state.now())
    uploads = upload_problems(config, report.get("remotes", {}), state.now())
    for name, doc in report.get("remotes", {}).items():
        doc["problems"] = uploads.get(name, [])
        doc["ok"] = not doc["problems"]
    problems.update({f"remote {name}": found for name, found in uploads.items()})
    for job, doc in report["jobs"].items():
        for key in ("next_run", "last_run", "last_end", "last_trigger"):
            doc[key] = _in_zone(doc.get(key), zone)
        if isinstance(doc.get("last_refused"), dict):
            doc["last_refused"]["at"] = _in_zone(doc["last_refused"].get("at"), zone)
        doc["problems"] = problems.get(job, [])
        doc["ok"] = not doc["problems"]
    report["daemon"]["since"] = _in_zone(report["daemon"].get("since"), zone)
    offset = dt.datetime.now(zone).strftime("%z")
    report["timezone"] = f"{zone.key} (UTC{offset[:3]}:{offset[3:]})"
    report["ok"] = not problems
    return problems


def check_jobs(config: Config) -> list[CheckResult]:
    """Each job's last run: OK, failed, overdue, never succeeded."""
    records = state.load(config)["jobs"]
    moment = state.now()
    zone = schedule.resolve_zone(config.schedule.timezone)

    def shown(when: object) -> object:  # in the schedule's zone, as `status` shows times
        return _in_zone(when if isinstance(when, str) else state.iso(when) if isinstance(when, dt.datetime)
                        else when, zone)

    results = []
    for job in JOBS:
        entry = records.get(job, {})
        name = f"{job}.last-run"
        since = overdue_since(config, job, entry, moment)
        success = last_success(entry)
        if entry.get("last_result") == "failed":
            results.append(CheckResult(name, "FAIL", f"last run failed at {shown(entry.get('last_end'))}: "
                                                     f"{entry.get('error')}",
                                       f"fix the cause, then `kkua-backup run {job}` (logs: journalctl -u "
                                       f"kkua-backup@{job} or {config.log_dir})"))
        elif since is not None:
            results.append(CheckResult(name, "FAIL", f"no successful run since {shown(success)}; the run "
                                       f"scheduled at {shown(since)} did not succeed",
                                       "is the timer or the daemon running? see `kkua-backup systemd status`"))
        elif success is None:
            results.append(CheckResult(name, "WARN", "has never succeeded",
                                       f"run it once: kkua-backup run {job}"))
        else:
            results.append(CheckResult(name, "OK", f"last success {shown(success)}"))
    return results


# ---------------------------------------------------------------------------------------------
# The backup folder: owner and modes, writable, room for the next backups


def trust_problems(config: Config) -> list[str]:
    """What in the tool's folders lets someone other than root and kkua-backup change backups or the tool's
    files: group- or world-writable folders, strangers' folders, symlinks (docs/security.md)."""
    from kkua_backupd.store.storage import LOCK_FOLDER_NAMES
    found: list[str] = []
    backup_dir = config.backup_dir
    for folder, root in ([(backup_dir, backup_dir)]
                         + [(backup_dir / name, backup_dir) for name in (*KINDS, *LOCK_FOLDER_NAMES)]
                         + [(config.log_dir, config.log_dir), (config.state_file.parent, None)]):
        found += [p for p in folder_problems(folder, root=root) if p not in found]
    return found


def next_backup_size(config: Config) -> int:
    """What the next backups of every kind need: the newest good set of each kind, together."""
    from kkua_backupd.store.storage import list_sets
    total = 0
    for kind in KINDS:
        sets = [s for s in list_sets(config.backup_dir, kind)
                if s.manifest is not None and s.manifest.type == "backup" and s.status == "ok"]
        if sets:
            total += max(s.size for s in sets[:3])  # the largest of the last three
    return total


def _writable(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (None when it can)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".kkua-check-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def check_backup_dir(config: Config) -> list[CheckResult]:
    """backup_dir exists, is the tool's (owner, modes, no symlink), is writable and has room."""
    backup_dir = config.backup_dir
    if not backup_dir.is_dir():
        return [CheckResult("backup-dir", "FAIL", f"{backup_dir} does not exist",
                            "create it: kkua-backup systemd install (or install -d -m 0750 -o kkua-backup "
                            f"{backup_dir})")]
    results = []
    problems = trust_problems(config)
    results.append(CheckResult("backup-dir.owner", "FAIL", "; ".join(problems), "see docs/security.md")
                   if problems else CheckResult("backup-dir.owner", "OK", f"{backup_dir}: owner and modes in order"))
    why = _writable(backup_dir)
    results.append(CheckResult("backup-dir.writable", "FAIL", f"cannot create a file in {backup_dir}: {why}",
                               "run as the backup user (kkua-backup) or fix the folder's owner")
                   if why else CheckResult("backup-dir.writable", "OK", f"{backup_dir} is writable"))
    usage = os.statvfs(backup_dir)
    free = usage.f_bavail * usage.f_frsize
    need = int(next_backup_size(config) * SPACE_MARGIN)
    name = "backup-dir.space"
    if need == 0:
        results.append(CheckResult(name, "OK", f"{human_bytes(free)} free; no backup yet to estimate the next from"))
    elif free < need:
        results.append(CheckResult(name, "FAIL", f"{human_bytes(free)} free, the next backups need about "
                                   f"{human_bytes(need)}", "free space, or lower retention (kkua-backup prune)"))
    elif free < 2 * need:
        results.append(CheckResult(name, "WARN", f"{human_bytes(free)} free: room for the next backups "
                                   f"(~{human_bytes(need)}) but not for two", "free space soon"))
    else:
        results.append(CheckResult(name, "OK", f"{human_bytes(free)} free, next backups need ~{human_bytes(need)}"))
    return results


# ---------------------------------------------------------------------------------------------
# The servers, with the configured credentials


def _connected(name: str, connect: Callable[[], T]) -> tuple[T | None, list[CheckResult]]:
    """A connection from `connect`, or None and the FAIL line saying why (the connection error's own words)."""
    try:
        return connect(), []
    except KkuaError as exc:
        return None, [CheckResult(name, "FAIL", exc.message, exc.hint)]


def check_postgres(config: Config) -> list[CheckResult]:
    """Connects; the client fits the server; the user can read every table (and create the scratch
    database when test restores are on)."""
    from kkua_backupd.sources.postgres import client as pg_client

    pg = config.postgres
    conn, failed = _connected("postgres.connect", lambda: pg_client.connect(pg))
    if conn is None:
        return failed
    with conn:
        server = pg_client.server_info(conn)
        results = [CheckResult("postgres.connect", "OK", f"{pg.user}@{pg.host}:{pg.port}/{pg.database}, "
                                                       f"PostgreSQL {server.version}")]
        try:
            bin_dir = pg_client.find_bin_dir(pg, server)
            found = f"pg_dump {pg_client.tool_major(bin_dir)} in {bin_dir}"
            results.append(CheckResult("postgres.client", "OK", found))
        except KkuaError as exc:
            results.append(CheckResult("postgres.client", "FAIL", exc.message, exc.hint))
        denied = [f"{schema}.{name}" for schema, name in conn.execute(UNREADABLE_SQL).fetchall()]
        if denied:
            shown = ", ".join(denied[:5]) + (f" and {len(denied) - 5} more" if len(denied) > 5 else "")
            results.append(CheckResult("postgres.read", "FAIL", f"user {pg.user!r} cannot read {len(denied)} "
                                       f"table(s)/sequence(s): {shown}",
                                       f"GRANT SELECT ON ALL TABLES IN SCHEMA ... TO {pg.user} (and sequences), or "
                                       "use a role with pg_read_all_data"))
        else:
            results.append(CheckResult("postgres.read", "OK", f"user {pg.user!r} can read every table"))
        if pg.test_restore:
            row = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            if row and row[0]:
                results.append(CheckResult("postgres.scratch-db", "OK", "may create the test restore's database"))
            else:
                results.append(CheckResult("postgres.scratch-db", "FAIL", f"test_restore is on but {pg.user!r} may "
                                           "not create databases", f"ALTER ROLE {pg.user} CREATEDB, or turn "
                                           "postgres.test_restore off"))
    return results


UNREADABLE_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND (NOT has_schema_privilege(n.oid, 'USAGE') OR NOT has_table_privilege(c.oid, 'SELECT'))
ORDER BY 1, 2
"""


def check_redis(config: Config) -> list[CheckResult]:
    """Connects with the configured password; SYNC is allowed (or the BGSAVE fallback is on)."""
    import redis

    from kkua_backupd.sources.redis import protocol

    cfg = config.redis
    client, failed = _connected("redis.connect", lambda: protocol.connect_checked(cfg))
    if client is None:
        return failed
    with client:
        version = str(client.info("server").get("redis_version", "?"))
        results = [CheckResult("redis.connect", "OK", f"{protocol.where(cfg)}, server {version}")]
        try:
            answer = client.execute_command("ACL", "DRYRUN", cfg.username or "default", "SYNC")  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:  # before Redis 7, or ACL itself not allowed: cannot tell
            results.append(CheckResult("redis.sync", "OK", f"not checked (ACL DRYRUN: {exc}); a backup will say"))
            return results
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if text == "OK":
            results.append(CheckResult("redis.sync", "OK", "SYNC is allowed (the RDB comes over the network)"))
        elif cfg.sync_fallback == "bgsave":
            results.append(CheckResult("redis.sync", "WARN", f"SYNC is not allowed ({text}); backups use BGSAVE and "
                                       "need the server's dump file on this host",
                                       f"ACL SETUSER {cfg.username or 'default'} +sync"))
        else:
            results.append(CheckResult("redis.sync", "FAIL", f"SYNC is not allowed ({text}) and sync_fallback is "
                                       "none", f"ACL SETUSER {cfg.username or 'default'} +sync"))
    return results


# ---------------------------------------------------------------------------------------------
# Monitoring itself


def check_monitoring(config: Config) -> list[CheckResult]:
    """The metrics file's folder is writable; whether anyone is told of failures."""
    results = []
    path = config.metrics.textfile
    if path is not None:
        why = _writable(path.parent) if path.parent.is_dir() else "no such folder"
        results.append(CheckResult("metrics.textfile", "WARN", f"cannot write {path}: {why}",
                                   f"create {path.parent} writable by the backup user (it is node_exporter's "
                                   "--collector.textfile.directory)") if why
                       else CheckResult("metrics.textfile", "OK", f"{path} can be written"))
    told = [name for name in ("healthchecks_url", "webhook_url") if getattr(config.notify, name) is not None]
    results.append(CheckResult("notify", "OK", f"failures are sent to {' and '.join(told)}") if told else
                   CheckResult("notify", "OK", "no notification configured; failures show in the journal, "
                                               "`status` and metrics only"))
    return results


# ---------------------------------------------------------------------------------------------
# The remotes, with the configured credentials


def check_remotes(config: Config) -> list[CheckResult]:
    """Each remote: listed with the configured credentials (the error's own words and fix when it cannot be:
    wrong secret, unknown host key, down); WARN when an upload has been pending longer than `pending_limit`."""
    from kkua_backupd.core.remotes import sets_present
    from kkua_backupd.remote import open_remote

    uploads = upload_problems(config, state.remote_status(config), state.now())
    results = []
    for remote_cfg in config.remote:
        name = f"remote.{remote_cfg.name}"
        try:
            with contextlib.closing(open_remote(remote_cfg, timeout=CHECK_TIMEOUT)) as remote:
                held = len(sets_present(remote))
        except KkuaError as exc:
            results.append(CheckResult(name, "FAIL", exc.message, exc.hint or "see docs/remotes.md"))
            continue
        where = f"{remote_cfg.url}: reachable, {held} set(s) there"
        if remote_cfg.name in uploads:
            results.append(CheckResult(name, "WARN", f"{where}; {uploads[remote_cfg.name][0]}",
                                       f"kkua-backup push {remote_cfg.name}"))
        else:
            results.append(CheckResult(name, "OK", where))
    return results


# Encryption: the config loads only when the recipients, passphrase and signing key are readable and valid
# (fail closed); this says what the host can do with them, and reads the identity, which a backup never needs.


def check_encryption(config: Config) -> list[CheckResult]:
    """[encryption]: the recipients (or the gpg passphrase and the gpg binary), the identity where one is
    configured, and the signing key."""
    from kkua_backupd.stream.encrypt import GPG, identity_recipient, parse_recipient
    enc = config.encryption
    if enc is None:
        level: Level = "WARN" if config.remote else "OK"
        return [CheckResult("encryption", level, "off: backup files are stored unencrypted"
                            + (f" here and on {len(config.remote)} remote(s)" if config.remote else ""),
                            "add an [encryption] section (docs/configuration.md)" if config.remote else None)]
    results: list[CheckResult] = []
    if enc.method == "age":
        recipients = list(enc.recipients or ())
        for recipient in recipients:
            parse_recipient(recipient)  # checked at load too; a ValueError here is UNKNOWN, never OK
        results.append(CheckResult("encryption", "OK", f"age to {len(recipients)} recipient(s)"))
        if enc.identity_file is None:
            results.append(CheckResult("encryption.identity_file", "OK", "not set: this host can make encrypted "
                                       "backups but not restore or test-restore them"))
        else:
            try:
                identities = enc.load_identities()
            except KeyMissing as exc:
                results.append(CheckResult("encryption.identity_file", "FAIL", exc.message, exc.hint))
            else:
                publics = {identity_recipient(i) for i in identities} - {None}
                if publics and not publics & set(recipients):
                    results.append(CheckResult("encryption.identity_file", "WARN", f"{enc.identity_file} is "
                                               "readable, but it is not the key of any configured recipient: it "
                                               "cannot read the backups made now",
                                               "add its recipient to [encryption] recipients, or point "
                                               "identity_file at the right key"))
                else:
                    results.append(CheckResult("encryption.identity_file", "OK",
                                               f"{enc.identity_file} holds {len(identities)} identity(ies)"))
    else:
        found = shutil.which(GPG)
        results.append(CheckResult("encryption", "OK", f"gpg (AES256), passphrase read from {enc.passphrase_file}")
                       if found and enc.passphrase is not None else
                       CheckResult("encryption", "FAIL", "gpg is not installed" if not found
                                   else f"no passphrase read from {enc.passphrase_file}",
                                   "apt-get install gnupg" if not found else "check passphrase_file"))
    results.append(CheckResult("encryption.signing_key_file", "OK", f"manifests are signed ({enc.signing_key_file})")
                   if enc.signing_key is not None else
                   CheckResult("encryption.signing_key_file", "WARN", "not set: manifests are not signed, so a set "
                               "fetched from a remote cannot be proven to come from this tool's hosts",
                               "kkua-backup key signing-key --out /etc/kkua-backup/signing.key, then set "
                               "signing_key_file on every host that backs up or restores"))
    return results


CHECKS: list[Check] = [check_postgres, check_redis, check_backup_dir, check_jobs, check_remotes, check_monitoring,
                       check_encryption]
