"""The Selector: which phase is drained next (DESIGN.md §5), fed candidates as the backlog
store loads them, and attempts as the scheduler finishes them."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterable

import anyio
import pytest

from drainer.models import Attempt, Candidates, PhaseRef
from drainer.selection import Selector

pytestmark = pytest.mark.anyio

Row = tuple[str, str, int, str | None]  # run, phase, index, last_failure_reason


class Backlog:
    """What the store would load: FAILED (and QUEUED) phases, changeable between loads."""

    def __init__(self, failed: Iterable[Row], queued: Iterable[Row] = ()) -> None:
        self.failed = list(failed)
        self.queued = list(queued)
        self.loads = 0

    def done(self, ref: PhaseRef, *, stamp: bool = True) -> None:
        """``ref`` drained (by another drainer), its ``updated_at`` stamped unless not."""
        self.failed = [r for r in self.failed if (r[0], r[1]) != ref.key]
        if stamp:
            self.stamped.add(ref.run_id)

    def fail(self, row: Row) -> None:
        """A phase became FAILED, stamped."""
        self.failed.append(row)
        self.stamped.add(row[0])

    stamped: set[str]
    changes = 0

    async def load(self) -> Candidates:
        self.loads += 1
        self.stamped = set()
        return Candidates.of([PhaseRef(r, p, i, "FAILED", why) for r, p, i, why in self.failed]
                             + [PhaseRef(r, p, i, "QUEUED", why) for r, p, i, why in self.queued])

    async def load_changed(self, seconds: float) -> tuple[Candidates, set[str]]:
        """The store's load of changes: the runs stamped since the last load."""
        self.changes += 1
        runs, self.stamped = self.stamped, set()
        return Candidates.of([PhaseRef(r, p, i, "FAILED", why) for r, p, i, why in self.failed
                              if r in runs]), runs


def selector(backlog: Backlog, **kw: object) -> Selector:
    kw.setdefault("max_attempts_per_phase", 2)
    return Selector(backlog.load, **kw)  # type: ignore[arg-type]


def outcome(ref: PhaseRef, state: str = "FAILED", *, events: int | None = 1,
            fingerprint: str | None = None, interrupted: bool = False) -> Attempt:
    return Attempt(run_id=ref.run_id, phase_id=ref.phase_id, phase_index=ref.phase_index,
                   initial_state=ref.state, attempt_id="a", attempt_number=1, lane=1,
                   started_at="", final_state=state, success=state == "COMPLETE",
                   telemetry_events_collected=events, failure_fingerprint=fingerprint,
                   interrupted=interrupted)


async def drain_order(s: Selector, backlog: Backlog, limit: int = 50,
                      state: str = "FAILED") -> list[str]:
    """Pick, finish (as ``state``), pick again... the order a one-lane session drains in.
    A phase that ends COMPLETE leaves the backlog, as it does in the database."""
    order = []
    for _ in range(limit):
        ref = await s.pick()
        if ref is None:
            break
        order.append(f"{ref.run_id}/{ref.phase_id}")
        if state == "COMPLETE":
            backlog.done(ref)
        s.observe(outcome(ref, state))
    return order


@pytest.mark.parametrize(("rows", "expected"), [
    # Category of last_failure_reason: none, collection/import, deliverable, patch, other,
    # timeout last (one run each, so sample-first triage does not interfere).
    ([("r1", "p", 0, "timed out after 900s"), ("r2", "p", 0, "ImportError: x"),
      ("r3", "p", 0, None), ("r4", "p", 0, "Deliverable missing"), ("r5", "p", 0, "boom"),
      ("r6", "p", 0, "patch did not apply")],
     ["r3/p", "r2/p", "r4/p", "r6/p", "r5/p", "r1/p"]),
    # Same category: lower phase_index first, then runs with fewer failed phases, then ids.
    ([("big", "a", 1, None), ("big", "b", 2, None), ("big", "c", 3, None),
      ("small", "a", 1, None), ("tie-b", "x", 0, None), ("tie-a", "x", 0, None)],
     ["tie-a/x", "tie-b/x", "small/a", "big/a", "big/b", "big/c"]),
])
async def test_priority_order(rows: list[Row], expected: list[str]) -> None:
    backlog = Backlog(rows)
    s = selector(backlog, max_attempts_per_phase=1)
    assert await drain_order(s, backlog, state="COMPLETE") == expected


