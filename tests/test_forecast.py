"""``drainer forecast``: per category of the phases left, success rate, duration and
telemetry from a history of real attempts, with intervals; wall time at the chosen lanes;
and a back-test against each past session. The simulated backlog has known success rates per
category; the worker's draws are fixed by a hash of the phase and its attempt number, so the
test is the same at every run (each draw is independent, as the model assumes)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, journal_results
from drainer.backlog.history import Tally
from drainer.forecast import Forecast, Interval, backtest, forecast_categories, tries, wilson

RATES = {"imp": 0.3, "del": 0.7}  #: the worker's success rate by phase kind
REASONS = {"imp": "ImportError: cannot import name 'X' from 'pkg'",
           "del": "Deliverable missing: src/x.py"}
CATEGORY = {"imp": "collection/import", "del": "deliverable/missing"}

# Succeeds with its kind's rate: a hash of (phase, attempt number) is the draw. Telemetry:
# one event per success. Both databases (PostgreSQL through psql).
WORKER = textwrap.dedent(
    """
    import hashlib, os, sqlite3, sys
    run_id, phase_id = sys.argv[1], sys.argv[2]
    kind = phase_id.split("-")[0]
    rate = {"imp": 0.3, "del": 0.7}[kind]
    count = os.path.join(os.environ["TEST_OUT"], f"{run_id}.{phase_id}.n")
    with open(count, "a+") as fh:
        fh.write("x")
        fh.seek(0)
        n = len(fh.read())
    digest = hashlib.sha256(f"{run_id}/{phase_id}/{n}".encode()).digest()
    ok = int.from_bytes(digest[:8], "big") / 2 ** 64 < rate
    reason = None if ok else {"imp": "ImportError: cannot import name 'X' from 'pkg'",
                              "del": "Deliverable missing: src/x.py"}[kind]
    state = "COMPLETE" if ok else "FAILED"
    url = os.environ["DATABASE_URL"]
    update = ("UPDATE phases SET state = {s}, last_failure_reason = {s} WHERE run_id = {s} "
              "AND phase_id = {s}")
    event = ("INSERT INTO token_estimation_v2_events (run_id, phase_id, timestamp, category, "
             "complexity, deliverable_count, deliverables_json, predicted_output_tokens, "
             "actual_output_tokens, selected_budget, success, truncated) VALUES ({s}, {s}, "
             "'2026-01-01', 'c', 'low', 1, '[]', 1, 1, 1, {t}, {f})")
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):].split("?")[0], timeout=30)
        if ok:
            db.execute(event.format(s="?", t=1, f=0), (run_id, phase_id))
        db.execute(update.format(s="?"), (state, reason, run_id, phase_id))
        db.commit()
    else:  # psql, quicker to start than asyncpg; it quotes the values itself (:'name')
        import subprocess
        sql = (event.replace("{s}", ":'run'", 1).replace("{s}", ":'phase'", 1)
               .format(t="true", f="false") + ";\\n") if ok else ""
        sql += update.replace("{s}", ":'state'", 1).replace("{s}", "NULLIF(:'reason', '')", 1) \
            .replace("{s}", ":'run'", 1).replace("{s}", ":'phase'", 1) + ";\\n"
        values = {"run": run_id, "phase": phase_id, "state": state, "reason": reason or ""}
        args = [a for k, v in values.items() for a in ("-v", f"{k}={v}")]
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *args, url], input=sql,
                       text=True, check=True, stdout=subprocess.DEVNULL)
    sys.exit(0 if ok else 1)
    """
)

PHASES = [(f"run-{r:02d}", f"{kind}-{i}", i, "FAILED", REASONS[kind])
          for r in range(12) for i, kind in enumerate(["imp", "del", "imp", "del"])]


def _args(env: Env, url: str, *more: str) -> list[str]:
    worker = env.tmp / "forecast_worker.py"
    worker.write_text(WORKER)
    return ["--database-url", url, "--command", f"{sys.executable} {worker} {{run_id}} "
            "{phase_id}", "--session-dir", str(env.sessions), "--retry-backoff-seconds", "0",
            "--max-fingerprint-repeats", "1000", *more]


# On PostgreSQL only (the suite's time): the history's figures are one query, and SQLite's
# runs in the README walk-through and the demo's test.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_forecast_learns_the_known_rates_and_its_back_test_holds(
        env: Env, make_url: Any) -> None:
    if shutil.which("psql") is None:  # (PostgreSQL's client: the worker writes through it)
        if os.environ.get("DRAINER_REQUIRE_PG"):
            raise RuntimeError("psql is not installed")
        pytest.skip("psql is not installed")
    url = make_url(PHASES)
    empty = env.run_cli("forecast", *_args(env, url))
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert "nothing to forecast from: the history has no attempts yet" in empty.stdout
    for _ in range(3):  # three sessions, one after the other, on one lane
        proc = env.run_cli("run", *_args(env, url, "--batch-size", "40", "--plain"))
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    html = env.tmp / "forecast.html"
    proc = env.run_cli("forecast", *_args(env, url, "--lanes", "4", "--batch-size", "10",
                                          "--json", "--html", str(html)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    sizes = [len(journal_results(env.sessions / snap.stem))
             for snap in sorted(env.sessions.glob("batch-drain-*.json"))]
    assert report["history_attempts"] == sum(sizes) and len(sizes) == 3
    by_category = {c["category"]: c for c in report["categories"]}
    assert set(by_category) <= set(CATEGORY.values()) and by_category
    for kind, category in CATEGORY.items():
        if category not in by_category:
            continue  # every phase of the kind drained
        c = by_category[category]
        assert c["basis"] == category and c["samples"] >= 30
        rate = c["success_rate"]
        assert rate["low"] <= RATES[kind] <= rate["high"], (kind, rate)
        tel = c["telemetry_per_attempt"]  # one event per success
        assert rate["low"] <= tel["value"] <= rate["high"]
        assert c["attempts"]["low"] <= c["attempts"]["value"] <= c["attempts"]["high"]
    assert report["phases_left"] == sum(c["phases"] for c in report["categories"]) > 0
    assert report["lanes"] == min(4, report["runs_left"])
    assert report["wall_seconds"]["value"] > 0
    # The back-test: sessions 2 and 3, each forecast from those before it.
    checks = report["backtest"]
    assert [c["attempts"] for c in checks] == sizes[1:]
    for check in checks:
        assert check["success_within"], check
    assert report["backtest_within"] == 2
    assert 'id="chart-backtest"' in html.read_text()
    text = env.run_cli("forecast", *_args(env, url, "--lanes", "4"))
    assert "2 of 2 within the success interval" in text.stdout
    assert "wall time at" in text.stdout


def _tally(session: str, category: str, attempts: int, ok: int, start: float,
           seconds: float = 1.0) -> Tally:
    return Tally(session, category, attempts, ok, seconds * attempts,
                 seconds * seconds * attempts, attempts, float(ok), float(ok), start,
                 start + attempts)


def test_the_model_on_known_figures() -> None:
    assert wilson(0, 0) == Interval(0.0, 0.0, 1.0)
    w = wilson(30, 100)
    assert w.value == 0.3 and w.low == pytest.approx(0.219, abs=1e-3) \
        and w.high == pytest.approx(0.396, abs=1e-3)
    assert tries(0.5, 2) == (1.5, 0.75) and tries(0.0, 3) == (3.0, 0.0)
    # A category with fewer than 5 attempts takes every category's figures.
    found = {c.category: c for c in forecast_categories(
        {"a": 10, "b": 4}, [_tally("s1", "a", 20, 10, 0), _tally("s1", "b", 3, 3, 0)], 1)}
    assert found["a"].basis == "a" and found["a"].success.value == 0.5
    assert found["b"].basis == "all categories" and found["b"].samples == 23
    assert found["a"].drained.value == pytest.approx(5.0)
    # The back-test reads only the sessions ended before each session began.
    checks = backtest([_tally("s1", "a", 20, 10, 0), _tally("s2", "a", 20, 19, 100),
                       _tally("s3", "a", 20, 10, 10)])  # s3 overlaps s1: not before it
    assert [c.session_id for c in checks] == ["s2"]
    assert checks[0].actual_success == 0.95 and not checks[0].success.holds(0.95)


def test_every_interval_keeps_its_value_inside() -> None:
    # At 0 or n successes rounding once left a bound past the value: a category that never
    # succeeded read "50 (30-0) attempts".
    for n in range(1, 80):
        for ok in range(n + 1):
            w = wilson(ok, n)
            assert 0.0 <= w.low <= w.value <= w.high <= 1.0, (ok, n, w)
    assert wilson(0, 11).low == 0.0 and wilson(6, 6).high == 1.0
    assert tries(1e-17, 5) == (5.0, pytest.approx(5e-17))
    assert tries(1.0, 3) == (1.0, 1.0)
    for n, ok in [(11, 0), (6, 6), (44, 0), (30, 29), (7, 3), (13, 5)]:
        for limit in (1, 2, 5):
            (c,) = forecast_categories({"a": 10}, [_tally("s1", "a", n, ok, 0)], limit)
            for found in (c.success, c.seconds, c.attempts, c.drained):
                assert found.low <= found.value <= found.high, (n, ok, limit, c)


def test_one_sessions_wall_time_counts_its_own_attempts() -> None:
    # Every attempt takes exactly 10 s: a batch of 10 on one lane takes 100 s, whatever the
    # uncertainty of how many attempts the whole backlog needs.
    tally = Tally("s1", "a", 60, 30, 600.0, 6000.0, 60, 30.0, 30.0, 0.0, 600.0)
    found = Forecast(source="x", lanes=1, runs=5, max_attempts=2, batch_size=10,
                     history_attempts=60, left={"a": 100},
                     categories=forecast_categories({"a": 100}, [tally], 2))
    assert found.batch_wall_seconds == Interval(100.0, 100.0, 100.0)
    drained = found.batch_drained
    assert drained.value == pytest.approx(5.0) and drained.low < 5.0 < drained.high
    # A batch that outlasts the backlog drains what the backlog gives, no more.
    small = Forecast(source="x", lanes=1, runs=5, max_attempts=2, batch_size=14,
                     history_attempts=60, left={"a": 10},
                     categories=forecast_categories({"a": 10}, [tally], 2))
    whole = small.total("drained")
    assert small.batch_drained.high <= whole.high and small.batch_drained.value <= whole.value
    large = Forecast(source="x", lanes=1, runs=5, max_attempts=2, batch_size=1000,
                     history_attempts=60, left={"a": 10},
                     categories=forecast_categories({"a": 10}, [tally], 2))
    assert large.batch_wall_seconds == large.wall_seconds
    assert large.batch_drained == large.total("drained")


def test_forecast_needs_a_database(env: Env, tmp_path: Path) -> None:
    proc = env.run_cli("forecast", "--database-url", f"sqlite:///{tmp_path}/none.db")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
