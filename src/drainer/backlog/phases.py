"""The phases table (and the telemetry tables counted per phase): every statement on them.

Writes are conditional (``WHERE state IN (non-final)``) so a worker that finishes at the same
moment is never overwritten. States are translated at this edge: the rest of drainer sees
canonical :class:`~drainer.models.PhaseState` names whatever the database stores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
from sqlalchemy import (
    and_,
    bindparam,
    column,
    exists,
    func,
    inspect,
    literal,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import Date, DateTime, String

from ..errors import DatabaseError
from ..models import NON_FINAL_STATES, Candidates, PhaseState
from ..reasons import with_note
from ..schema import Schema
from ._engine import AsyncConnection, Engine, Execute

LOAD_CHUNK = 1000  #: rows per fetch while loading candidates (bounds the transient memory)
#: a load of changes reaches this much further back than the previous load's start: slack for
#: clocks (writers such as Autopack stamp ``updated_at`` with their own clock) and for
#: transactions that stamped a row before that load but committed after it
CHANGES_MARGIN = 60.0
FINAL_STATE_POLL_INTERVAL = 0.1

PhaseRow = tuple[str, str | None]  #: (canonical state, last_failure_reason)


class Stale(NamedTuple):
    """A phase ``--restore-stale-after`` would restore, as it is now."""

    run_id: str
    phase_id: str
    state: str
    phase_index: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A phase as read after an attempt: ``row`` (None: the phase is gone) and its telemetry
    rows (None: no telemetry tables)."""

    row: PhaseRow | None
    telemetry: int | None


