"""Autopack-shaped stand-ins: a worker that behaves as ``scripts/drain_one_phase.py`` does in
the cases drainer must handle, an API server that needs ``DATABASE_URL``, and loaders that
read a session file the way Autopack's controller and analyzer do."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Like Autopack's worker: refuses to start without DATABASE_URL, re-queues a FAILED phase
# keeping its last_failure_reason, reads the API port as the text after the URL's last
# colon, and then acts on AUTOPACK_KIND_<phase_id>:
#   ok          COMPLETE, exit 0
#   infra_retry the executor's INFRA_RETRY: reason set, phase left QUEUED, exit 1
#   raise:T:M   an exception of type T with message M escapes: phase left QUEUED, the
#               worker prints "Error: M" and the traceback, exit 1
#   generic     a traceback's ValueError, then Autopack's generic reason FAILED, then noise
#   boundary    the LLM's context limit is hit: FAILED, exit 1
#   hang        stays EXECUTING (for timeouts and kills); writes started.<phase>
AUTOPACK_WORKER = textwrap.dedent(
    """
    import os, sqlite3, sys, time, traceback
    if not os.environ.get("DATABASE_URL"):
        print("[ERROR] DATABASE_URL must be set", file=sys.stderr)
        sys.exit(1)
    run_id = sys.argv[sys.argv.index("--run-id") + 1]
    phase_id = sys.argv[sys.argv.index("--phase-id") + 1]
    db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30)
    def update(sql, *args):
        db.execute(f"UPDATE phases SET {sql} WHERE run_id=? AND phase_id=?",
                   (*args, run_id, phase_id))
        db.commit()
    update("state='QUEUED'")  # the old reason is kept on purpose
    if os.environ.get("AUTOPACK_API_URL"):
        port = int(os.environ["AUTOPACK_API_URL"].rsplit(":", 1)[-1])
        print(f"[drain_one_phase] API port {port}")
    kind = os.environ.get("AUTOPACK_KIND_" + phase_id, "ok")
    update("state='EXECUTING'")
    print("[drain_one_phase] Autonomous execution loop starting")
    if kind == "ok":
        update("state='COMPLETE'")
        sys.exit(0)
    if kind == "infra_retry":
        update("state='QUEUED', last_failure_reason='INFRA_RETRY'")
        print("[drain_one_phase] Final state: QUEUED")
        sys.exit(1)
    if kind.startswith("raise:"):
        _, name, message = kind.split(":", 2)
        update("state='QUEUED'")
        try:
            raise type(name, (Exception,), {})(message)
        except Exception as exc:
            print(f"\\n[drain_one_phase] Error: {exc}", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    if kind == "generic":
        try:
            raise ValueError("bad config key 'builder.model' in autopack.yaml")
        except ValueError:
            traceback.print_exc()
        update("state='FAILED', last_failure_reason='FAILED'")
        print("[SQL: UPDATE phases SET state=? WHERE phases.id = ?]", file=sys.stderr)
        print("[parameters: ('FAILED', 7)]", file=sys.stderr)
        print("Autonomous execution loop finished", file=sys.stderr)
        sys.exit(1)
    if kind == "boundary":
        print("anthropic.BadRequestError: context_length_exceeded: prompt is too long",
              file=sys.stderr)
        update("state='FAILED', last_failure_reason='Builder failed: prompt too long'")
        sys.exit(1)
    if kind == "hang":
        open(os.path.join(os.environ["TEST_OUT"], "started." + phase_id), "w").close()
        time.sleep(600)
    """
)

# Like Autopack's API server: refuses to start without DATABASE_URL; records what it got.
AUTOPACK_API_SERVER = textwrap.dedent(
    """
    import http.server, json, os, sys
    if not os.environ.get("DATABASE_URL"):
        print("DATABASE_URL is required", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("API_FAIL"):
        print("ERROR: [Errno 98] address already in use", file=sys.stderr)
        sys.exit(1)
    with open(os.environ["API_SEEN"], "w") as fh:
        json.dump({"DATABASE_URL": os.environ["DATABASE_URL"],
                   "EXTRA": os.environ.get("EXTRA")}, fh)
    print("INFO:     Uvicorn running", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
                                    http.server.SimpleHTTPRequestHandler).serve_forever()
    """
)


def autopack_command(worker: Path) -> str:
    return f"{{python}} {worker} --run-id {{run_id}} --phase-id {{phase_id}} --force"


def kinds(**by_phase: str) -> dict[str, str]:
    """The worker's environment for ``phase=kind`` pairs."""
    return {f"AUTOPACK_KIND_{phase}": kind for phase, kind in by_phase.items()}


# -- loaders that behave like Autopack's ``cls(**data)`` ------------------------------------


@dataclass
class DrainResult:
    """The fields of Autopack's ``DrainResult``: an unknown key is a TypeError."""

    run_id: str
    phase_id: str
    phase_index: int
    initial_state: str
    final_state: str
    success: bool
    error_message: str | None = None
    timestamp: str | None = None
    subprocess_returncode: int | None = None
    subprocess_duration_seconds: float | None = None
    subprocess_stdout_path: str | None = None
    subprocess_stderr_path: str | None = None
    subprocess_stdout_excerpt: str | None = None
    subprocess_stderr_excerpt: str | None = None
    failure_fingerprint: str | None = None
    telemetry_events_collected: int | None = None
    telemetry_yield_per_minute: float | None = None
    reached_llm_boundary: bool | None = None
    zero_yield_reason: str | None = None


@dataclass
class BatchDrainSession:
    """The fields of Autopack's ``BatchDrainSession``."""

    session_id: str
    started_at: str
    completed_at: str | None = None
    batch_size: int = 10
    total_processed: int = 0
    total_success: int = 0
    total_failed: int = 0
    total_timeouts: int = 0
    total_telemetry_events: int = 0
    results: list[DrainResult] = field(default_factory=list)
    fingerprint_counts: dict[str, int] = field(default_factory=dict)
    stopped_fingerprints: set[str] = field(default_factory=set)
    stopped_runs: set[str] = field(default_factory=set)
    consecutive_zero_yield: int = 0
    sampled_runs: set[str] = field(default_factory=set)
    promising_runs: set[str] = field(default_factory=set)
    deprioritized_runs: set[str] = field(default_factory=set)


def autopack_load(path: Path) -> BatchDrainSession:
    """As Autopack's controller loads a session file for ``--resume``."""
    data = json.loads(path.read_text())
    data["results"] = [DrainResult(**r) for r in data.get("results", [])]
    data["stopped_fingerprints"] = set(data.get("stopped_fingerprints", []))
    data["stopped_runs"] = set(data.get("stopped_runs", []))
    return BatchDrainSession(**data)


def autopack_analyze(path: Path) -> dict[str, Any]:
    """The figures Autopack's analyzer prints: progress, and per run success/attempts and
    timeouts (counted by return codes -1 and 143)."""
    data = json.loads(path.read_text())
    runs: dict[str, dict[str, int]] = {}
    for r in data["results"]:
        run = runs.setdefault(r["run_id"], {"success": 0, "attempts": 0, "timeouts": 0})
        run["attempts"] += 1
        run["success"] += bool(r["success"])
        run["timeouts"] += r.get("subprocess_returncode") in (-1, 143)
    return {"progress": f"{data['total_processed']}/{data['batch_size']}",
            "timeouts": data["total_timeouts"], "runs": runs}
