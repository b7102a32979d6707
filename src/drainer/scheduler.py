"""The lanes of a session: one picker hands claimed phases to N lanes, never two of one run.

Two cancel scopes carry every stop. The *picking* scope wraps the picker: a stop cancels it,
so no new attempt starts, and its deadline is ``--max-total-minutes``. The *in-flight* scope
wraps the lanes: its deadline is the picking deadline plus ``--stop-grace-seconds``, a stop
with a grace period pulls it in, and a hard stop cancels it, which kills the workers' trees
and settles their attempts (shielded) before the lanes end. Every stop goes through
:meth:`Scheduler.stop`. One ``anyio.Condition`` tells the picker that a lane is free or an
attempt ended.
"""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .attempt import AttemptRunner, Claimed, Leased, Spent
from .config import DrainConfig
from .errors import DrainerError
from .leaks import LeakGauge
from .models import Attempt, SessionStop, StopReason
from .policy import Policy
from .recorder import Recorder
from .resume import learn
from .selection import Selector

#: when only runs leased elsewhere are left, read the lease table this often (one small read)
LEASED_POLL_INTERVAL = 0.2

Ticket = tuple[Claimed, int]  #: a claimed phase and its number in the session (1, 2...)


class Scheduler:
    """Runs the lanes of one session; see the module docstring."""

    def __init__(
        self,
        config: DrainConfig,
        *,
        selector: Selector,
        policy: Policy,
        attempts: AttemptRunner,
        recorder: Recorder,
        leaks: LeakGauge,
    ) -> None:
        self.config = config
        self._selector = selector
        self._policy = policy
        self._attempts = attempts
        self._recorder = recorder
        self._leaks = leaks
        self._picking = anyio.CancelScope()
        self._in_flight = anyio.CancelScope()
        self._changed = anyio.Condition()
        self._idle = config.lanes
        self._running: dict[str, str] = {}  #: run id -> attempt id, for attempts in flight
        #: --attempts-scope history: each claim checks the history's count under the lease
        self._history_scope = config.attempts_scope == "history"
        self.stop_reason: StopReason | None = None
        self.stop_detail: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, reason: StopReason, detail: str, *, grace_period: float | None = None) -> None:
        """Stop picking. The first reason is recorded, except that an interruption (signal,
        cancel, error: resumable) outranks a quieter stop. ``grace_period``: in-flight
        attempts get at most that long (0: killed now); None leaves them to finish."""
        current = self.stop_reason
        if current is None or (reason.resumable and not current.resumable):
            self.stop_reason, self.stop_detail = reason, detail
            self._recorder.stopping(detail)
        self._picking.cancel()
        if grace_period is not None:
            self._in_flight.deadline = min(self._in_flight.deadline,
                                           anyio.current_time() + grace_period)

    def _decide(self, stop: SessionStop | None) -> None:
        if stop is not None:
            self.stop(stop.reason, stop.detail)

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain until a stop; returns once every lane is done."""
        cfg = self.config
        limit = self._policy.deadline
        if limit is not None:  # min(): a stop before the start may have set one already
            start = anyio.current_time()
            self._picking.deadline = min(self._picking.deadline, start + limit)
            self._in_flight.deadline = min(self._in_flight.deadline,
                                           start + limit + cfg.stop_grace_period)
        send, receive = anyio.create_memory_object_stream[Ticket](cfg.lanes)
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self._sweep_leases_forever)
                services.start_soon(self._attempts.sampler.run)
                services.start_soon(self._attempts.heartbeats.run)
                with self._in_flight:
                    async with anyio.create_task_group() as lanes:
                        for lane in range(1, cfg.lanes + 1):
                            lanes.start_soon(self._lane, lane, receive.clone())
                        lanes.start_soon(self._pick, send)
                services.cancel_scope.cancel()
        finally:
            # Claimed phases no lane took (the lanes were cancelled): give their runs back.
            with anyio.CancelScope(shield=True):
                while True:
                    try:
                        claimed, _number = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    await self._attempts.release(claimed)
                receive.close()

    async def _pick(self, send: MemoryObjectSendStream[Ticket]) -> None:
        async with send:
            with self._picking:
                async with self._changed:
                    while True:
                        while self._idle == 0:
                            await self._changed.wait()
                        claimed = await self._claim_next()
                        if claimed is None:
                            if not self._picking.cancel_called:
                                self.stop(StopReason.NO_CANDIDATES, "no candidates left")
                            return
                        self._idle -= 1
                        self._running[claimed.ref.run_id] = claimed.attempt_id
                        send.send_nowait((claimed, self._policy.started_count + 1))
                        decision = self._policy.started()
                        if decision is not None:
                            await anyio.lowlevel.checkpoint()  # its lane announces it first
                            self._decide(decision)
            if self._picking.cancel_called and self.stop_reason is None:
                # Nobody called stop(): the picking scope's deadline passed.
                minutes = (self._policy.deadline or 0) / 60
                self.stop(StopReason.TIME_LIMIT_REACHED,
                          f"time limit of {minutes:g} min reached")

    async def _claim_next(self) -> Claimed | None:
        """The next claimed phase, or None when nothing is left that could be drained.
        Called holding the condition."""
        selector = self._selector
        while True:
            # Reads and claims are short and run shielded: a stop never cuts a statement
            # in half; it takes effect right after.
            with anyio.CancelScope(shield=True):
                ref = await selector.pick(self._running.keys())
            for skipped, why in selector.new_unpassable():
                self._recorder.phase_skipped(skipped, why)
            if self._picking.cancel_called:
                if ref is not None:
                    selector.release(ref.run_id)
                return None
            if ref is None:
                if selector.waiting_on_leases:
                    # Runs another live drainer holds may be all that is left: look at the
                    # lease table (not the whole backlog) now and then, or when an attempt
                    # here ends, until those leases end or expire.
                    backoff = selector.backoff_wait()
                    with anyio.move_on_after(min(LEASED_POLL_INTERVAL, selector.lease_wait(),
                                                 math.inf if backoff is None else backoff)):
                        await self._changed.wait()
                    with anyio.CancelScope(shield=True):
                        selector.leases_now(await self._attempts.leased_elsewhere())
                    continue
                backoff = selector.backoff_wait()
                if self._running or backoff is not None:
                    # Only runs with an attempt in flight here are left, or retries that
                    # wait for their backoff: wait for an attempt to end (its run is free
                    # again, or a retry is due) or for the first backoff to end.
                    with anyio.move_on_after(math.inf if backoff is None else backoff):
                        await self._changed.wait()
                    continue
                return None
            tried = selector.attempts_of(ref) if self._history_scope else None
            with anyio.CancelScope(shield=True):
                outcome = await self._attempts.claim(ref, tried=tried)
            self._recorder.claims += 1
            if isinstance(outcome, Claimed):
                if self._picking.cancel_called:  # a stop arrived while we claimed
                    selector.release(ref.run_id)
                    await self._attempts.release(outcome)
                    return None
                return outcome
            if isinstance(outcome, Leased):
                # Left alone until its lease ends: drainers sharing a backlog stop colliding.
                self._recorder.claims_refused += 1
                selector.leased_elsewhere(ref.run_id, outcome.remaining)
                if outcome.elsewhere:
                    selector.leased_now(outcome.elsewhere)
            elif isinstance(outcome, Spent):
                selector.spent(ref, outcome.others)
            else:
                selector.remove(ref)

    async def _lane(self, lane: int, receive: MemoryObjectReceiveStream[Ticket]) -> None:
        async with receive:
            async for claimed, number in receive:
                run_id = claimed.ref.run_id
                try:
                    attempt = await self._attempts.run(
                        claimed, lane=lane, number=number,
                        attempt_number=self._selector.attempts_of(claimed.ref) + 1)
                    await self._learn(attempt)  # the run stays busy until it is learnt
                finally:
                    self._running.pop(run_id, None)
                    self._idle += 1
                    with anyio.CancelScope(shield=True):
                        async with self._changed:
                            self._changed.notify_all()

    async def _learn(self, attempt: Attempt) -> None:
        """Feed a finished attempt to the leak gauge, the stop rules and the selector."""
        leaks = self._leaks
        leaks.add_attempt(attempt)
        others = [a for a in self._running.values() if a != attempt.attempt_id]
        for proc in await leaks.sample(others):
            self._recorder.leak_found(proc)
        run_stops, session_stop = learn(attempt, self._policy, self._selector)
        for stop in run_stops:
            self._recorder.run_stopped(stop)
        self._decide(session_stop)
        await self._recorder.snapshot_if_due()

    async def _sweep_leases_forever(self) -> None:
        while True:
            await anyio.sleep(self.config.lease_ttl / 2)
            try:
                await sweep_leases(self._attempts, self._selector)
            except DrainerError as exc:  # a busy database: the next sweep will do it
                self._recorder.echo(f"[LEASE] sweeping expired leases failed, retrying later: "
                                    f"{exc}")


async def sweep_leases(attempts: AttemptRunner, selector: Selector) -> None:
    """Restore and delete other sessions' expired leases; their phases are drainable again."""
    if await attempts.sweep_expired():
        selector.invalidate()
