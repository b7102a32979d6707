"""The lease contract of DESIGN.md §6, straight against the store, on SQLite and PostgreSQL:
a free run is claimed, a live lease blocks, an expired one is taken over after its phase is
restored, and the claim reads the phase and its telemetry under the lease."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import create_backlog
from drainer.backlog import Backlog, Claim, Lease, open_backlog
from drainer.config import DEFAULT_TELEMETRY_TABLES
from drainer.dburl import parse_database_url
from drainer.errors import DatabaseError

pytestmark = pytest.mark.anyio

PHASES = [("run-a", "P1", 0, "EXECUTING", None), ("run-a", "P2", 1, "FAILED", "boom"),
          ("run-b", "P1", 0, "FAILED", None)]
EVENT = ("INSERT INTO token_budget_escalation_events (run_id, phase_id, trigger_type) "
         "VALUES ('run-a', 'P2', 't')")


def _lease(run_id: str, phase_id: str, who: str) -> Lease:
    return Lease(run_id=run_id, session_id=f"s-{who}", attempt_id=f"a-{who}",
                 phase_id=phase_id, host="host", pid=os.getpid())


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        db = create_backlog(tmp_path / "backlog.db", PHASES)
        conn = sqlite3.connect(db)
        conn.execute(EVENT)
        conn.commit()
        conn.close()
        yield f"sqlite:///{db}"
        return
    from pg import ADMIN_URL, create_database, drop_database, require_server

    require_server()
    name = create_database(PHASES)
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        import asyncio

        import asyncpg

        async def add_event() -> None:
            conn = await asyncpg.connect(f"{base}/{name}")
            try:
                await conn.execute(EVENT)
            finally:
                await conn.close()

        asyncio.run(add_event())
        yield f"{base}/{name}"
    finally:
        drop_database(name)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The backlog of :func:`url` on PostgreSQL only (for what only PostgreSQL does)."""
    import asyncio

    from pg import ADMIN_URL, create_database, drop_database, require_server

    require_server()
    name = create_database(PHASES)
    url = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"

    async def add_event() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(EVENT)
        finally:
            await conn.close()

    try:
        asyncio.run(add_event())
        yield url
    finally:
        drop_database(name)


@asynccontextmanager
async def store(url: str) -> AsyncIterator[Backlog]:
    async with open_backlog(parse_database_url(url), DEFAULT_TELEMETRY_TABLES) as backlog:
        await backlog.prepare_for_writes()
        yield backlog


async def test_free_run_is_claimed_with_phase_and_telemetry(url: str) -> None:
    async with store(url) as backlog:
        claim = await backlog.leases.claim(_lease("run-a", "P2", "me"), ttl=60)
        assert claim.holder is None
        assert claim.phase == ("FAILED", "boom")
        assert claim.telemetry == 1
        [(held, _age)] = await backlog.leases.live()
        assert (held.run_id, held.attempt_id) == ("run-a", "a-me")


async def test_live_lease_blocks_and_release_frees(url: str) -> None:
    async with store(url) as backlog:
        assert (await backlog.leases.claim(_lease("run-a", "P2", "one"), ttl=60)).holder is None
        blocked = await backlog.leases.claim(_lease("run-a", "P2", "two"), ttl=60)
        assert blocked.holder is not None and blocked.holder.attempt_id == "a-one"
        assert blocked.phase is None
        # Another run is not blocked by it.
        assert (await backlog.leases.claim(_lease("run-b", "P1", "two"), ttl=60)).holder is None
        # A release by the wrong attempt changes nothing; the right one frees the run.
        await backlog.leases.release("run-a", "a-two")
        assert (await backlog.leases.claim(_lease("run-a", "P2", "two"), ttl=60)).holder is not None
        finished = await backlog.leases.finish("run-a", "P2", "a-one", restore=None)
        assert finished.held is True and finished.restored is None
        claim = await backlog.leases.claim(_lease("run-a", "P2", "two"), ttl=60)
        assert claim.holder is None and claim.phase == ("FAILED", "boom")


