"""SQLite's hot path: the statements of one round trip run together in one hop to a thread,
on connections the session keeps.

Through SQLAlchemy's asyncio layer and aiosqlite, every statement costs a pool checkout,
several hops to aiosqlite's thread and greenlet switches: about 1 ms of CPU, where SQLite
itself needs a few microseconds. Per attempt drainer makes two round trips (claim the lease
and read the phase; read the outcome and release), so they run here instead: a round trip is
a plain function of ``execute`` (see :meth:`~drainer.backlog._engine.Engine.run`), run with
the standard library's ``sqlite3`` in one ``anyio.to_thread`` hop. The statements are
SQLAlchemy's, compiled once for SQLite; errors come out as SQLAlchemy's exception classes,
so retries and the one error translator treat them as before.

Two connections: one for reads, one for writes, each used by one round trip at a time; a
write waiting on a worker's lock (busy timeout) never holds up a read. Neither keeps a
transaction open between round trips.

One round trip at a time is kept twice. In the event loop a limiter of one per connection
queues the round trips, so a waiting one holds no thread. In the thread a lock per connection
is the guarantee: anyio before 4.15 (Autopack pins 4.12) does not hand a released limiter's
token to the task it wakes, so now and then a third task takes it first and two threads
would share one ``sqlite3`` connection: "cannot commit - no transaction is active", or a
crash.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")
_COMPILED_MAX = 64  #: statements kept compiled (the hot path's few; others compile per use)
CLOSE_WAIT = 1.0  #: how long closing waits for a round trip it interrupted (seconds)
#: while set (by :meth:`~drainer.backlog._engine.Engine.retry`), each SQLite connection in
#: use puts its ``interrupt`` here, and takes it out when done: the statement limit cuts a
#: statement by interrupting it (it then fails like any error) instead of cancelling it
IN_USE: ContextVar[list[Callable[[], None]] | None] = ContextVar("drainer_sqlite_in_use",
                                                                 default=None)

_interrupt_guard = threading.Lock()


@contextlib.contextmanager
def interruptible(conn: sqlite3.Connection) -> Iterator[None]:
    """While the block runs ``conn``'s statements, put its interrupt in :data:`IN_USE` (when
    set). The interrupt reaches ``conn`` only until the block ends: never a later user's
    statement on the same connection."""
    in_use = IN_USE.get()
    if in_use is None:
        yield
        return
    mine = True

    def interrupt() -> None:
        with _interrupt_guard:
            if mine:
                conn.interrupt()

    in_use.append(interrupt)
    try:
        yield
    finally:
        with _interrupt_guard:
            mine = False
        in_use.remove(interrupt)


class RawResult:
    """What a round trip's code reads from a statement: the subset of SQLAlchemy's
    ``Result`` that drainer uses, on rows already fetched."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


@functools.lru_cache(maxsize=64)
def _row_type(names: tuple[str, ...]) -> Any:
    """Rows with attribute access by column label, as SQLAlchemy's rows have."""
    return collections.namedtuple("Row", names, rename=True)


