"""The benchmark scripts still run and write the JSON they promise (tiny sizes; the figures
themselves are reported by the scripts, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(tmp_path: Path, script: str, *args: str) -> Any:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_selection_benchmark(tmp_path: Path) -> None:
    report = _bench(tmp_path, "selection.py", "--sizes", "1000", "--picks", "50")
    [row] = report["results"]
    assert row["size"] == 1000 and row["picks"] >= 50
    assert row["run_peak_rss_mib"] > 0 and row["first_spawn_s"] > 0


@pytest.mark.slow
def test_lanes_benchmark(tmp_path: Path) -> None:
    report = _bench(tmp_path, "lanes.py", "--runs", "4", "--phases-per-run", "1",
                    "--sleep", "0.05", "--lanes", "1,2")
    rows = report["results"]
    assert [r["lanes"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_overhead_benchmark(tmp_path: Path) -> None:
    report = _bench(tmp_path, "overhead.py", "--attempts", "5", "--rounds", "1",
                    "--worker", "true")
    [row] = report["results"]
    assert row["worker"] == "true" and row["checks_ok"] is True


@pytest.mark.slow
def test_long_session_benchmark(tmp_path: Path) -> None:
    report = _bench(tmp_path, "long_session.py", "--attempts", "40", "--lanes", "2")
    assert report["attempts"] == 40
    assert [r["reader"] for r in report["readers"]] == [
        "analyze", "analyze --json", "status", "run --resume"]
    assert all(r["exit_code"] == 0 for r in report["readers"])


def test_startup_benchmark(tmp_path: Path) -> None:
    report = _bench(tmp_path, "startup.py", "--runs", "1")
    assert [r["command"] for r in report["results"]][:4] == [
        "--help", "run --help", "config", "import drainer.live"]
    assert all(r["median_s"] > 0 and r["peak_rss_mib"] > 0 for r in report["results"])
