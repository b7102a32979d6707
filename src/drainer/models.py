"""Plain records shared by every module: states, stop reasons, phases, attempts, totals.

A leaf: it imports nothing from drainer but ``errors`` (itself a leaf), so any module may
import it.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Set
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UsageError


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


class StopReason(enum.StrEnum):
    """Why a session ended (``stop_reason`` in the session files, DESIGN.md §5)."""

    BATCH_SIZE_REACHED = "batch_size_reached"  #: --batch-size attempts started
    TIME_LIMIT_REACHED = "time_limit_reached"  #: --max-total-minutes passed
    CONSECUTIVE_ZERO_YIELD = "consecutive_zero_yield"  #: --max-consecutive-zero-yield
    FAILURE_LIMIT = "failure_limit"  #: --halt-on-failures
    NO_CANDIDATES = "no_candidates"  #: nothing left that could be drained
    MAX_LEAKS = "max_leaks"  #: --max-leaks exceeded
    SIGNAL = "signal"  #: SIGINT/SIGTERM (resumable)
    CANCELLED = "cancelled"  #: the embedding caller cancelled or stopped it (resumable)
    ERROR = "error"  #: drainer could not go on, e.g. the database went away (resumable)

    @property
    def resumable(self) -> bool:
        """True when the session was interrupted and ``--resume`` continues it."""
        return self in _RESUMABLE


_RESUMABLE = frozenset({StopReason.SIGNAL, StopReason.CANCELLED, StopReason.ERROR})


def stop_reason_of(value: Any) -> StopReason | None:
    """The StopReason a session file names; None for none or one this version does not know
    (such a session is treated as complete)."""
    try:
        return StopReason(value) if value is not None else None
    except ValueError:
        return None


class RunStopReason(enum.StrEnum):
    """Why a run gets no more attempts this session (``stopped_runs``)."""

    FINGERPRINT_REPEATS = "max_fingerprint_repeats"
    TIMEOUTS = "max_timeouts_per_run"


@dataclass(frozen=True, slots=True)
class RunStop:
    """A stop rule's decision: ``run_id`` gets no more attempts this session."""

    run_id: str
    reason: RunStopReason
    detail: str


@dataclass(frozen=True, slots=True)
class SessionStop:
    """A stop rule's decision: the session stops picking."""

    reason: StopReason
    detail: str


