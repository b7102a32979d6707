"""``drainer.analyze``: loading sessions (drainer journal/snapshot, Autopack JSON), exact figures
checked against hand computations, recommendations that fire and do not fire, text output."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from drainer.advice import RULES, run_prefix
from drainer.analyze import (
    LoadedSession,
    analyze,
    attempt_from_record,
    load_session,
    percentile,
    render_text,
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
    """A session of ``results`` (``kw``: LoadedSession fields such as stop_reason, config)."""
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

    # totals: A1..A7 processed, each under one outcome: ok A1, A5; failed A2, A3; timed out
    # A4; cancelled A6; interrupted A7 (drainer did not see it end). 2 ok of 6 that ended.
    assert report["totals"] == {
        "processed": 7,
        "ok": 2,
        "failed": 2,
        "timed_out": 1,
        "cancelled": 1,
        "interrupted": 1,
        "success_rate": round(2 / 6, 4),  # 0.3333
    }
    assert report["totals"]["success_rate"] == 0.3333
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
        "build-112-a": {"attempts": 2, "ok": 1, "failed": 1, "timed_out": 0, "cancelled": 0,
                        "interrupted": 0},
        "build-112-b": {"attempts": 1, "ok": 0, "failed": 1, "timed_out": 0, "cancelled": 0,
                        "interrupted": 0},
        "build-113-c": {"attempts": 2, "ok": 0, "failed": 0, "timed_out": 1, "cancelled": 0,
                        "interrupted": 1},
        "docs-7-x": {"attempts": 2, "ok": 1, "failed": 0, "timed_out": 0, "cancelled": 1,
                     "interrupted": 0},
    }
    assert list(report["by_run"]) == sorted(report["by_run"])
    assert report["leaks"] == {
        "total": 1,
        "processes": [{"run_id": "build-112-b", "phase_id": "p1", "pid": 4242,
                       "name": "uvicorn", "cmdline": ["uvicorn", "--port", "8000"]}],
    }
    assert report["stopped_runs"] == {"build-112-a": "fingerprint_repeats"}

    recs = report["recommendations"]
    # unfinished: a8 (stopped by a signal: resumable); drainer-crash: A7 interrupted; no
    # blocker: 2 worker failures (A2, A3) are under 3; telemetry of the 5 ended attempts
    # with a count (A1 10, A2 0, A3 0, A4 3, A6 0): 2 yield (40%, not broken), 3 of 5 (60%)
    # are zero: mostly-zero-yield, top reason failed_before_llm (A2, A3); timeouts 1 of 6
    # ended < 20%; the uvicorn leak of A3; median ended yield 0 is not good.
    assert report["recommendation_rules"] == ["unfinished", "drainer-crash",
                                              "mostly-zero-yield", "worker-leaks"]
    assert "1 attempt(s) started but never finished" in recs[0]
    assert f"--resume {SID}" in recs[0]
    assert recs[1].startswith("1 attempt(s) were interrupted")
    assert "3 of 5 attempts with known telemetry (60.0%) collected no events while 2" in recs[2]
    assert "'failed_before_llm' (2 attempt(s))" in recs[2]
    assert "'uvicorn' (1)" in recs[3]

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
    assert report["totals"] == {"processed": 3, "ok": 1, "failed": 1, "timed_out": 1,
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


def fired(results: list[Attempt], **kw: Any) -> list[str]:
    """The names of the advice rules that fire for ``results``, in order."""
    return list(analyze(session_of(results, **kw))["recommendation_rules"])


def failures(fingerprints: str, run: str = "r-1") -> list[Attempt]:
    """Worker failures, one per character of ``fingerprints`` (each its fingerprint)."""
    return [attempt(run, f"p{i}", fingerprint=fp) for i, fp in enumerate(fingerprints)]


def yielding(n: int, per_minute: float = 3.0) -> list[Attempt]:
    return [attempt(f"y-{i}", "p", success=True, events=int(per_minute),
                    yield_per_minute=per_minute) for i in range(n)]


def zero(n: int, reason: str = "failed_before_llm") -> list[Attempt]:
    return [attempt(f"z-{i}", "p", events=0, yield_per_minute=0.0, reason=reason,
                    fingerprint=f"Z{i}") for i in range(n)]


def test_every_rule_is_listed_in_the_readme_with_its_threshold() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for rule in RULES:
        assert f"`{rule.name}`: {rule.when}" in " ".join(readme.split()), rule.name


def test_nothing_drained() -> None:
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
    assert "nothing-drained" not in fired([attempt(success=True)])


def test_unfinished_attempts_only_suggest_resume_when_resumable() -> None:
    assert has(recs([], unfinished=2, stop_reason=None), "--resume")
    assert "unfinished" not in fired([], unfinished=2, stop_reason="batch_size_reached")


def test_crash_leftovers_are_drainers_not_the_workers() -> None:
    # After a kill -9 and --resume: 3 interrupted attempts, each with the process --resume
    # killed (listed in its leaked_processes) and no telemetry events; 2 phases restored.
    crashed = [dataclasses.replace(
        attempt(f"c-{i}", "p", events=0, yield_per_minute=0.0, interrupted=True,
                leaks=((100 + i, "uvicorn"),)), state_restored=i < 2) for i in range(3)]
    healthy = yielding(4)
    rules = fired([*crashed, *healthy])
    assert rules[0] == "drainer-crash"
    # the killed processes are not the workers' leaks, their zeros not broken telemetry
    assert "worker-leaks" not in rules and "mostly-zero-yield" not in rules
    text = recs([*crashed, *healthy])[0]
    assert text.startswith("3 attempt(s) were interrupted")
    assert "killing 3 process(es) they left and restoring 2 phase(s) to FAILED" in text
    assert "not the workers' failure" in text
    # no interrupted attempt: the rule stays quiet, and a leak of an ended attempt is the
    # worker's
    leaky = [attempt("r-1", "p", success=True, leaks=((7, "uvicorn"),))]
    assert "drainer-crash" not in fired(leaky) and "worker-leaks" in fired(leaky)


def test_systemic_blocker_needs_one_dominant_fingerprint() -> None:
    # 4 worker failures: X x3 (runs etl-5-a, etl-5-b), Y x1 -> X is 75%
    fire = [*failures("XX", "etl-5-a"), *failures("X", "etl-5-b"), *failures("Y", "web-1-c")]
    advice = recs(fire)
    assert has(advice, "Systemic blocker: fingerprint 'X' accounts for 3 of 4 worker failures "
                       "(75.0%)")
    assert has(advice, "--skip-run-prefix etl-5 (matches 2 of the 3 run(s)")
    assert has(recs(failures("XXX", "api-9-z")), "--skip-run-prefix api-9 ")
    # exactly half is enough: X x2 of 4
    assert "systemic-blocker" in fired(failures("XXYZ"))
    # several fingerprints are never lumped together: X x2 + Y x2 of 6 is 33% each
    assert "systemic-blocker" not in fired(failures("XXYYZW"))
    # all different: nothing systemic; 2 failures are too few to call it systemic
    assert "systemic-blocker" not in fired(failures("ABCD"))
    assert "systemic-blocker" not in fired(failures("XX"))
    # timeouts and cancelled attempts are not worker failures: drainer wrote their cause
    stopped = [attempt(f"t-{i}", "p", fingerprint="T", timed_out=True) for i in range(3)]
    stopped += [attempt(f"c-{i}", "p", fingerprint="C", cancelled=True) for i in range(3)]
    assert "systemic-blocker" not in fired([*stopped, *failures("AB")])


def test_telemetry_broken_only_when_almost_no_attempt_yields() -> None:
    # the reported case: 41% of attempts yielded 300 to 670 events/min, the rest nothing
    fine = [*yielding(7, 300.0), *yielding(2, 670.0), *zero(13)]
    rules = fired(fine)
    assert "telemetry-broken" not in rules
    assert "mostly-zero-yield" in rules  # 13 of 22 without events is worth a look
    assert has(recs(fine), "13 of 22 attempts with known telemetry (59.1%) collected no events "
                           "while 9 did, so telemetry works")
    # 20 attempts, none yields: broken
    broken = recs(zero(20))
    assert has(broken, "Telemetry collection looks broken: 0 of 20 attempts")
    assert has(broken, "TELEMETRY_DB_ENABLED=1")
    assert "mostly-zero-yield" not in fired(zero(20))  # one rule says it
    # 1 of 20 (5%) is not under 5%; 4 attempts are too few to judge
    assert "telemetry-broken" not in fired([*zero(19), *yielding(1)])
    assert "telemetry-broken" not in fired(zero(4))
    # half at zero is not "mostly"
    assert "mostly-zero-yield" not in fired([*zero(3), *yielding(3)])


def test_telemetry_unknown_everywhere_is_said() -> None:
    assert has(recs([attempt(events=None)]), "Telemetry was not counted for any of the 1")
    assert "telemetry-missing" not in fired([attempt(events=0, yield_per_minute=0.0)])


def test_timeouts_dominating() -> None:
    # 1 of 5 = 20% timed out: fires (the bound is inclusive), naming the session's limit
    fire = [attempt(f"r-{i}", "p1", success=True) for i in range(4)]
    fire.append(attempt("r-9", "p1", timed_out=True, duration=900.0, fingerprint="T"))
    advice = recs(fire, config={"phase_timeout": 900})
    assert has(advice, "1 of 5 attempts (20.0%) timed out (the limit was 900s), the longest "
                       "after 900.0s")
    assert has(advice, "raise --phase-timeout-seconds")
    # 1 of 6 = 16.7%: quiet
    assert "timeouts" not in fired([*fire, attempt("r-8", "p1", success=True)])
    # a phase that completed and then hung is a success, not a timeout to act on
    hung = [dataclasses.replace(attempt(f"h-{i}", "p", success=True), timed_out=True)
            for i in range(3)]
    assert "timeouts" not in fired(hung)
    # 3 of 15 is exactly 20% (0.2 * 15 is 3.0000000000000004 in floats)
    results = [attempt(f"r-{i}", "p1", success=True) for i in range(12)]
    results += [attempt(f"t-{i}", "p1", timed_out=True) for i in range(3)]
    assert has(recs(results), "3 of 15 attempts (20.0%) timed out")


def test_worker_leaks() -> None:
    fire = [
        attempt("r-1", "p1", success=True, leaks=((10, "uvicorn"), (11, "python"))),
        attempt("r-2", "p1", success=True, leaks=((12, "uvicorn"),)),
    ]
    assert has(recs(fire), "3 leaked process(es) from 2 phase(s), most often 'uvicorn' (2)")
    assert "worker-leaks" not in fired([attempt(success=True)])


def test_bigger_batch_for_good_yield_and_diverse_failures() -> None:
    # yields all 3.0 (median 3.0 >= 2); 4 failures with 4 fingerprints (top 25% < 30%)
    fire = [attempt(f"r-{i}", "p1", events=3, yield_per_minute=3.0, fingerprint=f"F{i}")
            for i in range(4)]
    fire.append(attempt("r-9", "p1", success=True, events=3, yield_per_minute=3.0))
    advice = recs(fire, stop_reason="batch_size_reached")
    assert has(advice, "--batch-size 10 (this session processed 5)")
    assert has(advice, "median 3 events/min")
    assert has(advice, "top fingerprint is 25.0% of 4 worker failures")
    # two failures share a fingerprint: 2 of 4 = 50% is not diverse
    same = [*fire[:3], attempt("r-3", "p1", events=3, yield_per_minute=3.0, fingerprint="F0"),
            fire[4]]
    assert "bigger-batch" not in fired(same, stop_reason="batch_size_reached")
    # the backlog ran dry, a bigger batch would not drain more
    assert "bigger-batch" not in fired(fire, stop_reason="no_candidates")
    # low yield
    slow = [attempt(f"r-{i}", "p1", events=1, yield_per_minute=1.0, fingerprint=f"F{i}")
            for i in range(4)]
    assert "bigger-batch" not in fired(slow)


def test_recommendation_order_is_stable() -> None:
    results = [attempt(f"x-{i}", "p", fingerprint="X", events=0, yield_per_minute=0.0)
               for i in range(5)]
    results += [attempt(f"t-{i}", "p", timed_out=True, leaks=((i, "sleep"),)) for i in range(2)]
    assert fired(results) == ["systemic-blocker", "telemetry-broken", "timeouts",
                              "worker-leaks"]
    assert recs(results) == recs(list(reversed(results)))
    assert [name for name in fired(results)] == [r.name for r in RULES
                                                 if r.name in fired(results)]

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
    assert "33.3%" in text  # success rate: 2 ok of 6 that ended
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
    for column, value in (("attempts", "2"), ("ok", "0"), ("timed out", "1")):
        end = header.index(column) + len(column)
        assert row[end - 1] == value and row[end:end + 1] in ("", " "), column
