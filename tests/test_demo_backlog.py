"""The demo backlog builder and the simulated worker, on real SQLite files and real processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from drainer.demo.backlog import DemoBacklog, build_demo_backlog
from drainer.selection import CATEGORY_DELIVERABLE, failure_category


@contextmanager
def _db(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path)) as conn:
        yield conn


def _drain_order(path: Path) -> list[tuple[str, str, str | None]]:
    """FAILED phases as (run_id, phase_id, reason) in drainer's priority order (DESIGN.md §5)."""
    with _db(path) as conn:
        rows: list[tuple[str, str, int, str | None]] = conn.execute(
            "SELECT run_id, phase_id, phase_index, last_failure_reason FROM phases"
            " WHERE state = 'FAILED'"
        ).fetchall()
    failed_per_run = Counter(run_id for run_id, *_ in rows)
    rows.sort(key=lambda r: (failure_category(r[3]), r[2], failed_per_run[r[0]], r[0], r[1]))
    return [(run_id, phase_id, reason) for run_id, phase_id, _, reason in rows]


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with _db(path) as conn:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}


def _run_worker(db: Path, run_id: str, phase_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainer.demo.worker", "--run-id", run_id, "--phase-id", phase_id],
        env={**os.environ, "DATABASE_URL": f"sqlite:///{db}", "DRAINER_DEMO_SPEED": "0.1"},
        capture_output=True, text=True, timeout=30, check=False,
    )


def _phase(db: Path, run_id: str, phase_id: str) -> tuple[str, str | None]:
    with _db(db) as conn:
        state, reason = conn.execute(
            "SELECT state, last_failure_reason FROM phases WHERE run_id = ? AND phase_id = ?",
            (run_id, phase_id),
        ).fetchone()
    return state, reason


def _telemetry(db: Path, run_id: str, phase_id: str) -> int:
    with _db(db) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM token_estimation_v2_events WHERE run_id = ? AND phase_id = ?",
            (run_id, phase_id),
        ).fetchone()
    return int(count)


@pytest.fixture
def demo(tmp_path: Path) -> DemoBacklog:
    return build_demo_backlog(tmp_path / "demo.db")


