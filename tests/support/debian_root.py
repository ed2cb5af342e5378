"""Debian 12 root filesystems made with debootstrap, cached (test support, never shipped).

Two are used: `minbase` (what `debian:bookworm-slim` is, the base of the container image built with buildah)
and `systemd` (minbase plus systemd, Python and the PostgreSQL 15 client: a fresh Debian 12 that boots in
systemd-nspawn, where the .deb is installed with apt). Each is made once into
/var/cache/kkua-backupd-test/debootstrap/<name> (or $KKUA_TEST_SERVER_CACHE/debootstrap/<name>), in a
scratch folder renamed into place when complete, under a lock file, and is only ever read afterwards
(tests mount it as the lower layer of an overlay, or copy it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .wheels import BuildUnavailable

MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 1200
# name -> the packages added to minbase. The `systemd` root has what the .deb depends on, so that
# `apt-get install ./kkua-backupd_*.deb` inside needs no network.
ROOTS: dict[str, tuple[str, ...]] = {
    "minbase": (),
    "systemd": ("systemd", "systemd-sysv", "dbus", "python3", "postgresql-client-15", "cron", "procps"),
}


def cache_dir() -> Path:
    """Where the roots are kept (the other test caches' folder)."""
    return Path(os.environ.get("KKUA_TEST_SERVER_CACHE", "/var/cache/kkua-backupd-test")) / "debootstrap"


def bookworm_root(name: str) -> Path:
    """The cached Debian 12 root `name` (see ROOTS), made now when missing; raises BuildUnavailable with
    debootstrap's last lines when it cannot be made (no debootstrap, no mirror, not root)."""
    include = ROOTS[name]
    version = "v1-" + "-".join(include or ("base",))  # a changed package list makes a new root
    target = cache_dir() / f"bookworm-{name}-{hashlib.sha256(version.encode()).hexdigest()[:12]}"
    if (target / "etc" / "debian_version").is_file():
        return target
    if shutil.which("debootstrap") is None:
        raise BuildUnavailable("debootstrap is not installed (Debian package debootstrap; scripts/setup.sh)")
    if os.geteuid() != 0:
        raise BuildUnavailable("debootstrap needs root")
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc" / "debian_version").is_file():
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            command = ["debootstrap", "--variant=minbase"]
            if include:
                command.append("--include=" + ",".join(include))
            command += ["bookworm", str(scratch), MIRROR]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S,
                                        check=False)
            except subprocess.TimeoutExpired as exc:
                raise BuildUnavailable(f"debootstrap {name} took more than {DEBOOTSTRAP_TIMEOUT_S} s") from exc
            if result.returncode != 0:
                tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
                raise BuildUnavailable(f"debootstrap of the Debian 12 {name} root failed "
                                       f"(exit {result.returncode}): {tail}")
            # No package lists or downloaded .debs: apt inside must not reach for a network it may not have.
            shutil.rmtree(scratch / "var" / "cache" / "apt" / "archives", ignore_errors=True)
            (scratch / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target

