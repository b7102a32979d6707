"""Regression tests for failure modes found in review: each failed before its fix."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import Env, create_backlog, only_session, phase_states, wait_for_worker_file
from drainer.config import DrainConfig
from drainer.models import Attempt
from drainer.policy import Policy


def test_database_failure_mid_drain_is_one_line_exit_2_and_resumable(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    dropper = env.tmp / "dropper.py"
    dropper.write_text(
        "import os, sqlite3\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:])\n"
        "db.execute('DROP TABLE drainer_leases'); db.commit()\n"
    )
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {dropper}"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    snapshot, _ = only_session(env.sessions)
    assert json.loads(snapshot.read_text())["stop_reason"] == "error"
    assert "Resume with: python -m drainer run --resume" in proc.stdout
    # Resuming reconciles the attempt that could not be finished, then drains the rest.
    resumed = env.run_cli("run", *env.base_args(), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert "[RECONCILED]" in resumed.stdout
    assert {s for s, _ in phase_states(env.db).values()} <= {"COMPLETE", "FAILED"}


def test_resume_refuses_a_session_another_drainer_is_running(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    first = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND="gated"),
    )
    try:
        wait_for_worker_file(env.out, "started.P", first)
        (session_dir,) = [d for d in env.sessions.glob("batch-drain-*") if d.is_dir()]
        second = env.run_cli("run", *env.base_args(), "--resume", session_dir.name)
        assert second.returncode == 2
        assert "being drained by another drainer process" in second.stderr
        latest = env.run_cli("run", *env.base_args(), "--resume")  # skips the live one
        assert "no incomplete session" in latest.stdout
    finally:
        (env.out / "release").write_text("")
        _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    snap = json.loads((env.sessions / f"{session_dir.name}.json").read_text())
    assert [r["success"] for r in snap["results"]] == [True]  # the live attempt was left alone


def test_a_torn_journal_line_survives_two_resumes(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    env.run_cli("run", *env.base_args(), env=env.worker_env(DRAINER_CRASH_AT="before_spawn:2"))
    (session_dir,) = [d for d in env.sessions.glob("batch-drain-*") if d.is_dir()]
    with open(session_dir / "journal.jsonl", "ab") as fh:
        fh.write(b'{"type": "attempt_fini')  # a write cut short by the crash
    again = env.run_cli("run", *env.base_args(), "--resume",
                        env=env.worker_env(DRAINER_CRASH_AT="before_spawn:1"))
    assert again.returncode == -signal.SIGKILL
    final = env.run_cli("run", *env.base_args(), "--resume", session_dir.name)
    assert final.returncode == 0, final.stderr
    snap = json.loads((env.sessions / f"{session_dir.name}.json").read_text())
    assert sorted(r["run_id"] for r in snap["results"] if not r["interrupted"]) == [
        "run-0", "run-1", "run-2"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_secrets_never_reach_the_journal_or_snapshot(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        cmd = f"{sys.executable} {env.worker} {{run_id}} {{phase_id}} --token tok-SECRET-123"
        proc = env.run_cli(
            "run", *env.base_args(cmd), "--env", "API_TOKEN=tok-SECRET-123",
            "--api-url", f"http://bob:pw-SECRET-456@127.0.0.1:{port}/",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    written = b"".join(p.read_bytes() for p in env.sessions.rglob("*") if p.is_file())
    assert b"tok-SECRET-123" not in written and b"pw-SECRET-456" not in written
    assert b"tok-SECRET-123" not in (proc.stdout + proc.stderr).encode()


def _lease_thief(env: Env, takeover: str) -> Path:
    thief = env.tmp / "thief.py"
    thief.write_text(
        "import os, sqlite3, time\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:], timeout=30)\n"
        "db.execute(\"UPDATE phases SET state='EXECUTING'\"); db.commit()\n"
        f"db.execute({takeover!r}); db.commit()\n"
        "time.sleep(600)\n"
    )
    return thief


def test_a_lost_lease_stops_the_attempt_and_a_phase_nobody_holds_is_restored(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    thief = _lease_thief(env, "DELETE FROM drainer_leases")  # the lease just vanished
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {thief}"),
                       "--lease-ttl-seconds", "1.5", "--max-attempts-per-phase", "1")
    assert "[LEASE] lost the lease of run-0" in proc.stdout
    (result,) = json.loads(only_session(env.sessions)[0].read_text())["results"]
    assert result["cancelled"] is True and result["state_restored"] is True
    assert "lease lost" in result["error_message"]
    state, reason = phase_states(env.db)[("run-0", "P")]
    assert state == "FAILED" and (reason or "").startswith("drainer: lease lost")


def test_a_lost_lease_leaves_the_phase_to_the_drainer_that_took_the_run(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    thief = _lease_thief(env, "UPDATE drainer_leases SET attempt_id = 'other-drainer', "
                              "expires_at = expires_at + 3600")
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {thief}"),
                       "--lease-ttl-seconds", "1.5", "--max-attempts-per-phase", "1")
    assert "[LEASE] lost the lease of run-0" in proc.stdout
    (result,) = json.loads(only_session(env.sessions)[0].read_text())["results"]
    assert result["cancelled"] is True and result["state_restored"] is False
    assert phase_states(env.db)[("run-0", "P")][0] == "EXECUTING"  # the new holder's business


def test_a_run_stopped_by_two_rules_records_one_reason_everywhere() -> None:
    config = DrainConfig(database_url="sqlite:///x.db", max_timeouts_per_run=2,
                         max_fingerprint_repeats=2)
    policy = Policy(config)
    stops = []
    for n in (1, 2):
        attempt = Attempt(run_id="r", phase_id=f"p{n}", phase_index=n, initial_state="FAILED",
                          attempt_id=str(n), attempt_number=1, lane=1, started_at="",
                          timed_out=True, final_state="FAILED",
                          failure_fingerprint="FAILED|timeout|x")
        run_stops, _ = policy.observe(attempt)
        stops += run_stops
    assert [s.reason for s in stops] == ["max_timeouts_per_run"]
    assert policy.stopped_runs == {"r": "max_timeouts_per_run"}