#: --halt-on-failures N% is judged only once this many attempts have finished.
FAILURE_SHARE_MIN_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class FailureLimit:
    """``--halt-on-failures N`` (``count``) or ``N%`` (``percent``)."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: int | str) -> FailureLimit:
        """``5``, ``"5"`` or ``"20%"``; anything else raises UsageError."""
        flag = "--halt-on-failures"
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageError(f"{flag} takes N or N%, got {value!r}")
        text = str(value).strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 < percent < 100:
                    raise UsageError(f"{flag} N% needs 0 < N < 100, got {text!r}")
                return cls(percent=percent)
            count = int(text)
        except ValueError:
            raise UsageError(
                f"{flag} takes a number of failed attempts (5) or a share (20%), got {text!r}"
            ) from None
        if count < 1:
            raise UsageError(f"{flag} must be at least 1, got {count}")
        return cls(count=count)

    @classmethod
    def check(cls, flag: str, value: int | str) -> None:
        """The option's range check (``Option.check``)."""
        cls.parse(value)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


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
class Candidates:
    """What one load of the backlog found, as columns (one row per FAILED or QUEUED phase;
    no object per phase) with each run's rows contiguous: ``runs`` maps a run to its rows
    ``start:end``. Memory at 100,000 phases is what the budget allows."""

    phase_ids: list[str] = field(default_factory=list)
    indexes: array[int] = field(default_factory=lambda: array("q"))
    reasons: list[str | None] = field(default_factory=list)
    queued: bytearray = field(default_factory=bytearray)  #: 1 for QUEUED, 0 for FAILED
    runs: dict[str, tuple[int, int]] = field(default_factory=dict)
    _run: str | None = None  #: the run whose rows are being added
    _start: int = 0

    def add(self, run_id: str, phase_id: str, index: int, state: str,
            reason: str | None) -> None:
        """Add a row; rows must come grouped by run (the store loads ORDER BY run)."""
        if run_id != self._run:
            self._close()
            if run_id in self.runs:
                raise ValueError(f"rows of run {run_id!r} are not grouped together")
            self._run, self._start = run_id, len(self.phase_ids)
        self.phase_ids.append(phase_id)
        self.indexes.append(index)
        self.reasons.append(reason)
        self.queued.append(state == PhaseState.QUEUED)

    def add_run(self, other: Candidates, run_id: str) -> None:
        """Add every row of ``run_id`` in ``other`` (a run not added yet)."""
        start, end = other.runs[run_id]
        self._close()
        if run_id in self.runs:
            raise ValueError(f"rows of run {run_id!r} are not grouped together")
        at = len(self.phase_ids)
        self.phase_ids += other.phase_ids[start:end]
        self.indexes += other.indexes[start:end]
        self.reasons += other.reasons[start:end]
        self.queued += other.queued[start:end]
        self.runs[run_id] = (at, len(self.phase_ids))

    def _close(self) -> None:
        if self._run is not None:
            self.runs[self._run] = (self._start, len(self.phase_ids))
            self._run = None

    def done(self) -> Candidates:
        """Every row is in: close the last run."""
        self._close()
        return self

    def ref(self, run_id: str, i: int) -> PhaseRef:
        state = PhaseState.QUEUED if self.queued[i] else PhaseState.FAILED
        return PhaseRef(run_id, self.phase_ids[i], self.indexes[i], state.value,
                        self.reasons[i])

    @classmethod
    def of(cls, refs: Iterable[PhaseRef]) -> Candidates:
        """Candidates from phase records in any order (grouped by run here)."""
        out = cls()
        for ref in sorted(refs, key=lambda r: r.run_id):
            out.add(ref.run_id, ref.phase_id, ref.phase_index, ref.state,
                    ref.last_failure_reason)
        return out.done()

    @property
    def failed(self) -> int:
        return len(self.queued) - sum(self.queued)


def merge_changes(old: Candidates, fresh: Candidates, changed: Set[str]) -> Candidates:
    """``old`` with the rows of the ``changed`` runs replaced by ``fresh``'s (which holds
    the candidates of changed runs only; a changed run it lacks has none left)."""
    out = Candidates()
    for run_id in old.runs:
        if run_id not in changed:
            out.add_run(old, run_id)
    for run_id in fresh.runs:
        out.add_run(fresh, run_id)
    return out.done()


# Triage tiers of a run (sample-first), drained in this order.
TIER_UNSAMPLED = 0  #: no attempt yet this session: sample it first
TIER_PROMISING = 1  #: its first attempt succeeded, yielded telemetry, timed out or failed newly
TIER_DEPRIORITISED = 2  #: first attempt failed with an already-seen fingerprint, no telemetry
TIER_NAMES = ("unsampled", "promising", "deprioritised")


