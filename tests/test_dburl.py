"""drainer parses database URLs itself (so that commands which open no database import no
SQLAlchemy); SQLAlchemy's own ``make_url`` is the reference it must agree with."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from conftest import Env, create_backlog
from drainer.cli import _identity
from drainer.dburl import parse_database_url

URLS = [
    "sqlite:////tmp/sp%20dir/a.db",  # percent-encoded path: the file is "sp dir/a.db"
    "sqlite:////tmp/a%2541.db",
    "sqlite:////tmp/données/b.db",
    "sqlite:////abs/x.db?mode=ro",
    "postgresql://u:pw@h/my%20db",
    "postgresql://u:pw@h:5432/db?host=a:5432&host=b:5432",  # a repeated key (multi-host)
    "postgresql://u:pw@h/db?sslmode=&application_name=x",  # a blank value is dropped
    "postgresql://user%20x:p+w@[::1]:5432/db",
    "postgresql://u:p%40ss@h/db",
    "postgresql://u:pw@h/db?b=2&a=1",
    "postgresql:///db",
    "postgres://u:pw@h/db",
    "postgresql+asyncpg://u:pw@h/db",
    "postgresql://postgres@127.0.0.1:5432/test",  # a lone user (hidden as ***)
    "postgresql://tok%2Fen@h/my%20db",  # a lone user in a URL SQLAlchemy reads
    "postgresql://u:pw@h/db?timeout=5",  # (only SQLite's timeout is drainer's)
]


def _parts(url: object) -> tuple[object, ...]:
    u = make_url(url) if isinstance(url, str) else url
    return (u.username, u.password, u.host, u.port, u.database,  # type: ignore[attr-defined]
            dict(u.query))  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", URLS)
def test_drainer_and_its_workers_read_a_url_as_sqlalchemy_does(raw: str) -> None:
    db = parse_database_url(raw)
    reference = make_url(raw)
    assert _parts(db.async_url) == _parts(reference)  # what drainer opens
    assert _parts(db.sync_url) == _parts(reference)  # what workers open from DATABASE_URL
    sync_name = "sqlite" if raw.startswith("sqlite") else "postgresql"
    # and written the way SQLAlchemy writes it (so older session files compare equal)
    assert db.sync_url == reference.set(drivername=sync_name).render_as_string(
        hide_password=False)


@pytest.mark.parametrize("raw", URLS)
def test_a_redacted_url_read_back_is_redacted_the_same(raw: str) -> None:
    # --resume compares the URL a session saved (redacted) with the one given now.
    db = parse_database_url(raw)
    assert db.identity == db.redacted  # (no SQLite timeout among them)
    assert _identity(db.redacted) == db.identity
    assert "***@***" not in db.redacted and "%2A" not in db.redacted
    older = make_url(db.sync_url).render_as_string(hide_password=True)  # as drainer <= 0.1
    assert _identity(older) == db.identity


@pytest.mark.parametrize("raw, hidden", [
    ("postgresql://u:hunter2@h/db", "hunter2"),
    ("postgresql://u@h/db?password=hunter2", "hunter2"),
    ("postgresql://tok-SECRET@h/db", "SECRET"),
])
def test_any_secret_in_the_url_is_hidden(raw: str, hidden: str) -> None:
    db = parse_database_url(raw)
    assert hidden not in db.redacted
    assert hidden in db.sync_url  # the worker still gets it


def test_an_escaped_sqlite_path_opens_the_file_sqlalchemy_names(env: Env) -> None:
    # SQLAlchemy 2.1 decodes "%20" in the database part, 2.0 keeps it: drainer opens the file
    # the installed SQLAlchemy names, as the workers beside it will.
    url = f"sqlite:///{env.tmp}/sp%20dir/a.db"
    path = Path(make_url(url).database or "")
    path.parent.mkdir()
    create_backlog(path, [("run-0", "P", 0, "FAILED", None)])
    proc = env.run_cli("status", "--database-url", url)
    assert proc.returncode == 0, proc.stderr
    assert "run-0" in proc.stdout
    assert Path(make_url(parse_database_url(url).sync_url).database or "") == path


def test_an_unparsable_url_with_a_lone_user_shows_none_of_it(env: Env) -> None:
    proc = env.run_cli("config", "--database-url",
                       "postgresql://ghp_SECRETTOKEN@db.example:54x2/autopack")
    assert proc.returncode == 2
    assert "SECRET" not in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.anyio
@pytest.mark.parametrize(("query", "ms"), [("", 30000), ("?timeout=2.5", 2500)])
async def test_the_sqlite_urls_timeout_is_how_long_every_connection_waits_for_a_lock(
        tmp_path: Path, query: str, ms: int) -> None:
    # As for sqlite3.connect and SQLAlchemy: `timeout` (seconds) in the URL is the busy
    # timeout, on the hot path's kept connections and on the pooled ones alike.
    from sqlalchemy import text

    from drainer.backlog._engine import Engine

    db = tmp_path / "b.db"
    sqlite3.connect(db).close()
    engine = Engine(parse_database_url(f"sqlite:///{db}{query}"))
    try:
        pragma = text("PRAGMA busy_timeout")
        assert await engine.run(lambda execute: execute(pragma).scalar()) == ms
        assert await engine.run(lambda execute: execute(pragma).scalar(), write=True) == ms
        async with engine.read() as conn:
            assert (await conn.execute(pragma)).scalar() == ms
    finally:
        await engine.aclose()


@pytest.mark.anyio
async def test_a_session_resumes_with_another_sqlite_timeout_and_not_on_another_file(
        env: Env) -> None:
    # The timeout says how long to wait, not which database: raising it after lock trouble
    # and resuming is the point of it. Another file is still refused.
    import anyio

    from drainer import DrainConfig, open_drainer

    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    config = DrainConfig(database_url=env.url, session_dir=env.sessions,
                         command=[sys.executable, str(env.worker), "{run_id}", "{phase_id}"],
                         env=(("TEST_OUT", str(env.out)),))
    async with open_drainer(config) as d, anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        async for _event in d.events():
            d.stop("enough")  # resumable, after its first attempt
    other = env.tmp / "other.db"
    create_backlog(other, [("run-0", "P", 0, "FAILED", None)])

    def plan(url: str) -> subprocess.CompletedProcess[str]:
        return env.run_cli("plan", "--resume", "--database-url", url,
                           "--session-dir", str(env.sessions))

    for url in (f"{env.url}?timeout=60", env.url):
        proc = plan(url)
        assert proc.returncode == 0 and d.session_id in proc.stdout, proc.stdout + proc.stderr
    refused = plan(f"sqlite:///{other}")
    assert refused.returncode == 2 and "resume it with the same database" in refused.stderr
    # A session an older drainer started with a timeout it did not check resumes too.
    journal = env.sessions / d.session_id / "journal.jsonl"
    first, rest = journal.read_text().split("\n", 1)
    journal.write_text(first.replace('backlog.db"', 'backlog.db?timeout=abc"', 1) + "\n" + rest)
    assert "timeout=abc" in journal.read_text()
    proc = plan(f"{env.url}?timeout=5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
