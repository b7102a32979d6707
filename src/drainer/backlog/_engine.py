"""The database behind a backlog: engines per dialect, short transactions, the database's
clock, and the one place lower-level errors become :class:`~drainer.errors.DatabaseError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as SyncEngine
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.util import greenlet_spawn

from ..dburl import DatabaseURL
from ..errors import DatabaseError
from ._sqlite import IN_USE, RawSqlite, interruptible

SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_CACHE_KIB = 512  #: page cache of each of drainer's SQLite connections
#: wait this long for a worker's write lock instead of failing (the SQLite URL's ``timeout``
#: sets it); the retry window and the statement limit (:class:`Engine`) derive from it, on
#: PostgreSQL from this default
SQLITE_BUSY_TIMEOUT = 30.0
RETRY_FIRST_PAUSE = 0.05  #: then doubled per retry, up to RETRY_MAX_PAUSE
RETRY_MAX_PAUSE = 2.0
#: SQLite: a try past its limit has its statement interrupted, and again this often until it
#: ends (SQLite ignores an interrupt that comes between two statements or during a wait for
#: a lock)
REINTERRUPT_EVERY = 0.1
#: SQLite: a try still running this long after its limit plus the busy timeout (a statement
#: stuck in I/O, which no interrupt reaches) is cancelled, as on PostgreSQL
INTERRUPT_GRACE = 10.0
#: PostgreSQL SQLSTATEs that pass by themselves: connection exceptions (class 08), the server
#: shutting down or starting (57P01-57P03), serialization failure, deadlock, lock not available
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "55P03")

T = TypeVar("T")
#: what a round trip's code gets: ``execute(statement, params)`` returns a result with
#: ``first()``, ``all()``, ``scalar_one()``, ``scalars()`` and ``rowcount``
Execute = Callable[..., Any]


class AsyncConnection:
    """One pooled connection of an asyncio driver (asyncpg, aiosqlite), driven from the event
    loop: each call runs the synchronous SQLAlchemy call in a greenlet, whose waits on the
    driver are the event loop's (as ``sqlalchemy.ext.asyncio`` does, whose import also loads
    the ORM: about 80 ms of every drainer command's start-up, for four calls)."""

    def __init__(self, sync: Connection) -> None:
        self.sync = sync

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        """The statement's result, its rows already fetched (the drivers' cursors buffer)."""
        return await greenlet_spawn(self.sync.execute, statement, parameters)

    async def exec_driver_sql(self, statement: str) -> Any:
        return await greenlet_spawn(self.sync.exec_driver_sql, statement)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(sync_connection, *args)``: a plain function, its statements run in turn."""
        result: T = await greenlet_spawn(fn, self.sync, *args)
        return result

    def execution_options(self, **options: Any) -> AsyncConnection:
        """Options set in place (SQLAlchemy 2), outside the greenlet: only options that do
        no I/O then (``sqlite_begin``; ``isolation_level`` on PostgreSQL on a connection with
        no transaction open; on SQLite it runs a PRAGMA and would fail here)."""
        self.sync.execution_options(**options)
        return self

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        transaction = await greenlet_spawn(self.sync.begin)
        async with _ending(ok=transaction.commit, failed=transaction.rollback):
            yield self


@asynccontextmanager
async def _connect(engine: SyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection from ``engine``'s pool, given back when the block ends. On SQLite, inside
    :meth:`Engine.retry`, its ``interrupt`` is in :data:`IN_USE` meanwhile."""
    sync = await greenlet_spawn(engine.connect)
    async with _ending(ok=sync.close, failed=sync.close):
        # aiosqlite's connection, and the sqlite3 connection its thread runs statements on
        raw = None if IN_USE.get() is None else getattr(
            sync.connection.driver_connection, "_connection", None)
        if not isinstance(raw, sqlite3.Connection):
            yield AsyncConnection(sync)
            return
        with interruptible(raw):
            yield AsyncConnection(sync)


@asynccontextmanager
async def _ending(*, ok: Callable[[], Any], failed: Callable[[], Any]) -> AsyncIterator[None]:
    """After the block, ``ok`` (or ``failed`` if it raised), shielded from cancellation. An
    error of ``failed`` never replaces what the block raised: a statement cut off by its time
    limit can leave the driver's connection closed under SQLAlchemy 2.0's feet, and the
    rollback's "no active connection" would otherwise hide the cancellation and look like a
    transient fault worth retrying."""
    try:
        yield
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await greenlet_spawn(failed)
        raise
    with anyio.CancelScope(shield=True):
        await greenlet_spawn(ok)


