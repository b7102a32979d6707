"""One drain session: preflight, open the resources, wire the parts, always finish cleanly.

Order of work (DESIGN.md §8): every check first (options, URL, database, schema, backlog
not empty, session directory writable, worker program found, API server answering), then the
first write. The drain itself is the :class:`~drainer.scheduler.Scheduler`'s.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio

from . import __version__, reaper
from .apiserver import ApiServer, check_api_url, kill_orphaned_api_server, open_api_server
from .attempt import AttemptRunner, check_worker_program
from .backlog import LEASE_TABLE, Backlog, StopRequests, open_backlog
from .backlog.requests import DDL as REQUEST_DDL
from .backlog.requests import POLL_SECONDS
from .config import DrainConfig
from .errors import DatabaseError, DrainerError, UsageError, drainer_error_in
from .events import DrainEvent, SessionResumed, SessionStarted, StaleRestored
from .journal import (
    Replay,
    SessionFiles,
    check_writable_dir,
    find_resumable,
    hostname,
    iso,
    unused_session_id,
    utcnow,
)
from .leaks import LeakGauge
from .models import Attempt, SessionSummary, StopReason, Totals
from .policy import Policy, Sensors
from .preferences import Preferences
from .reasons import stale_note
from .recorder import Echo, Recorder, make_echo
from .report import header_lines
from .resume import check_unstop, lift, observe, replay_journal
from .revision import session_revision
from .scheduler import Scheduler, sweep_leases
from .selection import Selector, check_run_id
from .signals import watch_signals
from .timeouts import Timeouts
from .worktrees import LaneWorkspaces, is_git_workspace

log = logging.getLogger("drainer")


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
        self._raw_echo = echo
        self._say = make_echo(config, echo)
        self._on_event = on_event
        self._handle_signals = handle_signals
        self.session_id = unused_session_id(config.session_dir)
        self.started_at = iso(utcnow())
        self.completed_at: str | None = None
        self._host = hostname(config.host_name)
        self._files = SessionFiles(config.session_dir, self.session_id, config.secrets)
        self._gauge = LeakGauge(config.leak_pattern, exact=config.max_leaks is not None)
        self._policy = Policy(config, Sensors(leak_count=lambda: self._gauge.total))
        self._recorder: Recorder | None = None
        self._scheduler: Scheduler | None = None
        self._timeouts: Timeouts | None = None  #: the attempts' limits (a resume replays)
        self._requested_stop: str | None = None

    # -- what the embedding API reads ----------------------------------------------------

    @property
    def totals(self) -> Totals:
        return self._recorder.totals if self._recorder is not None else Totals()

    @property
    def in_flight(self) -> int:
        return self._scheduler.in_flight if self._scheduler is not None else 0

    @property
    def stop_reason(self) -> StopReason | None:
        return self._scheduler.stop_reason if self._scheduler is not None else None

    @property
    def stop_detail(self) -> str | None:
        return self._scheduler.stop_detail if self._scheduler is not None else None

    def request_stop(self, reason: str) -> None:
        """Stop picking (recorded as ``cancelled``, with ``reason`` as its detail); in-flight
        attempts get the stop grace. Before the drain starts, it stops as soon as it does."""
        self._requested_stop = f"stop requested: {reason}"
        self._apply_requested_stop()

    def _apply_requested_stop(self) -> None:
        if self._scheduler is not None and self._requested_stop is not None:
            self._scheduler.stop(StopReason.CANCELLED, self._requested_stop,
                                 grace_period=self.config.stop_grace_period)

    # -- entry -------------------------------------------------------------------------

    async def run(self) -> SessionSummary:
        cfg = self.config
        async with open_backlog(cfg.db, cfg.telemetry_tables, cfg.schema) as backlog:
            counts = await backlog.phases.counts_by_state()
            if sum(counts.values()) == 0 and not cfg.allow_empty_db:
                raise UsageError(
                    f"{cfg.db.redacted} has no phases at all; is it the right database? "
                    "Pass --allow-empty-db to run against it anyway"
                )
            check_writable_dir(cfg.session_dir)
            check_worker_program(cfg)
            if cfg.resume is None:  # a resumed session may have drained its run already
                await check_run_id(cfg.run_id, backlog.phases.runs_in,
                                   skip_queued=cfg.skip_runs_with_queued,
                                   restoring=cfg.restore_stale_after is not None)
            if cfg.lanes > 1 and cfg.lane_workspaces == "none" and \
                    await anyio.to_thread.run_sync(is_git_workspace, cfg.workspace):
                self._say(f"[WARN] {cfg.lanes} lanes share one git workspace "
                          f"({cfg.workspace}); workers that change it can corrupt its git "
                          "state: pass --lane-workspaces git-worktree to give each lane its "
                          "own worktree")
            if cfg.api_url is not None:
                await check_api_url(cfg.api_url)
            revision = await anyio.to_thread.run_sync(session_revision, cfg)
            preferences = Preferences.of(cfg)
            replay = self._find_replay()
            for line in header_lines(cfg, self.session_id, counts, self._policy.describe()):
                self._say(line)
            phases = backlog.phases
            if phases.missing_telemetry_tables:
                self._say(
                    "[NOTICE] telemetry table(s) missing: "
                    f"{', '.join(phases.missing_telemetry_tables)}"
                    + ("; telemetry is unavailable" if not phases.telemetry_available else "")
                )
            if replay is not None:  # a crashed run of this session may have left its server
                orphans = await kill_orphaned_api_server(self.session_id,
                                                         cfg.kill_grace_period)
                if orphans:
                    self._say(f"[RECONCILED] killed {orphans} process(es) of the crashed "
                              "session's API server")
            # The shared API server starts before the first write: if it never answers, the
            # session ends with exit 2 and nothing changed.
            async with open_api_server(cfg, self.session_id) as api:
                await self._drain(backlog, replay, api, revision, preferences)
                if api.log is not None and api.log.failed:
                    self._say(f"[WARN] the API server's log was given up: {api.log.failed}")
        return self.summary()

    def _find_replay(self) -> Replay | None:
        cfg = self.config
        if cfg.resume is None:
            return None
        unreadable: list[str] = []
        replay = find_resumable(cfg.session_dir, cfg.resume, unreadable)
        for why in unreadable:
            self._say(f"[WARN] passed over: {why}")
        check_unstop(cfg, replay)
        if replay is None:
            self._say(f"[RESUME] no incomplete session in {cfg.session_dir}; "
                      "starting a new one")
            return None
        if replay.damage is not None and replay.damage.count:
            self._say(f"[WARN] {replay.damage.describe()}; resuming from the lines that "
                      "could be read")
        self.session_id = replay.session_id
        self.started_at = replay.started_at
        self._files = SessionFiles(cfg.session_dir, self.session_id, cfg.secrets)
        self._say(f"[RESUME] session {self.session_id}: {replay.done} attempt(s) done, "
                  f"{len(replay.dangling)} to reconcile")
        return replay

    async def _drain(self, backlog: Backlog, replay: Replay | None, api: ApiServer,
                     revision: str | None, preferences: Preferences) -> None:
        """From the first write on: journal, reconcile, drain, and always finish cleanly."""
        cfg = self.config
        await backlog.prepare_for_writes(history=cfg.history)
        if backlog.history_problem is not None:
            if cfg.attempts_scope == "history" or cfg.skip_unchanged or \
                    cfg.timeout_setting.factor is not None:
                raise UsageError(f"{backlog.history_problem}; --attempts-scope history, "
                                 "--skip-unchanged and --phase-timeout-seconds auto need the "
                                 "attempt history")
            self._say(f"[WARN] {backlog.history_problem}: attempts are not recorded in the "
                      f"history (pass --no-history to say so; the database's owner can "
                      f"create it: {backlog.history.ddl})")
        if backlog.requests_problem is not None:
            self._say(f"[WARN] {backlog.requests_problem}: 'drainer stop --session "
                      f"{self.session_id}' cannot reach this session (the database's owner "
                      f"can create the table: {REQUEST_DDL})")
        since = await self._requests_clock(backlog) if replay is not None else None
        self._files.create(new=replay is None)
        if since is not None:  # asked while no drainer ran it: void (later ones are for it)
            await self._clear_requests(backlog, since)
        if not backlog.leases.worker_columns:
            self._say("[WARN] drainer_leases has no worker_pid/worker_created columns and this "
                      "database role may not add them: a take-over on this host finds an "
                      "expired holder's processes by marker only. The table's owner can run: "
                      "ALTER TABLE drainer_leases ADD COLUMN worker_pid INTEGER; ALTER TABLE "
                      "drainer_leases ADD COLUMN worker_created DOUBLE PRECISION")
        api_url = api.url
        if cfg.api_command is not None:
            log = self._files.root / "api-server.log"
            await api.attach_log(log)
            self._say(f"[API] started one server for all workers at {api_url} (log: {log})")
        recorder = self._recorder = Recorder(
            cfg, self._files, echo=self._raw_echo, on_event=self._on_event,
            snapshot_fields=self._snapshot_fields)
        selector = Selector(
            functools.partial(backlog.phases.load_candidates, run_id=cfg.run_id),
            load_changed=functools.partial(backlog.phases.load_changed, run_id=cfg.run_id),
            max_attempts_per_phase=cfg.max_attempts_per_phase,
            skip_run_prefixes=cfg.skip_run_prefixes, skip_queued=cfg.skip_runs_with_queued,
            too_long=cfg.ids_too_long(), tie_salt=self.session_id,
            retry_backoff=cfg.retry_backoff,
            history=functools.partial(
                backlog.history.summary, other_than=self.session_id, run_id=cfg.run_id,
                counts=cfg.attempts_scope == "history",
                revision=revision if cfg.skip_unchanged else None,
                candidate=backlog.phases.is_candidate)
            if cfg.history else None,
            rank=preferences.rank if preferences else None,
            attempts_scope=cfg.attempts_scope,
            revision=revision if cfg.skip_unchanged else None)
        attempts = AttemptRunner(cfg, backlog, self._files, recorder, host=self._host,
                                 api_url=api_url, revision=revision)
        self._timeouts = attempts.timeouts
        scheduler = self._scheduler = Scheduler(
            cfg, selector=selector, policy=self._policy, attempts=attempts, recorder=recorder,
            leaks=self._gauge)
        self._apply_requested_stop()
        try:
            if replay is None:
                recorder.journal(SessionStarted(
                    session_id=self.session_id, started_at=self.started_at, host=self._host,
                    pid=os.getpid(), drainer_version=__version__, config=cfg.to_json()))
            else:
                recorder.journal(SessionResumed(host=self._host, pid=os.getpid(),
                                                config=cfg.to_json()))
                await self._replay(replay, selector, recorder, scheduler)
                for dangling in replay.dangling:
                    settled = await attempts.reconcile(dangling)
                    if not settled.interrupted:  # it ended: it counts as replayed ones do
                        self._count(settled, selector, recorder, scheduler)
                if replay.dangling:
                    selector.invalidate()  # the phases it restored are candidates again
            await backlog.leases.release_session(self.session_id)
            if cfg.restore_stale_after is not None:
                await self._restore_stale(backlog, recorder)
            await sweep_leases(attempts, selector)
            await self._gauge.start(self.session_id)
            spaces: list[LaneWorkspaces] = []
            try:
                await self._lane_workspaces(attempts, spaces)
                async with anyio.create_task_group() as tg:
                    if self._handle_signals:
                        await tg.start(watch_signals, self._on_signal)
                    if backlog.requests_problem is None:
                        tg.start_soon(self._watch_stop_requests, backlog.requests)
                    await scheduler.run()
                    tg.cancel_scope.cancel()  # the lanes are done: stop watching signals
            finally:
                for made in spaces:
                    with anyio.CancelScope(shield=True):
                        await self._remove_lane_workspaces(made)
            for proc in await self._gauge.sample((), force=True):  # the last attempts' leaks
                recorder.leak_found(proc)
            await self._end_escapees(recorder)
        except BaseException as exc:
            error = drainer_error_in(exc)
            if error is not None:
                # drainer could not go on (database gone, disk full...): a resumable stop.
                scheduler.stop(StopReason.ERROR, str(error))
            elif isinstance(exc, anyio.get_cancelled_exc_class()):
                scheduler.stop(StopReason.CANCELLED, "cancelled by the caller")
            elif isinstance(exc, KeyboardInterrupt):
                scheduler.stop(StopReason.SIGNAL, "interrupted")
            elif isinstance(exc, Exception):  # a bug: the session stays resumable
                scheduler.stop(StopReason.ERROR, f"unexpected error: {exc!r}")
            self._finish(quiet=True, report=error is None)
            if error is not None and error is not exc:
                raise error from exc
            raise
        self._finish()

    async def _restore_stale(self, backlog: Backlog, recorder: Recorder) -> None:
        """``--restore-stale-after``: before picking, phases left non-final too long with no
        drainer's lease on their run go back to FAILED (the worker's reason kept)."""
        seconds = self.config.restore_stale_after
        assert seconds is not None
        minutes = seconds / 60
        restored = await backlog.phases.restore_stale(
            seconds, functools.partial(stale_note, minutes=minutes), lease_table=LEASE_TABLE,
            run_id=self.config.run_id, runs=self.config.drains_run)
        if restored is None:
            self._say("[WARN] --restore-stale-after needs a date-and-time updated_at "
                      "column in the phases table, which this database lacks; nothing "
                      "restored")
            return
        recorder.stale_restored(StaleRestored(minutes, tuple(restored)))

    async def _lane_workspaces(
        self, attempts: AttemptRunner, made: list[LaneWorkspaces]
    ) -> None:
        """Each lane's own git worktree, with ``--lane-workspaces git-worktree``; added to
        ``made`` before they are created, so that a failure half-way still cleans up."""
        cfg = self.config
        if cfg.lane_workspaces != "git-worktree":
            return
        spaces = LaneWorkspaces(cfg.workspace, self._files.root / "worktrees", cfg.lanes,
                                self.session_id)
        made.append(spaces)
        await anyio.to_thread.run_sync(spaces.create)
        attempts.use_lane_workspaces(spaces.dirs)
        self._say(f"[WORKTREE] {cfg.lanes} lane worktree(s) of {spaces.workspace} at HEAD, "
                  f"under {spaces.root}")

    async def _remove_lane_workspaces(self, spaces: LaneWorkspaces) -> None:
        try:
            kept = await anyio.to_thread.run_sync(spaces.remove)
        except (DrainerError, OSError) as exc:  # the drain's outcome stands; say what is left
            self._say(f"[WARN] removing the lane worktrees under {spaces.root}: {exc}")
            return
        for what in kept:
            self._say(f"[WORKTREE] kept {what}")

    async def _end_escapees(self, recorder: Recorder) -> None:
        """Escapees re-parented to drainer after their attempt had ended (see reaper.py)."""
        escapees = reaper.adopted()
        if not escapees:
            return
        kill = self.config.leak_policy == "kill"
        ended = await anyio.to_thread.run_sync(functools.partial(
            reaper.end, escapees, kill=kill, grace=self.config.kill_grace_period))
        for proc in ended:
            recorder.escapee_found(proc, killed=kill)

    def _finish(self, *, quiet: bool = False, report: bool = True) -> None:
        """The session's last word; synchronous, so a cancellation cannot skip it. With
        ``quiet`` (an exception is on its way out), a failure here does not replace that
        exception; it is logged when ``report`` (the exception is not itself drainer's
        one-line error, which a full disk, say, has already given)."""
        assert self._recorder is not None
        self.completed_at = iso(utcnow())
        try:
            self._recorder.session_stopped(self.summary())
        except DrainerError as exc:
            if not quiet:
                raise
            if report:
                log.error("drainer: %s", exc)

    async def _replay(
        self, replay: Replay, selector: Selector, recorder: Recorder, scheduler: Scheduler
    ) -> None:
        """Rebuild every counter of the session from its journal, streamed."""
        await selector.load()  # replayed attempts count for the phases in the index

        def each(attempt: Attempt) -> None:
            recorder.replayed(attempt)
            self._gauge.add_attempt(attempt)
            if not attempt.interrupted:
                self._learn_limit(attempt)

        done = replay_journal(replay.journal_path, self._policy, selector, each)
        for run_stop in done.unjournaled:  # fired but never journaled (a crash in between)
            recorder.run_stopped(run_stop)
        self._unstop(selector, recorder)
        if done.session_stop is not None:
            scheduler.stop(done.session_stop.reason, done.session_stop.detail)

    def _count(self, attempt: Attempt, selector: Selector, recorder: Recorder,
               scheduler: Scheduler) -> None:
        """An attempt found ended while resuming: the stop rules and the selector learn it."""
        self._learn_limit(attempt)
        run_stops, stop = observe(attempt, self._policy, selector)
        for run_stop in run_stops:
            recorder.run_stopped(run_stop)
        if stop is not None:
            scheduler.stop(stop.reason, stop.detail)

    def _learn_limit(self, attempt: Attempt) -> None:
        """An ended attempt of the session's earlier part: a retry after a timeout gets twice
        its limit."""
        if self._timeouts is not None:
            self._timeouts.observe(attempt.run_id, attempt.phase_id,
                                   timed_out=attempt.timed_out, seconds=attempt.timeout_seconds)

    def _unstop(self, selector: Selector, recorder: Recorder) -> None:
        """``--unstop RUN``: lift the stops the operator named (checked at the start)."""
        for run_id in self.config.unstop:
            was = lift(run_id, self._policy, selector)
            if was is not None:
                recorder.run_unstopped(run_id, was)

    async def _requests_clock(self, backlog: Backlog) -> float | None:
        """The database's clock before a resume takes its journal: stop requests made
        before it are cleared (None: there is no usable table)."""
        if backlog.requests_problem is not None:
            return None
        try:
            return await backlog.requests.now()
        except DatabaseError as exc:
            if exc.transient:
                raise
            backlog.requests_problem = str(exc)
            return None

    async def _clear_requests(self, backlog: Backlog, since: float) -> None:
        """Clear the session's requests made before it resumed. A role that may not use the
        table (its owner created it without a GRANT) resumes all the same, unreachable."""
        try:
            await backlog.requests.clear(self.session_id, before=since)
        except DatabaseError as exc:
            if exc.transient:
                raise
            backlog.requests_problem = str(exc)
            self._say(f"[WARN] {exc}: 'drainer stop --session {self.session_id}' cannot "
                      "reach this session")

    async def _watch_stop_requests(self, requests: StopRequests) -> None:
        """``drainer stop --session ID``, from any host: polled every ``POLL_SECONDS``; the
        first request taken stops picking as :meth:`request_stop` does, later ones are taken
        too (the session is stopping: their asker hears so) until the session ends."""
        failing = asked = False
        while True:
            await anyio.sleep(POLL_SECONDS)
            try:
                taken = await requests.take(self.session_id, self._host)
            except DrainerError as exc:  # the drain goes on; say so once per outage
                if not failing:
                    self._say(f"[WARN] looking for stop requests: {exc}; the session goes on "
                              "and looks again")
                failing = True
                continue
            failing = False
            if taken is not None and not asked:
                asked = True
                self.request_stop(f"drainer stop from {taken.requested_by}")

    def _on_signal(self, name: str, count: int) -> None:
        assert self._scheduler is not None and self._recorder is not None
        grace = self.config.stop_grace_period
        if count == 1:
            self._scheduler.stop(
                StopReason.SIGNAL, f"{name} received: no new attempts; in-flight attempts "
                f"get up to {grace:g}s (send it again to kill them now)", grace_period=grace)
        else:
            self._recorder.stopping(f"{name} again: killing in-flight attempts now")
            self._scheduler.stop(StopReason.SIGNAL, f"{name} again", grace_period=0)

    # -- the record ------------------------------------------------------------------------

    def _snapshot_fields(self) -> dict[str, Any]:
        """The snapshot's fields that are not totals or config."""
        fingerprints = self._policy.fingerprints
        return {
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "fingerprint_counts": dict(fingerprints.counts),
            "stopped_fingerprints": sorted(fingerprints.stopped),
            "stopped_runs": dict(self._policy.stopped_runs),
            "stop_reason": self.stop_reason,
            "stop_detail": self.stop_detail,
            "consecutive_zero_yield": self._policy.zero_yield_streak,
            "leak_gauge": {
                "pattern": self.config.leak_pattern,
                "processes": [p.to_json() for p in self._gauge.pattern_leaks.values()],
            },
        }

    def summary(self) -> SessionSummary:
        return SessionSummary(
            session_id=self.session_id,
            started_at=self.started_at,
            completed_at=self.completed_at,
            stop_reason=self.stop_reason,
            stop_detail=self.stop_detail,
            totals=self.totals,
            snapshot_path=self._files.snapshot_path,
            journal_path=self._files.journal_path,
            logs_dir=self._files.logs_dir,
            stopped_runs=dict(self._policy.stopped_runs),
            pattern_leaks=tuple(self._gauge.pattern_leaks.values()),
        )

