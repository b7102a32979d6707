"""Every journal write is whole or undone (issue 9, item 9): a write cut short by a full
disk is cut back off and stops the session with a one-line error, and a torn last line of
any length is dropped before more is appended."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from drainer import journal
from drainer.events import RunStopped, SessionResumed, SessionStarted
from drainer.journal import SessionFiles, replay

EVENT = SessionResumed(host="h", pid=1, config={"pad": "x" * 200})


def _files(root: Path) -> SessionFiles:
    files = SessionFiles(root, "batch-drain-20261202-000000-abcd", ())
    files.create()
    return files


def test_a_torn_last_line_longer_than_64_kib_is_dropped(tmp_path: Path) -> None:
    files = _files(tmp_path)
    files.append(EVENT, "2026-12-02T00:00:00Z")
    whole = files.journal_path.read_bytes()
    files.close()
    with files.journal_path.open("ab") as fh:
        fh.write(b'{"type": "attempt_finished", "error_message": "' + b"y" * 200_000)
    again = _files(tmp_path)  # as --resume opens it
    again.append(EVENT, "2026-12-02T00:00:01Z")
    again.close()
    lines = again.journal_path.read_bytes().splitlines(keepends=True)
    assert lines[0] == whole and len(lines) == 2
    assert orjson.loads(lines[1])["type"] == "session_resumed"  # the torn line is gone


# The journal may grow to 1,000 bytes only (RLIMIT_FSIZE): the kernel writes what fits and
# refuses the rest, as a full disk does.
SHORT_WRITE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from drainer.errors import SessionError
    from drainer.events import SessionResumed
    from drainer.journal import SessionFiles
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    files = SessionFiles(Path(sys.argv[1]), "batch-drain-20261202-000000-abcd", ())
    files.create()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    event = SessionResumed(host="h", pid=1, config={"pad": "x" * 300})
    try:
        for _ in range(10):
            files.append(event, "2026-12-02T00:00:00Z")
    except SessionError as exc:
        print(exc)
        print(files.journal_size)
    """
)


def test_a_journal_write_cut_short_is_undone_and_stops_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    message, size = proc.stdout.splitlines()
    assert message.startswith("cannot append to journal") and "resumable" in message
    journal = next(tmp_path.glob("*/journal.jsonl")).read_bytes()
    assert len(journal) == int(size) < 1000
    assert journal.endswith(b"\n") and journal.count(b"\n") == 2  # two whole lines, no torn one



def test_a_replay_is_read_again_once_the_journal_has_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A resume replays the journal twice in one process (the command line, for the saved
    # options, then the session); the second is the first one's copy while the file is
    # unchanged, and a fresh read once it has grown.
    original, reads = journal._replay, []

    def counted(path: Path) -> journal.Replay:
        reads.append(path)
        return original(path)

    monkeypatch.setattr(journal, "_replay", counted)
    files = _files(tmp_path)
    sid = files.session_id
    files.append(SessionStarted(session_id=sid, started_at="2026-12-02T00:00:00Z", host="h",
                                pid=1, drainer_version="0", config={}), "2026-12-02T00:00:00Z")
    first = replay(files.journal_path)
    assert first.stopped_runs == {}
    first.stopped_runs["run-0"] = "changed by its caller"  # a copy: the next replay is not
    assert replay(files.journal_path).stopped_runs == {}
    assert len(reads) == 1  # the file had not changed: not read again
    files.append(RunStopped(session_id=sid, run_id="run-1", reason="max_timeouts",
                            detail="2 timeouts"), "2026-12-02T00:00:01Z")
    assert replay(files.journal_path).stopped_runs == {"run-1": "max_timeouts"}
    assert len(reads) == 2
    files.close()
