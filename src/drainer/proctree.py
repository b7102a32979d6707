"""Process-tree helpers (psutil): find an attempt's processes, kill them, measure them.

An attempt's processes are found three ways, because each alone misses some: the children
of the worker (psutil), the worker's process group and session (a new session per attempt),
and the marker ``DRAINER_ATTEMPT_ID=<id>`` in the environment, which survives ``setsid``
and re-parenting to init. These functions block; call them through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import time
from collections.abc import Iterable

import psutil

from .models import LeakedProcess

MARKER_VAR = "DRAINER_ATTEMPT_ID"
SESSION_VAR, RUN_VAR, PHASE_VAR = "DRAINER_SESSION_ID", "DRAINER_RUN_ID", "DRAINER_PHASE_ID"
API_MARKER_VAR = "DRAINER_API_SERVER_OF"  #: marks the server (and children) of a session
POLL_INTERVAL = 0.05


def _proc_stat_ids(pid: int) -> tuple[int, int, int] | None:
    """(pgrp, session, start time in clock ticks since boot) of a pid, or None if gone."""
    stat = _read_proc(pid, "stat", whole=False)  # one line, far under one read
    if not stat:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[2]), int(fields[3]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux): see find_attempt_processes."""
    ids = _proc_stat_ids(pid) if sys.platform.startswith("linux") else None
    return ids[2] if ids is not None else None


def _has_marker(pid: int, marker: bytes) -> bool:
    """``marker`` is ``\0NAME=value\0``; a leading NUL makes the first variable match too."""
    environ = _read_proc(pid, "environ")
    return environ is not None and marker in b"\0" + environ


