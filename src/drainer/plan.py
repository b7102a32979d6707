"""The dry run: what a session would drain, in order, and what it skips and why.

Drives the session's own :class:`~drainer.selection.Selector` on one load of the backlog,
as if every attempt left its phase FAILED and kept its run promising: the never-tried phases
in priority order, then the retries a long enough batch would reach. Opens the database
read-only in effect (no WAL switch, no lease table, no session files).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from .backlog import LEASE_TABLE, Stale, open_backlog
from .config import DrainConfig
from .errors import UsageError
from .journal import find_resumable
from .models import Attempt, Candidates, PhaseRef, PhaseState, SessionStop
from .policy import Policy
from .preferences import Preferences
from .reasons import stale_note, with_note
from .report import autopack_note, shown_id
from .resume import check_unstop, lift, replay_journal
from .revision import session_revision
from .selection import CATEGORY_NAMES, Selector, check_run_id, failure_category
from .timeouts import MIN_SAMPLES, SAMPLES_KEPT, TimeoutTable

SKIPPED_SHOWN = 50


@dataclass(frozen=True)
class Plan:
    counts: dict[str, int]
    picks: list[tuple[PhaseRef, int]]  #: phase, attempt number (2 and up: a retry)
    remaining: int  #: candidate phases the batch does not reach
    skipped: list[tuple[PhaseRef, str]]
    #: with --restore-stale-after: each phase a session would restore first (its picks
    #: count them as FAILED); None when the option is off or updated_at cannot tell
    stale: list[Stale] | None = None
    #: with --phase-timeout-seconds auto: the limits learnt from the history
    timeouts: TimeoutTable | None = None
    #: --prefer-run, --prefer-run-prefix, --priority-file
    preferences: Preferences | None = None
    resumed: Resumed | None = None  #: with --resume: the session's earlier part


@dataclass(frozen=True)
class Resumed:
    """What ``--resume`` brings to a plan: the session's done attempts, its stopped runs and
    the stops ``--unstop`` lifts."""

    session_id: str
    done: int  #: attempts started and ended (they count toward --batch-size)
    stopped: dict[str, str]  #: run -> reason, after the lifts
    lifted: dict[str, str]  #: run -> the reason of the stop lifted
    stop: SessionStop | None  #: a session stop the replayed attempts bring (it ends at once)


def _failed_again(ref: PhaseRef, attempt_number: int) -> Attempt:
    """The outcome a plan assumes: FAILED again, with telemetry (the run stays promising)."""
    return Attempt(run_id=ref.run_id, phase_id=ref.phase_id, phase_index=ref.phase_index,
                   initial_state=ref.state, attempt_id="plan", attempt_number=attempt_number,
                   lane=0, started_at="", final_state=PhaseState.FAILED.value,
                   telemetry_events_collected=1)


async def make_plan(config: DrainConfig) -> Plan:
    async with open_backlog(config.db, config.telemetry_tables, config.schema) as backlog:
        counts = await backlog.phases.counts_by_state()
        if sum(counts.values()) == 0 and not config.allow_empty_db:
            raise UsageError(
                f"{config.db.redacted} has no phases at all; is it the right database? "
                "Pass --allow-empty-db to plan against it anyway"
            )
        await check_run_id(config.run_id, backlog.phases.runs_in,
                           skip_queued=config.skip_runs_with_queued,
                           restoring=config.restore_stale_after is not None)
        stale = None
        if config.restore_stale_after is not None:
            leases = LEASE_TABLE if await backlog.leases.has_table() else None
            stale = await backlog.phases.stale(config.restore_stale_after, lease_table=leases,
                                               run_id=config.run_id, runs=config.drains_run)
        load = functools.partial(backlog.phases.load_candidates, run_id=config.run_id)
        if stale and config.restore_stale_after is not None:
            # Restored first, they drain as FAILED phases with drainer's note.
            load = functools.partial(_with_restored, load, stale,
                                     config.restore_stale_after / 60)
        revision = await anyio.to_thread.run_sync(session_revision, config)
        preferences = Preferences.of(config)
        setting, timeouts = config.timeout_setting, None
        if setting.factor is not None:
            timeouts = TimeoutTable(
                await backlog.history.durations(per_category=SAMPLES_KEPT),
                factor=setting.factor, low=config.min_phase_timeout,
                high=config.max_phase_timeout)
        selector = Selector(
            load,
            max_attempts_per_phase=config.max_attempts_per_phase,
            skip_run_prefixes=config.skip_run_prefixes,
            skip_queued=config.skip_runs_with_queued, keep_skipped=True, reloads=False,
            too_long=config.ids_too_long(),
            history=functools.partial(
                backlog.history.summary, run_id=config.run_id,
                counts=config.attempts_scope == "history",
                revision=revision if config.skip_unchanged else None,
                candidate=backlog.phases.is_candidate)
            if config.history else None,
            rank=preferences.rank if preferences else None,
            attempts_scope=config.attempts_scope,
            revision=revision if config.skip_unchanged else None)
        resumed = await _resume(config, selector) if config.resume is not None else None
        budget = config.batch_size
        if resumed is not None:
            budget = 0 if resumed.stop is not None else max(0, budget - resumed.done)
        picks: list[tuple[PhaseRef, int]] = []
        while len(picks) < budget:
            ref = await selector.pick()
            if ref is None:
                break
            number = selector.attempts_of(ref) + 1
            picks.append((ref, number))
            selector.observe(_failed_again(ref, number))
    reached = len({ref.key for ref, _ in picks})
    return Plan(counts=counts, picks=picks, remaining=selector.candidates - reached,
                skipped=selector.skipped, stale=stale, timeouts=timeouts,
                preferences=preferences, resumed=resumed)


async def _resume(config: DrainConfig, selector: Selector) -> Resumed | None:
    """The resumed session replayed into the plan's selector, as ``run --resume`` does."""
    assert config.resume is not None
    replay = find_resumable(config.session_dir, config.resume)
    check_unstop(config, replay)
    if replay is None:
        return None
    policy = Policy(config)
    await selector.load()
    done = replay_journal(replay.journal_path, policy, selector)
    lifted = {run_id: was for run_id in config.unstop
              if (was := lift(run_id, policy, selector)) is not None}
    return Resumed(replay.session_id, policy.started_count, dict(policy.stopped_runs), lifted,
                   done.session_stop)


