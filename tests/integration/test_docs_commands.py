"""Every `kkua-backup` command shown in README.md, README.ko.md and docs/ runs, as written, against a
throwaway config (a real PostgreSQL with the sample data and a real redis-server), so the docs cannot drift
from the command line: none may be refused as bad usage (exit 2) or crash; the read-only and backup
commands must succeed. Example ids and file names (`20240115_020000`, `kkua_backup_..._020000.sql.gz`) are
replaced by the newest real set of that kind; installers get `--root` into a temp folder, and the key
commands' `--out /etc/kkua-backup/...` a file of the same name in a temp folder. The remote the
docs call `offsite` is a real S3 server (`rclone serve s3`, tests/support/remotes.py), in the config of the
commands that name a remote, whose backup folder holds the sets of one `backup all` (each backup of the
others would push too, and pushing every set of theirs takes minutes on a loaded machine). `check` exits with
the Nagios code of exactly the checks a throwaway setup cannot pass. The failure message lists each command
that failed with its file and line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data
from kkua_backupd.sources.redis.local import LocalRedis

from ..conftest import REDIS_TEST_PASSWORD, _toml
from ..support.doc_commands import commands
from ..support.remotes import RcloneS3

# Not run here, with the reason: they act on this machine's systemd or crontab (the system tests run them).
NOT_RUN = {("systemd", "run"): "starts units of this machine's systemd (tests/system/test_systemd.py)",
           ("systemd", "status"): "asks this machine's systemd (tests/system/test_systemd.py)",
           ("cron", "install", "--user"): "would change this machine's root crontab"}
WITH_ROOT = {("systemd", "install"), ("systemd", "uninstall"), ("cron", "install"), ("cron", "uninstall"),
             ("cron", "status"), ("cron", "test")}
# Documented as working on a healthy setup: these must exit 0 here.
MUST_SUCCEED = re.compile(r"^(--version|(--json )?config check|list\b|status$|verify (latest|all)$|"
                          r"prune --dry-run|backup (postgres|redis|all)\b|run (postgres|redis|all)$|push$|"
                          r"verify --remote offsite( --download)?$|key (generate|signing-key) --out)")
# `check` on this throwaway setup: the checks it cannot pass, with their level and why; every other check
# must be OK, and the exit code must be the Nagios code of the worst of these (docs/monitoring.md).
CHECK_NOT_OK = {"installed": ("WARN", "no timer, daemon or cron block runs the jobs of this throwaway config"),
                "retention.last-run": ("WARN", "the README's `check` comes before any documented `run retention`")}
CHECK_EXIT = {"OK": 0, "WARN": 1, "FAIL": 2, "UNKNOWN": 3}
CHECK_RANK = ["OK", "WARN", "UNKNOWN", "FAIL"]  # a failure outranks an unknown, which outranks a warning
SYNOPSIS = re.compile(r"[\[\]<>|]|\.\.\.|\bFILE\b|\bNAME\b|\bREMOTE\b|\bN\b")
EXAMPLE_ID = re.compile(r"\d{8}_\d{6}")
EXAMPLE_FILE = re.compile(r"^(kkua_backup_|redis_backup_|safety_backup_before_restore_)\d{8}_\d{6}(\..+)$")
# Documented commands that need a config key the throwaway config leaves out on purpose (a file-mode
# Redis restore stops and starts the server: not this test's shared redis-server): they must be refused as
# a config error naming that key.
NEEDS_KEY = {"--mode file": "redis.stop_command"}


def test_every_documented_command_runs(pg_server: ThrowawayPostgres, tmp_path: Path) -> None:
    documented = commands()
    assert len(documented) >= 60, f"only {len(documented)} commands found in the docs: is the parser broken?"
    database = f"kkua_docs_{os.getpid()}"
    pg_server.create_database(database)
    with pg_server.connect(database) as conn:
        create_sample_data(conn)
    (tmp_path / "pg.pass").write_text(pg_server.password + "\n")
    (tmp_path / "redis.pass").write_text(REDIS_TEST_PASSWORD + "\n")
    for name in ("pg.pass", "redis.pass"):
        (tmp_path / name).chmod(0o600)
    s3 = RcloneS3(tmp_path / "s3")
    with LocalRedis(tmp_path / "redis", password=REDIS_TEST_PASSWORD, settings={"appendonly": "yes"}) as redis_server, \
            s3:
        redis_server.client(0).set("session:1", "value")
        config = tmp_path / "config.toml"
        sections = {
            "postgres": {"host": "127.0.0.1", "port": pg_server.port, "database": database, "user": "postgres",
                         "password_file": str(tmp_path / "pg.pass")},
            "redis": {"host": "127.0.0.1", "port": redis_server.port,
                      "password_file": str(tmp_path / "redis.pass")},
        }
        lines = [f'backup_dir = "{tmp_path}/backups"', f'log_dir = "{tmp_path}/logs"']
        for section, keys in sections.items():
            lines += ["", f"[{section}]"] + [f"{key} = {_toml(value)}" for key, value in keys.items()]
        config.write_text("\n".join(lines) + "\n")
        with_remote = tmp_path / "with-remote.toml"
        with_remote.write_text(config.read_text().replace(f'"{tmp_path}/backups"', f'"{tmp_path}/remote-backups"')
                               + s3.remote_toml("offsite", tmp_path))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DATABASE_", "REDIS_", "BACKUP_", "FORCE_", "TEST_", "JOURNAL_"))}
        env.update({"KKUA_BACKUP_CONFIG": str(config), "KKUA_NO_PROGRESS": "1"})

        def kkua(args: list[str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "kkua_backupd", *args], input="", capture_output=True,
                                  text=True, timeout=300, env={**env, **(extra or {})}, check=False)

        # Sets, an AOF and safety backups for the examples to name.
        for setup in (["backup", "all"], ["backup", "redis", "--aof"], ["restore", "postgres", "latest", "--force"],
                      ["restore", "redis", "latest", "--force", "--flush"]):
            done = kkua(setup)
            assert done.returncode == 0, (setup, done.stdout + done.stderr)
        pushed = kkua(["backup", "all"], {"KKUA_BACKUP_CONFIG": str(with_remote)})
        assert pushed.returncode == 0 and s3.objects(), pushed.stdout + pushed.stderr
        problems: list[str] = []
        ran: set[tuple[tuple[str, str], ...] | tuple[str, ...]] = set()
        for command in documented:
            words = " ".join(command.args)
            if SYNOPSIS.search(words) or command.args[:3] in NOT_RUN or command.args[:2] in NOT_RUN:
                continue
            args = _real_names(list(command.args), tmp_path / "backups")
            if tuple(args[:2]) in WITH_ROOT:
                args += ["--root", str(tmp_path / "root")]
            if "--out" in args[:-1]:  # `key generate --out /etc/kkua-backup/age.key`: never this machine's /etc
                (tmp_path / "keys").mkdir(exist_ok=True)
                args[args.index("--out") + 1] = str(tmp_path / "keys" / Path(args[args.index("--out") + 1]).name)
            key = (*command.env, *args)
            if key in ran:
                continue
            ran.add(key)
            remote = args[0] == "push" or "--remote" in args or "--from" in args
            result = kkua(args, dict(command.env) | ({"KKUA_BACKUP_CONFIG": str(with_remote)} if remote else {}))
            output = result.stdout + result.stderr
            needed = next((key for flag, key in NEEDS_KEY.items() if flag in words), None)
            if needed and result.returncode == 2 and needed in output:
                continue
            if args in (["check"], ["--json", "check"]):
                problems += _check_problems(command, result, kkua(["--json", "check"]))
                continue
            if result.returncode == 2 or "Traceback" in output or \
                    (MUST_SUCCEED.match(words) and result.returncode != 0):
                problems.append(f"{command} -> exit {result.returncode}: {output.strip()[-400:]}")
        assert len(ran) >= 40
        assert {("check",), ("push",), ("list", "--remote", "offsite")} <= ran, ran
        assert problems == [], "documented commands that do not work:\n" + "\n".join(problems)


def _check_problems(command: object, result: subprocess.CompletedProcess[str],
                    as_json: subprocess.CompletedProcess[str]) -> list[str]:
    """What is wrong with a documented `check` run: a check other than CHECK_NOT_OK's that is not OK, one
    of those at another level, or an exit code that is not the Nagios code of the worst level."""
    if "Traceback" in result.stdout + result.stderr:
        return [f"{command} -> crashed: {(result.stdout + result.stderr)[-400:]}"]
    levels = {item["name"]: item["level"] for item in json.loads(as_json.stdout)["checks"]}
    wrong = {name: level for name, level in levels.items()
             if level != CHECK_NOT_OK.get(name, ("OK", ""))[0]}
    worst = max((level for level, _ in CHECK_NOT_OK.values()), key=CHECK_RANK.index)
    expected = CHECK_EXIT[worst]
    if wrong or result.returncode != expected or as_json.returncode != expected:
        return [f"{command} -> exit {result.returncode} (json: {as_json.returncode}), expected {expected}; "
                f"checks not at their expected level: {wrong}: {result.stdout.strip()[-600:]}"]
    return []


def _real_names(args: list[str], backups: Path) -> list[str]:
    """`args` with example file names replaced by the newest real file of the same prefix and extension,
    and example set ids by the newest set of the kind the command names."""
    kind = "redis" if "redis" in args else "postgres"
    real = []
    for arg in args:
        example = EXAMPLE_FILE.match(arg)
        if example:
            prefix, suffix = example.groups()
            found = sorted(p.name for p in (backups / kind).glob(f"{prefix}*{suffix}")
                           if EXAMPLE_FILE.match(p.name))
            real.append(found[-1] if found else arg)
            continue
        sets = sorted((backups / kind).glob("*_backup_*.manifest.json"))
        newest = EXAMPLE_ID.search(sets[-1].name) if sets else None
        real.append(EXAMPLE_ID.sub(newest.group(0), arg) if newest else arg)
    return real
