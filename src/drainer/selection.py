"""Which phase to drain next: priority categories and the candidate index."""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from collections.abc import Callable, Set
from typing import TYPE_CHECKING

from .backlog import Candidates
from .models import PhaseRef, PhaseState

if TYPE_CHECKING:
    from .policy import Policy

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


@functools.lru_cache(maxsize=4096)
def failure_category(reason: str | None) -> int:
    """Category of a ``last_failure_reason`` (0 = no reason recorded, drains first)."""
    if reason is None or not reason.strip():
        return CATEGORY_NONE
    for category, pattern in _RULES:
        if pattern.search(reason):
            return category
    return CATEGORY_OTHER


QUEUED_SKIP = "QUEUED phase (left for its executor; --no-skip-runs-with-queued drains it)"

# Triage tiers of a run (sample-first): drained in this order.
TIER_UNSAMPLED = 0  #: no attempt yet this session: sample it first
TIER_PROMISING = 1  #: its first attempt succeeded, yielded telemetry, timed out or failed newly
TIER_DEPRIORITISED = 2  #: first attempt failed with an already-seen fingerprint, no telemetry
TIER_NAMES = ("unsampled", "promising", "deprioritised")

OrderKey = tuple[int, int, int, str, str]
Tried = Callable[[tuple[str, str]], object]  #: truthy when a phase was tried this session


def order_key(ref: PhaseRef, failed_in_run: int) -> OrderKey:
    """The priority of a phase inside a triage tier (DESIGN.md §5)."""
    return (
        failure_category(ref.last_failure_reason),
        ref.phase_index,
        failed_in_run,
        ref.run_id,
        ref.phase_id,
    )


class _RunQueue:
    """One run's candidate phases in priority order, with a cursor past the tried ones.

    Only the phases are stored; a phase's order key is computed when it reaches the head
    (memory: no key tuple per phase, which matters at 100,000 phases)."""

    __slots__ = ("cursor", "failed", "phases", "run_id", "tier", "version")

    def __init__(self, run_id: str, phases: list[PhaseRef], failed: int) -> None:
        self.run_id = run_id
        self.phases = phases
        self.failed = failed
        self.cursor = 0
        self.tier = TIER_UNSAMPLED
        self.version = 0

    def key(self, ref: PhaseRef) -> OrderKey:
        return order_key(ref, self.failed)

    def head(self, tried: Tried) -> PhaseRef | None:
        while self.cursor < len(self.phases) and tried(self.phases[self.cursor].key):
            self.cursor += 1
        return self.phases[self.cursor] if self.cursor < len(self.phases) else None


