"""The idle daemon: resident memory, CPU seconds per idle hour, wake-ups.

Starts the real `kkua-backupd` with a config whose next job is months away, `WATCHDOG_USEC` set (as
`WatchdogSec=` does) and a test `NOTIFY_SOCKET`, lets it settle, then watches it for `--seconds`:
VmRSS / VmHWM and threads from /proc/PID/status, CPU time from /proc/PID/task/*/schedstat (ns;
/proc/PID/stat ticks where that is missing) scaled to an hour, voluntary and involuntary context
switches (each voluntary one is the loop going to sleep after a wake-up) and the sd_notify messages.
Targets: RSS < 60 MB, CPU < 1 s per idle hour, wake-ups = watchdog pings only.

    .venv/bin/python bench/daemon_idle.py [--seconds 180] [--watchdog-sec 60] [--no-json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RSS_TARGET_MB = 60.0
CPU_TARGET_S_PER_H = 1.0
TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads) from /proc/PID/stat (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def cpu_ns(pid: int) -> int | None:
    """CPU time of every thread in nanoseconds from /proc/PID/task/*/schedstat (finer than the clock
    ticks of /proc/PID/stat), or None where the kernel does not provide it."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def kib(value: str) -> float:
    return int(value.split(maxsplit=1)[0]) / 1024


def sample(pid: int) -> dict[str, float]:
    status = proc_status(pid)
    ns = cpu_ns(pid)
    return {"cpu_s": ns / 1e9 if ns is not None else cpu_seconds(pid),
            "rss_mb": kib(status["VmRSS"]), "hwm_mb": kib(status["VmHWM"]),
            "threads": float(status["Threads"]), "voluntary": float(status["voluntary_ctxt_switches"]),
            "involuntary": float(status["nonvoluntary_ctxt_switches"]), "t": time.monotonic()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to watch the idle daemon")
    parser.add_argument("--watchdog-sec", type=float, default=60.0, help="WatchdogSec= to simulate")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after READY=1 before measuring")
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/daemon_idle_*.json")
    parser.add_argument("--json-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="kkua-bench-daemon-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(root / "notify.sock"))
    sock.settimeout(0.5)
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    config = root / "config.toml"
    # Jobs due on 1 January only: nothing runs while we measure (unless run on 31 December near midnight).
    config.write_text(f'backup_dir = "{root / "backups"}"\nlog_dir = "{root / "logs"}"\n\n[schedule]\n'
                      'postgres = "*-01-01 02:00:00"\nredis = "*-01-01 03:00:00"\nretention = "*-01-01 04:00:00"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "KKUA_BACKUP_CONFIG")}
    env.update(NOTIFY_SOCKET=str(root / "notify.sock"), WATCHDOG_USEC=str(int(args.watchdog_sec * 1_000_000)))
    out = (root / "daemon.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "kkua_backupd.daemon", "--config", str(config)],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(m.startswith("READY=1") for _, m in messages):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write((root / "daemon.out").read_text())
                raise SystemExit("the daemon did not become ready")
            time.sleep(0.05)
        startup = sample(proc.pid)
        sys.stderr.write(f"ready; settling {args.settle:.0f} s, then measuring {args.seconds:.0f} s\n")
        time.sleep(args.settle)
        first = sample(proc.pid)
        count_from = len(messages)
        time.sleep(args.seconds)
        last = sample(proc.pid)
        window = list(messages[count_from:])
    finally:
        done.set()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        out.close()
        reader.join(timeout=5)
        sock.close()
        shutil.rmtree(root, ignore_errors=True)

    elapsed = last["t"] - first["t"]
    cpu = last["cpu_s"] - first["cpu_s"]
    pings = sum(1 for _, m in window if m == "WATCHDOG=1")
    others = [m for _, m in window if m != "WATCHDOG=1"]
    expected = elapsed / (args.watchdog_sec / 2)
    result: dict[str, Any] = {
        "when": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1), "watchdog_sec": args.watchdog_sec,
        "rss_mb": round(last["rss_mb"], 1), "peak_rss_mb": round(last["hwm_mb"], 1),
        "rss_after_start_mb": round(startup["rss_mb"], 1), "threads": int(last["threads"]),
        "cpu_s": round(cpu, 4), "cpu_s_per_hour": round(cpu * 3600 / elapsed, 3),
        "voluntary_switches": int(last["voluntary"] - first["voluntary"]),
        "involuntary_switches": int(last["involuntary"] - first["involuntary"]),
        "watchdog_pings": pings, "expected_pings": round(expected, 1), "other_messages": others,
        "exit_code": code,
    }
    result["wakeups_per_hour"] = round(result["voluntary_switches"] * 3600 / elapsed, 1)
    checks = {
        f"RSS < {RSS_TARGET_MB:.0f} MB": result["peak_rss_mb"] < RSS_TARGET_MB,
        f"CPU < {CPU_TARGET_S_PER_H:.0f} s per idle hour": result["cpu_s_per_hour"] < CPU_TARGET_S_PER_H,
        "wake-ups = watchdog pings only": result["voluntary_switches"] <= pings + 1 and abs(pings - expected) <= 1.5,
        "exit 0 on SIGTERM": code == 0,
    }
    result["checks"] = checks

    print(f"idle kkua-backupd over {elapsed:.0f} s, WatchdogSec={args.watchdog_sec:g}")
    print(f"  resident memory   {result['rss_mb']} MB (peak {result['peak_rss_mb']} MB), {result['threads']} thread(s)")
    print(f"  CPU               {result['cpu_s']} s -> {result['cpu_s_per_hour']} s per idle hour")
    print(f"  wake-ups          {result['voluntary_switches']} voluntary context switches "
          f"({result['wakeups_per_hour']}/h), {result['involuntary_switches']} involuntary")
    print(f"  sd_notify         {pings} WATCHDOG=1 (expected {expected:.1f}), other: {others or 'none'}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print()
    print("| idle daemon | value | target |")
    print("|---|---|---|")
    print(f"| resident memory (VmRSS / VmHWM) | {result['rss_mb']} / {result['peak_rss_mb']} MB | < 60 MB |")
    print(f"| CPU per idle hour (measured {elapsed:.0f} s, scaled) | {result['cpu_s_per_hour']} s | < 1 s |")
    print(f"| wake-ups per hour (voluntary context switches) | {result['wakeups_per_hour']} | "
          f"watchdog only ({3600 / (args.watchdog_sec / 2):.0f}/h at WatchdogSec={args.watchdog_sec:g}) |")
    if not args.no_json:
        folder = Path(args.json_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"daemon_idle_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        sys.stderr.write(f"results: {path}\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
