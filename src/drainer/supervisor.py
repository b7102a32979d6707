"""One attempt: spawn the worker, pump its output, enforce the timeout, kill its tree.

The result is filled in as the attempt goes, on ``Supervisor.result``, so a caller whose
scope was cancelled (deadline, Ctrl-C, embedding caller) still has what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from . import proctree, reaper, spawn
from .models import LeakedProcess
from .sinks import LogSink, open_sinks

log = logging.getLogger(__name__)

PIPE_DRAIN_TIMEOUT = 2.0  #: after the sweep, how long a pipe may stay open before we stop reading
RSS_SAMPLE_INTERVAL = 0.5
_death_prefix: tuple[str, ...] | None = None  #: see :func:`death_prefix` (None: not probed)


def death_prefix() -> tuple[str, ...]:
    """The argv prefix that makes a worker die with drainer: util-linux ``setpriv
    --pdeathsig KILL`` sets ``PR_SET_PDEATHSIG`` and execs the worker (about 0.8 ms more per
    spawn). Python's process API has no other way to set it without giving up its fast spawn.
    Probed once; empty where ``setpriv`` is missing or too old, then a worker outlives a
    killed drainer until a takeover or ``--resume`` kills it."""
    global _death_prefix
    if _death_prefix is None:
        _death_prefix = ()
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv is not None:
            prefix = (setpriv, "--pdeathsig", "KILL", "--")
            try:
                probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10,
                                       check=False)
            except (OSError, subprocess.SubprocessError):
                probe = None
            if probe is not None and probe.returncode == 0:
                _death_prefix = prefix
    return _death_prefix


@contextlib.contextmanager
def pidfd_child_watcher() -> Iterator[None]:
    """While it is entered (inside the event loop), asyncio learns of its subprocesses' exits
    (the API server's; workers are :mod:`drainer.spawn`'s) through pidfds on the loop itself
    instead of a thread per child (Python 3.11 on Linux; 3.12 does
    this by itself, and there this does nothing). It changes the process-wide asyncio policy,
    so the command line enters it, and it puts the previous watcher back at the end."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        yield
        return
    import asyncio

    try:
        os.close(os.pidfd_open(os.getpid()))  # the kernel has pidfds (Linux 5.3+)
        loop = asyncio.get_running_loop()
    except (OSError, RuntimeError):
        yield
        return
    policy = asyncio.get_event_loop_policy()
    previous = policy.get_child_watcher()
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    policy.set_child_watcher(watcher)
    try:
        yield
    finally:
        policy.set_child_watcher(previous)


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The argv to spawn: the worker's, behind :func:`death_prefix` when the program is
    there (a missing one must fail the spawn itself, with the usual one-line reason)."""
    program = argv[0]
    if os.path.isabs(program) and not os.access(program, os.X_OK):
        return list(argv)
    return [*death_prefix(), *argv]


def _trees_rss(pids: list[int]) -> list[int]:
    return [proctree.tree_rss(pid) for pid in pids]


class RssSampler:
    """One task for a whole session samples the memory of every running worker's tree
    (instead of a task and a thread hop per attempt): every ``interval`` seconds, one hop
    for all of them."""

    def __init__(self, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self._watched: dict[int, ProcessResult] = {}

    def watch(self, pid: int, result: ProcessResult) -> None:
        self._watched[pid] = result

    def unwatch(self, pid: int) -> None:
        self._watched.pop(pid, None)

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            if not self._watched:
                continue
            watched = list(self._watched.items())
            pids = [pid for pid, _ in watched]
            sizes = await anyio.to_thread.run_sync(_trees_rss, pids)
            for (pid, result), rss in zip(watched, sizes, strict=True):
                if self._watched.get(pid) is result and rss > (result.peak_rss_bytes or 0):
                    result.peak_rss_bytes = rss


@dataclass(frozen=True, kw_only=True)
class AttemptSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path
    attempt_id: str
    stdout_path: Path
    stderr_path: Path
    timeout: float | None
    kill_grace_period: float
    max_log_bytes: int
    secrets: tuple[str, ...] = ()
    kill_leaks: bool = True


@dataclass
class ProcessResult:
    returncode: int | None = None
    pid: int | None = None
    spawn_error: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    started: float = 0.0
    duration: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    peak_rss_bytes: int | None = None
    leaked: list[LeakedProcess] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs one attempt to completion; see :meth:`run`."""

    def __init__(
        self,
        spec: AttemptSpec,
        *,
        on_spawn: Callable[[int, float | None], None] | None = None,
        sampler: RssSampler | None = None,
    ) -> None:
        """``sampler``: the session's memory sampler; without one, the attempt samples its
        worker's tree itself."""
        self.spec = spec
        self._on_spawn = on_spawn
        self._sampler = sampler
        self.result = ProcessResult()
        self._child: spawn.Child | None = None
        self._started_ticks: int | None = None
        self._created: float | None = None

    async def run(self) -> ProcessResult:
        """Run the attempt. On cancellation, kill the whole tree (shielded) and re-raise."""
        spec = self.spec
        out = LogSink(spec.stdout_path, max_bytes=spec.max_log_bytes, secrets=spec.secrets)
        err = LogSink(spec.stderr_path, max_bytes=spec.max_log_bytes, secrets=spec.secrets)
        try:
            await open_sinks(out, err)
            async with out, err:
                await self._run(out, err)
        finally:
            self.result.stdout_tail = out.tail()
            self.result.stderr_tail = err.tail()
            self.result.stdout_bytes = out.received
            self.result.stderr_bytes = err.received
        return self.result

    async def _run(self, out: LogSink, err: LogSink) -> None:
        spec, result = self.spec, self.result
        result.started = time.monotonic()
        try:
            with reaper.spawning():
                child = spawn.start(_worker_argv(spec.argv), cwd=spec.cwd, env=spec.env,
                                    out=out.feed, err=err.feed)
                # One read of /proc/<pid>/stat gives both (psutil's create time is the
                # boot time plus the start ticks).
                self._started_ticks = proctree.start_ticks(child.pid)
                self._created = proctree.create_time(child.pid, ticks=self._started_ticks)
                reaper.known(child.pid, worker_created=self._created or time.time())
        except OSError as exc:
            result.spawn_error = f"cannot start worker {spec.argv[0]!r}: {exc.strerror or exc}"
            return
        self._child = child
        result.pid = child.pid
        try:
            if self._on_spawn is not None:
                # pid + create time identify the worker later, even if its pid is reused.
                # Inside the try: if recording it fails, the worker is still killed.
                self._on_spawn(child.pid, self._created)
            if self._sampler is not None:
                self._sampler.watch(child.pid, result)
                await self._supervise(child)
            else:  # on its own (no session): it samples its worker's memory itself
                own = self._sampler = RssSampler()
                own.watch(child.pid, result)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(own.run)
                    await self._supervise(child)
                    tg.cancel_scope.cancel()
            if child.error is not None:  # the log could not be written (a full disk)
                raise child.error
        except BaseException:
            # Cancelled from outside (deadline, signal, embedding caller): the tree dies
            # before the cancellation goes on.
            result.cancelled = child.returncode is None or result.cancelled
            with anyio.CancelScope(shield=True):
                await self._kill_tree()
                result.returncode = child.returncode
                result.duration = time.monotonic() - result.started
                await self._sweep()
            raise
        finally:
            # Our ends of the pipes closed, the exit status collected (it has exited by now).
            child.close()
            reaper.forget(child.pid)
            if self._sampler is not None:
                self._sampler.unwatch(child.pid)

    async def _supervise(self, child: spawn.Child) -> None:
        """Wait for the exit (or the timeout, then kill the tree), sweep, and give the
        output a last moment to end (a leftover may hold the pipes)."""
        spec, result = self.spec, self.result
        with anyio.move_on_after(spec.timeout) as timeout_scope:
            await child.wait()
        if timeout_scope.cancelled_caught:
            result.timed_out = True
            await self._kill_tree()
        result.returncode = child.returncode
        result.duration = time.monotonic() - result.started
        await self._sweep()
        with anyio.move_on_after(PIPE_DRAIN_TIMEOUT):
            await child.output_done()

    async def _kill_tree(self) -> None:
        """SIGTERM the tree, wait the grace, SIGKILL, then reap our child. Shielded."""
        child = self._child
        assert child is not None
        spec = self.spec
        with anyio.CancelScope(shield=True):
            killed = await anyio.to_thread.run_sync(
                lambda: proctree.kill_attempt(
                    child.pid, spec.attempt_id, grace=spec.kill_grace_period,
                    group=child.pid, started_after=self._started_ticks,
                )
            )
            self.result.killed_pids.extend(p.pid for p in killed)
            if child.returncode is None:
                with anyio.move_on_after(spec.kill_grace_period + 5):
                    await child.wait()
            if child.returncode is None:  # pragma: no cover - unkillable (D state)
                child.kill()
                await child.wait()

    async def _sweep(self) -> None:
        """Record (and kill, by policy) what still carries the attempt's marker."""
        child = self._child
        assert child is not None
        spec = self.spec
        result = self.result
        if not (result.timed_out or result.cancelled) and reaper.nothing_left_behind():
            return  # the common case, read from drainer's own children: no /proc scan
        with anyio.CancelScope(shield=True):
            leaked = await anyio.to_thread.run_sync(
                lambda: proctree.sweep_leaks(
                    spec.attempt_id,
                    group=child.pid,
                    kill=spec.kill_leaks,
                    grace=spec.kill_grace_period,
                    started_after=self._started_ticks,
                )
            )
            # Escapees without marker or group, re-parented to drainer (the command line
            # makes it their subreaper): listed here on this loop's thread, then killed.
            marked = {p.pid for p in leaked}
            escapees = [p for p in reaper.adopted(child.pid) if p.pid not in marked]
            if escapees:
                leaked += await anyio.to_thread.run_sync(
                    lambda: reaper.end(escapees, kill=spec.kill_leaks,
                                       grace=spec.kill_grace_period))
        known = {p.pid for p in self.result.leaked}
        self.result.leaked.extend(p for p in leaked if p.pid not in known)
