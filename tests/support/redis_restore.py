"""The Redis restore tests' world: the real `kkua-backup` backup and restore of a test server, the dataset's
digest, and a server that a file-mode restore stops and starts through commands, as systemd would."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kkua_backupd.sources.redis.local import LocalRedis
from tests.conftest import REDIS_TEST_PASSWORD, RedisEnv
from tests.support.helpers import wait_for

SMALL = 64 * 1024  # the sample's large value, kept small where the test is not about size
DEBUG = {"enable-debug-command": "yes"}


def backup(env: RedisEnv, *extra: str) -> dict[str, Any]:
    """Run the real `kkua-backup backup redis` and return the new set as `list --json` shows it."""
    env.run("backup", "redis", *extra, check=True)
    sets = json.loads(env.run("--json", "list", "redis", check=True).stdout)
    assert sets, "backup redis made no set"
    return sets[0]  # type: ignore[no-any-return]


def restore(env: RedisEnv, *args: str, environ: dict[str, str] | None = None) -> Any:
    """Run `kkua-backup --json restore redis ARGS` (no terminal)."""
    return env.run("--json", "restore", "redis", *args, env=environ)


def report_of(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def digest(server: LocalRedis) -> bytes:
    """DEBUG DIGEST: one hash of the whole dataset, values and expiry times included."""
    with server.client() as client:
        return bytes(client.execute_command("DEBUG", "DIGEST"))


class Restartable:
    """A redis-server that a file-mode restore stops and starts through commands, as systemd would: stopped
    by `redis-cli shutdown` (which SAVEs first: the trap a restore must not fall into) and started again
    daemonized from the same config file."""

    def __init__(self, folder: Path, settings: dict[str, str] | None = None, cli: str | None = None) -> None:
        conf = {**DEBUG, "save": "3600 1", "pidfile": str(folder / "redis.pid"), **(settings or {})}
        self.local = LocalRedis(folder, password=REDIS_TEST_PASSWORD, settings=conf).start()
        self.port = self.local.port
        self.folder = folder
        self.cli = cli or shutil.which("redis-cli") or "redis-cli"

    @property
    def stop_command(self) -> list[str]:
        return [self.cli, "-h", "127.0.0.1", "-p", str(self.port), "shutdown"]

    @property
    def start_command(self) -> list[str]:
        return [str(self.local.server_bin), str(self.local.conf_path), "--daemonize", "yes"]

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        return self.local.client(db, **kwargs)

    def restart(self, *, nosave: bool = False, while_stopped: Callable[[], None] | None = None) -> None:
        """Stop and start it again (for checks that the restored data survives a restart)."""
        with contextlib.suppress(redis.ConnectionError):
            self.client(retry=Retry(NoBackoff(), 0)).shutdown(nosave=nosave)
        wait_for(lambda: not self._answers(), "redis to stop", timeout=30)
        if while_stopped is not None:
            while_stopped()
        subprocess.run(self.start_command, check=True)
        wait_for(self._loaded, "redis to start", timeout=30)

    def _answers(self) -> bool:
        try:
            with self.client(socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _loaded(self) -> bool:
        try:
            with self.client(socket_timeout=1) as client:
                return not client.info("persistence").get("loading")
        except redis.RedisError:
            return False

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client(socket_timeout=2, retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
        self.local.kill()


def restartable_env(workdir: Path, name: str, settings: dict[str, str] | None = None,
                    cli: str | None = None) -> tuple[RedisEnv, Restartable]:
    server = Restartable(workdir / name, settings, cli)
    env = RedisEnv(server.local, workdir, workdir / "config.toml", workdir / "backups", workdir / "logs")
    env.password_file.write_text(REDIS_TEST_PASSWORD + "\n")
    env.password_file.chmod(0o600)
    write_config(env, server)
    return env, server


def write_config(env: RedisEnv, server: Restartable, **keys: Any) -> None:
    """The test config plus stop/start commands (TOML arrays of strings, written as JSON arrays)."""
    env.write_config(port=server.port, **keys)
    with env.config_path.open("a") as fh:
        fh.write(f"stop_command = {json.dumps(server.stop_command)}\n")
        fh.write(f"start_command = {json.dumps(server.start_command)}\n")
