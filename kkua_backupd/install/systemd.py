"""`kkua-backup systemd install|uninstall|status|run`: the units and timers.

Everything written is rendered here, from the config and from where this installation actually is
(ExecStart= names the `kkua-backup` / `kkua-backupd` next to the running Python), by pure functions
(`render_*`) that the tests call directly. The files in the source tree's systemd/ and packaging/ are
these renderings for the default config and /opt/kkua-backupd/bin (a unit test keeps them equal).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kkua_backupd.config import DEFAULT_CONFIG_PATH, Config, LoadedConfig
from kkua_backupd.core import state
from kkua_backupd.core.context import JobContext
from kkua_backupd.errors import CommandFailed, KkuaError
from kkua_backupd.install.common import (
    CONFIG_FILE,
    DAEMON,
    DEFAULT_BIN_DIR,
    DOCS,
    FAILURE_UNIT,
    RECORD_FILE,
    RUN_UNIT,
    STAMP_DIR,
    STOP_MARGIN,
    SYSUSERS_FILE,
    TEMPLATE,
    TIMERS,
    TMPFILES_FILE,
    UNIT_DIR,
    USER,
    Installation,
    Record,
    Target,
    _check_paths,
    _log,
    _make_dirs,
    _require_root,
    _run,
    _say,
    _schedules,
    _show,
    _systemctl,
    _write,
    hardening_warnings,
    require_systemd,
)
from kkua_backupd.sources import JOBS
from kkua_backupd.stream.pipeline import write_atomic

# ----------------------------------------------------------------------------------------------------
# What gets rendered: pure functions of the config and the installation's paths.


@dataclass(frozen=True)
class UnitParams:
    """Everything the unit files depend on."""

    bin_dir: Path = DEFAULT_BIN_DIR
    config_path: Path | None = None  # baked into ExecStart= as --config when given explicitly
    backup_dir: Path = Path("/var/backups/kkua")
    log_dir: Path = Path("/var/log/kkua-backup")
    state_dir: Path = Path("/var/backups/kkua/.state")
    job_timeout: int = 6 * 3600
    stop_grace: int = 30
    schedules: dict[str, str] = field(default_factory=lambda: {
        "postgres": "*-*-* 02:00:00", "redis": "*-*-* 03:00:00", "retention": "Sun *-*-* 04:00:00"})
    randomized_delay: int = 0
    persistent: bool = True

    @classmethod
    def from_config(cls, config: Config, bin_dir: Path, config_path: Path | None,
                    schedules: dict[str, str]) -> UnitParams:
        """The parameters for `config`, with already normalized `schedules` (job -> OnCalendar)."""
        return cls(bin_dir=bin_dir, config_path=config_path, backup_dir=config.backup_dir, log_dir=config.log_dir,
                   state_dir=config.state_file.parent, job_timeout=config.daemon.job_timeout,
                   stop_grace=config.daemon.stop_grace, schedules=schedules,
                   randomized_delay=config.schedule.randomized_delay, persistent=config.schedule.persistent)


def _unit_word(text: str) -> str:
    """One word of a unit file setting: `%` and `$` escaped, quoted when it holds a space."""
    text = text.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() for c in text) or '"' in text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _command(params: UnitParams, program: str, *args: str) -> str:
    words = [str(params.bin_dir / program)]
    if params.config_path is not None:
        words += ["--config", str(params.config_path)]
    return " ".join([*(_unit_word(w) for w in words), *args])


def writable_paths(params: UnitParams) -> list[Path]:
    """The folders the jobs write (backup_dir, log_dir, the state folder), without nested duplicates."""
    wanted = list(dict.fromkeys((params.backup_dir, params.log_dir, params.state_dir)))
    return [p for p in wanted if not any(p != other and p.is_relative_to(other) for other in wanted)]


HARDENING = """\
# Hardening (`systemd-analyze security` rates it; see docs/install.md). The job reads its config and
# password files, writes only the folders in ReadWritePaths=, and talks to PostgreSQL and Redis over
# TCP or Unix sockets.
ProtectSystem=strict
ReadWritePaths={rw}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Nothing here reads other processes or /proc's system files: os.cpu_count() reads
# /sys/devices/system/cpu/online, and the lock names its holder from its own file.
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython, zstandard and isal (ISA-L is compiled ahead of time) never need writable+executable memory.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# Relaxed on purpose:
# PrivateNetwork= and IPAddressDeny= stay off: jobs reach PostgreSQL and Redis, often on another host or
#   container, by names resolved at run time, so no address list can be written here.
# PrivateUsers= stays off: password files are owned by root with group kkua-backup, which a user
#   namespace would map to nobody.
# RootDirectory= stays unset: the jobs run the host's pg_dump, chosen to match the server's version.
# UMask=0027 leaves files group-readable on purpose: the kkua-backup group (operators) reads backups and logs.
"""


def _hardening(params: UnitParams) -> str:
    return HARDENING.format(rw=" ".join(_unit_word(str(p)) for p in writable_paths(params)))


def _service_common(params: UnitParams) -> str:
    return (f"User={USER}\nGroup={USER}\nUMask=0027\n"
            f"# KillMode=mixed: SIGTERM reaches only the main process, which stops its workers and their\n"
            f"# children in order (grace, then SIGKILL) and removes partial files; systemd SIGKILLs whatever\n"
            f"# is left after TimeoutStopSec=, which is longer than daemon.stop_grace ({params.stop_grace} s).\n"
            f"KillMode=mixed\nTimeoutStopSec={params.stop_grace + STOP_MARGIN}s\n"
            f"Nice=10\nIOSchedulingClass=best-effort\nIOSchedulingPriority=7\n\n")


def render_template_service(params: UnitParams) -> str:
    """kkua-backup@.service: the oneshot job the timers start (`%i` = postgres, redis, retention, run)."""
    return (
        "# One KKUA backup job, started by its timer or by hand:\n"
        "#   systemctl start kkua-backup@postgres   (or @redis, @retention; @run runs every job)\n"
        "# Written by `kkua-backup systemd install` from the config; run it again after changing the config.\n"
        "[Unit]\n"
        "Description=KKUA backup job %i\n"
        f"Documentation={DOCS}\n"
        "Wants=network-online.target\n"
        "After=network-online.target postgresql.service redis-server.service\n"
        + ON_FAILURE + "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={_command(params, 'kkua-backup', 'run', '%i')}\n"
        "Environment=KKUA_BACKUP_RUNNER=timer\n"
        f"# daemon.job_timeout: the same limit the daemon gives a job.\n"
        f"TimeoutStartSec={params.job_timeout}s\n"
        + _service_common(params) + _hardening(params))


def render_run_dropin(params: UnitParams) -> str:
    """The drop-in that makes kkua-backup@run.service run every job (`kkua-backup run all`)."""
    return (
        "# kkua-backup@run.service: `systemctl start kkua-backup@run` runs every job now (kkua-backup run all).\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={_command(params, 'kkua-backup', 'run', 'all')}\n")


def render_daemon_service(params: UnitParams) -> str:
    """kkua-backupd.service: the scheduling daemon (Type=notify, watchdog, reload on SIGHUP)."""
    return (
        "# The KKUA backup daemon: runs the jobs on the [schedule] of its config, each in a worker process.\n"
        "# Use it or the timers (kkua-*-backup.timer), not both: `kkua-backup systemd install --daemon`.\n"
        "[Unit]\n"
        "Description=KKUA backup daemon (PostgreSQL and Redis backups on schedules)\n"
        f"Documentation={DOCS}\n"
        "Wants=network-online.target\n"
        "After=network-online.target postgresql.service redis-server.service\n"
        + ON_FAILURE +
        "# A daemon that keeps failing stops being restarted after 5 tries in 10 minutes (then: systemctl status).\n"
        "StartLimitIntervalSec=10min\n"
        "StartLimitBurst=5\n\n"
        "[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f"ExecStart={_command(params, 'kkua-backupd')}\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "# The daemon pings every 30 s (half of this) from its main loop, which wakes at least that often;\n"
        "# a hung loop is restarted within a minute, and a slow disk or a busy machine cannot stall the loop\n"
        "# that long, since jobs run in worker processes. A longer period would only delay the restart.\n"
        "WatchdogSec=60\n"
        "Restart=on-failure\n"
        "# Exit 2 is an invalid config: restarting cannot fix it, so it is not restarted in a loop.\n"
        "RestartPreventExitStatus=2\n"
        "RestartSec=10s\n"
        "TimeoutStartSec=60s\n"
        + _service_common(params) + _hardening(params)
        + "\n[Install]\nWantedBy=multi-user.target\n")


# A job that fails tells it itself ([notify]); this also tells a run that could not (killed by a timeout, out of
# memory, the watchdog). kkua-backup notify-failure sends nothing twice.
ON_FAILURE = f"OnFailure={FAILURE_UNIT.replace('@.', '@%N.')}\n"


def render_failure_service(params: UnitParams) -> str:
    """kkua-backup-failure@.service: what OnFailure= starts (`%i` = the unit that failed)."""
    return (
        "# Tells the failure of a KKUA backup unit (%i) to [notify]'s URLs with its last journal lines, unless\n"
        "# its job already did. Started by OnFailure= of kkua-backup@.service and kkua-backupd.service.\n"
        "[Unit]\n"
        "Description=Tell the failure of %i (KKUA backup)\n"
        f"Documentation={DOCS}\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={_command(params, 'kkua-backup', 'notify-failure', '%i')}\n"
        "Environment=KKUA_BACKUP_RUNNER=notify\n"
        "# The failed unit's journal lines go into the notice.\n"
        "SupplementaryGroups=systemd-journal\n"
        "TimeoutStartSec=120s\n"
        + _service_common(params) + _hardening(params))


TIMER_TEXT = {"postgres": "PostgreSQL backup", "redis": "Redis backup", "retention": "KKUA backup retention"}


def render_timer(params: UnitParams, job: str) -> str:
    """The timer of one job, its OnCalendar= from [schedule]."""
    return (
        f"# {TIMER_TEXT[job]} on the schedule [schedule] {job} of the config; written by\n"
        "# `kkua-backup systemd install`. Nothing fires on installing or booting: there is no OnBootSec=, and\n"
        "# Persistent= only catches up a run missed since the last one it recorded (none right after install).\n"
        "[Unit]\n"
        f"Description={TIMER_TEXT[job]} ({params.schedules[job]})\n"
        f"Documentation={DOCS}\n\n"
        "[Timer]\n"
        f"OnCalendar={params.schedules[job]}\n"
        f"Persistent={'true' if params.persistent else 'false'}\n"
        f"RandomizedDelaySec={params.randomized_delay}\n"
        "# The same delay every day on one host (not a new one each time): runs stay a fixed time apart.\n"
        "FixedRandomDelay=true\n"
        "# Fire on the second, not within systemd's default minute: `list-timers` and the logs then agree.\n"
        "AccuracySec=1s\n"
        f"Unit=kkua-backup@{job}.service\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n")


def render_sysusers(params: UnitParams) -> str:
    """The sysusers.d entry for the kkua-backup system user (home: backup_dir)."""
    return (f"# /etc/sysusers.d/kkua-backup.conf: the system user the backup jobs run as.\n"
            f'u {USER} - "KKUA backups" {params.backup_dir} /usr/sbin/nologin\n')


def render_tmpfiles(params: UnitParams) -> str:
    """The tmpfiles.d entries for the folders the jobs write (0750, owned by the backup user)."""
    lines = ["# /etc/tmpfiles.d/kkua-backup.conf: the folders the jobs write, 0750, owned by the backup user."]
    folders = [params.backup_dir, params.backup_dir / "postgres", params.backup_dir / "redis", params.state_dir,
               params.log_dir]
    for folder in dict.fromkeys(folders):
        lines.append(f"d {folder} 0750 {USER} {USER} -")
    lines.append(f"d {DEFAULT_CONFIG_PATH.parent} 0750 root {USER} -")
    return "\n".join(lines) + "\n"


def rendered_files(params: UnitParams) -> dict[Path, str]:
    """Every file `systemd install` writes, by path relative to the root."""
    files = {UNIT_DIR / TEMPLATE: render_template_service(params),
             UNIT_DIR / f"{RUN_UNIT}.d" / "run-all.conf": render_run_dropin(params),
             UNIT_DIR / DAEMON: render_daemon_service(params),
             UNIT_DIR / FAILURE_UNIT: render_failure_service(params)}
    for job in JOBS:
        files[UNIT_DIR / TIMERS[job]] = render_timer(params, job)
    files[SYSUSERS_FILE] = render_sysusers(params)
    files[TMPFILES_FILE] = render_tmpfiles(params)
    return files


# ----------------------------------------------------------------------------------------------------
# kkua-backup systemd install|uninstall|status|run


def systemd_command(ctx: JobContext, args: argparse.Namespace, loaded: LoadedConfig) -> Any:
    """Dispatch `kkua-backup systemd ACTION`; returns the result document (or (doc, exit code))."""
    target = Target.from_args(args)
    actions: dict[str, Callable[[], Any]] = {
        "install": lambda: systemd_install(ctx, args, target),
        "uninstall": lambda: systemd_uninstall(ctx, target),
        "status": lambda: systemd_status(ctx),
        "run": lambda: systemd_run(ctx),
    }
    return actions[args.action]()


def systemd_install(ctx: JobContext, args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Write the units, the user and folders, the config if absent; enable the timers or the daemon."""
    config = ctx.config
    if target.live:
        _require_root("`kkua-backup systemd install`")
        require_systemd()
    _check_paths(config)
    install = Installation.current(args)
    params = UnitParams.from_config(config, install.bin_dir, install.config_path, _schedules(config))
    record_path = target.root / RECORD_FILE
    record = Record.load(record_path) or Record()
    record.mode = "daemon" if args.daemon else "timers"
    changed = [str(rel) for rel, text in rendered_files(params).items()
               if _write(target.root, rel, text, record)]
    steps: list[str] = []
    if target.live:
        _run(("systemd-sysusers", str(target.root / SYSUSERS_FILE)))
        _run(("systemd-tmpfiles", "--create", str(target.root / TMPFILES_FILE)))
        steps += ["systemd-sysusers", "systemd-tmpfiles --create"]
    config_note = _install_config(target, install, record)
    _make_dirs(target.root, RECORD_FILE.parent, record, 0o750)
    if str(RECORD_FILE) not in record.files:
        record.files.append(str(RECORD_FILE))
    record.save(record_path)

    wanted = [DAEMON] if args.daemon else [TIMERS[j] for j in JOBS]
    others = [TIMERS[j] for j in JOBS] if args.daemon else [DAEMON]
    if target.live:
        _systemctl("daemon-reload")
        steps.append("systemctl daemon-reload")
        if not args.no_enable:
            # Never both: the daemon and the timers would each run every job.
            _systemctl("disable", "--now", *others)
            if not args.daemon:
                _clean_stale_stamps()
            _systemctl("enable", "--now", *wanted)
            steps += [f"systemctl disable --now {' '.join(others)}", f"systemctl enable --now {' '.join(wanted)}"]
            record.enabled = wanted
            record.save(record_path)
    else:
        steps.append(f"skipped (root is {target.root}, not /): systemd-sysusers, systemd-tmpfiles, chown, "
                     "systemctl daemon-reload/enable")
    warnings = hardening_warnings(config, install, check_access=target.live)
    for warning in warnings:
        _log().warning(warning)
    _say(ctx, f"Installed units in {target.root / UNIT_DIR} (ExecStart= {install.bin_dir}/kkua-backup"
              + (f" --config {install.config_path}" if install.config_path else "") + ").")
    for job in JOBS:
        _say(ctx, f"  {TIMERS[job]}: OnCalendar={params.schedules[job]}")
    if config_note:
        _say(ctx, config_note)
    if target.live and not args.no_enable:
        _say(ctx, f"Enabled and started: {', '.join(wanted)}. Check with `kkua-backup systemd status`.")
    elif args.no_enable:
        _say(ctx, f"Not enabled (--no-enable); enable with: systemctl enable --now {' '.join(wanted)}")
    return {"root": str(target.root), "mode": record.mode, "bin_dir": str(install.bin_dir),
            "config_path": str(install.config_path) if install.config_path else None,
            "schedules": params.schedules, "files": sorted(record.files), "changed": changed,
            "enabled": record.enabled, "steps": steps, "config": config_note, "warnings": warnings}


