#!/usr/bin/env python3
"""Benchmark `kkua-backup backup/restore postgres` against pg_dump alone and the guide's shell pipeline.

Run from the repository root:

    .venv/bin/python bench/pg_backup.py [--size-mb 250] [--sizes 120,250] [--repeat 3]

It starts its own throwaway PostgreSQL server (never the machine's server on 5432), fills a database
with `fill_bulk` rows, and times, at the largest size:

* our backup (`kkua-backup backup postgres`, test_restore off) in plain/custom x gzip/zstd,
* the guide's way: `pg_dump ... | gzip > file`,
* the source alone: `pg_dump -Fc -Z0 ... > /dev/null` (and, for reference, plain `pg_dump > /dev/null`),
* our restore (`kkua-backup restore postgres FILE --target-db NEW --force`) of the plain gzip, plain zstd
  and custom gzip sets against the plain tools on the same file: `gunzip -c FILE | psql -q -d NEW2`,
  `zstd -dc FILE | psql -q -d NEW2` and `gunzip -c FILE | pg_restore -d NEW2` (ratios ours / tool);

and, at every size, our backups and our restore again for the memory comparison. Each measurement runs
`--repeat` times (interleaved); the table shows the MEDIAN wall time and the HIGHEST peak memory seen.

Peak memory is the peak RSS (ru_maxrss of RUSAGE_SELF) of our own CLI process alone, not of pg_dump or
psql: the CLI runs as `python -c <wrapper>` which calls kkua_backupd.cli.run() exactly as the console
script does, then writes getrusage() to a side file. CPU seconds per process (our python, pg_dump, psql,
gzip, the PostgreSQL backend, the server's background processes) come from sampling /proc every 0.1 s.

The server and all temporary files are removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds redis.py: with bench/ first on sys.path (Python puts a script's folder there), `import redis`
# (the sandbox imports it) would import that file instead of redis-py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from psycopg import sql  # noqa: E402

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data  # noqa: E402
from tests.support.pg_bulk import fill_bulk  # noqa: E402

DBNAME = "kkua_bench"
MODES = (("plain", "gzip"), ("plain", "zstd"), ("custom", "gzip"), ("custom", "zstd"))
# The sets restored, each against the plain tools' way with the same file (`{file}`, `{psql}`, `{bin}`, `{conn}`
# and `{db}` filled in); the plain gzip one runs at every size (memory), the others at the main size.
RESTORES: dict[tuple[str, str], tuple[str, str]] = {
    ("plain", "gzip"): ("guide: gunzip | psql", "gunzip -c {file} | {psql} -q {conn} --dbname={db} > /dev/null"),
    ("plain", "zstd"): ("tool: zstd -dc | psql", "zstd -dcq {file} | {psql} -q {conn} --dbname={db} > /dev/null"),
    ("custom", "gzip"): ("tool: gunzip | pg_restore", "gunzip -c {file} | {bin}/pg_restore {conn} --dbname={db}"),
}


def restore_name(fmt: str, compression: str) -> str:
    return f"ours restore ({fmt} {compression})"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
MIB = 1024 * 1024

TARGETS = {
    "zstd_vs_source": 1.15,      # our zstd backup / pg_dump -Fc -Z0 > /dev/null   (<=)
    "guide_vs_zstd": 2.5,        # pg_dump | gzip / our zstd backup                  (>=)
    "guide_vs_gzip": 1.5,        # pg_dump | gzip / our gzip backup                  (>=)
    "peak_mib": 100.0,           # our CLI's peak RSS                                (<)
    "flat_fraction": 0.10,       # "about the same at both sizes": within 10 % ...
    "flat_mib": 5.0,             # ... or within 5 MiB, whichever is larger
}

# Runs inside the measured child: our real CLI entry point, then the process's own rusage.
WRAPPER = r"""
import json, resource, sys
side, args = sys.argv[1], sys.argv[2:]
code = 70
try:
    from kkua_backupd.cli import run
    sys.argv = ["kkua-backup", *args]
    run()  # what the kkua-backup script runs, its exit included; raises SystemExit(code)
except SystemExit as done:
    code = done.code if isinstance(done.code, int) else 1
finally:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(side, "w") as fh:
        json.dump({"maxrss_kb": s.ru_maxrss, "utime": s.ru_utime, "stime": s.ru_stime,
                   "children_utime": c.ru_utime, "children_stime": c.ru_stime,
                   "children_maxrss_kb": c.ru_maxrss}, fh)
