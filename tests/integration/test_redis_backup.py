"""Redis backups against a real redis-server: the replication capture in both transfer forms, the set's
files, AOF archives, refusals (server down, wrong password, SYNC denied by ACL), kill -9 mid-capture,
the lock, verify, and the password never leaking."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kkua_backupd.demo.redis_sample import create_sample, databases
from kkua_backupd.proc.workers import descendants
from kkua_backupd.sources.redis.local import free_port
from kkua_backupd.sources.redis.protocol import max_rdb_version
from kkua_backupd.store.lock import TargetLock
from tests.support.helpers import cmdline, describe, output, wait_for
from tests.support.redis_bulk import fill_bulk

from ..conftest import REDIS_TEST_PASSWORD, RedisEnv

BACKUP_USER_PASSWORD = "bkp-user-Secret-77"


def listed(world: RedisEnv) -> list[dict[str, Any]]:
    result = world.run("--json", "list", "redis", check=True)
    sets: list[dict[str, Any]] = json.loads(result.stdout)
    return sets


def manifest_of(world: RedisEnv, entry: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((world.folder / f"{entry['prefix']}{entry['id']}.manifest.json").read_text())
    return data


def unpacked(path: Path) -> bytes:
    """A backup file's content, decompressed."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def settle(world: RedisEnv, **settings: str) -> None:
    """CONFIG SET on the test server."""
    with world.client() as client:
        for key, value in settings.items():
            client.config_set(key, value)


