"""The Autopack-compatible session file (``<id>.json``), built from the journal, and
drainer's own summary of the session beside it (``<id>/session.json``).

``<id>.json`` holds Autopack's keys only, and each ``results[]`` item Autopack's fields only
(:func:`~drainer.models.autopack_record`), so Autopack's controller can load it with its
``cls(**data)`` loaders and its analyzer reads exact figures; drainer's fields stay in the
journal, and its session-level ones (lanes, stop reason, config...) in ``session.json``.

Each write is atomic (temp file, fsync, rename). After the first, a write copies the previous
file's ``results[]`` items as bytes (in the kernel where it can) and parses only the journal
written since, so the Python work per write is the new attempts, not the whole session. The
file is checked before its bytes are reused: one changed behind drainer's back is rebuilt from
the journal.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .journal import Cursor, result_records
from .models import autopack_record

FLUSH_AT = 1 << 16  #: bytes gathered before one write(2)
COPY_CHUNK = 1 << 24  #: bytes per copy_file_range (or pread/write) call


@dataclass(frozen=True)
class _Written:
    """Where the last file's results items lie, and how to know that file again."""

    stamp: tuple[int, int, int]  #: (inode, size, mtime in ns) just after the rename
    body_start: int
    body_length: int
    count: int  #: results items in it
    cursor: Cursor  #: the journal read up to here


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class Snapshot:
    """Writes ``path`` from ``journal_path``, and ``info_path`` (drainer's summary);
    ``redact`` cleans the headers' bytes."""

    def __init__(self, path: Path, journal_path: Path, info_path: Path,
                 redact: Callable[[bytes], bytes] = lambda b: b) -> None:
        self.path = path
        self.journal_path = journal_path
        self.info_path = info_path
        self.redact = redact
        self._last: _Written | None = None

    def write(self, header: dict[str, Any], upto: int,
              info: dict[str, Any] | None = None) -> int:
        """Write the file: ``header`` (every field but the results), then the results of the
        journal up to byte ``upto``; then ``info``, when given, to ``info_path``. Returns the
        first file's size. Blocking; call from a thread."""
        size = self._write_session(header, upto)
        if info is not None:
            _write_atomically(self.info_path, self.redact(
                orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n"))
        return size

    def _write_session(self, header: dict[str, Any], upto: int) -> int:
        head = self.redact(orjson.dumps(header, option=orjson.OPT_INDENT_2))
        head = head[: head.rfind(b"}")].rstrip() + b',\n  "results": ['
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                   dir=self.path.parent)
        try:
            out = _Out(fd)
            out.put(head)
            count, cursor = self._reuse(out)
            for record in result_records(self.journal_path, upto=upto, cursor=cursor):
                item = autopack_record(record)
                if item is None:
                    continue
                out.put((b",\n    " if count else b"\n    ") + orjson.dumps(item))
                count += 1
            body_length = out.size - len(head)
            out.put(b"\n  ]\n}\n" if count else b"]\n}\n")
            out.flush()
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last = _Written(_stamp(os.stat(self.path)), len(head), body_length, count,
                              cursor)
        return out.size

    def _reuse(self, out: _Out) -> tuple[int, Cursor]:
        """Copy the last file's results items into ``out`` when that file is still the one
        drainer wrote; returns how many there are and where the journal is to be read on."""
        last = self._last
        if last is None or not last.count:
            return 0, Cursor()
        try:
            src = os.open(self.path, os.O_RDONLY)
        except OSError:
            return 0, Cursor()
        try:
            if _stamp(os.fstat(src)) != last.stamp:
                return 0, Cursor()
            out.flush()
            _copy(src, out.fd, last.body_start, last.body_length)
            out.size += last.body_length
        finally:
            os.close(src)
        return last.count, last.cursor.copy()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


class _Out:
    """Unbuffered-by-Python output on a raw descriptor, so bytes copied by the kernel land in
    order with the ones written here."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_size = 0

    def put(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        self.size += len(data)
        if self._pending_size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            _write_all(self.fd, b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(src: int, dst: int, offset: int, length: int) -> None:
    """``length`` bytes of ``src`` from ``offset`` onto the end of ``dst``: in the kernel
    (``copy_file_range``) where it can, else through a buffer."""
    end = offset + length
    copy_range = getattr(os, "copy_file_range", None)
    while offset < end:
        n = 0
        if copy_range is not None:
            try:
                n = copy_range(src, dst, min(COPY_CHUNK, end - offset), offset)
            except OSError:
                copy_range = None  # not on this file system: copy through a buffer
        if not n:
            chunk = os.pread(src, min(COPY_CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(f"snapshot file shrank while being copied at byte {offset}")
            _write_all(dst, chunk)
            n = len(chunk)
        offset += n
