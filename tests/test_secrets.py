"""Secrets (database passwords, API credentials, secret-looking --env values) never reach
what drainer writes or prints."""

from __future__ import annotations

import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from conftest import Env, create_backlog


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
