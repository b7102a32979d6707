"""Embed drainer in an async executor that does other work at the same time.

The executor runs a heartbeat task and drainer side by side in one task group; it reacts to
drainer's events, and stops drainer gracefully after a few successes.

Run:  python examples/embed_in_executor.py [DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

import drainer
from drainer.demo.backlog import build_demo_backlog


async def heartbeat(beats: list[float]) -> None:
    """Stands for the executor's own work: it keeps running while drainer drains."""
    while True:
        beats.append(anyio.current_time())
        await anyio.sleep(0.1)


async def main(directory: Path) -> int:
    db_path = directory / "backlog.db"
    await anyio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
    await anyio.to_thread.run_sync(build_demo_backlog, db_path)
    config = drainer.DrainConfig(
        database_url=f"sqlite:///{db_path}",
        command=[sys.executable, "-m", "drainer.demo.worker", "--run-id", "{run_id}",
                 "--phase-id", "{phase_id}"],
        session_dir=directory / "sessions",
        batch_size=20,
        lanes=2,
        phase_timeout=3.0,
        kill_grace_period=1.0,
        stop_grace_period=10.0,
    )
    beats: list[float] = []
    successes = 0
    async with drainer.open_drainer(config) as d, anyio.create_task_group() as tg:
        tg.start_soon(heartbeat, beats)
        tg.start_soon(d.run)
        async for event in d.events():
            if isinstance(event, drainer.AttemptFinished) and event.attempt.success:
                successes += 1
                if successes == 3:
                    d.stop("executor has enough for now")
            elif isinstance(event, drainer.SessionStopped):
                print(f"drainer stopped: {event.stop_reason} ({event.stop_detail}); "
                      f"{event.totals.ok} of {event.processed} attempts ok")
        tg.cancel_scope.cancel()  # drainer is done: stop the executor's other work too
    stats = d.statistics()
    print(f"heartbeats while draining: {len(beats)}; in flight at the end: {stats.in_flight}")
    print(f"snapshot: {directory / 'sessions' / (stats.session_id + '.json')}")
    return 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".drainer/example-executor")
    raise SystemExit(anyio.run(main, target))
