"""A Redis restore that cannot finish leaves things as they should be, and says so: file mode starts Redis
again whatever stopped it (disk full, a failing start, SIGTERM) and says in which state the server is and
where the previous files are; a logical restore stopped midway says what the target holds and the exact
command that undoes it; a read-only replica is refused; kill -9 at random points of both modes, in loops,
leaves no process of ours, a server that is up (or a `status`/`restore` that says it may be down), and a
safety backup that brings the data back."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kkua_backupd.demo.redis_sample import create_sample
from kkua_backupd.sources.redis.local import LocalRedis
from tests.conftest import REDIS_TEST_PASSWORD, RedisEnv
from tests.support.helpers import describe, output, wait_for
from tests.support.redis_restore import (
    DEBUG,
    SMALL,
    Restartable,
    backup,
    digest,
    report_of,
    restartable_env,
    restore,
    write_config,
)

KILL_RUNS = 10
FAST = {"repl-diskless-sync-delay": "0"}  # the safety backup's SYNC starts at once


def answers(port: int) -> bool:
    try:
        with redis.Redis(host="127.0.0.1", port=port, password=REDIS_TEST_PASSWORD, socket_timeout=2) as client:
            return bool(client.ping())
    except redis.BusyLoadingError:
        return True
    except redis.RedisError:
        return False


def safety_sets(env: RedisEnv) -> list[str]:
    return sorted(p.name for p in env.folder.glob("safety_backup_before_restore_*.rdb*")
                  if not p.name.endswith(".partial"))


def fill(server: LocalRedis | Restartable, keys: int) -> None:
    """`keys` small strings in db 2, so a logical copy takes long enough to be stopped midway."""
    with server.client(2) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(keys):
            pipe.set(f"bulk:{i}", f"value-{i}-" + "x" * 40)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()


@pytest.fixture
def restartable(workdir: Path) -> Iterator[tuple[RedisEnv, Restartable]]:
    env, server = restartable_env(workdir, "file-server", FAST)
    try:
        yield env, server
    finally:
        server.close()


@pytest.fixture
def debug_env(workdir: Path) -> Iterator[RedisEnv]:
    """A server with DEBUG enabled (digests), the sample data, and a CLI world around it."""
    with LocalRedis(workdir / "debug-server", password=REDIS_TEST_PASSWORD, settings={**DEBUG, **FAST}) as server:
        world = RedisEnv(server, workdir, workdir / "config.toml", workdir / "backups", workdir / "logs")
        world.password_file.write_text(REDIS_TEST_PASSWORD + "\n")
        world.password_file.chmod(0o600)
        world.write_config()
        create_sample(server, large_value_size=SMALL)
        yield world


# ----------------------------------------------------------------------------------------------
# File mode: Redis is started again whatever happens


def test_file_mode_disk_full_while_placing_starts_redis_with_the_old_data(workdir: Path) -> None:
    """The server's folder is a 1 MiB tmpfs; the backup's RDB (2 MiB of random bytes) does not fit."""
    tiny = workdir / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        with LocalRedis(workdir / "big-source", password=REDIS_TEST_PASSWORD) as source:
            source.client(0).set("big", os.urandom(2 << 20))
            env, server = restartable_env(workdir, "tiny/server", FAST)
            try:
                write_config(env, server)
                env.write_config(port=source.port)  # back up the big source ...
                backup(env)
                write_config(env, server)  # ... and restore it into the server on the tmpfs
                server.client(0).set("mine", "the data from before")
                result = restore(env, "latest", "--force", "--mode", "file")
                assert result.returncode == 1, describe(result)
                text = output(result)
                assert "disk full" in text, text
                assert "runs again with its previous data" in text and "undo with" not in text, text
                assert "backup_dir" not in text, text
                assert answers(server.port), "Redis was left stopped"
                assert server.client(0).get("mine") == b"the data from before"
                assert not list((tiny / "server").glob("*.partial"))
                assert not list((tiny / "server").glob("*.before-restore-*")), "the undo left a second name"
                status = env.run("status")
                assert "may be DOWN" not in output(status), output(status)
            finally:
                server.close()
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)


def test_file_mode_start_command_failing_says_redis_is_down_and_how_to_start_it(
        restartable: tuple[RedisEnv, Restartable]) -> None:
    env, server = restartable
    create_sample(server.local, large_value_size=SMALL)
    backup(env)
    env.write_config(port=server.port)
    with env.config_path.open("a") as fh:
        fh.write(f"stop_command = {json.dumps(server.stop_command)}\n")
        fh.write('start_command = ["sh", "-c", "echo no such unit >&2; exit 5"]\n')
    result = restore(env, "latest", "--force", "--mode", "file")
    assert result.returncode == 1, describe(result)
    text = output(result)
    assert "is still DOWN" in text and "start it with: sh -c" in text, text
    assert "the restored files are in place" in text and "dump.rdb.before-restore-" in text, text
    assert re.search(r"undo with: kkua-backup restore redis safety_backup_before_restore_\d{8}_\d{6}\.rdb\.gz "
                     r"--force --flush", text), text
    assert not answers(server.port)
    # The next commands say so too.
    status = env.run("status")
    assert status.returncode == 1 and "may be DOWN" in output(status), describe(status)
    again = restore(env, "latest", "--force", "--mode", "logical")
    assert again.returncode == 1 and "may be DOWN" in output(again), describe(again)
    subprocess.run(server.start_command, check=True)
    wait_for(lambda: answers(server.port), "redis to start", 30)
    report_of(restore(env, "latest", "--force"))
    assert "may be DOWN" not in output(env.run("status"))


def test_sigterm_during_a_file_mode_restore_starts_redis_again(restartable: tuple[RedisEnv, Restartable],
                                                               workdir: Path) -> None:
    """The stop command is slow (a shell that sleeps after the shutdown): SIGTERM arrives while Redis is
    down; the restore undoes nothing it had not done, starts Redis and says so (exit 1)."""
    env, server = restartable
    create_sample(server.local, large_value_size=SMALL)
    backup(env)
    server.client(0).set("mine", "kept")
    flag = workdir / "stopped"
    stop = ["sh", "-c", f"{' '.join(server.stop_command)} && touch {flag} && exec sleep 60"]
    env.write_config(port=server.port)
    with env.config_path.open("a") as fh:
        fh.write(f"stop_command = {json.dumps(stop)}\n")
        fh.write(f"start_command = {json.dumps(server.start_command)}\n")
    proc = env.popen("restore", "redis", "latest", "--force", "--mode", "file")
    try:
        wait_for(flag.exists, "the stop command to have stopped Redis", 60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out + err
    text = out + err
    assert "stopped by signal SIGTERM" in text and "runs again with its previous data (no file had" in text, text
    assert "no partial file was kept" not in text
    assert answers(server.port)
    assert server.client(0).get("mine") == b"kept"


# ----------------------------------------------------------------------------------------------
# Logical mode: what the target holds and how to undo it


def test_sigterm_during_a_logical_restore_says_what_the_target_holds_and_how_to_undo(debug_env: RedisEnv) -> None:
    fill(debug_env.server, 300_000)
    backup(debug_env)
    debug_env.client(0).set("db0:string:embstr", "changed after the backup")
    before = digest(debug_env.server)
    log = debug_env.log_dir / "restore.log"
    proc = debug_env.popen("restore", "redis", "latest", "--force", "--flush")
    try:
        wait_for(lambda: log.is_file() and "copying keys into the server" in log.read_text(), "the copy to start", 120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out + err
    if proc.returncode == 0:
        pytest.fail(f"the copy finished before SIGTERM reached it; make the data set larger\n{text}")
    assert proc.returncode == 1, text
    assert "no partial file was kept" not in text, text
    assert "may be HALF-RESTORED" in text and "emptied (--flush)" in text, text
    assert re.search(r"; it holds (no keys|db\d+: \d+ keys)", text), text
    match = re.search(r"to undo, restore the data from before: (kkua-backup restore redis "
                      r"(safety_backup_before_restore_\d{8}_\d{6}\.rdb\.gz) --force --flush)", text)
    assert match, text
    undo = match.group(1).split()[1:]
    report_of(debug_env.run("--json", *undo, "--no-safety-backup"))
    assert digest(debug_env.server) == before


def test_a_read_only_replica_is_refused_naming_its_master(debug_env: RedisEnv, workdir: Path) -> None:
    backup(debug_env)
    with LocalRedis(workdir / "replica", password=REDIS_TEST_PASSWORD,
                    settings={"masterauth": REDIS_TEST_PASSWORD,
                              "replicaof": f"127.0.0.1 {debug_env.server.port}"}) as replica:
        debug_env.write_config(port=replica.port)
        result = restore(debug_env, "latest", "--force")
    assert result.returncode == 3, describe(result)
    text = output(result)
    assert "read-only replica" in text and f"restore into its master (127.0.0.1:{debug_env.server.port})" in text
    assert "ACL" not in text and "+restore" not in text
    assert safety_sets(debug_env) == []


# ----------------------------------------------------------------------------------------------
# kill -9 at random points


def our_processes(token: str, server_pid: int | None) -> list[str]:
    """Processes that inherited the run's token (its children, wherever they went), except the server."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == server_pid:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if token.encode() in environ and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {argv}")
    return found


