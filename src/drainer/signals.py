"""SIGINT and SIGTERM for the command line: the session decides what each one means."""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def watch_signals(
    on_signal: Callable[[str, int], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_signal(name, count)`` for each SIGINT/SIGTERM (count: 1 for the first one
    of either kind, 2 for the next...). Ready once the handlers are installed."""
    count = 0
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            count += 1
            on_signal(signal.Signals(signum).name, count)
