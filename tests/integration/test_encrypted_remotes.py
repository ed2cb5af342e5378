"""Encrypted sets on remotes, against the real S3 store and SSH host of test_remotes.py: what leaves the host is
ciphertext (no row of the sample in any stored byte), a signed set restores from a remote, and a set forged on
the remote (a crafted dump encrypted to the public recipient, its manifest's sizes and sha256s recomputed) or
stripped of its signature is refused by `restore --from` with exit 3 before anything changes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from kkua_backupd.demo.sandbox import table_contents
from tests.support.helpers import describe, output
from tests.support.remotes import RcloneS3, Sshd, add_remotes

from ..conftest import Env
from .test_encrypted_backups import KNOWN_ROW, encryption
from .test_remotes import local_sets, s3, sshd  # noqa: F401 - the fixtures, used by name


def test_encrypted_sets_leave_the_host_encrypted_and_restore_from_a_remote(
        env: Env, s3: RcloneS3, sshd: Sshd, workdir: Path) -> None:  # noqa: F811 - the fixtures imported above
    env.write_config(compression="none")  # no compression: only encryption hides the rows
    encryption(env, "age")
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    with env.connect() as conn:
        before = table_contents(conn)
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    assert made["files"][0]["name"].endswith(".sql.age")
    stored = {**{f"s3:{k}": p for k, p in s3.objects().items()}, **{f"ssh:{k}": p for k, p in sshd.files().items()}}
    assert any(k.endswith(".sql.age") for k in stored), sorted(stored)
    assert [k for k, p in stored.items() if KNOWN_ROW in p.read_bytes()] == []
    shutil.rmtree(env.folder)
    target = f"{env.database}_from_box"
    result = env.run("restore", "postgres", "latest", "--from", "box", "--force", "--target-db", target)
    assert result.returncode == 0, describe(result)
    assert "signature matches" in output(result)
    # fetched, but its signature verified: it loads in one pass
    assert "while it loads (one pass)" in output(result), describe(result)
    with env.connect(target) as conn:
        assert table_contents(conn) == before


def _forge(data: Path, manifest: Path, recipient: str, *, unsign: bool) -> None:
    """Replace a remote set's data file by a crafted dump encrypted to the public recipient, and recompute its
    manifest's size and sha256 (as anyone who can write the remote can); `unsign` also drops the signature."""
    crafted = b"DROP TABLE users CASCADE;\n"
    data.write_bytes(subprocess.run(["age", "-r", recipient], input=crafted, capture_output=True,
                                    check=True).stdout)
    doc = json.loads(manifest.read_text())
    doc["files"][0]["size"] = data.stat().st_size
    doc["files"][0]["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    if unsign:
        doc.pop("mac", None)
    manifest.write_text(json.dumps(doc))


def test_a_forged_or_unsigned_set_on_a_remote_is_refused_before_any_change(
        env: Env, s3: RcloneS3, sshd: Sshd, workdir: Path) -> None:  # noqa: F811 - the fixtures imported above
    made_keys = encryption(env, "age")
    add_remotes(env.config_path, s3.remote_toml("offsite", workdir), sshd.remote_toml("box"))
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    data_name = made["files"][0]["name"]
    manifest_name = f"{made['prefix']}{made['id']}.manifest.json"
    _forge(s3.objects()[f"kkua/postgres/{data_name}"], s3.objects()[f"kkua/postgres/{manifest_name}"],
           made_keys["recipient"], unsign=False)
    _forge(sshd.files()[f"postgres/{data_name}"], sshd.files()[f"postgres/{manifest_name}"],
           made_keys["recipient"], unsign=True)
    with env.connect() as conn:
        conn.execute("UPDATE users SET nickname = 'after-backup' WHERE id = 1")
        before = table_contents(conn)
    shutil.rmtree(env.folder)
    for name, why in (("offsite", "signature does not match"), ("box", "carries no signature")):
        result = env.run("restore", "postgres", "latest", "--from", name, "--force")
        assert result.returncode == 3, describe(result)
        assert why in output(result) and "nothing was restored" in output(result)
        with env.connect() as conn:
            assert table_contents(conn) == before
        assert local_sets(env) == []
        assert not list((env.backup_dir / ".remote-staging" / "postgres").iterdir())


def test_without_a_signing_key_a_fetched_set_restores_with_a_warning(
        env: Env, sshd: Sshd) -> None:  # noqa: F811 - the fixture imported above
    encryption(env, "age", signing=False)
    add_remotes(env.config_path, sshd.remote_toml("box"))
    made = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    assert "mac" not in made or made["mac"] is None
    shutil.rmtree(env.folder)
    target = f"{env.database}_unsigned"
    result = env.run("restore", "postgres", "latest", "--from", "box", "--force", "--target-db", target)
    assert result.returncode == 0, describe(result)
    assert "authenticity cannot be proven" in output(result)
    # nothing proves who made it: read in full before the load, now and at every later restore of it
    assert "pre-check" in output(result) and "fetched from remote box" in output(result), describe(result)
    again = env.run("restore", "postgres", made["id"], "--force", "--target-db", f"{target}_again")
    assert again.returncode == 0, describe(again)
    assert "pre-check" in output(again) and "fetched from remote box" in output(again), describe(again)
