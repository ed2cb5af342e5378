"""Bulk PostgreSQL data for the benchmark and the tests of large dumps (not shipped)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from kkua_backupd.demo.sandbox import ThrowawayPostgres, create_sample_data

_BULK_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id          bigint PRIMARY KEY,
    event_key   text NOT NULL,
    user_id     bigint NOT NULL,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL,
    note        text
)
"""

_BULK_INSERT = """
INSERT INTO {table} (id, event_key, user_id, kind, payload, created_at, note)
SELECT i,
       md5(i::text),
       1 + (2147483647 & hashint8(i)) %% 100000,
       (ARRAY['login', 'logout', 'word', 'join_room', 'leave_room', 'purchase', 'chat'])
           [1 + (2147483647 & hashint8(i)) %% 7],
       jsonb_build_object(
           'session', md5('s' || i),
           'score', (2147483647 & hashint8(i * 31)) %% 100000,
           'combo', (2147483647 & hashint8(i * 7)) %% 50,
           'client', jsonb_build_object(
               'os', (ARRAY['android', 'ios', 'web', 'windows'])[1 + i %% 4],
               'version', '1.' || (i %% 40) || '.' || ((2147483647 & hashint8(i)) %% 10)),
           'tags', jsonb_build_array(substr(md5('t' || i), 1, 6), substr(md5('u' || i), 1, 6)),
           'ok', (2147483647 & hashint8(i * 3)) %% 10 <> 0),
       timestamptz '2024-01-01 00:00:00+00' + (i * interval '1.7 seconds'),
       CASE WHEN i %% 4 = 0 THEN NULL
            ELSE substr(md5('n' || i) || md5('m' || i) || md5('o' || i), 1, 20 + (2147483647 & hashint8(i)) %% 76) END
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
"""


def fill_bulk(conn: psycopg.Connection[Any], megabytes: int, table: str = "bench_events") -> None:
    """Create ``table`` if needed and append generated rows until it holds about ``megabytes`` MB (table + indexes).

    Raises ValueError if ``megabytes`` is negative and psycopg.Error if the statements fail.
    """
    if megabytes < 0:
        raise ValueError("megabytes must be >= 0")
    target = megabytes * 1024 * 1024
    ident = sql.Identifier(table)
    with conn.transaction():
        conn.execute(sql.SQL(_BULK_TABLE_DDL).format(table=ident))
    insert = sql.SQL(_BULK_INSERT).format(table=ident)
    size_query = sql.SQL("SELECT pg_total_relation_size({}::regclass), coalesce(max(id), 0) FROM {}").format(
        sql.Literal(ident.as_string(conn)), ident
    )

    def measure() -> tuple[int, int]:
        row = conn.execute(size_query).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    size, last_id = measure()
    batch = 5_000
    while size < target:
        with conn.transaction():
            conn.execute(insert, {"first": last_id + 1, "last": last_id + batch})
        new_size, new_last = measure()
        grown = max(new_size - size, 1)
        per_row = grown / max(new_last - last_id, 1)
        size, last_id = new_size, new_last
        # Aim a little short of the target so we do not overshoot by a whole large batch.
        remaining_rows = int((target - size) / per_row * 0.9) + 1
        batch = max(1_000, min(remaining_rows, 250_000))


# ------------------------------------------------------------------ comparisons


@contextlib.contextmanager
def bulk_database(server: ThrowawayPostgres, name: str, megabytes: int) -> Iterator[str]:
    """A new database `name` on `server` with the sample data plus about `megabytes` of bulk rows, so a dump
    or a restore of it runs for a moment; dropped at the end."""
    server.create_database(name)
    try:
        with server.connect(name) as conn:
            create_sample_data(conn)
            fill_bulk(conn, megabytes)
        yield name
    finally:
        server.drop_database(name)
