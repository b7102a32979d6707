"""The one vocabulary of typed events: what the journal records and what an embedding
application receives.

Every event has a ``kind`` (the journal's ``type``, the ``--json`` output's ``event``),
``to_journal()`` (the journal line) and ``from_journal()`` (its reader). The embedding API and
``python -m drainer run --json`` see :data:`DrainEvent`, the public subset, through
``to_json()``; the journal also records when a session started or resumed and when a worker
was spawned (its pid, for crash reconcile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .models import Attempt, StopReason, Totals, stop_reason_of


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A new session's first journal line: who runs it, with which options."""

    kind: ClassVar[str] = "session_started"
    session_id: str
    started_at: str
    host: str
    pid: int
    drainer_version: str
    config: dict[str, Any]

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "session_id": self.session_id, "started_at": self.started_at,
                "host": self.host, "pid": self.pid, "drainer_version": self.drainer_version,
                "config": self.config}

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> SessionStarted:
        return cls(session_id=str(data.get("session_id", "")),
                   started_at=str(data.get("started_at", "")), host=str(data.get("host", "")),
                   pid=int(data.get("pid") or 0),
                   drainer_version=str(data.get("drainer_version", "")),
                   config=dict(data.get("config") or {}))


@dataclass(frozen=True, slots=True)
class SessionResumed:
    """``--resume`` took the session over (possibly on another host)."""

    kind: ClassVar[str] = "session_resumed"
    host: str
    pid: int
    config: dict[str, Any]

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "host": self.host, "pid": self.pid, "config": self.config}

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> SessionResumed:
        return cls(host=str(data.get("host", "")), pid=int(data.get("pid") or 0),
                   config=dict(data.get("config") or {}))


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """A worker is about to be spawned for a phase. ``attempt`` is its record so far."""

    kind: ClassVar[str] = "attempt_started"
    session_id: str
    attempt: Attempt
    argv: tuple[str, ...] = ()
    telemetry_before: int | None = None  #: telemetry rows of the phase before the attempt

    @property
    def attempt_id(self) -> str:
        return self.attempt.attempt_id

    @property
    def run_id(self) -> str:
        return self.attempt.run_id

    @property
    def phase_id(self) -> str:
        return self.attempt.phase_id

    @property
    def attempt_number(self) -> int:
        return self.attempt.attempt_number

    @property
    def lane(self) -> int:
        return self.attempt.lane

    @property
    def at(self) -> str:
        return self.attempt.started_at

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "session_id": self.session_id,
                "attempt_id": self.attempt_id, "run_id": self.run_id,
                "phase_id": self.phase_id, "attempt_number": self.attempt_number,
                "lane": self.lane, "at": self.at}

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, **self.attempt.to_json(), "argv": list(self.argv),
                "telemetry_before": self.telemetry_before}

    @classmethod
    def from_journal(cls, data: dict[str, Any], session_id: str = "") -> AttemptStarted:
        before = data.get("telemetry_before")
        return cls(session_id=session_id, attempt=Attempt.from_json(data),
                   argv=tuple(data.get("argv") or ()),
                   telemetry_before=None if before is None else int(before))


@dataclass(frozen=True, slots=True)
class AttemptSpawned:
    """The worker of an attempt is running: pid and create time find it after a crash."""

    kind: ClassVar[str] = "attempt_spawned"
    attempt_id: str
    pid: int
    create_time: float | None

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "attempt_id": self.attempt_id, "pid": self.pid,
                "create_time": self.create_time}

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> AttemptSpawned:
        created = data.get("create_time")
        return cls(attempt_id=str(data["attempt_id"]), pid=int(data["pid"]),
                   create_time=None if created is None else float(created))


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """An attempt ended (success, failure, timeout, cancellation); ``attempt`` is its record."""

    kind: ClassVar[str] = "attempt_finished"
    session_id: str
    attempt: Attempt

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "session_id": self.session_id, **self.attempt.to_json()}

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, **self.attempt.to_json()}

    @classmethod
    def from_journal(cls, data: dict[str, Any], session_id: str = "") -> AttemptFinished:
        return cls(session_id=session_id, attempt=Attempt.from_json(data))


