"""``drainer.analyze``: loading sessions (drainer journal/snapshot, Autopack JSON), exact figures
checked against hand computations, recommendations that fire and do not fire, text output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from drainer.analyze import (
    LoadedSession,
    analyze,
    attempt_from_record,
    load_session,
    percentile,
    render_text,
    run_prefix,
)
from drainer.errors import SessionError
from drainer.models import Attempt, LeakedProcess

SID = "batch-drain-20250101-100000-abcd"
FP_IMPORT = "FAILED|rc1|modulenotfounderror: no module named <name>"
FP_TIMEOUT = "FAILED|timeout|drainer: timed out after <n>s"
FP_SEGV = "FAILED|rcN|segmentation fault"


def attempt(
    run_id: str = "run-1",
    phase_id: str = "p1",
    *,
    success: bool = False,
    duration: float = 60.0,
    events: int | None = None,
    yield_per_minute: float | None = None,
    fingerprint: str | None = None,
    reason: str | None = None,
    timed_out: bool = False,
    cancelled: bool = False,
    interrupted: bool = False,
    leaks: tuple[tuple[int, str], ...] = (),
    attempt_id: str = "",
) -> Attempt:
    return Attempt(
        run_id=run_id,
        phase_id=phase_id,
        phase_index=0,
        initial_state="FAILED",
        attempt_id=attempt_id or f"{run_id}/{phase_id}",
        attempt_number=1,
        lane=0,
        started_at="2025-01-01T10:00:00.000+00:00",
        final_state="COMPLETE" if success else "FAILED",
        success=success,
        error_message=None if success else "boom",
        subprocess_returncode=0 if success else 1,
        subprocess_duration_seconds=duration,
        failure_fingerprint=fingerprint,
        telemetry_events_collected=events,
        telemetry_yield_per_minute=yield_per_minute,
        zero_yield_reason=reason,
        timed_out=timed_out,
        cancelled=cancelled,
        interrupted=interrupted,
        leaked_processes=[LeakedProcess(pid=p, name=n, cmdline=[n, "--port", "8000"])
                          for p, n in leaks],
    )


def session_of(results: list[Attempt], **kw: Any) -> LoadedSession:
    return LoadedSession(session_id=SID, source=Path("x.json"), read=lambda: results, **kw)


# -- the known journal --------------------------------------------------------------------------

# (name, attempt) pairs; each one gets an attempt_started line and an attempt_finished line.
KNOWN = [
    # A1: success, 10 events in 60 s
    attempt("build-112-a", "p1", success=True, duration=60.0, events=10, yield_per_minute=10.0,
            attempt_id="a1"),
    # A2: import failure, no events
    attempt("build-112-a", "p2", duration=30.0, events=0, yield_per_minute=0.0,
            fingerprint=FP_IMPORT, reason="failed_before_llm", attempt_id="a2"),
    # A3: same import failure in another run of the same family; left a uvicorn behind
    attempt("build-112-b", "p1", duration=120.0, events=0, yield_per_minute=0.0,
            fingerprint=FP_IMPORT, reason="failed_before_llm", leaks=((4242, "uvicorn"),),
            attempt_id="a3"),
    # A4: timeout after 900 s with 3 events (0.2/min)
    attempt("build-113-c", "p1", duration=900.0, events=3, yield_per_minute=0.2,
            fingerprint=FP_TIMEOUT, timed_out=True, attempt_id="a4"),
    # A5: success, telemetry unknown
    attempt("docs-7-x", "p1", success=True, duration=45.0, events=None, reason="unknown",
            attempt_id="a5"),
    # A6: cancelled, 0 events, yield recorded as null (counts as 0 in the yield percentiles)
    attempt("docs-7-x", "p2", duration=15.0, events=0, yield_per_minute=None,
            fingerprint=FP_SEGV, reason="execution_error", cancelled=True, attempt_id="a6"),
    # A7: interrupted (drainer crashed while it ran): 2 events known, no duration, not a failure
    attempt("build-113-c", "p2", duration=0.0, events=2, interrupted=True, attempt_id="a7"),
]


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event) + "\n"


def write_known_journal(session_dir: Path) -> Path:
    root = session_dir / SID
    root.mkdir(parents=True)
    journal = root / "journal.jsonl"
    lines = [_line({"type": "session_started", "session_id": SID,
                    "started_at": "2025-01-01T10:00:00.000+00:00", "config": {},
                    "at": "2025-01-01T10:00:00.000+00:00"})]
    for a in KNOWN:
        started = attempt(a.run_id, a.phase_id, attempt_id=a.attempt_id, duration=0.0)
        lines.append(_line({"type": "attempt_started", **started.to_json(), "argv": ["w"]}))
        lines.append(_line({"type": "attempt_spawned", "attempt_id": a.attempt_id, "pid": 99}))
        lines.append(_line({"type": "attempt_finished", **a.to_json()}))
    # A2's finish written twice (a crash between write and bookkeeping): replay keeps one
    lines.append(_line({"type": "attempt_finished", **KNOWN[1].to_json()}))
    # a dangling start: the drainer died while it ran; it is no result
    dangling = attempt("docs-7-x", "p3", attempt_id="a8", duration=0.0)
    lines.append(_line({"type": "attempt_started", **dangling.to_json()}))
    lines.append(_line({"type": "run_stopped", "run_id": "build-112-a",
                        "reason": "fingerprint_repeats", "detail": "3 repeats"}))
    lines.append(_line({"type": "session_stopped", "stop_reason": "signal",
                        "completed_at": "2025-01-01T10:30:00.000+00:00"}))
    torn = '{"type": "attempt_finished", "attempt_id": "a9", "run_'  # no newline: torn write
    journal.write_text("".join(lines) + torn)
    return journal


def test_known_journal_figures_match_hand_computation(tmp_path: Path) -> None:
    journal = write_known_journal(tmp_path)
    session = load_session(SID, tmp_path)
    assert session.source == journal
    assert session.session_id == SID
    assert session.stop_reason == "signal"
    assert session.started_at == "2025-01-01T10:00:00.000+00:00"
    assert session.completed_at == "2025-01-01T10:30:00.000+00:00"
    assert session.unfinished == 1  # a8
    assert [a.attempt_id for a in session.attempts()] == ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]

    report = analyze(session)

    # totals: A1..A7 processed; successes A1, A5; failures A2, A3, A4, A6 (A7 is interrupted,
    # not a failure; A6 is cancelled and counts as failed); timeouts A4.
    assert report["totals"] == {
        "processed": 7,
        "succeeded": 2,
        "failed": 4,
        "timeouts": 1,
        "cancelled": 1,
        "interrupted": 1,
        "success_rate": round(2 / 7, 4),  # 0.2857
    }
    assert report["totals"]["success_rate"] == 0.2857
    assert report["unfinished_attempts"] == 1

    # telemetry: known for A1 (10), A2 (0), A3 (0), A4 (3), A6 (0), A7 (2); A5 unknown.
    #   total events = 10 + 0 + 0 + 3 + 0 + 2 = 15; with events: A1, A4, A7 = 3 of 6 = 50.0%
    #   minutes of those attempts = (60 + 30 + 120 + 900 + 15 + 0) / 60 = 1125 / 60 = 18.75
    #   overall yield = 15 / 18.75 = 0.8 per minute
    #   yields (null -> 0): A1 10.0, A2 0.0, A3 0.0, A4 0.2, A6 0, A7 0
    #   sorted [0, 0, 0, 0, 0.2, 10.0], n = 6
    #   median: rank ceil(0.5 * 6) = 3 -> 0.0;  p90: rank ceil(0.9 * 6) = ceil(5.4) = 6 -> 10.0
    assert report["telemetry"] == {
        "total_events": 15,
        "attempts_with_known_telemetry": 6,
        "attempts_with_events": 3,
        "pct_attempts_with_events": 50.0,
        "overall_yield_per_minute": 0.8,
        "median_yield": 0.0,
        "p90_yield": 10.0,
    }

    # zero-yield reasons of every attempt that has one, most frequent first, ties by name
    assert report["zero_yield_reasons"] == {
        "failed_before_llm": 2, "execution_error": 1, "unknown": 1,
    }
    assert list(report["zero_yield_reasons"]) == ["failed_before_llm", "execution_error",
                                                  "unknown"]

    # fingerprints of failures: IMPORT x2 (A2, A3), SEGV x1 (A6), TIMEOUT x1 (A4);
    # ties by fingerprint ascending: "FAILED|rcN|..." < "FAILED|timeout|..."
    assert report["top_fingerprints"] == [[FP_IMPORT, 2], [FP_SEGV, 1], [FP_TIMEOUT, 1]]

    # durations of attempts that ran (A7 interrupted, left out): sorted
    #   [15, 30, 45, 60, 120, 900], n = 6; median rank 3 -> 45; p90 rank ceil(5.4) = 6 -> 900
    assert report["durations"] == {"min": 15.0, "median": 45.0, "p90": 900.0, "max": 900.0}

    assert report["by_run"] == {
        "build-112-a": {"attempts": 2, "succeeded": 1, "failed": 1, "timeouts": 0},
        "build-112-b": {"attempts": 1, "succeeded": 0, "failed": 1, "timeouts": 0},
        "build-113-c": {"attempts": 2, "succeeded": 0, "failed": 1, "timeouts": 1},
        "docs-7-x": {"attempts": 2, "succeeded": 1, "failed": 1, "timeouts": 0},
    }
    assert list(report["by_run"]) == sorted(report["by_run"])
    assert report["leaks"] == {
        "total": 1,
        "processes": [{"run_id": "build-112-b", "phase_id": "p1", "pid": 4242,
                       "name": "uvicorn", "cmdline": ["uvicorn", "--port", "8000"]}],
    }
    assert report["stopped_runs"] == {"build-112-a": "fingerprint_repeats"}

    recs = report["recommendations"]
    # unfinished attempt (session stopped by a signal: resumable), then the blocker: IMPORT is
    # 2 of 4 failures = 50% (>= 50%, >= 3 failures), hit build-112-a and build-112-b whose
    # common prefix is "build-112"; then the uvicorn leak. Telemetry: 3 of 6 known at zero is
    # not more than half; timeouts 1 of 7 < 20%; median yield 0 is not good.
    assert len(recs) == 3
    assert "1 attempt(s) started but never finished" in recs[0]
    assert f"--resume {SID}" in recs[0]
    assert recs[1].startswith("Systemic blocker")
    assert "2 of 4 failures (50.0%)" in recs[1]
    assert "--skip-run-prefix build-112 " in recs[1]
    assert "matches 2 of the 4 run(s)" in recs[1]
    assert "'uvicorn' (1)" in recs[2]

    assert json.loads(json.dumps(report)) == report


def test_snapshot_path_prefers_the_journal_beside_it(tmp_path: Path) -> None:
    journal = write_known_journal(tmp_path)
    snapshot = tmp_path / f"{SID}.json"
    snapshot.write_text(json.dumps({"session_id": SID, "started_at": "x", "results": []}))
    assert load_session(str(snapshot), tmp_path).source == journal
    assert load_session(str(journal), tmp_path).source == journal
    assert load_session(str(journal.parent), tmp_path).source == journal
    assert len(list(load_session(str(snapshot), tmp_path).attempts())) == 7


def test_snapshot_alone_is_read(tmp_path: Path) -> None:
    snapshot = tmp_path / f"{SID}.json"
    data = {"session_id": SID, "started_at": "2025-01-01T10:00:00+00:00", "completed_at": None,
            "batch_size": 10, "total_processed": 2, "stop_reason": "batch_size_reached",
            "stopped_runs": {"r-1": "max_timeouts"},
            "results": [a.to_json() for a in KNOWN[:2]]}
    snapshot.write_text(json.dumps(data))
    session = load_session(SID, tmp_path)
    assert session.source == snapshot
    assert session.stop_reason == "batch_size_reached"
    assert session.stopped_runs == {"r-1": "max_timeouts"}
    assert [a.to_json() for a in session.attempts()] == data["results"]


# -- Autopack's session file ---------------------------------------------------------------------

AUTOPACK_SESSION = {
    "session_id": "batch-drain-20241220-093000",
    "started_at": "2024-12-20T09:30:00.123456+00:00",
    "completed_at": "2024-12-20T10:02:11.000001+00:00",
    "batch_size": 10,
    "total_processed": 3,
    "total_success": 1,
    "total_failed": 2,
    "total_timeouts": 1,
    "total_telemetry_events": 12,
    "fingerprint_counts": {"FAILED|rc1|import error": 1, "FAILED|timeout|timeout": 1},
    "stopped_fingerprints": [],
    "stopped_runs": ["autopack-build-7"],
    "consecutive_zero_yield": 0,
    "sampled_runs": ["autopack-build-7", "autopack-docs-2"],
    "promising_runs": ["autopack-docs-2"],
    "deprioritized_runs": [],
    "results": [
        {
            "run_id": "autopack-docs-2", "phase_id": "phase-1", "phase_index": 0,
            "initial_state": "FAILED", "final_state": "COMPLETE", "success": True,
            "error_message": None, "timestamp": "2024-12-20T09:31:00+00:00",
            "subprocess_returncode": 0, "subprocess_duration_seconds": 120.0,
            "subprocess_stdout_path": "logs/a.out", "subprocess_stderr_path": "logs/a.err",
            "subprocess_stdout_excerpt": None, "subprocess_stderr_excerpt": None,
            "failure_fingerprint": None, "telemetry_events_collected": 12,
            "telemetry_yield_per_minute": 6.0, "reached_llm_boundary": None,
            "zero_yield_reason": None,
        },
        {
            "run_id": "autopack-build-7", "phase_id": "phase-3", "phase_index": 2,
            "initial_state": "FAILED", "final_state": "FAILED", "success": False,
            "error_message": "ImportError: x", "timestamp": "2024-12-20T09:45:00+00:00",
            "subprocess_returncode": 1, "subprocess_duration_seconds": 30.0,
            "subprocess_stdout_path": None, "subprocess_stderr_path": None,
            "subprocess_stdout_excerpt": "", "subprocess_stderr_excerpt": "ImportError: x",
            "failure_fingerprint": "FAILED|rc1|import error", "telemetry_events_collected": 0,
            "telemetry_yield_per_minute": 0.0, "reached_llm_boundary": False,
            "zero_yield_reason": "failed_before_llm",
        },
        {
            "run_id": "autopack-build-7", "phase_id": "phase-4", "phase_index": 3,
            "initial_state": "FAILED", "final_state": "FAILED", "success": False,
            "error_message": "timeout", "timestamp": None,
            "subprocess_returncode": 143, "subprocess_duration_seconds": None,
            "subprocess_stdout_path": None, "subprocess_stderr_path": None,
            "subprocess_stdout_excerpt": None, "subprocess_stderr_excerpt": None,
            "failure_fingerprint": "FAILED|timeout|timeout", "telemetry_events_collected": 0,
            "telemetry_yield_per_minute": 0.0, "reached_llm_boundary": None,
            "zero_yield_reason": "timeout",
        },
    ],
}


def test_autopack_session_file_loads_and_analyses(tmp_path: Path) -> None:
    path = tmp_path / "autopack.json"
    path.write_text(json.dumps(AUTOPACK_SESSION, indent=2))
    session = load_session(str(path), tmp_path)
    assert session.session_id == "batch-drain-20241220-093000"
    assert session.stop_reason is None
    assert session.completed_at == "2024-12-20T10:02:11.000001+00:00"
    assert session.stopped_runs == {"autopack-build-7": "stopped"}  # Autopack keeps a list
    first, second, third = session.attempts()
    assert first.attempt_id == "" and first.lane == 0 and first.attempt_number == 1
    assert first.subprocess_stdout_excerpt == "" and first.reached_llm_boundary is False
    assert first.started_at == "2024-12-20T09:31:00+00:00"  # from its timestamp
    assert not second.timed_out
    assert third.timed_out  # rc 143 is Autopack's timeout
    assert third.subprocess_duration_seconds == 0.0 and third.timestamp == ""

    report = analyze(session)
    assert report["totals"] == {"processed": 3, "succeeded": 1, "failed": 2, "timeouts": 1,
                                "cancelled": 0, "interrupted": 0, "success_rate": 0.3333}
    # 12 events over (120 + 30 + 0) s = 2.5 min -> 4.8/min; yields sorted [0, 0, 6.0]:
    # median rank ceil(1.5) = 2 -> 0.0, p90 rank ceil(2.7) = 3 -> 6.0
    assert report["telemetry"]["total_events"] == 12
    assert report["telemetry"]["overall_yield_per_minute"] == 4.8
    assert report["telemetry"]["median_yield"] == 0.0
    assert report["telemetry"]["p90_yield"] == 6.0
    # the null duration is not measured: durations are [30, 120]; median rank 1 -> 30
    assert report["durations"] == {"min": 30.0, "median": 30.0, "p90": 120.0, "max": 120.0}
    assert report["top_fingerprints"] == [["FAILED|rc1|import error", 1],
                                          ["FAILED|timeout|timeout", 1]]
    json.dumps(report)
    text = render_text(report)
    assert any(line.startswith("  - ") for line in text[text.index("Recommendations"):])


def test_attempt_from_record_rejects_what_is_not_an_attempt() -> None:
    with pytest.raises(TypeError):
        attempt_from_record(["not", "a", "dict"])
    with pytest.raises(ValueError, match="run_id"):
        attempt_from_record({"phase_id": "p"})


# -- finding sessions ----------------------------------------------------------------------------


def test_latest_picks_the_newest_by_started_at(tmp_path: Path) -> None:
    write_known_journal(tmp_path)  # started 2025-01-01T10:00
    newer = dict(AUTOPACK_SESSION, session_id="batch-drain-20250102-080000",
                 started_at="2025-01-02T08:00:00")  # naive: taken as UTC
    (tmp_path / "batch-drain-20250102-080000.json").write_text(json.dumps(newer))
    older = dict(AUTOPACK_SESSION, session_id="batch-drain-20240101-000000",
                 started_at="2024-01-01T00:00:00+00:00")
    older_path = tmp_path / "batch-drain-20240101-000000.json"
    older_path.write_text(json.dumps(older))
    os.utime(older_path, (2_000_000_000, 2_000_000_000))  # newest mtime: must not matter
    (tmp_path / "notes.json").write_text('{"hello": "world"}')  # not a session: ignored
    (tmp_path / "broken.json").write_text("{nope")  # corrupt: does not hide the others
    assert load_session("latest", tmp_path).session_id == "batch-drain-20250102-080000"

    (tmp_path / "batch-drain-20250102-080000.json").unlink()
    latest = load_session("latest", tmp_path)
    assert latest.session_id == SID and latest.source.name == "journal.jsonl"


def test_latest_in_an_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no sessions in"):
        load_session("latest", tmp_path)
    with pytest.raises(SessionError, match="no sessions in"):
        load_session("latest", tmp_path / "absent")


def test_unknown_session_id(tmp_path: Path) -> None:
    write_known_journal(tmp_path)
    with pytest.raises(SessionError, match="no session 'batch-drain-nope'"):
        load_session("batch-drain-nope", tmp_path)
    with pytest.raises(SessionError, match="no such file"):
        load_session(str(tmp_path / "missing.json"), tmp_path)


def test_corrupt_json_and_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / f"{SID}.json"
    bad.write_text('{"session_id": "x", "results": [')
    with pytest.raises(SessionError, match=r"corrupt session file .*not valid JSON") as err:
        load_session(SID, tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(SessionError, match="corrupt session file"):
        load_session(str(bad), tmp_path)

    foreign = tmp_path / "config.json"
    foreign.write_text('{"lanes": 2}')
    with pytest.raises(SessionError, match="not a drainer or Autopack session file"):
        load_session(str(foreign), tmp_path)

    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"session_id": "s", "results": [{"run_id": 1}]}')
    with pytest.raises(SessionError, match=r"results\[0\] is not an attempt record"):
        load_session(str(wrong), tmp_path)


def test_corrupt_journal_names_the_snapshot(tmp_path: Path) -> None:
    root = tmp_path / SID
    root.mkdir()
    (root / "journal.jsonl").write_text('not json\n{"type": "session_started"}\n')
    (tmp_path / f"{SID}.json").write_text(json.dumps({"session_id": SID, "results": []}))
    with pytest.raises(SessionError, match=r"line 1 is not JSON.*analyse .*\.json"):
        load_session(SID, tmp_path)
    # naming the snapshot explicitly reads it despite the damaged journal
    assert list(load_session(str(tmp_path / f"{SID}.json"), tmp_path).attempts()) == []


# -- percentiles -----------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0  # rank ceil(2.0) = 2: the lower middle
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0  # rank ceil(2.5) = 3
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 90) == 9.0  # rank ceil(9.0) = 9
    assert percentile(values, 91) == 10.0  # rank ceil(9.1) = 10
    assert percentile(values, 0) == 1.0  # rank 0 -> rank 1


def test_run_prefix() -> None:
    assert run_prefix("build-112-a") == "build-112"
    assert run_prefix("plain") == "plain"
    assert run_prefix("-x") == "-x"


# -- recommendations ---------------------------------------------------------------------------


def recs(results: list[Attempt], **kw: Any) -> list[str]:
    return list(analyze(session_of(results, **kw))["recommendations"])


def has(advice: list[str], needle: str) -> bool:
    return any(needle in line for line in advice)


def test_a_broken_telemetry() -> None:
    # events [0, 0, 0, 5]: 3 of 4 at zero (> half); yields sorted [0, 0, 0, 5], median rank 2 = 0
    fire = [
        attempt("r-1", "p1", events=0, yield_per_minute=0.0, reason="failed_before_llm"),
        attempt("r-1", "p2", events=0, yield_per_minute=0.0, reason="failed_before_llm"),
        attempt("r-2", "p1", events=0, yield_per_minute=0.0, reason="execution_error"),
        attempt("r-3", "p1", success=True, events=5, yield_per_minute=5.0),
    ]
    advice = recs(fire)
    assert has(advice, "TELEMETRY_DB_ENABLED")
    assert has(advice, "median yield 0 events/min")
    assert has(advice, "3 of 4 attempts with known telemetry (75.0%)")
    assert has(advice, "top zero-yield reason 'failed_before_llm' (2 attempt(s))")
    # counter-example: events [0, 0, 5, 5]: 2 of 4 at zero is not more than half
    counter = [*fire[:2],
               attempt("r-2", "p1", success=True, events=5, yield_per_minute=5.0),
               attempt("r-3", "p1", success=True, events=5, yield_per_minute=5.0)]
    assert not has(recs(counter), "TELEMETRY_DB_ENABLED")


def test_telemetry_unknown_everywhere_is_said() -> None:
    assert has(recs([attempt(events=None)]), "Telemetry was not counted for any of the 1")
    assert not has(recs([attempt(events=0, yield_per_minute=0.0)]), "was not counted")


def test_b_systemic_blocker_across_runs() -> None:
    # 4 failures: X x3 (runs etl-5-a, etl-5-b), Y x1 -> X is 75% of failures
    fire = [
        attempt("etl-5-a", "p1", fingerprint="X"),
        attempt("etl-5-a", "p2", fingerprint="X"),
        attempt("etl-5-b", "p1", fingerprint="X"),
        attempt("web-1-c", "p1", fingerprint="Y"),
    ]
    advice = recs(fire)
    assert has(advice, "Systemic blocker: fingerprint 'X' accounts for 3 of 4 failures (75.0%)")
    assert has(advice, "--skip-run-prefix etl-5 (matches 2 of the 3 run(s)")
    # counter-example: 4 failures, 4 different fingerprints -> nothing systemic
    diverse = [attempt(f"r-{i}", "p1", fingerprint=f"F{i}") for i in range(4)]
    assert not has(recs(diverse), "Systemic blocker")
    # counter-example: 2 failures are too few to call it systemic
    assert not has(recs(fire[:2]), "Systemic blocker")


def test_b_blocker_in_one_run_and_two_fingerprints() -> None:
    one_run = [attempt("api-9-z", f"p{i}", fingerprint="X") for i in range(3)]
    assert has(recs(one_run), "--skip-run-prefix api-9 ")
    # X x2 + Y x2 of 6 failures: the two together are 4 of 6 = 66.7%; X alone is 33%
    two = [
        attempt("a-1", "p1", fingerprint="X"), attempt("a-1", "p2", fingerprint="X"),
        attempt("b-1", "p1", fingerprint="Y"), attempt("b-1", "p2", fingerprint="Y"),
        attempt("c-1", "p1", fingerprint="Z1"), attempt("d-1", "p1", fingerprint="Z2"),
    ]
    advice = recs(two)
    assert has(advice, "2 fingerprints account for 4 (top: 'X', 2) of 6 failures (66.7%)")
    assert has(advice, "--skip-run-prefix a ")  # X hit only a-1


def test_c_good_yield_diverse_failures_suggests_bigger_batch() -> None:
    # yields all 3.0 (median 3.0 >= 2); 4 failures with 4 fingerprints (top 25% < 30%)
    fire = [attempt(f"r-{i}", "p1", events=3, yield_per_minute=3.0, fingerprint=f"F{i}")
            for i in range(4)]
    fire.append(attempt("r-9", "p1", success=True, events=3, yield_per_minute=3.0))
    advice = recs(fire, stop_reason="batch_size_reached")
    assert has(advice, "--batch-size 10 (this session processed 5)")
    assert has(advice, "median 3 events/min")
    assert has(advice, "top fingerprint is 25.0% of 4 failures")
    # counter-example: two failures share a fingerprint: 2 of 4 = 50% is not diverse
    same = [*fire[:3], attempt("r-3", "p1", events=3, yield_per_minute=3.0, fingerprint="F0"),
            fire[4]]
    assert not has(recs(same, stop_reason="batch_size_reached"), "--batch-size")
    # counter-example: the backlog ran dry, a bigger batch would not drain more
    assert not has(recs(fire, stop_reason="no_candidates"), "--batch-size")
    # counter-example: low yield
    slow = [attempt(f"r-{i}", "p1", events=1, yield_per_minute=1.0, fingerprint=f"F{i}")
            for i in range(4)]
    assert not has(recs(slow), "--batch-size")


def test_d_timeouts() -> None:
    # 1 of 5 = 20% timed out: fires (the bound is inclusive)
    fire = [attempt(f"r-{i}", "p1", success=True) for i in range(4)]
    fire.append(attempt("r-9", "p1", timed_out=True, duration=900.0, fingerprint="T"))
    advice = recs(fire)
    assert has(advice, "1 of 5 attempts (20.0%) timed out (longest ran 900.0s)")
    assert has(advice, "--phase-timeout-seconds")
    # counter-example: 1 of 6 = 16.7%
    assert not has(recs([*fire, attempt("r-8", "p1", success=True)]), "--phase-timeout-seconds")


def test_d_timeouts_boundary_is_exact() -> None:
    # 3 of 15 is exactly 20% (0.2 * 15 is 3.0000000000000004 in floats)
    results = [attempt(f"r-{i}", "p1", success=True) for i in range(12)]
    results += [attempt(f"t-{i}", "p1", timed_out=True) for i in range(3)]
    assert has(recs(results), "3 of 15 attempts (20.0%) timed out")


def test_e_leaks() -> None:
    fire = [
        attempt("r-1", "p1", success=True, leaks=((10, "uvicorn"), (11, "python"))),
        attempt("r-2", "p1", success=True, leaks=((12, "uvicorn"),)),
    ]
    advice = recs(fire)
    assert has(advice, "3 leaked process(es) from 2 phase(s), most often 'uvicorn' (2)")
    assert not has(recs([attempt(success=True)]), "leaked")


def test_f_nothing_drained() -> None:
    advice = recs([], stop_reason="no_candidates")
    assert advice == [
        "Nothing was drained (stop reason: no_candidates, 0 attempts): run `drainer plan` to see "
        "which FAILED phases are eligible and why others are skipped."
    ]
    report = analyze(session_of([]))
    assert report["totals"]["success_rate"] is None
    assert report["telemetry"]["total_events"] is None
    assert report["telemetry"]["median_yield"] is None
    assert report["durations"] == {"min": None, "median": None, "p90": None, "max": None}
    json.dumps(report)
    assert not has(recs([attempt(success=True)]), "drainer plan")


def test_unfinished_attempts_only_suggest_resume_when_resumable() -> None:
    assert has(recs([], unfinished=2, stop_reason=None), "--resume")
    assert not has(recs([], unfinished=2, stop_reason="batch_size_reached"), "--resume")


def test_recommendation_order_is_stable() -> None:
    results = [attempt(f"x-{i}", "p1", fingerprint="X", timed_out=True, events=0,
                       yield_per_minute=0.0, reason="timeout", leaks=((i, "sleep"),))
               for i in range(3)]
    advice = recs(results)
    assert [line.split()[0] for line in advice] == ["Systemic", "Telemetry", "3", "Workers"]
    assert advice == recs(list(reversed(results)))


# -- text ------------------------------------------------------------------------------------------


def test_render_text_shows_every_figure(tmp_path: Path) -> None:
    write_known_journal(tmp_path)
    report = analyze(load_session(SID, tmp_path))
    long_fp = "FAILED|rc1|" + "x" * 300
    report["top_fingerprints"].append([long_fp, 1])
    lines = render_text(report)
    text = "\n".join(lines)
    for heading in ("Totals", "Telemetry", "Zero-yield reasons", "Top failure fingerprints",
                    "Durations", "By run", "Leaked processes: 1", "Recommendations"):
        assert heading in lines or any(line.startswith(heading) for line in lines), heading
    assert "28.57%" in text  # success rate
    assert "0.8" in text and "failed_before_llm" in text and "uvicorn --port 8000" in text
    assert "fingerprint_repeats" in text  # stopped run beside its row
    fp_line = next(line for line in lines if "xxx" in line)
    assert fp_line.endswith("...") and len(fp_line.strip().split("  ", 1)[1].strip()) <= 100
    assert all(len(line) <= 100 for line in lines if "Source" not in line and "|" not in line)
    rec_lines = lines[lines.index("Recommendations") + 1:]
    bullets = [line for line in rec_lines if line.startswith("  - ")]
    assert len(bullets) == len(report["recommendations"])
    assert all(line.startswith(("  - ", "    ")) for line in rec_lines)
    joined = " ".join(line[4:] for line in rec_lines)
    assert joined == " ".join(report["recommendations"])  # wrapping loses no word
    # columns of the by-run table line up: counts right-aligned under their headers
    header = next(line for line in lines if line.strip().startswith("run "))
    row = next(line for line in lines if line.strip().startswith("build-113-c"))
    for column, value in (("attempts", "2"), ("succeeded", "0"), ("timeouts", "1")):
        end = header.index(column) + len(column)
        assert row[end - 1] == value and row[end:end + 1] in ("", " "), column
