"""The backup folder cannot be turned against root (issue 11): symlinks under the tool's folders are never
followed, folders and files get their modes whatever the umask, sets whose files are not plain files of
their own in the kind's folder (or belong to a stranger) are invalid everywhere, restores refuse folders
others can write, secrets files others can read are refused, and future-dated sets are warned about.

Every case runs the real CLI against real servers and checks the message, the exit code, that nothing
outside the tool's folders changed and that no data was lost."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.sandbox import table_contents
from tests.support.helpers import describe, output

from ..conftest import Env, RedisEnv

NOBODY = 65534


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `folder`: content, mtime (ns) and mode; what must not change."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def make_victim(root: Path) -> tuple[Path, Path]:
    """A folder outside the tool's folders with a file a symlink will point at."""
    outside = root / "outside"
    outside.mkdir()
    victim = outside / "victim.conf"
    victim.write_text("precious: do not truncate\n")
    return outside, victim


def backup(world: Env | RedisEnv, kind: str) -> dict[str, Any]:
    result = world.run("--json", "backup", kind, check=True)
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def copy_set(folder: Path, manifest: dict[str, Any], new_id: str, *, files: list[str] | None = None,
             created_at: str | None = None) -> Path:
    """A second set made from a real one: the data file copied under the new id, its manifest rewritten
    (names given by `files` as they are, e.g. paths out of the folder)."""
    doc = json.loads(json.dumps(manifest))
    old_id = doc["id"]
    doc["id"] = new_id
    for entry in doc["files"]:
        new_name = entry["name"].replace(old_id, new_id)
        (folder / new_name).write_bytes((folder / entry["name"]).read_bytes())
        entry["name"] = new_name
    if files is not None:
        for entry, name in zip(doc["files"], files, strict=False):
            entry["name"] = name
    if created_at is not None:
        doc["created_at"] = created_at
    path = folder / f"{doc['prefix']}{new_id}.manifest.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o640)
    return path


# ----------------------------------------------------------------------------------------------
# symlinks: lock files and log files


def test_symlinked_postgres_lock_is_refused_and_the_victim_untouched(env: Env) -> None:
    outside, victim = make_victim(env.root)
    locks = env.backup_dir / ".locks"
    locks.mkdir(parents=True)
    (locks / "postgres.lock").symlink_to(victim)
    before = snapshot(outside)
    result = env.run("backup", "postgres")
    assert result.returncode == 3, describe(result)
    assert "postgres.lock: it is a symlink" in output(result), describe(result)
    assert snapshot(outside) == before
    assert not list(env.folder.glob("kkua_backup_*")), "no backup may be written past a refused lock"


def test_symlinked_backup_log_is_refused_and_the_victim_untouched(env: Env) -> None:
    outside, victim = make_victim(env.root)
    env.log_dir.mkdir()
    (env.log_dir / "backup.log").symlink_to(victim)
    before = snapshot(outside)
    result = env.run("backup", "postgres")
    assert result.returncode == 3, describe(result)
    assert "backup.log: it is a symlink" in output(result), describe(result)
    assert snapshot(outside) == before
    # a planted hard link is refused the same way (protected_hardlinks aside)
    (env.log_dir / "backup.log").unlink()
    os.link(victim, env.log_dir / "backup.log")
    linked = env.run("backup", "postgres")
    assert linked.returncode == 3, describe(linked)
    assert "hard links" in output(linked), describe(linked)
    assert snapshot(outside) == before


def test_symlinked_redis_lock_and_log_are_refused(redis_env: RedisEnv) -> None:
    redis_env.client().set("k", "v")
    outside, victim = make_victim(redis_env.root)
    locks = redis_env.backup_dir / ".locks"
    locks.mkdir(parents=True)
    (locks / "redis.lock").symlink_to(victim)
    before = snapshot(outside)
    result = redis_env.run("backup", "redis")
    assert result.returncode == 3, describe(result)
    assert "redis.lock: it is a symlink" in output(result), describe(result)
    assert snapshot(outside) == before

    (locks / "redis.lock").unlink()
    (redis_env.log_dir / "redis_backup.log").unlink()  # the refused run above logged its refusal there
    (redis_env.log_dir / "redis_backup.log").symlink_to(victim)
    result = redis_env.run("backup", "redis")
    assert result.returncode == 3, describe(result)
    assert "redis_backup.log: it is a symlink" in output(result), describe(result)
    assert snapshot(outside) == before
    assert redis_env.client().get("k") == b"v"


