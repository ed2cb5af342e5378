"""The directory format (issue 14): pg_dump -Fd -j N into a set of one file per pg_dump file, each through the
byte chain, restored with pg_restore -j into a new database or in one transaction in place; damaged and
missing files caught before any change; a killed backup's scratch folder removed by the next run. Real
servers, the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kkua_backupd.demo.sandbox import ThrowawayPostgres, schema_dump, table_contents
from kkua_backupd.proc.workers import descendants
from kkua_backupd.sources.postgres.load import post_data_entries
from kkua_backupd.store.lock import holder_of
from tests.support.helpers import alive, cmdline, crash, describe, output, wait_for
from tests.support.pg_bulk import bulk_database

from ..conftest import Env
from .test_encrypted_backups import encryption, stored_bytes
from .test_pg_roundtrip import damage
from .test_pg_shapes import contents, fresh_database

KNOWN_ROW = b"kkua@example.com"  # a row of the sample data


def backup(env: Env, *args: str) -> dict[str, object]:
    result = env.run("--json", "backup", "postgres", *args, check=True)
    manifest: dict[str, object] = json.loads(result.stdout)
    return manifest


def file_names(manifest: dict[str, object]) -> list[str]:
    return [f["name"] for f in manifest["files"]]  # type: ignore[attr-defined]


def scratch_folders(env: Env) -> list[Path]:
    return sorted(env.folder.glob("kkua_scratch_*"))


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_directory_round_trip_in_place_and_into_a_new_database(env: Env, compression: str) -> None:
    env.write_config(format="directory", compression=compression, dump_jobs=2, restore_jobs=2)
    with env.connect() as conn:
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)

    manifest = backup(env)
    names = file_names(manifest)
    ext = {"gzip": ".gz", "zstd": ".zst"}[compression]
    stem = f"kkua_backup_{manifest['id']}.pgdir."
    assert names[0] == f"{stem}toc.dat{ext}"
    assert len(names) > 6  # toc.dat and one data file per table at least
    assert all(n.startswith(stem) and n.endswith(".dat" + ext) for n in names)
    assert [f["role"] for f in manifest["files"]][:2] == ["dump", "dump-part"]  # type: ignore[attr-defined]
    assert manifest["details"]["format"] == "directory"  # type: ignore[index]
    for name in names:
        assert oct((env.folder / name).stat().st_mode & 0o777) == oct(0o640)
    assert scratch_folders(env) == []
    assert not list(env.folder.glob("*.partial"))

    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert [(s["id"], s["status"], len(s["files"])) for s in listing] == [(manifest["id"], "ok", len(names))]
    plain_list = env.run("list", "postgres", check=True).stdout
    assert plain_list.count(names[0]) == 1 and names[1] not in plain_list

    (verified,) = json.loads(env.run("--json", "verify", "latest", "--restore-test", check=True).stdout)
    assert verified["ok"] is True, verified
    assert verified["restore_test"]["ok"] is True
    assert [f["name"] for f in verified["files"]] == names

    damage(env)
    report = json.loads(env.run("--json", "restore", "postgres", names[0], "--force", check=True).stdout)
    assert report["verified"] is True
    assert report["format"] == "directory"
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before

    copy = f"{env.database}_dircopy"
    env.run("restore", "postgres", manifest["id"], "--target-db", copy, check=True)  # type: ignore[arg-type]
    with env.server.connect(copy) as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, copy) == schema_before
    assert scratch_folders(env) == []


def test_test_restore_at_backup_time_and_row_checksums(env: Env) -> None:
    env.write_config(format="directory", compression="none", restore_jobs=2)
    manifest = backup(env, "--test-restore")
    outcome = manifest["details"]["test_restore"]  # type: ignore[index]
    assert outcome["ok"] is True and outcome["checksums"] is True, outcome
    assert outcome["tables"] >= 6
    assert all(n.endswith(".dat") for n in file_names(manifest))
    with env.server.connect("postgres") as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'kkua_backup_test_%'").fetchall()
    assert left == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _biggest_data_file(env: Env, manifest: dict[str, object]) -> Path:
    parts = [env.folder / n for n in file_names(manifest)[1:]]
    return max(parts, key=lambda p: p.stat().st_size)


def test_a_flipped_byte_in_one_data_file_is_caught_by_verify_and_restore(env: Env) -> None:
    env.write_config(format="directory", compression="gzip", restore_jobs=2)
    manifest = backup(env)
    _flip_byte(_biggest_data_file(env, manifest))
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)

    result = env.run("verify", "latest")
    assert result.returncode == 3, describe(result)
    assert "checksum" in output(result) or "decompress" in output(result) or "corrupt" in output(result), \
        describe(result)

    for extra in ((), ("--target-db", f"{env.database}_flipped")):
        result = env.run("restore", "postgres", "latest", "--force", *extra)
        assert result.returncode == 3, describe(result)
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before
    with env.server.connect("postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (f"{env.database}_flipped",)).fetchone() is None
    assert scratch_folders(env) == []


def test_a_missing_file_makes_the_set_incomplete_and_restore_refuse(env: Env) -> None:
    env.write_config(format="directory", compression="zstd")
    manifest = backup(env)
    gone = _biggest_data_file(env, manifest)
    gone.unlink()
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert listing[0]["status"] == "incomplete"
    status = env.run("list", "postgres").stdout
    assert "incomplete" in status
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words")
        before = table_contents(conn)
    result = env.run("restore", "postgres", str(manifest["id"]), "--force")
    assert result.returncode == 3, describe(result)
    assert gone.name in output(result), describe(result)
    with env.connect() as conn:
        assert table_contents(conn) == before


def test_encrypted_directory_set_round_trip(env: Env) -> None:
    env.write_config(format="directory", compression="zstd", restore_jobs=2)
    encryption(env, "age")
    with env.connect() as conn:
        before = table_contents(conn)
    manifest = backup(env)
    assert all(n.endswith(".zst.age") for n in file_names(manifest))
    assert all(f["encryption"] == "age" for f in manifest["files"])  # type: ignore[attr-defined]
    assert KNOWN_ROW not in stored_bytes(env)
    env.run("verify", "latest", "--restore-test", check=True)
    damage(env)
    env.run("restore", "postgres", "latest", "--force", check=True)
    with env.connect() as conn:
        assert table_contents(conn) == before
    copy = f"{env.database}_enc"
    env.run("restore", "postgres", "latest", "--target-db", copy, check=True)
    with env.server.connect(copy) as conn:
        assert table_contents(conn) == before


@pytest.fixture
def bulky_db(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """The sample data plus ~60 MB of bulk rows, so pg_dump -Fd runs for a moment."""
    with bulk_database(pg_server, f"kkua_dirbig_{os.getpid()}", 60) as name:
        yield name


def test_kill9_during_a_directory_backup_leaves_nothing_after_the_next_run(env: Env, bulky_db: str) -> None:
    env.write_config(database=bulky_db, format="directory", compression="gzip", dump_jobs=2)
    proc = env.popen("backup", "postgres")

    def dumping() -> tuple[Path, int] | None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the backup ended (exit {proc.returncode}) before it could be killed\n{out}\n{err}")
        scratch = scratch_folders(env)
        dumps = [p for p in descendants(proc.pid) if Path(cmdline(p)[0] if cmdline(p) else "").name == "pg_dump"]
        if scratch and dumps and any((scratch[0] / "dump").glob("*.dat")):
            return scratch[0], dumps[0]
        return None

    try:
        scratch, dump_pid = wait_for(dumping, "pg_dump writing into the scratch folder", timeout=120)
        victims = [dump_pid, *descendants(proc.pid)]
        crash(proc, victims)  # the CLI and pg_dump, as a machine crash would
        proc.communicate(timeout=30)
        wait_for(lambda: not any(alive(p) for p in victims) or None, "pg_dump to die", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert scratch.is_dir(), "expected the kill to leave the scratch folder behind"
    assert holder_of(env.backup_dir, "postgres") is None
    assert json.loads(env.run("--json", "list", "postgres", check=True).stdout) == []

    env.write_config(format="directory", compression="gzip")  # the small database: a quick next run
    result = env.run("backup", "postgres", check=True)
    assert not scratch.exists()
    assert scratch_folders(env) == []
    logged = "".join(p.read_text() for p in env.log_dir.glob("*.log")) + output(result)
    assert scratch.name in logged
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert len(listing) == 1 and listing[0]["status"] == "ok"
    named = {f["name"] for f in listing[0]["files"]} | {f"{listing[0]['prefix']}{listing[0]['id']}.manifest.json"}
    assert {p.name for p in env.folder.iterdir()} == named


def test_pg_restore_reads_what_we_wrote_by_hand(env: Env, tmp_path: Path) -> None:
    """The manual way back: decompress each file under its pg_dump name, then pg_restore --list."""
    env.write_config(format="directory", compression="gzip")
    manifest = backup(env)
    out = tmp_path / "dir"
    out.mkdir()
    for name in file_names(manifest):
        member = name.split(".pgdir.", 1)[1].removesuffix(".gz")
        with (out / member).open("wb") as fh:
            subprocess.run(["gunzip", "-c", str(env.folder / name)], stdout=fh, check=True)
    listing = subprocess.run([str(env.server.bin_dir / "pg_restore"), "--list", str(out)], capture_output=True,
                             text=True, check=True).stdout
    assert "TABLE DATA public users" in listing


def test_kill9_during_a_directory_restore_leaves_nothing_after_the_next_run(env: Env, bulky_db: str) -> None:
    env.write_config(database=bulky_db, format="directory", compression="zstd", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    target = f"{bulky_db}_killed"
    proc = env.popen("restore", "postgres", "latest", "--target-db", target, "--force")

    def loading() -> tuple[Path, int] | None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the restore ended (exit {proc.returncode}) before it could be killed\n{out}\n{err}")
        scratch = scratch_folders(env)
        loaders = [p for p in descendants(proc.pid) if Path(cmdline(p)[0] if cmdline(p) else "").name == "pg_restore"
                   and "--jobs=2" in cmdline(p)]
        return (scratch[0], loaders[0]) if scratch and loaders else None

    try:
        scratch, loader = wait_for(loading, "pg_restore -j loading from the scratch folder", timeout=120)
        _crash_restore(proc, [loader, *descendants(proc.pid)])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _killed_restore_cleaned_up(env, scratch, target)


def _crash_restore(proc: subprocess.Popen[str], victims: list[int]) -> None:
    """Kill the restore and its children (pg_restore's workers) as a machine crash would, and wait for them."""
    crash(proc, victims)
    proc.communicate(timeout=30)
    wait_for(lambda: not any(alive(p) for p in victims) or None, "the restore's children to die", timeout=30)


def _killed_restore_cleaned_up(env: Env, scratch: Path, target: str) -> None:
    """The kill left the scratch folder; the next command of the kind removes it and drops the half-made
    database `target`."""
    assert scratch.is_dir(), "expected the kill to leave the scratch folder behind"
    result = env.run("verify", "latest")  # any command of the kind cleans up after killed runs
    assert result.returncode == 0, describe(result)
    assert not scratch.exists()
    assert scratch_folders(env) == []
    with env.server.connect("postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchone() is None


def _restore_watching_scratch(env: Env, *args: str) -> tuple[dict[str, object], dict[str, int]]:
    """Run `restore postgres ARGS --json`, noting every file seen in a scratch folder while it runs and the
    largest size it had: (the report, name -> size)."""
    proc = env.popen("--json", "restore", "postgres", *args)
    seen: dict[str, int] = {}
    while proc.poll() is None:
        for folder in scratch_folders(env):
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    with contextlib.suppress(OSError):
                        seen[entry.name] = max(seen.get(entry.name, 0), entry.stat(follow_symlinks=False).st_size)
    out, err = proc.communicate()
    assert proc.returncode == 0, f"{out}\n{err}"
    report: dict[str, object] = json.loads(out)
    return report, seen


def test_a_trusted_directory_set_loads_in_one_pass_with_no_data_file_unpacked(env: Env, bulky_db: str) -> None:
    """A set made here restores in one pass: into a new database, each table's data file goes from the set
    straight into a COPY (pg_restore only for the schema before and after); in place, into the one
    transaction's SQL. Every file is checked on the way and named in the report; no table's data is ever
    written to the scratch folder (only toc.dat and pg_restore's lists, and empty stand-ins)."""
    env.write_config(database=bulky_db, format="directory", compression="zstd", dump_jobs=2, restore_jobs=2)
    with env.server.connect(bulky_db) as conn:
        before = table_contents(conn)
    schema_before = schema_dump(env.server, bulky_db)
    manifest = backup(env)
    recorded = {f["name"]: f["sha256"] for f in manifest["files"]}  # type: ignore[attr-defined]

    copy = f"{bulky_db}_copy"
    report, seen = _restore_watching_scratch(env, "latest", "--target-db", copy, "--force")
    check = report["check"]
    assert check["mode"] == "one pass", check  # type: ignore[index]
    assert {f["name"]: f["sha256"] for f in check["files"]} == recorded  # type: ignore[index]
    assert seen, "the restore made no scratch folder"
    data = {name: size for name, size in seen.items() if name.endswith(".dat") and name != "toc.dat"}
    assert data and all(size == 0 for size in data.values()), seen  # the stand-ins only, never the data
    with env.server.connect(copy) as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, copy) == schema_before.replace(bulky_db, copy)

    with env.server.connect(bulky_db) as conn:
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        conn.execute("CREATE TABLE after_backup (x int)")
    report, seen = _restore_watching_scratch(env, "latest", "--force", "--no-safety-backup")
    assert report["check"]["mode"] == "one pass"  # type: ignore[index]
    assert {f["name"]: f["sha256"] for f in report["check"]["files"]} == recorded  # type: ignore[index]
    data = {name: size for name, size in seen.items() if name.endswith(".dat") and name != "toc.dat"}
    assert all(size == 0 for size in data.values()), seen
    with env.server.connect(bulky_db) as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, bulky_db) == schema_before
    assert scratch_folders(env) == []