def _clean_stale_stamps() -> None:
    """Forget the last-run stamps of timers that are not active (left by an earlier install), so that
    Persistent= does not fire a catch-up run just because of this install."""
    for job in JOBS:
        timer = TIMERS[job]
        if not (STAMP_DIR / f"stamp-{timer}").exists():
            continue
        try:
            if _show(timer, ("ActiveState",)).get("ActiveState") == "active":
                continue
            _systemctl("clean", "--what=state", timer)
        except CommandFailed:
            continue  # a stale stamp only means one catch-up run


def example_config() -> Path | None:
    """The shipped config.toml.example: share/kkua-backupd in the environment, or the source tree."""
    for candidate in (Path(sys.prefix) / "share" / "kkua-backupd" / "config.toml.example",
                      Path(__file__).resolve().parents[2] / "packaging" / "config.toml.example"):
        if candidate.is_file():
            return candidate
    return None


def _install_config(target: Target, install: Installation, record: Record) -> str:
    """Install the example as /etc/kkua-backup/config.toml (0640 root:kkua-backup) when there is none."""
    if install.config_path is not None:
        return f"Config: {install.config_path} (given with --config; baked into ExecStart=)."
    path = target.root / CONFIG_FILE
    if path.exists():
        return f"Config: {path} exists and was left alone."
    example = example_config()
    if example is None:
        return (f"Config: {path} does not exist and no example is shipped with this installation; write it "
                "(docs/configuration.md) before the first run.")
    _make_dirs(target.root, CONFIG_FILE.parent, record, 0o750)  # live, systemd-tmpfiles made it already
    write_atomic(path, example.read_bytes(), 0o640)
    if target.live:
        os.chown(path, 0, grp.getgrnam(USER).gr_gid)
    # The config is the operator's from now on: uninstall never removes it, so it is not recorded.
    return f"Config: installed the example as {path} (0640 root:{USER}); edit it, then `kkua-backup config check`."


