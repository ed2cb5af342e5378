#!/usr/bin/env python3
"""Benchmark the PostgreSQL directory format (pg_dump -Fd -j N, pg_restore -j N) on a 12-table database.

Run from the repository root:

    .venv/bin/python bench/pg_parallel.py [--size-mb 1000] [--repeat 3] [--jobs 2] [--before DIR]

It starts its own throwaway PostgreSQL server (never the machine's server on 5432) and builds the database
`kkua_bench` of 12 tables: `users` and 11 tables that reference it (and some each other) by foreign keys,
with ids, md5-like text, jsonb and timestamps, and indexes on the keys and times; the rows are spread
unevenly over the tables, as in a real application. Then it times, interleaved, `--repeat` times each:

* backup: ours with `format = "directory"`, `dump_jobs = --jobs` (zstd), ours with the custom format (zstd,
  one pg_dump), against a single `pg_dump -Fc -f FILE` (pg_dump's own compression) and, for reference,
  `pg_dump -Fd -j N -f DIR`;
* restore into a new database: ours of the directory set, of the custom set and of a plain set (its rows
  shared over the connections, decision 0026) with `restore_jobs = --jobs`, against the guide's
  `gunzip -c FILE | psql` of `pg_dump | gzip`'s file and against `pg_restore -j N -d NEW` of pg_dump's own
  custom file.

It prints the median wall times, the ratios, and the peak RSS of our CLI process alone (the measuring code is
bench/pg_backup.py's: `Bench.our_cli`, `Bench.tool`). The server and all temporary files are removed at the
end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds redis.py, which would hide redis-py (see bench/pg_backup.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from psycopg import sql  # noqa: E402

from bench.pg_backup import DBNAME, MIB, Bench, Run, log  # noqa: E402
from kkua_backupd.demo.sandbox import ThrowawayPostgres  # noqa: E402

TABLES = ("users", "sessions", "games", "game_rounds", "words", "chat_messages", "scores", "friendships",
          "purchases", "achievements", "reports", "audit_log")
# Share of the rows each table gets: a few big tables, several small ones.
WEIGHTS = (4, 10, 8, 14, 3, 18, 12, 4, 6, 3, 2, 16)
BYTES_PER_ROW = 330  # about what one row costs with its indexes (measured, then the size is reported)
TARGET_RESTORE_VS_GUIDE = 1.5


def build_database(server: ThrowawayPostgres, size_mb: int) -> dict[str, Any]:
    """The 12 tables, filled server-side to about `size_mb` MB, then their keys, indexes and statistics."""
    started = time.monotonic()
    total_rows = size_mb * MIB // BYTES_PER_ROW
    rows = {t: max(1000, total_rows * w // sum(WEIGHTS)) for t, w in zip(TABLES, WEIGHTS, strict=True)}
    users = rows["users"]
    with server.connect(DBNAME) as conn:
        conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name_hash text NOT NULL, "
                     "profile jsonb NOT NULL, created_at timestamptz NOT NULL)")
        conn.execute(sql.SQL(
            "INSERT INTO users SELECT g, 'user' || g || '@example.com', md5(g::text), "
            "jsonb_build_object('level', g % 50, 'lang', (ARRAY['ko','en','ja'])[1 + g % 3], 'tags', "
            "jsonb_build_array(md5((g * 7)::text), g % 11)), "
            "timestamptz '2024-01-01' + g * interval '17 seconds' FROM generate_series(1::bigint, {}) g").format(
                sql.Literal(users)))
        for table in TABLES[1:]:
            conn.execute(sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, user_id bigint NOT NULL, token text NOT NULL, "
                "payload jsonb NOT NULL, amount numeric(12,2), created_at timestamptz NOT NULL)").format(
                    sql.Identifier(table)))
            conn.execute(sql.SQL(
                "INSERT INTO {} SELECT g, 1 + (g * 7919) % {}, md5(g::text || {}), "
                "jsonb_build_object('k', md5((g % 997)::text), 'n', g % 1000, 'ok', g % 2 = 0, "
                "'at', (timestamptz '2024-06-01' + g * interval '3 seconds')::text), (g % 100000) / 100.0, "
                "timestamptz '2024-06-01' + g * interval '3 seconds' FROM generate_series(1::bigint, {}) g").format(
                    sql.Identifier(table), sql.Literal(users), sql.Literal(table), sql.Literal(rows[table])))
        for table in TABLES[1:]:
            conn.execute(sql.SQL("ALTER TABLE {} ADD FOREIGN KEY (user_id) REFERENCES users (id)").format(
                sql.Identifier(table)))
            conn.execute(sql.SQL("CREATE INDEX ON {} (user_id)").format(sql.Identifier(table)))
            conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(sql.Identifier(table)))
        conn.execute("CREATE UNIQUE INDEX ON users (email)")
        conn.execute("CREATE INDEX ON chat_messages USING btree (token)")
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        size = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
    info = {"target_mb": size_mb, "database_bytes": size, "rows": sum(rows.values()), "tables": len(TABLES),
            "fill_seconds": round(time.monotonic() - started, 1)}
    log(f"database: {len(TABLES)} tables, {info['rows']:,} rows, {size / MIB:.0f} MiB "
        f"(built in {info['fill_seconds']} s)")
    return info


class ParallelBench(Bench):
    """bench/pg_backup.py's measuring code, for the directory format's measurements."""

    def __init__(self, args: argparse.Namespace, server: ThrowawayPostgres, workdir: Path) -> None:
        super().__init__(args, server, workdir)
        self.jobs = int(args.jobs)
        self.sets: dict[str, Path] = {}  # format -> backup_dir holding our newest set of it
        self.expected_rows = 0

    def rows(self, dbname: str) -> int:
        with self.server.connect(dbname) as conn:
            query = " + ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
            return int(conn.execute(f"SELECT {query}").fetchone()[0])  # type: ignore[index]

    def our_backup_fmt(self, size_mb: int, rep: int, fmt: str) -> Run:
        name = f"ours backup {fmt}" + (f" -j {self.jobs}" if fmt == "directory" else "")
        backup_dir = self.workdir / f"set-{fmt}"
        shutil.rmtree(backup_dir, ignore_errors=True)
        cfg = self.config(f"b-{fmt}", backup_dir, format=fmt, compression="zstd", dump_jobs=self.jobs)
        run, manifest = self.our_cli(name, size_mb, rep, cfg, "backup", "postgres")
        run.output_bytes = sum(int(f["size"]) for f in manifest["files"])
        run.uncompressed_bytes = int(manifest["details"]["uncompressed_bytes"])
        run.extra["files"] = len(manifest["files"])
        self.sets[fmt] = backup_dir
        return run

    def pg_dump_alone(self, size_mb: int, rep: int, fmt: str) -> Run:
        out = self.workdir / f"tool-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        out.unlink(missing_ok=True)
        flags = "-Fc" if fmt == "custom" else f"-Fd -j {self.jobs}"
        cmd = (f"{shlex.quote(str(self.bin / 'pg_dump'))} {self.conn_opts} --dbname={DBNAME} {flags} "
               f"-f {shlex.quote(str(out))}")
        run = self.tool(f"pg_dump {flags}", size_mb, rep, cmd, None)
        run.output_bytes = (out.stat().st_size if out.is_file()
                            else sum(p.stat().st_size for p in out.iterdir()))
        if fmt == "directory":
            shutil.rmtree(out, ignore_errors=True)
        return run

    def our_restore_fmt(self, size_mb: int, rep: int, fmt: str, *, before: bool = False) -> Run:
        target = self._new_db_name()
        cfg = self.config(f"r-{fmt}", self.sets[fmt], restore_jobs=self.jobs)
        saved = self.cli_env
        if before:  # the package in --before DIR first on the path: another commit's code, same conditions
            self.cli_env = {**saved, "PYTHONPATH": str(self.args.before.resolve())}
        try:
            run, report = self.our_cli(f"{'before' if before else 'ours'} restore {fmt} -j {self.jobs}", size_mb,
                                       rep, cfg, "restore", "postgres", "latest", "--target-db", target, "--force")
            run.extra["load_seconds"] = report.get("load_seconds")
            run.output_bytes = sum(p.stat().st_size for p in (self.sets[fmt] / "postgres").iterdir())
            self._expect_rows(target, self.expected_rows, f"our {fmt} restore")
        finally:
            self.cli_env = saved
            self.server.drop_database(target)
        return run

    def guide_file(self) -> Path:
        """`pg_dump | gzip`'s file, made once (not timed)."""
        out = self.workdir / "guide.sql.gz"
        if not out.exists():
            cmd = (f"{shlex.quote(str(self.bin / 'pg_dump'))} {self.conn_opts} --dbname={DBNAME} "
                   f"| gzip > {shlex.quote(str(out))}")
            self.tool("(setup) pg_dump | gzip", 0, 0, cmd, out)
        return out

    def plain_restore(self, size_mb: int, rep: int, what: str) -> Run:
        target = self._new_db_name()
        with self.server.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))  # not timed
        try:
            if what == "guide":
                path = self.guide_file()
                name = "guide: gunzip -c FILE, psql"
                cmd = (f"gunzip -c {shlex.quote(str(path))} | {shlex.quote(str(self.bin / 'psql'))} -q "
                       f"{self.conn_opts} --dbname={target} > /dev/null")
            else:
                path = self.workdir / "tool-custom"
                name = f"pg_restore -j {self.jobs} (pg_dump -Fc file)"
                cmd = (f"{shlex.quote(str(self.bin / 'pg_restore'))} {self.conn_opts} --dbname={target} "
                       f"--exit-on-error -j {self.jobs} {shlex.quote(str(path))}")
            run = self.tool(name, size_mb, rep, cmd, None)
            run.output_bytes = path.stat().st_size
            self._expect_rows(target, self.expected_rows, name)
        finally:
            self.server.drop_database(target)
        return run

    def run_all(self, size_mb: int) -> None:
        self.expected_rows = self.rows(DBNAME)
        self.guide_file()
        steps = [lambda rep: self.our_backup_fmt(size_mb, rep, "directory"),
                 lambda rep: self.our_backup_fmt(size_mb, rep, "custom"),
                 lambda rep: self.our_backup_fmt(size_mb, rep, "plain"),
                 lambda rep: self.pg_dump_alone(size_mb, rep, "custom"),
                 lambda rep: self.pg_dump_alone(size_mb, rep, "directory"),
                 lambda rep: self.our_restore_fmt(size_mb, rep, "directory"),
                 lambda rep: self.our_restore_fmt(size_mb, rep, "custom"),
                 lambda rep: self.our_restore_fmt(size_mb, rep, "plain"),  # rows shared over -j connections (0026)
                 lambda rep: self.plain_restore(size_mb, rep, "guide"),
                 lambda rep: self.plain_restore(size_mb, rep, "pg_restore")]
        if self.args.before is not None:
            steps += [lambda rep: self.our_restore_fmt(size_mb, rep, "directory", before=True),
                      lambda rep: self.our_restore_fmt(size_mb, rep, "custom", before=True)]
        if self.args.restores_only:  # the sets made once, untimed; only the restores measured
            for fmt in ("directory", "custom", "plain"):
                self.our_backup_fmt(size_mb, 0, fmt)
            self.pg_dump_alone(size_mb, 0, "custom")  # the file `pg_restore -j` restores
            steps = steps[5:]
        for rep in range(1, self.args.repeat + 1):
            for step in steps:
                run = step(rep)
                self.runs.append(run)
                log(f"rep {rep}: {run.name}: {run.wall:.2f} s"
                    + (f", peak RSS {run.peak_rss_kb / 1024:.0f} MiB" if run.peak_rss_kb else "")
                    + (f", of which the load {run.extra['load_seconds']} s" if run.extra.get("load_seconds") else ""))


