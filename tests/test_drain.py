"""End to end through the CLI: real worker subprocesses against real SQLite backlogs."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from pathlib import Path

from conftest import (
    Env,
    create_backlog,
    journal_results,
    only_session,
    phase_states,
    session_info,
)

# Autopack's session file: its keys exactly (its loader passes every key to a dataclass).
SNAPSHOT_FIELDS = {
    "session_id", "started_at", "completed_at", "batch_size", "total_processed",
    "total_success", "total_failed", "total_timeouts", "total_telemetry_events",
    "fingerprint_counts", "stopped_fingerprints", "stopped_runs", "results",
    "consecutive_zero_yield",
}
AUTOPACK_RESULT_FIELDS = {
    "run_id", "phase_id", "phase_index", "initial_state", "final_state", "success",
    "error_message", "timestamp", "subprocess_returncode", "subprocess_duration_seconds",
    "subprocess_stdout_path", "subprocess_stderr_path", "subprocess_stdout_excerpt",
    "subprocess_stderr_excerpt", "failure_fingerprint", "telemetry_events_collected",
    "telemetry_yield_per_minute", "reached_llm_boundary", "zero_yield_reason",
}
# The journal's records: Autopack's fields and drainer's.
RESULT_FIELDS = AUTOPACK_RESULT_FIELDS | {
    "llm_call_seen", "worker_error", "attempt_id", "attempt_number", "lane", "started_at",
    "finished_at", "timed_out", "cancelled", "interrupted", "lease_lost", "state_restored",
    "leaked_processes", "peak_rss_bytes", "stdout_bytes", "stderr_bytes", "timeout_seconds",
}
INFO_FIELDS = {
    "session_id", "started_at", "completed_at", "autopack_session_file", "stop_reason",
    "stop_detail", "totals", "stopped_runs", "leak_gauge", "claims", "claims_refused", "lanes", "config", "host",
    "drainer_version",
}


def test_queued_phase_is_skipped_and_its_runs_failed_phases_drained(env: Env) -> None:
    phases = [("run-q", "P0", 0, "QUEUED", None)]
    phases += [("run-q", f"P{i}", i, "FAILED", "Deliverable missing") for i in range(1, 6)]
    create_backlog(env.db, phases)
    proc = env.run_cli("run", *env.base_args(), "--batch-size", "10")
    assert proc.returncode == 0, proc.stderr
    states = phase_states(env.db)
    assert states[("run-q", "P0")] == ("QUEUED", None)
    assert all(states[("run-q", f"P{i}")][0] == "COMPLETE" for i in range(1, 6))
    drained = [argv[1] for argv in env.argv_records()]
    assert drained == ["P1", "P2", "P3", "P4", "P5"]  # priority order: phase_index
    assert "[5/10] Draining: run-q / P5" in proc.stdout
    assert "Stop reason: no_candidates" in proc.stdout


def test_worker_leaving_phase_executing_gets_it_restored(env: Env) -> None:
    create_backlog(env.db, [("run-x", "P1", 0, "FAILED", "old reason")])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-attempts-per-phase", "1",
        env=env.worker_env(WORKER_KIND="leave_executing"),
    )
    assert proc.returncode == 1, proc.stderr
    state, reason = phase_states(env.db)[("run-x", "P1")]
    assert state == "FAILED"
    # This worker cleared the reason (it writes NULL with each state): drainer's note alone.
    assert reason == ("drainer: worker exited with status 3; phase was left EXECUTING, "
                      "restored to FAILED")
    _, root = only_session(env.sessions)
    (result,) = journal_results(root)
    assert result["state_restored"] is True
    assert result["final_state"] == "FAILED"
    assert result["subprocess_returncode"] == 3
    assert "crashing while EXECUTING" in result["error_message"]
    assert "[RESTORED]" in proc.stdout


def test_run_id_with_shell_metacharacters_is_one_argument(env: Env) -> None:
    evil = 'x; touch pwned1 && $(touch pwned2) `touch pwned3` | touch "pwned4"'
    create_backlog(env.db, [(evil, "P1", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 0, proc.stderr
    assert env.argv_records() == [[evil, "P1"]]
    created = [p.name for p in env.tmp.rglob("pwned*")] + [p.name for p in Path.cwd().glob("pwned*")]
    assert created == []


def test_phase_id_with_dot_dot_cannot_write_outside_logs(env: Env) -> None:
    ids = ["../../../escape", "..", "a/../../b", "/abs/path", "..\\..\\win"]
    create_backlog(env.db, [("run-p", pid, i, "FAILED", None) for i, pid in enumerate(ids)])
    before = {p for p in env.tmp.rglob("*")}
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 0, proc.stderr
    _, session = only_session(env.sessions)
    logs = (session / "logs").resolve()
    new = {p for p in env.tmp.rglob("*")} - before
    new_files = {p for p in new if p.is_file()}
    outside = {
        p for p in new_files
        if logs not in p.resolve().parents and p.parent.resolve() != session.resolve()
        and p.parent.resolve() != env.sessions.resolve() and p.parent != env.out
        and not p.name.startswith("backlog.db")
    }
    assert outside == set()
    assert len(list(logs.iterdir())) == 2 * len(ids)  # one pair per attempt, none shared
    assert not (env.tmp.parent / "escape").exists()
    assert not Path("/abs").exists()


def test_session_files_have_every_field(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None), ("run-b", "P1", 0, "FAILED", None)])
    proc = env.run_cli(
        "run", *env.base_args(), "--max-attempts-per-phase", "1",
        env=env.worker_env(WORKER_KIND="fail"),
    )
    assert proc.returncode == 1
    snapshot_path, session = only_session(env.sessions)
    snap = json.loads(snapshot_path.read_text())
    assert set(snap) == SNAPSHOT_FIELDS
    assert snap["total_processed"] == 2 and snap["total_failed"] == 2
    assert snap["session_id"] == snapshot_path.stem
    assert all(set(r) == AUTOPACK_RESULT_FIELDS for r in snap["results"])
    info = session_info(session)
    assert set(info) == INFO_FIELDS
    assert info["stop_reason"] == "no_candidates" and info["lanes"] == 1
    assert info["autopack_session_file"] == snapshot_path.name
    for result in journal_results(session):
        assert set(result) == RESULT_FIELDS
        log = result["subprocess_stderr_path"]
        assert result["error_message"] == f"Deliverable missing: src/x.py | (log: {log})"
        assert result["failure_fingerprint"].startswith("FAILED|rc1|deliverable missing")
        assert result["telemetry_events_collected"] == 0
        assert result["zero_yield_reason"] == "execution_error"
        assert Path(result["subprocess_stdout_path"]).is_file()
        assert Path(result["subprocess_stderr_path"]).read_text() == "boom\n"
    events = [json.loads(line) for line in (session / "journal.jsonl").read_text().splitlines()]
    types = [e["type"] for e in events]
    assert types == ["session_started",
                     "attempt_started", "attempt_spawned", "attempt_finished",
                     "attempt_started", "attempt_spawned", "attempt_finished",
                     "session_stopped"]
    assert isinstance(events[2]["pid"], int) and events[2]["create_time"] > 0
    assert events[1]["attempt_id"] == events[3]["attempt_id"] == journal_results(session)[0]["attempt_id"]
    assert sorted(p.name for p in (session / "logs").iterdir()) == [
        "run-a__P1__1.stderr.txt", "run-a__P1__1.stdout.txt",
        "run-b__P1__1.stderr.txt", "run-b__P1__1.stdout.txt",
    ]


def test_success_counts_telemetry_and_exits_zero(env: Env) -> None:
    create_backlog(env.db, [("run-t", "P1", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 0, proc.stderr
    _, root = only_session(env.sessions)
    (result,) = journal_results(root)
    assert result["success"] is True and result["final_state"] == "COMPLETE"
    assert result["telemetry_events_collected"] == 3
    assert result["reached_llm_boundary"] is False  # no limit hit
    assert result["llm_call_seen"] is True
    assert result["error_message"] is None
    assert "[TELEMETRY] +3 events" in proc.stdout


def test_missing_telemetry_tables_make_telemetry_unavailable(env: Env) -> None:
    create_backlog(env.db, [("run-t", "P1", 0, "FAILED", None)])
    conn = sqlite3.connect(env.db)
    conn.execute("DROP TABLE token_budget_escalation_events")
    conn.execute("DROP TABLE token_estimation_v2_events")
    conn.commit()
    conn.close()
    proc = env.run_cli(
        "run", *env.base_args(), "--max-attempts-per-phase", "1",
        env=env.worker_env(WORKER_KIND="fail"),
    )
    assert "telemetry is unavailable" in proc.stdout
    snapshot, _ = only_session(env.sessions)
    (result,) = json.loads(snapshot.read_text())["results"]
    assert result["telemetry_events_collected"] is None
    assert result["zero_yield_reason"] == "unknown"


def test_batch_size_limits_attempts(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P1", 0, "FAILED", None) for i in range(5)])
    proc = env.run_cli("run", *env.base_args(), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(env.argv_records()) == 2
    assert "Stop reason: batch_size_reached" in proc.stdout


def test_timeout_restores_phase_and_session_continues(env: Env) -> None:
    create_backlog(env.db, [("run-slow", "P1", 0, "FAILED", None), ("run-ok", "P2", 1, "FAILED", None)])
    hang = (
        "import os, sqlite3, sys, time\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:])\n"
        "if sys.argv[1] == 'run-slow':\n"
        "    db.execute(\"UPDATE phases SET state='EXECUTING' WHERE run_id='run-slow'\"); db.commit()\n"
        "    time.sleep(600)\n"
        "db.execute(\"UPDATE phases SET state='COMPLETE' WHERE run_id=?\", (sys.argv[1],)); db.commit()\n"
    )
    script = env.tmp / "hang.py"
    script.write_text(hang)
    args = env.base_args(f"{sys.executable} {script} {{run_id}}")
    args[args.index("--phase-timeout-seconds") + 1] = "2"
    proc = env.run_cli("run", *args, "--max-attempts-per-phase", "1")
    assert proc.returncode == 1
    states = phase_states(env.db)
    assert states[("run-slow", "P1")][0] == "FAILED"
    assert (states[("run-slow", "P1")][1] or "").startswith("drainer: attempt timed out")
    assert states[("run-ok", "P2")][0] == "COMPLETE"
    snapshot, root = only_session(env.sessions)
    snap = json.loads(snapshot.read_text())
    assert snap["total_timeouts"] == 1
    # Autopack's file records a timeout as Autopack does; the journal keeps the real exit.
    assert (snap["results"][0]["final_state"], snap["results"][0]["subprocess_returncode"]) \
        == ("TIMEOUT", -1)
    slow = journal_results(root)[0]
    assert slow["timed_out"] and slow["failure_fingerprint"].startswith("FAILED|timeout|")
    assert slow["zero_yield_reason"] == "timeout" and slow["subprocess_returncode"] < 0


def test_a_megabyte_of_failure_reason_is_cut_in_the_session_files(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), "--max-attempts-per-phase", "1",
                       env=env.worker_env(WORKER_KIND="fail_huge_reason"))
    assert proc.returncode == 1, proc.stderr
    snapshot, session = only_session(env.sessions)
    results = json.loads(snapshot.read_text())["results"]
    assert len(results) == 2
    for result in results:
        message = result["error_message"]
        assert message.startswith("RuntimeError: xxx")
        whole = Path(result["subprocess_stderr_path"].replace(".stderr.txt", ".reason.txt"))
        assert f"cut at 4,000 of 1,000,014 characters; full text in {whole}]" in message
        assert len(message) < 5000
        # The attempt's full reason is kept beside its logs.
        assert whole.read_text() == "RuntimeError: " + "x" * 1_000_000
    # Each session file holds the cut message, not the megabyte (two attempts here).
    assert snapshot.stat().st_size < 100_000
    assert (session / "journal.jsonl").stat().st_size < 100_000
    # The database keeps the worker's reason whole.
    assert len(phase_states(env.db)[("run-0", "P")][1] or "") == 1_000_014


def test_a_long_reason_that_cannot_be_kept_whole_costs_nothing_else(env: Env) -> None:
    # The file for the whole reason cannot be written (here a directory stands in its way,
    # as a full disk would): the attempt is still recorded, the session goes on, and the
    # message says where the whole text is instead.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    blocker = env.tmp / "blocker.py"
    blocker.write_text(
        "import os, sqlite3, sys\n"
        "logs = os.path.join(os.environ['SESSIONS'], os.environ['DRAINER_SESSION_ID'], 'logs')\n"
        "os.makedirs(os.path.join(logs, os.environ['DRAINER_RUN_ID'] + '__P__1.reason.txt'))\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:], timeout=30)\n"
        "db.execute('UPDATE phases SET state=\\'FAILED\\', last_failure_reason=? WHERE run_id=?',\n"
        "           ('RuntimeError: ' + 'y' * 5000, os.environ['DRAINER_RUN_ID'])); db.commit()\n"
        "sys.exit(1)\n")
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {blocker}"),
                       "--max-attempts-per-phase", "1",
                       env=env.worker_env(SESSIONS=str(env.sessions)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    snapshot, _ = only_session(env.sessions)
    results = json.loads(snapshot.read_text())["results"]
    assert sorted(r["run_id"] for r in results) == ["run-0", "run-1"]
    assert all("the database keeps the phase's last_failure_reason whole" in r["error_message"]
               for r in results)


def test_a_worker_that_completes_then_hangs_is_a_success_and_a_timeout(env: Env) -> None:
    # The work is done (COMPLETE) but the worker never exits: its tree is killed at the
    # timeout. The rule: a success (nothing to redo, exit 0), counted as a timeout too.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    script = env.tmp / "complete_then_hang.py"
    script.write_text(
        "import os, sqlite3, sys, time\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:])\n"
        "db.execute(\"UPDATE phases SET state='COMPLETE' WHERE run_id=?\", (sys.argv[1],))\n"
        "db.commit()\n"
        "time.sleep(600)\n")
    args = env.base_args(f"{sys.executable} {script} {{run_id}}")
    args[args.index("--phase-timeout-seconds") + 1] = "1"
    proc = env.run_cli("run", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
    snapshot, _ = only_session(env.sessions)
    snap = json.loads(snapshot.read_text())
    assert (snap["total_success"], snap["total_failed"], snap["total_timeouts"]) == (1, 0, 1)
    [result] = snap["results"]
    assert result["success"] is True and result["final_state"] == "COMPLETE"
    assert result["subprocess_returncode"] == -1  # counted as a timeout by Autopack too


# A grandchild that leaves the attempt for good: a double fork, setsid, and an empty
# environment (env -i), so neither the process group nor the marker leads to it.
# start_daemon() returns once the daemon runs and its first parent has exited.
START_DAEMON = """\
import os, time
def start_daemon(scratch):
    child = os.fork()
    if child == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.execvp("env", ["env", "-i", "sleep", "1000"])
        with open(scratch, "w") as fh:
            fh.write(str(daemon))
        os._exit(0)
    os.waitpid(child, 0)  # the daemon's parent is gone: it is re-parented now
    with open(scratch) as fh:
        daemon = int(fh.read())
    while not open(f"/proc/{daemon}/cmdline", "rb").read().startswith(b"sleep"):
        time.sleep(0.01)  # env -i has exec'd sleep: the marker is gone from its environment
    return daemon
