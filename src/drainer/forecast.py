"""``drainer forecast``: what draining the FAILED phases left would bring, learnt from the
attempt history, with 95% intervals, and a back-test of the same forecast against every past
session (README "Forecast").

The model, stated once: attempts are independent draws per category of the picked phase's
reason (success with rate p, a duration and a telemetry count from that category's
history). A category with fewer than :data:`MIN_SAMPLES` attempts uses every category's
attempts pooled. A phase is tried until it succeeds, at most ``--max-attempts-per-phase``
times. Rates get Wilson score intervals; means get normal intervals (z = 1.96). Lanes are
assumed busy (wall time = attempts x duration / lanes, at most one lane per run left).
Pure functions over :class:`~drainer.backlog.history.Tally` rows; :func:`make_forecast`
reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backlog import open_backlog
from .backlog.history import Tally
from .config import DrainConfig
from .history_report import iso_time
from .selection import CATEGORY_NAMES, failure_category

Z = 1.96  #: 95% intervals
MIN_SAMPLES = 5  #: a category's own figures need this many attempts; else all are pooled
POOLED = "all categories"
UNRECORDED = "(unrecorded)"  #: rows written before drainer kept the picked category


@dataclass(frozen=True, slots=True)
class Interval:
    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def holds(self, x: float) -> bool:
        return self.low - 1e-9 <= x <= self.high + 1e-9

    def scaled(self, k: float) -> Interval:
        return Interval(self.value * k, self.low * k, self.high * k)

    def ordered(self) -> Interval:
        """The value inside its bounds (figures worked out at each end can cross by a
        rounding)."""
        return Interval(self.value, min(self.low, self.value), max(self.high, self.value))

    def capped(self, other: Interval) -> Interval:
        """Each end at most ``other``'s: a part never exceeds the whole."""
        return Interval(min(self.value, other.value), min(self.low, other.low),
                        min(self.high, other.high))


@dataclass(slots=True)
class Sums:
    """Attempts added up: count, successes, durations and telemetry (sums and squares)."""

    attempts: int = 0
    ok: int = 0
    seconds: float = 0.0
    seconds_sq: float = 0.0
    telemetry_known: int = 0
    telemetry: float = 0.0
    telemetry_sq: float = 0.0

    def add(self, t: Tally | Sums) -> None:
        self.attempts += t.attempts
        self.ok += t.ok
        self.seconds += t.seconds
        self.seconds_sq += t.seconds_sq
        self.telemetry_known += t.telemetry_known
        self.telemetry += t.telemetry
        self.telemetry_sq += t.telemetry_sq

    @property
    def rate(self) -> float:
        return self.ok / self.attempts if self.attempts else 0.0

    @property
    def smoothed(self) -> float:
        """The rate with one success and one failure added: a variance never zero."""
        return (self.ok + 1) / (self.attempts + 2)

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.attempts if self.attempts else 0.0

    @property
    def var_seconds(self) -> float:
        return _variance(self.attempts, self.seconds, self.seconds_sq)

    @property
    def mean_telemetry(self) -> float | None:
        return self.telemetry / self.telemetry_known if self.telemetry_known else None

    @property
    def var_telemetry(self) -> float:
        return _variance(self.telemetry_known, self.telemetry, self.telemetry_sq)


def _variance(n: int, total: float, squares: float) -> float:
    if n < 2:
        return 0.0
    return max(0.0, (squares - total * total / n) / (n - 1))


def wilson(ok: int, n: int) -> Interval:
    """The Wilson score interval of a rate of ``ok`` in ``n``."""
    if n == 0:
        return Interval(0.0, 0.0, 1.0)
    p = ok / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    # (At 0 or n successes a bound is exactly 0 or 1; rounding must not move it past p.)
    low = 0.0 if ok == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if ok == n else max(p, min(1.0, centre + half))
    return Interval(p, low, high)


def mean_interval(mean: float, variance: float, n: int) -> Interval:
    half = Z * math.sqrt(variance / n) if n else 0.0
    return Interval(mean, max(0.0, mean - half), mean + half)


def tries(p: float, limit: int) -> tuple[float, float]:
    """(expected attempts, chance of success) of a phase tried until it succeeds, at most
    ``limit`` times, each attempt succeeding with ``p``."""
    if p <= 1e-12:  # (the limit as p goes to 0; below it the quotient loses every digit)
        return float(limit), limit * max(p, 0.0)
    if p >= 1.0 or limit == 1:
        return 1.0, min(p, 1.0)
    drained = -math.expm1(limit * math.log1p(-p))  # 1 - (1 - p)^limit, without cancellation
    return drained / p, drained


