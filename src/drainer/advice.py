"""The advice of ``drainer analyze``: rules with stated thresholds, checked in a fixed order.

Each rule reads :class:`Evidence` (gathered by :mod:`drainer.analyze` in its streaming pass)
and gives one recommendation or none. The README lists the rules by :attr:`Rule.name` with
their :attr:`Rule.when`, which is the threshold as the code applies it.

Attempts drainer did not see end (``interrupted``: drainer crashed or was killed while they
ran, and ``--resume`` finished their records) are drainer's doing, not the workers': they
get their own rule and are left out of every rule about failures, telemetry and leaks.
Cancelled attempts (stopped by a stop rule) are left out of the failure rules too.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Thresholds (whole percentages, compared in integers so 3 of 15 is exactly 20%).
BLOCKER_MIN_FAILURES = 3  #: fewer worker failures than this prove nothing systemic
BLOCKER_PCT = 50  #: % of worker failures one fingerprint must reach to be a blocker
TELEMETRY_MIN_ATTEMPTS = 5  #: attempts with known telemetry needed to call it broken
TELEMETRY_BROKEN_PCT = 5  #: telemetry is broken when fewer than this % of attempts yield
ZERO_YIELD_PCT = 50  #: more than this % of attempts without events calls for a look
TIMEOUT_PCT = 20  #: % of ended attempts timing out that calls for a look at the limit
GOOD_MEDIAN_YIELD = 2.0  #: events/min from which a bigger batch is worth it
DIVERSE_TOP_PCT = 30  #: failures are diverse when the top fingerprint is under this %
FINGERPRINT_WIDTH = 100  #: fingerprints are cut to this many characters in advice


def ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    """Most frequent first, ties by name: a stable order for reports and tests."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def short(text: str, width: int = FINGERPRINT_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def run_prefix(run_id: str) -> str:
    """The run-id prefix a run belongs to: the text before its last ``-`` segment."""
    head, sep, _ = run_id.rpartition("-")
    return head if sep and head else run_id


def common_run_prefix(runs: Iterable[str], weights: Counter[str]) -> str:
    """The prefix shared by ``runs``; without one, the heaviest of their own prefixes."""
    ordered = sorted(runs)
    if len(ordered) == 1:
        return run_prefix(ordered[0])
    first, last = ordered[0], ordered[-1]  # sorted: their shared start is everyone's
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    common = first[:size].rstrip("-")
    if common:
        return common
    by_prefix: Counter[str] = Counter()
    for run in ordered:
        by_prefix[run_prefix(run)] += weights[run]
    return ranked(by_prefix)[0][0]


@dataclass
class Evidence:
    """What the rules read. ``ended`` figures leave interrupted attempts out."""

    session_id: str
    stop_reason: str | None
    resumable: bool  #: the session can be resumed (stopped by a resumable reason, or never)
    processed: int  #: every recorded attempt
    unfinished: int  #: started, never finished (the journal shows no end yet)
    runs: list[str] = field(default_factory=list)  #: the runs with attempts
    interrupted: int = 0
    interrupted_restored: int = 0  #: phases --resume set back to FAILED for those
    interrupted_killed: int = 0  #: processes --resume killed for those
    ended: int = 0
    worker_failures: int = 0  #: attempts whose outcome is "failed" (the worker's own error)
    worker_fingerprints: Counter[str] = field(default_factory=Counter)  #: of those
    timed_out: int = 0
    longest_timeout: float = 0.0
    phase_timeout: float | None = None  #: the session's --phase-timeout-seconds, if known
    telemetry_known: int = 0  #: ended attempts whose event count is known
    telemetry_yielding: int = 0  #: of those, attempts that collected events
    zero_reasons: Counter[str] = field(default_factory=Counter)  #: of those without events
    median_yield: float | None = None  #: of the ended attempts with known telemetry
    leaks: list[tuple[str, str, str]] = field(default_factory=list)  #: (run, phase, name)
    #: the runs a fingerprint hit among worker failures (a second pass over the attempts)
    runs_hit: Callable[[str], Counter[str]] = lambda fingerprint: Counter()


