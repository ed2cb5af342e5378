#!/usr/bin/env python3
"""What `kkua-backup` costs before it does any work: start-up of the commands that only print, and a
whole `backup postgres` of a tiny database against `pg_dump -Fc -Z0 > /dev/null` of the same database.

Run from the repository root:

    .venv/bin/python bench/startup.py [--repeat 10] [--before DIR] [--json FILE]

`--before DIR` also measures the package in DIR (another commit's kkua_backupd/, e.g. from
`git archive main kkua_backupd | tar -x -C DIR`), put first on PYTHONPATH, interleaved with this
checkout's, so both are timed under the same load. Every measurement runs `--repeat` times,
interleaved; the table shows the best and the median wall time. The interpreter's own start
(`python -c pass`, site and the venv's editable-install hook included) and `pg_dump -Fc -Z0 >/dev/null`
of the same database are measured too, so what the package adds can be read off.

It starts its own throwaway PostgreSQL server (never the one on 5432) with a tiny sample database.
The server and all temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds redis.py: keep it from shadowing redis-py (see pg_backup.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data  # noqa: E402

DBNAME = "kkua_startup"
# The console script's own entry point (pyproject.toml [project.scripts]: kkua_backupd.cli:run).
ENTRY = "import sys; sys.argv[0] = 'kkua-backup'; from kkua_backupd.cli import run; run()"


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def timed(argv: list[str], env: dict[str, str], cwd: Path, *, ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Run argv to completion: its wall time and the CPU time (user + system) of the process and its children
    (pg_dump, for a backup), which the machine's load distorts less than the wall time."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            err.seek(0)
            raise RuntimeError(f"{argv[-3:]} exited {proc.returncode}: {err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def write_config(workdir: Path, server: ThrowawayPostgres) -> Path:
    pass_file = workdir / "pg.pass"
    pass_file.write_text(server.password + "\n")
    pass_file.chmod(0o600)
    backup_dir, log_dir = workdir / "backups", workdir / "logs"
    lines = [f'backup_dir = "{backup_dir}"', f'log_dir = "{log_dir}"', "", "[postgres]",
             f'host = "{server.host}"', f"port = {server.port}", f'database = "{DBNAME}"',
             f'user = "{server.user}"', f'password_file = "{pass_file}"', "test_restore = false",
             'format = "custom"', 'compression = "zstd"']
    path = workdir / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--before", type=Path, default=None,
                        help="also measure the kkua_backupd/ in this folder (another commit), interleaved")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    codes = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONDONTWRITEBYTECODE", "PGPASSWORD", "KKUA_BACKUP_CONFIG", "JOURNAL_STREAM",
                             "NOTIFY_SOCKET", "TEST_RESTORE", "PYTHONPATH") and not k.startswith("DATABASE_")}
    envs: dict[str, dict[str, str]] = {}
    for label, code in codes.items():
        # As installed: pip compiles the bytecode at install time (see pg_backup.py's as_installed).
        compileall.compile_dir(str(code / "kkua_backupd"), quiet=1)
        envs[label] = dict(base_env, PYTHONPATH=str(code))
    with tempfile.TemporaryDirectory(prefix="kkua-startup-") as tmp:
        workdir = Path(tmp)
        server = ThrowawayPostgres()  # under /tmp: initdb runs as postgres and must reach it
        try:
            server.start()
            with server.connect() as conn:
                conn.autocommit = True
                conn.execute(f"CREATE DATABASE {DBNAME}")
            with server.connect(DBNAME) as conn:
                create_sample_data(conn)
            config = str(write_config(workdir, server))
            py = sys.executable
            ours = [py, "-c", ENTRY]
            pg_dump = "pg_dump -Fc -Z0 >/dev/null"
            commands: dict[str, list[str]] = {
                "--help": [*ours, "--help"],
                "--version": [*ours, "--version"],
                "status": [*ours, "--config", config, "status"],
                "list": [*ours, "--config", config, "list"],
                "config check": [*ours, "--config", config, "config", "check"],
                "backup postgres": [*ours, "--config", config, "backup", "postgres"],
            }
            cases: dict[tuple[str, str], tuple[list[str], dict[str, str]]] = {
                ("python -c pass", ""): ([py, "-c", "pass"], base_env),
                (pg_dump, ""): ([str(server.bin_dir / "pg_dump"), "-Fc", "-Z0", "-h", server.host, "-p",
                                 str(server.port), "-U", server.user, "-d", DBNAME],
                                dict(base_env, PGPASSWORD=server.password)),
            }
            for name, argv in commands.items():
                for label in codes:
                    cases[(name, label)] = (argv, envs[label])
            for label in codes:  # not timed: the first backup creates the folders and the state file, and
                timed(commands["backup postgres"], envs[label], workdir)  # the first status the record it reads
                timed(commands["status"], envs[label], workdir, ok=(0, 1))
            walls: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
            cpus: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
            for rep in range(args.repeat):
                log(f"round {rep + 1}/{args.repeat}")
                for key, (argv, env) in cases.items():
                    # status exits 1 while a job (redis, retention) has never run: an answer, not a failure
                    ok = (0, 1) if key[0] == "status" else (0,)
                    wall, cpu = timed(argv, env, workdir, ok=ok)
                    walls[key].append(wall)
                    cpus[key].append(cpu)
        finally:
            server.destroy()
    rows = {key: {"best": min(w), "median": statistics.median(w), "cpu_median": statistics.median(cpus[key])}
            for key, w in walls.items()}
    print(f"repeat: {args.repeat}  load average at the end: {os.getloadavg()[0]:.2f}  "
          + "  ".join(f"{label}: {code}" for label, code in codes.items()))
    print(f"{'measurement':30} {'code':7} {'best s':>8} {'median s':>9} {'cpu s (median)':>15}")
    for (name, label), row in rows.items():
        print(f"{name:30} {label:7} {row['best']:8.3f} {row['median']:9.3f} {row['cpu_median']:15.3f}")
    summary: dict[str, Any] = {}
    for label in codes:
        backup = rows[("backup postgres", label)]
        summary[label] = {"backup_minus_pg_dump_median": backup["median"] - rows[(pg_dump, "")]["median"],
                          "backup_minus_pg_dump_best": backup["best"] - rows[(pg_dump, "")]["best"]}
        print(f"{label}: backup postgres - pg_dump alone: median {summary[label]['backup_minus_pg_dump_median']:.3f} s,"
              f" best {summary[label]['backup_minus_pg_dump_best']:.3f} s")
    if "before" in codes:
        for name in commands:
            ratio = rows[(name, "after")]["median"] / rows[(name, "before")]["median"]
            cpu_ratio = rows[(name, "after")]["cpu_median"] / rows[(name, "before")]["cpu_median"]
            summary.setdefault("after_over_before_median", {})[name] = round(ratio, 3)
            summary.setdefault("after_over_before_cpu", {})[name] = round(cpu_ratio, 3)
            print(f"{name:30} after/before: wall (median) {ratio:.2f}, cpu (median) {cpu_ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "codes": {k: str(v) for k, v in codes.items()},
                                         "rows": [{"measurement": n, "code": c, **r} for (n, c), r in rows.items()],
                                         "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
