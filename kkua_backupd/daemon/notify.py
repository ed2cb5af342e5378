"""sd_notify(3) with the standard library: READY, STATUS, WATCHDOG, RELOADING, STOPPING to systemd.

The `sdnotify` package is unmaintained and encodes messages as latin-1 (a non-ASCII STATUS is silently
dropped), so this follows systemd's own reference implementation instead: one AF_UNIX datagram per
message to `$NOTIFY_SOCKET`, a leading `@` meaning the abstract namespace, text in UTF-8.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from kkua_backupd.obs.logs import get_logger

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def socket_address(value: str | None) -> str | None:
    """The address to send to for a `$NOTIFY_SOCKET` value (abstract `@name` becomes `\\0name`), or None
    when there is none or it is a kind this implementation does not speak (vsock)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None when systemd asked for none
    or asked another process (`$WATCHDOG_PID` names someone else)."""
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV, "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """A connection to systemd's notification socket; every method is a no-op without one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get(SOCKET_ENV))
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; returns whether it was sent (failures are logged once,
        never raised: a daemon must not die because systemd went away)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                get_logger().warning("cannot notify systemd", socket=self.address.replace("\0", "@"),
                                     reason=exc.strerror or str(exc))
                self._warned = True
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with a STATUS= when given)."""
        return self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def status(self, text: str) -> bool:
        """STATUS=text (one line: newlines would start new fields)."""
        return self.send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive."""
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (required by Type=notify-reload, harmless for Type=notify)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