@dataclass(frozen=True)
class CategoryForecast:
    category: str
    phases: int  #: FAILED phases left in this category
    basis: str  #: the category itself, or POOLED
    samples: int  #: attempts the figures come from
    success: Interval  #: per attempt
    seconds: Interval  #: mean duration per attempt
    telemetry: Interval | None  #: mean telemetry events per attempt
    attempts: Interval  #: expected attempts to drain the category's phases
    drained: Interval  #: expected phases drained (COMPLETE)

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "phases": self.phases, "basis": self.basis,
                "samples": self.samples, "success_rate": self.success.to_json(),
                "duration_seconds": self.seconds.to_json(),
                "telemetry_per_attempt": None if self.telemetry is None
                else self.telemetry.to_json(),
                "attempts": self.attempts.to_json(), "phases_drained": self.drained.to_json()}


@dataclass(frozen=True)
class SessionCheck:
    """The forecast made at a past session's start (from the sessions that had ended by
    then) against what the session did, for its own mix of categories."""

    session_id: str
    started: float
    attempts: int
    success: Interval  #: predicted success share of its attempts
    actual_success: float
    seconds: Interval  #: predicted mean duration
    actual_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "started": iso_time(self.started),
                "attempts": self.attempts, "predicted_success_rate": self.success.to_json(),
                "actual_success_rate": self.actual_success,
                "success_within": self.success.holds(self.actual_success),
                "predicted_duration_seconds": self.seconds.to_json(),
                "actual_duration_seconds": self.actual_seconds,
                "duration_within": self.seconds.holds(self.actual_seconds)}


@dataclass(frozen=True)
class Forecast:
    source: str
    lanes: int  #: the lanes that can be busy (at most one per run left)
    runs: int  #: runs with phases left
    max_attempts: int
    batch_size: int
    history_attempts: int
    left: dict[str, int] = field(default_factory=dict)  #: FAILED phases left per category
    categories: list[CategoryForecast] = field(default_factory=list)
    backtest: list[SessionCheck] = field(default_factory=list)

    @property
    def phases(self) -> int:
        return sum(self.left.values())

    def total(self, name: str) -> Interval:
        found = [getattr(c, name) for c in self.categories]
        return Interval(sum(i.value for i in found), sum(i.low for i in found),
                        sum(i.high for i in found))

    @property
    def wall_seconds(self) -> Interval:
        """Draining every phase left: the most attempts at the slowest durations, and so on."""
        lanes = max(1, self.lanes)
        value = sum(c.attempts.value * c.seconds.value for c in self.categories) / lanes
        low = sum(c.attempts.low * c.seconds.low for c in self.categories) / lanes
        high = sum(c.attempts.high * c.seconds.high for c in self.categories) / lanes
        return Interval(value, low, high)

    @property
    def telemetry(self) -> Interval | None:
        known = [c for c in self.categories if c.telemetry is not None]
        if not known:
            return None
        return Interval(*(sum(getattr(c.attempts, k) * getattr(c.telemetry, k) for c in known)
                          for k in ("value", "low", "high")))

    @property
    def batch_attempts(self) -> float:
        """The attempts one session of ``--batch-size`` makes (fewer when less is left)."""
        return min(float(self.batch_size), self.total("attempts").value)

    def _batch(self, per_attempt: str) -> Interval:
        """Over one session's attempts, spread over the categories as the expected attempts
        are: the sum of a per-attempt figure (its interval from that figure's alone)."""
        total = self.total("attempts").value
        if not total:
            return Interval(0.0, 0.0, 0.0)
        k = self.batch_attempts / total
        return Interval(*(k * sum(c.attempts.value * getattr(getattr(c, per_attempt), end)
                                  for c in self.categories)
                          for end in ("value", "low", "high")))

    @property
    def _batch_is_all(self) -> bool:
        """One session drains the whole backlog even at its most attempts."""
        return self.batch_size >= self.total("attempts").high

    @property
    def batch_wall_seconds(self) -> Interval:
        if self._batch_is_all:
            return self.wall_seconds
        return self._batch("seconds").scaled(1 / max(1, self.lanes))

    @property
    def batch_drained(self) -> Interval:
        """Phases one session drains: its attempts times the success rate per attempt, never
        more than the whole backlog gives."""
        whole = self.total("drained")
        return whole if self._batch_is_all else self._batch("success").capped(whole)

    def to_json(self) -> dict[str, Any]:
        telemetry = self.telemetry
        within = sum(c.success.holds(c.actual_success) for c in self.backtest)
        return {
            "source": self.source, "phases_left": self.phases, "runs_left": self.runs,
            "lanes": self.lanes, "max_attempts_per_phase": self.max_attempts,
            "batch_size": self.batch_size, "history_attempts": self.history_attempts,
            "categories": [c.to_json() for c in self.categories],
            "attempts": self.total("attempts").to_json(),
            "phases_drained": self.total("drained").to_json(),
            "telemetry_events": None if telemetry is None else telemetry.to_json(),
            "wall_seconds": self.wall_seconds.to_json(),
            "batch": {"attempts": self.batch_attempts,
                      "wall_seconds": self.batch_wall_seconds.to_json(),
                      "phases_drained": self.batch_drained.to_json()},
            "backtest": [c.to_json() for c in self.backtest],
            "backtest_within": within,
            "model": {"interval": 0.95, "min_samples": MIN_SAMPLES},
        }


