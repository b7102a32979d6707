"""A worker that floods stdout: drainer's memory stays flat and its log stays capped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import Env, create_backlog

MIB = 1024 * 1024
FLOOD = textwrap.dedent(
    """
    import sys
    block = b"x" * (1024 * 1024 - 1) + b"\\n"
    for _ in range(int(sys.argv[1])):
        sys.stdout.buffer.write(block)
    """
)


def _peak_rss_of_drainer(env: Env, megabytes: int) -> int:
    """Run drainer on a one-phase backlog; return the max RSS seen by wait4, in bytes."""
    for p in (env.db, env.db.with_name("backlog.db-wal"), env.db.with_name("backlog.db-shm")):
        p.unlink(missing_ok=True)
    create_backlog(env.db, [("run-f", "P1", 0, "FAILED", None)])
    worker = env.tmp / "flood.py"
    worker.write_text(FLOOD)
    args = env.base_args(f"{sys.executable} {worker} {megabytes}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *args, "--max-log-bytes", str(MIB),
         "--max-attempts-per-phase", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env.worker_env(), cwd=env.tmp,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1  # the phase stays FAILED: a failed attempt
    return int(usage.ru_maxrss) * 1024  # Linux reports KiB


@pytest.mark.slow
def test_flood_of_300_mb_keeps_memory_flat_and_log_capped(env: Env) -> None:
    baseline = _peak_rss_of_drainer(env, 1)
    flooded = _peak_rss_of_drainer(env, 300)
    # wait4's figure is the max over drainer and the worker it reaped; both stay small.
    assert flooded - baseline < 30 * MIB, (baseline, flooded)
    snapshots = sorted(env.sessions.glob("batch-drain-*.json"), key=os.path.getmtime)
    session = env.sessions / snapshots[-1].stem
    (log,) = (session / "logs").glob("*.stdout.txt")
    data = log.read_bytes()
    assert len(data) < MIB + 200
    assert data[:MIB].count(b"x") > MIB - 10
    assert data.rstrip().endswith(
        f"[drainer] log truncated at {MIB} bytes: {300 * MIB - MIB} more bytes were dropped".encode()
    )