def test_symlinked_kind_folder_is_refused(env: Env) -> None:
    outside, _ = make_victim(env.root)
    env.backup_dir.mkdir()
    (env.backup_dir / "postgres").symlink_to(outside)
    before = snapshot(outside)
    result = env.run("backup", "postgres")
    assert result.returncode == 3, describe(result)
    assert "postgres: it is a symlink" in output(result), describe(result)
    assert snapshot(outside) == before


# ----------------------------------------------------------------------------------------------
# modes whatever the umask


def test_umask_000_still_gives_0750_folders_and_0640_files(env: Env) -> None:
    env.backup_dir = env.root / "made" / "by" / "tool" / "backups"
    env.log_dir = env.root / "logs-parent" / "logs"
    env.write_config()
    argv = [sys.executable, "-m", "kkua_backupd", "backup", "postgres"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env.cli_env(), timeout=300,
                            preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, describe(result)
    made: list[Path] = []
    for top in (env.root / "made", env.root / "logs-parent"):
        made += [top, *top.rglob("*")]
    folders = [p for p in made if p.is_dir()]
    files = [p for p in made if p.is_file()]
    assert len(folders) >= 8 and len(files) >= 5, made  # parents, kind, .locks, .state; set, lock, state, log
    for path in folders:
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, f"{path}: {oct(path.stat().st_mode)}"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, f"{path}: {oct(path.stat().st_mode)}"
    names = {p.name for p in files}
    assert {"postgres.lock", "jobs.json", "jobs.json.lock", "backup.log"} <= names, names


# ----------------------------------------------------------------------------------------------
# folders others can write


def test_world_writable_backup_folder_refuses_restore_and_config_check_says_so(env: Env) -> None:
    backup(env, "postgres")
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        before = table_contents(conn)
    for folder, mode in ((env.folder, 0o777), (env.backup_dir, 0o770)):
        folder.chmod(mode)
        result = env.run("restore", "postgres", "latest", "--force")
        assert result.returncode == 3, describe(result)
        assert f"{folder} is writable by" in output(result), describe(result)
        assert f"chmod 750 {folder}" in output(result), describe(result)
        with env.connect() as conn:
            assert table_contents(conn) == before
        check = env.run("--json", "config", "check")
        assert check.returncode == 2, describe(check)
        problems = json.loads(check.stdout)["problems"]
        assert any(f"chmod 750 {folder}" in p for p in problems), problems
        human = env.run("config", "check")
        assert human.returncode == 2 and f"chmod 750 {folder}" in output(human), describe(human)
        folder.chmod(0o750)
    assert env.run("config", "check").returncode == 0


# ----------------------------------------------------------------------------------------------
# sets that are not plain files of their own in the kind's folder


def test_manifests_naming_files_outside_and_symlinked_files_are_invalid_everywhere(env: Env) -> None:
    manifest = backup(env, "postgres")
    real = env.folder / manifest["files"][0]["name"]
    outside, _ = make_victim(env.root)
    elsewhere = outside / "x.sql.gz"
    elsewhere.write_bytes(real.read_bytes())
    old = "2020-01-01T02:00:00+00:00"  # past retention: prune would delete these sets if it trusted them
    copy_set(env.folder, manifest, "20200101_020001", files=[str(elsewhere)], created_at=old)
    copy_set(env.folder, manifest, "20200101_020002", files=["../../outside/x.sql.gz"], created_at=old)
    linked = copy_set(env.folder, manifest, "20200101_020003", created_at=old)
    data = env.folder / json.loads(linked.read_text())["files"][0]["name"]
    data.unlink()
    data.symlink_to(elsewhere)
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        before = table_contents(conn)
    outside_before = snapshot(outside)
    expected = {"20200101_020001": f"manifest names '{elsewhere}'",
                "20200101_020002": "manifest names '../../outside/x.sql.gz'",
                "20200101_020003": f"{data.name} is a symlink"}

    listed = env.run("--json", "list", "postgres", check=True)
    by_id = {s["id"]: s for s in json.loads(listed.stdout)}
    for set_id, reason in expected.items():
        assert by_id[set_id]["status"] == "invalid", by_id[set_id]
        assert reason in by_id[set_id]["problem"], by_id[set_id]
    assert by_id[manifest["id"]]["status"] == "ok" and by_id[manifest["id"]]["problem"] is None
    human = env.run("list", "postgres", check=True)
    for set_id, reason in expected.items():
        assert f"invalid: postgres {set_id}: {reason}" in human.stdout, human.stdout

    for set_id, reason in expected.items():
        verify = env.run("verify", set_id)
        assert verify.returncode == 3, describe(verify)
        assert "is invalid: " + reason in output(verify), describe(verify)
        restore = env.run("restore", "postgres", set_id, "--force")
        assert restore.returncode == 3, describe(restore)
        assert "is invalid: " + reason in output(restore), describe(restore)
    everything = env.run("verify", "all")
    assert everything.returncode == 3, describe(everything)
    assert f"OK    {real.name}" in everything.stdout, everything.stdout  # the good set is still verified

    prune = env.run("--json", "prune")
    assert prune.returncode == 0, describe(prune)
    report = json.loads(prune.stdout)
    assert not report["deleted"], report["deleted"]
    skipped = " | ".join(item["reason"] for item in report["skipped"])
    for reason in expected.values():
        assert reason in skipped, skipped

    assert snapshot(outside) == outside_before
    assert data.is_symlink() and real.exists()
    with env.connect() as conn:
        assert table_contents(conn) == before


def test_set_file_owned_by_another_user_is_refused(env: Env) -> None:
    manifest = backup(env, "postgres")
    data = env.folder / manifest["files"][0]["name"]
    os.chown(data, NOBODY, NOBODY)
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        before = table_contents(conn)
    listed = json.loads(env.run("--json", "list", check=True).stdout)
    assert listed[0]["status"] == "invalid" and "owned by uid 65534 (nobody)" in listed[0]["problem"], listed[0]
    for args in (("verify", manifest["id"]), ("restore", "postgres", manifest["id"], "--force"),
                 ("restore", "postgres", "latest", "--force")):
        result = env.run(*args)
        assert result.returncode in (2, 3), describe(result)
        if args[-2] != "latest":
            assert result.returncode == 3 and "owned by uid 65534 (nobody)" in output(result), describe(result)
        else:  # an invalid set is never `latest`
            assert "no complete postgres backup" in output(result), describe(result)
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert data.exists()


# ----------------------------------------------------------------------------------------------
# secrets


@pytest.mark.parametrize(("mode", "accepted"), [(0o644, False), (0o620, False), (0o604, False),
                                                (0o600, True), (0o640, True), (0o400, True)])
def test_password_file_mode(env: Env, mode: int, accepted: bool) -> None:
    pass_file = env.root / "pg.pass"
    pass_file.chmod(mode)
    result = env.run("config", "check")
    if accepted:
        assert result.returncode == 0, describe(result)
        return
    assert result.returncode == 2, describe(result)
    text = output(result)
    assert f"postgres.password_file: {pass_file} is" in text, text
    assert f"chmod 600 {pass_file}" in text and "chown root:kkua-backup" in text, text
    backup_run = env.run("backup", "postgres")
    assert backup_run.returncode == 2, describe(backup_run)
    assert not env.folder.exists()


@pytest.mark.parametrize(("mode", "accepted"), [(0o644, False), (0o660, False), (0o600, True), (0o640, True)])
def test_env_file_mode(workdir: Path, mode: int, accepted: bool) -> None:
    env_file = workdir / "app.env"
    env_file.write_text("DATABASE_PASSWORD=from-the-app\n")
    env_file.chmod(mode)
    config = workdir / "config.toml"
    config.write_text(f'backup_dir = "{workdir / "b"}"\nlog_dir = "{workdir / "l"}"\nenv_file = "{env_file}"\n')
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    result = subprocess.run([sys.executable, "-m", "kkua_backupd", "--config", str(config), "config", "check"],
                            capture_output=True, text=True, env=full, timeout=60, check=False)
    if accepted:
        assert result.returncode == 0, describe(result)
        assert "from-the-app" not in output(result)
        return
    assert result.returncode == 2, describe(result)
    assert f"env_file: {env_file} is" in output(result) and f"chmod 600 {env_file}" in output(result), \
        describe(result)


# ----------------------------------------------------------------------------------------------
# future-dated sets, stale partial files


def test_future_dated_set_is_warned_about_and_never_latest(env: Env) -> None:
    manifest = backup(env, "postgres")
    next_year = (dt.datetime.now(dt.UTC) + dt.timedelta(days=365)).replace(microsecond=0)
    future_id = next_year.strftime("%Y%m%d_%H%M%S")
    copy_set(env.folder, manifest, future_id, created_at=next_year.isoformat())
    listed = env.run("list")
    assert listed.returncode == 0, describe(listed)
    assert f"warning: postgres set {future_id} is dated" in listed.stdout and "in the future" in listed.stdout
    doc = json.loads(env.run("--json", "list", check=True).stdout)
    assert doc[0]["id"] == future_id and doc[0]["future"] is True and doc[0]["status"] == "ok"
    status = env.run("--json", "status")
    assert any(future_id in w for w in json.loads(status.stdout)["warnings"]), status.stdout
    assert f"postgres set {future_id} is dated" in env.run("status").stdout
    # `latest` picks neither it nor an older set silently; naming it works
    with env.connect() as conn:
        before = table_contents(conn)
    refused = env.run("restore", "postgres", "latest", "--force")
    assert refused.returncode == 3, describe(refused)
    assert "`latest` is ambiguous" in output(refused) and future_id in output(refused), describe(refused)
    named = env.run("restore", "postgres", future_id, "--force")
    assert named.returncode == 0, describe(named)
    with env.connect() as conn:
        assert table_contents(conn) == before
    # the backup log says so too
    again = env.run("backup", "postgres")
    assert again.returncode == 0, describe(again)
    assert f"postgres set {future_id} is dated" in (env.log_dir / "backup.log").read_text()


def test_restore_removes_partial_files_a_killed_run_left_and_nothing_else(env: Env) -> None:
    backup(env, "postgres")
    left = ["safety_backup_before_restore_20240101_101500.sql.gz.partial",
            "kkua_restore_20240101_101500_1234.dump.partial", "kkua_backup_20240101_020000.sql.gz.partial"]
    for name in left:
        (env.folder / name).write_bytes(b"half")
    outside, victim = make_victim(env.root)
    (env.folder / "safety_backup_before_restore_20240101_101501.sql.gz.partial").symlink_to(victim)
    (env.folder / "notes.partial").write_text("not the tool's\n")
    before = snapshot(outside)
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 0, describe(result)
    for name in left:
        assert not (env.folder / name).exists(), name
        assert any("removed a partial file left by an interrupted run" in line and f"file={name}" in line
                   for line in result.stdout.splitlines()), result.stdout
    assert (env.folder / "notes.partial").exists()
    assert (env.folder / "safety_backup_before_restore_20240101_101501.sql.gz.partial").is_symlink()
    assert snapshot(outside) == before


# ----------------------------------------------------------------------------------------------
# one-pass restores (issue 14): only for sets whose bytes are trusted before the first one loads

# The CLI as `env.run` starts it, then how many bytes the process read (rchar: every read(), file or pipe)
READ_COUNTER = r"""
import sys
from kkua_backupd.cli import main
code = 70
try:
    code = main(sys.argv[2:])
finally:
    rchar = next(line for line in open("/proc/self/io") if line.startswith("rchar:"))
    with open(sys.argv[1], "w") as fh:
        fh.write(rchar.split()[1])
sys.exit(code)
"""


def restore_counting_reads(env: Env, *args: str) -> tuple[dict[str, Any], int]:
    """`kkua-backup --json restore postgres ARGS`: its report, and the bytes the CLI process read."""
    counter = env.root / "rchar"
    result = subprocess.run([sys.executable, "-c", READ_COUNTER, str(counter), "--json", "restore", "postgres",
                             *args], capture_output=True, text=True, env=env.cli_env(), timeout=300, check=False)
    assert result.returncode == 0, describe(result)
    report: dict[str, Any] = json.loads(result.stdout)
    return report, int(counter.read_text())


def rewrite_manifest(env: Env, manifest: dict[str, Any], **fields: Any) -> None:
    """Change fields outside the signature, as only root or kkua-backup can (the folder passes its checks)."""
    path = env.folder / f"{manifest['prefix']}{manifest['id']}.manifest.json"
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def test_a_trusted_set_is_read_once_and_any_other_gets_the_full_check_first(env: Env) -> None:
    """A set made here, in folders that pass their checks, loads in one pass (the file read once, checked as it
    loads); a set made on another host, one fetched from a remote, and an unsigned one where a signing key is
    configured are read in full before anything changes, as before. The bytes the CLI reads prove which."""
    env.write_config(compression="none")  # the file's bytes are what is read: a clear difference
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.filler AS SELECT g, repeat(md5(g::text), 4) AS pad "
                     "FROM generate_series(1, 60000) g")
        before = table_contents(conn)
    manifest = backup(env, "postgres")
    size = manifest["files"][0]["size"]
    assert size > 6 << 20, size
    args = ("latest", "--force", "--no-safety-backup")

    one_pass, read_once = restore_counting_reads(env, *args)
    assert one_pass["check"]["mode"] == "one pass", one_pass["check"]
    assert one_pass["check"]["files"][0]["checksum"] == "ok"
    assert one_pass["check"]["files"][0]["sha256"] == manifest["files"][0]["sha256"]
    assert "checking the set while it loads (one pass)" in (env.log_dir / "restore.log").read_text()

    untrusted = {
        "made on another host": ({"host": "elsewhere.example"}, "made on host elsewhere.example"),
        "fetched without a signature": ({"fetched": {"remote": "offsite"}}, "fetched from remote offsite"),
    }
    for what, (fields, reason) in untrusted.items():
        rewrite_manifest(env, manifest, **{"host": manifest["host"], "fetched": None, **fields})
        checked, read_twice = restore_counting_reads(env, *args)
        assert checked["check"]["mode"] == "pre-check" and reason in checked["check"]["reason"], (what, checked)
        assert checked["check"]["files"][0]["checksum"] == "ok"
        # the pre-check reads the whole file once more before the load reads it
        assert read_twice - read_once > 0.9 * size, (what, read_once, read_twice, size)
        assert read_once < read_twice - 0.9 * size
    rewrite_manifest(env, manifest, host=manifest["host"], fetched=None)
    with env.connect() as conn:
        assert table_contents(conn) == before

    # a signing key configured: an unsigned set gets the pre-check; a signed one loads in one pass, even when
    # its manifest says another host or a remote (the signature proves this tool's hosts made it)
    secret = env.root / "signing.key"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    subprocess.run(["age-keygen", "-o", str(env.root / "age.key")], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(env.root / "age.key")], check=True, capture_output=True,
                               text=True).stdout.strip()
    with env.config_path.open("a") as fh:
        fh.write(f'\n[encryption]\nmethod = "age"\nrecipients = ["{recipient}"]\n'
                 f'identity_file = "{env.root / "age.key"}"\nsigning_key_file = "{secret}"\n')
    unsigned, _ = restore_counting_reads(env, manifest["id"], "--force", "--no-safety-backup")
    assert unsigned["check"]["mode"] == "pre-check" and "no signature" in unsigned["check"]["reason"], unsigned
    signed = backup(env, "postgres")
    assert signed["mac"] and signed["files"][0]["name"].endswith(".sql.age")
    rewrite_manifest(env, signed, host="elsewhere.example", fetched={"remote": "offsite"})
    report, _ = restore_counting_reads(env, signed["id"], "--force", "--no-safety-backup")
    assert report["check"]["mode"] == "one pass", report["check"]
    with env.connect() as conn:
        assert table_contents(conn) == before
