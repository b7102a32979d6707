"""``drainer stop --session ID``: a running session, asked through the backlog database,
stops picking, stays resumable, and its resume drains what ``plan --resume`` shows. On SQLite
files and the local PostgreSQL, with real drainers and workers."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest
from sqlalchemy import text as sql_text

from conftest import Env, create_backlog, journal_results, wait_for_worker_file
from drainer.backlog import open_backlog
from drainer.backlog.requests import StopRequests
from drainer.cli import main
from drainer.dburl import parse_database_url
from drainer.errors import DatabaseError
from test_history import args

PHASES = [(f"run-{i}", "P1-ok", 0, "FAILED", None) for i in range(5)]


def _session_id(env: Env, proc: subprocess.Popen[str]) -> str:
    """The running session's id: the directory it made."""
    found = wait_for_worker_file(env.sessions, "batch-drain-*", proc)
    return found.name.removesuffix(".json")


def _requests(url: str, session_id: str) -> list[Any]:
    """(request id, requested by, taken by) of each request for ``session_id``."""
    stmt = sql_text("SELECT request_id, requested_by, taken_by FROM drainer_stop_requests "
                    "WHERE session_id = :s ORDER BY requested_at")

    async def read() -> list[Any]:
        async with open_backlog(parse_database_url(url)) as backlog:
            return await backlog.engine.run(
                lambda execute: [tuple(r) for r in execute(stmt, {"s": session_id}).all()])

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
    # Asked without waiting ("latest": the session running here), the session takes it.
    asked = env.run_cli("stop", "--session", "latest", "--session-dir", str(env.sessions),
                        "--database-url", url, "--host-name", "ops-laptop", "--wait", "0")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"session {session_id}: stop requested" in asked.stdout
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out  # stopped, resumable
    assert "drainer stop from ops-laptop" in out
    (first,) = journal_results(env.sessions / session_id)
    assert first["cancelled"] and [r[1] for r in _requests(url, session_id)] == ["ops-laptop"]
    # Stopped, it takes no more: a later request waits for nobody and is withdrawn.
    again = env.run_cli("stop", "--session", session_id, "--database-url", url,
                        "--wait", "0.3")
    assert again.returncode == 1 and "so it was withdrawn" in again.stdout, again.stdout

    plan = env.run_cli("plan", *drain, "--resume", env=worker_env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    planned = re.findall(r"^\s+\d+\. (\S+) / P1-ok ", plan.stdout, re.M)
    assert len(planned) == 4 and first["run_id"] not in planned
    again = env.run_cli("run", *drain, "--resume", env=worker_env)
    assert again.returncode == 1, again.stdout + again.stderr  # (the cancelled attempt)
    assert [r["run_id"] for r in journal_results(env.sessions / session_id)[1:]] == planned
    assert _requests(url, session_id) == []  # the resume cleared the request it took


# On SQLite only (the suite's time): the requests' statements run on PostgreSQL in the tests
# above and below.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_request_no_session_takes_is_withdrawn_and_never_stops_a_resume(
        env: Env, make_url: Any) -> None:
    url = make_url(PHASES)
    nobody = "batch-drain-20260101-000000-abcd"
    left = env.run_cli("stop", "--session", nobody, "--database-url", url, "--wait", "0")
    assert left.returncode == 0 and "stop requested" in left.stdout, left.stdout
    asked = env.run_cli("stop", "--session", nobody, "--database-url", url, "--wait", "0.3")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "no running drainer took the stop request in" in asked.stdout
    assert "so it was withdrawn" in asked.stdout
    # It withdrew its own request only: the one left without waiting stays, and status
    # lists it.
    assert [r[2] for r in _requests(url, nobody)] == [None]
    status = env.run_cli("status", "--database-url", url, "--session-dir", str(env.sessions))
    assert "Stop requests waiting (drainer stop): 1" in status.stdout, status.stdout
    assert f"session {nobody}: asked by" in status.stdout
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


def test_a_failing_look_for_requests_does_not_end_the_drain(env: Env) -> None:
    # The table vanishes while a session runs: it says so once and drains on (it used to
    # end the session with "error", killing the attempt in flight).
    create_backlog(env.db, [(f"run-{i}", f"P{i}", 0, "FAILED", None) for i in range(3)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args(), "--plain"], text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND_BY_PHASE="P0=gated"))
    wait_for_worker_file(env.out, "started.P0", proc)
    conn = sqlite3.connect(env.db, timeout=30)
    conn.execute("DROP TABLE drainer_stop_requests")
    conn.commit()
    conn.close()
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[WARN] looking for stop requests" in line:
            break
    (env.out / "release").touch()
    rest, _ = proc.communicate(timeout=60)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out
    assert out.count("[WARN] looking for stop requests") == 1  # once per outage
    assert "ok 3  failed 0" in out


