"""The main job on a built-in default: a throwaway PostgreSQL with sample data, backed up, verified and
restored with the real `kkua-backup` command line, then compared table by table.

Run as root on a Debian machine with PostgreSQL installed: `python -m kkua_backupd.demo [--keep]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .progress import human_bytes
from .sandbox import ThrowawayPostgres, create_sample_data, schema_dump, table_contents


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Demo:
    """One demo run: a sandbox server, a config, and the CLI run against them."""

    def __init__(self, root: Path, server: ThrowawayPostgres) -> None:
        self.root = root
        self.server = server
        self.config = root / "config.toml"
        self.backups = root / "backups"
        self.logs = root / "logs"
        self.timings: list[tuple[str, float, int]] = []

    def write_config(self, fmt: str, compression: str) -> None:
        pass_file = self.root / "pg.pass"
        pass_file.write_text(self.server.password + "\n")
        pass_file.chmod(0o600)
        self.config.write_text(
            f'backup_dir = "{self.backups}"\nlog_dir = "{self.logs}"\n\n[postgres]\nhost = "{self.server.host}"\n'
            f'port = {self.server.port}\ndatabase = "kkua"\nuser = "postgres"\npassword_file = "{pass_file}"\n'
            f'format = "{fmt}"\ncompression = "{compression}"\n')

    def cli(self, *args: str) -> Any:
        """Run `kkua-backup --json ARGS`; print its log lines indented; return its JSON output."""
        started = time.monotonic()
        _say(f"\n$ kkua-backup {' '.join(args)}")
        proc = subprocess.run([sys.executable, "-m", "kkua_backupd", "--config", str(self.config), "--json", *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        for line in proc.stderr.splitlines():
            _say(f"    {line}")
        elapsed = time.monotonic() - started
        self.timings.append((" ".join(args), elapsed, proc.returncode))
        if proc.returncode != 0:
            raise SystemExit(f"demo failed: kkua-backup {' '.join(args)} exited {proc.returncode}\n{proc.stdout}")
        return json.loads(proc.stdout)

    def compare(self, source: str, restored: str) -> str:
        with self.server.connect(source) as a, self.server.connect(restored) as b:
            left, right = table_contents(a), table_contents(b)
        if left != right:
            differing = sorted(t for t in set(left) | set(right) if left.get(t) != right.get(t))
            raise SystemExit(f"demo failed: tables differ between {source} and {restored}: {differing}")
        if schema_dump(self.server, source) != schema_dump(self.server, restored):
            raise SystemExit(f"demo failed: schema of {restored} differs from {source}")
        rows = sum(len(v) for v in left.values())
        return f"{len(left)} tables, {rows} rows and the whole schema are identical"


def run_demo(root: Path) -> None:
    """Back up, verify and restore a sample database in both formats; raises SystemExit on any failure."""
    _say("Starting a throwaway PostgreSQL server with sample data ...")
    with ThrowawayPostgres(base_dir=root) as server:
        server.create_database("kkua")
        with server.connect("kkua") as conn:
            create_sample_data(conn)
        _say(f"  server {server.host}:{server.port}, database kkua "
             "(tables with foreign keys, a view, a function and trigger, a sequence, Korean text, NULLs, "
             "a 5 MiB row)")
        demo = Demo(root, server)
        for fmt, compression in (("plain", "gzip"), ("custom", "zstd")):
            demo.write_config(fmt, compression)
            _say(f"\n=== format={fmt} compression={compression} ===")
            manifest = demo.cli("backup", "postgres", "--test-restore")
            for f in manifest["files"]:
                _say(f"  backup file: {demo.backups / 'postgres' / f['name']} ({human_bytes(f['size'])}, "
                     f"sha256 {f['sha256'][:16]}...)")
            test = manifest["details"]["test_restore"]
            _say(f"  test restore: {'passed' if test['ok'] else 'FAILED'} ({test['tables']} tables, "
                 f"{test['rows']} rows, checksums compared)")
            report = demo.cli("verify", "latest")
            _say(f"  verify: {'ok' if all(r['ok'] for r in report) else 'FAILED'}")
            target = f"kkua_restored_{fmt}"
            restored = demo.cli("restore", "postgres", "latest", "--target-db", target, "--force")
            _say(f"  restored into {target}: {restored['tables']} tables, {restored['rows']} rows")
            _say(f"  compared with the source: {demo.compare('kkua', target)}")

        _say("\n=== in-place restore after damage ===")
        with server.connect("kkua") as conn:
            conn.execute("DELETE FROM game_words")
            conn.execute("UPDATE users SET nickname = 'damaged-' || id")
            conn.execute("CREATE TABLE after_backup (id int REFERENCES users (id))")
        _say("  deleted every game_words row, renamed every user, added a table referencing users")
        report = demo.cli("restore", "postgres", "latest", "--force")
        _say(f"  restored {report['file']} into kkua; safety backup: {report['safety_backup']['file']}")
        _say(f"  compared with the first restore: {demo.compare('kkua_restored_custom', 'kkua')}")
        listing = demo.cli("list")
        _say("\n=== result ===")
        for s in listing:
            _say(f"  {s['type']:<7} {s['id']}  {s['status']:<6} {human_bytes(sum(f['size'] for f in s['files'])):>10}"
                 f"  {s['files'][0]['name']}")
        _say(f"\n  {'step':<62} seconds  exit")
        for step, seconds, code in demo.timings:
            _say(f"  {step[:62]:<62} {seconds:7.2f}  {code}")
        _say(f"\n  logs: {demo.logs}/backup.log, {demo.logs}/restore.log (removed at the end unless --keep)")
        _say("\nDemo passed: backup, verification, test restore and restores all agree with the source.")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m kkua_backupd.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the backup folder and logs afterwards")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kkua-demo-"))
    os.chmod(root, 0o755)  # the sandbox server runs as the postgres user inside it
    try:
        run_demo(root)
    finally:
        if args.keep:
            _say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
