"""sd_notify over a real AF_UNIX datagram socket: path and abstract addresses, UTF-8, watchdog maths."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd.daemon.notify import Notifier, monotonic_usec, socket_address, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def test_messages_arrive_as_one_datagram_each(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("idle; next postgres 02:00 (in 5h)")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=idle; next postgres 02:00 (in 5h)"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_status_is_utf8_and_one_line(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.status("병렬 백업 — redis ok\nsecond line")
    raw = sock.recv(4096)
    assert raw == "STATUS=병렬 백업 — redis ok second line".encode()  # latin-1 could not carry this


def test_reloading_carries_the_monotonic_clock(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    before = monotonic_usec()
    assert Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = monotonic_usec()
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_socket() -> None:
    name = f"kkua-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready() is False
    assert socket_address("vsock:2:1234") is None
    # systemd gone (nobody listens): reported as not sent, never raised
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}).watchdog() is False


def test_watchdog_interval_is_half_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
