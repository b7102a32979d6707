"""Async file sinks for worker output: a byte cap, a tail buffer and secret redaction.

Memory stays bounded however much a worker prints: the sink keeps only a small tail and a
few bytes of carry-over for redaction across chunk boundaries; past the cap, bytes are
counted and dropped.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import anyio
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
        self._file: anyio.AsyncFile[bytes] | None = None
        self._closed = False

    async def __aenter__(self) -> LogSink:
        if self._file is None:  # not opened already by open_sinks
            self._file = await anyio.open_file(self.path, "wb")
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
        self.received += len(data)
        if self._secrets:
            data = self._redact(data)
        if not data:
            return
        self._tail += data
        if len(self._tail) > 2 * self._tail_bytes:
            del self._tail[: len(self._tail) - self._tail_bytes]
        room = self.max_bytes - self.written
        if room > 0 and self._file is not None:
            piece = data[:room]
            await self._file.write(piece)
            self.written += len(piece)

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
        """Flush the carry-over, write the truncation marker, close. Idempotent, shielded."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._file is None:
                return
            if self._carry:
                carry, self._carry = self._carry, b""
                self._tail += carry
                room = self.max_bytes - self.written
                if room > 0:
                    await self._file.write(carry[:room])
                    self.written += len(carry[:room])
            if self.written < self.received and self.written >= self.max_bytes:
                marker = (
                    f"\n[drainer] log truncated at {self.max_bytes} bytes: "
                    f"{self.received - self.written} more bytes were dropped\n"
                )
                await self._file.write(marker.encode())
            await self._file.aclose()


async def open_sinks(*sinks: LogSink) -> None:
    """Open the files of several sinks in one hop to a worker thread (one per attempt
    matters when attempts are short); use each sink as a context manager afterwards."""

    def open_all() -> list[BinaryIO]:
        opened: list[BinaryIO] = []
        try:
            for sink in sinks:
                opened.append(sink.path.open("wb"))
        except BaseException:
            for fh in opened:
                fh.close()
            raise
        return opened

    for sink, fh in zip(sinks, await anyio.to_thread.run_sync(open_all), strict=True):
        sink._file = anyio.AsyncFile(fh)