def systemd_uninstall(ctx: JobContext, target: Target) -> dict[str, Any]:
    """Stop and disable what install enabled, remove exactly the files and folders it created."""
    if target.live:
        _require_root("`kkua-backup systemd uninstall`")
        require_systemd()
    record_path = target.root / RECORD_FILE
    record = Record.load(record_path)
    if record is None:
        _say(ctx, f"Nothing to remove: no install record at {record_path}.")
        return {"root": str(target.root), "removed": [], "note": "no install record"}
    steps: list[str] = []
    # Only units whose files are still there: systemctl refuses to disable a unit it cannot find.
    units = [u for u in (DAEMON, *(TIMERS[j] for j in JOBS))
             if str(UNIT_DIR / u) in record.files and (target.root / UNIT_DIR / u).exists()]
    if target.live:
        if units:
            _systemctl("disable", "--now", *units)
            steps.append(f"systemctl disable --now {' '.join(units)}")
        _systemctl("stop", "kkua-backup@*.service")  # a pattern: no error when none is loaded
        steps.append("systemctl stop kkua-backup@*.service")
        for job in JOBS:  # forget the timers' stamps, so a later install does not fire a catch-up run
            if (STAMP_DIR / f"stamp-{TIMERS[job]}").exists():
                with contextlib.suppress(CommandFailed):
                    _systemctl("clean", "--what=state", TIMERS[job])
        with contextlib.suppress(CommandFailed):
            _systemctl("reset-failed", "kkua-backup*")
    # Only paths install can write: a damaged or edited record must not make this delete anything else.
    known = {str(rel) for rel in rendered_files(UnitParams())} | {str(RECORD_FILE)}
    known_dirs = {str(parent) for rel in known for parent in Path(rel).parents if parent != Path(".")}
    strange = sorted((set(record.files) - known) | (set(record.dirs) - known_dirs))
    if strange:
        _log().warning(f"install record {record_path} names paths install never writes; left alone: "
                       f"{', '.join(strange)}")
    removed: list[str] = []
    for rel in sorted(set(record.files) & known, key=lambda r: r == str(RECORD_FILE)):
        path = target.root / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(rel)
    for rel in sorted(set(record.dirs) & known_dirs, key=lambda r: -len(Path(r).parts)):
        try:
            (target.root / rel).rmdir()
            removed.append(rel + "/")
        except OSError:
            continue  # not empty: something else lives there now, so it stays
    if target.live:
        _systemctl("daemon-reload")
        steps.append("systemctl daemon-reload")
    else:
        steps.append(f"skipped (root is {target.root}, not /): systemctl disable/stop/daemon-reload")
    _say(ctx, f"Removed {len(removed)} file(s) and folder(s) that install created; the config, backups, "
              f"logs and the {USER} user were left alone.")
    for rel in removed:
        _say(ctx, f"  {target.root / rel}")
    return {"root": str(target.root), "removed": removed, "steps": steps}


