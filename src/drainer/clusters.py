"""Failure clusters (``drainer analyze --clusters``): the failed attempts of the history,
grouped by what went wrong, each with the runs it hit and the options that avoid or target it.

Fingerprints already replace ids, paths, numbers and times (:mod:`drainer.fingerprint`), so
failures that differ only in those share one. Clusters go further: two fingerprints join when
they name the same exception type (or neither names one) and either the same location
(``file.py line <n>``) or messages close enough: the Jaccard similarity of their word sets
at least :data:`SIMILARITY`. Different exception types never join. Greedy, most frequent
fingerprint first, so the result is deterministic. Pure: history rows in, clusters out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backlog.history import Row
from .history_report import iso_time
from .timeouts import run_prefix

SIMILARITY = 0.6  #: least Jaccard similarity of two messages' word sets to join
_EXCEPTION = re.compile(r"\b([a-z_][\w.]*?(?:error|exception|exit|interrupt))\b")
_LOCATION = re.compile(r"([\w.-]+\.py) line <n>")
_WORD = re.compile(r"<\w+>|[a-z_][\w.']*|\d+")
FAILED_OUTCOMES = ("failed", "timed out")


def message_of(fingerprint: str) -> str:
    """The normalised error of a fingerprint (``STATE|bucket|error``)."""
    parts = fingerprint.split("|", 2)
    return parts[2] if len(parts) == 3 else fingerprint


def exception_of(message: str) -> str | None:
    found = _EXCEPTION.search(message)
    return found.group(1).rsplit(".", 1)[-1] if found else None


def location_of(message: str) -> str | None:
    found = _LOCATION.search(message)
    return found.group(1) if found else None


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two word sets (1 when both are empty)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _words(message: str) -> frozenset[str]:
    return frozenset(_WORD.findall(message))


@dataclass
class Cluster:
    """One group of failures: its first (most frequent) fingerprint names it."""

    label: str
    exception: str | None
    location: str | None
    words: frozenset[str]
    fingerprints: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    revisions: set[str] = field(default_factory=set)
    first: float | None = None
    last: float | None = None

    @property
    def attempts(self) -> int:
        return sum(self.fingerprints.values())

    def takes(self, message: str) -> bool:
        if exception_of(message) != self.exception:
            return False
        where = location_of(message)
        if where is not None and where == self.location:
            return True
        return similarity(_words(message), self.words) >= SIMILARITY

    def add(self, row: Row) -> None:
        assert row.fingerprint is not None
        self.fingerprints[row.fingerprint] += 1
        self.runs[row.run_id] += 1
        self.revisions.add(row.revision or "unknown")
        self.first = row.finished_at if self.first is None else min(self.first, row.finished_at)
        self.last = row.finished_at if self.last is None else max(self.last, row.finished_at)


def clusters(rows: Iterable[Row]) -> list[Cluster]:
    """The failed attempts of ``rows`` (failed or timed out, with a fingerprint), clustered;
    largest cluster first."""
    by_print: dict[str, list[Row]] = {}
    for row in rows:
        if row.outcome in FAILED_OUTCOMES and row.fingerprint:
            by_print.setdefault(row.fingerprint, []).append(row)
    found: list[Cluster] = []
    for fingerprint, its in sorted(by_print.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        message = message_of(fingerprint)
        home = next((c for c in found if c.takes(message)), None)
        if home is None:
            home = Cluster(label=fingerprint, exception=exception_of(message),
                           location=location_of(message), words=_words(message))
            found.append(home)
        for row in its:
            home.add(row)
    return sorted(found, key=lambda c: (-c.attempts, c.label))


def steering(cluster: Cluster, all_runs: Sequence[str]) -> dict[str, Any]:
    """The options that avoid or target a cluster's runs: the run prefixes (and the other
    runs each would skip too), and one ``--run-id`` per run."""
    mine = set(cluster.runs)
    prefixes = sorted({run_prefix(run) for run in mine})
    also = sorted(run for run in set(all_runs) - mine
                  if any(run.startswith(p) for p in prefixes))
    return {
        "avoid": [arg for p in prefixes for arg in ("--skip-run-prefix", p)],
        "avoid_also_skips": also,
        "target": [["--run-id", run] for run, _n in cluster.runs.most_common()],
    }


def clusters_report(rows: Sequence[Row], source: str) -> dict[str, Any]:
    """``analyze --clusters`` as a JSON-ready dict."""
    all_runs = sorted({r.run_id for r in rows})
    found = clusters(rows)
    return {
        "source": source,
        "similarity": SIMILARITY,
        "failed_attempts": sum(c.attempts for c in found),
        "clusters": [{
            "label": c.label, "exception": c.exception, "location": c.location,
            "attempts": c.attempts, "fingerprints": dict(c.fingerprints.most_common()),
            "runs": dict(c.runs.most_common()), "first_seen": iso_time(c.first),
            "last_seen": iso_time(c.last), "revisions": sorted(c.revisions),
            **steering(c, all_runs),
        } for c in found],
    }


def clusters_text(report: dict[str, Any]) -> list[str]:
    lines = [f"Failure clusters in {report['source']}: {len(report['clusters'])} cluster(s) of "
             f"{report['failed_attempts']} failed attempt(s) (same exception type, and the same "
             f"location or word sets at least {report['similarity']:.0%} alike)"]
    for n, c in enumerate(report["clusters"], start=1):
        runs = ", ".join(f"{run} ({k})" for run, k in list(c["runs"].items())[:8])
        more = len(c["runs"]) - 8
        lines += [
            f"{n:>3}. {c['attempts']} attempt(s), {len(c['fingerprints'])} fingerprint(s), "
            f"{len(c['runs'])} run(s): {c['label']}",
            f"     runs: {runs}" + (f" and {more} more" if more > 0 else ""),
            f"     seen {c['first_seen']} to {c['last_seen']}, at revision(s) "
            f"{', '.join(c['revisions'])}",
            f"     avoid: {' '.join(c['avoid'])}" + (
                f" (also skips {len(c['avoid_also_skips'])} other run(s))"
                if c["avoid_also_skips"] else ""),
            f"     target: {' '.join(c['target'][0])}" + (
                f" (one session per run; {len(c['target'])} runs)" if len(c["target"]) > 1
                else ""),
        ]
    return lines
