"""What a database holds: its user tables with row counts (and checksums), the roles a dump names, and the
objects and lock slots a restore in one transaction needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kkua_backupd.sources.postgres.manifest import PostgresDetails, TableStats

# Every user table (not system, not owned by an extension): what counts and checksums cover.
USER_TABLES = """
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
"""
TABLES_SQL = f"SELECT n.nspname, c.relname {USER_TABLES} ORDER BY 1, 2"

# Roles the dump will name (object owners and grantees): a restore onto a server without them fails, so
# the manifest records them and a restore checks for them before it changes anything.
ROLES_SQL = """
WITH objs(owner, acl) AS (
  SELECT c.relowner, c.relacl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT nspowner, nspacl FROM pg_namespace
   WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT p.proowner, p.proacl FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  UNION ALL
  SELECT t.typowner, t.typacl FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
)
SELECT DISTINCT r.rolname
FROM (SELECT owner AS oid FROM objs
      UNION SELECT (aclexplode(acl)).grantee FROM objs WHERE acl IS NOT NULL) x
JOIN pg_roles r ON r.oid = x.oid
ORDER BY 1
"""

# Objects a restore locks one by one in its transaction (dropping the old ones, creating the new):
# relations, their TOAST tables and indexes, types, constraints, functions, large objects.
OBJECTS_SQL = """
SELECT (SELECT count(*) + 2 * count(*) FILTER (WHERE c.reltoastrelid <> 0) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_largeobject_metadata)
"""

# The size of the server's shared lock table: max_locks_per_transaction x (backends + prepared xacts).
LOCK_SETTINGS = ("max_locks_per_transaction", "max_connections", "autovacuum_max_workers",
                 "max_worker_processes", "max_wal_senders", "max_prepared_transactions")


def lock_capacity(conn: psycopg.Connection) -> tuple[int, dict[str, int]]:
    """(lock slots the server has for all sessions together, the settings that size it)."""
    values = {name: int(str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]))  # type: ignore[index]
              for name in LOCK_SETTINGS}
    backends = (values["max_connections"] + values["autovacuum_max_workers"] + 1
                + values["max_worker_processes"] + values["max_wal_senders"])
    return values["max_locks_per_transaction"] * (backends + values["max_prepared_transactions"]), values


def count_objects(conn: psycopg.Connection) -> int:
    return int(conn.execute(OBJECTS_SQL).fetchone()[0])  # type: ignore[index]




PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
STATS_BATCH = 100  # tables counted per transaction: each holds a lock on its tables until it ends
TABLE_KEYS = "quoted"  # details.table_keys of manifests whose table keys quote odd names


def table_key(schema: str, name: str, *, legacy: bool = False) -> str:
    """A table's key in manifests: `schema.table`, each part double-quoted (quotes doubled) unless it is
    a plain lower-case name, so `public."a.b"` and `"public.a".b` stay apart. Plain names read as
    before, so manifests written before keys were quoted (`legacy`: parts joined as they are) still match
    for them."""
    if legacy:
        return f"{schema}.{name}"

    def ident(part: str) -> str:
        return part if PLAIN_IDENT.fullmatch(part) else '"' + part.replace('"', '""') + '"'
    return f"{ident(schema)}.{ident(name)}"


def legacy_keys(details: PostgresDetails | None) -> bool:
    """Whether a manifest's table keys were written before they were quoted (a manifest without details
    says nothing: not legacy)."""
    return details is not None and bool(details.stored()) and details.table_keys != TABLE_KEYS


def table_stats(conn: psycopg.Connection, *, checksums: bool, snapshot: str | None = None,
                legacy: bool = False) -> dict[str, TableStats]:
    """Row count (and an order-independent content checksum) of every user table.

    Tables are counted STATS_BATCH at a time, each batch in a transaction of its own (importing
    `snapshot` when given), so the locks held at once stay few however many tables there are:
    pg_dump already holds one per table. `conn` must be in autocommit mode."""
    tables = [(str(a), str(b)) for a, b in conn.execute(TABLES_SQL).fetchall()]
    stats: dict[str, TableStats] = {}
    for first in range(0, len(tables), STATS_BATCH):
        batch = tables[first:first + STATS_BATCH]
        parts = []
        for schema, name in batch:
            ident = sql.Identifier(schema, name)
            if checksums:
                parts.append(sql.SQL("(SELECT ARRAY[count(*)::text, coalesce(sum(('x' || left(md5(t::text), 15))"
                                     "::bit(60)::bigint::numeric), 0)::text] FROM ONLY {} AS t)").format(ident))
            else:
                parts.append(sql.SQL("(SELECT ARRAY[count(*)::text] FROM ONLY {})").format(ident))
        query = sql.SQL("SELECT ") + sql.SQL(", ").join(parts)
        with conn.transaction():
            if snapshot:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            row = conn.execute(query).fetchone()
        assert row is not None
        for (schema, name), values in zip(batch, row, strict=True):
            entry = TableStats(rows=int(values[0]))
            if checksums:
                entry["checksum"] = values[1]
            stats[table_key(schema, name, legacy=legacy)] = entry
    return stats


# The row counts of a load, checked inside its transaction before the COMMIT (docs/decisions/0022): a
# table the SQL created in this transaction started empty, so the rows it holds are what the transaction
# inserted less what it deleted (the server's own per-transaction counters, which COPY adds to as it loads;
# no table is read again). A table that was already there when the SQL began (`LOADED_BEFORE_SQL`, run
# after the wipe: none with pg_dump's sets) is counted. When what the tables hold differs from the
# manifest, the transaction fails with ROW_COUNTS_TAG and the differing entries, as JSON, in its message.
# Keys as `table_stats` makes them, in its order (for legacy keys that collide, the last table wins there too).
ROW_COUNTS_TAG = "kkua-row-counts"
LOADED_BEFORE_SQL = ("CREATE TEMP TABLE kkua_restore_before ON COMMIT DROP AS "
                     "SELECT oid FROM pg_catalog.pg_class WHERE relkind = 'r';\n")
_KEY_PART = ("CASE WHEN {part} ~ '^[a-z_][a-z0-9_]*$' THEN {part}::text "
             "ELSE '\"' || pg_catalog.replace({part}::text, '\"', '\"\"') || '\"' END")
_ROW_COUNTS_SQL = """
DO $kkua_counts$
DECLARE
  want jsonb := {expected}::jsonb;
  got jsonb;
  t record;
  rows_now bigint;