async def test_expired_lease_is_taken_over_after_its_phase_is_restored(url: str) -> None:
    async with store(url) as backlog:
        # A drainer that died while its worker had P1 EXECUTING: its lease is already expired.
        assert (await backlog.leases.claim(_lease("run-a", "P1", "dead"), ttl=-1)).holder is None
        me = _lease("run-a", "P2", "me")
        seen = await backlog.leases.claim(me, ttl=60)
        # The claim names the expired holder (so that its attempt can be ended first) and
        # changes nothing yet.
        assert seen.expired and seen.holder is not None and seen.holder.attempt_id == "a-dead"
        assert await backlog.phases.read("run-a", "P1") == ("EXECUTING", None)
        # A take-over from a holder other than the one seen is refused.
        other = dataclasses.replace(seen.holder, attempt_id="a-someone-else")
        assert (await backlog.leases.take_over(me, 60, other)).holder is not None
        claim = await backlog.leases.take_over(me, 60, seen.holder)
        assert claim.holder is None and claim.phase == ("FAILED", "boom")
        state, reason = await backlog.phases.read("run-a", "P1") or ("?", None)
        assert state == "FAILED"
        assert reason is not None and reason.startswith("drainer: lease expired")
        [(held, _age)] = await backlog.leases.live()
        assert held.attempt_id == "a-me"


async def test_finish_restores_a_non_final_phase_and_releases(url: str) -> None:
    async with store(url) as backlog:
        assert (await backlog.leases.claim(_lease("run-a", "P1", "me"), ttl=60)).holder is None
        outcome = await backlog.phases.wait_final_state("run-a", "P1", wait=0)
        assert outcome.row == ("EXECUTING", None) and outcome.telemetry == 0
        finished = await backlog.leases.finish("run-a", "P1", "a-me", restore="drainer: test")
        assert finished.held is True and finished.restored == "drainer: test"
        assert await backlog.phases.read("run-a", "P1") == ("FAILED", "drainer: test")
        assert await backlog.leases.live() == []


async def test_finish_after_a_take_over_leaves_the_phase_to_the_new_holder(url: str) -> None:
    async with store(url) as backlog:
        leases = backlog.leases
        assert (await leases.claim(_lease("run-a", "P1", "frozen"), ttl=-1)).holder is None
        seen = await leases.claim(_lease("run-a", "P1", "new"), ttl=60)
        assert seen.holder is not None
        assert (await leases.take_over(_lease("run-a", "P1", "new"), 60, seen.holder)).holder \
            is None
        async with backlog.engine.write() as conn:  # the new holder's worker is running
            await conn.execute(text("UPDATE phases SET state = 'EXECUTING' WHERE phase_id = 'P1'"
                                    " AND run_id = 'run-a'"))
        # The frozen drainer wakes and settles: its lease is gone, the phase is not its own.
        finished = await leases.finish("run-a", "P1", "a-frozen", restore="drainer: frozen")
        assert finished.held is False and finished.restored is None
        assert (await backlog.phases.read("run-a", "P1") or ("?",))[0] == "EXECUTING"
        [(held, _age)] = await leases.live()
        assert held.attempt_id == "a-new"


async def test_a_drainer_never_sweeps_its_own_expired_leases(url: str) -> None:
    async with store(url) as backlog:
        leases = backlog.leases
        assert (await leases.claim(_lease("run-a", "P1", "me"), ttl=-1)).holder is None
        assert (await leases.claim(_lease("run-b", "P1", "other"), ttl=-1)).holder is None
        expired = await leases.expired(other_than="s-me")
        assert [lease.run_id for lease in expired] == ["run-b"]
        assert await leases.sweep(expired[0]) is True
        assert await leases.sweep(expired[0]) is False  # already gone: nothing happens twice
        # Our own expired lease is still ours: renewing it keeps the attempt going.
        assert await leases.renew("run-a", "a-me", 60) is True
        assert await backlog.phases.read("run-a", "P1") == ("EXECUTING", None)


async def test_a_claim_that_finds_its_own_lease_holds_it(url: str) -> None:
    """A claim retried after a dropped connection may find the row its first try wrote."""
    async with store(url) as backlog:
        lease = _lease("run-a", "P2", "me")
        assert (await backlog.leases.claim(lease, ttl=60)).holder is None
        again = await backlog.leases.claim(lease, ttl=60)
        assert again.holder is None and again.phase == ("FAILED", "boom")


