"""Sessions on disk: the directory layout, the append-only journal, its streaming readers and
resume replay.

The journal (``<id>/journal.jsonl``) is the source of truth: one JSON object per line,
appended before each spawn and after each finish. Its readers stream it, so reading a
session never holds its attempts in memory; the snapshot (``snapshot``) is built from it.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .errors import SessionError
from .events import (
    AttemptFinished,
    AttemptSpawned,
    AttemptStarted,
    JournalEvent,
    RunStopped,
    RunUnstopped,
    SessionResumed,
    SessionStarted,
    SessionStopped,
)
from .models import Attempt, StopReason, stop_reason_of

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 60
JOURNAL_NAME = "journal.jsonl"
INFO_NAME = "session.json"  #: drainer's summary of the session, beside its journal
LIFECYCLE = frozenset({SessionStarted.kind, SessionResumed.kind, SessionStopped.kind})


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds")


def new_session_id(now: datetime | None = None) -> str:
    """``batch-drain-YYYYMMDD-HHMMSS-<4 hex>``: random suffix so two hosts never collide."""
    now = now or utcnow()
    return f"batch-drain-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def unused_session_id(session_dir: Path) -> str:
    """A new session id that no session in ``session_dir`` has (sessions started in the
    same second share all but the 4 random hex digits). Only looks: the directory is made
    when the session starts writing (:meth:`SessionFiles.create`), exclusively."""
    while True:
        session_id = new_session_id()
        if not any(os.path.lexists(session_dir / name)  # (False where it cannot look)
                   for name in (session_id, f"{session_id}.json")):
            return session_id


def hostname(name: str | None = None) -> str:
    """The host drainer records: ``--host-name`` when given, else the machine's name."""
    return name or socket.gethostname()


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


#: how long a journal's lock is tried before it counts as held: another process's look
#: (``journal_in_use``, as ``drainer stop --session latest`` and ``--resume`` do) holds it
#: for microseconds, a drainer running the session for as long as it runs
LOCK_PATIENCE = 0.05


def _lock(fd: int) -> bool:
    """Take the exclusive lock of an open journal; False when a drainer holds it."""
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def journal_in_use(path: Path) -> bool:
    """True while a drainer process holds the session (it keeps its journal flock'ed)."""
    try:
        with open(path, "rb") as fh:
            if not _lock(fh.fileno()):
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