def no_secret_anywhere(world: RedisEnv, *secrets: str) -> None:
    """No secret in any file of the backup folder (decompressed) or of the log folder."""
    for folder in (world.folder, world.log_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                data = unpacked(path) if path.suffix in (".gz", ".zst") else path.read_bytes()
                for secret in secrets:
                    assert secret.encode() not in data, f"{secret!r} found in {path}"


@pytest.fixture
def sample(redis_env: RedisEnv) -> dict[int, int]:
    """The every-type sample dataset (databases 0, 1, 5), with a smaller large value to keep tests quick."""
    return create_sample(redis_env.server, large_value_size=256 * 1024)


# ----------------------------------------------------------------------------------------------
# A good backup


@pytest.mark.parametrize(("diskless", "transfer"), [("yes", "eof"), ("no", "len")])
def test_backup_of_every_type_in_both_transfer_forms(redis_env: RedisEnv, sample: dict[int, int], diskless: str,
                                                     transfer: str) -> None:
    settle(redis_env, **{"repl-diskless-sync": diskless, "repl-diskless-sync-delay": "0"})
    with redis_env.client() as client:
        expected = {str(db): n for db, n in databases(client).items()}
    assert len(expected) == 3, expected

    result = redis_env.run("backup", "redis")

    assert result.returncode == 0, describe(result)
    (entry,) = listed(redis_env)
    details = manifest_of(redis_env, entry)["details"]
    assert details["transfer"] == transfer and details["capture"] == "sync", details
    assert details["keyspace"] == expected and details["keyspace_exact"] is True, details
    assert details["keys"] == sum(expected.values())
    assert details["rdb_version"] == max_rdb_version(details["server_version"])  # what this server writes
    assert details["redis_check_rdb"] == "ok"
    roles = [f["role"] for f in entry["files"]]
    assert roles == ["rdb", "memory", "config"], roles
    assert entry["files"][0]["name"] == f"redis_backup_{entry['id']}.rdb.gz"
    rdb = unpacked(redis_env.folder / entry["files"][0]["name"])
    assert rdb.startswith(b"REDIS%04d" % details["rdb_version"]) and len(rdb) == details["uncompressed_bytes"]
    assert oct(redis_env.folder.stat().st_mode & 0o777) == "0o750"
    for f in entry["files"]:
        assert oct((redis_env.folder / f["name"]).stat().st_mode & 0o777) == "0o640", f["name"]
    memory = json.loads(unpacked(redis_env.folder / entry["files"][1]["name"]))
    assert memory["keyspace"]["0"]["keys"] == expected["0"] and memory["total_keys"] == sum(expected.values())
    assert memory["server"]["redis_version"] == details["server_version"] and "used_memory" in memory["memory"]
    conf = unpacked(redis_env.folder / entry["files"][2]["name"]).decode()
    assert f"port {redis_env.server.port}" in conf.splitlines()
    assert "# requirepass <redacted>" in conf
    no_secret_anywhere(redis_env, REDIS_TEST_PASSWORD)
    log = (redis_env.log_dir / "redis_backup.log").read_text()
    assert "backup finished" in log and entry["id"] in log


def test_zstd_and_verify_with_a_test_load(redis_env: RedisEnv, sample: dict[int, int]) -> None:
    redis_env.write_config(compression="zstd")
    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    assert redis_env.run("backup", "redis").returncode == 0

    result = redis_env.run("verify", "latest", "--restore-test")

    assert result.returncode == 0, describe(result)
    (entry,) = listed(redis_env)
    assert entry["files"][0]["name"].endswith(".rdb.zst")
    assert f"OK    {entry['files'][0]['name']}  restore test: passed" in result.stdout, describe(result)
    assert "test load passed" in output(result) and f"keys={sum(sample.values())}" in output(result)
    result = redis_env.run("--json", "verify", "latest")
    (report,) = json.loads(result.stdout)
    assert report["ok"] and report["rdb_version"] >= 9
    assert {f["role"]: f["checksum"] for f in report["files"]} == {"rdb": "ok", "memory": "ok", "config": "ok"}


def test_password_never_in_argv_logs_or_files(redis_env: RedisEnv) -> None:
    with redis_env.client() as client:
        fill_bulk(client, 20_000, seed=1)
    # Slow the server's save down so the capture (and redis-check-rdb beside it) lives long enough to watch.
    settle(redis_env, **{"repl-diskless-sync-delay": "0", "rdb-key-save-delay": "50"})
    seen: dict[tuple[int, str], list[str]] = {}  # every argv a pid showed: between fork and exec, its parent's
    proc = redis_env.popen("backup", "redis", env={"REDIS_PASSWORD": REDIS_TEST_PASSWORD})
    try:
        while proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                argv = cmdline(pid)
                if argv:
                    seen.setdefault((pid, argv[0]), argv)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{out}\n{err}"
    names = {Path(argv[0]).name for argv in seen.values()}
    assert "redis-check-rdb" in names, f"the check child was never seen: {seen}"
    for argv in seen.values():
        assert not any(REDIS_TEST_PASSWORD in part for part in argv), argv
    assert REDIS_TEST_PASSWORD not in out + err
    no_secret_anywhere(redis_env, REDIS_TEST_PASSWORD)


# ----------------------------------------------------------------------------------------------
# AOF


def wait_aof_ready(world: RedisEnv) -> None:
    def ready() -> bool:
        with world.client() as client:
            info = client.info("persistence")
        return bool(info["aof_enabled"]) and not info["aof_rewrite_in_progress"] \
            and not info["aof_rewrite_scheduled"] and (world.server.folder / "appendonlydir").is_dir()

    wait_for(ready, "the AOF to be written")


def test_aof_multi_part_folder_is_archived_as_a_tar(redis_env: RedisEnv, sample: dict[int, int]) -> None:
    settle(redis_env, appendonly="yes", **{"repl-diskless-sync-delay": "0"})
    wait_aof_ready(redis_env)
    with redis_env.client() as client:
        client.set("after-rewrite", "goes into the incr file")

    result = redis_env.run("backup", "redis", "--aof")

    assert result.returncode == 0, describe(result)
    (entry,) = listed(redis_env)
    aof = next(f for f in entry["files"] if f["role"] == "aof")
    assert aof["name"] == f"redis_backup_{entry['id']}.aof.gz"
    with tarfile.open(fileobj=io.BytesIO(unpacked(redis_env.folder / aof["name"]))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = tar.extractfile("appendonlydir/appendonly.aof.manifest").read().decode()  # type: ignore[union-attr]
        incr = [n for n in members if n.endswith(".incr.aof")]
        assert incr and b"after-rewrite" in tar.extractfile(incr[-1]).read()  # type: ignore[union-attr]
    assert any(n.endswith(".base.rdb") for n in members), members
    for line in manifest.splitlines():
        assert f"appendonlydir/{line.split()[1]}" in members or "type h" in line, (line, members)
    details = manifest_of(redis_env, entry)["details"]["aof"]
    assert details["form"] == "multi-part" and details["members"][0] == "appendonly.aof.manifest"


def test_aof_env_variable_while_aof_is_off_fails_clearly(redis_env: RedisEnv) -> None:
    result = redis_env.run("backup", "redis", env={"BACKUP_AOF": "true"})

    assert result.returncode == 1, describe(result)
    assert f"127.0.0.1:{redis_env.server.port} has AOF off (appendonly no)" in output(result), describe(result)
    assert "BACKUP_AOF=false" in output(result)
    assert listed(redis_env) == []
    assert not list(redis_env.folder.iterdir())


# ----------------------------------------------------------------------------------------------
# Refusals


def test_server_down_names_host_and_port(redis_env: RedisEnv) -> None:
    port = free_port()
    redis_env.write_config(port=port)

    result = redis_env.run("backup", "redis")

    assert result.returncode == 1, describe(result)
    assert f"cannot reach Redis at 127.0.0.1:{port}: Connection refused" in output(result), describe(result)
    assert len([ln for ln in output(result).splitlines() if "ERROR" in ln]) == 1, describe(result)
    assert listed(redis_env) == []


def test_wrong_password_fails_clearly(redis_env: RedisEnv) -> None:
    redis_env.password_file.write_text("not-the-password\n")

    result = redis_env.run("backup", "redis")

    assert result.returncode == 1, describe(result)
    text = output(result)
    assert f"Redis at 127.0.0.1:{redis_env.server.port} refused the password of the default user" in text, text
    assert "redis.password_file" in text
    assert listed(redis_env) == []
    assert "not-the-password" not in text


@pytest.fixture
def acl_user(redis_env: RedisEnv) -> str:
    """A user allowed everything except replication (SYNC, PSYNC), like a managed service's user."""
    with redis_env.client() as client:
        client.acl_setuser("backup", enabled=True, passwords=[f"+{BACKUP_USER_PASSWORD}"], keys=["*"],
                           channels=["*"], commands=["+@all", "-sync", "-psync"])
    (redis_env.root / "backup.pass").write_text(BACKUP_USER_PASSWORD + "\n")
    (redis_env.root / "backup.pass").chmod(0o600)  # a password file others can read is refused
    return "backup"


def test_sync_denied_falls_back_to_bgsave_and_says_so(redis_env: RedisEnv, sample: dict[int, int],
                                                       acl_user: str) -> None:
    redis_env.write_config(username=acl_user, password_file=str(redis_env.root / "backup.pass"))

    result = redis_env.run("backup", "redis")

    assert result.returncode == 0, describe(result)
    text = output(result)
    assert "SYNC is not allowed; falling back to BGSAVE" in text, text
    assert "NOPERM" in text and "'sync'" in text
    (entry,) = listed(redis_env)
    details = manifest_of(redis_env, entry)["details"]
    assert details["capture"] == "bgsave" and details["transfer"] == "file"
    assert details["keyspace"] == {str(db): n for db, n in sample.items()}
    assert details["redis_check_rdb"] == "ok"
    conf = unpacked(redis_env.folder / entry["files"][2]["name"]).decode()
    assert "# user backup on <redacted>" in conf, conf[-500:]
    no_secret_anywhere(redis_env, REDIS_TEST_PASSWORD, BACKUP_USER_PASSWORD)
    assert redis_env.run("verify", "latest", "--restore-test").returncode == 0


def test_sync_denied_without_fallback_fails_clearly(redis_env: RedisEnv, acl_user: str) -> None:
    redis_env.write_config(username=acl_user, password_file=str(redis_env.root / "backup.pass"),
                           sync_fallback="none")

    result = redis_env.run("backup", "redis")

    assert result.returncode == 1, describe(result)
    text = output(result)
    assert f"Redis at 127.0.0.1:{redis_env.server.port} refused SYNC: NOPERM" in text, text
    assert 'redis.sync_fallback is "none"; no backup was made' in text
    assert "ACL SETUSER backup +sync +replconf" in text
    assert listed(redis_env) == [] and not list(redis_env.folder.iterdir())


# ----------------------------------------------------------------------------------------------
# Interruptions and the lock


def test_kill_9_mid_capture_leaves_nothing_listed(redis_env: RedisEnv) -> None:
    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    with redis_env.client() as client:
        fill_bulk(client, 20_000, seed=2)
    assert redis_env.run("backup", "redis").returncode == 0
    (earlier,) = listed(redis_env)
    settle(redis_env, **{"rdb-key-save-delay": "200"})  # about 4 s of saving: plenty of time to strike

    proc = redis_env.popen("backup", "redis")

    def capturing() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the backup ended before it could be killed: {proc.communicate()}")
        with redis_env.client() as client:
            saving = client.info("persistence")["rdb_bgsave_in_progress"]
        return bool(saving) and bool(list(redis_env.folder.glob("*.rdb.gz.partial")))

    wait_for(capturing, "the capture to be under way")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    settle(redis_env, **{"rdb-key-save-delay": "0"})

    partials = list(redis_env.folder.glob("*.partial"))
    assert partials, "the killed run left no partial file: the test did not strike mid-capture"
    # Its side files (INFO, CONFIG), written while the RDB streams, are partial files too until the RDB is in.
    finished = [p.name for p in redis_env.folder.iterdir() if earlier["id"] not in p.name and p not in partials]
    assert not finished, finished
    assert [s["id"] for s in listed(redis_env)] == [earlier["id"]]
    verify = redis_env.run("verify", "latest")
    assert verify.returncode == 0, describe(verify)
    # Every command starts by removing its kind's partial files left by a run that died (issue 11).
    assert "removed a partial file" in output(verify) and partials[0].name in output(verify)
    assert not list(redis_env.folder.glob("*.partial"))

    result = redis_env.run("backup", "redis")

    assert result.returncode == 0, describe(result)
    assert not list(redis_env.folder.glob("*.partial"))
    assert len(listed(redis_env)) == 2


def test_second_run_while_the_lock_is_held_is_refused(redis_env: RedisEnv) -> None:
    redis_env.backup_dir.mkdir(parents=True, exist_ok=True)
    with TargetLock(redis_env.backup_dir, "redis", "test holds it"):
        result = redis_env.run("backup", "redis")

    assert result.returncode == 3, describe(result)
    assert "another run holds the redis lock" in output(result) and f"pid {os.getpid()}" in output(result)
    assert listed(redis_env) == []


# ----------------------------------------------------------------------------------------------
# Verify finds damage


def test_flipped_byte_fails_verify(redis_env: RedisEnv, sample: dict[int, int]) -> None:
    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    assert redis_env.run("backup", "redis").returncode == 0
    (entry,) = listed(redis_env)
    path = redis_env.folder / entry["files"][0]["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    result = redis_env.run("verify", "latest")

    assert result.returncode == 3, describe(result)
    assert f"FAIL  {path.name}" in result.stdout
    assert "does not match its checksum" in output(result) or "is corrupt" in output(result), describe(result)


def test_corrupt_rdb_with_matching_checksum_is_caught_by_the_rdb_check(redis_env: RedisEnv,
                                                                         sample: dict[int, int]) -> None:
    """A set whose manifest matches its bytes, but whose RDB inside is damaged: only the RDB check sees it."""
    import hashlib

    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    assert redis_env.run("backup", "redis").returncode == 0
    (entry,) = listed(redis_env)
    path = redis_env.folder / entry["files"][0]["name"]
    rdb = bytearray(unpacked(path))
    rdb[len(rdb) // 2] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(rdb)))
    manifest_path = redis_env.folder / f"{entry['prefix']}{entry['id']}.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(manifest))

    result = redis_env.run("verify", "latest")

    assert result.returncode == 3, describe(result)
    # Our own reader finds it (the RDB's CRC-64 no longer matches) before redis-check-rdb would.
    assert f"{path.name} is not a valid RDB: it fails its CRC-64 check" in output(result), describe(result)



# ----------------------------------------------------------------------------------------------
# Files that are not reachable, BGSAVE done right, timeouts (in-process, against the real server)


def test_aof_files_not_reachable_from_here_fails_clearly(redis_env: RedisEnv) -> None:
    settle(redis_env, appendonly="yes")
    wait_aof_ready(redis_env)
    elsewhere = redis_env.root / "not-the-server-dir"
    elsewhere.mkdir()
    redis_env.write_config(data_dir=str(elsewhere))

    result = redis_env.run("backup", "redis", "--aof")

    assert result.returncode == 1, describe(result)
    assert f"{elsewhere}/appendonlydir/appendonly.aof.manifest is not reachable from here" in output(result)
    assert "redis.data_dir" in output(result)
    assert listed(redis_env) == []


def test_bgsave_fallback_with_the_rdb_out_of_reach_fails_clearly(redis_env: RedisEnv, acl_user: str) -> None:
    redis_env.write_config(username=acl_user, password_file=str(redis_env.root / "backup.pass"),
                           data_dir=str(redis_env.root / "no-such-mount"))

    result = redis_env.run("backup", "redis")

    assert result.returncode == 1, describe(result)
    assert f"the server's data folder {redis_env.root}/no-such-mount is not reachable from here" in output(result)
    assert listed(redis_env) == [] and not list(redis_env.folder.iterdir())


def _config(world: RedisEnv, **keys: Any) -> Any:
    from pydantic import SecretStr

    from kkua_backupd.config import RedisConfig

    return RedisConfig(host="127.0.0.1", port=world.server.port, **keys).model_copy(
        update={"password": SecretStr(REDIS_TEST_PASSWORD)})


def test_bgsave_waits_for_a_save_in_progress_then_makes_its_own(redis_env: RedisEnv) -> None:
    from kkua_backupd.sources.redis.protocol import bgsave

    with redis_env.client() as client:
        fill_bulk(client, 5_000, seed=3)
        client.config_set("rdb-key-save-delay", "200")  # about a second per save
        client.bgsave()
        first = client.info("persistence")
        assert first["rdb_bgsave_in_progress"] == 1
        client.config_set("rdb-key-save-delay", "0")  # ours is quick; the running one keeps its delay

        result = bgsave(client, _config(redis_env))

        after = client.info("persistence")
    assert after["rdb_bgsave_in_progress"] == 0 and after["rdb_last_bgsave_status"] == "ok"
    assert result.lastsave == after["rdb_last_save_time"] > first["rdb_last_save_time"]
    # rdb_saves counts a save when it starts: the one in progress is already in `first`
    assert after["rdb_saves"] == first["rdb_saves"] + 1, "ours did not run after the one in progress"


def test_bgsave_and_capture_timeouts(redis_env: RedisEnv) -> None:
    from kkua_backupd.errors import StepTimeout
    from kkua_backupd.sources.redis.protocol import bgsave, sync_rdb

    with redis_env.client() as client:
        fill_bulk(client, 10_000, seed=4)
        client.config_set("rdb-key-save-delay", "1000")  # ten seconds per save
        client.config_set("repl-diskless-sync", "no")
        with pytest.raises(StepTimeout, match=r"BGSAVE on .*: the save did not finish within redis.bgsave_timeout"):
            bgsave(client, _config(redis_env, bgsave_timeout=1))
        with pytest.raises(StepTimeout, match="RDB capture from Redis at 127.0.0.1:.* timed out after 1 s"):
            sync_rdb(_config(redis_env, capture_timeout=1), lambda _: None)
        client.config_set("rdb-key-save-delay", "0")


def test_failed_bgsave_is_reported_not_waited_for(workdir: Path) -> None:
    from kkua_backupd.config import RedisConfig
    from kkua_backupd.errors import JobError
    from kkua_backupd.sources.redis.local import LocalRedis
    from kkua_backupd.sources.redis.protocol import bgsave

    gone = workdir / "vanishing-dir"
    gone.mkdir()
    # `dir` is a protected config in Redis 7: this server allows CONFIG SET of it.
    with LocalRedis(workdir / "own-server", settings={"enable-protected-configs": "yes"}) as server, \
            server.client() as client:
        client.set("k", "v")
        client.config_set("dir", str(gone))
        gone.rmdir()  # the server can no longer create its temporary RDB file

        with pytest.raises(JobError, match=r"BGSAVE on Redis at .* failed \(rdb_last_bgsave_status:err\)"):
            bgsave(client, RedisConfig(host="127.0.0.1", port=server.port, bgsave_timeout=30))


def test_sigterm_mid_capture_removes_the_partial_file(redis_env: RedisEnv) -> None:
    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    with redis_env.client() as client:
        fill_bulk(client, 20_000, seed=5)
    settle(redis_env, **{"rdb-key-save-delay": "200"})
    proc = redis_env.popen("backup", "redis")

    def capturing() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the backup ended before it could be stopped: {proc.communicate()}")
        return bool(list(redis_env.folder.glob("*.rdb.gz.partial")))

    wait_for(capturing, "the capture to be under way")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    settle(redis_env, **{"rdb-key-save-delay": "0"})

    assert proc.returncode == 1, f"{out}\n{err}"
    assert "stopped by signal SIGTERM" in out + err
    assert not list(redis_env.folder.iterdir()), list(redis_env.folder.iterdir())
    assert listed(redis_env) == []


def test_capture_makes_an_rdb_only_safety_set(redis_env: RedisEnv, sample: dict[int, int]) -> None:
    """What a restore calls before its first change: one RDB and a manifest of type safety."""
    from kkua_backupd.config import load_config
    from kkua_backupd.core.context import JobContext
    from kkua_backupd.obs.logs import get_logger
    from kkua_backupd.sources.redis.backup import capture
    from kkua_backupd.store.storage import PREFIXES

    settle(redis_env, **{"repl-diskless-sync-delay": "0"})
    config = load_config(str(redis_env.config_path), environ={}).config
    ctx = JobContext(config=config, log=get_logger(job="redis"))

    manifest = capture(ctx, redis_env.folder, prefix=PREFIXES["redis"]["safety"], set_type="safety")

    assert manifest.type == "safety" and [f.role for f in manifest.files] == ["rdb"]
    assert manifest.files[0].name == f"safety_backup_before_restore_{manifest.id}.rdb.gz"
    assert manifest.details["keyspace"] == {str(db): n for db, n in sample.items()}
    (entry,) = listed(redis_env)
    assert entry["type"] == "safety" and entry["status"] == "ok"


def test_legacy_single_aof_file_is_archived_as_it_is(tmp_path: Path, redis_env: RedisEnv) -> None:
    """Redis < 7 keeps one appendonly.aof; it is compressed as it is (no tar)."""
    from kkua_backupd.config import load_config
    from kkua_backupd.core.context import JobContext
    from kkua_backupd.obs.logs import get_logger
    from kkua_backupd.sources.redis.backup import AofSource, write_aof

    aof = b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n" * 1000
    (tmp_path / "appendonly.aof").write_bytes(aof)
    ctx = JobContext(config=load_config(str(redis_env.config_path), environ={}).config, log=get_logger(job="redis"))

    info, details = write_aof(ctx, AofSource("single", tmp_path, "appendonly.aof"), tmp_path / "x.aof.gz", "gzip")

    assert gzip.decompress((tmp_path / "x.aof.gz").read_bytes()) == aof
    assert details.model_dump(exclude_unset=True) == {"form": "single", "name": "appendonly.aof", "bytes": len(aof)}
    assert info.size == (tmp_path / "x.aof.gz").stat().st_size
