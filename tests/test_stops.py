"""Each stop condition fires at exactly its configured count, and the snapshot says which."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, create_backlog, drainer_view, only_session, phase_states


def _snapshot(env: Env) -> dict[str, Any]:
    snapshot, _ = only_session(env.sessions)
    return dict(drainer_view(snapshot))


def _drained(env: Env) -> list[tuple[str, str]]:
    return [(argv[0], argv[1]) for argv in env.argv_records()]


def test_fingerprint_repeats_stop_the_run_at_the_nth_repeat(env: Env) -> None:
    create_backlog(env.db, [("run-r", f"P{i}", i, "FAILED", None) for i in range(6)]
                   + [("run-s", "P0", 9, "FAILED", None)])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-fingerprint-repeats", "3", "--batch-size", "50",
        env=env.worker_env(WORKER_KIND="fail", WORKER_KIND_BY_PHASE="P0=ok"),
    )
    assert proc.returncode == 1
    snap = _snapshot(env)
    drained_r = [p for r, p in _drained(env) if r == "run-r"]
    # P0 succeeds; P1, P2, P3 fail with one fingerprint: the third repeat stops the run.
    assert drained_r == ["P0", "P1", "P2", "P3"]
    assert snap["stopped_runs"] == {"run-r": "max_fingerprint_repeats"}
    (fp,) = snap["stopped_fingerprints"]
    assert snap["fingerprint_counts"][fp] == 3
    assert "[STOP] run run-r: max_fingerprint_repeats" in proc.stdout
    assert phase_states(env.db)[("run-r", "P4")][0] == "FAILED"  # never attempted


def test_timeouts_per_run_stop_the_run_at_the_nth_timeout(env: Env) -> None:
    create_backlog(env.db, [("run-t", f"P{i}", i, "FAILED", None) for i in range(4)])
    args = env.base_args()
    args[args.index("--phase-timeout-seconds") + 1] = "1"
    args[args.index("--kill-grace-seconds") + 1] = "0.2"
    proc = env.run_cli("run", *args, "--max-timeouts-per-run", "2",
                       env=env.worker_env(WORKER_KIND="hang"))
    assert proc.returncode == 1
    snap = _snapshot(env)
    assert [p for _, p in _drained(env)] == ["P0", "P1"]
    assert snap["total_timeouts"] == 2
    assert snap["stopped_runs"] == {"run-t": "max_timeouts_per_run"}
    assert snap["stop_reason"] == "no_candidates"
    states = phase_states(env.db)
    assert all(states[("run-t", f"P{i}")][0] == "FAILED" for i in range(4))


def test_consecutive_zero_yield_stops_the_session_at_n(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-consecutive-zero-yield", "3",
        "--max-fingerprint-repeats", "100", "--batch-size", "50",
        env=env.worker_env(WORKER_KIND="fail", WORKER_KIND_BY_PHASE=""),
    )
    assert proc.returncode == 1
    snap = _snapshot(env)
    assert snap["total_processed"] == 3
    assert snap["stop_reason"] == "consecutive_zero_yield"
    assert "[STOP]" in proc.stdout


def test_zero_yield_streak_is_reset_by_telemetry(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(6)])
    # run-0, run-1 fail; run-2 yields; run-3, run-4 fail; run-5 fails -> the 3rd in a row.
    kinds = {"run-2": "ok"}
    worker = env.tmp / "by_run.py"
    worker.write_text(
        "import os, sys\n"
        f"os.environ['WORKER_KIND'] = {kinds!r}.get(sys.argv[1], 'fail')\n"
        f"sys.argv = [{str(env.worker)!r}] + sys.argv[1:]\n"
        f"exec(compile(open({str(env.worker)!r}).read(), 'w', 'exec'))\n"
    )
    proc = env.run_cli(
        "run", *env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}"),
        "--max-consecutive-zero-yield", "3", "--max-fingerprint-repeats", "100",
    )
    snap = _snapshot(env)
    assert [r["run_id"] for r in snap["results"]] == [f"run-{i}" for i in range(6)]
    assert snap["stop_reason"] == "consecutive_zero_yield"
    assert proc.returncode == 1


def test_zero_yield_ignores_attempts_with_unknown_telemetry(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(5)])
    conn = sqlite3.connect(env.db)
    conn.execute("DROP TABLE token_estimation_v2_events")
    conn.execute("DROP TABLE token_budget_escalation_events")
    conn.commit()
    conn.close()
    env.run_cli("run", *env.base_args(), "--max-consecutive-zero-yield", "2",
                "--max-fingerprint-repeats", "100", "--max-attempts-per-phase", "1",
                env=env.worker_env(WORKER_KIND="fail"))
    snap = _snapshot(env)
    assert snap["total_processed"] == 5
    assert snap["stop_reason"] == "no_candidates"


def test_attempts_per_phase_and_retry_only_after_untried(env: Env) -> None:
    create_backlog(env.db, [("run-a", "A", 0, "FAILED", None), ("run-b", "B", 0, "FAILED", None)])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-attempts-per-phase", "3",
        "--max-fingerprint-repeats", "100", "--batch-size", "50",
        env=env.worker_env(WORKER_KIND="fail"),
    )
    assert proc.returncode == 1
    assert _drained(env) == [("run-a", "A"), ("run-b", "B")] * 3
    snap = _snapshot(env)
    assert [r["attempt_number"] for r in snap["results"]] == [1, 1, 2, 2, 3, 3]
    assert snap["stop_reason"] == "no_candidates"


def test_halt_on_failures_stops_picking_at_the_nth_failed_attempt(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    proc = env.run_cli(
        "run", *env.base_args(), "--halt-on-failures", "3", "--max-fingerprint-repeats", "100",
        "--batch-size", "50", env=env.worker_env(WORKER_KIND="fail"),
    )
    assert proc.returncode == 1
    snap = _snapshot(env)
    assert snap["total_processed"] == 3 and snap["stop_reason"] == "failure_limit"
    assert "[STOP] 3 failed attempts (--halt-on-failures 3)" in proc.stdout
    assert "halt on failures 3" in proc.stdout  # the header's stop rules


def test_halt_on_failures_share_is_judged_after_ten_attempts(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i:02d}", f"P{i}", 0, "FAILED", None) for i in range(14)])
    # The first four attempts succeed, every later one fails: 6 of 10 (60%) at the 10th.
    kinds = ",".join(f"P{i}=ok" for i in range(4))
    proc = env.run_cli(
        "run", *env.base_args(), "--halt-on-failures", "50%", "--max-fingerprint-repeats",
        "100", "--batch-size", "50", env=env.worker_env(WORKER_KIND="fail",
                                                        WORKER_KIND_BY_PHASE=kinds),
    )
    assert proc.returncode == 1
    snap = _snapshot(env)
    assert snap["total_processed"] == 10 and snap["stop_reason"] == "failure_limit"
    assert "6 of 10 attempts failed, more than 50% (--halt-on-failures 50%)" in proc.stdout


def test_batch_size_is_exact(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(6)])
    env.run_cli("run", *env.base_args(), "--batch-size", "4")
    snap = _snapshot(env)
    assert snap["total_processed"] == 4
    assert snap["stop_reason"] == "batch_size_reached"


@pytest.mark.slow
def test_time_limit_stops_picking_and_cancels_after_the_grace(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-total-minutes", "0.03", "--stop-grace-seconds", "1",
        env=env.worker_env(WORKER_KIND="hang"),
    )
    assert proc.returncode == 1
    snap = _snapshot(env)
    assert snap["stop_reason"] == "time_limit_reached"
    (result,) = snap["results"]  # one attempt started before the deadline, none after
    assert result["cancelled"] is True and result["state_restored"] is True
    assert phase_states(env.db)[("run-0", "P")][0] == "FAILED"
    assert "[CANCELLED]" in proc.stdout
    for hung in Path(env.out).glob("*hung.*"):  # (tmp-hung.*: killed before the rename)
        if not hung.read_text():
            continue
        grandchild = int(hung.read_text())
        import psutil

        assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie"
