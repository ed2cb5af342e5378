"""The SQL stream follower used by PostgreSQL restores and checks (kkua_backupd.sources.postgres.pg_sql)."""

from __future__ import annotations

import random

import pytest

from kkua_backupd.sources.postgres.pg_sql import MetaCommandRefused, SqlStream
from kkua_backupd.sources.postgres.stats import table_key

CASES = [
    b"COPY t FROM stdin;\n1\n\\.\n",
    b"BEGIN;\nSELECT pg_catalog.lo_open('1', 1);\nSELECT pg_catalog.lowrite(0, '\\x41;42');\nCOMMIT;\n",
    b"CREATE FUNCTION f() RETURNS void AS $$\nBEGIN;\nCOMMIT;\n$$ LANGUAGE plpgsql;\n",
    b"SELECT 1",
    b"COPY t FROM stdin;\n1\n2",
    b"SELECT E'it\\'s;' ; SELECT 'a''b;';\n",
    b"\\restrict abc\nSELECT 1;\n\\unrestrict abc\n",
    b"/* c ; /* n */ ; */ SELECT 1;\n-- PostgreSQL database dump complete\n",
    b"COPY t (a, b) FROM stdin;\n\\.\nCOPY u FROM stdin;\nx\n\\.\r\n",
    b"COPY t FROM stdin;\nCOMMIT;\n\\\\.\n\\.\nSELECT 'x\n;COMMIT;\n';\n",
    b"COPY t FROM stdin;\na\\N\n\\.x\n\\N\t\\\\.\n\\\n\\.\r\nSELECT 1;\nCOPY u FROM stdin;\n\\.",
]


def run(data: bytes, step: int | None = None) -> tuple[SqlStream, bytes]:
    stream = SqlStream()
    out = b""
    for i in range(0, len(data), step or max(1, len(data))):
        out += stream.feed(data[i:i + (step or len(data))])
    return stream, out + stream.finish()


@pytest.mark.parametrize("data", CASES)
def test_any_chunking_gives_the_same_stream(data: bytes) -> None:
    whole, out = run(data)
    for step in (1, 2, 3, 7):
        parts, out2 = run(data, step)
        assert out2 == out
        assert (parts.problems, parts.pending, parts.copies, parts.folded, parts.line_no, parts.truncated) == \
            (whole.problems, whole.pending, whole.copies, whole.folded, whole.line_no, whole.truncated)


def test_copy_data_passes_unchanged_and_nothing_is_pending() -> None:
    stream, out = run(CASES[0])
    assert out == CASES[0]
    assert (stream.copies, stream.pending, stream.problems) == (1, False, [])


def test_large_object_transaction_is_folded_but_keeps_its_lines() -> None:
    stream, out = run(CASES[1])
    assert stream.folded == 2 and stream.problems == []
    assert b"BEGIN;" not in out and b"COMMIT;" not in out
    assert out.count(b"\n") == CASES[1].count(b"\n")
    assert b"lowrite(0, '\\x41;42');" in out


def test_commit_inside_a_function_body_or_copy_data_is_left_alone() -> None:
    for data in (CASES[2], CASES[9]):
        stream, out = run(data)
        assert out == data and stream.folded == 0 and stream.problems == []


def test_a_commit_the_file_did_not_begin_is_a_problem() -> None:
    stream, out = run(b"INSERT INTO t VALUES (1);\nCOMMIT;\nSELECT 2;\n")
    assert out.count(b"COMMIT;") == 1
    assert stream.problems == ["line 2: COMMIT before the end of the SQL would end the restore's transaction early"]


def test_truncated_and_pending_streams() -> None:
    assert run(CASES[3])[0].pending is True
    truncated = run(CASES[4])[0].truncated
    assert truncated is not None and "inside the data of COPY t" in truncated
    assert "dollar-quoted" in str(run(b"CREATE FUNCTION f() AS $body$\nSELECT 1;\n")[0].truncated)


