"""The frozen, validated configuration of one drain session.

``DrainConfig`` is built once (by the CLI or by an embedding application) and never changes.
Every check that can be made without touching the database is made here, so a bad option
fails before drainer writes anything.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .dburl import DatabaseURL, parse_database_url
from .errors import UsageError
from .schema import Schema

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

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def parse_env_pairs(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``KEY=VALUE`` strings from ``--env``."""
    out: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise UsageError(f"--env expects KEY=VALUE with a plain variable name, got {pair!r}")
        out.append((key, value))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class DrainConfig:
    """Everything one drain session needs. Durations are float seconds; ``None`` = no limit.

    Option names follow Autopack's ``batch_drain_controller.py`` (``--batch-size`` ->
    ``batch_size``, ``--phase-timeout-seconds`` -> ``phase_timeout``...).
    """

    database_url: str
    command: str | Sequence[str] = DEFAULT_COMMAND  #: template: a string (shlex) or argv list
    workspace: Path = Path(".")
    session_dir: Path = DEFAULT_SESSION_DIR
    batch_size: int = 10
    run_id: str | None = None
    skip_run_prefixes: tuple[str, ...] = ()
    skip_runs_with_queued: bool = True
    api_url: str | None = None
    phase_timeout: float | None = 900.0
    max_total_minutes: float | None = None
    max_timeouts_per_run: int | None = 2
    max_attempts_per_phase: int = 2
    max_fingerprint_repeats: int | None = 3
    max_consecutive_zero_yield: int | None = None
    allow_empty_db: bool = False
    env: tuple[tuple[str, str], ...] = ()
    max_log_bytes: int = 64 * MIB
    kill_grace_period: float = 5.0
    stop_grace_period: float = 60.0
    lanes: int = 1
    lease_ttl: float = 60.0  #: --lease-ttl-seconds; a lease not renewed for this long expires
    api_command: str | Sequence[str] | None = None  #: template with {port}; one shared server
    leak_pattern: str = "uvicorn"  #: regex of process command lines counted as leaks
    max_leaks: int | None = None
    leak_policy: str = "kill"
    resume: str | None = None
    telemetry_tables: tuple[str, ...] = DEFAULT_TELEMETRY_TABLES
    schema: Schema = field(default_factory=Schema)  #: table/column/state names
    python: str = sys.executable
    final_state_wait: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", split_command(self.command))
        object.__setattr__(self, "workspace", Path(self.workspace))
        object.__setattr__(self, "session_dir", Path(self.session_dir))
        object.__setattr__(self, "skip_run_prefixes", tuple(self.skip_run_prefixes))
        object.__setattr__(self, "telemetry_tables", tuple(self.telemetry_tables))
        self._check_positive("batch_size", "--batch-size", self.batch_size)
        self._check_positive("lanes", "--lanes", self.lanes)
        self._check_positive("max_attempts_per_phase", "--max-attempts-per-phase",
                             self.max_attempts_per_phase)
        self._check_positive("max_log_bytes", "--max-log-bytes", self.max_log_bytes)
        for name, flag in (
            ("max_timeouts_per_run", "--max-timeouts-per-run"),
            ("max_fingerprint_repeats", "--max-fingerprint-repeats"),
            ("max_consecutive_zero_yield", "--max-consecutive-zero-yield"),
        ):
            value = getattr(self, name)
            if value is not None:
                self._check_positive(name, flag, value)
        for flag, value in (
            ("--phase-timeout-seconds", self.phase_timeout),
            ("--max-total-minutes", self.max_total_minutes),
        ):
            if value is not None and not value > 0:
                raise UsageError(f"{flag} must be a positive number, got {value}")
        for flag, value in (
            ("--kill-grace-seconds", self.kill_grace_period),
            ("--stop-grace-seconds", self.stop_grace_period),
            ("final_state_wait", self.final_state_wait),
        ):
            if not value >= 0:
                raise UsageError(f"{flag} must be zero or more, got {value}")
        for flag, value in (
            ("--phase-timeout-seconds", self.phase_timeout),
            ("--max-total-minutes", self.max_total_minutes),
            ("--kill-grace-seconds", self.kill_grace_period),
            ("--stop-grace-seconds", self.stop_grace_period),
            ("--lease-ttl-seconds", self.lease_ttl),
        ):
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{flag} must be a finite number, got {value}")
        if self.api_url is not None:
            _check_http_url(self.api_url)
        if self.lanes > MAX_LANES:
            raise UsageError(f"--lanes must be at most {MAX_LANES}, got {self.lanes}")
        if not self.lease_ttl > 0:
            raise UsageError(f"--lease-ttl-seconds must be a positive number, got {self.lease_ttl}")
        if self.max_leaks is not None and (isinstance(self.max_leaks, bool) or self.max_leaks < 0):
            raise UsageError(f"--max-leaks must be zero or more, got {self.max_leaks}")
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
            object.__setattr__(self, "api_command", tokens)
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

    @staticmethod
    def _check_positive(name: str, flag: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{flag} must be a whole number of at least 1, got {value!r}")

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
        """The parsed database URL (validated at construction)."""
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

    @property
    def phase_timeout_label(self) -> str:
        return "none" if self.phase_timeout is None else f"{self.phase_timeout:g}s"

    def to_json(self) -> dict[str, Any]:
        """The config as written into session files: the password is redacted."""
        return {
            "database_url": self.db.redacted,
            "command": list(self.command_tokens),
            "workspace": str(self.workspace),
            "session_dir": str(self.session_dir),
            "batch_size": self.batch_size,
            "run_id": self.run_id,
            "skip_run_prefixes": list(self.skip_run_prefixes),
            "skip_runs_with_queued": self.skip_runs_with_queued,
            "api_url": _strip_userinfo(self.api_url) if self.api_url else None,
            "phase_timeout": self.phase_timeout,
            "max_total_minutes": self.max_total_minutes,
            "max_timeouts_per_run": self.max_timeouts_per_run,
            "max_attempts_per_phase": self.max_attempts_per_phase,
            "max_fingerprint_repeats": self.max_fingerprint_repeats,
            "max_consecutive_zero_yield": self.max_consecutive_zero_yield,
            "allow_empty_db": self.allow_empty_db,
            "env": {k: "***" if _looks_secret(k) else v for k, v in self.env},
            "max_log_bytes": self.max_log_bytes,
            "kill_grace_period": self.kill_grace_period,
            "stop_grace_period": self.stop_grace_period,
            "lanes": self.lanes,
            "lease_ttl": self.lease_ttl,
            "api_command": list(self.api_command_tokens) if self.api_command else None,
            "leak_pattern": self.leak_pattern,
            "max_leaks": self.max_leaks,
            "leak_policy": self.leak_policy,
            "telemetry_tables": list(self.telemetry_tables),
            "schema": self.schema.to_json(),
        }


def _check_http_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise UsageError(f"--api-url {_strip_userinfo(url)!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--api-url must be an http(s) URL, got {_strip_userinfo(url)!r}")


def _strip_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}{sep}{host}" if sep else url


def _looks_secret(key: str) -> bool:
    upper = key.upper()
    return any(word in upper for word in ("PASSWORD", "SECRET", "TOKEN", "KEY"))