async def test_unsampled_runs_go_first() -> None:
    rows = [("a", "p1", 0, None), ("a", "p2", 1, None), ("a", "p3", 2, None),
            ("b", "p1", 5, None)]
    backlog = Backlog(rows)
    order = await drain_order(selector(backlog), backlog, state="COMPLETE")
    assert order == ["a/p1", "b/p1", "a/p2", "a/p3"]


async def test_a_run_whose_sample_repeats_a_known_failure_is_deprioritised() -> None:
    rows = [("a", "p1", 0, None), ("a", "p2", 1, None), ("b", "p1", 0, None),
            ("b", "p2", 1, None)]
    backlog = Backlog(rows)
    s = selector(backlog, max_attempts_per_phase=1)
    a1 = await s.pick()
    assert a1 is not None and a1.key == ("a", "p1")
    s.observe(outcome(a1, events=0, fingerprint="FAILED|rc1|x"), fingerprint_seen_before=True)
    b1 = await s.pick()
    assert b1 is not None and b1.key == ("b", "p1")
    s.observe(outcome(b1, events=3))  # telemetry: promising
    assert await drain_order(s, backlog, state="COMPLETE") == ["b/p2", "a/p2"]


async def test_retries_come_after_every_untried_phase_round_robin_up_to_the_cap() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None)])
    s = selector(backlog, max_attempts_per_phase=3)
    assert await drain_order(s, backlog) == ["a/p", "b/p"] * 3
    assert s.attempts_of(PhaseRef("a", "p", 0, "FAILED")) == 3


async def test_a_phase_that_succeeded_is_not_retried() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None)])
    s = selector(backlog, max_attempts_per_phase=3)
    first = await s.pick()
    assert first is not None
    backlog.done(first)
    s.observe(outcome(first, "COMPLETE"))
    assert await drain_order(s, backlog) == ["b/p"] * 3


async def test_busy_leased_removed_and_stopped_runs_are_left_out() -> None:
    backlog = Backlog([("busy", "p", 0, None), ("leased", "p", 0, None),
                       ("gone", "p", 0, None), ("stopped", "p", 0, None),
                       ("free", "p", 1, None)])
    s = selector(backlog)
    s.leased_elsewhere("leased")
    s.stop_run("stopped")
    await s.load()
    gone = PhaseRef("gone", "p", 0, "FAILED")
    backlog.done(gone)  # drained by someone else meanwhile
    s.remove(gone)
    ref = await s.pick(busy={"busy"})
    assert ref is not None and ref.key == ("free", "p")
    s.observe(outcome(ref, "COMPLETE"))
    assert await s.pick(busy={"busy"}) is None
    assert s.waiting_on_leases
    s.leases_now({})  # its lease ended: the run is a candidate again (no reload needed)
    keys = {(await s.pick(busy={"busy"}) or PhaseRef("", "", 0, "")).key}
    assert keys == {("leased", "p")}


async def test_a_dry_index_reloads_and_finds_phases_that_failed_meanwhile() -> None:
    backlog = Backlog([("a", "p1", 0, None)])
    s = selector(backlog, max_attempts_per_phase=2, dry_reload_cost=0)
    ref = await s.pick()
    assert ref is not None
    s.observe(outcome(ref, "FAILED"))  # tried once, FAILED: its count must survive reloads
    backlog.failed.append(("b", "p1", 0, None))  # a phase that became FAILED meanwhile
    assert await drain_order(s, backlog) == ["b/p1", "a/p1", "b/p1"]
    assert backlog.loads >= 2
    assert s.attempts_of(PhaseRef("a", "p1", 0, "FAILED")) == 2


