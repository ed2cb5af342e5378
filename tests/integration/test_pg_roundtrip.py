"""Round trips through the real CLI against a real PostgreSQL: back up, damage, restore, compare
every table's content and the whole schema, for every format and compression."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.sandbox import schema_dump, table_contents
from kkua_backupd.sources.postgres.stats import LOADED_BEFORE_SQL, RowCheck, row_count_differences, table_stats

from ..conftest import Env

COMBOS = [(fmt, comp) for fmt in ("plain", "custom") for comp in ("gzip", "zstd", "none")]


def damage(env: Env) -> None:
    """Change data and schema the way a bad deploy or a mistaken query would."""
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 3 = 0")
        conn.execute("UPDATE users SET nickname = nickname || '-x'")
        conn.execute("ALTER TABLE games ADD COLUMN note text")
        conn.execute("DROP VIEW game_summary")
        conn.execute("CREATE TABLE after_backup (id int REFERENCES users (id))")
        conn.execute("INSERT INTO after_backup VALUES (1)")
        conn.execute("SELECT setval('game_no_seq', 99999)")


@pytest.mark.parametrize(("fmt", "compression"), COMBOS)
def test_backup_damage_restore_is_exact(env: Env, fmt: str, compression: str) -> None:
    env.write_config(format=fmt, compression=compression)
    with env.connect() as conn:
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)

    result = env.run("--json", "backup", "postgres", check=True)
    manifest = json.loads(result.stdout)
    data_file = env.folder / manifest["files"][0]["name"]
    ext = {"gzip": ".gz", "zstd": ".zst", "none": ""}[compression]
    assert data_file.name.endswith((".sql" if fmt == "plain" else ".dump") + ext)
    assert data_file.name.startswith("kkua_backup_")
    assert oct(data_file.stat().st_mode & 0o777) == oct(0o640)
    assert oct(env.folder.stat().st_mode & 0o777) == oct(0o750)
    assert manifest["details"]["tables"]["public.users"]["rows"] == len(before["public.users"])

    damage(env)
    restore = env.run("--json", "restore", "postgres", "latest", "--force", check=True)
    report = json.loads(restore.stdout)
    assert report["verified"] is True
    assert report["safety_backup"]["file"].startswith("safety_backup_before_restore_")

    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before


@pytest.mark.parametrize("fmt", ["plain", "custom"])
def test_restore_into_a_new_database_leaves_the_original_alone(env: Env, fmt: str) -> None:
    env.write_config(format=fmt, compression="zstd")
    env.run("backup", "postgres", check=True)
    damage(env)
    with env.connect() as conn:
        damaged = table_contents(conn)
    copy = f"{env.database}_copy"
    env.run("restore", "postgres", "latest", "--target-db", copy, check=True)
    with env.connect() as conn:
        assert table_contents(conn) == damaged
    with env.server.connect(copy) as conn:
        restored = table_contents(conn)
    assert "public.after_backup" not in restored
    assert len(restored["public.game_words"]) > len(damaged["public.game_words"])


def test_plain_backup_restores_by_hand_with_gunzip_and_psql(env: Env) -> None:
    """The guide's manual procedure works on our files: gunzip -c FILE | psql, into an existing database."""
    env.run("backup", "postgres", check=True)
    with env.connect() as conn:
        before = table_contents(conn)
    damage(env)
    with env.connect() as conn:
        conn.execute("DROP TABLE after_backup")  # --clean cannot know a table made after the backup
        conn.execute("ALTER TABLE games DROP COLUMN note")
    data_file = next(env.folder.glob("kkua_backup_*.sql.gz"))
    psql = [str(env.server.bin_dir / "psql"), "-h", env.server.host, "-p", str(env.server.port), "-U", "postgres",
            "-d", env.database, "-q", "-v", "ON_ERROR_STOP=1"]
    gunzip = subprocess.Popen(["gunzip", "-c", str(data_file)], stdout=subprocess.PIPE)
    proc = subprocess.run(psql, stdin=gunzip.stdout, capture_output=True, text=True,
                          env=dict(os.environ, PGPASSWORD=env.server.password), check=False)
    assert gunzip.wait() == 0
    assert proc.returncode == 0, proc.stderr
    with env.connect() as conn:
        assert table_contents(conn) == before


