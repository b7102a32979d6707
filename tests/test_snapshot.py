"""The snapshot (Autopack's session file) is built from the journal, and a long session does
not rewrite it after every attempt: the bytes it costs stay proportional to the journal, and
a rewrite parses only what the journal gained since the last one."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drainer import journal as journal_module
from drainer import recorder as recorder_module
from drainer.config import DrainConfig
from drainer.events import AttemptStarted
from drainer.journal import SessionFiles, iter_attempts
from drainer.models import AUTOPACK_FIELDS, Attempt, autopack_record
from drainer.recorder import Recorder
from drainer.snapshot import Snapshot


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
    assert data["results"] == [autopack_record(a.to_json())
                               for a in iter_attempts(rec.files.journal_path)]
    assert all(list(r) == list(AUTOPACK_FIELDS) for r in data["results"])
    assert _ids(data) == [f"{n // 20}/p{n % 20}" for n in range(30)]
    for key in ("started_at", "completed_at", "batch_size", "total_failed", "total_timeouts"):
        assert key in data, key
    info = json.loads(rec.files.info_path.read_text())
    for key in ("lanes", "config", "host", "drainer_version", "stop_reason", "totals"):
        assert key in info, key


def test_interrupted_attempts_stay_out_and_timeouts_read_as_autopacks(rec: Recorder) -> None:
    for n in range(3):
        _record(rec, n)
    hung = dataclasses.replace(_attempt(3), success=False, final_state="FAILED",
                               timed_out=True, subprocess_returncode=-15)
    dead = dataclasses.replace(_attempt(4), interrupted=True, success=False)
    for n, attempt in ((4, hung), (5, dead)):
        rec.attempt_started(AttemptStarted(session_id=rec.session_id, attempt=attempt), n)
    rec.attempt_finished(hung)
    rec.attempt_reconciled(dead)
    rec.write_snapshot()
    data = json.loads(rec.files.snapshot_path.read_text())
    assert _ids(data) == ["0/p0", "0/p1", "0/p2", "0/p3"]
    assert data["total_processed"] == 4 and data["total_timeouts"] == 1
    assert (data["results"][3]["final_state"], data["results"][3]["subprocess_returncode"]) \
        == ("TIMEOUT", -1)
    assert json.loads(rec.files.info_path.read_text())["totals"]["interrupted"] == 1
    assert _write(rec) == _fresh(rec)  # reused bytes and a fresh build agree


def _ids(data: dict[str, Any]) -> list[str]:
    return [f"{r['run_id'][4:]}/{r['phase_id']}" for r in data["results"]]


def _fresh(rec: Recorder) -> bytes:
    """The snapshot as built from the whole journal, by a writer with no earlier file."""
    out = rec.files.snapshot_path.with_name("fresh.json")
    Snapshot(out, rec.files.journal_path, out.with_name("fresh-info.json")).write(
        {"session_id": rec.session_id}, rec.files.journal_size)
    return out.read_bytes()


def _write(rec: Recorder) -> bytes:
    snap = rec._snapshot
    snap.write({"session_id": rec.session_id}, rec.files.journal_size)
    return snap.path.read_bytes()


def test_a_rewrite_reuses_the_last_results_and_equals_one_built_from_the_whole_journal(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(5):
        _record(rec, n)
    _write(rec)
    # An attempt open across the rewrite, finished after it, and its finish written twice:
    # the rule "a finish counts only while its start is open" holds across the boundary.
    open_one = _attempt(99)
    rec.attempt_started(AttemptStarted(session_id=rec.session_id, attempt=open_one), 6)
    _write(rec)
    for n in range(5, 8):
        _record(rec, n)
    rec.attempt_finished(open_one)
    rec.attempt_finished(open_one)

    parsed = 0
    real_loads = journal_module.orjson.loads

    def counting_loads(data: bytes) -> object:
        nonlocal parsed
        parsed += 1
        return real_loads(data)

    monkeypatch.setattr(journal_module.orjson, "loads", counting_loads)
    incremental = _write(rec)
    # Only the lines written since the last file: 3 starts, 3 finishes, 2 finishes of a99.
    assert parsed == 8
    monkeypatch.undo()
    assert incremental == _fresh(rec)
    ids = _ids(json.loads(incremental))
    assert ids == ["0/p0", "0/p1", "0/p2", "0/p3", "0/p4", "0/p5", "0/p6", "0/p7", "4/p19"]


def test_a_snapshot_changed_behind_drainers_back_is_rebuilt_from_the_journal(
    rec: Recorder,
) -> None:
    for n in range(4):
        _record(rec, n)
    _write(rec)
    rec.files.snapshot_path.write_text('{"edited": true}')  # someone else's tool, say
    _record(rec, 4)
    rebuilt = _write(rec)
    assert rebuilt == _fresh(rec)
    assert len(json.loads(rebuilt)["results"]) == 5


def test_a_journal_line_cut_short_at_a_rewrite_is_read_whole_at_the_next(
    rec: Recorder,
) -> None:
    for n in range(3):
        _record(rec, n)
    attempt = _attempt(3)
    rec.attempt_started(AttemptStarted(session_id=rec.session_id, attempt=attempt), 4)
    rec.attempt_finished(attempt)
    size = rec.files.journal_size
    # The rewrite reads the journal up to a byte inside its last line (as when the size is
    # taken while a line is being appended): that line is left for the next one.
    rec._snapshot.write({"session_id": rec.session_id}, size - 10)
    assert len(json.loads(rec.files.snapshot_path.read_bytes())["results"]) == 3
    final = _write(rec)
    assert _ids(json.loads(final)) == ["0/p0", "0/p1", "0/p2", "0/p3"]
    assert final == _fresh(rec)


@pytest.mark.parametrize("kernel_copy", ["refused", "absent"])
def test_where_the_kernel_cannot_copy_the_results_are_copied_through_a_buffer(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, kernel_copy: str
) -> None:
    if kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        def refuse(*_args: object) -> int:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    for n in range(6):
        _record(rec, n)
    _write(rec)
    _record(rec, 6)
    assert _write(rec) == _fresh(rec)