@dataclass(frozen=True, slots=True)
class LeakedProcess:
    """A process that carried an attempt's marker after the attempt ended."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    attempt: str = ""  #: ``run / phase`` of the attempt it came from, when known

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "name": self.name, "cmdline": list(self.cmdline)}
        if self.attempt:
            out["attempt"] = self.attempt
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeakedProcess:
        return cls(pid=int(data["pid"]), name=str(data["name"]),
                   attempt=str(data.get("attempt") or ""),
                   cmdline=tuple(str(p) for p in data["cmdline"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The record of one attempt; ``to_json`` gives Autopack's fields plus drainer's."""

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
    reached_llm_boundary: bool = False  #: Autopack's: a message/context/token limit was hit
    zero_yield_reason: str | None = None
    llm_call_seen: bool = False  #: drainer's: the output shows an LLM call was made
    worker_error: str | None = None  #: the last error line of the worker's output
    timed_out: bool = False
    cancelled: bool = False
    interrupted: bool = False
    lease_lost: bool = False  #: the run's lease was no longer ours: the phase was left alone
    state_restored: bool = False
    leaked_processes: tuple[LeakedProcess, ...] = ()
    peak_rss_bytes: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    timeout_seconds: float | None = None  #: the limit it ran under (None: none)

    def __post_init__(self) -> None:
        if not isinstance(self.leaked_processes, tuple):  # a list from a caller
            object.__setattr__(self, "leaked_processes", tuple(self.leaked_processes))

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.phase_id)

    @property
    def failed(self) -> bool:
        """A real attempt that did not succeed (timed out and cancelled ones included)."""
        return not self.success and not self.interrupted

    @property
    def outcome(self) -> str:
        """One of :data:`OUTCOMES`, the first that holds: interrupted (drainer did not see
        it end), ok (its phase is COMPLETE, even if the worker then hung past its limit),
        cancelled (by a stop), timed out, failed."""
        if self.interrupted:
            return "interrupted"
        if self.success:
            return "ok"
        if self.cancelled:
            return "cancelled"
        return "timed out" if self.timed_out else "failed"

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _ATTEMPT_FIELDS}
        out["subprocess_duration_seconds"] = round(self.subprocess_duration_seconds, 3)
        out["leaked_processes"] = [p.to_json() for p in self.leaked_processes]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        kwargs = {k: v for k, v in data.items() if k in _FIELD_SET}
        _check_numbers(kwargs)
        kwargs["leaked_processes"] = tuple(
            LeakedProcess.from_json(p) for p in data.get("leaked_processes") or ()
        )
        kwargs.setdefault("attempt_id", "")
        kwargs.setdefault("attempt_number", 1)
        kwargs.setdefault("lane", 0)
        kwargs.setdefault("started_at", data.get("timestamp", ""))
        kwargs.setdefault("initial_state", "FAILED")
        return cls(**kwargs)


#: The fields of an attempt record in Autopack's session file (its ``DrainResult``), in order.
AUTOPACK_FIELDS: tuple[str, ...] = (
    "run_id", "phase_id", "phase_index", "initial_state", "final_state", "success",
    "error_message", "timestamp", "subprocess_returncode", "subprocess_duration_seconds",
    "subprocess_stdout_path", "subprocess_stderr_path", "subprocess_stdout_excerpt",
    "subprocess_stderr_excerpt", "failure_fingerprint", "telemetry_events_collected",
    "telemetry_yield_per_minute", "reached_llm_boundary", "zero_yield_reason",
)
#: Field order of an attempt record in the journal (Autopack's fields first, then drainer's).
_ATTEMPT_FIELDS: tuple[str, ...] = (*AUTOPACK_FIELDS,
    "llm_call_seen", "worker_error", "attempt_id", "attempt_number", "lane", "started_at",
    "finished_at", "timed_out", "cancelled", "interrupted", "lease_lost", "state_restored",
    "leaked_processes", "peak_rss_bytes", "stdout_bytes", "stderr_bytes", "timeout_seconds",
)
#: how Autopack's controller records a timeout (its analyzer counts return codes -1 and 143)
AUTOPACK_TIMEOUT_STATE = "TIMEOUT"
AUTOPACK_TIMEOUT_RETURNCODE = -1


def autopack_record(record: dict[str, Any]) -> dict[str, Any] | None:
    """An attempt record (a journal line's fields) as Autopack's session file holds it: its
    fields only, so its loader's ``DrainResult(**item)`` accepts it, and a timeout written
    as Autopack writes one (``final_state`` ``TIMEOUT``, return code -1). None for an
    interrupted attempt: Autopack's controller records nothing for an attempt it did not
    see end, and its analyzer's progress counts every item against the batch size."""
    if record.get("interrupted"):
        return None
    out = {name: record.get(name) for name in AUTOPACK_FIELDS}
    if record.get("timed_out"):  # a success that then hung keeps its COMPLETE
        if not record.get("success"):
            out["final_state"] = AUTOPACK_TIMEOUT_STATE
        out["subprocess_returncode"] = AUTOPACK_TIMEOUT_RETURNCODE
    return out
