"""drainer's own table ``drainer_leases`` (DESIGN.md §6): one row per run being drained.

A claim is one atomic insert-if-absent, or the take-over of an expired lease after restoring
the phase it names; a heartbeat renews it; the attempt's end restores (if needed) and releases
it in one transaction. Expiry is judged by the database's clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anyio
from sqlalchemy import (
    Float,
    bindparam,
    column,
    delete,
    exists,
    func,
    inspect,
    literal,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..errors import DatabaseError
from ..models import is_final_state
from ._engine import AsyncConnection, Engine, Execute
from .history import Entry, History
from .phases import Outcome, PhaseRow, Phases

LEASE_TABLE = "drainer_leases"
# Advisory lock key taken while creating LEASE_TABLE on PostgreSQL ("drainer" in ASCII).
_LEASE_DDL_LOCK = 0x647261696E6572
_COLUMNS = "run_id, session_id, attempt_id, phase_id, host, pid, acquired_at, heartbeat_at, " \
           "expires_at"
#: the holder's worker, so that a drainer taking an expired lease over on the same host kills
#: the worker's tree by pid and create time as well as by marker (a descendant that cleared
#: its environment carries no marker); NULL until the first heartbeat after the spawn
_WORKER_COLUMNS = {"worker_pid": "INTEGER", "worker_created": "DOUBLE PRECISION"}
T = TypeVar("T")
#: ``decide(outcome)``: the judged attempt and its history row, or None (see finish_recorded)
Decide = Callable[[Outcome], "tuple[T, Entry] | None"]
RELEASE_TIMEOUT = 5.0  #: a best-effort release gives up after this long (the lease expires)


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
    expired: bool = False  #: by the database's clock, when it was read
    worker_pid: int | None = None  #: the attempt's worker, once a heartbeat recorded it
    worker_created: float | None = None  #: its create time (psutil's), to tell a reused pid
    remaining: float | None = None  #: seconds to its expiry by the database's clock, when read

    def params(self, ttl: float) -> dict[str, Any]:
        return {"run_id": self.run_id, "session_id": self.session_id,
                "attempt_id": self.attempt_id, "phase_id": self.phase_id, "host": self.host,
                "pid": self.pid, "ttl": ttl}

    @classmethod
    def from_row(cls, row: Any) -> Lease:
        return cls(run_id=str(row.run_id), session_id=str(row.session_id),
                   attempt_id=str(row.attempt_id), phase_id=str(row.phase_id),
                   host=str(row.host), pid=int(row.pid),
                   expires_at=float(row.expires_at) if row.expires_at is not None else None,
                   expired=bool(getattr(row, "expired", False)),
                   worker_pid=_maybe(int, getattr(row, "worker_pid", None)),
                   worker_created=_maybe(float, getattr(row, "worker_created", None)),
                   remaining=_maybe(float, getattr(row, "remaining", None)))


UNKNOWN_HOLDER = Lease(run_id="?", session_id="?", attempt_id="?", phase_id="?", host="?", pid=0)


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a lease claim: who blocks it, or the phase as read under the lease."""

    holder: Lease | None  #: someone else's lease: the run is not ours now
    expired: bool = False  #: that lease has expired: end its attempt, then take_over()
    phase: PhaseRow | None = None  #: (state, reason); None: the phase is gone
    telemetry: int | None = None  #: telemetry rows of the phase before the attempt
    #: refused: every run other sessions lease now, with the seconds to each expiry (read
    #: in the same round trip, so that the next picks avoid them all)
    elsewhere: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer to :meth:`Leases.finish`."""

    held: bool  #: the lease was still ours (else the attempt lost it)
    restored: str | None  #: the reason written when the phase was restored to FAILED


class Leases:
    """Claims, heartbeats, releases and sweeps of ``drainer_leases``."""

    def __init__(self, engine: Engine, phases: Phases) -> None:
        self._engine = engine
        self._phases = phases
        self._now = engine.now_sql
        self._sqlite = engine.db.is_sqlite
        #: the worker columns as selected; without them (an older table this role may not
        #: alter), NULLs: take-overs then find the holder's processes by marker only
        self._worker = _WORKER
        self.worker_columns = True
        # The statements of the per-attempt round trips, built once (compiled once).
        self._insert_absent = self._insert(if_absent=True)
        self._delete_stmt = text(
            f"DELETE FROM {LEASE_TABLE} WHERE run_id = :run_id AND attempt_id = :attempt_id")
        self._holder_stmt: tuple[str, Any] | None = None
        self._pg_claim_stmt: Any = None
        self._pg_settle_stmt: Any = None
        self._pg_record_stmt: Any = None
        #: ``drainer_attempts``, when the session keeps a history (:meth:`finish` records)
        self.history: History | None = None
        self._elsewhere_stmt = text(
            f"SELECT run_id, expires_at - {self._now} AS remaining FROM {LEASE_TABLE} "
            "WHERE session_id <> :session_id")
        self._renew_stmts = {record: text(
            f"UPDATE {LEASE_TABLE} SET heartbeat_at = {self._now}, expires_at = {self._now} "
            f"+ :ttl{extra} WHERE run_id = :run_id AND attempt_id = :attempt_id")
            for record, extra in ((False, ""), (True, ", worker_pid = :wpid, "
                                                      "worker_created = :wcreated"))}

    async def ensure_table(self) -> None:
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {LEASE_TABLE} ("
            "run_id TEXT PRIMARY KEY, session_id VARCHAR(64) NOT NULL, "
            "attempt_id VARCHAR(64) NOT NULL, phase_id TEXT NOT NULL, "
            "host VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, "
            "acquired_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL, "
            + ", ".join(f"{name} {kind}" for name, kind in _WORKER_COLUMNS.items()) + ")"
        )

        async def upgrade(conn: AsyncConnection) -> None:
            # A table this role does not own cannot be altered: create_table then accepts
            # it as it is (without worker columns, see below).
            if not self._sqlite:
                await self._widen_ids(conn)
            await self._engine.add_missing_columns(conn, LEASE_TABLE, _WORKER_COLUMNS.items())

        await self._engine.create_table(LEASE_TABLE, _LEASE_DDL_LOCK, [ddl], then=upgrade)
        self.worker_columns = await self._has_worker_columns()
        if not self.worker_columns:
            self._worker = "NULL AS worker_pid, NULL AS worker_created"

    async def _widen_ids(self, conn: AsyncConnection) -> None:
        """A table from an older drainer kept ids in VARCHAR(512): make them TEXT, so that
        any id the backlog holds fits (one long id blocked every session)."""
        narrow = (await conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = :table "
            "AND table_schema = current_schema() AND data_type = 'character varying' "
            "AND column_name IN ('run_id', 'phase_id')"), {"table": LEASE_TABLE})).scalars()
        for name in sorted(narrow):
            await conn.execute(text(f"ALTER TABLE {LEASE_TABLE} ALTER COLUMN {name} TYPE TEXT"))

    async def _has_worker_columns(self) -> bool:
        try:
            names = await self._engine.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns(LEASE_TABLE)})
        except SQLAlchemyError:
            return False
        return set(_WORKER_COLUMNS) <= set(names)

    async def has_table(self) -> bool:
        """Whether ``drainer_leases`` exists (a backlog no drainer has run on has none)."""
        return await self._engine.has_table(LEASE_TABLE)

    async def claim(self, lease: Lease, ttl: float) -> Claim:
        """Claim ``lease.run_id`` by inserting the lease, and read ``lease.phase_id`` and its
        telemetry count under it (the "before" of the attempt), in one round trip. A run
        leased already gives its holder, with ``expired`` set when that lease has expired:
        the caller ends the holder's attempt and then calls :meth:`take_over`."""
        params = lease.params(ttl)
        phases = self._phases
        if not self._sqlite:
            params.update(r=lease.run_id, p=lease.phase_id)

        def insert(execute: Execute) -> tuple[Lease, dict[str, float]] | Claim | None:
            # The common case: nobody holds the run, and the insert is atomic by itself.
            if not self._sqlite:  # insert and read in one statement: one round trip
                row = execute(self._pg_claim(), params).first()
                if row.inserted:
                    # A lease there when the statement began, gone by its insert: its
                    # holder released the run meanwhile, maybe after its worker changed the
                    # phase, which this statement's snapshot does not show. Read again.
                    outcome = phases.outcome_with(execute, lease.run_id, lease.phase_id) \
                        if row.released_meanwhile else phases.outcome_of(row, 2)
                    return Claim(holder=None, phase=outcome.row, telemetry=outcome.telemetry)
                inserted = 0
            else:
                inserted = execute(self._insert_absent, params).rowcount
            holder = None if inserted else self._holder_with(execute, params)
            if inserted or (holder is not None and holder.attempt_id == lease.attempt_id):
                # (found ours: a retried insert had landed before the fault)
                outcome = phases.outcome_with(execute, lease.run_id, lease.phase_id)
                return Claim(holder=None, phase=outcome.row, telemetry=outcome.telemetry)
            if holder is None:
                return None  # released meanwhile
            return holder, self._elsewhere_with(execute, lease.session_id)

        async def attempt() -> tuple[Lease, dict[str, float]] | Claim | None:

            try:
                return await self._engine.run(insert, write=True)
            except IntegrityError:
                # Another drainer inserted first (PostgreSQL, between our two statements).
                return Claim(holder=UNKNOWN_HOLDER)

        try:
            found = await self._engine.retry("claiming a lease in", attempt)
        except BaseException:
            # It may have inserted before failing, and no attempt will follow: give the run
            # back now rather than at expiry.
            await self.release_quietly(lease.run_id, lease.attempt_id)
            raise
        if isinstance(found, Claim):
            return found
        if found is None:  # released meanwhile: try once more, as a take-over
            return await self.take_over(lease, ttl, None)
        holder, elsewhere = found
        return Claim(holder=holder, expired=holder.expired, elsewhere=elsewhere)

    async def take_over(self, lease: Lease, ttl: float, expired: Lease | None) -> Claim:
        """Take the run over from ``expired`` (a lease seen expired; None: seen free), in one
        transaction, restoring the phase it names; only if the run is still as seen."""
        params = lease.params(ttl)
        now = self._now
        clear = ", worker_pid = NULL, worker_created = NULL" if self.worker_columns else ""

        async def take() -> Claim | None:
            try:
                async with self._engine.write() as conn:
                    holder = await self._holder(conn, params, lock=True)
                    if holder is not None and holder.attempt_id == lease.attempt_id:
                        return None  # ours: a retried take-over had landed before the fault
                    if holder is None:
                        await conn.execute(self._insert(if_absent=False), params)
                        return None
                    if (expired is None or holder.attempt_id != expired.attempt_id
                            or not holder.expired):
                        return Claim(holder=holder)  # someone else, or it woke and renewed
                    await self._phases.restore_in(conn, holder.run_id, holder.phase_id,
                                                  _expired_reason(holder))
                    await conn.execute(text(
                        f"UPDATE {LEASE_TABLE} SET session_id = :session_id, "
                        f"attempt_id = :attempt_id, phase_id = :phase_id, host = :host, "
                        f"pid = :pid, acquired_at = {now}, heartbeat_at = {now}, "
                        f"expires_at = {now} + :ttl{clear} WHERE run_id = :run_id"
                    ), params)
                    return None
            except IntegrityError:
                return Claim(holder=UNKNOWN_HOLDER)

        blocked = await self._engine.retry("taking over a lease in", take)
        return blocked if blocked is not None else await self._read_under(lease)

    async def _read_under(self, lease: Lease) -> Claim:
        try:
            outcome = await self._phases.read_outcome(lease.run_id, lease.phase_id)
        except BaseException:
            # No attempt will follow: give the run back now rather than at expiry.
            await self.release_quietly(lease.run_id, lease.attempt_id)
            raise
        return Claim(holder=None, phase=outcome.row, telemetry=outcome.telemetry)

    async def _holder(
        self, conn: AsyncConnection, params: dict[str, Any], *, lock: bool = False
    ) -> Lease | None:
        """The lease of ``params["run_id"]`` (``expired`` by the database's clock), if any."""
        suffix = " FOR UPDATE" if lock and not self._sqlite else ""
        row = (await conn.execute(text(
            f"SELECT {_COLUMNS}, {self._worker}, expires_at < {self._now} AS expired "
            f"FROM {LEASE_TABLE} WHERE run_id = :run_id{suffix}"
        ), params)).first()
        return None if row is None else Lease.from_row(row)

    def _holder_with(self, execute: Execute, params: dict[str, Any]) -> Lease | None:
        """:meth:`_holder` (unlocked) as part of a round trip."""
        if self._holder_stmt is None or self._holder_stmt[0] != self._worker:
            self._holder_stmt = (self._worker, text(
                f"SELECT {_COLUMNS}, {self._worker}, expires_at < {self._now} AS expired, "
                f"expires_at - {self._now} AS remaining FROM {LEASE_TABLE} "
                "WHERE run_id = :run_id"))
        row = execute(self._holder_stmt[1], params).first()
        return None if row is None else Lease.from_row(row)

    def _pg_claim(self) -> Any:
        """PostgreSQL: the lease inserted if the run has none, and the phase with its
        telemetry read, in one statement (``inserted``: 1 or 0; ``released_meanwhile``: a
        lease was there when the statement began; then :meth:`Phases.outcome_of`;
        parameters: :meth:`Lease.params`, ``r`` and ``p``)."""
        if self._pg_claim_stmt is None:
            # (imported here: a drain on SQLite never loads PostgreSQL's dialect, 24 ms)
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            t = _lease_table()
            now: Any = literal_column(self._now)
            added = (
                pg_insert(t).values(
                    run_id=bindparam("run_id"), session_id=bindparam("session_id"),
                    attempt_id=bindparam("attempt_id"), phase_id=bindparam("phase_id"),
                    host=bindparam("host"), pid=bindparam("pid"), acquired_at=now,
                    heartbeat_at=now, expires_at=now + bindparam("ttl", type_=Float))
                .on_conflict_do_nothing(index_elements=["run_id"])
                .returning(t.c.run_id).cte("added"))
            inserted = select(func.count()).select_from(added).scalar_subquery()
            # (The CTE's insert is not visible to the rest of the statement: a lease seen
            # here is one that was there when the statement began.)
            held = exists().where(t.c.run_id == bindparam("run_id"))
            self._pg_claim_stmt = self._phases.outcome_along(
                [inserted.label("inserted"), held.label("released_meanwhile")])
        return self._pg_claim_stmt

    def _pg_settle(self) -> Any:
        """PostgreSQL: the phase with its telemetry read and, unless the phase is left
        non-final, our lease deleted, in one statement (``released``: 1 or 0, then
        :meth:`Phases.outcome_of`; parameters ``run_id``, ``attempt_id``, ``r``, ``p``). The
        read and the delete's check see the same snapshot."""
        if self._pg_settle_stmt is None:
            t = _lease_table()
            state = self._phases.state_of().cte("phase_state")
            gone = (
                delete(t).where(
                    t.c.run_id == bindparam("run_id"), t.c.attempt_id == bindparam("attempt_id"),
                    ~exists(select(literal(1)).select_from(state).where(
                        self._phases.state_is_non_final(state.c[0]))))
                .returning(t.c.run_id).cte("released"))
            released = select(func.count()).select_from(gone).scalar_subquery()
            self._pg_settle_stmt = self._phases.outcome_along([released.label("released")])
        return self._pg_settle_stmt

    def _insert(self, *, if_absent: bool) -> Any:
        """INSERT of a new lease row (parameters: :meth:`Lease.params`); ``if_absent``: do
        nothing (rowcount 0) when the run already has one."""
        now = self._now
        verb = "INSERT OR IGNORE INTO" if if_absent and self._sqlite else "INSERT INTO"
        conflict = " ON CONFLICT (run_id) DO NOTHING" if if_absent and not self._sqlite else ""
        return text(
            f"{verb} {LEASE_TABLE} ({_COLUMNS}) VALUES (:run_id, :session_id, "
            f":attempt_id, :phase_id, :host, :pid, {now}, {now}, {now} + :ttl){conflict}"
        )

    async def finish(
        self, run_id: str, phase_id: str, attempt_id: str, *, restore: str | None,
        entry: Entry | None = None,
    ) -> Finished:
        """After an attempt, in one transaction: release our lease and, given ``restore``,
        set the phase to FAILED with that reason if it is still non-final; given ``entry``
        (and a history), record the attempt in ``drainer_attempts``. The phase is ours
        to write only while the lease is: if it is gone (taken over, or swept), the phase is
        restored only when no drainer leases the run at all, and never if one does."""
        params = {"run_id": run_id, "attempt_id": attempt_id}
        history = self.history if entry is not None else None
        if history is not None and restore is None:  # the common case: one round trip
            assert entry is not None

            def record(execute: Execute) -> Finished:
                return Finished(held=self._record_with(execute, history, entry, params),
                                restored=None)

            return await self._engine.retry(
                "finishing an attempt in",
                lambda: self._engine.run(record, write=True, transaction=self._sqlite))

        async def settle() -> Finished:
            # A lone release is one statement: no explicit transaction needed.
            async with self._engine.write(single=restore is None and history is None) as conn:
                added = True
                if history is not None:  # (reads the lease: before its delete)
                    assert entry is not None
                    result = await conn.execute(history.insert_stmt, asdict(entry))
                    added = bool(result.rowcount)
                if not added:
                    # A retry whose first try committed (its answer lost): that try released
                    # the lease and restored the phase if it had to; since then the run may
                    # be another drainer's, whose phase this must not touch.
                    return Finished(held=True, restored=None)
                held = await self._delete(conn, run_id, attempt_id)
                restored = None
                if restore is not None:
                    restored = await self._phases.restore_in(
                        conn, run_id, phase_id, restore,
                        unless_leased_in=None if held else LEASE_TABLE)
            return Finished(held=held, restored=restored)

        return await self._engine.retry("finishing an attempt in", settle)

    async def finish_recorded(
        self, run_id: str, phase_id: str, attempt_id: str, decide: Decide[T]
    ) -> tuple[Outcome, T | None, bool]:
        """After an attempt, with the history, in one round trip when it can: read the phase
        and its telemetry, ``decide(outcome)`` (a plain function: the judged attempt and its
        history row, or None when the attempt needs more: a phase left non-final, a reason
        to keep whole), then record the row and release the lease. Returns the outcome,
        what ``decide`` judged (None: nothing was written; use :meth:`finish`) and whether
        the lease was still ours."""
        history = self.history
        assert history is not None
        phases = self._phases
        params = {"run_id": run_id, "attempt_id": attempt_id}

        def body(execute: Execute) -> tuple[Outcome, T | None, bool]:
            outcome = phases.outcome_with(execute, run_id, phase_id)
            decided = decide(outcome)
            if decided is None:
                return outcome, None, True
            judged, entry = decided
            return outcome, judged, self._record_with(execute, history, entry, params)

        return await self._engine.retry(
            "finishing an attempt in",
            lambda: self._engine.run(body, write=True, transaction=self._sqlite))

    def _record_with(self, execute: Execute, history: History, entry: Entry,
                     params: dict[str, Any]) -> bool:
        """Insert the attempt's row and delete its lease, as part of a round trip; whether
        the lease was still ours (also when the row was there already: a retry whose first
        try committed, lease release included)."""
        if not self._sqlite:
            row = execute(self._pg_record(history), {**asdict(entry), **params}).first()
            added, held = bool(row.added), bool(row.held)
        else:
            added = history.insert_with(execute, entry)  # (reads the lease: first)
            held = bool(execute(self._delete_stmt, params).rowcount)
        return held or not added

    def _pg_record(self, history: History) -> Any:
        """PostgreSQL: our lease deleted and the attempt's row inserted, in one statement
        (``held``, ``added``: 1 or 0; parameters: the entry's fields, ``run_id``,
        ``attempt_id``). The insert reads the lease's start in the statement's snapshot,
        from before the delete."""
        if self._pg_record_stmt is None:
            self._pg_record_stmt = text(
                f"WITH released AS (DELETE FROM {LEASE_TABLE} WHERE run_id = "
                f"{history.param('run_id')} AND attempt_id = {history.param('attempt_id')} "
                "RETURNING run_id), added AS ("
                f"{history.insert_sql} RETURNING attempt_id) SELECT (SELECT count(*) FROM "
                "released) AS held, (SELECT count(*) FROM added) AS added")
        return self._pg_record_stmt

    async def finish_if_final(
        self, run_id: str, phase_id: str, attempt_id: str
    ) -> tuple[Outcome, bool | None]:
        """After an attempt, in one round trip: read the phase and its telemetry and, when
        the phase is final (or gone), release our lease. Returns the outcome and whether the
        lease was still ours; ``None`` when the phase was left non-final and nothing was
        released (then :meth:`finish` restores and releases)."""
        phases = self._phases

        def settle(execute: Execute) -> tuple[Outcome, bool | None]:
            if not self._sqlite:  # read and release in one statement: one round trip
                row = execute(self._pg_settle(), {"run_id": run_id, "attempt_id": attempt_id,
                                                  "r": run_id, "p": phase_id}).first()
                found = phases.outcome_of(row, 1)
                if found.row is not None and not is_final_state(found.row[0]):
                    return found, None
                return found, bool(row.released)
            outcome = phases.outcome_with(execute, run_id, phase_id)
            if outcome.row is not None and not is_final_state(outcome.row[0]):
                return outcome, None
            held = execute(self._delete_stmt, {"run_id": run_id, "attempt_id": attempt_id})
            return outcome, bool(held.rowcount)

        return await self._engine.retry("finishing an attempt in",
                                        lambda: self._engine.run(settle, write=True))

    async def _delete(self, conn: AsyncConnection, run_id: str, attempt_id: str) -> bool:
        result = await conn.execute(self._delete_stmt,
                                    {"run_id": run_id, "attempt_id": attempt_id})
        return bool(result.rowcount)

    async def renew(self, run_id: str, attempt_id: str, ttl: float,
                    worker: tuple[int, float | None] | None = None) -> bool:
        """Extend our lease by ``ttl``, recording the attempt's ``worker`` (pid, create
        time) when given; False when the lease is no longer ours."""
        if not self.worker_columns:
            worker = None
        params: dict[str, Any] = {"ttl": ttl, "run_id": run_id, "attempt_id": attempt_id}
        if worker:
            params.update(wpid=worker[0], wcreated=worker[1])
        stmt = self._renew_stmts[worker is not None]

        async def update() -> bool:
            return await self._engine.run(
                lambda execute: bool(execute(stmt, params).rowcount), write=True)

        return await self._engine.retry("renewing a lease in", update)

    async def release(self, run_id: str, attempt_id: str) -> None:
        params = {"run_id": run_id, "attempt_id": attempt_id}

        async def delete() -> None:
            await self._engine.run(lambda execute: execute(self._delete_stmt, params),
                                   write=True)

        await self._engine.retry("releasing a lease in", delete)

    async def release_quietly(self, run_id: str, attempt_id: str) -> None:
        """Release best effort, shielded and bounded: if the database does not answer, the
        lease simply expires."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT), \
                contextlib.suppress(DatabaseError):
            await self.release(run_id, attempt_id)

    async def release_session(self, session_id: str) -> int:
        """On resume: leases the crashed run of this session still held."""
        async def delete() -> int:
            async with self._engine.write(single=True) as conn:
                result = await conn.execute(text(
                    f"DELETE FROM {LEASE_TABLE} WHERE session_id = :session_id"
                ), {"session_id": session_id})
            return int(result.rowcount or 0)

        return await self._engine.retry("releasing leases in", delete)

    async def held_elsewhere(self, *, other_than: str) -> dict[str, float]:
        """Runs leased by sessions other than ``other_than``, with the seconds to each
        lease's expiry (by the database's clock; negative: expired). One small read: the
        table holds a row per attempt in flight."""
        async def select() -> dict[str, float]:
            return await self._engine.run(
                lambda execute: self._elsewhere_with(execute, other_than))

        return await self._engine.retry("reading leases in", select)

    def _elsewhere_with(self, execute: Execute, session_id: str) -> dict[str, float]:
        """:meth:`held_elsewhere` as part of a round trip."""
        rows = execute(self._elsewhere_stmt, {"session_id": session_id}).all()
        return {str(r.run_id): float(r.remaining) for r in rows}

    async def expired(self, *, other_than: str) -> list[Lease]:
        """Expired leases of sessions other than ``other_than`` (a drainer never sweeps its
        own: its heartbeats decide about those, even after its database was unreachable)."""
        async def select() -> list[Lease]:
            async with self._engine.read() as conn:
                rows = (await conn.execute(text(
                    f"SELECT {_COLUMNS}, {self._worker}, 1 AS expired FROM {LEASE_TABLE} "
                    f"WHERE expires_at < {self._now} AND session_id <> :session_id"
                ), {"session_id": other_than})).all()
            return [Lease.from_row(r) for r in rows]

        return await self._engine.retry("reading expired leases in", select)

    async def sweep(self, lease: Lease) -> bool:
        """Restore the phase an expired lease names (if non-final) and delete the lease, in
        one transaction; only if it is still that lease and still expired."""
        async def delete() -> bool:
            async with self._engine.write() as conn:
                result = await conn.execute(text(
                    f"DELETE FROM {LEASE_TABLE} WHERE run_id = :run_id AND "
                    f"attempt_id = :attempt_id AND expires_at < {self._now}"
                ), {"run_id": lease.run_id, "attempt_id": lease.attempt_id})
                if not result.rowcount:
                    return False
                await self._phases.restore_in(conn, lease.run_id, lease.phase_id,
                                              _expired_reason(lease))
            return True

        return await self._engine.retry("sweeping an expired lease in", delete)

    async def live(self) -> list[tuple[Lease, float]]:
        """Leases not expired, with their age in seconds (for status)."""
        now = self._now
        try:
            async with self._engine.read() as conn:
                rows = (await conn.execute(text(
                    f"SELECT {_COLUMNS}, {now} - acquired_at AS age "
                    f"FROM {LEASE_TABLE} WHERE expires_at >= {now} ORDER BY run_id"
                ))).all()
        except SQLAlchemyError:
            return []  # no lease table yet: no leases
        return [(Lease.from_row(r), float(r.age)) for r in rows]


_WORKER = ", ".join(_WORKER_COLUMNS)


def _lease_table() -> Any:
    """``drainer_leases`` for statements built with SQLAlchemy's expression language."""
    return table(LEASE_TABLE, *(column(name.strip()) for name in _COLUMNS.split(",")))


def _maybe(kind: type[int] | type[float], value: Any) -> Any:
    return None if value is None else kind(value)


def _expired_reason(lease: Lease) -> str:
    return (f"drainer: lease expired (drainer {lease.host} pid {lease.pid}, session "
            f"{lease.session_id} stopped renewing it); restored to FAILED")