async def test_claim_whose_phase_read_fails_gives_the_run_back(tmp_path: Path) -> None:
    db = create_backlog(tmp_path / "backlog.db", PHASES)
    async with store(f"sqlite:///{db}") as backlog:
        conn = sqlite3.connect(db)
        conn.execute("ALTER TABLE phases RENAME TO phases_gone")  # the read after the insert fails
        conn.commit()
        conn.close()
        with pytest.raises(DatabaseError):
            await backlog.leases.claim(_lease("run-a", "P2", "me"), ttl=60)
        assert await backlog.leases.live() == []  # not left to block the run until expiry


async def test_the_switch_to_wal_waits_for_a_writer_instead_of_failing(tmp_path: Path) -> None:
    # Two drainers starting together: one switches the file to WAL while the other holds
    # the write lock (creating its lease table, say). SQLite answers "database is locked"
    # at once there, without waiting (its busy handler is not used for that case).
    import anyio
    from sqlalchemy import event

    db = tmp_path / "b.db"
    create_backlog(db, [("run-0", "P", 0, "FAILED", None)])
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # holds the write lock
    tries = 0
    tried_twice = anyio.Event()

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        nonlocal tries
        if "journal_mode" in statement:
            tries += 1
            if tries >= 2:
                tried_twice.set()

    async with open_backlog(parse_database_url(f"sqlite:///{db}")) as backlog:
        event.listen(backlog.engine._engine, "before_cursor_execute", count)
        async with anyio.create_task_group() as tg:
            tg.start_soon(backlog.prepare_for_writes)
            with anyio.fail_after(10):
                await tried_twice.wait()  # refused while the writer wrote, and retried
            writer.execute("COMMIT")  # the writer is done: the next try succeeds
    writer.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_the_lease_records_its_worker_and_an_older_table_gets_the_columns(
        url: str) -> None:
    # A lease table as an older drainer made it: no worker columns.
    async with open_backlog(parse_database_url(url), DEFAULT_TELEMETRY_TABLES) as old, \
            old.engine.write() as conn:
        await conn.execute(text(
            "CREATE TABLE drainer_leases (run_id TEXT PRIMARY KEY, session_id VARCHAR(64) "
            "NOT NULL, attempt_id VARCHAR(64) NOT NULL, phase_id TEXT NOT NULL, host "
            "VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, acquired_at DOUBLE PRECISION "
            "NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE "
            "PRECISION NOT NULL)"))
    async with store(url) as backlog:
        dead = _lease("run-a", "P1", "dead")
        assert (await backlog.leases.claim(dead, ttl=60)).holder is None
        # The attempt's first heartbeat names its worker: pid and create time.
        assert await backlog.leases.renew("run-a", "a-dead", -1, (4242, 1234567.25))
        seen = await backlog.leases.claim(_lease("run-a", "P2", "me"), ttl=60)
        assert seen.expired and seen.holder is not None
        assert (seen.holder.worker_pid, seen.holder.worker_created) == (4242, 1234567.25)
        (swept,) = await backlog.leases.expired(other_than="s-me")
        assert swept.worker_pid == 4242
        # Taken over, the lease names no worker until the new attempt's heartbeat.
        assert (await backlog.leases.take_over(_lease("run-a", "P2", "me"), 60,
                                               seen.holder)).holder is None
        [(held, _age)] = await backlog.leases.live()
        assert held.attempt_id == "a-me" and held.worker_pid is None


async def test_a_refused_claim_says_when_the_lease_ends_and_held_elsewhere_lists_it(
    url: str,
) -> None:
    async with store(url) as backlog:
        assert (await backlog.leases.claim(_lease("run-a", "P2", "one"), ttl=60)).holder is None
        assert (await backlog.leases.claim(_lease("run-b", "P1", "two"), ttl=30)).holder is None
        blocked = await backlog.leases.claim(_lease("run-a", "P2", "two"), ttl=60)
        assert blocked.holder is not None
        assert blocked.holder.remaining is not None and 50 < blocked.holder.remaining <= 60
        # Another session's view: both runs, with the seconds left; its own lease is not
        # "elsewhere" for a session.
        held = await backlog.leases.held_elsewhere(other_than="s-two")
        assert set(held) == {"run-a"} and 50 < held["run-a"] <= 60
        held = await backlog.leases.held_elsewhere(other_than="s-nobody")
        assert set(held) == {"run-a", "run-b"} and 20 < held["run-b"] <= 30


