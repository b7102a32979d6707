"""One attempt: claim the run's lease, spawn and supervise the worker, judge what happened,
record it; and, after a crash, reconcile the attempts that never finished.

:func:`judge` is pure: what the supervisor saw and what the database says in, an
:class:`~drainer.models.Attempt` out. Everything else here talks to the store, the supervisor
or the recorder, one call per touch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio

from . import proctree
from .backlog import BacklogStore, Entry, Lease, Outcome, PhaseRow
from .backlog.history import Row as HistoryRow
from .config import DrainConfig, render_command
from .dburl import redact_text
from .errors import DatabaseError, DrainerError, UsageError
from .events import AttemptSpawned, AttemptStarted
from .faults import crash_point
from .fingerprint import (
    error_excerpt,
    failure_fingerprint,
    llm_call_seen,
    reached_llm_boundary,
    worker_error_line,
    yield_per_minute,
    zero_yield_reason,
)
from .journal import Dangling, SessionFiles, iso, utcnow
from .models import Attempt, LeakedProcess, PhaseRef, PhaseState, is_final_state
from .reasons import NOTE_START, is_code, note_part, with_note, worker_part
from .recorder import Recorder
from .report import shown_id
from .selection import (
    CATEGORY_NAMES,
    CATEGORY_NONE,
    CATEGORY_OTHER,
    CATEGORY_TIMEOUT,
    failure_category,
)
from .sinks import TAIL_BYTES
from .supervisor import AttemptSpec, ProcessResult, RssSampler, Supervisor
from .timeouts import SAMPLES_KEPT, Timeouts
from .worktrees import check_git_workspace

DB_CLEANUP_TIMEOUT = 90.0  #: settling an attempt gives up after this long (resume mends it)
#: while its lease cannot be renewed (database unreachable), an attempt goes on this long
DB_OUTAGE_LIMIT = 300.0
#: the first heartbeat of an attempt (recording its worker in the lease) comes this soon
WORKER_RECORD_DELAY = 1.0
#: an attempt's error message is cut here: a worker's reason can be megabytes, and every
#: attempt's message goes to the journal and the snapshot (the database keeps it whole)
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True, slots=True)
class Claimed:
    """A phase that is ours to attempt: its run's lease is held under ``attempt_id``."""

    ref: PhaseRef  #: as re-read under the lease (state, reason)
    attempt_id: str
    telemetry_before: int | None


@dataclass(frozen=True, slots=True)
class Leased:
    """Another live drainer holds the run: its lease ends in ``remaining`` seconds at the
    latest (None: unknown). ``elsewhere``: every run other drainers lease now, with the
    seconds to each lease's end, when the claim read them."""

    remaining: float | None = None
    elsewhere: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Spent:
    """``--attempts-scope history``: under the claim, the history showed the phase out of
    attempts (``others``: those of other sessions); the run was given back."""

    others: int


ClaimOutcome = Claimed | Leased | Spent | Literal["gone"]
GONE: Literal["gone"] = "gone"  #: the phase is no longer drainable (done meanwhile)


# -- the worker's command and environment ---------------------------------------------------


def placeholder_values(
    config: DrainConfig, *, run_id: str, phase_id: str, phase_index: int, attempt_id: str,
    session_id: str, workspace: Path | None = None, resolved: str | None = None,
) -> dict[str, str]:
    """``workspace``: the lane's own (``--lane-workspaces``), else ``--workspace``;
    ``resolved``: its absolute path when the caller resolved it already."""
    return {
        "run_id": run_id,
        "phase_id": phase_id,
        "phase_index": str(phase_index),
        "attempt_id": attempt_id,
        "session_id": session_id,
        "python": config.python,
        "workspace": resolved or str((workspace or config.workspace).resolve()),
    }


def check_worker_program(config: DrainConfig) -> None:
    """Fail early when the worker's program or workspace is missing (instead of failing every
    phase with a misleading spawn error)."""
    if not config.workspace.is_dir():
        raise UsageError(f"--workspace {config.workspace} is not a directory")
    if config.lane_workspaces == "git-worktree":
        check_git_workspace(config.workspace, interpreter_script(config.command_tokens))
    argv = render_command(config.command_tokens, placeholder_values(
        config, run_id="", phase_id="", phase_index=0, attempt_id="", session_id=""))
    first = argv[0]
    if "/" in first:
        path = Path(first) if Path(first).is_absolute() else config.workspace / first
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UsageError(f"worker program {first!r} is not an executable file (--command)")
    elif shutil.which(first) is None:
        raise UsageError(f"worker program {first!r} is not on PATH (--command)")
    script = interpreter_script(config.command_tokens)
    if script is not None:
        path = Path(script) if Path(script).is_absolute() else config.workspace / script
        if not path.is_file():
            raise UsageError(
                f"worker script {script!r} not found in workspace {config.workspace} "
                "(--command, --workspace)")


_PYTHON = re.compile(r"python[\d.]*")


