"""drainer's own table ``drainer_attempts``: one row per finished attempt, kept across
sessions and shared by every drainer on the backlog (DESIGN.md §6, README "Attempt history").

A row is written in the transaction that settles its attempt (see :meth:`Leases.finish`):
the attempt's lease is deleted and its row inserted together, so a crash leaves either both
(the attempt is settled and counted) or neither (``--resume`` reconciles it and writes it
then). Rows are keyed by ``attempt_id``: a retried write after a lost answer inserts nothing.
Start and end are the database's clock, in epoch seconds: the start is when the lease was
taken, the end when the row was written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    column,
    func,
    literal_column,
    or_,
    select,
    table,
    text,
)

from ._engine import Engine, Execute

HISTORY_TABLE = "drainer_attempts"
# Advisory lock key taken while creating HISTORY_TABLE on PostgreSQL ("drainhst" in ASCII).
_HISTORY_DDL_LOCK = 0x647261696E687374
#: the columns, in order, with their SQL types (the README documents each)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("attempt_id", "VARCHAR(64) PRIMARY KEY"),
    ("session_id", "VARCHAR(64) NOT NULL"),
    ("host", "VARCHAR(255) NOT NULL"),
    ("run_id", "TEXT NOT NULL"),
    ("phase_id", "TEXT NOT NULL"),
    ("attempt_number", "INTEGER NOT NULL"),
    ("started_at", "DOUBLE PRECISION"),
    ("finished_at", "DOUBLE PRECISION NOT NULL"),
    ("duration_seconds", "DOUBLE PRECISION NOT NULL"),
    ("outcome", "VARCHAR(16) NOT NULL"),
    ("final_state", "VARCHAR(64)"),
    ("fingerprint", "TEXT"),
    ("failure_category", "VARCHAR(32)"),
    ("telemetry_events", "INTEGER"),
    ("exit_status", "INTEGER"),
    ("revision", "VARCHAR(128)"),
    ("phase_category", "VARCHAR(32)"),
    ("timeout_seconds", "DOUBLE PRECISION"),
)
_NAMES = tuple(name for name, _ in COLUMNS)
#: the numeric columns' parameter types on PostgreSQL (the others are TEXT)
_PG_TYPES = {name: "INTEGER" if kind.startswith("INTEGER") else "DOUBLE PRECISION"
             for name, kind in COLUMNS if kind.startswith(("INTEGER", "DOUBLE"))}
#: outcomes that do not count as an attempt of the phase (drainer never saw it end)
NOT_COUNTED = ("interrupted",)
TIMEOUT_CATEGORY = "timeout"  #: the failure category of a timeout (selection's name)
#: the history's preference of runs reads this far back (seconds): "succeeded recently"
RECENT = 7 * 24 * 3600.0
#: ``candidate(run, phase)``: SQL, the run (and phase, unless None) is a candidate
Candidate = Callable[[Any, Any], Any]
_NOT_COUNTED_SQL = ", ".join(f"'{outcome}'" for outcome in NOT_COUNTED)


@dataclass(frozen=True, slots=True)
class Entry:
    """One attempt as the history keeps it (``started_at`` and ``finished_at`` are the
    database's to fill in)."""

    attempt_id: str
    session_id: str
    host: str
    run_id: str
    phase_id: str
    attempt_number: int
    duration_seconds: float
    outcome: str
    final_state: str | None
    fingerprint: str | None
    failure_category: str | None
    telemetry_events: int | None
    exit_status: int | None
    revision: str | None
    phase_category: str | None = None  #: its reason's category when it was picked
    timeout_seconds: float | None = None  #: the limit it ran under (None: none)


@dataclass(frozen=True, slots=True)
class Row:
    """One row of ``drainer_attempts`` as read back."""

    attempt_id: str
    session_id: str
    host: str
    run_id: str
    phase_id: str
    attempt_number: int
    started_at: float | None
    finished_at: float
    duration_seconds: float
    outcome: str
    final_state: str | None
    fingerprint: str | None
    failure_category: str | None
    telemetry_events: int | None
    exit_status: int | None
    revision: str | None
    phase_category: str | None = None
    timeout_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Tally:
    """The attempts of one session and one category (of the picked phase's reason) that
    ended (ok, failed or timed out), as sums: what ``drainer forecast`` learns from."""

    session_id: str
    category: str | None  #: None: recorded before drainer kept the category
    attempts: int
    ok: int
    seconds: float  #: sum of durations
    seconds_sq: float  #: sum of squared durations
    telemetry_known: int  #: attempts whose telemetry count is known
    telemetry: float  #: sum of their counts
    telemetry_sq: float
    first_start: float  #: the database's clock, epoch seconds
    last_end: float


@dataclass(slots=True)
class PhaseHistory:
    """What the history says about one phase: attempts counted (``interrupted`` ones left
    out; of other sessions, when asked), and its last attempt's outcome, fingerprint,
    category and revision, with how often that fingerprint was seen for the phase at that
    revision."""

    attempts: int = 0
    last_outcome: str | None = None
    last_fingerprint: str | None = None
    last_category: str | None = None
    last_revision: str | None = None
    last_fingerprint_seen: int = 0


@dataclass(slots=True)
class Summary:
    """The history as the selector reads it at each full load: per phase (when asked), and
    the runs it prefers (latest attempt succeeded, or every phase's latest timed out)."""

    phases: dict[tuple[str, str], PhaseHistory]
    preferred: set[str]


class History:
    """Writes and reads of ``drainer_attempts``."""

    def __init__(self, engine: Engine, lease_table: str) -> None:
        self._engine = engine
        self._sqlite = engine.db.is_sqlite
        now = engine.now_sql
        p = self.param
        values = ", ".join(
            f"COALESCE((SELECT acquired_at FROM {lease_table} WHERE run_id = {p('run_id')} AND "
            f"attempt_id = {p('attempt_id')}), {now} - {p('duration_seconds')})"
            if name == "started_at" else now if name == "finished_at" else p(name)
            for name in _NAMES)
        verb = "INSERT OR IGNORE INTO" if self._sqlite else "INSERT INTO"
        conflict = "" if self._sqlite else " ON CONFLICT (attempt_id) DO NOTHING"
        #: the row of an attempt, its start read from its lease (run it before the lease's
        #: delete); parameters: :class:`Entry`'s fields
        self.insert_sql = (f"{verb} {HISTORY_TABLE} ({', '.join(_NAMES)}) "
                           f"VALUES ({values}){conflict}")
        self.insert_stmt = text(self.insert_sql)

    def param(self, name: str) -> str:
        """A bound parameter of an :class:`Entry` field; typed on PostgreSQL, where one
        parameter used in several places (a VARCHAR column here, TEXT there) must have one
        type."""
        if self._sqlite:
            return f":{name}"
        return f"CAST(:{name} AS {_PG_TYPES.get(name, 'TEXT')})"

    @property
    def ddl(self) -> str:
        """The statements that create the table and its index."""
        return (f"CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} ("
                + ", ".join(f"{name} {kind}" for name, kind in COLUMNS) + "); "
                f"CREATE INDEX IF NOT EXISTS {HISTORY_TABLE}_phase "
                f"ON {HISTORY_TABLE} (run_id, phase_id)")

    async def ensure_table(self) -> None:
        await self._engine.create_table(
            HISTORY_TABLE, _HISTORY_DDL_LOCK, self.ddl.split("; "),
            then=lambda conn: self._engine.add_missing_columns(conn, HISTORY_TABLE, COLUMNS))

    async def has_table(self) -> bool:
        return await self._engine.has_table(HISTORY_TABLE)

    def insert_with(self, execute: Execute, entry: Entry) -> bool:
        """Insert ``entry`` as part of a round trip; False when its row was there already
        (a retry whose first try committed)."""
        return bool(execute(self.insert_stmt, asdict(entry)).rowcount)

    async def amend(self, entry: Entry) -> None:
        """Correct the row of an attempt judged again after its settle (its lease turned out
        lost): outcome, state, fingerprint and category."""
        stmt = text(f"UPDATE {HISTORY_TABLE} SET outcome = :outcome, final_state = "
                    ":final_state, fingerprint = :fingerprint, failure_category = "
                    ":failure_category WHERE attempt_id = :attempt_id")
        params = {k: getattr(entry, k) for k in ("outcome", "final_state", "fingerprint",
                                                  "failure_category", "attempt_id")}

        async def update() -> None:
            await self._engine.run(lambda execute: execute(stmt, params), write=True)

        await self._engine.retry("recording an attempt in", update)

    async def size(self) -> tuple[int, int, int] | None:
        """(rows, sessions, phases) in the history; None when there is no table yet."""
        if not await self.has_table():
            return None
        stmt = text(f"SELECT count(*), count(DISTINCT session_id), (SELECT count(*) FROM "
                    f"(SELECT DISTINCT run_id, phase_id FROM {HISTORY_TABLE}) AS p) "
                    f"FROM {HISTORY_TABLE}")

        async def read() -> tuple[int, int, int]:
            row = await self._engine.run(lambda execute: execute(stmt).first())
            return int(row[0]), int(row[1]), int(row[2])

        return await self._engine.retry("reading the attempt history in", read)

    async def summary(self, *, other_than: str | None = None, run_id: str | None = None,
                      counts: bool = False, revision: str | None = None,
                      candidate: Candidate | None = None) -> Summary:
        """What the selector reads at a full load: the runs the history prefers (from the
        last :data:`RECENT` seconds) and the phases it needs: with ``counts``, each phase
        other sessions than ``other_than`` attempted, with their count (a session counts its
        own); with a ``revision``, each phase whose latest attempt failed at it. ``run_id``:
        of that run only; ``candidate``: of the candidates only (:meth:`Phases.is_candidate`),
        so that what is read grows with the backlog left, not with the history. The
        database ranks, counts and filters. Empty when there is no table yet."""
        if not await self.has_table():
            return Summary({}, set())
        h = _history_table()
        where = [h.c.outcome != outcome for outcome in NOT_COUNTED]
        if run_id is not None:
            where.append(h.c.run_id == bindparam("run_id", run_id))
        # (The bound as SQL text, not a bound number: SQLAlchemy before 2.0.x names a
        # number bound to a literal column after its text, which the SQLite hot path's
        # precompiled statements cannot look up.)
        recent = h.c.finished_at > literal_column(f"({self._engine.now_sql} - {RECENT!r})")
        preferred = self._preferred_stmt(h, [*where, recent], candidate)
        by_phase = self._phases_stmt(h, where, candidate, counts=counts,
                                     revision=revision) if counts or revision else None
        params = {"me": other_than, "revision": revision}

        async def read() -> Summary:
            def body(execute: Execute) -> Summary:
                runs = {str(r[0]) for r in execute(preferred, params).all()
                        if r[1] or r[2]}
                found = execute(by_phase, params).all() if by_phase is not None else []
                return Summary(_phases(found), runs)

            return await self._engine.run(body)

        return await self._engine.retry("reading the attempt history in", read)

    @staticmethod
    def _ranked(h: Any) -> tuple[Any, Any]:
        """Row numbers of each attempt among its phase's and its run's, latest first."""
        latest = (h.c.finished_at.desc(), h.c.attempt_id.desc())
        return (func.row_number().over(partition_by=(h.c.run_id, h.c.phase_id),
                                       order_by=latest),
                func.row_number().over(partition_by=h.c.run_id, order_by=latest))

    def _preferred_stmt(self, h: Any, where: list[Any], candidate: Candidate | None) -> Any:
        """Per run: (run, its latest attempt succeeded, each of its phases' latest attempt
        timed out)."""
        if candidate is not None:
            where = [*where, candidate(h.c.run_id, None)]
        phase_rank, run_rank = self._ranked(h)
        passing = case((or_(h.c.outcome == "timed out",
                            h.c.failure_category == TIMEOUT_CATEGORY), 1), else_=0)
        inner = select(h.c.run_id, h.c.outcome, passing.label("passing"),
                       phase_rank.label("phase_rank"), run_rank.label("run_rank")
                       ).where(*where).subquery("ranked")
        ok_latest = case((and_(inner.c.run_rank == 1, inner.c.outcome == "ok"), 1), else_=0)
        return (select(inner.c.run_id, func.max(ok_latest), func.min(inner.c.passing))
                .where(inner.c.phase_rank == 1).group_by(inner.c.run_id))

    def _phases_stmt(self, h: Any, where: list[Any], candidate: Candidate | None, *,
                     counts: bool, revision: str | None) -> Any:
        """Per phase that :meth:`summary` asks for: its latest attempt, the attempts of
        other sessions, and how often its fingerprint was seen at its revision."""
        if candidate is not None:
            where = [*where, candidate(h.c.run_id, h.c.phase_id)]
        phase_rank, _ = self._ranked(h)
        others = func.sum(case((h.c.session_id == bindparam("me"), 0), else_=1)).over(
            partition_by=(h.c.run_id, h.c.phase_id))
        seen = func.count().over(
            partition_by=(h.c.run_id, h.c.phase_id, h.c.fingerprint, h.c.revision))
        inner = select(h.c.run_id, h.c.phase_id, h.c.outcome, h.c.fingerprint,
                       h.c.failure_category, h.c.revision, others.label("others"),
                       seen.label("seen"), phase_rank.label("phase_rank")
                       ).where(*where).subquery("ranked")
        wanted = []
        if counts:
            wanted.append(inner.c.others > 0)
        if revision is not None:
            wanted.append(and_(inner.c.outcome == "failed",
                               inner.c.revision == bindparam("revision")))
        return select(inner.c.run_id, inner.c.phase_id, inner.c.outcome, inner.c.fingerprint,
                      inner.c.failure_category, inner.c.revision, inner.c.others,
                      inner.c.seen).where(inner.c.phase_rank == 1, or_(*wanted))

    async def durations(self, *, per_category: int) -> list[tuple[str, str, float]]:
        """(phase category, run, duration) of the latest ``per_category`` attempts of each
        category that ended on their own (ok or failed: not timed out, cancelled or
        interrupted), for adaptive timeouts; empty when there is no table yet."""
        if not await self.has_table():
            return []
        h = _history_table()
        latest = func.row_number().over(partition_by=h.c.phase_category,
                                        order_by=(h.c.finished_at.desc(), h.c.attempt_id.desc()))
        inner = select(h.c.phase_category, h.c.run_id, h.c.duration_seconds,
                       latest.label("n")).where(
            or_(h.c.outcome == "ok", h.c.outcome == "failed"),
            h.c.phase_category.is_not(None)).subquery("latest")
        stmt = select(inner.c.phase_category, inner.c.run_id, inner.c.duration_seconds).where(
            inner.c.n <= bindparam("kept", per_category))

        async def read() -> list[tuple[str, str, float]]:
            rows = await self._engine.run(lambda execute: execute(stmt).all())
            return [(str(c), str(r), float(d)) for c, r, d in rows]

        return await self._engine.retry("reading the attempt history in", read)

    async def tallies(self) -> list[Tally]:
        """Per session and picked phase's category: the attempts that ended on their own or
        timed out (not cancelled or interrupted), with sums for means and variances, for
        ``drainer forecast``; empty when there is no table yet."""
        if not await self.has_table():
            return []

        def real(name: str) -> str:
            return f"CAST({name} AS DOUBLE PRECISION)"

        duration, telemetry = real("duration_seconds"), real("telemetry_events")
        stmt = text(
            "SELECT session_id, phase_category, count(*), "
            "sum(CASE WHEN outcome = 'ok' THEN 1 ELSE 0 END), "
            f"sum({duration}), sum({duration} * {duration}), count(telemetry_events), "
            f"sum({telemetry}), sum({telemetry} * {telemetry}), "
            f"min(coalesce(started_at, finished_at - duration_seconds)), max(finished_at) "
            f"FROM {HISTORY_TABLE} WHERE outcome NOT IN ('cancelled', {_NOT_COUNTED_SQL}) "
            "GROUP BY session_id, phase_category")

        async def read() -> list[Tally]:
            rows = await self._engine.run(lambda execute: execute(stmt).all())
            return [Tally(str(r[0]), None if r[1] is None else str(r[1]), int(r[2]), int(r[3]),
                          float(r[4]), float(r[5]), int(r[6]), float(r[7] or 0),
                          float(r[8] or 0), float(r[9]), float(r[10])) for r in rows]

        return await self._engine.retry("reading the attempt history in", read)

    async def get(self, attempt_id: str) -> Row | None:
        """The row of one attempt, if it was recorded."""
        stmt = text(f"SELECT {', '.join(_NAMES)} FROM {HISTORY_TABLE} "
                    "WHERE attempt_id = :attempt_id")

        async def read() -> Row | None:
            found = await self._engine.run(
                lambda execute: execute(stmt, {"attempt_id": attempt_id}).first())
            return None if found is None else _row(found)

        return await self._engine.retry("reading the attempt history in", read)

    async def count(self, run_id: str, phase_id: str, *, other_than: str) -> int:
        """The attempts of one phase in the history by sessions other than ``other_than``
        (``interrupted`` ones left out)."""
        stmt = text(f"SELECT count(*) FROM {HISTORY_TABLE} WHERE run_id = :run_id AND "
                    f"phase_id = :phase_id AND session_id <> :me AND outcome NOT IN "
                    f"({_NOT_COUNTED_SQL})")
        params = {"run_id": run_id, "phase_id": phase_id, "me": other_than}

        async def read() -> int:
            return int(await self._engine.run(
                lambda execute: execute(stmt, params).scalar_one()))

        return await self._engine.retry("reading the attempt history in", read)

    async def rows(self, *, run_id: str | None = None) -> list[Row]:
        """Every row (of ``run_id`` only, when given), oldest first."""
        if not await self.has_table():
            return []
        where = " WHERE run_id = :run_id" if run_id is not None else ""
        params = {"run_id": run_id} if run_id is not None else {}
        stmt = text(f"SELECT {', '.join(_NAMES)} FROM {HISTORY_TABLE}{where} "
                    "ORDER BY finished_at, attempt_id")

        async def read() -> list[Row]:
            found = await self._engine.run(lambda execute: execute(stmt, params).all())
            return [_row(r) for r in found]

        return await self._engine.retry("reading the attempt history in", read)


def _row(r: Any) -> Row:
    return Row(attempt_id=str(r[0]), session_id=str(r[1]), host=str(r[2]), run_id=str(r[3]),
               phase_id=str(r[4]), attempt_number=int(r[5]),
               started_at=None if r[6] is None else float(r[6]), finished_at=float(r[7]),
               duration_seconds=float(r[8]), outcome=str(r[9]), final_state=r[10],
               fingerprint=r[11], failure_category=r[12],
               telemetry_events=None if r[13] is None else int(r[13]),
               exit_status=None if r[14] is None else int(r[14]), revision=r[15],
               phase_category=r[16], timeout_seconds=None if r[17] is None else float(r[17]))


def _phases(rows: list[Any]) -> dict[tuple[str, str], PhaseHistory]:
    """:meth:`History.summary`'s rows of phases (one each, its last counted attempt). Equal
    strings (run ids, outcomes, fingerprints, revisions) are kept once."""
    kept: dict[Any, Any] = {}
    one = kept.setdefault
    found = {}
    for run, phase, outcome, fingerprint, category, revision, others, seen in rows:
        found[(one(run, run), str(phase))] = PhaseHistory(
            attempts=int(others), last_outcome=one(outcome, outcome),
            last_fingerprint=one(fingerprint, fingerprint), last_category=one(category, category),
            last_revision=one(revision, revision),
            last_fingerprint_seen=int(seen) if fingerprint is not None else 0)
    return found


def _history_table() -> Any:
    """``drainer_attempts`` for statements built with SQLAlchemy's expression language."""
    return table(HISTORY_TABLE, *(column(name) for name in _NAMES))
