"""The main job on a built-in default: a throwaway PostgreSQL and a throwaway Redis with sample data, backed
up, verified and restored with the real `kkua-backup` command line, then compared table by table and key by key.

Run as root on a Debian machine with PostgreSQL and Redis installed: `python -m kkua_backupd.demo [--keep]`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kkua_backupd.demo.redis_sample import compare, create_sample, snapshot
from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data, schema_dump, table_contents
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.sources.postgres.manifest import PostgresDetails
from kkua_backupd.sources.redis.local import LocalRedis
from kkua_backupd.sources.redis.manifest import RedisDetails


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Demo:
    """One demo run: a sandbox server, a config, and the CLI run against them."""

    def __init__(self, root: Path, server: ThrowawayPostgres, redis_server: LocalRedis) -> None:
        self.root = root
        self.server = server
        self.redis = redis_server
        self.config = root / "config.toml"
        self.backups = root / "backups"
        self.logs = root / "logs"
        self.timings: list[tuple[str, float, int]] = []

    def write_config(self, fmt: str, compression: str) -> None:
        pass_file = self.root / "pg.pass"
        pass_file.write_text(self.server.password + "\n")
        pass_file.chmod(0o600)
        redis_pass = self.root / "redis.pass"
        redis_pass.write_text(f"{self.redis.password}\n")
        redis_pass.chmod(0o600)
        self.config.write_text(
            f'backup_dir = "{self.backups}"\nlog_dir = "{self.logs}"\n\n[postgres]\nhost = "{self.server.host}"\n'
            f'port = {self.server.port}\ndatabase = "kkua"\nuser = "postgres"\npassword_file = "{pass_file}"\n'
            f'format = "{fmt}"\ncompression = "{compression}"\n\n'
            f'[redis]\nhost = "127.0.0.1"\nport = {self.redis.port}\npassword_file = "{redis_pass}"\n'
            f'compression = "{compression}"\n')

    def compare_redis(self, expected: Any) -> str:
        differences = compare(expected, snapshot(self.redis))
        if differences:
            raise SystemExit("demo failed: Redis differs from before the backup: " + "; ".join(differences[:5]))
        dbs = sorted({db for db, _ in expected})
        return f"{len(expected)} keys in databases {dbs}: type, value and TTL of every key are identical"

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
    _say("Starting a throwaway PostgreSQL server and a throwaway Redis server with sample data ...")
    with ThrowawayPostgres(base_dir=root) as server, \
            LocalRedis(root / "redis-server", password=secrets.token_urlsafe(18)) as redis_server:
        server.create_database("kkua")
        with server.connect("kkua") as conn:
            create_sample_data(conn)
        _say(f"  server {server.host}:{server.port}, database kkua "
             "(tables with foreign keys, a view, a function and trigger, a sequence, Korean text, NULLs, "
             "a 5 MiB row)")
        counts = create_sample(redis_server)
        _say(f"  redis 127.0.0.1:{redis_server.port} with a password: keys per database {counts} (strings incl. "
             "binary and 5 MiB, lists, hashes, sets, sorted sets, streams with consumer groups, HyperLogLog, TTLs)")
        demo = Demo(root, server, redis_server)
        for fmt, compression in (("plain", "gzip"), ("custom", "zstd")):
            demo.write_config(fmt, compression)
            _say(f"\n=== format={fmt} compression={compression} ===")
            manifest = demo.cli("backup", "postgres", "--test-restore")
            for f in manifest["files"]:
                _say(f"  backup file: {demo.backups / 'postgres' / f['name']} ({human_bytes(f['size'])}, "
                     f"sha256 {f['sha256'][:16]}...)")
            test = PostgresDetails.model_validate(manifest["details"]).test_restore
            assert test is not None, "backup --test-restore records its test restore"
            _say(f"  test restore: {'passed' if test.ok else 'FAILED'} ({test.tables} tables, "
                 f"{test.rows} rows, checksums compared)")
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
        _say("\n=== Redis: backup, verify, restore after damage ===")
        before = snapshot(redis_server)
        manifest = demo.cli("backup", "redis")
        for f in manifest["files"]:
            _say(f"  backup file: {demo.backups / 'redis' / f['name']} ({human_bytes(f['size'])})")
        details = RedisDetails.model_validate(manifest["details"])
        _say(f"  captured over the replication protocol ({details.capture}), "
             f"RDB version {details.rdb_version}, keys per db {details.keyspace}")
        report = demo.cli("verify", "latest", "--restore-test")
        _say(f"  verify --restore-test: {'ok' if all(r['ok'] for r in report) else 'FAILED'} "
             "(sha256, decompression, RDB checked and loaded into a throwaway redis-server)")
        with redis_server.client(0) as client:
            client.flushdb()
            client.set("written-after-the-backup", "x")
        with redis_server.client(5) as client:
            client.flushdb()
        _say("  emptied databases 0 and 5, wrote a key the backup does not have")
        report = demo.cli("restore", "redis", "latest", "--force", "--flush")
        _say(f"  restored {report['file']} ({report['mode']} mode): {report.get('keys')} keys; "
             f"safety backup: {(report.get('safety_backup') or {}).get('file')}")
        _say(f"  compared with before the backup: {demo.compare_redis(before)}")

        listing = demo.cli("list")
        _say("\n=== result ===")
        for s in listing:
            _say(f"  {s['kind']:<8} {s['type']:<7} {s['id']}  {s['status']:<6} "
                 f"{human_bytes(sum(f['size'] for f in s['files'])):>10}  {s['files'][0]['name']}")
        _say(f"\n  {'step':<62} seconds  exit")
        for step, seconds, code in demo.timings:
            _say(f"  {step[:62]:<62} {seconds:7.2f}  {code}")
        _say(f"\n  logs: {demo.logs}/backup.log, {demo.logs}/redis_backup.log, {demo.logs}/restore.log "
             "(removed at the end unless --keep)")
        _say("\nDemo passed: backups, verification, test restores and restores all agree with the source.")


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
