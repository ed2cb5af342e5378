#!/usr/bin/env python3
"""Benchmark `kkua-backup backup/restore redis` against `redis-cli --rdb`.

Run from the repository root:

    .venv/bin/python bench/redis.py [--keys 1000000] [--sizes 250000,1000000] [--repeat 3]

It starts its own throwaway redis-server (a free port on 127.0.0.1, password set, diskless sync with no
delay), fills it with `tests/support/redis_bulk.fill_bulk` (mixed types: strings, hashes, lists, sets, sorted sets,
10 % with a TTL), and at each size times, `--repeat` times, interleaved:

* `redis-cli --rdb FILE` (the baseline: the same replication-protocol capture, uncompressed),
* our `kkua-backup backup redis` with compression = zstd (RDB + INFO + CONFIG files, checked);

then once per size our restores into fresh servers, reported in keys per second:

* `kkua-backup restore redis latest --force --flush --mode logical`,
* `kkua-backup restore redis latest --force --flush --mode file` (stop/start commands as in the tests).

Peak memory is the peak RSS of our own CLI process alone (the wrapper and /proc sampling of
bench/pg_backup.py, imported from there), so redis-server and redis-check-rdb are not counted.
Results go to stdout (table, ratios, memory, Markdown) and bench/results/redis_*.json. "other load" is CPU
the machine spent outside the measured process tree (pg_backup's measure): here that includes the source
redis-server's main process (it relays a diskless transfer from its fork to the socket) and, for restores,
the target server; much more than that means other work disturbed the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is bench/redis.py: with bench/ on sys.path (Python puts a script's folder first), `import redis`
# would import this file instead of redis-py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_pg_backup() -> Any:
    """bench/pg_backup.py, the shared measuring machinery (wrapper, /proc sampler, runner, tables)."""
    spec = importlib.util.spec_from_file_location("pg_backup", HERE / "pg_backup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pg_backup"] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


pg_backup = _load_pg_backup()

import redis  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from kkua_backupd.demo.redis_sample import databases  # noqa: E402
from kkua_backupd.sources.redis.local import LocalRedis, find_redis_bin  # noqa: E402
from tests.support.redis_bulk import fill_bulk  # noqa: E402

PASSWORD = "bench-redis-password"  # noqa: S105 (a throwaway server's)
TARGETS = {"ours_vs_cli": 1.2, "peak_mib": 100.0, "flat_fraction": 0.10, "flat_mib": 5.0}
CLI = "redis-cli --rdb"
OURS = "ours backup (zstd)"
LOGICAL = "ours restore --mode logical"
FILE = "ours restore --mode file"
log = pg_backup.log


class RedisRunner(pg_backup.Runner):
    """pg_backup's runner, sampling the redis-server's forks instead of a postmaster's backends."""

    def __init__(self, server_pid: int, workdir: Path) -> None:  # no PostgreSQL here: set what measure() uses
        self.workdir = workdir
        self.postmaster = server_pid
        self.current: subprocess.Popen[bytes] | None = None
        self.current_sampler: pg_backup.ProcSampler | None = None
        self.counter = 0


