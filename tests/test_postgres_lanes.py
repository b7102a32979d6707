"""Several drainers, several lanes each, one PostgreSQL backlog; one drainer is SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator

import psutil
import pytest

from conftest import Env
from pg import ADMIN_URL, create_database, drop_database, server_answers

_why_not = server_answers()
if _why_not is not None and os.environ.get("DRAINER_REQUIRE_PG"):
    raise RuntimeError(f"DRAINER_REQUIRE_PG is set but {_why_not}")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(_why_not is not None, reason=_why_not or ""),
]

# Logs each attempt's span in worker_log; with HANG_ONCE set, the first such worker to claim
# the one-shot flag leaves its phase EXECUTING and hangs (its drainer is then killed).
PG_WORKER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import asyncpg
    run_id, phase_id = sys.argv[1], sys.argv[2]
    async def main():
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        log_id = await conn.fetchval(
            "INSERT INTO worker_log (run_id, phase_id, session_id, pid, started) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            run_id, phase_id, os.environ["DRAINER_SESSION_ID"], os.getpid(), time.time())
        await conn.execute("UPDATE phases SET state='EXECUTING' WHERE run_id=$1 AND phase_id=$2",
                           run_id, phase_id)
        hang = None
        if os.environ.get("HANG_ONCE"):
            # One transaction: the test, which waits for the flag, sees the hang recorded too.
            async with conn.transaction():
                hang = await conn.fetchval(
                    "UPDATE flags SET armed=false WHERE name='hang' AND armed RETURNING name")
                if hang:
                    await conn.execute("UPDATE worker_log SET hung=true WHERE id=$1", log_id)
        if hang:
            await conn.close()
            time.sleep(600)
        await asyncio.sleep(0.05)
        # One transaction: a worker killed with its drainer leaves both or neither.
        async with conn.transaction():
            await conn.execute(
                "UPDATE phases SET state='COMPLETE' WHERE run_id=$1 AND phase_id=$2",
                run_id, phase_id)
            await conn.execute("UPDATE worker_log SET ended=$2 WHERE id=$1", log_id, time.time())
        await conn.close()
    asyncio.run(main())
    """
)


def _sql(db: str, statement: str) -> list[tuple[object, ...]]:
    import asyncpg

    async def go() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + db)
        try:
            return [tuple(r) for r in await conn.fetch(statement)]
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def pg_backlog() -> Iterator[str]:
    phases = [(f"run-{r:02d}", f"P{p}", p, "FAILED", None) for r in range(30) for p in range(5)]
    name = create_database(phases)
    _sql(name, "CREATE TABLE worker_log (id SERIAL PRIMARY KEY, run_id TEXT, phase_id TEXT, "
               "session_id TEXT, pid INT, started DOUBLE PRECISION, ended DOUBLE PRECISION, "
               "hung BOOLEAN NOT NULL DEFAULT false)")
    _sql(name, "CREATE TABLE flags (name TEXT PRIMARY KEY, armed BOOLEAN)")
    _sql(name, "INSERT INTO flags VALUES ('hang', true)")
    try:
        yield name
    finally:
        drop_database(name)


def test_three_drainers_share_a_backlog_and_survive_one_being_killed(
    env: Env, pg_backlog: str
) -> None:
    worker = env.tmp / "pg_worker.py"
    worker.write_text(PG_WORKER)
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_backlog}"
    procs: dict[str, subprocess.Popen[str]] = {}
    for name in ("a", "b", "c"):
        args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
        args[args.index("--database-url") + 1] = url
        args[args.index("--session-dir") + 1] = str(env.tmp / f"sessions-{name}")
        extra = ["--env", "HANG_ONCE=1"] if name == "a" else []
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "drainer", "run", *args, *extra, "--lanes", "4",
             "--batch-size", "1000", "--lease-ttl-seconds", "4",
             "--max-fingerprint-repeats", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
            env=env.worker_env(),
        )
    # Kill drainer a while its hung worker holds a phase EXECUTING under a's live lease.
    deadline = time.monotonic() + 120
    while _sql(pg_backlog, "SELECT armed FROM flags")[0][0]:
        assert time.monotonic() < deadline and procs["a"].poll() is None
        time.sleep(0.05)
    procs["a"].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs["a"].communicate()  # reaps it and closes its pipes
    outputs = {n: procs[n].communicate(timeout=300) for n in ("b", "c")}
    for n, (out, err) in outputs.items():
        assert procs[n].returncode == 0, (n, out[-3000:], err)

    rows = _sql(pg_backlog, "SELECT run_id, phase_id, pid, started, ended FROM worker_log")
    # Only a's workers never finished: the hung one, and those of its other lanes that were
    # running when it was killed (they die with it: PR_SET_PDEATHSIG).
    unfinished = _sql(pg_backlog, "SELECT DISTINCT session_id FROM worker_log "
                                  "WHERE ended IS NULL")
    assert len(unfinished) == 1
    [(hung_run, hung_phase, hung_pid)] = _sql(
        pg_backlog, "SELECT run_id, phase_id, pid FROM worker_log WHERE hung")
    with contextlib.suppress(psutil.NoSuchProcess):  # it died with its drainer
        psutil.Process(int(hung_pid)).wait(timeout=30)  # type: ignore[call-overload]
    try:
        # Every phase completed exactly once, across the three drainers.
        done: dict[tuple[object, object], int] = defaultdict(int)
        for run, phase, _pid, _start, end in rows:
            if end is not None:
                done[(run, phase)] += 1
        assert len(done) == 150 and set(done.values()) == {1}
        states = _sql(pg_backlog, "SELECT state, count(*) FROM phases GROUP BY state")
        assert states == [("COMPLETE", 150)]
        # Per-run exclusivity: no two finished attempts of a run overlap in time.
        spans: dict[object, list[tuple[float, float]]] = defaultdict(list)
        for run, _phase, _pid, start, end in rows:
            if end is not None:
                spans[run].append((float(start), float(end)))  # type: ignore[arg-type]
        for run, items in spans.items():
            items.sort()
            for (_, end), (start, _) in itertools.pairwise(items):
                assert start >= end, f"{run} drained twice at once"
        # The hung phase was restored by a survivor after a's lease expired, then drained.
        (reason,) = _sql(pg_backlog, "SELECT last_failure_reason FROM phases WHERE "
                                     f"run_id='{hung_run}' AND phase_id='{hung_phase}'")[0]
        assert str(reason).startswith("drainer: lease expired")
        redo = [r for r in rows if (r[0], r[1]) == (hung_run, hung_phase) and r[4] is not None]
        assert float(redo[0][3]) > killed_at  # type: ignore[arg-type]
        assert any(f"[LEASE] expired lease of {hung_run}" in out for out, _ in outputs.values())
        assert _sql(pg_backlog, "SELECT count(*) FROM drainer_leases") == [(0,)]
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(int(hung_pid)).kill()  # type: ignore[call-overload]
