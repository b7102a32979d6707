"""Human-readable output: the identity header, per-attempt lines, the session summary.

Reads records only (config, attempts, the summary and its totals).
"""

from __future__ import annotations

import shlex

from .config import DrainConfig
from .models import Attempt, SessionSummary, format_rate
from .settings import AUTOPACK_SESSION_DIR, looks_like_autopack

STATE_ORDER = ("FAILED", "QUEUED", "EXECUTING", "GATE", "CI_RUNNING", "COMPLETE", "SKIPPED")
EXCERPT = 240


def header_lines(
    cfg: DrainConfig, session_id: str, counts: dict[str, int], rules: str
) -> list[str]:
    """``rules``: the stop rules and their settings (``Policy.describe()``)."""
    states = [s for s in STATE_ORDER if s in counts] + sorted(set(counts) - set(STATE_ORDER))
    phases = ", ".join(f"{s} {counts[s]}" for s in states) or "none"
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
        f"  session:    {cfg.session_dir / session_id}{autopack_note(cfg)}",
    ]


def autopack_note(cfg: DrainConfig) -> str:
    """Said after the session directory when it is Autopack's own, in an Autopack checkout."""
    if looks_like_autopack(cfg.workspace) and \
            cfg.session_dir.resolve() == (cfg.workspace / AUTOPACK_SESSION_DIR).resolve():
        return " (Autopack's session directory: the workspace is an Autopack checkout)"
    return ""


SHOWN_ID = 200  #: ids longer than this are cut on the console (the session files keep them)


def shown_id(text: str) -> str:
    """An id as console lines show it: an id of megabytes would flood the terminal."""
    if len(text) <= SHOWN_ID:
        return text
    return f"{text[:SHOWN_ID]}...(+{len(text) - SHOWN_ID:,} characters)"


def _one_line(text: str | None, limit: int = EXCERPT) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def started_line(a: Attempt, number: int, batch_size: int, lanes: int,
                 show_limit: bool = False) -> str:
    """``show_limit``: name the attempt's time limit (adaptive timeouts)."""
    lane = f" [lane {a.lane}]" if lanes > 1 else ""
    limit = f" (limit {a.timeout_seconds:.0f}s)" if show_limit and a.timeout_seconds else ""
    return (f"[{number}/{batch_size}]{lane} Draining: {shown_id(a.run_id)} / "
            f"{shown_id(a.phase_id)}{limit}")


def attempt_lines(a: Attempt, lanes: int = 1) -> list[str]:
    """The result lines of an attempt, echoed together (no other attempt's line comes in
    between); the first names the attempt, so a plain log of several lanes stays readable:
    ``[OK] run / phase [lane 3] COMPLETE in 0.5s``."""
    took = f"{a.subprocess_duration_seconds:.1f}s"
    who = f"{shown_id(a.run_id)} / {shown_id(a.phase_id)}" + (
        f" [lane {a.lane}]" if lanes > 1 else "")
    lines: list[str] = []
    if a.success:
        lines.append(f"  [OK] {who} {a.final_state} in {took}")
    elif a.cancelled:
        lines.append(f"  [CANCELLED] {who} after {took}: {_one_line(a.error_message)}")
    elif a.timed_out:
        lines.append(f"  [TIMEOUT] {who} after {took}: {_one_line(a.error_message)}")
    else:
        rc = a.subprocess_returncode
        lines.append(f"  [FAIL] {who} {a.final_state} in {took} (rc={rc}): "
                     f"{_one_line(a.error_message)}")
    if a.worker_error and not a.success:  # whole, however long the message is
        lines.append(f"  [ERROR] {a.worker_error}")
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


def summary_lines(s: SessionSummary, leak_pattern: str) -> list[str]:
    t = s.totals
    n = t.processed
    minutes = t.telemetry_seconds / 60
    if t.telemetry_known:
        per_min = t.telemetry_events / minutes if minutes > 0 else 0.0
        telemetry = (f"{t.telemetry_events} events ({per_min:.1f}/min over "
                     f"{minutes:.1f} min of attempts)")
    else:
        telemetry = "unavailable" if n else "none"
    lines = [
        "",
        f"==== Session {s.session_id} ====",
        f"Stop reason: {s.stop_reason or 'unknown'}"
        + (f" ({s.stop_detail})" if s.stop_detail else ""),
        f"Attempts: {n}  {t.text()}",
        f"Success rate: {format_rate(t.success_rate)} of {t.ended} ended  "
        f"phases restored: {t.restored}  leaked processes: {t.leaked}",
        f"Telemetry: {telemetry}",
    ]
    if t.runs:
        lines.append("Results by run:")
        width = min(max(len(run) for run in t.runs), 48)
        for run, counts in sorted(t.runs.items()):
            stopped = f"  [stopped: {s.stopped_runs[run]}]" if run in s.stopped_runs else ""
            lines.append(f"  {shown_id(run):<{width}}  {counts.text(brief=True)}{stopped}")
    if s.pattern_leaks:
        lines.append(f"Leak gauge (--leak-pattern {leak_pattern}): "
                     f"{len(s.pattern_leaks)} process(es) appeared and outlived their attempt:")
        for p in s.pattern_leaks:
            lines.append(f"  pid {p.pid} {_one_line(' '.join(p.cmdline) or p.name, 120)}")
    lines += [
        f"Session saved: {s.snapshot_path}",
        f"Journal:       {s.journal_path}",
        f"Logs:          {s.logs_dir}",
    ]
    return lines


def resume_command(cfg: DrainConfig, session_id: str) -> str:
    """The command that resumes a session (the database URL only when it holds no secret)."""
    parts = ["python -m drainer run --resume", session_id, "--session-dir",
             shlex.quote(str(cfg.session_dir))]
    if cfg.db.password is None:
        parts += ["--database-url", shlex.quote(cfg.db.sync_url)]
    else:
        parts.append("(with your --database-url or DATABASE_URL)")
    return " ".join(parts)
