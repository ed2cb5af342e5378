"""A plain set loaded into a new database over several connections (docs/decisions/0026).

psql runs the SQL as the stream gives it, statement by statement, and each table's rows are shared between
psql's COPY and COPYs of the same table on `restore_jobs - 1` other connections, whole lines each: the
server parses rows (text to jsonb, numerics, timestamps) and writes the heap on every core at once, where one
psql keeps one backend busy. The scanner (`SqlStream(sync_nonce=...)`) puts a `SELECT 'kkua-sync-NONCE-N';`
before each COPY; psql prints it when everything before (the table's CREATE, its owner) has run, and only
then does another connection start its COPY of that table. A block of rows goes to a connection whose queue
has room, else to psql. Each COPY of another connection is its own transaction, ended (committed) before
psql is given the line that ends the table's data, so a later statement on the table (an index, a key)
waits for it at most for its lock, never for data this process still holds.

Only for a new database, which the restore drops again on any failure: what another connection committed
cannot be rolled back with psql's work. Rows are not written frozen (`COPY ... FREEZE` needs the table made in
the same transaction), as with pg_restore -j.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
from collections.abc import Iterator
from typing import Any

import psycopg

from kkua_backupd.config import PostgresConfig
from kkua_backupd.errors import JobError
from kkua_backupd.sources.postgres.client import connect
from kkua_backupd.sources.postgres.pg_sql import SplitCopy, SqlStream

QUEUED = 4  # blocks (about 1 MiB each) waiting for one other connection
ALONE = 4 << 20  # the first bytes of each table's rows go to psql alone: a small table is not worth a second COPY


class _Stopped(Exception):
    """The load stopped elsewhere (psql ended, another connection failed, the stream raised)."""


class PsqlEnded(Exception):
    """psql ended before it read all it was to read (a failed statement, its timeout): its own exit status
    says why, so the routing stops without an error of its own."""


class SyncWatch:
    """psql's output read for the sync statements it ran (`feed` from the thread draining its stdout)."""

    def __init__(self, nonce: str) -> None:
        self._pattern = re.compile(rb"kkua-sync-" + nonce.encode() + rb"-(\d+)\D")
        self._tail = b""
        self.seen = 0
        self.ended = False
        self.changed = threading.Condition()

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        found = [int(m.group(1)) for m in self._pattern.finditer(window)]
        self._tail = window[-64:]
        with self.changed:
            if not chunk:
                self.ended = True
            if found:
                self.seen = max(self.seen, *found)
            self.changed.notify_all()

    def wait(self, number: int, stopped: threading.Event) -> None:
        """Return once psql ran sync `number`; raises _Stopped when psql ended first or the load stopped."""
        with self.changed:
            while self.seen < number:
                if self.ended or stopped.is_set():
                    raise _Stopped
                self.changed.wait(timeout=0.5)


class _Helper(threading.Thread):
    """One other connection: COPYs of the blocks it is given, each table's COPY committed at its end."""

    def __init__(self, load: SplitLoad, number: int) -> None:
        super().__init__(name=f"split-copy-{number}", daemon=True)
        self.load = load
        self.queue: queue.Queue[tuple[int, SplitCopy | None, tuple[Any, ...]] | None] = queue.Queue(QUEUED)
        self.open: int | None = None  # the COPY number this connection has open
        self.rows_from: set[int] = set()  # COPY numbers it was given rows of
        self.ended = 0  # the last COPY number whose end it has been told and committed
        self.error: BaseException | None = None

    def run(self) -> None:
        load = self.load
        try:
            with connect(load.pg, load.dbname) as conn, contextlib.ExitStack() as copying:
                applied: tuple[bytes, ...] = ()
                while (item := self.queue.get()) is not None:
                    number, split, pieces = item
                    if split is None:  # the end of COPY `number`
                        if self.open == number:
                            copying.close()  # ends the COPY: its rows are committed
                            self.open = None
                        with load.sync.changed:
                            self.ended = number
                            load.sync.changed.notify_all()
                        continue
                    if self.open != number:
                        copying.close()
                        load.sync.wait(split.sync, load.stopped)
                        if split.settings != applied:
                            for statement in split.settings:
                                conn.execute(statement)
                            applied = split.settings
                        cursor = copying.enter_context(conn.cursor())
                        copy = copying.enter_context(cursor.copy(split.statement))
                        self.open = number
                    for piece in pieces:
                        if load.stopped.is_set():
                            raise _Stopped
                        copy.write(piece)
        except _Stopped:
            pass
        except psycopg.Error as exc:
            self.error = JobError(f"loading rows into {load.dbname!r} on a second connection failed: "
                                  f"{' '.join(str(exc).split())} (the line counts this connection's rows)")
            load.stopped.set()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            load.stopped.set()
        finally:
            with load.sync.changed:
                load.sync.changed.notify_all()


