"""Typed events a session emits: attempts started and finished, runs and the session stopped.

An embedding application receives them through ``drain(config, on_event=...)`` or by
iterating ``Drainer.events()``; ``python -m drainer run --json`` prints them one per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import Attempt


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """A worker is about to be spawned for a phase."""

    session_id: str
    attempt_id: str
    run_id: str
    phase_id: str
    attempt_number: int
    lane: int
    at: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "attempt_started", "session_id": self.session_id,
                "attempt_id": self.attempt_id, "run_id": self.run_id,
                "phase_id": self.phase_id, "attempt_number": self.attempt_number,
                "lane": self.lane, "at": self.at}


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """An attempt ended (success, failure, timeout, cancellation); ``attempt`` is its record."""

    session_id: str
    attempt: Attempt

    def to_json(self) -> dict[str, Any]:
        return {"event": "attempt_finished", "session_id": self.session_id,
                **self.attempt.to_json()}


@dataclass(frozen=True, slots=True)
class RunStopped:
    """A run gets no more attempts this session (``--max-fingerprint-repeats`` and kin)."""

    session_id: str
    run_id: str
    reason: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "run_stopped", "session_id": self.session_id, "run_id": self.run_id,
                "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class SessionStopped:
    """The session ended; ``stop_reason`` says why (DESIGN.md §5)."""

    session_id: str
    stop_reason: str | None
    processed: int
    succeeded: int
    failed: int
    snapshot_path: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "session_stopped", "session_id": self.session_id,
                "stop_reason": self.stop_reason, "processed": self.processed,
                "succeeded": self.succeeded, "failed": self.failed,
                "snapshot_path": self.snapshot_path}


DrainEvent = AttemptStarted | AttemptFinished | RunStopped | SessionStopped
