"""Every database shape through every restore path, in every format (issue 9; directory: issue 14).

Each shape is backed up with a test restore, verified with a restore test, restored in place (with its
safety backup), the safety backup restored back (undo), and restored into a new database (`--target-db`);
contents (every table keyed by (schema, table), every large object) and the schema must come back exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kkua_backupd.demo.sandbox import schema_dump
from tests.support.helpers import describe, output

from ..conftest import Env

pytestmark = pytest.mark.timeout(600)

BIG_ROW_MB = int(os.environ.get("KKUA_TEST_BIG_ROW_MB", "64"))


def contents(conn: psycopg.Connection[Any]) -> dict[Any, list[str]]:
    """Every user table's and materialized view's rows (keyed by the (schema, table) pair, so dots in names
    cannot collide) and every large object (oid -> md5 of its data)."""
    tables = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                          " WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                          " AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2").fetchall()
    out: dict[Any, list[str]] = {}
    for schema, table in tables:
        rows = conn.execute(sql.SQL("SELECT md5(t::text) || ':' || length(t::text) FROM {} t")
                            .format(sql.Identifier(schema, table))).fetchall()
        out[(schema, table)] = sorted(str(r[0]) for r in rows)
    out["large objects"] = sorted(f"{oid}:{digest}" for oid, digest in conn.execute(
        "SELECT oid, md5(lo_get(oid)) FROM pg_largeobject_metadata").fetchall())
    return out


def fresh_database(env: Env) -> psycopg.Connection[Any]:
    """The test's database made again, empty, with a pristine `public` (the fixture's sample data has keys,
    indexes and sequences, which would come after the data in a dump)."""
    env.server.drop_database(env.database)
    env.server.create_database(env.database)
    return env.connect()


def ends_in_data(conn: psycopg.Connection[Any]) -> None:
    """Tables without any key, index, constraint or sequence: the dump's last statement is COPY data."""
    conn.execute("CREATE TABLE public.words (word text, score int)")
    conn.execute("INSERT INTO public.words SELECT 'w' || i, i FROM generate_series(1, 300) i")
    conn.execute("CREATE TABLE public.zz_last (note text)")
    conn.execute("INSERT INTO public.zz_last VALUES ('the very last line of the dump'), (NULL), (E'tab\\there')")


