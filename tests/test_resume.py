"""Crash safety: SIGKILL drainer at several points, resume each time, lose nothing.
Signals: the first SIGINT lets in-flight attempts finish, the second kills them now."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import IO

import psutil
import pytest

from conftest import (
    Env,
    create_backlog,
    drainer_view,
    only_session,
    phase_states,
    wait_for_worker_file,
)
from drainer.journal import replay


def _processes_with(text: str) -> list[int]:
    """Live processes whose environment holds ``text`` (e.g. this session's id)."""
    found = []
    needle = text.encode()
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                if needle in fh.read() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def _journal(env: Env) -> list[dict[str, object]]:
    _, session = only_session(env.sessions)
    return [json.loads(line) for line in (session / "journal.jsonl").read_text().splitlines()]


def _kill_9_while_a_worker_runs(
    env: Env, args: list[str], kind: str = "gated", says: str = "started.*"
) -> Path:
    """Start drainer, wait until its worker has set its phase EXECUTING and written the file
    ``says``, then kill -9 drainer. The worker dies with it (PR_SET_PDEATHSIG), leaving the
    phase EXECUTING. Returns the worker's file."""
    drainer = subprocess.Popen([sys.executable, "-m", "drainer", "run", *args], text=True,
                               stdout=subprocess.DEVNULL, cwd=env.tmp,
                               env=env.worker_env(WORKER_KIND=kind))
    said = wait_for_worker_file(env.out, says, drainer)
    drainer.kill()
    assert drainer.wait(timeout=30) == -signal.SIGKILL
    return said


@pytest.mark.slow
@pytest.mark.parametrize("history", [True, False], ids=["history", "no-history"])
def test_kill_9_at_several_points_then_resume_loses_and_doubles_nothing(
        env: Env, history: bool) -> None:
    phases = [(f"run-{r}", f"P{p}", p, "FAILED", None) for r in range(6) for p in range(2)]
    create_backlog(env.db, phases)
    args = [*env.base_args(), "--batch-size", "100", "--max-attempts-per-phase", "1",
            "--kill-grace-seconds", "0.5", "--max-fingerprint-repeats", "100",
            *([] if history else ["--no-history"])]
    # 1st run dies before its 3rd spawn; 2nd just after a spawn (the worker, which would
    # hang, dies with drainer, however far it got); 3rd between a worker's exit and the
    # journal write (with the history, after the settle: the attempt was recorded); the
    # 4th finishes.
    crashes = ["before_spawn:3", "worker_running:1", "after_exit:2"]
    for n, crash in enumerate(crashes):
        if crash.startswith("worker_running"):
            (env.out / "hang-next").write_text("")  # the next worker hangs, EXECUTING
        extra = ["--resume"] if n else []
        proc = env.run_cli("run", *args, *extra,
                           env=env.worker_env(DRAINER_CRASH_AT=crash, WORKER_KIND="fail"))
        assert proc.returncode == -signal.SIGKILL, (crash, proc.stdout, proc.stderr)
        (env.out / "hang-next").unlink(missing_ok=True)  # not taken if it died at once
    final = env.run_cli("run", *args, "--resume", env=env.worker_env(WORKER_KIND="fail"))
    assert final.returncode == 1, final.stderr  # attempts fail by design
    assert "[RESUME] session" in final.stdout and "[RECONCILED]" in final.stdout

    snapshot_path, _ = only_session(env.sessions)  # one session across all four runs
    snap = drainer_view(snapshot_path)
    events = _journal(env)
    started = [e["attempt_id"] for e in events if e["type"] == "attempt_started"]
    finished = [e["attempt_id"] for e in events if e["type"] == "attempt_finished"]
    assert len(started) == len(set(started))  # no attempt id reused
    assert sorted(started) == sorted(finished)  # every start has exactly one finish
    assert sorted(r["attempt_id"] for r in snap["results"]) == sorted(started)
    interrupted = [r for r in snap["results"] if r["interrupted"]]
    # The attempt settled just before the 3rd crash is journaled as the history recorded
    # it (failed); without the history drainer cannot tell, and it is interrupted.
    assert len(interrupted) == (2 if history else 3)
    # Every phase was attempted, and at most once outside interrupted attempts.
    real = Counter((r["run_id"], r["phase_id"]) for r in snap["results"] if not r["interrupted"])
    assert set(real) | {(r["run_id"], r["phase_id"]) for r in interrupted} == {
        (r, p) for r, p, *_ in phases
    }
    assert max(real.values()) == 1
    # Nothing stuck, nothing left running.
    assert all(state in ("FAILED", "COMPLETE") for state, _ in phase_states(env.db).values())
    assert _processes_with(f"DRAINER_SESSION_ID={snap['session_id']}") == []
    for hung in env.out.glob("*hung.*"):  # a grandchild, if the worker got that far
        if not hung.read_text():
            continue  # (killed before it wrote the pid)
        grandchild = int(hung.read_text())
        assert not psutil.pid_exists(grandchild) or \
            psutil.Process(grandchild).status() == "zombie"
    assert snap["stop_reason"] == "no_candidates"


def _start(env: Env, *args: str, **worker_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args(), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env.worker_env(**worker_env), cwd=env.tmp,
    )


def _read_until(stream: IO[str], needle: str) -> str:
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)}")