"""

# The worker starts such a daemon, records its pid, then completes its phase.
ESCAPING_WORKER = START_DAEMON + """\
import sqlite3, sys
out = os.environ["TEST_OUT"]
daemon = start_daemon(os.path.join(out, "daemon.tmp"))
os.rename(os.path.join(out, "daemon.tmp"), os.path.join(out, "daemon.pid"))
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):])
db.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=?", (sys.argv[1],))
db.commit()
"""


def test_a_setsid_escapee_with_an_empty_environment_is_found_and_killed(env: Env) -> None:
    import psutil

    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    script = env.tmp / "escaping_worker.py"
    script.write_text(ESCAPING_WORKER)
    daemons: list[int] = []
    try:
        proc = env.run_cli("run", *env.base_args(f"{sys.executable} {script} {{run_id}}"),
                           "--batch-size", "1")
        daemons.append(int((env.out / "daemon.pid").read_text()))
        # Before: the daemon ran on after drainer, and no attempt listed it.
        alive = psutil.pid_exists(daemons[0]) and \
            psutil.Process(daemons[0]).status() != psutil.STATUS_ZOMBIE
        assert not alive
        assert proc.returncode == 0, proc.stdout + proc.stderr
        _, root = only_session(env.sessions)
        [result] = journal_results(root)
        assert [(p["pid"], p["name"]) for p in result["leaked_processes"]] == [
            (daemons[0], "sleep")]
    finally:
        for pid in daemons:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


# Two lanes. run-0's worker starts a daemon (setsid, env -i) after run-1's worker started, and
# needs it until run-1's attempt has ended (its lease is gone); run-1's worker exits then.
LANES_WORKER = START_DAEMON + """\
import sqlite3, sys
out, run_id = os.environ["TEST_OUT"], sys.argv[1]
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30)
def wait_for(check):
    while not check():
        time.sleep(0.01)