class CandidateIndex:
    """The candidates of one backlog load, ready for cheap picks.

    Each run keeps its phases sorted once; a heap orders runs by (triage tier, best untried
    phase). A pick pops the heap (O(log runs)), skipping stale entries, stopped runs and
    runs with an attempt in flight. Retries come from a small side heap and only when no
    never-tried candidate is left.
    """

    def __init__(self, runs: dict[str, _RunQueue], skipped: list[tuple[PhaseRef, str]]) -> None:
        self._runs = runs
        self.skipped = skipped
        self._heap: list[tuple[int, OrderKey, int, str]] = []
        #: (attempts so far, order, ref): retries go round-robin, then by priority
        self._retry_heap: list[tuple[int, OrderKey, PhaseRef]] = []
        self.size = sum(len(q.phases) for q in runs.values())
        for queue in runs.values():
            self._push(queue, lambda _key: False)

    def __len__(self) -> int:
        return self.size

    @classmethod
    def build(
        cls,
        candidates: Candidates,
        *,
        skip_run_prefixes: tuple[str, ...] = (),
        skip_queued: bool = True,
    ) -> CandidateIndex:
        skipped: list[tuple[PhaseRef, str]] = []
        per_run_refs: dict[str, list[PhaseRef]] = {}
        per_run = candidates.failed_per_run
        for ref in itertools.chain(candidates.failed, candidates.queued):
            prefix = next((p for p in skip_run_prefixes if ref.run_id.startswith(p)), None)
            if prefix is not None:
                skipped.append((ref, f"run matches --skip-run-prefix {prefix}"))
            elif ref.state == PhaseState.QUEUED and skip_queued:
                skipped.append((ref, QUEUED_SKIP))
            else:
                per_run_refs.setdefault(ref.run_id, []).append(ref)
        runs = {}
        for run_id, refs in per_run_refs.items():
            failed = per_run[run_id]
            refs.sort(key=lambda r: order_key(r, failed))
            runs[run_id] = _RunQueue(run_id, refs, failed)
        skipped.sort(key=lambda item: (item[0].run_id, item[0].phase_index, item[0].phase_id))
        return cls(runs, skipped)

    def _push(self, queue: _RunQueue, tried: Tried) -> None:
        head = queue.head(tried)
        if head is not None:
            heapq.heappush(self._heap, (queue.tier, queue.key(head), queue.version,
                                        queue.run_id))

    def set_tier(self, run_id: str, tier: int, tried: Tried) -> None:
        """Move a run to a triage tier and re-queue it behind its best untried phase."""
        queue = self._runs.get(run_id)
        if queue is None:
            return
        queue.tier = tier
        queue.version += 1
        self._push(queue, tried)

    def pick(
        self,
        policy: Policy,
        busy_runs: Set[str] = frozenset(),
        removed: Set[tuple[str, str]] = frozenset(),
    ) -> PhaseRef | None:
        """The best phase to drain now: never-tried first (by tier), then retries.

        ``busy_runs`` have an attempt in flight (here or under another drainer's lease);
        ``removed`` phases turned out not drainable any more (done by someone else).
        """

        def tried(key: tuple[str, str]) -> bool:
            return bool(policy.attempts_of(key)) or key in removed

        deferred: list[tuple[int, OrderKey, int, str]] = []
        found: PhaseRef | None = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            tier, _key, version, run_id = entry
            queue = self._runs[run_id]
            if version != queue.version or tier != queue.tier or not policy.run_allowed(run_id):
                continue  # stale entry, or the run was stopped
            head = queue.head(tried)
            if head is None:
                continue
            key = queue.key(head)
            if key != _key:  # the head moved on (tried elsewhere): re-queue by its new key
                heapq.heappush(self._heap, (tier, key, version, run_id))
                continue
            if run_id in busy_runs:
                deferred.append(entry)
                continue
            found = head
            deferred.append(entry)  # stays queued until the attempt ends and re-ranks it
            break
        for entry in deferred:
            heapq.heappush(self._heap, entry)
        if found is not None:
            return found
        return self._pick_retry(policy, busy_runs, removed)

    def note_retry(self, key: tuple[str, str], attempts: int) -> None:
        """A tried phase may be retried later (FAILED, under the cap): queue it once."""
        queue = self._runs.get(key[0])
        if queue is None:
            return
        for ref in queue.phases:
            if ref.key == key:
                heapq.heappush(self._retry_heap, (attempts, queue.key(ref), ref))
                return

    def _pick_retry(
        self, policy: Policy, busy_runs: Set[str], removed: Set[tuple[str, str]]
    ) -> PhaseRef | None:
        deferred: list[tuple[int, OrderKey, PhaseRef]] = []
        found: PhaseRef | None = None
        while self._retry_heap:
            entry = heapq.heappop(self._retry_heap)
            attempts, _order, ref = entry
            if policy.attempts_of(ref.key) != attempts or not policy.retry_allowed(ref.key):
                continue  # stale: tried again since, or no longer retryable
            if ref.key in removed:
                continue
            if not policy.run_allowed(ref.run_id):
                continue
            if ref.run_id in busy_runs:
                deferred.append(entry)
                continue
            found = ref  # its attempt re-queues it (note_retry) if it fails again
            break
        for entry in deferred:
            heapq.heappush(self._retry_heap, entry)
        return found

    def preview(self, count: int) -> list[PhaseRef]:
        """The first ``count`` picks if every attempt kept its run promising (for ``plan``)."""
        tried: set[tuple[str, str]] = set()
        heap = [(TIER_UNSAMPLED, q.key(q.phases[0]), q.run_id) for q in self._runs.values()
                if q.phases]
        heapq.heapify(heap)
        cursors = dict.fromkeys(self._runs, 0)
        out: list[PhaseRef] = []
        while heap and len(out) < count:
            _tier, _key, run_id = heapq.heappop(heap)
            queue = self._runs[run_id]
            i = cursors[run_id]
            ref = queue.phases[i]
            out.append(ref)
            tried.add(ref.key)
            cursors[run_id] = i + 1
            if i + 1 < len(queue.phases):
                heapq.heappush(heap, (TIER_PROMISING, queue.key(queue.phases[i + 1]), run_id))
        return out
