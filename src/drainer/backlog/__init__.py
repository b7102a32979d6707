"""The backlog store: every SQL statement drainer runs lives in this package.

``_engine`` holds the dialects and the one error translator, ``phases`` the phases and
telemetry tables, ``leases`` drainer's own ``drainer_leases``, ``history`` its
``drainer_attempts`` and ``requests`` its ``drainer_stop_requests``. The drain talks to them through
the :class:`BacklogStore` protocol; :func:`open_backlog` opens the SQL implementation.

Transactions are short and never held while a worker runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

import anyio

from ..dburl import DatabaseURL
from ..errors import DatabaseError
from ..models import Candidates, PhaseState
from ..schema import Schema
from ._engine import Engine, check_sqlite_file
from .history import HISTORY_TABLE, Entry, History, PhaseHistory, Summary
from .leases import LEASE_TABLE, Claim, Decide, Finished, Lease, Leases
from .phases import Outcome, PhaseRow, Phases, Stale
from .requests import REQUEST_TABLE, StopRequest, StopRequests

T = TypeVar("T")

__all__ = [
    "HISTORY_TABLE",
    "LEASE_TABLE",
    "REQUEST_TABLE",
    "Backlog",
    "BacklogStore",
    "Claim",
    "Entry",
    "Finished",
    "History",
    "Lease",
    "LeaseStore",
    "Outcome",
    "PhaseHistory",
    "PhaseRow",
    "PhaseStore",
    "Stale",
    "StopRequest",
    "StopRequests",
    "Summary",
    "open_backlog",
]


class PhaseStore(Protocol):
    """What the drain reads and writes in the phases table."""

    telemetry_tables: tuple[str, ...]
    missing_telemetry_tables: tuple[str, ...]

    @property
    def telemetry_available(self) -> bool: ...
    async def counts_by_state(self) -> dict[str, int]: ...
    async def load_candidates(self, *, run_id: str | None = None) -> Candidates: ...
    async def load_changed(self, seconds: float, *, run_id: str | None = None
                           ) -> tuple[Candidates, set[str]] | None: ...
    async def read(self, run_id: str, phase_id: str) -> PhaseRow | None: ...
    async def read_outcome(self, run_id: str, phase_id: str, *,
                           writer: bool = False) -> Outcome: ...
    async def wait_final_state(self, run_id: str, phase_id: str, *, wait: float) -> Outcome: ...
    async def runs_in(self, states: tuple[PhaseState, ...]) -> list[str]: ...
    async def restore_failed(self, run_id: str, phase_id: str, note: str) -> str | None: ...
    async def telemetry_count(self, run_id: str, phase_id: str) -> int | None: ...


class LeaseStore(Protocol):
    """What the drain does with run leases."""

    async def claim(self, lease: Lease, ttl: float) -> Claim: ...
    async def take_over(self, lease: Lease, ttl: float, expired: Lease | None) -> Claim: ...
    async def renew(self, run_id: str, attempt_id: str, ttl: float,
                    worker: tuple[int, float | None] | None = None) -> bool: ...
    async def finish(self, run_id: str, phase_id: str, attempt_id: str, *,
                     restore: str | None, entry: Entry | None = None) -> Finished: ...
    async def finish_if_final(self, run_id: str, phase_id: str,
                              attempt_id: str) -> tuple[Outcome, bool | None]: ...
    async def finish_recorded(self, run_id: str, phase_id: str, attempt_id: str,
                              decide: Decide[T]) -> tuple[Outcome, T | None, bool]: ...
    async def release(self, run_id: str, attempt_id: str) -> None: ...
    async def release_quietly(self, run_id: str, attempt_id: str) -> None: ...
    async def release_session(self, session_id: str) -> int: ...
    async def held_elsewhere(self, *, other_than: str) -> dict[str, float]: ...

    async def expired(self, *, other_than: str) -> list[Lease]: ...
    async def sweep(self, lease: Lease) -> bool: ...


class BacklogStore(Protocol):
    """A backlog as the drain sees it: its phases and its leases."""

    @property
    def phases(self) -> PhaseStore: ...
    @property
    def leases(self) -> LeaseStore: ...
    @property
    def history(self) -> History: ...
    @property
    def keeps_history(self) -> bool: ...
    async def prepare_for_writes(self, *, history: bool = True) -> None: ...


class Backlog:
    """One backlog database (Autopack schema by default). Use :func:`open_backlog`."""

    def __init__(self, db: DatabaseURL, telemetry_tables: Iterable[str] = (),
                 schema: Schema | None = None) -> None:
        self.db = db
        self.engine = Engine(db)
        self.phases = Phases(self.engine, schema or Schema(), tuple(telemetry_tables))
        self.leases = Leases(self.engine, self.phases)
        self.history = History(self.engine, LEASE_TABLE)
        #: why the history could not be created (then attempts go unrecorded)
        self.history_problem: str | None = None
        self.requests = StopRequests(self.engine)
        #: why the stop requests' table could not be created (then no one can ask)
        self.requests_problem: str | None = None

    @property
    def keeps_history(self) -> bool:
        """Whether finished attempts are recorded in ``drainer_attempts`` this session."""
        return self.leases.history is not None

    async def prepare_for_writes(self, *, history: bool = True) -> None:
        """Called once input is known good: SQLite gets WAL so workers and drainer coexist,
        and the lease table, the stop requests' table (and, with ``history``, the attempt
        history) are created if missing."""
        if self.db.is_sqlite:
            await self.engine.set_wal()
        await self.leases.ensure_table()
        self.requests_problem = await _optional(self.requests.ensure_table())
        if history:
            self.history_problem = await _optional(self.history.ensure_table())
            if self.history_problem is None:
                self.leases.history = self.history

    async def aclose(self) -> None:
        await self.engine.aclose()


async def _optional(creating: Awaitable[None]) -> str | None:
    """Create one of drainer's optional tables: why it could not be (a role that may use the
    backlog but not create tables in it), or None."""
    try:
        await creating
    except DatabaseError as exc:
        if exc.transient:
            raise
        return str(exc)
    return None


@asynccontextmanager
async def open_backlog(
    db: DatabaseURL, telemetry_tables: Iterable[str] = (), schema: Schema | None = None
) -> AsyncIterator[Backlog]:
    """Open and schema-check a backlog; nothing is written here."""
    if db.is_sqlite:
        check_sqlite_file(db)
    backlog = Backlog(db, telemetry_tables, schema)
    try:
        await backlog.phases.check_schema()
        yield backlog
    finally:
        with anyio.CancelScope(shield=True):
            await backlog.aclose()
