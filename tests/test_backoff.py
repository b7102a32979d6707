"""``--retry-backoff-seconds``: a phase whose attempt failed for a reason that may pass (a
timeout, a signal, a lost lease, a database error) is retried only after a delay that doubles
per attempt, while other phases drain; other failures are retried as before."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from conftest import Env, create_backlog, journal_results, only_session
from drainer.models import Attempt, Candidates, PhaseRef
from drainer.selection import RETRY_BACKOFF_MAX, Selector, is_passing_failure

pytestmark = pytest.mark.anyio


def _refs(*runs: str) -> list[PhaseRef]:
    return [PhaseRef(run, "p", 0, "FAILED", None) for run in runs]


def _selector(refs: list[PhaseRef], backoff: float) -> Selector:
    async def load() -> Candidates:
        return Candidates.of(refs)

    return Selector(load, max_attempts_per_phase=3, retry_backoff=backoff, reloads=False)


def _failed(ref: PhaseRef, **how: object) -> Attempt:
    base = Attempt(run_id=ref.run_id, phase_id=ref.phase_id, phase_index=0,
                   initial_state="FAILED", attempt_id="a", attempt_number=1, lane=1,
                   started_at="", final_state="FAILED", subprocess_returncode=1)
    return dataclasses.replace(base, **how)


@pytest.mark.parametrize("how", [{"timed_out": True}, {"subprocess_returncode": -9},
                                 {"lease_lost": True},
                                 {"worker_error": "sqlalchemy.exc.OperationalError: "
                                                  "database is locked"}])
def test_failures_that_may_pass(how: dict[str, object]) -> None:
    ref = _refs("r")[0]
    assert is_passing_failure(_failed(ref, **how))
    assert not is_passing_failure(_failed(ref, worker_error="ImportError: no module x"))


async def test_a_timed_out_phase_waits_doubling_while_others_go_first() -> None:
    a, b = _refs("a", "b")
    s = _selector([a, b], backoff=0.2)
    first = await s.pick()
    assert first == a
    s.observe(_failed(a, timed_out=True))
    assert await s.pick() == b  # the untried phase goes on meanwhile
    s.observe(_failed(b))  # a plain failure: its retry is due at once
    retry = await s.pick()
    assert retry == b
    s.observe(_failed(b, attempt_number=2))
    began = anyio.current_time()
    assert await s.pick() == b  # again b: a still waits
    s.observe(_failed(b, attempt_number=3))
    wait = s.backoff_wait()
    assert wait is not None and 0 < wait <= 0.2
    assert await s.pick() is None  # only a's retry is left, and it is not due
    await anyio.sleep(wait)
    assert await s.pick() == a
    assert anyio.current_time() - began >= wait
    s.observe(_failed(a, timed_out=True))  # its second attempt: twice the wait
    wait2 = s.backoff_wait()
    assert wait2 is not None and 0.2 < wait2 <= 0.4


async def test_the_wait_is_capped_and_zero_means_none() -> None:
    a, = _refs("a")
    s = _selector([a], backoff=RETRY_BACKOFF_MAX)
    await s.pick()
    for n in range(1, 3):
        s.observe(_failed(a, timed_out=True, attempt_number=n))
        wait = s.backoff_wait()
        assert wait is not None and RETRY_BACKOFF_MAX - 1 < wait <= RETRY_BACKOFF_MAX
        s._backoff.clear()  # (let it be due without waiting a quarter of an hour)
        assert await s.pick() == a
    s = _selector([a], backoff=0)
    await s.pick()
    s.observe(_failed(a, timed_out=True))
    assert s.backoff_wait() is None and await s.pick() == a


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_a_session_retries_a_timed_out_phase_after_its_backoff_and_drains_others_meanwhile(
        env: Env) -> None:
    create_backlog(env.db, [("run-a", "P1", 0, "FAILED", None), ("run-b", "P1", 0, "FAILED", None),
                            ("run-c", "P1", 0, "FAILED", None)])
    (env.out / "hang-next").touch()  # the first worker (run-a's, first by id) hangs
    args = env.base_args()
    args[args.index("--phase-timeout-seconds") + 1] = "1"
    proc = env.run_cli("run", *args, "--batch-size", "4", "--retry-backoff-seconds", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # (an attempt timed out)
    records = journal_results(only_session(env.sessions)[1])
    order = [(r["run_id"], r["timed_out"]) for r in records]
    assert order == [("run-a", True), ("run-b", False), ("run-c", False), ("run-a", False)]
    first, retry = records[0], records[3]
    assert (_at(retry["started_at"]) - _at(first["finished_at"])).total_seconds() >= 2.0
    assert retry["success"] and retry["attempt_number"] == 2


async def test_the_wait_runs_from_the_attempts_end_and_a_stop_is_no_passing_failure() -> None:
    """A timed-out attempt replayed by --resume an hour later is due at once; an attempt
    drainer's own stop cancelled (its worker killed by drainer) waits for nothing."""
    a, b = _refs("a", "b")
    s = _selector([a, b], backoff=30)
    await s.pick()
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="milliseconds")
    s.observe(_failed(a, timed_out=True, finished_at=an_hour_ago))
    assert s.backoff_wait() is None
    await s.pick()
    s.observe(_failed(b, cancelled=True, subprocess_returncode=-15))
    assert s.backoff_wait() is None
    assert {(await s.pick()), (await s.pick())} == {a, b}
