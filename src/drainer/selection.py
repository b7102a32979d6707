"""Which phase to drain next: priority categories, the candidate index and the Selector.

The :class:`Selector` owns everything selection needs across a session: the index of one
backlog load, the runs' triage tiers, attempts per phase, retries, phases found drained
elsewhere, runs leased by another drainer or stopped by a rule, and reloads. ``run`` and
``plan`` drive the same :meth:`Selector.pick`. Memory is per candidate phase (a few bytes of
counters beside each), never per attempt.
"""

from __future__ import annotations

import difflib
import functools
import heapq
import math
import re
import zlib
from array import array
from collections.abc import Awaitable, Callable, Set
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from .errors import UsageError
from .models import (
    NON_FINAL_STATES,
    TIER_DEPRIORITISED,
    TIER_PROMISING,
    TIER_UNSAMPLED,
    Attempt,
    Candidates,
    PhaseRef,
    PhaseState,
    merge_changes,
)
from .reasons import note_part, worker_part
from .revision import short as short_revision

if TYPE_CHECKING:
    from .backlog import PhaseHistory, Summary

# Priority of a phase by its last failure reason (lower drains first). DESIGN.md §5:
# none, collection/import, deliverable/missing, patch/no-op/manifest, other, timeout last.
CATEGORY_NONE = 0
CATEGORY_COLLECTION = 1
CATEGORY_DELIVERABLE = 2
CATEGORY_PATCH = 3
CATEGORY_OTHER = 4
CATEGORY_TIMEOUT = 5
CATEGORY_NAMES = ("none", "collection/import", "deliverable/missing", "patch/no-op/manifest",
                  "other", "timeout")

_RULES: tuple[tuple[int, re.Pattern[str]], ...] = (
    (CATEGORY_TIMEOUT, re.compile(r"time[d ]?\s*out|timeout", re.I)),
    (CATEGORY_COLLECTION, re.compile(
        r"collect(ion|ing)?\s+error|import\s*error|modulenotfound|no module named|cannot import"
        r"|error(s)? during collection", re.I)),
    (CATEGORY_DELIVERABLE, re.compile(r"deliverable|missing|not found|not created", re.I)),
    (CATEGORY_PATCH, re.compile(r"patch|no[- ]?op|manifest", re.I)),
)

RunsIn = Callable[[tuple[PhaseState, ...]], Awaitable[list[str]]]
INDEX_REFRESH_INTERVAL = 300.0  #: reload candidates this often, to find newly FAILED phases
DRY_RELOAD_INTERVAL = 1.0  #: with runs in flight, an index out of untried phases reloads at
#: most this often; and reloads never take more than 1/DRY_RELOAD_COST of the time
DRY_RELOAD_COST = 10
#: the longest wait of a retry for its backoff (unless --retry-backoff-seconds is longer)
RETRY_BACKOFF_MAX = 900.0
_DATABASE_ERROR = re.compile(
    r"database is locked|could not connect|connection (?:refused|reset)|"
    r"server closed the connection|connection (?:was |is )?closed|too many connections|"
    r"deadlock detected|could not serialize access",
    re.IGNORECASE)
#: a run found leased elsewhere whose lease's end is unknown (or past) is left alone this long
LEASE_RECHECK = 1.0
QUEUED_SKIP = "QUEUED phase (left for its executor; --no-skip-runs-with-queued drains it)"
NUL_SKIP = "its id holds a NUL byte, which no worker can be given (argv and environment)"
#: Linux refuses any one argv or environment string over 128 KiB (MAX_ARG_STRLEN), and every
#: worker gets its ids as ``DRAINER_RUN_ID=<id>`` / ``DRAINER_PHASE_ID=<id>``
MAX_ID_BYTES = 128 * 1024 - len("DRAINER_PHASE_ID=") - 1
LONG_SKIP = (f"its id is longer than {MAX_ID_BYTES:,} bytes, which no worker can be given "
             "(the kernel's limit on one argv or environment string)")
ARGV_SKIP = ("its ids make an argument of the worker's command longer than the kernel's limit "
             "on one argv string (128 KiB)")
#: ``(run_id, phase_id) -> True`` when the worker's command line cannot hold those ids
TooLong = Callable[[str, str], bool]


@functools.lru_cache(maxsize=4096)
def failure_category(reason: str | None) -> int:
    """Category of a ``last_failure_reason`` (0 = no reason recorded, drains first).

    The worker's part of the reason is read (:mod:`drainer.reasons`); drainer's note counts
    only when it says the attempt timed out, which puts the phase last whatever its reason.
    """
    if _RULES[0][1].search(note_part(reason)):
        return CATEGORY_TIMEOUT
    reason = worker_part(reason)
    if not reason:
        return CATEGORY_NONE
    for category, pattern in _RULES:
        if pattern.search(reason):
            return category
    return CATEGORY_OTHER


def _seconds_since(stamp: str | None) -> float:
    """Seconds since an ISO timestamp of the session files (0 when unknown or ahead)."""
    if not stamp:
        return 0.0
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds())


def is_passing_failure(attempt: Attempt) -> bool:
    """A failure that may pass by itself, so a retry waits (``--retry-backoff-seconds``):
    the attempt timed out, its worker was killed by a signal, it lost its lease, or the
    worker's error is a database one (locked, connection refused or lost). Not an attempt
    that drainer's own stop cancelled."""
    if attempt.cancelled:
        return False
    if attempt.timed_out or attempt.lease_lost:
        return True
    code = attempt.subprocess_returncode
    if code is not None and code < 0:
        return True
    error = attempt.worker_error or ""
    return bool(error) and _DATABASE_ERROR.search(error) is not None