def server_pid(port: int) -> int | None:
    with contextlib.suppress(redis.RedisError), \
            redis.Redis(host="127.0.0.1", port=port, password=REDIS_TEST_PASSWORD, socket_timeout=2) as client:
        return int(client.info("server")["process_id"])
    return None


def kill_at_random(env: RedisEnv, args: list[str], delay: float) -> tuple[subprocess.Popen[str], str]:
    token = uuid.uuid4().hex
    proc = env.popen(*args, env={"KKUA_TEST_RUN": token})
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc, token


def measure(env: RedisEnv, args: list[str]) -> float:
    started = time.monotonic()
    report_of(env.run(*args))
    return time.monotonic() - started


def test_kill9_at_random_points_of_a_file_mode_restore(restartable: tuple[RedisEnv, Restartable]) -> None:
    env, server = restartable
    create_sample(server.local, large_value_size=SMALL)
    backup(env)
    args = ["--json", "restore", "redis", "latest", "--force", "--mode", "file"]
    full = measure(env, args)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    outcomes = []
    for run in range(KILL_RUNS):
        server.client(0).set("db0:string:embstr", f"changed before run {run}")
        before = digest(server.local)
        safety_before = safety_sets(env)
        delay = rng.uniform(0.2, full)
        proc, token = kill_at_random(env, args, delay)
        where = f"run {run}, kill after {delay:.2f} s (seed {seed})"
        if proc.returncode == 0:
            outcomes.append("finished")
            continue
        wait_for(lambda t=token: our_processes(t, server_pid(server.port)) == [] or None,  # type: ignore[misc]
                 f"no process of the killed restore left ({where})", 30)
        if not answers(server.port):
            status = env.run("status")
            assert status.returncode == 1 and "may be DOWN" in output(status), f"{where}: {describe(status)}"
            assert "start it with:" in output(status)
            again = restore(env, "latest", "--force", "--mode", "logical")
            assert again.returncode == 1 and "may be DOWN" in output(again), f"{where}: {describe(again)}"
            subprocess.run(server.start_command, check=True)
            wait_for(lambda: answers(server.port), "redis to start", 30)
            outcomes.append("down")
        else:
            outcomes.append("up")
        new = [s for s in safety_sets(env) if s not in safety_before]
        if new:  # the data from before comes back from the safety backup
            report_of(restore(env, new[0], "--force", "--flush", "--no-safety-backup"))
        assert digest(server.local) == before, f"{where}: the data from before is not back ({outcomes})"
    print(f"file mode kill -9 outcomes (seed {seed}): {outcomes}")