def interpreter_script(tokens: tuple[str, ...]) -> str | None:
    """The script of a ``{python} path/to/script.py ...`` command (None for other commands,
    ``-m``/``-c`` forms, or a script path made of placeholders)."""
    if len(tokens) < 2 or not (tokens[0] == "{python}"
                               or _PYTHON.fullmatch(Path(tokens[0]).name)):
        return None
    rest = iter(tokens[1:])
    for token in rest:
        if token in ("-m", "-c"):
            return None
        if token in ("-W", "-X"):  # an option with its value in the next token
            next(rest, None)
        elif not token.startswith("-"):
            return None if "{" in token else token
    return None


def worker_env(
    config: DrainConfig, *, session_id: str, attempt_id: str, ref: PhaseRef,
    api_url: str | None,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONUTF8": "1",
        "PYTHONIOENCODING": "utf-8",
        "TELEMETRY_DB_ENABLED": "1",
        "DATABASE_URL": config.db.sync_url,
        "DRAINER_SESSION_ID": session_id,
        "DRAINER_ATTEMPT_ID": attempt_id,
        "DRAINER_RUN_ID": ref.run_id,
        "DRAINER_PHASE_ID": ref.phase_id,
    })
    if api_url:
        env["AUTOPACK_API_URL"] = api_url
    env.update(dict(config.env))
    return env


# -- judging -------------------------------------------------------------------------------


def restore_reason(
    result: ProcessResult, state: str | None, timeout_label: str, *, lease_lost: bool = False
) -> str:
    """drainer's note for a phase an attempt left non-final (the worker's reason is kept
    before it, :mod:`drainer.reasons`)."""
    if lease_lost:
        what = "lease lost (not renewed in time); attempt stopped"
    elif result.cancelled:
        what = "attempt cancelled (session stopping)"
    elif result.timed_out:
        what = f"attempt timed out after {timeout_label}; process tree killed"
    elif result.spawn_error:
        what = result.spawn_error
    else:
        what = f"worker exited with status {result.returncode}"
    return f"{NOTE_START}{what}; phase was left {state}, restored to FAILED"


def error_message(
    started: Attempt,
    result: ProcessResult,
    *,
    row: PhaseRow | None,
    restored: bool,
    previous_reason: str | None,
    timeout_label: str,
    lease_lost: bool = False,
    line: str | None = None,
    kept: str | None = None,
) -> tuple[str, str]:
    """An actionable failure message, and the part of it the fingerprint is built from.

    The message names, in this order and each once: what drainer did (a timeout, a stop, a
    restore), the worker's reason from the database, the worker's last error line (else
    the end of its stderr), and the log path. The fingerprint is built from the most
    telling stable part: drainer's cause for timeouts and stops; else the worker's error
    line (behind a bare status code such as ``FAILED`` when the worker wrote one); else the
    worker's reason when this attempt wrote it; else drainer's note.
    """
    if row is None:
        text = f"phase {started.run_id}/{started.phase_id} no longer exists in the database"
        return text, text
    if result.spawn_error:
        return result.spawn_error, result.spawn_error
    state, reason = row
    raw = worker_part(reason)
    worker = _capped(raw, kept)
    written = bool(raw) and raw != worker_part(previous_reason)
    if line is None:  # the worker's error line (judge passes the one it found)
        line = _error_line(result)
    if lease_lost:
        cause = "drainer: lease lost (not renewed in time); attempt stopped, process tree killed"
    elif result.cancelled:
        cause = "drainer: attempt cancelled (session stopping); process tree killed"
    elif result.timed_out:
        cause = f"drainer: timed out after {timeout_label}; process tree killed"
    else:
        cause = note_part(reason) if restored else ""
    parts = [cause, worker]
    if not cause and not worker:
        parts.append(f"worker exited with status {result.returncode}, phase {state}")
    elif not cause and not written and result.returncode != 0:
        parts.append(f"unchanged by this attempt? worker exited with status {result.returncode}")
    excerpt = ""
    if line and worker and worker in line:  # the line says it all, and more
        parts[1] = ""
    if line and line not in worker:
        parts.append(line)
    elif not line and not (written and not is_code(worker)):
        excerpt = (error_excerpt(result.stderr_tail, 300)
                   or error_excerpt(result.stdout_tail, 300))
        parts.append(excerpt)
    parts.append(f"(log: {started.subprocess_stderr_path})")
    if result.timed_out or result.cancelled or lease_lost:
        basis = cause
    elif line:
        basis = f"{worker}: {line}" if written and is_code(worker) else line
    else:  # the worker's reason (even an old one: it tells phases apart), else what is left
        basis = (worker or cause or excerpt
                 or f"worker exited with status {result.returncode}, phase {state}")
    return " | ".join(p for p in parts if p), basis


