"""Remote copies against real servers: an S3 store (`rclone serve s3`, which checks SigV4 and Content-MD5) and
an SSH host (Debian's sshd), both started here. Round trips of PostgreSQL and Redis sets through each remote
(back up, delete the local folder, restore from the remote, compare), and the bad days: a wrong S3 secret, an
unknown host key, a remote that is down or whose disk is full, kill -9 mid-upload, a tampered remote object,
retention on a remote that refuses deletes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.redis_sample import compare, create_sample, snapshot
from kkua_backupd.demo.sandbox import table_contents
from kkua_backupd.proc.workers import descendants
from tests.support.helpers import cmdline, describe, output, wait_for
from tests.support.redis_bulk import fill_bulk
from tests.support.remotes import S3_SECRET_KEY, RcloneS3, Sshd, add_remotes

from ..conftest import Env, RedisEnv

# The daemon test's fixtures (a real kkua-backupd and its notify socket), used here by name.
from .test_daemon import Daemon, at_utc, notify_socket, once_at, start_daemon, write_daemon_config  # noqa: F401


@pytest.fixture
def s3(workdir: Path) -> Iterator[RcloneS3]:
    with RcloneS3(workdir) as server:
        yield server


@pytest.fixture
def sshd(workdir: Path) -> Iterator[Sshd]:
    with Sshd(workdir) as server:
        yield server


def remote_sets(world: Env | RedisEnv, name: str) -> list[dict[str, Any]]:
    result = world.run("--json", "list", "--remote", name)
    assert result.returncode == 0, describe(result)
    sets: list[dict[str, Any]] = json.loads(result.stdout)
    return sets


def local_sets(world: Env | RedisEnv) -> list[dict[str, Any]]:
    sets: list[dict[str, Any]] = json.loads(world.run("--json", "list", check=True).stdout)
    return sets


def remote_status(world: Env | RedisEnv) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(world.run("--json", "status").stdout)["remotes"]
    return doc


@pytest.mark.parametrize("fmt", ["plain", "directory"])
def test_postgres_round_trip_through_each_remote(env: Env, s3: RcloneS3, sshd: Sshd, workdir: Path, fmt: str) -> None:
    env.write_config(format=fmt, restore_jobs=2)  # directory: a set of many files, pg_restore -j after the fetch
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    with env.connect() as conn:
        before = table_contents(conn)
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    for name in ("offsite", "box"):
        [found] = remote_sets(env, name)
        assert (found["id"], found["status"]) == (made["id"], "ok")
        assert [f["sha256"] for f in found["files"]] == [f["sha256"] for f in made["files"]]
    assert f"kkua/postgres/{made['prefix']}{made['id']}.manifest.json" in s3.objects()
    assert not [k for k in sshd.files() if k.endswith(".partial")]
    for name in ("offsite", "box"):
        shutil.rmtree(env.folder)  # the host lost its backups
        target = f"{env.database}_from_{name}"
        result = env.run("restore", "postgres", "latest", "--from", name, "--force", "--target-db", target)
        assert result.returncode == 0, describe(result)
        assert f"Fetched postgres set {made['id']} from remote {name}" in result.stdout
        with env.connect(target) as conn:
            assert table_contents(conn) == before
        assert [s["id"] for s in local_sets(env)] == [made["id"]]  # the fetched set is a local set again
        assert not list((env.backup_dir / ".remote-staging" / "postgres").iterdir())


def test_redis_round_trip_through_each_remote(redis_env: RedisEnv, s3: RcloneS3, sshd: Sshd, workdir: Path) -> None:
    world = redis_env
    add_remotes(world.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    create_sample(world.server)
    before = snapshot(world.server)
    made = json.loads(world.run("--json", "backup", "redis", check=True).stdout)
    for name in ("offsite", "box"):
        shutil.rmtree(world.folder)
        with world.client() as client:
            client.flushall()
        result = world.run("restore", "redis", made["id"], "--from", name, "--force", "--flush",
                           "--no-safety-backup")
        assert result.returncode == 0, describe(result)
        assert compare(before, snapshot(world.server)) == []  # every key, value and TTL
        verify = world.run("verify", "--remote", name, "--download")
        assert verify.returncode == 0, describe(verify)
        assert "OK" in verify.stdout


def test_wrong_s3_secret_keeps_the_local_set_and_marks_it_pending(env: Env, s3: RcloneS3, workdir: Path) -> None:
    base = env.config_path.read_text()
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir, secret="not-the-secret-0000000000"))
    result = env.run("backup", "postgres")
    assert result.returncode == 1, describe(result)
    text = output(result)
    assert "ok locally" in text and "offsite" in text and "credentials" in text, text
    assert "not-the-secret" not in text  # a secret, even a wrong one, is never printed
    [local] = local_sets(env)
    assert local["status"] == "ok"
    assert s3.objects() == {}
    pending = remote_status(env)["offsite"]
    assert [p["set"] for p in pending["pending"]] == [f"postgres/{local['id']}"]
    assert pending["last_error"] and pending["pending_since"]
    status = env.run("status")
    assert "pending   1 set(s) since" in status.stdout, describe(status)

    env.config_path.write_text(base)
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir))
    pushed = env.run("push")
    assert pushed.returncode == 0, describe(pushed)
    assert [s["id"] for s in remote_sets(env, "offsite")] == [local["id"]]
    assert remote_status(env)["offsite"]["pending"] == []
    for log in env.log_dir.iterdir():
        assert S3_SECRET_KEY not in log.read_text()


def test_unknown_host_key_is_refused(env: Env, sshd: Sshd, workdir: Path) -> None:
    other = workdir / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2])
                                + "\n")
    add_remotes(env.config_path, sshd.remote_toml("box"))
    result = env.run("backup", "postgres")
    assert result.returncode == 1, describe(result)
    assert "host's key is not in" in output(result) or "Host key verification failed" in output(result)
    assert sshd.files() == {}
    assert local_sets(env)[0]["status"] == "ok"
    assert remote_status(env)["box"]["pending"]


def test_remote_down_then_back(env: Env, s3: RcloneS3, workdir: Path) -> None:
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir))
    s3.stop()
    result = env.run("backup", "postgres")
    assert result.returncode == 1, describe(result)
    assert "pending" in output(result)
    [local] = local_sets(env)
    assert local["status"] == "ok"
    s3.start()
    second = env.run("--json", "backup", "postgres", check=True)  # the next run sends what was pending too
    ids = {s["id"] for s in remote_sets(env, "offsite")}
    assert ids == {local["id"], json.loads(second.stdout)["id"]}
    assert remote_status(env)["offsite"]["pending"] == []


def test_remote_down_during_the_upload(env: Env, workdir: Path) -> None:
    with RcloneS3(workdir, bwlimit="512K") as s3:
        add_remotes(env.config_path, s3.remote_toml("offsite", workdir))
        proc = env.popen("backup", "postgres")
        wait_for(lambda: any(p.is_file() for p in s3.bucket_dir.rglob("*")) or None, "an upload to begin",
                 timeout=120)
        s3.stop()  # the store goes away in the middle of the upload
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out + err
        assert "ok locally" in out + err and "pending" in out + err
        [local] = local_sets(env)
        assert local["status"] == "ok"
        s3.start()
        assert remote_sets(env, "offsite") == []
        assert [p["set"] for p in remote_status(env)["offsite"]["pending"]] == [f"postgres/{local['id']}"]
        pushed = env.run("push", timeout=600)
        assert pushed.returncode == 0, describe(pushed)
        assert [s["id"] for s in remote_sets(env, "offsite")] == [local["id"]]


@contextlib.contextmanager
def tiny_disk(folder: Path) -> Iterator[Path]:
    """`folder` on a 1 MiB tmpfs: a disk that fills up (root only; skips saying why elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.fixture
def small_disk(sshd: Sshd) -> Iterator[Path]:
    """The SSH remote's folder on a 1 MiB tmpfs."""
    with tiny_disk(sshd.folder) as folder:
        yield folder


def test_disk_full_on_the_remote(redis_env: RedisEnv, sshd: Sshd, small_disk: Path) -> None:
    world = redis_env
    with world.client() as client:
        fill_bulk(client, 20000, seed=7)  # about 2 MiB of gzip that does not fit in 1 MiB
    add_remotes(world.config_path, sshd.remote_toml("box"))
    result = world.run("backup", "redis")
    assert result.returncode == 1, describe(result)
    assert "No space left on device" in output(result) or "disk is full" in output(result), output(result)
    [local] = local_sets(world)
    assert local["status"] == "ok"
    assert remote_sets(world, "box") == []
    assert not [k for k in sshd.files() if k.endswith(".manifest.json")]
    assert remote_status(world)["box"]["pending"]


def test_disk_full_on_the_s3_store(redis_env: RedisEnv, workdir: Path) -> None:
    world = redis_env
    with world.client() as client:
        fill_bulk(client, 20000, seed=7)
    with tiny_disk(workdir / "s3-data"), RcloneS3(workdir) as s3:
        add_remotes(world.config_path, s3.remote_toml("offsite", workdir))
        result = world.run("backup", "redis")
        assert result.returncode == 1, describe(result)
        assert "ok locally" in output(result) and "offsite" in output(result)
        [local] = local_sets(world)
        assert local["status"] == "ok"
        assert remote_sets(world, "offsite") == []
        assert remote_status(world)["offsite"]["pending"]


def test_kill_9_mid_upload_leaves_no_remote_set_and_push_completes(redis_env: RedisEnv, workdir: Path) -> None:
    world = redis_env
    with world.client() as client:
        fill_bulk(client, 40000, seed=11)
    with RcloneS3(workdir, bwlimit="1M") as s3:
        add_remotes(world.config_path, s3.remote_toml("offsite", workdir))
        proc = world.popen("backup", "redis")
        wait_for(lambda: any(p.is_file() for p in s3.bucket_dir.rglob("*")) or None, "an upload to begin",
                 timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert remote_sets(world, "offsite") == []
        assert not [k for k in s3.objects() if k.endswith(".manifest.json")]
        [local] = local_sets(world)
        assert local["status"] == "ok"
        pushed = world.run("push", "offsite", timeout=600)
        assert pushed.returncode == 0, describe(pushed)
        assert [s["id"] for s in remote_sets(world, "offsite")] == [local["id"]]
        verify = world.run("verify", "--remote", "offsite", "--download", timeout=600)
        assert verify.returncode == 0, describe(verify)


def test_kill_9_during_an_ssh_upload_leaves_no_remote_set_and_push_completes(env: Env, sshd: Sshd) -> None:
    add_remotes(env.config_path, sshd.remote_toml("box"))
    proc = env.popen("backup", "postgres")
    # argv read once per process: one that ends between two reads has none
    wait_for(lambda: any("rsync" in "".join(cmdline(pid)[:1]) for pid in descendants(proc.pid)) or None,
             "rsync to start", timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert remote_sets(env, "box") == []
    [local] = local_sets(env)
    assert [p["set"] for p in remote_status(env)["box"]["pending"]] == [f"postgres/{local['id']}"]
    pushed = env.run("push")
    assert pushed.returncode == 0, describe(pushed)
    assert [s["id"] for s in remote_sets(env, "box")] == [local["id"]]
    assert not [k for k in sshd.files() if k.endswith(".partial")]


def test_tampered_remote_object_is_refused_before_any_change(env: Env, s3: RcloneS3, sshd: Sshd,
                                                            workdir: Path) -> None:
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    data_name = made["files"][0]["name"]
    for stored in (s3.objects()[f"kkua/postgres/{data_name}"], sshd.files()[f"postgres/{data_name}"]):
        raw = bytearray(stored.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        stored.write_bytes(bytes(raw))
    with env.connect() as conn:
        conn.execute("UPDATE users SET nickname = 'after-backup' WHERE id = 1")
        before = table_contents(conn)
    for name in ("offsite", "box"):
        shutil.rmtree(env.folder)
        result = env.run("restore", "postgres", "latest", "--from", name, "--force")
        assert result.returncode == 3, describe(result)
        assert "does not match its manifest" in output(result) and "nothing was restored" in output(result)
        with env.connect() as conn:
            assert table_contents(conn) == before
        assert local_sets(env) == []
        verify = env.run("verify", "--remote", name, "--download")
        assert verify.returncode == 3, describe(verify)
        assert "sha256" in verify.stdout


def test_remote_retention_and_a_remote_that_refuses_deletes(env: Env, s3: RcloneS3, workdir: Path) -> None:
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir, keep_last=1, days=1))
    first = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    second = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    # The older set's manifest on the remote says it is 3 days old (the remote's own manifests decide).
    stored = s3.objects()[f"kkua/postgres/{first['prefix']}{first['id']}.manifest.json"]
    doc = json.loads(stored.read_text())
    doc["created_at"] = "2000-01-01T00:00:00+00:00"
    stored.write_text(json.dumps(doc))

    s3.stop()
    with RcloneS3(workdir, read_only=True, port=s3.port):
        refused = env.run("prune", "--remote", "offsite")
        assert refused.returncode == 0, describe(refused)
        assert "skipped" in refused.stdout
        assert len(remote_sets(env, "offsite")) == 2
    s3.start()
    dry = env.run("prune", "--remote", "offsite", "--dry-run", check=True)
    assert f"would delete  offsite: {first['files'][0]['name']}" in dry.stdout
    pruned = env.run("--json", "run", "retention", check=True)
    assert json.loads(pruned.stdout)["remotes"]["offsite"]["deleted"][0]["id"] == first["id"]
    assert [s["id"] for s in remote_sets(env, "offsite")] == [second["id"]]
    assert not [k for k in s3.objects() if first["id"] in k]
    assert {s["id"] for s in local_sets(env)} == {first["id"], second["id"]}  # local retention is its own



def test_the_daemon_retries_a_failed_upload_as_a_push_with_backoff(
        env: Env, s3: RcloneS3, workdir: Path,
        start_daemon: Callable[..., Daemon]) -> None:  # noqa: F811 - the fixture imported above
    write_daemon_config(env, schedule={"postgres": once_at(at_utc(3))}, daemon={"retries": 4, "retry_backoff": 2},
                        extra=s3.remote_toml("offsite", workdir))
    s3.stop()
    daemon = start_daemon()
    daemon.wait_ready()
    daemon.wait_log("job will be retried job=postgres attempt=2", timeout=120)
    [local] = local_sets(env)
    assert [p["set"] for p in remote_status(env)["offsite"]["pending"]] == [f"postgres/{local['id']}"]
    s3.start()
    daemon.wait_log("pending uploads sent", timeout=120)
    assert len(daemon.lines("push_only=True")) >= 1
    assert [s["id"] for s in local_sets(env)] == [local["id"]]  # retried as a push, not as another backup
    assert [s["id"] for s in remote_sets(env, "offsite")] == [local["id"]]
    assert remote_status(env)["offsite"]["pending"] == []
    assert daemon.stop() == 0


def test_restore_from_a_remote_uses_an_identical_local_set_and_refuses_a_different_one(
        env: Env, s3: RcloneS3, workdir: Path) -> None:
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir))
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    same = env.run("restore", "postgres", "latest", "--from", "offsite", "--force", "--target-db",
                   f"{env.database}_same")
    assert same.returncode == 0, describe(same)
    assert "the local set is the same as the remote's" in output(same)
    stored = s3.objects()[f"kkua/postgres/{made['prefix']}{made['id']}.manifest.json"]
    doc = json.loads(stored.read_text())
    doc["files"][0]["sha256"] = "0" * 64
    stored.write_text(json.dumps(doc))
    different = env.run("restore", "postgres", made["id"], "--from", "offsite", "--force", "--target-db",
                        f"{env.database}_different")
    assert different.returncode == 3, describe(different)
    assert f"a different local postgres set {made['id']} exists" in output(different)
    with env.connect("postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (f"{env.database}_different",)).fetchone() is None