async def test_the_index_is_loaded_once_without_reloads() -> None:
    backlog = Backlog([("a", "p", 0, None)])
    s = selector(backlog, reloads=False, max_attempts_per_phase=1)
    assert await drain_order(s, backlog) == ["a/p"]
    assert backlog.loads == 1


async def test_an_interrupted_attempt_counts_for_nothing() -> None:
    s = selector(Backlog([("a", "p", 0, None)]), max_attempts_per_phase=1)
    ref = await s.pick()
    assert ref is not None
    s.observe(outcome(ref, "FAILED", interrupted=True))
    again = await s.pick()
    assert again is not None and again.key == ref.key
    assert s.tier_of("a") is None  # not sampled either


async def test_skipped_phases_and_why() -> None:
    backlog = Backlog([("old-1", "p", 0, None), ("new-1", "p", 0, None)],
                      queued=[("new-1", "q", 1, None)])
    s = selector(backlog, skip_run_prefixes=("old-",), keep_skipped=True)
    await s.load()
    assert [(ref.run_id, ref.phase_id, why.split(" (")[0]) for ref, why in s.skipped] == [
        ("new-1", "q", "QUEUED phase"), ("old-1", "p", "run matches --skip-run-prefix old-")]
    assert s.candidates == 1
    drains_queued = selector(backlog, skip_queued=False)
    await drains_queued.load()
    assert drains_queued.candidates == 3


async def test_a_reload_while_a_phase_is_in_flight_keeps_its_count() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None)])
    s = selector(backlog, max_attempts_per_phase=1)
    ref = await s.pick()
    assert ref is not None and ref.key == ("a", "p")
    backlog.done(ref)  # its worker moved it to EXECUTING: the next load does not hold it
    s.invalidate()  # say, a swept lease: the next pick reloads
    other = await s.pick(busy={"a"})
    assert other is not None and other.key == ("b", "p")
    backlog.failed.append(("a", "p", 0, None))  # the attempt ends with the phase FAILED
    s.observe(outcome(ref, "FAILED"))
    backlog.done(other)
    s.observe(outcome(other, "COMPLETE"))
    s.invalidate()
    assert await s.pick() is None  # a/p had its one attempt, reload or not
    assert s.attempts_of(PhaseRef("a", "p", 0, "FAILED")) == 1


class _TrackedList(list[str]):
    """A column a weak reference can follow."""


async def test_a_reload_frees_the_old_load_before_loading_the_new_one() -> None:
    # Two loads at once would double the index's memory at 100,000 phases (and the old
    # one, if kept alive by a reference cycle, waits for the garbage collector).
    backlog = Backlog([(f"r{n}", "p", 0, None) for n in range(50)])
    old_columns: list[weakref.ref[_TrackedList]] = []

    async def load() -> Candidates:
        if old_columns:
            assert old_columns[-1]() is None, "the previous load is still in memory"
        candidates = await backlog.load()
        candidates.phase_ids = _TrackedList(candidates.phase_ids)
        old_columns.append(weakref.ref(candidates.phase_ids))
        return candidates

    gc.disable()  # what frees the old load must be reference counting, not a collection
    try:
        s = Selector(load, max_attempts_per_phase=1)
        for _ in range(3):
            ref = await s.pick()
            assert ref is not None
            s.observe(outcome(ref, "FAILED"))
            s.invalidate()
    finally:
        gc.enable()
    assert len(old_columns) == 3


async def test_an_attempt_that_ends_while_a_reload_runs_keeps_its_count() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None)])
    s: Selector
    first: list[PhaseRef] = []

    async def load() -> Candidates:
        if first and backlog.loads == 1:
            # The reload reads the database while a/p's worker has it EXECUTING (not in the
            # load), and the attempt ends FAILED before the load returns.
            loaded = await backlog.load()
            s.observe(outcome(first[0], "FAILED"))
            backlog.failed.append(("a", "p", 0, None))
            return loaded
        return await backlog.load()

    s = Selector(load, max_attempts_per_phase=1)
    ref = await s.pick()
    assert ref is not None and ref.key == ("a", "p")
    first.append(ref)
    backlog.done(ref)
    s.invalidate()  # say, a swept lease: the next pick reloads
    other = await s.pick(busy={"a"})
    assert other is not None and other.key == ("b", "p")
    backlog.done(other)
    s.observe(outcome(other, "COMPLETE"))
    s.invalidate()
    assert await s.pick() is None  # a/p had its one attempt
    assert s.attempts_of(PhaseRef("a", "p", 0, "FAILED")) == 1


