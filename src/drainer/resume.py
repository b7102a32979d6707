"""A resumed session's earlier part, replayed into its stop rules and selector.

The journal's finished attempts, run stops and lifts (``--unstop``) are fed in journal order,
as the drain learnt them: a lift resets the rules' counts for its run, so a stop lifted once
is not fired again by the attempts that led to it. ``run`` and ``plan`` share this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import DrainConfig
from .errors import UsageError
from .events import RunStopped, RunUnstopped
from .journal import Replay, iter_outcomes
from .models import Attempt, RunStop, SessionStop
from .policy import Policy
from .report import shown_id
from .selection import Selector


@dataclass
class Replayed:
    """What replaying a journal left to do."""

    #: run stops a rule fired that the journal lacks (drainer died between the two lines)
    unjournaled: list[RunStop] = field(default_factory=list)
    session_stop: SessionStop | None = None  #: the first session stop the rules answered


def check_unstop(config: DrainConfig, replay: Replay | None) -> None:
    """``--unstop``: there must be a session to resume, and every run named must be stopped
    in it, as its replay leaves it (journaled stops, and those the rules fire again from its
    attempts under the options given now). Reads the journal only: before anything is
    written."""
    if not config.unstop:
        return
    if replay is None:
        raise UsageError(f"--unstop lifts stops of a resumed session, and there is no "
                         f"incomplete session in {config.session_dir} to resume")
    policy = Policy(config)
    replay_journal(replay.journal_path, policy, None)
    for run_id in config.unstop:
        if run_id not in policy.stopped_runs:
            stopped = ", ".join(shown_id(r) for r in sorted(policy.stopped_runs)) or "none"
            raise UsageError(f"--unstop {shown_id(run_id)}: session {replay.session_id} has "
                             f"not stopped that run (its stopped runs: {stopped})")


def learn(attempt: Attempt, policy: Policy,
          selector: Selector | None) -> tuple[list[RunStop], SessionStop | None]:
    """An ended attempt, fed to the stop rules and the selector (None: the rules only), live
    or replayed alike: the runs it stops (the selector is told) and the session stop it
    brings."""
    run_stops, session_stop = policy.observe(attempt)
    if selector is not None:
        selector.observe(attempt, fingerprint_seen_before=policy.fingerprints.seen_before(
            attempt.failure_fingerprint))
        for stop in run_stops:
            selector.stop_run(stop.run_id)
    return run_stops, session_stop


def observe(attempt: Attempt, policy: Policy,
            selector: Selector | None) -> tuple[list[RunStop], SessionStop | None]:
    """An ended attempt of the session's earlier part, as the drain learnt it: :func:`learn`,
    with the stop its start brought first."""
    started_stop = policy.started()
    run_stops, session_stop = learn(attempt, policy, selector)
    return run_stops, started_stop or session_stop


def lift(run_id: str, policy: Policy, selector: Selector | None) -> str | None:
    """``--unstop RUN``: the reason of the stop lifted, or None when the run was not
    stopped."""
    was = policy.lift(run_id)
    if was is not None and selector is not None:
        selector.unstop_run(run_id)
    return was


def replay_journal(journal: Path, policy: Policy, selector: Selector | None,
                   each: Callable[[Attempt], None] = lambda attempt: None) -> Replayed:
    """Feed the journal to ``policy`` and ``selector`` (the selector's index loaded first;
    None: the rules only); ``each`` sees every finished attempt, interrupted ones included
    (they count toward nothing else)."""
    done = Replayed()
    pending: dict[str, RunStop] = {}
    for item in iter_outcomes(journal):
        if isinstance(item, RunStopped):
            policy.stopped_runs.setdefault(item.run_id, item.reason)
            if selector is not None:
                selector.stop_run(item.run_id)
            pending.pop(item.run_id, None)
        elif isinstance(item, RunUnstopped):
            lift(item.run_id, policy, selector)
            pending.pop(item.run_id, None)
        else:
            each(item)
            if item.interrupted:
                continue
            run_stops, session_stop = observe(item, policy, selector)
            pending.update((stop.run_id, stop) for stop in run_stops)
            done.session_stop = done.session_stop or session_stop
    done.unjournaled = list(pending.values())
    return done
