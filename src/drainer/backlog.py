"""The backlog store: every SQL statement drainer runs lives here.

Transactions are short and never held while a worker runs: each method opens a connection
from the pool, runs one statement (or a few reads) and commits. Writes are conditional
(``WHERE state IN (non-final)``) so a worker that finishes at the same moment is never
overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import (
    bindparam,
    column,
    event,
    exists,
    func,
    inspect,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import String

from .dburl import DatabaseURL
from .errors import DatabaseError
from .models import NON_FINAL_STATES, PhaseRef, PhaseState
from .schema import Schema

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
FINAL_STATE_POLL_INTERVAL = 0.1
LOAD_CHUNK = 1000  #: rows per fetch while loading candidates (bounds the transient memory)
SQLITE_CACHE_KIB = 512  #: page cache of each of drainer's SQLite connections


@dataclass(frozen=True, slots=True)
class Candidates:
    """What one load of the backlog found."""

    failed: list[PhaseRef]
    queued: list[PhaseRef]  #: QUEUED phases in the scanned runs (never drained)
    failed_per_run: Counter[str] = field(default_factory=Counter)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Backlog:
    """Async access to one backlog database (Autopack schema).

    Use :func:`open_backlog`; call :meth:`check_schema` before anything else.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        db: DatabaseURL,
        telemetry_tables: Iterable[str],
        schema: Schema | None = None,
    ):
        self._engine = engine
        self.db = db
        self.schema = schema = schema or Schema()
        self._wanted_telemetry = tuple(telemetry_tables)
        self.telemetry_tables: tuple[str, ...] = ()
        self.missing_telemetry_tables: tuple[str, ...] = ()
        self.has_updated_at = False
        self._telemetry_stmt: Any = None
        self._outcome_stmt: Any = None
        names = dict.fromkeys([*schema.required_columns, schema.updated_at or schema.state])
        self._phases = table(schema.phases_table, *(column(n) for n in names))
        c = self._phases.c
        self._run, self._phase, self._index = c[schema.run_id], c[schema.phase_id], \
            c[schema.phase_index]
        self._state, self._reason = c[schema.state], c[schema.failure_reason]
        self._updated = c[schema.updated_at] if schema.updated_at else None

    # -- errors ------------------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> DatabaseError:
        return DatabaseError(f"{action} {self.db.redacted} failed: {_first_line(exc)}")

    # -- schema ------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Fail with a message naming what is missing; learn which optional parts exist."""
        try:
            async with self._engine.connect() as conn:
                tables, phase_cols = await conn.run_sync(
                    _inspect_schema, self.schema.phases_table
                )
        except SQLAlchemyError as exc:
            raise self._error("reading the schema of", exc) from exc
        except OSError as exc:
            raise self._error("connecting to", exc) from exc
        sc = self.schema
        if phase_cols is None:
            raise DatabaseError(
                f"{self.db.redacted} has no '{sc.phases_table}' table; is this the backlog "
                f"database? (expected {sc.phases_table}({', '.join(sc.required_columns)}); "
                "other names can be mapped in [tool.drainer.schema])"
            )
        missing = [c for c in sc.required_columns if c not in phase_cols]
        if missing:
            raise DatabaseError(
                f"table '{sc.phases_table}' in {self.db.redacted} lacks column(s) "
                f"{', '.join(missing)}"
            )
        for name in (sc.run_id, sc.phase_id):
            kind = phase_cols[name]
            if not isinstance(kind, String):
                raise DatabaseError(
                    f"column '{sc.phases_table}.{name}' is {kind}, but drainer needs text ids "
                    "(run and phase ids are compared and stored as text)"
                )
        self.has_updated_at = bool(sc.updated_at) and sc.updated_at in phase_cols
        self.telemetry_tables = tuple(t for t in self._wanted_telemetry if t in tables)
        self.missing_telemetry_tables = tuple(
            t for t in self._wanted_telemetry if t not in tables
        )

    @property
    def telemetry_available(self) -> bool:
        return bool(self.telemetry_tables)

    # -- reads -------------------------------------------------------------------------

    async def counts_by_state(self) -> dict[str, int]:
        stmt = select(self._state, func.count()).group_by(self._state)
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        except SQLAlchemyError as exc:
            raise self._error("counting phases in", exc) from exc
        out: dict[str, int] = {}
        for state, n in rows:
            key = self.schema.canonical(state)
            out[key] = out.get(key, 0) + int(n)
        return out

    async def counts_by_run(self) -> dict[str, dict[str, int]]:
        """``{run_id: {state: count}}`` for every run with phases."""
        stmt = select(self._run, self._state, func.count()).group_by(self._run, self._state)
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        except SQLAlchemyError as exc:
            raise self._error("counting phases in", exc) from exc
        out: dict[str, dict[str, int]] = {}
        for run, state, n in rows:
            counts = out.setdefault(str(run), {})
            key = self.schema.canonical(state)
            counts[key] = counts.get(key, 0) + int(n)
        return out

    async def non_final_phases(self) -> tuple[list[tuple[str, str, str, Any]], Any]:
        """Phases in a non-final state with their ``updated_at``, and the database's now."""
        cols = [self._run, self._phase, self._state]
        if self.has_updated_at and self._updated is not None:
            cols.append(self._updated)
        stmt = select(*cols).where(self._state.in_(self.schema.non_final_db))
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
                now = (await conn.execute(select(func.current_timestamp()))).scalar_one()
        except SQLAlchemyError as exc:
            raise self._error("reading non-final phases in", exc) from exc
        out = [(str(r[0]), str(r[1]), self.schema.canonical(r[2]), r[3] if len(r) > 3 else None)
               for r in rows]
        return out, now

    async def load_candidates(self, *, run_id: str | None = None) -> Candidates:
        """All FAILED and QUEUED phases (of ``run_id`` when given), in no particular order."""
        stmt = select(
            self._run, self._phase, self._index, self._state, self._reason
        ).where(self._state.in_([self.schema.db(PhaseState.FAILED),
                                 self.schema.db(PhaseState.QUEUED)]))
        if run_id is not None:
            stmt = stmt.where(self._run == run_id)
        failed: list[PhaseRef] = []
        queued: list[PhaseRef] = []
        per_run: Counter[str] = Counter()
        # Streamed in chunks, with one shared string per run id and state: memory stays
        # proportional to the candidates, not to the driver's row objects.
        try:
            async with self._engine.connect() as conn:
                result = await conn.stream(stmt.execution_options(yield_per=LOAD_CHUNK))
                async for chunk in result.partitions():
                    for run, phase, index, state, reason in chunk:
                        ref = PhaseRef(
                            run_id=sys.intern(str(run)),
                            phase_id=str(phase),
                            phase_index=int(index) if index is not None else 0,
                            state=sys.intern(self.schema.canonical(state)),
                            # Reasons repeat across a backlog: one shared string each.
                            last_failure_reason=None if reason is None else sys.intern(reason),
                        )
                        if ref.state == PhaseState.FAILED:
                            failed.append(ref)
                            per_run[ref.run_id] += 1
                        else:
                            queued.append(ref)
        except SQLAlchemyError as exc:
            raise self._error("loading candidates from", exc) from exc
        return Candidates(failed=failed, queued=queued, failed_per_run=per_run)

    async def read_phase(self, run_id: str, phase_id: str) -> tuple[str, str | None] | None:
        """``(state, last_failure_reason)`` of one phase, or None if it does not exist."""
        stmt = select(self._state, self._reason).where(
            self._run == run_id, self._phase == phase_id
        )
        try:
            async with self._engine.connect() as conn:
                row = (await conn.execute(stmt)).first()
        except SQLAlchemyError as exc:
            raise self._error("reading a phase from", exc) from exc
        return None if row is None else (self.schema.canonical(row[0]), row[1])

    async def read_outcome(self, run_id: str, phase_id: str) -> Outcome:
        """A phase's state, reason and telemetry count, in one statement."""
        try:
            async with self._engine.connect() as conn:
                return await self._outcome_in(conn, run_id, phase_id)
        except SQLAlchemyError as exc:
            raise self._error("reading a phase from", exc) from exc

    async def _outcome_in(self, conn: AsyncConnection, run_id: str, phase_id: str) -> Outcome:
        if self._outcome_stmt is None:
            telemetry = self._telemetry_total()
            columns = [self._state, self._reason]
            if telemetry is not None:
                columns.append(telemetry.label("telemetry"))
            self._outcome_stmt = select(*columns).where(
                self._run == bindparam("r"), self._phase == bindparam("p")
            )
        row = (await conn.execute(self._outcome_stmt, {"r": run_id, "p": phase_id})).first()
        if row is None:
            # The phase is gone; its telemetry (if any) still counts.
            return Outcome(None, await self._telemetry_in(conn, run_id, phase_id))
        count = int(row[2]) if len(row) > 2 and row[2] is not None else None
        return Outcome((self.schema.canonical(row[0]), row[1]), count)

    async def wait_final_state(self, run_id: str, phase_id: str, *, wait: float) -> Outcome:
        """Read a phase and its telemetry; while it is non-final, re-read it for up to
        ``wait`` seconds (and count telemetry once more at the end).

        A worker that exits cleanly may have committed through another connection a moment
        before; the short re-read avoids judging it on a stale read.
        """
        outcome = await self.read_outcome(run_id, phase_id)
        if wait <= 0 or outcome.row is None or outcome.row[0] not in NON_FINAL_STATES:
            return outcome
        row: tuple[str, str | None] | None = outcome.row
        with anyio.move_on_after(wait):
            while row is not None and row[0] in NON_FINAL_STATES:
                await anyio.sleep(FINAL_STATE_POLL_INTERVAL)
                row = await self.read_phase(run_id, phase_id)  # cheap: no telemetry count
        return await self.read_outcome(run_id, phase_id)

    async def telemetry_count(self, run_id: str, phase_id: str) -> int | None:
        """Telemetry rows for one phase across the telemetry tables; None when unavailable."""
        if not self.telemetry_tables:
            return None
        try:
            async with self._engine.connect() as conn:
                return await self._telemetry_in(conn, run_id, phase_id)
        except SQLAlchemyError as exc:
            raise self._error("counting telemetry in", exc) from exc

    def _telemetry_total(self) -> Any:
        """A scalar expression summing the phase's rows over every telemetry table (bound
        parameters ``r`` and ``p``), or None when there are none."""
        if not self.telemetry_tables:
            return None
        sc = self.schema
        total: Any = None
        for name in self.telemetry_tables:
            t = table(name, column(sc.telemetry_run_id), column(sc.telemetry_phase_id))
            count = (
                select(func.count()).select_from(t)
                .where(t.c[sc.telemetry_run_id] == bindparam("r"),
                       t.c[sc.telemetry_phase_id] == bindparam("p"))
                .scalar_subquery()
            )
            total = count if total is None else total + count
        return total

    async def _telemetry_in(
        self, conn: AsyncConnection, run_id: str, phase_id: str
    ) -> int | None:
        if not self.telemetry_tables:
            return None
        if self._telemetry_stmt is None:
            self._telemetry_stmt = select(self._telemetry_total())  # one round trip for all
        result = await conn.execute(self._telemetry_stmt, {"r": run_id, "p": phase_id})
        return int(result.scalar_one())

    # -- writes ------------------------------------------------------------------------

    async def restore_failed(self, run_id: str, phase_id: str, reason: str) -> bool:
        """Set a phase left non-final back to FAILED. True when a row was changed."""
        try:
            async with self._write() as conn:
                return await self._restore_in(conn, run_id, phase_id, reason)
        except SQLAlchemyError as exc:
            raise self._error("restoring a phase in", exc) from exc

    @asynccontextmanager
    async def _write(self, *, single: bool = False) -> AsyncIterator[AsyncConnection]:
        """A short write transaction (BEGIN IMMEDIATE on SQLite). ``single``: the caller
        runs one statement, atomic by itself, so SQLite needs no explicit BEGIN."""
        async with self._engine.connect() as conn:
            if self.db.is_sqlite and not single:
                conn = await conn.execution_options(sqlite_begin="IMMEDIATE")
            async with conn.begin():
                yield conn

    # -- leases (DESIGN.md §6) ---------------------------------------------------------

    def _now_sql(self) -> str:
        """The database's clock as epoch seconds: expiry is judged by one clock for all."""
        if self.db.is_sqlite:
            return "((julianday('now') - 2440587.5) * 86400.0)"
        return "extract(epoch from clock_timestamp())::double precision"

    async def ensure_lease_table(self) -> None:
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {LEASE_TABLE} ("
            "run_id VARCHAR(512) PRIMARY KEY, session_id VARCHAR(64) NOT NULL, "
            "attempt_id VARCHAR(64) NOT NULL, phase_id VARCHAR(512) NOT NULL, "
            "host VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, "
            "acquired_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL)"
        )
        try:
            async with self._write() as conn:
                if not self.db.is_sqlite:
                    # Two drainers starting together race in PostgreSQL's catalog even with
                    # IF NOT EXISTS ("type ... already exists"); a transaction-scoped advisory
                    # lock makes the second wait and then find the table. SQLite's BEGIN
                    # IMMEDIATE already serialises writers.
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _LEASE_DDL_LOCK})
                await conn.execute(text(ddl))
        except (IntegrityError, ProgrammingError) as exc:
            # Something that does not take the lock (an older drainer, a migration tool)
            # created it at the same moment: fine if the table is there now.
            if not await self._has_table(LEASE_TABLE):
                raise self._error(f"creating {LEASE_TABLE} in", exc) from exc
        except SQLAlchemyError as exc:
            raise self._error(f"creating {LEASE_TABLE} in", exc) from exc

    async def _has_table(self, name: str) -> bool:
        try:
            async with self._engine.connect() as conn:
                return bool(await conn.run_sync(lambda c: inspect(c).has_table(name)))
        except SQLAlchemyError:
            return False

    async def claim_run(self, lease: Lease, ttl: float) -> Claim:
        """Claim ``lease.run_id``: insert the lease, or take over an expired one after
        restoring the phase it names (one transaction); then read ``lease.phase_id`` and its
        telemetry count under the lease (the "before" of the attempt)."""
        params = lease.params(ttl)
        try:
            # The common case is one statement, atomic by itself: nobody holds the run.
            async with self._write(single=True) as conn:
                inserted = (await conn.execute(self._insert_lease(if_absent=True),
                                               params)).rowcount
            if not inserted:
                async with self._write() as conn:
                    holder = await self._take_over_expired(conn, params)
                    if holder is not None:
                        return Claim(holder=holder)
        except IntegrityError:
            # Another drainer inserted first (PostgreSQL, between our two statements).
            return Claim(holder=Lease(run_id=lease.run_id, session_id="?", attempt_id="?",
                                      phase_id="?", host="?", pid=0))
        except SQLAlchemyError as exc:
            raise self._error("claiming a lease in", exc) from exc
        try:
            outcome = await self.read_outcome(lease.run_id, lease.phase_id)
        except BaseException:
            # No attempt will follow: give the run back now rather than at expiry.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                    contextlib.suppress(DatabaseError):
                await self.release_lease(lease.run_id, lease.attempt_id)
            raise
        return Claim(holder=None, phase=outcome.row, telemetry=outcome.telemetry)

    def _insert_lease(self, *, if_absent: bool) -> Any:
        """INSERT of a new lease row (parameters: :meth:`Lease.params`); ``if_absent``: do
        nothing (rowcount 0) when the run already has one."""
        now = self._now_sql()
        verb = "INSERT OR IGNORE INTO" if if_absent and self.db.is_sqlite else "INSERT INTO"
        conflict = " ON CONFLICT (run_id) DO NOTHING" if if_absent and not self.db.is_sqlite \
            else ""
        return text(
            f"{verb} {LEASE_TABLE} (run_id, session_id, attempt_id, phase_id, host, pid, "
            f"acquired_at, heartbeat_at, expires_at) VALUES (:run_id, :session_id, "
            f":attempt_id, :phase_id, :host, :pid, {now}, {now}, {now} + :ttl){conflict}"
        )

    async def _take_over_expired(
        self, conn: AsyncConnection, params: dict[str, Any]
    ) -> Lease | None:
        """The run is leased: its live holder, or None once an expired lease is taken over
        (the phase it names restored first)."""
        now = self._now_sql()
        lock = "" if self.db.is_sqlite else " FOR UPDATE"
        row = (await conn.execute(text(
            f"SELECT run_id, session_id, attempt_id, phase_id, host, pid, acquired_at, "
            f"heartbeat_at, expires_at, expires_at < {now} AS expired "
            f"FROM {LEASE_TABLE} WHERE run_id = :run_id{lock}"
        ), params)).first()
        if row is None:
            # Released between our insert and this read (PostgreSQL): it is free now.
            await conn.execute(self._insert_lease(if_absent=False), params)
            return None
        if not row.expired:
            return Lease.from_row(row)
        await self._restore_in(conn, str(row.run_id), str(row.phase_id), _expired_reason(row))
        await conn.execute(text(
            f"UPDATE {LEASE_TABLE} SET session_id = :session_id, "
            f"attempt_id = :attempt_id, phase_id = :phase_id, host = :host, "
            f"pid = :pid, acquired_at = {now}, heartbeat_at = {now}, "
            f"expires_at = {now} + :ttl WHERE run_id = :run_id"
        ), params)
        return None

    async def finish_attempt(
        self, run_id: str, phase_id: str, attempt_id: str, *, restore: str | None, release: bool
    ) -> bool:
        """After an attempt, in one transaction: restore the phase to FAILED with reason
        ``restore`` (when given and it is still non-final) and release the lease. Without
        ``release`` (our lease was lost) the restore happens only if no other drainer leases
        the run now. Returns whether the phase was restored."""
        if restore is None and not release:
            return False
        try:
            # A lone release is one statement: no explicit transaction needed.
            async with self._write(single=restore is None) as conn:
                restored = False
                if restore is not None:
                    restored = await self._restore_in(conn, run_id, phase_id, restore,
                                                      unless_leased=not release)
                if release:
                    await conn.execute(text(
                        f"DELETE FROM {LEASE_TABLE} WHERE run_id = :run_id "
                        "AND attempt_id = :attempt_id"
                    ), {"run_id": run_id, "attempt_id": attempt_id})
        except SQLAlchemyError as exc:
            raise self._error("finishing an attempt in", exc) from exc
        return restored

    async def renew_lease(self, run_id: str, attempt_id: str, ttl: float) -> bool:
        now = self._now_sql()
        try:
            async with self._write() as conn:
                result = await conn.execute(text(
                    f"UPDATE {LEASE_TABLE} SET heartbeat_at = {now}, expires_at = {now} + :ttl "
                    "WHERE run_id = :run_id AND attempt_id = :attempt_id"
                ), {"ttl": ttl, "run_id": run_id, "attempt_id": attempt_id})
        except SQLAlchemyError as exc:
            raise self._error("renewing a lease in", exc) from exc
        return bool(result.rowcount)

    async def release_lease(self, run_id: str, attempt_id: str) -> None:
        try:
            async with self._write() as conn:
                await conn.execute(text(
                    f"DELETE FROM {LEASE_TABLE} WHERE run_id = :run_id "
                    "AND attempt_id = :attempt_id"
                ), {"run_id": run_id, "attempt_id": attempt_id})
        except SQLAlchemyError as exc:
            raise self._error("releasing a lease in", exc) from exc

    async def release_session_leases(self, session_id: str) -> int:
        """On resume: leases the crashed run of this session still held."""
        try:
            async with self._write() as conn:
                result = await conn.execute(text(
                    f"DELETE FROM {LEASE_TABLE} WHERE session_id = :session_id"
                ), {"session_id": session_id})
        except SQLAlchemyError as exc:
            raise self._error("releasing leases in", exc) from exc
        return int(result.rowcount or 0)

    async def sweep_expired_leases(self) -> list[Lease]:
        """Restore the phase each expired lease names (if non-final), then delete the lease."""
        now = self._now_sql()
        lock = "" if self.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
        swept: list[Lease] = []
        try:
            async with self._write() as conn:
                rows = (await conn.execute(text(
                    f"SELECT run_id, session_id, attempt_id, phase_id, host, pid, acquired_at, "
                    f"heartbeat_at, expires_at FROM {LEASE_TABLE} "
                    f"WHERE expires_at < {now}{lock}"
                ))).all()
                for row in rows:
                    await self._restore_in(conn, str(row.run_id), str(row.phase_id),
                                           _expired_reason(row))
                    await conn.execute(text(
                        f"DELETE FROM {LEASE_TABLE} WHERE run_id = :run_id "
                        "AND attempt_id = :attempt_id"
                    ), {"run_id": row.run_id, "attempt_id": row.attempt_id})
                    swept.append(Lease.from_row(row))
        except SQLAlchemyError as exc:
            raise self._error("sweeping expired leases in", exc) from exc
        return swept

    async def live_leases(self) -> list[tuple[Lease, float]]:
        """Leases not expired, with their age in seconds (for status)."""
        now = self._now_sql()
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(text(
                    f"SELECT run_id, session_id, attempt_id, phase_id, host, pid, acquired_at, "
                    f"heartbeat_at, expires_at, {now} - acquired_at AS age "
                    f"FROM {LEASE_TABLE} WHERE expires_at >= {now} ORDER BY run_id"
                ))).all()
        except SQLAlchemyError:
            return []  # no lease table yet: no leases
        return [(Lease.from_row(r), float(r.age)) for r in rows]

    async def _restore_in(
        self,
        conn: AsyncConnection,
        run_id: str,
        phase_id: str,
        reason: str,
        *,
        unless_leased: bool = False,
    ) -> bool:
        """Set a non-final phase to FAILED. ``unless_leased``: only while no drainer holds a
        lease on its run (after our own lease was lost, the run may have a new owner)."""
        p = self._phases
        sc = self.schema
        values: dict[str, Any] = {sc.state: sc.db(PhaseState.FAILED), sc.failure_reason: reason}
        if self.has_updated_at and sc.updated_at:
            values[sc.updated_at] = func.current_timestamp()
        stmt = update(p).where(self._run == run_id, self._phase == phase_id,
                               self._state.in_(self.schema.non_final_db))
        if unless_leased:
            leases = table(LEASE_TABLE, column("run_id"))
            stmt = stmt.where(~exists().where(leases.c.run_id == run_id))
        result = await conn.execute(stmt.values(**values))
        return bool(result.rowcount)

    async def prepare_for_writes(self) -> None:
        """Called once input is known good: SQLite gets WAL so workers and drainer coexist,
        and the lease table is created if missing."""
        if self.db.is_sqlite:
            try:
                async with self._engine.connect() as conn:
                    conn = await conn.execution_options(sqlite_begin="NONE")
                    await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            except SQLAlchemyError as exc:
                raise self._error("switching to WAL mode in", exc) from exc
        await self.ensure_lease_table()

    async def aclose(self) -> None:
        await self._engine.dispose()


