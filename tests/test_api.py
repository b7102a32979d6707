"""The embedding API inside an already-running event loop, next to other tasks."""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import replace

import anyio
import pytest

from conftest import Env, create_backlog, phase_states
from drainer import (
    AttemptFinished,
    AttemptStarted,
    DrainConfig,
    DrainEvent,
    RunStopped,
    RunUnstopped,
    SessionStopped,
    UsageError,
    drain,
    iter_attempts,
    open_drainer,
)
from drainer import api as api_module
from drainer.errors import SessionError
from drainer.journal import SessionFiles, journal_in_use
from drainer.snapshot import Snapshot
from test_resume import _processes_with

pytestmark = pytest.mark.anyio


def _config(env: Env, kind: str, **kw: object) -> DrainConfig:
    return DrainConfig(
        database_url=env.url,
        command=[sys.executable, str(env.worker), "{run_id}", "{phase_id}"],
        session_dir=env.sessions,
        env=(("TEST_OUT", str(env.out)), ("WORKER_KIND", kind)),
        kill_grace_period=0.5,
        **kw,  # type: ignore[arg-type]
    )


async def test_cancelling_the_callers_scope_mid_attempt_cleans_up(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.01)

    async with open_drainer(_config(env, "hang")) as d, anyio.create_task_group() as tg:
        tg.start_soon(other_work)
        tg.start_soon(d.run)
        async for event in d.events():
            if isinstance(event, AttemptStarted):
                with anyio.fail_after(30):
                    # The worker's only signal is the file it writes once EXECUTING.
                    while not list(env.out.glob("hung.*")):  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()  # the host application cancels
                break
    assert ticks > 0  # the host's other task ran alongside
    state, reason = phase_states(env.db)[("run-0", "P")]
    assert state == "FAILED" and (reason or "").startswith("drainer:")
    assert phase_states(env.db)[("run-1", "P")] == ("FAILED", None)  # never started
    assert _processes_with(f"DRAINER_SESSION_ID={d.session_id}") == []
    events = [json.loads(line) for line in
              (env.sessions / d.session_id / "journal.jsonl").read_text().splitlines()]
    types = [e["type"] for e in events]
    assert types[-2:] == ["attempt_finished", "session_stopped"]
    assert events[-2]["cancelled"] is True and events[-1]["stop_reason"] == "cancelled"


async def test_events_statistics_and_a_graceful_stop(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(4)])
    seen: list[str] = []
    async with open_drainer(_config(env, "ok")) as d, anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        async for event in d.events():
            seen.append(type(event).__name__)
            if isinstance(event, AttemptFinished):
                assert event.attempt.success
                d.stop("enough for today")
    assert seen == ["AttemptStarted", "AttemptFinished", "SessionStopped"]
    stats = d.statistics()
    assert (stats.processed, stats.ok, stats.in_flight) == (1, 1, 0)
    # The caller's stop is recorded as `cancelled` (resumable), its reason as the detail.
    assert stats.stop_reason == "cancelled"
    assert stats.stop_detail == "stop requested: enough for today"