def test_builder_counts(demo: DemoBacklog) -> None:
    assert (demo.runs, demo.failed_phases, demo.queued_phases) == (56, 274, 1)
    assert demo.total_phases >= 275
    with _db(demo.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 56
        by_state = dict(conn.execute("SELECT state, COUNT(*) FROM phases GROUP BY state"))
        queued = conn.execute("SELECT run_id FROM phases WHERE state = 'QUEUED'").fetchall()
        mixed = conn.execute(
            "SELECT COUNT(*) FROM phases WHERE state = 'FAILED' AND run_id LIKE 'mixed-queued-%'"
        ).fetchone()[0]
        singles = dict(conn.execute(
            "SELECT run_id, COUNT(*) FROM phases WHERE run_id LIKE 'slowpoke-%'"
            " OR run_id LIKE 'apiserver-leak-%' GROUP BY run_id"))
        phase_ids = [p for (p,) in conn.execute("SELECT phase_id FROM phases")]
        orphans = conn.execute(
            "SELECT COUNT(*) FROM phases p LEFT JOIN tiers t ON t.id = p.tier_id"
            " WHERE t.id IS NULL OR t.run_id != p.run_id").fetchone()[0]
    assert by_state["FAILED"] == 274 and by_state["QUEUED"] == 1
    assert set(by_state) <= {"FAILED", "QUEUED", "COMPLETE"}
    assert len(queued) == 1 and queued[0][0].startswith("mixed-queued-")
    assert mixed == 3
    assert sorted(singles.values()) == [1, 1, 1] and len(singles) == 3
    assert any(" " in p for p in phase_ids) and any("." in p for p in phase_ids)
    assert orphans == 0


def test_builder_overwrites_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    path.write_text("not a database")
    (tmp_path / "demo.db-wal").write_bytes(b"stale")
    first = build_demo_backlog(path)
    again = build_demo_backlog(path)
    assert first == again
    assert not (tmp_path / "demo.db-wal").exists()


def test_builder_is_deterministic(tmp_path: Path) -> None:
    a = build_demo_backlog(tmp_path / "a.db", seed=3)
    b = build_demo_backlog(tmp_path / "b.db", seed=3)
    c = build_demo_backlog(tmp_path / "c.db", seed=4)
    assert _dump(a.path) == _dump(b.path)
    assert _dump(a.path) != _dump(c.path)
    assert (c.runs, c.failed_phases, c.queued_phases) == (56, 274, 1)


@pytest.mark.parametrize("seed", [7, 1, 2, 3, 99])
def test_first_30_picks_mix_every_kind(tmp_path: Path, seed: int) -> None:
    backlog = build_demo_backlog(tmp_path / "demo.db", seed=seed)
    first = _drain_order(backlog.path)[:30]
    kinds = Counter(run_id for run_id, _, _ in first)  # shown when an assertion fails

    def count(prefix: str) -> int:
        return sum(1 for run_id, _, _ in first if run_id.startswith(prefix))

    assert count("build129-") >= 6, kinds
    assert count("slowpoke-") == 2, kinds
    assert count("apiserver-leak-") == 1, kinds
    assert count("mixed-queued-") >= 2, kinds
    assert count("research-system-v") >= 5, kinds
    assert count("fileorg-p2-") >= 5, kinds
    fileorg = [reason for run_id, _, reason in first if run_id.startswith("fileorg-p2-")]
    assert all(failure_category(r) == CATEGORY_DELIVERABLE for r in fileorg)


def test_worker_completes_build129_phase_with_telemetry(demo: DemoBacklog) -> None:
    run_id, phase_id, _ = next(p for p in _drain_order(demo.path) if p[0].startswith("build129-"))
    before = _telemetry(demo.path, run_id, phase_id)
    done = _run_worker(demo.path, run_id, phase_id)
    assert done.returncode == 0, done.stderr
    assert _phase(demo.path, run_id, phase_id)[0] == "COMPLETE"
    assert _telemetry(demo.path, run_id, phase_id) - before >= 2
    assert "[LLM] calling" in done.stdout


def test_worker_fails_fileorg_phase_with_deliverable_reason(demo: DemoBacklog) -> None:
    run_id, phase_id, _ = next(p for p in _drain_order(demo.path) if p[0].startswith("fileorg-"))
    done = _run_worker(demo.path, run_id, phase_id)
    assert done.returncode == 1, done.stderr
    state, reason = _phase(demo.path, run_id, phase_id)
    assert state == "FAILED"
    assert reason is not None and reason.startswith("Deliverable missing: src/fileorg/")
    assert failure_category(reason) == CATEGORY_DELIVERABLE
    assert "DeliverableMissingError" in done.stderr


def test_worker_fails_research_phase_with_import_error(demo: DemoBacklog) -> None:
    run_id, phase_id, _ = next(
        p for p in _drain_order(demo.path) if p[0].startswith("research-system-v"))
    done = _run_worker(demo.path, run_id, phase_id)
    assert done.returncode == 1
    state, reason = _phase(demo.path, run_id, phase_id)
    assert state == "FAILED" and reason is not None and "ResearchOrchestrator" in reason
    assert "ImportError: cannot import name 'ResearchOrchestrator'" in done.stderr


def test_worker_missing_phase_exits_3(demo: DemoBacklog) -> None:
    done = _run_worker(demo.path, "build129-p01", "P99-no-such-phase")
    assert done.returncode == 3
    assert "P99-no-such-phase" in done.stderr


def test_worker_rejects_non_sqlite_url(demo: DemoBacklog) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "drainer.demo.worker", "--run-id", "r", "--phase-id", "p"],
        env={**os.environ, "DATABASE_URL": "postgresql://u:secret@h/db"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 2
    assert "sqlite" in done.stderr and "secret" not in done.stderr
