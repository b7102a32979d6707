"""drainer as the child subreaper of its workers (Linux; the command line only).

A worker's descendant that leaves its session (``setsid``) and clears its environment
(``env -i``) carries neither the attempt's process group nor its marker. Once its own parent
exits, the kernel re-parents it to the nearest subreaper among its ancestors: drainer, when
:func:`become_subreaper` was called. So after each attempt, every child of drainer that
drainer did not start itself is such an escapee (or a zombie left by one, which is reaped).

Only the command line turns this on: it changes the whole process, and an application that
embeds drainer may have children of its own. The listing reads ``/proc/self/task/*/children``
(a few small files), never the whole process table.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import psutil

from . import proctree
from .models import LeakedProcess
from .proctree import API_MARKER_VAR, MARKER_VAR

PR_SET_CHILD_SUBREAPER = 36
_enabled = False
_known: set[int] = set()  #: processes drainer started and still holds (workers, API server)
_workers: dict[int, float | None] = {}  #: of those, the workers: pid -> create time
_spawning = 0  #: spawns under way: a child forked there is not yet in ``_known``
_listed: set[int] = set()  #: escapees already returned by :func:`adopted` (one entry per leak)


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux). True when it is."""
    global _enabled
    if _enabled or not sys.platform.startswith("linux"):
        return _enabled
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _enabled = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        _enabled = False
    return _enabled


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Around starting a process of drainer's own: no adoption scan runs meanwhile, so the
    new child is never taken for an escapee before it is :func:`known`."""
    global _spawning
    _spawning += 1
    try:
        yield
    finally:
        _spawning -= 1


def known(pid: int, *, worker_created: float | None = None) -> None:
    """A process drainer started (a worker when ``worker_created``, its create time)."""
    _known.add(pid)
    if worker_created is not None:
        _workers[pid] = worker_created


def forget(pid: int) -> None:
    _known.discard(pid)
    _workers.pop(pid, None)


def nothing_left_behind() -> bool:
    """True when no process can be left from an attempt that just ended on its own: drainer
    is the subreaper, no spawn is under way, and every child of drainer is one it started.
    A worker's surviving descendants are re-parented up to drainer as their parents exit,
    so any of them would show as a child drainer did not start (or under one). Then the
    full marker scan of ``/proc`` (which grows with the host's processes) can be skipped."""
    return _enabled and not _spawning and all(pid in _known for pid in _children())


def _children() -> list[int]:
    return proctree.children("self")


def adopted(worker: int | None = None) -> list[psutil.Process]:
    """Children of drainer it did not start (escapees re-parented to it) that carry no
    marker, alive, each returned once; zombies among them are reaped.

    With ``worker`` (the pid of a worker whose attempt just ended), only the escapees that
    can be that attempt's: created after its worker, and before every other worker still
    running (one of those could be its origin otherwise; its own end decides then). Without
    it (the end of the session), every escapee. Processes carrying a marker belong to their
    attempt's sweep, or to the session's API server.

    Synchronous and quick: call it on the event loop's thread, so that no spawn can be
    half-way through meanwhile (see :func:`spawning`)."""
    if not _enabled or _spawning:
        return []
    since = _workers.get(worker) if worker is not None else None
    others = [c for pid, c in _workers.items() if pid != worker and c is not None]
    found: list[psutil.Process] = []
    for pid in _children():
        if pid in _known:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                reap(pid)
                continue
            if pid in _listed:
                continue  # listed once already (kept alive by --leak-policy report)
            if worker is not None:
                created = proc.create_time()
                if since is None or created < since - 0.01:
                    continue  # older than this attempt's worker: not its own
                if any(other <= created + 0.01 for other in others):
                    continue  # another running attempt may have made it
            with contextlib.suppress(psutil.AccessDenied):
                environ = proc.environ()
                if MARKER_VAR in environ or API_MARKER_VAR in environ:
                    continue
        except psutil.Error:
            continue
        found.append(proc)
        _listed.add(pid)
    return found


def reap(pid: int) -> None:
    """Collect an adopted child's exit status once it has ended (never drainer's own)."""
    if pid in _known:
        return
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            _listed.discard(pid)


def end(procs: list[psutil.Process], *, kill: bool, grace: float) -> list[LeakedProcess]:
    """Report (and by default kill, with their descendants) escapees from :func:`adopted`,
    then collect their exit status. Blocks for up to ``grace``: run it in a thread."""
    described = [proctree.describe(p) for p in procs]
    if kill:
        every: dict[int, psutil.Process] = {}
        for proc in procs:
            every.update((p.pid, p) for p in proctree.tree(proc.pid))
        proctree.terminate(every, grace)
        for proc in procs:
            reap(proc.pid)
    return described
