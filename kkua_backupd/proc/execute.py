"""The one place child processes are run.

Every job's children share a process group, so one signal stops them all. Each child's stderr is
streamed into the log (its last lines kept for the error message), each step has a timeout (SIGTERM,
a grace period, then SIGKILL), and when one child fails its siblings are stopped. Secrets reach a child
only through its environment; argv is built from tuples and never goes through a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

from kkua_backupd.errors import CommandFailed, StepTimeout
from kkua_backupd.obs.logs import get_logger

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
TAIL_LINES = 20
# Variables a child never inherits: they are ours (secrets, systemd's socket), not the child's.
_WITHHELD = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "DATABASE_PASSWORD", "REDIS_PASSWORD",
             "PGPASSWORD", "REDISCLI_AUTH", "KKUA_HEALTHCHECKS_URL", "KKUA_WEBHOOK_URL", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN")
_QUIET_PREFIXES = ("NOTICE:", "DETAIL:", "HINT:")


def widen_pipe(fd: int) -> None:
    """Give a pipe 1 MiB instead of 64 KiB: a dump written in 4 KiB blocks then wakes us
    a quarter as often. Best effort (the limit is /proc/sys/fs/pipe-max-size)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours without secrets and systemd variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _WITHHELD}
    if extra:
        env.update(extra)
    return env


@dataclass
class Child:
    """One running child process of a ProcessGroup."""

    name: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    timed_out: bool = False
    timeout: float | None = None
    reader: threading.Thread | None = None
    timer: threading.Timer | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.popen.stdout

    def read(self, size: int) -> bytes:
        """Read up to `size` bytes of stdout, returning as soon as some are available (b"" at the end)."""
        assert self.popen.stdout is not None
        return os.read(self.popen.stdout.fileno(), size)


class ProcessGroup:
    """The children of one job; leaving the `with` block on an error stops every child still running."""

    def __init__(self, job: str, *, grace: float = 10.0) -> None:
        self.job = job
        self.grace = grace
        self.children: list[Child] = []
        self.pgids: set[int] = set()
        self.failed: Child | None = None
        self._closing = False
        self._lock = threading.Lock()
        self.log = get_logger(job=job)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or any(c.popen.poll() is None for c in self.children):
            self.stop_all()
        for child in self.children:
            if child.timer is not None:
                child.timer.cancel()
            if child.reader is not None:
                child.reader.join(timeout=5)

    def spawn(self, argv: Sequence[str], *, name: str | None = None, env: Mapping[str, str] | None = None,  # noqa: PLR0913 - keyword-only options of one child process
              stdin: int | IO[Any] | None = DEVNULL, stdout: int | IO[Any] | None = PIPE,
              timeout: float | None = None, pass_fds: Sequence[int] = ()) -> Child:
        """Start `argv` in this job's process group, with the descriptors `pass_fds` left open in it (a pipe
        carrying a secret, say); raises CommandFailed if it cannot be started."""
        args = tuple(str(a) for a in argv)
        label = name or os.path.basename(args[0])
        group = next((g for g in self.pgids if self._group_alive(g)), 0)
        try:
            popen = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=PIPE,
                                     env=child_environment(env), process_group=group, close_fds=True,
                                     pass_fds=tuple(pass_fds))
        except FileNotFoundError:
            raise CommandFailed(f"{label}: program {args[0]} not found",
                                hint="install it (see docs/install.md)") from None
        except OSError as exc:
            raise CommandFailed(f"{label}: cannot start {args[0]}: {exc.strerror}") from None
        self.pgids.add(group or popen.pid)
        if popen.stdout is not None:
            widen_pipe(popen.stdout.fileno())
        child = Child(name=label, argv=args, popen=popen, timeout=timeout)
        self.children.append(child)
        self.log.debug("process started", process=label, pid=popen.pid)
        child.reader = threading.Thread(target=self._watch, args=(child,), name=f"stderr-{label}", daemon=True)
        child.reader.start()
        if timeout is not None:
            child.timer = threading.Timer(timeout, self._timed_out, args=(child,))
            child.timer.daemon = True
            child.timer.start()
        return child

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        return True

    def _watch(self, child: Child) -> None:
        """Stream the child's stderr into the log, then note its exit and stop siblings on failure."""
        assert child.popen.stderr is not None
        for raw in iter(child.popen.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            child.tail.append(line)
            stripped = line.split(":  ", 1)[-1] if line.startswith("psql:") else line
            if stripped.startswith(_QUIET_PREFIXES) or ": NOTICE:" in line:
                self.log.debug(line, process=child.name)
            else:
                self.log.warning(line, process=child.name)
        child.popen.stderr.close()
        rc = child.popen.wait()
        if child.timer is not None:
            child.timer.cancel()
        if rc != 0 and not self._closing:
            with self._lock:
                if self.failed is None:
                    self.failed = child
            self.log.debug("process failed; stopping its siblings", process=child.name, returncode=rc)
            self.stop_all(exclude=child)

    def _timed_out(self, child: Child) -> None:
        if child.popen.poll() is None:
            child.timed_out = True
            self.log.error("step timed out; stopping it", process=child.name, timeout_s=child.timeout)
            self.stop_all()

    def stop_all(self, exclude: Child | None = None) -> None:
        """SIGTERM every running child's group, wait up to the grace period, then SIGKILL what is left."""
        self._closing = True
        running = [c for c in self.children if c is not exclude and c.popen.poll() is None]
        if not running:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in running:
            remaining = deadline - time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(remaining, 0.01))
        if any(c.popen.poll() is None for c in running):
            self.log.warning("children did not stop within the grace period; killing them",
                             grace_s=self.grace)
            self._signal(signal.SIGKILL)
            for child in running:
                child.popen.wait()

    def _signal(self, sig: signal.Signals) -> None:
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        for child in self.children:  # a child that left the group still gets the signal
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(sig)

    def wait(self, child: Child, *, what: str | None = None, hint: str | None = None) -> int:
        """Wait for `child`; raises StepTimeout or CommandFailed (with its stderr tail) unless it exited 0."""
        rc = child.popen.wait()
        if child.reader is not None:
            child.reader.join(timeout=10)
        label = what or child.name
        if child.timed_out:
            raise StepTimeout(f"{label} timed out after {child.timeout:.0f} s and was stopped",
                              stderr_tail=list(child.tail), returncode=rc,
                              hint=hint or "raise the step's timeout in the config or find what makes it slow")
        if rc != 0:
            reason = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise CommandFailed(f"{label} {reason}", stderr_tail=list(child.tail), returncode=rc, hint=hint)
        return rc


def run(argv: Sequence[str], *, job: str, env: Mapping[str, str] | None = None, timeout: float = 60,  # noqa: PLR0913 - keyword-only options of one child process
        input_bytes: bytes | None = None, what: str | None = None) -> bytes:
    """Run one command to completion and return its stdout; raises CommandFailed or StepTimeout."""
    with ProcessGroup(job) as group:
        child = group.spawn(argv, env=env, stdin=PIPE if input_bytes is not None else DEVNULL,
                            stdout=PIPE, timeout=timeout)
        feeder = None
        if input_bytes is not None:
            feeder = threading.Thread(target=_feed, args=(child, input_bytes), daemon=True)
            feeder.start()
        assert child.stdout is not None
        out = child.stdout.read()
        child.stdout.close()
        if feeder is not None:
            feeder.join()
        group.wait(child, what=what)
        return out


def _feed(child: Child, data: bytes) -> None:
    assert child.stdin is not None
    try:
        child.stdin.write(data)
        child.stdin.close()
    except BrokenPipeError:
        pass
