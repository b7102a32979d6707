"""One drain session: preflight, the drain loop, attempt bookkeeping, the summary.

Order of work (DESIGN.md §8): every check first (options, URL, database, schema, backlog
not empty, session directory writable, worker program found), then the first write.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shlex
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import __version__, proctree
from .apiserver import API_MARKER_VAR, check_api_url, open_api_server
from .backlog import Backlog, Lease, open_backlog
from .config import DrainConfig, render_command
from .dburl import redact_text
from .errors import DatabaseError, DrainerError, SessionError, UsageError
from .events import AttemptFinished, AttemptStarted, DrainEvent, RunStopped, SessionStopped
from .faults import crash_point
from .fingerprint import (
    error_excerpt,
    failure_fingerprint,
    reached_llm_boundary,
    yield_per_minute,
    zero_yield_reason,
)
from .journal import SessionFiles, check_writable_dir, hostname, iso, new_session_id, utcnow
from .models import Attempt, LeakedProcess, PhaseRef, PhaseState, is_final_state
from .policy import (
    BATCH_SIZE_REACHED,
    CANCELLED,
    CONSECUTIVE_ZERO_YIELD,
    ERROR,
    MAX_LEAKS,
    NO_CANDIDATES,
    SIGNAL,
    TIME_LIMIT_REACHED,
    Policy,
    RunStop,
)
from .report import attempt_lines, header_lines, summary_lines
from .resume import Replay, find_resumable
from .selection import TIER_DEPRIORITISED, CandidateIndex
from .supervisor import AttemptSpec, ProcessResult, Supervisor

log = logging.getLogger("drainer")

Echo = Callable[[str], None]
SNAPSHOT_INTERVAL = 2.0  #: the journal is the truth; the snapshot follows it on a timer
LEAK_GAUGE_INTERVAL = 2.0  #: scanning every process's command line is not free
DB_CLEANUP_TIMEOUT = 30.0
INDEX_REFRESH_INTERVAL = 300.0  #: reload candidates this often, to find newly FAILED phases
LEASED_POLL_INTERVAL = 1.0  #: when only runs leased elsewhere are left, look again this often


@dataclass
class SessionSummary:
    """What a finished (or stopped) session did. ``exit_code`` follows DESIGN.md §8."""

    session_id: str
    started_at: str
    completed_at: str | None
    stop_reason: str | None
    results: list[Attempt]
    snapshot_path: Path
    journal_path: Path
    logs_dir: Path
    stopped_runs: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    pattern_leaks: list[LeakedProcess] = field(default_factory=list)

    @property
    def total_processed(self) -> int:
        return len(self.results)

    @property
    def total_success(self) -> int:
        return sum(1 for r in self.results if r.success)

    @property
    def total_failed(self) -> int:
        return sum(1 for r in self.results if r.failed)

    @property
    def total_timeouts(self) -> int:
        return sum(1 for r in self.results if r.timed_out)

    @property
    def total_telemetry_events(self) -> int:
        return sum(r.telemetry_events_collected or 0 for r in self.results)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.total_failed else 0


def check_worker_program(config: DrainConfig) -> None:
    """Fail early when the worker's program or workspace is missing (instead of failing every
    phase with a misleading spawn error)."""
    if not config.workspace.is_dir():
        raise UsageError(f"--workspace {config.workspace} is not a directory")
    first = render_command(
        config.command_tokens[:1],
        _placeholder_values(config, run_id="", phase_id="", phase_index=0, attempt_id="",
                            session_id=""),
    )[0]
    if "/" in first:
        path = Path(first) if Path(first).is_absolute() else config.workspace / first
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UsageError(f"worker program {first!r} is not an executable file (--command)")
    elif shutil.which(first) is None:
        raise UsageError(f"worker program {first!r} is not on PATH (--command)")


def _placeholder_values(
    config: DrainConfig,
    *,
    run_id: str,
    phase_id: str,
    phase_index: int,
    attempt_id: str,
    session_id: str,
) -> dict[str, str]:
    return {
        "run_id": run_id,
        "phase_id": phase_id,
        "phase_index": str(phase_index),
        "attempt_id": attempt_id,
        "session_id": session_id,
        "python": config.python,
        "workspace": str(config.workspace.resolve()),
    }


class DrainSession:
    """Runs one session; see :func:`drain` for the simple entry point."""

    def __init__(
        self,
        config: DrainConfig,
        *,
        echo: Echo | None = None,
        handle_signals: bool = False,
        on_event: Callable[[DrainEvent], None] | None = None,
    ) -> None:
        self.config = config
        self._echo_fn = echo
        self._on_event = on_event
        self._handle_signals = handle_signals
        self.session_id = new_session_id()
        self.files = SessionFiles(config.session_dir, self.session_id, config.secrets)
        self.policy = Policy(config)
        self.results: list[Attempt] = []
        self.started_at = iso(utcnow())
        self.completed_at: str | None = None
        self.signalled = False
        self._deadline: float | None = None
        self._last_snapshot = 0.0
        self._last_gauge = 0.0
        self._signal_deadline: float | None = None
        self._finished_count = 0  #: attempts finished; tells _claim that something changed
        self._index: CandidateIndex | None = None
        self._index_loaded_at = 0.0
        self._busy_runs: set[str] = set()
        self._attempt_scopes: set[anyio.CancelScope] = set()
        self._attempt_done = anyio.Event()
        self._pick_lock = anyio.Lock()
        self._replay: Replay | None = None
        self._leased_elsewhere: set[str] = set()
        self._lease_ids: dict[str, str] = {}  #: run id -> attempt id holding its lease
        self._telemetry_before: dict[str, int | None] = {}  #: read under the lease claim
        self._removed: set[tuple[str, str]] = set()
        self._api_url: str | None = config.api_url
        self._leak_re = re.compile(config.leak_pattern)
        self._leak_baseline: set[int] = set()
        self.pattern_leaks: dict[int, LeakedProcess] = {}
        self._host = hostname()

    # -- output ------------------------------------------------------------------------

    def emit(self, event: DrainEvent) -> None:
        """Hand an event to the embedding application (errors there must not stop a drain)."""
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken callback is the caller's bug: log it, drain on
                log.exception("on_event callback failed for %s", type(event).__name__)

    def echo(self, line: str) -> None:
        line = redact_text(line, self.config.secrets)
        if self._echo_fn is not None:
            self._echo_fn(line)
        else:
            log.info("%s", line)

    # -- entry -------------------------------------------------------------------------

    async def run(self) -> SessionSummary:
        cfg = self.config
        async with open_backlog(cfg.db, cfg.telemetry_tables, cfg.schema) as backlog:
            counts = await backlog.counts_by_state()
            if sum(counts.values()) == 0 and not cfg.allow_empty_db:
                raise UsageError(
                    f"{cfg.db.redacted} has no phases at all; is it the right database? "
                    "Pass --allow-empty-db to run against it anyway"
                )
            check_writable_dir(cfg.session_dir)
            check_worker_program(cfg)
            if cfg.api_url is not None:
                await check_api_url(cfg.api_url)
            if cfg.resume is not None:
                self._replay = find_resumable(cfg.session_dir, cfg.resume)
                if self._replay is None:
                    self.echo(f"[RESUME] no incomplete session in {cfg.session_dir}; "
                              "starting a new one")
                else:
                    self._adopt(self._replay)
            for line in header_lines(cfg, self.session_id, counts):
                self.echo(line)
            if backlog.missing_telemetry_tables:
                self.echo(
                    "[NOTICE] telemetry table(s) missing: "
                    f"{', '.join(backlog.missing_telemetry_tables)}"
                    + ("; telemetry is unavailable" if not backlog.telemetry_available else "")
                )
            if self._replay is not None:
                await self._kill_orphaned_api_server()
            # The shared API server starts before the first write: if it never answers, the
            # session ends with exit 2 and nothing changed.
            api_log = Path(tempfile.gettempdir()) / f"drainer-api-{self.session_id}.log"
            async with open_api_server(cfg, self.session_id, api_log) as api_url:
                if cfg.api_command is not None:
                    self.echo(f"[API] started one server for all workers at {api_url} "
                              f"(log: {api_log})")
                self._api_url = api_url
                await self._run_session(backlog)
        return self.summary()

    async def _run_session(self, backlog: Backlog) -> None:
        """From the first write on: journal, reconcile, drain, and always finish cleanly."""
        cfg = self.config
        await backlog.prepare_for_writes()
        self.files.create()
        try:
            if self._replay is None:
                self._journal(
                    {
                        "type": "session_started",
                        "session_id": self.session_id,
                        "started_at": self.started_at,
                        "host": self._host,
                        "pid": os.getpid(),
                        "drainer_version": __version__,
                        "config": cfg.to_json(),
                    }
                )
            else:
                self._journal({"type": "session_resumed", "host": self._host,
                               "pid": os.getpid(), "config": cfg.to_json()})
                await self._reconcile(backlog, self._replay)
            await backlog.release_session_leases(self.session_id)
            await self._sweep_leases(backlog)
            self._leak_baseline = await self._matching_pids()
            await self._drain(backlog)
            await self._gauge_leaks()  # what the last attempts left behind
        except BaseException as exc:
            error = _drainer_error(exc)
            if error is not None:
                # drainer could not go on (database gone, disk full...): a resumable stop.
                self.policy.stop(ERROR)
                self.echo(f"[STOP] {error}")
                raise error from exc
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self.policy.stop(CANCELLED)
            raise
        finally:
            self._finish()  # synchronous: no checkpoint, so a cancellation cannot skip it

    def _adopt(self, replay: Replay) -> None:
        """Continue ``replay``'s session: same id, every counter rebuilt from its journal."""
        self.session_id = replay.session_id
        self.files = SessionFiles(self.config.session_dir, self.session_id, self.config.secrets)
        self.started_at = replay.started_at
        for attempt in replay.results:
            self._count_finished(attempt)
        for run_id, reason in replay.stopped_runs.items():
            self.policy.stopped_runs.setdefault(run_id, reason)
        done = sum(1 for r in replay.results if not r.interrupted)
        self.policy.processed = done  # --batch-size counts the whole session
        self.echo(
            f"[RESUME] session {self.session_id}: {done} attempt(s) done, "
            f"{len(replay.dangling)} to reconcile"
        )

    def _count_finished(self, attempt: Attempt) -> list[RunStop]:
        """Feed one finished attempt to the counters and triage (live or replayed)."""
        self.results.append(attempt)
        if attempt.interrupted:
            return []
        stops = self.policy.observe(attempt)
        if attempt.run_id not in self.policy.run_tiers:
            tier = self.policy.triage_tier(attempt)
            self.policy.run_tiers[attempt.run_id] = tier
            if tier == TIER_DEPRIORITISED and self._index is not None:
                self.echo(f"  [TRIAGE] run {attempt.run_id} deprioritised: its sample failed "
                          "with a fingerprint already seen, no telemetry")
        if self._index is not None:
            self._index.set_tier(
                attempt.run_id, self.policy.run_tiers[attempt.run_id], self.policy.attempts_of
            )
            if self.policy.retry_allowed(attempt.key):
                self._index.note_retry(attempt.key, self.policy.attempts_of(attempt.key))
        return stops

    @property
    def total_leaks(self) -> int:
        """Leaked processes this session: attempt-marker leaks plus --leak-pattern finds."""
        marked = {p.pid for r in self.results for p in r.leaked_processes}
        return len(marked | set(self.pattern_leaks))

    def summary(self) -> SessionSummary:
        return SessionSummary(
            session_id=self.session_id,
            started_at=self.started_at,
            completed_at=self.completed_at,
            stop_reason=self.policy.stop_reason,
            results=list(self.results),
            snapshot_path=self.files.snapshot_path,
            journal_path=self.files.journal_path,
            logs_dir=self.files.logs_dir,
            stopped_runs=dict(self.policy.stopped_runs),
            interrupted=self.signalled or self.policy.stop_reason in (SIGNAL, CANCELLED, ERROR),
            pattern_leaks=list(self.pattern_leaks.values()),
        )

    # -- reconciliation after a crash ----------------------------------------------------

    async def _kill_orphaned_api_server(self) -> None:
        """A crashed run of this session may have left its API server running."""
        orphans = await anyio.to_thread.run_sync(
            functools.partial(proctree.kill_marked, API_MARKER_VAR, self.session_id, None,
                              grace=self.config.kill_grace_period)
        )
        if orphans:
            self.echo(f"[RECONCILED] killed {orphans} process(es) of the crashed session's "
                      "API server")

    async def _reconcile(self, backlog: Backlog, replay: Replay) -> None:
        """Attempts that started but never finished: kill what they left, restore, record."""
        for event in replay.dangling:
            attempt_id = str(event["attempt_id"])
            pid = event.get("pid")
            create_time = event.get("create_time")
            killed = await anyio.to_thread.run_sync(
                functools.partial(
                    proctree.kill_leftovers, attempt_id, pid, create_time,
                    grace=self.config.kill_grace_period,
                )
            )
            record = Attempt.from_json(event)
            row = await backlog.read_phase(record.run_id, record.phase_id)
            state = row[0] if row is not None else None
            if row is not None and not is_final_state(state):
                why = "drainer: attempt interrupted (drainer stopped while it ran); restored"
                if await backlog.restore_failed(record.run_id, record.phase_id, why):
                    record.state_restored = True
                    state = PhaseState.FAILED.value
            before = event.get("telemetry_before")
            after = await backlog.telemetry_count(record.run_id, record.phase_id)
            record.telemetry_events_collected = (
                None if before is None or after is None else max(0, after - int(before))
            )
            record.interrupted = True
            record.final_state = state
            record.success = state == PhaseState.COMPLETE.value
            record.leaked_processes = killed
            record.finished_at = record.timestamp = iso(utcnow())
            record.error_message = (
                None if record.success else
                f"drainer: interrupted: drainer stopped while this attempt ran "
                f"({len(killed)} leftover process(es) killed); phase now {state}"
            )
            await backlog.release_lease(record.run_id, attempt_id)
            self._count_finished(record)
            self._journal({"type": "attempt_finished", **record.to_json()})
            self.echo(f"[RECONCILED] {record.run_id} / {record.phase_id}: interrupted attempt, "
                      f"phase {state}, {len(killed)} process(es) killed")

    # -- the loop ----------------------------------------------------------------------

    async def _load_index(self, backlog: Backlog) -> CandidateIndex:
        cfg = self.config
        candidates = await backlog.load_candidates(run_id=cfg.run_id)
        index = CandidateIndex.build(
            candidates,
            skip_run_prefixes=cfg.skip_run_prefixes,
            skip_queued=cfg.skip_runs_with_queued,
        )
        for run_id, tier in self.policy.run_tiers.items():
            index.set_tier(run_id, tier, self.policy.attempts_of)
        for key in self.policy.retry_keys():
            index.note_retry(key, self.policy.attempts_of(key))
        self._index_loaded_at = anyio.current_time()
        return index

    async def _next_phase(self, backlog: Backlog) -> PhaseRef | None:
        stale = anyio.current_time() - self._index_loaded_at > INDEX_REFRESH_INTERVAL
        if self._index is None or stale:
            self._index = await self._load_index(backlog)
        busy = self._busy_runs | self._leased_elsewhere
        ref = self._index.pick(self.policy, busy, self._removed)
        if ref is None and self._index_loaded_at < anyio.current_time():
            # The index ran dry: reload once, so phases that became FAILED meanwhile count.
            self._index = await self._load_index(backlog)
            self._removed.clear()  # the reload reflects the backlog as it is now
            ref = self._index.pick(self.policy, busy, self._removed)
        return ref

    async def _drain(self, backlog: Backlog) -> None:
        cfg = self.config
        if cfg.max_total_minutes is not None:
            self._deadline = anyio.current_time() + cfg.max_total_minutes * 60
        async with anyio.create_task_group() as tg:
            if self._handle_signals:
                await tg.start(self._watch_signals)
            tg.start_soon(self._sweep_leases_forever, backlog)
            async with anyio.create_task_group() as lanes:
                for lane in range(1, cfg.lanes + 1):
                    lanes.start_soon(self._lane, backlog, lane)
            tg.cancel_scope.cancel()  # the lanes are done: stop watching signals

    async def _lane(self, backlog: Backlog, lane: int) -> None:
        while True:
            ref = await self._claim(backlog)
            if ref is None:
                return
            try:
                await self._attempt(backlog, ref, lane)
            finally:
                attempt_id = self._lease_ids.pop(ref.run_id, None)
                if attempt_id is not None:
                    # The attempt failed before it could release its lease (cancelled or an
                    # error before the spawn): release it now, best effort; else it expires.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                            contextlib.suppress(DrainerError):
                        await backlog.release_lease(ref.run_id, attempt_id)
                self._busy_runs.discard(ref.run_id)
                self._finished_count += 1
                self._attempt_done.set()

    async def _claim(self, backlog: Backlog) -> PhaseRef | None:
        """The next phase for a lane, or None when the session stops picking."""
        cfg, policy = self.config, self.policy
        async with self._pick_lock:
            while True:
                if policy.stop_reason is not None:
                    return None
                if policy.batch_done:
                    self._stop(BATCH_SIZE_REACHED, f"batch size {cfg.batch_size} reached")
                    return None
                if self._deadline is not None and anyio.current_time() >= self._deadline:
                    self._stop(TIME_LIMIT_REACHED,
                               f"time limit of {cfg.max_total_minutes:g} min reached")
                    return None
                generation = self._finished_count
                ref = await self._next_phase(backlog)
                if ref is not None:
                    ready = await self._lease(backlog, ref)
                    if ready is None:
                        continue  # leased elsewhere, or no longer drainable: pick again
                    if policy.stop_reason is not None:  # a stop arrived while we claimed
                        await backlog.release_lease(ready.run_id, self._lease_ids.pop(ready.run_id))
                        return None
                    policy.count_start()
                    self._busy_runs.add(ready.run_id)
                    return ready
                if generation != self._finished_count:
                    continue  # an attempt ended while we picked: its run may be free again
                if self._busy_runs:
                    # Only runs with an attempt in flight here are left: wait for one to end.
                    self._attempt_done = anyio.Event()
                    await self._attempt_done.wait()
                elif self._leased_elsewhere:
                    # Only runs another live drainer holds are left: wait for those leases to
                    # end or expire, then look again (their phases may be done by then).
                    with anyio.move_on_after(LEASED_POLL_INTERVAL):
                        self._attempt_done = anyio.Event()
                        await self._attempt_done.wait()
                    self._leased_elsewhere.clear()
                    self._index = None  # reload: the other drainer changed the backlog
                else:
                    self._stop(NO_CANDIDATES, "no candidates left")
                    return None

    async def _lease(self, backlog: Backlog, ref: PhaseRef) -> PhaseRef | None:
        """Claim the run's lease and re-read the phase under it. None: not drainable now."""
        attempt_id = str(uuid.uuid4())
        lease = Lease(run_id=ref.run_id, session_id=self.session_id, attempt_id=attempt_id,
                      phase_id=ref.phase_id, host=self._host, pid=os.getpid())
        claim = await backlog.claim_run(lease, self.config.lease_ttl)
        if claim.holder is not None:
            self._leased_elsewhere.add(ref.run_id)
            return None
        row = claim.phase
        drainable = (PhaseState.FAILED.value,) if self.config.skip_runs_with_queued else (
            PhaseState.FAILED.value, PhaseState.QUEUED.value)
        if row is None or row[0] not in drainable:
            # Drained meanwhile (another drainer, or the executor): drop it from the index.
            await backlog.release_lease(ref.run_id, attempt_id)
            self._removed.add(ref.key)
            return None
        self._lease_ids[ref.run_id] = attempt_id
        self._telemetry_before[ref.run_id] = claim.telemetry
        return PhaseRef(run_id=ref.run_id, phase_id=ref.phase_id, phase_index=ref.phase_index,
                        state=row[0], last_failure_reason=row[1])

    async def _sweep_leases(self, backlog: Backlog) -> None:
        for lease in await backlog.sweep_expired_leases():
            self.echo(f"[LEASE] expired lease of {lease.run_id} (drainer {lease.host} pid "
                      f"{lease.pid}) swept; phase {lease.phase_id} restored if it was left "
                      "non-final")
            self._index = None  # its phase is drainable again: reload

    async def _sweep_leases_forever(self, backlog: Backlog) -> None:
        while True:
            await anyio.sleep(self.config.lease_ttl / 2)
            try:
                await self._sweep_leases(backlog)
            except DrainerError as exc:  # a busy database: the next sweep will do it
                self.echo(f"[LEASE] sweeping expired leases failed, retrying later: {exc}")

    async def _heartbeat(
        self,
        backlog: Backlog,
        run_id: str,
        attempt_id: str,
        scope: anyio.CancelScope,
        lost: anyio.Event,
    ) -> None:
        """Renew the lease every TTL/3. A lease that cannot be renewed before it expires is
        lost: the attempt is cancelled at once, since another drainer may now take the run."""
        ttl = self.config.lease_ttl
        renewed = anyio.current_time()
        while True:
            await anyio.sleep(ttl / 3)
            try:
                held = await backlog.renew_lease(run_id, attempt_id, ttl)
            except DrainerError as exc:
                if anyio.current_time() - renewed < ttl * 2 / 3:
                    self.echo(f"[LEASE] renewing the lease of {run_id} failed, retrying: {exc}")
                    continue
                held = False
            if held:
                renewed = anyio.current_time()
                continue
            self.echo(f"[LEASE] lost the lease of {run_id} (not renewed within "
                      f"--lease-ttl-seconds {ttl:g}); stopping its attempt")
            lost.set()
            scope.cancel()
            return

    async def _matching_pids(self) -> set[int]:
        found = await anyio.to_thread.run_sync(
            proctree.find_matching, self._leak_re, set()
        )
        return {p.pid for p, _ in found}

    async def _gauge_leaks(self) -> None:
        """Processes matching --leak-pattern that appeared this session and outlived their
        attempt (or carry no attempt marker): reported, and counted for --max-leaks."""
        self._last_gauge = time.monotonic()
        in_flight = set(self._lease_ids.values())
        exclude = self._leak_baseline | set(self.pattern_leaks)
        found = await anyio.to_thread.run_sync(proctree.find_matching, self._leak_re, exclude)
        for proc, marker in found:
            if marker and marker in in_flight:
                continue  # its attempt is still running
            leaked = proctree.describe(proc)
            self.pattern_leaks[proc.pid] = leaked
            self.echo(f"  [LEAK] --leak-pattern: pid {leaked.pid} "
                      f"{' '.join(leaked.cmdline)[:120]} outlived its attempt")

    @property
    def in_flight_runs(self) -> frozenset[str]:
        return frozenset(self._busy_runs)

    def request_stop(self, reason: str) -> None:
        """Stop picking (first reason wins); in-flight attempts get the stop grace."""
        self._stop(reason, f"stop requested: {reason}")
        limit = anyio.current_time() + self.config.stop_grace_period
        self._signal_deadline = limit if self._signal_deadline is None else min(
            self._signal_deadline, limit)
        for scope in self._attempt_scopes:
            scope.deadline = min(scope.deadline, limit)
        self._attempt_done.set()  # wake a lane waiting for other runs

    def _stop(self, reason: str, text: str) -> None:
        if self.policy.stop_reason is None:
            self.policy.stop(reason)
            self.echo(f"[STOP] {text}")

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        grace = self.config.stop_grace_period
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.signalled:
                    self.signalled = True
                    self._stop(SIGNAL, f"{name} received: no new attempts; in-flight attempts "
                                       f"get up to {grace:g}s (send it again to kill them now)")
                    self.policy.stop_reason = SIGNAL  # a signal outranks a quieter stop
                    limit = anyio.current_time() + grace
                    self._signal_deadline = limit
                    for scope in self._attempt_scopes:
                        scope.deadline = min(scope.deadline, limit)
                else:
                    self.echo(f"[STOP] {name} again: killing in-flight attempts now")
                    self._signal_deadline = anyio.current_time()
                    for scope in self._attempt_scopes:
                        scope.cancel()

    # -- one attempt -------------------------------------------------------------------

    async def _attempt(self, backlog: Backlog, ref: PhaseRef, lane: int) -> Attempt:
        cfg = self.config
        attempt_number = self.policy.attempts_of(ref.key) + 1
        attempt_id = self._lease_ids[ref.run_id]  # the lease names this attempt
        stdout_path, stderr_path = self.files.log_paths(ref.run_id, ref.phase_id, attempt_number)
        # A re-attempt after an interrupted one must not overwrite its logs.
        while stdout_path.exists():
            attempt_number += 1
            stdout_path, stderr_path = self.files.log_paths(
                ref.run_id, ref.phase_id, attempt_number
            )
        record = Attempt(
            run_id=ref.run_id,
            phase_id=ref.phase_id,
            phase_index=ref.phase_index,
            initial_state=ref.state,
            attempt_id=attempt_id,
            attempt_number=attempt_number,
            lane=lane,
            started_at=iso(utcnow()),
            subprocess_stdout_path=str(stdout_path),
            subprocess_stderr_path=str(stderr_path),
        )
        lane_tag = f" [lane {lane}]" if cfg.lanes > 1 else ""
        self.echo(
            f"[{self.policy.processed}/{cfg.batch_size}]{lane_tag} Draining: "
            f"{ref.run_id} / {ref.phase_id}"
        )
        before = self._telemetry_before.pop(ref.run_id, None)
        values = _placeholder_values(
            cfg,
            run_id=ref.run_id,
            phase_id=ref.phase_id,
            phase_index=ref.phase_index,
            attempt_id=attempt_id,
            session_id=self.session_id,
        )
        spec = AttemptSpec(
            argv=render_command(cfg.command_tokens, values),
            env=self._worker_env(ref, attempt_id),
            cwd=cfg.workspace,
            attempt_id=attempt_id,
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            timeout=cfg.phase_timeout,
            kill_grace_period=cfg.kill_grace_period,
            max_log_bytes=cfg.max_log_bytes,
            secrets=cfg.secrets,
            kill_leaks=cfg.leak_policy == "kill",
        )
        self._journal({"type": "attempt_started", **record.to_json(), "argv": spec.argv,
                       "telemetry_before": before})
        self.emit(AttemptStarted(session_id=self.session_id, attempt_id=attempt_id,
                                 run_id=ref.run_id, phase_id=ref.phase_id,
                                 attempt_number=attempt_number, lane=lane,
                                 at=record.started_at))
        crash_point("before_spawn")

        def spawned(pid: int, create_time: float | None) -> None:
            self._journal({"type": "attempt_spawned", "attempt_id": attempt_id, "pid": pid,
                           "create_time": create_time})
            crash_point("worker_running")

        supervisor = Supervisor(spec, on_spawn=spawned)
        deadline = math.inf
        if self._deadline is not None:
            # In-flight attempts get the stop grace past the session deadline.
            deadline = self._deadline + cfg.stop_grace_period
        if self._signal_deadline is not None:
            deadline = min(deadline, self._signal_deadline)
        lease_lost = anyio.Event()
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                self._attempt_scopes.add(scope)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._heartbeat, backlog, ref.run_id, attempt_id, scope,
                                      lease_lost)
                        await supervisor.run()
                        tg.cancel_scope.cancel()
                finally:
                    self._attempt_scopes.discard(scope)
            # supervisor.result.cancelled is set only if the worker was still running.
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(DB_CLEANUP_TIMEOUT):
                        await self._complete(
                            backlog, record, supervisor.result, before, ref.last_failure_reason,
                            lease_lost=lease_lost.is_set(),
                        )
                except TimeoutError:
                    # Not journaled as finished: --resume reconciles this attempt.
                    raise DatabaseError(
                        f"the database did not answer within {DB_CLEANUP_TIMEOUT:g}s while "
                        f"finishing {ref.run_id} / {ref.phase_id}; resume the session to "
                        "reconcile it"
                    ) from None
        return record

    def _worker_env(self, ref: PhaseRef, attempt_id: str) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUTF8": "1",
                "PYTHONIOENCODING": "utf-8",
                "TELEMETRY_DB_ENABLED": "1",
                "DATABASE_URL": cfg.db.sync_url,
                "DRAINER_SESSION_ID": self.session_id,
                "DRAINER_ATTEMPT_ID": attempt_id,
                "DRAINER_RUN_ID": ref.run_id,
                "DRAINER_PHASE_ID": ref.phase_id,
            }
        )
        if self._api_url:
            env["AUTOPACK_API_URL"] = self._api_url
        env.update(dict(cfg.env))
        return env

    async def _complete(
        self,
        backlog: Backlog,
        record: Attempt,
        result: ProcessResult,
        before: int | None,
        previous_reason: str | None,
        *,
        lease_lost: bool = False,
    ) -> None:
        """Read the outcome, restore a non-final phase, count telemetry, journal, report.

        After a lost lease the phase belongs to whoever took the run over: not restored.
        """
        cfg = self.config
        clean_exit = result.returncode == 0 and not result.timed_out and not result.cancelled
        outcome = await backlog.wait_final_state(
            record.run_id, record.phase_id, wait=cfg.final_state_wait if clean_exit else 0.0
        )
        row, after = outcome.row, outcome.telemetry
        state, reason = row if row is not None else (None, None)
        why = None
        if row is not None and not is_final_state(state):
            # After a lost lease the restore only happens if nobody leases the run now.
            why = _restore_reason(result, state, cfg, lease_lost=lease_lost)
        # One transaction: restore (if needed), release the lease.
        restored = await backlog.finish_attempt(
            record.run_id, record.phase_id, record.attempt_id, restore=why,
            release=not lease_lost,
        )
        self._lease_ids.pop(record.run_id, None)
        if restored:
            record.state_restored = True
            state, reason = PhaseState.FAILED.value, why
        elif why is not None:  # changed under us: read what it is now
            row = await backlog.read_phase(record.run_id, record.phase_id)
            state, reason = row if row is not None else (None, None)
        events = None if before is None or after is None else max(0, after - before)

        record.finished_at = iso(utcnow())
        record.timestamp = record.finished_at
        record.final_state = state
        record.success = state == PhaseState.COMPLETE.value and not result.cancelled
        record.subprocess_returncode = result.returncode
        record.subprocess_duration_seconds = result.duration
        record.subprocess_stdout_excerpt = error_excerpt(result.stdout_tail)
        record.subprocess_stderr_excerpt = error_excerpt(result.stderr_tail)
        record.timed_out = result.timed_out
        record.cancelled = result.cancelled
        record.leaked_processes = result.leaked
        record.peak_rss_bytes = result.peak_rss_bytes
        record.stdout_bytes = result.stdout_bytes
        record.stderr_bytes = result.stderr_bytes
        record.telemetry_events_collected = events
        record.telemetry_yield_per_minute = yield_per_minute(events, result.duration)
        record.reached_llm_boundary = reached_llm_boundary(
            result.stdout_tail + "\n" + result.stderr_tail
        )
        record.zero_yield_reason = zero_yield_reason(
            success=record.success,
            timed_out=result.timed_out,
            telemetry_events=events,
            llm_boundary=record.reached_llm_boundary,
            returncode=result.returncode,
        )
        if not record.success:
            message, basis = _error_message(
                record, result, reason, previous_reason, row is None, cfg, lease_lost=lease_lost
            )
            record.error_message = redact_text(message, cfg.secrets)
            record.failure_fingerprint = failure_fingerprint(
                state, result.returncode, timed_out=result.timed_out,
                error=redact_text(basis, cfg.secrets),
            )
        crash_point("after_exit")
        self._journal({"type": "attempt_finished", **record.to_json()})
        stop_before = self.policy.stop_reason
        stops = self._count_finished(record)
        for line in attempt_lines(record):
            self.echo(line)
        if stop_before is None and self.policy.stop_reason == CONSECUTIVE_ZERO_YIELD:
            n = cfg.max_consecutive_zero_yield
            self.echo(f"[STOP] {n} attempts in a row without telemetry "
                      f"(--max-consecutive-zero-yield {n})")
        self.emit(AttemptFinished(session_id=self.session_id, attempt=record))
        for stop in stops:
            self._journal({"type": "run_stopped", "run_id": stop.run_id, "reason": stop.reason,
                           "detail": stop.detail})
            self.echo(f"[STOP] run {stop.run_id}: {stop.reason} ({stop.detail})")
            self.emit(RunStopped(session_id=self.session_id, run_id=stop.run_id,
                                 reason=stop.reason, detail=stop.detail))
        # With --max-leaks the limit must be exact: gauge after every attempt.
        if cfg.max_leaks is not None or time.monotonic() - self._last_gauge >= LEAK_GAUGE_INTERVAL:
            await self._gauge_leaks()
        leaks = self.total_leaks
        if cfg.max_leaks is not None and leaks > cfg.max_leaks:
            self._stop(MAX_LEAKS, f"{leaks} leaked processes exceed --max-leaks {cfg.max_leaks}")
        self._maybe_snapshot()

    # -- persistence -------------------------------------------------------------------

    def _journal(self, event: dict[str, Any]) -> None:
        event.setdefault("at", iso(utcnow()))
        self.files.append(event)

    def _maybe_snapshot(self) -> None:
        now = time.monotonic()
        if now - self._last_snapshot >= SNAPSHOT_INTERVAL:
            self._write_snapshot()
            self._last_snapshot = now

    def _write_snapshot(self) -> None:
        try:
            self.files.write_snapshot(self.snapshot())
        except OSError as exc:
            raise SessionError(f"cannot write snapshot {self.files.snapshot_path}: {exc}") from exc

    def snapshot(self) -> dict[str, Any]:
        """The Autopack-compatible session file, plus drainer's fields."""
        s = self.summary()
        policy = self.policy
        return {
            "session_id": self.session_id,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "batch_size": self.config.batch_size,
            "total_processed": s.total_processed,
            "total_success": s.total_success,
            "total_failed": s.total_failed,
            "total_timeouts": s.total_timeouts,
            "total_telemetry_events": s.total_telemetry_events,
            "fingerprint_counts": dict(policy.fingerprint_counts),
            "stopped_fingerprints": sorted(policy.stopped_fingerprints),
            "stopped_runs": dict(policy.stopped_runs),
            "results": [r.to_json() for r in self.results],
            "lanes": self.config.lanes,
            "stop_reason": policy.stop_reason,
            "leak_gauge": {
                "pattern": self.config.leak_pattern,
                "processes": [p.to_json() for p in self.pattern_leaks.values()],
            },
            "config": self.config.to_json(),
            "host": hostname(),
            "drainer_version": __version__,
        }

    def _finish(self) -> None:
        self.completed_at = iso(utcnow())
        self._journal(
            {
                "type": "session_stopped",
                "stop_reason": self.policy.stop_reason,
                "completed_at": self.completed_at,
            }
        )
        self._write_snapshot()
        self.files.close()
        summary = self.summary()
        for line in summary_lines(summary, self.config):
            self.echo(line)
        self.emit(SessionStopped(session_id=self.session_id, stop_reason=summary.stop_reason,
                                 processed=summary.total_processed,
                                 succeeded=summary.total_success, failed=summary.total_failed,
                                 snapshot_path=str(summary.snapshot_path)))
        if summary.interrupted:
            self.echo(f"Resume with: {resume_command(self.config, self.session_id)}")