#: failure categories that a retry at the same revision will meet again
DETERMINISTIC_CATEGORIES = (CATEGORY_NAMES[CATEGORY_COLLECTION],)
#: outcomes and categories of a failure that may pass by itself
TRANSIENT = ("timed out", CATEGORY_NAMES[CATEGORY_TIMEOUT])


def unchanged_since(phase: PhaseHistory, revision: str) -> str | None:
    """Why ``--skip-unchanged`` holds a phase back, or None: its last attempt failed at
    ``revision`` with a deterministic failure (its fingerprint seen at least twice for the
    phase at that revision, or a category in :data:`DETERMINISTIC_CATEGORIES`); a timeout
    never is one."""
    if phase.last_outcome != "failed" or phase.last_revision != revision \
            or phase.last_category in TRANSIENT:
        return None
    if phase.last_fingerprint_seen >= 2:
        what = f"its fingerprint seen {phase.last_fingerprint_seen}x"
    elif phase.last_category in DETERMINISTIC_CATEGORIES:
        what = f"a {phase.last_category} error"
    else:
        return None
    return f"unchanged since its last failure at {short_revision(revision)} ({what})"


def triage_tier(attempt: Attempt, *, fingerprint_seen_before: bool) -> int:
    """The tier a run's first attempt (its sample) earns it: sample-first triage.

    Deprioritised when the sample failed with a fingerprint already seen this session and
    produced no telemetry; success, telemetry or a timeout keep the run promising.
    """
    if attempt.success or attempt.timed_out or (attempt.telemetry_events_collected or 0) > 0:
        return TIER_PROMISING
    if attempt.failure_fingerprint is not None and fingerprint_seen_before:
        return TIER_DEPRIORITISED
    return TIER_PROMISING


OrderKey = tuple[int, int, int, int, str, str]


def order_key(reason: str | None, phase_index: int, failed_in_run: int, run_id: str,
              phase_id: str, tie: int = 0) -> OrderKey:
    """The priority of a phase inside a triage tier (DESIGN.md §5): category of its last
    failure reason, phase index, runs with fewer failed phases, the run's tie-break
    (:func:`run_tie`), ids."""
    return (failure_category(reason), phase_index, failed_in_run, tie, run_id, phase_id)


def run_tie(salt: str, run_id: str) -> int:
    """Where a run goes among runs of equal priority: 0 (by run id) without a ``salt``; with
    one (a session's id, once it shares its backlog), a hash of salt and run id, so that
    drainers sharing a backlog spread over different runs instead of all claiming the same
    one. Stable across processes (CRC-32, not Python's salted ``hash``), so a resumed
    session keeps its order."""
    if not salt:
        return 0
    return zlib.crc32(run_id.encode("utf-8", "surrogatepass"), zlib.crc32(salt.encode()))


_PREFERRED = 1 << 32  #: taken off a preferred run's tie-break (run_tie is below it)
_REMOVED = 1  #: drained by someone else meanwhile: not a candidate any more
_LAST_FAILED = 2  #: its last attempt this session left it FAILED (a retry may follow)
_SCAN = 32  #: runs with more phases than this get a phase-id map for lookups


def _why_unpassable(some_id: str) -> str | None:
    """Why no worker can be given ``some_id``: a NUL byte (argv and the environment are C
    strings), or a length over the kernel's limit; None when it can."""
    if "\x00" in some_id:
        return NUL_SKIP
    if len(some_id) > MAX_ID_BYTES // 4 and len(some_id.encode("utf-8", "replace")) > MAX_ID_BYTES:
        return LONG_SKIP
    return None


def _unpassable(c: Candidates, run_id: str, start: int, end: int,
                too_long: TooLong | None) -> list[tuple[int, str]]:
    """Rows of a run whose run or phase id no worker can be given, with the reason."""
    why = _why_unpassable(run_id)
    if why is not None:
        return [(i, why) for i in range(start, end)]
    ids = c.phase_ids
    found = [(i, why) for i in range(start, end) if (why := _why_unpassable(ids[i]))]
    if too_long is not None:
        bad = {i for i, _ in found}
        found += [(i, ARGV_SKIP) for i in range(start, end)
                  if i not in bad and too_long(run_id, ids[i])]
    return found


def _sort_rows(c: Candidates, run_id: str, start: int, end: int, failed: int) -> None:
    """Sort one run's rows ``start:end`` of the columns into priority order, in place."""
    ids, indexes, reasons, queued = c.phase_ids, c.indexes, c.reasons, c.queued
    order = sorted(range(start, end),  # one run: its tie-break is the same for every row
                   key=lambda j: order_key(reasons[j], indexes[j], failed, run_id, ids[j]))
    if order == list(range(start, end)):
        return
    ids[start:end] = [ids[j] for j in order]
    indexes[start:end] = array("q", [indexes[j] for j in order])
    reasons[start:end] = [reasons[j] for j in order]
    queued[start:end] = bytes(queued[j] for j in order)


