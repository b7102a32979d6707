"""SQLite's hot path: one round trip at a time on each kept connection."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy
from sqlalchemy import text

from drainer.backlog._sqlite import RawSqlite

pytestmark = pytest.mark.anyio


async def test_two_round_trips_never_share_a_connection_even_past_the_limiter(
    tmp_path: Path,
) -> None:
    # anyio before 4.15 (the lowest pins, and Autopack's 4.12) now and then lets a second
    # task past a limiter of one that was just released; CI saw two threads on the write
    # connection ("cannot commit - no transaction is active", and a crash). A limiter of two here lets every round trip
    # past, as that race does: the connection must still serve one at a time, and each
    # transaction commits whole.
    db = tmp_path / "backlog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (round_trip INTEGER, step INTEGER)")
    raw = RawSqlite(db, busy_timeout=5, cache_kib=1024)
    raw._limiters[True] = anyio.CapacityLimiter(2)
    insert = text("INSERT INTO t VALUES (:round_trip, :step)")
    inside, most_inside, lock = 0, 0, threading.Lock()
    second_in = threading.Event()

    def body(n: int, execute: Any) -> None:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
            if inside == 2:
                second_in.set()
        execute(insert, {"round_trip": n, "step": 1})
        second_in.wait(0.3)  # room for the other round trip to come in, were it let in
        execute(insert, {"round_trip": n, "step": 2})
        with lock:
            inside -= 1

    try:
        async with anyio.create_task_group() as tg:
            for n in range(2):
                tg.start_soon(lambda n=n: raw.run(lambda ex: body(n, ex), write=True,
                                                  transaction=True))
    finally:
        raw.close()
    assert most_inside == 1
    with sqlite3.connect(db) as conn:
        rows = sorted(conn.execute("SELECT round_trip, step FROM t"))
    assert rows == [(0, 1), (0, 2), (1, 1), (1, 2)]


async def test_commits_are_synced_so_the_database_is_never_behind_the_journal(
    tmp_path: Path,
) -> None:
    # In WAL mode, NORMAL would skip the fsync per commit (0.2 ms here), but a power loss
    # could then undo a settle whose journal line survived: the phase would stay EXECUTING
    # while the journal says it was restored. drainer's connections keep FULL (2).
    db = tmp_path / "backlog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE t (x INTEGER)")
    raw = RawSqlite(db, busy_timeout=5, cache_kib=1024)
    try:
        for write in (False, True):
            got = await raw.run(lambda ex: ex(text("PRAGMA synchronous")).scalar(),
                                write=write, transaction=False)
            assert got == 2
    finally:
        raw.close()


def test_closing_never_closes_a_connection_a_round_trip_is_using(tmp_path: Path) -> None:
    # A second Ctrl-C on `drainer stop` while its write waited on a lock: asyncio's runner
    # tore the event loop down past every shield, the connections were closed under the
    # thread still using one, and the process crashed (SIGSEGV) with the request left behind.
    db = tmp_path / "backlog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    raw = RawSqlite(db, busy_timeout=4, cache_kib=1024)
    insert = text("INSERT INTO t VALUES (1)")
    raw._run(lambda execute: execute(insert), True, False)  # opens the write connection
    (used,) = raw._conns.values()
    started = threading.Event()
    used.set_trace_callback(lambda _sql: started.set())  # called inside sqlite3_step
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the round trip below waits on this lock
    ended: list[str] = []

    def round_trip() -> None:
        try:
            raw._run(lambda execute: execute(insert), True, False)
            ended.append("committed")
        except Exception as exc:
            ended.append(str(exc))

    thread = threading.Thread(target=round_trip)
    thread.start()
    try:
        assert started.wait(30)
        raw.close()  # waits a moment, then leaves the connection to its round trip
        assert thread.is_alive()  # (it waits for the lock for up to 4 s)
        assert used.total_changes == 1  # still open: closing it would have raised here
        with pytest.raises(Exception, match="closed its connections"):
            raw._run(lambda execute: execute(insert), True, False)  # none opened anew
    finally:
        thread.join()
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(ended) == 1 and "database is locked" in ended[0]


#: a statement that never ends by itself: only an interrupt (or a cancel) stops it
ENDLESS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c")


def _engine(db: Path, limit: float = 0.2) -> Any:
    from drainer.backlog._engine import Engine
    from drainer.dburl import parse_database_url

    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x UNIQUE)")
    engine = Engine(parse_database_url(f"sqlite:///{db}"))
    engine.statement_limit, engine.retry_within = limit, 5.0
    return engine


async def _closed(engine: Any, threads_before: set[threading.Thread]) -> None:
    """Close ``engine``; should a statement run on in aiosqlite's thread, it would report to
    this event loop: wait for that thread to end while the loop is still open."""
    await engine.aclose()
    started = {thread for thread in set(threading.enumerate()) - threads_before
               if thread.name != "AnyIO worker thread"}  # (anyio's pool: they idle on)

    def join() -> None:
        for thread in started:
            thread.join(60)

    await anyio.to_thread.run_sync(join)
    assert not any(thread.is_alive() for thread in started)


async def test_a_statement_past_its_time_limit_fails_once_with_no_answer(
    tmp_path: Path,
) -> None:
    # The statement limit cuts off a read that would never end. With SQLAlchemy 2.0 (the
    # lowest pins, Autopack's 2.0.45) a cut by cancellation left aiosqlite's connection
    # closed; the rollback on the way out then raised "no active connection", which replaced
    # the cancellation and was retried as a transient fault, for the whole retry window. Now
    # the statement is interrupted instead, and SQLAlchemy keeps its connection.
    from drainer.errors import DatabaseError

    threads_before = set(threading.enumerate())
    engine = _engine(tmp_path / "backlog.db")
    invalidated: list[Any] = []
    sqlalchemy.event.listen(engine._engine, "invalidate",
                            lambda *args: invalidated.append(args))
    tries = 0

    async def read() -> Any:
        nonlocal tries
        tries += 1
        async with engine.read() as conn:
            return (await conn.execute(text(ENDLESS))).scalar_one()

    try:
        with pytest.raises(DatabaseError, match=r"no answer within 0\.2s") as caught:
            await engine.retry("reading t from", read)
        assert tries == 1 and not caught.value.transient
        assert "interrupted" in str(caught.value.__cause__)
        assert invalidated == []
    finally:
        await _closed(engine, threads_before)


def test_a_process_whose_statement_was_cut_exits(tmp_path: Path) -> None:
    # With SQLAlchemy 2.1 and aiosqlite 0.22, cancelling the statement left SQLAlchemy's
    # graceful close of aiosqlite's connection waiting, as a task, for a thread that had
    # already stopped: asyncio's runner, cancelling that task at the end, then waited for it
    # forever, and the process never exited. It must exit, with the one-line error.
    db = tmp_path / "backlog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    script = f"""
