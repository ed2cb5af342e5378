"""Encrypted backups through the real CLI against real servers: round trips with age and gpg, no plaintext in
any stored byte, the age and gpg command-line tools reading what we wrote, wrong key, identity missing at
restore, tampered files and forged sets refused before any change, and a config that fails closed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kkua_backupd.demo.redis_sample import compare, create_sample, snapshot
from kkua_backupd.demo.sandbox import table_contents
from kkua_backupd.stream.encrypt import generate_identity

from ..conftest import Env, RedisEnv
from .test_redis_restore import restartable_env

KNOWN_ROW = b"kkua@example.com"  # a row of the sample data
PASSPHRASE = "a long gpg passphrase for tests"


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def encryption(world: Env | RedisEnv, method: str, *, identity: bool = True, signing: bool = True,
               **extra: str) -> dict[str, str]:
    """Append an [encryption] section to the world's config; returns what was made (recipient, paths)."""
    root = world.root
    made: dict[str, str] = {}
    lines = ["", "[encryption]", f'method = "{method}"']
    if method == "age":
        if not (root / "age.key").exists():
            text, recipient = generate_identity()
            secret_file(root / "age.key", text)
            (root / "recipient.txt").write_text(recipient + "\n")
        made["recipient"] = (root / "recipient.txt").read_text().strip()
        lines.append(f'recipients = ["{made["recipient"]}"]')
        if identity:
            lines.append(f'identity_file = "{root / "age.key"}"')
    else:
        secret_file(root / "gpg.pass", PASSPHRASE + "\n")
        lines.append(f'passphrase_file = "{root / "gpg.pass"}"')
    if signing:
        if not (root / "signing.key").exists():
            secret_file(root / "signing.key", os.urandom(32).hex() + "\n")
        lines.append(f'signing_key_file = "{root / "signing.key"}"')
    lines += [f'{key} = "{value}"' for key, value in extra.items()]
    with world.config_path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    return made


def stored_bytes(world: Env | RedisEnv) -> bytes:
    return b"".join(p.read_bytes() for p in world.backup_dir.rglob("*") if p.is_file())


def decrypt_by_hand(world: Env | RedisEnv, method: str, path: Path) -> bytes:
    """What an operator gets from the file with the age or gpg command line."""
    if method == "age":
        return subprocess.run(["age", "--decrypt", "-i", str(world.root / "age.key"), str(path)],
                              capture_output=True, check=True).stdout
    home = world.root / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    try:
        return subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(home), "--pinentry-mode", "loopback",
                               "--passphrase-file", str(world.root / "gpg.pass"), "--decrypt", str(path)],
                              capture_output=True, check=True).stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


def damage(env: Env) -> None:
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 3 = 0")
        conn.execute("UPDATE users SET nickname = nickname || '-x'")


# --- PostgreSQL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "fmt"), [("age", "plain"), ("gpg", "plain"), ("age", "custom")])
def test_postgres_round_trip_encrypted(env: Env, method: str, fmt: str) -> None:
    env.write_config(format=fmt, compression="none")  # no compression: only encryption hides the rows
    made = encryption(env, method)
    with env.connect() as conn:
        before = table_contents(conn)
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    name = manifest["files"][0]["name"]
    assert name.endswith((".sql" if fmt == "plain" else ".dump") + "." + method)
    assert manifest["files"][0]["encryption"] == method
    assert manifest["encryption"]["method"] == method
    if method == "age":
        assert manifest["encryption"]["recipients"] == [made["recipient"]]
    assert manifest["mac"]["algorithm"] == "hmac-sha256"
    assert KNOWN_ROW not in stored_bytes(env)
    plain = decrypt_by_hand(env, method, env.folder / name)
    assert KNOWN_ROW in plain or fmt == "custom"

    listed = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert listed[0]["encryption"]["method"] == method
    shown = env.run("list", "postgres", check=True).stdout
    assert "encrypted: 1 set(s)" in shown and (made["recipient"] if method == "age" else "gpg passphrase") in shown
    verified = json.loads(env.run("--json", "verify", "latest", check=True).stdout)
    assert verified[0]["ok"] and "warning" not in verified[0] and verified[0]["signature"] == "ok"

    damage(env)
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--force", check=True).stdout)
    assert report["verified"] is True
    assert report["safety_backup"]["file"].endswith("." + method)  # the data from before is encrypted too
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert KNOWN_ROW not in stored_bytes(env)


