"""Stop rules: one object per rule, each fed the session's attempts.

A rule sees every attempt that starts (:meth:`Rule.started`) and every attempt that finishes
(:meth:`Rule.observe`), and may answer with a decision: a :class:`~drainer.models.RunStop`
(that run gets no more attempts) or a :class:`~drainer.models.SessionStop` (the session stops
picking). Rules keep aggregates only. Interrupted attempts (drainer died while they ran) feed
no rule. :data:`RULES` is the registry: adding a rule is one class and one entry there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .config import DrainConfig
from .models import (
    FAILURE_SHARE_MIN_ATTEMPTS,
    Attempt,
    FailureLimit,
    RunStop,
    RunStopReason,
    SessionStop,
    StopReason,
)

Decision = RunStop | SessionStop


def _limit(value: float | int | None, unit: str = "") -> str:
    return "off" if value is None else f"{value:g}{unit}"


@dataclass(frozen=True, slots=True)
class Sensors:
    """What rules may read besides the attempts: live counts owned elsewhere."""

    leak_count: Callable[[], int] = lambda: 0  #: leaked processes so far (the leak gauge)


class Rule:
    """Base of the stop rules: every hook does nothing unless a rule overrides it."""

    label: ClassVar[str] = ""  #: how the header's "stop rules" line names the rule
    deadline: float | None = None  #: seconds after the start at which picking stops

    def __init__(self, config: DrainConfig) -> None:
        pass

    @classmethod
    def create(cls, config: DrainConfig, sensors: Sensors) -> Rule:
        return cls(config)

    def started(self) -> SessionStop | None:
        """An attempt is about to start."""
        return None

    def observe(self, attempt: Attempt) -> Decision | None:
        """An attempt finished (never an interrupted one)."""
        return None

    def lift(self, run_id: str) -> None:
        """``--unstop``: the run's stop is lifted; counts kept for that run start over."""

    def describe(self) -> str:
        """The rule and its setting, for the session header."""
        raise NotImplementedError


class BatchSize(Rule):
    """``--batch-size N``: the N-th attempt started is the last one."""

    label = "batch"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.batch_size
        self.count = 0

    def started(self) -> SessionStop | None:
        self.count += 1
        if self.count >= self.limit:
            return SessionStop(StopReason.BATCH_SIZE_REACHED,
                               f"batch size {self.limit} reached")
        return None

    def describe(self) -> str:
        return f"{self.label} {self.limit}"


class TimeLimit(Rule):
    """``--max-total-minutes M``: a deadline on the picking scope (the in-flight attempts get
    ``--stop-grace-seconds`` more); the scheduler records ``time_limit_reached``."""

    label = "time limit"

    def __init__(self, config: DrainConfig) -> None:
        self.deadline = config.session_timeout

    def describe(self) -> str:
        minutes = None if self.deadline is None else self.deadline / 60
        return f"{self.label} {_limit(minutes, ' min')}"


class PhaseTimeout(Rule):
    """``--phase-timeout-seconds``: enforced by the supervisor; listed for the header."""

    label = "phase timeout"

    def __init__(self, config: DrainConfig) -> None:
        self.text = config.phase_timeout_label

    def describe(self) -> str:
        return f"{self.label} {self.text}"


class TimeoutsPerRun(Rule):
    """``--max-timeouts-per-run N``: a run with N timeouts gets no more attempts."""

    label = "timeouts/run"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.max_timeouts_per_run
        self.counts: Counter[str] = Counter()

    def observe(self, attempt: Attempt) -> Decision | None:
        if not attempt.timed_out:
            return None
        self.counts[attempt.run_id] += 1
        n = self.counts[attempt.run_id]
        if self.limit is not None and n >= self.limit:
            return RunStop(attempt.run_id, RunStopReason.TIMEOUTS, f"{n} timeouts")
        return None

    def lift(self, run_id: str) -> None:
        self.counts.pop(run_id, None)

    def describe(self) -> str:
        return f"{self.label} {_limit(self.limit)}"


class AttemptsPerPhase(Rule):
    """``--max-attempts-per-phase N``: enforced by the selector (a phase just leaves the
    candidates); listed for the header."""

    label = "attempts/phase"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.max_attempts_per_phase

    def describe(self) -> str:
        return f"{self.label} {self.limit}"


class FingerprintRepeats(Rule):
    """``--max-fingerprint-repeats N``: the run whose failure brings a fingerprint's session
    count to N gets no more attempts, and so does any run that hits it later. The counts
    also feed triage and the snapshot's ``fingerprint_counts``."""

    label = "fingerprint repeats"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.max_fingerprint_repeats
        self.counts: Counter[str] = Counter()
        self.stopped: set[str] = set()

    def observe(self, attempt: Attempt) -> Decision | None:
        fp = attempt.failure_fingerprint
        if fp is None or attempt.success or attempt.cancelled:
            return None
        self.counts[fp] += 1
        n = self.counts[fp]
        if self.limit is not None and n >= self.limit:
            self.stopped.add(fp)
            return RunStop(attempt.run_id, RunStopReason.FINGERPRINT_REPEATS,
                           f"fingerprint seen {n}x: {fp}")
        return None

    def seen_before(self, fingerprint: str | None) -> bool:
        """True when ``fingerprint`` was counted before the attempt just observed."""
        return fingerprint is not None and self.counts[fingerprint] > 1

    def describe(self) -> str:
        return f"{self.label} {_limit(self.limit)}"


