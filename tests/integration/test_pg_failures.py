"""Failure cases of `kkua-backup` against a real PostgreSQL server: bad input gets a clear error and loses nothing.

Everything is real: the CLI runs as a subprocess, servers are killed with SIGKILL, files are truncated on disk,
a tmpfs fills up, a pseudo-terminal answers the confirmation. Exit codes: 0 ok, 1 job failed, 2 bad usage or
config, 3 refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from kkua_backupd.demo.sandbox import (
    ThrowawayPostgres,
    create_sample_data,
    free_port,
    schema_dump,
    table_contents,
)
from kkua_backupd.proc.workers import descendants
from kkua_backupd.store.lock import holder_of
from tests.support.helpers import alive, cmdline, crash, describe, output, proc_stat, wait_for
from tests.support.pg_bulk import bulk_database
from tests.support.pg_data import contents_of
from tests.support.terminal import run_with_terminal

from ..conftest import Env

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")

DISTINCT_PASSWORD = "S3cr3t-xyzzy-42"
BIG_DB_MB = 150


# ----------------------------------------------------------------------------------------------
# Helpers


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in a backup folder (empty if the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file()}


def make_backup(env: Env) -> dict[str, str]:
    """A real backup of the configured database; returns the folder's state afterwards."""
    result = env.run("backup", "postgres")
    assert result.returncode == 0, describe(result)
    return folder_state(env.folder)


def change_data(env: Env) -> None:
    """Change the sample data so a restore (or its absence) is visible."""
    with env.connect() as conn:
        conn.execute("UPDATE users SET bio = 'changed after the backup' WHERE id = 1")
        conn.execute("INSERT INTO stats.daily_activity (day, games_played, words_played) VALUES ('2030-01-01', 7, 7)")
        conn.execute("DELETE FROM game_words WHERE id IN (SELECT id FROM game_words ORDER BY id LIMIT 3)")


def listed_sets(env: Env) -> list[dict[str, Any]]:
    """`list postgres --json`, asserting that every set shown is complete (status ok, files present, sizes match)."""
    result = env.run("list", "postgres", "--json")
    assert result.returncode == 0, describe(result)
    sets: list[dict[str, Any]] = json.loads(result.stdout)
    for s in sets:
        assert s["status"] == "ok", s
        for f in s["files"]:
            path = env.folder / f["name"]
            assert path.is_file(), f"listed file {path} is missing"
            assert not path.name.endswith(".partial")
            assert path.stat().st_size == f["size"], f"listed file {path} has the wrong size"
    return sets


def assert_earlier_intact(env: Env, before: dict[str, str]) -> None:
    """Every file that existed before is byte-identical, and `verify all` passes."""
    now = folder_state(env.folder)
    for name, digest in before.items():
        assert now.get(name) == digest, f"earlier backup file {name} was changed or removed"
    result = env.run("verify", "all")
    assert result.returncode == 0, describe(result)
    assert "FAIL" not in result.stdout


def assert_no_partials(folder: Path) -> None:
    leftovers = sorted(p.name for p in folder.glob("*.partial")) if folder.is_dir() else []
    assert leftovers == [], f"partial files left behind: {leftovers}"