def judge(
    started: Attempt,
    result: ProcessResult,
    *,
    row: PhaseRow | None,
    restored: bool,
    telemetry_before: int | None,
    telemetry_after: int | None,
    previous_reason: str | None,
    timeout_label: str,
    secrets: tuple[str, ...] = (),
    finished_at: str,
    lease_lost: bool = False,
    kept: str | None = None,
) -> Attempt:
    """The record of a finished attempt, from what happened (pure). ``kept``: where a
    reason too long for the message is kept whole (:func:`keep_whole_reason`)."""
    state = row[0] if row is not None else None
    # After a lost lease the phase may be another drainer's doing: never this one's success.
    success = state == PhaseState.COMPLETE and not result.cancelled and not lease_lost
    events = None if telemetry_before is None or telemetry_after is None else max(
        0, telemetry_after - telemetry_before)
    output = result.stdout_tail + "\n" + result.stderr_tail
    line = "" if success else _error_line(result)  # read once, only for a failure
    message = fingerprint = None
    if not success:
        text, basis = error_message(started, result, row=row, restored=restored,
                                    previous_reason=previous_reason,
                                    timeout_label=timeout_label, lease_lost=lease_lost,
                                    line=line, kept=kept)
        message = redact_text(text, secrets)
        fingerprint = failure_fingerprint(state, result.returncode, timed_out=result.timed_out,
                                          error=redact_text(basis, secrets))
    return dataclasses.replace(
        started,
        finished_at=finished_at,
        timestamp=finished_at,
        final_state=state,
        success=success,
        error_message=message,
        failure_fingerprint=fingerprint,
        subprocess_returncode=result.returncode,
        subprocess_duration_seconds=result.duration,
        subprocess_stdout_excerpt=error_excerpt(result.stdout_tail),
        subprocess_stderr_excerpt=error_excerpt(result.stderr_tail),
        timed_out=result.timed_out,
        cancelled=result.cancelled,
        lease_lost=lease_lost,
        state_restored=restored,
        leaked_processes=tuple(result.leaked),
        peak_rss_bytes=result.peak_rss_bytes,
        stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes,
        telemetry_events_collected=events,
        telemetry_yield_per_minute=yield_per_minute(events, result.duration),
        reached_llm_boundary=reached_llm_boundary(output),
        llm_call_seen=llm_call_seen(output),
        worker_error=redact_text(line, secrets) or None,
        zero_yield_reason=zero_yield_reason(success=success, timed_out=result.timed_out,
                                            telemetry_events=events, output=output,
                                            returncode=result.returncode),
    )


def _error_line(result: ProcessResult) -> str:
    return worker_error_line(result.stderr_tail) or worker_error_line(result.stdout_tail)


def _capped(reason: str, kept: str | None) -> str:
    """A database reason as an error message takes it: cut at ``MAX_ERROR_CHARS``, saying
    where it is kept whole (``kept``, from :func:`keep_whole_reason`)."""
    if len(reason) <= MAX_ERROR_CHARS:
        return reason
    where = kept or "the database keeps the phase's last_failure_reason whole"
    return (f"{reason[:MAX_ERROR_CHARS]} ... [cut at {MAX_ERROR_CHARS:,} of {len(reason):,} "
            f"characters; {where}]")


def keep_whole_reason(stderr_path: str | None, reason: str | None, *, secrets: tuple[str, ...],
                      limit: int) -> str | None:
    """Write a worker's reason that error messages cut (over ``MAX_ERROR_CHARS``) whole,
    redacted and at most ``limit`` bytes, beside the attempt's logs
    (``<run>__<phase>__<n>.reason.txt``). Returns where it is (for the message), or None
    when there is nothing to keep or it could not be written (a full disk): the attempt's
    record matters more than this copy."""
    worker = worker_part(reason)
    if not stderr_path or len(worker) <= MAX_ERROR_CHARS:
        return None
    path = stderr_path.removesuffix(".stderr.txt") + ".reason.txt"
    data = redact_text(worker, secrets).encode("utf-8", "replace")
    try:
        Path(path).write_bytes(data[:limit])
    except OSError:
        return None
    return f"full text in {path}" if len(data) <= limit else (
        f"its first {limit:,} bytes in {path}")


# -- running -------------------------------------------------------------------------------


@dataclass(eq=False)
class Beat:
    """The heartbeat of one running attempt (see :class:`Heartbeats`)."""

    claimed: Claimed
    scope: anyio.CancelScope  #: cancelled when the lease is lost
    worker: list[tuple[int, float | None]]  #: (pid, create time) once spawned
    due: float
    renewed: float  #: when the lease was last renewed (or claimed)
    lost: bool = False
    failing: bool = False
    recorded: bool = False  #: the worker is in the lease
    renewing: bool = False


