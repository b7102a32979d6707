"""The leak gauge: processes that outlive their attempt.

Two sources count: processes that still carried an attempt's marker when it ended (the
supervisor kills and lists them in the attempt's ``leaked_processes``), and processes of this
session whose command line matches ``--leak-pattern``, that appeared during the session and
belong to no running attempt (a uvicorn a worker left without the attempt's marker but with
the session's id, or re-parented to drainer). Processes drainer cannot tie to the session
(another user's uvicorn, one started by hand) never count. Memory is per leak.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Collection
from typing import Any

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
        self._session_id = ""

    @property
    def total(self) -> int:
        return len(self._pids)

    async def start(self, session_id: str) -> None:
        """Note what of the session matches the pattern before the first attempt (a resumed
        session's earlier part left it; the resume's reconcile reports its own)."""
        self._session_id = session_id
        found = await self._find(set())
        self._baseline = {p.pid for p, _, _ in found}

    async def _find(self, exclude: set[int]) -> list[tuple[Any, str, str]]:
        return await anyio.to_thread.run_sync(functools.partial(
            proctree.find_matching, self._pattern, exclude, session_id=self._session_id))

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
        exclude = self._baseline | self._pids  # known already, from either source
        found = await self._find(exclude)
        new: list[LeakedProcess] = []
        for proc, marker, attempt in found:
            if marker and marker in running:
                continue  # its attempt is still running
            leaked = dataclasses.replace(proctree.describe(proc), attempt=attempt)
            self.pattern_leaks[proc.pid] = leaked
            self._pids.add(proc.pid)
            new.append(leaked)
        return new
