"""`python -m drainer demo`, the README's first command, end to end."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import journal_results


@pytest.mark.slow
def test_demo_drains_a_batch_and_says_what_next(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "drainer", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "274 FAILED phases across 56 runs" in out
    assert "[30/30] [lane " in out and "Draining:" in out
    assert "[TIMEOUT]" in out and "[LEAK]" in out and "[OK]" in out and "[FAIL]" in out
    assert "What to try next:" in out
    # The forecast it suggests runs as printed, on the history the demo just wrote.
    (hint,) = [line for line in out.splitlines() if "drainer forecast" in line]
    argv = shlex.split(hint.split("#")[0])
    assert argv[:3] == ["python", "-m", "drainer"]
    told = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert "from 30 attempt(s) in the history" in told.stdout
    (snapshot,) = (tmp_path / "demo" / "sessions").glob("batch-drain-*.json")
    snap = json.loads(snapshot.read_text())
    assert snap["total_processed"] == 30
    assert snap["total_timeouts"] == 2
    leaks = [p for r in journal_results(snapshot.parent / snapshot.stem)
             for p in r["leaked_processes"]]
    assert len(leaks) == 1 and "uvicorn" in leaks[0]["cmdline"]
    assert not psutil.pid_exists(leaks[0]["pid"]) or (
        psutil.Process(leaks[0]["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    # Nothing left mid-flight in the backlog.
    import sqlite3

    conn = sqlite3.connect(tmp_path / "demo" / "backlog.db")
    stuck = conn.execute("SELECT count(*) FROM phases WHERE state = 'EXECUTING'").fetchone()[0]
    conn.close()
    assert stuck == 0