def test_first_sigint_lets_the_attempt_finish_then_resume_continues(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    proc = _start(env, "--stop-grace-seconds", "60", WORKER_KIND="gated")
    assert proc.stdout is not None
    wait_for_worker_file(env.out, "started.P", proc)
    proc.send_signal(signal.SIGINT)
    _read_until(proc.stdout, "[STOP] SIGINT received")
    (env.out / "release").write_text("")  # now let the in-flight worker finish
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Resume with: python -m drainer run --resume batch-drain-" in rest
    snapshot, _ = only_session(env.sessions)
    snap = drainer_view(snapshot)
    assert snap["stop_reason"] == "signal"
    (result,) = snap["results"]
    assert result["success"] is True and result["cancelled"] is False

    resumed = env.run_cli("run", *env.base_args(), "--resume",
                          env=env.worker_env(WORKER_KIND="ok"))
    assert resumed.returncode == 0, resumed.stderr
    snap = drainer_view(snapshot)
    assert sorted(r["run_id"] for r in snap["results"]) == ["run-0", "run-1", "run-2"]
    assert snap["stop_reason"] == "no_candidates"
    again = env.run_cli("run", *env.base_args(), "--resume", snap["session_id"])
    assert again.returncode == 2 and "cannot be resumed" in again.stderr


def test_second_sigint_kills_the_attempt_now(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    proc = _start(env, "--stop-grace-seconds", "600", WORKER_KIND="hang")
    assert proc.stdout is not None
    _read_until(proc.stdout, "Draining: run-0 / P")
    wait_for_worker_file(env.out, "hung.*", proc)
    proc.send_signal(signal.SIGINT)
    _read_until(proc.stdout, "[STOP] SIGINT received")
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "killing in-flight attempts now" in rest
    snapshot, _ = only_session(env.sessions)
    snap = drainer_view(snapshot)
    (result,) = snap["results"]
    assert result["cancelled"] is True and result["state_restored"] is True
    state, reason = phase_states(env.db)[("run-0", "P")]
    assert state == "FAILED" and (reason or "").startswith("drainer:")
    assert _processes_with(f"DRAINER_SESSION_ID={snap['session_id']}") == []
    # A cancelled attempt (drainer's stop, not the worker's failure) makes the exit code 1
    # only while its phase has not been drained since in the session.
    resumed = env.run_cli("run", *env.base_args(), "--resume",
                          env=env.worker_env(WORKER_KIND="ok"))
    # Before: 1, for the cancelled attempt whose phase the resumed session then completed.
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    snap = drainer_view(snapshot)
    cancelled, *rest = snap["results"]
    assert cancelled["cancelled"] is True and all(r["success"] for r in rest)
    assert {state for state, _ in phase_states(env.db).values()} == {"COMPLETE"}


def test_sigterm_is_handled_like_sigint(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    proc = _start(env, WORKER_KIND="gated")
    assert proc.stdout is not None
    wait_for_worker_file(env.out, "started.P", proc)
    proc.send_signal(signal.SIGTERM)
    _read_until(proc.stdout, "[STOP] SIGTERM received")
    (env.out / "release").write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert os.path.exists(only_session(env.sessions)[0])
    # The summary names the signal (the [STOP] line may be long gone from the screen).
    assert "Stop reason: signal (SIGTERM received" in out, out


def test_resume_keeps_the_session_options_unless_given_again(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    first = env.run_cli("run", *env.base_args(), "--batch-size", "3",
                        env=env.worker_env(DRAINER_CRASH_AT="after_exit:2"))
    assert first.returncode == -signal.SIGKILL
    # Not repeating --batch-size: the session's 3 still holds (1 done + 1 interrupted).
    resumed = env.run_cli("run", *env.base_args(), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    snapshot, _ = only_session(env.sessions)
    snap = drainer_view(snapshot)
    assert snap["batch_size"] == 3 and snap["stop_reason"] == "batch_size_reached"
    assert sum(1 for r in snap["results"] if not r["interrupted"]) == 3


def test_resume_with_an_option_given_again_uses_the_new_value(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    env.run_cli("run", *env.base_args(), "--batch-size", "3",
                env=env.worker_env(DRAINER_CRASH_AT="after_exit:2"))
    resumed = env.run_cli("run", *env.base_args(), "--resume", "--batch-size", "5")
    assert resumed.returncode == 0, resumed.stderr
    snapshot, _ = only_session(env.sessions)
    snap = drainer_view(snapshot)
    assert snap["batch_size"] == 5
    assert sum(1 for r in snap["results"] if not r["interrupted"]) == 5


def test_resume_with_no_incomplete_session_starts_a_new_one(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "no incomplete session" in proc.stdout and "starting a new one" in proc.stdout
    only_session(env.sessions)


def test_resume_of_a_corrupt_journal_is_exit_2(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    env.run_cli("run", *env.base_args(), "--lease-ttl-seconds", "2",
                env=env.worker_env(DRAINER_CRASH_AT="before_spawn:1"))
    (session_dir,) = env.sessions.glob("batch-drain-*")
    journal = session_dir / "journal.jsonl"
    journal.write_bytes(b"garbage\n" + journal.read_bytes())
    before = env.db.read_bytes()
    proc = env.run_cli("run", *env.base_args(), "--resume", session_dir.name)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "corrupt journal" in proc.stderr
    assert "does not start a session (line 1 is not JSON)" in proc.stderr
    assert env.db.read_bytes() == before
    # --resume (the latest) says which session it passed over, instead of starting anew quietly
    latest = env.run_cli("run", *env.base_args(), "--resume")
    assert latest.returncode == 0, latest.stderr
    assert f"[WARN] passed over: corrupt journal {journal}" in latest.stdout
    assert "no incomplete session" in latest.stdout


@pytest.mark.parametrize("damage", ["not JSON", "a wrong field"])
def test_a_corrupt_line_mid_journal_is_reported_and_resume_continues_past_it(
    env: Env, damage: str
) -> None:
    create_backlog(env.db, [(f"run-{r}", "P", 0, "FAILED", None) for r in range(4)])
    args = [*env.base_args(), "--batch-size", "10"]
    crashed = env.run_cli("run", *args, env=env.worker_env(DRAINER_CRASH_AT="before_spawn:3"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    _, session_dir = only_session(env.sessions)
    journal = session_dir / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    finished = [n for n, line in enumerate(lines, 1) if b'"attempt_finished"' in line]
    assert len(finished) == 2
    bad = finished[0]  # the first attempt's finish: damaged in place, mid-file
    if damage == "not JSON":
        lines[bad - 1] = b'{"type": "attempt_finished", "run_id": \x00 garbage\n'
        why = f"line {bad} is not JSON"
    else:  # JSON, and an attempt_finished, but not an attempt record
        record = json.loads(lines[bad - 1])
        record["phase_index"] = "first"
        lines[bad - 1] = json.dumps(record).encode() + b"\n"
        why = f"line {bad} (attempt_finished) lacks a field or has a wrong type"
    journal.write_bytes(b"".join(lines))

    report = env.run_cli("analyze", session_dir.name, "--session-dir", str(env.sessions))
    assert report.returncode == 0, report.stderr
    assert why in report.stderr and "analysing the rest" in report.stderr
    status = env.run_cli("status", "--database-url", f"sqlite:///{env.db}",
                         "--session-dir", str(env.sessions))
    assert f"skipped 1 corrupt line(s) ({why}" in status.stdout

    proc = env.run_cli("run", *args, "--resume", session_dir.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[WARN] journal {journal}: skipped 1 corrupt line(s) ({why}" in proc.stdout
    assert "resuming from the lines that could be read" in proc.stdout
    # Nothing stuck, every phase drained once. The attempt whose finish was damaged is
    # journaled again as the attempt history recorded it (ok); the one the crash cut off
    # before its spawn counts as interrupted.
    assert {s for s, _ in phase_states(env.db).values()} == {"COMPLETE"}
    snap = drainer_view(env.sessions / f"{session_dir.name}.json")
    done = Counter(r["run_id"] for r in snap["results"] if not r["interrupted"])
    assert sorted(done) == ["run-0", "run-1", "run-2", "run-3"] and max(done.values()) == 1
    assert sorted(r["run_id"] for r in snap["results"] if r["interrupted"]) == ["run-2"]
    assert replay(journal).dangling == []  # the reconciled finish counts: nothing left open


def test_database_failure_mid_drain_is_one_line_exit_2_and_resumable(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    dropper = env.tmp / "dropper.py"
    dropper.write_text(
        "import os, sqlite3\n"
        "db = sqlite3.connect(os.environ['DATABASE_URL'][10:])\n"
        "db.execute('DROP TABLE drainer_leases'); db.commit()\n"
    )
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {dropper}"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    snapshot, _ = only_session(env.sessions)
    assert drainer_view(snapshot)["stop_reason"] == "error"
    assert "Resume with: python -m drainer run --resume" in proc.stdout
    # Resuming reconciles the attempt that could not be finished, then drains the rest.
    resumed = env.run_cli("run", *env.base_args(), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert "[RECONCILED]" in resumed.stdout
    assert {s for s, _ in phase_states(env.db).values()} <= {"COMPLETE", "FAILED"}


# A worker that deletes its database file, or puts a copy in its place (as a restore from a
# backup does), and then marks its phase COMPLETE in whatever file is now at the path.
SWAPPER = textwrap.dedent(
    """
    import os, shutil, sqlite3, sys
    path = os.environ["DATABASE_URL"][len("sqlite:///"):]
    if sys.argv[1] == "delete":
        os.unlink(path)
    else:
        shutil.copyfile(path, path + ".copy")
        os.replace(path + ".copy", path)
        db = sqlite3.connect(path)
        db.execute("UPDATE phases SET state = 'COMPLETE'")
        db.commit()
    """
)


@pytest.mark.parametrize("how", ["delete", "replace"])
def test_a_database_file_deleted_or_replaced_mid_run_stops_the_session(
    env: Env, how: str
) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    swapper = env.tmp / "swapper.py"
    swapper.write_text(SWAPPER)
    proc = env.run_cli("run", *env.base_args(f"{sys.executable} {swapper} {how}"))
    # Before: drainer went on with the file it had open (the deleted one, or the old one
    # beside its replacement), and its reading of the phase was not the worker's.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    word = "deleted" if how == "delete" else "replaced by another file"
    assert f"SQLite database {env.db} was {word} while drainer was using it" in line
    snapshot, _ = only_session(env.sessions)
    assert drainer_view(snapshot)["stop_reason"] == "error"
    assert sum(e["type"] == "attempt_started" for e in _journal(env)) == 1  # no second one


def test_resume_refuses_a_session_another_drainer_is_running(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    first = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND="gated"),
    )
    try:
        wait_for_worker_file(env.out, "started.P", first)
        (session_dir,) = [d for d in env.sessions.glob("batch-drain-*") if d.is_dir()]
        second = env.run_cli("run", *env.base_args(), "--resume", session_dir.name)
        assert second.returncode == 2
        assert "being drained by another drainer process" in second.stderr
        latest = env.run_cli("run", *env.base_args(), "--resume")  # skips the live one
        assert "no incomplete session" in latest.stdout
    finally:
        (env.out / "release").write_text("")
        _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    snap = drainer_view(env.sessions / f"{session_dir.name}.json")
    assert [r["success"] for r in snap["results"]] == [True]  # the live attempt was left alone


def test_a_torn_journal_line_survives_two_resumes(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(3)])
    env.run_cli("run", *env.base_args(), env=env.worker_env(DRAINER_CRASH_AT="before_spawn:2"))
    (session_dir,) = [d for d in env.sessions.glob("batch-drain-*") if d.is_dir()]
    with open(session_dir / "journal.jsonl", "ab") as fh:
        fh.write(b'{"type": "attempt_fini')  # a write cut short by the crash
    again = env.run_cli("run", *env.base_args(), "--resume",
                        env=env.worker_env(DRAINER_CRASH_AT="before_spawn:1"))
    assert again.returncode == -signal.SIGKILL
    final = env.run_cli("run", *env.base_args(), "--resume", session_dir.name)
    assert final.returncode == 0, final.stderr
    snap = drainer_view(env.sessions / f"{session_dir.name}.json")
    assert sorted(r["run_id"] for r in snap["results"] if not r["interrupted"]) == [
        "run-0", "run-1", "run-2"]


def test_a_phase_restored_at_resume_is_drained_in_its_priority_order(env: Env) -> None:
    # run-0/P comes first by the order; drainer dies while its worker has it EXECUTING.
    # --resume restores it to FAILED: it must be a candidate at once, not only after the
    # other phases (or the next refresh).
    create_backlog(env.db, [(f"run-{r}", "P", 0, "FAILED", "boom") for r in range(4)])
    args = [*env.base_args(), "--max-attempts-per-phase", "1", "--kill-grace-seconds", "0.5"]
    _kill_9_while_a_worker_runs(env, args)
    assert phase_states(env.db)[("run-0", "P")][0] == "EXECUTING"
    resumed = env.run_cli("run", *args, "--resume", env=env.worker_env(WORKER_KIND="ok"))
    assert resumed.returncode == 0, resumed.stderr
    events = _journal(env)
    order = [e["run_id"] for e in events
             if e["type"] == "attempt_started" and e["attempt_id"] not in
             {f["attempt_id"] for f in events if f["type"] == "attempt_finished"
              and f.get("interrupted")}]
    assert order == ["run-0", "run-1", "run-2", "run-3"], order


def test_closing_the_terminal_stops_like_sigterm_and_leaves_nothing_behind(env: Env) -> None:
    # An SSH drop: the terminal goes away (writes to it fail) and drainer gets SIGHUP. It
    # stops as for SIGTERM: the attempt in flight gets the grace, then its tree is killed,
    # its phase restored, the session recorded resumable.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args(), "--stop-grace-seconds", "1"],
        stdout=terminal, stderr=terminal, env=env.worker_env(WORKER_KIND="hang"), cwd=env.tmp)
    os.close(terminal)
    wait_for_worker_file(env.out, "hung.*", proc)
    os.close(controller)  # the terminal hangs up: from now on drainer's writes fail
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 130
    events = _journal(env)
    assert events[-1]["type"] == "session_stopped"
    assert events[-1]["stop_reason"] == "signal" and "SIGHUP" in events[-1]["stop_detail"]
    finished = [e for e in events if e["type"] == "attempt_finished"]
    assert len(finished) == 1 and finished[0]["cancelled"] is True
    assert phase_states(env.db)[("run-0", "P")][0] == "FAILED"
    assert phase_states(env.db)[("run-1", "P")] == ("FAILED", None)  # never started
    assert _processes_with(f"DRAINER_SESSION_ID={events[0]['session_id']}") == []
    grandchild = int(next(env.out.glob("hung.*")).read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie"


def _wait_until_leases_expired(env: Env) -> None:
    """Until every lease in the backlog has expired, by the database's clock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = sqlite3.connect(env.db)
        try:
            live = conn.execute(
                "SELECT count(*) FROM drainer_leases "
                "WHERE expires_at > (julianday('now') - 2440587.5) * 86400.0").fetchone()[0]
        finally:
            conn.close()
        if not live:
            return
        time.sleep(0.05)
    raise AssertionError("a lease never expired")


def test_an_interrupted_attempt_is_not_credited_with_another_sessions_work(env: Env) -> None:
    # Drainer A dies (kill -9) while its worker has run-0/P EXECUTING. Its lease expires;
    # a new session B sweeps it (restoring the phase) and drains the phase: COMPLETE, with
    # 3 telemetry rows. A's --resume must not count B's rows, nor B's success, as A's.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    _kill_9_while_a_worker_runs(env, [*env.base_args(), "--lease-ttl-seconds", "1",
                                      "--kill-grace-seconds", "0.5"])
    assert phase_states(env.db)[("run-0", "P")][0] == "EXECUTING"
    [a_id] = [p.name for p in env.sessions.iterdir() if p.is_dir()]
    _wait_until_leases_expired(env)
    b = env.run_cli("run", *env.base_args(), env=env.worker_env(WORKER_KIND="ok"))
    assert b.returncode == 0, b.stdout + b.stderr  # it waited out A's lease, then drained
    assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
    resumed = env.run_cli("run", *env.base_args(), "--resume", a_id,
                          env=env.worker_env(WORKER_KIND="ok"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    journal = env.sessions / a_id / "journal.jsonl"
    [interrupted] = [json.loads(line) for line in journal.read_text().splitlines()
                     if '"attempt_finished"' in line]
    assert interrupted["interrupted"] is True
    assert interrupted["telemetry_events_collected"] is None  # B's rows are not A's
    assert interrupted["success"] is False
    assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"  # left as B left it
    assert _processes_with(f"DRAINER_SESSION_ID={a_id}") == []


def test_an_interrupted_attempt_that_kept_its_lease_gets_exactly_its_own_telemetry(
        env: Env) -> None:
    # Rows from before the attempt (2 of the phase, 4 of another phase of its run) are not
    # its own; the 5 its worker wrote before drainer was killed are.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-0", "Q", 1, "FAILED", None)])
    with sqlite3.connect(env.db) as conn:
        conn.executemany("INSERT INTO token_budget_escalation_events (run_id, phase_id, "
                         "trigger_type) VALUES ('run-0', ?, 'old')", [("P",)] * 2 + [("Q",)] * 4)
    drainer = subprocess.Popen([sys.executable, "-m", "drainer", "run", *env.base_args(),
                                "--run-id", "run-0"], text=True, stdout=subprocess.DEVNULL,
                               cwd=env.tmp, env=env.worker_env(WORKER_KIND="events_then_hang",
                                                               WORKER_EVENTS="5"))
    wait_for_worker_file(env.out, "wrote.P", drainer)
    drainer.kill()
    assert drainer.wait(timeout=30) == -signal.SIGKILL
    # Resumed within the lease's TTL (60 s): the lease is still the attempt's own.
    resumed = env.run_cli("run", *env.base_args(), "--resume",
                          env=env.worker_env(WORKER_KIND="ok", WORKER_EVENTS="3"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = [r for r in drainer_view(only_session(env.sessions)[0])["results"]]
    [interrupted] = [r for r in records if r["interrupted"]]
    assert interrupted["phase_id"] == "P" and interrupted["success"] is False
    assert interrupted["telemetry_events_collected"] == 5
    assert interrupted["state_restored"] is True
    drained = {r["phase_id"]: r["telemetry_events_collected"] for r in records
               if not r["interrupted"]}
    assert drained == {"P": 3, "Q": 3}
    assert {state for state, _ in phase_states(env.db).values()} == {"COMPLETE"}


def test_without_setpriv_a_worker_outlives_its_drainer_until_resume(env: Env) -> None:
    # Where util-linux's setpriv is missing, workers start directly (README, "Reliability"):
    # one outlives a drainer killed with kill -9, and --resume kills it and its grandchild
    # (by marker, pid and create time) and mends the phase.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    bare = env.tmp / "bare-path"
    bare.mkdir()
    drainer = subprocess.Popen([sys.executable, "-m", "drainer", "run", *env.base_args()],
                               text=True, stdout=subprocess.DEVNULL, cwd=env.tmp,
                               env=env.worker_env(WORKER_KIND="hang", PATH=str(bare)))
    hung = wait_for_worker_file(env.out, "hung.*", drainer)
    worker, grandchild = int(hung.name.split(".")[1]), int(hung.read_text())
    try:
        assert psutil.Process(worker).cmdline()[0] == sys.executable  # not behind setpriv
        drainer.kill()
        assert drainer.wait(timeout=30) == -signal.SIGKILL
        assert psutil.Process(worker).status() != psutil.STATUS_ZOMBIE  # it lives on
        resumed = env.run_cli("run", *env.base_args(), "--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "[RECONCILED]" in resumed.stdout
        for pid in (worker, grandchild):
            assert not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
    finally:
        for pid in (worker, grandchild):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_a_worker_dies_with_its_drainer(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    # The worker keeps its phase EXECUTING, starts a setsid grandchild and would hang.
    hung = _kill_9_while_a_worker_runs(env, env.base_args(), kind="hang", says="hung.*")
    worker, grandchild = int(hung.name.split(".")[1]), int(hung.read_text())
    try:
        # Before: the worker ran on (until a takeover or --resume killed it). Now the kernel
        # kills it as drainer dies (PR_SET_PDEATHSIG); psutil polls, it is not our child.
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(worker).wait(timeout=30)
        # Its grandchild carries the marker: --resume kills it and mends the phase.
        resumed = env.run_cli("run", *env.base_args(), "--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "[RECONCILED]" in resumed.stdout
        assert not psutil.pid_exists(grandchild) or \
            psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"
    finally:
        for pid in (worker, grandchild):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
