"""The attempt history (``drainer_attempts``): one row per finished attempt, shared by every
drainer and session on a backlog; ``--attempts-scope history`` and ``--skip-unchanged`` read
it. Real drainers, real workers, on SQLite files and the local PostgreSQL."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text as sql_text

from conftest import Env, journal_results
from drainer.backlog import HISTORY_TABLE, open_backlog
from drainer.backlog.history import Row
from drainer.dburl import parse_database_url

# A worker for both databases, driven by its phase id's last part: "ok" completes the
# phase, "import" fails it with an import error (deterministic), "fail" with an assertion,
# "path" with a missing file under a path that names its run;
# first it sleeps (WORKER_SLEEP, SLEEP_BY_RUN="run=seconds,...") or hangs (HANG_ONCE).
WORKER = textwrap.dedent(
    """
    import asyncio, os, sqlite3, sys, time
    run_id, phase_id = sys.argv[1], sys.argv[2]
    kind = phase_id.rsplit("-", 1)[1]
    state = "COMPLETE" if kind == "ok" else "FAILED"
    reason = {"ok": None, "import": "ImportError: cannot import name 'X' from 'pkg'",
              "fail": "AssertionError: totals differ",
              "path": f"FileNotFoundError: [Errno 2] No such file: '/srv/{run_id}/out.json'"}[kind]
    hang = os.environ.get("HANG_ONCE")  # a file: the first worker to take it hangs
    if hang:
        try:
            os.rename(hang, hang + ".taken")
            time.sleep(600)
        except FileNotFoundError:
            pass
    sleeps = dict(p.split("=") for p in os.environ.get("SLEEP_BY_RUN", "").split(",") if p)
    time.sleep(float(sleeps.get(run_id, os.environ.get("WORKER_SLEEP", "0"))))
    url = os.environ["DATABASE_URL"]
    sql = "UPDATE phases SET state = {s}, last_failure_reason = {s} WHERE run_id = {s} AND phase_id = {s}"
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):], timeout=30)
        db.execute(sql.format(s="?"), (state, reason, run_id, phase_id))
        db.commit()
    else:
        import asyncpg
        async def main():
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(sql.replace("{s}", "${}").format(1, 2, 3, 4),
                                   state, reason, run_id, phase_id)
            finally:
                await conn.close()
        asyncio.run(main())
    if kind != "ok":
        print(reason, file=sys.stderr)
    sys.exit(0 if kind == "ok" else 1)
    """
)


def args(env: Env, url: str, *more: str, plain: bool = True, backoff: str = "0",
         timeout: str = "60") -> list[str]:
    worker = env.tmp / "history_worker.py"
    worker.write_text(WORKER)
    return ["--database-url", url, "--command", f"{sys.executable} {worker} {{run_id}} "
            "{phase_id}", "--session-dir", str(env.sessions), "--phase-timeout-seconds", timeout,
            "--retry-backoff-seconds", backoff, "--batch-size", "100", *more,
            *(["--plain"] if plain else [])]


def history(url: str) -> list[Row]:
    async def read() -> list[Row]:
        async with open_backlog(parse_database_url(url)) as backlog:
            return await backlog.history.rows()

    return anyio.run(read)


def sessions(env: Env) -> dict[str, list[dict[str, Any]]]:
    """Each session's attempt records, from its journal."""
    return {snap.stem: journal_results(env.sessions / snap.stem)
            for snap in sorted(env.sessions.glob("batch-drain-*.json"))}


def check_rows_match_journals(rows: list[Row], journals: dict[str, list[dict[str, Any]]]
                              ) -> None:
    """Exactly one row per journaled attempt, with the journal's facts."""
    by_id = {r.attempt_id: r for r in rows}
    assert len(by_id) == len(rows)
    records = [(s, rec) for s, recs in journals.items() for rec in recs]
    assert sorted(by_id) == sorted(rec["attempt_id"] for _, rec in records)
    for session, rec in records:
        row = by_id[rec["attempt_id"]]
        assert (row.session_id, row.run_id, row.phase_id) == (session, rec["run_id"],
                                                              rec["phase_id"])
        assert row.attempt_number == rec["attempt_number"]
        assert row.outcome == ("ok" if rec["success"] else "failed")
        assert row.final_state == rec["final_state"]
        assert row.fingerprint == rec["failure_fingerprint"]
        assert row.exit_status == rec["subprocess_returncode"]
        assert row.telemetry_events == rec["telemetry_events_collected"]
        assert row.duration_seconds == pytest.approx(rec["subprocess_duration_seconds"],
                                                     abs=0.002)
        assert row.started_at is not None and row.started_at <= row.finished_at
        assert row.host