def _read_proc(pid: int | str, name: str, *, whole: bool = True) -> bytes | None:
    """A /proc file (its first read only unless ``whole``), or None if the process is gone
    or not ours to read. Raw os.read: this runs for every process after every attempt, and
    a buffered file object costs about half again as much."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 65536)]
        while whole and chunks[-1]:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def find_attempt_processes(
    attempt_id: str,
    group: int | None = None,
    *,
    var: str = MARKER_VAR,
    started_after: int | None = None,
) -> list[psutil.Process]:
    """Live processes that carry the marker ``var=attempt_id`` or belong to its group/session.

    ``started_after`` (clock ticks, see :func:`start_ticks`) skips reading the environment of
    processes older than the attempt's worker: they cannot be its descendants.
    """
    me = os.getpid()
    found: list[psutil.Process] = []
    if sys.platform.startswith("linux"):
        marker = f"\0{var}={attempt_id}\0".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            pid = int(name)
            ids = _proc_stat_ids(pid)
            if ids is None:
                continue
            in_group = group is not None and group in ids[:2]
            if started_after is not None and ids[2] < started_after and not in_group:
                continue
            if in_group or _has_marker(pid, marker):
                proc = _process(pid)
                if proc is not None and not _is_zombie(proc):
                    found.append(proc)
        return found
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(var) == attempt_id or (
                group is not None and os.getpgid(proc.pid) == group
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (those still attached to it)."""
    root = _process(pid)
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def describe(proc: psutil.Process) -> LeakedProcess:
    try:
        with proc.oneshot():
            return LeakedProcess(pid=proc.pid, name=proc.name(), cmdline=tuple(proc.cmdline()))
    except psutil.Error:
        return LeakedProcess(pid=proc.pid, name="?", cmdline=())


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until every process is gone or a zombie; return those still alive.

    Not ``psutil.wait_procs``: it would reap our own child behind asyncio's back, and it
    waits on zombies whose parent has not reaped them yet.
    """
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _is_zombie(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        alive = [p for p in alive if not _is_zombie(p)]
    return alive


def terminate(procs: dict[int, psutil.Process], grace: float) -> None:
    """SIGTERM every process, wait up to ``grace`` seconds, SIGKILL what is left."""
    if not procs:
        return
    _signal_all(procs.values(), signal.SIGTERM)
    alive = _wait_gone(list(procs.values()), grace)
    _signal_all(alive, signal.SIGKILL)
    _wait_gone(alive, 2.0)


def kill_attempt(
    root_pid: int | None,
    attempt_id: str,
    *,
    grace: float,
    group: int | None = None,
    started_after: int | None = None,
) -> list[psutil.Process]:
    """Kill an attempt's whole tree: the worker's descendants, its process group and every
    process carrying its marker; then sweep again for anything forked meanwhile.

    Processes are signalled one by one (psutil checks each pid's create time), never with
    ``killpg``, whose group id could belong to a recycled pid once the worker is reaped.
    """
    procs: dict[int, psutil.Process] = {}
    if root_pid is not None:
        procs.update((p.pid, p) for p in tree(root_pid))
    procs.update((p.pid, p) for p in find_attempt_processes(
        attempt_id, group, started_after=started_after))
    terminate(procs, grace)
    late = {p.pid: p for p in find_attempt_processes(attempt_id, group,
                                                      started_after=started_after)}
    terminate(late, 0.0)
    procs.update(late)
    return list(procs.values())


def sweep_leaks(
    attempt_id: str,
    *,
    group: int | None,
    kill: bool,
    grace: float,
    started_after: int | None = None,
) -> list[LeakedProcess]:
    """After an attempt: report (and by default kill) every process still carrying it."""
    leaked = find_attempt_processes(attempt_id, group, started_after=started_after)
    if not leaked:
        return []
    described = [describe(p) for p in leaked]
    if kill:
        kill_attempt(None, attempt_id, grace=grace, group=group, started_after=started_after)
    return described


def kill_marked(var: str, value: str, root_pid: int | None, *, grace: float) -> int:
    """Kill a process tree plus everything carrying ``var=value`` (SIGTERM, grace, SIGKILL)."""
    procs = {p.pid: p for p in find_attempt_processes(value, var=var)}
    if root_pid is not None:
        procs.update((p.pid, p) for p in tree(root_pid))
        procs.update((p.pid, p) for p in find_attempt_processes(value, root_pid, var=var))
    terminate(procs, grace)
    return len(procs)


def create_time(pid: int, *, ticks: int | None = None) -> float | None:
    """A process's create time as psutil gives it; from its start ``ticks`` (see
    :func:`start_ticks`) when known, which is the same figure without a second read."""
    if ticks is not None and sys.platform.startswith("linux"):
        return ticks / _CLOCK_TICKS + _boot_time()
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@functools.cache
def _boot_time() -> float:
    return float(psutil.boot_time())


def kill_leftovers(
    attempt_id: str, pid: int | None, created: float | None, *, grace: float
) -> list[LeakedProcess]:
    """After a crash: kill what an interrupted attempt left (marker scan, pid + create time)."""
    procs = {p.pid: p for p in find_attempt_processes(attempt_id)}
    if pid is not None and created is not None:
        proc = _process(pid)
        # Only the very process we started: a recycled pid has another create time.
        if proc is not None and abs(proc.create_time() - created) < 0.01:
            procs.update((p.pid, p) for p in tree(pid))
            procs.update((p.pid, p) for p in find_attempt_processes(attempt_id, group=pid))
    described = [describe(p) for p in procs.values()]
    terminate(procs, grace)
    return described


def find_matching(
    pattern: re.Pattern[str], exclude: set[int], *, session_id: str,
    skip_var: str = API_MARKER_VAR,
) -> list[tuple[psutil.Process, str, str]]:
    """Live processes of this session whose command line matches ``pattern``, with their
    attempt marker and their attempt's ``run / phase`` ("" when unknown).

    A process is this session's when its environment carries the session's id (every
    worker's descendants inherit ``DRAINER_SESSION_ID``) or when it descends from drainer
    (an escapee re-parented to drainer, its subreaper). Other users' and other programs'
    processes never count. Processes carrying ``skip_var`` (the session's own API server)
    are not listed.
    """
    me = os.getpid()
    found: list[tuple[psutil.Process, str, str]] = []
    for proc in psutil.process_iter():
        if proc.pid == me or proc.pid in exclude:
            continue
        try:
            if _is_zombie(proc) or not pattern.search(" ".join(proc.cmdline())):
                continue
            env: dict[str, str] = {}
            with contextlib.suppress(psutil.Error, OSError):
                env = proc.environ()
            if skip_var in env:
                continue
            if env.get(SESSION_VAR) != session_id and not _descends_from(proc, me):
                continue
            run, phase = env.get(RUN_VAR, ""), env.get(PHASE_VAR, "")
            found.append((proc, env.get(MARKER_VAR, ""), f"{run} / {phase}" if run else ""))
        except (psutil.Error, OSError):
            continue
    return found


def _descends_from(proc: psutil.Process, ancestor: int) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return any(parent.pid == ancestor for parent in proc.parents())
    return False


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=1)
def _children_files() -> bool:
    """Whether the kernel lists each task's children (``/proc/<pid>/task/<tid>/children``,
    Linux 4.2+ with CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def children(pid: int | str) -> list[int]:
    """The children of ``pid`` (``"self"`` for drainer), read from its tasks' ``children``
    files; [] when it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        listed = _read_proc(pid, f"task/{tid}/children")
        if listed:
            found += [int(p) for p in listed.split()]
    return found


def descendants(pid: int) -> list[int]:
    """The pids under ``pid`` (still attached to it), from :func:`children`: a few small
    reads per process of the tree, where psutil scans every process of the host for its
    parent. [] when it is gone."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants, in bytes (0 if gone)."""
    if not _children_files():
        total = 0
        for proc in tree(pid):
            try:
                total += int(proc.memory_info().rss)
            except psutil.Error:
                continue
        return total
    total = 0
    for member in (pid, *descendants(pid)):
        statm = _read_proc(member, "statm", whole=False)
        if statm:
            total += int(statm.split()[1]) * _PAGE_SIZE
    return total