def large_objects(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE public.avatars (user_id int, image oid)")
    conn.execute("INSERT INTO public.avatars SELECT i, lo_from_bytea(0, convert_to(repeat('png' || i, 5000), 'UTF8'))"
                 " FROM generate_series(1, 5) i")
    conn.execute("SELECT lo_from_bytea(0, '\\x00ff00'::bytea)")  # an orphan, kept by pg_dump too


def odd_identifiers(conn: psycopg.Connection[Any]) -> None:
    """Names that collide when joined with a dot, quotes, spaces, unicode; different row counts each."""
    conn.execute('CREATE SCHEMA "public.a"')
    conn.execute('CREATE TABLE "public.a".b (x int)')
    conn.execute('INSERT INTO "public.a".b SELECT generate_series(1, 3)')
    conn.execute('CREATE TABLE public."a.b" (x int)')
    conn.execute('INSERT INTO public."a.b" SELECT generate_series(1, 7)')
    conn.execute('CREATE SCHEMA "스키마 ""q"""')
    conn.execute('CREATE TABLE "스키마 ""q"""."낱말 표" ("단어" text PRIMARY KEY, "with space" int)')
    conn.execute('INSERT INTO "스키마 ""q"""."낱말 표" VALUES (\'사과\', 1), (\'과자\', 2)')
    conn.execute('CREATE TABLE public."we""ird;\'name" (id serial PRIMARY KEY, "select" text)')
    conn.execute('INSERT INTO public."we""ird;\'name" ("select") VALUES (\'COMMIT;\'), (E\'\\\\.\'), (\'\\.\')')
    conn.execute('CREATE TABLE public."User" (id int)')
    conn.execute('INSERT INTO public."User" VALUES (1)')
    conn.execute('CREATE TABLE public.user_ (id int)')


def empty_database(conn: psycopg.Connection[Any]) -> None:
    """Nothing at all."""


def one_big_row(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE public.blob_row (id int, body text)")
    conn.execute("INSERT INTO public.blob_row SELECT 1, string_agg(md5(i::text), '') "
                 "FROM generate_series(1, %s) i", (BIG_ROW_MB * 1024 * 1024 // 32,))


def partitioned_and_indexed(conn: psycopg.Connection[Any]) -> None:
    """What a restore builds after the data: a partitioned table (its keys and indexes on the parent and
    attached to the partitions), an unlogged table, keys, a foreign key, a unique constraint, an index with a
    comment, a materialized view with an index of its own (refreshed after the data)."""
    conn.execute("CREATE TABLE public.events (id int, at date, body text, PRIMARY KEY (id, at))"
                 " PARTITION BY RANGE (at)")
    for year in (2025, 2026):
        conn.execute(f"CREATE TABLE public.events_{year} PARTITION OF public.events"
                     f" FOR VALUES FROM ('{year}-01-01') TO ('{year + 1}-01-01')")
    conn.execute("CREATE INDEX events_body ON public.events (body)")
    conn.execute("INSERT INTO public.events SELECT i, DATE '2025-06-01' + (i % 400), md5(i::text)"
                 " FROM generate_series(1, 800) i")
    conn.execute('CREATE TABLE public."Users T" (id int PRIMARY KEY, email text UNIQUE, name text)')
    conn.execute('CREATE INDEX "Users name" ON public."Users T" (lower(name))')
    conn.execute('COMMENT ON INDEX public."Users name" IS \'for the search box\'')
    conn.execute('INSERT INTO public."Users T" SELECT i, i || \'@x\', \'n\' || i FROM generate_series(1, 500) i')
    conn.execute('CREATE TABLE public.orders (id int PRIMARY KEY, user_id int REFERENCES public."Users T" (id))')
    conn.execute("CREATE INDEX orders_user ON public.orders (user_id)")
    conn.execute("INSERT INTO public.orders SELECT i, 1 + i % 500 FROM generate_series(1, 2000) i")
    conn.execute("CREATE UNLOGGED TABLE public.cache (k text PRIMARY KEY, v text)")
    conn.execute("INSERT INTO public.cache SELECT 'k' || i, md5(i::text) FROM generate_series(1, 300) i")
    conn.execute("CREATE MATERIALIZED VIEW public.order_counts AS"
                 " SELECT user_id, count(*) AS n FROM public.orders GROUP BY 1")
    conn.execute("CREATE UNIQUE INDEX order_counts_user ON public.order_counts (user_id)")


def unfrozen_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """The user tables holding rows that were not loaded with COPY ... FREEZE: a table loaded so has a
    visibility map (FREEZE marks its pages all-visible, PostgreSQL 14+), one loaded without it has none
    until a VACUUM."""
    tables = conn.execute("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                          " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                          " AND n.nspname NOT LIKE 'pg\\_%' AND pg_relation_size(c.oid, 'vm') = 0"
                          " ORDER BY 1").fetchall()
    return [name for (name,) in tables
            if conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(sql.SQL(name))).fetchone() == (True,)]


SHAPES: dict[str, Callable[[psycopg.Connection[Any]], None]] = {
    "partitioned-and-indexed": partitioned_and_indexed,
    "ends-in-data": ends_in_data,
    "large-objects": large_objects,
    "odd-identifiers": odd_identifiers,
    "empty-database": empty_database,
    f"one-{BIG_ROW_MB}MB-row": one_big_row,
}


def round_trip_every_path(env: Env, fmt: str) -> None:
    """backup --test-restore, verify --restore-test, in place, undo with the safety backup, --target-db."""
    with env.connect() as conn:
        before = contents(conn)
    schema_before = schema_dump(env.server, env.database)

    backup = env.run("--json", "backup", "postgres", "--test-restore")
    assert backup.returncode == 0, describe(backup)
    manifest = json.loads(backup.stdout)
    assert manifest["status"] == "ok"
    assert manifest["details"]["test_restore"]["ok"] is True, manifest["details"]["test_restore"]

    verify = env.run("--json", "verify", "latest", "--restore-test")
    assert verify.returncode == 0, describe(verify)
    assert json.loads(verify.stdout)[0]["restore_test"]["ok"] is True

    with env.connect() as conn:  # damage: a table the backup never had, and one table less of data
        conn.execute("CREATE TABLE public.after_backup (id int)")
        conn.execute("INSERT INTO public.after_backup VALUES (1)")
        conn.execute("SELECT lo_from_bytea(0, 'after')")
    with env.connect() as conn:
        damaged = contents(conn)
    schema_damaged = schema_dump(env.server, env.database)

    restore = env.run("--json", "restore", "postgres", "latest", "--force")
    assert restore.returncode == 0, describe(restore)
    report = json.loads(restore.stdout)
    assert report["verified"] is True
    with env.connect() as conn:
        assert contents(conn) == before
        assert unfrozen_tables(conn) == []  # in one transaction every COPY is frozen (decision 0025)
    assert schema_dump(env.server, env.database) == schema_before

    undo = env.run("restore", "postgres", report["safety_backup"]["file"], "--force")
    assert undo.returncode == 0, describe(undo)
    with env.connect() as conn:
        assert contents(conn) == damaged
    assert schema_dump(env.server, env.database) == schema_damaged

    copy = f"{env.database}_copy"
    into_new = env.run("restore", "postgres", manifest["files"][0]["name"], "--target-db", copy)
    assert into_new.returncode == 0, describe(into_new)
    with env.server.connect(copy) as conn:
        assert contents(conn) == before
        if fmt == "directory":  # each table's COPY after its TRUNCATE is frozen (decision 0025); a plain set
            assert unfrozen_tables(conn) == []  # with restore_jobs > 1 loads over several connections (0026)
    assert schema_dump(env.server, copy) == schema_before


@pytest.mark.parametrize("fmt", ["plain", "custom", "directory"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shape_round_trips_every_path(env: Env, shape: str, fmt: str) -> None:
    env.write_config(format=fmt, compression="gzip" if fmt == "plain" else "zstd")
    with fresh_database(env) as conn:
        SHAPES[shape](conn)
    round_trip_every_path(env, fmt)


def test_odd_identifiers_are_counted_apart_in_the_manifest(env: Env) -> None:
    with fresh_database(env) as conn:
        odd_identifiers(conn)
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    tables = manifest["details"]["tables"]
    assert tables['public."a.b"']["rows"] == 7
    assert tables['"public.a".b']["rows"] == 3
    assert tables['"스키마 ""q"""."낱말 표"']["rows"] == 2
    assert tables['public."User"']["rows"] == 1
    assert len(tables) == 6


def test_psql_closing_frame_after_copy_data(env: Env) -> None:
    """The bug itself: psql stops at a lone `;` right after a COPY block and exits 0 (so the frame must not
    send one there), which the restore reports instead of claiming success."""
    with fresh_database(env) as conn:
        ends_in_data(conn)
    env.run("backup", "postgres", check=True)
    with env.connect() as conn:
        conn.execute("DELETE FROM public.zz_last")
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 0, describe(result)
    with env.connect() as conn:
        assert conn.execute("SELECT count(*) FROM public.zz_last").fetchone() == (3,)
    assert "rolled back" not in output(result)


def test_manifests_written_before_keys_were_quoted_still_compare(env: Env) -> None:
    """A set whose manifest keys tables the old way (`schema.table` joined as is) still restores verified."""
    with fresh_database(env) as conn:
        odd_identifiers(conn)
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    path = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    data = json.loads(path.read_text())
    with env.connect() as conn:
        names = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                             " WHERE c.relkind = 'r' AND n.nspname NOT LIKE 'pg\\_%'"
                             " AND n.nspname <> 'information_schema' ORDER BY 1, 2").fetchall()
        old = {f"{s}.{t}": {"rows": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(s, t))).fetchone()[0]} for s, t in names}  # type: ignore[index]
    assert "public.a.b" in old  # the old scheme: both colliding tables land on one key
    data["details"]["tables"] = old
    del data["details"]["table_keys"]
    path.write_text(json.dumps(data))
    assert env.run("restore", "postgres", "latest", "--force").returncode == 0
    verify = env.run("--json", "verify", "latest", "--restore-test")
    assert verify.returncode == 0, describe(verify)


def test_test_restore_that_cannot_run_leaves_the_set_ok_but_unverified(env: Env) -> None:
    """A role without CREATEDB cannot make the scratch database: that says nothing about the backup. The set
    stays ok (so `restore latest` still finds it), and list, the log, the exit code and status say so."""
    role = f"no_createdb_{os.getpid()}"
    with env.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                       sql.Literal(env.server.password)))
        conn.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(role)))
    try:
        env.write_config(user=role)
        result = env.run("backup", "postgres", "--test-restore")
        assert result.returncode == 1, describe(result)
        assert "is ok but unverified: its test restore could not run" in output(result)
        assert "permission denied to create database" in output(result)
        listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
        assert [s["status"] for s in listing] == ["ok"]
        assert listing[0]["details"]["test_restore"]["ran"] is False
        assert "ok, unverified" in env.run("list", "postgres", check=True).stdout
        assert "could not run" in (env.log_dir / "backup.log").read_text()
        status = env.run("--json", "status")
        assert "could not run" in json.dumps(json.loads(status.stdout)["jobs"]["postgres"])
        env.write_config()  # the superuser again: `restore latest` picks the set
        assert env.run("restore", "postgres", "latest", "--force").returncode == 0
    finally:
        with env.connect("postgres") as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_verify_catches_a_plain_set_that_would_not_restore(env: Env) -> None:
    """A set whose SQL was cut at a statement boundary (checksums rewritten to match, as a bad copy tool or
    an old version could leave it) fails `verify` and is refused by restore before any change."""
    import gzip
    import hashlib
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    path = env.folder / manifest["files"][0]["name"]
    text = gzip.decompress(path.read_bytes())
    cut = text[:text.index(b"-- PostgreSQL database dump complete")]
    path.write_bytes(gzip.compress(cut))
    mpath = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    data = json.loads(mpath.read_text())
    data["files"][0].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    mpath.write_text(json.dumps(data))
    verify = env.run("verify", "latest")
    assert verify.returncode != 0, describe(verify)
    assert "would not restore" in output(verify) and "truncated" in output(verify)
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert [s["status"] for s in listing] == ["failed"]  # never ok again
    restore = env.run("restore", "postgres", manifest["files"][0]["name"], "--force")
    assert restore.returncode == 3, describe(restore)
    assert "nothing was changed" in output(restore)


