"""Helpers for tests against the local PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from conftest import PHASE, SCHEMA

ADMIN_URL = os.environ.get("DRAINER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_schema() -> str:
    """Autopack's SQLite schema in PostgreSQL's dialect (as the fixture's header says)."""
    sql = re.sub(r"--[^\n]*", "", SCHEMA)
    sql = sql.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
    sql = sql.replace("DATETIME", "TIMESTAMP")
    sql = sql.replace("BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false")
    return sql


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def server_answers() -> str | None:
    """None when the server answers, else why not (for the skip reason)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:  # any failure to reach it is a reason to skip locally
        return f"no PostgreSQL answers at {ADMIN_URL}: {exc}"
    return None


def require_server() -> None:
    """Skip the test when no server answers; in CI (``DRAINER_REQUIRE_PG``) fail instead."""
    import pytest

    why = server_answers()
    if why is not None:
        if os.environ.get("DRAINER_REQUIRE_PG"):
            raise RuntimeError(why)
        pytest.skip(why)


def create_database(phases: Iterable[PHASE]) -> str:
    """A fresh database with Autopack's schema and ``phases``; returns its name."""
    import asyncpg

    name = f"drainer_test_{uuid.uuid4().hex[:12]}"

    async def go() -> None:
        await _admin(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + name, timeout=5)
        try:
            await conn.execute(pg_schema())
            runs: dict[str, int] = {}
            for run_id, phase_id, index, state, reason in phases:
                if run_id not in runs:
                    await conn.execute("INSERT INTO runs (id) VALUES ($1)", run_id)
                    runs[run_id] = await conn.fetchval(
                        "INSERT INTO tiers (tier_id, run_id, tier_index, name) "
                        "VALUES ('T1', $1, 0, 't') RETURNING id", run_id)
                await conn.execute(
                    "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state, "
                    "last_failure_reason) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    phase_id, run_id, runs[run_id], index, phase_id, state, reason)
        finally:
            await conn.close()

    asyncio.run(go())
    return name


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def fetch_states(name: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    import asyncpg

    async def go() -> dict[tuple[str, str], tuple[str, str | None]]:
        conn = await asyncpg.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + name, timeout=5)
        try:
            rows = await conn.fetch("SELECT run_id, phase_id, state, last_failure_reason FROM phases")
        finally:
            await conn.close()
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    return asyncio.run(go())


@contextlib.contextmanager
def backlog_url(backend: str, tmp_path: Path, phases: Iterable[PHASE]) -> Iterator[str]:
    """The URL of a backlog holding ``phases``: a SQLite file under ``tmp_path``, or a fresh
    PostgreSQL database (``require_server`` first), dropped afterwards."""
    if backend == "sqlite":
        from conftest import create_backlog

        yield f"sqlite:///{create_backlog(tmp_path / 'backlog.db', phases)}"
        return
    require_server()
    name = create_database(phases)
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        drop_database(name)