@dataclass(frozen=True)
class Rule:
    name: str
    when: str  #: the threshold, as the README states it
    advise: Callable[[Evidence], str | None]


def _nothing_drained(e: Evidence) -> str | None:
    if e.processed:
        return None
    return (f"Nothing was drained (stop reason: {e.stop_reason or 'unknown'}, 0 attempts): "
            "run `drainer plan` to see which FAILED phases are eligible and why others are "
            "skipped.")


def _unfinished(e: Evidence) -> str | None:
    if not (e.unfinished and e.resumable):
        return None
    return (f"{e.unfinished} attempt(s) started but never finished (drainer stopped while "
            f"they ran): `drainer run --resume {e.session_id}` (same --session-dir and "
            "database) kills what they left running and restores their phases.")


def _drainer_crash(e: Evidence) -> str | None:
    if not e.interrupted:
        return None
    return (f"{e.interrupted} attempt(s) were interrupted: drainer itself stopped while they "
            "ran (a crash, kill -9, a lost host) and --resume closed them, killing "
            f"{e.interrupted_killed} process(es) they left and restoring "
            f"{e.interrupted_restored} phase(s) to FAILED. That is drainer's leftover, not "
            "the workers' failure: those attempts are left out of the failure, telemetry and "
            "leak advice, and their phases are drained again like any FAILED phase.")


def _dominant_fingerprint(e: Evidence) -> str | None:
    n = e.worker_failures
    if n < BLOCKER_MIN_FAILURES or not e.worker_fingerprints:
        return None
    top_fp, top_n = ranked(e.worker_fingerprints)[0]
    if 100 * top_n < BLOCKER_PCT * n:
        return None
    hit = e.runs_hit(top_fp)
    prefix = common_run_prefix(hit, hit)
    matching = sum(1 for run in e.runs if run.startswith(prefix))
    return (f"Systemic blocker: fingerprint '{short(top_fp)}' accounts for {top_n} of {n} "
            f"worker failures ({pct(top_n, n)}); fix it first, retrying only repeats it. It "
            f"hit {len(hit)} run(s); if they cannot be fixed now, leave them out with "
            f"--skip-run-prefix {shlex.quote(prefix)} (matches {matching} of the "
            f"{len(e.runs)} run(s) in this session).")


def _telemetry_broken(e: Evidence) -> str | None:
    known, yielding = e.telemetry_known, e.telemetry_yielding
    if known < TELEMETRY_MIN_ATTEMPTS or 100 * yielding >= TELEMETRY_BROKEN_PCT * known:
        return None
    return (f"Telemetry collection looks broken: {yielding} of {known} attempts with known "
            f"telemetry ({pct(yielding, known)}) collected any event. Check that workers run "
            "with TELEMETRY_DB_ENABLED=1 and write the telemetry tables "
            "(token_estimation_v2_events, token_budget_escalation_events) of this database.")


def _mostly_zero_yield(e: Evidence) -> str | None:
    known, zero = e.telemetry_known, e.telemetry_known - e.telemetry_yielding
    if not known or 100 * zero <= ZERO_YIELD_PCT * known or _telemetry_broken(e):
        return None
    reason, reason_n = ranked(e.zero_reasons)[0]
    return (f"{zero} of {known} attempts with known telemetry ({pct(zero, known)}) collected "
            f"no events while {e.telemetry_yielding} did, so telemetry works: look at the top "
            f"zero-yield reason '{reason}' ({reason_n} attempt(s)); 'failed_before_llm' means "
            "the workers fail before their first LLM call.")


def _telemetry_missing(e: Evidence) -> str | None:
    if not e.ended or e.telemetry_known:
        return None
    return (f"Telemetry was not counted for any of the {e.ended} attempts that ended: the "
            "telemetry tables (token_estimation_v2_events, token_budget_escalation_events) "
            "are missing or unreadable in the backlog database; create them so yield can "
            "guide the drain.")