def test_test_restore_compares_content_and_is_recorded(env: Env) -> None:
    result = env.run("--json", "backup", "postgres", "--test-restore", check=True)
    outcome = json.loads(result.stdout)["details"]["test_restore"]
    assert outcome["ok"] is True
    assert outcome["checksums"] is True
    assert outcome["tables"] >= 6
    with env.server.connect("postgres") as conn:  # the scratch database is gone
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'kkua_backup_test_%'").fetchall()
    assert left == []


def test_test_restore_env_variable(env: Env) -> None:
    result = env.run("--json", "run", "postgres", env={"TEST_RESTORE": "true"}, check=True)
    assert json.loads(result.stdout)["details"]["test_restore"]["ok"] is True


def make_unrestorable(env: Env) -> None:
    """A CHECK constraint that reads another table: valid in the live database, but pg_dump loads
    aa_refs before users, so any restore of it fails half way (a classic pg_dump pitfall)."""
    with env.connect() as conn:
        conn.execute("CREATE FUNCTION has_user(int) RETURNS boolean LANGUAGE sql STABLE "
                     "AS 'SELECT EXISTS (SELECT 1 FROM public.users WHERE id = $1)'")
        conn.execute("CREATE TABLE aa_refs (user_id int CHECK (public.has_user(user_id)))")
        conn.execute("INSERT INTO aa_refs SELECT id FROM users LIMIT 5")


def test_failed_test_restore_marks_the_set_failed(env: Env) -> None:
    make_unrestorable(env)
    result = env.run("--json", "backup", "postgres", "--test-restore")
    assert result.returncode == 1
    assert "test restore failed" in result.stdout
    listing = json.loads(env.run("--json", "list", "postgres", check=True).stdout)
    assert [s["status"] for s in listing] == ["failed"]
    latest = env.run("restore", "postgres", "latest", "--force")
    assert latest.returncode == 2
    assert "no complete postgres backup" in latest.stdout + latest.stderr
    with env.server.connect("postgres") as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'kkua_backup_test_%'").fetchall()
    assert left == []


def test_failed_in_place_restore_rolls_back_everything(env: Env) -> None:
    make_unrestorable(env)
    env.run("backup", "postgres", check=True)
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id < 100")
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "rolled back" in output
    assert "still holds its previous data" in output
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before


def test_restore_creates_a_missing_database(env: Env) -> None:
    """Full data loss: the database itself is gone; restore makes it again."""
    env.run("backup", "postgres", check=True)
    with env.connect() as conn:
        before = table_contents(conn)
    env.server.drop_database(env.database)
    env.run("restore", "postgres", "latest", check=True)  # nothing to overwrite, so no question
    with env.connect() as conn:
        assert table_contents(conn) == before


def test_logs_are_written_where_the_guide_says(env: Env) -> None:
    env.run("backup", "postgres", check=True)
    env.run("restore", "postgres", "latest", "--force", check=True)
    backup_log = (env.log_dir / "backup.log").read_text()
    restore_log = (env.log_dir / "restore.log").read_text()
    assert "[INFO] backup finished" in backup_log
    assert "[INFO] restore finished" in restore_log
    assert oct(env.log_dir.stat().st_mode & 0o777) == oct(0o750)


def test_journald_format_under_systemd(env: Env) -> None:
    result = env.run("backup", "postgres", env={"JOURNAL_STREAM": "8:12345"}, check=True)
    lines = result.stdout.splitlines()
    assert lines
    assert all(line.startswith("<") and line[2] == ">" for line in lines)
    assert any(line.startswith("<6>backup finished") for line in lines)


def test_verify_and_list(env: Env, tmp_path: Path) -> None:
    env.run("backup", "postgres", check=True)
    env.write_config(format="custom", compression="zstd")
    env.run("backup", "postgres", check=True)
    listing = json.loads(env.run("--json", "list", check=True).stdout)
    assert len(listing) == 2
    assert listing[0]["created_at"] >= listing[1]["created_at"]
    assert listing[0]["files"][0]["name"].endswith(".dump.zst")
    verified = json.loads(env.run("--json", "verify", "all", "--restore-test", check=True).stdout)
    assert [r["ok"] for r in verified] == [True, True]
    assert all(r["restore_test"]["ok"] for r in verified)


