"""A lease that cannot be renewed is lost: the attempt stops at once, and its phase is
restored only when no other drainer has taken the run over."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

from conftest import Env, create_backlog, drainer_view, only_session, phase_states


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
    (result,) = drainer_view(only_session(env.sessions)[0])["results"]
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
    (result,) = drainer_view(only_session(env.sessions)[0])["results"]
    assert result["cancelled"] is True and result["state_restored"] is False
    assert phase_states(env.db)[("run-0", "P")][0] == "EXECUTING"  # the new holder's business


def test_a_settle_that_fails_keeps_the_lease_and_a_new_session_restores_the_phase(
        env: Env) -> None:
    # The worker leaves its phase EXECUTING; the database refuses drainer's restore (a
    # trigger), so settling the attempt fails for good: drainer stops (exit 2) without
    # deleting the lease, and the lease's expiry lets the next session (not only --resume)
    # restore and drain the phase. Released instead, the phase would be stuck EXECUTING.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    conn = sqlite3.connect(env.db, isolation_level=None)
    conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON phases WHEN NEW.last_failure_reason "
                 "LIKE '%drainer:%' BEGIN SELECT RAISE(ABORT, 'restores refused'); END")
    leaver = env.tmp / "leaver.py"
    leaver.write_text(
        "import os, sqlite3\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:], timeout=30)\n"
        "db.execute(\"UPDATE phases SET state='EXECUTING'\"); db.commit()\n"
        "raise SystemExit(3)\n"
    )
    args = ["--lease-ttl-seconds", "1.5", "--max-attempts-per-phase", "1"]
    try:
        first = env.run_cli("run", *env.base_args(f"{sys.executable} {leaver}"), *args)
        assert first.returncode == 2, first.stdout + first.stderr
        assert first.stderr.count("\n") == 1 and "restores refused" in first.stderr
        assert phase_states(env.db)[("run-0", "P")][0] == "EXECUTING"
        assert conn.execute("SELECT run_id FROM drainer_leases").fetchall() == [("run-0",)]
        conn.execute("DROP TRIGGER refuse")
        while conn.execute("SELECT count(*) FROM drainer_leases WHERE expires_at >= "
                           "(julianday('now') - 2440587.5) * 86400.0").fetchone()[0]:
            time.sleep(0.05)  # the kept lease expires one TTL after its last heartbeat
    finally:
        conn.close()
    second = env.run_cli("run", *env.base_args(), *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "expired lease of run-0" in second.stdout and "swept" in second.stdout
    assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
