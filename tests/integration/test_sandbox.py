"""Integration test for kkua_backupd.demo.sandbox: a real throwaway PostgreSQL server, no mocks."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kkua_backupd.demo.sandbox import (
    SAMPLE_LARGE_BYTEA_BYTES,
    SAMPLE_LARGE_TEXT_BYTES,
    SAMPLE_SEQUENCE_VALUE,
    ThrowawayPostgres,
    create_sample_data,
    find_pg_bin_dir,
    free_port,
)
from tests.support.pg_bulk import fill_bulk

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    """One server for the whole module (initdb + start costs about a second)."""
    with ThrowawayPostgres() as server:
        yield server


def test_helpers() -> None:
    port = free_port()
    assert 0 < port < 65536
    bin_dir = find_pg_bin_dir()
    assert (bin_dir / "initdb").is_file()
    assert (bin_dir / "pg_dump").is_file()


def test_password_auth(pg: ThrowawayPostgres) -> None:
    assert pg.is_running()
    with pg.connect() as conn:
        row = conn.execute("SELECT current_user, inet_server_port(), current_setting('fsync')").fetchone()
    assert row == ("postgres", pg.port, "off")

    bad = pg.conninfo() | {"password": "definitely-wrong"}
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**bad, connect_timeout=5)


def test_create_and_drop_database(pg: ThrowawayPostgres) -> None:
    pg.create_database("끄아 db")
    lingering = pg.connect("끄아 db")  # drop_database must terminate this session
    try:
        pg.drop_database("끄아 db")
    finally:
        lingering.close()
    with pg.connect() as conn:
        n = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", ("끄아 db",)).fetchone()
    assert n == (0,)
    pg.drop_database("never-existed")  # IF EXISTS: no error


def test_sample_data(pg: ThrowawayPostgres) -> None:
    pg.create_database("sample")
    with pg.connect("sample") as conn:
        create_sample_data(conn)

        tables = {
            (s, t)
            for s, t in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema IN ('public', 'stats') AND table_type = 'BASE TABLE'"
            ).fetchall()
        }
        assert {
            ("public", "users"),
            ("public", "game_rooms"),
            ("public", "games"),
            ("public", "game_words"),
            ("public", "attachments"),
            ("stats", "daily_activity"),
        } <= tables

        assert conn.execute("SELECT to_regclass('public.game_summary') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT word_score('사과')").fetchone() == (20,)
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'game_words_before_write'").fetchone() == (
            1,
        )
        assert conn.execute("SELECT enum_range(NULL::game_status)::text").fetchone() == (
            "{waiting,playing,finished,aborted}",
        )
        assert conn.execute("SELECT last_value, is_called FROM game_no_seq").fetchone() == (
            SAMPLE_SEQUENCE_VALUE,
            True,
        )
        assert conn.execute("SELECT obj_description('users'::regclass)").fetchone() == (
            "끄투 플레이어 계정 (player accounts)",
        )

        # Korean text, NULLs and jsonb in users
        row = conn.execute("SELECT id, email, settings->>'theme' FROM users WHERE nickname = '끄아'").fetchone()
        assert row == (1, "kkua@example.com", "dark")
        nulls = conn.execute("SELECT count(*) FILTER (WHERE email IS NULL), count(*) FROM users").fetchone()
        assert nulls is not None and nulls[0] > 0 and nulls[1] == 200

        # The trigger trimmed words and filled in missing scores.
        assert conn.execute(
            "SELECT count(*) FROM game_words WHERE word <> btrim(word) OR score IS NULL"
        ).fetchone() == (0,)
        total = conn.execute(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM game_rooms) + (SELECT count(*) FROM games)"
            " + (SELECT count(*) FROM game_words) + (SELECT count(*) FROM stats.daily_activity)"
        ).fetchone()
        assert total is not None and 500 <= total[0] <= 5000
        summary = conn.execute("SELECT sum(word_count) FROM game_summary").fetchone()
        assert summary == (2000,)

        # CHECK constraint and foreign keys are enforced.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO users (nickname, created_at) VALUES ('', now())")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(
                "INSERT INTO game_rooms (title, owner_id, max_players, created_at) VALUES ('x', 99999, 4, now())"
            )

        big = conn.execute("SELECT octet_length(body), octet_length(blob) FROM attachments WHERE id = 1").fetchone()
        assert big == (SAMPLE_LARGE_TEXT_BYTES, SAMPLE_LARGE_BYTEA_BYTES)
        assert SAMPLE_LARGE_TEXT_BYTES >= 5 * 1024 * 1024 and SAMPLE_LARGE_BYTEA_BYTES >= 1024 * 1024


def test_fill_bulk(pg: ThrowawayPostgres) -> None:
    with pg.connect() as conn:
        fill_bulk(conn, 3)
        size, rows = conn.execute(
            "SELECT pg_total_relation_size('bench_events'), count(*) FROM bench_events"
        ).fetchone() or (0, 0)
    assert 3 * 1024 * 1024 <= size <= 4.5 * 1024 * 1024
    assert rows > 1000


def test_kill9_restart_and_destroy() -> None:
    # Not tmp_path: /tmp/pytest-of-root is 0700, and as root the server runs as the postgres OS user,
    # which must be able to traverse every parent of base_dir.
    base = Path(tempfile.mkdtemp(prefix="kkua-sandbox-test-"))
    base.chmod(0o755)
    server = ThrowawayPostgres(base_dir=base)
    server.destroy()  # before start: no-op
    try:
        server.start()
        root = server.tmp_dir
        assert root.parent == base and server.data_dir.is_dir() and server.log_file.is_file()
        with server.connect() as conn:
            # The sandbox runs with synchronous_commit=off: without this, commits from the last few
            # hundred ms are legitimately lost by a SIGKILL.
            conn.execute("SET synchronous_commit = on")
            conn.execute("CREATE TABLE survives (x int)")
            conn.execute("INSERT INTO survives VALUES (42)")

        server.kill9()
        assert not server.is_running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**server.conninfo(), connect_timeout=2)
        server.kill9()  # idempotent
        server.stop()  # no-op when down

        port = server.port
        server.restart()  # crash recovery
        assert server.is_running() and server.port == port
        with server.connect() as conn:
            assert conn.execute("SELECT x FROM survives").fetchone() == (42,)

        server.stop()
        assert not server.is_running()
        server.stop()
    finally:
        server.destroy()
        base_is_empty = not any(base.iterdir())
        shutil.rmtree(base, ignore_errors=True)
    assert not root.exists()
    assert base_is_empty
    server.destroy()  # idempotent


def test_failed_start_is_cleanable(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = ThrowawayPostgres(base_dir=tmp_path_factory.mktemp("fail"))
    server.bin_dir = server.bin_dir.parent / "no-such-bin"
    with pytest.raises(RuntimeError):
        server.start()
    root = server.tmp_dir
    server.destroy()
    server.destroy()
    assert not root.exists()