_FIELD_SET = frozenset(_ATTEMPT_FIELDS)
assert {f.name for f in fields(Attempt)} == _FIELD_SET
#: number fields of a record, checked on reading (a hand-edited "1.5" must not reach sums)
_NUMBER_FIELDS = (
    ("phase_index", int), ("attempt_number", int), ("lane", int),
    ("subprocess_returncode", int), ("subprocess_duration_seconds", float),
    ("telemetry_events_collected", int), ("telemetry_yield_per_minute", float),
    ("timeout_seconds", float),
)


def _check_numbers(record: dict[str, Any]) -> None:
    for name, kind in _NUMBER_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if not ok or isinstance(value, bool):
            wanted = "a number" if kind is float else "an integer"
            raise ValueError(f"{name} is {value!r}, not {wanted}")


#: An attempt's outcome in the words every output uses (footer, summary, session files,
#: ``analyze``, the HTML report), in this order. Each attempt has exactly one, so the five
#: counts add up to the attempts: see :attr:`Attempt.outcome`.
OUTCOMES = ("ok", "failed", "timed out", "cancelled", "interrupted")
#: ``(word, JSON key)`` of each outcome
OUTCOME_KEYS = tuple((word, word.replace(" ", "_")) for word in OUTCOMES)


@dataclass(slots=True)
class Outcomes:
    """How many attempts ended each way (:data:`OUTCOMES`)."""

    ok: int = 0
    failed: int = 0  #: failed on their own: neither timed out, cancelled nor interrupted
    timed_out: int = 0
    cancelled: int = 0
    interrupted: int = 0

    def count(self, a: Attempt) -> None:
        outcome = a.outcome
        if outcome == "ok":
            self.ok += 1
        elif outcome == "failed":
            self.failed += 1
        elif outcome == "timed out":
            self.timed_out += 1
        elif outcome == "cancelled":
            self.cancelled += 1
        else:
            self.interrupted += 1

    @property
    def attempts(self) -> int:
        return self.ok + self.failed + self.timed_out + self.cancelled + self.interrupted

    @property
    def ended(self) -> int:
        """Attempts drainer saw end (the interrupted ones it did not)."""
        return self.attempts - self.interrupted

    @property
    def success_rate(self) -> float | None:
        """``ok`` of the attempts that ended (as Autopack's analyzer computes it from the
        session file, which leaves interrupted attempts out)."""
        return self.ok / self.ended if self.ended else None

    def pairs(self) -> list[tuple[str, int]]:
        """``(word, count)`` in :data:`OUTCOMES` order."""
        return list(zip(OUTCOMES, (self.ok, self.failed, self.timed_out, self.cancelled,
                                   self.interrupted), strict=True))

    def text(self, *, brief: bool = False) -> str:
        """``ok 3  failed 1  timed out 0  cancelled 0  interrupted 0``; ``brief`` leaves out
        cancelled and interrupted when they are zero."""
        return "  ".join(f"{word} {n}" for i, (word, n) in enumerate(self.pairs())
                         if n or i < 3 or not brief)

    def to_json(self) -> dict[str, int]:
        """The counts under the words' JSON keys (``timed_out`` for "timed out")."""
        return {key: n for (_, key), (_, n) in zip(OUTCOME_KEYS, self.pairs(), strict=True)}


def format_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


