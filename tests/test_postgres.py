"""Against the local PostgreSQL: the same contract, and the password never leaks."""

from __future__ import annotations

import os
import resource
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, drainer_view
from pg import create_database, drop_database, fetch_states, server_answers

_why_not = server_answers()
if _why_not is not None and os.environ.get("DRAINER_REQUIRE_PG"):
    raise RuntimeError(f"DRAINER_REQUIRE_PG is set but {_why_not}")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(_why_not is not None, reason=_why_not or ""),
]

PASSWORD = "Sup3r-s3cret-PW"

# A worker for PostgreSQL that prints its DATABASE_URL (password included) on both streams.
PG_WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    import asyncpg
    run_id, phase_id = sys.argv[1], sys.argv[2]
    url = os.environ["DATABASE_URL"]
    print("connecting to", url, flush=True)
    print("debug url:", url, file=sys.stderr, flush=True)
    async def main():
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE phases SET state='EXECUTING' WHERE run_id=$1 AND phase_id=$2",
                               run_id, phase_id)
            if phase_id.endswith("ok"):
                await conn.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=$1 AND phase_id=$2",
                                   run_id, phase_id)
            else:
                await conn.execute(
                    "UPDATE phases SET state='FAILED', last_failure_reason=$3 "
                    "WHERE run_id=$1 AND phase_id=$2", run_id, phase_id, "failed using " + url)
        finally:
            await conn.close()
    asyncio.run(main())
    sys.exit(0 if phase_id.endswith("ok") else 1)
    """
)


@pytest.fixture
def pg_db() -> Iterator[str]:
    name = create_database(
        [("run-a", "P1-ok", 0, "FAILED", None), ("run-b", "P1-bad", 0, "FAILED", None)]
    )
    try:
        yield name
    finally:
        drop_database(name)


def test_password_appears_in_no_output_and_no_file(env: Env, pg_db: str) -> None:
    worker = env.tmp / "pg_worker.py"
    worker.write_text(PG_WORKER)
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{pg_db}"
    args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
    args[args.index("--database-url") + 1] = url
    proc = env.run_cli("run", *args, "--max-attempts-per-phase", "1")
    assert proc.returncode == 1, proc.stderr  # one phase fails on purpose
    assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
    assert "postgresql://postgres:***@127.0.0.1:5432" in proc.stdout
    written = [p for p in env.sessions.rglob("*") if p.is_file()]
    assert len(written) >= 6  # snapshot, journal, 2 x 2 logs
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path
    # The workers did get the real password (they connected with it) ...
    states = fetch_states(pg_db)
    assert states[("run-a", "P1-ok")][0] == "COMPLETE"
    assert states[("run-b", "P1-bad")][0] == "FAILED"
    # ... and printed it, which the logs show redacted.
    logs = "".join(p.read_text() for p in written if p.name.endswith(".stdout.txt"))
    assert logs.count("postgresql://postgres:***@127.0.0.1") == 2


def test_unreachable_server_is_one_line_without_password(env: Env) -> None:
    args = env.base_args()
    args[args.index("--database-url") + 1] = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"
    proc = env.run_cli("run", *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("drainer: error: ")
    assert PASSWORD not in proc.stderr
    assert not env.sessions.exists()


def test_missing_tables_on_postgres(env: Env) -> None:
    name = create_database([])
    try:
        import asyncio

        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
            await conn.execute("DROP TABLE phases")
            await conn.close()

        asyncio.run(drop())
        args = env.base_args()
        args[args.index("--database-url") + 1] = f"postgresql://postgres@127.0.0.1:5432/{name}"
        proc = env.run_cli("run", *args)
        assert proc.returncode == 2
        assert "no 'phases' table" in proc.stderr
    finally:
        drop_database(name)


def test_drainers_starting_together_all_create_the_lease_table(pg_db: str) -> None:
    """Regression: concurrent CREATE TABLE IF NOT EXISTS races in PostgreSQL's catalog
    ("type drainer_leases already exists"); every starting drainer must get through."""
    import asyncio

    import asyncpg

    from drainer.backlog import LEASE_TABLE, open_backlog
    from drainer.dburl import parse_database_url

    url = f"postgresql://postgres@127.0.0.1:5432/{pg_db}"
    db = parse_database_url(url)

    async def drainer(start: asyncio.Barrier) -> None:
        async with open_backlog(db) as backlog:
            await start.wait()  # all connected, then all at once
            await backlog.leases.ensure_table()

    async def round_of(n: int) -> None:
        start = asyncio.Barrier(n)
        await asyncio.gather(*[drainer(start) for _ in range(n)])

    async def drop_leases() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {LEASE_TABLE}")
        finally:
            await conn.close()

    for _ in range(20):
        asyncio.run(drop_leases())
        asyncio.run(round_of(8))


def test_lease_table_created_meanwhile_by_another_tool_is_fine(pg_db: str) -> None:
    """Something that does not take drainer's lock (an older drainer, a migration) creates
    the table while drainer's CREATE waits on it: drainer finds the table and goes on."""
    import asyncio

    import asyncpg

    from drainer.backlog import LEASE_TABLE, open_backlog
    from drainer.dburl import parse_database_url

    url = f"postgresql://postgres@127.0.0.1:5432/{pg_db}"

    async def main() -> None:
        other = await asyncpg.connect(url)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute(f"CREATE TABLE {LEASE_TABLE} (run_id VARCHAR(512) PRIMARY KEY)")
            async with open_backlog(parse_database_url(url)) as backlog:
                create = asyncio.create_task(backlog.leases.ensure_table())
                # Wait until drainer's CREATE is blocked behind the other transaction.
                while not await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                ):
                    assert not create.done(), create
                    await asyncio.sleep(0.01)
                await tx.commit()
                await asyncio.wait_for(create, 30)
        finally:
            await other.close()

    asyncio.run(main())


