#!/usr/bin/env python3
"""Benchmark what encryption costs a backup: `kkua-backup backup postgres` without encryption, with age and
with gpg, on the same database, interleaved.

Run from the repository root:

    .venv/bin/python bench/encryption.py [--size-mb 200] [--repeat 3] [--compression gzip]

It starts its own throwaway PostgreSQL server (never the machine's server on 5432), fills a database with
`fill_bulk` rows, then runs the real CLI `--repeat` times per variant, in turn, and prints the MEDIAN wall time,
the cost against the unencrypted backup, the file size, and the peak RSS of the largest process of the run
(the CLI or one of its children, from wait4). The goal (issue 12): encryption costs at most 10 % of the time.
Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# bench/ itself is first on sys.path when run as a script: its redis.py would hide the redis package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kkua_backupd.demo.sandbox import ThrowawayPostgres  # noqa: E402
from kkua_backupd.stream.encrypt import generate_identity  # noqa: E402
from tests.support.pg_bulk import fill_bulk  # noqa: E402

DBNAME = "bench_crypt"
VARIANTS = ("none", "age", "gpg")


def write_config(work: Path, server: ThrowawayPostgres, variant: str, compression: str) -> Path:
    """The config of one variant; each has its own backup folder."""
    lines = [f'backup_dir = "{work / variant}"', f'log_dir = "{work / "logs"}"', "", "[postgres]",
             'host = "127.0.0.1"', f"port = {server.port}", f'database = "{DBNAME}"', 'user = "postgres"',
             f'password_file = "{work / "pg.pass"}"', f'compression = "{compression}"']
    if variant == "age":
        lines += ["", "[encryption]", 'method = "age"', f'recipients = ["{(work / "recipient").read_text().strip()}"]',
                  f'signing_key_file = "{work / "signing.key"}"']
    elif variant == "gpg":
        lines += ["", "[encryption]", 'method = "gpg"', f'passphrase_file = "{work / "gpg.pass"}"',
                  f'signing_key_file = "{work / "signing.key"}"']
    path = work / f"{variant}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def secret(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def run_backup(config: Path) -> dict[str, Any]:
    """One `kkua-backup --json backup postgres`: wall seconds, peak RSS (KiB) and the file's size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    env["KKUA_BACKUP_CONFIG"] = str(config)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "kkua_backupd", "--json", "backup", "postgres"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"backup failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    manifest = json.loads(stdout)
    return {"wall": wall, "size": manifest["files"][0]["size"], "name": manifest["files"][0]["name"],
            "rss_kb": rusage.ru_maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200, help="size of the bulk table (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kkua-bench-crypt-"))
    try:
        with ThrowawayPostgres() as server:
            server.create_database(DBNAME)
            with server.connect(DBNAME) as conn:
                fill_bulk(conn, args.size_mb)
                conn.execute("VACUUM (FREEZE, ANALYZE)")
                db_bytes = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
            secret(work / "pg.pass", server.password + "\n")
            secret(work / "gpg.pass", "bench passphrase\n")
            secret(work / "signing.key", os.urandom(32).hex() + "\n")
            (work / "recipient").write_text(generate_identity()[1] + "\n")
            configs = {v: write_config(work, server, v, args.compression) for v in VARIANTS}
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            run_backup(configs["none"])  # warm the caches once, not measured
            for _ in range(args.repeat):
                for variant in VARIANTS:
                    with server.connect(DBNAME) as conn:
                        conn.execute("CHECKPOINT")
                    runs[variant].append(run_backup(configs[variant]))
        base = statistics.median(r["wall"] for r in runs["none"])
        print(f"database {db_bytes / 1e6:.0f} MB, compression {args.compression}, {args.repeat} runs each, "
              f"{os.cpu_count()} CPUs")
        print(f"{'variant':8} {'median s':>9} {'cost':>7} {'file MB':>8} {'peak RSS MB':>12}  runs (s)")
        for variant in VARIANTS:
            walls = [r["wall"] for r in runs[variant]]
            median = statistics.median(walls)
            rss = max(r["rss_kb"] for r in runs[variant]) / 1024
            cost = "" if variant == "none" else f"{(median / base - 1) * 100:+.1f}%"
            print(f"{variant:8} {median:9.2f} {cost:>7} {runs[variant][0]['size'] / 1e6:8.1f} {rss:12.0f}  "
                  + " ".join(f"{w:.2f}" for w in walls))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
