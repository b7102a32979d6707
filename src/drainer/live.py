"""The live view on a terminal: progress lines scroll, a footer shows the session at a glance.

The footer is redrawn in place with ANSI escapes (no dependency: the hand-made view costs
no import time): one summary line (done of total, ok / failed / timed out, telemetry,
elapsed, ETA) and one row per lane (run, phase, elapsed). Result tags are coloured on a
terminal unless ``NO_COLOR`` is set or ``TERM`` is ``dumb``. :func:`render` is pure, so it
is tested without a terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from .events import AttemptFinished, AttemptStarted, DrainEvent, SessionStopped
from .models import Totals

REFRESH_INTERVAL = 0.5
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: SGR colours of the result tags at a line's start
_COLOURS = {"OK": "32", "FAIL": "31", "TIMEOUT": "33", "CANCELLED": "33", "ERROR": "31",
            "LEAK": "35", "STOP": "36", "WARN": "33"}
_TAG = re.compile(r"^(\s*)\[(" + "|".join(_COLOURS) + r")\]")


def wants_colour(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Colour on a terminal, unless ``NO_COLOR`` is set (non-empty) or ``TERM=dumb``."""
    env = os.environ if environ is None else environ
    try:
        tty = stream.isatty()
    except (OSError, ValueError):
        return False
    return tty and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


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
    started: float = 0.0  #: monotonic time of the session's start
    deadline: float | None = None  #: seconds after the start at which picking stops
    #: the session's own totals (the summary's and the session files'), not a second count:
    #: after ``--resume`` they hold the session's earlier attempts too
    totals: Totals = field(default_factory=Totals)
    active: dict[int, LaneState] = field(default_factory=dict)
    stopped: str | None = None

    def apply(self, event: DrainEvent, now: float) -> None:
        """Follow the lanes and the stop; the counts are read from :attr:`totals`."""
        if isinstance(event, AttemptStarted):
            self.active[event.lane] = LaneState(event.run_id, event.phase_id, now)
        elif isinstance(event, AttemptFinished):
            self.active.pop(event.attempt.lane, None)
        elif isinstance(event, SessionStopped):
            self.stopped = event.stop_reason


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _eta(state: LiveState, now: float, remaining: int) -> str:
    """Time left: the mean completed duration times the attempts left, spread over the lanes
    that can still be busy, or the deadline, whichever ends first."""
    t = state.totals
    if not remaining:
        return "0:00:00"
    left: float | None = None
    if t.processed:
        lanes = max(1, min(state.lanes, remaining))
        left = t.duration_seconds / t.processed * remaining / lanes
    if state.deadline is not None:
        until = max(0.0, state.deadline - (now - state.started))
        if left is None or until < left:
            return f"{_clock(until)} (deadline)"
    return "--:--:--" if left is None else _clock(left)


def render(state: LiveState, now: float, *, width: int = 100, height: int = 40) -> list[str]:
    """The footer lines for ``state`` at time ``now``, each at most ``width - 1`` characters
    (a full-width line would wrap and break the redraw), at most ``height // 2`` lines."""
    t = state.totals
    remaining = max(0, state.total - t.processed)
    eta = _eta(state, now, remaining)
    minutes = t.duration_seconds / 60
    rate = f"{t.telemetry_events / minutes:.1f}/min" if minutes > 0 else "-"
    counts = f"[{t.processed}/{state.total}] {t.text(brief=True)}"
    times = [f"elapsed {_clock(now - state.started)}"]
    times.append(f"stopped: {state.stopped}" if state.stopped else f"ETA {eta}")
    lines = ["  ".join([counts, f"telemetry {t.telemetry_events} ({rate})", *times])]
    # On a narrow terminal the telemetry goes first, then the times and the stop move to a
    # line of their own, so the counts, times and stop still show whole.
    if len(lines[0]) > width - 1:
        lines = ["  ".join([counts, *times])]
    if len(lines[0]) > width - 1:
        lines = [counts, "  " + "  ".join(times)]
    rows = max(1, height // 2 - len(lines))
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

    def __init__(self, stream: TextIO, *, total: int, lanes: int,
                 deadline: float | None = None, colour: bool | None = None,
                 totals: Callable[[], Totals] = Totals) -> None:
        """``totals`` gives the session's totals (``DrainSession.totals``) at each redraw."""
        self._stream = stream
        self.state = LiveState(total=total, lanes=lanes, started=time.monotonic(),
                               deadline=deadline)
        self._totals = totals
        self._colour = wants_colour(stream) if colour is None else colour
        self._drawn = 0
        self._gone = False

    def on_event(self, event: DrainEvent) -> None:
        self.state.apply(event, time.monotonic())
        self.redraw()

    def line(self, text: str) -> None:
        self._erase()
        text = _CONTROL.sub("?", text)  # ids are data, not escapes
        if self._colour:
            text = _TAG.sub(lambda m: f"{m[1]}\x1b[{_COLOURS[m[2]]}m[{m[2]}]\x1b[0m", text, 1)
        self._write(text + "\n")
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
        self.state.totals = self._totals()
        size = shutil.get_terminal_size()
        lines = render(self.state, time.monotonic(), width=size.columns, height=size.lines)
        self._write("\n".join(lines) + "\n")
        self._drawn = len(lines)