def systemd_status(ctx: JobContext) -> dict[str, Any]:
    """The timers' next runs, the last results of the jobs, and the daemon's state."""
    require_systemd()
    timers: dict[str, Any] = {}
    for job in JOBS:
        t = _show(TIMERS[job], ("UnitFileState", "ActiveState", "NextElapseUSecRealtime", "LastTriggerUSec"))
        s = _show(f"kkua-backup@{job}.service", ("ActiveState", "Result", "ExecMainStatus",
                                                 "ExecMainStartTimestamp", "ExecMainExitTimestamp"))
        timers[job] = {"timer": TIMERS[job], "enabled": t.get("UnitFileState"), "active": t.get("ActiveState"),
                       "next_run": t.get("NextElapseUSecRealtime") or None,
                       "last_trigger": t.get("LastTriggerUSec") or None,
                       "last_result": s.get("Result"), "last_exit_status": s.get("ExecMainStatus"),
                       "last_start": s.get("ExecMainStartTimestamp") or None,
                       "last_end": s.get("ExecMainExitTimestamp") or None}
    d = _show(DAEMON, ("UnitFileState", "ActiveState", "SubState", "StatusText", "Result"))
    daemon = {"enabled": d.get("UnitFileState"), "active": d.get("ActiveState"), "sub": d.get("SubState"),
              "status": d.get("StatusText") or None, "result": d.get("Result")}
    # The last run by any runner (timer, daemon, cron, a person), from the state file the jobs keep.
    try:
        jobs = state.status_report(ctx.config)["jobs"]
    except (KkuaError, OSError) as exc:
        _log().warning(f"last runs unknown: {exc}")
        jobs = {}
    _say(ctx, f"{'JOB':<10} {'TIMER':<28} {'STATE':<18} {'NEXT RUN (timer)':<28} LAST RUN (any runner)")
    for job, info in timers.items():
        unit_state = f"{info['enabled']}/{info['active']}"
        run = jobs.get(job, {})
        info["last_run"] = {k: run.get(k) for k in ("last_run", "last_end", "last_result", "runner", "size")}
        last = (f"{run['last_result']} {run.get('last_end') or run.get('last_run')} by {run.get('runner')}"
                if run.get("last_result") else "never ran")
        _say(ctx, f"{job:<10} {info['timer']:<28} {unit_state:<18} {info['next_run'] or '-':<28} {last}")
    _say(ctx, f"daemon     {DAEMON:<28} {daemon['enabled']}/{daemon['active']}"
              + (f"  {daemon['status']}" if daemon["status"] else ""))
    return {"timers": timers, "daemon": daemon}


