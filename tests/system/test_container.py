"""The container image, for real: packaging/container/Containerfile built with buildah (vfs storage, chroot
isolation, no Docker daemon) on a Debian 12 base made by debootstrap (cached), then its commands run with
`buildah run` against this session's throwaway PostgreSQL and Redis on 127.0.0.1: backup all, restores of
both, and the daemon firing a schedule, logging on stdout. Needs root, buildah and debootstrap; skips (or,
with KKUA_REQUIRE_SYSTEM_TESTS=1, fails) saying which is missing.

The buildah storage is kept in /var/cache/kkua-backupd-test/containers (or $KKUA_TEST_SERVER_CACHE/...), so
the base image and the Containerfile's `base` stage (Debian's packages) are built once; each run builds the
layers with the wheels anew and removes its image and the dangling layers afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data
from kkua_backupd.sources.redis.local import LocalRedis

from ..conftest import REDIS_TEST_PASSWORD, _toml
from ..support.debian_root import bookworm_root, cache_dir
from ..support.wheels import BuildUnavailable
from .conftest import REPO, _children, skip_or_fail, wait_until

pytestmark = pytest.mark.system

UID = 10001  # the image's kkua-backup user (packaging/container/Containerfile)
BASE_IMAGE = "localhost/kkua-test-bookworm-minbase"


class Buildah:
    """buildah with the tests' own storage (vfs) and chroot isolation."""

    def __init__(self) -> None:
        storage = cache_dir().parent / "containers"
        self.prefix = ["buildah", "--root", str(storage / "storage"), "--runroot", "/run/kkua-test-containers"]
        self.env = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.prefix, *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} exited {result.returncode}\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def popen(self, *args: str, output: Path) -> subprocess.Popen[str]:
        """Start buildah ARGS in a session of its own, stdout and stderr into the file `output`."""
        with output.open("w") as out:
            return subprocess.Popen([*self.prefix, *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)


def base_image(buildah: Buildah) -> str:
    """The Debian 12 minbase root as an image (made once; its tag names the cached root it came from)."""
    try:
        root = bookworm_root("minbase")
    except BuildUnavailable as exc:
        skip_or_fail(f"no Debian 12 root for the image's base: {exc}")
    tag = f"{BASE_IMAGE}:{root.name}"
    if buildah("images", "-q", tag, check=False).stdout.strip():
        return tag
    container = buildah("from", "scratch").stdout.strip()
    try:
        mount = buildah("mount", container).stdout.strip()
        subprocess.run(["cp", "-a", f"{root}/.", mount], check=True)
        buildah("commit", "-q", container, tag)
    finally:
        buildah("rm", container, check=False)
    return tag


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Buildah, str]]:
    """The image built from packaging/container with wheels from packaging/wheels.sh."""
    if os.geteuid() != 0:
        skip_or_fail("building the image with buildah (chroot isolation) needs root")
    if shutil.which("buildah") is None:
        skip_or_fail("buildah is not installed (scripts/setup.sh installs it)")
    buildah = Buildah()
    base = base_image(buildah)
    tag = f"localhost/kkua-backupd-test:{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="kkua-image-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(REPO / "packaging" / "container", context, ignore=shutil.ignore_patterns("wheels"))
        subprocess.run([str(REPO / "packaging" / "wheels.sh"), str(context / "wheels")], check=True,
                       capture_output=True, timeout=900)
        common = ["bud", "--isolation", "chroot", "--format", "docker", "--layers", "--build-arg", f"BASE={base}"]
        # The `base` stage (Debian's packages) tagged, so its layers outlive the pruning below and the next
        # run's build reuses them; only the layers with the wheels are built each time.
        buildah(*common, "--target", "base", "-t", f"{BASE_IMAGE}-deps:latest", str(context), timeout=1200)
        buildah(*common, "-t", tag, str(context), timeout=1200)
    try:
        yield buildah, tag
    finally:
        buildah("rmi", "-f", tag, check=False)
        buildah("rmi", "--prune", check=False)