@dataclass(frozen=True, slots=True)
class RunStopped:
    """A run gets no more attempts this session (``--max-fingerprint-repeats`` and kin)."""

    kind: ClassVar[str] = "run_stopped"
    session_id: str
    run_id: str
    reason: str  #: a :class:`~drainer.models.RunStopReason` value
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "session_id": self.session_id, "run_id": self.run_id,
                "reason": self.reason, "detail": self.detail}

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "run_id": self.run_id, "reason": self.reason,
                "detail": self.detail}

    @classmethod
    def from_journal(cls, data: dict[str, Any], session_id: str = "") -> RunStopped:
        return cls(session_id=session_id, run_id=str(data["run_id"]),
                   reason=str(data["reason"]), detail=str(data.get("detail", "")))


@dataclass(frozen=True, slots=True)
class RunUnstopped:
    """``--unstop RUN`` on ``--resume``: the run's stop is lifted; it drains again."""

    kind: ClassVar[str] = "run_unstopped"
    session_id: str
    run_id: str
    was: str  #: the reason of the stop it lifts

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "session_id": self.session_id, "run_id": self.run_id,
                "was": self.was}

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "run_id": self.run_id, "was": self.was}

    @classmethod
    def from_journal(cls, data: dict[str, Any], session_id: str = "") -> RunUnstopped:
        return cls(session_id=session_id, run_id=str(data["run_id"]),
                   was=str(data.get("was", "")))


@dataclass(frozen=True, slots=True)
class SessionStopped:
    """The session ended; ``stop_reason`` says why (DESIGN.md §5)."""

    kind: ClassVar[str] = "session_stopped"
    session_id: str
    stop_reason: StopReason | None
    completed_at: str = ""
    stop_detail: str | None = None
    totals: Totals = field(default_factory=Totals)
    snapshot_path: str = ""

    @property
    def processed(self) -> int:
        return self.totals.processed

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "session_id": self.session_id,
                "stop_reason": self.stop_reason, "stop_detail": self.stop_detail,
                "processed": self.processed, **self.totals.to_json(),
                "snapshot_path": self.snapshot_path}

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "stop_reason": self.stop_reason,
                "stop_detail": self.stop_detail, "completed_at": self.completed_at}

    @classmethod
    def from_journal(cls, data: dict[str, Any], session_id: str = "") -> SessionStopped:
        return cls(session_id=session_id, stop_reason=stop_reason_of(data.get("stop_reason")),
                   completed_at=str(data.get("completed_at") or data.get("at") or ""),
                   stop_detail=data.get("stop_detail"))


@dataclass(frozen=True, slots=True)
class StaleRestored:
    """``--restore-stale-after``: phases left non-final too long, with no drainer's lease on
    their run, restored to FAILED before picking."""

    kind: ClassVar[str] = "stale_restored"
    older_than_minutes: float
    #: (run, phase, state before, reason written) of each phase restored
    phases: tuple[tuple[str, str, str, str], ...]

    def to_journal(self) -> dict[str, Any]:
        return {"type": self.kind, "older_than_minutes": self.older_than_minutes,
                "phases": [{"run_id": r, "phase_id": p, "state": st, "reason": why}
                           for r, p, st, why in self.phases]}

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> StaleRestored:
        return cls(older_than_minutes=float(data["older_than_minutes"]),
                   phases=tuple((str(x["run_id"]), str(x["phase_id"]), str(x["state"]),
                                 str(x["reason"])) for x in data.get("phases") or ()))


DrainEvent = AttemptStarted | AttemptFinished | RunStopped | RunUnstopped | SessionStopped
"""What an embedding application receives (``on_event``, ``Drainer.events()``, ``--json``)."""

JournalEvent = (SessionStarted | SessionResumed | AttemptStarted | AttemptSpawned
                | AttemptFinished | RunStopped | RunUnstopped | SessionStopped | StaleRestored)
