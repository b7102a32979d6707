"""drainer's own table ``drainer_stop_requests``: ``drainer stop --session ID`` asks a running
session, on any host, to stop picking; the session polls for it (README "Stopping a session
from anywhere").

One row per session asked: who asked and when, and who took the request and when, by the
database's clock. A session clears its own rows when it starts or resumes, so a request no
running drainer took never stops a later resume of that session.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

from ._engine import Engine, Execute

REQUEST_TABLE = "drainer_stop_requests"
# Advisory lock key taken while creating REQUEST_TABLE on PostgreSQL ("drainstp" in ASCII).
_REQUEST_DDL_LOCK = 0x647261696E737470
POLL_SECONDS = 2.0  #: how often a running session looks for a request
DDL = (f"CREATE TABLE IF NOT EXISTS {REQUEST_TABLE} (session_id VARCHAR(64) PRIMARY KEY, "
       "requested_by VARCHAR(255) NOT NULL, requested_at DOUBLE PRECISION NOT NULL, "
       "taken_by VARCHAR(255), taken_at DOUBLE PRECISION)")


@dataclass(frozen=True, slots=True)
class StopRequest:
    """A stop request as read back."""

    session_id: str
    requested_by: str
    requested_at: float
    taken_by: str | None
    taken_at: float | None


class StopRequests:
    """The stop requests of one backlog database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.db.is_sqlite
        now = engine.now_sql
        self._insert = text(f"INSERT INTO {REQUEST_TABLE} (session_id, requested_by, "
                            f"requested_at) VALUES (:session_id, :host, {now})")
        self._read = text(f"SELECT session_id, requested_by, requested_at, taken_by, taken_at "
                          f"FROM {REQUEST_TABLE} WHERE session_id = :session_id")
        self._take = text(f"UPDATE {REQUEST_TABLE} SET taken_by = :host, taken_at = {now} "
                          "WHERE session_id = :session_id AND taken_at IS NULL")
        self._withdraw = text(f"DELETE FROM {REQUEST_TABLE} WHERE session_id = :session_id "
                              "AND taken_at IS NULL")
        self._clear = text(f"DELETE FROM {REQUEST_TABLE} WHERE session_id = :session_id")

    async def ensure_table(self) -> None:
        with self._engine.errors(f"creating {REQUEST_TABLE} in"):
            try:
                async with self._engine.write() as conn:
                    if not self._sqlite:  # see Leases.ensure_table
                        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                           {"key": _REQUEST_DDL_LOCK})
                    await conn.execute(text(DDL))
            except (IntegrityError, ProgrammingError):
                if not await self.has_table():
                    raise

    async def has_table(self) -> bool:
        try:
            return bool(await self._engine.run_sync(
                lambda c: inspect(c).has_table(REQUEST_TABLE)))
        except SQLAlchemyError:
            return False

    async def request(self, session_id: str, host: str) -> StopRequest:
        """Ask ``session_id`` to stop: the request as it stands (an earlier one, taken or
        not, is kept as it is)."""
        params = {"session_id": session_id, "host": host}

        def ask(execute: Execute) -> StopRequest:
            with contextlib.suppress(IntegrityError):  # asked before: that request stands
                execute(self._insert, params)
            row = execute(self._read, params).first()
            return _request(row)

        return await self._engine.retry(f"requesting a stop in {REQUEST_TABLE} of",
                                        lambda: self._engine.run(ask, write=True))

    async def read(self, session_id: str) -> StopRequest | None:
        params = {"session_id": session_id}

        def get(execute: Execute) -> StopRequest | None:
            row = execute(self._read, params).first()
            return None if row is None else _request(row)

        return await self._engine.retry(f"reading {REQUEST_TABLE} of",
                                        lambda: self._engine.run(get))

    async def take(self, session_id: str, host: str) -> StopRequest | None:
        """The session's poll: the request waiting for it, now marked taken by ``host``; None
        when there is none (one read by primary key)."""
        params = {"session_id": session_id, "host": host}

        def poll(execute: Execute) -> StopRequest | None:
            row = execute(self._read, params).first()
            if row is None or row[4] is not None:
                return None
            if not execute(self._take, params).rowcount:
                return None  # withdrawn at that moment
            return _request(execute(self._read, params).first())

        return await self._engine.retry(f"reading {REQUEST_TABLE} of",
                                        lambda: self._engine.run(poll, write=True))

    async def withdraw(self, session_id: str) -> bool:
        """Withdraw a request no session took; False when one took it meanwhile."""
        params = {"session_id": session_id}
        return await self._engine.retry(
            f"withdrawing a stop request in {REQUEST_TABLE} of",
            lambda: self._engine.run(lambda execute: bool(
                execute(self._withdraw, params).rowcount), write=True))

    async def clear(self, session_id: str) -> None:
        """A session starts or resumes: requests made while it was not running are void."""
        params = {"session_id": session_id}
        await self._engine.retry(
            f"clearing {REQUEST_TABLE} of",
            lambda: self._engine.run(lambda execute: execute(self._clear, params), write=True))


def _request(row: Any) -> StopRequest:
    taken_by, taken_at = row[3], row[4]
    return StopRequest(str(row[0]), str(row[1]), float(row[2]),
                       None if taken_by is None else str(taken_by),
                       None if taken_at is None else float(taken_at))