async def test_drain_with_on_event_and_no_output(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    events: list[DrainEvent] = []
    summary = await drain(_config(env, "ok"), events.append)
    assert summary.exit_code == 0 and summary.total_success == 1
    assert [type(e) for e in events] == [AttemptStarted, AttemptFinished, SessionStopped]
    assert capsys.readouterr() == ("", "")  # a library prints nothing unless asked


async def test_a_drainer_cannot_be_reopened_or_run_twice(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    async with open_drainer(_config(env, "ok")) as d:
        await d.run()
        with pytest.raises(UsageError, match="already called"):
            await d.run()
    with pytest.raises(UsageError, match="cannot be reopened"):
        async with d:
            pass
    await d.aclose()  # idempotent


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


async def test_a_drainer_nobody_listens_to_keeps_only_its_latest_events(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a subscriber the events must not pile up for the whole session; one that
    # comes late gets the latest ones, ending with the session's end.
    monkeypatch.setattr(api_module, "EARLY_EVENTS", 3)
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(4)])
    async with open_drainer(_config(env, "ok")) as d:
        summary = await d.run()
        late = [event async for event in d.events()]
    assert summary.total_processed == 4
    assert [type(e) for e in late] == [AttemptStarted, AttemptFinished, SessionStopped]
    last = list(iter_attempts(summary.journal_path))[-1]  # (a session's own run order)
    assert isinstance(late[1], AttemptFinished) and late[1].attempt.run_id == last.run_id


async def test_a_full_disk_at_the_end_still_closes_the_journal_and_says_why(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Snapshot, "write", no_space)  # every snapshot write hits a full disk
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    async with open_drainer(_config(env, "ok")) as d:
        with pytest.raises(SessionError, match=r"cannot write snapshot .*No space left"):
            await d.run()
    journal = env.sessions / d.session_id / "journal.jsonl"
    assert not journal_in_use(journal)  # closed and unlocked: --resume can take it
    assert json.loads(journal.read_text().splitlines()[-1])["type"] == "session_stopped"


async def test_a_full_disk_while_cancelled_does_not_replace_the_cancellation(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Snapshot, "write", no_space)
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    async with open_drainer(_config(env, "hang")) as d:
        with anyio.move_on_after(30) as scope:  # a deadline that is not reached first
            async with anyio.create_task_group() as tg:
                tg.start_soon(d.run)
                async for event in d.events():
                    if isinstance(event, AttemptStarted):
                        while not list(env.out.glob("hung.*")):  # noqa: ASYNC110
                            await anyio.sleep(0.02)  # the worker has its phase EXECUTING
                        tg.cancel_scope.cancel()  # the host cancels; no SessionError escapes
                        break
    assert not scope.cancelled_caught
    journal = env.sessions / d.session_id / "journal.jsonl"
    assert not journal_in_use(journal)
    state, reason = phase_states(env.db)[("run-0", "P")]
    assert state == "FAILED" and (reason or "").startswith("drainer:")


async def test_an_unstop_reaches_the_embedder_as_an_event(env: Env) -> None:
    # A resume with `unstop` hands the lift to on_event too (and so to `run --json`), not
    # only to the journal and the progress lines.
    create_backlog(env.db, [("run-t", "T0", 0, "FAILED", None), ("run-t", "T1", 1, "FAILED", None),
                            ("run-z", "Z0", 0, "FAILED", None)])
    (env.out / "hang-next").touch()  # the first attempt hangs, times out and stops its run
    config = _config(env, "ok", phase_timeout=1.0, max_timeouts_per_run=1, retry_backoff=0.0)
    async with open_drainer(config) as d, anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        async for event in d.events():
            if isinstance(event, RunStopped):
                stopped = event.run_id
                d.stop("a run stopped")  # resumable, with the run's stop in its journal
    assert d.statistics().stop_reason == "cancelled"

    events: list[DrainEvent] = []
    summary = await drain(replace(config, resume="latest", unstop=(stopped,)), events.append)
    lifted = [e for e in events if isinstance(e, RunUnstopped)]
    assert [e.to_json() for e in lifted] == [{"event": "run_unstopped", "session_id": d.session_id,
                                              "run_id": stopped, "was": "max_timeouts_per_run"}]
    assert events.index(lifted[0]) == 0
    assert summary.exit_code == 1  # (the resumed session had a timeout)
    assert set(phase_states(env.db).values()) == {("COMPLETE", None)}


async def test_a_new_session_never_writes_into_another_sessions_files(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sessions started in the same second in one directory share all but 4 random hex digits
    # of their ids: once in 65,536 they drew the same, and the second appended to the first's
    # journal. Here the draws repeat the first session's id before a free one comes.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 1, "FAILED", None)])
    first = await drain(_config(env, "ok", batch_size=1))
    journal = env.sessions / first.session_id / "journal.jsonl"
    written = journal.read_bytes()
    free = "batch-drain-20260101-000000-beef"
    draws = iter([first.session_id, first.session_id, free])
    for module in ("drainer.journal", "drainer.session"):
        monkeypatch.setattr(f"{module}.new_session_id", lambda: next(draws), raising=False)
    second = await drain(_config(env, "ok", batch_size=1))
    assert second.session_id == free and second.total_processed == 1
    assert journal.read_bytes() == written
    # Two drainers that drew the same id at once: the second to create its files stops,
    # before writing anything.
    late = SessionFiles(env.sessions, first.session_id)
    with pytest.raises(SessionError, match="just started by another drainer"):
        late.create(new=True)
    assert journal.read_bytes() == written


async def test_a_session_directory_that_is_a_dangling_link_is_said_to_be_one(
        env: Env) -> None:
    # Not "just started by another drainer ... start again", which never helps.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    link = env.tmp / "sessions-gone"
    link.symlink_to(env.tmp / "unmounted" / "sessions")
    with pytest.raises(SessionError, match="sessions-gone is not a directory"):
        await drain(replace(_config(env, "ok"), session_dir=link))