def resume_command(cfg: DrainConfig, session_id: str) -> str:
    """The command that resumes a session (the database URL only when it holds no secret)."""
    parts = ["python -m drainer run --resume", session_id, "--session-dir",
             shlex.quote(str(cfg.session_dir))]
    if cfg.db.password is None:
        parts += ["--database-url", shlex.quote(cfg.db.sync_url)]
    else:
        parts.append("(with your --database-url or DATABASE_URL)")
    return " ".join(parts)


def _drainer_error(exc: BaseException) -> DrainerError | None:
    """The DrainerError behind ``exc``, also when task groups wrapped it in a group."""
    if isinstance(exc, DrainerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _drainer_error(inner)
            if found is not None:
                return found
    return None


def _restore_reason(
    result: ProcessResult, state: str | None, cfg: DrainConfig, *, lease_lost: bool = False
) -> str:
    if lease_lost:
        what = "lease lost (not renewed in time); attempt stopped"
    elif result.cancelled:
        what = "attempt cancelled (session stopping)"
    elif result.timed_out:
        what = f"attempt timed out after {cfg.phase_timeout_label}; process tree killed"
    elif result.spawn_error:
        what = result.spawn_error
    else:
        what = f"worker exited with status {result.returncode}"
    return f"drainer: {what}; phase was left {state}, restored to FAILED"


def _error_message(
    record: Attempt,
    result: ProcessResult,
    reason: str | None,
    previous_reason: str | None,
    missing: bool,
    cfg: DrainConfig,
    *,
    lease_lost: bool = False,
) -> tuple[str, str]:
    """An actionable failure message, and the part of it the fingerprint is built from.

    The database reason comes first when there is one. When it equals the reason the phase
    had before and the worker exited non-zero, the worker may have crashed before writing
    its own, so the exit status, stderr tail and log path are added as context (outside
    the fingerprint, which must not change with a log path).
    """
    if missing:
        text = f"phase {record.run_id}/{record.phase_id} no longer exists in the database"
        return text, text
    if result.spawn_error:
        return result.spawn_error, result.spawn_error
    db_reason = (reason or "").strip()
    tail = error_excerpt(result.stderr_tail, 300) or error_excerpt(result.stdout_tail, 300)
    log = f"(log: {record.subprocess_stderr_path})"
    if lease_lost:
        head = "drainer: lease lost (not renewed in time); attempt stopped, process tree killed"
    elif result.cancelled:
        head = "drainer: attempt cancelled (session stopping); process tree killed"
    elif result.timed_out:
        head = f"drainer: timed out after {cfg.phase_timeout_label}; process tree killed"
    elif record.state_restored or not db_reason:
        head = db_reason or (
            f"worker exited with status {result.returncode}, phase {record.final_state}"
        )
    elif db_reason == (previous_reason or "").strip() and result.returncode != 0:
        context = f"unchanged by this attempt? worker exited with status {result.returncode}"
        return " | ".join(p for p in (db_reason, context, tail, log) if p), db_reason
    else:
        return db_reason, db_reason
    return " | ".join(p for p in (head, tail, log) if p), head


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
