"""drainer's own table ``drainer_stop_requests``: ``drainer stop --session ID`` asks a running
session, on any host, to stop picking; the session polls for it (README "Stopping a session
from anywhere").

One row per request: the session asked, who asked and when, and who took it and when, by
the database's clock. Each ``drainer stop`` waits on, and may withdraw, its own row only. A
session takes every request waiting for it, until it ends. A resume clears the rows made
before it took the session's journal, so a request made while no drainer ran the session
never stops its resume, and one made while it starts does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import text

from ._engine import Engine, Execute

T = TypeVar("T")
REQUEST_TABLE = "drainer_stop_requests"
# Advisory lock key taken while creating REQUEST_TABLE on PostgreSQL ("drainstp" in ASCII).
_REQUEST_DDL_LOCK = 0x647261696E737470
POLL_SECONDS = 2.0  #: how often a running session looks for a request
DDL = (f"CREATE TABLE IF NOT EXISTS {REQUEST_TABLE} (request_id VARCHAR(32) PRIMARY KEY, "
       "session_id VARCHAR(64) NOT NULL, requested_by VARCHAR(255) NOT NULL, "
       "requested_at DOUBLE PRECISION NOT NULL, taken_by VARCHAR(255), "
       f"taken_at DOUBLE PRECISION); CREATE INDEX IF NOT EXISTS {REQUEST_TABLE}_session "
       f"ON {REQUEST_TABLE} (session_id)")
_COLUMNS = "request_id, session_id, requested_by, requested_at, taken_by, taken_at"


def new_request_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class StopRequest:
    """A stop request as read back."""

    request_id: str
    session_id: str
    requested_by: str
    requested_at: float
    taken_by: str | None
    taken_at: float | None


class StopRequests:
    """The stop requests of one backlog database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        now = engine.now_sql
        self._insert = text(f"INSERT INTO {REQUEST_TABLE} (request_id, session_id, "
                            f"requested_by, requested_at) VALUES (:request_id, :session_id, "
                            f":host, {now})")
        self._one = text(f"SELECT {_COLUMNS} FROM {REQUEST_TABLE} "
                         "WHERE request_id = :request_id")
        self._taken = text(f"SELECT {_COLUMNS} FROM {REQUEST_TABLE} WHERE session_id = "
                           ":session_id AND taken_at IS NOT NULL ORDER BY taken_at, request_id")
        self._waiting = text(f"SELECT request_id FROM {REQUEST_TABLE} WHERE session_id = "
                             ":session_id AND taken_at IS NULL")
        self._take = text(f"UPDATE {REQUEST_TABLE} SET taken_by = :host, taken_at = {now} "
                          "WHERE session_id = :session_id AND taken_at IS NULL")
        self._withdraw = text(f"DELETE FROM {REQUEST_TABLE} WHERE request_id = :request_id "
                              "AND taken_at IS NULL")
        self._clear = text(f"DELETE FROM {REQUEST_TABLE} WHERE session_id = :session_id "
                           "AND requested_at < :before")
        self._now = text(f"SELECT {now}")

    async def ensure_table(self) -> None:
        await self._engine.create_table(REQUEST_TABLE, _REQUEST_DDL_LOCK, DDL.split("; "))

    async def has_table(self) -> bool:
        return await self._engine.has_table(REQUEST_TABLE)

    async def _run(self, action: str, body: Callable[[Execute], T], *,
                   write: bool = False) -> T:
        return await self._engine.retry(f"{action} {REQUEST_TABLE} of",
                                        lambda: self._engine.run(body, write=write))

    async def request(self, request_id: str, session_id: str, host: str) -> StopRequest | None:
        """Ask ``session_id`` to stop (``request_id``: from :func:`new_request_id`, known
        before the row is written, so it can be withdrawn however the write ends): the new
        request as written (None: a resume cleared it at once)."""
        params = {"request_id": request_id, "session_id": session_id, "host": host}

        def ask(execute: Execute) -> StopRequest | None:
            execute(self._insert, params)
            row = execute(self._one, params).first()
            return None if row is None else _request(row)

        return await self._run("requesting a stop in", ask, write=True)

    async def read(self, request_id: str) -> StopRequest | None:
        params = {"request_id": request_id}

        def get(execute: Execute) -> StopRequest | None:
            row = execute(self._one, params).first()
            return None if row is None else _request(row)

        return await self._run("reading", get)

    async def take(self, session_id: str, host: str) -> StopRequest | None:
        """The session's poll: the requests waiting for it, now taken by ``host`` (the first
        is returned); None when there is none (one indexed read, on the connection for reads:
        an idle poll never queues behind the attempts' writes)."""
        params = {"session_id": session_id, "host": host}
        if await self._run("reading", lambda execute: execute(
                self._waiting, params).first()) is None:
            return None

        def poll(execute: Execute) -> StopRequest | None:
            if not execute(self._take, params).rowcount:
                return None  # withdrawn at that moment
            row = execute(self._taken, params).first()
            return None if row is None else _request(row)

        return await self._run("reading", poll, write=True)

    async def withdraw(self, request_id: str) -> bool:
        """Withdraw one's own request if no session took it; False when one did meanwhile."""
        params = {"request_id": request_id}
        return await self._run(
            "withdrawing a stop request in",
            lambda execute: bool(execute(self._withdraw, params).rowcount), write=True)

    async def waiting(self) -> list[StopRequest]:
        """Every request no session has taken yet, oldest first (none without the table)."""
        if not await self.has_table():
            return []
        stmt = text(f"SELECT {_COLUMNS} FROM {REQUEST_TABLE} WHERE taken_at IS NULL "
                    "ORDER BY requested_at, request_id")
        return await self._run("reading", lambda execute: [
            _request(row) for row in execute(stmt).all()])

    async def now(self) -> float:
        """The database's clock (epoch seconds), as the requests' times are written."""
        return float(await self._run("reading the clock for", lambda execute: execute(
            self._now).scalar()))

    async def clear(self, session_id: str, *, before: float) -> None:
        """A session resumes: its requests made before ``before`` (the database's clock just
        before it took its journal) are void; later ones are for it."""
        params = {"session_id": session_id, "before": before}
        await self._run("clearing", lambda execute: execute(self._clear, params), write=True)


def _request(row: Any) -> StopRequest:
    taken_by, taken_at = row[4], row[5]
    return StopRequest(str(row[0]), str(row[1]), str(row[2]), float(row[3]),
                       None if taken_by is None else str(taken_by),
                       None if taken_at is None else float(taken_at))
