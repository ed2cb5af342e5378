"""Restored SQL cannot run psql meta-commands or change database (issue 11): a set whose SQL was given one,
with its manifest's checksums rewritten to match (what someone who can write the folder could do), is refused
by verify and by every restore path before any change, naming the meta-command; nothing it asks for runs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from kkua_backupd.config import load_config
from kkua_backupd.core.context import JobContext
from kkua_backupd.errors import CommandFailed
from kkua_backupd.obs.logs import get_logger
from kkua_backupd.sources.postgres import client as pg_client
from kkua_backupd.sources.postgres import load as pg_load
from kkua_backupd.store.signing import sign
from kkua_backupd.store.storage import Manifest
from tests.support.helpers import describe, output
from tests.support.pg_data import contents_of

from ..conftest import Env

pytestmark = pytest.mark.timeout(300)


def meta_commands(proof: Path) -> dict[str, bytes]:
    """Each meta-command the issue names, written so that running it would leave `proof` behind or escape
    the restore's transaction."""
    return {
        "shell": b"\\! touch " + bytes(proof) + b"\n",
        "connect": b"\\connect postgres\n",
        "copy-to-program": b"\\copy (SELECT 1) TO PROGRAM 'touch " + bytes(proof) + b"'\n",
        "output-to-pipe": b"\\o | touch " + bytes(proof) + b"\n",
        "include": b"\\i /etc/passwd\n",
        "gexec": b"SELECT 'CREATE TABLE public.escaped (x int)' \\gexec\n",
        "on-error-stop-off": b"\\set ON_ERROR_STOP off\n",
    }


def plant(env: Env, manifest: dict[str, object], line: bytes) -> None:
    """Put `line` into the set's SQL after its first COPY block, and make the manifest match the new bytes."""
    files = manifest["files"]
    assert isinstance(files, list)
    path = env.folder / files[0]["name"]
    text = gzip.decompress(path.read_bytes())
    at = text.index(b"\n\\.\n") + len(b"\n\\.\n")
    path.write_bytes(gzip.compress(text[:at] + line + text[at:]))
    mpath = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    data = json.loads(mpath.read_text())
    data["files"][0].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    mpath.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", list(meta_commands(Path("/x"))))
def test_a_planted_meta_command_is_refused_before_any_change(env: Env, kind: str, contents: object,
                                                             workdir: Path) -> None:
    proof = workdir / "pwned"
    line = meta_commands(proof)[kind]
    env.write_config(format="plain", compression="gzip")
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    plant(env, manifest, line)
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.after_backup (id int)")  # the data a restore would replace
        before = contents(conn)  # type: ignore[operator]

    verify = env.run("verify", "latest")
    assert verify.returncode == 3, describe(verify)
    assert "meta-command" in output(verify), describe(verify)

    name = manifest["files"][0]["name"]  # type: ignore[index]
    for args in (("restore", "postgres", name, "--force"),
                 ("restore", "postgres", name, "--target-db", "kkua_meta_copy")):
        result = env.run(*args)
        assert result.returncode == 3, describe(result)
        assert "meta-command" in output(result) and "nothing was changed" in output(result), describe(result)

    assert not proof.exists(), "a planted meta-command ran"
    with env.connect() as conn:
        assert contents(conn) == before  # type: ignore[operator]
        databases = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        tables = {row[0] for row in conn.execute("SELECT relname FROM pg_class WHERE relname = 'escaped'")}
    assert "kkua_meta_copy" not in databases and tables == set()
    assert not list(env.folder.glob("safety_backup_*")), "refused before the safety backup"