sys.exit(code)
"""


def code_fingerprint() -> dict[str, str]:
    """sha256 (12 hex digits) of every kkua_backupd source file: which code a result belongs to."""
    pkg = ROOT / "kkua_backupd"
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            for f in sorted(pkg.rglob("*.py"))}


def as_installed(env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment as on a server: pip compiles bytecode at install time, so the CLI runs from
    .pyc files. A shell with PYTHONDONTWRITEBYTECODE (set on these machines) would make every run compile
    the package from source, about 0.1 s that no installed copy pays; compile it once here instead.

    The CLI runs in the work folder, so without PYTHONPATH it would import whatever tree the venv's editable
    install points at, not this one: a second checkout sharing the venv (main's code, for a before/after
    pair) would measure the other tree's code under this tree's fingerprint. PYTHONPATH names this tree."""
    compileall.compile_dir(str(ROOT / "kkua_backupd"), quiet=1)
    cleaned = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cleaned["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return cleaned


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the results."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# /proc sampling: CPU seconds and RSS per process of one measurement


def _read_stat(pid: int | str) -> tuple[int, str, int, int] | None:
    """(ppid, comm, utime+stime ticks, rss pages) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    close = raw.rfind(")")
    comm = raw[raw.find("(") + 1 : close]
    fields = raw[close + 2 :].split(" ")
    # fields[0] = state (field 3); ppid = field 4; utime/stime = fields 14/15; rss = field 24
    return int(fields[1]), comm, int(fields[11]) + int(fields[12]), int(fields[21])


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _is_copying(pid: int) -> bool:
    """Whether a backend's process title says it is running COPY right now."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().rstrip(b"\0 ").endswith(b" COPY")
    except OSError:
        return False


class ProcSampler(threading.Thread):
    """Samples the measured process tree and the PostgreSQL server's processes every `interval` s.

    CPU of a process is its last seen utime+stime minus its value in the baseline sample (0 for
    processes born during the run), so at most one interval of CPU per process is missed at its exit.
    """

    def __init__(self, postmaster: int, interval: float = 0.1) -> None:
        super().__init__(name="proc-sampler", daemon=True)
        self.postmaster = postmaster
        self.interval = interval
        self.root: int | None = None
        self.baseline: dict[int, int] = {}
        self.first_seen_ticks: dict[int, int] = {}
        self.last_ticks: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.peak_rss_kb: dict[str, int] = {}
        self.thread_ticks: dict[int, int] = {}  # tid -> ticks, threads of the root process
        self.descendants: set[int] = set()
        self.copying: set[int] = set()  # backends seen running COPY (pg_dump's data, psql's load)
        self.other_cpu = 0.0
        self._halt = threading.Event()
        self._scan(baseline=True)

    def set_root(self, pid: int) -> None:
        self.root = pid

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self._scan()

    def finish(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def _label(self, pid: int, comm: str, parent_is_postmaster: bool) -> str:
        if pid == self.root:
            return "ours (python)" if comm.startswith("python") else f"client ({comm})"
        if parent_is_postmaster:
            # Started during the run: a backend serving this run (autovacuum is off). Already running
            # before it: checkpointer, background writer, walwriter and the like.
            return "pg background" if pid in self.baseline else "pg backend"
        return comm

    def _scan(self, *, baseline: bool = False) -> None:
        procs: dict[int, tuple[int, str, int, int]] = {}
        try:
            entries = os.listdir("/proc")
        except OSError:
            return
        for entry in entries:
            if entry.isdigit():
                st = _read_stat(entry)
                if st is not None:
                    procs[int(entry)] = st
        if baseline:
            self.baseline = {pid: st[2] for pid, st in procs.items()}
            return
        tracked: dict[int, bool] = {}
        if self.root is not None and self.root in procs:
            tree = {self.root}
            grew = True
            while grew:
                grew = False
                for pid, st in procs.items():
                    if st[0] in tree and pid not in tree:
                        tree.add(pid)
                        grew = True
            self.descendants |= tree - {self.root}
            for pid in tree:
                tracked[pid] = False
            # `sh -c "pg_dump ... > /dev/null"` execs pg_dump: name the root after what it runs now.
            self.labels[self.root] = self._label(self.root, procs[self.root][1], False)
            self.first_seen_ticks.setdefault(self.root, 0)
        for pid, st in procs.items():
            if st[0] == self.postmaster:
                tracked[pid] = True
        for pid, under_pm in tracked.items():
            _ppid, comm, ticks, rss = procs[pid]
            if pid not in self.labels:
                self.labels[pid] = self._label(pid, comm, under_pm)
                self.first_seen_ticks[pid] = self.baseline.get(pid, 0)
            self.last_ticks[pid] = ticks
            label = self.labels[pid]
            if label == "pg backend" and pid not in self.copying and _is_copying(pid):
                self.copying.add(pid)
            self.peak_rss_kb[label] = max(self.peak_rss_kb.get(label, 0), rss * PAGE_KB)
        if self.root is not None and self.root in procs:
            try:
                for tid in os.listdir(f"/proc/{self.root}/task"):
                    st = _read_stat(f"{self.root}/task/{tid}")
                    if st is not None:
                        self.thread_ticks[int(tid)] = st[2]
            except OSError:
                pass

    def cpu_by_label(self) -> dict[str, float]:
        """CPU seconds per kind of process; backends split into the COPY one(s) and the rest (our
        snapshot/row-count session, the restore's checks)."""
        out: dict[str, float] = {}
        for pid, name in self.labels.items():
            label = name
            if name == "pg backend":
                label = "pg backend COPY" if pid in self.copying else "pg backend other"
            ticks = self.last_ticks.get(pid, 0) - self.first_seen_ticks.get(pid, 0)
            out[label] = out.get(label, 0.0) + max(ticks, 0) / CLK_TCK
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def root_threads(self) -> dict[str, Any]:
        if self.root is None or not self.thread_ticks:
            return {}
        main = self.thread_ticks.get(self.root, 0) / CLK_TCK
        others = sorted((t / CLK_TCK for tid, t in self.thread_ticks.items() if tid != self.root), reverse=True)
        return {"main_thread": round(main, 2), "other_threads": round(sum(others), 2),
                "busiest_other_threads": [round(x, 2) for x in others[:4]], "threads": len(self.thread_ticks)}


# ----------------------------------------------------------------------------------------------
# Running one measurement


@dataclass
class Run:
    """One execution of one measurement."""

    name: str
    rep: int
    size_mb: int
    wall: float
    returncode: int
    output_bytes: int | None = None
    uncompressed_bytes: int | None = None
    peak_rss_kb: int | None = None          # our CLI process alone (RUSAGE_SELF in the wrapper)
    cpu_self: float | None = None           # our CLI process: user+sys seconds (exact)
    cpu_children: float | None = None       # waited-for descendants: user+sys seconds (exact)
    cpu_sampled: dict[str, float] = field(default_factory=dict)
    peak_rss_sampled_kb: dict[str, int] = field(default_factory=dict)
    threads: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Starts measured children in their own session and makes sure none outlives the benchmark."""

    def __init__(self, server: ThrowawayPostgres, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        self.current: subprocess.Popen[bytes] | None = None
        self.current_sampler: ProcSampler | None = None
        self.counter = 0

    def measure(self, argv: Sequence[str] | str, *, env: dict[str, str], shell: bool = False,
                stdout: Path | None = None) -> tuple[float, int, Any, ProcSampler, Path, Path]:
        """Run argv (or a shell command line) to completion; returns (wall, rc, rusage, sampler, out, err)."""
        self.counter += 1
        out_path = stdout or self.workdir / f"run{self.counter}.out"
        err_path = self.workdir / f"run{self.counter}.err"
        sampler = ProcSampler(self.postmaster)
        self.current_sampler = sampler
        busy0, own0 = _busy_seconds(), _own_cpu()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.perf_counter()
            if shell:
                assert isinstance(argv, str)
                proc = subprocess.Popen(["/bin/sh", "-c", argv], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, env=env, start_new_session=True, cwd=self.workdir)
            else:
                proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                        start_new_session=True, cwd=self.workdir)
            self.current = proc
            sampler.set_root(proc.pid)
            sampler.start()
            _, status, rusage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.current = None
        sampler.finish()
        # CPU the machine spent on anything but this measurement and the benchmark itself: other
        # people's work on a shared box. Large values mean the run was disturbed.
        tracked = sum(sampler.cpu_by_label().values())
        sampler.other_cpu = round(max(_busy_seconds() - busy0 - (_own_cpu() - own0) - tracked, 0.0), 2)
        self.current_sampler = None
        return wall, proc.returncode, rusage, sampler, out_path, err_path

    def kill_current(self) -> None:
        """Stop a measurement interrupted by Ctrl-C: its session, then any descendant seen, by pid."""
        proc, sampler = self.current, self.current_sampler
        if proc is None or proc.returncode is not None:
            return
        pids = sorted(sampler.descendants) if sampler is not None else []
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # our session leader's group (shell pipelines live in it)
            for pid in pids:  # our CLI starts pg_dump/psql in process groups of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


# ----------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, server: ThrowawayPostgres, workdir: Path) -> None:
        self.args = args
        self.server = server
        self.workdir = workdir
        self.runner = Runner(server, workdir)
        self.runs: list[Run] = []
        self.sizes_info: dict[int, dict[str, Any]] = {}
        self.pass_file = workdir / "pg.pass"
        self.pass_file.write_text(server.password + "\n")
        self.pass_file.chmod(0o600)
        self.log_dir = workdir / "logs"
        # one folder per restored mode: two sets made in the same second would share an id
        self.restore_dirs = {mode: workdir / f"restore-src-{mode[0]}-{mode[1]}" for mode in RESTORES}
        for folder in self.restore_dirs.values():
            (folder / "postgres").mkdir(parents=True)
        self.restore_files: dict[tuple[str, str], str] = {}
        self.restore_counter = 0
        self.code_before = code_fingerprint()
        self.cli_env = as_installed({k: v for k, v in os.environ.items()
                                     if k not in ("PGPASSWORD", "KKUA_BACKUP_CONFIG", "FORCE_RESTORE", "TEST_RESTORE",
                                                  "JOURNAL_STREAM", "NOTIFY_SOCKET")
                                     and not k.startswith("DATABASE_")})
        self.tool_env = dict(os.environ, PGPASSWORD=server.password)
        self.tool_env.pop("PGDATABASE", None)
        self.bin = server.bin_dir
        self.conn_opts = (f"--host={server.host} --port={server.port} --username={server.user}"
                          " --no-password")

    # -- config files -------------------------------------------------------------------------

    def config(self, name: str, backup_dir: Path, **postgres: Any) -> Path:
        keys: dict[str, Any] = {"host": self.server.host, "port": self.server.port, "database": DBNAME,
                                "user": self.server.user, "password_file": str(self.pass_file),
                                "test_restore": False}
        keys.update(postgres)
        lines = [f'backup_dir = "{backup_dir}"', f'log_dir = "{self.log_dir}"', "", "[postgres]"]
        for key, value in keys.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f'{key} = "{value}"')
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- server helpers -----------------------------------------------------------------------

    def settle(self) -> None:
        """Before each measurement (not timed): write out dirty pages so runs start alike."""
        with self.server.connect() as conn:
            conn.execute("CHECKPOINT")
        os.sync()

    def rows(self, dbname: str) -> int:
        with self.server.connect(dbname) as conn:
            return int(conn.execute("SELECT count(*) FROM bench_events").fetchone()[0])  # type: ignore[index]

    def grow_to(self, size_mb: int) -> dict[str, Any]:
        started = time.monotonic()
        with self.server.connect(DBNAME) as conn:
            fill_bulk(conn, size_mb)
            conn.execute("VACUUM (FREEZE, ANALYZE)")
            row = conn.execute("SELECT pg_total_relation_size('bench_events'), pg_database_size(current_database()),"
                               " (SELECT count(*) FROM bench_events)").fetchone()
        assert row is not None
        info = {"target_mb": size_mb, "table_bytes": int(row[0]), "database_bytes": int(row[1]),
                "rows": int(row[2]), "fill_seconds": round(time.monotonic() - started, 1)}
        log(f"database at {size_mb} MB target: bench_events {info['table_bytes'] / MIB:.0f} MiB with indexes, "
            f"database {info['database_bytes'] / MIB:.0f} MiB, {info['rows']:,} rows "
            f"(fill took {info['fill_seconds']} s)")
        return info

    # -- measurements -------------------------------------------------------------------------

    def our_cli(self, name: str, size_mb: int, rep: int, config: Path, *cli_args: str) -> tuple[Run, Any]:
        side = self.workdir / f"side{self.runner.counter + 1}.json"
        argv = [sys.executable, "-c", WRAPPER, str(side), "--config", str(config), "--json", *cli_args]
        self.settle()
        wall, rc, _rusage, sampler, out, err = self.runner.measure(argv, env=self.cli_env)
        run = Run(name, rep, size_mb, round(wall, 3), rc)
        doc: Any = None
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError):
            doc = None
        if rc != 0:
            raise RuntimeError(f"{name} exited {rc}:\n{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}")
        usage = json.loads(side.read_text())
        run.peak_rss_kb = int(usage["maxrss_kb"])
        run.cpu_self = round(usage["utime"] + usage["stime"], 2)
        run.cpu_children = round(usage["children_utime"] + usage["children_stime"], 2)
        run.cpu_sampled = sampler.cpu_by_label()
        run.peak_rss_sampled_kb = sampler.peak_rss_kb
        run.threads = sampler.root_threads()
        run.extra["other_cpu_s"] = sampler.other_cpu
        side.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return run, doc

    def tool(self, name: str, size_mb: int, rep: int, command: str, output: Path | None) -> Run:
        self.settle()
        wall, rc, rusage, sampler, out, err = self.runner.measure(command, env=self.tool_env, shell=True)  # noqa: S604
        errors = err.read_text(errors="replace")
        if rc != 0:
            raise RuntimeError(f"{name} exited {rc}: {command}\n{errors[-3000:]}")
        run = Run(name, rep, size_mb, round(wall, 3), rc)
        run.cpu_children = round(rusage.ru_utime + rusage.ru_stime, 2)  # sh and everything it waited for
        run.cpu_sampled = sampler.cpu_by_label()
        run.peak_rss_sampled_kb = sampler.peak_rss_kb
        run.extra["other_cpu_s"] = sampler.other_cpu
        if output is not None and output.exists():
            run.output_bytes = output.stat().st_size
        error_lines = [line for line in errors.splitlines() if "ERROR" in line]
        if error_lines:
            run.extra["stderr_errors"] = error_lines[:5]
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return run

    def our_backup(self, size_mb: int, rep: int, fmt: str, compression: str) -> Run:
        name = f"ours {fmt}+{compression}"
        backup_dir = self.workdir / f"b-{fmt}-{compression}"
        cfg = self.config(f"{fmt}-{compression}", backup_dir, format=fmt, compression=compression)
        run, manifest = self.our_cli(name, size_mb, rep, cfg, "backup", "postgres")
        data = manifest["files"][0]
        run.output_bytes = int(data["size"])
        run.uncompressed_bytes = int(manifest["details"]["uncompressed_bytes"])
        run.extra["dump_seconds"] = manifest.get("timings", {}).get("dump_seconds")
        folder = backup_dir / "postgres"
        if (fmt, compression) in RESTORES:
            # Keep the newest set of this mode as its restore source (data file + manifest).
            keep = self.restore_dirs[(fmt, compression)] / "postgres"
            for old in keep.iterdir():
                old.unlink()
            for f in folder.iterdir():
                if f.name.startswith(f"{manifest['prefix']}{manifest['id']}"):
                    shutil.move(str(f), keep / f.name)
            self.restore_files[(fmt, compression)] = data["name"]
        shutil.rmtree(backup_dir, ignore_errors=True)
        return run

    def our_startup(self, size_mb: int, rep: int) -> Run:
        """`kkua-backup config check`: the CLI's start-up time and baseline memory, for reference."""
        cfg = self.config("plain-gzip", self.workdir / "b-startup")
        run, _ = self.our_cli("ours startup (config check)", size_mb, rep, cfg, "config", "check")
        return run

    def guide_backup(self, size_mb: int, rep: int) -> Run:
        out = self.workdir / "guide.sql.gz"
        cmd = (f"{shlex.quote(str(self.bin / 'pg_dump'))} {self.conn_opts} --dbname={DBNAME} "
               f"| gzip > {shlex.quote(str(out))}")
        run = self.tool("guide: pg_dump | gzip", size_mb, rep, cmd, out)
        out.unlink(missing_ok=True)
        return run

    def source_alone(self, size_mb: int, rep: int, fmt: str) -> Run:
        flags = "-Fc -Z0" if fmt == "custom" else "-Fp"
        cmd = f"{shlex.quote(str(self.bin / 'pg_dump'))} {self.conn_opts} --dbname={DBNAME} {flags} > /dev/null"
        return self.tool(f"source: pg_dump {flags} >/dev/null", size_mb, rep, cmd, None)

    def _new_db_name(self) -> str:
        self.restore_counter += 1
        return f"kkua_bench_restore_{self.restore_counter}"

    def _expect_rows(self, target: str, expected: int, what: str) -> None:
        got = self.rows(target)
        if got != expected:
            raise RuntimeError(f"{what} into {target}: {got} rows, expected {expected}")

    def our_restore(self, size_mb: int, rep: int, expected_rows: int, mode: tuple[str, str]) -> Run:
        file = self.restore_files[mode]
        target = self._new_db_name()
        cfg = self.config(f"restore-{mode[0]}-{mode[1]}", self.restore_dirs[mode])
        try:
            run, report = self.our_cli(restore_name(*mode), size_mb, rep, cfg, "restore", "postgres",
                                       file, "--target-db", target, "--force")
            run.output_bytes = (self.restore_dirs[mode] / "postgres" / file).stat().st_size
            run.extra["load_seconds"] = report.get("load_seconds")
            run.extra["check"] = (report.get("check") or {}).get("mode", "pre-check")
            self._expect_rows(target, expected_rows, "our restore")
        finally:
            self.server.drop_database(target)
        return run

    def tool_restore(self, size_mb: int, rep: int, expected_rows: int, mode: tuple[str, str]) -> Run:
        name, template = RESTORES[mode]
        target = self._new_db_name()
        path = self.restore_dirs[mode] / "postgres" / self.restore_files[mode]
        with self.server.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))  # empty NEW2, not timed
        try:
            cmd = template.format(file=shlex.quote(str(path)), psql=shlex.quote(str(self.bin / "psql")),
                                  bin=shlex.quote(str(self.bin)), conn=self.conn_opts, db=target)
            run = self.tool(name, size_mb, rep, cmd, None)
            run.output_bytes = path.stat().st_size
            self._expect_rows(target, expected_rows, name)
        finally:
            self.server.drop_database(target)
        return run

    # -- plan -----------------------------------------------------------------------------------

    def _backup_step(self, size_mb: int, fmt: str, comp: str) -> Callable[[int], Run]:
        return lambda rep: self.our_backup(size_mb, rep, fmt, comp)

    def _restore_step(self, size_mb: int, expected: int, mode: tuple[str, str], *, ours: bool) -> Callable[[int], Run]:
        if ours:
            return lambda rep: self.our_restore(size_mb, rep, expected, mode)
        return lambda rep: self.tool_restore(size_mb, rep, expected, mode)

    def run_size(self, size_mb: int, full: bool) -> None:
        info = self.grow_to(size_mb)
        self.sizes_info[size_mb] = info
        expected = info["rows"]
        steps: list[tuple[str, Callable[[int], Run]]] = []
        for fmt, comp in MODES:
            steps.append((f"ours {fmt}+{comp}", self._backup_step(size_mb, fmt, comp)))
        if full:
            steps.append(("guide backup", lambda r: self.guide_backup(size_mb, r)))
            steps.append(("source -Fc -Z0", lambda r: self.source_alone(size_mb, r, "custom")))
            steps.append(("source -Fp", lambda r: self.source_alone(size_mb, r, "plain")))
        if full:
            steps.append(("ours startup", lambda r: self.our_startup(size_mb, r)))
        for mode in RESTORES:
            if full or mode == ("plain", "gzip"):
                steps.append((restore_name(*mode), self._restore_step(size_mb, expected, mode, ours=True)))
            if full:
                steps.append((RESTORES[mode][0], self._restore_step(size_mb, expected, mode, ours=False)))
        for rep in range(1, self.args.repeat + 1):  # interleaved, so drift hits every variant alike
            for label, step in steps:
                run = step(rep)
                self.runs.append(run)
                mem = f", peak RSS {run.peak_rss_kb / 1024:.1f} MiB" if run.peak_rss_kb else ""
                size = f", {run.output_bytes / MIB:.1f} MiB" if run.output_bytes and "restore" not in label else ""
                log(f"{size_mb} MB rep {rep}: {run.name:<32} {run.wall:7.2f} s{size}{mem}  cpu {run.cpu_sampled}"
                    f"  other load {run.extra.get('other_cpu_s', 0):.2f} CPU s")


