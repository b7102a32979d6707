"""Failure fingerprints, zero-yield reasons and LLM-boundary detection (DESIGN.md §5).

Pure functions over strings and numbers: no I/O, stdlib only. A fingerprint is
``STATE|rc-bucket|normalised error`` so that two failures that differ only in volatile details
(timestamps, paths, pids, line numbers, run ids) count as the same failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_I = re.IGNORECASE
# Characters that may appear inside a path; placeholders already substituted (``<date>``) are
# kept inside the path so ``/tmp/run-<date>/x.log`` becomes one ``<path>``.
_PATH_BODY = r"""(?:[^\s"'`()\[\]{},;:<>|*?]|<\w+>)"""
_SOURCE_EXT = (r"(?:py|pyi|pyx|js|jsx|ts|tsx|rb|go|rs|c|h|cc|cpp|hpp|java|kt|sql|sh|json|ya?ml"
               r"|toml|txt|log|cfg|ini|md)")
_HAS_EXTENSION = re.compile(r"\.[a-z]\w*$", _I)


def _relative_path(match: re.Match[str]) -> str:
    # Only ``src/a/b.py``-like paths (last part has an extension), so "and/or" survives.
    return "<path>" if _HAS_EXTENSION.search(match.group(0)) else match.group(0)


def _line_after_file(match: re.Match[str]) -> str:
    return f"{match.group(1)} line <n>"


def _run_id(match: re.Match[str]) -> str:
    parts = match.group(0).split("-")
    if not any(ch.isdigit() for part in parts[1:] for ch in part):
        return match.group(0)  # kebab-case words: no-such-file
    if len(parts) == 2 and parts[1].isdigit() and len(parts[1]) <= 3:
        return match.group(0)  # utf-8, sha-256, phase-12: the number rule makes them word-<n>
    return "<id>"


# (pattern, replacement) applied in order, so that earlier rules are not eaten by later ones.
# Patterns that may fail after a long scan only start at a token start (lookbehind), which keeps
# every rule linear in the input length.
_RULES: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
                r"(?:Z|[+-]\d{2}:?\d{2})?(?![\w:])", _I), "<datetime>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), "<date>"),
    # Not after ':' or '.': ``a.py:12:34`` is a line and column, not a time.
    (re.compile(r"(?<![\w:.])\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?![\w:])"), "<time>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", _I),
     "<uuid>"),
    (re.compile(r"\b0x[0-9a-f]+\b", _I), "<hex>"),
    # Windows: drive paths (C:\x, C:/x) and UNC paths (\\server\share).
    (re.compile(r"(?:(?<![\w>])[a-z]:[\\/]|\\\\[\w.$-]+\\)" + _PATH_BODY + "*", _I), "<path>"),
    # POSIX: /abs, ./rel, ../rel, ~/rel; not inside words or URLs (``scheme://host/x``).
    (re.compile(r"(?<![\w.:/~\\<>])(?:~|\.\.?)?/" + _PATH_BODY + "+"), "<path>"),
    # Relative a/b.py, a\b.py: the whole token or nothing (atomic, must end there), so a second
    # pass, after numbers became <n>, does not find a shorter path inside it.
    (re.compile(r"(?<![\w./:~\\<>-])(?>[\w.-]+(?:[/\\][\w.-]+)+)(?![/\\<])"), _relative_path),
    (re.compile(r"(<path>|(?<![\w-])[\w-]+\." + _SOURCE_EXT + r"):\d+(?::\d+)?\b", _I),
     _line_after_file),
    (re.compile(r"\bline\s+\d+", _I), "line <n>"),
    # drainer/Autopack session ids: <words>-YYYYMMDD-HHMMSS[-suffix].
    (re.compile(r"(?<![\w-])[a-z]+(?:-[a-z]+)*-\d{8}-\d{6}(?:-[0-9a-z]+)?\b", _I), "<session>"),
    (re.compile(r"\b\w+(?:-\w+)+\b"), _run_id),
    # 8+ hex characters with at least one letter and one digit (commit hashes, tokens).
    (re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", _I), "<hex>"),
    (re.compile(r"(?<![\w.<])\d+(?:\.\d+)*"), "<n>"),
)
_SPACE = re.compile(r"\s+")


def normalize_error(text: str) -> str:
    """Replace the volatile parts of an error message with placeholders, lowercase, squash spaces.

    Replaced, in order: ISO datetimes (``<datetime>``) and dates (``<date>``), clock times
    (``<time>``), UUIDs (``<uuid>``), ``0x`` addresses (``<hex>``), Windows, POSIX and relative
    source paths (``<path>``; relative only when the last part has an extension, e.g.
    ``src/a/b.py``), line numbers (``line 42`` and ``file.py:42[:7]`` -> ``line <n>``), session
    ids (``batch-drain-20261121-233856-a1b2`` -> ``<session>``), run ids (``<id>``), hex strings
    of 8+ characters mixing letters and digits (``<hex>``) and bare numbers (``<n>``).

    A run id is a dash-joined token (``build129-run-0007``, ``fileorg-p2-20251208-1234``,
    ``run-0007``) where some part after the first dash contains a digit, except the short
    ``word-N`` form with 1-3 digits (``utf-8``, ``sha-256``), which becomes ``word-<n>``.
    Numbers glued to a word (``python3``, ``abc123``) are kept; a unit suffix is kept
    (``30s`` -> ``<n>s``). Normalising twice gives the same result as normalising once.
    """
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return _SPACE.sub(" ", text.lower()).strip()