LEASE_TABLE = "drainer_leases"
# Advisory lock key taken while creating LEASE_TABLE on PostgreSQL ("drainer" in ASCII).
_LEASE_DDL_LOCK = 0x647261696E6572


@dataclass(frozen=True, slots=True)
class Outcome:
    """A phase as read after an attempt: ``(state, reason)`` (None: the phase is gone) and
    its telemetry rows (None: no telemetry tables)."""

    row: tuple[str, str | None] | None
    telemetry: int | None


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a lease claim: who blocks it, or the phase as read under the lease."""

    holder: Lease | None  #: a live lease of someone else: the run is not ours now
    phase: tuple[str, str | None] | None = None  #: (state, reason); None: the phase is gone
    telemetry: int | None = None  #: telemetry rows of the phase before the attempt


@dataclass(frozen=True, slots=True)
class Lease:
    """One row of ``drainer_leases``: who drains which run right now."""

    run_id: str
    session_id: str
    attempt_id: str
    phase_id: str
    host: str
    pid: int
    expires_at: float | None = None

    def params(self, ttl: float) -> dict[str, Any]:
        return {"run_id": self.run_id, "session_id": self.session_id,
                "attempt_id": self.attempt_id, "phase_id": self.phase_id, "host": self.host,
                "pid": self.pid, "ttl": ttl}

    @classmethod
    def from_row(cls, row: Any) -> Lease:
        return cls(run_id=str(row.run_id), session_id=str(row.session_id),
                   attempt_id=str(row.attempt_id), phase_id=str(row.phase_id),
                   host=str(row.host), pid=int(row.pid),
                   expires_at=float(row.expires_at) if row.expires_at is not None else None)


def _expired_reason(row: Any) -> str:
    return (f"drainer: lease expired (drainer {row.host} pid {row.pid}, session "
            f"{row.session_id} stopped renewing it); restored to FAILED")


def _inspect_schema(
    conn: Connection, phases: str
) -> tuple[set[str], dict[str, Any] | None]:
    """The tables, and the phases table's columns with their types."""
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    if phases not in tables:
        return tables, None
    return tables, {c["name"]: c["type"] for c in insp.get_columns(phases)}