# ----------------------------------------------------------------------------------------------
# Summaries


def summarize(runs: list[Run]) -> dict[int, dict[str, dict[str, Any]]]:
    """Per size and measurement: median wall, best wall, highest peak RSS, mean CPU per process."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[int, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.size_mb, r.name), []).append(r)
    for (size, name), rs in groups.items():
        walls = [r.wall for r in rs]
        cpu: dict[str, float] = {}
        for r in rs:
            for k, v in r.cpu_sampled.items():
                cpu[k] = cpu.get(k, 0.0) + v / len(rs)
        entry: dict[str, Any] = {
            "runs": len(rs), "wall_median": round(statistics.median(walls), 3), "wall_best": round(min(walls), 3),
            "walls": walls,
            "output_bytes": rs[-1].output_bytes, "uncompressed_bytes": rs[-1].uncompressed_bytes,
            "peak_rss_mib": (round(max(r.peak_rss_kb for r in rs if r.peak_rss_kb) / 1024, 1)
                             if any(r.peak_rss_kb for r in rs) else None),
            "cpu_sampled_mean": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
            "cpu_self_mean": (round(statistics.mean(r.cpu_self for r in rs if r.cpu_self is not None), 2)
                              if any(r.cpu_self is not None for r in rs) else None),
            "cpu_children_mean": (round(statistics.mean(r.cpu_children for r in rs if r.cpu_children is not None), 2)
                                  if any(r.cpu_children is not None for r in rs) else None),
            "other_cpu_mean": round(statistics.mean(r.extra.get("other_cpu_s", 0.0) for r in rs), 2),
            "dump_median": (round(statistics.median(r.extra["dump_seconds"] for r in rs
                                                    if r.extra.get("dump_seconds") is not None), 3)
                            if any(r.extra.get("dump_seconds") is not None for r in rs) else None),
            "load_median": (round(statistics.median(r.extra["load_seconds"] for r in rs
                                                    if r.extra.get("load_seconds") is not None), 3)
                            if any(r.extra.get("load_seconds") is not None for r in rs) else None),
            "threads": rs[-1].threads,
            "extra": rs[-1].extra,
        }
        out.setdefault(size, {})[name] = entry
    return out


def _fmt_mib(n: int | None) -> str:
    return f"{n / MIB:.1f}" if n else "-"


def _cpu_brief(cpu: dict[str, float]) -> str:
    short = {"ours (python)": "py", "pg backend COPY": "backend-COPY", "pg backend other": "backend-other",
             "pg background": "pg-bg", "client (sh)": "sh"}
    return ", ".join(f"{short.get(k, k)} {v:.1f}" for k, v in cpu.items() if v >= 0.05)


def table_rows(summary: dict[int, dict[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for size in sorted(summary):
        for name, e in summary[size].items():
            rows.append([f"{size}", name, f"{e['wall_median']:.2f}", f"{e['wall_best']:.2f}",
                         _fmt_mib(e["output_bytes"]), _fmt_mib(e["uncompressed_bytes"]),
                         f"{e['peak_rss_mib']:.1f}" if e["peak_rss_mib"] else "-",
                         _cpu_brief(e["cpu_sampled_mean"]), f"{e['other_cpu_mean']:.2f}"])
    return rows


HEADER = ["size MB", "measurement", "wall s (median)", "wall s (best)", "output MiB", "raw MiB",
          "our peak RSS MiB (max)", "CPU s by process (mean)", "other load CPU s (mean)"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(HEADER, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ratios(summary: dict[int, dict[str, dict[str, Any]]], main: int) -> list[dict[str, Any]]:
    s = summary[main]

    def wall(name: str) -> float:
        return float(s[name]["wall_median"])

    src = wall("source: pg_dump -Fc -Z0 >/dev/null")
    guide = wall("guide: pg_dump | gzip")
    out: list[dict[str, Any]] = []
    for fmt in ("custom", "plain"):
        v = wall(f"ours {fmt}+zstd") / src
        out.append({"ratio": f"ours {fmt}+zstd / source alone (pg_dump -Fc -Z0)", "value": v,
                    "target": f"<= {TARGETS['zstd_vs_source']}", "met": v <= TARGETS["zstd_vs_source"]})
    for fmt in ("plain", "custom"):
        v = guide / wall(f"ours {fmt}+zstd")
        out.append({"ratio": f"guide (pg_dump | gzip) / ours {fmt}+zstd", "value": v,
                    "target": f">= {TARGETS['guide_vs_zstd']}", "met": v >= TARGETS["guide_vs_zstd"]})
    for fmt in ("plain", "custom"):
        v = guide / wall(f"ours {fmt}+gzip")
        out.append({"ratio": f"guide (pg_dump | gzip) / ours {fmt}+gzip", "value": v,
                    "target": f">= {TARGETS['guide_vs_gzip']}", "met": v >= TARGETS["guide_vs_gzip"]})
    for fmt in ("custom", "plain"):
        dump = s[f"ours {fmt}+zstd"].get("dump_median")
        if dump:
            out.append({"ratio": f"ours {fmt}+zstd dump phase only (manifest dump_seconds) / source alone",
                        "value": dump / src, "target": "(info)", "met": None})
    for mode, (tool_name, _) in RESTORES.items():
        v = wall(restore_name(*mode)) / wall(tool_name)
        target = "<= 1.0" if mode[0] == "plain" else "(info)"
        out.append({"ratio": f"{restore_name(*mode)} / {tool_name.split(': ', 1)[1]} (time)", "value": v,
                    "target": target, "met": v <= 1.0 if mode[0] == "plain" else None})
        load = s[restore_name(*mode)].get("load_median")
        if load:  # the report's load_seconds: without start-up, checks before the load, row counts after
            out.append({"ratio": f"{restore_name(*mode)} load phase only / {tool_name.split(': ', 1)[1]}",
                        "value": load / wall(tool_name), "target": "(info)", "met": None})
    out.append({"ratio": "source plain (pg_dump -Fp) / source custom (-Fc -Z0), for reference",
                "value": wall("source: pg_dump -Fp >/dev/null") / src, "target": "(info)", "met": None})
    return out


def memory_checks(summary: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    sizes = sorted(summary)
    names = [n for n in summary[sizes[-1]] if n.startswith("ours") and all(n in summary[s] for s in sizes)]
    checks = []
    for name in names:
        peaks = {size: summary[size][name]["peak_rss_mib"] for size in sizes if name in summary[size]}
        top = max(peaks.values())
        lo, hi = peaks[sizes[0]], peaks[sizes[-1]]
        allowed = max(TARGETS["flat_fraction"] * lo, TARGETS["flat_mib"])
        checks.append({"measurement": name, "peaks_mib": peaks, "under_limit": top < TARGETS["peak_mib"],
                       "flat": abs(hi - lo) <= allowed, "growth_mib": round(hi - lo, 1)})
    return checks


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "NOT MET")


def report(bench: Bench, started: float, main: int) -> dict[str, Any]:
    summary = summarize(bench.runs)
    rows = table_rows(summary)
    rts = ratios(summary, main)
    mem = memory_checks(summary)
    env = environment(bench)
    out = sys.stdout
    out.write(f"\n=== Results (wall: median of {bench.args.repeat} runs, also best; "
              "peak RSS: highest of the runs) ===\n")
    out.write(text_table(rows) + "\n\n")
    out.write(f"Ratios (from median wall times at {main} MB):\n")
    for r in rts:
        out.write(f"  {r['ratio']:<62} {r['value']:6.2f}   target {r['target']:<8} {verdict(r['met'])}\n")
    out.write(f"\nPeak RSS of our CLI process (target < {TARGETS['peak_mib']:.0f} MiB and flat across sizes "
              f"{', '.join(str(s) for s in sorted(summary))} MB):\n")
    for m in mem:
        peaks = ", ".join(f"{s} MB: {v:.1f}" for s, v in m["peaks_mib"].items())
        out.write(f"  {m['measurement']:<28} {peaks}  (growth {m['growth_mib']:+.1f} MiB)  "
                  f"< limit: {verdict(m['under_limit'])}, flat: {verdict(m['flat'])}\n")
    out.write(f"\nWhere the CPU goes in our runs at {main} MB (mean CPU seconds; py = our CLI's threads):\n")
    for name, e in summary[main].items():
        if not name.startswith("ours"):
            continue
        th = e["threads"]
        out.write(f"  {name:<28} wall {e['wall_median']:.2f}: {_cpu_brief(e['cpu_sampled_mean'])}"
                  + (f"; python main thread {th['main_thread']:.1f}, other threads {th['other_threads']:.1f}"
                     if th else "") + "\n")
    changed = sorted(k for k, v in env["code"].items() if bench.code_before.get(k) != v)
    changed += sorted(set(bench.code_before) - set(env["code"]))
    if changed:
        out.write(f"\nWARNING: these source files changed while the benchmark ran: {', '.join(changed)}\n")
    out.write(f"\nTotal benchmark time {time.monotonic() - started:.0f} s.\n")

    # Markdown for docs/performance.md
    md = [f"### PostgreSQL backup benchmark ({dt.date.today().isoformat()})", "",
          f"`bench/pg_backup.py --sizes {','.join(str(s) for s in sorted(summary))}`, {env['cpus']} CPUs, "
          f"PostgreSQL {env['server_version']}, Python {env['python']}, throwaway server on 127.0.0.1 "
          f"(fsync=off). Wall time is the median of {bench.args.repeat} runs; peak RSS is the highest "
          "ru_maxrss of our CLI process alone (not pg_dump/psql). Sizes are MiB. Code: stream/chain.py "
          f"{env['code'].get('kkua_backupd/stream/chain.py', '?')}, sources/postgres/load.py "
          f"{env['code'].get('kkua_backupd/sources/postgres/load.py', '?')} (sha256 prefixes)"
          + (f"; WARNING: changed during the run: {', '.join(changed)}" if changed else "") + ".", ""]
    for size, info in sorted(bench.sizes_info.items()):
        md.append(f"- {size} MB: table with indexes {info['table_bytes'] / MIB:.0f} MiB, database "
                  f"{info['database_bytes'] / MIB:.0f} MiB, {info['rows']:,} rows")
    md += ["", md_table(HEADER, rows), "",
           md_table(["ratio", "value", "target", "result"],
                    [[r["ratio"], f"{r['value']:.2f}", r["target"], verdict(r["met"])] for r in rts]), "",
           md_table(["our CLI", *[f"peak RSS MiB at {s} MB" for s in sorted(summary)], "< 100 MiB", "flat"],
                    [[m["measurement"], *[f"{v:.1f}" for v in m["peaks_mib"].values()],
                      verdict(m["under_limit"]), verdict(m["flat"])] for m in mem])]
    out.write("\n----- Markdown -----\n" + "\n".join(md) + "\n")
    out.flush()
    return {"environment": env, "sizes": {str(k): v for k, v in bench.sizes_info.items()},
            "summary": {str(k): v for k, v in summary.items()}, "ratios": rts, "memory": mem,
            "runs": [r.__dict__ for r in bench.runs], "targets": TARGETS, "markdown": "\n".join(md)}


def environment(bench: Bench) -> dict[str, Any]:
    with bench.server.connect() as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
    gzip = subprocess.run(["gzip", "--version"], capture_output=True, text=True, check=False).stdout
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "server_version": version,
            "kernel": platform.release(), "repeat": bench.args.repeat, "code": code_fingerprint(),
            "code_at_start": bench.code_before,
            "gzip": gzip.splitlines()[0] if gzip else None}


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=250,
                   help="main size: the table (with indexes) is filled to at least this many MB (default 250)")
    p.add_argument("--sizes", help="comma-separated sizes in MB for the memory comparison, e.g. 120,250; "
                                   "the largest gets the full comparison (default: 48%% of --size-mb and --size-mb)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, at least 2 (default 3)")
    p.add_argument("--json-dir", default=str(ROOT / "bench" / "results"),
                   help="where to write the JSON results (default bench/results)")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON results")
    args = p.parse_args(argv)
    if args.repeat < 2:
        p.error("--repeat must be at least 2")
    if args.sizes:
        try:
            sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        except ValueError:
            p.error("--sizes takes whole numbers separated by commas")
    else:
        sizes = sorted({max(10, args.size_mb * 12 // 25), args.size_mb})
    if len(sizes) < 2 or sizes[0] <= 0:
        p.error("need two different positive sizes for the memory comparison")
    args.size_list = sizes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    workdir = Path(tempfile.mkdtemp(prefix="kkua-bench-"))
    server: ThrowawayPostgres | None = None
    bench: Bench | None = None
    try:
        log(f"sizes {args.size_list} MB, {args.repeat} runs each, workdir {workdir}")
        server = ThrowawayPostgres()
        server.start()
        log(f"throwaway PostgreSQL on {server.host}:{server.port} ({server.tmp_dir})")
        with server.connect() as conn:
            # Steadier timings: no autovacuum/analyze waking up between or during runs.
            conn.execute("ALTER SYSTEM SET autovacuum = off")
            conn.execute("SELECT pg_reload_conf()")
        server.create_database(DBNAME)
        with server.connect(DBNAME) as conn:
            create_sample_data(conn)
        bench = Bench(args, server, workdir)
        main_size = args.size_list[-1]
        for size in args.size_list:
            bench.run_size(size, full=size == main_size)
        path = Path(args.json_dir) / f"pg_backup_{time.strftime('%Y%m%d_%H%M%S')}.json"
        if not args.no_json:  # the raw runs first, so a failing summary loses nothing
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"runs": [r.__dict__ for r in bench.runs],
                                        "sizes": bench.sizes_info}, indent=2, default=str) + "\n")
        result = report(bench, started, main_size)
        if not args.no_json:
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            log(f"JSON results written to {path}")
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        if bench is not None:
            bench.runner.kill_current()
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
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
