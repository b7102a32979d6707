"""``--unstop RUN`` on ``--resume``: a run a stop rule stopped drains again, as ``plan --resume``
says beforehand, and a later resume does not stop it again from the attempts replayed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from conftest import (
    Env,
    create_backlog,
    drainer_view,
    file_digest,
    only_session,
    wait_for_worker_file,
)

BACKLOG = [("run-t", f"T{i}", i, "FAILED", None) for i in range(3)] + \
    [("run-z", f"Z{i}", i, "FAILED", None) for i in range(2)]


def _args(env: Env) -> list[str]:
    args = env.base_args()
    args[args.index("--phase-timeout-seconds") + 1] = "1"
    args[args.index("--kill-grace-seconds") + 1] = "0.2"
    return args


def _stopped_by_sigterm(env: Env, gated: str, *more: str, **kinds: str) -> str:
    """Run (or resume) until the worker of phase ``gated`` waits, then SIGTERM drainer and let
    that worker end: the session stops, resumable. Its output."""
    by_phase = ",".join(f"{phase}={kind}" for phase, kind in {**kinds, gated: "gated"}.items())
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *more, "--plain"], text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND_BY_PHASE=by_phase))
    wait_for_worker_file(env.out, f"started.{gated}", proc)
    proc.send_signal(signal.SIGTERM)
    (env.out / "release").touch()
    out, _ = proc.communicate(timeout=60)
    (env.out / "release").unlink()
    (env.out / f"started.{gated}").unlink()
    assert proc.returncode == 130, out
    return out


def _plan(env: Env, *more: str) -> tuple[str, list[str]]:
    proc = env.run_cli("plan", "--database-url", env.url, "--session-dir", str(env.sessions),
                       *more)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, re.findall(r"^\s+\d+\. (\S+) / (\S+)  ", proc.stdout, re.M)


def _journal_lines(env: Env, kind: str) -> list[str]:
    _, root = only_session(env.sessions)
    return [line for line in (root / "journal.jsonl").read_text().splitlines()
            if f'"type":"{kind}"' in line]


def test_unstop_lifts_a_stop_as_plan_says_and_a_later_resume_keeps_it_lifted(env: Env) -> None:
    create_backlog(env.db, BACKLOG)
    # Session 1: run-t's first phase times out, which stops run-t (one timeout per run).
    out = _stopped_by_sigterm(env, "Z0", *_args(env), "--prefer-run", "run-t",
                              "--max-timeouts-per-run", "1", T0="hang")
    assert "[STOP] run run-t: max_timeouts_per_run" in out

    text, picks = _plan(env, "--resume")
    assert "stopped run run-t: max_timeouts_per_run" in text
    assert set(picks) == {("run-z", "Z1")}  # Z0 succeeded; run-t is stopped
    text, picks = _plan(env, "--resume", "--unstop", "run-t")
    assert "lifted by --unstop: run run-t (was max_timeouts_per_run)" in text
    assert "stopped run run-t" not in text
    assert picks[:2] == [("run-t", "T1"), ("run-t", "T2")] and ("run-z", "Z1") in picks

    # Bad uses change nothing: a run not stopped, --unstop without --resume.
    journal = only_session(env.sessions)[1] / "journal.jsonl"
    before = file_digest(journal)
    for bad, says in [(["--resume", "--unstop", "run-z"], "has not stopped that run"),
                      (["--unstop", "run-t"], "give --resume too")]:
        for command in ("run", "plan"):
            proc = env.run_cli(command, *_args(env), *bad)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert file_digest(journal) == before

    # Session 1 resumed with the stop lifted: run-t drains again (first, as planned).
    out = _stopped_by_sigterm(env, "T1", *_args(env), "--resume", "--unstop", "run-t")
    assert "[UNSTOP] run run-t: its stop (max_timeouts_per_run) is lifted" in out
    assert len(_journal_lines(env, "run_unstopped")) == 1

    # Resumed again: the replayed timeout of T0 does not stop run-t a second time.
    text, picks = _plan(env, "--resume")
    assert "stopped run run-t" not in text
    assert ("run-t", "T2") in picks
    proc = env.run_cli("run", *_args(env), "--resume")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # (the session had a timeout)
    assert "[STOP] run" not in proc.stdout and "ok 5  failed 0  timed out 1" in proc.stdout
    assert len(_journal_lines(env, "run_stopped")) == 1
    assert drainer_view(only_session(env.sessions)[0])["stopped_runs"] == {}


def test_unstop_with_no_session_to_resume_is_a_usage_error(env: Env) -> None:
    create_backlog(env.db, BACKLOG)
    for command in ("run", "plan"):
        proc = env.run_cli(command, *_args(env), "--resume", "--unstop", "run-t")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "no incomplete session" in proc.stderr
    assert not list(env.sessions.glob("batch-drain-*"))


def test_unstop_lifts_a_stop_the_replay_fires_under_a_stricter_option(env: Env) -> None:
    # The session allowed 2 timeouts per run; resumed with 1, its replay stops run-t, which
    # the journal never stopped: plan says so, and --unstop may lift it (it was refused).
    create_backlog(env.db, BACKLOG)
    _stopped_by_sigterm(env, "Z0", *_args(env), "--prefer-run", "run-t",
                        "--max-timeouts-per-run", "2", T0="hang")
    text, _ = _plan(env, "--resume", "--max-timeouts-per-run", "1")
    assert "stopped run run-t: max_timeouts_per_run" in text
    text, picks = _plan(env, "--resume", "--max-timeouts-per-run", "1", "--unstop", "run-t")
    assert "lifted by --unstop: run run-t (was max_timeouts_per_run)" in text
    assert ("run-t", "T0") in picks  # (T1 and T2 completed before the stop)
    proc = env.run_cli("run", *_args(env), "--resume", "--max-timeouts-per-run", "1",
                       "--unstop", "run-t")
    assert "[UNSTOP] run run-t: its stop (max_timeouts_per_run) is lifted" in proc.stdout, \
        proc.stdout + proc.stderr
    assert "Draining: run-t / T0" in proc.stdout
