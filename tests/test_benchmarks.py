"""The benchmark scripts still run and write the JSON they promise (tiny sizes; the figures
themselves are reported by the scripts, never asserted here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pg import require_server

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


def _gnu_parallel() -> bool:
    path = shutil.which("parallel")
    if path is None:
        return False
    proc = subprocess.run([path, "--will-cite", "--version"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)
    return proc.stdout.startswith("GNU parallel")


def _check_overhead_report(report: Any, backend: str, workers: set[str]) -> None:
    """Shape and checks of an overhead report (figures are not judged)."""
    assert {"benchmark", "attempts", "rounds", "statistic", "target", "machine",
            "results"} <= set(report)
    rows = {r["worker"]: r for r in report["results"]}
    assert set(rows) == workers
    skipped = report["skipped"]
    with_parallel = _gnu_parallel()
    if not with_parallel:
        assert any(s.get("loop") == "parallel" for s in skipped), skipped
    for row in rows.values():
        assert row["backend"] == backend and row["checks_ok"] is True, row["check_problems"]
        assert row["loops"] == ["drainer", "unrecorded", "plain", "parallel"][
            :4 if with_parallel else 3]
        assert row["history_ms"] is not None and row["meets_history"] is not None
        assert (row["below_parallel"] is None) is not with_parallel
        assert len(row["drainer_rounds_s"]) == len(row["plain_rounds_s"]) == 1
    assert report["file_create"][backend]["calls"] == 500


@pytest.mark.slow
def test_overhead_benchmark(tmp_path: Path) -> None:
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    report = _bench(tmp_path, "overhead.py", "--attempts", "3", "--rounds", "1",
                    "--worker", "noop,true,sqlite3", "--backend", "sqlite",
                    "--dir", str(bench_dir))
    workers = {"noop", "true"} | ({"sqlite3"} if shutil.which("sqlite3") else set())
    _check_overhead_report(report, "sqlite", workers)
    rows = {r["worker"]: r for r in report["results"]}
    assert rows["true"]["expected_state"] == "FAILED"
    assert rows["noop"]["expected_state"] == "COMPLETE"
    assert report["file_create"]["sqlite"]["dir"].startswith(str(bench_dir))
    assert list(bench_dir.iterdir()) == []  # the temporary backlogs are gone


@pytest.mark.slow
@pytest.mark.postgres
def test_overhead_benchmark_postgres(tmp_path: Path) -> None:
    require_server()
    report = _bench(tmp_path, "overhead.py", "--attempts", "3", "--rounds", "1",
                    "--worker", "noop,true,sqlite3", "--backend", "postgres")
    workers = {"true"} | ({"psql"} if shutil.which("psql") else set())
    _check_overhead_report(report, "postgres", workers)
    assert {"backend": "postgres", "worker": "noop"}.items() <= next(
        s for s in report["skipped"] if s.get("worker") == "noop").items()


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


@pytest.mark.slow
@pytest.mark.postgres
def test_multi_benchmark(tmp_path: Path) -> None:
    from pg import ADMIN_URL, require_server

    require_server()  # skips without a server, unless DRAINER_REQUIRE_PG is set (CI)
    report = _bench(tmp_path, "multi.py", "--runs", "4", "--phases-per-run", "1",
                    "--sleep", "0", "--configs", "1x2,2x1", "--admin-url", ADMIN_URL)
    rows = report["results"]
    assert [r["config"] for r in rows] == ["1x2", "2x1"]
    assert all(r["all_complete"] and r["complete"] == 4 for r in rows)
    assert [len(r["median_drain"]["drainers"]) for r in rows] == [1, 2]
    assert all(x["exit_code"] == 0 for r in rows for x in r["median_drain"]["drainers"])
    assert all(r["attempts_total"] == 4 for r in rows)  # every phase once, none twice
