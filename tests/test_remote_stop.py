"""``drainer stop --session ID``: a running session, asked through the backlog database,
stops picking, stays resumable, and its resume drains what ``plan --resume`` shows. On SQLite
files and the local PostgreSQL, with real drainers and workers."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import anyio

from conftest import Env, journal_results, wait_for_worker_file
from drainer.backlog import open_backlog
from drainer.dburl import parse_database_url
from test_history import args

PHASES = [(f"run-{i}", "P1-ok", 0, "FAILED", None) for i in range(5)]


def _session_id(env: Env, proc: subprocess.Popen[str]) -> str:
    """The running session's id: the directory it made."""
    found = wait_for_worker_file(env.sessions, "batch-drain-*", proc)
    return found.name.removesuffix(".json")


def _request(url: str, session_id: str) -> Any:
    async def read() -> Any:
        async with open_backlog(parse_database_url(url)) as backlog:
            return await backlog.requests.read(session_id)

    return anyio.run(read)


def test_a_running_session_stops_on_request_and_resumes_as_planned(
        env: Env, make_url: Any) -> None:
    url = make_url(PHASES)
    hang = env.tmp / "hang"
    hang.touch()
    worker_env = env.worker_env(HANG_ONCE=str(hang))
    drain = args(env, url, "--max-attempts-per-phase", "1", "--stop-grace-seconds", "1",
                 plain=False)
    proc = subprocess.Popen([sys.executable, "-m", "drainer", "run", *drain], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env,
                            cwd=env.tmp)
    session_id = _session_id(env, proc)
    wait_for_worker_file(env.tmp, "hang.taken", proc)  # the first attempt hangs
    asked = env.run_cli("stop", "--session", "latest", "--session-dir", str(env.sessions),
                        "--database-url", url, "--host-name", "ops-laptop")
    out, _ = proc.communicate(timeout=60)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"session {session_id}: the stop request was taken by drainer on" in asked.stdout
    assert proc.returncode == 130, out  # stopped, resumable
    assert "drainer stop from ops-laptop" in out
    (first,) = journal_results(env.sessions / session_id)
    assert first["cancelled"] and _request(url, session_id).taken_at is not None

    plan = env.run_cli("plan", *drain, "--resume", env=worker_env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    planned = re.findall(r"^\s+\d+\. (\S+) / P1-ok ", plan.stdout, re.M)
    assert len(planned) == 4 and first["run_id"] not in planned
    again = env.run_cli("run", *drain, "--resume", env=worker_env)
    assert again.returncode == 1, again.stdout + again.stderr  # (the cancelled attempt)
    assert [r["run_id"] for r in journal_results(env.sessions / session_id)[1:]] == planned
    assert _request(url, session_id) is None  # the resume cleared the request it took


def test_a_request_no_session_takes_is_withdrawn_and_never_stops_a_resume(
        env: Env, make_url: Any) -> None:
    url = make_url(PHASES)
    asked = env.run_cli("stop", "--session", "batch-drain-20260101-000000-abcd",
                        "--database-url", url, "--wait", "0.3")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "no running drainer took the stop request within 0.3s, so it was withdrawn" \
        in asked.stdout
    assert _request(url, "batch-drain-20260101-000000-abcd") is None
    asked = env.run_cli("stop", "--session", "latest", "--session-dir", str(env.sessions),
                        "--database-url", url, "--wait", "0.3")
    assert asked.returncode == 1 and "no session is running in" in asked.stdout, asked.stdout

    # A session stopped by a signal, asked to stop while it is not running: its resume
    # clears the request and drains to the end.
    hang = env.tmp / "hang"
    hang.touch()
    worker_env = env.worker_env(HANG_ONCE=str(hang))
    drain = args(env, url, "--stop-grace-seconds", "0")
    proc = subprocess.Popen([sys.executable, "-m", "drainer", "run", *drain], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env,
                            cwd=env.tmp)
    session_id = _session_id(env, proc)
    wait_for_worker_file(env.tmp, "hang.taken", proc)
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    asked = env.run_cli("stop", "--session", session_id, "--database-url", url, "--wait", "0")
    assert asked.returncode == 0 and "stop requested" in asked.stdout, asked.stdout
    # (each attempt takes 0.6 s: the session polls for requests twice at least)
    again = env.run_cli("run", *drain, "--resume", env={**worker_env, "WORKER_SLEEP": "0.6"})
    assert again.returncode == 0, again.stdout + again.stderr  # (cancelled, drained since)
    assert "no candidates left" in again.stdout
    assert sorted(r["run_id"] for r in journal_results(env.sessions / session_id)
                  if r["success"]) == [f"run-{i}" for i in range(5)]


def test_bad_stop_requests_are_one_line_errors(env: Env, make_url: Any) -> None:
    url = make_url(PHASES)
    for bad, says in [(["--session", "../x"], "is not a session id"),
                      (["--session", "s", "--wait", "-1"], "--wait must be zero or more"),
                      (["--session", "s", "--database-url", "sqlite:///nowhere.db"],
                       "nowhere.db")]:
        proc = env.run_cli("stop", "--database-url", url, *bad)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
