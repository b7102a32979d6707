"""Post-hoc analysis of one drain session: exact figures and recommendations.

:func:`load_session` reads a session written by drainer (journal or snapshot) or by Autopack's
``batch_drain_controller.py`` (its session JSON), :func:`analyze` turns it into a JSON-ready
report, and :func:`render_text` lays that report out for a terminal.

Percentiles (medians included) use the **nearest-rank** method, so a hand computation matches:
sort the ``n`` values ascending; the P-th percentile is the value at 1-based rank
``ceil(P / 100 * n)`` (rank 1 when that is 0). The median is the 50th percentile by the same
rule, so for an even count it is the *lower* of the two middle values, never an average. An
empty list has no percentile (``None``, ``null`` in JSON).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import textwrap
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .advice import Evidence, advise, ranked, short
from .errors import SessionError
from .journal import JOURNAL_NAME, Damage, iter_attempts, replay
from .models import OUTCOME_KEYS, OUTCOMES, Attempt, Totals, format_rate, stop_reason_of

LATEST = "latest"
TOP_FINGERPRINTS = 10  #: how many fingerprints the report lists
#: Autopack records carry no ``timed_out``; its controller treats these return codes as timeouts.
AUTOPACK_TIMEOUT_RETURNCODES = frozenset({-1, 143})

DURATION_KEYS = ("min", "median", "p90", "max")
TEXT_WIDTH = 100  #: recommendations are wrapped to this width in text

# Attempt fields whose ``None`` in a record means "use the default" (Autopack writes null for
# excerpts, durations, flags it never measured); fields whose default is None keep their null.
_NULL_MEANS_DEFAULT = frozenset(
    f.name for f in dataclasses.fields(Attempt) if f.default is not None
)


@dataclass
class LoadedSession:
    """One session as read from disk, whatever wrote it: its header, and ``read`` to stream
    its attempts (a journal is read again on each pass, never held in memory)."""

    session_id: str
    source: Path  #: the file the results are read from (journal or snapshot)
    read: Callable[[], Iterable[Attempt]] = tuple
    stop_reason: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    stopped_runs: dict[str, str] = field(default_factory=dict)
    unfinished: int = 0  #: attempts the journal shows started but never finished
    damage: Damage | None = None  #: corrupt journal lines that were skipped
    config: dict[str, Any] = field(default_factory=dict)  #: the session's options, if known

    def attempts(self) -> Iterator[Attempt]:
        return iter(self.read())


# -- loading ------------------------------------------------------------------------------


def load_session(target: str, session_dir: Path) -> LoadedSession:
    """Load the session ``target`` names.

    ``target`` is ``"latest"`` (the session in ``session_dir`` that started last, complete or
    not), a session id (``session_dir/<id>/journal.jsonl`` and/or ``session_dir/<id>.json``), or
    a path to a session ``.json`` (drainer's or Autopack's), a ``journal.jsonl`` or a session's
    directory. The journal is preferred whenever it exists: it is the source of truth, while a
    snapshot of a large session may lag behind it. Raises :class:`SessionError`.
    """
    if target == LATEST:
        return _load_latest(session_dir)
    if _looks_like_id(target):
        found = _load_by_id(target, session_dir)
        if found is not None:
            return found
    path = Path(target)
    if path.is_dir() and (path / JOURNAL_NAME).is_file():
        return _load_journal(path / JOURNAL_NAME)
    if path.is_file():
        return _load_path(path)
    raise SessionError(
        f"no session {target!r} in {session_dir} and no such file: pass 'latest', a session id "
        "from that directory (see --session-dir), or the path of a session .json or journal.jsonl"
    )


def _looks_like_id(target: str) -> bool:
    return (
        bool(target)
        and target not in {".", ".."}
        and "/" not in target
        and os.sep not in target
        and not target.endswith((".json", ".jsonl"))
    )


def _load_by_id(session_id: str, session_dir: Path) -> LoadedSession | None:
    journal = session_dir / session_id / JOURNAL_NAME
    snapshot = session_dir / f"{session_id}.json"
    if journal.is_file():
        try:
            return _load_journal(journal)
        except SessionError as exc:
            if snapshot.is_file():
                raise SessionError(
                    f"{exc}; its snapshot may still be readable: analyse {snapshot}"
                ) from exc
            raise
    if snapshot.is_file():
        return _load_snapshot(snapshot)
    return None


def _load_path(path: Path) -> LoadedSession:
    if path.suffix == ".jsonl":
        return _load_journal(path)
    sibling = path.parent / path.stem / JOURNAL_NAME
    if path.suffix == ".json" and sibling.is_file():
        try:
            return _load_journal(sibling)
        except SessionError:
            pass  # the journal is damaged: read the snapshot the caller named instead
    return _load_snapshot(path)


def _load_journal(path: Path) -> LoadedSession:
    state = replay(path)  # one streaming pass: header, stops, unfinished attempts
    return LoadedSession(
        session_id=state.session_id,
        source=path,
        read=lambda: iter_attempts(path),
        stop_reason=state.stop_reason,
        started_at=_text(state.started_at),
        completed_at=_text(state.completed_at) if state.stopped else None,
        stopped_runs=dict(state.stopped_runs),
        unfinished=len(state.dangling),
        damage=state.damage if state.damage is not None and state.damage.count else None,
        config=state.config if isinstance(state.config, dict) else {},
    )


def _load_snapshot(path: Path) -> LoadedSession:
    data = _read_json(path)
    if not _is_session(data):
        raise SessionError(
            f"{path} is not a drainer or Autopack session file (expected a JSON object with "
            "session_id and results[]); pass a file from the session directory"
        )
    results: list[Attempt] = []
    for number, item in enumerate(data["results"]):
        try:
            results.append(attempt_from_record(item))
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionError(
                f"{path}: results[{number}] is not an attempt record ({exc}); "
                "the file is damaged or not a session file"
            ) from exc
    return LoadedSession(
        session_id=str(data["session_id"]),
        source=path,
        read=lambda: results,
        stop_reason=_text(data.get("stop_reason")),
        started_at=_text(data.get("started_at")),
        completed_at=_text(data.get("completed_at")),
        stopped_runs=_stopped_runs(data.get("stopped_runs")),
    )


def attempt_from_record(item: Any) -> Attempt:
    """An :class:`Attempt` from a ``results[]`` item written by drainer or by Autopack.

    Autopack's records lack drainer's fields (``Attempt.from_json`` fills them) and hold null
    where drainer has a non-null default; those nulls take the default. Without ``timed_out``,
    a return code of -1 or 143 counts as a timeout, as in Autopack's controller.
    """
    if not isinstance(item, dict):
        raise TypeError(f"expected an object, got {type(item).__name__}")
    for key in ("run_id", "phase_id"):
        if not isinstance(item.get(key), str):
            raise ValueError(f"{key} is missing or not a string")
    record = {k: v for k, v in item.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
    record.setdefault("phase_index", 0)
    if "timed_out" not in record:
        record["timed_out"] = record.get("subprocess_returncode") in AUTOPACK_TIMEOUT_RETURNCODES
    return Attempt.from_json(record)


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SessionError(f"cannot read session file {path}: {exc.strerror}") from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SessionError(
            f"corrupt session file {path}: not valid JSON ({exc}); if the session has a "
            f"journal, analyse {path.parent / path.stem / JOURNAL_NAME} instead"
        ) from exc


def _is_session(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("session_id"), str)
        and isinstance(data.get("results"), list)
    )


def _stopped_runs(value: Any) -> dict[str, str]:
    """drainer stores ``{run: reason}``; Autopack stores a list of run ids."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {str(run): "stopped" for run in value}
    return {}


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _load_latest(session_dir: Path) -> LoadedSession:
    if not session_dir.is_dir():
        raise SessionError(
            f"no sessions in {session_dir}: the directory does not exist; "
            "pass the --session-dir the drain used"
        )
    starts: dict[str, str] = {}
    for journal in session_dir.glob(f"*/{JOURNAL_NAME}"):
        started = _peek_journal(journal)
        if started is not None:
            starts[journal.parent.name] = started
    for snapshot in session_dir.glob("*.json"):
        if starts.get(snapshot.stem):
            continue
        started = _peek_snapshot(snapshot)
        if started is not None:
            starts[snapshot.stem] = started or starts.get(snapshot.stem, "")
    if not starts:
        raise SessionError(
            f"no sessions in {session_dir}: drain one first, or pass the --session-dir it used"
        )
    newest = max(starts, key=lambda sid: (*_start_key(starts[sid]), sid))
    found = _load_by_id(newest, session_dir)
    if found is None:  # pragma: no cover - the files were there a moment ago
        raise SessionError(f"session {newest} disappeared from {session_dir} while reading it")
    return found