@pytest.mark.parametrize("fmt", ["plain", "custom"])
def test_five_thousand_tables(env: Env, fmt: str) -> None:
    """5,000 tiny tables: backed up (rows counted without holding a lock per table on top of pg_dump's),
    test-restored and restored into a new database (statement by statement when one transaction cannot
    hold the locks); in place, a restore that does not fit the server's lock table is refused before any
    change, naming the setting to raise."""
    env.write_config(format=fmt, compression="zstd")
    with fresh_database(env) as conn:
        for first in range(1, 5001, 500):  # 500 per transaction: each CREATE holds its locks until COMMIT
            conn.execute(f"DO $$BEGIN FOR i IN {first}..{first + 499} LOOP"
                         " EXECUTE format('CREATE TABLE public.t%s (a int)', i); END LOOP; END$$")
        conn.execute("INSERT INTO public.t1 VALUES (1), (2)")
    with env.connect() as conn:
        before = contents(conn)
    backup = env.run("--json", "backup", "postgres", "--test-restore", timeout=900)
    assert backup.returncode == 0, describe(backup)
    manifest = json.loads(backup.stdout)
    assert len(manifest["details"]["tables"]) == 5000
    assert manifest["details"]["test_restore"]["ok"] is True
    copy = f"{env.database}_copy"
    into_new = env.run("restore", "postgres", "latest", "--target-db", copy, timeout=900)
    assert into_new.returncode == 0, describe(into_new)
    with env.server.connect(copy) as conn:
        assert contents(conn) == before
    in_place = env.run("restore", "postgres", "latest", "--force", timeout=900)
    if in_place.returncode != 0:
        assert in_place.returncode == 3, describe(in_place)
        text = output(in_place)
        assert "nothing was changed" in text and "set max_locks_per_transaction = " in text, text
        assert not list(env.folder.glob("safety_backup_*")), "refused before the safety backup"
    with env.connect() as conn:
        assert contents(conn) == before