async def _with_restored(load: Callable[[], Awaitable[Candidates]], stale: list[Stale],
                         minutes: float) -> Candidates:
    """The candidates, with the stale phases a session would restore as FAILED first."""
    found = await load()
    restored = {(s.run_id, s.phase_id) for s in stale}
    refs = [ref for run_id, (start, end) in found.runs.items() for i in range(start, end)
            if (ref := found.ref(run_id, i)).key not in restored]  # (loaded as QUEUED)
    refs += [PhaseRef(s.run_id, s.phase_id, s.phase_index, PhaseState.FAILED.value,
                      with_note(s.reason, stale_note(s.state, minutes))) for s in stale]
    return Candidates.of(refs)


def timeout_lines(table: TimeoutTable, config: DrainConfig) -> list[str]:
    """The table of adaptive limits: per category, and per run prefix with enough samples."""
    lines = [f"Time limits (--phase-timeout-seconds {config.phase_timeout_label}: "
             f"{table.factor:g} x the 95th percentile of the durations of attempts that ended "
             f"on their own, within {table.low:g}-{table.high:g} s; {table.default:g} s until "
             f"{MIN_SAMPLES} exist):"]
    if not table.rows:
        return [*lines, "  (no category has enough samples yet: every limit is the default)"]
    width = max(len(r.category) for r in table.rows)
    for row in table.rows:
        scope = row.category if row.prefix is None else f"{row.category} / {row.prefix}*"
        lines.append(f"  {scope:<{width + 4}}  {row.samples:>5} samples  p95 "
                     f"{row.p95:>8.1f}s  limit {row.seconds:>6.0f}s")
    return lines