async def test_ids_no_worker_can_be_given_are_never_picked_and_reported_once() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b\x00", "p", 0, None), ("c", "p\x00", 0, None)])
    s = selector(backlog, max_attempts_per_phase=1)
    ref = await s.pick()
    assert ref is not None and ref.key == ("a", "p")
    assert [r.key for r, _ in s.new_unpassable()] == [("b\x00", "p"), ("c", "p\x00")]
    s.observe(outcome(ref, "FAILED"))
    s.invalidate()  # a reload finds them again: they are not reported again
    assert await s.pick() is None
    assert s.new_unpassable() == []


async def test_sessions_sharing_a_backlog_order_runs_of_equal_priority_their_own_way() -> None:
    """Once a session finds another drainer on its backlog (a claim refused), runs of equal
    priority go in an order of its own, a hash of its id and the run id: drainers stop
    meeting on the same runs, and one session (resumed too) keeps its order. Priority
    still comes first; alone, or without a salt (plan), runs of equal priority go by id."""
    rows = [(f"run-{i:02d}", "p0", 0, None) for i in range(20)]
    rows += [("aa-later", "p1", 1, None)]  # a higher phase index: after every index-0 phase
    rows += [("aa-last", "p0", 0, "ImportError: no module named x")]  # a category behind

    async def order(salt: str, *, shared: bool = True) -> list[str]:
        backlog = Backlog(rows)
        s = selector(backlog, tie_salt=salt)
        if shared:
            await s.load()
            s.leased_elsewhere("not-a-candidate", 0.0)  # another drainer is about
            s.leases_now({})
        return await drain_order(s, backlog, state="COMPLETE")

    plain = await order("")
    assert plain[:20] == [f"run-{i:02d}/p0" for i in range(20)]
    assert await order("session-1", shared=False) == plain
    one, again, other = await order("session-1"), await order("session-1"), await order("s-2")
    assert one == again
    assert one != other and one[0] != other[0]
    for each in (plain, one, other):
        assert sorted(each[:20]) == plain[:20]
        assert each[20:] == ["aa-later/p1", "aa-last/p0"]


async def test_a_run_leased_elsewhere_waits_for_its_lease_without_a_reload() -> None:
    backlog = Backlog([("leased", "p", 0, None), ("free", "p", 1, None)])
    s = selector(backlog)
    s.leased_elsewhere("leased", 30.0)
    assert 29.0 < s.lease_wait() <= 30.0
    ref = await s.pick()
    assert ref is not None and ref.key == ("free", "p")
    s.observe(outcome(ref, "COMPLETE"))
    assert await s.pick() is None and s.waiting_on_leases
    s.leases_now({"leased": 5.0})  # renewed: wait for its new expiry
    assert s.lease_wait() <= 5.0 and await s.pick() is None
    loads = backlog.loads
    s.leases_now({})  # ended
    assert not s.waiting_on_leases
    ref = await s.pick()
    assert ref is not None and ref.key == ("leased", "p")
    assert backlog.loads == loads  # the claim re-reads the phase: no reload for this
    s.leased_elsewhere("leased", None)  # unknown end: looked at again soon
    assert s.lease_wait() <= 1.0