def _by_category(tallies: Iterable[Tally]) -> dict[str, Sums]:
    found: dict[str, Sums] = {}
    for t in tallies:
        found.setdefault(t.category or UNRECORDED, Sums()).add(t)
    return found


def _basis(category: str, known: dict[str, Sums], pooled: Sums) -> tuple[str, Sums]:
    own = known.get(category)
    if own is not None and own.attempts >= MIN_SAMPLES:
        return category, own
    return POOLED, pooled


def forecast_categories(left: dict[str, int], tallies: Sequence[Tally],
                        max_attempts: int) -> list[CategoryForecast]:
    """Per category of the phases left: figures from the history (nothing learnt: no rows)."""
    known = _by_category(tallies)
    pooled = Sums()
    for sums in known.values():
        pooled.add(sums)
    if pooled.attempts == 0:
        return []
    out = []
    for category, phases in sorted(left.items(), key=lambda kv: -kv[1]):
        basis, sums = _basis(category, known, pooled)
        rate = wilson(sums.ok, sums.attempts)
        seconds = mean_interval(sums.mean_seconds, sums.var_seconds, sums.attempts)
        mean_tel = sums.mean_telemetry
        telemetry = None if mean_tel is None else mean_interval(
            mean_tel, sums.var_telemetry, sums.telemetry_known)
        attempts = [tries(p, max_attempts) for p in (rate.value, rate.high, rate.low)]
        out.append(CategoryForecast(
            category, phases, basis, sums.attempts, rate, seconds, telemetry,
            Interval(*(phases * a for a, _ in attempts)).ordered(),
            Interval(phases * attempts[0][1], phases * attempts[2][1],
                     phases * attempts[1][1]).ordered()))
    return out


def backtest(tallies: Sequence[Tally]) -> list[SessionCheck]:
    """Each session with an ended session before it: the forecast from those (for its own
    mix of categories) against what it did."""
    sessions: dict[str, list[Tally]] = {}
    for t in tallies:
        sessions.setdefault(t.session_id, []).append(t)
    spans = {s: (min(t.first_start for t in ts), max(t.last_end for t in ts))
             for s, ts in sessions.items()}
    checks = []
    for sid in sorted(sessions, key=lambda s: (spans[s][0], s)):
        start = spans[sid][0]
        before = [t for s, ts in sessions.items() if s != sid and spans[s][1] <= start
                  for t in ts]
        if not before:
            continue
        known = _by_category(before)
        pooled = Sums()
        for sums in known.values():
            pooled.add(sums)
        mine = _by_category(sessions[sid])
        n = sum(s.attempts for s in mine.values())
        rate = var_rate = seconds = var_seconds = 0.0
        for category, own in mine.items():
            w = own.attempts / n
            _, prior = _basis(category, known, pooled)
            q = prior.smoothed
            rate += w * prior.rate
            var_rate += w * w * q * (1 - q) * (1 / own.attempts + 1 / prior.attempts)
            seconds += w * prior.mean_seconds
            var_seconds += w * w * prior.var_seconds * (1 / own.attempts + 1 / prior.attempts)
        half_rate, half_seconds = Z * math.sqrt(var_rate), Z * math.sqrt(var_seconds)
        total = Sums()
        for sums in mine.values():
            total.add(sums)
        checks.append(SessionCheck(
            sid, start, n, Interval(rate, max(0.0, rate - half_rate), min(1.0, rate + half_rate)),
            total.rate, Interval(seconds, max(0.0, seconds - half_seconds),
                                 seconds + half_seconds), total.mean_seconds))
    return checks