def test_meta_commands_other_than_restrict_are_refused() -> None:
    assert run(CASES[6])[0].problems == []
    with pytest.raises(MetaCommandRefused, match=r"\\!"):
        run(b"SELECT 1;\n\\! touch /tmp/x\n")
    stream = SqlStream(refuse_meta=False)
    stream.feed(b"\\connect other\n")
    assert "\\connect" in stream.problems[0]


def test_table_keys_never_collide() -> None:
    assert table_key("public", "users") == "public.users"
    assert table_key("public", "a.b") == 'public."a.b"'
    assert table_key("public.a", "b") == '"public.a".b'
    assert table_key("s", 'we"ird') == 's."we""ird"'
    assert table_key("public", "User") == 'public."User"'
    assert table_key("public", "a.b", legacy=True) == "public.a.b"


def test_a_restore_drops_pg_dumps_own_restrict_lines_and_nothing_else() -> None:
    """pg_dump 13.22+/14.19+/15.14+/16.10+/17.6+/18 wraps its dump in \\restrict KEY ... \\unrestrict KEY; a
    restore frames the whole stream in a \\restrict of its own, where a second one would be refused."""
    data = b"\\restrict abc\nSELECT 1;\nCOPY t FROM stdin;\n\\restrict x\n\\.\n\\unrestrict abc\n"
    for step in (None, 1, 3):
        stream = SqlStream(drop_restrict=True)
        out = b""
        for i in range(0, len(data), step or len(data)):
            out += stream.feed(data[i:i + (step or len(data))])
        out += stream.finish()
        # the line inside COPY data is data, not a command: it stays
        assert out == b"\nSELECT 1;\nCOPY t FROM stdin;\n\\restrict x\n\\.\n\n"
        assert stream.dropped == 2 and not stream.problems
    kept = SqlStream()
    assert kept.feed(data) + kept.finish() == data


def test_restrict_does_not_drop_the_statement_before_it_on_the_line() -> None:
    stream = SqlStream(drop_restrict=True)
    assert stream.feed(b"SELECT 1 \\restrict k\n;\n") + stream.finish() == b"SELECT 1 \n;\n"


FREEZE_DUMP = (b"SET search_path = '';\n"
               b"CREATE TABLE public.t (\n    id integer,\n    v text\n);\n"
               b"CREATE UNLOGGED TABLE public.\"odd T;\" (id integer);\n"
               b"CREATE TABLE \"sch \"\"q\"\"\".\"we\"\"ird;'name\" (id integer);\n"
               b"CREATE TABLE public.p (id integer, k integer)\nPARTITION BY RANGE (k);\n"
               b"CREATE TABLE public.p1 (id integer, k integer);\n"
               b"ALTER TABLE ONLY public.p ATTACH PARTITION public.p1 FOR VALUES FROM (0) TO (10);\n"
               b"COPY public.t (id, v) FROM stdin;\n1\tFROM stdin;\n\\.\n"
               b"COPY public.\"odd T;\" (id) FROM stdin;\n2\n\\.\n"
               b"COPY public.p (id, k) FROM stdin;\n3\t3\n\\.\n"
               b"COPY public.p1 (id, k) FROM stdin;\n4\t4\n\\.\n"
               b"COPY public.elsewhere (id) FROM stdin;\n5\n\\.\n"
               b"COPY \"sch \"\"q\"\"\".\"we\"\"ird;'name\" (id) FROM stdin;\n6\n\\.\n"
               b"COPY \"sch \"\"q\"\"\".\"weird;'name\" (id) FROM stdin;\n7\n\\.\n"
               b"COPY public.t (id, v) TO stdout;\n")


def freeze_run(data: bytes, step: int, *, freeze: bool = True) -> tuple[SqlStream, bytes]:
    stream = SqlStream(freeze_created=freeze, drop_restrict=True)
    out = b"".join(stream.feed(data[i:i + step]) for i in range(0, len(data), step))
    return stream, out + stream.finish()