def done(state):
    db.execute("UPDATE phases SET state=? WHERE run_id=?", (state, run_id))
    db.commit()
if run_id == "run-1":
    open(os.path.join(out, "b-started"), "w").close()
    wait_for(lambda: os.path.exists(os.path.join(out, "daemon.pid")))
    done("COMPLETE")
    sys.exit(0)
wait_for(lambda: os.path.exists(os.path.join(out, "b-started")))
daemon = start_daemon(os.path.join(out, "daemon.tmp"))
os.rename(os.path.join(out, "daemon.tmp"), os.path.join(out, "daemon.pid"))
wait_for(lambda: db.execute(
    "SELECT count(*) FROM drainer_leases WHERE run_id='run-1'").fetchone()[0] == 0)
state = open(f"/proc/{daemon}/stat").read().split(") ")[1][0]
done("COMPLETE" if state != "Z" else "FAILED")  # killed by the other attempt's end: FAILED
"""


def test_an_escapee_is_left_to_its_own_attempt_while_other_attempts_run(env: Env) -> None:
    import psutil

    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    script = env.tmp / "lanes_worker.py"
    script.write_text(LANES_WORKER)
    try:
        proc = env.run_cli("run", *env.base_args(f"{sys.executable} {script} {{run_id}}"),
                           "--lanes", "2")
        daemon = int((env.out / "daemon.pid").read_text())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # run-1 ended first, while run-0's worker (which may have made the daemon) ran:
        # the daemon lived on until run-0's own attempt ended, and is listed there.
        assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
        _, root = only_session(env.sessions)
        results = {r["run_id"]: r for r in journal_results(root)}
        assert results["run-1"]["leaked_processes"] == []
        assert [p["pid"] for p in results["run-0"]["leaked_processes"]] == [daemon]
        assert not psutil.pid_exists(daemon) or \
            psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            psutil.Process(int((env.out / "daemon.pid").read_text())).kill()
