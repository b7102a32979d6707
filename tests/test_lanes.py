"""Parallel lanes: never two attempts of one run at once, across lanes and across drainers."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import (
    Env,
    create_backlog,
    journal_results,
    only_session,
    phase_states,
    session_info,
    wait_for_worker_file,
)


def _results(snapshot: Path) -> list[dict[str, Any]]:
    """The session's attempt records with drainer's fields (from its journal)."""
    return journal_results(snapshot.parent / snapshot.stem)


def _span(r: dict[str, Any]) -> tuple[float, float]:
    return (datetime.fromisoformat(r["started_at"]).timestamp(),
            datetime.fromisoformat(r["finished_at"]).timestamp())


def _assert_runs_never_overlap(results: list[dict[str, Any]]) -> None:
    by_run: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        by_run.setdefault(r["run_id"], []).append(_span(r))
    for run, spans in by_run.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two attempts of {run} overlap"


def test_four_lanes_run_four_runs_at_once_each_in_priority_order(env: Env) -> None:
    # The speed-up itself is a figure of benchmarks/lanes.py; here: four attempts are in
    # flight at once (each worker waits for the test's release once it has started), never
    # two of one run, and each run drains in phase order.
    phases = [(f"run-{r}", f"r{r}-P{p}", p, "FAILED", None) for r in range(8) for p in range(3)]
    create_backlog(env.db, phases)
    args = env.base_args()
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *args, "--lanes", "4", "--batch-size", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND="gated"),
    )
    try:
        while len(list(env.out.glob("started.*"))) < 4:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert len(list(env.out.glob("started.*"))) == 4  # four lanes, four runs, all waiting
    finally:
        (env.out / "release").write_text("")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err
    snapshot, _ = only_session(env.sessions)
    results = _results(snapshot)
    assert len(results) == 24 and all(r["success"] for r in results)
    assert {r["lane"] for r in results} == {1, 2, 3, 4}
    _assert_runs_never_overlap(results)
    for run in {r["run_id"] for r in results}:
        order = [r["phase_index"] for r in sorted(results, key=lambda r: r["started_at"])
                 if r["run_id"] == run]
        assert order == [0, 1, 2], (run, order)


@pytest.mark.slow
def test_two_drainers_on_one_sqlite_backlog_drain_disjoint_sets(env: Env, tmp_path: Path) -> None:
    phases = [(f"run-{r}", f"P{p}", p, "FAILED", None) for r in range(12) for p in range(3)]
    create_backlog(env.db, phases)
    spans = tmp_path / "spans.jsonl"
    procs = []
    for name in ("a", "b"):
        args = env.base_args()
        args[args.index("--session-dir") + 1] = str(tmp_path / name)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "drainer", "run", *args, "--lanes", "3", "--batch-size", "500",
             "--lease-ttl-seconds", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
            env=env.worker_env(WORKER_SLEEP="0.1", WORKER_SPAN_LOG=str(spans)),
        ))
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-2000:] + err
    a = _results(only_session(tmp_path / "a")[0])
    b = _results(only_session(tmp_path / "b")[0])
    keys_a = {(r["run_id"], r["phase_id"]) for r in a}
    keys_b = {(r["run_id"], r["phase_id"]) for r in b}
    assert keys_a.isdisjoint(keys_b)
    assert keys_a | keys_b == {(r, p) for r, p, *_ in phases}
    assert len(a) + len(b) == len(phases)  # nothing drained twice
    assert a and b  # both did work
    _assert_runs_never_overlap(a + b)
    assert all(state == "COMPLETE" for state, _ in phase_states(env.db).values())


@pytest.mark.slow
def test_eight_lanes_of_writers_never_lock_drainer_out_of_sqlite(env: Env, tmp_path: Path) -> None:
    phases = [(f"run-{r}", f"P{p}", p, "FAILED", None) for r in range(24) for p in range(2)]
    create_backlog(env.db, phases)
    args = [*env.base_args(), "--lanes", "8", "--batch-size", "1000"]
    proc = env.run_cli("run", *args, env=env.worker_env(WORKER_EVENTS="40"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "locked" not in proc.stdout + proc.stderr
    results = _results(only_session(env.sessions)[0])
    assert len(results) == 48
    assert [r["telemetry_events_collected"] for r in results] == [40] * 48  # exact per phase


def test_a_leaked_uvicorn_is_found_killed_and_reported(env: Env) -> None:
    create_backlog(env.db, [("run-l", "P", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), env=env.worker_env(WORKER_KIND="leak"))
    assert proc.returncode == 0, proc.stderr
    (leak_file,) = env.out.glob("leak.*")
    pid = int(leak_file.read_text())
    (result,) = _results(only_session(env.sessions)[0])
    assert [p["pid"] for p in result["leaked_processes"]] == [pid]
    assert "uvicorn" in result["leaked_processes"][0]["cmdline"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert f"[LEAK] pid {pid}" in proc.stdout
    assert "leaked processes: 1" in proc.stdout


def test_unmarked_leak_is_found_by_ancestry_and_max_leaks_stops_the_session(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(4)])
    try:
        proc = env.run_cli("run", *env.base_args(), "--max-leaks", "1",
                           env=env.worker_env(WORKER_KIND="leak_unmarked"))
        snapshot, root = only_session(env.sessions)
        snap = {**json.loads(snapshot.read_text()), **session_info(root),
                "results": journal_results(root)}
        # Each attempt leaves one uvicorn in its own session without drainer's marker: it is
        # re-parented to drainer (the subreaper) and listed under its attempt, and the 2nd
        # exceeds --max-leaks 1.
        assert snap["stop_reason"] == "max_leaks", proc.stdout
        assert snap["total_processed"] == 2
        listed = [p["pid"] for r in snap["results"] for p in r["leaked_processes"]]
        assert sorted(listed) == sorted(int(f.read_text()) for f in env.out.glob("leak.*"))
        assert snap["leak_gauge"]["processes"] == []  # tied to its attempt, not gauged
        for pid in listed:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    finally:
        for f in env.out.glob("leak.*"):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(f.read_text())).kill()


API_SERVER = """
import http.server, os, sys
with open(os.environ["API_PIDS"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
                                http.server.SimpleHTTPRequestHandler).serve_forever()
"""
API_WORKER = """
import json, os, sqlite3, sys, urllib.request
url = os.environ["AUTOPACK_API_URL"]
status = urllib.request.urlopen(url, timeout=10).status
with open(os.environ["API_SEEN"], "a") as fh:
    fh.write(json.dumps({"url": url, "status": status}) + "\\n")
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30)
db.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=? AND phase_id=?", tuple(sys.argv[1:3]))
db.commit()
"""


def test_api_command_starts_exactly_one_server_for_a_multi_lane_session(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(6)])
    server = env.tmp / "api_server.py"
    server.write_text(API_SERVER)
    worker = env.tmp / "api_worker.py"
    worker.write_text(API_WORKER)
    pids, seen = env.tmp / "api-pids", env.tmp / "api-seen"
    args = env.base_args(f"{sys.executable} {worker} {{run_id}} {{phase_id}}")
    proc = env.run_cli(
        "run", *args, "--lanes", "3", "--api-command", f"{sys.executable} {server} {{port}}",
        env=env.worker_env(API_PIDS=str(pids), API_SEEN=str(seen)),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    started = pids.read_text().split()
    assert len(started) == 1  # one server for the whole session
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 6 and {c["status"] for c in calls} == {200}
    assert len({c["url"] for c in calls}) == 1
    assert not psutil.pid_exists(int(started[0])) or \
        psutil.Process(int(started[0])).status() == "zombie"
    assert "[API] started one server for all workers at http://127.0.0.1:" in proc.stdout


def test_api_url_that_does_not_answer_is_exit_2(env: Env) -> None:
    from drainer.apiserver import free_port

    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), "--api-url", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2
    assert "does not answer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not env.sessions.exists()


def test_status_lists_the_live_lease_of_a_running_drainer(env: Env) -> None:
    create_backlog(env.db, [("run-live", "P", 0, "FAILED", None)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND="gated"),
    )
    try:
        wait_for_worker_file(env.out, "started.P", proc)
        status = env.run_cli("status", "--database-url", env.url,
                             "--session-dir", str(env.sessions))
        assert status.returncode == 0, status.stderr
        assert "Live leases (runs being drained now): 1" in status.stdout
        assert f"run-live / P: host {__import__('socket').gethostname()} pid {proc.pid}" \
            in status.stdout
    finally:
        (env.out / "release").write_text("")
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_every_result_line_of_a_three_lane_plain_run_names_its_attempt(env: Env) -> None:
    import re

    phases = [(f"run-{r}", f"P{r}", 0, "FAILED", None) for r in range(9)]
    create_backlog(env.db, phases)
    kinds = ",".join(f"P{r}={'fail' if r % 3 == 0 else 'ok'}" for r in range(9))
    proc = env.run_cli("run", *env.base_args(), "--lanes", "3", "--plain",
                       "--max-attempts-per-phase", "1",
                       env=env.worker_env(WORKER_KIND_BY_PHASE=kinds, WORKER_SLEEP="0.1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    result = re.compile(r"  \[(OK|FAIL)\] (\S+) / (\S+) \[lane (\d)\] ")
    seen = {(m[2], m[3]): (m[1] == "OK", int(m[4]))
            for m in map(result.match, proc.stdout.splitlines()) if m}
    records = journal_results(only_session(env.sessions)[1])
    assert len(records) == 9
    assert seen == {(r["run_id"], r["phase_id"]): (r["success"], r["lane"]) for r in records}
    assert len({lane for _, lane in seen.values()}) == 3


def test_the_leak_gauge_counts_only_this_sessions_processes_and_names_their_attempt(
    tmp_path: Path,
) -> None:
    import os
    import re
    import signal

    from drainer.proctree import find_matching

    base = {k: v for k, v in os.environ.items() if not k.startswith("DRAINER_")}

    def orphan(label: str, **env: str) -> int:
        """A uvicorn-named sleeper whose parent has exited: nobody's descendant here."""
        launcher = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
                    "'import time; time.sleep(60)', 'uvicorn', sys.argv[1]], "
                    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
        out = subprocess.run([sys.executable, "-c", launcher, label], env={**base, **env},
                             capture_output=True, text=True, check=True).stdout
        return int(out)

    pids = [orphan("ours", DRAINER_SESSION_ID="s-1", DRAINER_RUN_ID="run-7",
                   DRAINER_PHASE_ID="P2"),
            orphan("other", DRAINER_SESSION_ID="s-2"), orphan("by-hand")]
    try:
        found = find_matching(re.compile("uvicorn"), set(), session_id="s-1")
        # Only the session's id ties one of them to the session (none descends from us).
        assert [(p.pid, label) for p, _, label in found] == [(pids[0], "run-7 / P2")]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_uvicorn_started_by_hand_during_a_session_is_no_leak(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    drainer = subprocess.Popen(
        [sys.executable, "-m", "drainer", "run", *env.base_args(), "--max-leaks", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp,
        env=env.worker_env(WORKER_KIND="gated"))
    by_hand = None
    try:
        wait_for_worker_file(env.out, "started.*", drainer)
        base = {k: v for k, v in env.worker_env().items() if not k.startswith("DRAINER_")}
        by_hand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                    "uvicorn", "by-hand"], env=base, start_new_session=True)
        (env.out / "release").write_text("")
        out, err = drainer.communicate(timeout=120)
    finally:
        if by_hand is not None:
            by_hand.kill()
            by_hand.wait()
    assert drainer.returncode == 0, out[-2000:] + err
    assert "Stop reason: no_candidates" in out and f"pid {by_hand.pid}" not in out
