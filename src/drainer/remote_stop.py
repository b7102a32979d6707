"""``drainer stop --session ID``: ask a running session, on any host, to stop picking,
through the backlog database (``drainer_stop_requests``), and wait until it takes the ask."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .backlog import StopRequest, open_backlog
from .backlog.requests import POLL_SECONDS, new_request_id
from .dburl import DatabaseURL
from .errors import DrainerError, UsageError
from .journal import journal_in_use, session_journals

_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CHECK_EVERY = 0.1  #: how often the command looks whether the session took its request
WITHDRAW_LIMIT = 5.0  #: an interrupted wait gives up withdrawing its request after this long


@dataclass(frozen=True)
class Asked:
    """How a stop request went: taken (by whom, after how long), waiting, or withdrawn."""

    session_id: str
    request: StopRequest | None  #: as it stands at the end (None: withdrawn)
    waited: float  #: seconds waited
    cleared: bool = False  #: a resume of the session cleared it (made before it started)

    def lines(self) -> list[str]:
        sid, req = self.session_id, self.request
        if req is not None and req.taken_at is not None:
            return [f"session {sid}: the stop request was taken by drainer on {req.taken_by} "
                    f"(after {self.waited:.1f}s); it starts no new attempt, gives the attempts "
                    f"in flight their --stop-grace-seconds, and stays resumable (run --resume "
                    f"{sid})"]
        if req is not None:
            return [f"session {sid}: stop requested; a running session takes it within "
                    f"{POLL_SECONDS:g}s"]
        if self.cleared:
            return [f"session {sid}: a resume of the session cleared the stop request, made "
                    "before it started; ask again to stop it"]
        return [f"session {sid}: no running drainer took the stop request in "
                f"{self.waited:.1f}s, so it was withdrawn (is the session running against "
                "this database? see drainer status)"]

    @property
    def taken(self) -> bool:
        return self.request is not None and self.request.taken_at is not None


def check_session_id(session_id: str) -> None:
    if not _SESSION_ID.fullmatch(session_id):
        raise UsageError(f"--session {session_id!r} is not a session id (letters, digits, "
                         "'.', '_' and '-', at most 64; see drainer status)")


def running_here(session_dir: Path) -> str | None:
    """The newest session a drainer process on this host is running in ``session_dir``."""
    running = [j for j in session_journals(session_dir) if journal_in_use(j)]
    return running[-1].parent.name if running else None


async def _wait_for_running(session_dir: Path, wait: float) -> str:
    """``--session latest``: the newest session running in ``session_dir``, waited for up
    to ``wait`` seconds (one may be starting)."""
    deadline = anyio.current_time() + wait
    while True:
        found = await anyio.to_thread.run_sync(running_here, session_dir)
        if found is not None:
            return found
        if anyio.current_time() >= deadline:
            break
        await anyio.sleep(_CHECK_EVERY)
    raise NothingRunning(f"no session is running in {session_dir} (waited {wait:g}s); "
                         "name one with --session ID (see drainer status)")


class NothingRunning(DrainerError):
    """``--session latest`` found no running session (exit 1: nothing to stop)."""


async def ask_to_stop(db: DatabaseURL, schema: Any, session_id: str, host: str,
                      wait: float, session_dir: Path) -> Asked:
    """Request the stop and wait up to ``wait`` seconds for the session to take it (0: do not
    wait; the request stays for the session to take). A request not taken in time is
    withdrawn. ``latest``: the newest session running in ``session_dir`` on this host."""
    if not wait >= 0:
        raise UsageError(f"--wait must be zero or more seconds, got {wait:g}")
    if session_id == "latest":
        session_id = await _wait_for_running(session_dir, wait)
    check_session_id(session_id)
    async with open_backlog(db, schema=schema) as backlog:
        requests = backlog.requests
        if not await requests.has_table():  # (a write transaction only the first time)
            await requests.ensure_table()
        request_id = new_request_id()
        start = anyio.current_time()
        written = False
        try:
            # Inside the try: Ctrl-C cancels the task where it awaits, and the row may be
            # written by the time it does, so an interrupted write is withdrawn too.
            request = await requests.request(request_id, session_id, host)
            written = True
            if request is None or wait == 0:
                return Asked(session_id, request, 0.0)
            with anyio.move_on_after(wait):
                while True:
                    await anyio.sleep(_CHECK_EVERY)
                    found = await requests.read(request_id)
                    if found is None or found.taken_at is not None:
                        return Asked(session_id, found, anyio.current_time() - start,
                                     cleared=found is None)
        except BaseException as exc:
            # Interrupted (Ctrl-C) or failed while waiting: the operator has given up, so no
            # session should take the request later. Best effort, bounded. (A write that
            # failed by itself wrote nothing: its error is reported at once.)
            if written or not isinstance(exc, Exception):
                with anyio.CancelScope(shield=True), anyio.move_on_after(WITHDRAW_LIMIT), \
                        contextlib.suppress(DrainerError):
                    await requests.withdraw(request_id)
            raise
        withdrawn = await requests.withdraw(request_id)
        return Asked(session_id, None if withdrawn else await requests.read(request_id),
                     anyio.current_time() - start)
