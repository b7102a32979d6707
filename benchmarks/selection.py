"""Benchmark: start-up load time and per-pick time of drainer's candidate index.

For each backlog size N this builds a real Autopack-schema SQLite file holding N FAILED phases
(spread over about N/5 runs, plus COMPLETE and a few QUEUED phases), then, in a fresh Python
process so that memory figures belong to that size alone:

* times ``open_backlog`` + ``phases.load_candidates`` (``load_s``) and the session's
  :class:`drainer.selection.Selector` building its index (``build_s``), and reads the process
  RSS after the build;
* runs ``--picks`` picks the way a session does with a 0 s worker: ``selector.pick()``, a
  simulated :class:`drainer.models.Attempt` (success, FAILED with one of a few fingerprints, or a
  timeout every 17th), ``policy.started()``, ``policy.observe(attempt)`` and
  ``selector.observe(attempt)`` (attempts per phase, retries, triage). Only ``pick`` is in the
  pick timings; the bookkeeping is timed separately; building the Attempt is not timed.

The target (``../shared/TARGETS.md``): one pick in under 1 ms at 100,000 FAILED phases; the
original controller took 316-394 ms at 10,000 and over 1 s after 250 results, hence the
``late`` column: the mean pick time over the last 10% of picks. When ``--picks`` exceeds the
never-tried phases (the default 2000 picks at N = 1000), picks go on to retries of FAILED phases
(``retries`` / ``retry us`` columns) until nothing is left; the loop stops at the first pick
that returns None, which is counted in the pick timings.

Then, for the memory target (<= 80 MiB at 100,000 phases), the peak RSS of two real drainer
processes on the same file: ``python -m drainer plan`` (``plan peak``) and ``python -m drainer
run --batch-size 20 --command /bin/true`` (``run peak``), and the time from starting that
``run`` to its first ``Draining:`` line (``1st spawn s``; target: under 2 s at 100,000). The
in-process ``peak_mib`` is higher because that process also holds the simulated results of
every pick.

Usage::

    python benchmarks/selection.py [--sizes 1000,10000,100000] [--picks 2000] [--json out.json]

``--json -`` writes the JSON to stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

from _common import machine_info, peak_rss_mib, positive_ints, write_report
from _common import print_table as _print_table

MIB = 1024 * 1024
TARGET_SIZE = 100_000
TARGET_PICK_US = 1000.0
DEFAULT_SIZES = (1000, 10_000, 100_000)
DEFAULT_PICKS = 2000
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-selection.json"
TIMEOUT_EVERY = 17  #: every 17th simulated attempt times out
LATE_FRACTION = 0.10
SEED = 20251208

# last_failure_reason texts, one group per priority category of drainer.selection (none,
# collection/import, deliverable/missing, patch/no-op, other, timeout), with weights.
_REASONS: tuple[tuple[int, tuple[str | None, ...]], ...] = (
    (10, (None, "", "   ")),
    (20, (
        "ImportError: cannot import name 'ResearchOrchestrator' from 'research.core'",
        "ImportError while importing test module tests/test_{n}.py",
        "CI collection error: ModuleNotFoundError: No module named 'autopack_{n}'",
    )),
    (25, (
        "Deliverable missing: src/fileorg/organizer_{n}.py was not created ({k} of 3 produced)",
        "Deliverable missing: tests/test_{n}.py not found in workspace",
    )),
    (15, (
        "Patch apply failed: no-op",
        "Patch apply failed: no-op diff for manifest",
        "Patch rejected: hunk {k} of 4 did not apply",
    )),
    (20, (
        "something else",
        "Auditor rejected: {k} major issues (max 2)",
        "Quality gate blocked: pytest reported {k} failed, 118 passed",
    )),
    (10, (
        "timed out",
        "Phase timed out after {n}s waiting for CI",
        "LLM call timeout after 120s (attempt {k} of 3)",
    )),
)
_REASON_WEIGHTS = [w for w, _ in _REASONS]

# Fingerprints of the simulated failures (the shape drainer.fingerprint produces).
_FINGERPRINTS = (
    "FAILED|rc-1|ImportError: cannot import name <name> from research.core",
    "FAILED|rc-1|Deliverable missing: <path> was not created (<n> of <n> produced)",
    "FAILED|rc-1|Patch apply failed: no-op",
    "FAILED|rc-2|Builder returned invalid JSON: Expecting delimiter: line <n> column <n>",
)
_TIMEOUT_FINGERPRINT = "FAILED|timeout|drainer: worker timed out after <n>s"


# -- the backlog ---------------------------------------------------------------------------


def _reason(rng: random.Random) -> str | None:
    (group,) = rng.choices([g for _, g in _REASONS], weights=_REASON_WEIGHTS)
    text = rng.choice(group)
    if text is None:
        return None
    return text.format(n=rng.randint(1, 999), k=rng.randint(1, 3))


def _run_sizes(failed: int, rng: random.Random) -> Iterator[int]:
    """FAILED phases per run: 1-9 (mean 5) until ``failed`` are placed, so about N/5 runs."""
    left = failed
    while left > 0:
        n = min(left, rng.randint(1, 9))
        left -= n
        yield n


def build_backlog(path: Path, failed: int, *, seed: int = SEED) -> dict[str, int]:
    """Write an Autopack-schema SQLite backlog with ``failed`` FAILED phases; return counts."""
    rng = random.Random(seed + failed)
    schema = files("drainer.demo").joinpath("autopack-schema.sql").read_text(encoding="utf-8")
    runs: list[tuple[str, str]] = []
    tiers: list[tuple[int, str, str, int, str]] = []
    phases: list[tuple[str, str, int, int, str, str, str | None]] = []
    counts = {"runs": 0, "failed": 0, "complete": 0, "queued": 0}
    for r, n_failed in enumerate(_run_sizes(failed, rng)):
        run_id = f"bench-{r:06d}-{rng.choice(('build', 'fileorg', 'research', 'api'))}"
        tier_pk = r + 1
        runs.append((run_id, "RUN_FINISHED"))
        tiers.append((tier_pk, "T1", run_id, 0, "tier 1"))
        n_complete = rng.randint(0, 3)
        n_queued = 1 if rng.random() < 0.02 else 0  # a few runs still have a QUEUED phase
        states = ["FAILED"] * n_failed + ["COMPLETE"] * n_complete + ["QUEUED"] * n_queued
        rng.shuffle(states)  # varied phase_index for the FAILED phases
        for index, state in enumerate(states):
            phase_id = f"p{index:02d}-{rng.choice(('impl', 'tests', 'docs', 'wire', 'fix'))}"
            reason = _reason(rng) if state == "FAILED" else None
            phases.append((phase_id, run_id, tier_pk, index, f"phase {index}", state, reason))
        counts["runs"] += 1
        counts["failed"] += n_failed
        counts["complete"] += n_complete
        counts["queued"] += n_queued
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(schema)
        conn.execute("PRAGMA synchronous=OFF")  # a fixture: durability does not matter here
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs (id, state) VALUES (?, ?)", runs)
        conn.executemany(
            "INSERT INTO tiers (id, tier_id, run_id, tier_index, name) VALUES (?, ?, ?, ?, ?)",
            tiers,
        )
        conn.executemany(
            "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state,"
            " last_failure_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
            phases,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return counts


# -- the measurement (runs in a child process, one per size) -------------------------------


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / MIB




def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def measure(db_path: Path, picks: int) -> dict[str, Any]:
    """Load, build and pick on one backlog file; return the figures (times in us unless _s)."""
    import anyio

    from drainer.backlog import open_backlog
    from drainer.config import DrainConfig
    from drainer.models import Attempt, Candidates
    from drainer.policy import Policy
    from drainer.selection import Selector

    config = DrainConfig(
        database_url=f"sqlite:///{db_path}",
        batch_size=10**9,
        max_fingerprint_repeats=None,
        max_timeouts_per_run=None,
    )
    rss_before = _rss_mib()
    policy = Policy(config)
    pick_ns: list[int] = []
    book_ns: list[int] = []
    retry_ns: list[int] = []  #: picks that returned a phase already tried (the retry path)
    exhausted = False
    clock = time.perf_counter_ns
    figures: dict[str, Any] = {}

    async def session() -> None:
        nonlocal exhausted
        t0 = time.perf_counter()
        async with open_backlog(config.db, config.telemetry_tables) as backlog:
            candidates = await backlog.phases.load_candidates()
        t1 = time.perf_counter()

        async def loaded() -> Candidates:
            return candidates

        # The session's own Selector, on this one load (no reloads: the file does not change).
        selector = Selector(loaded, max_attempts_per_phase=config.max_attempts_per_phase,
                            reloads=False)
        await selector.load()
        t2 = time.perf_counter()
        figures.update(failed_loaded=candidates.failed,
                       queued_loaded=len(candidates.queued) - candidates.failed,
                       indexed=selector.candidates,
                       runs_indexed=len(candidates.runs), load_s=t1 - t0,
                       build_s=t2 - t1, rss_mib=_rss_mib())
        for i in range(picks):
            t0_ns = clock()
            ref = await selector.pick()
            t1_ns = clock()
            pick_ns.append(t1_ns - t0_ns)
            if ref is None:  # nothing left, retries included: where a session stops
                exhausted = True
                break
            previous = selector.attempts_of(ref)
            if previous > 0:
                retry_ns.append(t1_ns - t0_ns)
            policy.started()
            if i % TIMEOUT_EVERY == TIMEOUT_EVERY - 1:
                final_state, success, fp, events = "FAILED", False, _TIMEOUT_FINGERPRINT, 0
            elif i % 5 < 2:
                final_state, success, fp, events = "COMPLETE", True, None, 1 + i % 4
            else:
                final_state, success, fp, events = "FAILED", False, _FINGERPRINTS[i % 4], 0
            attempt = Attempt(
                run_id=ref.run_id,
                phase_id=ref.phase_id,
                phase_index=ref.phase_index,
                initial_state=ref.state,
                attempt_id=f"bench-{i:07d}",
                attempt_number=previous + 1,
                lane=0,
                started_at="2025-12-08T09:00:00Z",
                final_state=final_state,
                success=success,
                failure_fingerprint=fp,
                telemetry_events_collected=events,
                timed_out=fp == _TIMEOUT_FINGERPRINT,
            )
            t2_ns = clock()
            run_stops, _stop = policy.observe(attempt)  # as the scheduler does after each one
            selector.observe(attempt, fingerprint_seen_before=policy.fingerprints.seen_before(fp))
            for stop in run_stops:
                selector.stop_run(stop.run_id)
            book_ns.append(clock() - t2_ns)

    anyio.run(session)
    rss_after_build = figures.pop("rss_mib")
    load_s, build_s = figures.pop("load_s"), figures.pop("build_s")

    pick_us = [ns / 1000 for ns in pick_ns]
    ordered = sorted(pick_us)
    late = pick_us[-max(1, round(len(pick_us) * LATE_FRACTION)):]
    total_pick_s = sum(pick_ns) / 1e9
    return {
        **figures,
        "load_s": load_s,
        "build_s": build_s,
        "rss_before_load_mib": rss_before,
        "rss_mib": rss_after_build,
        "rss_after_picks_mib": _rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "picks": len(pick_us),
        "retry_picks": len(retry_ns),
        "retry_pick_mean_us": statistics.fmean(retry_ns) / 1000 if retry_ns else None,
        "exhausted": exhausted,
        "pick_mean_us": statistics.fmean(pick_us),
        "pick_median_us": statistics.median(pick_us),
        "pick_p99_us": _percentile(ordered, 0.99),
        "pick_max_us": ordered[-1],
        "picks_per_s": len(pick_us) / total_pick_s if total_pick_s > 0 else float("inf"),
        "bookkeeping_mean_us": statistics.fmean(book_ns) / 1000 if book_ns else 0.0,
        "late_picks": len(late),
        "late_mean_us": statistics.fmean(late),
    }


# -- the driver ----------------------------------------------------------------------------


def drainer_process(db_path: Path, workdir: Path, *command: str) -> dict[str, float | None]:
    """Peak RSS (MiB) of a real ``python -m drainer`` process on the backlog, the figure
    TARGETS.md's memory row is about (the in-process measure above also holds the
    benchmark's own simulated results), and the seconds from its start to its first
    ``Draining:`` line (the first spawn), if it has one."""
    argv = [sys.executable, "-m", "drainer", *command, "--database-url", f"sqlite:///{db_path}",
            "--session-dir", str(workdir / "sessions"), "--workspace", str(workdir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_spawn_s = None
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if first_spawn_s is None and "Draining:" in line:
            first_spawn_s = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):  # 1: attempts failed, expected with /bin/true
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "first_spawn_s": first_spawn_s}


def run_size(size: int, picks: int, workdir: Path) -> dict[str, Any]:
    db_path = workdir / f"backlog-{size}.db"
    t0 = time.perf_counter()
    counts = build_backlog(db_path, size)
    fixture_s = time.perf_counter() - t0
    # A fresh interpreter per size: RSS and start-up figures are not inflated by earlier sizes.
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(db_path), "--picks", str(picks)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"measuring size {size} failed:\n{child.stderr}")
    result: dict[str, Any] = json.loads(child.stdout)
    plan = drainer_process(db_path, workdir, "plan", "--batch-size", "10")
    run = drainer_process(db_path, workdir, "run", "--batch-size", "20", "--command", "/bin/true",
                          "--plain", "--max-attempts-per-phase", "1")
    result["plan_peak_rss_mib"] = plan["peak_rss_mib"]
    result["run_peak_rss_mib"] = run["peak_rss_mib"]
    result["first_spawn_s"] = run["first_spawn_s"]
    db_mib = db_path.stat().st_size / MIB
    db_path.unlink()
    return {
        "size": size,
        "runs": counts["runs"],
        "complete_phases": counts["complete"],
        "queued_phases": counts["queued"],
        "db_mib": db_mib,
        "fixture_build_s": fixture_s,
        **result,
    }


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("N", "size", "{:,}"),
    ("runs", "runs", "{:,}"),
    ("load_s", "load_s", "{:.3f}"),
    ("build_s", "build_s", "{:.3f}"),
    ("rss_mib", "rss_mib", "{:.1f}"),
    ("peak_mib", "peak_rss_mib", "{:.1f}"),
    ("plan peak", "plan_peak_rss_mib", "{:.1f}"),
    ("run peak", "run_peak_rss_mib", "{:.1f}"),
    ("1st spawn s", "first_spawn_s", "{:.2f}"),
    ("pick mean us", "pick_mean_us", "{:.1f}"),
    ("median us", "pick_median_us", "{:.1f}"),
    ("p99 us", "pick_p99_us", "{:.1f}"),
    ("max us", "pick_max_us", "{:.1f}"),
    ("picks/s", "picks_per_s", "{:,.0f}"),
    ("bookkeep us", "bookkeeping_mean_us", "{:.1f}"),
    ("late us", "late_mean_us", "{:.1f}"),
    ("retries", "retry_picks", "{:,}"),
    ("retry us", "retry_pick_mean_us", "{:.1f}"),
)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    _print_table(rows, _COLUMNS, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=positive_ints("--sizes", "1000,10000"),
                        default=list(DEFAULT_SIZES),
                        help="FAILED phases per backlog, comma separated (default: %(default)s)")
    parser.add_argument("--picks", type=int, default=DEFAULT_PICKS,
                        help="picks per size (default: %(default)s)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.picks < 1:
        parser.error("--picks must be at least 1")

    if args.measure is not None:
        json.dump(measure(args.measure, args.picks), sys.stdout)
        return 0

    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="drainer-bench-") as tmp:
        for size in args.sizes:
            print(f"size {size:,}: building backlog and measuring...", file=sys.stderr, flush=True)
            rows.append(run_size(size, args.picks, Path(tmp)))
    print_table(rows, out)

    at_target = [r for r in rows if r["size"] == TARGET_SIZE]
    for r in at_target:
        r["meets_target"] = r["pick_p99_us"] < TARGET_PICK_US
    report = {
        "benchmark": "selection",
        "picks_requested": args.picks,
        "target": {
            "size": TARGET_SIZE,
            "pick_us_below": TARGET_PICK_US,
            "statistic": "pick_p99_us",
            "source": "shared/TARGETS.md: one pick from the backlog < 1 ms at 100,000",
        },
        "machine": machine_info(),
        "results": rows,
    }
    for r in at_target:
        verdict = "meets" if r["meets_target"] else "MISSES"
        print(f"\nat {TARGET_SIZE:,}: p99 pick {r['pick_p99_us']:.1f} us {verdict} the "
              f"< {TARGET_PICK_US:.0f} us target", file=out)
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