@dataclass(slots=True)
class Totals(Outcomes):
    """The counts of a session, fed one attempt at a time: the one source of the figures of
    the footer, the summary, the session files, the embedding API, ``analyze`` and the HTML
    report. Memory is per run, never per attempt."""

    timeouts: int = 0  #: attempts that hit their limit, a success that then hung included
    interrupted_events: int = 0  #: telemetry events counted for interrupted attempts
    restored: int = 0
    leaked: int = 0  #: processes listed in the attempts' ``leaked_processes``
    telemetry_events: int = 0
    telemetry_known: int = 0  #: attempts whose telemetry count is known
    telemetry_seconds: float = 0.0  #: duration of those attempts
    duration_seconds: float = 0.0  #: duration of every attempt
    runs: dict[str, Outcomes] = field(default_factory=dict)
    #: phases whose latest attempt was cancelled by a stop and that have not been drained
    #: since (a later success clears one); they too make exit code 1. At most one entry per
    #: attempt in flight at each stop: it does not grow with the session.
    cancelled_open: set[tuple[str, str]] = field(default_factory=set)

    def add(self, a: Attempt) -> None:
        self.count(a)
        self.timeouts += a.timed_out and not a.interrupted
        if a.interrupted:
            self.interrupted_events += a.telemetry_events_collected or 0
        if a.outcome == "cancelled":
            self.cancelled_open.add(a.key)
        elif a.success:
            self.cancelled_open.discard(a.key)
        self.restored += a.state_restored
        self.leaked += len(a.leaked_processes)
        self.duration_seconds += a.subprocess_duration_seconds
        if a.telemetry_events_collected is not None:
            self.telemetry_known += 1
            self.telemetry_events += a.telemetry_events_collected
            self.telemetry_seconds += a.subprocess_duration_seconds
        run = self.runs.get(a.run_id)
        if run is None:
            run = self.runs[a.run_id] = Outcomes()
        run.count(a)

    @property
    def processed(self) -> int:
        return self.attempts

    @property
    def failed_by_worker(self) -> int:
        """Attempts that failed on their own (not cancelled by a stop): exit code 1."""
        return self.failed + self.timed_out

    def autopack_totals(self) -> dict[str, int]:
        """The header counts of Autopack's session file, by its controller's rules: its
        results leave interrupted attempts out, ``total_failed`` is every other attempt that
        did not succeed, ``total_timeouts`` every attempt that hit its limit."""
        return {
            "total_processed": self.ended,
            "total_success": self.ok,
            "total_failed": self.failed + self.timed_out + self.cancelled,
            "total_timeouts": self.timeouts,
            "total_telemetry_events": self.telemetry_events - self.interrupted_events,
        }


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What a finished (or stopped) session did. ``exit_code`` follows DESIGN.md §8.

    The attempts themselves are in the journal: ``drainer.iter_attempts(summary.journal_path)``
    streams them (a summary stays small however long the session was).
    """

    session_id: str
    started_at: str
    completed_at: str | None
    stop_reason: StopReason | None
    totals: Totals
    snapshot_path: Path
    journal_path: Path
    logs_dir: Path
    stop_detail: str | None = None  #: the [STOP] line's text, e.g. the caller's reason
    stopped_runs: dict[str, str] = field(default_factory=dict)
    pattern_leaks: tuple[LeakedProcess, ...] = ()

    @property
    def interrupted(self) -> bool:
        return self.stop_reason is not None and self.stop_reason.resumable

    # The figures of the Autopack session file's header (Totals.autopack_totals), under its
    # names; ``totals`` has drainer's five outcomes.
    @property
    def total_processed(self) -> int:
        return self.totals.ended

    @property
    def total_success(self) -> int:
        return self.totals.ok

    @property
    def total_failed(self) -> int:
        return self.totals.autopack_totals()["total_failed"]

    @property
    def total_timeouts(self) -> int:
        return self.totals.timeouts

    @property
    def total_telemetry_events(self) -> int:
        return self.totals.autopack_totals()["total_telemetry_events"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        # A cancelled attempt whose phase was drained since (after --resume) is made good.
        return 1 if self.totals.failed_by_worker or self.totals.cancelled_open else 0