class Heartbeats:
    """One task for a whole session renews the lease of every running attempt, every TTL/3
    (instead of a task per attempt). A lease found no longer ours (swept or taken over after
    it expired: the drainer was frozen, or cut off) is lost: the attempt is cancelled at
    once, since another drainer may be draining the run now.

    The first renewal comes sooner (``WORKER_RECORD_DELAY``) and records the worker's pid
    and create time in the lease, so that a drainer on this host that takes the run over
    after it expired can kill the worker's tree by ancestry as well as by marker. An attempt
    shorter than that costs no statement.

    While the database does not answer, the attempt goes on: renewal is retried (each call
    retries transient faults itself) for up to ``DB_OUTAGE_LIMIT``. Renewals run side by
    side, each in a task of its own, so one that waits on the database holds up no other. A
    lease that expired meanwhile is still ours if nobody took it (drainers never sweep their
    own leases), which the next renewal tells."""

    def __init__(self, store: BacklogStore, recorder: Recorder, *, ttl: float) -> None:
        self._store = store
        self._recorder = recorder
        self._ttl = ttl
        self._beats: dict[str, Beat] = {}
        self._wake = anyio.Event()

    def start(self, claimed: Claimed, scope: anyio.CancelScope,
              worker: list[tuple[int, float | None]]) -> Beat:
        now = anyio.current_time()
        beat = Beat(claimed, scope, worker, due=now + self._interval(None), renewed=now)
        self._beats[claimed.attempt_id] = beat
        self._wake.set()
        return beat

    def stop(self, beat: Beat) -> None:
        """The attempt is over: no more renewals (one under way is ignored)."""
        self._beats.pop(beat.claimed.attempt_id, None)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                now = anyio.current_time()
                for beat in list(self._beats.values()):
                    if beat.due <= now and not beat.renewing:
                        beat.renewing = True
                        tg.start_soon(self._renew, beat)
                waits = [b.due for b in self._beats.values() if not b.renewing]
                self._wake = anyio.Event()
                with anyio.move_on_after(max(0.0, min(waits) - now) if waits else None):
                    await self._wake.wait()

    def _interval(self, beat: Beat | None) -> float:
        ttl = self._ttl
        if beat is not None and beat.failing:
            return min(ttl / 3, 1.0)
        if beat is None or not beat.recorded:
            return min(ttl / 3, WORKER_RECORD_DELAY)
        return ttl / 3

    async def _renew(self, beat: Beat) -> None:
        try:
            await self._renew_once(beat)
        finally:
            beat.renewing = False
            beat.due = anyio.current_time() + self._interval(beat)
            self._wake.set()

    async def _renew_once(self, beat: Beat) -> None:
        ttl, echo = self._ttl, self._recorder.echo
        run_id = beat.claimed.ref.run_id
        shown = shown_id(run_id)
        record = beat.worker[0] if beat.worker and not beat.recorded else None
        try:
            held = await self._store.leases.renew(run_id, beat.claimed.attempt_id, ttl, record)
        except DrainerError as exc:
            down = anyio.current_time() - beat.renewed
            if self._beats.get(beat.claimed.attempt_id) is not beat:
                return  # the attempt is over
            if down < max(DB_OUTAGE_LIMIT, ttl):
                if not beat.failing:
                    echo(f"[LEASE] renewing the lease of {shown} failed; the attempt goes on, "
                         f"retrying: {exc}")
                beat.failing = True
                return
            echo(f"[LEASE] the database did not answer for {down:.0f}s; giving the attempt on "
                 f"{shown} up")
            held = False
        if self._beats.get(beat.claimed.attempt_id) is not beat:
            return  # the attempt ended meanwhile: what the renewal found no longer matters
        if held:
            beat.recorded = beat.recorded or record is not None
            if beat.failing:
                echo(f"[LEASE] renewed the lease of {shown} after "
                     f"{anyio.current_time() - beat.renewed:.0f}s")
            beat.renewed, beat.failing = anyio.current_time(), False
            return
        echo(f"[LEASE] lost the lease of {shown} (not renewed within --lease-ttl-seconds "
             f"{ttl:g}); stopping its attempt")
        beat.lost = True
        self.stop(beat)
        beat.scope.cancel()


