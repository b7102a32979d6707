"""Each stop rule on its own (DESIGN.md §5), fed attempts as the scheduler feeds them: the
decision it takes, at exactly which attempt, and how the header describes it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from drainer.config import DrainConfig
from drainer.errors import UsageError
from drainer.models import Attempt, RunStop, SessionStop
from drainer.policy import (
    BatchSize,
    ConsecutiveZeroYield,
    FingerprintRepeats,
    HaltOnFailures,
    MaxLeaks,
    Policy,
    Rule,
    Sensors,
    TimeLimit,
    TimeoutsPerRun,
)


def config(**kw: object) -> DrainConfig:
    return DrainConfig(database_url="sqlite:///x.db", **kw)  # type: ignore[arg-type]


def attempt(run: str = "r", *, ok: bool = False, timeout: bool = False, events: int | None = 0,
            fp: str | None = "FAILED|rc1|boom", cancelled: bool = False,
            interrupted: bool = False) -> Attempt:
    return Attempt(run_id=run, phase_id="p", phase_index=0, initial_state="FAILED",
                   attempt_id="a", attempt_number=1, lane=1, started_at="",
                   final_state="COMPLETE" if ok else "FAILED", success=ok, timed_out=timeout,
                   telemetry_events_collected=events, failure_fingerprint=None if ok else fp,
                   cancelled=cancelled, interrupted=interrupted)


OK = attempt(ok=True, events=3)
FAIL = attempt()
TIMEOUT = attempt(timeout=True, fp="FAILED|timeout|x")
UNKNOWN_TELEMETRY = attempt(events=None)
CANCELLED = attempt(cancelled=True)


@dataclass
class Case:
    rule: type[Rule]
    settings: dict[str, object]
    feed: list[Attempt]
    fires_at: int | None  #: 1-based attempt whose observe() decides; None: never
    reason: str | None = None


CASES = {
    "timeouts per run: the 2nd timeout of a run": Case(
        TimeoutsPerRun, {"max_timeouts_per_run": 2}, [TIMEOUT, FAIL, TIMEOUT], 3,
        "max_timeouts_per_run"),
    "timeouts per run: other runs do not add up": Case(
        TimeoutsPerRun, {"max_timeouts_per_run": 2},
        [TIMEOUT, attempt("other", timeout=True)], None),
    "fingerprint repeats: the 3rd failure with one fingerprint": Case(
        FingerprintRepeats, {"max_fingerprint_repeats": 3}, [FAIL, OK, FAIL, FAIL], 4,
        "max_fingerprint_repeats"),
    "fingerprint repeats: cancelled attempts do not count": Case(
        FingerprintRepeats, {"max_fingerprint_repeats": 2}, [FAIL, CANCELLED, OK], None),
    "fingerprint repeats: off": Case(
        FingerprintRepeats, {"max_fingerprint_repeats": None}, [FAIL] * 5, None),
    "zero-yield streak: 3 in a row": Case(
        ConsecutiveZeroYield, {"max_consecutive_zero_yield": 3}, [FAIL, FAIL, FAIL], 3,
        "consecutive_zero_yield"),
    "zero-yield streak: telemetry resets it": Case(
        ConsecutiveZeroYield, {"max_consecutive_zero_yield": 3}, [FAIL, FAIL, OK, FAIL, FAIL],
        None),
    "zero-yield streak: unknown telemetry and cancels are ignored": Case(
        ConsecutiveZeroYield, {"max_consecutive_zero_yield": 2},
        [FAIL, UNKNOWN_TELEMETRY, CANCELLED, FAIL], 4, "consecutive_zero_yield"),
    "halt on failures N: the 2nd failure": Case(
        HaltOnFailures, {"halt_on_failures": 2}, [OK, FAIL, OK, TIMEOUT], 4, "failure_limit"),
    "halt on failures N: cancelled attempts are not failures": Case(
        HaltOnFailures, {"halt_on_failures": 2}, [FAIL, CANCELLED, OK], None),
    "halt on failures N%: judged from the 10th attempt": Case(
        HaltOnFailures, {"halt_on_failures": "50%"}, [FAIL] * 9 + [OK, FAIL], 11,
        "failure_limit"),
    "halt on failures N%: a share at the limit is not past it": Case(
        HaltOnFailures, {"halt_on_failures": "50%"}, [OK, FAIL] * 6, None),
    "halt on failures: off": Case(HaltOnFailures, {}, [FAIL] * 20, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rule_fires_exactly_when_it_should(case: Case) -> None:
    rule = case.rule(config(**case.settings))
    decisions = [rule.observe(a) for a in case.feed]
    fired = [n for n, d in enumerate(decisions, start=1) if d is not None]
    if case.fires_at is None:
        assert fired == []
    else:
        assert fired[0] == case.fires_at
        assert str(decisions[case.fires_at - 1].reason) == case.reason  # type: ignore[union-attr]


def test_run_stops_name_the_run_and_session_stops_stop_the_session() -> None:
    assert isinstance(TimeoutsPerRun(config(max_timeouts_per_run=1)).observe(TIMEOUT), RunStop)
    assert isinstance(HaltOnFailures(config(halt_on_failures=1)).observe(FAIL), SessionStop)


def test_batch_size_counts_starts_and_stops_at_the_nth() -> None:
    rule = BatchSize(config(batch_size=3))
    assert [rule.started() is not None for _ in range(3)] == [False, False, True]
    assert rule.count == 3


def test_max_leaks_reads_the_leak_gauge() -> None:
    leaks = 0
    rule = MaxLeaks.create(config(max_leaks=1), Sensors(leak_count=lambda: leaks))
    assert rule.observe(OK) is None
    leaks = 2
    stop = rule.observe(OK)
    assert isinstance(stop, SessionStop) and str(stop.reason) == "max_leaks"
    assert MaxLeaks.create(config(), Sensors(leak_count=lambda: 99)).observe(OK) is None


def test_time_limit_is_a_deadline_not_an_observation() -> None:
    assert Policy(config(session_timeout=90.0)).deadline == 90.0
    assert Policy(config()).deadline is None
    assert TimeLimit(config(session_timeout=90.0)).observe(FAIL) is None


def test_policy_records_one_reason_per_run_and_ignores_interrupted_attempts() -> None:
    policy = Policy(config(max_timeouts_per_run=1, max_fingerprint_repeats=1))
    run_stops, stop = policy.observe(attempt(interrupted=True, timeout=True))
    assert (run_stops, stop) == ([], None)
    run_stops, _ = policy.observe(TIMEOUT)  # both rules fire: the first one is recorded
    assert [str(s.reason) for s in run_stops] == ["max_timeouts_per_run"]
    assert policy.observe(TIMEOUT)[0] == []  # stopped already: no second decision
    assert policy.stopped_runs == {"r": "max_timeouts_per_run"}


def test_a_lifted_stop_starts_the_runs_counts_over() -> None:
    policy = Policy(config(max_timeouts_per_run=2, max_fingerprint_repeats=100))
    policy.observe(TIMEOUT)
    assert [s.run_id for s in policy.observe(TIMEOUT)[0]] == ["r"]
    assert policy.lift("r") == "max_timeouts_per_run" and policy.stopped_runs == {}
    assert policy.lift("r") is None  # not stopped: nothing to lift
    assert policy.observe(TIMEOUT)[0] == []  # one timeout since the lift: not yet
    assert [s.run_id for s in policy.observe(TIMEOUT)[0]] == ["r"]
    # A fingerprint's count is the session's: at its limit, the next repeat stops again.
    policy = Policy(config(max_fingerprint_repeats=2))
    policy.observe(FAIL)
    assert [str(s.reason) for s in policy.observe(FAIL)[0]] == ["max_fingerprint_repeats"]
    policy.lift("r")
    assert [str(s.reason) for s in policy.observe(FAIL)[0]] == ["max_fingerprint_repeats"]


def test_the_header_lists_every_rule_with_its_setting() -> None:
    assert Policy(config(halt_on_failures="20%", max_leaks=0)).describe() == (
        "batch 10, phase timeout 900s, time limit off, timeouts/run 2, attempts/phase 2, "
        "fingerprint repeats 3, zero-yield streak off, halt on failures 20%, leaks 0")


@pytest.mark.parametrize("value", [0, -1, "0", "x", "100%", "0%", "-5%", "5.5", True])
def test_halt_on_failures_rejects_bad_values(value: object) -> None:
    with pytest.raises(UsageError, match="--halt-on-failures"):
        config(halt_on_failures=value)
