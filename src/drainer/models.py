"""Plain records shared by every module: phase states, phase references, attempt results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class PhaseState(enum.StrEnum):
    """States of a phase as stored in the backlog (Autopack's enum names)."""

    QUEUED = "QUEUED"  #: waiting for an executor; a worker moves it here first
    EXECUTING = "EXECUTING"  #: a worker is on it
    GATE = "GATE"  #: waiting on a quality gate
    CI_RUNNING = "CI_RUNNING"  #: CI is running for it
    COMPLETE = "COMPLETE"  #: done: the only success
    FAILED = "FAILED"  #: failed; the state drainer drains
    SKIPPED = "SKIPPED"  #: deliberately not done


_FINAL = frozenset({PhaseState.COMPLETE, PhaseState.FAILED, PhaseState.SKIPPED})
NON_FINAL_STATES: tuple[str, ...] = tuple(s.value for s in PhaseState if s not in _FINAL)


def is_final_state(state: str | None) -> bool:
    """True for COMPLETE/FAILED/SKIPPED, and for values that map to no known state: drainer
    only ever restores QUEUED/EXECUTING/GATE/CI_RUNNING, never a state it does not know."""
    return state is not None and state not in NON_FINAL_STATES


@dataclass(frozen=True, slots=True)
class PhaseRef:
    """One phase of the backlog as loaded for selection."""

    run_id: str
    phase_id: str
    phase_index: int
    state: str
    last_failure_reason: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.phase_id)


@dataclass(slots=True)
class LeakedProcess:
    """A process that carried an attempt's marker after the attempt ended."""

    pid: int
    name: str
    cmdline: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "cmdline": self.cmdline}


@dataclass(slots=True)
class Attempt:
    """The result record of one attempt; ``to_json`` gives Autopack's fields plus drainer's."""

    run_id: str
    phase_id: str
    phase_index: int
    initial_state: str
    attempt_id: str
    attempt_number: int
    lane: int
    started_at: str
    final_state: str | None = None
    success: bool = False
    error_message: str | None = None
    timestamp: str = ""
    finished_at: str | None = None
    subprocess_returncode: int | None = None
    subprocess_duration_seconds: float = 0.0
    subprocess_stdout_path: str | None = None
    subprocess_stderr_path: str | None = None
    subprocess_stdout_excerpt: str = ""
    subprocess_stderr_excerpt: str = ""
    failure_fingerprint: str | None = None
    telemetry_events_collected: int | None = None
    telemetry_yield_per_minute: float | None = None
    reached_llm_boundary: bool = False
    zero_yield_reason: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    interrupted: bool = False
    state_restored: bool = False
    leaked_processes: list[LeakedProcess] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.phase_id)

    @property
    def failed(self) -> bool:
        """Counts toward exit code 1: a real attempt that did not succeed."""
        return not self.success and not self.interrupted

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "phase_id": self.phase_id,
            "phase_index": self.phase_index,
            "initial_state": self.initial_state,
            "final_state": self.final_state,
            "success": self.success,
            "error_message": self.error_message,
            "timestamp": self.timestamp,
            "subprocess_returncode": self.subprocess_returncode,
            "subprocess_duration_seconds": round(self.subprocess_duration_seconds, 3),
            "subprocess_stdout_path": self.subprocess_stdout_path,
            "subprocess_stderr_path": self.subprocess_stderr_path,
            "subprocess_stdout_excerpt": self.subprocess_stdout_excerpt,
            "subprocess_stderr_excerpt": self.subprocess_stderr_excerpt,
            "failure_fingerprint": self.failure_fingerprint,
            "telemetry_events_collected": self.telemetry_events_collected,
            "telemetry_yield_per_minute": self.telemetry_yield_per_minute,
            "reached_llm_boundary": self.reached_llm_boundary,
            "zero_yield_reason": self.zero_yield_reason,
            "attempt_id": self.attempt_id,
            "attempt_number": self.attempt_number,
            "lane": self.lane,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "interrupted": self.interrupted,
            "state_restored": self.state_restored,
            "leaked_processes": [p.to_json() for p in self.leaked_processes],
            "peak_rss_bytes": self.peak_rss_bytes,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        leaked = [
            LeakedProcess(pid=int(p["pid"]), name=str(p["name"]), cmdline=list(p["cmdline"]))
            for p in data.get("leaked_processes") or []
        ]
        known = {f for f in cls.__dataclass_fields__ if f != "leaked_processes"}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("attempt_id", "")
        kwargs.setdefault("attempt_number", 1)
        kwargs.setdefault("lane", 0)
        kwargs.setdefault("started_at", data.get("timestamp", ""))
        kwargs.setdefault("initial_state", "FAILED")
        return cls(leaked_processes=leaked, **kwargs)