async def test_a_phase_drained_elsewhere_brings_the_next_reload_forward() -> None:
    """Another drainer drained phases of this index: the first one found tells, and the
    next pick reloads (its cost allowing) instead of claiming the others one by one."""
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(5)])
    s = selector(backlog, dry_reload_cost=0)
    first = await s.pick()
    assert first is not None and first.key == ("r0", "p")
    for i in range(4):  # drained elsewhere meanwhile
        backlog.done(PhaseRef(f"r{i}", "p", 0, "FAILED"))
    s.remove(first)  # its claim found it COMPLETE
    loads = backlog.loads
    ref = await s.pick()
    assert backlog.loads == loads + 1
    assert ref is not None and ref.key == ("r4", "p")


async def test_runs_seen_leased_elsewhere_are_left_alone_if_they_have_a_phase_here() -> None:
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None), ("c", "p", 1, None)])
    s = selector(backlog)
    first = await s.pick()
    assert first is not None and first.key == ("a", "p")
    s.leased_elsewhere("a", 30.0)  # its claim was refused, and it read the lease table:
    s.leased_now({"b": 20.0, "not-here": 60.0, "a": 30.0})
    ref = await s.pick()
    assert ref is not None and ref.key == ("c", "p")  # a and b are left alone
    s.observe(outcome(ref, "COMPLETE"))
    assert await s.pick() is None and s.waiting_on_leases
    assert s.lease_wait() > 19.0  # not waiting on a run it has nothing of
    s.leases_now({"a": 30.0})
    ref = await s.pick()
    assert ref is not None and ref.key == ("b", "p")


async def test_a_phase_drained_elsewhere_brings_a_load_of_the_changed_runs_only() -> None:
    """With ``updated_at``, what others drained is learnt by reading the runs they changed,
    not the whole backlog; the rest of the index, counters included, is kept."""
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(6)])
    s = Selector(backlog.load, load_changed=backlog.load_changed, max_attempts_per_phase=2,
                 dry_reload_cost=0)
    first = await s.pick()
    assert first is not None and first.key == ("r0", "p")
    s.observe(outcome(first))  # it failed: a retry is due after the untried ones
    for i in (1, 2):
        backlog.done(PhaseRef(f"r{i}", "p", 0, "FAILED"))  # drained elsewhere, stamped
    backlog.fail(("r9", "p", 0, None))  # and a phase became FAILED elsewhere
    ref = await s.pick()
    assert ref is not None and ref.key == ("r1", "p")
    s.remove(ref)  # its claim found it drained
    order = []
    for _ in range(4):
        ref = await s.pick()
        assert ref is not None
        order.append(ref.key[0])
        s.observe(outcome(ref, "COMPLETE"))
        backlog.done(ref, stamp=False)
    assert (backlog.loads, backlog.changes) == (1, 1)
    assert order == ["r3", "r4", "r5", "r9"]
    retry = await s.pick()  # nothing untried left: a full look, then r0's retry
    assert retry is not None and retry.key == ("r0", "p") and s.attempts_of(retry) == 1


async def test_a_phase_drained_elsewhere_without_a_stamp_stays_out() -> None:
    """A writer that does not stamp ``updated_at``: its run is not read again, and the phase
    a claim found drained is not picked again from the old rows."""
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(3)])
    s = Selector(backlog.load, load_changed=backlog.load_changed, max_attempts_per_phase=2,
                 dry_reload_cost=0)
    first = await s.pick()
    assert first is not None
    backlog.done(first, stamp=False)
    s.remove(first)
    picked = []
    for _ in range(4):
        ref = await s.pick()
        if ref is None:
            break
        picked.append(ref.key)
        s.observe(outcome(ref, "COMPLETE"))
        backlog.done(ref)
    assert picked == [("r1", "p"), ("r2", "p")]
    assert backlog.changes == 1


async def test_a_backlog_that_cannot_tell_changes_gets_full_loads() -> None:
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(3)])
    asked = []

    async def cannot_tell(seconds: float) -> None:
        asked.append(seconds)

    s = Selector(backlog.load, load_changed=cannot_tell,  # type: ignore[arg-type]
                 max_attempts_per_phase=2, dry_reload_cost=0)
    for _ in range(3):
        ref = await s.pick()
        assert ref is not None
        backlog.done(ref)
        s.remove(ref)
    assert len(asked) == 1 and backlog.loads == 3  # asked once, then full loads only