PHASES = [(f"run-{i}", f"P1-{kind}", 0, "FAILED", None)
          for i, kind in enumerate(["ok", "fail", "import", "ok", "fail", "ok"])]


def test_two_drainers_and_two_sessions_share_one_history_with_exact_counts(
        env: Env, make_url: Any) -> None:
    url = make_url(PHASES)
    # Two drainers at once, each with two lanes, then a third session after them.
    both = [subprocess.Popen([sys.executable, "-m", "drainer", "run",
                              *args(env, url, "--lanes", "2")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env.worker_env(), cwd=env.tmp) for _ in range(2)]
    for proc in both:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 1), out + err  # (failed attempts: 1)
    third = env.run_cli("run", *args(env, url))
    assert third.returncode in (0, 1), third.stdout + third.stderr
    journals = sessions(env)
    assert len(journals) == 3
    rows = history(url)
    check_rows_match_journals(rows, journals)
    # Session scope (Autopack's way): a session tries a failing phase at most twice; the
    # third, alone, tried each twice more. A phase completes once, whoever drains it.
    last = max(journals, key=lambda s: min(r["started_at"] for r in journals[s]))
    for session in journals:
        tries = Counter((r.run_id, r.phase_id) for r in rows if r.session_id == session)
        for run_id, phase_id, *_ in PHASES:
            if phase_id.endswith("ok"):
                continue
            assert tries[(run_id, phase_id)] == 2 if session == last \
                else tries[(run_id, phase_id)] <= 2, (session, tries)
    per_phase = Counter((r.run_id, r.phase_id) for r in rows)
    assert all(per_phase[(run_id, phase_id)] == 1 for run_id, phase_id, *_ in PHASES
               if phase_id.endswith("ok"))
    categories = {r.phase_id: r.failure_category for r in rows}
    assert categories == {"P1-ok": None, "P1-fail": "other", "P1-import": "collection/import"}


def test_attempts_scope_history_counts_attempts_across_sessions(env: Env, make_url: Any
                                                                ) -> None:
    url = make_url([("run-a", "P1-fail", 0, "FAILED", None),
                    ("run-b", "P1-ok", 0, "FAILED", None)])
    first = env.run_cli("run", *args(env, url))
    assert first.returncode == 1, first.stdout + first.stderr
    assert Counter(r.phase_id for r in history(url)) == {"P1-fail": 2, "P1-ok": 1}
    scoped = ["--attempts-scope", "history", "--max-attempts-per-phase"]
    plan = env.run_cli("plan", *args(env, url, *scoped, "2", plain=False))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "attempted 2 time(s) in earlier sessions" in plan.stdout
    second = env.run_cli("run", *args(env, url, *scoped, "2"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(history(url)) == 3  # nothing tried: both attempts are spent
    third = env.run_cli("run", *args(env, url, *scoped, "3"))
    assert third.returncode == 1, third.stdout + third.stderr
    assert Counter(r.phase_id for r in history(url)) == {"P1-fail": 3, "P1-ok": 1}
    # The session scope is unchanged: two more.
    fourth = env.run_cli("run", *args(env, url))
    assert fourth.returncode == 1
    assert Counter(r.phase_id for r in history(url)) == {"P1-fail": 5, "P1-ok": 1}


def test_attempts_scope_history_holds_for_two_drainers_at_once(env: Env, make_url: Any
                                                              ) -> None:
    """Checked under each claim's lease, where no other drainer can add an attempt: two
    drainers together make exactly N attempts of a failing phase, never 2N."""
    phases = [(f"run-{i}", "P1-fail", 0, "FAILED", None) for i in range(6)]
    url = make_url(phases)
    both = [subprocess.Popen([sys.executable, "-m", "drainer", "run", *args(
        env, url, "--lanes", "2", "--attempts-scope", "history")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env.worker_env(WORKER_SLEEP="0.2"), cwd=env.tmp) for _ in range(2)]
    for proc in both:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, out + err
    rows = history(url)
    check_rows_match_journals(rows, sessions(env))
    assert Counter(r.run_id for r in rows) == {run_id: 2 for run_id, *_ in phases}


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True,
                          text=True, env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                          "GIT_COMMITTER_NAME": "t",
                                          "GIT_COMMITTER_EMAIL": "t@t", "HOME": "/nonexistent",
                                          "PATH": "/usr/bin:/bin"}).stdout.strip()


def test_skip_unchanged_skips_at_the_same_commit_and_drains_after_a_new_one(
        env: Env, make_url: Any) -> None:
    repo = env.tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "code.py")
    git(repo, "commit", "-qm", "one")
    head = git(repo, "rev-parse", "HEAD")
    url = make_url([("run-a", "P1-import", 0, "FAILED", None),
                    ("run-b", "P1-fail", 0, "FAILED", None)])
    once = ["--workspace", str(repo), "--max-attempts-per-phase", "1"]

    def tried(*more: str) -> list[str]:
        before = {r.attempt_id for r in history(url)}
        proc = env.run_cli("run", *args(env, url, *once, *more))
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        return sorted(r.phase_id for r in history(url) if r.attempt_id not in before)

    assert tried() == ["P1-fail", "P1-import"]
    assert {r.revision for r in history(url)} == {head}
    # The import error is deterministic at once; the assertion only once seen twice.
    assert tried("--skip-unchanged") == ["P1-fail"]
    assert tried("--skip-unchanged") == []
    plan = env.run_cli("plan", *args(env, url, *once, "--skip-unchanged", plain=False))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"unchanged since its last failure at {head[:7]} (a collection/import error)" \
        in plan.stdout
    assert f"unchanged since its last failure at {head[:7]} (its fingerprint seen 2x)" \
        in plan.stdout
    # Uncommitted edits are a revision of their own; so is a new commit.
    (repo / "code.py").write_text("x = 2\n")
    assert tried("--skip-unchanged") == ["P1-fail", "P1-import"]
    dirty = {r.revision for r in history(url)} - {head}
    assert len(dirty) == 1 and dirty.pop().startswith(head + "+dirty.")
    git(repo, "commit", "-qam", "two")
    assert tried("--skip-unchanged") == ["P1-fail", "P1-import"]
    # Without --skip-unchanged nothing is held back.
    assert tried() == ["P1-fail", "P1-import"]