def test_postgres_wrong_key_missing_identity_and_verify_without_key(env: Env) -> None:
    env.write_config(compression="zstd")
    encryption(env, "age")
    env.run("backup", "postgres", check=True)
    damage(env)
    with env.connect() as conn:
        damaged = table_contents(conn)
    config = env.config_path.read_text()

    # another identity: refused (exit 3) before any change
    secret_file(env.root / "other.key", generate_identity()[0])
    env.config_path.write_text(config.replace(str(env.root / "age.key"), str(env.root / "other.key")))
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 3, result.stderr
    assert "cannot be decrypted with the configured identity" in result.stdout + result.stderr

    # no identity at all: a clear error (exit 2) before any change; verify checks the sha256 and says so
    env.config_path.write_text(config.replace(f'identity_file = "{env.root / "age.key"}"\n', ""))
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 2, result.stderr
    assert "no identity is configured" in result.stdout + result.stderr
    verify = env.run("verify", "latest")
    assert verify.returncode == 0, verify.stderr
    assert "could not decrypt" in verify.stdout and "checksums ok" in verify.stdout
    assert env.run("verify", "latest", "--restore-test").returncode == 2

    # the identity file is there but unreadable by others' rules (mode 0644): refused, exit 2
    env.config_path.write_text(config)
    (env.root / "age.key").chmod(0o644)
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 2 and "readable by others" in result.stdout + result.stderr
    (env.root / "age.key").chmod(0o600)

    with env.connect() as conn:
        assert table_contents(conn) == damaged
    assert not [p for p in env.folder.iterdir() if p.name.startswith("safety_")]


def test_postgres_tampered_and_forged_sets_are_refused_before_any_change(env: Env) -> None:
    env.write_config(compression="none")
    made = encryption(env, "age")
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    damage(env)
    with env.connect() as conn:
        damaged = table_contents(conn)
    path = env.folder / manifest["files"][0]["name"]
    original = path.read_bytes()

    # a flipped byte: the sha256 and age both refuse it; exit 3
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 3, result.stderr
    assert "does not match its checksum" in result.stdout + result.stderr

    # a crafted dump encrypted to the (public) recipient with a manifest to match: the signature refuses it
    crafted = b"DROP TABLE users CASCADE;\n"
    path.write_bytes(subprocess.run(["age", "-r", made["recipient"]], input=crafted, capture_output=True,
                                    check=True).stdout)
    manifest_path = env.folder / f"{manifest['prefix']}{manifest['id']}.manifest.json"
    doc = json.loads(manifest_path.read_text())
    doc["files"][0]["size"] = path.stat().st_size
    doc["files"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(doc))
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 3, result.stderr
    assert "signature does not match" in result.stdout + result.stderr
    assert env.run("verify", "latest").returncode == 3

    with env.connect() as conn:
        assert table_contents(conn) == damaged


def test_encryption_config_fails_closed(env: Env) -> None:
    encryption(env, "age", identity=False)
    config = env.config_path.read_text()
    recipient = (env.root / "recipient.txt").read_text().strip()
    env.config_path.write_text(config.replace(recipient, recipient[:-3] + "qqq"))
    result = env.run("backup", "postgres")
    assert result.returncode == 2, result.stderr
    output = result.stdout + result.stderr
    assert "encryption:" in output and "not a valid age recipient" in output
    assert not env.folder.exists() or not list(env.folder.iterdir())

    env.config_path.write_text(config.replace(f'recipients = ["{recipient}"]',
                                              f'recipients_file = "{env.root / "absent.txt"}"'))
    result = env.run("run", "postgres")
    assert result.returncode == 2 and "encryption.recipients_file: cannot read" in result.stdout + result.stderr
    assert env.run("config", "check").returncode == 2
    assert not env.folder.exists() or not list(env.folder.iterdir())


