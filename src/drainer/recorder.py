"""Writes each happening once: the journal line, the typed event, the progress line, the
totals and (on a timer) the snapshot.

The snapshot (``snapshot``) copies its last results as bytes and parses only the journal
written since; it is rewritten every ``SNAPSHOT_INTERVAL`` seconds while the session is small,
and later only once the journal has grown by ``SNAPSHOT_GROWTH`` of its size at the last
write, so the bytes written per attempt stay flat however long the session runs. The journal
stays the truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from . import __version__
from .config import DrainConfig
from .dburl import redact_text
from .errors import SessionError
from .events import (
    AttemptFinished,
    AttemptSpawned,
    AttemptStarted,
    DrainEvent,
    JournalEvent,
    RunStopped,
    RunUnstopped,
    SessionStopped,
    StaleRestored,
)
from .journal import SessionFiles, hostname, iso, utcnow
from .models import Attempt, LeakedProcess, PhaseRef, RunStop, SessionSummary, Totals
from .report import attempt_lines, resume_command, shown_id, started_line, summary_lines
from .snapshot import Snapshot

log = logging.getLogger("drainer")

Echo = Callable[[str], None]
STALE_SHOWN = 20  #: stale phases restored that the opening lines name one by one
SNAPSHOT_INTERVAL = 2.0  #: the journal is the truth; the snapshot follows it on a timer
SNAPSHOT_SMALL = 1 << 20  #: journal bytes under which every interval rewrites the snapshot
SNAPSHOT_GROWTH = 0.25  #: past that, rewrite once the journal grew by this share


def make_echo(config: DrainConfig, echo: Echo | None) -> Echo:
    """Where progress lines go: ``echo`` when given, else the ``drainer`` logger; secrets
    are redacted from every line."""

    def say(line: str) -> None:
        line = redact_text(line, config.secrets)
        if echo is not None:
            echo(line)
        else:
            log.info("%s", line)

    return say


class Recorder:
    """Where everything that happens in a session is written, once."""

    def __init__(
        self,
        config: DrainConfig,
        files: SessionFiles,
        *,
        echo: Echo | None = None,
        on_event: Callable[[DrainEvent], None] | None = None,
        snapshot_fields: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.config = config
        self.files = files
        self.session_id = files.session_id
        self.totals = Totals()
        #: progress lines name each attempt's limit when it is adaptive
        self._show_limit = config.timeout_setting.factor is not None
        self.echo = make_echo(config, echo)
        self._on_event = on_event
        self._snapshot_fields = snapshot_fields
        self._snapshot = Snapshot(files.snapshot_path, files.journal_path, files.info_path,
                                  files.redact)
        self._snapshot_at = 0.0
        self._snapshot_journal_size = 0
        self._snapshot_running = False
        #: lease claims this process made, and those refused because another drainer held
        #: the run (since the session, or its last resume, started)
        self.claims = 0
        self.claims_refused = 0

    # -- output ------------------------------------------------------------------------

    def emit(self, event: DrainEvent) -> None:
        """Hand an event to the embedding application (errors there must not stop a drain)."""
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken callback is the caller's bug: log it, drain on
                log.exception("on_event callback failed for %s", type(event).__name__)

    def journal(self, event: JournalEvent) -> None:
        self.files.append(event, iso(utcnow()))

    # -- what happens ----------------------------------------------------------------------

    def attempt_started(self, event: AttemptStarted, number: int) -> None:
        self.journal(event)
        self.echo(started_line(event.attempt, number, self.config.batch_size,
                               self.config.lanes, self._show_limit))
        self.emit(event)

    def attempt_spawned(self, event: AttemptSpawned) -> None:
        self.journal(event)

    def attempt_finished(self, attempt: Attempt) -> None:
        event = AttemptFinished(session_id=self.session_id, attempt=attempt)
        self.journal(event)
        self.totals.add(attempt)
        for line in attempt_lines(attempt, self.config.lanes):
            self.echo(line)
        self.emit(event)

    def attempt_reconciled(self, attempt: Attempt) -> None:
        """An attempt a crash left unfinished, now settled by ``--resume``."""
        self.journal(AttemptFinished(session_id=self.session_id, attempt=attempt))
        self.totals.add(attempt)
        what = "interrupted attempt" if attempt.interrupted else \
            f"attempt settled ({attempt.outcome}) just before drainer stopped"
        self.echo(f"[RECONCILED] {shown_id(attempt.run_id)} / {shown_id(attempt.phase_id)}: "
                  f"{what}, phase {attempt.final_state}, {len(attempt.leaked_processes)} "
                  "process(es) killed")

    def replayed(self, attempt: Attempt) -> None:
        """An attempt of the session's earlier part, read back from its journal."""
        self.totals.add(attempt)

    def run_stopped(self, stop: RunStop) -> None:
        event = RunStopped(session_id=self.session_id, run_id=stop.run_id,
                           reason=str(stop.reason), detail=stop.detail)
        self.journal(event)
        self.echo(f"[STOP] run {shown_id(stop.run_id)}: {stop.reason} ({stop.detail})")
        self.emit(event)

    def run_unstopped(self, run_id: str, was: str) -> None:
        """``--unstop``: a run's stop is lifted."""
        event = RunUnstopped(session_id=self.session_id, run_id=run_id, was=str(was))
        self.journal(event)
        self.echo(f"[UNSTOP] run {shown_id(run_id)}: its stop ({was}) is lifted; "
                  "it drains again")
        self.emit(event)

    def stale_restored(self, event: StaleRestored) -> None:
        """``--restore-stale-after`` ran: journaled when it restored something, said
        either way (each phase up to :data:`STALE_SHOWN`)."""
        minutes = f"{event.older_than_minutes:g} min"
        if not event.phases:
            self.echo(f"[STALE] no phase left non-final for more than {minutes} without a "
                      "drainer's lease")
            return
        self.journal(event)
        self.echo(f"[STALE] restored {len(event.phases)} phase(s) left non-final for more "
                  f"than {minutes} without a drainer's lease to FAILED:")
        for run_id, phase_id, state, _reason in event.phases[:STALE_SHOWN]:
            self.echo(f"  [STALE] {shown_id(run_id)} / {shown_id(phase_id)} (was {state})")
        if len(event.phases) > STALE_SHOWN:
            self.echo(f"  [STALE] ... and {len(event.phases) - STALE_SHOWN} more (journal)")

    def stopping(self, detail: str) -> None:
        self.echo(f"[STOP] {detail}")

    def phase_skipped(self, ref: PhaseRef, why: str) -> None:
        """A phase that is never a candidate, said once (its ids shown escaped)."""
        self.echo(f"  [SKIP] {shown_id(ref.run_id)!r} / {shown_id(ref.phase_id)!r}: {why}")

    def leak_found(self, proc: LeakedProcess) -> None:
        of = f" ({proc.attempt})" if proc.attempt else ""
        self.echo(f"  [LEAK] --leak-pattern: pid {proc.pid} "
                  f"{' '.join(proc.cmdline)[:120]} outlived its attempt{of}")

    def escapee_found(self, proc: LeakedProcess, *, killed: bool) -> None:
        self.echo(f"  [LEAK] pid {proc.pid} {' '.join(proc.cmdline)[:120]} left its attempt's "
                  f"session and environment{'; killed' if killed else ''}")

    def session_stopped(self, summary: SessionSummary) -> None:
        """The last word: journal, final snapshot, summary lines, event. Synchronous, so a
        cancellation cannot skip any of it."""
        event = SessionStopped(session_id=self.session_id, stop_reason=summary.stop_reason,
                               completed_at=summary.completed_at or "",
                               stop_detail=summary.stop_detail, totals=summary.totals,
                               snapshot_path=str(summary.snapshot_path))
        try:
            self.journal(event)
            self.write_snapshot()
        finally:
            self.files.close()  # fsync and unlock, even when the disk is full
        for line in summary_lines(summary, self.config.leak_pattern):
            self.echo(line)
        self.emit(event)
        if summary.interrupted:
            self.echo(f"Resume with: {resume_command(self.config, self.session_id)}")

    # -- the snapshot ------------------------------------------------------------------------

    def _headers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Autopack session file's fields but its results (Autopack's keys only: its
        loader passes every key to its dataclass), and drainer's ``session.json``."""
        t = self.totals
        fields = self._snapshot_fields()
        stopped_runs: dict[str, str] = fields.get("stopped_runs", {})
        autopack = {
            "session_id": self.session_id,
            "started_at": fields.get("started_at"),
            "completed_at": fields.get("completed_at"),
            "batch_size": self.config.batch_size,
            # Interrupted attempts are not in its results[] (see autopack_record).
            **t.autopack_totals(),
            "fingerprint_counts": fields.get("fingerprint_counts", {}),
            "stopped_fingerprints": fields.get("stopped_fingerprints", []),
            "stopped_runs": sorted(stopped_runs),
            "consecutive_zero_yield": fields.get("consecutive_zero_yield", 0),
        }
        info = {
            "session_id": self.session_id,
            "started_at": fields.get("started_at"),
            "completed_at": fields.get("completed_at"),
            "autopack_session_file": self.files.snapshot_path.name,
            "stop_reason": fields.get("stop_reason"),
            "stop_detail": fields.get("stop_detail"),
            "totals": {
                "processed": t.processed, **t.to_json(), "restored": t.restored,
                "leaked": t.leaked, "telemetry_events": t.telemetry_events,
            },
            "stopped_runs": stopped_runs,
            "leak_gauge": fields.get("leak_gauge"),
            "claims": self.claims,
            "claims_refused": self.claims_refused,
            "lanes": self.config.lanes,
            "config": self.config.to_json(),
            "host": hostname(self.config.host_name),
            "drainer_version": __version__,
        }
        return autopack, info

    def write_snapshot(self) -> None:
        """Write the snapshot now, from the whole journal (blocking)."""
        self._write(self._headers(), self.files.journal_size)

    def _write(self, headers: tuple[dict[str, Any], dict[str, Any]], upto: int) -> None:
        files = self.files
        try:
            self._snapshot.write(headers[0], upto, headers[1])
        except OSError as exc:
            raise SessionError(f"cannot write snapshot {files.snapshot_path}: {exc}") from exc
        self._snapshot_journal_size = upto

    def snapshot_due(self) -> bool:
        size = self.files.journal_size
        grown = size - self._snapshot_journal_size
        if self._snapshot_running or grown <= 0:
            return False
        if time.monotonic() - self._snapshot_at < SNAPSHOT_INTERVAL:
            return False
        return size < SNAPSHOT_SMALL or grown >= SNAPSHOT_GROWTH * self._snapshot_journal_size

    async def snapshot_if_due(self) -> None:
        """Rewrite the snapshot when due, in a worker thread (the journal is read up to its
        size now, while lanes go on appending)."""
        if not self.snapshot_due():
            return
        self._snapshot_running = True
        self._snapshot_at = time.monotonic()
        headers, upto = self._headers(), self.files.journal_size
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write, headers, upto)
        finally:
            self._snapshot_running = False
            self._snapshot_at = time.monotonic()