async def test_loads_of_changes_do_not_put_off_the_full_reloads() -> None:
    """Writers that do not stamp ``updated_at`` are caught by the full reload every
    ``refresh_interval``, however often changes are loaded meanwhile."""
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(9)])
    s = Selector(backlog.load, load_changed=backlog.load_changed, max_attempts_per_phase=2,
                 dry_reload_cost=0, refresh_interval=1.0)
    ref = await s.pick()  # full load 1
    assert ref is not None
    await anyio.sleep(0.6)
    s.remove(ref)
    assert await s.pick() is not None and backlog.changes == 1  # a load of changes
    await anyio.sleep(0.5)  # 1.1 s after the full load, 0.5 s after the load of changes
    assert await s.pick() is not None
    assert backlog.loads == 2


async def test_a_retry_waits_for_its_backoff_even_when_a_reload_came_while_it_ran() -> None:
    """The phase was EXECUTING under its worker when the index was reloaded, so the new
    index lacks it: its timed-out attempt still sets the wait."""
    backlog = Backlog([("a", "p", 0, None), ("b", "p", 0, None)])
    s = Selector(backlog.load, max_attempts_per_phase=3, retry_backoff=30, dry_reload_cost=0)
    a = await s.pick()
    assert a is not None and a.run_id == "a"
    backlog.failed = [r for r in backlog.failed if r[0] != "a"]  # EXECUTING meanwhile
    s.invalidate()
    b = await s.pick(busy={"a"})
    assert b is not None and b.run_id == "b" and backlog.loads == 2
    backlog.failed.append(("a", "p", 0, None))  # the timeout restored it
    s.observe(dataclasses.replace(outcome(a), timed_out=True))
    wait = s.backoff_wait()
    assert wait is not None and wait > 25


async def test_a_phase_drained_here_is_not_picked_again_after_a_load_of_changes() -> None:
    """Its worker did not stamp updated_at, so a load of changes does not read its run
    again: the old rows must not bring it back as never tried."""
    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(4)])
    s = Selector(backlog.load, load_changed=backlog.load_changed, max_attempts_per_phase=2,
                 dry_reload_cost=0)
    first = await s.pick()
    assert first is not None and first.run_id == "r0"
    s.observe(outcome(first, "COMPLETE"))
    backlog.done(first, stamp=False)
    second = await s.pick()
    assert second is not None and second.run_id == "r1"
    backlog.done(second)  # drained elsewhere meanwhile
    s.remove(second)
    picked = []
    while (ref := await s.pick()) is not None and len(picked) < 5:
        picked.append(ref.run_id)
        s.observe(outcome(ref, "COMPLETE"))
        backlog.done(ref, stamp=False)
    assert backlog.changes == 1 and picked == ["r2", "r3"]


async def test_the_reload_budget_counts_the_index_build() -> None:
    """A load's cost, which spaces the reloads a phase drained elsewhere brings forward,
    includes building the index (at 100,000 phases it outweighs a load of changes)."""
    import time

    backlog = Backlog([(f"r{i}", "p", 0, None) for i in range(3)])
    s = Selector(backlog.load, load_changed=backlog.load_changed, max_attempts_per_phase=2,
                 dry_reload_cost=100)
    build = s._build

    def slow_build(*args: object, **kw: object) -> object:
        time.sleep(0.05)  # an index that takes 50 ms to build
        return build(*args, **kw)

    s._build = slow_build  # type: ignore[method-assign]
    first = await s.pick()
    assert first is not None
    backlog.done(first)
    s.remove(first)
    await s.pick()  # the load of changes, brought forward
    assert backlog.changes == 1
    second = await s.pick()
    assert second is not None
    backlog.done(second)
    s.remove(second)
    # 0.1 s later: far past 100 x what reading the changes took, but not 100 x the 50 ms
    # of the whole load with its build: no load yet.
    await anyio.sleep(0.1)
    await s.pick()
    assert backlog.changes == 1