class RawSqlite:
    """The two kept connections to one SQLite file, and the compiled hot statements."""

    def __init__(self, path: Path, *, busy_timeout: float, cache_kib: int) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._cache_kib = cache_kib
        self._dialect = sqlite_dialect.dialect(paramstyle="qmark")
        self._conns: dict[bool, sqlite3.Connection] = {}
        #: one round trip at a time per connection (made on first use, in the event loop)
        self._limiters: dict[bool, anyio.CapacityLimiter] = {}
        self._locks = {True: threading.Lock(), False: threading.Lock()}
        self._compiled: dict[int, tuple[Any, str, tuple[str, ...], Any]] = {}
        self._closed = False

    async def run(self, body: Callable[[Callable[..., Any]], T], *, write: bool,
                  transaction: bool) -> T:
        """``body(execute)`` in one hop: on the write connection when ``write``, inside
        ``BEGIN IMMEDIATE`` ... ``COMMIT`` when ``transaction`` (rolled back if it raises)."""
        limiter = self._limiters.get(write)
        if limiter is None:
            limiter = self._limiters[write] = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._run, body, write, transaction,
                                              limiter=limiter)

    def _run(self, body: Callable[[Callable[..., Any]], T], write: bool,
             transaction: bool) -> T:
        with self._locks[write]:
            return self._run_alone(body, write, transaction)

    def _run_alone(self, body: Callable[[Callable[..., Any]], T], write: bool,
                   transaction: bool) -> T:
        if self._closed:  # (a round trip queued behind one that close() left running)
            raise DBAPIError.instance("connect", None, sqlite3.ProgrammingError(
                "drainer has closed its connections to the database"), sqlite3.Error)
        conn = self._conns.get(write)
        if conn is None:
            conn = self._conns[write] = self._connect()
        with interruptible(conn):  # (the caller's context: anyio runs the thread in a copy)
            return self._round_trip(conn, body, transaction)

    def _round_trip(self, conn: sqlite3.Connection, body: Callable[[Callable[..., Any]], T],
                    transaction: bool) -> T:
        execute = functools.partial(self._execute, conn)
        if not transaction:
            return body(execute)
        self._plain(conn, "BEGIN IMMEDIATE")
        try:
            out = body(execute)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            raise
        self._plain(conn, "COMMIT")
        return out

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DBAPIError.instance("connect", None, exc, sqlite3.Error) from exc
        try:
            # synchronous stays SQLite's FULL: a settle is on disk before its journal line
            # is written, so even a power loss never leaves the database behind the journal
            # (a phase the journal says was restored still EXECUTING).
            conn.execute(f"PRAGMA cache_size = -{self._cache_kib}")
        except sqlite3.Error as exc:
            conn.close()  # a damaged file: nothing is kept open
            raise DBAPIError.instance("PRAGMA", None, exc, sqlite3.Error) from exc
        return conn

    def _plain(self, conn: sqlite3.Connection, sql: str) -> None:
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            self._drop(conn, exc)
            raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc

    def _execute(self, conn: sqlite3.Connection, statement: Any,
                 params: Mapping[str, Any] | None = None) -> RawResult:
        entry = self._compiled.get(id(statement))
        if entry is None or entry[0] is not statement:
            compiled = statement.compile(dialect=self._dialect)
            entry = (statement, compiled.string, tuple(compiled.positiontup or ()), compiled)
            if len(self._compiled) < _COMPILED_MAX:
                self._compiled[id(statement)] = entry  # it keeps the statement (and id) alive
        _, sql, names, compiled = entry
        values = compiled.construct_params(dict(params) if params else None)
        args = [values[name] for name in names]
        try:
            cursor = conn.execute(sql, args)
            rows = cursor.fetchall()
        except sqlite3.Error as exc:
            self._drop(conn, exc)
            raise DBAPIError.instance(sql, args, exc, sqlite3.Error) from exc
        if cursor.description is not None and rows:
            row_type = _row_type(tuple(d[0] for d in cursor.description))
            rows = [row_type(*row) for row in rows]
        return RawResult(rows, cursor.rowcount)

    def _drop(self, conn: sqlite3.Connection, exc: sqlite3.Error) -> None:
        """After an error other than a constraint or a busy lock, open afresh next time."""
        if isinstance(exc, sqlite3.IntegrityError) or "locked" in str(exc).lower():
            return
        for key, kept in list(self._conns.items()):
            if kept is conn:
                del self._conns[key]
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def close(self) -> None:
        """Close the kept connections; later round trips fail instead of opening new ones.

        Normally no round trip is in flight by then. But asyncio's runner, on a second
        Ctrl-C, tears the event loop down past every shield, and a round trip may still be
        in its thread, waiting on a lock: that one is interrupted and waited for a moment.
        A connection still in use after that is left open (closing it under its thread
        crashed the process: SIGSEGV), and its round trip ends by itself, at the latest when
        the busy timeout runs out (``interrupt`` does not cut a wait for a lock short);
        round trips queued behind it do not run."""
        self._closed = True
        for write, conn in list(self._conns.items()):
            lock = self._locks[write]
            if not lock.acquire(blocking=False):
                conn.interrupt()
                if not lock.acquire(timeout=CLOSE_WAIT):
                    continue
            try:
                self._conns.pop(write, None)
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            finally:
                lock.release()

