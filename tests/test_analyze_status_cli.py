"""`drainer analyze` and `drainer status` through the CLI on real sessions and backlogs."""

from __future__ import annotations

import json
import sqlite3

from conftest import Env, create_backlog, only_session


def test_analyze_json_matches_the_session(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(4)])
    env.run_cli("run", *env.base_args(), "--max-attempts-per-phase", "1",
                env=env.worker_env(WORKER_KIND="fail", WORKER_KIND_BY_PHASE=""))
    snapshot, _ = only_session(env.sessions)
    snap = json.loads(snapshot.read_text())
    proc = env.run_cli("analyze", "--session-dir", str(env.sessions), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["session_id"] == snap["session_id"]
    assert report["totals"]["processed"] == snap["total_processed"] == 4
    assert report["totals"]["failed"] == 4
    assert report["top_fingerprints"][0][1] == 4
    text = env.run_cli("analyze", snap["session_id"], "--session-dir", str(env.sessions))
    assert text.returncode == 0
    assert "Recommendations" in text.stdout
    # The text shows the numbers the JSON holds.
    totals = report["totals"]
    lines = {line.split()[0]: line.split()[-1] for line in text.stdout.splitlines()
             if line.strip() and line.startswith("  ") and len(line.split()) == 2}
    assert lines["attempts"] == str(totals["processed"])
    assert lines["failed"] == str(totals["failed"])
    by_path = env.run_cli("analyze", str(snapshot), "--json")
    assert json.loads(by_path.stdout)["totals"] == report["totals"]


def test_analyze_unknown_session_is_exit_2(env: Env) -> None:
    proc = env.run_cli("analyze", "batch-drain-20990101-000000-beef",
                       "--session-dir", str(env.sessions))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_analyze_a_hand_edited_session_file_is_one_line_exit_2(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    env.run_cli("run", *env.base_args(), env=env.worker_env(WORKER_KIND="fail"))
    snapshot, _ = only_session(env.sessions)
    data = json.loads(snapshot.read_text())
    data["results"][0]["subprocess_duration_seconds"] = "1.5"  # a number typed as a string
    edited = env.tmp / "edited.json"
    edited.write_text(json.dumps(data))
    proc = env.run_cli("analyze", str(edited))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("drainer: error: ") and "results[0]" in line
    assert "subprocess_duration_seconds is '1.5', not a number" in line


def _dump(env: Env) -> list[str]:
    conn = sqlite3.connect(env.db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_status_shows_runs_queued_stale_and_resumable_sessions(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P0", 0, "QUEUED", None), ("run-a", "P1", 1, "FAILED", None),
                            ("run-b", "P0", 0, "EXECUTING", None)])
    conn = sqlite3.connect(env.db)
    conn.execute("UPDATE phases SET updated_at = datetime('now', '-3 hours') "
                 "WHERE run_id = 'run-b' OR phase_id = 'P0'")
    conn.commit()
    conn.close()
    # An interrupted session: killed after its first attempt started (run-a's lease stays).
    env.run_cli("run", *env.base_args(),
                env=env.worker_env(DRAINER_CRASH_AT="before_spawn:1"))
    snapshot_dirs = list(env.sessions.glob("batch-drain-*"))
    assert len(snapshot_dirs) == 1
    session_id = snapshot_dirs[0].name
    before = _dump(env)
    proc = env.run_cli("status", "--database-url", env.url, "--session-dir", str(env.sessions))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Runs with QUEUED phases: run-a (1)" in out
    assert "run-b / P0: EXECUTING, 180 min\n" in out
    # What --restore-stale-after would leave alone: a phase whose run a drainer leases.
    assert "run-a / P0: QUEUED, 180 min, its run leased by a drainer" in out
    assert "drainer run --restore-stale-after 60 restores them" in out
    assert f"{session_id}: 0 attempt(s) done, 1 unfinished" in out
    assert f"resume: python -m drainer run --resume {session_id}" in out
    # Status writes nothing. (Compare content, not bytes: closing the last connection may
    # checkpoint the crashed session's WAL into the main file, which changes no row.)
    assert _dump(env) == before
