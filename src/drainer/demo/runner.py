"""``python -m drainer demo``: build a realistic backlog in SQLite and drain a batch of it."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import anyio

from ..api import drain
from ..config import DrainConfig
from .backlog import DemoBacklog, build_demo_backlog

DEMO_COMMAND = "{python} -m drainer.demo.worker --run-id {run_id} --phase-id {phase_id}"


async def run_demo(
    directory: str, batch_size: int, echo: Callable[[str], None], lanes: int = 2
) -> int:
    """Build the demo backlog under ``directory`` and drain ``batch_size`` phases of it.

    Returns 0 when the demo ran: failing phases are part of the show, not an error.
    """
    root = Path(directory)
    db_path = root / "backlog.db"

    def build() -> DemoBacklog:
        root.mkdir(parents=True, exist_ok=True)
        return build_demo_backlog(db_path)

    backlog = await anyio.to_thread.run_sync(build)
    echo(
        f"Demo backlog: {backlog.failed_phases} FAILED phases across {backlog.runs} runs "
        f"(+{backlog.queued_phases} QUEUED) in {db_path}"
    )
    url = f"sqlite:///{db_path}"
    sessions = root / "sessions"
    config = DrainConfig(
        database_url=url,
        command=DEMO_COMMAND,
        session_dir=sessions,
        batch_size=batch_size,
        lanes=lanes,
        # Short limits so the demo shows timeouts and tree kills within a minute.
        phase_timeout=3.0,
        kill_grace_period=1.0,
        python=sys.executable,
    )
    summary = await drain(config, echo=echo)
    q = shlex.quote
    echo("")
    echo("What to try next:")
    echo(f"  python -m drainer plan --database-url {q(url)} --command {q(DEMO_COMMAND)}")
    echo(
        f"  python -m drainer run --database-url {q(url)} --command {q(DEMO_COMMAND)} "
        f"--session-dir {q(str(sessions))} --phase-timeout-seconds 3 --batch-size 20 --lanes 4"
    )
    echo(f"  python -m drainer analyze --session-dir {q(str(sessions))}")
    echo(f"  python -m drainer analyze --history --database-url {q(url)}   # every session's "
         "attempts")
    echo(f"  python -m drainer forecast --database-url {q(url)} --command {q(DEMO_COMMAND)} "
         "--lanes 4   # what is left, how long")
    echo(f"  python -m drainer status --database-url {q(url)} --session-dir {q(str(sessions))}")
    echo(f"  less {q(str(summary.snapshot_path))}   # the session file")
    echo(f"  ls {q(str(summary.logs_dir))}         # one stdout/stderr pair per attempt")
    return 0