def cli_environment(env: Env, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The same environment `Env.run` gives the CLI."""
    return env.cli_env(extra)


def wait_for_partial_and_dump(env: Env, proc: subprocess.Popen[str]) -> tuple[Path, int]:
    """Wait until the backup `proc` is writing a *.partial file and its pg_dump child runs."""
    def ready() -> tuple[Path, int] | None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the backup ended (exit {proc.returncode}) before it could be observed\n{out}\n{err}")
        partials = list(env.folder.glob("*.partial")) if env.folder.is_dir() else []
        dumps = [p for p in descendants(proc.pid) if Path(cmdline(p)[0] if cmdline(p) else "").name == "pg_dump"]
        if partials and dumps:
            return partials[0], dumps[0]
        return None

    return wait_for(ready, "the backup's partial file and pg_dump process")


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def big_db(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """A database with the sample data plus ~150 MB of bulk rows, so a dump takes a few seconds."""
    with bulk_database(pg_server, f"kkua_failbig_{os.getpid()}", BIG_DB_MB) as name:
        yield name


@pytest.fixture
def distinct_role(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """A superuser login role with a distinctive password (dropped afterwards)."""
    role = f"backup_user_{os.getpid()}"
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(DISTINCT_PASSWORD)))
    try:
        yield role
    finally:
        with pg_server.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# ----------------------------------------------------------------------------------------------
# 1-3: connection problems


def test_wrong_password_fails_clearly_and_writes_nothing(env: Env) -> None:
    before_files = make_backup(env)
    before_data = contents_of(env)
    wrong = "wrong-password-9f8e7d"
    (env.root / "pg.pass").write_text(wrong + "\n")

    result = env.run("backup", "postgres")

    assert result.returncode == 1, describe(result)
    text = output(result)
    assert "password authentication failed" in text, text
    assert "postgres.password_file" in text or "DATABASE_PASSWORD" in text, text
    assert wrong not in text, "the wrong password was echoed"
    assert folder_state(env.folder) == before_files, "a failed backup wrote into the backup folder"
    assert contents_of(env) == before_data
    (env.root / "pg.pass").write_text(env.server.password + "\n")
    assert_earlier_intact(env, before_files)
    assert len(listed_sets(env)) == 1


def test_server_not_listening_fails_with_host_and_port(env: Env) -> None:
    before_files = make_backup(env)
    port = free_port()
    env.write_config(port=port, connect_timeout=5)

    result = env.run("backup", "postgres")

    assert result.returncode == 1, describe(result)
    text = output(result)
    assert "cannot reach" in text, text
    assert f"127.0.0.1:{port}" in text, text
    assert "Traceback" not in text
    assert folder_state(env.folder) == before_files
    assert_no_partials(env.folder)
    env.write_config()
    assert_earlier_intact(env, before_files)


def test_server_killed_fails_with_host_and_port_then_recovers(env: Env) -> None:
    before_files = make_backup(env)
    with ThrowawayPostgres() as other:
        other.create_database("victim")
        with other.connect("victim") as conn:
            create_sample_data(conn)
            conn.execute("SET synchronous_commit = on")
            conn.execute("CHECKPOINT")
            before_data = table_contents(conn)
        pass_file = env.root / "other.pass"
        pass_file.write_text(other.password + "\n")
        pass_file.chmod(0o600)
        env.write_config(port=other.port, database="victim", password_file=str(pass_file), connect_timeout=5)
        try:
            other.kill9()
            assert not other.is_running()

            result = env.run("backup", "postgres")

            assert result.returncode == 1, describe(result)
            text = output(result)
            assert "cannot reach" in text, text
            assert f"127.0.0.1:{other.port}" in text, text
            assert folder_state(env.folder) == before_files
            assert_no_partials(env.folder)
        finally:
            other.restart()
        with other.connect("victim") as conn:
            assert table_contents(conn) == before_data
        # Once the server is back, the same config works again.
        result = env.run("backup", "postgres")
        assert result.returncode == 0, describe(result)
    env.write_config()
    assert_earlier_intact(env, before_files)
    assert len(listed_sets(env)) == 2


def test_missing_database_is_named(env: Env) -> None:
    before_files = make_backup(env)
    env.write_config(database="nope")

    result = env.run("backup", "postgres")

    assert result.returncode == 1, describe(result)
    assert "database 'nope' does not exist" in output(result), describe(result)
    assert folder_state(env.folder) == before_files
    env.write_config()
    assert_earlier_intact(env, before_files)


# ----------------------------------------------------------------------------------------------
# 4: invalid configuration


def test_invalid_config_lists_every_problem_at_once(env: Env) -> None:
    secret_in_file = "plaintext-in-config-77"
    env.write_config(colour=1, port="x", password=secret_in_file)

    result = env.run("backup", "postgres")

    assert result.returncode == 2, describe(result)
    text = output(result)
    assert str(env.config_path) in text, text
    for key in ("postgres.colour", "postgres.port", "postgres.password"):
        assert key in text, f"{key} not reported:\n{text}"
    assert "passwords do not belong in the config file" in text, text
    assert secret_in_file not in text, "the password from the config file was echoed"
    assert not env.backup_dir.exists(), "an invalid config still created the backup folder"

    # The same problems in --json mode: one document listing them all.
    result = env.run("config", "check", "--json")
    assert result.returncode == 2, describe(result)
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 2
    joined = "\n".join(doc["problems"])
    for key in ("postgres.colour", "postgres.port", "postgres.password"):
        assert key in joined, joined


def test_password_key_alone_is_refused(env: Env) -> None:
    env.write_config(password=env.server.password)
    result = env.run("backup", "postgres")
    assert result.returncode == 2, describe(result)
    assert "postgres.password" in output(result)
    assert env.server.password not in output(result)
    assert not env.backup_dir.exists()


def test_toml_syntax_error_names_the_file(env: Env) -> None:
    env.config_path.write_text(f'backup_dir = "{env.backup_dir}"\n[postgres\nport = 5432\n')
    result = env.run("backup", "postgres")
    assert result.returncode == 2, describe(result)
    text = output(result)
    assert str(env.config_path) in text, text
    assert "not valid TOML" in text, text
    assert "line 2" in text, text
    assert "Traceback" not in text
    assert not env.backup_dir.exists()


def test_bad_environment_override_names_variable_and_key(env: Env) -> None:
    result = env.run("backup", "postgres", env={"DATABASE_PORT": "abc"})
    assert result.returncode == 2, describe(result)
    text = output(result)
    assert "postgres.port" in text and "DATABASE_PORT" in text and "'abc'" in text, text
    assert str(env.config_path) in text, text
    assert not env.backup_dir.exists()

    # A file problem and an environment problem together: both listed in the same run.
    env.write_config(colour=1)
    result = env.run("backup", "postgres", env={"DATABASE_PORT": "abc", "FORCE_RESTORE": "maybe"})
    assert result.returncode == 2, describe(result)
    text = output(result)
    for needle in ("postgres.colour", "DATABASE_PORT", "restore.force", "FORCE_RESTORE"):
        assert needle in text, f"{needle} not reported:\n{text}"
    assert not env.backup_dir.exists()


# ----------------------------------------------------------------------------------------------
# 5: paths outside the backup folder


@pytest.mark.parametrize("spec", ["../../etc/passwd", "/etc/passwd"])
def test_restore_refuses_paths_outside_backup_folder(env: Env, spec: str) -> None:
    before_files = make_backup(env)
    change_data(env)
    before_data = contents_of(env)
    before_schema = schema_dump(env.server, env.database)
    passwd = sha256_of(Path("/etc/passwd"))

    result = env.run("restore", "postgres", spec, "--force")

    assert result.returncode == 2, describe(result)
    text = output(result)
    assert f"refusing {spec}" in text, text
    assert "'..'" in text or "not a file in the backup folder" in text, text
    assert contents_of(env) == before_data
    assert schema_dump(env.server, env.database) == before_schema
    assert folder_state(env.folder) == before_files, "a refused restore still wrote a safety backup"
    assert sha256_of(Path("/etc/passwd")) == passwd
    assert_earlier_intact(env, before_files)


# ----------------------------------------------------------------------------------------------
# 6: damaged backup files


def test_truncated_and_corrupt_backup_is_refused(env: Env) -> None:
    before_files = make_backup(env)
    (backup_set,) = listed_sets(env)
    data_file = env.folder / backup_set["files"][0]["name"]
    original = data_file.read_bytes()
    change_data(env)
    before_data = contents_of(env)

    damaged = {"truncated": original[: len(original) // 2]}
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    damaged["flipped byte"] = bytes(flipped)
    words = {"truncated": ("truncated",), "flipped byte": ("corrupt", "checksum")}

    for how, content in damaged.items():
        data_file.write_bytes(content)

        result = env.run("restore", "postgres", "latest", "--force")

        assert result.returncode == 3, f"{how}: {describe(result)}"
        text = output(result)
        assert data_file.name in text, f"{how}: {text}"
        assert any(w in text for w in words[how]), f"{how}: {text}"
        assert contents_of(env) == before_data, f"{how}: the database changed"
        expected_files = dict(before_files, **{data_file.name: hashlib.sha256(content).hexdigest()})
        assert folder_state(env.folder) == expected_files, f"{how}: files were added or removed"

        for which in ("latest", "all"):
            result = env.run("verify", which)
            assert result.returncode == 3, f"{how}, verify {which}: {describe(result)}"
            assert "FAIL" in result.stdout and any(w in output(result) for w in words[how]), output(result)

    data_file.write_bytes(original)
    assert_earlier_intact(env, before_files)


# ----------------------------------------------------------------------------------------------
# 7-8: a crash and a second run during a backup


def test_kill9_during_backup_leaves_no_set_and_next_backup_cleans_up(env: Env, big_db: str) -> None:
    """An earlier backup (of the small database) is there before the crash and is proven unharmed after it:
    its files byte for byte, `list` shows it alone, `verify` passes and `restore latest` brings it back."""
    earlier_files = make_backup(env)
    (earlier,) = listed_sets(env)
    earlier_data = contents_of(env)
    env.write_config(database=big_db)
    proc = env.popen("backup", "postgres")
    try:
        partial, dump_pid = wait_for_partial_and_dump(env, proc)
        victims = [dump_pid, *descendants(proc.pid)]
        crash(proc, victims)  # the CLI and pg_dump, as a machine crash would
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: not any(alive(p) for p in victims) or None, "pg_dump to die", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert partial.exists(), "expected the crash to leave its partial file behind"
    assert holder_of(env.backup_dir, "postgres") is None, "the lock outlived the killed run"
    assert [s["id"] for s in listed_sets(env)] == [earlier["id"]], "a killed backup shows up as a set"
    assert_earlier_intact(env, earlier_files)

    result = env.run("restore", "postgres", partial.name, "--force")
    assert result.returncode == 2, describe(result)
    assert "not a backup" in output(result), describe(result)
    # Every command starts by removing its kind's partial files left by a run that died (issue 11).
    assert not partial.exists()
    logged = "".join(p.read_text() for p in env.log_dir.glob("*.log"))
    assert "removed a partial file" in logged and partial.name in logged, logged[-2000:]
    # `restore latest` is the earlier set, and it restores (into the small database it came from).
    env.write_config()
    change_data(env)
    result = env.run("--json", "restore", "postgres", "latest", "--force", "--no-safety-backup")
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout)["file"] == earlier["files"][0]["name"]
    assert contents_of(env) == earlier_data
    env.write_config(database=big_db)

    result = env.run("backup", "postgres")
    assert result.returncode == 0, describe(result)
    assert_no_partials(env.folder)
    assert not partial.exists()
    backup_set, still = listed_sets(env)
    assert still["id"] == earlier["id"]
    assert backup_set["files"][0]["name"] + ".partial" != partial.name
    assert holder_of(env.backup_dir, "postgres") is None
    result = env.run("verify", "latest")
    assert result.returncode == 0, describe(result)


def test_second_backup_while_one_runs_is_refused_naming_the_holder(env: Env, big_db: str) -> None:
    env.write_config(database=big_db)
    # A session holding a table lock keeps the first pg_dump waiting, so it is surely still running when the
    # second backup is tried, however slow the machine is.
    blocker = env.connect(big_db)
    blocker.execute("BEGIN")
    table = blocker.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' LIMIT 1").fetchone()
    assert table is not None
    blocker.execute(f'LOCK TABLE public."{table[0]}" IN ACCESS EXCLUSIVE MODE')
    first = env.popen("backup", "postgres")
    try:
        partial, _ = wait_for_partial_and_dump(env, first)

        second = env.run("backup", "postgres", timeout=120)

        assert first.poll() is None, "the first backup finished before the second was tried; the test proves nothing"
        blocker.rollback()
        assert second.returncode == 3, describe(second)
        text = output(second)
        assert "another run holds the postgres lock" in text, text
        assert f"pid {first.pid}" in text, text
        assert partial.exists(), "the refused run removed the running backup's partial file"

        out, err = first.communicate(timeout=150)
    finally:
        blocker.close()
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, f"{out}\n{err}"
    assert_no_partials(env.folder)
    assert len(listed_sets(env)) == 1
    result = env.run("verify", "all")
    assert result.returncode == 0, describe(result)


# ----------------------------------------------------------------------------------------------
# 9: restores whose SQL fails halfway


def test_restore_of_sql_failing_halfway_rolls_back(env: Env) -> None:
    before_files = make_backup(env)
    (backup_set,) = listed_sets(env)
    real_sql = gzip.decompress((env.folder / backup_set["files"][0]["name"]).read_bytes())
    # Keep the real dump up to the end of its second COPY block (its DROPs, the schema and the first tables'
    # data), then a statement that fails.
    copy_ends = [m.end() for m in re.finditer(rb"\n\\\.\n", real_sql)]
    assert len(copy_ends) >= 3, "the sample dump should contain several COPY blocks"
    prefix = real_sql[: copy_ends[1]]
    assert b"DROP TABLE IF EXISTS public.users" in prefix and b"CREATE TABLE public.users" in prefix
    bad_sql = prefix + b"\nTHIS IS NOT SQL AT ALL;\n" + real_sql[copy_ends[1]:]
    bad_name = "kkua_backup_20200101_000000.sql.gz"
    (env.folder / bad_name).write_bytes(gzip.compress(bad_sql))
    before_files[bad_name] = sha256_of(env.folder / bad_name)

    change_data(env)
    with env.connect() as conn:  # something the backup never had: must survive the failed restore too
        conn.execute("CREATE TABLE public.added_after_backup (x int)")
        conn.execute("INSERT INTO public.added_after_backup VALUES (1), (2)")
    before_data = contents_of(env)
    before_schema = schema_dump(env.server, env.database)

    result = env.run("restore", "postgres", bad_name, "--force")

    assert result.returncode == 1, describe(result)
    text = output(result)
    assert "rolled back" in text, text
    assert "still holds its previous data" in text, text
    assert "THIS IS NOT SQL" in text or "syntax error" in text, text
    assert contents_of(env) == before_data
    assert schema_dump(env.server, env.database) == before_schema
    assert_earlier_intact(env, before_files)
    assert [s["type"] for s in listed_sets(env)].count("backup") == 1


@pytest.mark.parametrize("with_manifest", [True, False], ids=["refused-before-any-change", "legacy-rolled-back"])
def test_restore_needing_a_missing_role(env: Env, with_manifest: bool) -> None:
    """A backup whose objects belong to a role the server no longer has. With a manifest the restore
    knows the roles and refuses before the safety backup or any change; a file without one fails in its
    SQL and is rolled back. Either way the message says which role to create."""
    role = f"tmp_owner_{os.getpid()}"
    ident = sql.Identifier(role)
    try:
        with env.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
            conn.execute(sql.SQL("CREATE ROLE {}").format(ident))
            conn.execute("CREATE TABLE public.owned_by_tmp (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO public.owned_by_tmp VALUES (1, 'one'), (2, 'two')")
            conn.execute(sql.SQL("ALTER TABLE public.owned_by_tmp OWNER TO {}").format(ident))
        make_backup(env)
        (backup_set,) = listed_sets(env)
        assert role in backup_set["details"]["roles"]
        name = backup_set["files"][0]["name"]
        if not with_manifest:  # as if the old scripts had made it
            (env.folder / f"kkua_backup_{backup_set['id']}.manifest.json").unlink()
        before_files = folder_state(env.folder)
        with env.connect() as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO postgres").format(ident))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))
        change_data(env)
        before_data = contents_of(env)
        before_schema = schema_dump(env.server, env.database)

        result = env.run("restore", "postgres", name, "--force")

        text = output(result)
        if with_manifest:
            assert result.returncode == 3, describe(result)
            assert f"role(s) {role}" in text and "nothing was changed" in text, text
            assert f"create them first (e.g. CREATE ROLE {role} LOGIN" in text, text
            assert folder_state(env.folder) == before_files  # not even a safety backup
        else:
            assert result.returncode == 1, describe(result)
            assert "rolled back" in text and "still holds its previous data" in text, text
            assert f'role "{role}" does not exist' in text, text
            assert f"create them (CREATE ROLE {role} LOGIN ...), then restore again" in text, text
        assert contents_of(env) == before_data
        assert schema_dump(env.server, env.database) == before_schema
        assert_earlier_intact(env, before_files)
    finally:
        with env.connect("postgres") as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists:
            with env.connect() as conn:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_restore_of_legacy_sql_that_commits_halfway_keeps_previous_data(env: Env) -> None:
    """A hand-written legacy script with its own COMMIT, then a failing statement: the promise is the same."""
    before_files = make_backup(env)
    bad_name = "kkua_backup_20200102_000000.sql.gz"
    script = (b"CREATE TABLE public.users (id int PRIMARY KEY, nickname text);\n"
              b"INSERT INTO public.users VALUES (1, 'only one left');\n"
              b"COMMIT;\n"
              b"THIS IS NOT SQL AT ALL;\n")
    (env.folder / bad_name).write_bytes(gzip.compress(script))
    before_files[bad_name] = sha256_of(env.folder / bad_name)
    change_data(env)
    before_data = contents_of(env)
    before_schema = schema_dump(env.server, env.database)

    result = env.run("restore", "postgres", bad_name, "--force")

    text = output(result)
    assert result.returncode in (1, 3), describe(result)
    assert contents_of(env) == before_data, (
        "the failed restore lost the database's data although it reported:\n" + text)
    assert schema_dump(env.server, env.database) == before_schema
    assert_earlier_intact(env, before_files)


def test_restore_of_truncated_legacy_sql_is_not_reported_as_success(env: Env) -> None:
    """An uncompressed legacy .sql cut short inside a COPY block (an interrupted copy): not a success."""
    with env.connect() as conn:  # a one-column word list, as a 끝말잇기 game keeps
        conn.execute("CREATE TABLE public.dictionary (word text)")
        conn.execute("INSERT INTO public.dictionary SELECT '낱말' || i FROM generate_series(1, 500) i")
    before_files = make_backup(env)
    (backup_set,) = listed_sets(env)
    real_sql = gzip.decompress((env.folder / backup_set["files"][0]["name"]).read_bytes())
    start = real_sql.index(b"COPY public.dictionary (word) FROM stdin;\n")
    lines_after = real_sql[start:].split(b"\n")
    cut = start + len(b"\n".join(lines_after[:200])) + 1  # header + 199 rows, at a line boundary
    legacy_name = "kkua_backup_20200103_000000.sql"
    (env.folder / legacy_name).write_bytes(real_sql[:cut])
    before_files[legacy_name] = sha256_of(env.folder / legacy_name)
    change_data(env)
    before_data = contents_of(env)

    result = env.run("restore", "postgres", legacy_name, "--force")

    text = output(result)
    assert contents_of(env) == before_data
    assert result.returncode in (1, 3), (
        "a truncated file was reported as restored although nothing was restored:\n" + describe(result))
    assert any(w in text for w in ("rolled back", "truncated", "incomplete")), text
    assert_earlier_intact(env, before_files)


# ----------------------------------------------------------------------------------------------
# 10: disk full


def test_disk_full_during_backup(env: Env) -> None:
    env.backup_dir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(env.backup_dir)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        tiny = f"{env.database}_tiny"
        env.server.create_database(tiny)
        with env.connect(tiny) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, word text)")
            conn.execute("INSERT INTO t SELECT i, '끝말잇기 ' || i FROM generate_series(1, 100) i")
        env.write_config(database=tiny)
        before_files = make_backup(env)
        assert len(before_files) == 2

        env.write_config()
        before_data = contents_of(env)
        result = env.run("backup", "postgres")

        assert result.returncode == 1, describe(result)
        text = output(result)
        assert "disk full" in text, text
        assert "Traceback" not in text
        assert_no_partials(env.folder)
        assert folder_state(env.folder) == before_files
        assert contents_of(env) == before_data
        assert len(listed_sets(env)) == 1
        assert holder_of(env.backup_dir, "postgres") is None
        assert_earlier_intact(env, before_files)
    finally:
        unmounted = subprocess.run(["umount", str(env.backup_dir)], capture_output=True, text=True, check=False)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(env.backup_dir)], check=False)


# ----------------------------------------------------------------------------------------------
# 11: confirmation


def test_restore_without_terminal_or_force_is_refused(env: Env) -> None:
    before_files = make_backup(env)
    change_data(env)
    before_data = contents_of(env)

    result = env.run("restore", "postgres", "latest")

    assert result.returncode == 3, describe(result)
    text = output(result)
    assert "no terminal" in text and "--force" in text, text
    assert contents_of(env) == before_data
    assert folder_state(env.folder) == before_files, "a refused restore wrote a safety backup"


def test_restore_confirmation_on_a_real_terminal(env: Env) -> None:
    make_backup(env)
    backup_data = contents_of(env)
    change_data(env)
    changed_data = contents_of(env)
    assert changed_data != backup_data
    before_files = folder_state(env.folder)

    rc, text = run_with_terminal(env, "restore", "postgres", "latest", answer="no")

    assert rc == 3, text
    assert "restore cancelled" in text and "nothing was changed" in text, text
    assert contents_of(env) == changed_data
    assert folder_state(env.folder) == before_files

    rc, text = run_with_terminal(env, "restore", "postgres", "latest", answer="yes")

    assert rc == 0, text
    assert "Restored" in text, text
    assert contents_of(env) == backup_data
    sets = listed_sets(env)
    safety = [s for s in sets if s["type"] == "safety"]
    assert len(safety) == 1, sets
    assert_earlier_intact(env, before_files)


# ----------------------------------------------------------------------------------------------
# 12: the password never leaks


def _watch_backup_argv(env: Env, extra_env: dict[str, str] | None) -> tuple[subprocess.Popen[str], str, str,
                                                                             dict[int, list[str]]]:
    """Run a backup, recording the argv of every descendant of the CLI while it runs."""
    seen: dict[int, list[str]] = {}
    proc = env.popen("backup", "postgres", env=extra_env)
    deadline = time.monotonic() + 150
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in descendants(proc.pid):
            argv = cmdline(pid)
            if argv:
                seen.setdefault(pid, argv)
        seen.setdefault(proc.pid, cmdline(proc.pid))
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=30)
    return proc, out, err, seen


@pytest.mark.parametrize("source", ["password_file", "DATABASE_PASSWORD"])
def test_password_never_in_argv_logs_or_manifest(env: Env, big_db: str, distinct_role: str, source: str) -> None:
    if source == "password_file":
        pass_file = env.root / "backup_user.pass"
        pass_file.write_text(DISTINCT_PASSWORD + "\n")
        pass_file.chmod(0o600)
        env.write_config(database=big_db, user=distinct_role, password_file=str(pass_file))
        extra_env = None
    else:
        env.write_config(database=big_db, user=distinct_role, password_file=None)
        assert "password_file" not in env.config_path.read_text()
        extra_env = {"DATABASE_PASSWORD": DISTINCT_PASSWORD}

    proc, out, err, seen = _watch_backup_argv(env, extra_env)

    assert proc.returncode == 0, f"{out}\n{err}"
    dumps = [argv for argv in seen.values() if argv and Path(argv[0]).name == "pg_dump" and "--snapshot" in
             " ".join(argv)]
    assert dumps, f"pg_dump was never seen running; saw {list(seen.values())}"
    assert distinct_role in dumps[0], dumps[0]
    for pid, argv in seen.items():
        assert DISTINCT_PASSWORD not in "\0".join(argv), f"password in argv of pid {pid}: {argv}"
    assert DISTINCT_PASSWORD not in out and DISTINCT_PASSWORD not in err
    log_files = [p for p in env.log_dir.rglob("*") if p.is_file()]
    assert log_files, "no log file was written"
    for path in log_files:
        assert DISTINCT_PASSWORD.encode() not in path.read_bytes(), f"password in {path}"
    manifests = list(env.folder.glob("*.manifest.json"))
    assert len(manifests) == 1
    assert DISTINCT_PASSWORD not in manifests[0].read_text()
    (backup_set,) = listed_sets(env)
    assert DISTINCT_PASSWORD not in json.dumps(backup_set)
    result = env.run("config", "check", "--json", env=extra_env)
    assert result.returncode == 0, describe(result)
    assert DISTINCT_PASSWORD not in output(result)


# ----------------------------------------------------------------------------------------------
# 13: FORCE_RESTORE and nothing to restore


def test_force_restore_variable_works_like_force(env: Env) -> None:
    make_backup(env)
    backup_data = contents_of(env)
    change_data(env)
    assert contents_of(env) != backup_data

    result = env.run("restore", "postgres", "latest", env={"FORCE_RESTORE": "true"})

    assert result.returncode == 0, describe(result)
    assert "FORCE_RESTORE" in output(result) or "Restored" in output(result), describe(result)
    assert contents_of(env) == backup_data
    assert [s["type"] for s in listed_sets(env)].count("safety") == 1


def test_restore_latest_without_any_backup(env: Env) -> None:
    before_data = contents_of(env)
    for extra in ([], ["--force"]):
        result = env.run("restore", "postgres", "latest", *extra)
        assert result.returncode == 2, describe(result)
        text = output(result)
        assert "no complete postgres backup" in text, text
        assert "kkua-backup backup postgres" in text, text
    result = env.run("restore", "postgres", "latest", env={"FORCE_RESTORE": "true"})
    assert result.returncode == 2, describe(result)
    assert contents_of(env) == before_data
    assert folder_state(env.folder) == {}


# ----------------------------------------------------------------------------------------------
# Stopping a run, and what a person at a terminal sees


def test_sigterm_during_backup_stops_cleanly(env: Env, big_db: str) -> None:
    """systemctl stop / SIGTERM mid-dump: children stopped, no partial file, lock free, clear message."""
    env.write_config(database=big_db)
    proc = env.popen("backup", "postgres")
    _partial, dump_pid = wait_for_partial_and_dump(env, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "stopped by signal SIGTERM" in out + err
    wait_for(lambda: not Path(f"/proc/{dump_pid}").exists() or proc_stat(dump_pid) is None
             or proc_stat(dump_pid)[0] in ("Z", "X"), "pg_dump to exit")  # type: ignore[index]
    assert list(env.folder.glob("*.partial")) == []
    assert listed_sets(env) == []
    again = env.run("backup", "postgres")
    assert again.returncode == 0, describe(again)


def test_progress_is_shown_on_a_terminal_only(env: Env, big_db: str) -> None:
    env.write_config(database=big_db)
    rc, text = run_with_terminal(env, "backup", "postgres", answer=None)
    assert rc == 0, text
    assert re.search(r"pg_dump \S+: [\d.]+ (KiB|MiB|GiB), [\d.]+ (KiB|MiB|GiB)/s, \d+ s", text), text
    piped = env.run("backup", "postgres")
    assert piped.returncode == 0
    assert "/s, " not in piped.stdout + piped.stderr
    assert "\r" not in piped.stdout + piped.stderr


def table_counts(env: Env, dbname: str) -> dict[str, int]:
    """Row count of every user table (cheap enough for the big database)."""
    with env.server.connect(dbname) as conn:
        tables = conn.execute("SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
                              "('pg_catalog', 'information_schema') ORDER BY 1, 2").fetchall()
        return {f"{s}.{t}": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(s, t))).fetchone()[0] for s, t in tables}  # type: ignore[index]


def test_kill9_during_in_place_restore_keeps_the_old_data(env: Env, big_db: str) -> None:
    """The restoring process dies mid-load: psql sees the end of its input without a COMMIT, the server
    rolls everything back, the database is exactly as before and the lock is free."""
    env.write_config(database=big_db)
    before_files = make_backup(env)
    with env.server.connect(big_db) as conn:
        conn.execute("UPDATE users SET bio = 'after the backup' WHERE id = 1")
    counts = table_counts(env, big_db)
    schema = schema_dump(env.server, big_db)

    proc = env.popen("restore", "postgres", "latest", "--force", "--no-safety-backup")

    def loading() -> int | None:
        if proc.poll() is not None:
            pytest.fail(f"the restore ended (exit {proc.returncode}) before it could be killed")
        psqls = [p for p in descendants(proc.pid) if Path((cmdline(p) or [""])[0]).name == "psql"]
        if not psqls:
            return None
        with env.server.connect("postgres") as conn:
            copying = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                   "application_name = 'kkua-backup' AND query LIKE 'COPY %%'",
                                   (big_db,)).fetchone()[0]  # type: ignore[index]
        return psqls[0] if copying else None

    psql_pid = wait_for(loading, "psql to be loading rows")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    def settled() -> bool:
        with env.server.connect("postgres") as conn:
            busy = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                "application_name = 'kkua-backup'", (big_db,)).fetchone()[0]  # type: ignore[index]
        state = proc_stat(psql_pid)
        return busy == 0 and (state is None or state[0] in ("Z", "X"))

    wait_for(settled, "psql and its session to end")
    assert table_counts(env, big_db) == counts
    assert schema_dump(env.server, big_db) == schema
    with env.server.connect(big_db) as conn:
        bio = conn.execute("SELECT bio FROM users WHERE id = 1").fetchone()[0]  # type: ignore[index]
    assert bio == "after the backup"
    assert holder_of(env.backup_dir, "postgres") is None
    assert_earlier_intact(env, before_files)


def test_restore_ends_other_sessions(env: Env) -> None:
    make_backup(env)
    with env.connect() as idle:
        idle.execute("SELECT 1")
        result = env.run("restore", "postgres", "latest", "--force", "--no-safety-backup")
        assert result.returncode == 0, describe(result)
        assert "ended other sessions on the database" in output(result)
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")


def test_client_older_than_the_server_is_refused_with_what_to_install(env: Env, tmp_path: Path) -> None:
    """Only a pg_dump 14 is available for a PostgreSQL 15 server: refuse, and say which client to install."""
    old = tmp_path / "pg14" / "bin"
    old.mkdir(parents=True)
    for tool in ("pg_dump", "pg_restore", "psql"):
        (old / tool).write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) 14.11'\n")
        (old / tool).chmod(0o755)
    env.write_config(bin_dir=str(old))
    result = env.run("backup", "postgres")
    assert result.returncode == 3, describe(result)
    text = output(result)
    assert "server is version 15" in text and "found: 14" in text, text
    assert "install postgresql-client-15" in text, text
    assert listed_sets(env) == []


def test_hung_dump_hits_its_timeout(env: Env) -> None:
    """pg_dump waits forever on a table another session holds exclusively: the step's timeout stops it
    (SIGTERM, then SIGKILL after the grace period), nothing partial stays, the lock is free."""
    env.write_config(dump_timeout=2)
    with env.connect() as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = env.run("backup", "postgres", timeout=120)
        elapsed = time.monotonic() - started
        blocker.rollback()
    assert result.returncode == 1, describe(result)
    assert "pg_dump timed out after 2 s and was stopped" in output(result), describe(result)
    assert elapsed < 30
    assert list(env.folder.glob("*.partial")) == []
    assert listed_sets(env) == []
    assert holder_of(env.backup_dir, "postgres") is None
    assert env.run("backup", "postgres").returncode == 0


# ----------------------------------------------------------------------------------------------
# Issue 11: an unreadable schema or table is reported as what it is, not as a snapshot problem

LIMITED_PASSWORD = "limited-Pass-7"


@pytest.fixture
def limited_role(env: Env) -> Iterator[str]:
    """A login role that can connect to the test database and read `public`, but has no USAGE on the sample
    data's `stats` schema (and so cannot read stats.daily_activity)."""
    role = f"kkua_limited_{os.getpid()}"
    with env.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                        sql.Literal(LIMITED_PASSWORD)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(env.database),
                                                                          sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA stats FROM PUBLIC"))
    pass_file = env.root / "limited.pass"
    pass_file.write_text(LIMITED_PASSWORD + "\n")
    pass_file.chmod(0o600)
    env.write_config(user=role, password_file=str(pass_file))
    try:
        yield role
    finally:
        with env.server.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        with env.connect() as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with env.server.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("unreadable", ["schema", "table"])
def test_unreadable_schema_is_named_with_the_grant_that_fixes_it(env: Env, limited_role: str,
                                                                 unreadable: str) -> None:
    """The backup role lacks USAGE on a schema (or SELECT on one table): the one error line names the object
    and the GRANT, and says nothing of snapshots; no set is written."""
    if unreadable == "table":
        with env.connect() as conn:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA stats TO {}").format(sql.Identifier(limited_role)))
    result = env.run("backup", "postgres")
    text = output(result)
    assert result.returncode == 1, describe(result)
    assert "snapshot" not in text.lower(), describe(result)
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, describe(result)
    line = errors[0]
    if unreadable == "schema":
        assert "may not read schema stats" in line and "permission denied for schema stats" in line, line
        assert f"GRANT USAGE ON SCHEMA stats TO {limited_role}" in line, line
        assert f"GRANT SELECT ON ALL TABLES IN SCHEMA stats TO {limited_role}" in line, line
    else:
        assert "may not read table stats.daily_activity" in line, line
        assert f"GRANT SELECT ON stats.daily_activity TO {limited_role}" in line, line
    assert "postgres.user" in line, line
    assert not list(env.folder.glob("*.manifest.json")), "no set for a failed backup"
    assert_no_partials(env.folder)


# ----------------------------------------------------------------------------------------------
# Issue 11: a --target-db restore killed midway leaves a half-made database; the next command drops it


def kill_target_db_restore_midway(env: Env, target: str) -> None:
    """Start `restore postgres latest --target-db TARGET` and kill -9 it while psql loads rows into TARGET;
    returns once its psql and session are gone (the half-made database stays)."""
    proc = env.popen("restore", "postgres", "latest", "--target-db", target)

    def loading() -> int | None:
        if proc.poll() is not None:
            pytest.fail(f"the restore ended (exit {proc.returncode}) before it could be killed: "
                        f"{proc.communicate()}")
        psqls = [p for p in descendants(proc.pid) if Path((cmdline(p) or [""])[0]).name == "psql"]
        if not psqls:
            return None
        with env.server.connect("postgres") as conn:
            copying = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                   "application_name = 'kkua-backup' AND query LIKE 'COPY %%'",
                                   (target,)).fetchone()[0]  # type: ignore[index]
        return psqls[0] if copying else None

    psql_pid = wait_for(loading, "psql to be loading rows into the new database")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    def settled() -> bool:
        with env.server.connect("postgres") as conn:
            busy = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                (target,)).fetchone()[0]  # type: ignore[index]
        state = proc_stat(psql_pid)
        return busy == 0 and (state is None or state[0] in ("Z", "X"))

    wait_for(settled, "psql and its session to end")