async def test_a_run_leased_elsewhere_costs_one_refused_claim_not_one_a_second(
    url: str, tmp_path: Path,
) -> None:
    """While another drainer holds a run, a session leaves it alone until the lease ends
    (reading the lease table, not claiming again and again), then drains it."""
    import sys

    import anyio

    from conftest import CONTRACT_WORKER
    from drainer import drain
    from drainer.config import DrainConfig
    from drainer.events import AttemptFinished

    worker = tmp_path / "worker.py"
    worker.write_text(CONTRACT_WORKER)
    async with store(url) as backlog:
        # run-b's phase is held by a live drainer of another session.
        assert (await backlog.leases.claim(_lease("run-b", "P1", "other"), ttl=600)).holder \
            is None
    finished: list[str] = []
    others_done = anyio.Event()

    def seen(event: object) -> None:
        if isinstance(event, AttemptFinished):
            finished.append(event.attempt.run_id)
            if event.attempt.run_id == "run-a":
                others_done.set()

    config = DrainConfig(database_url=url, command=[sys.executable, str(worker), "{run_id}",
                                                    "{phase_id}"],
                         session_dir=tmp_path / "sessions", env=(("TEST_OUT", str(tmp_path)),),
                         max_attempts_per_phase=1, kill_grace_period=0.5)
    summary = None

    async def run() -> None:
        nonlocal summary
        summary = await drain(config, on_event=seen)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await others_done.wait()  # run-a (P2) drained; run-b is waiting on its lease
        # Long enough for a drainer that claims again every second to have done it twice.
        await anyio.sleep(2.5)
        async with store(url) as backlog:
            await backlog.leases.release("run-b", "a-other")
    assert summary is not None and finished == ["run-a", "run-b"]
    info = json.loads((summary.journal_path.parent / "session.json").read_text())
    assert info["claims_refused"] == 1
    assert info["claims"] == 3