def resumed_lines(resumed: Resumed, config: DrainConfig) -> list[str]:
    left = 0 if resumed.stop is not None else max(0, config.batch_size - resumed.done)
    lines = [f"Resuming session {resumed.session_id}: {resumed.done} attempt(s) done, "
             f"{left} left in the batch"]
    if resumed.stop is not None:
        lines.append(f"  it stops at once: {resumed.stop.reason} ({resumed.stop.detail})")
    for run_id, why in sorted(resumed.stopped.items()):
        lines.append(f"  stopped run {shown_id(run_id)}: {why} (no more attempts; "
                     "--unstop RUN lifts it)")
    for run_id, why in sorted(resumed.lifted.items()):
        lines.append(f"  lifted by --unstop: run {shown_id(run_id)} (was {why}): it drains "
                     "again")
    return lines


def plan_lines(plan: Plan, config: DrainConfig) -> list[str]:
    phases = ", ".join(f"{k} {v}" for k, v in sorted(plan.counts.items())) or "none"
    lines = [
        f"Plan (dry run, nothing is started or written) for {config.db.redacted}",
        f"  phases: {phases}",
        f"  sessions: {config.session_dir}{autopack_note(config)}",
    ]
    if config.restore_stale_after is not None:
        minutes = f"{config.restore_stale_after / 60:g}"
        if plan.stale is None:
            lines.append(f"Would restore (--restore-stale-after {minutes}): nothing, the phases "
                         "table has no date-and-time updated_at column")
        else:
            lines.append(f"Would restore to FAILED first (--restore-stale-after {minutes}): "
                         f"{len(plan.stale) or 'no'} phase(s) left non-final for more than "
                         f"{minutes} min whose run no drainer leases")
            for found in plan.stale[:SKIPPED_SHOWN]:
                lines.append(f"  - {shown_id(found.run_id)} / {shown_id(found.phase_id)} "
                             f"[{found.state}]")
            if len(plan.stale) > SKIPPED_SHOWN:
                lines.append(f"  ... and {len(plan.stale) - SKIPPED_SHOWN} more")
    if plan.timeouts is not None:
        lines += timeout_lines(plan.timeouts, config)
    if plan.resumed is not None:
        lines += resumed_lines(plan.resumed, config)
    lines.append(f"Would drain, in order (batch size {config.batch_size}):")
    if not plan.picks:
        lines.append("  (nothing: no candidate phases)")
    for n, (ref, attempt) in enumerate(plan.picks, start=1):
        category = CATEGORY_NAMES[failure_category(ref.last_failure_reason)]
        retry = f", retry: attempt {attempt}" if attempt > 1 else ""
        limit = ""
        if plan.timeouts is not None:
            limit = f", limit {plan.timeouts.limit(category, ref.run_id).seconds:.0f}s"
        if plan.preferences and (why := plan.preferences.describe(ref.run_id)):
            limit += f", {why}"
        lines.append(
            f"  {n:>4}. {shown_id(ref.run_id)} / {shown_id(ref.phase_id)}  "
            f"[{ref.state}, index {ref.phase_index}, {category}{retry}{limit}]"
        )
    if plan.remaining:
        lines.append(f"  ... {plan.remaining} more candidate(s) after this batch")
    lines.append(f"Skipped ({len(plan.skipped)}):")
    if not plan.skipped:
        lines.append("  (none)")
    for ref, why in plan.skipped[:SKIPPED_SHOWN]:
        lines.append(f"  - {shown_id(ref.run_id)!r} / {shown_id(ref.phase_id)!r} "
                     f"[{ref.state}]: {why}")
    if len(plan.skipped) > SKIPPED_SHOWN:
        lines.append(f"  ... and {len(plan.skipped) - SKIPPED_SHOWN} more")
    lines.append(
        "Retries assume every attempt fails again; stops and triage may end the session "
        "earlier or reorder later picks (see the stop rules with 'drainer run --help')."
    )
    return lines
