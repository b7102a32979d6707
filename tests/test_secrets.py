"""Secrets (database passwords, API credentials, secret-looking --env values) never reach
what drainer writes or prints."""

from __future__ import annotations

import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy.engine import make_url

from conftest import Env, create_backlog
from drainer.dburl import parse_database_url


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_secrets_never_reach_the_journal_or_snapshot(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        cmd = f"{sys.executable} {env.worker} {{run_id}} {{phase_id}} --token tok-SECRET-123"
        proc = env.run_cli(
            "run", *env.base_args(cmd), "--env", "API_TOKEN=tok-SECRET-123",
            "--api-url", f"http://bob:pw-SECRET-456@127.0.0.1:{port}/",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    written = b"".join(p.read_bytes() for p in env.sessions.rglob("*") if p.is_file())
    assert b"tok-SECRET-123" not in written and b"pw-SECRET-456" not in written
    assert b"tok-SECRET-123" not in (proc.stdout + proc.stderr).encode()


@pytest.mark.parametrize("password", ["se@cret", "50%off", "a@b%zz", "p%40ss"])
def test_a_password_typed_raw_is_taken_whole_and_never_shown(password: str) -> None:
    db = parse_database_url(f"postgresql://user:{password}@127.0.0.1:5432/test")
    expected = password.replace("%40", "@")  # an escape that was already there is kept
    assert db.password == expected
    assert db.async_url.host == "127.0.0.1" and db.async_url.database == "test"
    for part in ("cret", "off", "zz", "ss"):
        assert part not in db.redacted
    assert make_url(db.sync_url).password == expected  # workers get the same password


def test_an_unreachable_server_with_a_raw_password_shows_none_of_it(env: Env) -> None:
    # Port 1 on localhost: nothing listens, so the connection is refused at once.
    url = "postgresql://user:se@cret@127.0.0.1:1/test"
    proc = env.run_cli("run", "--database-url", url, "--command", "true")
    assert proc.returncode == 2
    assert "cret" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("drainer: error: ") and "127.0.0.1" in proc.stderr


def test_a_lone_user_in_the_url_is_hidden_too(env: Env) -> None:
    # Some services take a token as the user name, with no password.
    db = parse_database_url("postgresql://tok-SECRET-789@127.0.0.1:1/test")
    assert db.redacted == "postgresql://***@127.0.0.1:1/test"
    assert make_url(db.sync_url).username == "tok-SECRET-789"  # workers get it whole
    proc = env.run_cli("run", "--database-url", "postgresql://tok-SECRET-789@127.0.0.1:1/test",
                       "--command", "true")
    assert proc.returncode == 2
    assert "SECRET" not in proc.stderr + proc.stdout, proc.stderr
