"""Adaptive phase timeouts (``--phase-timeout-seconds auto[:F]``): limits learnt from the
durations in the attempt history. The table and the setting, pure; then real sessions on
SQLite and PostgreSQL: a limit that follows a category's durations completes a phase a
fixed limit cut short, and still times out a hung worker."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from conftest import Env
from drainer.errors import UsageError
from drainer.timeouts import (
    DEFAULT_LIMIT,
    Limit,
    Timeouts,
    TimeoutSetting,
    TimeoutTable,
    nearest_rank,
    run_prefix,
)
from test_history import args, history, sessions


def test_the_setting_takes_seconds_or_auto() -> None:
    assert TimeoutSetting.parse(900) == TimeoutSetting(seconds=900.0)
    assert TimeoutSetting.parse("120") == TimeoutSetting(seconds=120.0)
    assert TimeoutSetting.parse("auto") == TimeoutSetting(factor=2.0)
    assert TimeoutSetting.parse("AUTO:3.5").label == "auto:3.5"
    for bad in ("auto:0", "auto:x", "-5", "0", "soon", "inf"):
        with pytest.raises(UsageError):
            TimeoutSetting.parse(bad)


def test_run_prefixes_and_the_percentile() -> None:
    assert run_prefix("build129-p01") == "build"
    assert run_prefix("research-system-v14") == "research-system-v"
    assert run_prefix("fileorg-p2-20251208-a") == "fileorg-p"
    assert run_prefix("nodigits") == "nodigits" and run_prefix("42") == "42"
    assert nearest_rank([float(n) for n in range(1, 101)]) == 95.0
    assert nearest_rank([3.0, 1.0, 2.0]) == 3.0


def test_the_table_learns_per_category_and_prefix_within_its_bounds() -> None:
    samples = [("other", f"build{n}-x", 10.0 + n) for n in range(6)]  # p95 15
    samples += [("other", f"fileorg-p{n}", 100.0) for n in range(5)]  # p95 100
    samples += [("collection/import", "r1", 1.0)] * 5
    samples += [("patch/no-op/manifest", "r1", 50.0)] * 4  # too few
    table = TimeoutTable(samples, factor=2.0, low=5.0, high=150.0)
    assert table.limit("other", "build99-y") == Limit(30.0, "other / build")
    assert table.limit("other", "fileorg-p7") == Limit(150.0, "other / fileorg-p")  # capped
    assert table.limit("other", "elsewhere-1") == Limit(150.0, "other")  # p95 100 x 2, capped
    assert table.limit("collection/import", "r1") == Limit(5.0, "collection/import")  # floor
    assert table.limit("patch/no-op/manifest", "r1") == Limit(150.0, "default")  # 900, capped
    assert {(r.category, r.prefix) for r in table.rows} == {
        ("other", None), ("other", "build"), ("other", "fileorg-p"),
        ("collection/import", None)}


@pytest.mark.anyio
async def test_a_retry_after_a_timeout_gets_twice_its_limit_within_the_cap() -> None:
    reads = 0

    async def read() -> list[tuple[str, str, float]]:
        nonlocal reads
        reads += 1
        return [("other", "r", 10.0)] * 5

    timeouts = Timeouts(TimeoutSetting(factor=2.0), low=1.0, high=50.0, read=read)
    assert await timeouts.limit("other", "r", "p") == Limit(20.0, "other")
    timeouts.observe("r", "p", timed_out=True, seconds=20.0)
    assert (await timeouts.limit("other", "r", "p")).seconds == 40.0
    timeouts.observe("r", "p", timed_out=True, seconds=40.0)
    assert (await timeouts.limit("other", "r", "p")).seconds == 50.0  # the cap
    timeouts.observe("r", "p", timed_out=False, seconds=50.0)
    assert (await timeouts.limit("other", "r", "p")).seconds == 20.0
    assert reads == 1  # read once, then every REFRESH_INTERVAL
    fixed = Timeouts(TimeoutSetting(seconds=DEFAULT_LIMIT), low=1.0, high=50.0, read=read)
    assert await fixed.limit("other", "r", "p") == Limit(DEFAULT_LIMIT, "fixed")
    assert await Timeouts(TimeoutSetting(), low=1.0, high=2.0).limit("o", "r", "p") is None


def test_an_adaptive_limit_completes_what_a_fixed_one_cut_short_and_ends_a_hang(
        env: Env, make_url: Any) -> None:
    train = [f"train-{n}" for n in range(5)]
    url = make_url([(run, "P1-ok", 0, "FAILED", None)
                    for run in (*train, "slow-a", "slow-b", "hung-a")])
    sleeps = {"SLEEP_BY_RUN": "slow-a=0.9,slow-b=0.9,hung-a=600", "WORKER_SLEEP": "0.5"}
    # A history: five attempts of about half a second, in category "none" (no reason yet).
    trained = env.run_cli("run", *args(env, url, "--lanes", "2", "--skip-run-prefix", "slow",
                                       "--skip-run-prefix", "hung"),
                          env=env.worker_env(**sleeps))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    durations = [r.duration_seconds for r in history(url)]
    assert len(durations) == 5 and all(d >= 0.5 for d in durations)
    # A fixed limit of 0.7 s cuts a slower phase (0.9 s) short.
    fixed = env.run_cli("run", *args(env, url, "--run-id", "slow-b", "--max-attempts-per-phase",
                                     "1", timeout="0.7"), env=env.worker_env(**sleeps))
    assert fixed.returncode == 1, fixed.stdout + fixed.stderr
    assert [r.outcome for r in history(url) if r.run_id == "slow-b"] == ["timed out"]
    # The adaptive limit: 4 x the 95th percentile of the five (about 2.4 s: the slower
    # phase's 0.9 s and its start-up are well within it).
    want = max(0.5, 4 * nearest_rank(durations))
    plan = env.run_cli("plan", *args(env, url, "--min-phase-timeout-seconds", "0.5",
                                     "--skip-run-prefix", "slow-b", timeout="auto:4",
                                     plain=False))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "Time limits (--phase-timeout-seconds auto:4" in plan.stdout
    assert f"limit {want:>6.0f}s" in plan.stdout and "5 samples" in plan.stdout
    auto = env.run_cli("run", *args(env, url, "--min-phase-timeout-seconds", "0.5",
                                    "--skip-run-prefix", "slow-b", "--max-attempts-per-phase",
                                    "1", timeout="auto:4"), env=env.worker_env(**sleeps))
    assert auto.returncode == 1, auto.stdout + auto.stderr  # (the hung one timed out)
    assert f"(limit {want:.0f}s)" in auto.stdout
    records = {r["run_id"]: r for r in next(
        recs for recs in sessions(env).values() if any(r["run_id"] == "hung-a" for r in recs))}
    assert records["slow-a"]["success"] and not records["slow-a"]["timed_out"]
    assert records["hung-a"]["timed_out"] and not records["hung-a"]["success"]
    for run in ("slow-a", "hung-a"):
        assert records[run]["timeout_seconds"] == pytest.approx(want)
    rows = {r.run_id: r for r in history(url) if r.run_id in ("slow-a", "hung-a")}
    assert [r.timeout_seconds for r in rows.values()] == [pytest.approx(want)] * 2
    assert {r.phase_category for r in rows.values()} == {"none"}
    assert "timed out after" in json.dumps(records["hung-a"]["error_message"])


def test_bad_timeout_settings_are_one_line_errors(env: Env, make_url: Any) -> None:
    url = make_url([("run-a", "P1-ok", 0, "FAILED", None)])
    for bad, says in [
        (["--phase-timeout-seconds", "auto:0"], "needs a positive FACTOR"),
        (["--phase-timeout-seconds", "soon"], "takes seconds or auto[:FACTOR]"),
        (["--min-phase-timeout-seconds", "100", "--max-phase-timeout-seconds", "10"],
         "is above --max-phase-timeout-seconds"),
        (["--phase-timeout-seconds", "auto", "--no-history"], "learns from the attempt history"),
    ]:
        proc = env.run_cli("run", "--database-url", url, "--command", f"{sys.executable} -V",
                           "--session-dir", str(env.sessions), *bad)
        assert proc.returncode == 2, (bad, proc.stdout + proc.stderr)
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not env.sessions.exists()
