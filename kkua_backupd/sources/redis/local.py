"""Local `redis-server` processes we start ourselves: the throwaway server a logical restore loads an RDB
into, and the servers the demo, the tests and the benchmarks use.

A server lives in its own folder (its `dir`, config file and log), listens on 127.0.0.1 on a free port and
is stopped with SHUTDOWN NOSAVE, so it never writes over the file it was started from. Its password, when
it has one, is written into its config file (mode 0600), never onto a command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kkua_backupd.errors import JobError

_READY_TIMEOUT_S = 60.0
_START_ATTEMPTS = 5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and read it back); raises OSError
    when no socket can be bound. Used for every throwaway server, PostgreSQL ones included."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_bin(name: str, bin_dir: Path | None = None) -> Path | None:
    """`redis-server`, `redis-check-rdb` or `redis-cli` from bin_dir, else from PATH."""
    if bin_dir is not None:
        candidate = bin_dir / name
        return candidate if os.access(candidate, os.X_OK) else None
    found = shutil.which(name)
    return Path(found) if found else None


def _die_with_parent() -> None:
    """In the child before exec: be killed when our parent dies (Linux prctl PR_SET_PDEATHSIG, SIGKILL)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalRedis:
    """A `redis-server` on 127.0.0.1:<free port> in its own folder.

    `settings` are extra redis.conf directives (`{"appendonly": "yes"}`); `dbfilename` names an RDB already
    placed in `folder` for the server to load at start. Use as a context manager or call start()/stop().
    """

    def __init__(self, folder: Path | None = None, *, password: str | None = None,  # noqa: PLR0913 - keyword-only settings of a local redis-server
                 settings: Mapping[str, str] | None = None, acl_lines: list[str] | None = None,
                 bin_dir: Path | None = None, keep_folder: bool = False,
                 ready_timeout: float = _READY_TIMEOUT_S, die_with_parent: bool = False) -> None:
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="kkua-redis-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.settings = dict(settings or {})
        self.acl_lines = list(acl_lines or [])
        self.keep_folder = keep_folder
        self.ready_timeout = ready_timeout
        # A server holding a backup for one run of ours must not outlive it, even after kill -9: the kernel
        # kills it when the thread that started it ends (prctl PR_SET_PDEATHSIG).
        self.die_with_parent = die_with_parent
        server = find_redis_bin("redis-server", bin_dir)
        if server is None:
            raise JobError("redis-server is not installed", hint="install it: apt-get install redis-server")
        self.server_bin = server
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    @property
    def conf_path(self) -> Path:
        return self.folder / "redis.conf"

    def _write_conf(self) -> None:
        lines = [f"port {self.port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no",
                 f"dir {_quote(str(self.folder))}", f"logfile {_quote(str(self.log_path))}", "save \"\"",
                 "appendonly no", "databases 16"]
        lines += [f"{key} {value}" for key, value in self.settings.items()]
        if self.password is not None:
            lines.append(f"requirepass {_quote(self.password)}")
        if self.acl_lines:
            acl = self.folder / "users.acl"
            acl.write_text("\n".join(self.acl_lines) + "\n")
            acl.chmod(0o600)
            lines.append(f"aclfile {_quote(str(acl))}")
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.conf_path.chmod(0o600)

    def start(self) -> Self:
        """Start the server and wait until it answers PING with its dataset loaded."""
        last_error = ""
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            self._write_conf()
            self.process = subprocess.Popen([str(self.server_bin), str(self.conf_path)], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True,
                                            # the prctl call only: no lock, safe after fork in a threaded parent
                                            preexec_fn=_die_with_parent if self.die_with_parent else None)  # noqa: PLW1509
            try:
                self._wait_ready()
                return self
            except JobError as exc:
                last_error = str(exc)
                self.kill()
                if "Address already in use" not in last_error:
                    break
        raise JobError(f"could not start a local redis-server: {last_error}",
                       hint=f"see {self.log_path}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise JobError(f"redis-server exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with self.client(socket_timeout=2) as client:
                    info = client.info("persistence")
                    if not info.get("loading"):
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            time.sleep(0.05)
        raise JobError(f"redis-server did not become ready within {self.ready_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text[-lines:])

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (as the default user)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, **kwargs)

    def stop(self) -> None:
        """SHUTDOWN NOSAVE (never writes over the loaded file), then wait; SIGKILL if it does not go."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            # No retries: redis-py would otherwise reconnect to the server that just went away.
            with self.client(socket_timeout=5, retry=Retry(NoBackoff(), 0)) as client:
                client.shutdown(nosave=True)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        self.stop()
        if self._own_folder and not self.keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
