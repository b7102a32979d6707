"""``drainer analyze --history``: the attempt history (``drainer_attempts``) across sessions
and drainers, per session, per run and per phase: attempts, the outcome trend, and the
failure fingerprints at each workspace revision. Pure: rows in, a JSON-ready dict out, and
its text; the HTML form is in :mod:`drainer.report_html`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .backlog.history import Row
from .report import shown_id
from .revision import short

OUTCOME_ORDER = ("ok", "failed", "timed out", "cancelled", "interrupted")
RUNS_SHOWN = 40
PHASES_SHOWN = 50


def iso_time(epoch: float | None) -> str | None:
    """An epoch time of the database's clock as ISO 8601 UTC (seconds)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _outcomes(rows: Iterable[Row]) -> dict[str, int]:
    counts = Counter(r.outcome for r in rows)
    return {name: counts.get(name, 0) for name in (*OUTCOME_ORDER, *sorted(
        set(counts) - set(OUTCOME_ORDER)))}


def _runs_of(outcomes: Sequence[str]) -> list[list[Any]]:
    """Outcomes in order as runs of equal ones: ``[["failed", 2], ["ok", 1]]``."""
    found: list[list[Any]] = []
    for outcome in outcomes:
        if found and found[-1][0] == outcome:
            found[-1][1] += 1
        else:
            found.append([outcome, 1])
    return found


def history_report(rows: Sequence[Row], source: str, *, run_id: str | None = None,
                   phases_shown: int = PHASES_SHOWN) -> dict[str, Any]:
    """The history's figures (``rows`` oldest first, as :meth:`History.rows` gives them)."""
    sessions: dict[str, list[Row]] = {}
    runs: dict[str, list[Row]] = {}
    phases: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        sessions.setdefault(row.session_id, []).append(row)
        runs.setdefault(row.run_id, []).append(row)
        phases.setdefault((row.run_id, row.phase_id), []).append(row)
    order = list(sessions)  # by first attempt's end: rows come oldest first
    by_run = {}
    for run, found in sorted(runs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        per_session: dict[str, list[int]] = {}
        for r in found:
            tally = per_session.setdefault(r.session_id, [0, 0])
            tally[0] += r.outcome == "ok"
            tally[1] += 1
        by_run[run] = {
            "attempts": len(found),
            "phases": len({r.phase_id for r in found}),
            "sessions": len(per_session),
            "outcomes": _outcomes(found),
            "trend": [f"{per_session[s][0]}/{per_session[s][1]}" for s in order
                      if s in per_session],
            "last_revision": found[-1].revision,
        }
    by_phase = []
    for (run, phase), found in sorted(phases.items(),
                                      key=lambda kv: (-len(kv[1]), kv[0]))[:phases_shown]:
        prints: dict[str, Counter[str]] = {}
        for r in found:
            if r.fingerprint:
                prints.setdefault(r.revision or "unknown", Counter())[r.fingerprint] += 1
        by_phase.append({
            "run_id": run, "phase_id": phase, "attempts": len(found),
            "sessions": len({r.session_id for r in found}),
            "trend": _runs_of([r.outcome for r in found]),
            "last_finished_at": iso_time(found[-1].finished_at),
            "fingerprints_by_revision": {rev: dict(c.most_common()) for rev, c in prints.items()},
        })
    return {
        "source": source,
        "run_id": run_id,
        "totals": {
            "attempts": len(rows), "sessions": len(sessions),
            "hosts": len({r.host for r in rows}), "runs": len(runs), "phases": len(phases),
            "first_finished_at": iso_time(rows[0].finished_at) if rows else None,
            "last_finished_at": iso_time(rows[-1].finished_at) if rows else None,
            "outcomes": _outcomes(rows),
            "duration_seconds": round(sum(r.duration_seconds for r in rows), 3),
        },
        "sessions": [{
            "session_id": s, "hosts": sorted({r.host for r in sessions[s]}),
            "first_finished_at": iso_time(sessions[s][0].finished_at),
            "last_finished_at": iso_time(sessions[s][-1].finished_at),
            "attempts": len(sessions[s]), "outcomes": _outcomes(sessions[s]),
            "revisions": sorted({r.revision or "unknown" for r in sessions[s]}),
        } for s in order],
        "by_run": by_run,
        "by_phase": by_phase,
        "phases_shown": min(phases_shown, len(phases)),
    }


def _tally(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in outcomes.items() if n) or "none"


def history_text(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    scope = f" (run {shown_id(report['run_id'])})" if report.get("run_id") else ""
    lines = [f"Attempt history in {report['source']}{scope}"]
    if not t["attempts"]:
        return [*lines, "  no attempts recorded yet (drainer run records each one; "
                        "--no-history turns that off)"]
    lines += [
        f"  attempts: {t['attempts']} ({_tally(t['outcomes'])}) of {t['phases']} phase(s) "
        f"in {t['runs']} run(s)",
        f"  sessions: {t['sessions']} on {t['hosts']} host(s), attempts ended from "
        f"{t['first_finished_at']} to {t['last_finished_at']}",
        "Sessions (oldest first):",
    ]
    for s in report["sessions"]:
        revisions = ", ".join(short(r) if r != "unknown" else r for r in s["revisions"])
        lines.append(f"  {s['session_id']}  {', '.join(s['hosts'])}  {s['first_finished_at']}"
                     f"  {s['attempts']} attempt(s): {_tally(s['outcomes'])}  "
                     f"[revision {revisions}]")
    runs = list(report["by_run"].items())
    lines.append("Runs (most attempts first; successes/attempts per session, oldest first):")
    for run, r in runs[:RUNS_SHOWN]:
        lines.append(f"  {shown_id(run)}: {r['attempts']} attempt(s) of {r['phases']} phase(s) "
                     f"in {r['sessions']} session(s): {' -> '.join(r['trend'])}"
                     + (f"  (last at {short(r['last_revision'])})" if r["last_revision"]
                        else ""))
    if len(runs) > RUNS_SHOWN:
        lines.append(f"  ... {len(runs) - RUNS_SHOWN} more run(s) (--json lists all)")
    lines.append(f"Phases (most attempts first; top {report['phases_shown']} of "
                 f"{t['phases']}):")
    for p in report["by_phase"]:
        trend = " -> ".join(f"{o} x{n}" if n > 1 else o for o, n in p["trend"])
        lines.append(f"  {shown_id(p['run_id'])} / {shown_id(p['phase_id'])}: "
                     f"{p['attempts']} attempt(s) in {p['sessions']} session(s): {trend}")
        for rev, prints in p["fingerprints_by_revision"].items():
            at = short(rev) if rev != "unknown" else "an unknown revision"
            for fp, n in prints.items():
                lines.append(f"    at {at}: {fp} ({n}x)")
    return lines
