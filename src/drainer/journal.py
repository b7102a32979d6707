"""Sessions on disk: the directory layout, the append-only journal and the snapshot.

The journal (``<id>/journal.jsonl``) is the source of truth: one JSON object per line,
appended before each spawn and after each finish. The snapshot (``<id>.json``) is the
Autopack-compatible summary, written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .errors import SessionError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 60


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds")


def new_session_id(now: datetime | None = None) -> str:
    """``batch-drain-YYYYMMDD-HHMMSS-<4 hex>``: random suffix so two hosts never collide."""
    now = now or utcnow()
    return f"batch-drain-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def safe_name(value: str) -> str:
    """A file-name-safe, bounded form of an id from the database.

    Ids are data: anything outside ``[A-Za-z0-9._-]`` becomes ``_``, leading dots are
    dropped (no ``..``, no hidden files), and when the id had to change a short hash of the
    original keeps two different ids from sharing a file.
    """
    cleaned = _UNSAFE.sub("_", value).lstrip(".")[:MAX_NAME] or "_"
    if cleaned != value:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned}-{digest}"
    return cleaned


def check_writable_dir(path: Path) -> None:
    """Fail unless ``path`` exists as a writable directory or can be created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SessionError(f"session directory {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SessionError(
            f"session directory {path} is not writable; choose another with --session-dir"
        )


def journal_in_use(path: Path) -> bool:
    """True while a drainer process holds the session (it keeps its journal flock'ed)."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


class SessionFiles:
    """Paths of one session and the journal writer.

    The journal stays flock'ed while the session runs, so no second drainer can resume (and
    reconcile) a session that is alive. Secrets are redacted from every line and snapshot.
    """

    def __init__(
        self, session_dir: Path, session_id: str, secrets: tuple[str, ...] = ()
    ) -> None:
        self.session_dir = session_dir
        self.session_id = session_id
        self.snapshot_path = session_dir / f"{session_id}.json"
        self.root = session_dir / session_id
        self.journal_path = self.root / "journal.jsonl"
        self.logs_dir = self.root / "logs"
        self._journal: Any = None
        self._secrets: list[bytes] = []
        for secret in secrets:
            if secret:
                self._secrets.append(secret.encode())
                self._secrets.append(orjson.dumps(secret)[1:-1])  # as it appears inside JSON

    def _redact(self, data: bytes) -> bytes:
        for secret in self._secrets:
            data = data.replace(secret, b"***")
        return data

    def create(self) -> None:
        try:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            # Unbuffered append: each event reaches the kernel in one write, so a killed
            # drainer loses nothing it journaled (a torn line only on power loss).
            journal = open(self.journal_path, "a+b", buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise SessionError(f"cannot create session files in {self.root}: {exc}") from exc
        try:
            fcntl.flock(journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            journal.close()
            raise SessionError(
                f"session {self.session_id} is being drained by another drainer process "
                "right now; wait for it to stop (drainer status)"
            ) from None
        try:
            _drop_torn_line(journal.fileno())
        except OSError as exc:
            journal.close()
            raise SessionError(f"cannot repair journal {self.journal_path}: {exc}") from exc
        self._journal = journal

    def log_paths(self, run_id: str, phase_id: str, attempt_number: int) -> tuple[Path, Path]:
        base = f"{safe_name(run_id)}__{safe_name(phase_id)}__{attempt_number}"
        out = self.logs_dir / f"{base}.stdout.txt"
        err = self.logs_dir / f"{base}.stderr.txt"
        for p in (out, err):
            if p.resolve().parent != self.logs_dir.resolve():  # pragma: no cover - defence
                raise SessionError(f"refusing log path outside the logs directory: {p}")
        return out, err

    def append(self, event: dict[str, Any]) -> None:
        """Append one event to the journal (a small local write; done synchronously)."""
        if self._journal is None:
            raise SessionError("journal is not open")
        try:
            self._journal.write(self._redact(orjson.dumps(event)) + b"\n")
        except OSError as exc:
            raise SessionError(f"cannot append to journal {self.journal_path}: {exc}") from exc

    def close(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None

    def write_snapshot(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.snapshot_path, data, redact=self._redact)


def _drop_torn_line(fd: int) -> None:
    """A journal whose last line was cut by a crash: cut it off before appending more."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    tail_size = min(size, 1 << 16)
    tail = os.pread(fd, tail_size, size - tail_size)
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, size - tail_size + cut + 1 if cut >= 0 else (0 if size <= tail_size else size))


def write_json_atomic(
    path: Path, data: dict[str, Any], *, redact: Callable[[bytes], bytes] | None = None
) -> None:
    payload = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    if redact is not None:
        payload = redact(payload)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every event of a journal. A torn last line is dropped; a bad line elsewhere is corrupt."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SessionError(f"cannot read journal {path}: {exc.strerror}") from exc
    lines = raw.split(b"\n")
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if number == len(lines):  # the last line, not newline-terminated: torn write
                break
            raise SessionError(f"corrupt journal {path}: line {number} is not JSON") from exc
        if not isinstance(event, dict) or "type" not in event:
            raise SessionError(f"corrupt journal {path}: line {number} is not an event")
        events.append(event)
    return events


def hostname() -> str:
    return socket.gethostname()
