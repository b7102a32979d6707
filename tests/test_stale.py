"""``--restore-stale-after``: phases left non-final too long, with no drainer's lease on their
run, go back to FAILED before picking (the seed-004 trap: a phase stuck QUEUED for hours
blocking its run). On SQLite and PostgreSQL at the store; through the command line on SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from conftest import Env, create_backlog, file_digest, only_session, phase_states
from drainer.backlog import LEASE_TABLE, Backlog, Lease, open_backlog
from drainer.dburl import parse_database_url
from drainer.schema import Schema

PHASES = [
    ("run-old", "P1-ok", 0, "QUEUED", "INFRA_RETRY"),  # stuck for hours: restored
    ("run-young", "P1-ok", 0, "QUEUED", None),  # queued minutes ago: left alone
    ("run-leased", "P1-ok", 0, "EXECUTING", None),  # old, but a drainer leases its run
    ("run-done", "P1-ok", 0, "COMPLETE", None),  # final: never touched
    ("other-old", "P1-ok", 0, "GATE", None),  # old, in a run --run-id may leave out
]
NOTE = "drainer: left {} for more than 60 min"


def utc(ago: timedelta) -> datetime:
    """A timestamp as Autopack writes ``updated_at``: UTC, no time zone."""
    return (datetime.now(UTC) - ago).replace(tzinfo=None)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    from pg import backlog_url

    with backlog_url(request.param, tmp_path, PHASES) as found:
        yield found


@asynccontextmanager
async def aged(url: str, schema: Schema | None = None) -> AsyncIterator[Backlog]:
    """The backlog with every phase 3 hours old but run-young's (10 minutes), and a live
    lease of another drainer on run-leased."""
    async with open_backlog(parse_database_url(url), schema=schema) as backlog:
        await backlog.prepare_for_writes()
        if backlog.phases.has_updated_at:
            async with backlog.engine.write() as conn:
                await conn.execute(text("UPDATE phases SET updated_at = :t"),
                                   {"t": utc(timedelta(hours=3))})
                await conn.execute(text("UPDATE phases SET updated_at = :t "
                                        "WHERE run_id = 'run-young'"),
                                   {"t": utc(timedelta(minutes=10))})
        claim = await backlog.leases.claim(Lease(
            run_id="run-leased", session_id="s-other", attempt_id="a-other",
            phase_id="P1-ok", host="elsewhere", pid=1), ttl=3600)
        assert claim.holder is None
        yield backlog


def note(state: str) -> str:
    return NOTE.format(state)


async def stale(phases: Any, **kw: Any) -> list[tuple[str, str, str]]:
    """Run, phase and state of each stale phase (more than an hour old)."""
    return [(s.run_id, s.phase_id, s.state)
            for s in await phases.stale(3600, lease_table=LEASE_TABLE, **kw) or []]


@pytest.mark.anyio
async def test_only_old_unleased_non_final_phases_are_restored(url: str) -> None:
    async with aged(url) as backlog:
        phases = backlog.phases
        assert await stale(phases) == [("other-old", "P1-ok", "GATE"),
                                        ("run-old", "P1-ok", "QUEUED")]
        assert await stale(phases, runs=lambda r: r.startswith("run-")) == [
            ("run-old", "P1-ok", "QUEUED")]
        assert await stale(phases, run_id="other-old") == [("other-old", "P1-ok", "GATE")]
        [found] = await phases.stale(3600, lease_table=LEASE_TABLE, run_id="run-old") or []
        assert (found.phase_index, found.reason) == (0, "INFRA_RETRY")
        restored = await phases.restore_stale(3600, note, lease_table=LEASE_TABLE,
                                              runs=lambda r: r.startswith("run-"))
        assert restored == [("run-old", "P1-ok", "QUEUED",
                             "INFRA_RETRY | drainer: left QUEUED for more than 60 min")]
        assert await phases.read("run-old", "P1-ok") == ("FAILED", restored[0][3])
        assert await phases.read("run-young", "P1-ok") == ("QUEUED", None)
        assert await phases.read("run-leased", "P1-ok") == ("EXECUTING", None)
        assert await phases.read("run-done", "P1-ok") == ("COMPLETE", None)
        assert await phases.read("other-old", "P1-ok") == ("GATE", None)
        # Restored, it is fresh: nothing is stale twice.
        assert await stale(phases, runs=lambda r: r.startswith("run-")) == []


@pytest.mark.anyio
async def test_without_updated_at_nothing_can_be_judged_stale(url: str) -> None:
    async with aged(url, Schema(updated_at=None)) as backlog:
        assert await backlog.phases.stale(3600, lease_table=LEASE_TABLE) is None
        assert await backlog.phases.restore_stale(3600, note, lease_table=LEASE_TABLE) is None


def _age_backlog(env: Env) -> None:
    create_backlog(env.db, [*PHASES, ("run-failed", "P1-ok", 0, "FAILED", None)])
    conn = sqlite3.connect(env.db)
    with conn:
        conn.execute("UPDATE phases SET updated_at = datetime('now', '-3 hours')")
        conn.execute("UPDATE phases SET updated_at = datetime('now', '-10 minutes') "
                     "WHERE run_id = 'run-young'")
    conn.close()


def test_plan_lists_what_a_session_would_restore_and_changes_nothing(env: Env) -> None:
    _age_backlog(env)
    before = file_digest(env.db)
    proc = env.run_cli("plan", *env.base_args(), "--restore-stale-after", "60",
                       "--skip-run-prefix", "other-")
    assert proc.returncode == 0, proc.stderr
    assert "Would restore to FAILED first (--restore-stale-after 60): 2 phase(s)" in proc.stdout
    assert "  - run-leased / P1-ok [EXECUTING]" in proc.stdout  # no lease table yet: no lease
    assert "  - run-old / P1-ok [QUEUED]" in proc.stdout
    assert "run-young" not in proc.stdout.split("Would drain")[0]
    assert "other-old" not in proc.stdout
    # Restored first, they are in the order as FAILED phases, with the other candidate.
    drains = proc.stdout.split("Would drain")[1].split("Skipped")[0]
    assert [line.split(". ", 1)[1].split("  [")[0] for line in drains.splitlines()[1:4]] == [
        "run-failed / P1-ok", "run-leased / P1-ok", "run-old / P1-ok"]
    assert "[FAILED, index 0" in drains
    assert "run-old" not in proc.stdout.split("Skipped")[1]  # not also a QUEUED phase
    assert file_digest(env.db) == before


def test_a_session_restores_stale_phases_first_says_so_and_journals_them(env: Env) -> None:
    _age_backlog(env)
    proc = env.run_cli("run", *env.base_args(), "--restore-stale-after", "60",
                       "--run-id", "run-old", "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    assert "[STALE] restored 1 phase(s) left non-final for more than 60 min" in proc.stdout
    assert "  [STALE] run-old / P1-ok (was QUEUED)" in proc.stdout
    states = phase_states(env.db)
    # Restored, then drained in the same session (the worker completes it).
    assert states[("run-old", "P1-ok")][0] == "COMPLETE"
    assert states[("run-young", "P1-ok")] == ("QUEUED", None)
    assert states[("other-old", "P1-ok")] == ("GATE", None)  # not this session's run
    snapshot, journal_dir = only_session(env.sessions)
    lines = [json.loads(x) for x in (journal_dir / "journal.jsonl").read_text().splitlines()]
    [event] = [x for x in lines if x["type"] == "stale_restored"]
    assert event["older_than_minutes"] == 60
    assert [(p["run_id"], p["phase_id"], p["state"]) for p in event["phases"]] == [
        ("run-old", "P1-ok", "QUEUED")]
    assert event["phases"][0]["reason"].startswith("INFRA_RETRY | drainer: left QUEUED")
    assert os.path.exists(snapshot)


@pytest.mark.anyio
async def test_sqlite_timestamps_are_compared_as_times_not_as_text(tmp_path: Path) -> None:
    """SQLite keeps ``updated_at`` as text of several shapes: an ISO stamp with a ``T`` of
    three hours ago is stale and one of now is not ('T' sorts after ' ' as text); a number
    is no timestamp drainer can read: never judged stale."""
    db = create_backlog(tmp_path / "b.db", [(f"run-{n}", "P1", 0, "QUEUED", None)
                                           for n in ("iso-old", "iso-new", "epoch")])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE phases SET updated_at = strftime('%Y-%m-%dT%H:%M:%S', 'now', "
                     "'-3 hours') WHERE run_id = 'run-iso-old'")
        conn.execute("UPDATE phases SET updated_at = strftime('%Y-%m-%dT%H:%M:%f', 'now') "
                     "WHERE run_id = 'run-iso-new'")
        conn.execute("UPDATE phases SET updated_at = 1700000000 WHERE run_id = 'run-epoch'")
    conn.close()
    async with open_backlog(parse_database_url(f"sqlite:///{db}")) as backlog:
        assert [(s.run_id, s.state) for s in await backlog.phases.stale(
            3600, lease_table=None) or []] == [("run-iso-old", "QUEUED")]
        found = await backlog.phases.load_changed(0.0)
        assert found is not None and "run-iso-new" in found[1]
        assert "run-iso-old" not in found[1]
