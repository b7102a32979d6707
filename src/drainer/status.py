"""``drainer status``: the backlog by run, QUEUED and stale phases, resumable sessions.

Reads only: nothing is written to the database or the session directory.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backlog import HISTORY_TABLE, Lease, StopRequest, open_backlog
from .config import DEFAULT_TELEMETRY_TABLES
from .dburl import DatabaseURL
from .errors import SessionError
from .journal import Replay, replay, session_journals
from .report import STATE_ORDER
from .schema import Schema

RUNS_SHOWN = 40


@dataclass
class Status:
    by_run: dict[str, dict[str, int]]
    stale: list[tuple[str, str, str, float | None]]  #: run, phase, state, age in minutes
    sessions: list[Replay]
    unreadable_sessions: list[tuple[Path, str]]
    leases: list[tuple[Lease, float]]
    #: the attempt history's rows, sessions and phases; None: no history table yet
    history: tuple[int, int, int] | None = None
    #: ``drainer stop`` requests no session has taken yet
    stop_requests: list[StopRequest] = field(default_factory=list)


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


async def collect_status(
    db: DatabaseURL, session_dir: Path, stale_minutes: float, schema: Schema | None = None
) -> Status:
    async with open_backlog(db, DEFAULT_TELEMETRY_TABLES, schema) as backlog:
        by_run = await backlog.phases.counts_by_run()
        rows, db_now = await backlog.phases.non_final()
        leases = await backlog.leases.live()
        history = await backlog.history.size()
        stop_requests = await backlog.requests.waiting()
    now = _as_datetime(db_now)
    stale: list[tuple[str, str, str, float | None]] = []
    for run_id, phase_id, state, updated in rows:
        at = _as_datetime(updated)
        age = (now - at).total_seconds() / 60 if now is not None and at is not None else None
        if age is None or age >= stale_minutes:
            stale.append((run_id, phase_id, state, age))
    sessions: list[Replay] = []
    unreadable: list[tuple[Path, str]] = []
    for journal in session_journals(session_dir):
        try:
            sessions.append(replay(journal))
        except SessionError as exc:
            unreadable.append((journal, str(exc)))
    return Status(by_run=by_run, stale=stale, sessions=sessions, unreadable_sessions=unreadable,
                  leases=leases, history=history, stop_requests=stop_requests)


def status_lines(
    status: Status, db: DatabaseURL, session_dir: Path, stale_minutes: float
) -> list[str]:
    totals: dict[str, int] = {}
    for counts in status.by_run.values():
        for state, n in counts.items():
            totals[state] = totals.get(state, 0) + n
    states = [s for s in STATE_ORDER if s in totals] + sorted(set(totals) - set(STATE_ORDER))
    lines = [
        f"Backlog {db.redacted}",
        "  phases: " + (", ".join(f"{s} {totals[s]}" for s in states) or "none")
        + f" (total {sum(totals.values())}) in {len(status.by_run)} runs",
    ]
    runs = sorted(status.by_run.items(), key=lambda kv: (-kv[1].get("FAILED", 0), kv[0]))
    if runs:
        width = min(max(len(r) for r, _ in runs), 40)
        lines.append(f"  {'run':<{width}}  " + "  ".join(f"{s:>9}" for s in states))
        for run_id, counts in runs[:RUNS_SHOWN]:
            cells = "  ".join(f"{counts.get(s, 0):>9}" for s in states)
            lines.append(f"  {run_id:<{width}}  {cells}")
        if len(runs) > RUNS_SHOWN:
            lines.append(f"  ... {len(runs) - RUNS_SHOWN} more runs")
    queued = sorted((r, c["QUEUED"]) for r, c in status.by_run.items() if c.get("QUEUED"))
    lines.append("Runs with QUEUED phases: " + (
        ", ".join(f"{r} ({n})" for r, n in queued) if queued else "none"))
    lines.append(f"Stale non-final phases (not updated for {stale_minutes:g} min or more): "
                 + ("none" if not status.stale else str(len(status.stale))))
    leased = {lease.run_id for lease, _age in status.leases}
    for run_id, phase_id, state, age in status.stale[:RUNS_SHOWN]:
        when = "age unknown" if age is None else f"{age:.0f} min"
        held = ", its run leased by a drainer" if run_id in leased else ""
        lines.append(f"  {run_id} / {phase_id}: {state}, {when}{held}")
    if status.stale:
        lines.append(f"  (drainer run --restore-stale-after {stale_minutes:g} restores them to "
                     "FAILED before picking, but those whose run a drainer leases, and those "
                     "of unknown age)")
    lines.append(f"Live leases (runs being drained now): {len(status.leases) or 'none'}")
    for lease, age in status.leases:
        lines.append(f"  {lease.run_id} / {lease.phase_id}: host {lease.host} pid {lease.pid}, "
                     f"session {lease.session_id}, held {age:.0f}s")
    if status.history is None:
        lines.append(f"Attempt history ({HISTORY_TABLE}): none yet")
    else:
        rows, sessions, phases = status.history
        lines.append(f"Attempt history ({HISTORY_TABLE}): {rows} attempt(s) of {phases} "
                     f"phase(s) in {sessions} session(s) (drainer analyze --history shows it)")
    lines.append(f"Stop requests waiting (drainer stop): {len(status.stop_requests) or 'none'}")
    for request in status.stop_requests:
        lines.append(f"  session {request.session_id}: asked by {request.requested_by}; a "
                     "running session takes it within seconds, a resume clears it")
    incomplete = [s for s in status.sessions if not s.complete]
    lines.append(f"Sessions in {session_dir}: {len(status.sessions)}, "
                 f"incomplete: {len(incomplete)}")
    for s in incomplete:
        why = s.stop_reason or "crashed or killed"
        lines.append(f"  {s.session_id}: {s.done} attempt(s) done, {len(s.dangling)} unfinished, "
                     f"stopped: {why}")
        if s.damage is not None and s.damage.count:
            lines.append(f"    damaged: {s.damage.describe()}")
        lines.append(f"    resume: python -m drainer run --resume {s.session_id} "
                     f"--session-dir {shlex.quote(str(session_dir))} (same --database-url)")
    for path, why in status.unreadable_sessions:
        lines.append(f"  unreadable: {path}: {why}")
    return lines