class AttemptRunner:
    """Claims, runs and settles attempts of one session."""

    def __init__(
        self,
        config: DrainConfig,
        store: BacklogStore,
        files: SessionFiles,
        recorder: Recorder,
        *,
        host: str,
        api_url: str | None,
        revision: str | None = None,
    ) -> None:
        """``revision``: the workspace's, recorded with each attempt in the history."""
        self.config = config
        self._revision = revision
        self._store = store
        self._files = files
        self._recorder = recorder
        self._session_id = files.session_id
        self._host = host
        self._api_url = api_url
        self._workspaces: dict[int, Path] = {}  #: lane -> its own workspace, if any
        #: workspace -> its resolved path, resolved once per session (a syscall a part)
        self._resolved: dict[Path, str] = {}
        #: samples every running worker's memory; the scheduler runs it for the session
        self.sampler = RssSampler()
        #: renews every running attempt's lease; the scheduler runs it for the session
        self.heartbeats = Heartbeats(store, recorder, ttl=config.lease_ttl)
        #: each attempt's time limit: fixed, or learnt from the history
        self.timeouts = Timeouts(
            config.timeout_setting, low=config.min_phase_timeout, high=config.max_phase_timeout,
            read=functools.partial(store.history.durations, per_category=SAMPLES_KEPT)
            if store.keeps_history else None)

    def use_lane_workspaces(self, paths: dict[int, Path]) -> None:
        self._workspaces = dict(paths)

    async def claim(self, ref: PhaseRef, *, tried: int | None = None) -> ClaimOutcome:
        """Claim the run's lease and re-read the phase under it. ``tried`` (with
        ``--attempts-scope history``): the phase's attempts this session; under the lease,
        where no other drainer can add one, the history's count is checked against
        ``--max-attempts-per-phase`` too."""
        attempt_id = str(uuid.uuid4())
        lease = Lease(run_id=ref.run_id, session_id=self._session_id, attempt_id=attempt_id,
                      phase_id=ref.phase_id, host=self._host, pid=os.getpid())
        leases, ttl = self._store.leases, self.config.lease_ttl
        claim = await leases.claim(lease, ttl)
        if claim.expired and claim.holder is not None:
            # Its drainer stopped renewing it (killed, frozen, cut off): its attempt dies
            # before this one starts, so that two workers never drain one run.
            expired = claim.holder
            await self.end_expired(expired)
            claim = await leases.take_over(lease, ttl, expired)
            if claim.holder is None:  # said as a sweep says it: the same happened
                self._recorder.echo(
                    f"[LEASE] expired lease of {shown_id(expired.run_id)} (drainer "
                    f"{expired.host} pid {expired.pid}) taken over; phase "
                    f"{shown_id(expired.phase_id)} restored if it was left non-final")
        if claim.holder is not None:
            return Leased(claim.holder.remaining, claim.elsewhere)
        drainable = (PhaseState.FAILED,) if self.config.skip_runs_with_queued else (
            PhaseState.FAILED, PhaseState.QUEUED)
        if claim.phase is None or claim.phase[0] not in drainable:
            # Drained meanwhile (another drainer, or the executor): give the run back.
            await self._store.leases.release(ref.run_id, attempt_id)
            return GONE
        if tried is not None and self._store.keeps_history:
            others = await self._store.history.count(ref.run_id, ref.phase_id,
                                                     other_than=self._session_id)
            if tried + others >= self.config.max_attempts_per_phase:
                await self._store.leases.release(ref.run_id, attempt_id)
                return Spent(others)
        state, reason = claim.phase
        return Claimed(ref=dataclasses.replace(ref, state=state, last_failure_reason=reason),
                       attempt_id=attempt_id, telemetry_before=claim.telemetry)

    async def end_expired(self, lease: Lease) -> None:
        """Kill what the attempt of an expired lease left running, when its drainer ran on
        this host (found by the attempt's marker): before its run is swept or taken over.
        A holder on another host is out of reach; see the README's reliability section."""
        if lease.host != self._host:
            return
        killed = await anyio.to_thread.run_sync(functools.partial(
            proctree.kill_leftovers, lease.attempt_id, lease.worker_pid, lease.worker_created,
            grace=self.config.kill_grace_period))
        if killed:
            self._recorder.echo(
                f"[LEASE] the lease of {shown_id(lease.run_id)} expired (drainer pid {lease.pid}, "
                f"session {lease.session_id}); killed {len(killed)} process(es) of its "
                "attempt before taking the run over")

    async def sweep_expired(self) -> list[Lease]:
        """Restore and delete other sessions' expired leases (their attempts killed first
        when they ran here); returns those swept."""
        swept = []
        for lease in await self._store.leases.expired(other_than=self._session_id):
            await self.end_expired(lease)
            if await self._store.leases.sweep(lease):
                self._recorder.echo(
                    f"[LEASE] expired lease of {shown_id(lease.run_id)} (drainer {lease.host} pid "
                    f"{lease.pid}) swept; phase {shown_id(lease.phase_id)} restored if it was left "
                    "non-final")
                swept.append(lease)
        return swept

    async def leased_elsewhere(self) -> dict[str, float]:
        """Runs other drainers lease now, with seconds to each lease's expiry."""
        return await self._store.leases.held_elsewhere(other_than=self._session_id)

    async def release(self, claimed: Claimed) -> None:
        """A claimed phase that will not be attempted after all: give its run back."""
        await self._store.leases.release_quietly(claimed.ref.run_id, claimed.attempt_id)

    def _log_paths(self, ref: PhaseRef, attempt_number: int) -> tuple[Path, Path, int]:
        out, err = self._files.log_paths(ref.run_id, ref.phase_id, attempt_number)
        while out.exists():  # a re-attempt after an interrupted one keeps that one's logs
            attempt_number += 1
            out, err = self._files.log_paths(ref.run_id, ref.phase_id, attempt_number)
        return out, err, attempt_number

    async def run(self, claimed: Claimed, *, lane: int, number: int,
                  attempt_number: int) -> Attempt:
        """Run one claimed attempt to its end and record it. Cancelled (a stop, the caller),
        the worker's tree is killed and the attempt settled before the cancellation goes on."""
        cfg, ref = self.config, claimed.ref
        out, err, attempt_number = self._log_paths(ref, attempt_number)
        limit = await self.timeouts.limit(_category(ref.last_failure_reason), ref.run_id,
                                          ref.phase_id)
        started = Attempt(
            run_id=ref.run_id, phase_id=ref.phase_id, phase_index=ref.phase_index,
            initial_state=ref.state, attempt_id=claimed.attempt_id,
            attempt_number=attempt_number, lane=lane, started_at=iso(utcnow()),
            subprocess_stdout_path=str(out), subprocess_stderr_path=str(err),
            timeout_seconds=None if limit is None else limit.seconds,
        )
        workspace = self._workspaces.get(lane, cfg.workspace)
        resolved = self._resolved.get(workspace)
        if resolved is None:
            resolved = self._resolved[workspace] = str(workspace.resolve())
        spec = AttemptSpec(
            argv=render_command(cfg.command_tokens, placeholder_values(
                cfg, run_id=ref.run_id, phase_id=ref.phase_id, phase_index=ref.phase_index,
                attempt_id=claimed.attempt_id, session_id=self._session_id,
                workspace=workspace, resolved=resolved)),
            env=worker_env(cfg, session_id=self._session_id, attempt_id=claimed.attempt_id,
                           ref=ref, api_url=self._api_url),
            cwd=workspace,
            attempt_id=claimed.attempt_id,
            stdout_path=out,
            stderr_path=err,
            timeout=started.timeout_seconds,
            kill_grace_period=cfg.kill_grace_period,
            max_log_bytes=cfg.max_log_bytes,
            secrets=cfg.secrets,
            kill_leaks=cfg.leak_policy == "kill",
        )
        settling = False
        try:
            self._recorder.attempt_started(
                AttemptStarted(session_id=self._session_id, attempt=started,
                               argv=tuple(spec.argv), telemetry_before=claimed.telemetry_before),
                number)
            crash_point("before_spawn")

            worker: list[tuple[int, float | None]] = []  # (pid, create time) once spawned

            def spawned(pid: int, create_time: float | None) -> None:
                worker.append((pid, create_time))
                self._recorder.attempt_spawned(AttemptSpawned(claimed.attempt_id, pid,
                                                              create_time))
                crash_point("worker_running")

            supervisor = Supervisor(spec, on_spawn=spawned, sampler=self.sampler)
            with anyio.CancelScope() as scope:
                beat = self.heartbeats.start(claimed, scope, worker)
                try:
                    await supervisor.run()
                finally:
                    settling = True
                    self.heartbeats.stop(beat)
                    with anyio.CancelScope(shield=True):
                        settled = await self._settle(started, supervisor.result, claimed,
                                                     lease_lost=beat.lost)
        finally:
            if not settling:  # no worker ran: the phase is as claimed; give the run back
                await self.release(claimed)
            # A settle that failed keeps the lease: the phase may be non-final, and the
            # lease's expiry lets a sweep (or --resume) restore it. Released, it would be
            # stuck with nobody to restore it.
        return settled

    async def _settle(
        self, started: Attempt, result: ProcessResult, claimed: Claimed, *, lease_lost: bool
    ) -> Attempt:
        """Read the outcome, restore a non-final phase and release the lease (one
        transaction), judge, record. After a lost lease the phase belongs to whoever took
        the run over: it is restored only if nobody leases the run now."""
        try:
            with anyio.fail_after(DB_CLEANUP_TIMEOUT):
                if self._store.keeps_history:
                    attempt = await self._settle_recorded(started, result, claimed,
                                                          lease_lost=lease_lost)
                else:
                    attempt = await self._settle_unrecorded(started, result, claimed,
                                                            lease_lost=lease_lost)
        except TimeoutError:
            # Not journaled as finished: --resume reconciles this attempt.
            ref = claimed.ref
            raise DatabaseError(
                f"the database did not answer within {DB_CLEANUP_TIMEOUT:g}s while finishing "
                f"{ref.run_id} / {ref.phase_id}; resume the session to reconcile it"
            ) from None
        self.timeouts.observe(attempt.run_id, attempt.phase_id, timed_out=attempt.timed_out,
                              seconds=attempt.timeout_seconds)
        crash_point("after_exit")
        self._recorder.attempt_finished(attempt)
        return attempt

    async def _settle_unrecorded(
        self, started: Attempt, result: ProcessResult, claimed: Claimed, *, lease_lost: bool
    ) -> Attempt:
        """``--no-history``: read the phase and release the lease in one round trip when
        the phase is final (the common case); else restore and release in one transaction."""
        cfg, ref = self.config, claimed.ref
        phases, leases = self._store.phases, self._store.leases
        outcome, held = await leases.finish_if_final(ref.run_id, ref.phase_id,
                                                     claimed.attempt_id)
        row, restored = outcome.row, False
        if held is not None:
            lease_lost = lease_lost or not held
        else:  # left non-final: look again (a clean exit), restore, release
            outcome = await phases.wait_final_state(
                ref.run_id, ref.phase_id, wait=cfg.final_state_wait if _clean(result) else 0.0)
            row = outcome.row
            why = None
            if row is not None and not is_final_state(row[0]):
                why = restore_reason(result, row[0], _limit_label(started),
                                     lease_lost=lease_lost)
            finished = await leases.finish(ref.run_id, ref.phase_id, claimed.attempt_id,
                                           restore=why)
            lease_lost = lease_lost or not finished.held
            restored = finished.restored is not None
            if finished.restored is not None:
                row = (PhaseState.FAILED.value, finished.restored)
            elif why is not None:  # changed under us: read what it is now
                row = await phases.read(ref.run_id, ref.phase_id)
        return await self._judge(started, result, claimed, row=row, restored=restored,
                                 telemetry_after=outcome.telemetry, lease_lost=lease_lost)

    async def _settle_recorded(
        self, started: Attempt, result: ProcessResult, claimed: Claimed, *, lease_lost: bool
    ) -> Attempt:
        """With the attempt history. The common case is one round trip: read the phase,
        judge the attempt as if its lease held, record its history row and release the
        lease. Else (the phase left non-final, a reason to keep whole): judge, then
        restore (if needed), release and record in one transaction. Rarely the lease turns
        out lost there, or the phase changed: then it is judged again and its row amended."""
        cfg, ref = self.config, claimed.ref
        phases, leases = self._store.phases, self._store.leases

        def decide(found: Outcome) -> tuple[Attempt, Entry] | None:
            # The common case, judged inside the round trip: the phase is final (or gone)
            # and its reason short enough to need no file of its own.
            if found.row is not None and (not is_final_state(found.row[0]) or (
                    found.row[1] is not None and len(found.row[1]) > MAX_ERROR_CHARS)):
                return None
            judged = self._judge_now(started, result, claimed, row=found.row, restored=False,
                                     telemetry_after=found.telemetry, lease_lost=lease_lost)
            return judged, self._entry(judged, found.row, ref)

        outcome, attempt, held = await leases.finish_recorded(
            ref.run_id, ref.phase_id, claimed.attempt_id, decide)
        if attempt is not None:
            if held or lease_lost:
                return attempt
            attempt = await self._judge(started, result, claimed, row=outcome.row,
                                        restored=False, telemetry_after=outcome.telemetry,
                                        lease_lost=True)
            await self._store.history.amend(self._entry(attempt, outcome.row, ref))
            return attempt
        row = outcome.row
        if row is not None and not is_final_state(row[0]) and _clean(result):
            outcome = await phases.wait_final_state(ref.run_id, ref.phase_id,
                                                    wait=cfg.final_state_wait)
            row = outcome.row
        why = None
        if row is not None and not is_final_state(row[0]):
            why = restore_reason(result, row[0], _limit_label(started), lease_lost=lease_lost)
            row = (PhaseState.FAILED.value, with_note(row[1], why))
        attempt = await self._judge(started, result, claimed, row=row,
                                    restored=why is not None,
                                    telemetry_after=outcome.telemetry, lease_lost=lease_lost)
        finished = await leases.finish(ref.run_id, ref.phase_id, claimed.attempt_id,
                                       restore=why, entry=self._entry(attempt, row, ref))
        lost = lease_lost or not finished.held
        if lost == lease_lost and (why is None or finished.restored is not None):
            return attempt
        if finished.restored is not None:
            row = (PhaseState.FAILED.value, finished.restored)
        elif why is not None:  # changed under us: read what it is now
            row = await phases.read(ref.run_id, ref.phase_id)
        attempt = await self._judge(started, result, claimed, row=row,
                                    restored=finished.restored is not None,
                                    telemetry_after=outcome.telemetry, lease_lost=lost)
        await self._store.history.amend(self._entry(attempt, row, ref))
        return attempt

    async def _judge(self, started: Attempt, result: ProcessResult, claimed: Claimed, *,
                     row: PhaseRow | None, restored: bool, telemetry_after: int | None,
                     lease_lost: bool) -> Attempt:
        cfg = self.config
        kept = None
        if row is not None and row[1] is not None and len(row[1]) > MAX_ERROR_CHARS:
            kept = await anyio.to_thread.run_sync(functools.partial(
                keep_whole_reason, started.subprocess_stderr_path, row[1],
                secrets=cfg.secrets, limit=cfg.max_log_bytes))
        return self._judge_now(started, result, claimed, row=row, restored=restored,
                               telemetry_after=telemetry_after, lease_lost=lease_lost,
                               kept=kept)

    def _judge_now(self, started: Attempt, result: ProcessResult, claimed: Claimed, *,
                   row: PhaseRow | None, restored: bool, telemetry_after: int | None,
                   lease_lost: bool, kept: str | None = None) -> Attempt:
        """:func:`judge` with the session's settings (no I/O: it may run inside a round
        trip)."""
        cfg = self.config
        return judge(
            started, result, row=row, restored=restored,
            telemetry_before=claimed.telemetry_before, telemetry_after=telemetry_after,
            previous_reason=claimed.ref.last_failure_reason,
            timeout_label=_limit_label(started), secrets=cfg.secrets,
            finished_at=iso(utcnow()), lease_lost=lease_lost, kept=kept,
        )

    def _entry(self, attempt: Attempt, row: PhaseRow | None,
               picked: PhaseRef | None = None) -> Entry:
        """``picked``: the phase as it was claimed (its reason's category is recorded)."""
        return history_entry(attempt, row[1] if row is not None else None,
                             session_id=self._session_id, host=self._host,
                             revision=self._revision,
                             phase_category=None if picked is None else _category(
                                 picked.last_failure_reason))

    # -- after a crash -------------------------------------------------------------------------

    async def reconcile(self, dangling: Dangling) -> Attempt:
        """An attempt that started but never finished: kill what it left, restore its phase,
        record it ``interrupted``.

        Only while the attempt's lease is still its own (nobody swept it or took the run
        over) is the phase this attempt's: then it is restored if left non-final, the
        telemetry rows since the attempt began are its own, and a phase found ``COMPLETE``
        with the worker gone is a success. Otherwise another drainer may have drained the
        run since: the phase is left alone, the telemetry is unknown (null), and the attempt
        is no success."""
        started = dangling.started
        record = started.attempt
        killed = await anyio.to_thread.run_sync(functools.partial(
            proctree.kill_leftovers, record.attempt_id, dangling.pid, dangling.create_time,
            grace=self.config.kill_grace_period))
        if self._store.keeps_history:
            settled = await self._store.history.get(record.attempt_id)
            if settled is not None:
                # Settled (lease released, phase restored if needed, row written) just
                # before drainer stopped, but not journaled: journal it as recorded.
                attempt = settled_attempt(record, settled, tuple(killed))
                self._recorder.attempt_reconciled(attempt)
                return attempt
        phases = self._store.phases
        ours = await self._store.leases.renew(record.run_id, record.attempt_id,
                                              self.config.lease_ttl)
        row = await phases.read(record.run_id, record.phase_id)
        state = row[0] if row is not None else None
        restored = False
        if ours and row is not None and not is_final_state(state):
            why = "drainer: attempt interrupted (drainer stopped while it ran); restored"
            if await phases.restore_failed(record.run_id, record.phase_id, why):
                restored, state = True, PhaseState.FAILED.value
        before = started.telemetry_before if ours else None
        after = await phases.telemetry_count(record.run_id, record.phase_id) if ours else None
        success = ours and state == PhaseState.COMPLETE and not killed
        line = await anyio.to_thread.run_sync(_last_error_line, record.subprocess_stderr_path,
                                              record.subprocess_stdout_path)
        finished_at = iso(utcnow())
        attempt = dataclasses.replace(
            record,
            interrupted=True,
            final_state=state,
            success=success,
            state_restored=restored,
            leaked_processes=tuple(killed),
            finished_at=finished_at,
            timestamp=finished_at,
            telemetry_events_collected=None if before is None or after is None else max(
                0, after - before),
            worker_error=line or None,
            error_message=None if success else " | ".join(p for p in (
                f"drainer: interrupted: drainer stopped while this attempt ran "
                f"({len(killed)} leftover process(es) killed); phase now {state}", line,
                f"(log: {record.subprocess_stderr_path})") if p),
        )
        if self._store.keeps_history:
            await self._store.leases.finish(record.run_id, record.phase_id, record.attempt_id,
                                            restore=None, entry=self._entry(attempt, row))
        else:
            await self._store.leases.release(record.run_id, record.attempt_id)
        self._recorder.attempt_reconciled(attempt)
        return attempt