def _timeouts(e: Evidence) -> str | None:
    if not e.timed_out or 100 * e.timed_out < TIMEOUT_PCT * e.ended:
        return None
    limit = f" (the limit was {e.phase_timeout:g}s)" if e.phase_timeout else ""
    return (f"{e.timed_out} of {e.ended} attempts ({pct(e.timed_out, e.ended)}) timed out"
            f"{limit}, the longest after {e.longest_timeout:.1f}s: if the timed-out "
            "attempts' logs show progress, raise --phase-timeout-seconds; if they show a hang, "
            "fix the hang (a longer limit only waits longer).")


def _worker_leaks(e: Evidence) -> str | None:
    if not e.leaks:
        return None
    names = Counter(name for _, _, name in e.leaks)
    name, name_n = ranked(names)[0]
    phases = len({(run, phase) for run, phase, _ in e.leaks})
    return (f"Workers leave processes behind: {len(e.leaks)} leaked process(es) from {phases} "
            f"phase(s), most often '{name}' ({name_n}); make the worker stop what it starts "
            "(for an API server, share one with --api-url).")


def _bigger_batch(e: Evidence) -> str | None:
    median = e.median_yield
    if median is None or median < GOOD_MEDIAN_YIELD or e.stop_reason == "no_candidates":
        return None
    n = e.worker_failures
    top = ranked(e.worker_fingerprints)[0][1] if e.worker_fingerprints else 0
    if n and 100 * top >= DIVERSE_TOP_PCT * n:
        return None
    diversity = (f"the top fingerprint is {pct(top, n)} of {n} worker failures" if top
                 else "no worker failure has a fingerprint")
    return (f"Yield is good (median {median:g} events/min >= {GOOD_MEDIAN_YIELD:g}) and "
            f"failures are diverse ({diversity}, under {DIVERSE_TOP_PCT}%): drain more per "
            f"session, e.g. --batch-size {2 * e.processed} (this session processed "
            f"{e.processed}).")


RULES = (
    Rule("nothing-drained", "no attempt was recorded", _nothing_drained),
    Rule("unfinished", "attempts started but never finished, in a session that can be resumed",
         _unfinished),
    Rule("drainer-crash", "at least one attempt was interrupted (drainer stopped while it ran)",
         _drainer_crash),
    Rule("systemic-blocker",
         f"at least {BLOCKER_MIN_FAILURES} worker failures, and one fingerprint is at least "
         f"{BLOCKER_PCT}% of them", _dominant_fingerprint),
    Rule("telemetry-broken",
         f"at least {TELEMETRY_MIN_ATTEMPTS} attempts with known telemetry, and fewer than "
         f"{TELEMETRY_BROKEN_PCT}% of them collected any event", _telemetry_broken),
    Rule("mostly-zero-yield",
         f"more than {ZERO_YIELD_PCT}% of the attempts with known telemetry collected no "
         "event, and telemetry is not broken", _mostly_zero_yield),
    Rule("telemetry-missing", "attempts ended and none has a known telemetry count",
         _telemetry_missing),
    Rule("timeouts", f"at least {TIMEOUT_PCT}% of the attempts that ended timed out",
         _timeouts),
    Rule("worker-leaks", "an attempt that ended left a process behind", _worker_leaks),
    Rule("bigger-batch",
         f"median yield at least {GOOD_MEDIAN_YIELD:g} events/min, the top fingerprint under "
         f"{DIVERSE_TOP_PCT}% of worker failures, and the backlog did not run dry",
         _bigger_batch),
)


def advise(evidence: Evidence) -> list[tuple[str, str]]:
    """``(rule name, recommendation)`` of every rule that fires, in :data:`RULES` order."""
    out = []
    for rule in RULES:
        text = rule.advise(evidence)
        if text is not None:
            out.append((rule.name, text))
    return out