@pytest.mark.parametrize("table", ["missing", "not granted"])
def test_a_role_that_may_not_use_the_table_drains_and_resumes(env: Env, table: str) -> None:
    # The leases and history exist, made by their owner; this role may use them but may not
    # create drainer_stop_requests, or it exists without a GRANT to this role. It drains
    # with a warning, and its interrupted session resumes (the resume once failed there,
    # every time).
    import asyncio
    import uuid

    import asyncpg

    from pg import create_database, drop_database, require_server

    require_server()
    name = create_database(PHASES)
    role = f"drainer_user_{uuid.uuid4().hex[:8]}"
    admin = f"postgresql://postgres@127.0.0.1:5432/{name}"

    async def prepare() -> None:
        async with open_backlog(parse_database_url(admin)) as backlog:
            await backlog.prepare_for_writes()
        conn = await asyncpg.connect(admin)
        try:
            if table == "missing":
                await conn.execute("DROP TABLE drainer_stop_requests")
            await conn.execute(f"CREATE ROLE {role} LOGIN")
            await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
                               f"GRANT USAGE ON SCHEMA public TO {role}")
            if table == "not granted":
                await conn.execute(f"REVOKE ALL ON drainer_stop_requests FROM {role}")
        finally:
            await conn.close()

    async def drop_role() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await conn.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await conn.close()

    asyncio.run(prepare())
    try:
        url = f"postgresql://{role}@127.0.0.1:5432/{name}"
        hang = env.tmp / "hang"
        hang.touch()
        worker_env = env.worker_env(HANG_ONCE=str(hang))
        drain = args(env, url, "--stop-grace-seconds", "0")
        proc = subprocess.Popen([sys.executable, "-m", "drainer", "run", *drain], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=worker_env, cwd=env.tmp)
        wait_for_worker_file(env.tmp, "hang.taken", proc)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        if table == "missing":
            assert "cannot reach this session" in out
            assert "CREATE TABLE IF NOT EXISTS drainer_stop_requests" in out
        again = env.run_cli("run", *drain, "--resume", env=worker_env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "cannot reach this session" in again.stdout
        assert "no candidates left" in again.stdout
    finally:
        drop_database(name)
        asyncio.run(drop_role())


def test_an_interrupted_stop_command_withdraws_its_request(env: Env) -> None:
    # Ctrl-C while `drainer stop` waits: the operator gave up, so the request must not stay
    # for a session to take later (it used to stay, and status listed it forever).
    create_backlog(env.db, PHASES)
    nobody = "batch-drain-20260101-000000-abcd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "stop", "--session", nobody, "--database-url",
         f"sqlite:///{env.db}", "--wait", "60"], text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=env.tmp, env=env.worker_env())
    conn = sqlite3.connect(env.db, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:  # until its request is in the table
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            with contextlib.suppress(sqlite3.OperationalError):  # (no table yet)
                if conn.execute("SELECT count(*) FROM drainer_stop_requests").fetchone()[0]:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert conn.execute("SELECT count(*) FROM drainer_stop_requests").fetchone()[0] == 0
    finally:
        conn.close()


def test_ctrl_c_as_the_request_is_written_still_withdraws_it(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # The race behind a failed CI run of the test above: Ctrl-C cancels `anyio.run`'s task
    # where it awaits, and the row can be committed while the command still awaits the
    # write's thread. Here the signal comes at exactly that point, every time.
    create_backlog(env.db, PHASES)
    write = StopRequests.request

    async def interrupted(self: StopRequests, *given: Any) -> Any:
        written = await write(self, *given)
        signal.raise_signal(signal.SIGINT)  # asyncio's runner cancels the task ...
        await anyio.lowlevel.checkpoint()  # ... at its next await, still in the write
        return written

    monkeypatch.setattr(StopRequests, "request", interrupted)
    # (Python's own Ctrl-C handling, even where pytest was started with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["stop", "--session", "batch-drain-20260101-000000-abcd",
                     "--database-url", f"sqlite:///{env.db}", "--wait", "60",
                     "--session-dir", str(env.sessions)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    with contextlib.closing(sqlite3.connect(env.db)) as conn:
        assert conn.execute("SELECT count(*) FROM drainer_stop_requests").fetchone()[0] == 0


def test_a_write_that_failed_by_itself_is_reported_without_a_withdraw(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # A write that fails (a lock held past the retry window) wrote nothing; withdrawing it
    # anyway waited one more busy timeout before the error was shown (30 s by default).
    create_backlog(env.db, PHASES)
    withdrawn: list[str] = []

    async def failed(self: StopRequests, *_given: Any) -> Any:
        raise DatabaseError("requesting a stop in drainer_stop_requests failed: database is "
                            "locked")

    async def withdraw(self: StopRequests, request_id: str) -> bool:
        withdrawn.append(request_id)
        return False

    monkeypatch.setattr(StopRequests, "request", failed)
    monkeypatch.setattr(StopRequests, "withdraw", withdraw)
    code = main(["stop", "--session", "batch-drain-20260101-000000-abcd", "--database-url",
                 f"sqlite:///{env.db}", "--wait", "60", "--session-dir", str(env.sessions)])
    assert code == 2 and withdrawn == []