def database_names(env: Env) -> set[str]:
    with env.server.connect("postgres") as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def notes(env: Env) -> list[Path]:
    return sorted((env.backup_dir / ".state").glob("postgres-new-database-*.json"))


def test_kill9_during_target_db_restore_the_next_command_drops_the_half_made_database(env: Env,
                                                                                      big_db: str) -> None:
    """A `--target-db` restore killed midway leaves a half-made database; the next `list` drops it with one
    log line (and forgets its note). A database of that name that is not the one the killed restore made
    (the operator dropped it and made their own) is never dropped."""
    env.write_config(database=big_db)
    make_backup(env)
    target = f"{env.database}_half"  # the env fixture drops what is left

    kill_target_db_restore_midway(env, target)
    assert target in database_names(env), "the kill left the half-made database (what this test is about)"
    assert len(notes(env)) == 1
    listed = env.run("list", "postgres")
    assert listed.returncode == 0, describe(listed)
    dropped = [line for line in output(listed).splitlines() if "dropped database" in line]
    assert len(dropped) == 1 and target in dropped[0] and "killed" in dropped[0], describe(listed)
    assert target not in database_names(env)
    assert notes(env) == []
    assert not any(name.startswith("kkua_new_") for name in database_names(env))

    # again, but the operator replaces the half-made database by one of their own with the same name
    kill_target_db_restore_midway(env, target)
    with env.server.connect("postgres") as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    with env.server.connect(target) as conn:
        conn.execute("CREATE TABLE mine (id int)")
    result = env.run("backup", "postgres")
    assert result.returncode == 0, describe(result)
    assert "dropped database" not in output(result), describe(result)
    assert "left alone" in output(result), describe(result)
    assert target in database_names(env)
    with env.server.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM mine").fetchone() == (0,)
    assert notes(env) == []

    # a restore that finishes leaves no note and no mark
    finished = f"{env.database}_done"
    result = env.run("restore", "postgres", "latest", "--target-db", finished)
    assert result.returncode == 0, describe(result)
    assert notes(env) == []
    with env.server.connect("postgres") as conn:
        comment = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                               (finished,)).fetchone()
    assert comment == (None,)
