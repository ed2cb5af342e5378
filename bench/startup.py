#!/usr/bin/env python3
"""What `kkua-backup` costs before it does any work: start-up of the commands that only print, and a
whole `backup postgres` of a tiny database against `pg_dump -Fc -Z0 > /dev/null` of the same database.

Run from the repository root:

    .venv/bin/python bench/startup.py [--repeat 10] [--code DIR] [--json FILE]

`--code DIR` measures the package in DIR instead (a checkout of another commit, `git worktree add`):
it goes first on PYTHONPATH, so `before` and `after` are timed by the same script in the same run.
Every measurement runs `--repeat` times, interleaved; the table shows the best and the median wall
time. The interpreter's own start (`python -c pass`, site and the venv's editable-install hook
included) is measured too, so what the package adds can be read off.

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


def timed(argv: list[str], env: dict[str, str], cwd: Path, *, ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - started
    if proc.returncode not in ok:
        raise RuntimeError(f"{argv[-3:]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return wall


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
    parser.add_argument("--code", type=Path, default=ROOT, help="the folder holding kkua_backupd/ to measure")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    code = args.code.resolve()
    # As installed: pip compiles the bytecode at install time (see pg_backup.py's as_installed).
    compileall.compile_dir(str(code / "kkua_backupd"), quiet=1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PGPASSWORD", "KKUA_BACKUP_CONFIG", "JOURNAL_STREAM",
                        "NOTIFY_SOCKET", "TEST_RESTORE") and not k.startswith("DATABASE_")}
    env["PYTHONPATH"] = str(code)
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
            pg_env = dict(env, PGPASSWORD=server.password)
            cases: dict[str, list[str]] = {
                "python -c pass": [py, "-c", "pass"],
                "--help": [*ours, "--help"],
                "--version": [*ours, "--version"],
                "status": [*ours, "--config", config, "status"],
                "list": [*ours, "--config", config, "list"],
                "config check": [*ours, "--config", config, "config", "check"],
                "backup postgres": [*ours, "--config", config, "backup", "postgres"],
                "pg_dump -Fc -Z0 >/dev/null": [str(server.bin_dir / "pg_dump"), "-Fc", "-Z0", "-h", server.host,
                                               "-p", str(server.port), "-U", server.user, "-d", DBNAME],
            }
            timed(cases["backup postgres"], env, workdir)
            walls: dict[str, list[float]] = {name: [] for name in cases}
            for rep in range(args.repeat):
                log(f"round {rep + 1}/{args.repeat}")
                for name, argv in cases.items():
                    # status exits 1 while a job (redis, retention) has never run: an answer, not a failure
                    ok = (0, 1) if name == "status" else (0,)
                    walls[name].append(timed(argv, pg_env if name.startswith("pg_dump") else env, workdir, ok=ok))
        finally:
            server.destroy()
    rows = {name: {"best": min(w), "median": statistics.median(w)} for name, w in walls.items()}
    base = rows["python -c pass"]["median"]
    print(f"code: {code}  repeat: {args.repeat}  load average: {os.getloadavg()[0]:.2f}")
    print(f"{'measurement':30} {'best s':>8} {'median s':>9} {'median - python s':>18}")
    for name, row in rows.items():
        print(f"{name:30} {row['best']:8.3f} {row['median']:9.3f} {row['median'] - base:18.3f}")
    overhead = rows["backup postgres"]["median"] - rows["pg_dump -Fc -Z0 >/dev/null"]["median"]
    print(f"backup postgres - pg_dump alone (median): {overhead:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"code": str(code), "repeat": args.repeat, "rows": rows,
                                         "backup_overhead": overhead}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
