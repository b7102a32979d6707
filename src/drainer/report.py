"""Human-readable output: the identity header, per-attempt lines, the session summary."""

from __future__ import annotations

import shlex
from collections import defaultdict
from typing import TYPE_CHECKING

from .config import DrainConfig
from .models import Attempt

if TYPE_CHECKING:
    from .session import SessionSummary

STATE_ORDER = ("FAILED", "QUEUED", "EXECUTING", "GATE", "CI_RUNNING", "COMPLETE", "SKIPPED")
EXCERPT = 240


def _limit(value: float | int | None, unit: str = "") -> str:
    return "off" if value is None else f"{value:g}{unit}"


def header_lines(cfg: DrainConfig, session_id: str, counts: dict[str, int]) -> list[str]:
    states = [s for s in STATE_ORDER if s in counts] + sorted(set(counts) - set(STATE_ORDER))
    phases = ", ".join(f"{s} {counts[s]}" for s in states) or "none"
    rules = (
        f"batch {cfg.batch_size}, phase timeout {cfg.phase_timeout_label}, "
        f"time limit {_limit(cfg.max_total_minutes, ' min')}, "
        f"timeouts/run {_limit(cfg.max_timeouts_per_run)}, "
        f"attempts/phase {cfg.max_attempts_per_phase}, "
        f"fingerprint repeats {_limit(cfg.max_fingerprint_repeats)}, "
        f"zero-yield streak {_limit(cfg.max_consecutive_zero_yield)}"
    )
    scope = []
    if cfg.run_id:
        scope.append(f"run {cfg.run_id}")
    if cfg.skip_run_prefixes:
        scope.append("skipping runs " + ", ".join(f"{p}*" for p in cfg.skip_run_prefixes))
    scope.append("QUEUED phases skipped" if cfg.skip_runs_with_queued else "QUEUED phases drained")
    return [
        f"drainer session {session_id}",
        f"  database:   {cfg.db.redacted}",
        f"  phases:     {phases} (total {sum(counts.values())})",
        f"  workspace:  {cfg.workspace.resolve()}",
        f"  command:    {shlex.join(cfg.command_tokens)}",
        f"  selection:  {'; '.join(scope)}",
        f"  stop rules: {rules}",
        f"  lanes:      {cfg.lanes}",
        f"  session:    {cfg.session_dir / session_id}",
    ]


def _one_line(text: str | None, limit: int = EXCERPT) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def attempt_lines(a: Attempt) -> list[str]:
    took = f"{a.subprocess_duration_seconds:.1f}s"
    lines: list[str] = []
    if a.success:
        lines.append(f"  [OK] {a.final_state} in {took}")
    elif a.cancelled:
        lines.append(f"  [CANCELLED] after {took}: {_one_line(a.error_message)}")
    elif a.timed_out:
        lines.append(f"  [TIMEOUT] after {took}: {_one_line(a.error_message)}")
    else:
        rc = a.subprocess_returncode
        lines.append(f"  [FAIL] {a.final_state} in {took} (rc={rc}): {_one_line(a.error_message)}")
    if a.state_restored:
        lines.append("  [RESTORED] the phase was left non-final; set back to FAILED")
    for p in a.leaked_processes:
        lines.append(f"  [LEAK] pid {p.pid} {_one_line(' '.join(p.cmdline) or p.name, 120)}")
    if a.telemetry_events_collected is None:
        lines.append("  [TELEMETRY] unavailable")
    else:
        lines.append(
            f"  [TELEMETRY] +{a.telemetry_events_collected} events "
            f"({a.telemetry_yield_per_minute or 0:.1f}/min)"
        )
    return lines


def summary_lines(s: SessionSummary, cfg: DrainConfig) -> list[str]:
    results = s.results
    n = len(results)
    rate = f"{100 * s.total_success / n:.1f}%" if n else "n/a"
    leaks = sum(len(r.leaked_processes) for r in results)
    restored = sum(1 for r in results if r.state_restored)
    known = [r for r in results if r.telemetry_events_collected is not None]
    minutes = sum(r.subprocess_duration_seconds for r in known) / 60
    if known:
        per_min = s.total_telemetry_events / minutes if minutes > 0 else 0.0
        telemetry = (
            f"{s.total_telemetry_events} events ({per_min:.1f}/min over "
            f"{minutes:.1f} min of attempts)"
        )
    else:
        telemetry = "unavailable" if n else "none"
    lines = [
        "",
        f"==== Session {s.session_id} ====",
        f"Stop reason: {s.stop_reason or 'unknown'}",
        f"Processed: {n}  succeeded: {s.total_success}  failed: {s.total_failed}  "
        f"success rate: {rate}",
        f"Timeouts: {s.total_timeouts}  cancelled: {sum(1 for r in results if r.cancelled)}  "
        f"phases restored: {restored}  leaked processes: {leaks}",
        f"Telemetry: {telemetry}",
    ]
    by_run: dict[str, list[Attempt]] = defaultdict(list)
    for r in results:
        by_run[r.run_id].append(r)
    if by_run:
        lines.append("Results by run:")
        width = min(max(len(run) for run in by_run), 48)
        for run, items in sorted(by_run.items()):
            ok = sum(1 for r in items if r.success)
            tmo = sum(1 for r in items if r.timed_out)
            extra = f", {tmo} timed out" if tmo else ""
            stopped = f"  [stopped: {s.stopped_runs[run]}]" if run in s.stopped_runs else ""
            lines.append(f"  {run:<{width}}  {ok} ok / {len(items) - ok} failed{extra}{stopped}")
    if s.pattern_leaks:
        lines.append(f"Leak gauge (--leak-pattern {cfg.leak_pattern}): "
                     f"{len(s.pattern_leaks)} process(es) appeared and outlived their attempt:")
        for p in s.pattern_leaks:
            lines.append(f"  pid {p.pid} {_one_line(' '.join(p.cmdline) or p.name, 120)}")
    lines += [
        f"Session saved: {s.snapshot_path}",
        f"Journal:       {s.journal_path}",
        f"Logs:          {s.logs_dir}",
    ]
    return lines