@pytest.mark.parametrize("step", [1, 5, 64, 1 << 20])
def test_copy_of_a_table_the_stream_created_is_frozen(step: int) -> None:
    stream, out = freeze_run(FREEZE_DUMP, step)
    assert stream.frozen == 4 and stream.problems == [] and stream.copies == 7
    assert b"COPY public.t (id, v) FROM stdin WITH (FREEZE);\n1\tFROM stdin;\n\\.\n" in out
    assert b"COPY public.\"odd T;\" (id) FROM stdin WITH (FREEZE);\n" in out
    assert b"COPY public.p1 (id, k) FROM stdin WITH (FREEZE);\n" in out
    assert b"COPY \"sch \"\"q\"\"\".\"we\"\"ird;'name\" (id) FROM stdin WITH (FREEZE);\n" in out
    # a partitioned table, a table the stream did not create, and anything but COPY FROM stdin: unchanged
    assert b"COPY public.p (id, k) FROM stdin;\n" in out
    assert b"COPY public.elsewhere (id) FROM stdin;\n" in out
    assert b"COPY \"sch \"\"q\"\"\".\"weird;'name\" (id) FROM stdin;\n" in out  # another table's name
    assert out.endswith(b"COPY public.t (id, v) TO stdout;\n")
    assert out.replace(b" WITH (FREEZE)", b"") == FREEZE_DUMP


def test_no_freeze_outside_one_transaction_or_after_a_savepoint() -> None:
    stream, out = freeze_run(FREEZE_DUMP, 7, freeze=False)
    assert (stream.frozen, out) == (0, FREEZE_DUMP)
    copy = b"COPY public.t (id, v) FROM stdin;"
    after = FREEZE_DUMP.replace(copy, b"SAVEPOINT s;\n" + copy)
    stream, out = freeze_run(after, 7)
    assert (stream.frozen, out) == (0, after)


def test_copy_data_taken_whole_or_in_pieces_gives_the_same_stream() -> None:
    """Chunks that lie wholly inside COPY data are passed on as they are (`_inside_copy_data`); chunks of
    every size, cut anywhere (before, inside and right after a terminator, a backslash at a chunk's end),
    give the same stream, line count and problems as the whole stream read at once."""
    rng = random.Random(14)
    pieces = [b"a\tb\n", b"\\N\t\\\\.\n", b"x\\.y\n", b"\\\\\n", b"long " * 50 + b"\n", b"\r\n", b"\\.x\n",
              b"ab\\.\n", b"cd\\.\r\n", b"e\\"]
    for _ in range(200):
        blocks = []
        for table in range(rng.randint(1, 3)):
            rows = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
            blocks.append(b"COPY t%d FROM stdin;\n%s\\.%s" % (table, rows, rng.choice([b"\n", b"\r\n"])))
        ending = rng.choice([b"", b"SELECT 3;\n", b"COPY u FROM stdin;\n1\n\\"])
        data = b"SELECT 1;\n" + b"SELECT 2;\n".join(blocks) + ending
        whole, expected = run(data)
        stream = SqlStream()
        out, pos = b"", 0
        while pos < len(data):
            step = rng.choice([1, 2, 5, 17, 64, 300, 5000])
            out += stream.feed(data[pos:pos + step])
            pos += step
        out += stream.finish()
        assert out == expected
        assert (stream.problems, stream.line_no, stream.copies, stream.truncated) == \
            (whole.problems, whole.line_no, whole.copies, whole.truncated)


SPLIT_DUMP = (b"SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n"
              b"SELECT pg_catalog.set_config('search_path', '', false);\n"
              b"CREATE TABLE public.t (id integer, v text);\n\n--\n-- Data for Name: t; Type: TABLE DATA\n--\n\n"
              b"COPY public.t (id, v) FROM stdin;\n1\ta;b\n2\t\\\\.x\n\\.\n\n"
              b'CREATE TABLE public."we""ird" (x int);\nCOPY public."we""ird" (x) FROM stdin;\n7\n\\.\n'
              b"CREATE INDEX i ON public.t (v);\n")