class _RunQueue:
    """One run's candidate phases: rows ``start:end`` of the index's columns, in priority
    order, with a cursor past the tried ones. Order keys are computed when a row reaches
    the head, and a row becomes a :class:`PhaseRef` only when it is picked. It holds the
    columns, not the index, so no cycle keeps an old load alive after a reload."""

    __slots__ = ("_where", "attempts", "candidates", "cursor", "end", "failed", "flags",
                 "rank", "run_id", "start", "tie", "tier", "version")

    def __init__(self, run_id: str, columns: CandidateIndex, start: int, end: int,
                 failed: int, tie: int = 0) -> None:
        self.run_id = run_id
        self.tie = tie
        self.candidates = columns.candidates
        self.attempts, self.flags = columns.attempts, columns.flags
        self.start, self.end, self.cursor = start, end, start
        self.failed = failed
        self.tier = TIER_UNSAMPLED
        self.rank = 0  #: its place among the operator's preferred runs (0: first)
        self.version = 0
        self._where: dict[str, int] | None = None

    def rows(self) -> range:
        return range(self.start, self.end)

    def key(self, i: int) -> OrderKey:
        c = self.candidates
        return order_key(c.reasons[i], c.indexes[i], self.failed, self.run_id, c.phase_ids[i],
                         self.tie)

    def ref(self, i: int) -> PhaseRef:
        return self.candidates.ref(self.run_id, i)

    def phase_id(self, i: int) -> str:
        return self.candidates.phase_ids[i]

    def head(self) -> int | None:
        """The best never-tried row, or None."""
        attempts, flags = self.attempts, self.flags
        while self.cursor < self.end and (attempts[self.cursor] or
                                          flags[self.cursor] & _REMOVED):
            self.cursor += 1
        return self.cursor if self.cursor < self.end else None

    def position(self, phase_id: str) -> int | None:
        ids = self.candidates.phase_ids
        if self.end - self.start <= _SCAN:
            return next((i for i in self.rows() if ids[i] == phase_id), None)
        if self._where is None:
            self._where = {ids[i]: i for i in self.rows()}
        return self._where.get(phase_id)


class CandidateIndex:
    """The candidates of one backlog load, ready for cheap picks.

    The load's columns are kept (each run's rows sorted once, in place), with an attempt
    counter and flags per row; a heap orders runs by (triage tier, best untried row). A pick
    pops the heap (O(log runs)), skipping stale entries, stopped runs and busy runs. Retries
    come from a side heap, fewest attempts first, and only when no never-tried candidate is
    left.
    """

    def __init__(self, candidates: Candidates, skipped: list[tuple[PhaseRef, str]]) -> None:
        self.candidates = candidates
        rows = len(candidates.phase_ids)
        self.attempts = array("I", bytes(4 * rows))
        self.flags = bytearray(rows)
        self.runs: dict[str, _RunQueue] = {}
        self.skipped = skipped
        #: phases whose ids no worker can be given (a NUL byte): never candidates
        self.unpassable: list[tuple[PhaseRef, str]] = []
        self.size = 0
        #: (preference rank, tier, key of the best untried row, version, run)
        self._heap: list[tuple[int, int, OrderKey, int, str]] = []
        #: (preference rank, attempts, key, run, row)
        self._retry_heap: list[tuple[int, int, OrderKey, str, int]] = []

    @classmethod
    def build(
        cls,
        candidates: Candidates,
        *,
        skip_run_prefixes: tuple[str, ...] = (),
        skip_queued: bool = True,
        keep_skipped: bool = True,
        too_long: TooLong | None = None,
        tie_salt: str = "",
        preferred: Set[str] = frozenset(),
        rank: Callable[[str], int] | None = None,
    ) -> CandidateIndex:
        """The index of one load; it takes the candidates' columns over (sorted in place).
        ``tie_salt``: see :func:`run_tie`; ``preferred`` runs go first among equals;
        ``rank``: a run's place in the operator's preferences (lower goes first, before
        tiers and priority)."""
        skipped: list[tuple[PhaseRef, str]] = []
        index = cls(candidates, skipped)
        queued = candidates.queued
        for run_id, (start, end) in candidates.runs.items():
            prefix = next((p for p in skip_run_prefixes if run_id.startswith(p)), None)
            if prefix is not None:
                if keep_skipped:
                    why = f"run matches --skip-run-prefix {prefix}"
                    skipped += [(candidates.ref(run_id, i), why) for i in range(start, end)]
                continue
            failed = end - start - sum(queued[start:end])
            _sort_rows(candidates, run_id, start, end, failed)
            if skip_queued:
                for i in range(start, end):
                    if queued[i]:
                        index.flags[i] = _REMOVED
                        if keep_skipped:
                            skipped.append((candidates.ref(run_id, i), QUEUED_SKIP))
            live = (end - start - sum(queued[start:end])) if skip_queued else end - start
            for i, why in _unpassable(candidates, run_id, start, end, too_long):
                if not index.flags[i] & _REMOVED:
                    index.flags[i] = _REMOVED
                    live -= 1
                entry = (candidates.ref(run_id, i), why)
                index.unpassable.append(entry)
                if keep_skipped:
                    skipped.append(entry)
            if live:
                index.size += live
                tie = run_tie(tie_salt, run_id) - (_PREFERRED if run_id in preferred else 0)
                queue = index.runs[run_id] = _RunQueue(run_id, index, start, end, failed, tie)
                if rank is not None:
                    queue.rank = rank(run_id)
                index.push(queue)
        skipped.sort(key=lambda item: (item[0].run_id, item[0].phase_index, item[0].phase_id))
        return index

    def push(self, queue: _RunQueue) -> None:
        head = queue.head()
        if head is not None:
            heapq.heappush(self._heap, (queue.rank, queue.tier, queue.key(head),
                                        queue.version, queue.run_id))

    def rerank(self, queue: _RunQueue, tier: int) -> None:
        """Queue a run again (its tier may have changed) behind its best untried phase."""
        queue.tier = tier
        queue.version += 1
        self.push(queue)

    def pick(self, busy: Set[str], stopped: Set[str]) -> tuple[_RunQueue, int] | None:
        """The best never-tried phase to drain now (by tier), or None."""
        deferred: list[tuple[int, int, OrderKey, int, str]] = []
        found: tuple[_RunQueue, int] | None = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            rank, tier, key, version, run_id = entry
            queue = self.runs[run_id]
            if version != queue.version or tier != queue.tier or run_id in stopped:
                continue  # stale entry, or the run was stopped
            head = queue.head()
            if head is None:
                continue
            if queue.key(head) != key:  # the head moved on: re-queue by its new key
                heapq.heappush(self._heap, (rank, tier, queue.key(head), version, run_id))
                continue
            deferred.append(entry)  # a picked run stays queued until its attempt re-ranks it
            if run_id not in busy:
                found = (queue, head)
                break
        for entry in deferred:
            heapq.heappush(self._heap, entry)
        return found

    def note_retry(self, queue: _RunQueue, i: int) -> None:
        heapq.heappush(self._retry_heap, (queue.rank, self.attempts[i], queue.key(i),
                                          queue.run_id, i))

    def pick_retry(self, busy: Set[str], stopped: Set[str],
                   waiting: Set[tuple[str, str]] = frozenset()) -> tuple[_RunQueue, int] | None:
        """The phase to retry now (fewest attempts first, then priority), or None.
        ``waiting``: phases whose retry is not due yet (backoff)."""
        deferred: list[tuple[int, int, OrderKey, str, int]] = []
        found: tuple[_RunQueue, int] | None = None
        while self._retry_heap:
            entry = heapq.heappop(self._retry_heap)
            _rank, attempts, _order, run_id, i = entry
            queue = self.runs[run_id]
            if self.attempts[i] != attempts or self.flags[i] != _LAST_FAILED \
                    or run_id in stopped:
                continue  # stale (tried again since, drained elsewhere) or the run stopped
            if run_id in busy or (waiting and (run_id, queue.phase_id(i)) in waiting):
                deferred.append(entry)
                continue
            found = (queue, i)  # its attempt queues it again (note_retry) if it fails again
            break
        for entry in deferred:
            heapq.heappush(self._retry_heap, entry)
        return found