class Phases:
    """Reads and conditional writes of the phases table; see :meth:`check_schema` first."""

    def __init__(self, engine: Engine, schema: Schema, telemetry_tables: tuple[str, ...]):
        self._engine = engine
        self.schema = sc = schema
        self._wanted_telemetry = telemetry_tables
        self.telemetry_tables: tuple[str, ...] = ()
        self.missing_telemetry_tables: tuple[str, ...] = ()
        self.has_updated_at = False
        self._updated_tz = False  #: ``updated_at`` holds time zones (else: UTC, as Autopack's)
        self.ages_known = False
        self._telemetry_stmt: Any = None
        self._outcome_stmt: Any = None
        names = dict.fromkeys([*sc.required_columns, sc.updated_at or sc.state])
        self._table = table(sc.phases_table, *(column(n) for n in names))
        c = self._table.c
        self._run, self._phase, self._index = c[sc.run_id], c[sc.phase_id], c[sc.phase_index]
        self._state, self._reason = c[sc.state], c[sc.failure_reason]
        self._updated = c[sc.updated_at] if sc.updated_at else None

    @property
    def telemetry_available(self) -> bool:
        return bool(self.telemetry_tables)

    # -- schema --------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Fail with a message naming what is missing; learn which optional parts exist."""
        sc = self.schema
        with self._engine.errors("reading the schema of"):
            tables, phase_cols = await self._engine.run_sync(
                lambda conn: _inspect_schema(conn, sc.phases_table)
            )
        redacted = self._engine.db.redacted
        if phase_cols is None:
            raise DatabaseError(
                f"{redacted} has no '{sc.phases_table}' table; is this the backlog "
                f"database? (expected {sc.phases_table}({', '.join(sc.required_columns)}); "
                "other names can be mapped in [tool.drainer.schema])"
            )
        missing = [c for c in sc.required_columns if c not in phase_cols]
        if missing:
            raise DatabaseError(
                f"table '{sc.phases_table}' in {redacted} lacks column(s) {', '.join(missing)}"
            )
        for name in (sc.run_id, sc.phase_id):
            kind = phase_cols[name]
            if not isinstance(kind, String):
                raise DatabaseError(
                    f"column '{sc.phases_table}.{name}' is {kind}, but drainer needs text ids "
                    "(run and phase ids are compared and stored as text)"
                )
        self.has_updated_at = bool(sc.updated_at) and sc.updated_at in phase_cols
        kind = phase_cols.get(sc.updated_at or "")
        self._updated_tz = bool(getattr(kind, "timezone", False))
        #: ages can be judged from updated_at: any column on SQLite (see _stamp), a date
        #: and time column elsewhere
        self.ages_known = self.has_updated_at and (
            self._engine.db.is_sqlite or isinstance(kind, DateTime | Date))
        self.telemetry_tables = tuple(t for t in self._wanted_telemetry if t in tables)
        self.missing_telemetry_tables = tuple(
            t for t in self._wanted_telemetry if t not in tables
        )

    # -- reads ---------------------------------------------------------------------------

    async def _all(self, action: str, stmt: Any) -> list[Any]:
        """Every row of one read statement (retried on a transient fault)."""
        async def read() -> list[Any]:
            async with self._engine.read() as conn:
                return list((await conn.execute(stmt)).all())

        return await self._engine.retry(action, read)

    async def counts_by_state(self) -> dict[str, int]:
        stmt = select(self._state, func.count()).group_by(self._state)
        rows = await self._all("counting phases in", stmt)
        out: dict[str, int] = {}
        for state, n in rows:
            key = self.schema.canonical(state)
            out[key] = out.get(key, 0) + int(n)
        return out

    async def counts_by_run(self) -> dict[str, dict[str, int]]:
        """``{run_id: {state: count}}`` for every run with phases."""
        stmt = select(self._run, self._state, func.count()).group_by(self._run, self._state)
        rows = await self._all("counting phases in", stmt)
        out: dict[str, dict[str, int]] = {}
        for run, state, n in rows:
            counts = out.setdefault(str(run), {})
            key = self.schema.canonical(state)
            counts[key] = counts.get(key, 0) + int(n)
        return out

    async def runs_in(self, states: tuple[PhaseState, ...]) -> list[str]:
        """The ids of the runs with a phase in one of ``states``."""
        stmt = select(self._run).where(
            self._state.in_([self.schema.db(st) for st in states])).distinct()
        return [str(r[0]) for r in await self._all("listing runs in", stmt)]

    async def non_final(self) -> tuple[list[tuple[str, str, str, Any]], Any]:
        """Phases in a non-final state with their ``updated_at``, and the database's now."""
        cols = [self._run, self._phase, self._state]
        if self.has_updated_at and self._updated is not None:
            cols.append(self._updated)
        stmt = select(*cols).where(self._state.in_(self.schema.non_final_db))
        with self._engine.errors("reading non-final phases in"):
            async with self._engine.read() as conn:
                rows = (await conn.execute(stmt)).all()
                now = (await conn.execute(select(func.current_timestamp()))).scalar_one()
        out = [(str(r[0]), str(r[1]), self.schema.canonical(r[2]), r[3] if len(r) > 3 else None)
               for r in rows]
        return out, now

    async def load_candidates(self, *, run_id: str | None = None) -> Candidates:
        """All FAILED and QUEUED phases (of ``run_id`` when given), in no particular order."""
        return await self._load(self._candidates(run_id))

    async def load_changed(
        self, seconds: float, *, run_id: str | None = None
    ) -> tuple[Candidates, set[str]] | None:
        """The runs with a phase whose ``updated_at`` lies within the last ``seconds`` (plus
        :data:`CHANGES_MARGIN`) by the database's clock, and their FAILED and QUEUED phases
        (a changed run with none left has no rows); None when the table has no
        ``updated_at``. ``updated_at`` without a time zone is taken as UTC, as Autopack
        writes it. A writer that changes a phase without stamping it goes unseen here; the
        full loads find it."""
        if not self.ages_known or self._updated is None:
            return None
        changed_runs = select(self._run).where(
            self._age_below(max(0.0, seconds) + CHANGES_MARGIN)).distinct()
        if run_id is not None:
            changed_runs = changed_runs.where(self._run == run_id)
        runs = {str(r[0]) for r in await self._all("reading changed phases in", changed_runs)}
        if not runs:
            return Candidates(), runs
        # (A subquery, not the ids: any number of runs fits. A run changed between the two
        # statements comes with its rows, and counts as changed.)
        found = await self._load(self._candidates(run_id).where(self._run.in_(changed_runs)))
        return found, runs.union(found.runs)

    def _now(self) -> Any:
        """SQL: the database's clock in ``updated_at``'s terms (UTC when the column has no
        time zone, as Autopack writes it; not the server's local time)."""
        if self._engine.db.is_sqlite or self._updated_tz:
            return func.current_timestamp()  # SQLite's is UTC
        return func.timezone("UTC", func.now())

    def _ago(self, seconds: float) -> Any:
        """SQL: the database's clock ``seconds`` ago, comparable with ``updated_at`` (on
        SQLite, as a Julian day: see :meth:`_stamp`)."""
        if self._engine.db.is_sqlite:
            return func.julianday("now", bindparam("ago", f"-{seconds:.3f} seconds"))
        return self._now() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("ago", seconds))

    def _stamp(self) -> Any:
        """SQL: ``updated_at`` as :meth:`_ago` compares it. SQLite keeps timestamps as text
        in several shapes (``2026-01-01 10:00:00.123456``, ``2026-01-01T10:00:00``):
        compared as Julian days, not as strings; one it cannot read is NULL (no age)."""
        assert self._updated is not None
        return func.julianday(self._updated) if self._engine.db.is_sqlite else self._updated

    def _age_below(self, seconds: float) -> Any:
        """SQL: ``updated_at`` lies within the last ``seconds``."""
        return self._stamp() >= self._ago(seconds)

    def _stale(self, seconds: float, lease_table: str | None,
               run_id: str | None = None) -> list[Any]:
        """Conditions: the phase is non-final, ``updated_at`` is more than ``seconds`` old,
        and no drainer leases its run (``lease_table``: None when there is none yet); of
        ``run_id`` only, when given."""
        assert self._updated is not None
        where = [self._state.in_(self.schema.non_final_db), self._stamp() < self._ago(seconds)]
        if run_id is not None:
            where.append(self._run == run_id)
        if lease_table is not None:
            leases = table(lease_table, column("run_id"))
            where.append(~exists().where(leases.c.run_id == self._run))
        return where

    async def stale(self, seconds: float, *, lease_table: str | None,
                    run_id: str | None = None,
                    runs: Callable[[str], bool] = lambda _run: True) -> list[Stale] | None:
        """Phases left non-final (QUEUED, EXECUTING, GATE, CI_RUNNING) for more than
        ``seconds`` by ``updated_at`` and the database's clock, whose run no drainer leases,
        of ``run_id`` when given, and that ``runs`` accepts; by run and phase. None without
        a date-and-time ``updated_at``."""
        if not self.ages_known or self._updated is None:
            return None
        stmt = select(self._run, self._phase, self._state, self._index, self._reason).where(
            *self._stale(seconds, lease_table, run_id)).order_by(self._run, self._phase)
        rows = await self._all("reading stale phases in", stmt)
        return [Stale(str(r[0]), str(r[1]), self.schema.canonical(r[2]),
                      int(r[3]) if r[3] is not None else 0, r[4])
                for r in rows if runs(str(r[0]))]

    async def restore_stale(
        self, seconds: float, note: Callable[[str], str], *, lease_table: str,
        run_id: str | None = None, runs: Callable[[str], bool] = lambda _run: True,
    ) -> list[tuple[str, str, str, str]] | None:
        """Restore every :meth:`stale` phase to FAILED in one transaction, each keeping its
        worker's reason with ``note(state)`` added; each row is written only if it is still
        stale then. ``(run, phase, state before, reason written)``; None without a
        date-and-time ``updated_at``."""
        if not self.ages_known or self._updated is None:
            return None
        where = self._stale(seconds, lease_table, run_id)
        sc = self.schema
        found = select(self._run, self._phase, self._state, self._reason).where(*where) \
            .order_by(self._run, self._phase)
        if not self._engine.db.is_sqlite:
            found = found.with_for_update()

        async def restore() -> list[tuple[str, str, str, str]]:
            done: list[tuple[str, str, str, str]] = []
            async with self._engine.write() as conn:
                for run_id, phase_id, state, reason in (await conn.execute(found)).all():
                    if not runs(str(run_id)):
                        continue
                    state = sc.canonical(state)
                    written = with_note(reason, note(state))
                    result = await conn.execute(
                        update(self._table)
                        .where(*where, self._run == run_id, self._phase == phase_id)
                        .values({sc.state: sc.db(PhaseState.FAILED),
                                 sc.failure_reason: written,
                                 sc.updated_at: self._now()}))
                    if result.rowcount:
                        done.append((str(run_id), str(phase_id), state, written))
            return done

        return await self._engine.retry("restoring stale phases in", restore)

    def _candidates(self, run_id: str | None) -> Any:
        stmt = select(
            self._run, self._phase, self._index, self._state, self._reason
        ).where(self._state.in_(self._candidate_states()))
        return stmt if run_id is None else stmt.where(self._run == run_id)

    def _candidate_states(self) -> list[str]:
        return [self.schema.db(PhaseState.FAILED), self.schema.db(PhaseState.QUEUED)]

    def is_candidate(self, run: Any, phase: Any | None = None) -> Any:
        """SQL: the run ``run`` (a column of another table) has a candidate phase (FAILED or
        QUEUED); given ``phase``, that phase is one."""
        # (Comparisons, not IN: an IN list is expanded at execution, which the SQLite
        # hot path's precompiled statements do not do.)
        where = [self._run == run, or_(*(self._state == v for v in self._candidate_states()))]
        if phase is not None:
            where.append(self._phase == phase)
        return exists(select(literal(1)).select_from(self._table).where(*where))

    async def _load(self, stmt: Any) -> Candidates:
        canonical = self.schema.canonical

        # Streamed in chunks into columns, grouped by run (ORDER BY), with one shared string
        # per run id and reason: memory stays proportional to the candidates, not to the
        # driver's rows. The sort runs in the database (SQLite spills it to disk).
        # (Each fetch of a chunk waits on the driver, which lets the event loop run.)
        def take(sync: Connection) -> Candidates:
            found = Candidates()
            result = sync.execute(
                stmt.order_by(self._run).execution_options(yield_per=LOAD_CHUNK))
            run_id = ""
            for chunk in result.partitions():
                for run, phase, index, state, reason in chunk:
                    if run != run_id:
                        run_id = sys.intern(str(run))
                    found.add(run_id, str(phase), int(index) if index is not None else 0,
                              canonical(state), None if reason is None else sys.intern(reason))
            return found.done()

        async def load() -> Candidates:
            async with self._engine.read() as conn:
                return await conn.run_sync(take)

        return await self._engine.retry("loading candidates from", load)

    async def read(self, run_id: str, phase_id: str) -> PhaseRow | None:
        """``(state, last_failure_reason)`` of one phase, or None if it does not exist."""
        stmt = select(self._state, self._reason).where(
            self._run == run_id, self._phase == phase_id
        )
        rows = await self._all("reading a phase from", stmt)
        return None if not rows else (self.schema.canonical(rows[0][0]), rows[0][1])

    async def read_outcome(self, run_id: str, phase_id: str, *, writer: bool = False
                           ) -> Outcome:
        """A phase's state, reason and telemetry count, in one statement. ``writer``: on
        the connection writes use (SQLite: when a write follows at once, one connection's
        page cache is refreshed after the worker's writes instead of two)."""
        async def read() -> Outcome:
            return await self._engine.run(
                lambda execute: self.outcome_with(execute, run_id, phase_id), write=writer)

        return await self._engine.retry("reading a phase from", read)

    def outcome_with(self, execute: Execute, run_id: str, phase_id: str) -> Outcome:
        """:meth:`read_outcome` as part of a round trip (:meth:`Engine.run`)."""
        if self._outcome_stmt is None:
            telemetry = self._telemetry_total()
            columns = [self._state, self._reason]
            if telemetry is not None:
                columns.append(telemetry.label("telemetry"))
            self._outcome_stmt = select(*columns).where(
                self._run == bindparam("r"), self._phase == bindparam("p")
            )
        row = execute(self._outcome_stmt, {"r": run_id, "p": phase_id}).first()
        if row is None:
            # The phase is gone; its telemetry (if any) still counts.
            return Outcome(None, self._telemetry_with(execute, run_id, phase_id))
        count = int(row[2]) if len(row) > 2 and row[2] is not None else None
        return Outcome((self.schema.canonical(row[0]), row[1]), count)

    def outcome_along(self, first: list[Any]) -> Any:
        """One SELECT of the scalar expressions ``first``, then what :meth:`outcome_of`
        reads: the phase (bound parameters ``r`` and ``p``) and its telemetry count, in a
        row that is there whether or not the phase is. For PostgreSQL, where ``first`` are
        the counts of data-modifying CTEs: a lease's claim or release and the read of its
        phase in one statement, one round trip."""
        one = select(literal(1).label("one")).subquery("one")
        telemetry = self._telemetry_total()
        columns = [*first, self._run, self._state, self._reason]
        if telemetry is not None:
            columns.append(telemetry.label("telemetry"))
        return select(*columns).select_from(one.outerjoin(
            self._table, and_(self._run == bindparam("r"), self._phase == bindparam("p"))))

    def outcome_of(self, row: Any, start: int) -> Outcome:
        """The :class:`Outcome` in ``row[start:]`` of an :meth:`outcome_along` statement."""
        present, state, reason = row[start:start + 3]
        telemetry = row[start + 3] if len(row) > start + 3 else None
        return Outcome(None if present is None else (self.schema.canonical(state), reason),
                       None if telemetry is None else int(telemetry))

    def state_is_non_final(self, state: Any) -> Any:
        """SQL: ``state`` (a column of the phases table's state) holds a non-final state."""
        return state.in_(self.schema.non_final_db)

    def state_of(self) -> Any:
        """A SELECT of the phase's state (bound parameters ``r`` and ``p``)."""
        return select(self._state).where(self._run == bindparam("r"),
                                         self._phase == bindparam("p"))

    async def wait_final_state(self, run_id: str, phase_id: str, *, wait: float) -> Outcome:
        """Read a phase and its telemetry; while it is non-final, re-read it for up to
        ``wait`` seconds (and count telemetry once more at the end).

        A worker that exits cleanly may have committed through another connection a moment
        before; the short re-read avoids judging it on a stale read.
        """
        outcome = await self.read_outcome(run_id, phase_id)
        if wait <= 0 or outcome.row is None or outcome.row[0] not in NON_FINAL_STATES:
            return outcome
        row: PhaseRow | None = outcome.row
        with anyio.move_on_after(wait):
            while row is not None and row[0] in NON_FINAL_STATES:
                await anyio.sleep(FINAL_STATE_POLL_INTERVAL)
                row = await self.read(run_id, phase_id)  # cheap: no telemetry count
        return await self.read_outcome(run_id, phase_id)

    async def telemetry_count(self, run_id: str, phase_id: str) -> int | None:
        """Telemetry rows for one phase across the telemetry tables; None when unavailable."""
        if not self.telemetry_tables:
            return None

        async def count() -> int | None:
            return await self._engine.run(
                lambda execute: self._telemetry_with(execute, run_id, phase_id))

        return await self._engine.retry("counting telemetry in", count)

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

    def _telemetry_with(self, execute: Execute, run_id: str, phase_id: str) -> int | None:
        if not self.telemetry_tables:
            return None
        if self._telemetry_stmt is None:
            self._telemetry_stmt = select(self._telemetry_total())  # one round trip for all
        return int(execute(self._telemetry_stmt, {"r": run_id, "p": phase_id}).scalar_one())

    # -- writes --------------------------------------------------------------------------

    async def restore_failed(self, run_id: str, phase_id: str, note: str) -> str | None:
        """Set a phase left non-final back to FAILED, its worker's reason kept and ``note``
        added (:mod:`drainer.reasons`). The reason written, or None when nothing changed."""
        async def restore() -> str | None:
            async with self._engine.write() as conn:
                return await self.restore_in(conn, run_id, phase_id, note)

        return await self._engine.retry("restoring a phase in", restore)

    async def restore_in(
        self,
        conn: AsyncConnection,
        run_id: str,
        phase_id: str,
        note: str,
        *,
        unless_leased_in: str | None = None,
    ) -> str | None:
        """Set a non-final phase to FAILED inside the caller's transaction; its
        ``last_failure_reason`` keeps the worker's part and gets ``note`` after it. The
        reason written, or None when no row was changed. ``unless_leased_in`` (the lease
        table): only while no drainer holds a lease on its run (after our own lease was
        lost, the run may have a new owner)."""
        sc = self.schema
        where = [self._run == run_id, self._phase == phase_id,
                 self._state.in_(self.schema.non_final_db)]
        if unless_leased_in is not None:
            leases = table(unless_leased_in, column("run_id"))
            where.append(~exists().where(leases.c.run_id == run_id))
        found = select(self._reason).where(*where)
        if not self._engine.db.is_sqlite:
            found = found.with_for_update()  # SQLite's write transaction holds the file
        row = (await conn.execute(found)).first()
        if row is None:
            return None
        reason = with_note(row[0], note)
        values: dict[str, Any] = {sc.state: sc.db(PhaseState.FAILED), sc.failure_reason: reason}
        if self.has_updated_at and sc.updated_at:
            values[sc.updated_at] = self._now()
        result = await conn.execute(update(self._table).where(*where).values(**values))
        return reason if result.rowcount else None


def _inspect_schema(conn: Connection, phases: str) -> tuple[set[str], dict[str, Any] | None]:
    """The tables, and the phases table's columns with their types."""
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    if phases not in tables:
        return tables, None
    return tables, {c["name"]: c["type"] for c in insp.get_columns(phases)}
