"""drainer against Autopack-shaped workers, API server and session tools (issue 10)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from autopack_stubs import (
    AUTOPACK_API_SERVER,
    AUTOPACK_WORKER,
    autopack_analyze,
    autopack_command,
    autopack_load,
    kinds,
)
from conftest import Env, create_backlog, file_digest, only_session, phase_states
from drainer.selection import CATEGORY_NAMES, failure_category


@pytest.fixture
def autopack(env: Env) -> Path:
    worker = env.tmp / "drain_one_phase.py"
    worker.write_text(AUTOPACK_WORKER)
    return worker


def _args(env: Env, worker: Path, *extra: str) -> list[str]:
    """One attempt per phase, so that each test reads exactly the attempts it made."""
    return ["run", *env.base_args(autopack_command(worker)), "--max-attempts-per-phase", "1",
            *extra]


def _records(session_root: Path) -> list[dict[str, object]]:
    lines = (session_root / "journal.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x)["type"] == "attempt_finished"]


# -- 1. the API server gets DATABASE_URL and --env; its log is in the session ---------------


def test_api_command_server_gets_database_url_and_env_and_logs_into_the_session(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    server = env.tmp / "api.py"
    server.write_text(AUTOPACK_API_SERVER)
    seen = env.tmp / "api-seen.json"
    proc = env.run_cli(*_args(env, autopack, "--api-command", f"{{python}} {server} {{port}}",
                              "--env", "EXTRA=from-drainer"),
                       env=env.worker_env(API_SEEN=str(seen)))  # no DATABASE_URL exported
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    got = json.loads(seen.read_text())
    assert got == {"DATABASE_URL": f"sqlite:///{env.db}", "EXTRA": "from-drainer"}
    _, root = only_session(env.sessions)
    log = root / "api-server.log"
    assert "Uvicorn running" in log.read_text()
    assert f"(log: {log})" in proc.stdout


def test_api_command_that_cannot_start_says_why_in_one_line_and_changes_nothing(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    before = file_digest(env.db)
    server = env.tmp / "api.py"
    server.write_text(AUTOPACK_API_SERVER)
    proc = env.run_cli(*_args(env, autopack, "--api-command", f"{{python}} {server} {{port}}"),
                       env=env.worker_env(API_SEEN=str(env.tmp / "x"), API_FAIL="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "address already in use" in proc.stderr
    assert not env.sessions.exists() and file_digest(env.db) == before


# -- 2. restoring keeps the worker's reason -------------------------------------------------


def test_restore_keeps_the_workers_reason_and_adds_drainers_note_once(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", "ImportError: no module named x"),
                            ("run-b", "P1", 0, "FAILED", "Deliverable missing: src/a.py")])
    # run-a: the worker writes INFRA_RETRY and leaves QUEUED; run-b's crash keeps the old one.
    proc = env.run_cli(*_args(env, autopack, "--run-id", "run-a"),
                       env=env.worker_env(**kinds(P1="infra_retry")))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    env_b = env.worker_env(**kinds(P1="raise:RuntimeError:Cannot proceed without API server"))
    for _ in range(2):  # restored twice: the note is replaced, not added again
        proc = env.run_cli(*_args(env, autopack, "--run-id", "run-b"), env=env_b)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    states = phase_states(env.db)
    note = "drainer: worker exited with status 1; phase was left QUEUED, restored to FAILED"
    assert states[("run-a", "P1")] == ("FAILED", f"INFRA_RETRY | {note}")
    assert states[("run-b", "P1")] == ("FAILED", f"Deliverable missing: src/a.py | {note}")
    # The priority categories read the worker's part.
    assert CATEGORY_NAMES[failure_category(states[("run-b", "P1")][1])] == "deliverable/missing"
    # The attempt record keeps both.
    # (by run: sessions started in the same second sort by their random suffix, not by time)
    records = [r for s in env.sessions.glob("*/") for r in _records(s)]
    (run_a,) = [r for r in records if r["run_id"] == "run-a"]
    assert run_a["error_message"].startswith(f"{note} | INFRA_RETRY")
    run_b = [r for r in records if r["run_id"] == "run-b"]
    assert len(run_b) == 2
    assert all("Deliverable missing: src/a.py" in r["error_message"] and note in r["error_message"]
               for r in run_b)


# -- 3 and 7. fingerprints and messages from the worker's real error ------------------------

CRASHES = {
    "P1": "raise:ValueError:OPENAI_API_KEY is not a valid key",
    "P2": "raise:AttributeError:'NoneType' object has no attribute 'builder'",
    "P3": "raise:RuntimeError:Cannot proceed without API server",
    "P4": "raise:KeyError:phase_spec",
    "P5": "raise:TypeError:unsupported operand",
}


def test_unrelated_crashes_get_their_own_fingerprints_and_stop_no_run(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [(f"run-{p}", p, 0, "FAILED", None) for p in CRASHES])
    proc = env.run_cli(*_args(env, autopack, "--max-fingerprint-repeats", "2"),
                       env=env.worker_env(**kinds(**CRASHES)))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    snapshot, root = only_session(env.sessions)
    records = _records(root)
    assert len(records) == 5
    fingerprints = {r["failure_fingerprint"] for r in records}
    assert len(fingerprints) == 5
    for r in records:
        name = CRASHES[str(r["phase_id"])].split(":", 2)[1]
        assert r["worker_error"] is not None and str(r["worker_error"]).startswith(name)
        assert name.lower() in str(r["failure_fingerprint"])
        assert str(r["worker_error"]) in str(r["error_message"])
        assert f"(log: {r['subprocess_stderr_path']})" in str(r["error_message"])
    assert json.loads(snapshot.read_text())["stopped_runs"] == []


def test_generic_failed_reason_gets_the_workers_error_line_whole_and_the_log_path(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    proc = env.run_cli(*_args(env, autopack), env=env.worker_env(**kinds(P1="generic")))
    assert proc.returncode == 1
    _, root = only_session(env.sessions)
    [record] = _records(root)
    line = "ValueError: bad config key 'builder.model' in autopack.yaml"
    assert str(record["error_message"]).startswith(f"FAILED | {line} | (log: ")
    assert record["worker_error"] == line
    # The bare code alone would give every such failure one fingerprint.
    assert str(record["failure_fingerprint"]).startswith(
        "FAILED|rc1|failed: valueerror: bad config key")
    assert f"  [ERROR] {line}" in proc.stdout.splitlines()  # the console shows it whole


# -- 4. reached_llm_boundary as Autopack means it -------------------------------------------


def test_llm_boundary_means_a_limit_was_hit_not_that_an_llm_was_named(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None),
                            ("run-b", "P2", 0, "FAILED", None)])
    proc = env.run_cli(*_args(env, autopack), env=env.worker_env(**kinds(
        P1="raise:openai.AuthenticationError:invalid api key for openai", P2="boundary")))
    assert proc.returncode == 1
    _, root = only_session(env.sessions)
    by_phase = {r["phase_id"]: r for r in _records(root)}
    assert by_phase["P1"]["reached_llm_boundary"] is False
    assert by_phase["P1"]["zero_yield_reason"] == "execution_error"
    assert by_phase["P1"]["llm_call_seen"] is True
    assert by_phase["P2"]["reached_llm_boundary"] is True
    assert by_phase["P2"]["zero_yield_reason"] == "llm_boundary_hit"


# -- 5 and 6. Autopack's tools read drainer's session files ---------------------------------


@pytest.mark.slow
def test_autopack_loader_and_analyzer_read_the_session_timeouts_included(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None),
                            ("run-a", "P2", 1, "FAILED", None),
                            ("run-b", "P3", 0, "FAILED", None)])
    proc = env.run_cli(*_args(env, autopack, "--phase-timeout-seconds", "1"),
                       env=env.worker_env(**kinds(P1="hang", P2="ok", P3="generic")))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    snapshot, root = only_session(env.sessions)
    loaded = autopack_load(snapshot)  # Autopack's cls(**data): no unknown key anywhere
    assert loaded.total_processed == len(loaded.results) == 3
    timeout = next(r for r in loaded.results if r.phase_id == "P1")
    assert (timeout.final_state, timeout.subprocess_returncode) == ("TIMEOUT", -1)
    figures = autopack_analyze(snapshot)
    assert figures["runs"]["run-a"] == {"success": 1, "attempts": 2, "timeouts": 1}
    assert figures["timeouts"] == 1
    # drainer's journal keeps what really happened; its extras live beside the journal.
    journaled = next(r for r in _records(root) if r["phase_id"] == "P1")
    assert journaled["timed_out"] is True and journaled["final_state"] == "FAILED"
    info = json.loads((root / "session.json").read_text())
    assert info["lanes"] == 1 and info["stop_reason"] == "no_candidates"


@pytest.mark.slow
def test_after_kill_9_and_resume_autopack_sees_exact_progress(
    env: Env, autopack: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None),
                            ("run-b", "P2", 0, "FAILED", None),
                            ("run-c", "P3", 0, "FAILED", None)])
    args = _args(env, autopack, "--batch-size", "2")[1:]
    drainer = subprocess.Popen([sys.executable, "-m", "drainer", "run", *args], text=True,
                               stdout=subprocess.DEVNULL, cwd=env.tmp,
                               env=env.worker_env(**kinds(P1="hang")))
    from conftest import wait_for_worker_file

    wait_for_worker_file(env.out, "started.P1", drainer)
    drainer.kill()
    drainer.wait(timeout=30)
    proc = env.run_cli("run", *args, "--resume", env=env.worker_env(**kinds(P1="ok")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    snapshot, root = only_session(env.sessions)
    loaded = autopack_load(snapshot)
    figures = autopack_analyze(snapshot)
    assert figures["progress"] == f"{len(loaded.results)}/2"
    assert len(loaded.results) == 2 and loaded.total_success == 2
    assert loaded.completed_at is not None
    assert sum(bool(r.get("interrupted")) for r in _records(root)) == 1  # the journal keeps it


# -- 8. --api-url with a trailing slash -----------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_api_url_with_a_trailing_slash_reaches_autopack_workers_as_host_and_port(
    env: Env, autopack: Path, http_server: int
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    proc = env.run_cli(*_args(env, autopack, "--api-url", f"http://127.0.0.1:{http_server}/"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    _, root = only_session(env.sessions)
    [log] = root.glob("logs/*.stdout.txt")
    assert f"API port {http_server}" in log.read_text()


def test_api_url_with_a_path_is_refused(env: Env, autopack: Path) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    proc = env.run_cli(*_args(env, autopack, "--api-url", "http://127.0.0.1:8000/api"))
    assert proc.returncode == 2 and "has a path" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- 9. a missing worker script -------------------------------------------------------------


def test_missing_default_worker_script_is_exit_2_before_anything_runs(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    before = file_digest(env.db)
    proc = env.run_cli("run", "--database-url", env.url, "--session-dir", str(env.sessions))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "scripts/drain_one_phase.py" in proc.stderr and "not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not env.sessions.exists() and file_digest(env.db) == before


# -- 11. the Autopack preset ----------------------------------------------------------------


def test_an_autopack_checkout_gets_autopacks_session_directory_by_default(env: Env) -> None:
    (env.tmp / "scripts").mkdir()
    (env.tmp / "scripts" / "drain_one_phase.py").write_text(AUTOPACK_WORKER)
    (env.tmp / ".autonomous_runs").mkdir()
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    sessions = env.tmp / ".autonomous_runs" / "batch_drain_sessions"
    plan = env.run_cli("plan", "--database-url", env.url)
    assert plan.returncode == 0, plan.stderr
    assert f"  sessions: {sessions} (Autopack's session directory: the workspace is an " \
        "Autopack checkout)" in plan.stdout
    proc = env.run_cli("run", "--database-url", env.url)  # the default worker command
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    snapshot, _ = only_session(sessions)
    assert autopack_load(snapshot).total_success == 1
    report = env.run_cli("analyze", "--latest")
    assert report.returncode == 0 and snapshot.stem in report.stdout


# -- 10. one git worktree per lane ----------------------------------------------------------

LANE_WORKER = """\
import json, os, sqlite3, sys, time
run_id, phase_id = sys.argv[1], sys.argv[2]
start = time.time()
with open(f"touched-by-{run_id}-{phase_id}.txt", "w") as fh:  # a change in its workspace
    fh.write("x")
