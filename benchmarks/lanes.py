"""Benchmark: wall time, throughput, speedup and efficiency of ``--lanes`` on a sleep-bound backlog.

A synthetic Autopack-schema SQLite backlog holds ``--runs`` runs of ``--phases-per-run`` FAILED
phases each. For every lane count L in ``--lanes``, a FRESH copy of that backlog is drained by
:func:`drainer.drain` (``batch_size`` = every phase, ``lanes`` = L, ``phase_timeout`` 60 s, no
fingerprint or timeout stop rules) in a fresh Python process, so that the peak RSS (VmHWM) is
drainer's at that lane count alone. The worker is a tiny standalone script (stdlib ``sqlite3``
only) that sleeps ``--sleep`` seconds, sets its phase COMPLETE and exits 0, so the backlog is
sleep-bound: the ideal speedup at L lanes is ``min(L, runs)`` (drainer never runs two phases of
one run at once), and

* ``speedup`` = wall time at 1 lane / wall time at L lanes;
* ``efficiency`` = speedup / min(L, runs); the target (``../shared/TARGETS.md``) is
  efficiency >= 0.9 at 8 lanes;
* ``ideal_s`` = the sleep-only lower bound, ``max(ceil(runs * phases / L), phases) * sleep``
  (no worker start-up, no drainer overhead);
* ``vs_ideal`` = ideal_s / wall_s: how close to the sleep-only bound, independent of the
  1-lane baseline (it also charges the worker's own start-up to drainer);
* ``all_complete``: every phase of the copy ended COMPLETE and drainer reported one successful
  attempt per phase.

One drain per lane count is noisy on a shared machine (a 1-lane baseline slowed by a neighbour
inflates every efficiency); ``--repeat K`` drains K fresh copies per lane count and reports the
median wall time (and the largest peak RSS), at K times the cost.

Wall time runs from just before ``anyio.run(drain, ...)`` to its return (event loop, engine,
schema check and session files included), in the child, with drainer already imported.

Cost of the defaults (64 runs x 2 phases x 0.5 s, lanes 1,2,4,8,16): the sleeps alone take
64 + 32 + 16 + 8 + 4 = 124 s; with worker start-up (~20-80 ms per attempt on a 2-core machine)
and drainer's overhead the whole benchmark takes about 2.5 minutes. The cost grows linearly
with runs x phases-per-run x sleep (and with ``--repeat``).

Usage::

    python benchmarks/lanes.py [--runs 64] [--phases-per-run 2] [--sleep 0.5]
                               [--lanes 1,2,4,8,16] [--repeat 1] [--json PATH|-]

``--json -`` writes the JSON to stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

from _common import (
    add_backlog_options,
    check_backlog_options,
    machine_info,
    peak_rss_mib,
    positive_ints,
    write_report,
)
from _common import print_table as _print_table

MIB = 1024 * 1024
DEFAULT_RUNS = 64
DEFAULT_PHASES_PER_RUN = 2
DEFAULT_SLEEP = 0.5
DEFAULT_LANES = (1, 2, 4, 8, 16)
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-lanes.json"
TARGET_LANES = 8
TARGET_EFFICIENCY = 0.9
PHASE_TIMEOUT = 60.0

# The worker: stdlib only and as little as possible, so its start-up stays small. It sleeps
# argv[1] seconds, then moves its phase to COMPLETE (the contract) and exits 0; exit 3 tells
# that the phase it was given does not exist.
WORKER = textwrap.dedent(
    """\
    import os, sqlite3, sys, time
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    if seconds > 0:
        time.sleep(seconds)
    db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30,
                         isolation_level=None)
    cur = db.execute("UPDATE phases SET state = 'COMPLETE' WHERE run_id = ? AND phase_id = ?",
                     (os.environ["DRAINER_RUN_ID"], os.environ["DRAINER_PHASE_ID"]))
    db.close()
    sys.exit(0 if cur.rowcount == 1 else 3)
    """
)


# -- the backlog ---------------------------------------------------------------------------


def build_backlog(path: Path, runs: int, phases_per_run: int) -> None:
    """Write an Autopack-schema SQLite file: ``runs`` runs x ``phases_per_run`` FAILED phases."""
    schema = files("drainer.demo").joinpath("autopack-schema.sql").read_text(encoding="utf-8")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(schema)
        conn.execute("PRAGMA synchronous=OFF")  # a fixture: durability does not matter here
        conn.execute("BEGIN")
        for r in range(runs):
            run_id = f"lanes-{r:05d}"
            conn.execute("INSERT INTO runs (id, state) VALUES (?, 'RUN_FINISHED')", (run_id,))
            tier_pk = conn.execute(
                "INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES ('T1', ?, 0, 't')",
                (run_id,),
            ).lastrowid
            conn.executemany(
                "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state,"
                " last_failure_reason) VALUES (?, ?, ?, ?, ?, 'FAILED', ?)",
                [
                    (f"p{i:02d}", run_id, tier_pk, i, f"phase {i}",
                     "Deliverable missing: src/x.py was not created")
                    for i in range(phases_per_run)
                ],
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def phase_state_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT state, COUNT(*) FROM phases GROUP BY state").fetchall()
    finally:
        conn.close()
    return {str(state): int(n) for state, n in rows}


# -- the measurement (runs in a child process, one per lane count) -------------------------




def measure(
    db_path: Path, worker: Path, session_dir: Path, lanes: int, sleep: float
) -> dict[str, Any]:
    """Drain ``db_path`` once with ``lanes`` lanes; return the figures."""
    import anyio

    from drainer import SessionSummary, drain, iter_attempts
    from drainer.config import DrainConfig

    total = sum(phase_state_counts(db_path).values())
    config = DrainConfig(
        database_url=f"sqlite:///{db_path}",
        command=[sys.executable, str(worker), repr(sleep)],
        session_dir=session_dir,
        batch_size=total,
        lanes=lanes,
        phase_timeout=PHASE_TIMEOUT,
        max_fingerprint_repeats=None,
        max_timeouts_per_run=None,
    )

    async def run() -> SessionSummary:
        return await drain(config, echo=lambda _line: None)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    summary = anyio.run(run)
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    peak = peak_rss_mib()
    states = phase_state_counts(db_path)
    worker_s = [r.subprocess_duration_seconds for r in iter_attempts(summary.journal_path)]
    return {
        "wall_s": wall_s,
        "drainer_cpu_s": cpu_s,
        "peak_rss_mib": peak,
        "phases": total,
        "attempts": summary.total_processed,
        "succeeded": summary.total_success,
        "failed": summary.total_failed,
        "stop_reason": summary.stop_reason,
        "lanes_used": len({r.lane for r in iter_attempts(summary.journal_path)}),
        "worker_mean_s": sum(worker_s) / len(worker_s) if worker_s else 0.0,
        "final_states": states,
        "all_complete": (
            states.get("COMPLETE", 0) == total
            and summary.total_success == total
            and summary.total_processed == total
        ),
    }


# -- the driver ----------------------------------------------------------------------------




def ideal_wall_s(runs: int, phases_per_run: int, sleep: float, lanes: int) -> float:
    """Sleep-only lower bound: at most ``lanes`` phases at once, one phase per run at once."""
    return max(math.ceil(runs * phases_per_run / lanes), phases_per_run) * sleep


def run_lanes(
    lanes: int, template: Path, worker: Path, workdir: Path, sleep: float, repeat: int
) -> dict[str, Any]:
    """Drain ``repeat`` fresh copies with ``lanes`` lanes; the median wall time, the worst
    of everything else."""
    drains = [_drain_copy(lanes, template, worker, workdir, sleep) for _ in range(repeat)]
    walls = [d["wall_s"] for d in drains]
    median = sorted(drains, key=lambda d: d["wall_s"])[(len(drains) - 1) // 2]
    return {
        "lanes": lanes,
        **median,
        "peak_rss_mib": max(d["peak_rss_mib"] for d in drains),
        "all_complete": all(d["all_complete"] for d in drains),
        "wall_s_each": walls,
    }


def _drain_copy(
    lanes: int, template: Path, worker: Path, workdir: Path, sleep: float
) -> dict[str, Any]:
    db_path = workdir / f"backlog-{lanes}.db"
    shutil.copyfile(template, db_path)  # a fresh copy: every lane count starts all FAILED
    session_dir = workdir / f"sessions-{lanes}"
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(db_path), "--worker-path", str(worker),
         "--session-dir", str(session_dir), "--lanes", str(lanes), "--sleep", repr(sleep)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"measuring {lanes} lane(s) failed:\n{child.stderr}")
    result: dict[str, Any] = json.loads(child.stdout)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(session_dir, ignore_errors=True)
    return result


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("lanes", "lanes", "{}"),
    ("ideal", "ideal_speedup", "{}"),
    ("ideal_s", "ideal_s", "{:.1f}"),
    ("wall_s", "wall_s", "{:.2f}"),
    ("phases/s", "phases_per_s", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}"),
    ("efficiency", "efficiency", "{:.3f}"),
    ("vs_ideal", "vs_ideal", "{:.3f}"),
    ("cpu_s", "drainer_cpu_s", "{:.2f}"),
    ("peak_mib", "peak_rss_mib", "{:.1f}"),
    ("attempts", "attempts", "{}"),
    ("all_complete", "all_complete", "{}"),
)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    _print_table(rows, _COLUMNS, out)




def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_backlog_options(parser, runs=DEFAULT_RUNS, phases_per_run=DEFAULT_PHASES_PER_RUN,
                        sleep=DEFAULT_SLEEP)
    parser.add_argument("--lanes", default=",".join(map(str, DEFAULT_LANES)),
                        help="lane counts, comma separated (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="drains per lane count; the median wall time is reported "
                             "(default: %(default)s)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    # child mode
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--session-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_backlog_options(parser, args)
    try:
        lane_counts = sorted(set(positive_ints("--lanes", "1,2,4,8")(args.lanes)))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    if args.measure is not None:
        if len(lane_counts) != 1 or args.worker_path is None or args.session_dir is None:
            parser.error("--measure needs one --lanes, --worker-path and --session-dir")
        result = measure(args.measure, args.worker_path, args.session_dir, lane_counts[0],
                         args.sleep)
        json.dump(result, sys.stdout)
        return 0

    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    runs, per_run, sleep = args.runs, args.phases_per_run, args.sleep
    total = runs * per_run
    expected = {n: ideal_wall_s(runs, per_run, sleep, n) for n in lane_counts}
    print(f"{runs} runs x {per_run} phases = {total} phases, worker sleeps {sleep:g} s; "
          "ideal (sleep-only) wall time per lane count: "
          + ", ".join(f"{n}: {s:.1f} s" for n, s in expected.items())
          + f"; about {sum(expected.values()) * args.repeat:.0f} s of sleeps in all",
          file=out, flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="drainer-bench-lanes-") as tmp:
        workdir = Path(tmp)
        worker = workdir / "worker.py"
        worker.write_text(WORKER, encoding="utf-8")
        template = workdir / "template.db"
        build_backlog(template, runs, per_run)
        for n in lane_counts:
            print(f"{n} lane(s): draining {args.repeat} fresh copy(ies) "
                  f"(ideal {expected[n]:.1f} s each)...", file=sys.stderr, flush=True)
            rows.append(run_lanes(n, template, worker, workdir, sleep, args.repeat))

    base = next((r for r in rows if r["lanes"] == 1), None)
    for r in rows:
        ideal = min(r["lanes"], runs)
        r["ideal_speedup"] = ideal
        r["ideal_s"] = expected[r["lanes"]]
        r["phases_per_s"] = r["attempts"] / r["wall_s"] if r["wall_s"] > 0 else None
        r["speedup"] = base["wall_s"] / r["wall_s"] if base is not None else None
        r["efficiency"] = r["speedup"] / ideal if r["speedup"] is not None else None
        r["vs_ideal"] = r["ideal_s"] / r["wall_s"] if r["wall_s"] > 0 else None
    print_table(rows, out)

    at_target = next((r for r in rows if r["lanes"] == TARGET_LANES), None)
    meets: bool | None = None
    if at_target is not None and at_target["efficiency"] is not None:
        meets = at_target["efficiency"] >= TARGET_EFFICIENCY and at_target["all_complete"]
        verdict = "meets" if meets else "MISSES"
        print(f"\nat {TARGET_LANES} lanes: efficiency {at_target['efficiency']:.3f} {verdict} "
              f"the >= {TARGET_EFFICIENCY} target", file=out)
    elif base is None:
        print("\n(no 1-lane row: speedup and efficiency need --lanes to include 1)", file=out)
    if not all(r["all_complete"] for r in rows):
        print("WARNING: some phases did not end COMPLETE (see all_complete)", file=out)
    report = {
        "benchmark": "lanes",
        "runs": runs,
        "phases_per_run": per_run,
        "phases": total,
        "sleep_s": sleep,
        "repeat": args.repeat,
        "statistic": "median wall time over repeat drains per lane count",
        "phase_timeout_s": PHASE_TIMEOUT,
        "worker": [sys.executable, "worker.py", repr(sleep)],
        "target": {
            "lanes": TARGET_LANES,
            "efficiency_at_least": TARGET_EFFICIENCY,
            "ideal_speedup": "min(lanes, runs)",
            "source": "shared/TARGETS.md: efficiency >= 0.9 at 8 lanes on a sleep-bound backlog",
            "met": meets,
        },
        "machine": machine_info(),
        "results": rows,
    }
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
