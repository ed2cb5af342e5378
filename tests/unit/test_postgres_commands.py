"""Pure parts of the PostgreSQL job: command builders, version choice, statistics comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from kkua_backupd.config import PostgresConfig
from kkua_backupd.sources.postgres import client as pg_client
from kkua_backupd.sources.postgres import load as pg_load
from kkua_backupd.sources.postgres import stats as pg_stats

PG = PostgresConfig(host="db", port=5433, database="kkua", user="app", password=SecretStr("pw-xyzzy"))
BIN = Path("/usr/lib/postgresql/15/bin")


def test_pg_dump_plain_argv_has_no_password_and_drops_before_create() -> None:
    argv = pg_client.pg_dump_argv(BIN, PG, dbname="kkua", fmt="plain", snapshot="00000003-1")
    assert argv[0] == "/usr/lib/postgresql/15/bin/pg_dump"
    assert argv[1:3] == ("--host", "db")
    assert "--no-password" in argv
    assert {"--format=plain", "--clean", "--if-exists", "--snapshot=00000003-1"} <= set(argv)
    assert not any("pw-xyzzy" in a for a in argv)


def test_pg_dump_custom_is_uncompressed_for_our_pipeline() -> None:
    argv = pg_client.pg_dump_argv(BIN, PG, dbname="kkua", fmt="custom")
    assert {"--format=custom", "--compress=0"} <= set(argv)
    assert not any(a.startswith("--snapshot") for a in argv)


def test_psql_stops_on_the_first_error_and_reads_stdin() -> None:
    argv = pg_client.psql_argv(BIN, PG, "kkua")
    assert argv[-4:] == ("--set", "ON_ERROR_STOP=1", "--file", "-")
    assert "--no-psqlrc" in argv


def test_parallel_pg_restore_argv() -> None:
    argv = pg_client.pg_restore_argv(BIN, PG, "new_db", Path("/b/x.dump"), 4)
    assert "--jobs=4" in argv
    assert "--exit-on-error" in argv
    assert argv[-1] == "/b/x.dump"


def test_password_travels_only_in_the_child_environment() -> None:
    env = pg_client.child_env(PG)
    assert env["PGPASSWORD"] == "pw-xyzzy"
    assert "PGPASSWORD" not in pg_client.child_env(PostgresConfig())


def test_parse_tool_version() -> None:
    assert pg_client.parse_tool_version("pg_dump (PostgreSQL) 15.19 (Debian 15.19-0+deb12u1)") == 15
    assert pg_client.parse_tool_version("pg_dump (PostgreSQL) 9.6.24") == 9
    assert pg_client.parse_tool_version("nonsense") is None


def test_choose_bin_dir_prefers_same_major_then_oldest_newer() -> None:
    dirs = {13: Path("/13"), 15: Path("/15"), 16: Path("/16"), 17: Path("/17")}
    assert pg_client.choose_bin_dir(15, dirs) == Path("/15")
    assert pg_client.choose_bin_dir(14, dirs) == Path("/15")
    assert pg_client.choose_bin_dir(18, dirs) is None


def test_compare_stats_reports_each_difference() -> None:
    expected = {"public.a": {"rows": 3, "checksum": "1"}, "public.b": {"rows": 1}, "public.c": {"rows": 0}}
    found = {"public.a": {"rows": 3, "checksum": "2"}, "public.b": {"rows": 2}, "public.d": {"rows": 0}}
    assert pg_stats.compare_stats(expected, found) == [
        "public.c: missing",
        "public.d: not in the backup",
        "public.a: content differs (3 rows)",
        "public.b: 2 rows, expected 1",
    ]
    assert pg_stats.compare_stats(expected, expected) == []


def test_connection_errors_say_what_to_check() -> None:
    err = pg_client.connection_error(PG, "kkua", Exception(
        'connection to server at "db" (10.0.0.1), port 5433 failed: FATAL:  password authentication failed '
        'for user "app"'))
    assert "refused user 'app'" in str(err)
    assert "password_file" in str(err)
    err = pg_client.connection_error(PG, "nope", Exception('FATAL:  database "nope" does not exist'))
    assert "database 'nope' does not exist" in str(err)
    err = pg_client.connection_error(PG, "kkua", Exception(
        'connection to server at "db" (10.0.0.1), port 5433 failed: Connection refused'))
    assert str(err).startswith("cannot reach PostgreSQL at db:5433: Connection refused")


@pytest.mark.parametrize(("version", "has"), [
    ("psql (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)", True),
    ("psql (PostgreSQL) 15.14", True),
    ("psql (PostgreSQL) 15.13", False),
    ("psql (PostgreSQL) 13.22", True),
    ("psql (PostgreSQL) 13.21", False),
    ("psql (PostgreSQL) 14.19", True),
    ("psql (PostgreSQL) 14.18", False),
    ("psql (PostgreSQL) 16.10", True),
    ("psql (PostgreSQL) 16.9", False),
    ("psql (PostgreSQL) 17.6", True),
    ("psql (PostgreSQL) 17.5", False),
    ("psql (PostgreSQL) 18.0", True),
    ("psql (PostgreSQL) 18beta1", True),
    ("psql (PostgreSQL) 19devel", True),
    ("psql (PostgreSQL) 12.22", False),
    ("not psql", False),
])
def test_which_psql_has_restrict(version: str, has: bool) -> None:
    assert pg_load.supports_restrict(version) is has


def test_restrict_frame_opens_before_the_file_and_closes_after_it() -> None:
    first, last = pg_load.restrict_frame("abc123")
    assert first == b"\\restrict abc123\n"
    assert last == b"\n\\unrestrict abc123\n"  # on a line of its own whatever the SQL ended with
    with pytest.raises(ValueError, match="letters and digits"):
        pg_load.restrict_frame("abc 123\n\\! id")
