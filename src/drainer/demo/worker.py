"""The demo's simulated worker: drain one phase of the demo backlog like Autopack would.

Usage::

    DATABASE_URL=sqlite:////abs/demo.db python -m drainer.demo.worker --run-id R --phase-id P

It honours drainer's worker contract (DESIGN.md §3): it moves the phase to ``QUEUED``, then
``EXECUTING``, pretends to work, and leaves it ``COMPLETE`` or ``FAILED`` with a
``last_failure_reason``. What it pretends depends on the run-id prefix (see
``drainer.demo.backlog``). ``DRAINER_DEMO_SPEED`` (float, default 1.0) multiplies every simulated
delay: ``0.1`` runs ten times faster, ``0`` does not sleep at all. A hang stays a hang.

Exit status: 0 phase COMPLETE, 1 phase FAILED, 2 usage or database error, 3 no such phase.

This module runs once per attempt, so it imports only the standard library: start-up time is
on every attempt's path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sqlite3
import subprocess
import sys
import time

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_PHASE = 3

_URL_PREFIXES = ("sqlite:///", "sqlite+pysqlite:///")
_HANG_SECONDS = 3600.0
_MODEL = "claude-sonnet-4-5"
_CI_IMPORT_ERROR = (
    "ImportError: cannot import name 'ResearchOrchestrator' from 'research.core' "
    "(/workspace/src/research/core/__init__.py)"
)


class _UsageError(Exception):
    """Bad invocation or environment: exit 2 with the message on stderr."""


def main(argv: list[str] | None = None) -> int:
    """Drain one phase; return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m drainer.demo.worker",
        description="Simulated Autopack worker for the drainer demo backlog.",
    )
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--phase-id", required=True)
    parser.add_argument(
        "--force", action="store_true",
        help="accepted for compatibility with drain_one_phase.py; the phase is always re-run",
    )
    args = parser.parse_args(argv)
    run_id: str = args.run_id
    phase_id: str = args.phase_id
    try:
        speed = _speed_from_env()
        db_path = _sqlite_path_from_env()
        conn = sqlite3.connect(db_path, timeout=30)
    except (_UsageError, sqlite3.Error) as exc:
        _err(f"drain_one_phase: {exc}")
        return EXIT_USAGE
    try:
        return _Drain(conn, run_id, phase_id, speed).run()
    except _UsageError as exc:
        _err(f"drain_one_phase: {exc}")
        return EXIT_USAGE
    finally:
        conn.close()


def _speed_from_env() -> float:
    raw = os.environ.get("DRAINER_DEMO_SPEED", "").strip()
    if not raw:
        return 1.0
    try:
        speed = float(raw)
    except ValueError:
        speed = -1.0
    if not speed >= 0.0 or speed == float("inf"):
        raise _UsageError(
            f"DRAINER_DEMO_SPEED={raw!r} is not a delay multiplier; use a number >= 0, e.g. 0.1"
        )
    return speed


def _sqlite_path_from_env() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise _UsageError("DATABASE_URL is not set; e.g. DATABASE_URL=sqlite:////abs/demo.db")
    for prefix in _URL_PREFIXES:
        if url.startswith(prefix):
            path = url[len(prefix):].split("?", 1)[0]
            break
    else:
        raise _UsageError(
            f"DATABASE_URL must be a SQLite URL like sqlite:////abs/demo.db, not {_scheme(url)!r}"
        )
    if not path or path == ":memory:":
        raise _UsageError("DATABASE_URL names no database file; e.g. sqlite:////abs/demo.db")
    if not os.path.isfile(path):
        raise _UsageError(
            f"database file {path!r} does not exist; build it with `python -m drainer demo`"
        )
    return path