def is_transient(exc: BaseException) -> bool:
    """Whether a driver error may pass if the statement is tried again on a new connection."""
    if isinstance(exc, OSError):
        return True  # refused, reset: the server is restarting or the network hiccuped
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    code = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    if code and code.startswith(_TRANSIENT_SQLSTATES):
        return True
    text = str(orig if orig is not None else exc).lower()
    return "database is locked" in text or "connection is closed" in text \
        or "connection was closed" in text


def _interrupted(exc: SQLAlchemyError) -> bool:
    """Whether SQLite interrupted the statement (``sqlite3_interrupt``)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_INTERRUPT


def first_line(exc: BaseException) -> str:
    """The driver's own message (first line) behind a SQLAlchemy error."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Engine:
    """One backlog database: connections, write transactions, the clock, error translation."""

    def __init__(self, db: DatabaseURL) -> None:
        self.db = db
        self._file = db.sqlite_path
        self._identity = _file_identity(self._file) if self._file is not None else None
        busy = db.sqlite_timeout if db.sqlite_timeout is not None else SQLITE_BUSY_TIMEOUT
        self.busy_timeout = busy
        #: a transient fault is retried for this long before it counts (a lock held past
        #: the busy timeout is waited out once more)
        self.retry_within = 2 * busy
        #: a statement is never cancelled half-way (a stop waits for it), but gives up
        #: after this long
        self.statement_limit = 2 * busy + 10.0
        try:
            self._engine = _make_engine(db, busy)
        except (SQLAlchemyError, ImportError) as exc:
            raise DatabaseError(f"cannot open {db.redacted}: {_import_hint(exc)}") from exc
        self._raw = RawSqlite(self._file, busy_timeout=busy,
                              cache_kib=SQLITE_CACHE_KIB) if self._file is not None else None

    def check_identity(self) -> None:
        """SQLite: the file at the database's path must still be the one drainer opened.

        Checked on each connection drainer takes (one ``stat``). A file deleted or replaced
        (restored from a backup, rebuilt by a script) while drainer runs would otherwise go
        unnoticed: drainer's open connections keep reading and writing the old file while
        workers, which open the path, use the new one."""
        if self._file is None or self._identity is None:
            return
        now = _file_identity(self._file)
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            raise DatabaseError(
                f"SQLite database {self._file} was {what} while drainer was using it; "
                "stopping (check what changed it, then resume against the right file)")

    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Translate what the driver raises while doing ``action`` ("reading a phase from")
        into one line: ``<action> <database> failed: <driver message>``."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{action} {self.db.redacted} failed: {first_line(exc)}",
                                transient=is_transient(exc)) from exc
        except OSError as exc:  # the driver could not reach the server at all
            raise DatabaseError(f"connecting to {self.db.redacted} failed: {exc}",
                                transient=True) from exc

    async def retry(self, action: str, body: Callable[[], Awaitable[T]]) -> T:
        """``await body()`` (which opens its own connection), translated as :meth:`errors`
        does; a transient fault is retried with backoff for up to :attr:`retry_within` seconds.
        The pool drops a connection found broken, so each retry runs on a fresh one.

        Each try is shielded: a cancellation (a stop, a lost lease, the end of an attempt)
        waits for the statement in flight and takes effect at the next pause. Cut half-way,
        SQLAlchemy would invalidate the connection, and with aiosqlite its close could then
        hang the event loop's shutdown forever (seen with SQLAlchemy 2.1 and aiosqlite 0.22
        when a heartbeat was cancelled while it waited on a write lock). For the same reason
        a try past :attr:`statement_limit` on SQLite is cut by interrupting its statement
        (see :meth:`_interrupting`), and cancelled only as a last resort
        (:data:`INTERRUPT_GRACE`); on PostgreSQL it is cancelled."""
        deadline = anyio.current_time() + self.retry_within
        pause = RETRY_FIRST_PAUSE
        while True:
            try:
                with self.errors(action), anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + self.statement_limit
                    if self._file is not None:
                        scope.deadline += self.busy_timeout + INTERRUPT_GRACE
                    with self._interrupting() as cut:
                        try:
                            return await body()
                        except SQLAlchemyError as exc:
                            if not (cut and _interrupted(exc)):
                                raise
                            raise self._no_answer(action) from exc
                raise self._no_answer(action)
            except DatabaseError as exc:
                if not exc.transient or anyio.current_time() + pause > deadline:
                    raise
            await anyio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_PAUSE)

    def _no_answer(self, action: str) -> DatabaseError:
        return DatabaseError(f"{action} {self.db.redacted} failed: no answer within "
                             f"{self.statement_limit:g}s")

    @contextmanager
    def _interrupting(self) -> Iterator[list[bool]]:
        """SQLite: from :attr:`statement_limit` on, interrupt the statements of the SQLite
        connections the block holds (:data:`IN_USE`), every :data:`REINTERRUPT_EVERY`
        seconds until the block ends; an interrupted statement fails as SQLite's
        "interrupted", and SQLAlchemy keeps the connection. Yields a list that is not empty
        once the limit passed. A cancelled statement instead leaves aiosqlite's connection to
        be closed by SQLAlchemy, which with SQLAlchemy 2.1 could leave a task that never ends,
        and the event loop's shutdown waiting for it forever."""
        cut: list[bool] = []
        if self._file is None:
            yield cut
            return
        in_use: list[Callable[[], None]] = []
        token = IN_USE.set(in_use)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def interrupt() -> None:
            nonlocal timer
            cut.append(True)
            for each in list(in_use):
                with contextlib.suppress(Exception):  # (closed meanwhile)
                    each()
            timer = loop.call_later(REINTERRUPT_EVERY, interrupt)

        timer = loop.call_later(self.statement_limit, interrupt)
        try:
            yield cut
        finally:
            timer.cancel()
            IN_USE.reset(token)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads: on SQLite each statement runs without a BEGIN."""
        self.check_identity()
        async with _connect(self._engine) as conn:
            yield conn

    @asynccontextmanager
    async def write(self, *, single: bool = False) -> AsyncIterator[AsyncConnection]:
        """A short write transaction (BEGIN IMMEDIATE on SQLite). ``single``: the caller
        runs one statement, atomic by itself, so SQLite needs no explicit BEGIN."""
        self.check_identity()
        async with _connect(self._engine) as conn:
            if self.db.is_sqlite and not single:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield conn

    async def run(self, body: Callable[[Execute], T], *, write: bool = False,
                  transaction: bool = False) -> T:
        """One round trip: ``body(execute)``, a plain function that runs its statements
        through ``execute`` (no awaits between them). ``write``: it writes; ``transaction``:
        its statements form one write transaction (BEGIN IMMEDIATE on SQLite); else each
        statement is atomic by itself and commits as it runs.

        On SQLite the whole body runs in one hop to a thread, on a connection the session
        keeps (:mod:`._sqlite`); on PostgreSQL, through SQLAlchemy's ``run_sync`` on a pooled
        connection, each statement a round trip to the server (without a transaction: in
        autocommit, so no BEGIN and COMMIT round trips). Use it inside :meth:`retry`.
        """
        self.check_identity()
        if self._raw is not None:
            return await self._raw.run(body, write=write, transaction=transaction)
        async with _connect(self._engine) as conn:
            if transaction:
                async with conn.begin():
                    return await conn.run_sync(lambda sync: body(sync.execute))
            conn.execution_options(isolation_level="AUTOCOMMIT")
            return await conn.run_sync(lambda sync: body(sync.execute))

    @property
    def now_sql(self) -> str:
        """The database's clock as epoch seconds: expiry is judged by one clock for all."""
        if self.db.is_sqlite:
            return "((julianday('now') - 2440587.5) * 86400.0)"
        return "extract(epoch from clock_timestamp())::double precision"

    async def set_wal(self) -> None:
        """SQLite: WAL, so workers and drainer read and write side by side.

        Switching needs the file to itself. SQLite waits (busy timeout) for readers, but
        while another connection holds the write lock (another drainer creating its lease
        table, a worker writing) it answers "database is locked" at once. So the switch is
        retried, with backoff, for up to the busy timeout."""
        deadline = anyio.current_time() + self.busy_timeout
        pause = 0.01
        with self.errors("switching to WAL mode in"):
            while True:
                try:
                    async with _connect(self._engine) as conn:
                        conn.execution_options(sqlite_begin="NONE")
                        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    return
                except OperationalError as exc:
                    if "locked" not in str(exc) or anyio.current_time() + pause > deadline:
                        raise
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.5)

    async def has_table(self, name: str) -> bool:
        """Whether table ``name`` exists (False also when the database cannot say)."""
        try:
            return bool(await self.run_sync(lambda c: inspect(c).has_table(name)))
        except SQLAlchemyError:
            return False

    async def create_table(self, name: str, lock_key: int, statements: Sequence[str],
                           then: Callable[[AsyncConnection], Awaitable[None]] | None = None
                           ) -> None:
        """One of drainer's own tables, created if missing: ``statements`` (and ``then``) in
        one write transaction. On PostgreSQL a transaction-scoped advisory lock (``lock_key``)
        serialises drainers starting together, which race in the catalog even with IF NOT
        EXISTS; SQLite's BEGIN IMMEDIATE already does. Something that does not take the lock
        creating it at the same moment is fine if the table is there afterwards."""
        with self.errors(f"creating {name} in"):
            try:
                async with self.write() as conn:
                    if not self.db.is_sqlite:
                        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                           {"key": lock_key})
                    for statement in statements:
                        await conn.execute(text(statement))
                    if then is not None:
                        await then(conn)
            except (IntegrityError, ProgrammingError):
                if not await self.has_table(name):
                    raise

    @staticmethod
    async def add_missing_columns(conn: AsyncConnection, table: str,
                                  columns: Iterable[tuple[str, str]]) -> None:
        """A table of an older drainer lacks the columns added since: add them (``columns``:
        name and type), inside ``conn``'s transaction (a :meth:`create_table` ``then``)."""
        have = set(await conn.run_sync(
            lambda c: {col["name"] for col in inspect(c).get_columns(table)}))
        for name, kind in columns:
            if name not in have:
                await conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))

    async def run_sync(self, fn: Any) -> Any:
        """Run ``fn(sync_connection)`` (schema inspection) on a read connection."""
        async with _connect(self._engine) as conn:
            return await conn.run_sync(fn)

    async def aclose(self) -> None:
        if self._raw is not None:
            self._raw.close()
        await greenlet_spawn(self._engine.dispose)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """A file's device and inode, or None when nothing is at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_sqlite_file(db: DatabaseURL) -> None:
    """A SQLite URL must name an existing SQLite file: checked before anything opens it
    (opening would create an empty one)."""
    path = db.sqlite_path
    assert path is not None
    if not path.exists():
        raise DatabaseError(
            f"SQLite database {path} does not exist; check --database-url / DATABASE_URL"
        )
    if not path.is_file():
        raise DatabaseError(f"SQLite database {path} is not a file")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise DatabaseError(f"cannot read SQLite database {path}: {exc.strerror}") from exc
    if head != SQLITE_MAGIC:
        raise DatabaseError(f"{path} is not a SQLite database (bad header)")


def _import_hint(exc: BaseException) -> str:
    if isinstance(exc, ImportError) and "asyncpg" in str(exc):
        return ("No module named 'asyncpg': install the postgres extra "
                "(pip install 'drainer[postgres]')")
    return first_line(exc)


def _make_engine(db: DatabaseURL, busy_timeout: float) -> SyncEngine:
    """An engine of the URL's asyncio driver, used through :class:`AsyncConnection`."""
    if db.is_sqlite:
        engine = create_engine(db.async_url, connect_args={"timeout": busy_timeout})
        _sqlite_transactions(engine)
        return engine
    try:
        return create_engine(
            db.async_url, pool_size=4, max_overflow=8, connect_args={"timeout": 10}
        )
    except ModuleNotFoundError as exc:  # the quick start installs no PostgreSQL driver
        raise DatabaseError(
            f"{db.redacted} needs the {exc.name} driver, which is not installed: "
            "pip install 'drainer[postgres]'") from None


def _sqlite_transactions(engine: SyncEngine) -> None:
    """Let drainer choose how a transaction starts on SQLite.

    The driver's own implicit transactions are switched off. Reads are single statements and
    run without a BEGIN (each is consistent by itself, and no read snapshot is left open); a
    write transaction starts with BEGIN IMMEDIATE (``sqlite_begin``), so it takes the write
    lock up front and never fails half-way with "database is locked": it waits (busy
    timeout) at BEGIN. Every BEGIN saved is a round trip to aiosqlite's thread saved.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        try:
            dbapi_connection.isolation_level = None
            # drainer reads phases by key and streams the candidate load once: a small page
            # cache per connection (SQLite's default is 2 MiB) keeps the process within its
            # memory budget at 100,000 phases.
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            cursor.close()
        except BaseException:
            # A damaged file fails here, and the pool drops the connection unclosed; with
            # SQLAlchemy before 2.0.46 (Autopack pins 2.0.45) and aiosqlite 0.22+, its
            # worker thread then keeps the process from ever exiting. Close it ourselves.
            dbapi_connection.close()
            raise

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "NONE")
        if mode != "NONE":
            conn.exec_driver_sql(f"BEGIN {mode}")
