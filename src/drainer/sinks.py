"""File sinks for worker output: a byte cap, a tail buffer and secret redaction.

Memory stays bounded however much a worker prints: the sink keeps only a small tail and a
few bytes of carry-over for redaction across chunk boundaries; past the cap, bytes are
counted and dropped.

The files are local, written in chunks of at most 64 KiB into the page cache: each write is
a plain ``os.write`` on the event loop's thread, microseconds, where a hop to a worker
thread per chunk (and per open and close) cost more than the write itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from anyio.abc import ByteReceiveStream

TAIL_BYTES = 8192
CHUNK = 65536


class LogSink:
    """Writes one output stream of one attempt to a capped log file.

    ``received`` counts every byte the worker produced; at most ``max_bytes`` reach the
    file, followed by one marker line when anything was dropped.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        secrets: tuple[str, ...] = (),
        tail_bytes: int = TAIL_BYTES,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.received = 0
        self.written = 0
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._secrets = tuple(s.encode() for s in secrets if s)
        self._holdback = max((len(s) for s in self._secrets), default=1) - 1
        self._carry = b""
        self._fd: int | None = None
        self._closed = False

    def open(self) -> None:
        """Create (or empty) the log file."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o644)

    async def __aenter__(self) -> LogSink:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def dropped(self) -> int:
        return self.received - self.written

    async def write(self, data: bytes) -> None:
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """:meth:`write` for a caller on the event loop's thread that cannot await (a
        reader callback): the file write is a plain ``os.write`` either way."""
        self.received += len(data)
        if self._secrets:
            data = self._redact(data)
        if not data:
            return
        self._tail += data
        if len(self._tail) > 2 * self._tail_bytes:
            del self._tail[: len(self._tail) - self._tail_bytes]
        room = self.max_bytes - self.written
        if room > 0 and self._fd is not None:
            piece = data[:room]
            self._write_all(piece)
            self.written += len(piece)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _redact(self, data: bytes) -> bytes:
        buf = self._carry + data
        for secret in self._secrets:
            buf = buf.replace(secret, b"***")
        if self._holdback and len(buf) > self._holdback:
            self._carry = buf[-self._holdback :]
            out = buf[: -self._holdback]
        elif self._holdback:
            self._carry, out = buf, b""
        else:
            out = buf
        # Redaction shrinks the text; keep ``received`` about the worker's own bytes.
        return out

    async def pump(self, stream: ByteReceiveStream) -> None:
        """Copy ``stream`` into the sink until end of file."""
        async for chunk in stream:
            await self.write(chunk)

    def tail(self, limit: int = 2000) -> str:
        """The last ``limit`` bytes of output (after redaction), decoded leniently."""
        data = bytes(self._tail[-limit:]) + (self._carry if len(self._carry) < limit else b"")
        return data.decode("utf-8", errors="replace")

    async def aclose(self) -> None:
        """Flush the carry-over, write the truncation marker, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fd is None:
            return
        try:
            if self._carry:
                carry, self._carry = self._carry, b""
                self._tail += carry
                room = self.max_bytes - self.written
                if room > 0:
                    self._write_all(carry[:room])
                    self.written += len(carry[:room])
            if self.written < self.received and self.written >= self.max_bytes:
                marker = (
                    f"\n[drainer] log truncated at {self.max_bytes} bytes: "
                    f"{self.received - self.written} more bytes were dropped\n"
                )
                self._write_all(marker.encode())
        finally:
            os.close(self._fd)
            self._fd = None


async def open_sinks(*sinks: LogSink) -> None:
    """Open the files of several sinks (all or none); use each sink as a context manager
    afterwards."""
    try:
        for sink in sinks:
            sink.open()
    except BaseException:
        for sink in sinks:
            if sink._fd is not None:
                os.close(sink._fd)
                sink._fd = None
        raise