async def test_one_ticker_renews_every_running_attempts_lease(tmp_path: Path) -> None:
    """The session's one heartbeat task serves every lane: each running attempt's lease gets
    its worker recorded (its first renewal), side by side."""
    import sys

    import anyio

    from conftest import CONTRACT_WORKER
    from drainer import drain
    from drainer.config import DrainConfig

    db = create_backlog(tmp_path / "backlog.db",
                        [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    worker = tmp_path / "worker.py"
    worker.write_text(CONTRACT_WORKER)
    config = DrainConfig(database_url=f"sqlite:///{db}",
                         command=[sys.executable, str(worker), "{run_id}", "{phase_id}"],
                         session_dir=tmp_path / "sessions", lanes=3, kill_grace_period=0.5,
                         env=(("TEST_OUT", str(tmp_path)), ("WORKER_SLEEP", "600")))

    def recorded() -> set[str]:
        conn = sqlite3.connect(db, timeout=30)
        try:
            return {r[0] for r in conn.execute(
                "SELECT run_id FROM drainer_leases WHERE worker_pid IS NOT NULL")}
        except sqlite3.OperationalError:  # the table is not there yet
            return set()
        finally:
            conn.close()

    with anyio.CancelScope() as session:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, config)
            with anyio.fail_after(30):
                while recorded() != {"run-0", "run-1", "run-2"}:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            session.cancel()  # the embedding caller's cancel: trees killed, phases restored
    conn = sqlite3.connect(db)
    try:
        states = {r[0] for r in conn.execute("SELECT state FROM phases")}
        leases = conn.execute("SELECT COUNT(*) FROM drainer_leases").fetchone()[0]
    finally:
        conn.close()
    assert states == {"FAILED"} and leases == 0


async def test_the_end_of_an_attempt_reads_its_phase_and_releases_unless_non_final(
        url: str) -> None:
    async with store(url) as backlog:
        leases = backlog.leases
        # Left non-final (EXECUTING): read, nothing released (finish() restores, releases).
        assert (await leases.claim(_lease("run-a", "P1", "me"), ttl=60)).holder is None
        outcome, held = await leases.finish_if_final("run-a", "P1", "a-me")
        assert (outcome.row, outcome.telemetry, held) == (("EXECUTING", None), 0, None)
        assert [lease.attempt_id for lease, _ in await leases.live()] == ["a-me"]
        await leases.release("run-a", "a-me")
        # Final (FAILED, with one telemetry row): read and released.
        assert (await leases.claim(_lease("run-a", "P2", "me"), ttl=60)).holder is None
        outcome, held = await leases.finish_if_final("run-a", "P2", "a-me")
        assert (outcome.row, outcome.telemetry, held) == (("FAILED", "boom"), 1, True)
        assert await leases.live() == []
        # The lease lost meanwhile (another holds the run): read, and not ours to release.
        assert (await leases.claim(_lease("run-b", "P1", "other"), ttl=60)).holder is None
        outcome, held = await leases.finish_if_final("run-b", "P1", "a-me")
        assert (outcome.row, held) == (("FAILED", None), False)
        assert [lease.attempt_id for lease, _ in await leases.live()] == ["a-other"]
        # The phase gone: its telemetry still counts, and the lease is released.
        assert (await leases.claim(_lease("run-a", "P9", "me"), ttl=60)).holder is None
        outcome, held = await leases.finish_if_final("run-a", "P9", "a-me")
        assert (outcome.row, outcome.telemetry, held) == (None, 0, True)


async def test_on_postgresql_a_claim_and_an_end_are_one_statement_each_in_autocommit(
        pg_url: str) -> None:
    """No BEGIN and COMMIT round trips around them: each is one statement, run in autocommit,
    so an attempt costs the database two round trips in the common case. (On SQLite a round
    trip is one hop to drainer's thread, whatever its statements.)"""
    from sqlalchemy import event

    async with store(pg_url) as backlog:
        seen: list[tuple[str, object]] = []

        def count(conn: object, _cursor: object, statement: str, *_args: object) -> None:
            options = conn.get_execution_options()  # type: ignore[attr-defined]
            seen.append((statement.split()[0], options.get("isolation_level")))

        sync_engine = backlog.engine._engine
        event.listen(sync_engine, "before_cursor_execute", count)
        try:
            claim = await backlog.leases.claim(_lease("run-a", "P2", "me"), ttl=60)
            assert claim.holder is None and claim.phase == ("FAILED", "boom")
            assert claim.telemetry == 1
            assert seen == [("WITH", "AUTOCOMMIT")]
            seen.clear()
            outcome, held = await backlog.leases.finish_if_final("run-a", "P2", "a-me")
            assert held is True and outcome.telemetry == 1
            assert seen == [("WITH", "AUTOCOMMIT")]
        finally:
            event.remove(sync_engine, "before_cursor_execute", count)


async def test_on_postgresql_a_claim_reads_what_the_previous_holder_left(pg_url: str) -> None:
    """B claims while A releases: B's statement waits for A's delete of the lease, and its
    snapshot predates what A's worker committed just before. B must read the phase as A
    left it (COMPLETE), not as its snapshot shows it (FAILED): else it drains it again.
    (SQLite's claims are serialised by its write lock.)"""
    import anyio
    import asyncpg

    url = pg_url
    async with store(url) as backlog:
        assert (await backlog.leases.claim(_lease("run-a", "P2", "A"), ttl=60)).holder is None
        releasing, worker, probe = [await asyncpg.connect(url) for _ in range(3)]
        try:
            release = releasing.transaction()
            await release.start()
            await releasing.execute("DELETE FROM drainer_leases WHERE run_id = 'run-a'")
            found: list[Claim] = []

            async def claim_b() -> None:
                found.append(await backlog.leases.claim(_lease("run-a", "P2", "B"), ttl=60))

            async with anyio.create_task_group() as tg:
                tg.start_soon(claim_b)
                # (The server's state, not an event of ours, says when B waits.)
                while not await probe.fetchval(  # noqa: ASYNC110
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"):
                    await anyio.sleep(0.01)  # until B's statement waits for A's delete
                await worker.execute("UPDATE phases SET state = 'COMPLETE' "
                                     "WHERE run_id = 'run-a' AND phase_id = 'P2'")
                await release.commit()
            [claim] = found
            assert claim.holder is None and claim.phase == ("COMPLETE", "boom")
        finally:
            for conn in (releasing, worker, probe):
                await conn.close()