def test_a_run_id_longer_than_512_characters_drains(env: Env) -> None:
    """drainer's lease columns hold any id the backlog holds, also in a lease table an
    older drainer created with VARCHAR(512)."""
    import asyncio

    import asyncpg

    long_run = "run-" + "x" * 600
    name = create_database([(long_run, "P1-ok", 0, "FAILED", None),
                            ("run-b", "P2-ok", 0, "FAILED", None)])
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"

        async def old_table() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "CREATE TABLE drainer_leases (run_id VARCHAR(512) PRIMARY KEY, "
                    "session_id VARCHAR(64) NOT NULL, attempt_id VARCHAR(64) NOT NULL, "
                    "phase_id VARCHAR(512) NOT NULL, host VARCHAR(255) NOT NULL, "
                    "pid INTEGER NOT NULL, acquired_at DOUBLE PRECISION NOT NULL, "
                    "heartbeat_at DOUBLE PRECISION NOT NULL, "
                    "expires_at DOUBLE PRECISION NOT NULL)")
            finally:
                await conn.close()

        asyncio.run(old_table())
        worker = env.tmp / "pg_worker.py"
        worker.write_text(PG_WORKER)
        args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
        args[args.index("--database-url") + 1] = url
        proc = env.run_cli("run", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        states = fetch_states(name)
        assert states[(long_run, "P1-ok")][0] == "COMPLETE"
        assert states[("run-b", "P2-ok")][0] == "COMPLETE"
    finally:
        drop_database(name)


# A worker that cuts every other connection to its database, as a failover does, while it
# runs and again just before it exits, leaving its phase EXECUTING.
DROPPING_WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    import asyncpg
    run_id, phase_id = sys.argv[1], sys.argv[2]
    async def main():
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        cut = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
               "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        try:
            await conn.execute("UPDATE phases SET state='EXECUTING' WHERE run_id=$1 AND phase_id=$2",
                               run_id, phase_id)
            print("cut", await conn.fetchval(cut), flush=True)
            await asyncio.sleep(1.0)  # the heartbeats meet the dropped connections
            print("cut", await conn.fetchval(cut), flush=True)
        finally:
            await conn.close()
    asyncio.run(main())
    sys.exit(3)
    """
)


def test_connections_dropped_as_an_attempt_ends_are_retried_and_nothing_is_stuck(
    env: Env, pg_db: str
) -> None:
    import asyncio

    import asyncpg

    worker = env.tmp / "dropping_worker.py"
    worker.write_text(DROPPING_WORKER)
    args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
    args[args.index("--database-url") + 1] = f"postgresql://postgres@127.0.0.1:5432/{pg_db}"
    proc = env.run_cli("run", *args, "--run-id", "run-a", "--max-attempts-per-phase", "1",
                       "--lease-ttl-seconds", "1.5")
    # Before: "reading a phase ... failed: connection is closed", exit 2, the phase stuck
    # EXECUTING with its lease already deleted.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "connection" not in proc.stderr, proc.stderr
    state, reason = fetch_states(pg_db)[("run-a", "P1-ok")]
    assert state == "FAILED" and (reason or "").startswith("drainer: worker exited with status 3")

    async def leases() -> int:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{pg_db}")
        try:
            return int(await conn.fetchval("SELECT count(*) FROM drainer_leases"))
        finally:
            await conn.close()

    assert asyncio.run(leases()) == 0


def _small_files(limit: int) -> Callable[[], None]:
    """For ``preexec_fn``: no file of this process may grow past ``limit`` bytes, as on a
    full disk. The database lives in the server, so only drainer's own files meet the limit
    (Python ignores SIGXFSZ, so a write past it is cut short or fails with EFBIG)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_stops_the_session_resumably_and_resume_finishes_it(env: Env) -> None:
    import asyncio
    import json
    import subprocess

    import asyncpg

    runs = [f"run-{i}" for i in range(6)]
    name = create_database([(run, "P-ok", 0, "FAILED", None) for run in runs])
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    worker = env.tmp / "pg_worker.py"
    worker.write_text(PG_WORKER)
    args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
    args[args.index("--database-url") + 1] = url

    def drain_until_full(limit: int) -> tuple[Path, list[dict[str, Any]]]:
        full = subprocess.run([sys.executable, "-m", "drainer", "run", *args],
                              capture_output=True, text=True, env=env.worker_env(),
                              cwd=env.tmp, timeout=120, preexec_fn=_small_files(limit))
        assert full.returncode == 2, full.stdout + full.stderr
        error = full.stderr.strip().splitlines()
        assert len(error) == 1 and "cannot append to journal" in error[0], full.stderr
        assert "resumable once there is room" in error[0]
        (journal,) = (p for p in env.sessions.glob("batch-drain-*/journal.jsonl")
                      if p not in seen)
        seen.add(journal)
        data = journal.read_bytes()
        assert data.endswith(b"\n")  # whole lines only: no torn line left behind
        events = [json.loads(line) for line in data.splitlines()]
        assert events[0]["type"] == "session_started"
        assert {s for s, _ in fetch_states(name).values()} <= {"COMPLETE", "FAILED"}

        resumed = env.run_cli("run", *args, "--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"[RESUME] session {journal.parent.name}" in resumed.stdout
        assert {s for s, _ in fetch_states(name).values()} == {"COMPLETE"}
        snap = drainer_view(env.sessions / f"{journal.parent.name}.json")
        drained = [r["run_id"] for r in snap["results"] if not r["interrupted"]]
        assert len(drained) == len(set(drained))  # no phase drained twice
        assert set(drained) | {r["run_id"] for r in snap["results"]} == set(runs)
        return journal, events

    async def fail_all_again() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE phases SET state = 'FAILED'")
        finally:
            await conn.close()

    seen: set[Path] = set()
    try:
        # About 2 KB of header and 3 KB per attempt: 10,000 bytes fill up at the third
        # attempt, with room left for the stop line (a resumable reason). (Tuned to the
        # lines' sizes: 8,000 bytes stopped working when the header grew.)
        journal, events = drain_until_full(10000)
        stops = [e for e in events if e["type"] == "session_stopped"]
        assert [e["stop_reason"] for e in stops] == ["error"]
        assert 2 <= sum(e["type"] == "attempt_finished" for e in events) < len(runs)
        # Room for the header and 100 bytes: the first attempt's line fails and the stop
        # line does not fit either; still one line of error, and resumable.
        asyncio.run(fail_all_again())
        header = journal.read_bytes().split(b"\n", 1)[0]
        _, events = drain_until_full(len(header) + 1 + 100)
        assert [e["type"] for e in events] == ["session_started"]
    finally:
        drop_database(name)


def test_a_role_that_may_not_alter_an_older_lease_table_still_drains(env: Env) -> None:
    # drainer_leases made by an older drainer (no worker columns), owned by another role:
    # this role may use it but not alter it. It drains, and says what the owner can run.
    import asyncio
    import uuid

    import asyncpg

    name = create_database([("run-0", "P1-ok", 0, "FAILED", None)])
    role = f"drainer_user_{uuid.uuid4().hex[:8]}"
    admin = f"postgresql://postgres@127.0.0.1:5432/{name}"

    async def setup() -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN")
            await conn.execute(
                "CREATE TABLE drainer_leases (run_id TEXT PRIMARY KEY, session_id VARCHAR(64) "
                "NOT NULL, attempt_id VARCHAR(64) NOT NULL, phase_id TEXT NOT NULL, host "
                "VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, acquired_at DOUBLE PRECISION NOT "
                "NULL, heartbeat_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION "
                "NOT NULL)")
            await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
                               f"GRANT USAGE ON SCHEMA public TO {role}")
        finally:
            await conn.close()

    async def drop_role() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await conn.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await conn.close()

    asyncio.run(setup())
    try:
        worker = env.tmp / "pg_worker.py"
        worker.write_text(PG_WORKER)
        args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
        args[args.index("--database-url") + 1] = f"postgresql://{role}@127.0.0.1:5432/{name}"
        proc = env.run_cli("run", *args, "--plain")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "drainer_leases has no worker_pid/worker_created columns" in proc.stdout
        # Nor may it create drainer_attempts: it drains unrecorded, and says so.
        assert "attempts are not recorded in the history" in proc.stdout
        assert "CREATE TABLE IF NOT EXISTS drainer_attempts" in proc.stdout
        assert fetch_states(name)[("run-0", "P1-ok")][0] == "COMPLETE"
        scoped = env.run_cli("run", *args, "--plain", "--attempts-scope", "history")
        assert scoped.returncode == 2, scoped.stdout + scoped.stderr
        assert "need the attempt history" in scoped.stderr
    finally:
        drop_database(name)
        asyncio.run(drop_role())
