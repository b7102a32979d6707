"""The live view on a terminal: progress lines scroll, a footer shows the session at a glance.

The footer is redrawn in place with ANSI escapes (no dependency): one summary line (done of
total, ok/fail/timeout, telemetry, ETA from completed durations) and one row per lane (run,
phase, elapsed). :func:`render` is pure, so it is tested without a terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import TextIO

from .events import AttemptFinished, AttemptStarted, DrainEvent, SessionStopped
from .models import Totals

REFRESH_INTERVAL = 0.5
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def point_at_devnull(stream: TextIO) -> None:
    """After ``stream``'s reader went away (a closed pipe, a terminal that hung up), send
    what is left to /dev/null, so the interpreter's last flush at exit does not fail too."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


@dataclass
class LaneState:
    run_id: str
    phase_id: str
    started: float


@dataclass
class LiveState:
    total: int
    lanes: int
    totals: Totals = field(default_factory=Totals)
    active: dict[int, LaneState] = field(default_factory=dict)
    stopped: str | None = None

    def apply(self, event: DrainEvent, now: float) -> None:
        if isinstance(event, AttemptStarted):
            self.active[event.lane] = LaneState(event.run_id, event.phase_id, now)
        elif isinstance(event, AttemptFinished):
            self.active.pop(event.attempt.lane, None)
            self.totals.add(event.attempt)
        elif isinstance(event, SessionStopped):
            self.stopped = event.stop_reason


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def render(state: LiveState, now: float, *, width: int = 100, height: int = 40) -> list[str]:
    """The footer lines for ``state`` at time ``now``, each at most ``width - 1`` characters
    (a full-width line would wrap and break the redraw), at most ``height // 2`` lines."""
    t = state.totals
    remaining = max(0, state.total - t.processed)
    if t.processed and remaining:
        mean = t.duration_seconds / t.processed
        eta = _clock(mean * remaining / max(1, state.lanes))
    else:
        eta = "--:--:--" if remaining else "0:00:00"
    minutes = t.duration_seconds / 60
    rate = f"{t.telemetry_events / minutes:.1f}/min" if minutes > 0 else "-"
    head = (f"[{t.processed}/{state.total}] ok {t.succeeded}  fail {t.failed - t.timed_out}  "
            f"timeout {t.timed_out}  telemetry {t.telemetry_events} ({rate})  ETA {eta}")
    if state.stopped:
        head += f"  stopped: {state.stopped}"
    lines = [head]
    rows = max(1, height // 2 - 1)
    lanes = range(1, state.lanes + 1)
    shown = lanes if state.lanes <= rows else lanes[: rows - 1]
    for lane in shown:
        current = state.active.get(lane)
        if current is None:
            lines.append(f"  lane {lane}: idle")
        else:
            clock = _clock(now - current.started)
            what = _CONTROL.sub("?", f"{current.run_id} / {current.phase_id}")
            room = max(10, width - 1 - len(f"  lane {lane}: ") - len(clock) - 2)
            lines.append(f"  lane {lane}: {what[:room]}  {clock}")
    if len(shown) < state.lanes:
        busy = sum(1 for lane in lanes[len(shown):] if lane in state.active)
        lines.append(f"  ... {state.lanes - len(shown)} more lanes ({busy} busy)")
    return [line[: max(1, width - 1)] for line in lines]


class LiveView:
    """Prints progress lines above a footer that it keeps redrawn."""

    def __init__(self, stream: TextIO, *, total: int, lanes: int) -> None:
        self._stream = stream
        self.state = LiveState(total=total, lanes=lanes)
        self._drawn = 0
        self._gone = False

    def on_event(self, event: DrainEvent) -> None:
        self.state.apply(event, time.monotonic())
        self.redraw()

    def line(self, text: str) -> None:
        self._erase()
        self._write(_CONTROL.sub("?", text) + "\n")  # ids are data, not escapes
        self._draw()

    def redraw(self) -> None:
        self._erase()
        self._draw()

    def close(self) -> None:
        self._erase()
        self._write("")

    def _write(self, text: str) -> None:
        """Write and flush; a terminal that went away (hung up, closed) silences the view
        instead of aborting the drain."""
        if self._gone:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._gone = True
            point_at_devnull(self._stream)

    def _erase(self) -> None:
        if self._drawn:
            # Up to the footer's first line, then clear to the end of the screen.
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        size = shutil.get_terminal_size()
        lines = render(self.state, time.monotonic(), width=size.columns, height=size.lines)
        self._write("\n".join(lines) + "\n")
        self._drawn = len(lines)