def test_manifests_of_older_versions_list_verify_and_restore(env: Env) -> None:
    """The details a backup writes have main's keys in main's order; a set whose manifest predates
    `table_keys`, `roles`, `objects` and the test restore's `ran` (and carries a field of a newer version)
    still lists as ok, verifies with a test restore and restores, and keeps that field when rewritten; details
    of a shape no version wrote are refused by name, before anything changes."""
    written = json.loads(env.run("--json", "backup", "postgres", "--test-restore", check=True).stdout)
    details = written["details"]
    assert list(details) == ["database", "format", "compression", "server_version", "pg_dump_version",
                             "uncompressed_bytes", "table_keys", "objects", "tables", "roles", "test_restore"]
    assert list(details["test_restore"]) == ["ok", "ran", "database", "error", "problems", "tables", "rows",
                                             "checksums", "seconds"]
    assert list(details["tables"]["public.users"]) == ["rows", "checksum"]
    path = next(env.folder.glob("*.manifest.json"))
    assert json.loads(path.read_text()) == written
    old = json.loads(path.read_text())
    for key in ("table_keys", "roles", "objects"):
        del old["details"][key]
    del old["details"]["test_restore"]["ran"]
    old["details"]["jobs"] = 4  # from a newer version
    path.write_text(json.dumps(old, indent=2))
    listing = env.run("list", "postgres", check=True).stdout
    assert " ok " in listing and "unverified" not in listing
    verified = json.loads(env.run("--json", "verify", "latest", "--restore-test", check=True).stdout)
    assert [(r["ok"], r["restore_test"]["ok"]) for r in verified] == [(True, True)]
    copy = f"{env.database}_old_manifest"
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--target-db", copy, "--force",
                                check=True).stdout)
    assert list(report) == ["kind", "file", "id", "database", "format", "compression", "check", "load_seconds",
                            "tables", "rows", "problems", "verified", "seconds"]
    assert report["verified"] is True and report["problems"] == [] and report["database"] == copy
    assert json.loads(path.read_text())["details"]["jobs"] == 4
    old["details"]["tables"]["public.users"]["rows"] = "many"
    path.write_text(json.dumps(old, indent=2))
    refused = env.run("restore", "postgres", "latest", "--target-db", f"{copy}_2", "--force")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "details.tables.public.users.rows" in refused.stdout + refused.stderr
    assert env.run("list", "postgres", check=True).returncode == 0


