"""Rebuilding a session from its journal, and finding sessions to resume.

A session is *complete* when its journal's last lifecycle event is ``session_stopped`` with
a final reason; one stopped by a signal or a cancelled caller, or one with no
``session_stopped`` at all (a crash), can be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SessionError
from .journal import journal_in_use, read_journal
from .models import Attempt

RESUMABLE_STOPS = frozenset({"signal", "cancelled", "error"})
LIFECYCLE = frozenset({"session_started", "session_resumed", "session_stopped"})


@dataclass
class Replay:
    """What a journal says happened."""

    session_id: str
    journal_path: Path
    started_at: str
    config: dict[str, Any]
    results: list[Attempt] = field(default_factory=list)
    dangling: list[dict[str, Any]] = field(default_factory=list)  #: started, never finished
    stopped_runs: dict[str, str] = field(default_factory=dict)
    stop_reason: str | None = None
    complete: bool = False
    last_event_at: str = ""


def replay(journal_path: Path) -> Replay:
    events = read_journal(journal_path)
    if not events or events[0].get("type") != "session_started":
        raise SessionError(f"corrupt journal {journal_path}: it does not start a session")
    first = events[0]
    state = Replay(
        session_id=str(first.get("session_id", journal_path.parent.name)),
        journal_path=journal_path,
        started_at=str(first.get("started_at", "")),
        config=dict(first.get("config") or {}),
    )
    open_attempts: dict[str, dict[str, Any]] = {}
    finished: set[str] = set()
    last_lifecycle: dict[str, Any] = first
    for event in events:
        kind = event["type"]
        state.last_event_at = str(event.get("at", state.last_event_at))
        if kind == "attempt_started":
            open_attempts[str(event["attempt_id"])] = dict(event)
        elif kind == "attempt_spawned":
            started = open_attempts.get(str(event["attempt_id"]))
            if started is not None:
                started["pid"] = event.get("pid")
                started["create_time"] = event.get("create_time")
        elif kind == "attempt_finished":
            attempt_id = str(event["attempt_id"])
            if attempt_id in finished:
                continue  # written twice by a crash between write and bookkeeping: keep one
            finished.add(attempt_id)
            open_attempts.pop(attempt_id, None)
            state.results.append(Attempt.from_json(event))
        elif kind == "run_stopped":
            state.stopped_runs[str(event["run_id"])] = str(event["reason"])
        if kind in LIFECYCLE:
            last_lifecycle = event
    state.dangling = list(open_attempts.values())
    if last_lifecycle["type"] == "session_stopped":
        state.stop_reason = last_lifecycle.get("stop_reason")
        state.complete = state.stop_reason not in RESUMABLE_STOPS
    return state


def session_journals(session_dir: Path) -> list[Path]:
    if not session_dir.is_dir():
        return []
    return sorted(session_dir.glob("batch-drain-*/journal.jsonl"))


def find_resumable(session_dir: Path, which: str) -> Replay | None:
    """``which`` is ``latest`` (newest incomplete session, or None) or a session id."""
    if which != "latest":
        journal = session_dir / which / "journal.jsonl"
        if "/" in which or not journal.is_file():
            raise SessionError(f"no session {which!r} in {session_dir} (see drainer status)")
        if journal_in_use(journal):
            raise SessionError(
                f"session {which} is being drained by another drainer process right now; "
                "it can be resumed once that process stops"
            )
        found = replay(journal)
        if found.complete:
            raise SessionError(
                f"session {which} completed ({found.stop_reason}); it cannot be resumed, "
                "start a new session instead"
            )
        return found
    candidates = []
    for journal in session_journals(session_dir):
        if journal_in_use(journal):
            continue  # alive in another drainer process: not ours to resume
        try:
            found = replay(journal)
        except SessionError:
            continue  # a corrupt old session does not block resuming the newest good one
        if not found.complete:
            candidates.append(found)
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.started_at, r.session_id))