def _clean(result: ProcessResult) -> bool:
    """The worker exited 0 by itself (its phase may still be on its way to a final state)."""
    return result.returncode == 0 and not result.timed_out and not result.cancelled


def _category(reason: str | None) -> str:
    """The name of a reason's priority category (:func:`failure_category`)."""
    return CATEGORY_NAMES[failure_category(reason)]


def _limit_label(started: Attempt) -> str:
    """How messages name an attempt's time limit."""
    return "none" if started.timeout_seconds is None else f"{started.timeout_seconds:g}s"


def history_entry(attempt: Attempt, reason: str | None, *, session_id: str, host: str,
                  revision: str | None, phase_category: str | None = None) -> Entry:
    """An attempt as the history keeps it (pure). ``reason``: its phase's
    ``last_failure_reason`` after it, which names the failure's category;
    ``phase_category``: the category of the reason it was picked with."""
    category = None
    if not attempt.success and not attempt.interrupted:
        if attempt.timed_out:
            category = CATEGORY_NAMES[CATEGORY_TIMEOUT]
        else:
            found = failure_category(reason)
            if found in (CATEGORY_NONE, CATEGORY_OTHER) and attempt.worker_error:
                found = failure_category(attempt.worker_error) or found
            category = CATEGORY_NAMES[found]
    return Entry(
        attempt_id=attempt.attempt_id, session_id=session_id, host=host,
        run_id=attempt.run_id, phase_id=attempt.phase_id,
        attempt_number=attempt.attempt_number,
        duration_seconds=round(attempt.subprocess_duration_seconds, 3),
        outcome=attempt.outcome, final_state=attempt.final_state,
        fingerprint=attempt.failure_fingerprint,
        failure_category=category, telemetry_events=attempt.telemetry_events_collected,
        exit_status=attempt.subprocess_returncode, revision=revision,
        phase_category=phase_category, timeout_seconds=attempt.timeout_seconds)