# -- writing -----------------------------------------------------------------------------


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
        self.journal_path = self.root / JOURNAL_NAME
        self.info_path = self.root / INFO_NAME
        self.logs_dir = self.root / "logs"
        self.journal_size = 0  #: bytes in the journal (where the next line starts)
        self._journal: BinaryIO | None = None
        self._secrets: list[bytes] = []
        for secret in secrets:
            if secret:
                self._secrets.append(secret.encode())
                self._secrets.append(orjson.dumps(secret)[1:-1])  # as it appears inside JSON

    def redact(self, data: bytes) -> bytes:
        for secret in self._secrets:
            data = data.replace(secret, b"***")
        return data

    def create(self, *, new: bool = False) -> None:
        """Open the journal (locked: one drainer per session); ``new``: a new session, whose
        directory must not exist yet (a drainer that drew the same id in the same second
        has it)."""
        try:
            if new:
                self.root.parent.mkdir(parents=True, exist_ok=True)
                self.root.mkdir()
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            # Unbuffered append: each event reaches the kernel in one write, so a killed
            # drainer loses nothing it journaled (a torn line only on power loss).
            journal = open(self.journal_path, "a+b", buffering=0)  # noqa: SIM115
        except FileExistsError as exc:
            if new and os.path.lexists(self.root):
                raise SessionError(
                    f"session {self.session_id} was just started by another drainer in "
                    f"{self.root.parent} (same second, same random part); start again"
                ) from None
            where = exc.filename or self.root.parent
            raise SessionError(f"cannot create session files in {self.root}: {where} is not "
                               "a directory") from None
        except OSError as exc:
            raise SessionError(f"cannot create session files in {self.root}: {exc}") from exc
        if not _lock(journal.fileno()):
            journal.close()
            raise SessionError(
                f"session {self.session_id} is being drained by another drainer process "
                "right now; wait for it to stop (drainer status)"
            ) from None
        try:
            self.journal_size = _drop_torn_line(journal.fileno())
        except OSError as exc:
            journal.close()
            raise SessionError(f"cannot repair journal {self.journal_path}: {exc}") from exc
        self._journal = journal

    def log_paths(self, run_id: str, phase_id: str, attempt_number: int) -> tuple[Path, Path]:
        base = f"{safe_name(run_id)}__{safe_name(phase_id)}__{attempt_number}"
        out = self.logs_dir / f"{base}.stdout.txt"
        err = self.logs_dir / f"{base}.stderr.txt"
        # safe_name leaves no separator and no leading dot: the names cannot leave logs_dir.
        # Checked once more without resolving each path (a resolve costs a syscall per part).
        if os.sep in base or base.startswith("."):  # pragma: no cover - defence in depth
            raise SessionError(f"refusing log path outside the logs directory: {out}")
        return out, err

    def append(self, event: JournalEvent, at: str) -> None:
        """Append one event to the journal (a small local write; done synchronously)."""
        if self._journal is None:
            raise SessionError("journal is not open")
        data = event.to_journal()
        data["at"] = at
        line = self.redact(orjson.dumps(data)) + b"\n"
        try:
            written = self._journal.write(line)
            if written != len(line):  # a full disk (or file size limit) took part of it
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
        except OSError as exc:
            # Cut the torn line back off, so that the journal ends on a whole line.
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal.fileno(), self.journal_size)
            raise SessionError(f"cannot append to journal {self.journal_path}: "
                               f"{exc.strerror or exc}; the session is resumable once there is "
                               "room") from exc
        self.journal_size += len(line)

    def close(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None


def _drop_torn_line(fd: int) -> int:
    """A journal whose last line was cut by a crash: cut it off before appending more.
    Returns the journal's size afterwards."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return 0
    if os.pread(fd, 1, size - 1) == b"\n":
        return size
    # Look back, 64 KiB at a time, for the end of the last whole line (a torn line may be
    # longer than one chunk).
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - (1 << 16))
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    os.ftruncate(fd, keep)
    return keep


# -- reading -----------------------------------------------------------------------------


@dataclass
class Damage:
    """The bad lines a read of a journal skipped: how many, and the first few with why.

    A torn last line (no newline: a crash mid-write) is not damage, it is dropped. A bad line
    elsewhere (not JSON, not an event, a field missing or of the wrong type) is skipped and
    counted here, so one damaged line never makes a whole session unreadable.
    """

    path: Path
    count: int = 0
    first: list[str] = field(default_factory=list)
    SHOWN = 3

    def add(self, number: int, why: str) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(f"line {number} {why}")

    def describe(self) -> str:
        more = f", and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return (f"journal {self.path}: skipped {self.count} corrupt line(s) "
                f"({'; '.join(self.first)}{more})")


def iter_records(
    path: Path, *, upto: int | None = None, damage: Damage | None = None
) -> Iterator[dict[str, Any]]:
    """Every event of a journal as a dict, streamed (up to byte ``upto`` when given).

    A torn last line (no newline, not JSON) is dropped; a bad line elsewhere is skipped and
    counted in ``damage`` when given.
    """
    for _number, event in _numbered(path, upto=upto, damage=damage):
        yield event


@dataclass
class Cursor:
    """A place in a journal to read on from: the byte offset and line number after the last
    whole line read, and the attempts open there (so a later read applies :func:`_walk`'s
    rule as if it had read from the start)."""

    offset: int = 0
    line: int = 0
    open_ids: set[str] = field(default_factory=set)

    def copy(self) -> Cursor:
        return Cursor(self.offset, self.line, set(self.open_ids))


def _numbered(
    path: Path, *, upto: int | None, cursor: Cursor | None = None, damage: Damage | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Events as (line number, dict) from ``cursor`` (the start when not given) up to byte
    ``upto``; the cursor moves past each whole line as it is read, bad ones included."""
    cursor = cursor or Cursor()
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise SessionError(f"cannot read journal {path}: {exc.strerror}") from exc
    with fh:
        fh.seek(cursor.offset)
        read = cursor.offset
        for number, line in enumerate(fh, start=cursor.line + 1):
            read += len(line)
            if upto is not None and read > upto:
                return
            if not line.endswith(b"\n"):
                try:
                    orjson.loads(line)
                except orjson.JSONDecodeError:
                    return  # the last line, cut short: a torn write, not damage
            cursor.offset, cursor.line = read, number
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                _skip(damage, number, "is not JSON")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                _skip(damage, number, "is not an event")
                continue
            yield number, event


def _skip(damage: Damage | None, number: int, why: str) -> None:
    if damage is not None:
        damage.add(number, why)


def _walk(
    path: Path, *, upto: int | None = None, cursor: Cursor | None = None,
    damage: Damage | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The journal's events as (line number, dict), streamed, with one rule applied: an
    ``attempt_finished`` counts only while its ``attempt_started`` is open, so a finish
    written twice, or one without a start, is skipped. Memory holds the open ids only."""
    for number, data, _attempt in _walk_parsed(path, upto=upto, cursor=cursor, damage=damage):
        yield number, data


def _walk_parsed(
    path: Path, *, upto: int | None = None, cursor: Cursor | None = None,
    damage: Damage | None = None,
) -> Iterator[tuple[int, dict[str, Any], Attempt | None]]:
    """:func:`_walk`, with each ``attempt_finished``'s record as parsed to check it (None
    for the other events): a reader that wants the records does not parse them twice."""
    cursor = cursor or Cursor()
    open_ids = cursor.open_ids
    for number, data in _numbered(path, upto=upto, cursor=cursor, damage=damage):
        kind = data["type"]
        attempt = None
        try:
            if kind == AttemptStarted.kind:
                open_ids.add(str(data["attempt_id"]))
            elif kind == AttemptFinished.kind:
                attempt_id = str(data["attempt_id"])
                if attempt_id not in open_ids:
                    continue
                try:
                    attempt = Attempt.from_json(data)
                except (TypeError, ValueError) as exc:  # damage: its attempt stays open
                    _skip(damage, number, _bad_fields(kind, exc))
                    continue
                open_ids.discard(attempt_id)
        except KeyError as exc:
            _skip(damage, number, _bad_fields(kind, exc))
            continue
        yield number, data, attempt


def _bad_fields(kind: str, exc: Exception) -> str:
    return f"({kind}) lacks a field or has a wrong type ({exc})"


def iter_attempts(path: Path, *, upto: int | None = None) -> Iterator[Attempt]:
    """Every finished attempt of a session's journal, in order, streamed. A finish line that
    is not an attempt record is skipped (:func:`replay` reports it as damage)."""
    return (item for item in iter_outcomes(path, upto=upto) if isinstance(item, Attempt))


def iter_outcomes(
    path: Path, *, upto: int | None = None
) -> Iterator[Attempt | RunStopped | RunUnstopped]:
    """The finished attempts and the run stops and lifts of a session's journal, in journal
    order, streamed: what a resume replays into the stop rules (a lift resets the rules'
    counts for its run, so the order matters)."""
    for _number, data, attempt in _walk_parsed(path, upto=upto):
        kind = data["type"]
        try:
            if attempt is not None:
                yield attempt
            elif kind == RunStopped.kind:
                yield RunStopped.from_journal(data)
            elif kind == RunUnstopped.kind:
                yield RunUnstopped.from_journal(data)
        except (KeyError, TypeError, ValueError):
            continue  # (replay reports it as damage)


def result_records(
    path: Path, *, upto: int | None, cursor: Cursor | None = None
) -> Iterator[dict[str, Any]]:
    """The ``results[]`` items of the snapshot: finished attempts as journaled (an attempt
    record is the ``attempt_finished`` line without its ``type`` and ``at``), from ``cursor``
    on when given."""
    for _number, data in _walk(path, upto=upto, cursor=cursor):
        if data["type"] == AttemptFinished.kind:
            del data["type"]
            data.pop("at", None)
            yield data


@dataclass
class Dangling:
    """An attempt the journal shows started but never finished (drainer died meanwhile)."""

    started: AttemptStarted
    pid: int | None = None
    create_time: float | None = None


@dataclass
class Replay:
    """What a journal says about its session, in bounded memory (no attempt records)."""

    session_id: str
    journal_path: Path
    started_at: str
    config: dict[str, Any]
    finished: int = 0  #: attempts finished (interrupted ones included)
    interrupted: int = 0
    dangling: list[Dangling] = field(default_factory=list)  #: started, never finished
    stopped_runs: dict[str, str] = field(default_factory=dict)
    stopped: bool = False  #: the last lifecycle event is session_stopped
    stop_reason: StopReason | None = None
    completed_at: str | None = None
    last_event_at: str = ""
    damage: Damage | None = None  #: the bad lines the pass skipped

    @property
    def complete(self) -> bool:
        """Ended for good: stopped, and not by a resumable reason."""
        return self.stopped and not (self.stop_reason is not None and self.stop_reason.resumable)

    @property
    def done(self) -> int:
        """Attempts that really ran to an end (not interrupted)."""
        return self.finished - self.interrupted


#: the last few replays, by journal: a resume asks twice (the command line, for the saved
#: options, then the session), and a long journal takes a second or more to read
_replays: dict[Path, tuple[tuple[int, int, int, int], Replay]] = {}
_replays_lock = threading.Lock()  # (an embedding program may run sessions in threads)
REPLAYS_KEPT = 4


def replay(journal_path: Path) -> Replay:
    """What the journal says (:func:`_replay`); read again only when the file has changed
    since the last replay of it in this process (device, inode, size, mtime)."""
    try:
        st = os.stat(journal_path)
    except OSError:
        return _replay(journal_path)  # (which says why it cannot be read)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _replays_lock:
        kept = _replays.get(journal_path)
    if kept is not None and kept[0] == key:
        return copy.deepcopy(kept[1])
    found = _replay(journal_path)
    with _replays_lock:
        _replays.pop(journal_path, None)
        _replays[journal_path] = (key, copy.deepcopy(found))
        while len(_replays) > REPLAYS_KEPT:
            del _replays[next(iter(_replays))]
    return found


def _replay(journal_path: Path) -> Replay:
    """One streaming pass over a journal. Started attempts are kept as their raw lines
    while open; only those left dangling become typed events."""
    damage = Damage(journal_path)
    walk = _walk(journal_path, damage=damage)
    first = next(walk, None)
    if first is None or first[1]["type"] != SessionStarted.kind or damage.count:
        why = f" ({damage.first[0]})" if damage.count else ""
        raise SessionError(f"corrupt journal {journal_path}: it does not start a session{why}; "
                           "it cannot be read or resumed")
    try:
        header = SessionStarted.from_journal(first[1])
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionError(f"corrupt journal {journal_path}: line 1 "
                           f"{_bad_fields(SessionStarted.kind, exc)}; it cannot be read or "
                           "resumed") from exc
    state = Replay(
        session_id=header.session_id or journal_path.parent.name,
        journal_path=journal_path,
        started_at=header.started_at,
        config=header.config,
        damage=damage,
    )
    open_attempts: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {}
    for number, data in walk:
        kind = data["type"]
        try:
            if kind == AttemptStarted.kind:
                open_attempts[str(data["attempt_id"])] = (number, data, {})
            elif kind == AttemptSpawned.kind:
                started = open_attempts.get(str(data["attempt_id"]))
                if started is not None:
                    started[2].update(data)
            elif kind == AttemptFinished.kind:  # a valid record (_walk checked it)
                open_attempts.pop(str(data["attempt_id"]), None)
                state.finished += 1
                state.interrupted += bool(data.get("interrupted"))
            elif kind == RunStopped.kind:
                state.stopped_runs[str(data["run_id"])] = str(data["reason"])
            elif kind == RunUnstopped.kind:
                state.stopped_runs.pop(str(data["run_id"]), None)
            elif kind == SessionStopped.kind:
                stopped = SessionStopped.from_journal(data)
                state.stopped = True
                state.stop_reason = stopped.stop_reason
                state.completed_at = stopped.completed_at or None
            elif kind in (SessionResumed.kind, SessionStarted.kind):
                state.stopped = False
                state.stop_reason = state.completed_at = None
        except (KeyError, TypeError, ValueError) as exc:
            damage.add(number, _bad_fields(kind, exc))
    for number, data, spawned in open_attempts.values():
        try:
            started_event = AttemptStarted.from_journal(data, state.session_id)
            spawn = AttemptSpawned.from_journal(spawned) if spawned else None
        except (KeyError, TypeError, ValueError) as exc:
            damage.add(number, _bad_fields(AttemptStarted.kind, exc))
            continue
        state.dangling.append(Dangling(started_event, spawn.pid if spawn else None,
                                       spawn.create_time if spawn else None))
    state.last_event_at = _last_at(journal_path)
    return state


def _last_at(path: Path) -> str:
    """The ``at`` of the journal's last whole line (read from its end, not streamed)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - (1 << 16)))
            tail = fh.read()
    except OSError:
        return ""
    for line in reversed(tail.split(b"\n")):
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return str(data.get("at", ""))
    return ""


def session_journals(session_dir: Path) -> list[Path]:
    if not session_dir.is_dir():
        return []
    return sorted(session_dir.glob(f"batch-drain-*/{JOURNAL_NAME}"))


def find_resumable(
    session_dir: Path, which: str, unreadable: list[str] | None = None
) -> Replay | None:
    """``which`` is ``latest`` (newest incomplete session, or None) or a session id. With
    ``latest``, sessions whose journal cannot be read at all are passed over, and why is
    added to ``unreadable`` when given."""
    if which != "latest":
        journal = session_dir / which / JOURNAL_NAME
        if "/" in which or not journal.is_file():
            raise SessionError(f"no session {which!r} in {session_dir} (see drainer status)")
        if journal_in_use(journal):
            raise SessionError(
                f"session {which} is being drained by another drainer process right now; "
                "it can be resumed once that process stops"
            )
        found = replay(journal)
        if found.complete:
            raise SessionError(
                f"session {which} completed ({found.stop_reason or 'stopped'}); it cannot be "
                "resumed, start a new session instead"
            )
        return found
    candidates = []
    for journal in session_journals(session_dir):
        if journal_in_use(journal):
            continue  # alive in another drainer process: not ours to resume
        if _peek_stopped_for_good(journal):
            continue  # cheap: a complete session's last line says so
        try:
            found = replay(journal)
        except SessionError as exc:
            if unreadable is not None:  # it does not block resuming the newest good one
                unreadable.append(str(exc))
            continue
        if not found.complete:
            candidates.append(found)
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.started_at, r.session_id))


def _peek_stopped_for_good(journal: Path) -> bool:
    """True when the journal's last line is a session_stopped with a final reason."""
    try:
        with journal.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 4096))
            last = fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        data = orjson.loads(last)
    except (OSError, orjson.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("type") != SessionStopped.kind:
        return False
    reason = stop_reason_of(data.get("stop_reason"))
    return not (reason is not None and reason.resumable)
