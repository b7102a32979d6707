"""One self-contained HTML page for a session's analysis: the figures as tables, four SVG charts.

:func:`render_html` takes a :class:`~drainer.analyze.LoadedSession` and the report
:func:`~drainer.analyze.analyze` made of it, and returns a single document with inline CSS and
inline SVG: no script, no external URL, so it opens offline, can be mailed or attached to a CI
run, and prints. The charts are drawn here by hand on purpose: a few hundred lines of SVG, no
dependency. A plotting library like matplotlib or plotly would add a large dependency (or several
MB of inline JavaScript) for four simple charts.

Every text that comes from the session (run ids, fingerprints, error text, process names) is data
and goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .analyze import DURATION_KEYS, TOP_FINGERPRINTS, LoadedSession, _fmt
from .models import OUTCOME_KEYS, OUTCOMES, Attempt, format_rate

#: Fill colour of each outcome in the timeline (tests look for these pixels in a screenshot).
COLOURS = {"success": "#2ca02c", "failed": "#d62728", "timeout": "#ff7f0e", "stopped": "#999999"}
LEGEND = {"success": "success", "failed": "failed", "timeout": "timed out",
          "stopped": "cancelled / interrupted"}
BAR_COLOUR = "#4a72b0"
UNKNOWN_COLOUR = "#bbbbbb"
ZERO_COLOUR = "#d62728"  #: the mark of an attempt that yielded no telemetry
WIDTH = 1000  #: width of every chart in SVG units
LEFT = 110  #: room for row and axis labels left of a plot
PLOT = WIDTH - LEFT - 30
LABEL_CHARS = 60  #: fingerprint labels are cut to this; the full text is in a tooltip

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.fp, td.cmd { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.note { color: #666; font-style: italic; }
svg { display: block; max-width: 100%; height: auto; margin: 8px 0; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .axis { stroke: #555; stroke-width: 1; } svg .grid { stroke: #e4e4e4; stroke-width: 1; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def outcome(attempt: Attempt) -> str:
    """The timeline category of ``attempt``: a key of :data:`COLOURS`."""
    if attempt.cancelled or attempt.interrupted:
        return "stopped"
    if attempt.timed_out:
        return "timeout"
    return "success" if attempt.success else "failed"


def _when(stamp: str | None) -> datetime | None:
    """An ISO timestamp as an aware datetime (naive ones taken as UTC); None if unreadable."""
    if not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _num(value: float) -> str:
    return f"{value:.6g}"


def _nice_step(span: float, ticks: int = 8) -> float:
    """A 1/2/5 x 10^k step that cuts ``span`` into at most about ``ticks`` parts."""
    raw = span / ticks if span > 0 else 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _nice_top(value: float, whole: bool) -> float:
    """The value axis' top: ``value`` rounded up to a whole tick, so the tallest bar ends at
    a labelled line instead of above the last label."""
    step = max(1.0, _nice_step(value, 5)) if whole else _nice_step(value, 5)
    return math.ceil(value / step - 1e-9) * step


def _text(x: float, y: float, text: str, anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_e(text)}</text>'


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str = "", cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    inner = f"<title>{_e(tip)}</title>" if tip else ""
    return (f'<rect{attrs} x="{x:.1f}" y="{y:.1f}" width="{max(w, 1.0):.1f}" '
            f'height="{h:.1f}" fill="{fill}">{inner}</rect>')


def _line(x1: float, y1: float, x2: float, y2: float, cls: str = "axis") -> str:
    return f'<line class="{cls}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'


def _x_axis(lo: float, hi: float, y: float, top: float, label: str) -> list[str]:
    """A horizontal axis under a plot spanning ``LEFT..LEFT+PLOT``, with grid lines to ``top``."""
    step = _nice_step(hi - lo)
    parts = [_line(LEFT, y, LEFT + PLOT, y)]
    for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1):
        x = LEFT + PLOT * (k * step - lo) / (hi - lo)
        parts += [_line(x, top, x, y, "grid"), _line(x, y, x, y + 4),
                  _text(x, y + 16, _num(k * step), "middle")]
    parts.append(_text(LEFT + PLOT / 2, y + 32, label, "middle"))
    return parts


def _y_axis(hi: float, top: float, bottom: float, label: str, whole: bool) -> list[str]:
    """A vertical axis from 0 (at ``bottom``) to ``hi`` (at ``top``) with grid lines."""
    step = max(1.0, _nice_step(hi, 5)) if whole else _nice_step(hi, 5)
    parts = [_line(LEFT, top, LEFT, bottom)]
    for k in range(math.floor(hi / step + 1e-9) + 1):
        y = bottom - (bottom - top) * k * step / hi
        parts += [_line(LEFT, y, LEFT + PLOT, y, "grid"), _line(LEFT - 4, y, LEFT, y),
                  _text(LEFT - 7, y + 4, _num(k * step), "end")]
    mid = (top + bottom) / 2
    parts.append(f'<text x="14" y="{mid:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {mid:.1f})">{_e(label)}</text>')
    return parts


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    """A row of (colour, label) keys at ``(x, y)``, in one ``legend`` group."""
    out = ['<g class="legend">']
    for colour, label in items:
        out += [_rect(x, y, 14, 14, colour), _text(x + 20, y + 11, label)]
        x += 40 + 7 * len(label)
    return [*out, "</g>"]


def _svg(chart_id: str, title: str, height: float, parts: list[str]) -> str:
    return (f'<svg id="{chart_id}" role="img" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}"><title>{_e(title)}</title>'
            + "\n".join(parts) + "</svg>")


def _tip(a: Attempt) -> str:
    return (f"{a.run_id} / {a.phase_id} (lane {a.lane}): {LEGEND[outcome(a)]}, "
            f"{a.subprocess_duration_seconds:.1f}s")


def _timeline(session: LoadedSession, attempts: Sequence[Attempt]) -> str:
    spans = [(a, s, f) for a in attempts
             if (s := _when(a.started_at)) is not None and (f := _when(a.finished_at)) is not None]
    if not spans:
        return '<p class="note">No attempts with start and finish times: no timeline.</p>'
    first = min(s for _, s, _ in spans)
    origin = _when(session.started_at)
    origin = first if origin is None or origin > first else origin
    hi = max((f - origin).total_seconds() for _, _, f in spans) or 1.0
    lanes = sorted({a.lane for a, _, _ in spans})
    row = 26
    bottom = 20 + row * len(lanes)
    parts = _x_axis(0.0, hi, bottom, 14, "seconds since the session start")
    for i, lane in enumerate(lanes):
        parts.append(_text(LEFT - 8, 20 + row * i + 17, f"lane {lane}", "end"))
    for a, s, f in spans:
        x0 = (s - origin).total_seconds()
        x1 = max(x0, (f - origin).total_seconds())
        parts.append(_rect(LEFT + PLOT * x0 / hi, 22 + row * lanes.index(a.lane),
                           PLOT * (x1 - x0) / hi, row - 6, COLOURS[outcome(a)], _tip(a), "attempt"))
    parts += _legend([(COLOURS[key], label) for key, label in LEGEND.items()], LEFT,
                     bottom + 46)
    skipped = len(attempts) - len(spans)
    note = (f'<p class="note">{skipped} attempt(s) without start and finish times are not shown.'
            "</p>" if skipped else "")
    return _svg("chart-timeline", "Attempts per lane over time", bottom + 70, parts) + note


def _histogram(attempts: Sequence[Attempt]) -> str:
    durations = [a.subprocess_duration_seconds for a in attempts
                 if not a.interrupted and a.subprocess_duration_seconds > 0]
    if not durations:
        return '<p class="note">No attempts with a duration: no histogram.</p>'
    bins = min(20, max(10, math.ceil(math.sqrt(len(durations)))))
    lo, hi = min(durations), max(durations)
    if hi - lo < 1e-9:
        lo, hi = max(0.0, lo - 1.0), hi + 1.0
    counts = [0] * bins
    for d in durations:
        counts[min(bins - 1, int((d - lo) / (hi - lo) * bins))] += 1
    top, bottom = 14, 234
    scale = _nice_top(max(counts), whole=True)
    parts = _y_axis(scale, top, bottom, "attempts", whole=True)
    parts += _x_axis(lo, hi, bottom, top, "subprocess duration (seconds)")
    width = PLOT / bins
    for i, n in enumerate(counts):
        if n:
            h = (bottom - top) * n / scale
            left, right = lo + (hi - lo) * i / bins, lo + (hi - lo) * (i + 1) / bins
            parts.append(_rect(LEFT + width * i + 1, bottom - h, width - 2, h, BAR_COLOUR,
                               f"{_num(left)}-{_num(right)} s: {n} attempt(s)", "bin"))
    parts += _legend([(BAR_COLOUR, "attempts that ended on their own, per duration bin")],
                     LEFT, bottom + 40)
    return _svg("chart-durations", f"Attempt durations ({bins} bins)", bottom + 62, parts)


def _fingerprints(report: dict[str, Any]) -> str:
    top: list[list[Any]] = report["top_fingerprints"]
    if not top:
        return '<p class="note">No failure fingerprints.</p>'
    most = max(int(n) for _, n in top)
    row, left = 24, 430
    parts = []
    for i, (fp, n) in enumerate(top):
        flat = " ".join(str(fp).split())
        label = flat if len(flat) <= LABEL_CHARS else flat[: LABEL_CHARS - 3] + "..."
        y = 8 + row * i
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end"><title>{_e(fp)}</title>'
                     f"{_e(label)}</text>")
        w = (WIDTH - left - 60) * int(n) / most
        parts += [_rect(left, y + 2, w, row - 6, COLOURS["failed"], f"{n}x {fp}", "fp"),
                  _text(left + w + 6, y + 15, str(n))]
    bottom = 8 + row * len(top)
    parts.append(_line(left, bottom, WIDTH - 60, bottom))
    parts.append(_text((left + WIDTH - 60) / 2, bottom + 18, "failed attempts", "middle"))
    parts.append(_text(left - 8, bottom + 18, "fingerprint", "end"))
    parts += _legend([(COLOURS["failed"], "failed attempts with this fingerprint")], left,
                     bottom + 28)
    return _svg("chart-fingerprints", "Top failure fingerprints (failed attempts)",
                bottom + 50, parts)


def _yield(attempts: Sequence[Attempt]) -> str:
    def start_key(pair: tuple[int, Attempt]) -> tuple[bool, float, int]:
        when = _when(pair[1].started_at)
        return (when is None, when.timestamp() if when else 0.0, pair[0])

    ordered = [a for _, a in sorted(enumerate(attempts), key=start_key)]
    if not ordered:
        return '<p class="note">No attempts: no yield chart.</p>'
    yields = [a.telemetry_yield_per_minute or 0.0 for a in ordered
              if a.telemetry_events_collected is not None]
    hi = _nice_top(max(yields, default=0.0) or 1.0, whole=False)
    top, bottom = 14, 214
    parts = _y_axis(hi, top, bottom, "events / minute", whole=False)
    parts.append(_line(LEFT, bottom, LEFT + PLOT, bottom))
    width = PLOT / len(ordered)
    unknown = 0
    for i, a in enumerate(ordered):
        x = LEFT + width * i + min(1.0, width * 0.1)
        w = max(1.0, width - 2 * min(1.0, width * 0.1))
        if a.telemetry_events_collected is None:
            unknown += 1
            parts.append(_rect(x, bottom + 3, w, 8, UNKNOWN_COLOUR, f"{_tip(a)}; telemetry unknown",
                               "unknown"))
            continue
        value = a.telemetry_yield_per_minute or 0.0
        tip = f"{_tip(a)}; {a.telemetry_events_collected} events, {value:g}/min"
        if not value:  # a zero-height bar would be blank space: a mark at zero instead
            parts.append(_rect(x, bottom - 4, w, 4, ZERO_COLOUR, tip, "zero"))
            continue
        h = (bottom - top) * value / hi
        parts.append(_rect(x, bottom - h, w, h, BAR_COLOUR, tip, "yield"))
    parts.append(_text(LEFT + PLOT / 2, bottom + 30, "attempts in start order", "middle"))
    parts += _legend([(BAR_COLOUR, "events / minute"), (ZERO_COLOUR, "no telemetry (zero)"),
                      (UNKNOWN_COLOUR, "telemetry unknown")], LEFT, bottom + 40)
    note = (f'<p class="note">{unknown} attempt(s) with unknown telemetry are drawn as grey marks '
            "under the axis.</p>" if unknown else "")
    return _svg("chart-yield", "Telemetry yield per attempt", bottom + 62, parts) + note


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], classes: str = "") -> str:
    """A table; ``classes`` has one letter per column: ``n`` numeric, ``f`` fingerprint,
    ``c`` command line, anything else plain (default: first plain, the rest numeric)."""
    if not rows:
        return '<p class="note">none</p>'
    classes = classes or "t" + "n" * (len(head) - 1)
    names = {"n": ' class="n"', "f": ' class="fp"', "c": ' class="cmd"'}
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = (f"<td{names.get(c, '')}>{_e(_fmt(v))}</td>"
                 for v, c in zip(row, classes, strict=True))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join([*out, "</table>"])


def _totals(report: dict[str, Any]) -> str:
    totals = report["totals"]
    rate = totals["success_rate"]
    return _table(["figure", "value"], [
        ["attempts", totals["processed"]],
        *[[word, totals[key]] for word, key in OUTCOME_KEYS],
        ["success rate (of the attempts that ended)", format_rate(rate)],
        ["started but never finished", report.get("unfinished_attempts", 0)]])


def _details(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(heading, table) of every figure besides the totals, in the order of ``render_text``."""
    tel = report["telemetry"]
    pct = tel["pct_attempts_with_events"]
    stops = report["stopped_runs"]
    leaks = report["leaks"]["processes"]
    other = [[run, why] for run, why in stops.items() if run not in report["by_run"]]
    return [
        ("Telemetry", _table(["figure", "value"], [
            ["total events", tel["total_events"]],
            ["attempts with known telemetry", tel["attempts_with_known_telemetry"]],
            ["attempts with events", tel["attempts_with_events"]],
            ["attempts with events (%)", "n/a" if pct is None else f"{_fmt(pct)}%"],
            ["overall yield (events/min)", tel["overall_yield_per_minute"]],
            ["median yield (events/min)", tel["median_yield"]],
            ["p90 yield (events/min)", tel["p90_yield"]]])),
        ("Zero-yield reasons", _table(["reason", "attempts"],
                                      list(report["zero_yield_reasons"].items()))),
        (f"Top failure fingerprints (top {TOP_FINGERPRINTS})",
         _table(["attempts", "fingerprint"], [[n, fp] for fp, n in report["top_fingerprints"]],
                "nf")),
        ("Durations (seconds, nearest-rank percentiles)",
         _table(list(DURATION_KEYS), [[report["durations"][k] for k in DURATION_KEYS]], "nnnn")),
        ("Results by run", _table(
            ["run", "attempts", *OUTCOMES, "stopped"],
            [[run, c["attempts"], *[c[key] for _, key in OUTCOME_KEYS], stops.get(run, "")]
             for run, c in report["by_run"].items()], "tnnnnnnt")),
        *([("Runs stopped without attempts", _table(["run", "reason"], other, "tt"))]
          if other else []),
        (f"Leaked processes: {len(leaks)}", _table(
            ["run / phase", "pid", "name", "command line"],
            [[f"{p['run_id']} / {p['phase_id']}", p["pid"], p["name"], shlex.join(p["cmdline"])]
             for p in leaks], "tntc")),
    ]