time.sleep(0.2)
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30)
db.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=? AND phase_id=?", (run_id, phase_id))
db.commit()
with open(os.environ["SPANS"], "a") as fh:
    fh.write(json.dumps({"cwd": os.getcwd(), "arg": sys.argv[3], "start": start,
                         "end": time.time()}) + "\\n")
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(env: Env) -> Path:
    repo = env.tmp / "checkout"
    repo.mkdir()
    (repo / "lane_worker.py").write_text(LANE_WORKER)
    _git(repo, "init", "-q")
    _git(repo, "add", "lane_worker.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "w")
    return repo


@pytest.mark.slow
def test_three_lanes_each_work_in_their_own_git_worktree_gone_at_the_end(
    env: Env, repo: Path
) -> None:
    create_backlog(env.db, [(f"run-{r}", f"P{p}", p, "FAILED", None)
                            for r in range(6) for p in range(2)])
    spans = env.tmp / "spans.jsonl"
    args = env.base_args("{python} lane_worker.py {run_id} {phase_id} {workspace}")
    proc = env.run_cli("run", *args, "--workspace", str(repo), "--lanes", "3", "--batch-size", "20",
                       "--lane-workspaces", "git-worktree", env=env.worker_env(SPANS=str(spans)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    _, root = only_session(env.sessions)
    lanes = {str(root / "worktrees" / f"lane-{n}") for n in (1, 2, 3)}
    rows = [json.loads(line) for line in spans.read_text().splitlines()]
    assert len(rows) == 12
    assert {r["cwd"] for r in rows} == lanes  # every lane worked, each in its own worktree
    assert all(r["arg"] == r["cwd"] for r in rows)  # {workspace} is the lane's
    for a in rows:
        for b in rows:
            if a is not b and a["cwd"] == b["cwd"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], "a worktree shared"
    # Gone at the end, from the disk and from git's list; the checkout itself is untouched.
    assert not (root / "worktrees").exists()
    assert _git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert _git(repo, "status", "--porcelain") == ""
    assert "[WORKTREE] 3 lane worktree(s)" in proc.stdout
    # What the workers left uncommitted is stashed, one entry per lane; no branch is left.
    stashes = _git(repo, "stash", "list").splitlines()
    assert len(stashes) == 3 and all(root.name in line for line in stashes)
    assert _git(repo, "branch", "--list", "drainer/*") == ""
    assert proc.stdout.count("[WORKTREE] kept lane-") == 3


def test_lanes_sharing_a_git_workspace_get_a_warning_naming_the_option(
    env: Env, repo: Path
) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    args = env.base_args("{python} lane_worker.py {run_id} {phase_id} {workspace}")
    proc = env.run_cli("run", *args, "--workspace", str(repo), "--lanes", "2",
                       env=env.worker_env(SPANS=str(env.tmp / "spans.jsonl")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "[WARN] 2 lanes share one git workspace" in proc.stdout
    assert "--lane-workspaces git-worktree" in proc.stdout


def test_lane_worktrees_need_a_git_workspace(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), "--lanes", "2",
                       "--lane-workspaces", "git-worktree")
    assert proc.returncode == 2 and "is not in a git working tree" in proc.stderr
    assert not env.sessions.exists()


@pytest.mark.slow
def test_lane_worktrees_left_by_a_kill_9_are_made_anew_by_resume_and_removed(
    env: Env, repo: Path
) -> None:
    (repo / "hang_once.py").write_text(
        "import os, sys, time\n"
        "flag = os.path.join(os.environ['TEST_OUT'], 'started')\n"
        "if not os.path.exists(flag):\n"
        "    open(flag, 'w').close()\n"
        "    time.sleep(600)\n"
        "exec(open('lane_worker.py').read())\n")
    _git(repo, "add", "hang_once.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "h")
    create_backlog(env.db, [(f"run-{r}", "P", 0, "FAILED", None) for r in range(3)])
    args = [*env.base_args("{python} hang_once.py {run_id} {phase_id} {workspace}"),
            "--workspace", str(repo), "--lanes", "2", "--lane-workspaces", "git-worktree"]
    worker_env = env.worker_env(SPANS=str(env.tmp / "spans.jsonl"))
    drainer = subprocess.Popen([sys.executable, "-m", "drainer", "run", *args], text=True,
                               stdout=subprocess.DEVNULL, cwd=env.tmp, env=worker_env)
    from conftest import wait_for_worker_file

    wait_for_worker_file(env.out, "started", drainer)
    drainer.kill()
    drainer.wait(timeout=30)
    [root] = [j.parent for j in env.sessions.glob("*/journal.jsonl")]
    assert (root / "worktrees" / "lane-1").is_dir()  # the crash left them
    proc = env.run_cli("run", *args, "--resume", env=worker_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert {s for s, _ in phase_states(env.db).values()} == {"COMPLETE"}
    assert not (root / "worktrees").exists()
    assert _git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_an_api_server_that_cannot_start_raises_usage_error_to_an_embedder(
    env: Env, autopack: Path
) -> None:
    """Review finding: the pump's task group wrapped it in an ExceptionGroup."""
    import anyio

    import drainer
    from drainer.errors import UsageError

    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    server = env.tmp / "api.py"
    server.write_text(AUTOPACK_API_SERVER)
    config = drainer.DrainConfig(
        database_url=env.url, command=autopack_command(autopack),
        session_dir=env.sessions, workspace=env.tmp,
        api_command=f"{sys.executable} {server} {{port}}", env=(("API_FAIL", "1"),
                                                                 ("API_SEEN", "x")))
    with pytest.raises(UsageError, match="address already in use"):
        anyio.run(drainer.drain, config)


SUBDIR_WORKER = """\
import os, sqlite3, subprocess, sys
run_id, phase_id = sys.argv[1], sys.argv[2]
if run_id == "run-0":  # a worker that commits its change: the commit must outlive the lane
    with open("made-by-run-0.txt", "w") as fh:
        fh.write("x")
    subprocess.run(["git", "add", "made-by-run-0.txt"], check=True)
    subprocess.run(["git", "-c", "user.name=w", "-c", "user.email=w@example.com", "commit",
                    "-qm", "run-0's work"], check=True)
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30)
db.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=? AND phase_id=?", (run_id, phase_id))
db.commit()
"""


def test_lane_worktrees_of_a_repository_subdirectory_with_relative_paths(
    env: Env, repo: Path
) -> None:
    """Review findings: a relative --session-dir put the worktrees where git ran; a
    --workspace below the repository's root ran workers at the worktree's root."""
    (repo / "sub").mkdir()
    (repo / "sub" / "w.py").write_text(SUBDIR_WORKER)
    _git(repo, "add", "sub")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "sub")
    create_backlog(env.db, [(f"run-{r}", "P", 0, "FAILED", None) for r in range(4)])
    args = ["--database-url", env.url, "--command", "{python} w.py {run_id} {phase_id}",
            "--session-dir", "sessions", "--workspace", "checkout/sub", "--lanes", "2",
            "--lane-workspaces", "git-worktree"]
    proc = env.run_cli("run", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert {s for s, _ in phase_states(env.db).values()} == {"COMPLETE"}
    assert _git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    [branch] = _git(repo, "branch", "--list", "drainer/*").split()
    assert "run-0's work" in _git(repo, "log", "-1", "--format=%s", branch)
    assert "[WORKTREE] kept lane-" in proc.stdout and branch in proc.stdout


def test_lane_worktrees_need_the_worker_script_committed(env: Env, repo: Path) -> None:
    (repo / "untracked.py").write_text("print('hi')\n")
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None)])
    proc = env.run_cli("run", "--database-url", env.url, "--command", "{python} untracked.py",
                       "--session-dir", str(env.sessions), "--workspace", str(repo),
                       "--lanes", "2", "--lane-workspaces", "git-worktree")
    assert proc.returncode == 2 and "is not committed" in proc.stderr, proc.stderr