def test_a_revision_command_names_the_revision(env: Env, make_url: Any) -> None:
    url = make_url([("run-a", "P1-import", 0, "FAILED", None)])
    printer = f"{sys.executable} -c \"print('build-42')\""
    proc = env.run_cli("run", *args(env, url, "--revision-command", printer,
                                    "--max-attempts-per-phase", "1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [r.revision for r in history(url)] == ["build-42"]
    again = env.run_cli("run", *args(env, url, "--revision-command", printer,
                                     "--skip-unchanged"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(history(url)) == 1


def test_no_history_records_nothing_and_bad_revision_input_changes_nothing(
        env: Env, make_url: Any, backend: str) -> None:
    url = make_url([("run-a", "P1-ok", 0, "FAILED", None)])
    for bad, says in [
        (["--no-history", "--skip-unchanged"], "--skip-unchanged read the attempt history"),
        (["--no-history", "--attempts-scope", "history"], "--attempts-scope history read"),
        (["--skip-unchanged"], "is not a git work tree"),
        (["--revision-command", "false"], "--revision-command 'false' exited with status 1"),
        (["--revision-command", "true", "--skip-unchanged"], "printed nothing"),
        (["--attempts-scope", "sessions"], "invalid choice: 'sessions'"),
    ]:
        proc = env.run_cli("run", *args(env, url, *bad))
        assert proc.returncode == 2, (bad, proc.stdout + proc.stderr)
        assert says in proc.stderr, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not has_table(url, HISTORY_TABLE)
    proc = env.run_cli("run", *args(env, url, "--no-history"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not has_table(url, HISTORY_TABLE)


def has_table(url: str, name: str) -> bool:
    async def check() -> bool:
        async with open_backlog(parse_database_url(url)) as backlog:
            return await backlog.history.has_table() if name == HISTORY_TABLE else False

    return anyio.run(check)


def test_an_attempt_interrupted_by_a_crash_is_recorded_once_when_resumed(
        env: Env, make_url: Any) -> None:
    url = make_url([("run-a", "P1-ok", 0, "FAILED", None),
                    ("run-b", "P1-fail", 0, "FAILED", None)])
    hang = env.tmp / "hang-once"
    hang.touch()  # the first worker hangs before it writes: it cannot finish its phase
    crashed = env.run_cli("run", *args(env, url, "--max-attempts-per-phase", "1"),
                          env=env.worker_env(DRAINER_CRASH_AT="worker_running:1",
                                             HANG_ONCE=str(hang)))
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert history(url) == []  # drainer died while its worker ran: nothing settled yet
    resumed = env.run_cli("run", *args(env, url, "--resume", "latest",
                                       "--max-attempts-per-phase", "1"))
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    rows = history(url)
    (session, records), = sessions(env).items()
    assert sorted(r.attempt_id for r in rows) == sorted(r["attempt_id"] for r in records)
    interrupted = [r for r in rows if r.outcome == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].session_id == session
    # It counts for nothing: its phase was attempted again, and drained.
    again = [r for r in rows if r.phase_id == interrupted[0].phase_id and r is not
             interrupted[0]]
    assert len(again) == 1 and again[0].outcome in ("ok", "failed")


def test_analyze_history_and_status_show_the_history(env: Env, make_url: Any) -> None:
    hostile = 'run-<b>&"x"'
    url = make_url([(hostile, "P1-fail", 0, "FAILED", None), ("run-b", "P1-ok", 0, "FAILED", None)])
    assert "Attempt history (drainer_attempts): none yet" in env.run_cli(
        "status", "--database-url", url, "--session-dir", str(env.sessions)).stdout
    for _ in range(2):
        proc = env.run_cli("run", *args(env, url, "--max-attempts-per-phase", "1"))
        assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = history(url)
    assert len(rows) == 3  # the failing phase once per session, the other once
    status = env.run_cli("status", "--database-url", url, "--session-dir", str(env.sessions))
    assert status.returncode == 0, status.stderr
    assert "Attempt history (drainer_attempts): 3 attempt(s) of 2 phase(s) in 2 session(s)" \
        in status.stdout
    import json

    out = env.run_cli("analyze", "--history", "--database-url", url, "--json",
                      "--html", str(env.tmp / "history.html"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["totals"]["attempts"] == 3 and report["totals"]["sessions"] == 2
    assert report["totals"]["outcomes"]["failed"] == 2 and report["totals"]["outcomes"]["ok"] == 1
    assert set(sessions(env)) == {s["session_id"] for s in report["sessions"]}
    assert [s["session_id"] for s in report["sessions"]] == list(
        dict.fromkeys(r.session_id for r in rows))  # oldest first
    assert report["by_run"][hostile]["trend"] == ["0/1", "0/1"]
    first = report["by_phase"][0]
    assert (first["run_id"], first["attempts"], first["trend"]) == (hostile, 2, [["failed", 2]])
    fingerprint = rows[0].fingerprint if rows[0].run_id == hostile else rows[1].fingerprint
    assert first["fingerprints_by_revision"] == {"unknown": {fingerprint: 2}}
    page = (env.tmp / "history.html").read_text()
    assert 'id="chart-history-sessions"' in page
    assert "run-&lt;b&gt;&amp;&quot;x&quot;" in page and hostile not in page
    text = env.run_cli("analyze", "--history", "--database-url", url, "--run-id", hostile)
    assert text.returncode == 0, text.stderr
    assert f"{hostile} / P1-fail: 2 attempt(s) in 2 session(s): failed x2" in text.stdout
    assert "run-b" not in text.stdout
    missing = env.run_cli("analyze", "--history", env=env.worker_env())
    assert missing.returncode == 2 and "--database-url" in missing.stderr


def test_a_dirty_workspace_in_any_encoding_has_a_revision(env: Env, make_url: Any) -> None:
    """A diff holds files in their own encoding: a modified Latin-1 file once crashed every
    run and plan (the history is on by default)."""
    from drainer.revision import workspace_revision

    repo = env.tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "latin1.txt").write_bytes(b"caf\xe9\n")
    git(repo, "add", "latin1.txt")
    git(repo, "commit", "-qm", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert workspace_revision(repo) == head
    (repo / "latin1.txt").write_bytes(b"th\xe9\n")
    (repo / "new \xe9.txt".encode().decode("utf-8", "surrogateescape")).write_bytes(b"\xff")
    dirty = workspace_revision(repo)
    assert dirty is not None and dirty.startswith(head + "+dirty.")
    assert workspace_revision(repo) == dirty  # the same edits, the same revision
    (repo / "latin1.txt").write_bytes(b"\xe0 la\n")
    assert workspace_revision(repo) not in (dirty, head)
    url = make_url([("run-a", "P1-ok", 0, "FAILED", None)])
    for command in ("plan", "run"):
        proc = env.run_cli(command, *args(env, url, "--workspace", str(repo),
                                          plain=command == "run"))
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_retried_settle_never_restores_a_phase_another_drainer_took(make_url: Any) -> None:
    """The settle's answer is lost after it committed, and it is tried again (Engine.retry)
    while another drainer has claimed the run and its worker set the phase EXECUTING: the
    retry finds its history row, and leaves that phase alone."""
    url = make_url([("run-a", "P1-fail", 0, "EXECUTING", None)])
    anyio.run(retried_settle, url)


async def retried_settle(url: str) -> None:
    from sqlalchemy import text as sql

    from drainer.backlog import Entry, Lease

    entry = Entry(attempt_id="a1", session_id="s1", host="h", run_id="run-a",
                  phase_id="P1-fail", attempt_number=1, duration_seconds=1.0,
                  outcome="failed", final_state="FAILED", fingerprint="f",
                  failure_category="other", telemetry_events=None, exit_status=1,
                  revision=None)
    async with open_backlog(parse_database_url(url)) as backlog:
        await backlog.prepare_for_writes()
        leases = backlog.leases

        def lease(session: str, attempt: str) -> Lease:
            return Lease(run_id="run-a", session_id=session, attempt_id=attempt,
                         phase_id="P1-fail", host="h", pid=1)

        assert (await leases.claim(lease("s1", "a1"), 60)).holder is None
        why = "drainer: worker exited with status 1; restored"
        first = await leases.finish("run-a", "P1-fail", "a1", restore=why, entry=entry)
        assert first.held and first.restored is not None
        assert (await leases.claim(lease("s2", "b1"), 60)).holder is None
        async with backlog.engine.write() as conn:
            await conn.execute(sql("UPDATE phases SET state = 'EXECUTING'"))
        again = await leases.finish("run-a", "P1-fail", "a1", restore=why, entry=entry)
        assert again.restored is None
        assert (await backlog.phases.read("run-a", "P1-fail"))[0] == "EXECUTING"
        assert len(await backlog.history.rows()) == 1


def test_an_attempt_settled_just_before_a_crash_is_journaled_as_the_history_says(
        env: Env, make_url: Any) -> None:
    """Killed after the settle committed, before the journal line: --resume journals the
    attempt as recorded (not as interrupted), and counts it, so the journal and the history
    agree and the phase gets no more attempts than the limit."""
    url = make_url([("run-b", "P1-fail", 0, "FAILED", None)])
    crashed = env.run_cli("run", *args(env, url, "--max-attempts-per-phase", "2"),
                          env=env.worker_env(DRAINER_CRASH_AT="after_exit:1"))
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert [r.outcome for r in history(url)] == ["failed"]
    resumed = env.run_cli("run", *args(env, url, "--resume", "latest",
                                       "--max-attempts-per-phase", "2"))
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert "attempt settled (failed) just before drainer stopped" in resumed.stdout
    (_session, records), = sessions(env).items()
    journal = {r["attempt_id"]: "interrupted" if r["interrupted"] else
               "ok" if r["success"] else "failed" for r in records}
    assert journal == {r.attempt_id: r.outcome for r in history(url)}
    assert list(journal.values()) == ["failed", "failed"]


def test_the_summary_counts_a_fingerprint_at_the_last_attempts_revision(make_url: Any) -> None:
    """--skip-unchanged's "seen twice" is at the same revision: once at A and once at B is
    once at B."""
    url = make_url([("run-a", "P1-fail", 0, "FAILED", None)])
    anyio.run(summary_by_revision, url)


async def summary_by_revision(url: str) -> None:
    from drainer.backlog import Entry

    def entry(n: int, revision: str) -> Entry:
        return Entry(attempt_id=f"a{n}", session_id=f"s{n}", host="h", run_id="run-a",
                     phase_id="P1-fail", attempt_number=1, duration_seconds=1.0,
                     outcome="failed", final_state="FAILED", fingerprint="same",
                     failure_category="other", telemetry_events=None, exit_status=1,
                     revision=revision)

    async with open_backlog(parse_database_url(url)) as backlog:
        await backlog.prepare_for_writes()
        history_ = backlog.history
        seen = []
        for n, revision in enumerate(["rev-a", "rev-b", "rev-b"]):
            row = entry(n, revision)
            await backlog.engine.run(
                functools.partial(history_.insert_with, entry=row), write=True)
            summary = await history_.summary(other_than="s0", revision=revision)
            phase = summary.phases[("run-a", "P1-fail")]
            seen.append((phase.last_revision, phase.last_fingerprint_seen, phase.attempts))
        assert seen == [("rev-a", 1, 0), ("rev-b", 1, 1), ("rev-b", 2, 2)]


def test_the_summary_prefers_recent_promising_runs_among_the_candidates(make_url: Any
                                                                        ) -> None:
    url = make_url([(run, "P1-fail", 0, "FAILED", None) for run in
                    ("run-ok", "run-timeout", "run-fail", "run-old-ok")]
                   + [("run-done", "P1-ok", 0, "COMPLETE", None)])
    anyio.run(preferred_runs, url)


async def preferred_runs(url: str) -> None:
    from drainer.backlog import Entry

    async with open_backlog(parse_database_url(url)) as backlog:
        await backlog.prepare_for_writes()
        history_ = backlog.history
        for n, (run, outcome) in enumerate([
                ("run-ok", "failed"), ("run-ok", "ok"), ("run-timeout", "timed out"),
                ("run-fail", "ok"), ("run-fail", "failed"), ("run-old-ok", "ok"),
                ("run-done", "ok")]):
            row = Entry(attempt_id=f"a{n}", session_id="s", host="h", run_id=run,
                        phase_id="P1-fail" if run != "run-done" else "P1-ok",
                        attempt_number=1, duration_seconds=1.0, outcome=outcome,
                        final_state=None, fingerprint=None, failure_category=None,
                        telemetry_events=None, exit_status=0, revision=None)
            await backlog.engine.run(functools.partial(history_.insert_with, entry=row),
                                     write=True)
        async with backlog.engine.write() as conn:  # eight days ago: not recent
            await conn.execute(sql_text(f"UPDATE {HISTORY_TABLE} SET finished_at = "
                                        "finished_at - 691200 WHERE run_id = 'run-old-ok'"))
        found = await history_.summary(candidate=backlog.phases.is_candidate, counts=True)
        assert found.preferred == {"run-ok", "run-timeout"}
        assert set(found.phases) == {(run, "P1-fail") for run in
                                     ("run-ok", "run-timeout", "run-fail", "run-old-ok")}
        everything = await history_.summary(counts=True)
        assert everything.preferred == {"run-ok", "run-timeout", "run-done"}
        assert ("run-done", "P1-ok") in everything.phases
        # Only what is asked for: runs; phases of other sessions; phases failed at a revision.
        runs_only = await history_.summary(candidate=backlog.phases.is_candidate)
        assert runs_only.phases == {} and runs_only.preferred == found.preferred
        assert (await history_.summary(counts=True, other_than="s")).phases == {}
        assert set((await history_.summary(revision="abc")).phases) == set()


def test_backoff_delays_a_timed_out_phase_while_others_drain(env: Env, make_url: Any) -> None:
    """--retry-backoff-seconds on both databases: the phase whose first attempt timed out is
    retried only after the backoff, and the other phases drain meanwhile."""
    from datetime import datetime

    url = make_url([(run, "P1-ok", 0, "FAILED", None) for run in ("run-a", "run-b", "run-c")])
    hang = env.tmp / "hang-once"
    hang.touch()
    # (A 3 s limit: a PostgreSQL worker's start-up and connection take about 0.2 s here,
    # and each of three attempts must finish inside the limit on a loaded machine.)
    proc = env.run_cli("run", *args(env, url, "--max-attempts-per-phase", "2", backoff="2",
                                    timeout="3"), env=env.worker_env(HANG_ONCE=str(hang)))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # (an attempt timed out)
    (records,) = sessions(env).values()
    order = [(r["run_id"], r["timed_out"]) for r in records]
    assert order == [("run-a", True), ("run-b", False), ("run-c", False), ("run-a", False)]

    def at(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    waited = at(records[3]["started_at"]) - at(records[0]["finished_at"])
    assert waited.total_seconds() >= 2.0
    assert [r.outcome for r in sorted(history(url), key=lambda r: r.finished_at)] == [
        "timed out", "ok", "ok", "ok"]