def test_key_generate_cli(workdir: Path) -> None:
    out = workdir / "keys" / "age.key"
    out.parent.mkdir()
    run = [sys.executable, "-m", "kkua_backupd", "key"]
    env = {k: v for k, v in os.environ.items() if k != "KKUA_BACKUP_CONFIG"}
    env["KKUA_BACKUP_CONFIG"] = str(workdir / "absent.toml")  # needs no config
    result = subprocess.run([*run, "generate", "--out", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    recipient = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("recipient:"))
    assert recipient.startswith("age1") and "lost key means lost backups" in result.stdout
    assert recipient in out.read_text() and "AGE-SECRET-KEY-1" not in result.stdout
    if shutil.which("age"):
        cipher = subprocess.run(["age", "-r", recipient], input=b"hi", capture_output=True, check=True).stdout
        assert subprocess.run(["age", "-d", "-i", str(out)], input=cipher, capture_output=True,
                              check=True).stdout == b"hi"
    before = out.read_bytes()
    again = subprocess.run([*run, "generate", "--out", str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 3 and "refusing to overwrite" in again.stdout + again.stderr
    assert out.read_bytes() == before
    signing = workdir / "keys" / "signing.key"
    result = subprocess.run([*run, "signing-key", "--out", str(signing), "--json"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["signing_key_file"] == str(signing)
    assert len(bytes.fromhex(signing.read_text().strip())) == 32


# --- Redis ---------------------------------------------------------------------------------------------------

REDIS_SECRET = b"only-in-the-database-7f3a91"


@pytest.mark.parametrize("method", ["age", "gpg"])
def test_redis_round_trip_encrypted_with_side_files(redis_env: RedisEnv, method: str) -> None:
    redis_env.write_config(compression="none")
    encryption(redis_env, method)
    create_sample(redis_env.server, large_value_size=4096)
    with redis_env.client() as client:
        client.set("plain-secret", REDIS_SECRET * 50)
    before = snapshot(redis_env.server)
    redis_env.run("backup", "redis", check=True)
    listed = json.loads(redis_env.run("--json", "list", "redis", check=True).stdout)[0]
    roles = {f["role"]: f for f in listed["files"]}
    assert {"rdb", "memory", "config"} <= set(roles)
    for entry in listed["files"]:  # the RDB and the memory and config side files: all encrypted
        assert entry["name"].endswith("." + method) and entry["encryption"] == method
    assert listed["encryption"]["method"] == method and listed["mac"]
    assert REDIS_SECRET not in stored_bytes(redis_env)
    assert b"redis_version" not in stored_bytes(redis_env)  # the memory side file's INFO text
    rdb = decrypt_by_hand(redis_env, method, redis_env.folder / roles["rdb"]["name"])
    assert rdb.startswith(b"REDIS") and REDIS_SECRET in rdb
    assert b"maxmemory" in decrypt_by_hand(redis_env, method, redis_env.folder / roles["config"]["name"])

    verified = json.loads(redis_env.run("--json", "verify", "latest", "--restore-test", check=True).stdout)
    assert verified[0]["ok"] and verified[0]["restore_test"]["ok"]

    with redis_env.client() as client:
        client.flushall()
        client.set("after-backup", "x")
    result = redis_env.run("--json", "restore", "redis", "latest", "--force", "--flush")
    assert result.returncode == 0, result.stdout + result.stderr
    assert compare(before, snapshot(redis_env.server)) == []
    assert REDIS_SECRET not in stored_bytes(redis_env)  # the safety backup too


def test_redis_wrong_passphrase_and_tampered_file_change_nothing(redis_env: RedisEnv) -> None:
    redis_env.write_config(compression="gzip")
    encryption(redis_env, "gpg")
    with redis_env.client() as client:
        client.set("k", "backed up")
    redis_env.run("backup", "redis", check=True)
    with redis_env.client() as client:
        client.set("k", "current")
    secret_file(redis_env.root / "gpg.pass", "not the passphrase\n")
    result = redis_env.run("restore", "redis", "latest", "--force", "--flush")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "configured passphrase" in result.stdout + result.stderr

    secret_file(redis_env.root / "gpg.pass", PASSPHRASE + "\n")
    rdb = next(p for p in redis_env.folder.iterdir() if ".rdb" in p.name)
    data = bytearray(rdb.read_bytes())
    data[len(data) // 2] ^= 0x10
    rdb.write_bytes(bytes(data))
    result = redis_env.run("restore", "redis", "latest", "--force", "--flush")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "does not match its checksum" in result.stdout + result.stderr
    with redis_env.client() as client:
        assert client.get("k") == b"current"
        assert client.dbsize() == 1


def test_redis_aof_encrypted_restores_in_file_mode(workdir: Path) -> None:
    env, server = restartable_env(workdir, "aof-server", {"appendonly": "yes"})
    try:
        encryption(env, "age")
        create_sample(server.local, large_value_size=4096)
        env.run("backup", "redis", "--aof", check=True)
        listed = json.loads(env.run("--json", "list", "redis", check=True).stdout)[0]
        aof = next(f for f in listed["files"] if f["role"] == "aof")
        assert aof["name"].endswith(".aof.gz.age") and aof["encryption"] == "age"
        before = snapshot(server, group_counters=False)
        server.client(0).flushall()
        server.client(3).set("after", "x")
        result = env.run("--json", "restore", "redis", "latest", "--aof", "--force", "--mode", "file")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["aof_handling"] == "backup AOF installed"
        assert compare(before, snapshot(server, group_counters=False)) == []
    finally:
        server.close()


def test_sets_made_before_encryption_was_switched_on_still_restore(redis_env: RedisEnv) -> None:
    """Readers are chosen per file: a host that now encrypts still reads the clear sets it made before."""
    world = redis_env
    create_sample(world.server)
    before = snapshot(world.server)
    plain = json.loads(world.run("--json", "backup", "redis", check=True).stdout)
    assert not [f["name"] for f in plain["files"] if f["name"].endswith((".age", ".gpg"))]
    encryption(world, "age")
    sealed = json.loads(world.run("--json", "backup", "redis", check=True).stdout)
    assert [f["name"] for f in sealed["files"] if not f["name"].endswith(".age")] == []
    with world.client() as client:
        client.flushall()
    result = world.run("restore", "redis", plain["id"], "--force", "--flush", "--no-safety-backup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert compare(before, snapshot(world.server)) == []
    verify = world.run("verify", "all")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("OK") >= 2
