"""Benchmark: drainer's per-attempt overhead against a plain spawn-and-wait loop.

The backlog is a synthetic Autopack-schema SQLite file of ``--attempts`` runs with one FAILED
phase each. For each worker, in the same process and alternating in ``--rounds`` rounds (the
median round is reported, to damp noise):

* **plain**: a loop that, for each phase in turn, calls ``subprocess.run(worker)`` with the
  environment drainer gives a worker (``DATABASE_URL``, ``DRAINER_RUN_ID``,
  ``DRAINER_PHASE_ID``, ``DRAINER_ATTEMPT_ID``...), stdin closed and stdout/stderr captured,
  on a fresh copy of the backlog; the total wall time.
* **drainer**: :func:`drainer.drain` with ``lanes=1``, ``batch_size`` = every phase,
  ``max_attempts_per_phase=1`` and no fingerprint/timeout stop rules, on another fresh copy;
  the wall time of ``anyio.run(drain, ...)`` from after the copy is made to its return
  (event loop, engine, schema check, session files and final snapshot included).

Workers:

* ``noop`` (alias ``python``): a tiny standalone Python script (stdlib ``sqlite3`` only) that
  sets its phase COMPLETE and exits 0: the realistic minimal worker.
* ``true``: ``/bin/true``. It changes nothing, so under drainer every attempt "fails" (the
  phase stays FAILED) and is recorded as such; that is fine: only the cost is measured.

Reported per worker: ms per attempt for each loop, ``ratio`` = drainer / plain and
``overhead_ms`` = (drainer - plain) / attempts. Targets (``../shared/TARGETS.md``): ratio <=
1.10 for a Python worker, drainer's CPU <= 3 ms per attempt with ``/bin/true``.
``in_worker_ms`` is drainer's own measure of the worker's run time (spawn to exit), so
``drainer_ms - in_worker_ms`` is the time drainer spends around each worker.

Cost of the defaults: about 3 x 200 x (2 x worker start-up + overhead), roughly half a minute
to a minute on a 2-core machine.

Usage::

    python benchmarks/overhead.py [--attempts 200] [--worker noop,true] [--rounds 3]
                                  [--json PATH|-]

``--json -`` writes the JSON to stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

from _common import machine_info, write_report
from _common import print_table as _print_table

DEFAULT_ATTEMPTS = 200
DEFAULT_ROUNDS = 3
DEFAULT_WORKERS = ("noop", "true")
WORKER_ALIASES = {"noop": "noop", "python": "noop", "true": "true"}
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-overhead.json"
TARGET_RATIO = 1.10  #: for a Python worker (noop)
TARGET_CPU_MS = 3.0  #: drainer's CPU per attempt with /bin/true (SQLite, one lane)
PHASE_TIMEOUT = 60.0

# The noop worker: stdlib only and as little as possible, so its start-up stays small. It
# moves its phase to COMPLETE (the contract) and exits 0; exit 3: the phase does not exist.
NOOP_WORKER = textwrap.dedent(
    """\
    import os, sqlite3, sys
    db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30,
                         isolation_level=None)
    cur = db.execute("UPDATE phases SET state = 'COMPLETE' WHERE run_id = ? AND phase_id = ?",
                     (os.environ["DRAINER_RUN_ID"], os.environ["DRAINER_PHASE_ID"]))
    db.close()
    sys.exit(0 if cur.rowcount == 1 else 3)
    """
)


# -- the backlog ---------------------------------------------------------------------------


def build_backlog(path: Path, runs: int) -> list[tuple[str, str]]:
    """Write ``runs`` runs with one FAILED phase each; return the (run_id, phase_id) keys."""
    schema = files("drainer.demo").joinpath("autopack-schema.sql").read_text(encoding="utf-8")
    keys = [(f"overhead-{r:05d}", "p00") for r in range(runs)]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(schema)
        conn.execute("PRAGMA synchronous=OFF")  # a fixture: durability does not matter here
        conn.execute("BEGIN")
        for run_id, phase_id in keys:
            conn.execute("INSERT INTO runs (id, state) VALUES (?, 'RUN_FINISHED')", (run_id,))
            tier_pk = conn.execute(
                "INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES ('T1', ?, 0, 't')",
                (run_id,),
            ).lastrowid
            conn.execute(
                "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state,"
                " last_failure_reason) VALUES (?, ?, ?, 0, 'phase 0', 'FAILED', ?)",
                (phase_id, run_id, tier_pk, "Deliverable missing: src/x.py was not created"),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return keys


def complete_count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM phases WHERE state = 'COMPLETE'")
                   .fetchone()[0])
    finally:
        conn.close()


def fresh_copy(template: Path, path: Path) -> Path:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, path)
    return path


# -- the two loops -------------------------------------------------------------------------


def plain_loop(
    argv: Sequence[str], db_path: Path, keys: Sequence[tuple[str, str]], cwd: Path
) -> dict[str, Any]:
    """Spawn and wait for the worker once per phase, sequentially; the environment drainer
    would give it, stdin closed, output captured (as any supervisor must)."""
    base = dict(os.environ)
    base.update({"PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8", "TELEMETRY_DB_ENABLED": "1",
                 "DATABASE_URL": f"sqlite:///{db_path}", "DRAINER_SESSION_ID": "plain-loop"})
    bad = 0
    t0 = time.perf_counter()
    for run_id, phase_id in keys:
        env = {**base, "DRAINER_ATTEMPT_ID": str(uuid.uuid4()), "DRAINER_RUN_ID": run_id,
               "DRAINER_PHASE_ID": phase_id}
        proc = subprocess.run(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
        bad += proc.returncode != 0
    wall_s = time.perf_counter() - t0
    return {"wall_s": wall_s, "nonzero_exits": bad, "complete": complete_count(db_path)}


def drainer_loop(
    argv: Sequence[str], db_path: Path, attempts: int, session_dir: Path, cwd: Path
) -> dict[str, Any]:
    """One drain session over the copy, one lane; the wall time of ``anyio.run(drain)``.
    As under ``python -m drainer run``: the process is its workers' child subreaper, and
    worker exits are watched through pidfds."""
    import anyio

    from drainer import SessionSummary, drain, iter_attempts, reaper

    reaper.become_subreaper()
    from drainer.config import DrainConfig
    from drainer.supervisor import pidfd_child_watcher

    config = DrainConfig(
        database_url=f"sqlite:///{db_path}",
        command=list(argv),
        workspace=cwd,
        session_dir=session_dir,
        batch_size=attempts,
        lanes=1,
        phase_timeout=PHASE_TIMEOUT,
        max_attempts_per_phase=1,
        max_fingerprint_repeats=None,
        max_timeouts_per_run=None,
    )

    async def run() -> SessionSummary:
        with pidfd_child_watcher():
            return await drain(config, echo=lambda _line: None)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    summary = anyio.run(run)
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    durations = [r.subprocess_duration_seconds for r in iter_attempts(summary.journal_path)]
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "attempts": summary.total_processed,
        "succeeded": summary.total_success,
        "stop_reason": summary.stop_reason,
        "in_worker_s": sum(durations),
        "complete": complete_count(db_path),
    }


# -- the driver ----------------------------------------------------------------------------


def worker_argv(kind: str, workdir: Path) -> list[str]:
    if kind == "noop":
        script = workdir / "noop_worker.py"
        script.write_text(NOOP_WORKER, encoding="utf-8")
        return [sys.executable, str(script)]
    true = shutil.which("true") or "/bin/true"
    return [str(Path(true).resolve())]


def measure_worker(
    kind: str, attempts: int, rounds: int, workdir: Path, log: TextIO
) -> dict[str, Any]:
    argv = worker_argv(kind, workdir)
    template = workdir / f"template-{kind}.db"
    keys = build_backlog(template, attempts)
    db_path = workdir / f"backlog-{kind}.db"
    plain: list[dict[str, Any]] = []
    drained: list[dict[str, Any]] = []
    for i in range(rounds):
        # Alternate which loop goes first, so drift (caches, CPU clock) favours neither.
        order = ("plain", "drainer") if i % 2 == 0 else ("drainer", "plain")
        for which in order:
            fresh_copy(template, db_path)
            if which == "plain":
                plain.append(plain_loop(argv, db_path, keys, workdir))
            else:
                session_dir = workdir / f"sessions-{kind}-{i}"
                drained.append(drainer_loop(argv, db_path, attempts, session_dir, workdir))
                shutil.rmtree(session_dir, ignore_errors=True)
        print(f"  {kind} round {i + 1}/{rounds}: plain {plain[-1]['wall_s']:.2f} s, "
              f"drainer {drained[-1]['wall_s']:.2f} s", file=log, flush=True)

    plain_s = statistics.median(r["wall_s"] for r in plain)
    drainer_s = statistics.median(r["wall_s"] for r in drained)
    expected_complete = attempts if kind == "noop" else 0
    checks_ok = all(
        r["complete"] == expected_complete for r in (*plain, *drained)
    ) and all(r["attempts"] == attempts for r in drained)
    if kind == "noop":
        checks_ok = checks_ok and all(r["nonzero_exits"] == 0 for r in plain) and all(
            r["succeeded"] == attempts for r in drained
        )
    overhead_ms = (drainer_s - plain_s) / attempts * 1000
    ratio = drainer_s / plain_s if plain_s > 0 else float("inf")
    return {
        "worker": kind,
        "argv": argv,
        "attempts": attempts,
        "rounds": rounds,
        "plain_s": plain_s,
        "drainer_s": drainer_s,
        "plain_ms": plain_s / attempts * 1000,
        "drainer_ms": drainer_s / attempts * 1000,
        "in_worker_ms": statistics.median(r["in_worker_s"] for r in drained) / attempts * 1000,
        "drainer_cpu_ms": statistics.median(r["cpu_s"] for r in drained) / attempts * 1000,
        "ratio": ratio,
        "overhead_ms": overhead_ms,
        "ratio_target": TARGET_RATIO if kind == "noop" else None,
        "meets_ratio": ratio <= TARGET_RATIO if kind == "noop" else None,
        "meets_cpu": (statistics.median(r["cpu_s"] for r in drained) / attempts * 1000
                      <= TARGET_CPU_MS) if kind == "true" else None,
        "checks_ok": checks_ok,
        "plain_rounds_s": [r["wall_s"] for r in plain],
        "drainer_rounds_s": [r["wall_s"] for r in drained],
        "drainer_rounds": drained,
    }


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("worker", "worker", "{}"),
    ("N", "attempts", "{}"),
    ("plain ms", "plain_ms", "{:.2f}"),
    ("drainer ms", "drainer_ms", "{:.2f}"),
    ("in-worker ms", "in_worker_ms", "{:.2f}"),
    ("drainer cpu ms", "drainer_cpu_ms", "{:.2f}"),
    ("ratio", "ratio", "{:.2f}"),
    ("overhead ms", "overhead_ms", "{:.2f}"),
    ("ratio ok", "meets_ratio", "{}"),
    ("cpu ok", "meets_cpu", "{}"),
    ("checks", "checks_ok", "{}"),
)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    _print_table(rows, _COLUMNS, out)


def _workers(text: str) -> list[str]:
    kinds: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part not in WORKER_ALIASES:
            raise argparse.ArgumentTypeError(
                f"--worker expects noop (or python), true, or both comma separated; got {part!r}"
            )
        if WORKER_ALIASES[part] not in kinds:
            kinds.append(WORKER_ALIASES[part])
    if not kinds:
        raise argparse.ArgumentTypeError("--worker expects noop, true or noop,true")
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS,
                        help="attempts (distinct phases) per loop (default: %(default)s)")
    parser.add_argument("--worker", type=_workers, default=list(DEFAULT_WORKERS),
                        help="workers to measure: noop (alias python), true, or both comma "
                             "separated (default: noop,true)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="alternating plain/drainer rounds; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.attempts < 1 or args.rounds < 1:
        parser.error("--attempts and --rounds must be at least 1")

    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    # Import drainer (and its dependencies) before any timing starts.
    import anyio  # noqa: F401

    import drainer.session  # noqa: F401

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="drainer-bench-overhead-") as tmp:
        for kind in args.worker:
            print(f"{kind}: {args.rounds} round(s) of {args.attempts} attempts, plain loop and "
                  "drainer alternating...", file=sys.stderr, flush=True)
            rows.append(measure_worker(kind, args.attempts, args.rounds, Path(tmp), sys.stderr))
    print_table(rows, out)

    print(file=out)
    for r in rows:
        verdicts = [f"overhead {r['overhead_ms']:.2f} ms/attempt, drainer CPU "
                    f"{r['drainer_cpu_ms']:.2f} ms/attempt"]
        if r["meets_cpu"] is not None:
            verdicts.append(f"{'meets' if r['meets_cpu'] else 'MISSES'} the <= "
                            f"{TARGET_CPU_MS:g} ms CPU target")
        if r["meets_ratio"] is not None:
            verdicts.append(f"ratio {r['ratio']:.2f} {'meets' if r['meets_ratio'] else 'MISSES'}"
                            f" the <= {TARGET_RATIO} target")
        print(f"{r['worker']}: " + "; ".join(verdicts), file=out)
        if not r["checks_ok"]:
            print(f"WARNING: {r['worker']}: phase states or attempt counts were not as "
                  "expected (see the JSON)", file=out)
    report = {
        "benchmark": "overhead",
        "attempts": args.attempts,
        "rounds": args.rounds,
        "statistic": "median over rounds",
        "target": {
            "ratio_at_most": TARGET_RATIO,
            "ratio_applies_to": "noop (a Python worker)",
            "cpu_ms_at_most": TARGET_CPU_MS,
            "cpu_applies_to": "true (/bin/true)",
            "source": "shared/TARGETS.md: <= 3 ms of drainer CPU per attempt (/bin/true, "
                      "SQLite, one lane); per-attempt cost vs a plain loop <= 1.10x",
        },
        "machine": machine_info(),
        "results": rows,
    }
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
