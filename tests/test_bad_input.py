"""Every bad input: one clear line on stderr, exit code 2, nothing changed or created."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import Env, create_backlog, file_digest
from drainer.config import render_command, split_command
from drainer.journal import Damage, iter_records


def _assert_one_line_error(proc: object, *needles: str) -> str:
    rc, stderr = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("drainer: error: "), lines[0]
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def good_db(env: Env) -> Env:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    return env


CASES = {
    "unknown placeholder": (["--command", "python w.py {run}"], "unknown placeholder {run}"),
    "unclosed placeholder": (["--command", "python w.py {run_id"], "unbalanced brace"),
    "stray closing brace": (["--command", "python w.py run_id}"], "unbalanced brace"),
    "negative batch size": (["--batch-size", "-1"], "--batch-size"),
    "zero batch size": (["--batch-size", "0"], "--batch-size"),
    "negative timeout": (["--phase-timeout-seconds", "-5"], "--phase-timeout-seconds"),
    "negative minutes": (["--max-total-minutes", "-1"], "--max-total-minutes must be a "
                         "positive number, got -1"),  # in the flag's unit, not seconds
    "negative stale minutes": (["--restore-stale-after", "-5"], "--restore-stale-after must be "
                               "a positive number, got -5"),
    "negative log cap": (["--max-log-bytes", "-1"], "--max-log-bytes"),
    "negative grace": (["--kill-grace-seconds", "-1"], "--kill-grace-seconds"),
    "negative attempts": (["--max-attempts-per-phase", "-2"], "--max-attempts-per-phase"),
    "negative timeouts per run": (["--max-timeouts-per-run", "-1"], "--max-timeouts-per-run"),
    "negative zero-yield": (["--max-consecutive-zero-yield", "-3"], "--max-consecutive"),
    "not a number": (["--batch-size", "ten"], "--batch-size"),
    "bad env pair": (["--env", "NOEQUALS"], "--env"),
    "zero lanes": (["--lanes", "0"], "--lanes"),
    "bad leak pattern": (["--leak-pattern", "(unclosed"], "--leak-pattern"),
    "api command without port": (["--api-command", "python -m http.server"], "{port}"),
    "negative lease ttl": (["--lease-ttl-seconds", "-1"], "--lease-ttl-seconds"),
    "resume unknown session": (["--resume", "batch-drain-20990101-000000-dead"], "no session"),
    "missing worker program": (["--command", "/nonexistent/worker {run_id}"], "/nonexistent/worker"),
    "unbalanced quotes": (["--command", "python 'oops"], "--command"),
    "api url with bad port": (["--api-url", "http://localhost:99999"], "--api-url"),
    "api url not http": (["--api-url", "ftp://host/x"], "--api-url"),
    "infinite grace": (["--kill-grace-seconds", "inf"], "--kill-grace-seconds"),
    "missing workspace": (["--workspace", "/nonexistent/ws"], "--workspace"),
    "zero failure limit": (["--halt-on-failures", "0"], "--halt-on-failures"),
    "failure share over 100%": (["--halt-on-failures", "150%"], "--halt-on-failures"),
    "failure limit not a number": (["--halt-on-failures", "many"], "--halt-on-failures"),
    "bad leak policy": (["--leak-policy", "ignore"], "--leak-policy"),
    "run id naming no run": (["--run-id", "run-b"], "did you mean run-a?"),
    "empty skip prefix": (["--skip-run-prefix", ""], "--skip-run-prefix is empty"),
    "bad lane workspaces": (["--lane-workspaces", "copy"], "--lane-workspaces"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_option(good_db: Env, case: str) -> None:
    extra, needle = CASES[case]
    before = file_digest(good_db.db)
    proc = good_db.run_cli("run", *good_db.base_args(), *extra)
    _assert_one_line_error(proc, needle)
    assert file_digest(good_db.db) == before
    assert not good_db.sessions.exists()
    assert good_db.argv_records() == []


def test_no_database_named(env: Env) -> None:
    args = [a for a in env.base_args() if a != env.url and a != "--database-url"]
    proc = env.run_cli("run", *args)
    _assert_one_line_error(proc, "--database-url", "DATABASE_URL")


def test_database_url_from_environment(good_db: Env) -> None:
    args = good_db.base_args()
    i = args.index("--database-url")
    del args[i : i + 2]
    proc = good_db.run_cli("run", *args, env=good_db.worker_env(DATABASE_URL=good_db.url))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://u@h/db", "unsupported database URL scheme"),
        ("not a url at all", "bad database URL"),
        ("sqlite://", "SQLite URL needs a file path"),
        ("sqlite:///:memory:", "SQLite URL needs a file path"),
        ("sqlite:///b.db?timeout=soon", "timeout= must be given once, as seconds from 0.001"),
        ("sqlite:///b.db?timeout=-1", "timeout= must be given once, as seconds from 0.001"),
        ("sqlite:///b.db?timeout=0", "timeout= must be given once, as seconds from 0.001"),
        ("sqlite:///b.db?timeout=1e7", "as seconds from 0.001 to 3600"),  # (overflows sqlite3)
        ("sqlite:///b.db?timeout=1&timeout=2", "timeout= must be given once"),
    ],
)
def test_bad_url(env: Env, url: str, needle: str) -> None:
    args = env.base_args()
    args[args.index("--database-url") + 1] = url
    proc = env.run_cli("run", *args)
    _assert_one_line_error(proc, needle)
    assert not env.sessions.exists()


def test_missing_database_file_is_not_created(env: Env) -> None:
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc, "does not exist")
    assert not env.db.exists()
    assert not env.sessions.exists()


def test_malformed_database(env: Env) -> None:
    env.db.write_bytes(b"this is not a database, just some text\n" * 10)
    before = file_digest(env.db)
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc, "not a SQLite database")
    assert file_digest(env.db) == before


def test_truncated_database(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    env.db.write_bytes(env.db.read_bytes()[:2000])
    before = file_digest(env.db)
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc)
    assert file_digest(env.db) == before
    assert not env.sessions.exists()


def test_missing_tables(env: Env) -> None:
    conn = sqlite3.connect(env.db)
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.close()
    before = file_digest(env.db)
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc, "no 'phases' table")
    assert file_digest(env.db) == before


def test_missing_columns(env: Env) -> None:
    conn = sqlite3.connect(env.db)
    conn.execute("CREATE TABLE phases (run_id TEXT, phase_id TEXT, state TEXT)")
    conn.commit()
    conn.close()
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc, "phase_index", "last_failure_reason")


def test_empty_database_guard(env: Env) -> None:
    create_backlog(env.db, [])
    before = file_digest(env.db)
    proc = env.run_cli("run", *env.base_args())
    _assert_one_line_error(proc, "no phases at all", "--allow-empty-db")
    assert file_digest(env.db) == before
    proc = env.run_cli("run", *env.base_args(), "--allow-empty-db")
    assert proc.returncode == 0, proc.stderr
    assert "Stop reason: no_candidates" in proc.stdout


def test_unwritable_session_dir(good_db: Env) -> None:
    blocker = good_db.tmp / "a-file"
    blocker.write_text("x")
    args = good_db.base_args()
    args[args.index("--session-dir") + 1] = str(blocker / "sessions")
    before = file_digest(good_db.db)
    proc = good_db.run_cli("run", *args)
    _assert_one_line_error(proc, "session directory")
    assert file_digest(good_db.db) == before
    assert good_db.argv_records() == []


def test_corrupt_journal_is_reported(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b'{"type": "session_started"}\nnot json\n{"type": "x"}\n')
    damage = Damage(journal)
    assert list(iter_records(journal, damage=damage)) == [{"type": "session_started"},
                                                           {"type": "x"}]
    assert damage.count == 1 and damage.first == ["line 2 is not JSON"]


def test_torn_last_journal_line_is_tolerated(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b'{"type": "session_started"}\n{"type": "attempt_sta')
    assert list(iter_records(journal)) == [{"type": "session_started"}]


def test_plan_writes_nothing(good_db: Env) -> None:
    create_backlog(good_db.tmp / "unused.db", [])
    before = file_digest(good_db.db)
    listing = sorted(p.name for p in good_db.tmp.iterdir())
    proc = good_db.run_cli("plan", *good_db.base_args())
    assert proc.returncode == 0, proc.stderr
    assert "1. run-a / P1" in proc.stdout
    assert file_digest(good_db.db) == before
    assert sorted(p.name for p in good_db.tmp.iterdir()) == listing  # no -wal, no sessions
    assert good_db.argv_records() == []


def test_help_reads_well() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "drainer", "run", "--help"],
                          capture_output=True, text=True, check=True)
    for flag in ("--batch-size", "--run-id", "--dry-run", "--resume", "--skip-runs-with-queued",
                 "--no-skip-runs-with-queued", "--api-url", "--phase-timeout-seconds",
                 "--max-total-minutes", "--max-timeouts-per-run", "--max-attempts-per-phase",
                 "--max-fingerprint-repeats", "--skip-run-prefix",
                 "--max-consecutive-zero-yield", "--allow-empty-db", "--database-url",
                 "--command", "--workspace", "--session-dir", "--env", "--max-log-bytes",
                 "--kill-grace-seconds", "--lanes"):
        assert flag in proc.stdout, flag


def test_integer_id_columns_are_rejected_before_anything_is_written(env: Env) -> None:
    conn = sqlite3.connect(env.db)
    conn.execute("CREATE TABLE phases (run_id INTEGER, phase_id INTEGER, phase_index INTEGER, "
                 "state TEXT, last_failure_reason TEXT)")
    conn.execute("INSERT INTO phases VALUES (1, 1, 0, 'FAILED', NULL)")
    conn.commit()
    conn.close()
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 2 and "needs text ids" in proc.stderr
    assert not env.sessions.exists()


def test_doubled_braces_in_a_command_are_literal_braces() -> None:
    tokens = split_command("echo {{run_id}} {run_id}")
    assert render_command(tokens, {"run_id": "r-1"}) == ["echo", "{run_id}", "r-1"]


def test_a_postgresql_url_without_its_driver_names_the_extra(env: Env) -> None:
    """As after the quick-start install, which has no asyncpg (its import is blocked here)."""
    import subprocess

    code = ("import sys; sys.modules['asyncpg'] = None; from drainer.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "plan", "--database-url",
         "postgresql://u:secret@127.0.0.1:5432/x"],
        capture_output=True, text=True, cwd=env.tmp, env=env.worker_env(), timeout=60)
    line = _assert_one_line_error(proc, "asyncpg", "pip install 'drainer[postgres]'")
    assert "secret" not in line


def test_plan_with_a_run_id_naming_no_run_is_exit_2(good_db: Env) -> None:
    proc = good_db.run_cli("plan", "--database-url", good_db.url, "--run-id", "run-x")
    _assert_one_line_error(proc, "--run-id 'run-x' names no run with FAILED phases")