def _journal_tail(unit: str, since: float, count: int = 20, wait: float = 5.0) -> list[str]:
    """The last lines `unit` logged since the wall-clock time `since` (a unit that ended well is
    unloaded at once, taking its InvocationID along). journald stores a stream's last lines a moment
    after the process ends, so this polls until two reads agree (or `wait` seconds pass)."""
    if shutil.which("journalctl") is None:
        return []
    deadline = time.monotonic() + wait
    previous: list[str] | None = None
    while True:
        try:
            lines = _run(("journalctl", "-u", unit, f"--since=@{int(since)}", "-n", str(count), "--no-pager",
                          "-o", "cat"), timeout=30).splitlines()
        except CommandFailed:
            return previous or []
        if (lines and lines == previous) or time.monotonic() > deadline:
            return lines
        previous = lines
        time.sleep(0.3)


def systemd_run(ctx: JobContext) -> tuple[dict[str, Any], int]:
    """`systemctl start kkua-backup@run.service` (waits: oneshot), then its result and journal lines."""
    require_systemd()
    _require_root("`kkua-backup systemd run`")
    started = time.monotonic()
    since = time.time()
    error: str | None = None
    try:
        _run(("systemctl", "start", RUN_UNIT), timeout=ctx.config.daemon.job_timeout + STOP_MARGIN * 4)
    except CommandFailed as exc:
        error = str(exc)
    info = _show(RUN_UNIT, ("Result", "ExecMainStatus"))
    lines = _journal_tail(RUN_UNIT, since)
    ok = error is None and info.get("Result") == "success"
    seconds = round(time.monotonic() - started, 1)
    _say(ctx, f"{RUN_UNIT}: {'succeeded' if ok else 'FAILED'} in {seconds} s (result {info.get('Result')}, "
              f"exit status {info.get('ExecMainStatus')})")
    for line in lines:
        _say(ctx, f"  {line}")
    if not ok:
        _log().error(f"{RUN_UNIT} failed (result {info.get('Result')}); "
                      f"see journalctl -u {RUN_UNIT} and kkua-backup status")
    return ({"unit": RUN_UNIT, "ok": ok, "result": info.get("Result"), "exit_status": info.get("ExecMainStatus"),
             "seconds": seconds, "journal": lines, "error": error}, 0 if ok else 1)
