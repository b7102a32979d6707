"""Progress output: the live view on a terminal, plain lines otherwise, JSON for machines."""

from __future__ import annotations

import dataclasses
import json

from conftest import Env, create_backlog, under_a_terminal
from drainer.events import AttemptFinished, AttemptStarted, SessionStopped
from drainer.live import LiveState, render
from drainer.models import Attempt, StopReason


def _attempt(lane: int, *, success: bool, timed_out: bool = False, duration: float = 30.0,
             events: int = 0) -> Attempt:
    return Attempt(run_id=f"run-{lane}", phase_id="P", phase_index=0, initial_state="FAILED",
                   attempt_id=str(lane), attempt_number=1, lane=lane, started_at="",
                   success=success, timed_out=timed_out, subprocess_duration_seconds=duration,
                   telemetry_events_collected=events, final_state="COMPLETE" if success else "FAILED")


def _started(attempt_id: str, run_id: str, phase_id: str, lane: int) -> AttemptStarted:
    return AttemptStarted("s", Attempt(run_id=run_id, phase_id=phase_id, phase_index=0,
                                       initial_state="FAILED", attempt_id=attempt_id,
                                       attempt_number=1, lane=lane, started_at=""))


def _finish(state: LiveState, attempt: Attempt, now: float) -> None:
    """What the session does: its totals count the attempt, the view follows its lane."""
    state.totals.add(attempt)
    state.apply(AttemptFinished("s", attempt), now=now)


def test_render_shows_counts_eta_and_one_row_per_lane() -> None:
    state = LiveState(total=10, lanes=2, started=100.0)
    state.apply(_started("1", "run-1", "P", 1), now=100.0)
    _finish(state, _attempt(1, success=True, events=6), now=130.0)
    state.apply(_started("2", "run-2", "P", 2), now=130.0)
    _finish(state, _attempt(2, success=False, timed_out=True), now=160.0)
    state.apply(_started("3", "run-big", "P9", 1), now=160.0)
    lines = render(state, now=225.0)
    # 2 done, 8 left, mean 30 s over 2 lanes: 120 s. Telemetry 6 events in 1 minute.
    # The summary's words, one outcome per attempt: the timeout is not also "failed".
    assert lines[0] == ("[2/10] ok 1  failed 0  timed out 1  telemetry 6 (6.0/min)  "
                        "elapsed 0:02:05  ETA 0:02:00")
    assert lines[1] == "  lane 1: run-big / P9  0:01:05"
    assert lines[2] == "  lane 2: idle"
    state.apply(SessionStopped("s", StopReason.BATCH_SIZE_REACHED), now=230.0)
    assert render(state, now=230.0)[0].endswith("stopped: batch_size_reached")


def test_eta_is_bounded_by_the_deadline_and_spread_over_lanes_still_busy() -> None:
    state = LiveState(total=10, lanes=4, started=0.0, deadline=25.0)
    state.apply(_started("1", "run-1", "P", 1), now=0.0)
    _finish(state, _attempt(1, success=True, duration=10.0), now=10.0)
    # 9 left at 10 s each over 4 lanes: 22.5 s, but picking stops at 25 s: 15 s from now.
    assert render(state, now=10.0)[0].endswith("ETA 0:00:15 (deadline)")
    state.deadline = None
    assert render(state, now=10.0)[0].endswith("ETA 0:00:22")
    state = LiveState(total=2, lanes=4, started=0.0)  # one left: one lane can work on it
    _finish(state, _attempt(1, success=True, duration=10.0), now=10.0)
    assert render(state, now=10.0)[0].endswith("ETA 0:00:10")


def test_colour_only_on_a_terminal_without_no_color() -> None:
    import io

    from drainer.live import wants_colour

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_colour(Tty(), {"TERM": "xterm"})
    assert not wants_colour(Tty(), {"TERM": "xterm", "NO_COLOR": "1"})
    assert not wants_colour(Tty(), {"TERM": "dumb"})
    assert not wants_colour(io.StringIO(), {"TERM": "xterm"})


def test_live_view_under_a_pseudo_terminal(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    code, screen = under_a_terminal(["run", *env.base_args(), "--lanes", "2"], env)
    assert code == 0, screen
    assert "\x1b[" in screen  # the footer was redrawn in place
    assert "lane 1:" in screen and "lane 2:" in screen
    assert "[3/10] ok 3  failed 0  timed out 0" in screen and "elapsed 0:00:0" in screen
    assert "Stop reason: no_candidates" in screen  # the summary still prints
    assert "\x1b[32m[OK]\x1b[0m run-" in screen  # coloured on a terminal


def test_no_color_turns_the_live_views_colour_off(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    code, screen = under_a_terminal(["run", *env.base_args()], env, NO_COLOR="1",
                                     TERM="xterm")
    assert code == 0, screen
    assert "[OK] run-0 / P COMPLETE" in screen and "\x1b[32m" not in screen


def test_bad_input_under_a_terminal_is_one_line_and_exit_2(env: Env) -> None:
    # The live view runs the drain in a task group, which wraps what it raises.
    missing = env.tmp / "nowhere" / "backlog.db"
    code, screen = under_a_terminal(
        ["run", "--database-url", f"sqlite:///{missing}", "--command", "true"], env)
    assert code == 2, screen
    assert "Traceback" not in screen and "ExceptionGroup" not in screen, screen
    [line] = [x for x in screen.splitlines() if x.strip()]
    assert line.startswith("drainer: error: SQLite database") and "does not exist" in line


def test_plain_lines_when_not_a_terminal(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stdout
    assert "[1/10] Draining: run-0 / P" in proc.stdout


def test_json_output_is_one_event_object_per_line(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(2)])
    proc = env.run_cli("run", *env.base_args(), "--json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["attempt_started", "attempt_finished"] * 2 + [
        "session_stopped"]
    assert events[1]["success"] is True and events[1]["run_id"] == "run-0"
    assert events[-1]["stop_reason"] == "no_candidates" and events[-1]["processed"] == 2


def test_live_footer_fits_the_terminal_and_strips_control_characters() -> None:
    state = LiveState(total=10, lanes=30)
    state.apply(_started("1", "run-\x1b[2J" + "x" * 200, "P", 1), now=0.0)
    lines = render(state, now=1.0, width=40, height=12)
    assert all(len(line) <= 39 for line in lines)
    assert "\x1b" not in "".join(lines)
    assert len(lines) <= 6 and lines[-1].startswith("  ... ")


def test_on_80_columns_the_times_and_the_stop_get_a_line_of_their_own() -> None:
    state = LiveState(total=20, lanes=1, started=0.0)
    for n, flags in enumerate([{"success": True}, {"success": False},
                               {"success": False, "timed_out": True}]):
        _finish(state, _attempt(1, duration=1.0, **flags), now=float(n))
    state.totals.add(dataclasses.replace(_attempt(1, success=False), cancelled=True))
    state.totals.add(dataclasses.replace(_attempt(1, success=False), interrupted=True))
    state.apply(SessionStopped("s", StopReason.NO_CANDIDATES), now=5.0)
    wide = render(state, now=5.0, width=200)
    assert wide[0] == ("[5/20] ok 1  failed 1  timed out 1  cancelled 1  interrupted 1  "
                       "telemetry 0 (0.0/min)  elapsed 0:00:05  stopped: no_candidates")
    narrow = render(state, now=5.0, width=80)
    assert narrow[:2] == ["[5/20] ok 1  failed 1  timed out 1  cancelled 1  interrupted 1",
                          "  elapsed 0:00:05  stopped: no_candidates"]
    assert narrow[2] == "  lane 1: idle"