def test_kill9_at_random_points_of_a_logical_restore(debug_env: RedisEnv) -> None:
    fill(debug_env.server, 100_000)
    backup(debug_env)
    args = ["--json", "restore", "redis", "latest", "--force"]
    full = measure(debug_env, args)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    outcomes = []
    for run in range(KILL_RUNS):
        debug_env.client(0).set("db0:string:embstr", f"changed before run {run}")
        debug_env.client(2).delete("bulk:1")
        before = digest(debug_env.server)
        safety_before = safety_sets(debug_env)
        delay = rng.uniform(0.2, full)
        proc, token = kill_at_random(debug_env, args, delay)
        where = f"run {run}, kill after {delay:.2f} s (seed {seed})"
        wait_for(lambda t=token: our_processes(t, None) == [] or None,  # type: ignore[misc]
                 f"no process of the killed restore left ({where})", 30)
        assert answers(debug_env.server.port), where
        new = [s for s in safety_sets(debug_env) if s not in safety_before]
        outcomes.append("finished" if proc.returncode == 0 else "safety taken" if new else "before safety")
        if new:  # the data from before comes back from the safety backup
            report_of(restore(debug_env, new[0], "--force", "--flush", "--no-safety-backup"))
        # else: killed before the safety backup existed, so nothing may have changed
        assert digest(debug_env.server) == before, f"{where}: the data from before is not back ({outcomes})"
    print(f"logical kill -9 outcomes (seed {seed}): {outcomes}")