@pytest.mark.parametrize("damage", ["cut-short", "garbled-toc"])
def test_verify_catches_a_custom_set_that_would_not_restore(env: Env, damage: str) -> None:
    """A custom archive that pg_restore cannot read to its end (cut short, or its table of contents garbled;
    the file recompressed and its manifest's size and sha256 rewritten to match) fails `verify`, is marked
    failed for good, and is refused by restore before any change."""
    import hashlib

    import zstandard

    env.write_config(format="custom", compression="zstd")
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    path = env.folder / manifest["files"][0]["name"]
    archive = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()))
    if damage == "cut-short":
        del archive[-1000:]
    else:
        archive[200:264] = b"\xff" * 64
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(archive)))
    mpath = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    data = json.loads(mpath.read_text())
    data["files"][0].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    mpath.write_text(json.dumps(data))
    assert env.run("list", "postgres", check=True).returncode == 0  # the checksum alone says nothing

    verify = env.run("verify", "latest")
    assert verify.returncode == 3, describe(verify)
    text = output(verify)
    assert "would not restore: pg_restore cannot read the archive" in text, text
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert [s["status"] for s in listing] == ["failed"]  # never ok again
    with env.connect() as conn:
        before = conn.execute("SELECT count(*) FROM game_words").fetchone()
        conn.execute("DELETE FROM game_words WHERE id % 2 = 0")
        damaged = conn.execute("SELECT count(*) FROM game_words").fetchone()
    assert before != damaged
    restore = env.run("restore", "postgres", manifest["files"][0]["name"], "--force")
    assert restore.returncode == 3, describe(restore)
    assert "nothing was changed" in output(restore)
    assert not list(env.folder.glob("safety_backup_*")), "refused before the safety backup"
    with env.connect() as conn:
        assert conn.execute("SELECT count(*) FROM game_words").fetchone() == damaged


