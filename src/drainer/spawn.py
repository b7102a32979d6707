"""A worker process watched from the event loop itself.

It starts through :class:`subprocess.Popen`'s fast path (``vfork`` and ``exec``), its exit is
seen through a pidfd (Linux 5.3+) and its two pipes are read by callbacks of the event loop
straight into the log sinks: no transport, protocol or stream per pipe, no task per pipe, no
thread per child, and the exit is seen the moment it happens whatever anyio release is
installed (before 4.15 its ``Process.wait()`` also waited for every pipe to close). Without
pidfds, the exit is polled every ``EXIT_POLL_INTERVAL``.

The loop must be asyncio's (drainer runs on anyio's asyncio backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio

Feed = Callable[[bytes], None]
READ_SIZE = 65536
EXIT_POLL_INTERVAL = 0.01  #: without a pidfd: seconds between looks at the exit


class Child:
    """One running worker: :meth:`wait` for its exit, :meth:`output_done` for the end of
    its output, :meth:`close` (always) to let go of its pipes and collect its status."""

    def __init__(self, popen: subprocess.Popen[bytes], out: Feed, err: Feed) -> None:
        self.pid = popen.pid
        self.returncode: int | None = None
        #: what writing the output raised (a full disk): the rest of the output is read
        #: and dropped, so that the worker is not blocked on a full pipe; the caller raises it
        self.error: Exception | None = None
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._exited = anyio.Event()
        self._pipes_done = anyio.Event()
        self._open: dict[int, Feed] = {}
        for stream, feed in ((popen.stdout, out), (popen.stderr, err)):
            assert stream is not None
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self._open[fd] = feed
            self._loop.add_reader(fd, self._read, fd)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass  # no pidfds here: wait() polls
        else:
            self._loop.add_reader(self._pidfd, self._reap)

    async def wait(self) -> int:
        """The worker's exit status (``-N``: killed by signal N); not its pipes' end."""
        if self._pidfd is None:
            while not self._reap():  # noqa: ASYNC110 - no pidfd to wait on
                await anyio.sleep(EXIT_POLL_INTERVAL)
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def output_done(self) -> None:
        """Both pipes reached end of file (every holder of them closed it)."""
        await self._pipes_done.wait()

    def kill(self) -> None:
        """SIGKILL the worker itself (its tree is the supervisor's business)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop reading, close our ends of the pipes and the pidfd; collect the exit status
        if the worker has exited (idempotent)."""
        for fd in list(self._open):
            self._done_reading(fd)
        for stream in (self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._reap()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if self.error is None:
                try:
                    self._open[fd](data)
                except Exception as exc:  # raised by the supervisor once the worker ended
                    self.error = exc
        else:
            self._done_reading(fd)

    def _done_reading(self, fd: int) -> None:
        if self._open.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
            if not self._open:
                self._pipes_done.set()

    def _reap(self) -> bool:
        """Collect the exit status if the worker has exited; True once it has."""
        if self.returncode is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # collected elsewhere (should not happen): unknown status
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self._popen.returncode = self.returncode  # so that Popen never waits for it again
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        self._exited.set()
        return True


def start(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], out: Feed,
          err: Feed) -> Child:
    """Start ``argv`` in a new session (its own process group), stdin closed, stdout and
    stderr into ``out`` and ``err``. Raises OSError when it cannot start."""
    popen = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=cwd, env=dict(env), start_new_session=True)
    try:
        return Child(popen, out, err)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