def test_a_trusted_custom_set_restores_in_one_pass_and_a_corrupt_one_keeps_the_old_data(env: Env) -> None:
    """A custom set made here is read once: streamed through pg_restore into the one transaction in place,
    unpacked and checked before pg_restore -j reads it into a new database. A byte flipped in the file stops
    the load before its COMMIT: the old data stays, exit 3, no safety backup left, a new database dropped."""
    env.write_config(format="custom", compression="zstd", restore_jobs=2)
    with env.connect() as conn:
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)

    damage(env)
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--force", check=True).stdout)
    assert report["check"]["mode"] == "one pass", report["check"]
    assert [(f["name"], f["sha256"]) for f in report["check"]["files"]] == \
        [(f["name"], f["sha256"]) for f in manifest["files"]]
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before
    copy = f"{env.database}_copy"
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--target-db", copy, check=True).stdout)
    assert report["check"]["mode"] == "one pass", report["check"]
    with env.server.connect(copy) as conn:
        assert table_contents(conn) == before

    path = env.folder / manifest["files"][0]["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    damage(env)
    with env.connect() as conn:
        damaged = table_contents(conn)
    schema_damaged = schema_dump(env.server, env.database)
    sets_before = sorted(p.name for p in env.folder.iterdir())
    result = env.run("restore", "postgres", "latest", "--force")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "checksum" in result.stdout + result.stderr or "corrupt" in result.stdout + result.stderr
    with env.connect() as conn:
        assert table_contents(conn) == damaged
    assert schema_dump(env.server, env.database) == schema_damaged
    assert sorted(p.name for p in env.folder.iterdir()) == sets_before  # no safety backup left, nothing else
    result = env.run("restore", "postgres", "latest", "--target-db", f"{env.database}_bad")
    assert result.returncode == 3, result.stdout + result.stderr
    with env.server.connect("postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"{env.database}_bad",)).fetchone() \
            is None
def test_plain_load_checks_its_row_counts_before_its_commit(env: Env) -> None:
    """A plain set loaded in one transaction compares its tables with the manifest inside the transaction
    (docs/decisions/0022), so nothing is counted after the COMMIT; the report carries the manifest's tables
    and rows, as a count after would. A custom set restored with pg_restore -j is still counted after."""
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    tables = manifest["details"]["tables"]
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--force", check=True).stdout)
    assert report["check"]["mode"] == "one pass"
    assert (report["tables"], report["rows"]) == (len(tables), sum(t["rows"] for t in tables.values()))
    assert report["verified"] is True and report["problems"] == []
    log = (env.log_dir / "restore.log").read_text()
    assert log.count("row counts checked before the COMMIT") == 1

    env.write_config(format="custom", restore_jobs=2)
    env.run("backup", "postgres", check=True)
    copy = f"{env.database}_custom"
    report = json.loads(env.run("--json", "restore", "postgres", "latest", "--target-db", copy, "--force",
                                check=True).stdout)
    assert report["verified"] is True and report["tables"] == len(tables)
    assert (env.log_dir / "restore.log").read_text().count("row counts checked before the COMMIT") == 1
    env.server.drop_database(copy)


def edit_manifest_tables(env: Env, manifest: dict[str, Any]) -> int:
    """Make the set's manifest record a table more, one less and a row more than its SQL makes; returns the
    users table's real row count."""
    path = env.folder / f"kkua_backup_{manifest['id']}.manifest.json"
    data = json.loads(path.read_text())
    users = int(data["details"]["tables"]["public.users"]["rows"])
    data["details"]["tables"]["public.users"]["rows"] = users + 1
    data["details"]["tables"]["public.ghost"] = {"rows": 0}
    del data["details"]["tables"]["public.games"]
    path.write_text(json.dumps(data, indent=2))
    return users


@pytest.mark.parametrize(("fmt", "into"), [("plain", "in-place"), ("plain", "new-database"),
                                           ("custom", "in-place"), ("directory", "in-place")])
def test_row_counts_that_differ_from_the_manifest_roll_the_load_back(env: Env, fmt: str, into: str) -> None:
    """A set whose SQL does not make the tables and rows its manifest records (here the manifest was edited
    after the backup: a table more, one less, a row more) is refused before the COMMIT: each difference is
    named, exit 1, and the database keeps what it held (a new one is dropped again). Before 0022 the same
    set was committed and then reported as differing. Every load in one transaction checks it, whatever
    reads the set (psql for plain, pg_restore's SQL for custom, the streamed COPYs for directory); a plain set
    goes into a new database in one transaction with one restore job (with more, see the test below)."""
    env.write_config(format=fmt, restore_jobs=1)
    manifest = json.loads(env.run("--json", "backup", "postgres", check=True).stdout)
    users = edit_manifest_tables(env, manifest)
    with env.connect() as conn:
        conn.execute("DELETE FROM game_words WHERE id % 3 = 0")
        before = table_contents(conn)
    schema_before = schema_dump(env.server, env.database)
    copy = f"{env.database}_differs"
    target = ("--target-db", copy) if into == "new-database" else ()

    result = env.run("restore", "postgres", "latest", "--force", *target)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert (f"the loaded tables differ from the backup: public.ghost: missing; public.games: not in the backup; "
            f"public.users: {users} rows, expected {users + 1}; the load stopped before its COMMIT") in out
    assert "the backup's SQL does not make the tables its manifest records" in out  # the hint
    log = (env.log_dir / "restore.log").read_text()
    assert "checking the set while it loads (one pass)" in log
    assert log.count("restored data differs from the backup") == 3
    assert "restore finished" not in log
    with env.connect() as conn:
        assert table_contents(conn) == before
    assert schema_dump(env.server, env.database) == schema_before
    if into == "new-database":
        assert "was dropped again" in out
        with env.server.connect() as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (copy,)).fetchone() is None
    else:
        assert "still holds its previous data" in out


def test_row_counts_that_differ_after_a_load_over_several_connections_fail_the_restore(env: Env) -> None:
    """A plain set into a new database with restore_jobs > 1 is loaded statement by statement over several
    connections (decision 0026), so its tables are counted after the load, as pg_restore -j's are: each
    difference named, exit 1, the new database kept for inspection and the original untouched."""
    env.write_config(restore_jobs=2)
    users = edit_manifest_tables(env, json.loads(env.run("--json", "backup", "postgres", check=True).stdout))
    with env.connect() as conn:
        before = table_contents(conn)
    copy = f"{env.database}_split_differs"
    try:
        result = env.run("restore", "postgres", "latest", "--force", "--target-db", copy)
        out = result.stdout + result.stderr
        assert result.returncode == 1, out
        assert (f"finished, but the result differs from the backup: public.ghost: missing; public.games: not in "
                f"the backup; public.users: {users} rows, expected {users + 1}") in out
        assert "the original database was not touched" in out and "safety backup" not in out
        assert (env.log_dir / "restore.log").read_text().count("restored data differs from the backup") == 3
        with env.connect() as conn:
            assert table_contents(conn) == before
    finally:
        env.server.drop_database(copy)


def test_row_check_counts_from_the_transaction_and_names_each_difference(env: Env) -> None:
    """The check itself, run by psql as a restore runs it: tables the SQL creates are counted from the
    transaction's own counters (COPY and INSERT add, DELETE takes away), a table that was there before the
    SQL began is counted with count(*), odd names are keyed as the manifest keys them, legacy keys joined as
    they are; a difference fails the transaction with every differing table, and nothing is kept."""
    body = r'''
SELECT pg_catalog.set_config('search_path', '', false);
CREATE SCHEMA "스키마 ""q""";
CREATE TABLE "스키마 ""q""".t (a int);
CREATE TABLE public."a.b" (a int);
COPY "스키마 ""q""".t (a) FROM stdin;
1
2
3
\.
INSERT INTO public."a.b" VALUES (1), (2);
DELETE FROM "스키마 ""q""".t WHERE a = 1;
INSERT INTO public.kept VALUES (3);
'''

    def run(expected: dict[str, int], *, legacy: bool = False) -> tuple[int, str]:
        check = RowCheck({k: {"rows": v} for k, v in expected.items()}, legacy=legacy).check_sql("t1")
        script = ("BEGIN;\nCREATE TABLE public.kept (a int);\nINSERT INTO public.kept VALUES (1), (2);\n"
                  + LOADED_BEFORE_SQL + body + check + "COMMIT;\n")
        done = subprocess.run([str(env.server.bin_dir / "psql"), "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1",
                               "--host", "127.0.0.1", "--port", str(env.server.port), "--username", "postgres",
                               "--dbname", env.database, "--file", "-"],
                              input=script.encode(), capture_output=True,
                              env=dict(os.environ, PGPASSWORD=env.server.password), check=False)
        return done.returncode, done.stderr.decode()

    with env.connect() as conn:
        sample = {key: t["rows"] for key, t in table_stats(conn, checksums=False).items()}
    right = {**sample, "public.kept": 3, '"스키마 ""q""".t': 2, 'public."a.b"': 2}
    wrong = {**right, "public.kept": 2, '"스키마 ""q""".t': 3, "public.gone": 0}
    del wrong['public."a.b"']
    rc, err = run(wrong)
    assert rc == 3
    assert row_count_differences(err.splitlines()) == [
        "public.gone: missing", 'public."a.b": not in the backup', '"스키마 ""q""".t: 2 rows, expected 3',
        "public.kept: 3 rows, expected 2"]
    with env.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.kept')").fetchone() == (None,)  # nothing kept
    legacy = {k.replace('"스키마 ""q""".t', '스키마 "q".t').replace('public."a.b"', "public.a.b"): v
              for k, v in right.items()}
    assert run(legacy, legacy=True) == (0, "")
    with env.connect() as conn:
        conn.execute("DROP TABLE public.kept, public.\"a.b\"")
        conn.execute('DROP SCHEMA "스키마 ""q""" CASCADE')
    assert run(right) == (0, "")
