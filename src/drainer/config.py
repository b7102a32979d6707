"""The frozen, validated configuration of one drain session, and its options' one declaration.

Each field of :class:`DrainConfig` that an operator can set carries an :class:`Option` in its
metadata: the flag, the help text, its group, how a text value converts and what range it
takes. That one declaration drives the argument parser, the ``DRAINER_*`` environment, the
config-file keys, ``drainer config`` and the ``--help`` text; the default is the field's own.
Durations are float seconds inside the code whatever unit the flag uses.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import UsageError
from .models import FAILURE_SHARE_MIN_ATTEMPTS, FailureLimit
from .schema import Schema
from .timeouts import DEFAULT_LIMIT, TimeoutSetting

if TYPE_CHECKING:
    from .dburl import DatabaseURL

DEFAULT_COMMAND = (
    "{python} scripts/drain_one_phase.py --run-id {run_id} --phase-id {phase_id} --force"
)
PLACEHOLDERS = (
    "run_id",
    "phase_id",
    "phase_index",
    "attempt_id",
    "session_id",
    "python",
    "workspace",
)
API_PLACEHOLDERS = ("port", "python", "workspace")
MAX_LANES = 256
DEFAULT_TELEMETRY_TABLES = ("token_estimation_v2_events", "token_budget_escalation_events")
DEFAULT_SESSION_DIR = Path(".drainer/sessions")
MIB = 1024 * 1024
LEAK_POLICIES = ("kill", "report")
LANE_WORKSPACES = ("none", "git-worktree")
ATTEMPTS_SCOPES = ("session", "history")
REVISION_PLACEHOLDERS = ("workspace", "python")

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- command templates -------------------------------------------------------------------


def split_command(
    command: str | Sequence[str],
    *,
    allowed: tuple[str, ...] = PLACEHOLDERS,
    option: str = "--command",
) -> tuple[str, ...]:
    """Split a command template (string via ``shlex``, or a list) into argv tokens."""
    if isinstance(command, str):
        try:
            tokens = shlex.split(command)
        except ValueError as exc:
            raise UsageError(f"cannot parse {option} {command!r}: {exc}") from exc
    else:
        tokens = [str(t) for t in command]
    if not tokens:
        raise UsageError(f"{option} is empty; give a command template")
    for token in tokens:
        for match in _TOKEN.finditer(token):
            name = match.group(1)
            if name is not None and name not in allowed:
                known = ", ".join("{" + p + "}" for p in allowed)
                raise UsageError(
                    f"unknown placeholder {{{name}}} in {option}; known placeholders: {known}"
                )
        if any(c in _TOKEN.sub("", token) for c in "{}"):
            raise UsageError(f"unbalanced brace in {option} argument {token!r}; write {{{{ or "
                             f"}}}} for a literal brace")
    return tuple(tokens)


def render_command(tokens: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Substitute placeholders inside each token. Values are data: never re-parsed or split."""

    def sub(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "{{":
            return "{"
        if whole == "}}":
            return "}"
        return values[match.group(1)]

    return [_TOKEN.sub(sub, token) for token in tokens]


#: Linux's limit on one argv or environment string (MAX_ARG_STRLEN), its NUL included
MAX_ARG_BYTES = 128 * 1024


def command_too_long(
    tokens: Sequence[str], values: Mapping[str, str]
) -> Callable[[str, str], bool]:
    """For a command template and every placeholder's value but the ids (``values``): a test
    of whether a phase's ``(run_id, phase_id)`` would make some rendered token longer than
    the kernel passes. Cheap per phase: each token's fixed size is measured once."""
    run_mark, phase_mark = "\ue000", "\ue001"  # private-use: 3 bytes each in UTF-8
    shapes = []
    for token in render_command(tokens, {**values, "run_id": run_mark, "phase_id": phase_mark}):
        runs, phases = token.count(run_mark), token.count(phase_mark)
        if runs or phases:
            shapes.append((len(token.encode("utf-8", "replace")) - 3 * (runs + phases) + 1,
                           runs, phases))

    def too_long(run_id: str, phase_id: str) -> bool:
        for fixed, runs, phases in shapes:
            if fixed + 4 * (runs * len(run_id) + phases * len(phase_id)) <= MAX_ARG_BYTES:
                continue  # at most 4 bytes a character: fits for sure
            size = (fixed + runs * len(run_id.encode("utf-8", "replace"))
                    + phases * len(phase_id.encode("utf-8", "replace")))
            if size > MAX_ARG_BYTES:
                return True
        return False

    return too_long


def parse_env_pairs(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``KEY=VALUE`` strings from ``--env``."""
    out: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise UsageError(f"--env expects KEY=VALUE with a plain variable name, got {pair!r}")
        out.append((key, value))
    return tuple(out)


# -- option declarations -----------------------------------------------------------------

VALUE, SWITCH, LIST, TEMPLATE = "value", "switch", "list", "template"


@dataclass(frozen=True, slots=True)
class Option:
    """How an operator sets one config field: flag, help, group, conversion, range.

    ``parse`` turns one text value (command line, environment, file) into the field's value;
    ``scale`` converts the flag's unit to the field's (minutes to seconds); ``check`` raises
    on a value out of range, naming the flag.
    """

    flag: str
    help: str
    group: str
    metavar: str | None = None
    kind: str = VALUE
    parse: Callable[[str], Any] = str
    scale: float = 1.0
    check: Callable[[str, Any], None] | None = None
    negative: str | None = None  #: the --no-... flag of a switch
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  #: how --help shows the default (None: the value)
    resumed: bool = True  #: on --resume, kept from the session unless given again
    relative_to_file: bool = False  #: a relative path in a config file is relative to it
    #: a one-off for one command: read from the command line only, never from the
    #: environment or a config file
    command_line_only: bool = False

    @property
    def env_name(self) -> str:
        return "DRAINER_" + self.flag.lstrip("-").replace("-", "_").upper()

    @property
    def key(self) -> str:
        """The config-file key and argparse dest: the flag with underscores."""
        return self.flag.lstrip("-").replace("-", "_")

    def convert(self, raw: Any, where: str) -> Any:
        """A command-line, environment or file value as the field's value."""
        if self.kind == SWITCH:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise UsageError(f"{where}: {self.flag} takes true or false, got {raw!r}")
        if self.kind == LIST:
            return self._convert_list(raw, where)
        if self.kind == TEMPLATE and isinstance(raw, list):
            if not all(isinstance(v, str) for v in raw):
                raise UsageError(f"{where}: {self.flag} takes a string or a list of strings")
            return tuple(raw)  # an argv list: kept token for token
        if isinstance(raw, bool | list | dict):
            raise UsageError(f"{where}: {self.flag} takes one value, got {raw!r}")
        if self.parse is int and isinstance(raw, float):
            raise UsageError(f"{where}: {self.flag} takes a whole number, got {raw!r}")
        try:
            value = self.parse(str(raw))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: {self.flag} got an invalid value {raw!r}") from exc
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{where}: {self.flag} must be one of {', '.join(self.choices)}")
        return value * self.scale if self.scale != 1.0 else value

    def _convert_list(self, raw: Any, where: str) -> Any:
        if isinstance(raw, dict):  # [env] KEY = "VALUE" in a file
            raw = [f"{k}={v}" for k, v in raw.items()]
        elif isinstance(raw, str) and where == "env DRAINER_ENV":
            raw = [p for p in raw.split(";") if p]  # KEY=VALUE;KEY=VALUE (values may hold ,)
        elif isinstance(raw, str) and where.startswith("env "):
            raw = [p for p in raw.split(",") if p]
        elif isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
            raise UsageError(f"{where}: {self.flag} takes a list of strings, got {raw!r}")
        return self.parse(list(raw)) if self.parse is not str else tuple(raw)  # type: ignore[arg-type]

    def shown(self, value: Any) -> Any:
        """A field value in the flag's unit (for ``drainer config`` and ``--help``)."""
        if self.scale != 1.0 and isinstance(value, int | float):
            return value / self.scale
        return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, flag: str, help: str, group: str, **kw: Any) -> Any:
    """A dataclass field with its :class:`Option` (the one declaration of an option)."""
    return field(default=default, metadata={"option": Option(flag, help, group, **kw)})


def _whole(minimum: int, *, maximum: int | None = None) -> Callable[[str, Any], None]:
    def check(flag: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            at_least = "of at least 1" if minimum == 1 else "of zero or more"
            raise UsageError(f"{flag} must be a whole number {at_least}, got {value!r}")
        if maximum is not None and value > maximum:
            raise UsageError(f"{flag} must be at most {maximum}, got {value}")

    return check


def _timeout_value(text: str) -> float | str:
    """``--phase-timeout-seconds`` as given: seconds, or ``auto[:F]`` (checked later)."""
    try:
        return float(text)
    except ValueError:
        return text.strip().lower()


def _seconds(*, positive: bool) -> Callable[[str, Any], None]:
    def check(flag: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        if positive and not value > 0:
            raise UsageError(f"{flag} must be a positive number, got {value:g}")
        if not positive and not value >= 0:
            raise UsageError(f"{flag} must be zero or more, got {value:g}")
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")

    return check


def _non_empty(flag: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{flag} must not be empty")


BACKLOG, WORKER, STOPS, SESSION = "backlog", "worker", "stop conditions", "session"
HISTORY = "attempt history"


@dataclass(frozen=True, kw_only=True)
class DrainConfig:
    """Everything one drain session needs. Durations are float seconds; ``None`` = no limit.

    Option names follow Autopack's ``batch_drain_controller.py`` (``--batch-size`` ->
    ``batch_size``, ``--phase-timeout-seconds`` -> ``phase_timeout``,
    ``--max-total-minutes`` -> ``session_timeout`` in seconds).
    """

    database_url: str = option(
        None, "--database-url", "backlog database (default: $DATABASE_URL; required), e.g. "
        "sqlite:///autopack.db or postgresql://user:pass@host/db", BACKLOG, metavar="URL",
        resumed=False, relative_to_file=True)
    run_id: str | None = option(None, "--run-id", "drain only this run", BACKLOG, metavar="ID")
    skip_run_prefixes: tuple[str, ...] = option(
        (), "--skip-run-prefix", "skip runs whose id starts with PREFIX (repeatable)", BACKLOG,
        metavar="PREFIX", kind=LIST)
    prefer_runs: tuple[str, ...] = option(
        (), "--prefer-run", "drain this run before every other, in the order given "
        "(repeatable)", BACKLOG, metavar="RUN", kind=LIST)
    prefer_run_prefixes: tuple[str, ...] = option(
        (), "--prefer-run-prefix", "drain runs whose id starts with PREFIX before the others, "
        "after the --prefer-run ones (repeatable)", BACKLOG, metavar="PREFIX", kind=LIST)
    priority_file: Path | None = option(
        None, "--priority-file", "a file of run ids (or PREFIX*), one per line, drained "
        "before the others in that order, after --prefer-run and --prefer-run-prefix; # "
        "starts a comment", BACKLOG, metavar="FILE", parse=Path, relative_to_file=True)
    skip_runs_with_queued: bool = option(
        True, "--skip-runs-with-queued", "leave QUEUED phases alone (default); their runs' "
        "FAILED phases drain; --no-skip-runs-with-queued drains them too", BACKLOG,
        kind=SWITCH, negative="--no-skip-runs-with-queued")
    restore_stale_after: float | None = option(
        None, "--restore-stale-after", "before picking, restore to FAILED the phases left "
        "QUEUED, EXECUTING, GATE or CI_RUNNING for more than M minutes (by updated_at and the "
        "database's clock) whose run no drainer leases (default: off)", BACKLOG, metavar="M",
        parse=float, scale=60.0, check=_seconds(positive=True))
    allow_empty_db: bool = option(
        False, "--allow-empty-db", "run even if the database has no phases at all", BACKLOG,
        kind=SWITCH)

    command: str | Sequence[str] = option(
        DEFAULT_COMMAND, "--command", "worker command template, split like a shell would but "
        "never run by one; placeholders {run_id} {phase_id} {phase_index} {attempt_id} "
        "{session_id} {python} {workspace} (default: %(default)s)", WORKER,
        metavar="TEMPLATE", kind=TEMPLATE)
    workspace: Path = option(
        Path("."), "--workspace", "directory the worker runs in (default: current directory)",
        WORKER, metavar="DIR", parse=Path, relative_to_file=True)
    lane_workspaces: str = option(
        "none", "--lane-workspaces", "give each lane its own workspace: 'git-worktree' (a git "
        "worktree of --workspace per lane, made before the first attempt, removed at the end) "
        "or 'none' (default: %(default)s)", WORKER, choices=LANE_WORKSPACES)
    env: tuple[tuple[str, str], ...] = option(
        (), "--env", "extra environment variable for workers (repeatable)", WORKER,
        metavar="KEY=VALUE", kind=LIST, parse=parse_env_pairs)
    api_url: str | None = option(
        None, "--api-url", "Autopack API server handed to workers as AUTOPACK_API_URL",
        WORKER, metavar="URL")
    api_command: str | Sequence[str] | None = option(
        None, "--api-command", "start one API server for all workers, e.g. "
        "'uvicorn autopack.main:app --port {port}'; stopped at the end", WORKER,
        metavar="TEMPLATE", kind=TEMPLATE)
    phase_timeout: float | str | None = option(
        DEFAULT_LIMIT, "--phase-timeout-seconds", "kill an attempt's whole process tree after "
        "S seconds; 'auto' or 'auto:F': F (default 2) times the 95th percentile of the "
        "durations of attempts like it in the attempt history, from 5 of them on "
        "(default: %(default)s)", WORKER, metavar="S|auto[:F]", parse=_timeout_value,
        check=TimeoutSetting.check)
    min_phase_timeout: float = option(
        60.0, "--min-phase-timeout-seconds", "an adaptive limit is at least S seconds "
        "(default: %(default)s)", WORKER, metavar="S", parse=float,
        check=_seconds(positive=True))
    max_phase_timeout: float = option(
        3600.0, "--max-phase-timeout-seconds", "an adaptive limit, and a retry's doubled one, "
        "is at most S seconds (default: %(default)s)", WORKER, metavar="S", parse=float,
        check=_seconds(positive=True))
    kill_grace_period: float = option(
        5.0, "--kill-grace-seconds", "between SIGTERM and SIGKILL when killing a tree "
        "(default: %(default)s)", WORKER, metavar="S", parse=float,
        check=_seconds(positive=False))
    max_log_bytes: int = option(
        64 * MIB, "--max-log-bytes", "cap of each per-attempt log file (default: 64 MiB)",
        WORKER, metavar="N", parse=int, check=_whole(1))
    leak_policy: str = option(
        "kill", "--leak-policy", "what to do with processes an attempt leaves behind "
        "(default: %(default)s)", WORKER, choices=LEAK_POLICIES)
    leak_pattern: str = option(
        "uvicorn", "--leak-pattern", "command lines counted as leaks when they outlive their "
        "attempt (default: %(default)s)", WORKER, metavar="REGEX")

    batch_size: int = option(
        10, "--batch-size", "attempts in this session (default: %(default)s)", STOPS,
        metavar="N", parse=int, check=_whole(1))
    session_timeout: float | None = option(
        None, "--max-total-minutes", "stop picking after M minutes (fractions allowed; "
        "default: no limit)", STOPS, metavar="M", parse=float, scale=60.0,
        check=_seconds(positive=True))
    stop_grace_period: float = option(
        60.0, "--stop-grace-seconds", "how long in-flight attempts may finish after a stop "
        "(default: %(default)s)", STOPS, metavar="S", parse=float,
        check=_seconds(positive=False))
    max_timeouts_per_run: int | None = option(
        2, "--max-timeouts-per-run", "stop draining a run after N timeouts "
        "(default: %(default)s)", STOPS, metavar="N", parse=int, check=_whole(1))
    max_attempts_per_phase: int = option(
        2, "--max-attempts-per-phase", "attempts per phase in a session "
        "(default: %(default)s)", STOPS, metavar="N", parse=int, check=_whole(1))
    retry_backoff: float = option(
        30.0, "--retry-backoff-seconds", "a phase whose attempt timed out, was killed by a "
        "signal, lost its lease or met a database error is retried in this session only "
        "after S seconds, doubled for each attempt of it (at most 15 minutes, or S); other "
        "work goes on meanwhile; 0: at once (default: %(default)s)", STOPS, metavar="S",
        parse=float, check=_seconds(positive=False))
    max_fingerprint_repeats: int | None = option(
        3, "--max-fingerprint-repeats", "stop a run once its failure fingerprint was seen N "
        "times (default: %(default)s)", STOPS, metavar="N", parse=int, check=_whole(1))
    max_consecutive_zero_yield: int | None = option(
        None, "--max-consecutive-zero-yield", "stop after N attempts in a row with no "
        "telemetry (default: off)", STOPS, metavar="N", parse=int, check=_whole(1))
    halt_on_failures: int | str | None = option(
        None, "--halt-on-failures", "stop picking after N failed attempts, or once more than "
        f"N% of them failed (after {FAILURE_SHARE_MIN_ATTEMPTS} attempts; default: off)",
        STOPS, metavar="N|N%", check=FailureLimit.check)
    unstop: tuple[str, ...] = option(
        (), "--unstop", "with --resume: lift the stop a stop rule put on RUN in the resumed "
        "session, so that it drains again (repeatable; command line only)", STOPS,
        metavar="RUN", kind=LIST, resumed=False, command_line_only=True)
    max_leaks: int | None = option(
        None, "--max-leaks", "stop the session when more than N processes have leaked "
        "(default: off)", STOPS, metavar="N", parse=int, check=_whole(0))

    history: bool = option(
        True, "--history", "record every finished attempt in the backlog's drainer_attempts "
        "table, shared by every drainer and session (default); --no-history: record "
        "nothing there", HISTORY, kind=SWITCH, negative="--no-history")
    attempts_scope: str = option(
        "session", "--attempts-scope", "what --max-attempts-per-phase counts: this "
        "session's attempts (Autopack's way), or every attempt in the history, across "
        "sessions and drainers (default: %(default)s)", HISTORY, choices=ATTEMPTS_SCOPES)
    skip_unchanged: bool = option(
        False, "--skip-unchanged", "skip a phase whose last attempt failed deterministically "
        "(its fingerprint seen twice, or a collection/import error) at the workspace's "
        "current revision; a new commit makes it eligible again", HISTORY, kind=SWITCH)
    revision_command: str | Sequence[str] | None = option(
        None, "--revision-command", "print the workspace's revision with this command "
        "instead of git (run in the workspace, never by a shell; placeholders {workspace} "
        "{python})", HISTORY, metavar="TEMPLATE", kind=TEMPLATE)

    session_dir: Path = option(
        DEFAULT_SESSION_DIR, "--session-dir", "where sessions are saved (default: "
        "%(default)s; Autopack users: .autonomous_runs/batch_drain_sessions)", SESSION,
        metavar="DIR", parse=Path, resumed=False, relative_to_file=True)
    lanes: int = option(
        1, "--lanes", "attempts at once, never two of one run (default: %(default)s)", SESSION,
        metavar="N", parse=int, check=_whole(1, maximum=MAX_LANES))
    lease_ttl: float = option(
        60.0, "--lease-ttl-seconds", "a run's lease expires S seconds after its last "
        "heartbeat (default: %(default)s)", SESSION, metavar="S", parse=float,
        check=_seconds(positive=True))
    host_name: str | None = option(
        None, "--host-name", "the host name drainer records in its leases and session files; "
        "a drainer kills the attempts of expired leases only when they name its own host "
        "(default: this machine's name)", SESSION, metavar="NAME", resumed=False,
        check=_non_empty)

    # Not operator options: set by the CLI or an embedding application.
    resume: str | None = None  #: "latest" or a session id
    telemetry_tables: tuple[str, ...] = DEFAULT_TELEMETRY_TABLES
    schema: Schema = field(default_factory=Schema)  #: table/column/state names
    python: str = sys.executable
    final_state_wait: float = 2.0

    def __post_init__(self) -> None:
        if self.database_url is None:
            raise UsageError(
                "no database given: pass --database-url URL or set DATABASE_URL "
                "(drainer never falls back to a default database)"
            )
        setattr_ = object.__setattr__
        setattr_(self, "command", split_command(self.command))
        setattr_(self, "workspace", Path(self.workspace))
        setattr_(self, "session_dir", Path(self.session_dir))
        setattr_(self, "skip_run_prefixes", tuple(self.skip_run_prefixes))
        if "" in self.skip_run_prefixes:
            raise UsageError("--skip-run-prefix is empty: it would skip every run")
        setattr_(self, "prefer_runs", tuple(self.prefer_runs))
        setattr_(self, "prefer_run_prefixes", tuple(self.prefer_run_prefixes))
        if "" in self.prefer_runs or "" in self.prefer_run_prefixes:
            raise UsageError("--prefer-run and --prefer-run-prefix take a non-empty run id or "
                             "prefix")
        if self.priority_file is not None:
            setattr_(self, "priority_file", Path(self.priority_file))
        setattr_(self, "unstop", tuple(self.unstop))
        if self.unstop and self.resume is None:
            raise UsageError("--unstop lifts a stop of a resumed session: give --resume too")
        setattr_(self, "telemetry_tables", tuple(self.telemetry_tables))
        for name, opt in OPTIONS.items():
            value = getattr(self, name)
            if opt.check is not None and value is not None:
                opt.check(opt.flag, opt.shown(value))  # in the flag's unit
        _seconds(positive=False)("final_state_wait", self.final_state_wait)
        if self.api_url is not None:
            setattr_(self, "api_url", normalize_api_url(self.api_url))
        try:
            re.compile(self.leak_pattern)
        except re.error as exc:
            raise UsageError(
                f"--leak-pattern {self.leak_pattern!r} is not a valid regex: {exc}"
            ) from exc
        if self.api_command is not None:
            if self.api_url is not None:
                raise UsageError("give --api-url or --api-command, not both")
            tokens = split_command(self.api_command, allowed=API_PLACEHOLDERS,
                                   option="--api-command")
            if not any("{port}" in t for t in tokens):
                raise UsageError("--api-command needs a {port} placeholder for the free port")
            setattr_(self, "api_command", tokens)
        if self.min_phase_timeout > self.max_phase_timeout:
            raise UsageError(f"--min-phase-timeout-seconds ({self.min_phase_timeout:g}) is "
                             f"above --max-phase-timeout-seconds ({self.max_phase_timeout:g})")
        if isinstance(self.phase_timeout, str):  # "auto", "AUTO:2": one spelling
            setattr_(self, "phase_timeout", self.timeout_setting.label)
        if self.timeout_setting.factor is not None and not self.history:
            raise UsageError("--phase-timeout-seconds auto learns from the attempt history, "
                             "which --no-history turns off; drop one or the other")
        if self.revision_command is not None:
            setattr_(self, "revision_command", split_command(
                self.revision_command, allowed=REVISION_PLACEHOLDERS,
                option="--revision-command"))
        if self.attempts_scope not in ATTEMPTS_SCOPES:
            raise UsageError(f"--attempts-scope must be one of {', '.join(ATTEMPTS_SCOPES)}")
        if not self.history:
            needs = [flag for flag, on in (
                ("--attempts-scope history", self.attempts_scope == "history"),
                ("--skip-unchanged", self.skip_unchanged)) if on]
            if needs:
                raise UsageError(f"{' and '.join(needs)} read the attempt history, which "
                                 "--no-history turns off; drop one or the other")
        if self.lane_workspaces not in LANE_WORKSPACES:
            raise UsageError(f"--lane-workspaces must be one of {', '.join(LANE_WORKSPACES)}")
        if self.leak_policy not in LEAK_POLICIES:
            raise UsageError(f"--leak-policy must be one of {', '.join(LEAK_POLICIES)}")
        if self.run_id is not None and not self.run_id:
            raise UsageError("--run-id is empty")
        for key, _ in self.env:
            if not _ENV_KEY.match(key):
                raise UsageError(f"--env key {key!r} is not a plain variable name")
        for table in self.telemetry_tables:
            if not table:
                raise UsageError("telemetry table names must not be empty")
        _ = self.db  # validates the URL now, not at first use

    @property
    def command_tokens(self) -> tuple[str, ...]:
        """The command template as argv tokens (normalised at construction)."""
        assert isinstance(self.command, tuple)
        return self.command

    @property
    def api_command_tokens(self) -> tuple[str, ...]:
        assert isinstance(self.api_command, tuple)
        return self.api_command

    @cached_property
    def db(self) -> DatabaseURL:
        """The parsed database URL (validated at construction). SQLAlchemy is imported here,
        not with the options, so ``--help`` and ``drainer config`` start fast."""
        from .dburl import parse_database_url

        return parse_database_url(self.database_url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in output or files drainer writes."""
        found = [self.db.password] if self.db.password else []
        if self.api_url is not None:
            with contextlib.suppress(ValueError):
                if urlsplit(self.api_url).password:
                    found.append(str(urlsplit(self.api_url).password))
        found += [value for key, value in self.env if _looks_secret(key) and value]
        return tuple(found)

    def drains_run(self, run_id: str) -> bool:
        """Whether this session may drain ``run_id`` (``--run-id``, ``--skip-run-prefix``)."""
        if self.run_id is not None and run_id != self.run_id:
            return False
        return not run_id.startswith(self.skip_run_prefixes) if self.skip_run_prefixes \
            else True

    def ids_too_long(self) -> Callable[[str, str], bool]:
        """Whether a phase's ids would make the worker's command line longer than the kernel
        passes, every other placeholder at its longest (a lane's worktree path included)."""
        longest = {"phase_index": "9" * 20, "attempt_id": "0" * 36, "session_id": "x" * 64,
                   "python": self.python, "workspace": "x" * (len(str(self.workspace)) + 512)}
        return command_too_long(self.command_tokens, longest)

    @property
    def timeout_setting(self) -> TimeoutSetting:
        """``--phase-timeout-seconds``: fixed seconds, or adaptive (``auto[:F]``)."""
        return TimeoutSetting.parse(self.phase_timeout)

    @property
    def phase_timeout_label(self) -> str:
        return self.timeout_setting.label

    def to_json(self) -> dict[str, Any]:
        """The options as written into session files (keys: field names); secrets redacted."""
        out: dict[str, Any] = {}
        for name in OPTIONS:
            out[name] = _jsonable(getattr(self, name))
        out["database_url"] = self.db.redacted
        out["api_url"] = strip_userinfo(self.api_url) if self.api_url else None
        out["env"] = {k: "***" if _looks_secret(k) else v for k, v in self.env}
        out["telemetry_tables"] = list(self.telemetry_tables)
        out["schema"] = self.schema.to_json()
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _option_fields() -> dict[str, Option]:
    return {f.name: f.metadata["option"] for f in fields(DrainConfig) if "option" in f.metadata}


#: field name -> its Option, in declaration order (the --help order within a group).
OPTIONS: dict[str, Option] = _option_fields()
#: config-file key / flag name (underscores) -> field name.
FIELD_OF_KEY: dict[str, str] = {opt.key: name for name, opt in OPTIONS.items()}


def default_of(name: str) -> Any:
    """The default of a DrainConfig field (the one place defaults are written)."""
    f: Field[Any] = DrainConfig.__dataclass_fields__[name]
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING
    return f.default_factory()


def saved_value(name: str, value: Any) -> Any:
    """A value from a session's saved config, as the field takes it (on --resume)."""
    if name == "env":
        pairs = tuple((str(k), str(v)) for k, v in dict(value).items())
        hidden = [k for k, v in pairs if v == "***"]
        if hidden:
            raise UsageError(
                f"the session's --env {hidden[0]} was redacted when saved; give --env again"
            )
        return pairs
    return tuple(value) if isinstance(value, list) else value


def normalize_api_url(url: str) -> str:
    """``scheme://host:port`` (userinfo kept, the default port made explicit): Autopack's
    worker reads the port as the text after the URL's last colon, so a trailing slash, a
    path or a missing port would crash every worker. A path, query or fragment is refused."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises on a bad port
    except ValueError as exc:
        raise UsageError(f"--api-url {strip_userinfo(url)!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--api-url must be an http(s) URL, got {strip_userinfo(url)!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise UsageError(
            f"--api-url {strip_userinfo(url)!r} has a path; give the server's root as "
            "scheme://host:port (workers add their own paths)")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = parts.netloc.rsplit("@", 1)[-1]
    if parts.port is None:
        host = f"{host.rstrip(':')}:{port}"  # an empty port (``http://h:``) too
    userinfo = parts.netloc[: -len(parts.netloc.rsplit("@", 1)[-1])]
    return f"{parts.scheme}://{userinfo}{host}"


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (for messages and files)."""
    scheme, sep, rest = url.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}{sep}{host}" if sep else url


def _looks_secret(key: str) -> bool:
    upper = key.upper()
    return any(word in upper for word in ("PASSWORD", "SECRET", "TOKEN", "KEY"))
