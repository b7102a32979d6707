"""Stop conditions as a small state machine fed with attempt results.

``observe`` takes each finished attempt and answers with the decisions it triggers: a run
stopped for the rest of the session, or the whole session stopping. Interrupted attempts
(drainer crashed while they ran) feed nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import DrainConfig
from .models import Attempt
from .selection import TIER_DEPRIORITISED, TIER_PROMISING

# Session stop reasons (DESIGN.md §5).
BATCH_SIZE_REACHED = "batch_size_reached"
TIME_LIMIT_REACHED = "time_limit_reached"
CONSECUTIVE_ZERO_YIELD = "consecutive_zero_yield"
NO_CANDIDATES = "no_candidates"
MAX_LEAKS = "max_leaks"
SIGNAL = "signal"
CANCELLED = "cancelled"
ERROR = "error"  #: drainer itself could not go on (e.g. the database went away): resumable

# Run stop reasons.
RUN_FINGERPRINT_REPEATS = "max_fingerprint_repeats"
RUN_TIMEOUTS = "max_timeouts_per_run"


@dataclass(frozen=True, slots=True)
class RunStop:
    run_id: str
    reason: str
    detail: str


@dataclass
class Policy:
    """Counters of one session and the decisions drawn from them."""

    config: DrainConfig
    processed: int = 0
    fingerprint_counts: Counter[str] = field(default_factory=Counter)
    stopped_fingerprints: set[str] = field(default_factory=set)
    stopped_runs: dict[str, str] = field(default_factory=dict)
    timeouts_per_run: Counter[str] = field(default_factory=Counter)
    attempts_per_phase: Counter[tuple[str, str]] = field(default_factory=Counter)
    last_state: dict[tuple[str, str], str | None] = field(default_factory=dict)
    _retryable: set[tuple[str, str]] = field(default_factory=set)
    run_tiers: dict[str, int] = field(default_factory=dict)  #: triage tier per sampled run
    zero_yield_streak: int = 0
    stop_reason: str | None = None

    def run_allowed(self, run_id: str) -> bool:
        return run_id not in self.stopped_runs

    def attempts_of(self, key: tuple[str, str]) -> int:
        return self.attempts_per_phase[key]

    def retry_keys(self) -> list[tuple[str, str]]:
        """Phases tried this session that are FAILED and under the attempt cap."""
        return [k for k in self._retryable if self.retry_allowed(k)]

    def triage_tier(self, attempt: Attempt) -> int:
        """The tier a run's first attempt (its sample) earns it: sample-first triage.

        Deprioritised when the sample failed with a fingerprint already seen this session
        and produced no telemetry; success, telemetry or a timeout keep the run promising.
        """
        if attempt.success or attempt.timed_out or (attempt.telemetry_events_collected or 0) > 0:
            return TIER_PROMISING
        fp = attempt.failure_fingerprint
        if fp is not None and self.fingerprint_counts[fp] > 1:
            return TIER_DEPRIORITISED
        return TIER_PROMISING

    def retry_allowed(self, key: tuple[str, str]) -> bool:
        """A tried phase may be tried again while it is FAILED and under the cap."""
        return (
            self.last_state.get(key) == "FAILED"
            and 0 < self.attempts_per_phase[key] < self.config.max_attempts_per_phase
        )

    @property
    def batch_done(self) -> bool:
        return self.processed >= self.config.batch_size

    def count_start(self) -> None:
        """An attempt is about to start: it counts toward --batch-size from now on."""
        self.processed += 1

    def observe(self, attempt: Attempt) -> list[RunStop]:
        """Feed one finished attempt; return the runs it stopped (and maybe stop the session)."""
        if attempt.interrupted:
            return []
        cfg = self.config
        key = (attempt.run_id, attempt.phase_id)
        self.attempts_per_phase[key] += 1
        self.last_state[key] = attempt.final_state
        if attempt.final_state == "FAILED":
            self._retryable.add(key)
        else:
            self._retryable.discard(key)
        stops: list[RunStop] = []
        if attempt.timed_out:
            self.timeouts_per_run[attempt.run_id] += 1
            n = self.timeouts_per_run[attempt.run_id]
            if cfg.max_timeouts_per_run is not None and n >= cfg.max_timeouts_per_run:
                stops.append(RunStop(attempt.run_id, RUN_TIMEOUTS, f"{n} timeouts"))
        fp = attempt.failure_fingerprint
        if fp is not None and not attempt.success and not attempt.cancelled:
            self.fingerprint_counts[fp] += 1
            n = self.fingerprint_counts[fp]
            limit = cfg.max_fingerprint_repeats
            if limit is not None and n >= limit:
                self.stopped_fingerprints.add(fp)
                stops.append(
                    RunStop(attempt.run_id, RUN_FINGERPRINT_REPEATS, f"fingerprint seen {n}x: {fp}")
                )
        if attempt.telemetry_events_collected is not None and not attempt.cancelled:
            if attempt.telemetry_events_collected > 0:
                self.zero_yield_streak = 0
            else:
                self.zero_yield_streak += 1
                limit = cfg.max_consecutive_zero_yield
                if limit is not None and self.zero_yield_streak >= limit:
                    self.stop(CONSECUTIVE_ZERO_YIELD)
        fresh = [s for s in stops if s.run_id not in self.stopped_runs][:1]
        for stop in fresh:  # one reason per run: the first that fired, here and in the journal
            self.stopped_runs[stop.run_id] = stop.reason
        return fresh

    def stop(self, reason: str) -> None:
        """Stop the session (first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
