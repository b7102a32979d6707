"""Build the demo backlog: a realistic Autopack-schema SQLite database full of FAILED phases.

``build_demo_backlog(path)`` writes 56 runs holding 274 FAILED phases (plus one QUEUED phase and
a few COMPLETE ones), shaped like a real Autopack backlog. What happens when a phase is drained
depends on its run-id prefix; the simulated worker (``python -m drainer.demo.worker``) plays it:

``build129-*``
    24 runs. The worker "calls the LLM", records 2-9 ``token_estimation_v2_events`` (sometimes a
    ``token_budget_escalation_events`` row too) and sets the phase ``COMPLETE``: telemetry yield.
``fileorg-p2-*``
    16 runs. The worker fails with a deliverable error whose path and counts vary per phase
    (``Deliverable missing: src/fileorg/organizer_3.py was not created (1 of 3 ...)``), so only a
    normalised fingerprint sees the repetition.
``research-system-v*``
    12 runs. The worker fails with the same CI collection error every time
    (``ImportError: cannot import name 'ResearchOrchestrator' ...``).
``slowpoke-*``
    2 runs, 1 FAILED phase each. The worker starts a grandchild and hangs until drainer's timeout
    kills the process tree.
``apiserver-leak-*``
    1 run, 1 FAILED phase. The worker leaves a detached fake ``uvicorn`` API server behind: a leak.
``mixed-queued-*``
    1 run: 3 FAILED phases beside 1 QUEUED phase (which drainer must skip, not the whole run).
    Like any other prefix, its phases complete with 1-3 telemetry events.

The recorded ``last_failure_reason`` values are chosen so that drainer's priority order
(category of the reason, then ``phase_index``, then runs with fewer failed phases, then ids)
puts a mix of every kind in the first 30 picks. One phase id contains a space and one a dot.
The contents depend only on ``seed``; the counts above are the same for every seed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.resources
import json
import random
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from ..selection import failure_category

__all__ = ["DEMO_KINDS", "DemoBacklog", "build_demo_backlog"]

#: Run-id prefix -> what the simulated worker does with a phase of such a run.
DEMO_KINDS: Final[Mapping[str, str]] = MappingProxyType({
    "build129-": "completes after LLM calls, recording 2-9 token telemetry events",
    "fileorg-p2-": "fails with a deliverable error (path and counts vary per phase)",
    "research-system-v": "fails with the same CI collection ImportError every time",
    "slowpoke-": "hangs with a grandchild until drainer's timeout kills the tree",
    "apiserver-leak-": "completes but leaves a detached fake uvicorn server running",
    "mixed-queued-": "completes with 1-3 telemetry events; its run also has a QUEUED phase",
})

_BASE_TIME = dt.datetime(2025, 12, 8, 9, 0, 0)

# (runs, FAILED phases over those runs, min and max FAILED phases per run) for the three bulk
# kinds. With the 4 special runs (2 slowpoke, 1 apiserver-leak, 1 mixed-queued) and their
# 2 + 1 + 3 FAILED phases this makes exactly 56 runs and 274 FAILED phases.
_BUILD_RUNS, _BUILD_FAILED, _BUILD_SPREAD = 24, 144, (3, 8)
_RESEARCH_RUNS, _RESEARCH_FAILED, _RESEARCH_SPREAD = 12, 60, (3, 7)
_FILEORG_RUNS, _FILEORG_FAILED, _FILEORG_SPREAD = 16, 64, (2, 6)
# How many runs of a kind record a reason of an early category on their first FAILED phase.
# Categories 0 (no reason) and 1 (collection/import) drain first: together they hold 21 phases
# (8 build129 + 2 slowpoke + 1 apiserver-leak + 2 mixed-queued + 8 research), so the first 30
# picks also take 9 fileorg phases (category 2, deliverable) whatever the seed.
_BUILD_FRESH = 8
_RESEARCH_CI_ERROR = 8

_CI_IMPORT_ERROR = (
    "CI collection error: ImportError: cannot import name 'ResearchOrchestrator' from "
    "'research.core' (/workspace/src/research/core/__init__.py)"
)

_BUILD_SLUGS = (
    "add-token-telemetry", "wire-budget-escalation", "estimate-output-tokens",
    "record-truncations", "tune-selected-budget", "persist-v2-events", "backfill-categories",
    "cap-max-tokens", "log-stop-reasons", "calibrate-complexity", "split-deliverables",
    "refresh-estimator-cache",
)
_FILEORG_SLUGS = (
    "organize-downloads", "dedupe-photos", "sort-invoices", "rename-screenshots",
    "archive-old-projects", "tag-music-library", "index-documents", "clean-desktop",
)
_RESEARCH_SLUGS = (
    "gather-sources", "build-orchestrator", "rank-citations", "summarise-findings",
    "verify-claims", "draft-report", "export-bibliography", "review-outline",
)

# Reasons by priority category (see drainer.selection.failure_category). Placeholders:
# {file} a source file of the run's project, {n} a small number, {s} a duration in seconds.
_PATCH_REASONS = (
    "Patch apply failed: no-op diff for manifest",
    "Patch apply failed: no-op diff for manifest",
    "Builder produced a no-op patch for {file}",
    "Patch rejected: hunk {n} of 4 did not apply to {file}",
)
_OTHER_REASONS = (
    "Auditor rejected: {n} major issues (max 2) in {file}",
    "Quality gate blocked: pytest reported {n} failed, 118 passed",
    "Builder returned invalid JSON: Expecting ',' delimiter: line 4{n} column 7",
)
_TIMEOUT_REASONS = (
    "Phase timed out after {s}s waiting for CI",
    "LLM call timeout after 120s (attempt {n} of 3)",
)
_DELIVERABLE_REASONS = (
    "Deliverable missing: src/fileorg/{stem}_{n}.py was not created ({k} of {m} deliverables "
    "produced)",
    "Deliverable missing: tests/fileorg/test_{stem}.py was not created ({k} of {m} deliverables "
    "produced)",
    "Deliverables incomplete: docs/fileorg/{stem}.md not found in workspace ({k} of {m} produced)",
)
_PROJECT_FILES: Mapping[str, tuple[str, ...]] = {
    "build": ("src/autopack/llm_service.py", "src/autopack/telemetry/token_estimator.py",
              "src/autopack/anthropic_clients.py", "src/autopack/models.py"),
    "research": ("src/research/agents/synthesizer.py", "src/research/pipeline.py",
                 "src/research/core/orchestrator.py"),
    "mixed": ("src/mixed/service.py",),
}


@dataclass(frozen=True, slots=True)
class DemoBacklog:
    """What :func:`build_demo_backlog` wrote."""

    path: Path  #: the SQLite database file
    runs: int  #: rows in ``runs``
    failed_phases: int  #: phases in state FAILED (the drainable backlog)
    queued_phases: int  #: phases in state QUEUED (skipped by drainer)
    total_phases: int  #: all phases, COMPLETE ones included


@dataclass(slots=True)
class _Phase:
    run_id: str
    phase_id: str
    phase_index: int
    state: str
    reason: str | None
    kind: str


@dataclass(slots=True)
class _Run:
    run_id: str
    kind: str  # build, fileorg, research, slowpoke, apiserver, mixed
    created_at: dt.datetime
    phases: list[_Phase]


def build_demo_backlog(path: Path, *, seed: int = 7) -> DemoBacklog:
    """Create the demo backlog database at ``path``, replacing any existing one.

    The schema is Autopack's (``autopack-schema.sql``); every NOT NULL column is filled. The
    contents are a pure function of ``seed``. The database is left in SQLite's default journal
    mode: drainer switches it to WAL itself once it has validated it.
    """
    path = Path(path)
    rng = random.Random(seed)
    runs = _layout(rng)
    _name_awkward_phases(runs)
    schema = (
        importlib.resources.files("drainer.demo").joinpath("autopack-schema.sql").read_text()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        stale.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(schema)
        with conn:
            _insert(conn, runs, rng)
        counts = conn.execute(
            "SELECT (SELECT COUNT(*) FROM runs),"
            " SUM(state = 'FAILED'), SUM(state = 'QUEUED'), COUNT(*) FROM phases"
        ).fetchone()
    return DemoBacklog(
        path=path,
        runs=int(counts[0]),
        failed_phases=int(counts[1]),
        queued_phases=int(counts[2]),
        total_phases=int(counts[3]),
    )


# -- layout -------------------------------------------------------------------------------


def _spread(rng: random.Random, runs: int, total: int, low: int, high: int) -> list[int]:
    """``runs`` counts in ``[low, high]`` summing to ``total``, shuffled by ``rng``."""
    counts = [total // runs + (1 if i < total % runs else 0) for i in range(runs)]
    for _ in range(runs * 3):
        a, b = rng.randrange(runs), rng.randrange(runs)
        if a != b and counts[a] > low and counts[b] < high:
            counts[a] -= 1
            counts[b] += 1
    return counts


def _layout(rng: random.Random) -> list[_Run]:
    runs: list[_Run] = []

    def add_run(run_id: str, kind: str, created_at: dt.datetime, slugs: tuple[str, ...],
                failed: int, completed: int) -> _Run:
        names = rng.sample(slugs, failed + completed)
        phases = [
            _Phase(run_id, f"P{i + 1}-{name}", i, "COMPLETE" if i < completed else "FAILED",
                   None, kind)
            for i, name in enumerate(names)
        ]
        run = _Run(run_id, kind, created_at, phases)
        runs.append(run)
        return run

    def failed_of(run: _Run) -> list[_Phase]:
        return [p for p in run.phases if p.state == "FAILED"]

    # fileorg-p2: every recorded reason is a deliverable error (category 2).
    for i, failed in enumerate(_spread(rng, _FILEORG_RUNS, _FILEORG_FAILED, *_FILEORG_SPREAD)):
        day = _BASE_TIME + dt.timedelta(days=i // 3)
        run = add_run(f"fileorg-p2-{day:%Y%m%d}-{'abc'[i % 3]}", "fileorg",
                      day + dt.timedelta(hours=i % 3, minutes=rng.randrange(60)),
                      _FILEORG_SLUGS, failed, rng.choice((0, 0, 1)))
        for phase in failed_of(run):
            phase.reason = _deliverable_reason(rng, phase.phase_id)

    # research-system: the CI import error first (category 1), later reasons of categories 3-5.
    counts = _spread(rng, _RESEARCH_RUNS, _RESEARCH_FAILED, *_RESEARCH_SPREAD)
    ci_runs = set(rng.sample(range(_RESEARCH_RUNS), _RESEARCH_CI_ERROR))
    for i, failed in enumerate(counts):
        run = add_run(f"research-system-v{i + 4}", "research",
                      _BASE_TIME + dt.timedelta(days=i // 2, hours=13, minutes=rng.randrange(60)),
                      _RESEARCH_SLUGS, failed, rng.choice((0, 1)))
        for n, phase in enumerate(failed_of(run)):
            if n == 0 and i in ci_runs:
                phase.reason = _CI_IMPORT_ERROR
            else:
                phase.reason = _late_reason(rng, "research", patch_weight=2)

    # build129: a few runs never recorded a reason (category 0); the rest mostly no-op patches.
    counts = _spread(rng, _BUILD_RUNS, _BUILD_FAILED, *_BUILD_SPREAD)
    fresh_runs = set(rng.sample(range(_BUILD_RUNS), _BUILD_FRESH))
    for i, failed in enumerate(counts):
        run = add_run(f"build129-p{i + 1:02d}", "build",
                      _BASE_TIME + dt.timedelta(days=i // 4, hours=6 + i % 4 * 3,
                                                minutes=rng.randrange(60)),
                      _BUILD_SLUGS, failed, rng.choice((0, 0, 1, 2)))
        for n, phase in enumerate(failed_of(run)):
            if n == 0 and i in fresh_runs:
                phase.reason = None
            else:
                phase.reason = _late_reason(rng, "build", patch_weight=6)

    # The special runs: no recorded reason, so they drain early.
    for letter in "ab":
        add_run(f"slowpoke-20251211-{letter}", "slowpoke",
                dt.datetime(2025, 12, 11, 10 if letter == "a" else 15, 12), ("await-model",), 1, 0)
    add_run("apiserver-leak-20251212", "apiserver", dt.datetime(2025, 12, 12, 8, 40),
            ("start-api-server",), 1, 0)
    mixed = add_run("mixed-queued-20251213", "mixed", dt.datetime(2025, 12, 13, 11, 5),
                    ("load-config", "migrate-schema", "sync-cache", "publish-report"), 4, 0)
    mixed.phases[2].state = "QUEUED"
    mixed.phases[3].reason = "Auditor rejected: 1 major issue in src/mixed/service.py"
    return runs


def _deliverable_reason(rng: random.Random, phase_id: str) -> str:
    stem = phase_id.split("-", 1)[1].replace("-", "_")
    m = rng.randint(2, 5)
    return rng.choice(_DELIVERABLE_REASONS).format(
        stem=stem, n=rng.randint(1, 9), k=rng.randint(0, m - 1), m=m
    )


def _late_reason(rng: random.Random, project: str, *, patch_weight: int) -> str:
    """A reason of category 3 (patch), 4 (other) or 5 (timeout), mostly 3."""
    pool = rng.choices((_PATCH_REASONS, _OTHER_REASONS, _TIMEOUT_REASONS),
                       weights=(patch_weight, 2, 1))[0]
    return rng.choice(pool).format(
        file=rng.choice(_PROJECT_FILES[project]), n=rng.randint(2, 4),
        s=rng.choice((600, 900, 1200)),
    )


def _name_awkward_phases(runs: list[_Run]) -> None:
    """Give the first fileorg and build129 phases drainer picks a dot and a space in their id.

    Log file names and shell quoting must cope with them; putting them early in the drain order
    makes the demo exercise that.
    """
    failed_per_run = {r.run_id: sum(p.state == "FAILED" for p in r.phases) for r in runs}
    order = sorted(
        (p for r in runs for p in r.phases if p.state == "FAILED"),
        key=lambda p: (failure_category(p.reason), p.phase_index, failed_per_run[p.run_id],
                       p.run_id, p.phase_id),
    )
    first_fileorg = next(p for p in order if p.kind == "fileorg")
    first_fileorg.phase_id += ".v2"
    first_build = next(p for p in order if p.kind == "build")
    first_build.phase_id = first_build.phase_id.replace("-", " ")


# -- rows -----------------------------------------------------------------------------------


def _ts(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _insert(conn: sqlite3.Connection, runs: list[_Run], rng: random.Random) -> None:
    for run in runs:
        states = {p.state for p in run.phases}
        run_state = "PHASE_EXECUTION" if "QUEUED" in states else "DONE_FAILED_REQUIRES_HUMAN_REVIEW"
        last_touch = run.created_at + dt.timedelta(minutes=5 + 7 * len(run.phases))
        conn.execute(
            "INSERT INTO runs (id, state, created_at, updated_at, safety_profile, run_scope,"
            " token_cap, max_phases, max_duration_minutes, tokens_used, ci_runs_used,"
            " minor_issues_count, major_issues_count, promotion_eligible_to_main, failure_reason,"
            " goal_anchor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id, run_state, _ts(run.created_at), _ts(last_touch),
                "normal", "multi_tier", 5_000_000, 25, 120, rng.randint(40_000, 900_000),
                rng.randint(0, 6), rng.randint(0, 5), rng.randint(0, 3), "false",
                None if run_state == "PHASE_EXECUTION" else "one or more phases FAILED",
                f"Demo goal for {run.run_id} ({run.kind})",
            ),
        )
        tier_row = conn.execute(
            "INSERT INTO tiers (tier_id, run_id, tier_index, name, description, state,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("T1", run.run_id, 0, "Tier 1", f"All phases of {run.run_id}",
             "FAILED" if "FAILED" in states else "COMPLETE",
             _ts(run.created_at), _ts(last_touch)),
        ).lastrowid
        for phase in run.phases:
            _insert_phase(conn, run, phase, tier_row, rng)


def _insert_phase(conn: sqlite3.Connection, run: _Run, phase: _Phase, tier_row: int | None,
                  rng: random.Random) -> None:
    created = run.created_at + dt.timedelta(seconds=phase.phase_index)
    started = run.created_at + dt.timedelta(minutes=2 + 7 * phase.phase_index)
    finished = started + dt.timedelta(seconds=rng.randint(120, 390))
    ran = phase.state != "QUEUED"
    attempts = rng.randint(1, 4) if phase.state == "FAILED" else int(ran)
    complexity = rng.choice(("low", "medium", "medium", "high"))
    scope = {"paths": [f"src/{run.kind}/"], "read_only_context": ["README.md"]}
    conn.execute(
        "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, description, state,"
        " task_category, complexity, builder_mode, scope, builder_attempts, auditor_attempts,"
        " tokens_used, minor_issues_count, major_issues_count, quality_blocked, retry_attempt,"
        " revision_epoch, escalation_level, last_attempt_timestamp, last_failure_reason,"
        " created_at, updated_at, started_at, completed_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            phase.phase_id, run.run_id, tier_row, phase.phase_index,
            phase.phase_id.split("-", 1)[-1].replace("-", " ").capitalize(),
            f"Demo phase {phase.phase_id} of {run.run_id}", phase.state,
            rng.choice(("feature", "refactor", "tests", "docs")), complexity, "scaffolding",
            json.dumps(scope), attempts, attempts if phase.state == "COMPLETE" else 0,
            rng.randint(3_000, 60_000) if ran else 0, rng.randint(0, 3), 0,
            phase.state == "FAILED" and rng.random() < 0.2, max(attempts - 1, 0), 0,
            min(max(attempts - 2, 0), 2),
            _ts(finished) if ran else None, phase.reason,
            _ts(created), _ts(finished if ran else created),
            _ts(started) if ran else None,
            _ts(finished) if phase.state == "COMPLETE" else None,
        ),
    )
    if phase.state == "COMPLETE":
        # Telemetry earlier attempts left behind: drainer must count deltas, not totals.
        for _ in range(rng.randint(1, 3)):
            predicted = rng.randint(800, 6000)
            conn.execute(
                "INSERT INTO token_estimation_v2_events (run_id, phase_id, timestamp, category,"
                " complexity, deliverable_count, deliverables_json, predicted_output_tokens,"
                " actual_output_tokens, selected_budget, actual_max_tokens, success, truncated,"
                " stop_reason, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, phase.phase_id, _ts(finished), "implementation", complexity, 1,
                 json.dumps([f"src/{run.kind}/module.py"]), predicted,
                 int(predicted * rng.uniform(0.6, 1.2)), 8192, 8192, True, False, "end_turn",
                 "claude-sonnet-4-5"),
            )
