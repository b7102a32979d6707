"""Embed drainer in an async program: build the demo backlog, drain five phases, print totals.

Run:  python examples/embed_basic.py [DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

import drainer
from drainer.demo.backlog import build_demo_backlog


async def main(directory: Path) -> int:
    db_path = directory / "backlog.db"
    await anyio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
    await anyio.to_thread.run_sync(build_demo_backlog, db_path)
    config = drainer.DrainConfig(
        database_url=f"sqlite:///{db_path}",
        command=[sys.executable, "-m", "drainer.demo.worker", "--run-id", "{run_id}",
                 "--phase-id", "{phase_id}"],
        session_dir=directory / "sessions",
        batch_size=5,
        phase_timeout=3.0,
        kill_grace_period=1.0,
    )
    lines: list[str] = []
    summary = await drainer.drain(config, echo=lines.append)  # collect instead of printing
    print(f"session {summary.session_id}: {summary.total_success}/{summary.total_processed} ok, "
          f"stop reason {summary.stop_reason}, {len(lines)} progress lines")
    print(f"snapshot: {summary.snapshot_path}")
    return summary.exit_code


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".drainer/example-embed")
    raise SystemExit(anyio.run(main, target))
