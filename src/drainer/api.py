"""The embedding API: ``async with open_drainer(config) as d: await d.run()``.

Runs inside the caller's event loop (asyncio, via anyio): it never calls ``asyncio.run``,
installs no signal handlers and prints nothing unless asked, and logs to the ``drainer``
logger. Cancelling the caller's scope cleans up like Ctrl-C: worker trees killed, phases
restored, journal and snapshot written.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import DrainConfig
from .errors import UsageError
from .events import DrainEvent
from .models import SessionSummary
from .recorder import Echo
from .session import DrainSession

#: events kept for a subscriber that has not come yet (the latest ones): a Drainer nobody
#: listens to must not grow with its session
EARLY_EVENTS = 1024


@dataclass(frozen=True, slots=True)
class DrainStatistics:
    """A point-in-time view of a running (or finished) session."""

    session_id: str
    processed: int  #: attempts, each counted under one outcome (``drainer.OUTCOMES``)
    ok: int
    failed: int  #: failed on their own: neither timed out, cancelled nor interrupted
    timed_out: int
    cancelled: int
    interrupted: int
    in_flight: int
    stop_reason: str | None  #: a :class:`~drainer.models.StopReason` value
    stop_detail: str | None = None  #: what the [STOP] line said (a caller's reason, say)


class Drainer:
    """One drain session owned by an embedding application. Use :func:`open_drainer`."""

    def __init__(self, config: DrainConfig, *, echo: Echo | None = None) -> None:
        self._send: MemoryObjectSendStream[DrainEvent]
        self._receive: MemoryObjectReceiveStream[DrainEvent]
        # Unbounded once subscribed: a slow event consumer must never slow a drain down.
        # Until then only the latest EARLY_EVENTS are kept.
        self._send, self._receive = anyio.create_memory_object_stream[DrainEvent](math.inf)
        self._early: deque[DrainEvent] = deque(maxlen=EARLY_EVENTS)
        self._session = DrainSession(config, echo=echo, on_event=self._publish)
        self._state = "new"  # new -> open -> closed
        self._ran = False
        self._subscribed = False

    def _publish(self, event: DrainEvent) -> None:
        if not self._subscribed:
            self._early.append(event)
            return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(event)  # closed: nobody listens any more

    async def __aenter__(self) -> Drainer:
        if self._state != "new":
            raise UsageError("a Drainer cannot be reopened; create a new one with open_drainer")
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the event stream. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._send.close()
        self._receive.close()

    @property
    def session_id(self) -> str:
        return self._session.session_id

    async def run(self) -> SessionSummary:
        """Drain until a stop condition, :meth:`stop`, or cancellation; return the summary."""
        if self._state != "open":
            raise UsageError("use the Drainer inside 'async with open_drainer(config) as d'")
        if self._ran:
            raise UsageError("Drainer.run() was already called; a session runs once")
        self._ran = True
        try:
            return await self._session.run()
        finally:
            self._send.close()  # the events iterator ends with the session

    def stop(self, reason: str = "cancelled") -> None:
        """Stop picking new phases; in-flight attempts get ``stop_grace_period`` to finish.
        The session records ``stop_reason: cancelled`` (resumable) with ``reason`` as its
        ``stop_detail``."""
        if not self._ran:
            raise UsageError("stop() before run(): there is nothing to stop yet")
        self._session.request_stop(reason)

    def statistics(self) -> DrainStatistics:
        s = self._session
        t = s.totals
        return DrainStatistics(
            session_id=s.session_id,
            processed=t.processed,
            ok=t.ok,
            failed=t.failed,
            timed_out=t.timed_out,
            cancelled=t.cancelled,
            interrupted=t.interrupted,
            in_flight=s.in_flight,
            stop_reason=s.stop_reason,
            stop_detail=s.stop_detail,
        )

    async def events(self) -> AsyncIterator[DrainEvent]:
        """Every event of the session, in order; ends when the session ends. One subscriber
        per Drainer (two would split the events between them). A subscriber that comes
        after ``EARLY_EVENTS`` events were published gets the latest ``EARLY_EVENTS`` of
        those first."""
        if self._state != "open":
            raise UsageError("events() is only available inside 'async with open_drainer(...)'")
        if self._subscribed:
            raise UsageError("events() already has a subscriber; a Drainer has one event stream")
        self._subscribed = True  # from here on, events go to the stream
        early = list(self._early)
        self._early.clear()
        for event in early:
            yield event
        async with self._receive.clone() as receive:
            async for event in receive:
                yield event


async def drain(
    config: DrainConfig,
    on_event: Callable[[DrainEvent], None] | None = None,
    *,
    echo: Echo | None = None,
    handle_signals: bool = False,
) -> SessionSummary:
    """Drain the backlog described by ``config`` and return the session summary.

    ``on_event`` receives typed events (:mod:`drainer.events`) as they happen. Progress lines
    go to ``echo`` when given, else to the ``drainer`` logger; nothing is printed unless
    asked. With ``handle_signals`` (the CLI), SIGINT/SIGTERM stop picking and a second one
    kills in-flight attempts; an embedding application cancels its own scope instead, which
    kills running workers' trees, restores their phases and writes the journal.
    """
    session = DrainSession(config, echo=echo, handle_signals=handle_signals, on_event=on_event)
    return await session.run()


@asynccontextmanager
async def open_drainer(
    config: DrainConfig, *, echo: Echo | None = None
) -> AsyncIterator[Drainer]:
    """Open a :class:`Drainer` for ``config``; ``await d.run()`` drains."""
    async with Drainer(config, echo=echo) as drainer:
        yield drainer
