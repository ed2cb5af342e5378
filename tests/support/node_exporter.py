"""Debian's prometheus-node-exporter on 127.0.0.1 with only the textfile collector: what scrapes the metrics
file in production, so tests read the file the way Prometheus would."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

BINARY = "prometheus-node-exporter"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NodeExporter:
    """`prometheus-node-exporter` with --collector.disable-defaults --collector.textfile on `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NodeExporter:
        exe = shutil.which(BINARY)
        if exe is None:
            raise RuntimeError(f"{BINARY} is not installed (Debian package prometheus-node-exporter; "
                               "scripts/setup.sh installs it)")
        self.proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{self.port}",
                                      "--collector.disable-defaults", "--collector.textfile",
                                      f"--collector.textfile.directory={self.directory}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.scrape_text()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.__exit__()
                    raise RuntimeError(f"{BINARY} did not start: {err[-2000:]}") from None
                time.sleep(0.1)

    def scrape_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return str(response.read().decode("utf-8"))

    def scrape(self, prefix: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample whose name starts with `prefix`: (name, sorted labels) -> value."""
        return samples(self.scrape_text(), prefix)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def samples(text: str, prefix: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of Prometheus text (parsed by prometheus_client's parser) whose name starts with `prefix`."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def daemon_metrics(daemon: subprocess.Popen[str], port: int, timeout: float = 30.0) -> str:
    """The text of a kkua-backupd's /metrics on 127.0.0.1:`port`, once it listens; fails with the daemon's
    output when it exits or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode("utf-8"))
        except OSError:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(daemon.stdout.read() if daemon.stdout else "the daemon does not listen") \
                    from None
            time.sleep(0.2)
