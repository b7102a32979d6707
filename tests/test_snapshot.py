"""The snapshot (Autopack's session file) is streamed from the journal, and a long session
does not rewrite it after every attempt: the bytes it costs stay proportional to the journal."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drainer import recorder as recorder_module
from drainer.config import DrainConfig
from drainer.events import AttemptStarted
from drainer.journal import SessionFiles, iter_attempts
from drainer.models import Attempt
from drainer.recorder import Recorder


def _attempt(n: int) -> Attempt:
    return Attempt(run_id=f"run-{n // 20}", phase_id=f"p{n % 20}", phase_index=n % 20,
                   initial_state="FAILED", attempt_id=f"a{n}", attempt_number=1, lane=1,
                   started_at="2026-01-01T00:00:00.000+00:00", final_state="COMPLETE",
                   success=True, telemetry_events_collected=2, subprocess_returncode=0,
                   error_message=None, subprocess_stdout_excerpt="x" * 200)


@pytest.fixture
def rec(tmp_path: Path) -> Iterator[Recorder]:
    config = DrainConfig(database_url=f"sqlite:///{tmp_path / 'b.db'}",
                         session_dir=tmp_path / "sessions")
    files = SessionFiles(config.session_dir, "batch-drain-20260101-000000-abcd")
    files.create()
    yield Recorder(config, files, echo=lambda _line: None,
                   snapshot_fields=lambda: {"stop_reason": None})
    files.close()


def _record(rec: Recorder, n: int) -> None:
    attempt = _attempt(n)
    rec.attempt_started(AttemptStarted(session_id=rec.session_id, attempt=attempt), n + 1)
    rec.attempt_finished(attempt)


def test_a_long_session_writes_snapshot_bytes_in_proportion_to_its_journal(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No timer (every due check may write) and a small "small session" threshold, so the
    # growth rule is what limits the rewrites.
    monkeypatch.setattr(recorder_module, "SNAPSHOT_INTERVAL", 0.0)
    monkeypatch.setattr(recorder_module, "SNAPSHOT_SMALL", 32 * 1024)
    written = rewrites = 0
    for n in range(2000):
        _record(rec, n)
        if rec.snapshot_due():
            rec.write_snapshot()
            written += os.path.getsize(rec.files.snapshot_path)
            rewrites += 1
    journal = rec.files.journal_size
    # Rewriting after every attempt would cost about 1000x the journal here; the growth rule
    # keeps it to a few times the journal (a geometric series), and few rewrites.
    assert written < 4 * journal, (written, journal)
    assert 10 <= rewrites <= 60, rewrites


def test_the_snapshot_holds_every_journaled_result_once_with_autopack_fields(
    rec: Recorder,
) -> None:
    for n in range(30):
        _record(rec, n)
    rec.write_snapshot()
    data = json.loads(rec.files.snapshot_path.read_text())
    assert data["session_id"] == rec.session_id
    assert data["total_processed"] == data["total_success"] == 30
    assert data["total_telemetry_events"] == 60
    assert data["results"] == [a.to_json() for a in iter_attempts(rec.files.journal_path)]
    assert [r["attempt_id"] for r in data["results"]] == [f"a{n}" for n in range(30)]
    for key in ("started_at", "completed_at", "batch_size", "total_failed", "total_timeouts",
                "lanes", "config", "host", "drainer_version"):
        assert key in data, key
