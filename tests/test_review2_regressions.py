"""Regression tests for the second review round: each failed before its fix."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from conftest import Env, create_backlog, only_session
from drainer import DrainConfig, UsageError, open_drainer
from drainer.live import LiveState, render
from test_progress import _started


def test_integer_id_columns_are_rejected_before_anything_is_written(env: Env) -> None:
    conn = sqlite3.connect(env.db)
    conn.execute("CREATE TABLE phases (run_id INTEGER, phase_id INTEGER, phase_index INTEGER, "
                 "state TEXT, last_failure_reason TEXT)")
    conn.execute("INSERT INTO phases VALUES (1, 1, 0, 'FAILED', NULL)")
    conn.commit()
    conn.close()
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 2 and "needs text ids" in proc.stderr
    assert not env.sessions.exists()


def test_resume_keeps_what_a_config_file_sets(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    env.run_cli("run", *env.base_args(), "--batch-size", "3",
                env=env.worker_env(DRAINER_CRASH_AT="after_exit:2"))
    (env.tmp / "drainer.toml").write_text("batch-size = 5\n")
    resumed = env.run_cli("run", *env.base_args(), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    snap = json.loads(only_session(env.sessions)[0].read_text())
    assert snap["batch_size"] == 5  # the file's value, not the session's saved 3


def test_status_and_analyze_read_the_config_file(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    (env.tmp / "drainer.toml").write_text(
        f'database-url = "sqlite:///{env.db.name}"\nsession-dir = "team-sessions"\n'
        f'command = ["{sys.executable}", "{env.worker}", "{{run_id}}", "{{phase_id}}"]\n'
    )
    assert env.run_cli("run").returncode == 0
    status = env.run_cli("status")
    assert status.returncode == 0, status.stderr
    assert "Sessions in" in status.stdout and "team-sessions" in status.stdout
    analyze = env.run_cli("analyze", "--json")
    assert analyze.returncode == 0, analyze.stderr
    assert json.loads(analyze.stdout)["totals"]["processed"] == 1


def test_relative_paths_in_a_config_file_are_relative_to_the_file(env: Env, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    create_backlog(project / "backlog.db", [("run-0", "P", 0, "FAILED", None)])
    (project / "drainer.toml").write_text('database-url = "sqlite:///backlog.db"\n'
                                          'session-dir = "sessions"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = env.run_cli("plan", "--workspace", str(project),
                       "--command", f"{sys.executable} {env.worker} {{run_id}} {{phase_id}}")
    assert proc.returncode == 0, proc.stderr
    assert str(project / "backlog.db") in proc.stdout
    assert not (env.tmp / "backlog.db").exists()


def test_drainer_run_id_in_the_environment_is_not_a_setting(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    proc = env.run_cli("plan", *env.base_args(), env=env.worker_env(DRAINER_RUN_ID="run-1"))
    assert "run-0 / P" in proc.stdout and "run-1 / P" in proc.stdout


def test_env_values_with_commas_via_drainer_env(env: Env) -> None:
    proc = env.run_cli("config", "--database-url", env.url,
                       env=env.worker_env(DRAINER_ENV="OPTS=a,b;MODE=x"))
    assert proc.returncode == 0, proc.stderr
    assert '{"OPTS": "a,b", "MODE": "x"}' in proc.stdout


def test_live_footer_fits_the_terminal_and_strips_control_characters() -> None:
    state = LiveState(total=10, lanes=30)
    state.apply(_started("1", "run-\x1b[2J" + "x" * 200, "P", 1), now=0.0)
    lines = render(state, now=1.0, width=40, height=12)
    assert all(len(line) <= 39 for line in lines)
    assert "\x1b" not in "".join(lines)
    assert len(lines) <= 6 and lines[-1].startswith("  ... ")




@pytest.mark.anyio
async def test_api_refuses_two_subscribers_and_stop_before_run(env: Env) -> None:
    config = DrainConfig(database_url=env.url, session_dir=env.sessions)
    async with open_drainer(config) as d:
        with pytest.raises(UsageError, match="before run"):
            d.stop()
        first = d.events()
        await anyio.lowlevel.checkpoint()
        async def consume() -> None:
            async for _ in first:
                pass
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.lowlevel.checkpoint()
            with pytest.raises(UsageError, match="already has a subscriber"):
                async for _ in d.events():
                    pass
            tg.cancel_scope.cancel()
