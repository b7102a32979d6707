"""Crash points for the crash-safety tests: ``DRAINER_CRASH_AT=<point>:<n>`` SIGKILLs drainer
itself the n-th time it reaches ``<point>``. Unset (always, outside tests) it costs one dict
lookup. Points: ``before_spawn``, ``worker_running``, ``after_exit``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SPEC = os.environ.get("DRAINER_CRASH_AT", "")
_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    if not _SPEC:
        return
    point, _, nth = _SPEC.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] == int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