def summary(runs: list[Run]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    return {name: {"median": round(statistics.median(r.wall for r in rs), 2), "best": round(min(r.wall for r in rs), 2),
                   "walls": [r.wall for r in rs], "output_mib": round((rs[-1].output_bytes or 0) / MIB, 1),
                   "peak_rss_mib": (round(max(r.peak_rss_kb for r in rs if r.peak_rss_kb) / 1024, 1)
                                    if any(r.peak_rss_kb for r in rs) else None),
                   "other_cpu_s": round(statistics.mean(r.extra.get("other_cpu_s", 0.0) for r in rs), 2)}
            for name, rs in groups.items()}


def ratios(found: dict[str, dict[str, Any]], jobs: int) -> list[tuple[str, float, str]]:
    def median(name: str) -> float:  # NaN for what was not measured (--restores-only): that row is left out
        return float(found[name]["median"]) if name in found else float("nan")

    d_backup, c_backup = f"ours backup directory -j {jobs}", "ours backup custom"
    d_restore, c_restore = f"ours restore directory -j {jobs}", f"ours restore custom -j {jobs}"
    guide, tool = "guide: gunzip -c FILE, psql", f"pg_restore -j {jobs} (pg_dump -Fc file)"
    restore_ratio = median(guide) / median(d_restore)
    met = "met" if restore_ratio >= TARGET_RESTORE_VS_GUIDE else "NOT met"
    rows = [
        ("gunzip -c, psql / ours restore directory (target >= 1.5)", restore_ratio, met),
        ("gunzip -c, psql / ours restore custom", median(guide) / median(c_restore), ""),
        ("gunzip -c, psql / ours restore plain (its rows over -j connections)",
         median(guide) / median(f"ours restore plain -j {jobs}"), ""),
        ("pg_restore -j (its own -Fc file) / ours restore directory", median(tool) / median(d_restore), ""),
        *[(f"before / ours, restore {fmt}", median(f"before restore {fmt} -j {jobs}") / median(name), "")
          for fmt, name in (("directory", d_restore), ("custom", c_restore))
          if f"before restore {fmt} -j {jobs}" in found],
        ("pg_dump -Fc / ours backup directory", median("pg_dump -Fc") / median(d_backup), ""),
        ("ours backup custom / ours backup directory", median(c_backup) / median(d_backup), ""),
        (f"pg_dump -Fd -j {jobs} / ours backup directory", median(f"pg_dump -Fd -j {jobs}") / median(d_backup), ""),
    ]
    return [row for row in rows if row[1] == row[1]]


def report(bench: ParallelBench, info: dict[str, Any]) -> dict[str, Any]:
    found = summary(bench.runs)
    rows = [[name, f"{s['median']:.2f}", f"{s['best']:.2f}", f"{s['output_mib']:.1f}",
             "-" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f}", f"{s['other_cpu_s']:.1f}"]
            for name, s in found.items()]
    header = ["measurement", "median s", "best s", "output MiB", "our peak RSS MiB", "other load CPU s"]
    print(f"\n12-table database: {info['database_bytes'] / MIB:.0f} MiB, {info['rows']:,} rows; "
          f"--jobs {bench.jobs}, {bench.args.repeat} runs each\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    computed = ratios(found, bench.jobs)
    print("\n| ratio (medians) | value | target |\n|---|---|---|")
    for label, value, met in computed:
        print(f"| {label} | {value:.2f} | {met} |")
    return {"database": info, "jobs": bench.jobs, "summary": found,
            "ratios": [{"ratio": label, "value": round(value, 3), "target": met} for label, value, met in computed],
            "runs": [r.__dict__ for r in bench.runs]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1000, help="database size to build, in MB (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--jobs", type=int, default=2, help="pg_dump/pg_restore jobs (default 2)")
    p.add_argument("--json-dir", default=str(ROOT / "bench" / "results"), help="where the JSON results go")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON results")
    p.add_argument("--restores-only", action="store_true", help="time only the restores (the sets made once)")
    p.add_argument("--before", type=Path, default=None,
                   help="also restore with the kkua_backupd/ in DIR (another commit's, e.g. from `git archive main "
                        "kkua_backupd | tar -x -C DIR`), interleaved with ours")
    args = p.parse_args(argv)
    if args.size_mb < 10 or args.repeat < 1 or args.jobs < 1:
        p.error("--size-mb >= 10, --repeat >= 1, --jobs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="kkua-bench-par-"))
    server: ThrowawayPostgres | None = None
    bench: ParallelBench | None = None
    try:
        server = ThrowawayPostgres()
        server.start()
        log(f"throwaway PostgreSQL on {server.host}:{server.port} ({server.tmp_dir})")
        with server.connect() as conn:
            conn.execute("ALTER SYSTEM SET autovacuum = off")
            conn.execute("SELECT pg_reload_conf()")
        server.create_database(DBNAME)
        info = build_database(server, args.size_mb)
        bench = ParallelBench(args, server, workdir)
        bench.run_all(args.size_mb)
        result = report(bench, info)
        if not args.no_json:
            path = Path(args.json_dir) / f"pg_parallel_{time.strftime('%Y%m%d_%H%M%S')}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            log(f"JSON results written to {path}")
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if bench is not None:
            bench.runner.kill_current()
        if server is not None:
            try:
                server.destroy()
            except Exception as exc:  # report, keep cleaning
                log(f"could not destroy the throwaway server: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        log("cleaned up (server stopped, temporary files removed)")


if __name__ == "__main__":
    sys.exit(main())