def split_scan(data: bytes, step: int) -> tuple[SqlStream, bytes, dict[int, bytes]]:
    """The stream scanned for a split load in pieces of `step`: the scanner, its output, and the bytes its
    spans marked as each COPY's rows."""
    stream = SqlStream(fold_transactions=False, drop_restrict=True, sync_nonce="n0nce")
    out, rows = bytearray(), {}
    for piece in [*(data[i:i + step] for i in range(0, len(data), step)), None]:
        got = stream.feed(piece) if piece is not None else stream.finish()
        for start, end, number in stream.spans:
            rows[number] = rows.get(number, b"") + got[start:end]
        out += got
    return stream, bytes(out), rows


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1 << 20])
def test_a_split_load_gets_a_sync_before_each_copy_and_the_rows_of_each(step: int) -> None:
    stream, out, rows = split_scan(SPLIT_DUMP, step)
    sync = [b"SELECT 'kkua-sync-n0nce-%d';\n" % n for n in (1, 2)]
    assert out.replace(sync[0], b"").replace(sync[1], b"") == SPLIT_DUMP  # nothing else added or lost
    assert out.index(b"(id integer, v text);") < out.index(sync[0]) < out.index(b"COPY public.t")
    assert out.index(b'(x int);') < out.index(sync[1]) < out.index(b'COPY public."we""ird"')
    assert rows == {1: b"1\ta;b\n2\t\\\\.x\n", 2: b"7\n"}  # the rows only: not the COPY line, not the \.
    settings = (b"SET statement_timeout = 0", b"SET client_encoding = 'UTF8'",
                b"SELECT pg_catalog.set_config('search_path', '', false)")
    assert stream.split_copies[1].statement == b"COPY public.t (id, v) FROM stdin"
    assert (stream.split_copies[1].sync, stream.split_copies[1].settings) == (1, settings)
    assert stream.split_copies[2].statement == b'COPY public."we""ird" (x) FROM stdin'
    assert stream.split_copies[2].sync == 2


@pytest.mark.parametrize(("before", "copy"), [
    (b"SET SESSION AUTHORIZATION 'alice';\n", b"COPY public.t (id) FROM stdin;\n"),  # not replayed elsewhere
    (b"SELECT set_config('role', 'alice', false);\n", b"COPY public.t (id) FROM stdin;\n"),
    (b"BEGIN;\n", b"COPY public.t (id) FROM stdin;\n"),  # the file's transaction: others would not see it
    (b"", b"COPY public.t (id)/* c */FROM stdin;\n"),  # its significant text is not a COPY as it stands
    (b"SET x = 1;\n", b"COPY public.t (id + 1) FROM stdin;\n"),  # not the COPY pg_dump writes
])
def test_a_copy_another_connection_could_not_run_alike_is_not_split(before: bytes, copy: bytes) -> None:
    stream, _, rows = split_scan(b"CREATE TABLE public.t (id int);\n" + before + copy + b"1\n\\.\n", 5)
    assert stream.copies == 1 and rows == {1: b"1\n"}
    assert stream.split_copies == {}


def test_without_a_sync_nonce_the_stream_is_unchanged_and_has_no_spans() -> None:
    stream = SqlStream(fold_transactions=False, drop_restrict=True)
    assert stream.feed(SPLIT_DUMP) + stream.finish() == SPLIT_DUMP
    assert stream.spans == [] and stream.split_copies == {}


def test_a_comment_inside_a_copy_statement_is_left_out_of_the_text_another_connection_runs() -> None:
    dump = b"CREATE TABLE public.t (id int);\nCOPY public.t /* c; */ (id) FROM stdin;\n1\n\\.\n"
    stream, _, rows = split_scan(dump, 4)
    assert rows == {1: b"1\n"}
    assert stream.split_copies[1].statement == b"COPY public.t  (id) FROM stdin"