def _check_sqlite_file(db: DatabaseURL) -> None:
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


def make_engine(db: DatabaseURL) -> AsyncEngine:
    if db.is_sqlite:
        # timeout = sqlite3's busy timeout: wait for a worker's write lock instead of failing.
        engine = create_async_engine(db.async_url, connect_args={"timeout": 30})
        _sqlite_transactions(engine)
        return engine
    return create_async_engine(
        db.async_url, pool_size=4, max_overflow=8, connect_args={"timeout": 10}
    )


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Let drainer choose how a transaction starts on SQLite.

    The driver's own implicit transactions are switched off. Reads are single statements and
    run without a BEGIN (each is consistent by itself, and no read snapshot is left open); a
    write transaction starts with BEGIN IMMEDIATE (``sqlite_begin``), so it takes the write
    lock up front and never fails half-way with "database is locked": it waits (busy
    timeout) at BEGIN. Every BEGIN saved is a round trip to aiosqlite's thread saved.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # drainer reads phases by key and streams the candidate load once: a small page
        # cache per connection (SQLite's default is 2 MiB) keeps the process within its
        # memory budget at 100,000 phases.
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "NONE")
        if mode != "NONE":
            conn.exec_driver_sql(f"BEGIN {mode}")


@asynccontextmanager
async def open_backlog(
    db: DatabaseURL, telemetry_tables: Iterable[str] = (), schema: Schema | None = None
) -> AsyncIterator[Backlog]:
    """Open and schema-check a backlog; nothing is written here."""
    if db.is_sqlite:
        _check_sqlite_file(db)
    try:
        engine = make_engine(db)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(f"cannot open {db.redacted}: {_first_line(exc)}") from exc
    backlog = Backlog(engine, db, telemetry_tables, schema)
    try:
        try:
            await backlog.check_schema()
        except DBAPIError as exc:
            raise backlog._error("connecting to", exc) from exc
        yield backlog
    finally:
        with anyio.CancelScope(shield=True):
            await backlog.aclose()
