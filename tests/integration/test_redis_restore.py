"""`kkua-backup restore redis` against real redis-server processes: logical and file mode round trips with
every data type, merge and --flush, AOF targets, damaged and too-new backups, refusals, and secrets."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.redis_sample import compare, create_sample, snapshot
from kkua_backupd.sources.redis.local import LocalRedis, free_port
from kkua_backupd.sources.redis.protocol import max_rdb_version
from kkua_backupd.store.lock import TargetLock
from tests.conftest import REDIS_TEST_PASSWORD, RedisEnv
from tests.support.redis_restore import DEBUG, SMALL, Restartable, backup, digest, report_of, restartable_env, restore
from tests.support.terminal import run_with_terminal

# ----------------------------------------------------------------------------------------------
# Helpers and fixtures


def rdb_of(env: RedisEnv, backup_set: dict[str, Any]) -> bytes:
    """The decompressed RDB of a set."""
    rdb = next(f["name"] for f in backup_set["files"] if ".rdb" in f["name"])
    return gzip.decompress((env.folder / rdb).read_bytes())


def rewrite_rdb(env: RedisEnv, backup_set: dict[str, Any], data: bytes) -> None:
    """Replace a set's RDB with `data` (gzip) and fix its manifest, as a backup from another server would be."""
    rdb = next(f["name"] for f in backup_set["files"] if ".rdb" in f["name"])
    packed = gzip.compress(data)
    (env.folder / rdb).write_bytes(packed)
    manifest_path = next(env.folder.glob(f"*{backup_set['id']}.manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["name"] == rdb:
            entry["size"] = len(packed)
            entry["sha256"] = hashlib.sha256(packed).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture
def sample_env(redis_env: RedisEnv) -> RedisEnv:
    """redis_env with the sample dataset (a small 'large' value)."""
    create_sample(redis_env.server, large_value_size=SMALL)
    return redis_env


@pytest.fixture
def debug_server(workdir: Path) -> Iterator[LocalRedis]:
    """A second server (same password, DEBUG enabled) to restore into."""
    with LocalRedis(workdir / "debug-server", password=REDIS_TEST_PASSWORD, settings=DEBUG) as server:
        yield server


@pytest.fixture
def restartable(workdir: Path) -> Iterator[tuple[RedisEnv, Restartable]]:
    env, server = restartable_env(workdir, "file-server")
    try:
        yield env, server
    finally:
        server.close()


@pytest.fixture
def restartable_aof(workdir: Path) -> Iterator[tuple[RedisEnv, Restartable]]:
    env, server = restartable_env(workdir, "aof-server", {"appendonly": "yes"})
    try:
        yield env, server
    finally:
        server.close()


class ArgvWatch(threading.Thread):
    """Reads /proc/PID/cmdline of the processes a test's command starts (its descendants, and anything
    naming the test's folder, such as a daemonized redis-server) and keeps those containing a secret.
    Other processes on the machine are not ours to judge."""

    def __init__(self, secret: str, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.secret = secret.encode()
        self.workdir = str(workdir).encode()
        self.root: int | None = None
        self.seen: set[str] = set()
        self.commands: set[str] = set()  # every whole argv seen
        self.leaks: list[str] = []
        self.stop = threading.Event()

    @staticmethod
    def _parent(pid: int) -> int:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0
        return int(stat.rsplit(")", 1)[1].split()[1])

    def _ours(self, pid: int, cmdline: bytes) -> bool:
        if self.workdir in cmdline:
            return True
        for _ in range(64):
            if pid in (0, 1):
                return False
            if pid == self.root:
                return True
            pid = self._parent(pid)
        return False

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if not cmdline or not self._ours(int(entry.name), cmdline):
                    continue
                text = cmdline.replace(b"\0", b" ").decode(errors="replace")
                self.seen.add(text.split(" ")[0])
                self.commands.add(text.strip())
                if self.secret in cmdline:
                    self.leaks.append(text)
            time.sleep(0.01)

    def run_cli(self, env: RedisEnv, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `kkua-backup ARGS` while watching it and its children."""
        self.start()
        try:
            proc = env.popen(*args)
            self.root = proc.pid
            out, err = proc.communicate(timeout=300)
        finally:
            self.stop.set()
            self.join()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def unchanged(server: LocalRedis | Restartable, before: dict[Any, Any]) -> None:
    assert compare(before, snapshot(server)) == []


def set_names(env: RedisEnv) -> list[str]:
    return [s["files"][0]["name"] for s in json.loads(env.run("--json", "list", "redis", check=True).stdout)]


# ----------------------------------------------------------------------------------------------
# Round trips


def test_logical_round_trip_every_type_into_another_server(sample_env: RedisEnv, debug_server: LocalRedis,
                                                           workdir: Path) -> None:
    before = snapshot(sample_env.server)
    assert {db for db, _ in before} == {0, 1, 5}
    backup_set = backup(sample_env)
    sample_env.write_config(port=debug_server.port)
    debug_server.client(0).set("junk-only-in-target", "stays (merge)")

    watch = ArgvWatch(REDIS_TEST_PASSWORD, workdir)
    report = report_of(watch.run_cli(sample_env, "--json", "restore", "redis", "latest", "--force"))
    assert watch.leaks == []
    # The backup's RDB is streamed into the target: no local redis-server has to be able to load it.
    # (`redis-server --version`, which says what redis-check-rdb reads, loads nothing.)
    servers = [c for c in watch.commands if c.split(" ")[0].endswith("redis-server") and "--version" not in c]
    assert servers == [], watch.commands

    assert report["mode"] == "logical"
    assert report["databases"] == {"0": 106, "1": 106, "5": 106}
    assert report["counts_match"] is True, report["differences"]
    assert report["safety_backup"] and (sample_env.folder / report["safety_backup"]["file"]).is_file()
    assert debug_server.client(0).get("junk-only-in-target") == b"stays (merge)"
    debug_server.client(0).delete("junk-only-in-target")
    assert compare(before, snapshot(debug_server)) == []

    # Oracle: the same RDB loaded by redis-server itself hashes (values and expiry times) the same.
    oracle_dir = workdir / "oracle"
    oracle_dir.mkdir()
    (oracle_dir / "dump.rdb").write_bytes(rdb_of(sample_env, backup_set))
    with LocalRedis(oracle_dir, settings={**DEBUG, "dbfilename": "dump.rdb"}) as oracle:
        assert digest(oracle) == digest(debug_server)
        for key in (b"db0:stream:events", b"db0:zset:large", b"db0:string:binary", b"db0:hll:dense"):
            with oracle.client() as a, debug_server.client() as b:
                assert a.execute_command("DEBUG", "DIGEST-VALUE", key) == \
                    b.execute_command("DEBUG", "DIGEST-VALUE", key)
    log = (sample_env.log_dir / "restore.log").read_text()
    assert "restore finished" in log and REDIS_TEST_PASSWORD not in log


def test_file_mode_round_trip_survives_the_shutdown_save(restartable: tuple[RedisEnv, Restartable]) -> None:
    env, server = restartable
    create_sample(server.local, large_value_size=SMALL)
    before, before_digest = snapshot(server), digest(server.local)
    backup(env)
    # Change everything after the backup; the stop command's SHUTDOWN saves this state to dump.rdb.
    server.client(0).flushall()
    server.client(2).set("written-after-backup", "must disappear")

    watch = ArgvWatch(REDIS_TEST_PASSWORD, server.folder)
    report = report_of(watch.run_cli(env, "--json", "restore", "redis", "latest", "--force", "--mode", "file"))
    assert watch.leaks == []
    assert report["mode"] == "file" and report["counts_match"] is True, report
    assert report["aof_handling"].startswith("AOF off")
    assert compare(before, snapshot(server)) == []
    assert digest(server.local) == before_digest
    assert list(server.folder.glob("dump.rdb.before-restore-*")), "the previous RDB was not kept"
    # And the restored RDB is what the server saves from now on: a restart keeps the data.
    server.restart()
    assert compare(before, snapshot(server)) == []


def test_file_mode_waits_for_a_server_that_starts_late(restartable: tuple[RedisEnv, Restartable]) -> None:
    """A start command that returns before Redis listens (like `systemctl start --no-block`)."""
    env, server = restartable
    create_sample(server.local, large_value_size=SMALL)
    before = snapshot(server)
    backup(env)
    server.client(1).flushdb()
    late = " ".join(server.start_command)
    env.write_config(port=server.port)
    with env.config_path.open("a") as fh:
        fh.write(f"stop_command = {json.dumps(server.stop_command)}\n")
        fh.write(f"start_command = {json.dumps(['sh', '-c', f'(sleep 2; {late}) >/dev/null 2>&1 &'])}\n")
    report = report_of(restore(env, "latest", "--force", "--mode", "file", "--no-safety-backup"))
    assert report["counts_match"] is True
    assert compare(before, snapshot(server)) == []


def test_file_mode_with_appendonly_yes_loads_the_backup_and_keeps_aof_on(
        restartable_aof: tuple[RedisEnv, Restartable]) -> None:
    env, server = restartable_aof
    create_sample(server.local, large_value_size=SMALL)
    before = snapshot(server)
    backup(env)
    server.client(0).flushall()
    server.client(0).set("after-backup", "x")

    report = report_of(restore(env, "latest", "--force", "--mode", "file"))
    assert "rebuilt from the restored RDB" in report["aof_handling"]
    assert report["aof_enabled"] is True
    assert compare(before, snapshot(server)) == []
    with server.client() as client:
        assert client.config_get("appendonly")["appendonly"] in ("yes", b"yes")
    assert list(server.folder.glob("appendonlydir.before-restore-*")), "the old AOF was not moved aside"
    # The AOF now holds the restored data: after another restart (AOF loaded, not the RDB) it is all there.
    server.restart(nosave=True, while_stopped=(server.folder / "dump.rdb").unlink)
    assert compare(before, snapshot(server)) == []


def test_aof_backup_restores_in_both_modes(restartable_aof: tuple[RedisEnv, Restartable]) -> None:
    env, server = restartable_aof
    create_sample(server.local, large_value_size=SMALL)
    backup_set = backup(env, "--aof")
    assert any(".aof" in f["name"] for f in backup_set["files"]), backup_set["files"]

    # A replayed AOF leaves consumer groups' entries-read/lag unknown (Redis itself does): compare without.
    before = snapshot(server, group_counters=False)
    server.client(0).flushall()
    report = report_of(restore(env, "latest", "--aof", "--force", "--flush"))
    assert report["aof"] is True and report["mode"] == "logical"
    assert compare(before, snapshot(server, group_counters=False)) == []

    server.client(0).flushall()
    server.client(3).set("after", "x")
    report = report_of(restore(env, backup_set["id"], "--aof", "--force", "--mode", "file"))
    assert report["aof_handling"] == "backup AOF installed"
    assert compare(before, snapshot(server, group_counters=False)) == []


def test_merge_keeps_other_keys_flush_removes_them_and_safety_backup_undoes(sample_env: RedisEnv) -> None:
    backup(sample_env)
    client = sample_env.client(0)
    client.set("only-in-target", "mine")
    client.set("db0:string:embstr", "changed after the backup")
    sample_env.client(3).set("db3-not-in-backup", "untouched by --flush")

    report = report_of(restore(sample_env, "latest", "--force"))
    assert client.get("only-in-target") == b"mine"
    assert client.get("db0:string:embstr") == b"short"  # the backup wins on conflict
    assert report["flushed"] == []

    client.set("db0:string:embstr", "changed again")
    before_flush = snapshot(sample_env.server)
    report = report_of(restore(sample_env, "latest", "--force", "--flush"))
    assert client.get("only-in-target") is None
    assert client.get("db0:string:embstr") == b"short"
    assert sample_env.client(3).get("db3-not-in-backup") == b"untouched by --flush"
    assert report["flushed"] == [0, 1, 5]
    assert "database emptied before restore" in (sample_env.log_dir / "restore.log").read_text()

    # The safety backup holds the data from before the --flush restore, and restores like any backup.
    safety = report["safety_backup"]["file"]
    report_of(restore(sample_env, safety, "--force", "--flush", "--no-safety-backup"))
    unchanged(sample_env.server, before_flush)


def test_acl_user_and_wrong_password(sample_env: RedisEnv) -> None:
    user_pass = "acl-Us3r-secret"
    sample_env.client(0).acl_setuser("restorer", enabled=True, passwords=[f"+{user_pass}"], keys=["*"],
                                     channels=["*"], commands=["+@all"])
    (sample_env.root / "user.pass").write_text(user_pass + "\n")
    (sample_env.root / "user.pass").chmod(0o600)  # a password file others can read is refused
    sample_env.write_config(username="restorer", password_file=str(sample_env.root / "user.pass"))
    before = snapshot(sample_env.server)
    backup(sample_env)
    sample_env.client(1).flushdb()
    watch = ArgvWatch(user_pass, sample_env.root)
    report = report_of(watch.run_cli(sample_env, "--json", "restore", "redis", "latest", "--force"))
    assert watch.leaks == []
    assert report["counts_match"] is True
    unchanged(sample_env.server, before)

    (sample_env.root / "user.pass").write_text("not-the-password\n")
    sample_env.client(0).set("marker", "kept")
    marked = snapshot(sample_env.server)
    result = restore(sample_env, "latest", "--force")
    assert result.returncode == 1, result.stderr
    assert "refused the password" in result.stderr and "not-the-password" not in result.stderr
    unchanged(sample_env.server, marked)

    # A user that may not RESTORE: every key is refused, the first one is named, nothing was written.
    (sample_env.root / "user.pass").write_text(user_pass + "\n")
    sample_env.client(0).acl_setuser("restorer", enabled=True, commands=["-restore"])
    result = restore(sample_env, "latest", "--force", "--no-safety-backup")
    assert result.returncode == 1, result.stderr
    assert "refused key" in result.stderr and "+restore" in result.stderr
    unchanged(sample_env.server, marked)


def test_a_result_that_differs_from_the_backup_fails_the_restore(sample_env: RedisEnv) -> None:
    """The one rule after every restore (docs/decisions/0011, as for PostgreSQL): key counts that differ
    from what the backup recorded make the restore fail (exit 1), naming each difference and the way back;
    the data stays as restored."""
    backup_set = backup(sample_env)
    manifest_path = next(sample_env.folder.glob(f"*{backup_set['id']}.manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["details"]["keyspace"]["0"] == 106
    manifest["details"]["keyspace"]["0"] = 200  # what the backup says it held; the RDB holds 106
    manifest_path.write_text(json.dumps(manifest))
    sample_env.client(0).flushall()
    result = restore(sample_env, "latest", "--force")
    assert result.returncode == 1, result.stdout
    assert "finished, but the result differs from the backup: db0: 106 keys, expected 200" in result.stderr
    assert "undo with: kkua-backup restore redis safety_backup_before_restore_" in result.stderr
    assert sample_env.client(0).dbsize() == 106 and sample_env.client(5).dbsize() == 106
    log = (sample_env.log_dir / "restore.log").read_text()
    assert "restored data differs from the backup" in log and "restore finished" not in log


def test_file_from_the_old_scripts_restores_by_name(sample_env: RedisEnv) -> None:
    """A plain .rdb without a manifest (what the old backup_redis.sh left) is restored when named."""
    before = snapshot(sample_env.server)
    backup_set = backup(sample_env)
    legacy = sample_env.folder / "redis_backup_20200101_030000.rdb"
    legacy.write_bytes(rdb_of(sample_env, backup_set))
    sample_env.client(0).flushall()
    report = report_of(restore(sample_env, legacy.name, "--force", "--no-safety-backup"))
    assert report["counts_match"] is None and report["file"] == legacy.name
    unchanged(sample_env.server, before)
    assert "has no manifest" in (sample_env.log_dir / "restore.log").read_text()


# ----------------------------------------------------------------------------------------------
# Refusals: nothing changes


def test_truncated_and_flipped_backups_are_refused(sample_env: RedisEnv) -> None:
    backup_set = backup(sample_env)
    sample_env.client(0).set("marker", "after backup")
    before = snapshot(sample_env.server)
    rdb = sample_env.folder / next(f["name"] for f in backup_set["files"] if ".rdb" in f["name"])
    good = rdb.read_bytes()

    rdb.write_bytes(good[: len(good) // 2])
    result = restore(sample_env, "latest", "--force")
    assert result.returncode == 3, result.stderr
    assert rdb.name in result.stderr
    unchanged(sample_env.server, before)

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    rdb.write_bytes(bytes(flipped))
    result = restore(sample_env, "latest", "--force")
    assert result.returncode == 3, result.stderr
    assert "checksum" in result.stderr or "corrupt" in result.stderr
    unchanged(sample_env.server, before)
    assert not list(sample_env.folder.glob("safety_backup_before_restore_*")), "a safety backup was taken"


@pytest.mark.parametrize(("above", "mode"), [(1, "file"), (None, "logical")])
def test_rdb_newer_than_the_server_is_refused(sample_env: RedisEnv, above: int | None, mode: str) -> None:
    """File mode hands the RDB to the server itself, so one newer than it reads is refused; a logical restore
    carries a newer RDB over key by key (tests/integration/test_redis_versions.py) and refuses only a version
    newer than this tool reads (99 here). Both name the versions and change nothing. The server's version
    and what it reads come from the server (whatever Redis the host has), not from this machine's package."""
    with sample_env.client() as client:
        server_version = str(client.info("server")["redis_version"])
    reads = max_rdb_version(server_version)
    version = 99 if above is None else reads + above
    backup_set = backup(sample_env)
    data = rdb_of(sample_env, backup_set)
    assert data[:5] == b"REDIS"
    rewrite_rdb(sample_env, backup_set, data[:5] + b"%04d" % version + data[9:])
    sample_env.write_config(stop_command=["false"], start_command=["false"])  # never reached
    sample_env.client(0).set("marker", "after backup")
    before = snapshot(sample_env.server)
    result = restore(sample_env, "latest", "--force", "--mode", mode)
    assert result.returncode == 3, result.stderr
    assert f"RDB version {version}" in result.stderr
    assert f"Redis {server_version}" in result.stderr and f"reads up to {reads}" in result.stderr
    unchanged(sample_env.server, before)
    assert not list(sample_env.folder.glob("safety_backup_before_restore_*"))


def test_server_down(sample_env: RedisEnv) -> None:
    backup(sample_env)
    port = free_port()
    sample_env.write_config(port=port)
    result = restore(sample_env, "latest", "--force")
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert not list(sample_env.folder.glob("safety_backup_before_restore_*"))


def test_no_terminal_without_force_is_refused(sample_env: RedisEnv) -> None:
    backup(sample_env)
    sample_env.client(0).set("marker", "after backup")
    before = snapshot(sample_env.server)
    result = restore(sample_env, "latest", "--flush")
    assert result.returncode == 3, result.stderr
    assert "no terminal" in result.stderr
    unchanged(sample_env.server, before)
    result = restore(sample_env, "latest", "--flush", environ={"FORCE_RESTORE": "true"})
    report_of(result)
    assert sample_env.client(0).get("marker") is None


def test_terminal_answer_no_changes_nothing_and_yes_restores(sample_env: RedisEnv) -> None:
    before = snapshot(sample_env.server)
    backup(sample_env)
    sample_env.client(0).set("marker", "after backup")
    marked = snapshot(sample_env.server)
    rc, output = run_with_terminal(sample_env, "restore", "redis", "latest", "--flush",  # type: ignore[arg-type]
                                   answer="no")
    assert rc == 3, output
    assert "Restore redis_backup_" in output and "--flush empties db 0, 1, 5 first" in output
    assert "nothing was changed" in output
    unchanged(sample_env.server, marked)
    rc, output = run_with_terminal(sample_env, "restore", "redis", "latest", "--flush",  # type: ignore[arg-type]
                                   answer="yes")
    assert rc == 0, output
    unchanged(sample_env.server, before)


def test_second_restore_while_locked_is_refused(sample_env: RedisEnv) -> None:
    backup(sample_env)
    sample_env.client(0).set("marker", "after backup")
    before = snapshot(sample_env.server)
    lock = TargetLock(sample_env.backup_dir, "redis", "another restore")
    lock.acquire()
    try:
        result = restore(sample_env, "latest", "--force", "--flush")
    finally:
        lock.release()
    assert result.returncode == 3, result.stderr
    assert "another run holds the redis lock" in result.stderr and str(os.getpid()) in result.stderr
    unchanged(sample_env.server, before)


def test_file_mode_needs_stop_and_start_commands(sample_env: RedisEnv) -> None:
    backup(sample_env)
    result = restore(sample_env, "latest", "--force", "--mode", "file")
    assert result.returncode == 2, result.stderr
    assert "redis.stop_command" in result.stderr and "redis.start_command" in result.stderr


def test_no_secret_in_argv_logs_or_backup_files(workdir: Path) -> None:
    """The stop command is a redis-cli that records its argv and whether REDISCLI_AUTH reached it."""
    bindir = workdir / "bin"
    bindir.mkdir()
    record = workdir / "redis-cli.calls"
    wrapper = bindir / "redis-cli"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {record}\n"
                       f"[ -n \"$REDISCLI_AUTH\" ] && echo auth-in-env >> {record}\n"
                       f"exec {shutil.which('redis-cli')} \"$@\"\n")
    wrapper.chmod(0o755)
    env, server = restartable_env(workdir, "secret-server", cli=str(wrapper))
    try:
        create_sample(server.local, large_value_size=SMALL)
        backup(env)
        for mode in ("file", "logical"):
            watch = ArgvWatch(REDIS_TEST_PASSWORD, workdir)
            report_of(watch.run_cli(env, "--json", "restore", "redis", "latest", "--force", "--mode", mode))
            assert watch.leaks == [], mode
        calls = record.read_text()
        assert "shutdown" in calls and "auth-in-env" in calls and REDIS_TEST_PASSWORD not in calls
        for path in env.log_dir.rglob("*"):
            if path.is_file():
                assert REDIS_TEST_PASSWORD not in path.read_text(errors="replace"), path
        for path in env.folder.iterdir():
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            assert REDIS_TEST_PASSWORD.encode() not in data, path
    finally:
        server.close()


def test_manifests_of_older_versions_verify_and_restore(sample_env: RedisEnv) -> None:
    """A backup's details have main's keys in main's order; a set whose manifest has the first version's
    details (no `rdb`, no `keyspace_info`, key counts as {"db0": {"keys": n}}) and a field of a newer
    version still verifies with a restore test and restores with its key counts compared; damaged details
    are refused by name before anything changes."""
    made = backup(sample_env)
    path = sample_env.folder / f"redis_backup_{made['id']}.manifest.json"
    manifest = json.loads(path.read_text())
    assert list(manifest["details"]) == [
        "server_version", "rdb_version", "capture", "transfer", "compression", "uncompressed_bytes", "keyspace",
        "expires_per_db", "keys", "expires", "keyspace_exact", "keyspace_info", "redis_check_rdb", "rdb"]
    assert list(manifest["details"]["rdb"]) == [
        "rdb_version", "rdb_format", "rdb_writer", "keys", "expires", "keys_per_db", "expires_per_db",
        "value_types", "functions", "modules", "crc64", "largest_value_bytes"]
    details = manifest["details"]
    for key in ("rdb", "keyspace_info"):
        del details[key]
    details["keyspace"] = {f"db{db}": {"keys": n} for db, n in details["keyspace"].items()}
    details["shards"] = 1  # from a newer version
    path.write_text(json.dumps(manifest, indent=2))
    verified = json.loads(sample_env.run("--json", "verify", "latest", "--restore-test", check=True).stdout)
    assert [(r["ok"], r["restore_test"]["ok"], r["restore_test"]["problems"]) for r in verified] == [(True, True, [])]
    report = report_of(restore(sample_env, "latest", "--force"))
    assert report["counts_match"] is True and report["differences"] == []
    assert list(report) == ["kind", "file", "id", "mode", "aof", "flush", "safety_backup", "rdb_version",
                            "server_version", "check", "keys", "databases", "expired_skipped", "converted",
                            "by_commands", "functions", "copy_seconds", "keys_per_second", "flushed", "notes",
                            "counts_match", "differences", "seconds"]
    assert list(report["check"]) == ["files", "rdb_version"]
    details["keyspace"] = ["db0", 5]
    path.write_text(json.dumps(manifest, indent=2))
    before = snapshot(sample_env.server)
    refused = restore(sample_env, "latest", "--force")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "details.keyspace" in refused.stdout + refused.stderr
    unchanged(sample_env.server, before)
