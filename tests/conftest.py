"""Shared fixtures: real SQLite backlogs with Autopack's schema, worker scripts, the CLI."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

SCHEMA = files("drainer.demo").joinpath("autopack-schema.sql").read_text()
PHASE = tuple[str, str, int, str, str | None]  # run_id, phase_id, phase_index, state, reason


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def create_backlog(path: Path, phases: Iterable[PHASE]) -> Path:
    """A SQLite file with Autopack's schema holding ``phases``."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    tiers: dict[str, int] = {}
    for run_id, phase_id, index, state, reason in phases:
        if run_id not in tiers:
            conn.execute("INSERT INTO runs (id) VALUES (?)", (run_id,))
            cur = conn.execute(
                "INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES ('T1', ?, 0, 't')",
                (run_id,),
            )
            tiers[run_id] = int(cur.lastrowid or 0)
        conn.execute(
            "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state, "
            "last_failure_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (phase_id, run_id, tiers[run_id], index, phase_id, state, reason),
        )
    conn.commit()
    conn.close()
    return path


def phase_states(path: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT run_id, phase_id, state, last_failure_reason FROM phases")
        return {(r, p): (s, why) for r, p, s, why in rows}
    finally:
        conn.close()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A worker that honours the contract and is driven by its phase id (data, not code):
# it records its argv, then acts on the "kind" passed in the WORKER_KIND_<phase> variable.
CONTRACT_WORKER = textwrap.dedent(
    """
    import json, os, sqlite3, subprocess, sys, time
    run_id, phase_id = sys.argv[1], sys.argv[2]
    out_dir = os.environ["TEST_OUT"]
    with open(os.path.join(out_dir, "argv.jsonl"), "a") as fh:
        fh.write(json.dumps({"argv": sys.argv[1:], "attempt": os.environ["DRAINER_ATTEMPT_ID"]}) + "\\n")
    url = os.environ["DATABASE_URL"]
    assert url.startswith("sqlite:///"), url
    db = sqlite3.connect(url[len("sqlite:///"):].split("?")[0], timeout=30)
    def set_state(state, reason=None):
        db.execute("UPDATE phases SET state=?, last_failure_reason=? WHERE run_id=? AND phase_id=?",
                   (state, reason, run_id, phase_id))
        db.commit()
    set_state("QUEUED")
    set_state("EXECUTING")
    kind = os.environ.get("WORKER_KIND", "ok")
    per_phase = os.environ.get("WORKER_KIND_BY_PHASE")  # "phase=kind,phase=kind"
    if per_phase:
        kind = dict(p.split("=", 1) for p in per_phase.split(",")).get(phase_id, kind)
    hang_next = os.path.join(out_dir, "hang-next")
    try:
        os.rename(hang_next, hang_next + ".taken")  # atomic: exactly one worker takes it
        kind = "hang"
    except FileNotFoundError:
        pass
    if kind == "hang":  # stay EXECUTING forever, with a setsid grandchild
        gc = subprocess.Popen([sys.executable, "-c",
                               "import os, time; os.setsid(); time.sleep(600)"])
        # Written whole, then renamed: a test that sees hung.<pid> can read the pid in it.
        tmp = os.path.join(out_dir, "tmp-hung.%d" % os.getpid())
        with open(tmp, "w") as fh:
            fh.write(str(gc.pid))
        os.rename(tmp, os.path.join(out_dir, "hung.%d" % os.getpid()))
        time.sleep(600)
    if kind == "events_then_hang":  # write WORKER_EVENTS telemetry rows, say so, then hang
        for _ in range(int(os.environ.get("WORKER_EVENTS", "3"))):
            db.execute("INSERT INTO token_budget_escalation_events (run_id, phase_id, "
                       "trigger_type) VALUES (?, ?, 't')", (run_id, phase_id))
            db.commit()
        open(os.path.join(out_dir, "wrote." + phase_id), "w").close()
        time.sleep(600)
    if kind == "gated":  # say we started, then wait for the test to release us
        open(os.path.join(out_dir, "started." + phase_id), "w").close()
        while not os.path.exists(os.path.join(out_dir, "release")):
            time.sleep(0.02)
        kind = "ok"
    if kind in ("leak", "leak_unmarked"):
        # A fake API server left behind; "leak_unmarked" drops drainer's marker from its env.
        env = None if kind == "leak" else {"PATH": os.environ.get("PATH", "")}
        srv = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "uvicorn",
                                "fake.app:api"], start_new_session=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out_dir, "leak.%d" % srv.pid), "w") as fh:
            fh.write(str(srv.pid))
        srv.returncode = 0  # we leave it running on purpose
        kind = "ok"
    time.sleep(float(os.environ.get("WORKER_SLEEP", "0")))
    if os.environ.get("WORKER_SPAN_LOG"):
        with open(os.environ["WORKER_SPAN_LOG"], "a") as fh:
            fh.write(json.dumps({"run": run_id, "phase": phase_id, "pid": os.getpid(),
                                 "session": os.environ["DRAINER_SESSION_ID"],
                                 "end": time.time()}) + "\\n")
    if kind == "ok":
        for _ in range(int(os.environ.get("WORKER_EVENTS", "3"))):
            db.execute("INSERT INTO token_estimation_v2_events (run_id, phase_id, timestamp, "
                       "category, complexity, deliverable_count, deliverables_json, "
                       "predicted_output_tokens, actual_output_tokens, selected_budget, success, "
                       "truncated) VALUES (?, ?, '2026-01-01', 'c', 'low', 1, '[]', 1, 1, 1, 1, 0)",
                       (run_id, phase_id))
            db.commit()  # one write transaction per event: contention for the lanes tests
        set_state("COMPLETE")
        print("[LLM] calling claude: prompt tokens=10")
    elif kind == "fail":
        set_state("FAILED", "Deliverable missing: src/x.py")
        print("boom", file=sys.stderr)
        sys.exit(1)
    elif kind == "fail_huge_reason":  # a megabyte of reason, as a runaway traceback gives
        set_state("FAILED", "RuntimeError: " + "x" * 1_000_000)
        sys.exit(1)
    elif kind == "fail_no_telemetry_same":
        set_state("FAILED", "ImportError: cannot import name X")
        sys.exit(1)
    elif kind == "leave_executing":
        print("crashing while EXECUTING", file=sys.stderr)
        sys.exit(3)
    elif kind == "clean_executing":  # exit 0 with the phase EXECUTING (someone else ends it)
        open(os.path.join(out_dir, "exited." + phase_id), "w").close()
    """
)


@dataclass
class Env:
    tmp: Path
    db: Path
    out: Path
    sessions: Path
    worker: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def base_args(self, command: str | None = None) -> list[str]:
        cmd = command or f"{sys.executable} {self.worker} {{run_id}} {{phase_id}}"
        return [
            "--database-url", self.url,
            "--command", cmd,
            "--session-dir", str(self.sessions),
            "--phase-timeout-seconds", "60",
            "--kill-grace-seconds", "1",
        ]

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update({"TEST_OUT": str(self.out), "PYTHONUNBUFFERED": "1"}, **extra)
        return env

    def run_cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "drainer", *args],
            capture_output=True,
            text=True,
            env=env if env is not None else self.worker_env(),
            cwd=self.tmp,
            timeout=timeout,
        )

    def argv_records(self) -> list[list[str]]:
        import json

        path = self.out / "argv.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["argv"] for line in path.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(CONTRACT_WORKER)
    yield Env(
        tmp=tmp_path,
        db=tmp_path / "backlog.db",
        out=out,
        sessions=tmp_path / "sessions",
        worker=worker,
    )