def test_psql_itself_refuses_a_meta_command_inside_the_restore_frame(env: Env, workdir: Path) -> None:
    """Defence in depth behind the pre-scan: what a restore feeds psql (`run_psql`, which every restore's SQL
    goes through) starts with `\\restrict KEY`, so psql refuses any meta-command that got past the scan. Fed
    straight through it (the scan bypassed), `\\! touch FILE` does not run and psql exits non-zero; the same
    path without a meta-command runs."""
    ctx = JobContext(config=load_config(str(env.config_path), environ={}).config, log=get_logger(job="postgres"))
    with env.connect() as conn:
        server = pg_client.server_info(conn)
    bin_dir = pg_client.find_bin_dir(ctx.config.postgres, server)
    assert pg_load.supports_restrict(pg_client.tool_version(bin_dir / "psql")), "the tested psql has \\restrict"
    proof = workdir / "pwned"
    marker = b"kkua-frame-test-marker"
    body = [b"CREATE TABLE public.frame_before (x int);\n", b"\\! touch " + bytes(proof) + b"\n",
            b"CREATE TABLE public.frame_after (x int);\n", b"SELECT '" + marker + b"';\n"]
    with pytest.raises(CommandFailed) as failed:
        pg_load.run_psql(ctx, bin_dir, env.database, body, marker=marker)
    assert failed.value.returncode not in (None, 0)
    assert "restricted" in " ".join(failed.value.stderr_tail), failed.value.stderr_tail
    assert not proof.exists(), "psql ran a meta-command inside the restore's \\restrict frame"
    with env.connect() as conn:
        made = {row[0] for row in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'frame_%'")}
    assert made == {"frame_before"}, "psql stopped at the refused meta-command (ON_ERROR_STOP)"

    # the frame itself is no obstacle to SQL
    assert pg_load.run_psql(ctx, bin_dir, env.database, [b"SELECT '" + marker + b"';\n"], marker=marker)


@pytest.mark.parametrize("signing", ["re-signed", "no signing key"])
def test_a_set_with_a_meta_command_and_a_matching_manifest_loads_in_one_pass_and_the_command_never_runs(
        env: Env, workdir: Path, signing: str) -> None:
    """A set made here whose SQL was given `\\! touch` and whose manifest was made to match (re-signed by
    someone holding the hosts' key, or with no signing key configured) passes every check before the load, so
    it loads in one pass: the scan refuses the line before psql sees it, the transaction is rolled back, the
    command never runs."""
    proof = workdir / "pwned"
    env.write_config(format="plain", compression="gzip")
    key_text = os.urandom(32).hex()
    if signing == "re-signed":
        (env.root / "signing.key").write_text(key_text + "\n")
        (env.root / "signing.key").chmod(0o600)
        subprocess.run(["age-keygen", "-o", str(env.root / "age.key")], check=True, capture_output=True)
        recipient = subprocess.run(["age-keygen", "-y", str(env.root / "age.key")], check=True,
                                   capture_output=True, text=True).stdout.strip()
        with env.config_path.open("a") as fh:
            fh.write(f'\n[encryption]\nmethod = "age"\nrecipients = ["{recipient}"]\n'
                     f'identity_file = "{env.root / "age.key"}"\n'
                     f'signing_key_file = "{env.root / "signing.key"}"\n')
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    path = env.folder / manifest["files"][0]["name"]
    stored = path.read_bytes()
    if signing == "re-signed":
        assert path.name.endswith(".sql.gz.age") and manifest["mac"]
        stored = subprocess.run(["age", "-d", "-i", str(env.root / "age.key"), str(path)], check=True,
                                capture_output=True).stdout
    text = gzip.decompress(stored)
    at = text.index(b"\n\\.\n") + len(b"\n\\.\n")
    planted = gzip.compress(text[:at] + meta_commands(proof)["shell"] + text[at:])
    if signing == "re-signed":
        planted = subprocess.run(["age", "-r", recipient], input=planted, check=True, capture_output=True).stdout
    path.write_bytes(planted)
    mpath = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    doc = Manifest.model_validate_json(mpath.read_text())
    doc.files[0] = doc.files[0].model_copy(update={"size": path.stat().st_size,
                                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    doc = doc.model_copy(update={"mac": None})
    mpath.write_text((sign(doc, bytes.fromhex(key_text)) if signing == "re-signed" else doc).model_dump_json())
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.after_backup (id int)")
    before = contents_of(env)

    # not verified first (verify would mark it failed, and a failed set gets the full check before the load)
    for args in ((), ("--target-db", "kkua_meta_copy")):
        result = env.run("restore", "postgres", "latest", "--force", *args)
        assert result.returncode == 3, describe(result)
        assert "while it loads (one pass)" in output(result) and "meta-command" in output(result), describe(result)
        assert not proof.exists(), "a planted meta-command ran"
        assert contents_of(env) == before
        assert not list(env.folder.glob("safety_backup_*"))
    with env.connect() as conn:
        assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'kkua_meta_copy'").fetchall()