@pytest.fixture
def world(image: tuple[Buildah, str], pg_server: ThrowawayPostgres, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A working container of the image, the host folders it mounts (config + secrets, backups), a fresh
    database with the sample data and a redis-server with a password."""
    buildah, tag = image
    database = f"kkua_ctr_{os.getpid()}"
    pg_server.create_database(database)
    with pg_server.connect(database) as conn:
        create_sample_data(conn)
    etc, backups = tmp_path / "etc", tmp_path / "backups"
    etc.mkdir(mode=0o750)
    backups.mkdir(mode=0o750)
    os.chown(backups, UID, UID)
    # The secrets as compose mounts them: host files given to the container's user, mode 0600.
    for name, secret in (("pg.pass", pg_server.password), ("redis.pass", REDIS_TEST_PASSWORD)):
        (etc / name).write_text(secret + "\n")
        (etc / name).chmod(0o600)
        os.chown(etc / name, UID, UID)
    os.chown(etc, 0, UID)
    container = buildah("from", "-q", tag).stdout.strip()
    with LocalRedis(tmp_path / "redis", password=REDIS_TEST_PASSWORD) as redis_server:
        try:
            yield {"buildah": buildah, "container": container, "etc": etc, "backups": backups,
                   "pg": pg_server, "database": database, "redis": redis_server}
        finally:
            buildah("rm", container, check=False)
            pg_server.drop_database(database)


def write_config(world: dict[str, object], **schedule: str) -> None:
    pg, redis_server = world["pg"], world["redis"]
    assert isinstance(pg, ThrowawayPostgres) and isinstance(redis_server, LocalRedis)
    sections = {
        "postgres": {"host": "127.0.0.1", "port": pg.port, "database": world["database"], "user": "postgres",
                     "password_file": "/run/secrets/pg_password"},
        "redis": {"host": "127.0.0.1", "port": redis_server.port, "password_file": "/run/secrets/redis_password"},
        "schedule": {"randomized_delay": 0, **schedule},
        "daemon": {"retries": 0, "stop_grace": 5},
    }
    lines = ['backup_dir = "/var/backups/kkua"', 'log_dir = "/var/log/kkua-backup"']
    for section, keys in sections.items():
        lines += ["", f"[{section}]"] + [f"{key} = {_toml(value)}" for key, value in keys.items()]
    path = Path(str(world["etc"])) / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o640)
    os.chown(path, 0, UID)


def run_args(world: dict[str, object]) -> list[str]:
    """`buildah run` of the working container with the mounts compose would make (config, secrets, backups)."""
    etc = Path(str(world["etc"]))
    return ["run", "--isolation", "chroot",
            "-v", f"{etc / 'config.toml'}:/etc/kkua-backup/config.toml:ro",
            "-v", f"{etc / 'pg.pass'}:/run/secrets/pg_password:ro",
            "-v", f"{etc / 'redis.pass'}:/run/secrets/redis_password:ro",
            "-v", f"{world['backups']}:/var/backups/kkua", str(world["container"]), "--"]


def kkua(world: dict[str, object], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    buildah = world["buildah"]
    assert isinstance(buildah, Buildah)
    return buildah(*run_args(world), "kkua-backup", *args, timeout=300, check=check)


def sets(world: dict[str, object], kind: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(kkua(world, "list", kind, "--json").stdout)
    return found


def descendant(pid: int, name: str) -> int:
    """The first process below `pid` whose command is `name` (0 when there is none)."""
    queue = [pid]
    while queue:
        for child in _children(queue.pop(0)):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == name:
                    return child
            queue.append(child)
    return 0


def test_image_is_debian_slim_non_root_with_tini_and_a_healthcheck(image: tuple[Buildah, str]) -> None:
    buildah, tag = image
    config = json.loads(buildah("inspect", "--type", "image", tag).stdout)
    docker = config["Docker"]["config"]
    assert docker["User"] == "kkua-backup"
    assert docker["Entrypoint"] == ["/usr/bin/tini", "--"] and docker["Cmd"] == ["kkua-backupd"]
    assert docker["Healthcheck"]["Test"] == ["CMD", "kkua-backup", "status"]
    container = buildah("from", "-q", tag).stdout.strip()
    try:
        out = buildah("run", "--isolation", "chroot", container, "--", "sh", "-c",
                      "id -u; . /etc/os-release; echo $VERSION_ID; pg_dump --version; redis-cli --version; "
                      "dpkg-query -W -f='${Version}' postgresql-client-15").stdout.splitlines()
    finally:
        buildah("rm", container, check=False)
    assert out[0] == str(UID) and out[1] == "12"
    assert out[2].startswith("pg_dump (PostgreSQL) 15.") and out[3].startswith("redis-cli 7.0.")


def test_backup_all_and_restores_in_the_container(world: dict[str, object]) -> None:
    write_config(world)
    pg, redis_server = world["pg"], world["redis"]
    assert isinstance(pg, ThrowawayPostgres) and isinstance(redis_server, LocalRedis)
    redis_server.client(0).set("session:1", "김철수")
    redis_server.client(3).set("room:7", "open", ex=3600)
    result = kkua(world, "backup", "all")
    assert "error" not in result.stdout.lower(), result.stdout
    assert [s["status"] for s in sets(world, "postgres")] == ["ok"]
    assert [s["status"] for s in sets(world, "redis")] == ["ok"]
    # ... in the host folder mounted where compose mounts its volume, owned by the container's user.
    assert {p.stat().st_uid for p in Path(str(world["backups"])).glob("*/*")} == {UID}
    assert kkua(world, "status").returncode == 0  # what the HEALTHCHECK runs

    database = str(world["database"])
    with pg.connect(database) as conn:
        before = conn.execute("SELECT count(*) FROM users").fetchone()
        conn.execute("TRUNCATE users CASCADE")
    redis_server.client(0).flushall()
    # No terminal in the container: without --force a restore refuses (exit 3) and changes nothing.
    refused = kkua(world, "restore", "postgres", "latest", check=False)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    kkua(world, "restore", "postgres", "latest", "--force")
    kkua(world, "restore", "redis", "latest", "--force")
    with pg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == before
    assert redis_server.client(0).get("session:1") == "김철수".encode()
    assert redis_server.client(3).ttl("room:7") > 3000


def test_the_daemon_fires_a_schedule_and_logs_on_stdout(world: dict[str, object], tmp_path: Path) -> None:
    write_config(world, postgres="*:*:0/5", redis="*-*-* 03:00:00", retention="Sun *-*-* 04:00:00")
    buildah = world["buildah"]
    assert isinstance(buildah, Buildah)
    log = tmp_path / "daemon.out"
    daemon = buildah.popen(*run_args(world), "/usr/bin/tini", "--", "kkua-backupd", output=log)
    try:
        folder = Path(str(world["backups"])) / "postgres"
        wait_until(lambda: any(folder.glob("*.manifest.json")) or daemon.poll() is not None or None, timeout=90,
                   what="the daemon in the container to make a scheduled PostgreSQL backup",
                   describe=lambda: log.read_text()[-3000:])
        assert daemon.poll() is None, f"the daemon exited {daemon.returncode}: {log.read_text()[-3000:]}"
        assert sets(world, "postgres")[0]["status"] == "ok"
    finally:
        # As `docker stop` does: SIGTERM to the container's init (tini), which hands it to the daemon.
        with contextlib.suppress(ProcessLookupError):
            os.kill(descendant(daemon.pid, "tini") or daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    output = log.read_text()
    assert daemon.returncode == 0, output[-3000:]
    assert "postgres" in output, output[-3000:]  # the daemon's log is on stdout
    pg = world["pg"]
    assert isinstance(pg, ThrowawayPostgres)
    assert pg.password not in output and REDIS_TEST_PASSWORD not in output
