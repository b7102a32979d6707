"""The outcome read after a clean exit: a phase still non-final is re-read for
``final_state_wait`` seconds before drainer judges (and restores) it."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

from conftest import Env, create_backlog, phase_states
from drainer import drain, iter_attempts
from test_api import _config

pytestmark = pytest.mark.anyio


def _finish_as_executor(db: str) -> None:
    conn = sqlite3.connect(db, timeout=30)
    conn.execute("INSERT INTO token_budget_escalation_events (run_id, phase_id, trigger_type) "
                 "VALUES ('run-0', 'P', 'late')")
    conn.execute("UPDATE phases SET state='COMPLETE' WHERE run_id='run-0' AND phase_id='P'")
    conn.commit()
    conn.close()


async def test_phase_completed_during_the_wait_counts_as_success(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    summary = None

    async def run() -> None:
        nonlocal summary
        summary = await drain(_config(env, "clean_executing", final_state_wait=60, batch_size=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(30):
            while not (env.out / "exited.P").exists():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        # The worker has exited (or is exiting) with its phase EXECUTING; its executor
        # finishes the phase now, well inside drainer's 60 s wait.
        await anyio.to_thread.run_sync(_finish_as_executor, str(env.db))
    assert summary is not None
    [attempt] = iter_attempts(summary.journal_path)
    assert attempt.success and attempt.final_state == "COMPLETE"
    assert not attempt.state_restored
    assert attempt.telemetry_events_collected == 1  # counted after the wait, not before
    assert phase_states(env.db)[("run-0", "P")][0] == "COMPLETE"


async def test_phase_still_executing_after_the_wait_is_restored(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    summary = await drain(_config(env, "clean_executing", final_state_wait=0.3, batch_size=1))
    [attempt] = iter_attempts(summary.journal_path)
    assert not attempt.success and attempt.state_restored
    state, reason = phase_states(env.db)[("run-0", "P")]
    assert state == "FAILED"
    assert reason is not None and reason.startswith("drainer:")