def settled_attempt(record: Attempt, row: HistoryRow,
                    killed: tuple[LeakedProcess, ...] = ()) -> Attempt:
    """A started attempt found settled in the history but never journaled as finished (a
    crash in between), as its history row says it ended (pure)."""
    finished_at = iso(datetime.fromtimestamp(row.finished_at, UTC))
    success = row.outcome == "ok"
    return dataclasses.replace(
        record, final_state=row.final_state, success=success,
        timed_out=row.outcome == "timed out", cancelled=row.outcome == "cancelled",
        failure_fingerprint=row.fingerprint, subprocess_returncode=row.exit_status,
        subprocess_duration_seconds=row.duration_seconds,
        telemetry_events_collected=row.telemetry_events, finished_at=finished_at,
        timestamp=finished_at, leaked_processes=killed,
        error_message=None if success else (
            f"drainer: {row.outcome}, phase {row.final_state}; settled just before drainer "
            f"stopped, so this record comes from the attempt history (drainer_attempts) | "
            f"(log: {record.subprocess_stderr_path})"))


def _last_error_line(*logs: str | None) -> str:
    """The worker's last error line in the end of its logs (stderr first); "" if none."""
    for log in logs:
        if not log:
            continue
        try:
            with open(log, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
                line = worker_error_line(fh.read().decode("utf-8", "replace"))
        except OSError:
            continue
        if line:
            return line
    return ""
