"""SIGINT, SIGTERM and SIGHUP for the command line: the session decides what each one means.

SIGHUP (the terminal closed, an SSH connection dropped) is a stop like SIGTERM: without it,
drainer would die on the spot and leave its workers running and their phases ``EXECUTING``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def watch_signals(
    on_signal: Callable[[str, int], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_signal(name, count)`` for each SIGINT/SIGTERM/SIGHUP (count: 1 for the
    first one of any kind, 2 for the next...). Ready once the handlers are installed."""
    count = 0
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            count += 1
            on_signal(signal.Signals(signum).name, count)