BEGIN
  SELECT coalesce(pg_catalog.jsonb_object_agg({key}, pg_catalog.pg_stat_get_xact_tuples_inserted(c.oid)
                                                     - pg_catalog.pg_stat_get_xact_tuples_deleted(c.oid)
                                            ORDER BY n.nspname, c.relname), '{{}}')
    INTO got {tables};
  FOR t IN SELECT c.oid, n.nspname, c.relname, {key} AS key {tables}
             AND c.oid IN (SELECT b.oid FROM pg_temp.kkua_restore_before b) ORDER BY n.nspname, c.relname LOOP
    EXECUTE pg_catalog.format('SELECT count(*) FROM ONLY %I.%I', t.nspname, t.relname) INTO rows_now;
    got := pg_catalog.jsonb_set(got, ARRAY[t.key], pg_catalog.to_jsonb(rows_now));
  END LOOP;
  IF got <> want THEN
    RAISE EXCEPTION USING MESSAGE = '{tag} ' || pg_catalog.jsonb_build_object(
      'expected', (SELECT coalesce(pg_catalog.jsonb_object_agg(e.key, e.value), '{{}}')
                     FROM pg_catalog.jsonb_each(want) e WHERE got -> e.key IS DISTINCT FROM e.value),
      'found', (SELECT coalesce(pg_catalog.jsonb_object_agg(f.key, f.value), '{{}}')
                  FROM pg_catalog.jsonb_each(got) f WHERE want -> f.key IS DISTINCT FROM f.value))::text;
  END IF;
END
$kkua_counts$;
"""


@dataclass
class RowCheck:
    """The tables and row counts a manifest recorded, for a load to check before its COMMIT (`check_sql`);
    `checked` is set once a load ran the check and committed."""

    expected: Mapping[str, TableStats]
    legacy: bool = False
    checked: bool = False

    def check_sql(self, nonce: str) -> str:
        """The statement that fails the transaction when its tables differ from `expected` (its keys as
        `table_key` writes them, its rows); `nonce` (letters and digits) makes the literal's quote."""
        if not re.fullmatch(r"[A-Za-z0-9]+", nonce):
            raise ValueError("a nonce is letters and digits")
        if self.legacy:
            key = "n.nspname::text || '.' || c.relname::text"
        else:
            key = _KEY_PART.format(part="n.nspname") + " || '.' || " + _KEY_PART.format(part="c.relname")
        quote = f"$kkua_expected_{nonce}$"
        literal = quote + json.dumps({k: int(v["rows"]) for k, v in self.expected.items()}) + quote
        return _ROW_COUNTS_SQL.format(expected=literal, key=key, tables=USER_TABLES.strip(), tag=ROW_COUNTS_TAG)

    def totals(self) -> tuple[int, int]:
        """(tables, rows) the manifest recorded: what a load that passed `check_sql` holds."""
        return len(self.expected), sum(int(t["rows"]) for t in self.expected.values())


def row_count_differences(lines: Iterable[str]) -> list[str] | None:
    """The differences (as `compare_stats` words them) named by a failed `RowCheck.check_sql` in the
    server's error `lines` (psql's stderr), or None when none of them is that check's."""
    for line in lines:
        at = line.find(ROW_COUNTS_TAG + " {")
        if at < 0:
            continue
        try:
            doc = json.loads(line[at + len(ROW_COUNTS_TAG):])
            expected = {str(k): TableStats(rows=int(v)) for k, v in doc["expected"].items()}
            found = {str(k): TableStats(rows=int(v)) for k, v in doc["found"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return ["the tables' row counts differ from the backup (the server's list of them was unreadable)"]
        return compare_stats(expected, found)
    return None


def referenced_roles(conn: psycopg.Connection) -> list[str]:
    """Roles that own or are granted something in the database (what the dump's OWNER/GRANT lines name)."""
    return [str(row[0]) for row in conn.execute(ROLES_SQL).fetchall()]


def missing_roles(conn: psycopg.Connection, roles: list[str]) -> list[str]:
    """Which of `roles` the server does not have."""
    if not roles:
        return []
    present = {str(r[0]) for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                               (roles,)).fetchall()}
    return [r for r in roles if r not in present]


def compare_stats(expected: Mapping[str, TableStats], found: Mapping[str, TableStats]) -> list[str]:
    """Differences between two table_stats results, one readable line each (empty when equal)."""
    problems = []
    for table in sorted(set(expected) - set(found)):
        problems.append(f"{table}: missing")
    for table in sorted(set(found) - set(expected)):
        problems.append(f"{table}: not in the backup")
    for table in sorted(set(expected) & set(found)):
        want, got = expected[table], found[table]
        if want.get("rows") != got.get("rows"):
            problems.append(f"{table}: {got.get('rows')} rows, expected {want.get('rows')}")
        elif want.get("checksum") and got.get("checksum") and want["checksum"] != got["checksum"]:
            problems.append(f"{table}: content differs ({got['rows']} rows)")
    return problems