def only_session(sessions: Path) -> tuple[Path, Path]:
    """(snapshot, session directory) of the one session under ``sessions``."""
    snaps = sorted(sessions.glob("batch-drain-*.json"))
    assert len(snaps) == 1, snaps
    return snaps[0], sessions / snaps[0].stem


def python_has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None



def wait_for_worker_file(directory: Path, pattern: str, proc: subprocess.Popen[str]) -> Path:
    """Wait until a worker writes a file matching ``pattern`` (its signal to the test),
    failing at once if drainer exits first. pytest-timeout guards against a hang."""
    import time

    while True:
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, "drainer exited before the worker signalled"
        time.sleep(0.02)


PY = sys.executable


def journal_results(root: Path) -> list[dict[str, Any]]:
    """The attempt records of a session, with drainer's fields (``root`` is its directory),
    as drainer's own reader gives them from the journal (damaged lines skipped). The Autopack
    session file holds Autopack's fields only."""
    from drainer.journal import JOURNAL_NAME, result_records

    return list(result_records(root / JOURNAL_NAME, upto=None))


def session_info(root: Path) -> dict[str, Any]:
    """drainer's ``session.json`` beside the journal."""
    import json

    return dict(json.loads((root / "session.json").read_text()))


def drainer_view(snapshot: Path) -> dict[str, Any]:
    """What drainer knows of a session: the Autopack file's fields, drainer's
    ``session.json`` over them, and the journal's full records as ``results``."""
    import json

    root = snapshot.parent / snapshot.stem
    return {**json.loads(snapshot.read_text()), **session_info(root),
            "results": journal_results(root)}


def under_a_terminal(argv: list[str], env: Env, **extra: str) -> tuple[int, str]:
    """Run drainer with a pseudo-terminal as stdout and stderr: (exit code, all it wrote)."""
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "drainer", *argv], stdout=terminal,
                            stderr=terminal, env=env.worker_env(**extra), cwd=env.tmp)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the terminal closed: the program ended
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(controller)
    return proc.returncode, b"".join(chunks).decode()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each database drainer supports (PostgreSQL: the local server, see ``pg.py``)."""
    return str(request.param)


@pytest.fixture
def make_url(backend: str, tmp_path: Path) -> Iterator[Any]:
    """``make_url(phases)``: a fresh backlog on the test's database, dropped afterwards."""
    from contextlib import ExitStack

    from pg import backlog_url

    with ExitStack() as stack:
        yield lambda phases: stack.enter_context(backlog_url(backend, tmp_path, phases))