async def make_forecast(config: DrainConfig) -> Forecast:
    async with open_backlog(config.db, config.telemetry_tables, config.schema) as backlog:
        found = await backlog.phases.load_candidates(run_id=config.run_id)
        tallies = await backlog.history.tallies()
    left: dict[str, int] = {}
    runs = 0
    for run_id, (start, end) in found.runs.items():
        if not config.drains_run(run_id):
            continue
        counted = 0
        for i in range(start, end):
            if found.queued[i] and config.skip_runs_with_queued:
                continue
            name = CATEGORY_NAMES[failure_category(found.reasons[i])]
            left[name] = left.get(name, 0) + 1
            counted += 1
        runs += counted > 0
    return Forecast(
        source=config.db.redacted, lanes=min(config.lanes, runs), runs=runs,
        max_attempts=config.max_attempts_per_phase, batch_size=config.batch_size,
        history_attempts=sum(t.attempts for t in tallies), left=left,
        categories=forecast_categories(left, tallies, config.max_attempts_per_phase),
        backtest=backtest(tallies))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def forecast_text(report: dict[str, Any]) -> list[str]:
    """The forecast (:meth:`Forecast.to_json`) as text."""
    def iv(d: dict[str, float], fmt: Any) -> str:
        return f"{fmt(d['value'])} ({fmt(d['low'])}-{fmt(d['high'])})"

    def pct(v: float) -> str:
        return f"{v:.0%}"

    lines = [f"Forecast for {report['source']}: {report['phases_left']} FAILED phase(s) left "
             f"in {report['runs_left']} run(s), from {report['history_attempts']} attempt(s) "
             "in the history (95% intervals)"]
    if not report["categories"]:
        lines.append("  nothing to forecast from: the history has no attempts yet (drain a "
                     "session first)" if report["phases_left"] else "  nothing left to drain")
    else:
        lines.append(f"  {'category':<22} {'phases':>6}  {'success/attempt':<17} "
                     f"{'duration':<19} {'telemetry/attempt':<19} basis")
        for c in report["categories"]:
            tel = c["telemetry_per_attempt"]
            lines.append(
                f"  {c['category']:<22} {c['phases']:>6}  "
                f"{iv(c['success_rate'], pct):<17} "
                f"{iv(c['duration_seconds'], lambda v: f'{v:.1f}s'):<19} "
                f"{iv(tel, lambda v: f'{v:.1f}') if tel else 'unknown':<19} "
                f"{c['basis']} ({c['samples']} attempts)")
        limit = report["max_attempts_per_phase"]
        lines.append(
            f"  Draining them all (each phase tried until it succeeds, at most {limit} "
            f"time(s)): {iv(report['attempts'], lambda v: f'{v:.0f}')} attempts, "
            f"{iv(report['phases_drained'], lambda v: f'{v:.0f}')} phases drained")
        tel = report["telemetry_events"]
        if tel is not None:
            lines.append(f"  telemetry: {iv(tel, lambda v: f'{v:.0f}')} events")
        lines.append(f"  wall time at {report['lanes']} busy lane(s): "
                     f"{iv(report['wall_seconds'], _duration)}")
        batch = report["batch"]
        if batch["attempts"] < report["attempts"]["value"]:
            lines.append(f"  one session of --batch-size {report['batch_size']} "
                         f"({batch['attempts']:.0f} attempts): "
                         f"{iv(batch['wall_seconds'], _duration)}, "
                         f"{iv(batch['phases_drained'], lambda v: f'{v:.0f}')} phases drained")
    checks = report["backtest"]
    lines.append(f"Back-test: the forecast at the start of each session, from the sessions "
                 f"ended before it, against what it did ({len(checks)} session(s))")
    if not checks:
        lines.append("  (none yet: it needs two sessions, one ended before the other began)")
    for c in checks:
        mark = "within" if c["success_within"] else "OUTSIDE"
        lines.append(
            f"  {c['session_id']}  {c['attempts']:>5} attempts  success "
            f"{c['actual_success_rate']:.0%} vs {iv(c['predicted_success_rate'], pct)} "
            f"{mark}; duration {c['actual_duration_seconds']:.1f}s vs "
            f"{iv(c['predicted_duration_seconds'], lambda v: f'{v:.1f}s')} "
            f"{'within' if c['duration_within'] else 'OUTSIDE'}")
    if checks:
        lines.append(f"  {report['backtest_within']} of {len(checks)} within the success "
                     "interval (95%: about 1 in 20 may fall outside by chance)")
    return lines