def rc_bucket(returncode: int | None, *, timed_out: bool) -> str:
    """Coarse class of an exit: ``timeout``, ``rc0``, ``rc1``, ``signalN`` (e.g. ``signal9``
    for a child killed by SIGKILL) or the literal ``rcN`` for any other code or for a child
    that never started (``None``)."""
    if timed_out:
        return "timeout"
    if returncode is not None and returncode < 0:
        return f"signal{-returncode}"
    if returncode in (0, 1):
        return f"rc{returncode}"
    return "rcN"


def failure_fingerprint(
    final_state: str | None, returncode: int | None, *, timed_out: bool, error: str
) -> str:
    """``STATE|rc-bucket|normalised error`` with the error cut to its first 200 characters."""
    state = "UNKNOWN" if final_state is None else final_state
    bucket = rc_bucket(returncode, timed_out=timed_out)
    return f"{state}|{bucket}|{normalize_error(error)[:200]}"


# Autopack's meaning of ``reached_llm_boundary``: the worker ran into a message, context or
# token limit of the LLM (its controller looks for these phrases in the output).
_LLM_BOUNDARY = re.compile(
    r"max_turns|message limit|context_length_exceeded|maximum context|context window exceeded"
    r"|token limit exceeded|max tokens|conversation too long|exceeded maximum"
    r"|stop_reason\W{0,3}max_tokens",
    re.IGNORECASE,
)
# drainer's own signal, ``llm_call_seen``: the output shows the worker got as far as calling
# an LLM (provider names, model name prefixes, Autopack's LLM log lines, token accounting).
_LLM_CALL = re.compile(
    r"anthropic|openai|claude-|gpt-|\[llm\]"
    r"|\bllm[ _-]?(?:call|request|response)|\bcalling (?:the )?llm\b"
    r"|max_tokens|\b(?:prompt|completion)[ _]tokens|\btokens[ _]used|\btoken[ _]budget"
    r"|\bbuilder:\s*calling",
    re.IGNORECASE,
)
# Output that says the worker failed in setup or validation, before any LLM call (Autopack's
# early-failure phrases, plus its worker's own refusals).
_EARLY_FAILURE = re.compile(
    r"validation error|schema error|missing required field|invalid phase|phase not found"
    r"|run not found|database error|connection error|permission denied"
    r"|refusing to drain|database_url must be set",
    re.IGNORECASE,
)


def reached_llm_boundary(text: str) -> bool:
    """Whether ``text`` (a worker's output) shows it hit an LLM message, context or token
    limit (Autopack's ``reached_llm_boundary``)."""
    return _LLM_BOUNDARY.search(text) is not None


def llm_call_seen(text: str) -> bool:
    """Whether ``text`` (a worker's output) shows it got as far as an LLM call."""
    return _LLM_CALL.search(text) is not None


def zero_yield_reason(
    *,
    success: bool,
    timed_out: bool,
    telemetry_events: int | None,
    output: str,
    returncode: int | None,
) -> str | None:
    """Why an attempt produced no telemetry (Autopack's ``zero_yield_reason``), or ``None``
    when it produced some.

    ``unknown`` when telemetry could not be counted; otherwise the first that applies:
    ``success_no_llm_calls``, ``timeout``, ``llm_boundary_hit`` (a limit phrase in
    ``output``), ``failed_before_llm`` (an early-failure phrase in ``output``, or a worker
    that never started), ``execution_error`` (any other non-zero exit), ``unknown``.
    """
    if telemetry_events is None:
        return "unknown"
    if telemetry_events > 0:
        return None
    if success:
        return "success_no_llm_calls"
    if timed_out:
        return "timeout"
    if reached_llm_boundary(output):
        return "llm_boundary_hit"
    if returncode is None or _EARLY_FAILURE.search(output):
        return "failed_before_llm"
    if returncode != 0:
        return "execution_error"
    return "unknown"


# The line that names a worker's error: a traceback's last line (``ValueError: bad``,
# ``sqlalchemy.exc.OperationalError: ...``, ``KeyboardInterrupt``) or an ``Error:`` line
# (``[drain_one_phase] Error: ...``, ``ERROR: ...``).
_ERROR_LINE = re.compile(
    r"(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Fault|Timeout)\b(?::\s.*)?"
    r"|.*\berror\s*:\s*\S.*)",
    re.IGNORECASE,
)
MAX_ERROR_LINE = 1000  #: a longer error line is cut here


def worker_error_line(text: str) -> str:
    """The last line of ``text`` that names an error (see ``_ERROR_LINE``), stripped and
    cut at ``MAX_ERROR_LINE`` characters; "" when there is none."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and _ERROR_LINE.fullmatch(line):
            return line[:MAX_ERROR_LINE]
    return ""


def yield_per_minute(events: int | None, duration_seconds: float) -> float | None:
    """Telemetry events per minute of attempt duration, rounded to 3 decimals.

    ``None`` when the count is unknown; the duration is floored at 1 ms.
    """
    if events is None:
        return None
    if events == 0:
        return 0.0
    return round(events * 60.0 / max(duration_seconds, 0.001), 3)


def error_excerpt(text: str, limit: int = 500) -> str:
    """The end of ``text``: its non-blank lines (trailing spaces stripped), last ``limit`` chars.

    When the cut falls inside a line, the partial line is dropped if that keeps at least half
    of ``limit``, so the excerpt starts at a line start. ``""`` for blank input.
    """
    if limit <= 0:
        return ""
    joined = "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
    if len(joined) <= limit:
        return joined
    tail = joined[-limit:]
    newline = tail.find("\n")
    if joined[-limit - 1] != "\n" and 0 <= newline < limit // 2:
        tail = tail[newline + 1 :]
    return tail