class ConsecutiveZeroYield(Rule):
    """``--max-consecutive-zero-yield N``: N attempts in a row with zero telemetry stop the
    session; attempts whose telemetry is unknown (or that were cancelled) do not count."""

    label = "zero-yield streak"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.max_consecutive_zero_yield
        self.streak = 0

    def observe(self, attempt: Attempt) -> Decision | None:
        if attempt.telemetry_events_collected is None or attempt.cancelled:
            return None
        if attempt.telemetry_events_collected > 0:
            self.streak = 0
            return None
        self.streak += 1
        if self.limit is not None and self.streak >= self.limit:
            return SessionStop(StopReason.CONSECUTIVE_ZERO_YIELD,
                               f"{self.limit} attempts in a row without telemetry "
                               f"(--max-consecutive-zero-yield {self.limit})")
        return None

    def describe(self) -> str:
        return f"{self.label} {_limit(self.limit)}"


class HaltOnFailures(Rule):
    """``--halt-on-failures N`` or ``N%`` (GNU parallel's ``--halt soon,fail=N``): stop
    picking after N failed attempts, or once the failed share of the finished attempts
    passes N% with at least ``FAILURE_SHARE_MIN_ATTEMPTS`` of them. Cancelled attempts
    (the session was stopping anyway) do not count."""

    label = "halt on failures"

    def __init__(self, config: DrainConfig) -> None:
        given = config.halt_on_failures
        self.limit = None if given is None else FailureLimit.parse(given)
        self.finished = 0
        self.failed = 0

    def observe(self, attempt: Attempt) -> Decision | None:
        if attempt.cancelled:
            return None
        self.finished += 1
        self.failed += attempt.failed
        limit = self.limit
        if limit is None or not attempt.failed:
            return None
        if limit.count is not None and self.failed >= limit.count:
            return SessionStop(StopReason.FAILURE_LIMIT,
                               f"{self.failed} failed attempts (--halt-on-failures {limit})")
        if limit.percent is not None and self.finished >= FAILURE_SHARE_MIN_ATTEMPTS \
                and 100 * self.failed > limit.percent * self.finished:
            return SessionStop(StopReason.FAILURE_LIMIT,
                               f"{self.failed} of {self.finished} attempts failed, more than "
                               f"{limit} (--halt-on-failures {limit})")
        return None

    def describe(self) -> str:
        return f"{self.label} {_limit(None) if self.limit is None else self.limit}"


class MaxLeaks(Rule):
    """``--max-leaks N``: the session stops once more than N processes have leaked (marked
    leaks of attempts and ``--leak-pattern`` finds, counted by the leak gauge)."""

    label = "leaks"

    def __init__(self, config: DrainConfig) -> None:
        self.limit = config.max_leaks
        self._count: Callable[[], int] = lambda: 0

    @classmethod
    def create(cls, config: DrainConfig, sensors: Sensors) -> Rule:
        rule = cls(config)
        rule._count = sensors.leak_count
        return rule

    def observe(self, attempt: Attempt) -> Decision | None:
        leaks = self._count()
        if self.limit is not None and leaks > self.limit:
            return SessionStop(StopReason.MAX_LEAKS,
                               f"{leaks} leaked processes exceed --max-leaks {self.limit}")
        return None

    def describe(self) -> str:
        return f"{self.label} {_limit(self.limit)}"


#: Every rule, in the order the header lists them and decisions are taken.
RULES: tuple[type[Rule], ...] = (
    BatchSize, PhaseTimeout, TimeLimit, TimeoutsPerRun, AttemptsPerPhase, FingerprintRepeats,
    ConsecutiveZeroYield, HaltOnFailures, MaxLeaks,
)


class Policy:
    """The session's stop rules, fed together; keeps which runs stopped and why."""

    def __init__(self, config: DrainConfig, sensors: Sensors | None = None) -> None:
        self.rules = rules = [cls.create(config, sensors or Sensors()) for cls in RULES]
        self.fingerprints = next(r for r in rules if isinstance(r, FingerprintRepeats))
        self._batch = next(r for r in rules if isinstance(r, BatchSize))
        self.stopped_runs: dict[str, str] = {}

    @property
    def zero_yield_streak(self) -> int:
        """Attempts in a row with no telemetry, as the zero-yield rule counts them."""
        return next(r.streak for r in self.rules if isinstance(r, ConsecutiveZeroYield))

    @property
    def started_count(self) -> int:
        """Attempts started this session (resumed parts included)."""
        return self._batch.count

    @property
    def deadline(self) -> float | None:
        """Seconds after the start at which picking stops (the earliest rule deadline)."""
        found = [r.deadline for r in self.rules if r.deadline is not None]
        return min(found) if found else None

    def started(self) -> SessionStop | None:
        """An attempt starts: the first session stop any rule answers."""
        stops = [s for s in (r.started() for r in self.rules) if s is not None]
        return stops[0] if stops else None

    def observe(self, attempt: Attempt) -> tuple[list[RunStop], SessionStop | None]:
        """Feed one finished attempt to every rule: the runs it stopped (one reason per run,
        the first that fired) and the first session stop."""
        if attempt.interrupted:
            return [], None
        run_stops: list[RunStop] = []
        session_stop: SessionStop | None = None
        for rule in self.rules:
            decision = rule.observe(attempt)
            if isinstance(decision, RunStop):
                if decision.run_id not in self.stopped_runs:
                    self.stopped_runs[decision.run_id] = decision.reason
                    run_stops.append(decision)
            elif decision is not None and session_stop is None:
                session_stop = decision
        return run_stops, session_stop

    def lift(self, run_id: str) -> str | None:
        """``--unstop RUN``: the run drains again; the reason of the stop lifted (None: it
        was not stopped). Per-run counts start over; a fingerprint already at its limit stops
        the run again the next time the run fails with it."""
        was = self.stopped_runs.pop(run_id, None)
        if was is not None:
            for rule in self.rules:
                rule.lift(run_id)
        return was

    def describe(self) -> str:
        return ", ".join(rule.describe() for rule in self.rules)
