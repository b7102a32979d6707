"""How the selector uses the attempt history: held-back phases (``--attempts-scope history``,
``--skip-unchanged``), other sessions' attempts counted, promising runs first among equals.
Pure: the history is given as a summary."""

from __future__ import annotations

import pytest

from drainer.backlog import PhaseHistory, Summary
from drainer.models import Attempt, Candidates, PhaseRef
from drainer.selection import Selector, run_tie, unchanged_since

pytestmark = pytest.mark.anyio
REV = "a" * 40


def refs(*runs: str) -> list[PhaseRef]:
    return [PhaseRef(run, "p", 0, "FAILED", None) for run in runs]


def selector(found: list[PhaseRef], summary: Summary, **kw: object) -> Selector:
    async def load() -> Candidates:
        return Candidates.of(found)

    async def history() -> Summary:
        return summary

    return Selector(load, max_attempts_per_phase=2, reloads=False, keep_skipped=True,
                    history=history, **kw)  # type: ignore[arg-type]


def failed(ref: PhaseRef, n: int = 1) -> Attempt:
    return Attempt(run_id=ref.run_id, phase_id=ref.phase_id, phase_index=0,
                   initial_state="FAILED", attempt_id=f"a{n}", attempt_number=n, lane=1,
                   started_at="", final_state="FAILED", subprocess_returncode=1)


def test_unchanged_means_a_deterministic_failure_at_this_revision() -> None:
    seen_twice = PhaseHistory(attempts=2, last_outcome="failed", last_fingerprint="f",
                              last_category="other", last_revision=REV,
                              last_fingerprint_seen=2)
    assert unchanged_since(seen_twice, REV) == (
        "unchanged since its last failure at aaaaaaa (its fingerprint seen 2x)")
    assert unchanged_since(seen_twice, "b" * 40) is None  # a new commit
    once = PhaseHistory(attempts=1, last_outcome="failed", last_fingerprint="f",
                        last_category="other", last_revision=REV, last_fingerprint_seen=1)
    assert unchanged_since(once, REV) is None
    imports = PhaseHistory(attempts=1, last_outcome="failed", last_category="collection/import",
                           last_revision=REV, last_fingerprint_seen=1)
    assert unchanged_since(imports, REV) is not None
    timed_out = PhaseHistory(attempts=3, last_outcome="timed out", last_category="timeout",
                             last_revision=REV, last_fingerprint_seen=3)
    assert unchanged_since(timed_out, REV) is None  # a timeout may pass


async def test_history_scope_counts_other_sessions_attempts() -> None:
    a, b = refs("a", "b")
    summary = Summary({a.key: PhaseHistory(attempts=2, last_outcome="failed"),
                       b.key: PhaseHistory(attempts=1, last_outcome="failed")}, set())
    s = selector([a, b], summary, attempts_scope="history")
    assert await s.pick() == b
    s.observe(failed(b))
    assert await s.pick() is None  # b: 1 earlier + 1 now = the limit; a: spent before
    assert [(ref.run_id, why) for ref, why in s.skipped] == [
        ("a", "attempted 2 time(s) in earlier sessions (--attempts-scope history, "
              "--max-attempts-per-phase 2)")]
    # The session scope ignores them.
    s = selector([a, b], summary)
    first = await s.pick()
    assert first is not None
    assert {first, await s.pick(busy={first.run_id})} == {a, b}


async def test_runs_promising_in_the_history_go_first_among_equals() -> None:
    found = refs("a", "b", "c", "d")
    summary = Summary({
        ("b", "p"): PhaseHistory(attempts=1, last_outcome="failed", last_category="other"),
        ("c", "p"): PhaseHistory(attempts=1, last_outcome="timed out", last_category="timeout"),
        ("d", "other"): PhaseHistory(attempts=1, last_outcome="ok"),
    }, {"c", "d"})
    s = selector(found, summary)
    order = []
    while (ref := await s.pick()) is not None:
        order.append(ref.run_id)
        s.observe(failed(ref, 2))  # (past the limit only after the second)
    assert order[:4] == ["c", "d", "a", "b"]


async def test_preferred_runs_stay_first_once_another_drainer_is_found() -> None:
    """Finding another drainer re-salts the tie-break: the history's preference stays."""
    found = refs(*(f"r{i:02}" for i in range(20)))
    summary = Summary({("r19", "p"): PhaseHistory(attempts=1, last_outcome="ok")}, {"r19"})

    async def load() -> Candidates:
        return Candidates.of(found)

    async def history() -> Summary:
        return summary

    # A session whose own order would not put r19 first.
    salt = next(salt for salt in (f"session-{n}" for n in range(100))
                if min(found, key=lambda ref: run_tie(salt, ref.run_id)).run_id != "r19")
    s = Selector(load, max_attempts_per_phase=2, reloads=False, history=history,
                 tie_salt=salt)
    first = await s.pick()
    assert first is not None and first.run_id == "r19"
    s.release("r19")
    s.leased_elsewhere("r05")  # another drainer: runs of equal priority spread out
    again = await s.pick()
    assert again is not None and again.run_id == "r19"


def test_a_timeout_is_never_unchanged() -> None:
    timed_out = PhaseHistory(attempts=2, last_outcome="failed", last_category="timeout",
                             last_fingerprint="f", last_revision=REV, last_fingerprint_seen=2)
    assert unchanged_since(timed_out, REV) is None


async def test_a_phase_found_spent_at_its_claim_stays_out_after_a_load_of_changes() -> None:
    a, b = refs("a", "b")
    current = [a, b]

    async def load() -> Candidates:
        return Candidates.of(current)

    async def load_changed(_seconds: float) -> tuple[Candidates, set[str]]:
        return Candidates.of([r for r in current if r.run_id == "a"]), {"a"}

    async def history() -> Summary:
        return Summary({}, set())

    s = Selector(load, load_changed=load_changed, max_attempts_per_phase=2, history=history,
                 attempts_scope="history")
    assert await s.pick() == a
    s.spent(a, 2)  # its claim found two attempts by another drainer since the load
    assert await s.pick() == b
    s.remove(b)  # drained elsewhere: the next pick reloads the changed runs (run a)
    assert await s.pick() is None
