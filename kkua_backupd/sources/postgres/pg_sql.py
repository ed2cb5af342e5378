"""Following a SQL stream the way psql reads it, without buffering table data.

A restore feeds psql a dump inside a transaction of its own. Three things in a dump need care there, and
all three are found by reading the stream as psql does (statements, quotes, comments, COPY data blocks,
backslash commands) while it passes through:

- pg_dump wraps large-object data in its own `BEGIN; ... COMMIT;`. Inside the restore's transaction that
  COMMIT would end it early, so a BEGIN/COMMIT pair written by the file is folded into the restore's
  transaction (both statements become comments). A COMMIT, END, ROLLBACK or ABORT that the file did not
  open with BEGIN is left alone: the restore's guard rejects it, and `problems` names it first.
- psql 15-18 silently stops reading (and exits 0) at an empty statement (a lone `;`) that comes right
  after a COPY data block. The restore's closing frame therefore adds a `;` only when the stream ends
  inside an unterminated statement (`pending`).
- A stream cut short (inside COPY data, a quoted string, a dollar-quoted body) is told apart from one
  that ends cleanly, and psql backslash commands other than pg_dump's `\\restrict`/`\\unrestrict` are
  refused: restored SQL never runs psql meta-commands (`\\!`, `\\connect`, `\\q`, ...).

In a restore's single transaction (`freeze_created`), the COPY of a table the same stream created gets
`WITH (FREEZE)` (decision 0025): its rows are written frozen and all-visible, so the index builds, the
foreign-key checks and every later reader skip the hint-bit writes, and no anti-wraparound vacuum has to
rewrite the whole restore later. PostgreSQL allows FREEZE only for a table created (or truncated) in the
current subtransaction, so it is left out after a SAVEPOINT, for partitioned tables and for tables the
stream did not create.

The scan is line by line outside COPY data (statements are short) and a plain byte search inside it,
so a 1 GB row is never held in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HOLD = 40  # significant bytes of a statement held back until it cannot be BEGIN/COMMIT any more
DUMP_COMPLETE = b"-- PostgreSQL database dump complete"
ALLOWED_META = frozenset({"restrict", "unrestrict"})

_TOP = re.compile(rb"[;'\"$\\]|--|/\*")
_DOLLAR_TAG = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_E_STRING = re.compile(rb"\\.|'", re.DOTALL)
_BLOCK = re.compile(rb"/\*|\*/")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")
_BEGIN = {"begin", "begin work", "begin transaction", "start transaction"}
_COMMIT = {"commit", "commit work", "commit transaction", "end", "end work", "end transaction"}
_ROLLBACK = {"rollback", "rollback work", "rollback transaction", "abort", "abort work", "abort transaction"}
_FROM_STDIN = re.compile(rb"\bfrom\s+stdin\s*$", re.IGNORECASE)
_COPY_TABLE = re.compile(rb"^\s*copy\s+(\S+)", re.IGNORECASE)
_PART = rb'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_QNAME = rb"(" + _PART + rb"(?:\." + _PART + rb")?)"
_CREATE_TABLE = re.compile(rb"\s*create\s+(?:unlogged\s+)?table\s+" + _QNAME + rb"\s*\(", re.IGNORECASE)
_COPY_NAME = re.compile(rb"\s*copy\s+" + _QNAME + rb"[\s(]", re.IGNORECASE)
START = 1024  # significant bytes of a statement kept to read a CREATE TABLE's or a COPY's table name
TEXT_LIMIT = 1 << 20  # split loads: a statement's text kept up to this size (a COPY's column list included)
# split loads: a COPY another connection may run as it stands (a table, its columns, text format, stdin)
_SPLIT_COPY = re.compile(rb"\s*copy\s+" + _QNAME + rb"\s*(?:\(\s*" + _PART + rb"(?:\s*,\s*" + _PART
                         + rb")*\s*\))?\s+from\s+stdin\s*", re.IGNORECASE)
# ... and the session settings it replays first: pg_dump's plain `SET name = value` and search_path
_SIMPLE_SET = re.compile(rb"\s*set\s+([a-z_]+)\s*(?:=|to)\s*(?:'[^'\\]*'|[A-Za-z0-9_.-]+)\s*", re.IGNORECASE)
_SEARCH_PATH = re.compile(rb"\s*select\s+pg_catalog\.set_config\('search_path',\s*'[^'\\]*',\s*false\)\s*",
                          re.IGNORECASE)


@dataclass(frozen=True)
class SplitCopy:
    """A COPY ... FROM stdin whose rows may also go to other connections (`SqlStream(sync_nonce=...)`): its
    statement, the number of the sync statement psql runs right before it, and the session settings in force
    there, to run first on the other connection."""

    statement: bytes
    sync: int
    settings: tuple[bytes, ...]


class MetaCommandRefused(ValueError):
    """Restored SQL tried to run a psql backslash command."""


@dataclass
class SqlStream:
    """Pass a SQL stream through `feed` (and `finish` at its end) to get the stream psql should read.

    `fold_transactions` folds the file's own BEGIN/COMMIT pairs into the surrounding transaction;
    `refuse_meta` raises MetaCommandRefused at a backslash command other than \\restrict/\\unrestrict
    (before passing it on); `drop_restrict` leaves those two out of the output. After `finish`: `problems`
    lists what a restore would reject, `pending` says whether the last statement lacks its `;`, `truncated`
    whether the stream stopped inside something.
    """

    fold_transactions: bool = True
    refuse_meta: bool = True
    drop_restrict: bool = False  # leave pg_dump's own \restrict/\unrestrict lines out (a restore frames its own)
    line_no: int = 1
    problems: list[str] = field(default_factory=list)
    copies: int = 0
    folded: int = 0
    complete: bool = False  # pg_dump's "dump complete" comment was seen
    truncated: str | None = None
    pending: bool = False
    meta_commands: list[str] = field(default_factory=list)
    dropped: int = 0  # \restrict/\unrestrict lines left out (drop_restrict)
    freeze_created: bool = False  # the stream runs in one transaction: COPY ... WITH (FREEZE) where allowed
    frozen: int = 0  # COPY statements given WITH (FREEZE)
    # Split loads (sources/postgres/split.py): before each statement that starts with COPY, a
    # `SELECT 'kkua-sync-NONCE-N';` (psql prints it once everything before has run); `spans` lists where the
    # last output holds COPY data, and `split_copies` the COPYs whose rows another connection may take.
    sync_nonce: str | None = None
    syncs: int = 0
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, COPY number) in the output
    split_copies: dict[int, SplitCopy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._copy = False
        self._copy_table = ""
        self._copy_line = 0
        self._bol = True  # in COPY data: at the start of a line
        self._carry = b""  # in COPY data: the start of a line that may be the terminator
        self._line = bytearray()  # outside COPY data: the current, incomplete line
        self._quote: bytes | None = None  # ', E', ", $tag$ or /* (with _depth)
        self._quote_line = 0
        self._depth = 0
        self._held = bytearray()
        self._holding = True
        self._head = bytearray()
        self._tail = bytearray()
        self._stmt_line = 1
        self._file_txn = False
        self._copy_next = False
        self._start = bytearray()  # the statement's first START significant bytes (freeze_created)
        self._created: set[bytes] = set()  # tables the stream created, as it names them
        self._savepoint = False
        self._partition = False  # the statement says PARTITION somewhere (a partitioned table is not frozen)
        self._text = bytearray()  # split loads: the statement's significant text (up to TEXT_LIMIT)
        self._stmt_sync = 0  # split loads: the sync emitted before this statement (0: none)
        self._settings: dict[bytes, bytes] = {}  # split loads: the session settings so far, by name
        self._unknown_setting = False  # split loads: a setting not replayable was changed: split no more

    # ------------------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """Take the next piece of the stream; returns what to pass on to psql (maybe less, held back)."""
        if self.sync_nonce is not None:
            self.spans = []
        if self._copy and self._inside_copy_data(chunk):
            if self.sync_nonce is not None:
                self.spans.append((0, len(chunk), self.copies))
            return chunk  # most of a restore: passed on as it is, no copy made
        out = bytearray()
        pos = 0
        n = len(chunk)
        while pos < n:
            if self._copy:
                pos += self._copy_data(chunk[pos:] if pos else chunk, out)
                continue
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self._line += chunk[pos:]
                break
            if self._line:
                self._line += chunk[pos:nl + 1]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = chunk[pos:nl + 1]
            pos = nl + 1
            self._sql_line(line, out)
            self.line_no += 1
            if self._copy_next:  # the data starts on the next line: pass the COPY line on whole
                out += self._held
                self._held.clear()
                self._copy_next = False
                self._copy = True
                self._bol = True
        return bytes(out)

    def finish(self) -> bytes:
        out = bytearray()
        self.spans = []
        if self._copy:
            rest = self._carry
            self._carry = b""
            out += rest
            if rest.rstrip(b"\r") != b"\\.":
                self.truncated = (f"the SQL ends inside the data of COPY {self._copy_table} (line "
                                  f"{self._copy_line}): the file is truncated")
        else:
            if self._line:
                line = bytes(self._line)
                self._line.clear()
                self._sql_line(line, out)
            if self._quote is not None:
                tag = self._quote.decode(errors="replace")
                what = {b"'": "a quoted string", b"E'": "a quoted string", b'"': "a quoted identifier",
                        b"/*": "a comment"}.get(self._quote, f"a dollar-quoted body ({tag})")
                self.truncated = f"the SQL ends inside {what} begun at line {self._quote_line}: the file is truncated"
            elif self._copy_next:
                self.truncated = (f"the SQL ends right after COPY {self._copy_table} (line {self._copy_line}) "
                                  "without its data: the file is truncated")
            self.pending = bool(self._head)
            out += self._held
            self._held.clear()
        if self.truncated:
            self.problems.append(self.truncated)
        return bytes(out)

    # ------------------------------------------------------------------------------------------
    def _inside_copy_data(self, chunk: bytes) -> bool:
        """Whether all of `chunk` is COPY data that cannot end the data block (no line in it, nor the one it
        leaves unfinished, can be or begin a `\\.` line; nothing carried from the chunk before): if so its
        lines are counted and it is taken whole, as `_copy_data` would pass it on byte for byte."""
        if self._carry or not chunk or (self._bol and chunk[:1] == b"\\") or chunk.find(b"\n\\.") >= 0:
            return False
        last = chunk.rfind(b"\n")
        if last < 0:
            return False
        rest = chunk[last + 1:]
        if rest[:1] == b"\\":
            return False  # may be the start of the terminator line: `_copy_data` carries it
        self.line_no += chunk.count(b"\n")
        self._bol = not rest
        return True

    def _copy_data(self, data: bytes, out: bytearray) -> int:
        """Pass COPY data on until its `\\.` line; returns how many bytes of `data` were used. Its lines are
        not visited one by one (a restore's time goes there): only a line that starts with a backslash and a
        dot can end the data, so the search is for that, and lines are counted in one go."""
        if self._carry:
            data = self._carry + data
            carried = len(self._carry)
            self._carry = b""
        else:
            carried = 0
        pos = 0
        n = len(data)
        while True:
            if self._bol:
                head = data[pos:pos + 4]
                for end in (b"\\.\n", b"\\.\r\n"):
                    if head.startswith(end):
                        out += data[pos:pos + len(end)]
                        self.line_no += 1
                        self._copy = False
                        return pos + len(end) - carried
                if len(head) < 4 and (b"\\.\r\n".startswith(head) or b"\\.\n".startswith(head)):
                    self._carry = head
                    return n - carried
                self._bol = False
            found = data.find(b"\n\\.", pos)
            if found < 0:
                found = data.rfind(b"\n", pos)
                if found < 0:
                    self._data_span(out, n - pos)
                    out += data[pos:]
                    return n - carried
            self._data_span(out, found + 1 - pos)
            out += data[pos:found + 1]
            self.line_no += data.count(b"\n", pos, found + 1)
            pos = found + 1
            self._bol = True

    def _data_span(self, out: bytearray, size: int) -> None:
        """Note that the next `size` bytes of `out` are COPY data (split loads)."""
        if self.sync_nonce is not None and size > 0:
            self.spans.append((len(out), len(out) + size, self.copies))

    def sync_statement(self, number: int) -> bytes:
        return f"SELECT 'kkua-sync-{self.sync_nonce}-{number}';\n".encode()

    def _release_held(self, out: bytearray) -> None:
        """Pass on the held start of the statement; in a split load, a COPY's is preceded by a sync."""
        if self.sync_nonce is not None and not self._stmt_sync and bytes(self._head).lstrip()[:4].lower() == b"copy":
            self.syncs += 1
            self._stmt_sync = self.syncs
            out += self.sync_statement(self.syncs)
        out += self._held
        self._held.clear()

    def _flush(self, line: bytes, start: int, end: int, out: bytearray) -> None:
        if self._holding:
            self._held += line[start:end]
        else:
            out += line[start:end]

    def _significant(self, text: bytes, line: bytes, out_from: int, pos: int, out: bytearray) -> int:
        """Note statement text; once it cannot be a transaction statement, stop holding. Returns out_from."""
        if not text.strip():
            return out_from
        if len(self._head) <= HOLD:
            self._head += text[:HOLD + 1]
        if self.freeze_created:
            if len(self._start) <= START:
                self._start += text[:START + 1]
            if not self._partition and b"partition" in text.lower():
                self._partition = True
        self._tail = (self._tail + text)[-64:]
        if self.sync_nonce is not None and len(self._text) <= TEXT_LIMIT:
            self._text += text
        if self._holding and len(self._head) > HOLD:
            self._release_held(out)
            out += line[out_from:pos]
            self._holding = False
            return pos
        return out_from

    def _sql_line(self, line: bytes, out: bytearray) -> None:
        pos = 0
        out_from = 0
        n = len(line)
        if not self._head and self._quote is None and line.startswith(DUMP_COMPLETE):
            self.complete = True
        while pos < n:
            q = self._quote
            if q is not None:
                if q == b"/*":
                    m = _BLOCK.search(line, pos)
                    if m is None:
                        pos = n
                        break
                    self._depth += 1 if m.group() == b"/*" else -1
                    pos = m.end()
                    if self._depth == 0:
                        self._quote = None
                    continue
                if q == b"E'":
                    m = _E_STRING.search(line, pos)
                    if m is None:
                        out_from = self._significant(line[pos:], line, out_from, n, out)
                        pos = n
                        break
                    end = m.end()
                    out_from = self._significant(line[pos:end], line, out_from, end, out)
                    pos = end
                    if m.group() == b"'":
                        if line[pos:pos + 1] == b"'":
                            pos += 1
                        else:
                            self._quote = None
                    continue
                idx = line.find(q, pos)
                if idx < 0:
                    out_from = self._significant(line[pos:], line, out_from, n, out)
                    pos = n
                    break
                end = idx + len(q)
                out_from = self._significant(line[pos:end], line, out_from, end, out)
                pos = end
                if q in (b"'", b'"') and line[pos:pos + 1] == q:  # a doubled quote stays inside
                    out_from = self._significant(q, line, out_from, pos + 1, out)
                    pos += 1
                else:
                    self._quote = None
                continue
            m = _TOP.search(line, pos)
            if m is None:
                out_from = self._significant(line[pos:], line, out_from, n, out)
                pos = n
                break
            start = m.start()
            tok = m.group()
            if start > pos:
                out_from = self._significant(line[pos:start], line, out_from, start, out)
            if tok == b"--":
                pos = n
                break
            if tok == b"/*":
                self._quote, self._quote_line, self._depth = b"/*", self.line_no, 1
                pos = m.end()
                continue
            if tok == b";":
                if self._may_freeze():
                    self._flush(line, out_from, start, out)
                    self._flush(b" WITH (FREEZE);", 0, 15, out)
                    self.frozen += 1
                else:
                    self._flush(line, out_from, start + 1, out)
                out_from = start + 1
                self._end_statement(out)
                pos = start + 1
                continue
            if tok == b"\\":
                name = re.match(rb"\\([A-Za-z!?.]*)", line[start:])
                command = (name.group(1) if name else b"").decode("ascii", "replace")
                self.meta_commands.append(command)
                if command not in ALLOWED_META:
                    problem = (f"line {self.line_no} runs the psql command \\{command}: restored SQL may not run "
                               "psql meta-commands")
                    self.problems.append(problem)
                    if self.refuse_meta:
                        raise MetaCommandRefused(problem)
                # psql runs it at once, whatever statement is pending: never fold it away with one
                out += self._held
                self._held.clear()
                if self.drop_restrict and command in ALLOWED_META:
                    out += line[out_from:start]
                    if line.endswith(b"\n"):
                        out += b"\n"
                    self.dropped += 1
                else:
                    out += line[out_from:]
                out_from = pos = n
                break
            if tok == b"$":
                dm = _DOLLAR_TAG.match(line, start)
                if dm is None or (start > 0 and _IDENT_CHAR.match(line, start - 1)):
                    out_from = self._significant(b"$", line, out_from, start + 1, out)
                    pos = start + 1
                    continue
                self._quote, self._quote_line = dm.group(), self.line_no
                out_from = self._significant(dm.group(), line, out_from, dm.end(), out)
                pos = dm.end()
                continue
            # a quote
            if tok == b"'" and start > 0 and line[start - 1:start] in (b"E", b"e") and not (
                    start > 1 and _IDENT_CHAR.match(line, start - 2)):
                self._quote = b"E'"
            else:
                self._quote = tok
            self._quote_line = self.line_no
            out_from = self._significant(tok, line, out_from, start + 1, out)
            pos = start + 1
        self._flush(line, out_from, n, out)
        if self._holding and not self._head and len(self._held) > 1 << 16:
            out += self._held  # a long run of comments: nothing to fold there
            self._held.clear()

    def _may_freeze(self) -> bool:
        """Whether the statement now ending is `COPY t FROM stdin` of a table this stream created in the
        current subtransaction (and not a partitioned one)."""
        if not self.freeze_created or self._savepoint or not self._created:
            return False
        copy = _COPY_NAME.match(bytes(self._start))
        return copy is not None and copy.group(1) in self._created and bool(_FROM_STDIN.search(bytes(self._tail)))

    def _note_created(self) -> None:
        """Follow what FREEZE needs: the tables the stream created (not partitioned ones), and whether a
        SAVEPOINT opened a subtransaction they were not created in."""
        start = bytes(self._start)
        if start.lstrip()[:9].lower() == b"savepoint":
            self._savepoint = True
            return
        table = _CREATE_TABLE.match(start)
        if table is not None and not self._partition:
            self._created.add(table.group(1))

    def _note_split_copy(self) -> None:
        """Split loads: the COPY just read may have its rows taken by other connections when its text is a
        plain COPY of a table from stdin, psql runs a sync right before it, the file has no transaction of
        its own open (another connection would not see what it made) and every setting it changed can be
        replayed there."""
        text = bytes(self._text)
        if (self.sync_nonce is not None and self._stmt_sync and not self._file_txn and not self._unknown_setting
                and len(text) <= TEXT_LIMIT and _SPLIT_COPY.fullmatch(text)):
            self.split_copies[self.copies] = SplitCopy(text.strip(), self._stmt_sync,
                                                       tuple(self._settings.values()))

    def _note_setting(self) -> None:
        """Split loads: follow the session settings psql's connection has, to replay them on the others."""
        text = bytes(self._text)
        simple = _SIMPLE_SET.fullmatch(text)
        if simple is not None and simple.group(1).lower() not in (b"local", b"session"):
            self._settings[simple.group(1).lower()] = text.strip()
        elif _SEARCH_PATH.fullmatch(text):
            self._settings[b"search_path"] = text.strip()
        elif re.match(rb"\s*(?:set|reset)\b", text, re.IGNORECASE) or b"set_config" in text.lower():
            self._unknown_setting = True

    def _end_statement(self, out: bytearray) -> None:
        if self.freeze_created:
            self._note_created()
        words = " ".join(bytes(self._head).decode("utf-8", "replace").lower().rstrip(";").split())
        raw = bytes(self._held)
        fold = None
        if self._holding and words:
            if words in _BEGIN:
                if self.fold_transactions:
                    fold = "BEGIN"
                self._file_txn = True
            elif words in _COMMIT:
                if self._file_txn and self.fold_transactions:
                    fold = "COMMIT"
                elif not self._file_txn:
                    self.problems.append(f"line {self.line_no}: {words.upper()} before the end of the SQL would "
                                         "end the restore's transaction early")
                self._file_txn = False
            elif words in _ROLLBACK:
                self.problems.append(f"line {self.line_no}: {words.upper()} would undo the restore's transaction")
                self._file_txn = False
        if fold is not None:
            self.folded += 1
            out += (f"/* kkua-backup: the file's {fold} is part of the restore's transaction */"
                    + "\n" * raw.count(b"\n")).encode()
        elif self._holding:
            self._release_held(out)
        else:
            out += raw
        head = bytes(self._head).lstrip()
        if head[:5].lower() in (b"copy ", b"copy\t", b"copy\n") and _FROM_STDIN.search(bytes(self._tail)):
            table = _COPY_TABLE.match(bytes(self._head))
            self._copy_table = table.group(1).decode("utf-8", "replace") if table else "?"
            self._copy_line = self.line_no
            self._copy_next = True
            self.copies += 1
            self._note_split_copy()
        elif self.sync_nonce is not None:
            self._note_setting()
        self._text = bytearray()
        self._stmt_sync = 0
        self._held = bytearray()
        self._holding = True
        self._head = bytearray()
        self._tail = bytearray()
        self._start = bytearray()
        self._partition = False
        self._stmt_line = self.line_no
