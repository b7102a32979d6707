"""Adaptive phase timeouts (``--phase-timeout-seconds auto[:FACTOR]``): each attempt's limit
from the durations of attempts that ended on their own, read from the attempt history.

Per failure category of the phase when it is picked (and per run prefix inside a category,
when that has enough samples), the limit is FACTOR times the 95th percentile (nearest rank)
of those durations, clamped to ``--min-phase-timeout-seconds`` and
``--max-phase-timeout-seconds``. Until a category has :data:`MIN_SAMPLES` samples the fixed
default applies. A retry after a timeout gets twice its previous limit, within the cap.
Pure, but for :class:`Timeouts`, which reads the history now and then.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import anyio

from .errors import UsageError

AUTO = "auto"
DEFAULT_FACTOR = 2.0
DEFAULT_LIMIT = 900.0  #: the fixed default, and the limit until samples exist
MIN_SAMPLES = 5  #: durations a category (or a run prefix) needs before its own limit
PERCENTILE = 95
SAMPLES_KEPT = 500  #: the latest durations read per category
REFRESH_INTERVAL = 300.0  #: the history is read again this often (the index's refresh)
_PREFIX = re.compile(r"^(.*?)[-_.]*\d")


@dataclass(frozen=True, slots=True)
class TimeoutSetting:
    """``--phase-timeout-seconds``: S seconds (``seconds``), or ``auto[:FACTOR]``
    (``factor``)."""

    seconds: float | None = None
    factor: float | None = None

    @classmethod
    def parse(cls, value: float | int | str | None) -> TimeoutSetting:
        flag = "--phase-timeout-seconds"
        if value is None:
            return cls()
        if isinstance(value, bool):
            raise UsageError(f"{flag} takes seconds or auto[:FACTOR], got {value!r}")
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            text = value.strip().lower()
            if text == AUTO or text.startswith(AUTO + ":"):
                factor = DEFAULT_FACTOR if text == AUTO else _number(flag, text[5:])
                if not (factor > 0 and math.isfinite(factor)):
                    raise UsageError(f"{flag} auto:FACTOR needs a positive FACTOR, got {text!r}")
                return cls(factor=factor)
            seconds = _number(flag, text)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise UsageError(f"{flag} must be a positive number of seconds or auto[:FACTOR], "
                             f"got {value!r}")
        return cls(seconds=seconds)

    @classmethod
    def check(cls, flag: str, value: float | str) -> None:
        """The option's range check (``Option.check``)."""
        cls.parse(value)

    @property
    def label(self) -> str:
        if self.factor is not None:
            return f"{AUTO}:{self.factor:g}"
        return "none" if self.seconds is None else f"{self.seconds:g}s"


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{flag} takes seconds or auto[:FACTOR], got {text!r}") from None


def run_prefix(run_id: str) -> str:
    """The family of a run: its id up to its first digit, separators trimmed
    (``build129-p01`` -> ``build``, ``research-system-v14`` -> ``research-system-v``); an id
    without a digit is its own."""
    found = _PREFIX.match(run_id)
    return found.group(1) if found and found.group(1) else run_id


def nearest_rank(values: list[float], percentile: float = PERCENTILE) -> float:
    """The nearest-rank percentile of ``values`` (sorted here)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Limit:
    """An attempt's time limit and where it comes from."""

    seconds: float
    source: str  #: "default", "category X (n samples)", "X / prefix P", "retry after a timeout"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table ``plan`` shows."""

    category: str
    prefix: str | None
    samples: int
    p95: float
    seconds: float


class TimeoutTable:
    """The limits learnt from ``samples`` (category, run id, duration in seconds)."""

    def __init__(self, samples: Iterable[tuple[str, str, float]], *, factor: float,
                 low: float, high: float, default: float = DEFAULT_LIMIT) -> None:
        self.factor, self.low, self.high, self.default = factor, low, high, default
        by_category: dict[str, list[float]] = {}
        by_prefix: dict[tuple[str, str], list[float]] = {}
        for category, run_id, duration in samples:
            by_category.setdefault(category, []).append(duration)
            by_prefix.setdefault((category, run_prefix(run_id)), []).append(duration)
        self.rows: list[Row] = []
        self._limits: dict[tuple[str, str | None], float] = {}
        for category, found in sorted(by_category.items()):
            self._learn(category, None, found)
        for (category, prefix), found in sorted(by_prefix.items()):
            if len(found) < len(by_category[category]):  # (else the category's own)
                self._learn(category, prefix, found)

    def _learn(self, category: str, prefix: str | None, durations: list[float]) -> None:
        if len(durations) < MIN_SAMPLES:
            return
        p95 = nearest_rank(durations)
        seconds = min(self.high, max(self.low, self.factor * p95))
        self._limits[(category, prefix)] = seconds
        self.rows.append(Row(category, prefix, len(durations), p95, seconds))

    def limit(self, category: str, run_id: str) -> Limit:
        prefix = run_prefix(run_id)
        found = self._limits.get((category, prefix))
        if found is not None:
            return Limit(found, f"{category} / {prefix}")
        found = self._limits.get((category, None))
        if found is not None:
            return Limit(found, category)
        return Limit(min(self.high, max(self.low, self.default)), "default")


#: reads (category, run id, duration) samples of the history
ReadSamples = Callable[[], Awaitable[list[tuple[str, str, float]]]]


class Timeouts:
    """A session's limits: fixed, or learnt from the history (read at first use and every
    :data:`REFRESH_INTERVAL` seconds); a retry after a timeout gets twice the limit it had."""

    def __init__(self, setting: TimeoutSetting, *, low: float, high: float,
                 read: ReadSamples | None = None) -> None:
        self.setting = setting
        self._low, self._high = low, high
        self._read = read if setting.factor is not None else None
        self._table: TimeoutTable | None = None
        self._read_at = -math.inf
        #: phases whose last attempt timed out -> the limit it had
        self._timed_out: dict[tuple[str, str], float] = {}

    @property
    def adaptive(self) -> bool:
        return self.setting.factor is not None

    async def table(self) -> TimeoutTable | None:
        """The learnt table (read again when due); None with a fixed limit."""
        if self._read is None or self.setting.factor is None:
            return None
        now = anyio.current_time()
        if self._table is None or now - self._read_at >= REFRESH_INTERVAL:
            self._read_at = now
            self._table = TimeoutTable(await self._read(), factor=self.setting.factor,
                                       low=self._low, high=self._high)
        return self._table

    async def limit(self, category: str, run_id: str, phase_id: str) -> Limit | None:
        """The limit of an attempt of ``run_id`` / ``phase_id`` (whose reason is of
        ``category``); None: no limit."""
        table = await self.table()
        if table is None:
            seconds = self.setting.seconds
            return None if seconds is None else Limit(seconds, "fixed")
        found = table.limit(category, run_id)
        before = self._timed_out.get((run_id, phase_id))
        if before is not None and 2 * before > found.seconds:
            return Limit(min(self._high, 2 * before), "retry after a timeout: twice its limit")
        return found

    def observe(self, run_id: str, phase_id: str, *, timed_out: bool,
                seconds: float | None) -> None:
        """An attempt ended: remember the limit a timed-out one had (for its retry)."""
        key = (run_id, phase_id)
        if timed_out and seconds is not None:
            self._timed_out[key] = seconds
        else:
            self._timed_out.pop(key, None)
