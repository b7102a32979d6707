"""One API server for every worker: ``--api-url`` (check it answers) or ``--api-command``
(start one on a free port with the workers' ``DATABASE_URL`` and ``--env``, wait until it
answers, keep its output in ``<session>/api-server.log``, stop its whole tree at the end)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
from anyio.abc import Process

from . import proctree, reaper
from .config import DrainConfig, render_command, strip_userinfo
from .dburl import redact_text
from .errors import SessionError, UsageError
from .proctree import API_MARKER_VAR
from .sinks import TAIL_BYTES, LogSink

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


class ServerLog:
    """The API server's output (stdout and stderr, pumped by drainer): held in memory until
    the session's directory exists, then written to ``<session>/api-server.log``. Capped at
    ``--max-log-bytes`` like a worker's log; the last lines stay at hand for error messages."""

    def __init__(self, max_bytes: int, secrets: tuple[str, ...]) -> None:
        self._early = bytearray()
        self._sink: LogSink | None = None
        self._max_bytes = max_bytes
        self._secrets = secrets
        self._tail = bytearray()
        self._lock = anyio.Lock()  #: a write never slips in while the log is attached
        self.path: Path | None = None
        self.failed: str | None = None  #: why the log stopped being written, if it did

    async def write(self, data: bytes) -> None:
        """Take a chunk of the server's output. A log that cannot be written (a full disk)
        is given up, never the session: the output is still read, so the server never
        blocks on a full pipe."""
        self._tail += data
        del self._tail[:-TAIL_BYTES]
        async with self._lock:
            if self.failed is not None:
                return
            if self._sink is None:
                if len(self._early) < self._max_bytes:
                    self._early += data[: self._max_bytes - len(self._early)]
                return
            try:
                await self._sink.write(data)
            except OSError as exc:
                self.failed = f"writing {self.path} failed: {exc.strerror or exc}"

    async def attach(self, path: Path) -> None:
        """From now on the log is ``path`` (what came before is written first)."""
        async with self._lock:
            sink = LogSink(path, max_bytes=self._max_bytes, secrets=self._secrets)
            try:
                await sink.__aenter__()
                await sink.write(bytes(self._early))
            except OSError as exc:
                raise SessionError(f"cannot write the API server's log {path}: "
                                   f"{exc.strerror or exc}") from exc
            self._early = bytearray()
            self._sink, self.path = sink, path

    def last_line(self) -> str:
        """The server's last non-blank output line (its error, when it exits at start)."""
        lines = [x for x in bytes(self._tail).decode("utf-8", "replace").splitlines()
                 if x.strip()]
        return redact_text(lines[-1].strip(), self._secrets)[:300] if lines else ""

    async def aclose(self) -> None:
        if self._sink is not None:
            with contextlib.suppress(OSError):
                await self._sink.aclose()


@dataclass
class ApiServer:
    """The API server workers share: its URL, and its log once the session has a directory."""

    url: str | None
    log: ServerLog | None = None

    async def attach_log(self, path: Path) -> None:
        if self.log is not None:
            await self.log.attach(path)


def server_env(config: DrainConfig, session_id: str) -> dict[str, str]:
    """What the API server starts with: drainer's environment, the same ``DATABASE_URL``
    (sync form) and ``--env`` values as the workers, and its marker."""
    env = dict(os.environ)
    env["DATABASE_URL"] = config.db.sync_url
    env.update(dict(config.env))
    env[API_MARKER_VAR] = session_id
    return env


@asynccontextmanager
async def open_api_server(config: DrainConfig, session_id: str) -> AsyncIterator[ApiServer]:
    """Yield the API server workers get (its URL is None without --api-url/--api-command)."""
    if config.api_command is None:
        yield ApiServer(config.api_url)
        return
    port = free_port()
    argv = render_command(
        config.api_command_tokens,
        {"port": str(port), "python": config.python,
         "workspace": str(config.workspace.resolve())},
    )
    url = f"http://127.0.0.1:{port}"
    log = ServerLog(config.max_log_bytes, config.secrets)
    try:
        with reaper.spawning():
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=config.workspace,
                env=server_env(config, session_id), start_new_session=True,
            )
            reaper.known(process.pid)
    except OSError as exc:
        raise UsageError(f"cannot start --api-command {argv[0]!r}: {exc.strerror}") from exc

    async def pump() -> None:
        assert process.stdout is not None
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async for chunk in process.stdout:
                await log.write(chunk)

    try:
        async with _unwrapped(), anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                await _wait_until_it_answers(process, url, log)
                yield ApiServer(url, log)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        lambda: proctree.kill_marked(API_MARKER_VAR, session_id, process.pid,
                                                     grace=config.kill_grace_period)
                    )
                    if process.returncode is None:
                        with anyio.move_on_after(5):
                            await process.wait()
                    tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
            reaper.forget(process.pid)
            await log.aclose()


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """What the session raises through the pump's task group comes out as itself, not
    inside an ExceptionGroup (the pump never fails): embedders catch ``UsageError``."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _wait_until_it_answers(process: Process, url: str, log: ServerLog) -> None:
    started = time.monotonic()
    while (why := await answers(url, within=1.0)) is not None:
        if process.returncode is not None:
            said = log.last_line()
            raise UsageError(
                f"--api-command exited with status {process.returncode} before answering "
                f"on {url}" + (f": {said}" if said else " (it printed nothing)")
            )
        if time.monotonic() - started > START_TIMEOUT:
            said = log.last_line()
            raise UsageError(f"--api-command did not answer on {url} within "
                             f"{START_TIMEOUT:g}s ({why})" + (f"; it said: {said}" if said
                                                               else ""))
        await anyio.sleep(0.1)