def test_in_place_restore_removes_every_kind_of_object_made_after_the_backup(env: Env) -> None:
    """The wipe keeps `public` itself and empties it object by object: objects of every kind created in it
    after the backup (an extension, a domain, a range type with its multirange, a composite type, a
    materialized view, an aggregate, an operator, a procedure, a collation, a text search configuration, a
    statistics object) are gone after an in-place restore, and rows and schema are exactly as backed up."""
    with env.connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS hstore SCHEMA public")
        conn.execute("CREATE TABLE public.tags (id int, attrs hstore)")
        conn.execute("INSERT INTO public.tags VALUES (1, 'a=>1')")
        before = contents(conn)
        public_oid = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = 'public'").fetchone()
    schema_before = schema_dump(env.server, env.database)
    env.run("backup", "postgres", check=True)
    with env.connect() as conn:
        conn.execute("DROP EXTENSION hstore CASCADE")
        conn.execute("CREATE EXTENSION citext SCHEMA public")
        conn.execute("CREATE DOMAIN public.positive AS int CHECK (VALUE > 0)")
        conn.execute("CREATE TYPE public.span AS RANGE (subtype = int8)")
        conn.execute("CREATE TYPE public.pair AS (a int, b text)")
        conn.execute("CREATE MATERIALIZED VIEW public.mv AS SELECT count(*) AS n FROM users")
        conn.execute("CREATE AGGREGATE public.total(int) (sfunc = int4pl, stype = int, initcond = '0')")
        conn.execute("CREATE FUNCTION public.eq3(int, int) RETURNS bool LANGUAGE sql AS 'SELECT $1 = $2'")
        conn.execute("CREATE OPERATOR public.=== (leftarg = int, rightarg = int, function = public.eq3)")
        conn.execute("CREATE PROCEDURE public.noop() LANGUAGE sql AS 'SELECT 1'")
        conn.execute('CREATE COLLATION public.c2 (locale = "C")')
        conn.execute("CREATE TEXT SEARCH CONFIGURATION public.simple2 (COPY = pg_catalog.simple)")
        conn.execute("CREATE STATISTICS public.users_st ON nickname, email FROM users")
        conn.execute("CREATE TABLE public.later (p public.positive, s public.span, c public.citext)")
        conn.execute("INSERT INTO public.later VALUES (1, '[1,5)', 'X')")
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 0, describe(result)
    with env.connect() as conn:
        assert contents(conn) == before
        left = conn.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1").fetchall()
        assert left == [("hstore",)]
        # emptied object by object, not dropped and re-created (which loses its initial-privileges record)
        assert conn.execute("SELECT oid FROM pg_namespace WHERE nspname = 'public'").fetchone() == public_oid
    assert schema_dump(env.server, env.database) == schema_before
