"""One API server for every worker: ``--api-url`` (check it answers) or ``--api-command``
(start one on a free port, wait until it answers, stop its whole tree at the end)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from . import proctree, reaper
from .config import DrainConfig, render_command, strip_userinfo
from .errors import UsageError
from .proctree import API_MARKER_VAR

START_TIMEOUT = 30.0
PROBE_TIMEOUT = 3.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def answers(url: str, *, within: float = PROBE_TIMEOUT) -> str | None:
    """None when ``url`` answers (TCP connect, and an HTTP status line for http://), else why."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    try:
        with anyio.fail_after(within):
            stream = await anyio.connect_tcp(parts.hostname, port)
            async with stream:
                if parts.scheme == "https":
                    return None  # the port accepts connections; TLS is the worker's business
                request = f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.hostname}\r\n\r\n"
                await stream.send(request.encode())
                first = await stream.receive(64)
        if not first.startswith(b"HTTP/"):
            return "it accepted a connection but did not answer HTTP"
        return None
    except TimeoutError:
        return f"no answer within {within:g}s"
    except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        return str(exc) or type(exc).__name__


async def kill_orphaned_api_server(session_id: str, grace: float) -> int:
    """Kill what a crashed run of ``session_id`` left of its API server (found by marker);
    returns how many processes."""
    return await anyio.to_thread.run_sync(
        lambda: proctree.kill_marked(API_MARKER_VAR, session_id, None, grace=grace))


async def check_api_url(url: str) -> None:
    why = await answers(url)
    if why is not None:
        shown = strip_userinfo(url)
        raise UsageError(f"--api-url {shown} does not answer ({why}); start the server first")


@asynccontextmanager
async def open_api_server(
    config: DrainConfig, session_id: str, log_path: Path
) -> AsyncIterator[str | None]:
    """Yield the API URL workers get (None without --api-url/--api-command)."""
    if config.api_command is None:
        yield config.api_url
        return
    port = free_port()
    argv = render_command(
        config.api_command_tokens,
        {"port": str(port), "python": config.python,
         "workspace": str(config.workspace.resolve())},
    )
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, API_MARKER_VAR: session_id}
    log = await anyio.to_thread.run_sync(lambda: open(log_path, "ab"))  # noqa: SIM115
    try:
        with reaper.spawning():
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=config.workspace, env=env, start_new_session=True,
            )
            reaper.known(process.pid)
    except OSError as exc:
        log.close()
        raise UsageError(f"cannot start --api-command {argv[0]!r}: {exc.strerror}") from exc
    try:
        started = time.monotonic()
        while (why := await answers(url, within=1.0)) is not None:
            if process.returncode is not None:
                raise UsageError(
                    f"--api-command exited with status {process.returncode} before answering "
                    f"on {url} (see {log_path})"
                )
            if time.monotonic() - started > START_TIMEOUT:
                raise UsageError(f"--api-command did not answer on {url} within "
                                 f"{START_TIMEOUT:g}s ({why}; see {log_path})")
            await anyio.sleep(0.1)
        yield url
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                lambda: proctree.kill_marked(API_MARKER_VAR, session_id, process.pid,
                                             grace=config.kill_grace_period)
            )
            if process.returncode is None:
                with anyio.move_on_after(5):
                    await process.wait()
            await process.aclose()
            reaper.forget(process.pid)
            log.close()