class RedisBench(pg_backup.Bench):
    """pg_backup's measurements (our CLI through the rusage wrapper, plain tools through sh) on Redis."""

    def __init__(self, args: argparse.Namespace, source: LocalRedis, workdir: Path) -> None:
        assert source.process is not None
        self.args = args
        self.source = source
        self.workdir = workdir
        self.runner = RedisRunner(source.process.pid, workdir)
        self.runs: list[pg_backup.Run] = []
        self.sizes_info: dict[int, dict[str, Any]] = {}
        self.code_before = pg_backup.code_fingerprint()
        self.log_dir = workdir / "logs"
        self.backup_dir = workdir / "backups"
        self.pass_file = workdir / "redis.pass"
        self.pass_file.write_text(PASSWORD + "\n")
        self.pass_file.chmod(0o600)
        plain = {k: v for k, v in os.environ.items()
                 if k not in ("REDISCLI_AUTH", "KKUA_BACKUP_CONFIG", "FORCE_RESTORE", "BACKUP_AOF",
                              "JOURNAL_STREAM", "NOTIFY_SOCKET") and not k.startswith("REDIS_")}
        self.cli_env = pg_backup.as_installed(plain)
        self.tool_env = dict(plain, REDISCLI_AUTH=PASSWORD)
        self.restore_skipped: str | None = None
        self.daemons: list[int] = []  # redis-servers our file-mode restores started (daemonized), by pid

    def settle(self) -> None:
        """Before each measurement (not timed): write out dirty pages so runs start alike."""
        os.sync()

    def config(self, name: str, port: int, **extra: Any) -> Path:  # type: ignore[override]
        lines = [f'backup_dir = "{self.backup_dir}"', f'log_dir = "{self.log_dir}"', "", "[redis]",
                 'host = "127.0.0.1"', f"port = {port}", f'password_file = "{self.pass_file}"',
                 'compression = "zstd"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- measurements -------------------------------------------------------------------------

    def cli_rdb(self, keys: int, rep: int) -> pg_backup.Run:
        out = self.workdir / "cli.rdb"
        exe = find_redis_bin("redis-cli")
        command = f"{exe} -h 127.0.0.1 -p {self.source.port} --rdb {out} >/dev/null 2>&1"
        run = self.tool(CLI, keys, rep, command, out)
        run.uncompressed_bytes = run.output_bytes
        out.unlink(missing_ok=True)
        return run

    def ours(self, keys: int, rep: int) -> pg_backup.Run:
        cfg = self.config("backup", self.source.port)
        run, manifest = self.our_cli(OURS, keys, rep, cfg, "backup", "redis")
        rdb = manifest["files"][0]
        run.output_bytes = rdb["size"]
        run.uncompressed_bytes = manifest["details"]["uncompressed_bytes"]
        run.extra.update(capture_seconds=manifest["timings"]["capture_seconds"],
                         job_seconds=manifest["timings"]["total_seconds"],
                         keys=manifest["details"]["keys"], transfer=manifest["details"]["transfer"])
        if manifest["details"]["keys"] != keys:
            raise RuntimeError(f"our backup recorded {manifest['details']['keys']} keys, expected {keys}")
        for old in sorted(self.backup_dir.glob("redis/redis_backup_*.manifest.json"))[:-1]:
            self._drop_set(old)  # keep only the newest set: disk space, and it is what `latest` restores
        return run

    def _drop_set(self, manifest_path: Path) -> None:
        manifest = json.loads(manifest_path.read_text())
        manifest_path.unlink()
        for f in manifest["files"]:
            (manifest_path.parent / f["name"]).unlink(missing_ok=True)

    def restore(self, keys: int, mode: str) -> pg_backup.Run | None:
        name = LOGICAL if mode == "logical" else FILE
        folder = self.workdir / f"target-{mode}-{keys}"
        # No diskless-sync delay on the target either: the safety backup taken before the restore would
        # otherwise wait out the server's default 5 s, which measures a setting rather than the restore.
        target = LocalRedis(folder, password=PASSWORD, settings={"pidfile": str(folder / "redis.pid"),
                                                                 "repl-diskless-sync-delay": "0"})
        target.start()
        extra: dict[str, Any] = {}
        if mode == "file":
            extra = {"stop_command": [str(find_redis_bin("redis-cli")), "-h", "127.0.0.1", "-p", str(target.port),
                                      "shutdown"],
                     "start_command": [str(target.server_bin), str(target.conf_path), "--daemonize", "yes"]}
        cfg = self.config(f"restore-{mode}", target.port, **extra)
        try:
            run, report = self.our_cli(name, keys, 0, cfg, "restore", "redis", "latest", "--force", "--flush",
                                       "--mode", mode)
            with target.client(socket_timeout=30) as client:
                found = sum(databases(client).values())
            if found != keys:
                raise RuntimeError(f"{name}: the target holds {found} keys after the restore, expected {keys}")
            run.extra.update(keys=found, keys_per_s=round(found / run.wall), report_seconds=report.get("seconds"))
            return run
        finally:
            self._stop_target(target, folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _stop_target(self, target: LocalRedis, folder: Path) -> None:
        """SHUTDOWN NOSAVE, whichever process serves the port now (file mode restarted it daemonized)."""
        pid_file = folder / "redis.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        try:
            with target.client(socket_timeout=10, retry=Retry(NoBackoff(), 0)) as client:
                client.shutdown(nosave=True)
        except redis.RedisError:
            pass
        target.kill()  # the original process, if it still runs (it is ours)
        if pid is not None and (target.process is None or pid != target.process.pid):
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    # -- flow ---------------------------------------------------------------------------------

    def run_size(self, keys: int, *, full: bool = True) -> None:
        started = time.monotonic()
        with self.source.client(socket_timeout=120) as client:
            fill_bulk(client, keys, seed=2024)
            counts = databases(client)
            memory = client.info("memory")["used_memory"]
        self.sizes_info[keys] = {"keys": sum(counts.values()), "used_memory": memory,
                                 "fill_seconds": round(time.monotonic() - started, 1)}
        log(f"{keys:,} keys in the source ({memory / pg_backup.MIB:.0f} MiB used), fill took "
            f"{self.sizes_info[keys]['fill_seconds']} s")
        for rep in range(self.args.repeat):
            for run in (self.cli_rdb(keys, rep), self.ours(keys, rep)):
                self.runs.append(run)
                rss = f", our peak RSS {run.peak_rss_kb / 1024:.1f} MiB" if run.peak_rss_kb else ""
                log(f"{keys:,} keys rep {rep}: {run.name:<28} {run.wall:6.2f} s{rss}  cpu {run.cpu_sampled}")
        if self.args.no_restore:
            return
        for mode in ("logical", "file"):
            if self.restore_skipped:
                break
            try:
                run = self.restore(keys, mode)
            except RuntimeError as exc:
                text = str(exc)
                if "NotImplementedError" in text or "being written" in text:
                    self.restore_skipped = "the Redis restore is not implemented yet (jobs/redis_restore.py)"
                    log(f"skipping the restores: {self.restore_skipped}")
                    break
                raise
            if run is not None:
                self.runs.append(run)
                log(f"{keys:,} keys: {run.name:<28} {run.wall:6.2f} s, {run.extra['keys_per_s']:,} keys/s, "
                    f"our peak RSS {(run.peak_rss_kb or 0) / 1024:.1f} MiB")


def report(bench: RedisBench, main_keys: int) -> dict[str, Any]:
    summary = pg_backup.summarize(bench.runs)  # groups by Run.size_mb, which holds the key count here
    rows = []
    for keys in sorted(summary):
        for name, e in summary[keys].items():
            extra = e["extra"]
            rows.append([f"{keys:,}", name, f"{e['wall_median']:.2f}", f"{e['wall_best']:.2f}",
                         pg_backup._fmt_mib(e["output_bytes"]), pg_backup._fmt_mib(e["uncompressed_bytes"]),
                         f"{e['peak_rss_mib']:.1f}" if e["peak_rss_mib"] else "-",
                         f"{extra['keys_per_s']:,}" if "keys_per_s" in extra else "-",
                         _cpu(e["cpu_sampled_mean"]), f"{e['other_cpu_mean']:.2f}"])
    header = ["keys", "measurement", "wall s (median)", "wall s (best)", "output MiB", "raw RDB MiB",
              "our peak RSS MiB", "keys/s", "CPU s by process (mean)", "other load CPU s (mean)"]
    main = summary[main_keys]
    ratio = main[OURS]["wall_median"] / main[CLI]["wall_median"]
    ratios = [{"ratio": "ours backup (zstd) / redis-cli --rdb", "value": ratio,
               "target": f"<= {TARGETS['ours_vs_cli']}", "met": ratio <= TARGETS["ours_vs_cli"]},
              {"ratio": "best run: ours backup (zstd) / redis-cli --rdb",
               "value": main[OURS]["wall_best"] / main[CLI]["wall_best"], "target": "(info)", "met": None},
              {"ratio": "ours capture phase only (manifest capture_seconds) / redis-cli --rdb",
               "value": statistics.median(r.extra["capture_seconds"] for r in bench.runs
                                          if r.name == OURS and r.size_mb == main_keys) / main[CLI]["wall_median"],
               "target": "(info)", "met": None},
              {"ratio": "output size: ours zstd / redis-cli RDB",
               "value": main[OURS]["output_bytes"] / main[CLI]["output_bytes"], "target": "(info)", "met": None}]
    memory = []
    sizes = sorted(summary)
    for name in (OURS, LOGICAL, FILE):
        peaks = {k: summary[k][name]["peak_rss_mib"] for k in sizes if name in summary[k]}
        if len(peaks) < 2:
            continue
        low, high = min(peaks.values()), max(peaks.values())
        flat = high - low <= max(TARGETS["flat_mib"], TARGETS["flat_fraction"] * high)
        memory.append({"measurement": name, "peaks_mib": peaks, "under_limit": high < TARGETS["peak_mib"],
                       "flat": flat})
    out = sys.stdout
    out.write(_text_table(header, rows) + "\n\n")
    for r in ratios:
        out.write(f"{r['ratio']}: {r['value']:.2f} (target {r['target']}) {pg_backup.verdict(r['met'])}\n")
    for m in memory:
        peaks = ", ".join(f"{k:,} keys: {v:.1f} MiB" for k, v in m["peaks_mib"].items())
        out.write(f"peak RSS of {m['measurement']}: {peaks}; < 100 MiB {pg_backup.verdict(m['under_limit'])}, "
                  f"flat {pg_backup.verdict(m['flat'])}\n")
    if bench.restore_skipped:
        out.write(f"restores skipped: {bench.restore_skipped}\n")
    md = [pg_backup.md_table(header, rows), "",
          pg_backup.md_table(["ratio", "value", "target", "met"],
                             [[r["ratio"], f"{r['value']:.2f}", r["target"], pg_backup.verdict(r["met"])]
                              for r in ratios]), "",
          pg_backup.md_table(["our CLI", *[f"peak RSS MiB at {k:,} keys" for k in sizes], "< 100 MiB", "flat"],
                             [[m["measurement"], *[f"{m['peaks_mib'].get(k, 0):.1f}" for k in sizes],
                               pg_backup.verdict(m["under_limit"]), pg_backup.verdict(m["flat"])] for m in memory])]
    out.write("\n----- Markdown -----\n" + "\n".join(md) + "\n")
    out.flush()
    with bench.source.client() as client:
        version = client.info("server")["redis_version"]
    return {"environment": {"cpus": os.cpu_count(), "redis_version": version, "repeat": bench.args.repeat,
                            "code": pg_backup.code_fingerprint(), "code_at_start": bench.code_before},
            "sizes": {str(k): v for k, v in bench.sizes_info.items()},
            "summary": {str(k): v for k, v in summary.items()}, "ratios": ratios, "memory": memory,
            "restore_skipped": bench.restore_skipped, "runs": [r.__dict__ for r in bench.runs],
            "targets": TARGETS, "markdown": "\n".join(md)}


def _cpu(cpu: dict[str, float]) -> str:
    # pg_backup's sampler labels the server's children "pg backend": here they are redis-server's forks.
    names = {"ours (python)": "py", "pg backend": "redis fork", "pg backend other": "redis fork",
             "pg backend COPY": "redis fork"}
    return ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in cpu.items() if v >= 0.05)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="main size in keys (default 1000000)")
    p.add_argument("--sizes", help="comma-separated key counts for the memory comparison (default: a quarter of "
                                   "--keys and --keys)")
    p.add_argument("--repeat", type=int, default=3, help="backup runs per measurement (default 3)")
    p.add_argument("--no-restore", action="store_true", help="time the backups only")
    p.add_argument("--json-dir", default=str(ROOT / "bench" / "results"), help="default bench/results")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON results")
    args = p.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")}) if args.sizes else sorted({args.keys // 4, args.keys})
    if len(sizes) < 2 or sizes[0] <= 0 or args.repeat < 1:
        p.error("need two different positive sizes and --repeat >= 1")
    args.size_list = sizes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="kkua-bench-redis-"))
    source: LocalRedis | None = None
    bench: RedisBench | None = None
    try:
        source = LocalRedis(workdir / "source", password=PASSWORD,
                            settings={"repl-diskless-sync-delay": "0", "maxmemory": "0"})
        source.start()
        log(f"throwaway redis-server on 127.0.0.1:{source.port}, sizes {args.size_list} keys, "
            f"{args.repeat} runs each, workdir {workdir}")
        bench = RedisBench(args, source, workdir)
        for keys in args.size_list:
            bench.run_size(keys)
        result = report(bench, args.size_list[-1])
        if not args.no_json:
            path = Path(args.json_dir) / f"redis_{time.strftime('%Y%m%d_%H%M%S')}.json"
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
        if source is not None:
            source.kill()  # SIGKILL of the server we started (its data is throwaway)
        shutil.rmtree(workdir, ignore_errors=True)
        log("cleaned up (servers stopped, temporary files removed)")


if __name__ == "__main__":
    sys.exit(main())