class SplitLoad:
    """Routes a scanned stream (`SqlStream` with `sync_nonce`): `route` yields what psql reads and hands
    blocks of rows to the other connections. `close` ends them (raising the first failure when the load
    went well so far); `stop` stops them after a failure."""

    def __init__(self, pg: PostgresConfig, dbname: str, stream: SqlStream, connections: int) -> None:
        assert stream.sync_nonce is not None
        self.pg, self.dbname, self.stream = pg, dbname, stream
        self.sync = SyncWatch(stream.sync_nonce)
        self.stopped = threading.Event()
        self.connections = connections
        self.helpers: list[_Helper] = []
        self._partial = b""  # the start of a row cut by the chunk's end
        self._copy: int | None = None  # the COPY whose rows are being routed
        self._alone = 0  # bytes of its rows psql was given before any other connection
        self._mid_row = False  # what psql was given of them ends inside a row
        self._next = 0
        self.shared = 0  # blocks given to other connections

    def route(self, out: bytes) -> Iterator[bytes | memoryview]:
        """What psql reads of `out`, the scanner's last output (its `spans` say where the rows are)."""
        pos = 0
        for start, end, number in self.stream.spans:
            if start > pos:
                yield from self._sql(out[pos:start])
            yield from self._rows(out, start, end, number)
            pos = end
        if pos < len(out):
            yield from self._sql(out[pos:] if pos else out)

    def _sql(self, text: bytes) -> Iterator[bytes]:
        if self._partial:  # rows end with a newline before the line that ends them: only a cut stream has this
            yield self._partial
            self._partial = b""
        if self._copy is not None:
            self._end_copy(self._copy)
        yield text

    def _rows(self, out: bytes, start: int, end: int, number: int) -> Iterator[bytes | memoryview]:
        split = self.stream.split_copies.get(number)
        if self._copy != number:
            self._copy, self._alone, self._mid_row = number, 0, False
        if split is None or self.connections < 2 or self._alone < ALONE:
            self._alone += end - start
            self._mid_row = out[end - 1:end] != b"\n"
            yield memoryview(out)[start:end]  # whole rows or not: psql reads them in order
            return
        first = out.find(b"\n", start, end)
        if first < 0:
            if self._mid_row:
                yield memoryview(out)[start:end]  # more of the row psql is reading
            else:
                self._partial += out[start:end]
            return
        if self._mid_row:  # psql was given the start of this row: it gets its end too
            yield memoryview(out)[start:first + 1]
            self._mid_row = False
            head = b""
        else:
            head = self._partial + out[start:first + 1]
        last = out.rfind(b"\n", start, end)
        pieces = tuple(p for p in (head, memoryview(out)[first + 1:last + 1]) if len(p))
        self._partial = out[last + 1:end]
        if not pieces:
            return
        helper = self._helper_with_room()
        if helper is None:
            yield from pieces
            return
        helper.rows_from.add(number)
        self._put(helper, (number, split, pieces))
        self.shared += 1

    def _helper_with_room(self) -> _Helper | None:
        if self.stopped.is_set():
            self._raise()
        if len(self.helpers) < self.connections - 1 and all(h.queue.full() for h in self.helpers):
            helper = _Helper(self, len(self.helpers) + 1)
            self.helpers.append(helper)
            helper.start()
            return helper
        for _ in range(len(self.helpers)):
            helper = self.helpers[self._next % len(self.helpers)]
            self._next += 1
            if not helper.queue.full():
                return helper
        return None

    def _put(self, helper: _Helper, item: tuple[int, SplitCopy | None, tuple[Any, ...]] | None) -> None:
        while True:
            if self.stopped.is_set():
                self._raise()
            if self.sync.ended:  # before a connection's end: it also ends when psql did (SyncWatch.wait)
                raise PsqlEnded
            if not helper.is_alive():
                self._raise()
            with contextlib.suppress(queue.Full):
                helper.queue.put(item, timeout=0.5)
                return

    def _end_copy(self, number: int) -> None:
        """Every connection given rows of COPY `number` ends (commits) it before psql reads the line that
        ends the table's data: whatever psql runs next (an index, a key, a materialized view's refresh)
        sees all of the table's rows."""
        self._copy = None
        given = [h for h in self.helpers if number in h.rows_from]
        for helper in given:
            self._put(helper, (number, None, ()))
        with self.sync.changed:
            while not all(h.ended >= number for h in given):
                if self.stopped.is_set() or not all(h.is_alive() for h in given) or self.sync.ended:
                    break
                self.sync.changed.wait(timeout=0.5)
        if not all(h.ended >= number for h in given):
            if self.sync.ended and not self.stopped.is_set():
                raise PsqlEnded
            self._raise()

    def _raise(self) -> None:
        for helper in self.helpers:
            if helper.error is not None:
                raise helper.error
        raise JobError(f"loading rows into {self.dbname!r} on a second connection stopped without saying why")

    def close(self) -> None:
        """After the whole stream went to psql: every other connection finishes its COPYs (committed)."""
        for helper in self.helpers:
            self._put(helper, None)
        for helper in self.helpers:
            while helper.is_alive():
                helper.join(timeout=0.5)
                if self.sync.ended and helper.is_alive():
                    raise PsqlEnded
        for helper in self.helpers:
            if helper.error is not None:
                raise helper.error

    def stop(self) -> None:
        """After a failure: the other connections stop (their open COPYs fail, nothing more is committed)."""
        self.stopped.set()
        for helper in self.helpers:
            with contextlib.suppress(queue.Full):
                helper.queue.put_nowait(None)
        for helper in self.helpers:
            helper.join(timeout=30)
