"""A plain set restored into a new database over several connections (sources/postgres/split.py, decision
0026), against a real PostgreSQL: a big table's rows shared between psql and another connection all arrive,
what runs after a table's data (its indexes, a key referencing it, a materialized view over it) sees all of
them, and a failure on any connection drops the new database and leaves the source alone."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from kkua_backupd.demo.sandbox import ThrowawayPostgres, schema_dump
from tests.support.helpers import describe, output
from tests.support.pg_bulk import bulk_database, fill_bulk

from ..conftest import Env
from .test_flipped_bytes import make_manifest_match

BIG = "public.bench_events"


@pytest.fixture
def bulky(pg_server: ThrowawayPostgres) -> Iterator[str]:
    """The sample data, ~24 MB of bulk rows (far more than split.ALONE) with a second index, a table with a
    key referencing them, and a materialized view over them."""
    with bulk_database(pg_server, f"kkua_split_{os.getpid()}", 24) as name:
        with pg_server.connect(name) as conn:
            conn.execute("CREATE INDEX bench_events_kind ON bench_events (kind)")
            conn.execute("CREATE TABLE event_notes (id bigint PRIMARY KEY REFERENCES bench_events (id), note text)")
            conn.execute("INSERT INTO event_notes SELECT id, md5(id::text) FROM bench_events WHERE id % 10 = 0")
            conn.execute("CREATE MATERIALIZED VIEW event_kinds AS"
                         " SELECT kind, count(*) AS n, sum(user_id) AS s FROM bench_events GROUP BY kind")
        yield name


def fingerprint(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Each user table's and materialized view's row count and a hash of all its rows, order aside."""
    names = conn.execute("SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
                         " JOIN pg_namespace n ON n.oid = c.relnamespace"
                         " WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                         " AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1").fetchall()
    return {name: conn.execute(f"SELECT count(*), sum(hashtext(t::text)::numeric) FROM {name} t").fetchone()
            for (name,) in names}


def shared_blocks(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"rows loaded over several connections .*blocks_shared=(\d+)", log)]


def test_a_big_tables_rows_are_shared_and_all_restored(env: Env, bulky: str) -> None:
    env.write_config(database=bulky, compression="zstd", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    with env.connect(bulky) as conn:
        before = fingerprint(conn)
    assert before[BIG][0] > 50_000 and "public.event_kinds" in before
    copy = f"{bulky}_copy"
    try:
        result = env.run("--json", "restore", "postgres", "latest", "--target-db", copy, "--force")
        assert result.returncode == 0, describe(result)
        report = json.loads(result.stdout)
        assert report["verified"] is True and report["problems"] == []
        log = (env.log_dir / "restore.log").read_text()
        assert shared_blocks(log) and shared_blocks(log)[-1] > 0, log[-3000:]
        with env.server.connect(copy) as conn:
            assert fingerprint(conn) == before  # the view refreshed after every row of its table was in
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'bench_events'").fetchone() == (2,)
        assert schema_dump(env.server, copy) == schema_dump(env.server, bulky)
    finally:
        env.server.drop_database(copy)

    verify = env.run("--json", "verify", "latest", "--restore-test")  # a test restore loads the same way
    assert verify.returncode == 0, describe(verify)
    assert json.loads(verify.stdout)[0]["restore_test"]["ok"] is True
    assert shared_blocks((env.log_dir / "backup.log").read_text())


def test_one_restore_job_loads_in_one_transaction(env: Env, bulky: str) -> None:
    env.write_config(database=bulky, compression="zstd", restore_jobs=1)
    env.run("backup", "postgres", check=True)
    copy = f"{bulky}_one"
    try:
        env.run("restore", "postgres", "latest", "--target-db", copy, "--force", check=True)
        log = (env.log_dir / "restore.log").read_text()
        assert "row counts checked before the COMMIT" in log and not shared_blocks(log)
        with env.server.connect(copy) as conn:  # in one transaction its rows were written frozen (decision 0025)
            assert conn.execute("SELECT pg_relation_size('bench_events', 'vm') > 0").fetchone() == (True,)
    finally:
        env.server.drop_database(copy)


def test_bad_rows_on_any_connection_fail_the_restore_and_drop_the_new_database(env: Env, bulky: str) -> None:
    """Rows no connection can load, all through the second half of the big table's data (so whichever
    connection gets the first of them fails): exit 1 naming the value, the new database dropped, the other
    connection stopped, the source untouched."""
    env.write_config(database=bulky, compression="none", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    (path,) = [p for p in env.folder.iterdir() if p.name.endswith(".sql")]
    data = path.read_bytes()
    start = data.index(f"COPY {BIG} ".encode())
    start = data.index(b"\n", start) + 1
    end = data.index(b"\n\\.\n", start) + 1
    rows = data[start:end].split(b"\n")
    half = len(rows) // 2
    bad = [b"x" + row[row.index(b"\t"):] if i > half and i % 500 == 0 and row else row for i, row in enumerate(rows)]
    path.write_bytes(data[:start] + b"\n".join(bad) + data[end:])
    make_manifest_match(env, path)
    with env.connect(bulky) as conn:
        before = fingerprint(conn)
    copy = f"{bulky}_bad"
    result = env.run("restore", "postgres", "latest", "--target-db", copy, "--force")
    text = output(result)
    assert result.returncode == 1, text
    assert 'invalid input syntax for type bigint: "x"' in text, text
    assert "was dropped again" in text, text
    assert "restore finished" not in (env.log_dir / "restore.log").read_text()
    with env.server.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (copy,)).fetchone() is None
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (copy,)).fetchone() == (0,)
    with env.connect(bulky) as conn:
        assert fingerprint(conn) == before


def test_psql_stopped_by_the_restore_timeout_stops_the_other_connections_too(env: Env, bulky: str) -> None:
    """psql killed by `restore_timeout` while another connection holds rows of the big table: the restore
    ends at once with psql's timeout (not a hang, not another connection's error), the new database dropped."""
    with env.connect(bulky) as conn:  # ~100 MB of rows: several seconds of loading, far more than the timeout
        fill_bulk(conn, 100)
    env.write_config(database=bulky, compression="none", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    env.write_config(database=bulky, compression="none", restore_jobs=2, restore_timeout=1)
    copy = f"{bulky}_slow"
    result = env.run("restore", "postgres", "latest", "--target-db", copy, "--force", timeout=120)
    text = output(result)
    assert result.returncode != 0, text
    assert shared_blocks((env.log_dir / "restore.log").read_text()) == []  # it did not get to the end
    assert "psql timed out after 1 s and was stopped" in text, text
    assert "second connection" not in text, text
    with env.server.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (copy,)).fetchone() is None