Load = Callable[[], Awaitable[Candidates]]
ReadHistory = Callable[[], Awaitable["Summary"]]
#: ``load_changed(seconds)``: the runs changed within the last ``seconds`` and their
#: candidates, or None when the backlog cannot tell (see ``Phases.load_changed``)
LoadChanged = Callable[[float], Awaitable[tuple[Candidates, set[str]] | None]]


class Selector:
    """Picks the next phase for a session (or a plan) and learns from each attempt.

    ``load`` reads the candidates from the backlog. The index is loaded at the first pick,
    reloaded when it runs dry (phases may have become FAILED meanwhile), every
    ``refresh_interval`` seconds, and after :meth:`invalidate`; with ``reloads=False``
    (``plan``) it is loaded once. When no never-tried phase is left, the index is reloaded
    before any retry, as long as loading takes at most ``1 / dry_reload_cost`` of the time.
    A phase found drained elsewhere (:meth:`remove`) brings a reload forward; with
    ``load_changed`` that one reads only the runs changed since the last load.
    """

    def __init__(
        self,
        load: Load,
        *,
        load_changed: LoadChanged | None = None,
        max_attempts_per_phase: int,
        skip_run_prefixes: tuple[str, ...] = (),
        skip_queued: bool = True,
        keep_skipped: bool = False,
        reloads: bool = True,
        refresh_interval: float = INDEX_REFRESH_INTERVAL,
        dry_reload_cost: float = DRY_RELOAD_COST,
        too_long: TooLong | None = None,
        tie_salt: str = "",
        retry_backoff: float = 0.0,
        history: ReadHistory | None = None,
        attempts_scope: str = "session",
        revision: str | None = None,
        rank: Callable[[str], int] | None = None,
    ) -> None:
        """``too_long``: whether the worker's command line cannot hold a phase's ids
        (:meth:`DrainConfig.ids_too_long`); such phases are skipped, like ids with a NUL.
        ``tie_salt``: how runs of equal priority are ordered once another drainer is found
        draining the same backlog (:meth:`leased_elsewhere`): by :func:`run_tie` of it and
        the run id, so that drainers spread out; until then, and with no salt (``plan``),
        by id. ``retry_backoff``: a phase whose attempt failed for a passing reason
        (:func:`is_passing_failure`) is retried only after that many seconds, doubled for
        each attempt of it, at most :data:`RETRY_BACKOFF_MAX` (or ``retry_backoff``).

        ``history`` reads the attempt history (of other sessions' attempts) at each full
        load: runs it prefers go first among equals (``Summary.preferred``);
        with ``attempts_scope`` "history" a phase's attempts there count towards
        ``max_attempts_per_phase``; given the workspace's ``revision`` (``--skip-unchanged``),
        a phase that failed deterministically at that revision is held back
        (:func:`unchanged_since`). ``rank``: each run's place among the operator's
        preferred runs (lower first, before tiers; ``Preferences.rank``)."""
        self._load = load
        self._history = history
        self._scope_history = attempts_scope == "history"
        self._revision = revision
        #: from the history at the last full load: other sessions' attempts per phase
        #: (``--attempts-scope history``), phases held back and why, runs that go first
        self._prior: dict[tuple[str, str], int] = {}
        self._held_back: dict[tuple[str, str], str] = {}
        self._preferred: set[str] = set()
        self._retry_backoff = retry_backoff
        #: phases whose retry waits for its backoff -> when it is due (anyio's clock)
        self._backoff: dict[tuple[str, str], float] = {}
        self._load_changed = load_changed
        self._max_attempts = max_attempts_per_phase
        self._build = functools.partial(CandidateIndex.build,
                                        skip_run_prefixes=skip_run_prefixes,
                                        skip_queued=skip_queued, keep_skipped=keep_skipped,
                                        too_long=too_long, rank=rank)
        self._tie_salt = tie_salt
        self._spread = False  #: runs of equal priority in this session's own order
        self._reloads = reloads
        self._refresh_interval = refresh_interval
        self._dry_reload_cost = dry_reload_cost
        self._index: CandidateIndex | None = None
        self._loaded_at = -math.inf
        self._load_began = -math.inf  #: when the last load (full or of changes) began
        self._full_at = -math.inf  #: when the last full load began
        self._load_seconds = 0.0  #: how long the last full load took
        self._changes_seconds = 0.0  #: how long the last load of changes took
        self._stale = True
        self._drained_elsewhere = False  #: a claim found a phase drained meanwhile
        #: phases found drained elsewhere since the last full load (loads of changes only)
        self._gone: set[tuple[str, str]] = set()
        self._tiers: dict[str, int] = {}  #: tier of every run sampled this session
        self._stopped: set[str] = set()  #: runs a stop rule stopped
        #: run leased by another drainer -> until when it is left alone (anyio's clock)
        self._leased_elsewhere: dict[str, float] = {}
        #: run -> (phase id, position in the index) of its phase in flight
        self._picked: dict[str, tuple[str, int | None]] = {}
        #: counters (attempts, flags) of phases tried this session that the current index
        #: does not hold (in flight, or not FAILED, when it was loaded)
        self._outside: dict[tuple[str, str], tuple[int, int]] = {}
        self._reported: set[tuple[str, str]] = set()  #: unpassable phases already reported

    # -- picking --------------------------------------------------------------------------

    async def load(self) -> bool:
        """Load the index when there is none, it is stale or old; True when it was loaded."""
        now = anyio.current_time()
        since = now - self._loaded_at
        due = self._index is None or (self._reloads and (
            self._stale or now - self._full_at > self._refresh_interval))
        if due:
            await self._reload()
            return True
        if self._reloads and self._drained_elsewhere:
            # Others drain this backlog too: learn what they finished at once, as long as
            # loading stays within its share of the time (a load of changes is cheap).
            changes = self._load_changed is not None
            cost = self._changes_seconds if changes else self._load_seconds
            if since >= self._dry_reload_cost * cost:
                await self._reload(changes_only=changes)
                return True
        return False

    async def pick(self, busy: Set[str] = frozenset()) -> PhaseRef | None:
        """The best phase to drain now, or None when nothing is drainable at the moment.

        ``busy`` runs have an attempt in flight here; runs leased by another drainer and runs
        stopped by a rule are left out too.
        """
        fresh = await self.load()
        assert self._index is not None
        blocked = busy | self._leased_now() if self._leased_elsewhere else busy
        found = self._index.pick(blocked, self._stopped)
        if found is None and not fresh and self._dry_reload_due(blocked):
            # No never-tried phase left in this load: look again before retrying anything,
            # so phases that became FAILED meanwhile go first.
            await self._reload()
            fresh = True
            found = self._index.pick(blocked, self._stopped)
        waiting = self._waiting()
        if found is None:
            found = self._index.pick_retry(blocked, self._stopped, waiting)
        if found is None and not fresh and not blocked and not waiting and self._reloads:
            # Nothing to pick and nothing in flight: one fresh look before "no candidates".
            await self._reload()
            found = self._index.pick(blocked, self._stopped) or self._index.pick_retry(
                blocked, self._stopped, waiting)
        if found is None:
            return None
        queue, i = found
        ref = queue.ref(i)
        self._picked[queue.run_id] = (ref.phase_id, i)
        return ref

    def attempts_of(self, ref: PhaseRef) -> int:
        """Attempts of ``ref`` this session (finished, not interrupted)."""
        where = self._locate(ref.run_id, ref.phase_id)
        if where is not None and self._index is not None:
            return self._index.attempts[where[1]]
        return self._outside.get(ref.key, (0, 0))[0]

    def _waiting(self) -> set[tuple[str, str]]:
        """Phases whose retry is not due yet (ended backoffs are dropped)."""
        if not self._backoff:
            return set()
        now = anyio.current_time()
        for key in [k for k, due in self._backoff.items() if due <= now]:
            del self._backoff[key]
        return set(self._backoff)

    def backoff_wait(self) -> float | None:
        """Seconds until the first retry waiting for its backoff is due; None when none
        waits (a retry picked meanwhile, or its phase drained elsewhere, still counts: the
        caller only wakes up early)."""
        if not self._backoff:
            return None
        return max(0.0, min(self._backoff.values()) - anyio.current_time())

    @property
    def waiting_on_leases(self) -> bool:
        """Runs leased by another live drainer are all that may be left."""
        return bool(self._leased_elsewhere)

    def lease_wait(self) -> float:
        """Seconds until the first run left alone for its lease elsewhere is looked at again
        (0 when there is none)."""
        if not self._leased_elsewhere:
            return 0.0
        return max(0.0, min(self._leased_elsewhere.values()) - anyio.current_time())

    @property
    def candidates(self) -> int:
        return self._index.size if self._index is not None else 0

    @property
    def skipped(self) -> list[tuple[PhaseRef, str]]:
        return self._index.skipped if self._index is not None else []

    def new_unpassable(self) -> list[tuple[PhaseRef, str]]:
        """Phases of the current load that no worker can be given, not reported before."""
        if self._index is None or not self._index.unpassable:
            return []
        found = [(ref, why) for ref, why in self._index.unpassable
                 if ref.key not in self._reported]
        self._reported.update(ref.key for ref, _ in found)
        return found

    # -- what happened ---------------------------------------------------------------------

    def observe(self, attempt: Attempt, *, fingerprint_seen_before: bool = False) -> None:
        """A finished attempt: count it for its phase, queue a retry, triage its run."""
        picked = self._picked.pop(attempt.run_id, None)
        if attempt.interrupted:
            return  # drainer died while it ran: it counts for nothing, the phase is redone
        tier = self._tiers.get(attempt.run_id)
        if tier is None:
            tier = self._tiers[attempt.run_id] = triage_tier(
                attempt, fingerprint_seen_before=fingerprint_seen_before)
        failed = attempt.final_state == PhaseState.FAILED
        index = self._index
        queue = index.runs.get(attempt.run_id) if index is not None else None
        position = None
        if queue is not None:
            position = picked[1] if picked is not None and picked[0] == attempt.phase_id \
                else None
            if position is None or queue.phase_id(position) != attempt.phase_id:
                position = queue.position(attempt.phase_id)
        if queue is None or position is None:
            # Not in this load (a reload came while it ran): keep its count for the next.
            tries = self._outside.pop(attempt.key, (0, 0))[0] + 1
            if failed:
                self._outside[attempt.key] = (tries, _LAST_FAILED)
        else:
            assert index is not None
            index.attempts[position] += 1
            tries = index.attempts[position]
            index.flags[position] = (index.flags[position] & _REMOVED) | (
                _LAST_FAILED if failed else 0)
            if failed and self._may_retry(attempt.key, tries):
                index.note_retry(queue, position)
        if failed and self._may_retry(attempt.key, tries):
            self._back_off(attempt, tries)
        elif self._load_changed is not None:
            # Drained (or left final) here: a load of changes that does not read its run
            # again (its writer did not stamp updated_at) must not bring it back as untried.
            self._gone.add(attempt.key)
        if index is not None and queue is not None:
            index.rerank(queue, tier)

    def _back_off(self, attempt: Attempt, tries: int) -> None:
        """A failure that may pass: its retry waits, doubling per attempt, from its end (one
        replayed by --resume may be long past)."""
        if self._retry_backoff <= 0 or not is_passing_failure(attempt):
            return
        delay = min(self._retry_backoff * 2 ** (tries - 1),
                    max(RETRY_BACKOFF_MAX, self._retry_backoff))
        delay -= _seconds_since(attempt.finished_at)
        if delay > 0:
            self._backoff[attempt.key] = anyio.current_time() + delay

    def tier_of(self, run_id: str) -> int | None:
        return self._tiers.get(run_id)

    def release(self, run_id: str) -> None:
        """The phase picked for ``run_id`` will not be attempted (the claim failed)."""
        self._picked.pop(run_id, None)

    def remove(self, ref: PhaseRef) -> None:
        """``ref`` was drained elsewhere meanwhile: no candidate, and a reload comes as soon
        as its cost allows (another drainer may have drained more of the index)."""
        self._picked.pop(ref.run_id, None)
        self._drained_elsewhere = True
        self._backoff.pop(ref.key, None)
        if self._load_changed is not None:
            self._gone.add(ref.key)
        where = self._locate(ref.run_id, ref.phase_id)
        if where is not None and self._index is not None:
            self._index.flags[where[1]] |= _REMOVED

    def spent(self, ref: PhaseRef, others: int) -> None:
        """``--attempts-scope history``: a claim found ``ref`` out of attempts, ``others``
        of them by other sessions (some since the last load): no candidate any more."""
        self._picked.pop(ref.run_id, None)
        self._prior[ref.key] = others
        self._held_back[ref.key] = (
            f"attempted {others} time(s) in other sessions (--attempts-scope history, "
            f"--max-attempts-per-phase {self._max_attempts})")
        self._backoff.pop(ref.key, None)
        where = self._locate(ref.run_id, ref.phase_id)
        if where is not None and self._index is not None:
            self._index.flags[where[1]] |= _REMOVED

    def leased_elsewhere(self, run_id: str, remaining: float | None = None) -> None:
        """Another live drainer holds ``run_id``, for ``remaining`` seconds at most: leave
        the run alone until then (or until :meth:`leases_now` finds its lease ended). No
        reload: a claim re-reads its phase, so one drained meanwhile is found then."""
        self._picked.pop(run_id, None)
        wait = remaining if remaining is not None and remaining > 0 else LEASE_RECHECK
        self._leased_elsewhere[run_id] = anyio.current_time() + wait
        self._spread_out()

    def _spread_out(self) -> None:
        """Another drainer drains this backlog: from now on, runs of equal priority go in
        this session's own order (:func:`run_tie`), so that the drainers stop meeting on
        the same runs. The heap re-sorts itself as it pops (each entry's key is checked)."""
        if self._spread or not self._tie_salt:
            return
        self._spread = True
        if self._index is not None:
            preferred = self._preferred
            for queue in self._index.runs.values():
                queue.tie = run_tie(self._tie_salt, queue.run_id) - (
                    _PREFERRED if queue.run_id in preferred else 0)

    def leased_now(self, held: dict[str, float]) -> None:
        """Runs other drainers lease now (run -> seconds to expiry): leave each alone until
        its lease ends, without a claim refused for each (a refused claim reads them all)."""
        index, now = self._index, anyio.current_time()
        if index is None:
            return
        for run_id, remaining in held.items():
            # Only runs with a phase to pick here: another drainer's long attempt on a run
            # this session has nothing of must not keep it waiting.
            queue = index.runs.get(run_id)
            if remaining > 0 and queue is not None and queue.head() is not None:
                self._leased_elsewhere[run_id] = now + remaining

    def leases_now(self, held: dict[str, float]) -> None:
        """The leases other drainers hold now (run -> seconds to expiry): runs left alone
        whose lease ended are candidates again; the others wait for their new expiry."""
        now = anyio.current_time()
        for run_id in list(self._leased_elsewhere):
            remaining = held.get(run_id)
            if remaining is None or remaining <= 0:
                del self._leased_elsewhere[run_id]
            else:
                self._leased_elsewhere[run_id] = now + remaining

    def _leased_now(self) -> set[str]:
        """Runs still left alone for their lease elsewhere (ended waits are dropped)."""
        now = anyio.current_time()
        ended = [r for r, until in self._leased_elsewhere.items() if until <= now]
        for run_id in ended:
            del self._leased_elsewhere[run_id]
        return set(self._leased_elsewhere)

    def stop_run(self, run_id: str) -> None:
        self._stopped.add(run_id)
        for key in [k for k in self._backoff if k[0] == run_id]:
            del self._backoff[key]

    def unstop_run(self, run_id: str) -> None:
        """``--unstop``: the run is a candidate again (its phases are found at the next
        load: a stopped run's heap entries were dropped as they came up)."""
        if run_id in self._stopped:
            self._stopped.discard(run_id)
            self._stale = True

    def invalidate(self) -> None:
        """The backlog changed (a swept lease restored a phase): reload at the next pick."""
        self._stale = True

    # -- internals ---------------------------------------------------------------------------

    def _dry_reload_due(self, blocked: Set[str]) -> bool:
        """Reloading is worth it: loads take at most 1/DRY_RELOAD_COST of the time, and with
        runs in flight (their attempts may free phases) at most one a DRY_RELOAD_INTERVAL."""
        if not self._reloads:
            return False
        since = anyio.current_time() - self._loaded_at
        return since >= self._dry_reload_cost * self._load_seconds and (
            not blocked or since >= DRY_RELOAD_INTERVAL)

    def _carried(self) -> dict[tuple[str, str], tuple[int, int]]:
        """The counters a reload keeps: of phases whose last attempt left them FAILED, of
        phases in flight (their attempt decides), and of those already outside the index.
        A method of its own, so nothing of the old index outlives it in a local."""
        carried = self._outside
        old = self._index
        if old is None:
            return carried
        ids, counts, marks = old.candidates.phase_ids, old.attempts, old.flags
        for run in old.runs.values():
            for j in run.rows():
                if counts[j] and marks[j] & _LAST_FAILED:
                    carried[(run.run_id, ids[j])] = (counts[j], marks[j])
        for run_id, (phase_id, at) in self._picked.items():
            if run_id in old.runs and at is not None and counts[at]:
                carried[(run_id, phase_id)] = (counts[at], marks[at])
        return carried

    def _locate(self, run_id: str, phase_id: str) -> tuple[_RunQueue, int] | None:
        queue = self._index.runs.get(run_id) if self._index is not None else None
        if queue is None:
            return None
        i = queue.position(phase_id)
        return None if i is None else (queue, i)

    async def _candidates(self, old: Candidates | None,
                          began: float) -> tuple[Candidates, set[str] | None]:
        """A full load; or, given the ``old`` load's columns, those with the runs changed
        since the last load read afresh (a full load when the backlog cannot tell), and
        the changed runs (None: a full load)."""
        if old is not None and self._load_changed is not None:
            found = await self._load_changed(began - self._load_began)
            if found is None:
                self._load_changed = None  # the backlog cannot tell: full loads from now on
            else:
                self._load_began = began
                fresh, changed = found
                # (The merge holds the old columns and the new ones at once, briefly: a
                # list of references per column, not the phases' strings.)
                return merge_changes(old, fresh, changed), changed
        await self._read_history()
        candidates = await self._load()
        self._load_began = self._full_at = began
        self._gone.clear()
        return candidates, None

    async def _reload(self, *, changes_only: bool = False) -> None:
        # What carries over to the new load: tiers (per run); the counters of phases whose
        # last attempt left them FAILED, and of phases in flight (their attempt decides).
        # Everything else of the old index is dropped before the new one is built, so two
        # loads never sit in memory at once.
        carried = self._carried()
        # In flight when the load began: an attempt may end while it runs (observe() then
        # counts it in ``carried``, as the index is gone), and its phase may be missing from
        # the load (its worker had it EXECUTING); its count is kept all the same.
        in_flight = {(run_id, phase_id) for run_id, (phase_id, _) in self._picked.items()}
        old = self._index.candidates if changes_only and self._index is not None else None
        self._index = None
        self._drained_elsewhere = False  # (a claim during the load sets it again)
        began = anyio.current_time()
        candidates, changed = await self._candidates(old, began)
        index = self._build(candidates, tie_salt=self._tie_salt if self._spread else "",
                            preferred=self._preferred)
        del old, candidates
        if self._held_back:
            self._hold_back(index)
        if changed is not None:
            # Phases found drained elsewhere stay out, unless their run was read afresh (a
            # writer that does not stamp ``updated_at`` leaves the rest of the old load).
            for run_id, phase_id in self._gone:
                queue = index.runs.get(run_id) if run_id not in changed else None
                i = queue.position(phase_id) if queue is not None else None
                if i is not None:
                    index.flags[i] |= _REMOVED
        self._loaded_at = anyio.current_time()
        # What a load costs, the index's build included (the reload budget's unit).
        if changed is None:
            self._load_seconds = self._loaded_at - began
        else:
            self._changes_seconds = self._loaded_at - began
        self._stale = False
        in_flight.update((run_id, phase_id) for run_id, (phase_id, _) in self._picked.items())
        self._outside = {}
        for key, (attempts, flags) in carried.items():
            found = index.runs.get(key[0])
            i = found.position(key[1]) if found is not None else None
            if found is None or i is None:
                if key in in_flight:
                    self._outside[key] = (attempts, flags)
                continue
            index.attempts[i] = attempts
            index.flags[i] = (index.flags[i] & _REMOVED) | (flags & _LAST_FAILED)
            if index.flags[i] == _LAST_FAILED and self._may_retry(key, attempts):
                index.note_retry(found, i)
        self._picked = {
            run_id: (phase_id, found.position(phase_id) if (found := index.runs.get(run_id))
                     else None)
            for run_id, (phase_id, _) in self._picked.items()}
        for run_id, tier in self._tiers.items():
            queue = index.runs.get(run_id)
            if queue is not None:
                index.rerank(queue, tier)
        self._index = index
        if self._backoff:  # waits for retries that will not come (drained elsewhere) end
            self._backoff = {key: due for key, due in self._backoff.items()
                             if self._retryable(key)}

    def _may_retry(self, key: tuple[str, str], tries: int) -> bool:
        """Whether a phase tried ``tries`` times this session may be tried again (with
        ``--attempts-scope history``, other sessions' attempts count too)."""
        return tries + self._prior.get(key, 0) < self._max_attempts

    async def _read_history(self) -> None:
        """At a full load: what the history says (see ``__init__``)."""
        if self._history is None:
            return
        summary = await self._history()
        self._preferred = summary.preferred
        self._prior, self._held_back = {}, {}
        for key, phase in summary.phases.items():
            if self._scope_history and phase.attempts:
                self._prior[key] = phase.attempts
                if phase.attempts >= self._max_attempts:
                    self._held_back[key] = (
                        f"attempted {phase.attempts} time(s) in earlier sessions "
                        f"(--attempts-scope history, --max-attempts-per-phase "
                        f"{self._max_attempts})")
                    continue
            if self._revision is not None:
                why = unchanged_since(phase, self._revision)
                if why is not None:
                    self._held_back[key] = why

    def _hold_back(self, index: CandidateIndex) -> None:
        """Take the phases the history holds back out of a new index."""
        for (run_id, phase_id), why in self._held_back.items():
            queue = index.runs.get(run_id)
            i = queue.position(phase_id) if queue is not None else None
            if queue is None or i is None or index.flags[i] & _REMOVED:
                continue
            index.flags[i] |= _REMOVED
            index.size -= 1
            index.skipped.append((queue.ref(i), why))

    def _retryable(self, key: tuple[str, str]) -> bool:
        """Whether ``key`` may still be retried (its last attempt left it FAILED)."""
        where = self._locate(*key)
        if where is not None and self._index is not None:
            return self._index.flags[where[1]] == _LAST_FAILED
        return self._outside.get(key, (0, 0))[1] == _LAST_FAILED


async def check_run_id(run_id: str | None, runs_in: RunsIn, *, skip_queued: bool,
                       restoring: bool = False) -> None:
    """``--run-id`` must name a run with a phase to drain: a typo is exit 2 with the nearest
    run ids, not an empty session that exits 0. ``restoring``: ``--restore-stale-after``
    may make a non-final phase drainable."""
    if run_id is None:
        return
    states: tuple[PhaseState, ...] = (PhaseState.FAILED,) if skip_queued else (
        PhaseState.FAILED, PhaseState.QUEUED)
    if restoring:
        states = (PhaseState.FAILED, *(PhaseState(s) for s in NON_FINAL_STATES))
    runs = await runs_in(states)
    if run_id in runs:
        return
    near = difflib.get_close_matches(run_id, runs, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    what = " or non-final" if restoring else " or QUEUED" if not skip_queued else ""
    raise UsageError(f"--run-id {run_id!r} names no run with FAILED{what} phases "
                     f"({len(runs)} run(s) have some){hint}")
