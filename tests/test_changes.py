"""Loads of changes (``Phases.load_changed``), straight against the store, on SQLite and
PostgreSQL: the runs whose phases were stamped in ``updated_at`` lately, as Autopack's
worker stamps them (UTC, without a time zone), with their FAILED and QUEUED phases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from drainer.backlog import Backlog, open_backlog
from drainer.dburl import parse_database_url
from drainer.schema import Schema

pytestmark = pytest.mark.anyio

PHASES = [("run-a", "P1", 0, "FAILED", None), ("run-a", "P2", 1, "FAILED", None),
          ("run-b", "P1", 0, "FAILED", None), ("run-c", "P1", 0, "FAILED", None)]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    from pg import backlog_url

    with backlog_url(request.param, tmp_path, PHASES) as found:
        yield found


@asynccontextmanager
async def store(url: str, schema: Schema | None = None) -> AsyncIterator[Backlog]:
    async with open_backlog(parse_database_url(url), schema=schema) as backlog:
        yield backlog


def utc(ago: timedelta = timedelta(0)) -> datetime:
    """A timestamp as Autopack writes ``updated_at``: UTC, no time zone."""
    return (datetime.now(UTC) - ago).replace(tzinfo=None)


async def write(backlog: Backlog, sql: str, **params: object) -> None:
    async with backlog.engine.write() as conn:
        await conn.execute(text(sql), params)


async def test_only_runs_stamped_lately_are_read_with_their_candidates(url: str) -> None:
    async with store(url) as backlog:
        await write(backlog, "UPDATE phases SET updated_at = :t", t=utc(timedelta(hours=2)))
        nothing = await backlog.phases.load_changed(5.0)
        assert nothing is not None and nothing[1] == set() and not nothing[0].runs
        # As Autopack's worker writes: run-a's P1 drained, run-b's P1 failed again...
        await write(backlog, "UPDATE phases SET state = 'COMPLETE', updated_at = :t "
                    "WHERE run_id = 'run-a' AND phase_id = 'P1'", t=utc())
        await write(backlog, "UPDATE phases SET last_failure_reason = 'again', "
                    "updated_at = :t WHERE run_id = 'run-b'", t=utc())
        # ...and a writer that does not stamp: unseen here (the full loads find it).
        await write(backlog, "UPDATE phases SET state = 'COMPLETE' WHERE run_id = 'run-c'")

        found = await backlog.phases.load_changed(5.0)
        assert found is not None
        fresh, changed = found
        assert changed == {"run-a", "run-b"}
        assert {r: [fresh.phase_ids[i] for i in range(*span)] for r, span in fresh.runs.items()} \
            == {"run-a": ["P2"], "run-b": ["P1"]}
        assert fresh.reasons[fresh.runs["run-b"][0]] == "again"

        only_a = await backlog.phases.load_changed(5.0, run_id="run-a")
        assert only_a is not None and only_a[1] == {"run-a"} and set(only_a[0].runs) == {"run-a"}


async def test_a_run_whose_last_candidate_went_is_changed_with_no_rows(url: str) -> None:
    async with store(url) as backlog:
        await write(backlog, "UPDATE phases SET updated_at = :t", t=utc(timedelta(hours=2)))
        await write(backlog, "UPDATE phases SET state = 'COMPLETE', updated_at = :t "
                    "WHERE run_id = 'run-b'", t=utc())
        found = await backlog.phases.load_changed(0.0)
        assert found is not None
        assert found[1] == {"run-b"} and not found[0].runs


async def test_stamps_older_than_the_window_and_its_margin_are_not_read(url: str) -> None:
    async with store(url) as backlog:
        await write(backlog, "UPDATE phases SET updated_at = :t", t=utc(timedelta(minutes=30)))
        found = await backlog.phases.load_changed(10.0)
        assert found is not None and found[1] == set()
        found = await backlog.phases.load_changed(3600.0)  # the last load was an hour ago
        assert found is not None and found[1] == {"run-a", "run-b", "run-c"}


async def test_without_updated_at_the_backlog_cannot_tell(url: str) -> None:
    async with store(url, Schema(updated_at=None)) as backlog:
        assert await backlog.phases.load_changed(5.0) is None
