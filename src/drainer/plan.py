"""The dry run: what a session would drain, in order, and what it skips and why.

Opens the database read-only in effect (no WAL switch, no lease table, no session files).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backlog import open_backlog
from .config import DrainConfig
from .errors import UsageError
from .models import PhaseRef
from .selection import CATEGORY_NAMES, CandidateIndex, failure_category

SKIPPED_SHOWN = 50


@dataclass(frozen=True)
class Plan:
    counts: dict[str, int]
    picks: list[PhaseRef]
    remaining: int
    skipped: list[tuple[PhaseRef, str]]


async def make_plan(config: DrainConfig) -> Plan:
    async with open_backlog(config.db, config.telemetry_tables, config.schema) as backlog:
        counts = await backlog.counts_by_state()
        if sum(counts.values()) == 0 and not config.allow_empty_db:
            raise UsageError(
                f"{config.db.redacted} has no phases at all; is it the right database? "
                "Pass --allow-empty-db to plan against it anyway"
            )
        candidates = await backlog.load_candidates(run_id=config.run_id)
    index = CandidateIndex.build(
        candidates,
        skip_run_prefixes=config.skip_run_prefixes,
        skip_queued=config.skip_runs_with_queued,
    )
    picks = index.preview(config.batch_size)
    return Plan(
        counts=counts,
        picks=picks,
        remaining=len(index) - len(picks),
        skipped=index.skipped,
    )


def plan_lines(plan: Plan, config: DrainConfig) -> list[str]:
    phases = ", ".join(f"{k} {v}" for k, v in sorted(plan.counts.items())) or "none"
    lines = [
        f"Plan (dry run, nothing is started or written) for {config.db.redacted}",
        f"  phases: {phases}",
        f"Would drain, in order (batch size {config.batch_size}):",
    ]
    if not plan.picks:
        lines.append("  (nothing: no candidate phases)")
    for n, ref in enumerate(plan.picks, start=1):
        category = CATEGORY_NAMES[failure_category(ref.last_failure_reason)]
        lines.append(
            f"  {n:>4}. {ref.run_id} / {ref.phase_id}  "
            f"[{ref.state}, index {ref.phase_index}, {category}]"
        )
    if plan.remaining:
        lines.append(f"  ... {plan.remaining} more candidate(s) after this batch")
    lines.append(f"Skipped ({len(plan.skipped)}):")
    if not plan.skipped:
        lines.append("  (none)")
    for ref, why in plan.skipped[:SKIPPED_SHOWN]:
        lines.append(f"  - {ref.run_id} / {ref.phase_id} [{ref.state}]: {why}")
    if len(plan.skipped) > SKIPPED_SHOWN:
        lines.append(f"  ... and {len(plan.skipped) - SKIPPED_SHOWN} more")
    lines.append(
        "Stops and triage may end the session earlier or reorder later picks; "
        "see the stop rules with 'drainer run --help'."
    )
    return lines