import anyio
from sqlalchemy import text
from drainer.backlog._engine import Engine
from drainer.dburl import parse_database_url
from drainer.errors import DatabaseError

async def main():
    engine = Engine(parse_database_url({f"sqlite:///{db}"!r}))
    engine.statement_limit, engine.retry_within = 0.2, 5.0

    async def read():
        async with engine.read() as conn:
            return (await conn.execute(text({ENDLESS!r}))).scalar_one()

    try:
        await engine.retry("reading t from", read)
    except DatabaseError as exc:
        print(exc)
    finally:
        await engine.aclose()

anyio.run(main)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("failed: no answer within 0.2s")


async def test_a_round_trip_past_its_time_limit_is_interrupted(tmp_path: Path) -> None:
    # The hot path's own connections (engine.run) are cut the same way (before, nothing cut
    # them: the wait for the thread cannot be cancelled): the round trip fails once, and the
    # next one runs on a fresh connection.
    from drainer.errors import DatabaseError

    engine = _engine(tmp_path / "backlog.db")
    try:
        with pytest.raises(DatabaseError, match=r"no answer within 0\.2s"):
            await engine.retry("reading t from", lambda: engine.run(
                lambda execute: execute(text(ENDLESS)).scalar_one()))
        count = await engine.retry("reading t from", lambda: engine.run(
            lambda execute: execute(text("SELECT count(*) FROM t")).scalar_one()))
        assert count == 0
    finally:
        await engine.aclose()


@pytest.mark.parametrize("path", ["sqlalchemy", "round trip"])
async def test_a_statement_started_after_the_limit_is_cut_too(tmp_path: Path,
                                                               path: str) -> None:
    # SQLite ignores an interrupt that comes while no statement runs: here the limit passes
    # between two statements of one try, and the second would never end. The interrupt is
    # repeated until the try ends, so the second statement is cut too.
    from drainer.errors import DatabaseError

    threads_before = set(threading.enumerate())
    engine = _engine(tmp_path / "backlog.db", limit=0.05)

    async def through_sqlalchemy() -> Any:
        async with engine.read() as conn:
            await conn.execute(text("SELECT 1"))
            await anyio.sleep(0.3)  # past the limit, between two statements
            return (await conn.execute(text(ENDLESS))).scalar_one()

    def round_trip(execute: Any) -> Any:
        execute(text("SELECT 1"))
        time.sleep(0.3)  # past the limit, between two statements
        return execute(text(ENDLESS)).scalar_one()

    try:
        with pytest.raises(DatabaseError, match=r"no answer within 0\.05s"):
            if path == "sqlalchemy":
                await engine.retry("reading t from", through_sqlalchemy)
            else:
                await engine.retry("reading t from", lambda: engine.run(round_trip))
    finally:
        await _closed(engine, threads_before)


@pytest.mark.parametrize("path", ["sqlalchemy", "round trip"])
async def test_an_error_after_the_limit_keeps_its_own_message(tmp_path: Path,
                                                              path: str) -> None:
    # Only a statement SQLite interrupted becomes "no answer": a real error in a try that ran
    # past its limit (here a UNIQUE violation) is reported as itself.
    from drainer.errors import DatabaseError

    engine = _engine(tmp_path / "backlog.db", limit=0.05)
    insert = text("INSERT INTO t VALUES (1)")

    async def through_sqlalchemy() -> None:
        async with engine.write() as conn:
            await conn.execute(insert)
            await anyio.sleep(0.3)
            await conn.execute(insert)

    def round_trip(execute: Any) -> None:
        execute(insert)
        time.sleep(0.3)
        execute(insert)

    try:
        with pytest.raises(DatabaseError, match="UNIQUE constraint failed") as caught:
            if path == "sqlalchemy":
                await engine.retry("writing t in", through_sqlalchemy)
            else:
                await engine.retry("writing t in", lambda: engine.run(
                    round_trip, write=True, transaction=True))
        assert "no answer" not in str(caught.value)
    finally:
        await engine.aclose()
