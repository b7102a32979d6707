"""Each example runs as written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_embed_basic_example_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_basic.py"), str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: some demo phases fail by design
    assert "/5 ok, stop reason batch_size_reached, " in proc.stdout
    snapshot = Path(proc.stdout.strip().splitlines()[-1].removeprefix("snapshot: "))
    assert json.loads(snapshot.read_text())["total_processed"] == 5


def test_custom_schema_example_drains_a_backlog_with_other_names(tmp_path: Path) -> None:
    import shutil
    import sqlite3

    work = tmp_path / "custom"
    shutil.copytree(EXAMPLES / "custom_schema", work)
    subprocess.run([sys.executable, "make_backlog.py", "backlog.db"], cwd=work, check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "drainer", "run", "--database-url", "sqlite:///backlog.db"],
        capture_output=True, text=True, timeout=120, cwd=work,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    conn = sqlite3.connect(work / "backlog.db")
    assert conn.execute("SELECT DISTINCT status FROM work_items").fetchall() == [("done",)]
    conn.close()
    (snapshot,) = (work / ".drainer" / "sessions").glob("batch-drain-*.json")
    results = json.loads(snapshot.read_text())["results"]
    assert len(results) == 6 and all(r["success"] for r in results)
    assert all(r["final_state"] == "COMPLETE" for r in results)  # canonical names
    assert [r["telemetry_events_collected"] for r in results] == [2] * 6
    plan = subprocess.run([sys.executable, "-m", "drainer", "plan", "--database-url",
                           "sqlite:///backlog.db"], capture_output=True, text=True, cwd=work)
    assert plan.returncode == 0 and "(nothing: no candidate phases)" in plan.stdout
    # The history reads the same table names (the config file's [schema]).
    history = subprocess.run([sys.executable, "-m", "drainer", "analyze", "--history",
                              "--database-url", "sqlite:///backlog.db"],
                             capture_output=True, text=True, cwd=work)
    assert history.returncode == 0, history.stderr
    assert "attempts: 6 (ok 6) of 6 phase(s)" in history.stdout


def test_autopack_example_config_drives_a_run(tmp_path: Path) -> None:
    import shutil

    from conftest import CONTRACT_WORKER, create_backlog

    shutil.copy(EXAMPLES / "autopack" / "drainer.toml", tmp_path / "drainer.toml")
    (tmp_path / "scripts").mkdir()
    # A stand-in for Autopack's worker: takes its flags, honours the contract.
    shim = tmp_path / "scripts" / "drain_one_phase.py"
    shim.write_text(
        "import sys\n"
        "args = sys.argv[1:]\n"
        "sys.argv = [sys.argv[0], args[args.index('--run-id') + 1], "
        "args[args.index('--phase-id') + 1]]\n"
        f"exec(compile({CONTRACT_WORKER!r}, 'worker', 'exec'))\n"
    )
    # A git checkout: the example gives each lane its own worktree of it.
    for git in (["init", "-q"], ["add", "scripts"],
                ["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "w"]):
        subprocess.run(["git", "-C", str(tmp_path), *git], check=True, capture_output=True)
    (tmp_path / "out").mkdir()
    create_backlog(tmp_path / "autopack.db", [(f"run-{i}", "P", 0, "FAILED", None)
                                              for i in range(5)])
    import os

    env = {**os.environ, "DATABASE_URL": "sqlite:///autopack.db", "TEST_OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "drainer", "run", "--plain"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "lanes:      4" in proc.stdout and "[WORKTREE] 4 lane worktree(s)" in proc.stdout
    sessions = tmp_path / ".autonomous_runs" / "batch_drain_sessions"
    (snapshot,) = sessions.glob("batch-drain-*.json")
    assert json.loads(snapshot.read_text())["total_success"] == 5


def test_embed_in_executor_example_runs_next_to_other_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_in_executor.py"), str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("drainer stopped: cancelled (stop requested: executor has enough for now)"
            in proc.stdout)
    beats = int(proc.stdout.split("heartbeats while draining: ")[1].split(";")[0])
    assert beats > 3


def test_two_drainers_postgres_example(tmp_path: Path) -> None:

    from pg import ADMIN_URL, require_server

    require_server()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "two_drainers_postgres.py"), ADMIN_URL],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = [int(line.split(": ")[1].split()[0]) for line in proc.stdout.splitlines()
              if line.startswith("drainer ")]
    assert len(counts) == 2 and sum(counts) == 36  # every phase once, split between them
