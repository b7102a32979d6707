"""The leak gauge: processes that outlive their attempt.

Two sources count: processes that still carried an attempt's marker when it ended (the
supervisor kills and lists them in the attempt's ``leaked_processes``), and processes whose
command line matches ``--leak-pattern`` that appeared during the session and belong to no
running attempt (a uvicorn a worker started without drainer's marker). Memory is per leak.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection

import anyio

from . import proctree
from .models import Attempt, LeakedProcess

LEAK_GAUGE_INTERVAL = 2.0  #: scanning every process's command line is not free


class LeakGauge:
    """Counts leaked processes for the summary, the snapshot and ``--max-leaks``."""

    def __init__(self, pattern: str, *, exact: bool = False) -> None:
        self._pattern = re.compile(pattern)
        self._exact = exact  #: sample after every attempt (``--max-leaks`` must be exact)
        self._baseline: set[int] = set()
        self._pids: set[int] = set()  #: every leaked pid, from both sources
        self.pattern_leaks: dict[int, LeakedProcess] = {}
        self._last_sample = 0.0

    @property
    def total(self) -> int:
        return len(self._pids)

    async def start(self) -> None:
        """Note what matches the pattern before the first attempt: not this session's."""
        found = await anyio.to_thread.run_sync(proctree.find_matching, self._pattern, set())
        self._baseline = {p.pid for p, _ in found}

    def add_attempt(self, attempt: Attempt) -> None:
        self._pids.update(p.pid for p in attempt.leaked_processes)

    async def sample(
        self, running: Collection[str], *, force: bool = False
    ) -> list[LeakedProcess]:
        """Look for new pattern leaks (when due, or ``force``); returns the new finds.
        ``running``: attempt ids in flight, whose processes are not leaks yet."""
        if not (force or self._exact
                or time.monotonic() - self._last_sample >= LEAK_GAUGE_INTERVAL):
            return []
        self._last_sample = time.monotonic()
        exclude = self._baseline | set(self.pattern_leaks)
        found = await anyio.to_thread.run_sync(proctree.find_matching, self._pattern, exclude)
        new: list[LeakedProcess] = []
        for proc, marker in found:
            if marker and marker in running:
                continue  # its attempt is still running
            leaked = proctree.describe(proc)
            self.pattern_leaks[proc.pid] = leaked
            self._pids.add(proc.pid)
            new.append(leaked)
        return new