def _peek_journal(path: Path) -> str | None:
    """The journal's started_at ("" when absent), or None when it starts no session."""
    try:
        with path.open("rb") as fh:
            first = orjson.loads(fh.readline())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(first, dict) or first.get("type") != "session_started":
        return None
    return str(first.get("started_at") or "")


def _peek_snapshot(path: Path) -> str | None:
    """The snapshot's started_at ("" when absent), or None when it is no session file."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not _is_session(data):
        return None
    return str(data.get("started_at") or "")


_OLDEST = datetime.min.replace(tzinfo=UTC)


def _start_key(started_at: str) -> tuple[bool, datetime]:
    """Sort key of a start time; naive times (old Autopack files) are taken as UTC."""
    try:
        parsed = datetime.fromisoformat(started_at)
    except ValueError:
        return (False, _OLDEST)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (True, parsed)


# -- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank P-th percentile of ``values``: the value at 1-based rank
    ``ceil(p / 100 * n)`` of the sorted values (rank 1 at least); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    rank = -(-p * n // 100)  # ceil without float error for integral p and n
    return ordered[max(1, int(rank)) - 1]


def _round(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)


@dataclass
class _Figures:
    """What one streaming pass over a session's attempts gathers: counts, sums, and the
    two columns percentiles need (compact float arrays); nothing else per attempt."""

    totals: Totals = field(default_factory=Totals)
    with_events: int = 0
    yields: array[float] = field(default_factory=lambda: array("d"))
    durations: array[float] = field(default_factory=lambda: array("d"))
    fingerprints: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    evidence: Evidence = field(default_factory=lambda: Evidence("", None, False, 0, 0))
    ended_yields: array[float] = field(default_factory=lambda: array("d"))

    def add(self, a: Attempt) -> None:
        self.totals.add(a)
        known = a.telemetry_events_collected is not None
        if known:
            self.yields.append(a.telemetry_yield_per_minute or 0.0)
            self.with_events += (a.telemetry_events_collected or 0) > 0
        if a.failed and a.failure_fingerprint:
            self.fingerprints[a.failure_fingerprint] += 1
        if a.zero_yield_reason:
            self.reasons[a.zero_yield_reason] += 1
        if not a.interrupted and a.subprocess_duration_seconds > 0:
            self.durations.append(a.subprocess_duration_seconds)
        self.leaks += [{"run_id": a.run_id, "phase_id": a.phase_id, "pid": p.pid,
                        "name": p.name, "cmdline": list(p.cmdline)}
                       for p in a.leaked_processes]
        self._gather(a, known)

    def _gather(self, a: Attempt, known: bool) -> None:
        """The evidence of the advice rules (:mod:`drainer.advice`)."""
        e = self.evidence
        if a.interrupted:  # drainer's leftover: only its own rule reads it
            e.interrupted += 1
            e.interrupted_restored += a.state_restored
            e.interrupted_killed += len(a.leaked_processes)
            return
        e.ended += 1
        outcome = a.outcome
        if outcome == "failed":
            e.worker_failures += 1
            if a.failure_fingerprint:
                e.worker_fingerprints[a.failure_fingerprint] += 1
        elif outcome == "timed out":
            e.timed_out += 1
            e.longest_timeout = max(e.longest_timeout, a.subprocess_duration_seconds)
        if known:
            e.telemetry_known += 1
            self.ended_yields.append(a.telemetry_yield_per_minute or 0.0)
            if a.telemetry_events_collected:
                e.telemetry_yielding += 1
            else:
                e.zero_reasons[a.zero_yield_reason or "unknown"] += 1
        e.leaks += [(a.run_id, a.phase_id, p.name) for p in a.leaked_processes]


def analyze(session: LoadedSession) -> dict[str, Any]:
    """Exact figures of ``session`` and the recommendations they call for, JSON-ready.

    Counting rules: ``processed`` is every recorded attempt, each counted under one outcome
    (:attr:`Attempt.outcome`: ``ok``, ``failed``, ``timed_out``, ``cancelled``,
    ``interrupted``); fingerprints count the attempts that did not succeed and were not
    interrupted. Telemetry figures cover the attempts
    whose event count is known (a null yield there counts as 0); ``total_events`` is null when
    no attempt's count is known. Durations cover attempts that ran and recorded a duration
    (interrupted attempts and Autopack records with a null duration are left out).
    Percentiles: nearest rank, see the module docstring.

    The attempts are streamed: one pass, and a second over the failures only when a
    systemic blocker is found (to name the runs it hit).
    """
    f = _Figures()
    for attempt in session.attempts():
        f.add(attempt)
    t = f.totals
    known = t.telemetry_known
    known_minutes = t.telemetry_seconds / 60
    durations = f.durations
    report: dict[str, Any] = {
        "session_id": session.session_id,
        "source": str(session.source),
        "started_at": session.started_at,
        "completed_at": session.completed_at,
        "stop_reason": session.stop_reason,
        "totals": {
            "processed": t.processed,
            **t.to_json(),
            "success_rate": _round(t.success_rate, 4),
        },
        "unfinished_attempts": session.unfinished,
        "telemetry": {
            "total_events": t.telemetry_events if known else None,
            "attempts_with_known_telemetry": known,
            "attempts_with_events": f.with_events,
            "pct_attempts_with_events": (
                round(100 * f.with_events / known, 1) if known else None
            ),
            "overall_yield_per_minute": (
                round(t.telemetry_events / known_minutes, 3) if known_minutes > 0 else None
            ),
            "median_yield": _round(percentile(f.yields, 50), 3),
            "p90_yield": _round(percentile(f.yields, 90), 3),
        },
        "zero_yield_reasons": dict(ranked(f.reasons)),
        "top_fingerprints": [[fp, n] for fp, n in ranked(f.fingerprints)[:TOP_FINGERPRINTS]],
        "durations": {
            "min": _round(min(durations), 3) if durations else None,
            "median": _round(percentile(durations, 50), 3),
            "p90": _round(percentile(durations, 90), 3),
            "max": _round(max(durations), 3) if durations else None,
        },
        "by_run": {
            run: {"attempts": c.attempts, **c.to_json()}
            for run, c in sorted(t.runs.items())
        },
        "leaks": {"total": len(f.leaks), "processes": f.leaks},
        "stopped_runs": dict(sorted(session.stopped_runs.items())),
    }
    advice = advise(_evidence(session, f))
    report["recommendations"] = [text for _, text in advice]
    report["recommendation_rules"] = [name for name, _ in advice]
    return report


def _evidence(session: LoadedSession, f: _Figures) -> Evidence:
    e = f.evidence
    reason = stop_reason_of(session.stop_reason)
    timeout = session.config.get("phase_timeout")
    e.session_id, e.stop_reason = session.session_id, session.stop_reason
    e.resumable = session.stop_reason is None or (reason is not None and reason.resumable)
    e.processed, e.unfinished = f.totals.processed, session.unfinished
    e.runs = sorted(f.totals.runs)
    e.phase_timeout = float(timeout) if isinstance(timeout, int | float) else None
    e.median_yield = _round(percentile(f.ended_yields, 50), 3)

    def runs_hit(fingerprint: str) -> Counter[str]:  # a second pass, worker failures only
        return Counter(a.run_id for a in session.attempts()
                       if a.outcome == "failed" and a.failure_fingerprint == fingerprint)

    e.runs_hit = runs_hit
    return e


# -- text -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")  # figures carry at most 4 places
    return str(value)


def _table(rows: list[list[str]], align: str = "", indent: str = "  ") -> list[str]:
    """Rows as aligned columns; ``align`` has one ``l``/``r`` per column (default: the first
    column left, the others right)."""
    if not rows:
        return []
    ncols = len(rows[0])
    align = align or "l" + "r" * (ncols - 1)
    widths = [max(len(row[i]) for row in rows) for i in range(ncols)]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if how == "l" else cell.rjust(width)
            for cell, width, how in zip(row, widths, align, strict=True)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def render_text(report: dict[str, Any]) -> list[str]:
    """The report of :func:`analyze` as plain-text lines, recommendations last."""
    totals = report["totals"]
    tel = report["telemetry"]
    rate = totals["success_rate"]
    lines = [
        f"==== Analysis of session {report['session_id']} ====",
        f"Source:      {report['source']}",
        f"Started:     {_fmt(report.get('started_at'))}",
        f"Completed:   {_fmt(report.get('completed_at'))}",
        f"Stop reason: {_fmt(report['stop_reason'])}",
        "",
        "Totals",
        *_table(
            [
                ["attempts", str(totals["processed"])],
                *[[word, str(totals[key])] for word, key in OUTCOME_KEYS],
                ["success rate (of the attempts that ended)", format_rate(rate)],
            ]
        ),
    ]
    if report.get("unfinished_attempts"):
        lines.append(f"  ({report['unfinished_attempts']} attempt(s) started, never finished)")
    pct = tel["pct_attempts_with_events"]
    lines += [
        "",
        "Telemetry",
        *_table(
            [
                ["total events", _fmt(tel["total_events"])],
                ["attempts with known telemetry", str(tel["attempts_with_known_telemetry"])],
                ["attempts with events", str(tel["attempts_with_events"])],
                ["attempts with events (%)", "n/a" if pct is None else f"{_fmt(pct)}%"],
                ["overall yield (events/min)", _fmt(tel["overall_yield_per_minute"])],
                ["median yield (events/min)", _fmt(tel["median_yield"])],
                ["p90 yield (events/min)", _fmt(tel["p90_yield"])],
            ]
        ),
        "",
        "Zero-yield reasons",
    ]
    reasons = report["zero_yield_reasons"]
    lines += _table([[r, str(n)] for r, n in reasons.items()]) if reasons else ["  none"]

    lines += ["", f"Top failure fingerprints (top {TOP_FINGERPRINTS})"]
    fps = report["top_fingerprints"]
    if fps:
        lines += _table([[str(n), short(" ".join(fp.split()))] for fp, n in fps], align="rl")
    else:
        lines.append("  none")

    d = report["durations"]
    lines += [
        "",
        "Durations (seconds, nearest-rank percentiles)",
        *_table([list(DURATION_KEYS), [_fmt(d[k]) for k in DURATION_KEYS]], align="rrrr"),
        "",
        "By run",
    ]
    runs = report["by_run"]
    if runs:
        rows = [["run", "attempts", *OUTCOMES, "stopped"]]
        for run, c in runs.items():
            rows.append([run, str(c["attempts"]), *[str(c[key]) for _, key in OUTCOME_KEYS],
                         report["stopped_runs"].get(run, "")])
        lines += _table(rows, align="lrrrrrrl")
    else:
        lines.append("  none")
    other_stops = {r: why for r, why in report["stopped_runs"].items() if r not in runs}
    lines += [f"  stopped {r}: {why}" for r, why in other_stops.items()]

    leaks = report["leaks"]
    lines += ["", f"Leaked processes: {leaks['total']}"]
    lines += _table(
        [
            [f"{p['run_id']} / {p['phase_id']}", f"pid {p['pid']}", p["name"],
             short(shlex.join(p["cmdline"]))]
            for p in leaks["processes"]
        ],
        align="lrll",
    )

    lines += ["", "Recommendations"]
    recs = report["recommendations"]
    if recs:
        for rec in recs:  # wrapped between words only, so options stay whole for copying
            lines += textwrap.wrap(rec, width=TEXT_WIDTH, initial_indent="  - ",
                                   subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False)
    else:
        lines.append("  - none: nothing in the figures calls for a change")
    return lines