def _scheme(url: str) -> str:
    # Never echo credentials of a PostgreSQL URL back into a log.
    return url.split("://", 1)[0] + "://..." if "://" in url else url[:20]


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def _out(line: str) -> None:
    print(line, flush=True)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Drain:
    """One phase being drained: the database updates and the simulated work."""

    def __init__(self, conn: sqlite3.Connection, run_id: str, phase_id: str,
                 speed: float) -> None:
        self.conn = conn
        self.run_id = run_id
        self.phase_id = phase_id
        self.speed = speed
        # Same phase, same story: the demo is reproducible from run to run.
        self.rng = random.Random(f"{run_id}\x00{phase_id}")
        self.label = phase_id.split("-", 1)[0].split(" ", 1)[0]
        self.phase_index = 0
        self.complexity = "medium"

    def sleep(self, seconds: float) -> None:
        if self.speed > 0:
            time.sleep(seconds * self.speed)

    def run(self) -> int:
        try:
            row = self.conn.execute(
                "SELECT state, phase_index, complexity FROM phases"
                " WHERE run_id = ? AND phase_id = ?",
                (self.run_id, self.phase_id),
            ).fetchone()
        except sqlite3.OperationalError as exc:
            raise _UsageError(f"cannot read the phases table: {exc}") from exc
        if row is None:
            _err(f"drain_one_phase: no phase {self.phase_id!r} in run {self.run_id!r}")
            return EXIT_NO_PHASE
        state, self.phase_index, complexity = row
        self.complexity = complexity or "medium"
        _out(f"[drain_one_phase] run={self.run_id} phase={self.phase_id} "
             f"index={self.phase_index} state={state}")
        self.set_state("QUEUED")
        _out(f"[drain_one_phase] phase {self.label} {state} -> QUEUED")
        self.set_state("EXECUTING")
        _out(f"[Executor] phase {self.label} -> EXECUTING (pid {os.getpid()})")

        prefix = self.run_id
        if prefix.startswith("build129-"):
            return self.build129()
        if prefix.startswith("fileorg-p2-"):
            return self.fileorg()
        if prefix.startswith("research-system-v"):
            return self.research()
        if prefix.startswith("slowpoke-"):
            return self.slowpoke()
        if prefix.startswith("apiserver-leak-"):
            return self.apiserver_leak()
        return self.generic()

    # -- database ---------------------------------------------------------------------------

    def set_state(self, state: str, reason: str | None = None) -> None:
        now = _now()
        with self.conn:
            if state == "EXECUTING":
                self.conn.execute(
                    "UPDATE phases SET state = ?, updated_at = ?, started_at = ?,"
                    " last_attempt_timestamp = ?, builder_attempts = builder_attempts + 1"
                    " WHERE run_id = ? AND phase_id = ?",
                    (state, now, now, now, self.run_id, self.phase_id),
                )
            elif state == "COMPLETE":
                self.conn.execute(
                    "UPDATE phases SET state = ?, updated_at = ?, completed_at = ?,"
                    " last_failure_reason = NULL WHERE run_id = ? AND phase_id = ?",
                    (state, now, now, self.run_id, self.phase_id),
                )
            elif state == "FAILED":
                self.conn.execute(
                    "UPDATE phases SET state = ?, updated_at = ?, last_failure_reason = ?"
                    " WHERE run_id = ? AND phase_id = ?",
                    (state, now, reason, self.run_id, self.phase_id),
                )
            else:
                self.conn.execute(
                    "UPDATE phases SET state = ?, updated_at = ? WHERE run_id = ? AND phase_id = ?",
                    (state, now, self.run_id, self.phase_id),
                )

    def record_llm_call(self, call: int) -> None:
        """Simulate one Builder LLM call and record its token-estimation event."""
        rng = self.rng
        prompt = rng.randint(900, 7000)
        budget = rng.choice((4096, 8192, 16384))
        predicted = rng.randint(budget // 5, budget * 3 // 4)
        actual = min(int(predicted * rng.uniform(0.55, 1.45)), budget)
        truncated = actual >= budget
        deliverables = [f"src/autopack/telemetry/part_{call}.py"]
        _out(f"[LLM] calling {_MODEL}: prompt tokens={prompt} max_tokens={budget}")
        self.sleep(rng.uniform(0.02, 0.05))
        stop_reason = "max_tokens" if truncated else "end_turn"
        _out(f"[LLM] response: output tokens={actual} stop_reason={stop_reason}")
        with self.conn:
            self.conn.execute(
                "INSERT INTO token_estimation_v2_events (run_id, phase_id, timestamp, category,"
                " complexity, deliverable_count, deliverables_json, predicted_output_tokens,"
                " actual_output_tokens, selected_budget, actual_max_tokens, success, truncated,"
                " stop_reason, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.run_id, self.phase_id, _now(), "implementation", self.complexity,
                 len(deliverables), json.dumps(deliverables), predicted, actual, budget, budget,
                 not truncated, truncated, stop_reason, _MODEL),
            )
        _out(f"[TokenEstimationV2] predicted={predicted} actual={actual} budget={budget} "
             f"-> event recorded")

    def complete(self) -> int:
        self.set_state("COMPLETE")
        _out(f"[Executor] phase {self.label} COMPLETE")
        return EXIT_COMPLETE

    def fail(self, reason: str, traceback_lines: list[str]) -> int:
        self.set_state("FAILED", reason)
        _out(f"[Executor] phase {self.label} FAILED: {reason}")
        _err("Traceback (most recent call last):")
        for line in traceback_lines:
            _err(line)
        return EXIT_FAILED

    # -- behaviours by run-id prefix ----------------------------------------------------------

    def build129(self) -> int:
        rng = self.rng
        calls = rng.randint(2, 9)
        _out(f"[Builder] phase {self.label}: building with {calls} LLM calls "
             f"(complexity={self.complexity})")
        self.sleep(0.05)
        for call in range(calls):
            self.record_llm_call(call)
        if rng.random() < 0.3:
            old = rng.choice((4096, 8192))
            with self.conn:
                self.conn.execute(
                    "INSERT INTO token_budget_escalation_events (run_id, phase_id, timestamp,"
                    " trigger_type, old_budget, new_budget, complexity)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (self.run_id, self.phase_id, _now(), "truncation", old, old * 2,
                     self.complexity),
                )
            _out(f"[TokenBudget] escalated after truncation: {old} -> {old * 2}")
        _out(f"[Auditor] phase {self.label}: 0 major, {rng.randint(0, 2)} minor issues")
        self.sleep(0.05)
        return self.complete()

    def fileorg(self) -> int:
        rng = self.rng
        stem = self.phase_id.split("-", 1)[-1].split(".", 1)[0].replace("-", "_")
        expected = rng.randint(2, 5)
        produced = rng.randint(0, expected - 1)
        missing = f"src/fileorg/{stem}_{rng.randint(1, 9)}.py"
        _out(f"[Builder] phase {self.label}: applying patch ({expected} deliverables expected)")
        self.sleep(0.1)
        _out(f"[Deliverables] checking {expected} deliverables in /workspace")
        self.sleep(0.1)
        reason = (f"Deliverable missing: {missing} was not created "
                  f"({produced} of {expected} deliverables produced)")
        return self.fail(reason, [
            '  File "/workspace/src/autopack/autonomous_executor.py", line 2214, in _run_phase',
            "    self._verify_deliverables(phase, workspace)",
            '  File "/workspace/src/autopack/deliverables_validator.py", line 318, in verify',
            "    raise DeliverableMissingError(message)",
            f"autopack.deliverables_validator.DeliverableMissingError: {reason}",
        ])

    def research(self) -> int:
        _out(f"[CI] phase {self.label}: running pytest -q tests/research")
        self.sleep(0.1)
        _out("[CI] ERROR collecting tests/research/test_orchestrator.py")
        return self.fail(f"CI collection error: {_CI_IMPORT_ERROR}", [
            '  File "/workspace/.venv/lib/python3.11/site-packages/_pytest/python.py", '
            "line 617, in _importtestmodule",
            "    mod = import_path(self.path, mode=importmode, root=self.config.rootpath)",
            '  File "/workspace/tests/research/test_orchestrator.py", line 3, in <module>',
            "    from research.core import ResearchOrchestrator",
            _CI_IMPORT_ERROR,
        ])

    def slowpoke(self) -> int:
        # A grandchild in our process group: drainer's timeout must take the whole tree down.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        _out(f"[Builder] phase {self.label}: waiting for the model...")
        time.sleep(_HANG_SECONDS)  # deliberately not scaled: this attempt is meant to hang
        return self.complete()

    def apiserver_leak(self) -> int:
        # A detached fake API server we "forget" to stop. Its command line says uvicorn and it
        # inherits our environment (DRAINER_ATTEMPT_ID included): drainer's leak sweep finds it.
        server = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)",
             "uvicorn", "autopack.main:app", "--port", "8000"],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _out(f"[API] started uvicorn autopack.main:app on port 8000 (pid {server.pid})")
        self.sleep(0.2)
        _out(f"[Builder] phase {self.label}: done (API server left running)")
        # Not waited for on purpose; stop Popen.__del__ from warning about a running child.
        server.returncode = 0
        return self.complete()

    def generic(self) -> int:
        calls = self.rng.randint(1, 3)
        _out(f"[Builder] phase {self.label}: {calls} LLM calls")
        for call in range(calls):
            self.record_llm_call(call)
        self.sleep(0.1)
        return self.complete()


if __name__ == "__main__":
    raise SystemExit(main())