def test_kill9_while_table_data_streams_into_a_new_database_leaves_nothing_after_the_next_run(
        env: Env, bulky_db: str) -> None:
    env.write_config(database=bulky_db, format="directory", compression="zstd", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    target = f"{bulky_db}_killed"
    proc = env.popen("restore", "postgres", "latest", "--target-db", target, "--force")

    def copying() -> Path | None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the restore ended (exit {proc.returncode}) before it could be killed\n{out}\n{err}")
        with env.server.connect("postgres") as conn:
            rows = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'COPY %%'",
                                (target,)).fetchone()
        scratch = scratch_folders(env)
        return scratch[0] if scratch and rows and rows[0] else None

    try:
        scratch = wait_for(copying, "a table's data streaming into a COPY", timeout=120)
        _crash_restore(proc, descendants(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _killed_restore_cleaned_up(env, scratch, target)


POST_DATA_SHAPES = """
CREATE TABLE public."Odd ""name"" T" (id int PRIMARY KEY, a text, b int);
CREATE INDEX odd_a ON public."Odd ""name"" T" (a);
CREATE UNIQUE INDEX "Odd b idx" ON public."Odd ""name"" T" (b);
ALTER TABLE public."Odd ""name"" T" CLUSTER ON odd_a;
COMMENT ON INDEX public.odd_a IS 'a comment on an index';
INSERT INTO public."Odd ""name"" T" SELECT i, 'row ' || i, i FROM generate_series(1, 3000) i;
CREATE TABLE public.p (id int, k int) PARTITION BY RANGE (id);
CREATE TABLE public.p1 PARTITION OF public.p FOR VALUES FROM (0) TO (1000);
CREATE TABLE public.p2 PARTITION OF public.p FOR VALUES FROM (1000) TO (2000);
ALTER TABLE public.p ADD PRIMARY KEY (id);
CREATE INDEX p_k ON public.p (k);
INSERT INTO public.p SELECT i, i % 7 FROM generate_series(0, 1999) i;
CREATE TABLE public.ref (id int REFERENCES public."Odd ""name"" T" (id));
INSERT INTO public.ref VALUES (1), (2);
CREATE MATERIALIZED VIEW public.mv AS SELECT id, b FROM public."Odd ""name"" T" WHERE id % 3 = 0;
CREATE INDEX mv_id ON public.mv (id);
"""


def post_data_catalog(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every user index (definition, clustered, comment), constraint and the materialized view's rows."""
    return {
        "indexes": conn.execute(
            "SELECT n.nspname, i.relname, pg_get_indexdef(x.indexrelid), x.indisclustered, x.indisvalid, "
            "obj_description(x.indexrelid, 'pg_class') FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname NOT LIKE 'pg\\_%' "
            "AND n.nspname <> 'information_schema' ORDER BY 1, 2").fetchall(),
        "constraints": conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated, conparentid <> 0 "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall(),
        "matview": conn.execute("SELECT * FROM public.mv ORDER BY id").fetchall(),
    }


def _logged_event(env: Env, event: str) -> str:
    lines = [line for p in env.log_dir.glob("*.log") for line in p.read_text().splitlines() if event in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_indexes_and_keys_are_built_with_each_table_and_its_rows_are_frozen(env: Env) -> None:
    """Into a new database, each streamed table's own indexes and keys run right after its COPY (the log says
    how many ran early, how many were left to pg_restore -j), the rest (partitioned parents, attachments, the
    FK, the comment, the materialized view's index and data) after all the data; the catalogs come back
    whole, and a plain table's rows were written frozen (COPY FREEZE), not left for later vacuums."""
    with fresh_database(env) as conn:
        conn.execute(POST_DATA_SHAPES)
        before = post_data_catalog(conn)
        rows = contents(conn)
    schema_before = schema_dump(env.server, env.database)
    env.write_config(format="directory", compression="zstd", restore_jobs=2)
    backup(env)

    copy = f"{env.database}_early"
    env.run("restore", "postgres", "latest", "--target-db", copy, check=True)
    with env.server.connect(copy) as conn:
        assert post_data_catalog(conn) == before
        assert contents(conn) == rows
    assert schema_dump(env.server, copy) == schema_before
    # early: the odd table's key and two indexes, p1's and p2's key and index; rest: p's key and index, the
    # four attachments, the comment, the FK, the view's index and its data
    assert " early=7 rest=10" in _logged_event(env, "post-data entries built right after their table's data")

    with env.server.connect(copy) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_visibility'").fetchone() is None:
            pytest.skip("pg_visibility (contrib) is not installed: cannot see whether the rows are frozen")
        conn.execute("CREATE EXTENSION pg_visibility")
        for table in ('public."Odd ""name"" T"', "public.p1", "public.p2", "public.ref"):
            pages, frozen = conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int,"
                                         " all_frozen FROM pg_visibility_map_summary(%s::regclass)",
                                         (table, table)).fetchone()  # type: ignore[misc]
            assert pages > 0 and frozen == pages, (table, pages, frozen)


def test_a_failing_index_build_fails_the_restore_and_names_the_index(env: Env) -> None:
    """An index whose expression fails in any database but the original one: built right after its table's
    data, its failure fails the restore (naming the index and the table) and the new database is dropped."""
    with fresh_database(env) as conn:
        conn.execute(f"""
            CREATE FUNCTION public.only_here(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
            BEGIN
              IF current_database() <> '{env.database}' THEN RAISE EXCEPTION 'not in this database'; END IF;
              RETURN x;
            END $$;
            CREATE TABLE public.boom (x int);
            INSERT INTO public.boom SELECT generate_series(1, 100);
            CREATE INDEX boom_idx ON public.boom (public.only_here(x));
        """)
    env.write_config(format="directory", compression="zstd", restore_jobs=2)
    backup(env)
    copy = f"{env.database}_boom"
    result = env.run("restore", "postgres", "latest", "--target-db", copy)
    assert result.returncode != 0, describe(result)
    assert 'building index "boom_idx" of public.boom failed' in output(result), describe(result)
    assert "not in this database" in output(result), describe(result)
    assert " early=1 rest=0" in _logged_event(env, "post-data entries built right after their table's data")
    with env.server.connect("postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (copy,)).fetchone() is None
    assert scratch_folders(env) == []


def test_post_data_entries_carry_the_placement_set_before_them_and_a_mismatch_makes_none() -> None:
    """pg_restore prints `SET default_tablespace` before the header of the entry it is for, only when it
    changes: it goes with that entry and the ones after, not the one it follows; a script that does not
    match the list one to one gives no entries (everything is then left to pg_restore)."""
    listing = (b";\n; Selected TOC Entries:\n;\n"
               b"11; 2606 1 CONSTRAINT public t t_pkey me\n"
               b"12; 1259 2 INDEX public t_a me\n"
               b"13; 1259 3 INDEX S x u_b me\n")

    def header(tag: bytes, desc: bytes, schema: bytes) -> bytes:
        return b"--\n-- Name: %s; Type: %s; Schema: %s; Owner: me\n--\n\n" % (tag, desc, schema)

    script = (b"SET client_encoding = 'UTF8';\n\nSET default_tablespace = '';\n\n"
              + header(b"t t_pkey", b"CONSTRAINT", b"public")
              + b"ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\n\n"
              + b"SET default_tablespace = fast;\n\n"
              + header(b"t_a", b"INDEX", b"public") + b"CREATE INDEX t_a ON public.t USING btree (a);\n\n\n"
              + header(b"u_b", b"INDEX", b"S x") + b'CREATE INDEX u_b ON "S x".u USING btree (b);\n\n\n'
              + b"--\n-- PostgreSQL database dump complete\n--\n\n")
    entries = post_data_entries(listing, script)
    assert entries is not None
    assert [(e.desc, e.tag, e.placement, e.sql) for e in entries] == [
        (b"CONSTRAINT", b"t t_pkey", b"SET default_tablespace = '';\n",
         b"ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n"),
        (b"INDEX", b"t_a", b"SET default_tablespace = fast;\n", b"CREATE INDEX t_a ON public.t USING btree (a);\n"),
        (b"INDEX", b"u_b", b"SET default_tablespace = fast;\n", b'CREATE INDEX u_b ON "S x".u USING btree (b);\n'),
    ]
    assert post_data_entries(listing, script.replace(b"Schema: S x", b"Schema: public")) is None
    assert post_data_entries(listing.replace(b"13; 1259 3 INDEX S x u_b me\n", b""), script) is None
    assert post_data_entries(listing, script.split(b"--\n-- PostgreSQL database dump complete")[0]) is None
