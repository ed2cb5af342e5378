"""Jobs run as subprocess workers (`python -m kkua_backupd run JOB`), each in its own process group.

The daemon and `kkua-backup backup all` / `run all` start workers the same way, here: the same Python and
package as the caller, the config path on the command line, the environment without systemd's variables
(a worker must not talk to the daemon's notify socket) but with the database passwords when they came
from the environment, stdin from /dev/null and the worker's log lines going straight to the caller's
stdout/stderr (the journal under systemd). A worker leads its own process group so it can be stopped with
its children; its own SIGTERM handling stops them and removes partial files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kkua_backupd.errors import CommandFailed
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.proc.execute import child_environment

RUNNER_ENV = "KKUA_BACKUP_RUNNER"
# child_environment withholds these (they are secrets), but a worker needs them when the operator gave
# them this way; the environment of the child is an allowed channel, argv never is.
_PASSED_SECRETS = ("DATABASE_PASSWORD", "REDIS_PASSWORD", "KKUA_HEALTHCHECKS_URL", "KKUA_WEBHOOK_URL",
                   "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# How long `backup all` gives its workers after SIGTERM/Ctrl-C before killing them (the daemon uses
# daemon.stop_grace from the config).
DEFAULT_GRACE = 30.0


def worker_argv(job: str, config_path: Path | None, *, command: str = "run", json_mode: bool = False,
                extra_args: Sequence[str] = ()) -> tuple[str, ...]:
    """The command line of a worker: `python -m kkua_backupd COMMAND [JOB] [--config PATH] ...` (no JOB for a
    command that takes none, such as `push`)."""
    argv: list[str] = [sys.executable, "-m", "kkua_backupd", command, *([job] if job else [])]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += list(extra_args)
    if json_mode:
        argv.append("--json")
    return tuple(argv)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children in other process groups included), from /proc."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        by_parent.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Worker:
    """One running worker process (the leader of its own process group)."""

    job: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    output: bytes = b""
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit status if it ended (negative: killed by that signal), else None."""
        return self.popen.poll()

    def terminate(self) -> None:
        """SIGTERM the worker's process group (the worker then stops its own children)."""
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's group and every descendant (a dump tool leads a group of its own)."""
        victims = descendants(self.pid)
        self._signal_group(signal.SIGKILL)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # groups led by a descendant (pg_dump's pipeline)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit status."""
        self.terminate()
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            get_logger(job=self.job).warning("worker did not stop within the grace period; killing it",
                                             pid=self.pid, grace_s=grace)
            self.kill()
            return self.popen.wait()

    def wait(self) -> int:
        """Wait for the end; with captured output, also for all of it."""
        rc = self.popen.wait()
        if self._reader is not None:
            self._reader.join()
        return rc

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        self.output = self.popen.stdout.read()
        self.popen.stdout.close()


def spawn(job: str, config_path: Path | None, *, runner: str, command: str = "run", json_mode: bool = False,  # noqa: PLR0913 - keyword-only options of one worker's command line
          extra_args: Sequence[str] = ()) -> Worker:
    """Start a worker for `job`; with `json_mode` its stdout (one JSON document) is captured, otherwise it
    goes where ours goes. Raises CommandFailed when the process cannot be started."""
    argv = worker_argv(job, config_path, command=command, json_mode=json_mode, extra_args=extra_args)
    extra = {k: os.environ[k] for k in _PASSED_SECRETS if os.environ.get(k)}
    extra[RUNNER_ENV] = runner
    try:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if json_mode else None,
                                 stderr=None, env=child_environment(extra), process_group=0, close_fds=True)
    except OSError as exc:
        raise CommandFailed(f"cannot start the {job} worker ({argv[0]}): {exc.strerror}",
                            hint="check that the installation is complete") from None
    worker = Worker(job=job, argv=argv, popen=popen)
    if json_mode:
        worker._reader = threading.Thread(target=worker._collect, name=f"worker-{job}", daemon=True)
        worker._reader.start()
    return worker


def _result(worker: Worker, rc: int) -> dict[str, Any]:
    code = rc if rc >= 0 else 1
    doc: Any = None
    text = worker.output.decode("utf-8", "replace").strip()
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"error": f"the {worker.job} worker printed something that is not JSON: {text[:200]}"}
    if doc is None and code != 0:
        reason = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        doc = {"error": f"the {worker.job} worker {reason}"}
    return {"exit_code": code, "result": doc}


def _wait_all(running: list[Worker], grace: float) -> dict[str, int]:
    """Wait for every worker; on SIGTERM (Interrupted) or Ctrl-C stop them all, then re-raise."""
    codes: dict[str, int] = {}
    try:
        for worker in running:
            codes[worker.job] = worker.wait()
    except BaseException:
        log = get_logger()
        log.warning("stopping the workers", jobs=",".join(w.job for w in running if w.poll() is None))
        for worker in running:
            worker.terminate()  # every group at once, then the grace for all of them together
        deadline = time.monotonic() + grace
        for worker in running:
            try:
                worker.popen.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.popen.wait()
        raise
    return codes


def run_all(config_path: Path | None, batches: list[list[str]], *, command: str, json_mode: bool,
            extra_args: list[str]) -> tuple[dict[str, Any], int]:
    """Run `kkua-backup COMMAND JOB` for each job: the batches one after the other, the jobs of a batch in
    parallel (the caller's registry says which: the backups, then retention). Returns
    {"jobs": {job: {"exit_code": n, "result": doc-or-error}}} and the highest exit code. SIGTERM or
    Ctrl-C stops the workers (grace, then SIGKILL) and is re-raised."""
    runner = os.environ.get(RUNNER_ENV, "cli")
    log = get_logger()
    results: dict[str, Any] = {}
    for batch in batches:
        if not batch:
            continue
        running = []
        try:
            for job in batch:
                running.append(spawn(job, config_path, runner=runner, command=command, json_mode=True,
                                     extra_args=extra_args))
        except CommandFailed:
            for worker in running:
                worker.stop(DEFAULT_GRACE)
            raise
        log.info("workers started", jobs=",".join(w.job for w in running),
                 pids=",".join(str(w.pid) for w in running))
        codes = _wait_all(running, DEFAULT_GRACE)
        for worker in running:
            results[worker.job] = _result(worker, codes[worker.job])
            code = results[worker.job]["exit_code"]
            if code == 0:
                log.info("job ended", job=worker.job, exit_code=0)
            else:
                error = results[worker.job]["result"]
                log.error("job failed", job=worker.job, exit_code=code,
                          error=error.get("error") if isinstance(error, dict) else None)
    highest = max((r["exit_code"] for r in results.values()), default=0)
    return {"jobs": results}, highest