def render_html(session: LoadedSession, report: dict[str, Any]) -> str:
    """The analysis of ``session`` (``report`` is ``analyze(session)``) as one HTML document:
    session header, totals, recommendations, the four charts, then the detailed tables.

    The charts draw every attempt, so this holds the session's attempts in memory (the
    document is that large anyway); the text and JSON analyses stream them."""
    attempts = list(session.attempts())
    recs = report["recommendations"]
    advice = ("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in recs) + "</ul>" if recs else
              '<p class="note">none: nothing in the figures calls for a change</p>')
    header = _table(["session", report["session_id"]], [
        ["source", report["source"]], ["started", report.get("started_at")],
        ["completed", report.get("completed_at")], ["stop reason", report["stop_reason"]]], "tt")
    sections = [
        ("Totals", _totals(report)),
        ("Recommendations", advice),
        ("Lane timeline", _timeline(session, attempts)),
        ("Duration histogram", _histogram(attempts)),
        ("Top failure fingerprints", _fingerprints(report)),
        ("Telemetry yield per attempt", _yield(attempts)),
        *_details(report),
    ]
    return _page(f"drainer analysis: session {report['session_id']}", header, sections)


def _page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """One self-contained document: the title, ``intro`` (HTML), then each (heading, body)."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_e(title)}</h1>", intro,
        *(f"<h2>{_e(heading)}</h2>\n{body}" for heading, body in sections),
        "</body>", "</html>", ""])


#: the history's outcomes as the charts colour them
HISTORY_COLOURS = {"ok": COLOURS["success"], "failed": COLOURS["failed"],
                   "timed out": COLOURS["timeout"], "cancelled": COLOURS["stopped"],
                   "interrupted": UNKNOWN_COLOUR}


def _history_sessions(report: dict[str, Any]) -> str:
    """One stacked bar per session (oldest at the top): its attempts by outcome."""
    sessions = report["sessions"]
    if not sessions:
        return '<p class="note">No attempts recorded.</p>'
    most = max(s["attempts"] for s in sessions)
    row, left = 24, 260
    parts = []
    for i, s in enumerate(sessions):
        y = 8 + row * i
        parts.append(_text(left - 8, y + 15, s["session_id"], "end"))
        x = float(left)
        for name, n in s["outcomes"].items():
            if n:
                w = (WIDTH - left - 60) * n / most
                parts.append(_rect(x, y + 2, w, row - 6, HISTORY_COLOURS.get(name, BAR_COLOUR),
                                   f"{s['session_id']}: {n} {name}", "outcome"))
                x += w
        parts.append(_text(x + 6, y + 15, str(s["attempts"])))
    bottom = 8 + row * len(sessions)
    parts.append(_line(left, bottom, WIDTH - 60, bottom))
    parts += _legend([(colour, name) for name, colour in HISTORY_COLOURS.items()], left,
                     bottom + 12)
    return _svg("chart-history-sessions", "Attempts per session, by outcome", bottom + 34,
                parts)


def render_history_html(report: dict[str, Any]) -> str:
    """``analyze --history`` (the report of :func:`~drainer.history_report.history_report`)
    as one self-contained HTML document."""
    t = report["totals"]
    scope = f" (run {report['run_id']})" if report.get("run_id") else ""
    title = f"drainer attempt history: {report['source']}{scope}"
    totals = _table(["figure", "value"], [
        ["attempts", t["attempts"]], *[[name, n] for name, n in t["outcomes"].items()],
        ["phases", t["phases"]], ["runs", t["runs"]], ["sessions", t["sessions"]],
        ["hosts", t["hosts"]], ["first attempt ended", t["first_finished_at"]],
        ["last attempt ended", t["last_finished_at"]],
        ["worker time (seconds)", t["duration_seconds"]]], "tn")
    sessions = _table(
        ["session", "hosts", "first attempt ended", "attempts", *OUTCOME_ORDER_H, "revisions"],
        [[s["session_id"], ", ".join(s["hosts"]), s["first_finished_at"], s["attempts"],
          *[s["outcomes"].get(o, 0) for o in OUTCOME_ORDER_H], ", ".join(s["revisions"])]
         for s in report["sessions"]], "ttt" + "n" * (1 + len(OUTCOME_ORDER_H)) + "f")
    runs = _table(
        ["run", "attempts", "phases", "sessions", "successes/attempts per session",
         "last revision"],
        [[run, r["attempts"], r["phases"], r["sessions"], " -> ".join(r["trend"]),
          r["last_revision"] or "unknown"] for run, r in report["by_run"].items()], "tnnntf")
    phases = _table(
        ["run / phase", "attempts", "sessions", "outcome trend", "fingerprints by revision"],
        [[f"{p['run_id']} / {p['phase_id']}", p["attempts"], p["sessions"],
          " -> ".join(f"{o} x{n}" if n > 1 else o for o, n in p["trend"]),
          "; ".join(f"{rev}: {fp} ({n}x)" for rev, prints in
                    p["fingerprints_by_revision"].items() for fp, n in prints.items())]
         for p in report["by_phase"]], "tnntf")
    sections = [("Totals", totals), ("Sessions", _history_sessions(report) + sessions),
                ("Runs", runs),
                (f"Phases (most attempts first; top {report['phases_shown']})", phases)]
    return _page(title, "", sections)


OUTCOME_ORDER_H = tuple(HISTORY_COLOURS)


def _clusters_chart(report: dict[str, Any]) -> str:
    """One bar per cluster: its failed attempts."""
    found = report["clusters"][:TOP_FINGERPRINTS]
    if not found:
        return '<p class="note">No failed attempts: no clusters.</p>'
    most = max(c["attempts"] for c in found)
    row, left = 24, 430
    parts = []
    for i, c in enumerate(found):
        flat = " ".join(str(c["label"]).split())
        label = flat if len(flat) <= LABEL_CHARS else flat[: LABEL_CHARS - 3] + "..."
        y = 8 + row * i
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end"><title>'
                     f'{_e(c["label"])}</title>{_e(label)}</text>')
        w = (WIDTH - left - 60) * c["attempts"] / most
        parts += [_rect(left, y + 2, w, row - 6, COLOURS["failed"],
                        f"{c['attempts']} attempt(s) in {len(c['runs'])} run(s)", "cluster"),
                  _text(left + w + 6, y + 15, str(c["attempts"]))]
    bottom = 8 + row * len(found)
    parts.append(_line(left, bottom, WIDTH - 60, bottom))
    parts.append(_text((left + WIDTH - 60) / 2, bottom + 18, "failed attempts", "middle"))
    parts += _legend([(COLOURS["failed"], "failed attempts in the cluster")], left, bottom + 28)
    return _svg("chart-clusters", "Failure clusters (failed attempts)", bottom + 50, parts)


def render_clusters_html(report: dict[str, Any]) -> str:
    """``analyze --clusters`` (:func:`~drainer.clusters.clusters_report`) as one
    self-contained HTML document."""
    title = f"drainer failure clusters: {report['source']}"
    table = _table(
        ["cluster", "attempts", "runs", "first seen", "last seen", "revisions", "avoid",
         "target"],
        [[c["label"], c["attempts"], ", ".join(c["runs"]), c["first_seen"], c["last_seen"],
          ", ".join(c["revisions"]), " ".join(c["avoid"]),
          "; ".join(" ".join(t) for t in c["target"])] for c in report["clusters"]],
        "fntttfcc")
    intro = (f'<p class="note">{report["failed_attempts"]} failed attempt(s) in '
             f'{len(report["clusters"])} cluster(s): same exception type, and the same '
             f'location or word sets at least {report["similarity"]:.0%} alike.</p>')
    return _page(title, intro, [("Clusters", _clusters_chart(report) + "\n" + table)])


def _interval_text(d: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(d['value'])} ({fmt.format(d['low'])}-{fmt.format(d['high'])})"


def _backtest_chart(report: dict[str, Any]) -> str:
    """One row per back-tested session: the predicted success interval as a bar, the
    predicted value as a tick, what the session did as a dot (red when outside)."""
    checks = report["backtest"]
    if not checks:
        return '<p class="note">No session to back-test yet.</p>'
    row, left = 24, 260
    plot = WIDTH - left - 60
    parts = []
    for i, c in enumerate(checks):
        y = 8 + row * i
        p = c["predicted_success_rate"]
        parts.append(_text(left - 8, y + 15, c["session_id"], "end"))
        parts.append(_rect(left + plot * p["low"], y + 4, plot * (p["high"] - p["low"]),
                           row - 10, BAR_COLOUR, f"predicted {_interval_text(p, '{:.0%}')}",
                           "interval"))
        x = left + plot * p["value"]
        parts.append(_line(x, y + 2, x, y + row - 4, "axis"))
        colour = COLOURS["success"] if c["success_within"] else COLOURS["failed"]
        parts.append(f'<circle class="actual" cx="{left + plot * c["actual_success_rate"]:.1f}" '
                     f'cy="{y + row / 2 - 1:.1f}" r="5" fill="{colour}"><title>'
                     f'{_e(c["session_id"])}: {c["actual_success_rate"]:.0%} of '
                     f'{c["attempts"]} attempts succeeded</title></circle>')
    bottom = 8 + row * len(checks)
    parts.append(_line(left, bottom, left + plot, bottom))
    for k in range(11):
        x = left + plot * k / 10
        parts += [_line(x, bottom, x, bottom + 4), _text(x, bottom + 16, f"{k * 10}%",
                                                         "middle")]
    parts += _legend([(BAR_COLOUR, "predicted 95% interval"),
                      (COLOURS["success"], "actual, within"),
                      (COLOURS["failed"], "actual, outside")], left, bottom + 26)
    return _svg("chart-backtest", "Back-test: predicted success rate against each session's",
                bottom + 48, parts)


def render_forecast_html(report: dict[str, Any]) -> str:
    """``drainer forecast`` (:meth:`~drainer.forecast.Forecast.to_json`) as one
    self-contained HTML document."""
    title = f"drainer forecast: {report['source']}"
    rows = []
    for c in report["categories"]:
        tel = c["telemetry_per_attempt"]
        rows.append([c["category"], c["phases"], _interval_text(c["success_rate"], "{:.0%}"),
                     _interval_text(c["duration_seconds"]),
                     "unknown" if tel is None else _interval_text(tel),
                     _interval_text(c["attempts"], "{:.0f}"),
                     _interval_text(c["phases_drained"], "{:.0f}"),
                     f"{c['basis']} ({c['samples']})"])
    categories = _table(["category", "phases left", "success per attempt", "duration (s)",
                         "telemetry per attempt", "attempts", "phases drained", "basis"],
                        rows, "tnnnnnnt")
    totals = [["phases left", report["phases_left"]], ["runs left", report["runs_left"]],
              ["history attempts", report["history_attempts"]],
              ["attempts", _interval_text(report["attempts"], "{:.0f}")],
              ["phases drained", _interval_text(report["phases_drained"], "{:.0f}")],
              [f"wall time at {report['lanes']} lane(s), seconds",
               _interval_text(report["wall_seconds"], "{:.0f}")],
              [f"one session of batch {report['batch_size']}: wall time, seconds",
               _interval_text(report["batch"]["wall_seconds"], "{:.0f}")]]
    if report["telemetry_events"] is not None:
        totals.append(["telemetry events", _interval_text(report["telemetry_events"],
                                                          "{:.0f}")])
    checks = _table(
        ["session", "started", "attempts", "predicted success", "actual", "within",
         "predicted duration (s)", "actual (s)", "within"],
        [[c["session_id"], c["started"], c["attempts"],
          _interval_text(c["predicted_success_rate"], "{:.0%}"),
          f"{c['actual_success_rate']:.0%}", "yes" if c["success_within"] else "NO",
          _interval_text(c["predicted_duration_seconds"]),
          f"{c['actual_duration_seconds']:.1f}", "yes" if c["duration_within"] else "NO"]
         for c in report["backtest"]], "ttnnntnnt")
    intro = ('<p class="note">95% intervals. Attempts are taken as independent draws per '
             'category of the picked phase\'s reason; each phase is tried until it succeeds, '
             f'at most {report["max_attempts_per_phase"]} time(s); lanes are taken as '
             'busy.</p>')
    return _page(title, intro, [
        ("Phases left, by category", categories), ("Totals", _table(["figure", "value"],
                                                                    totals, "tn")),
        (f"Back-test ({report['backtest_within']} of {len(report['backtest'])} within)",
         _backtest_chart(report) + "\n" + checks)])
