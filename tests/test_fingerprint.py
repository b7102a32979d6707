from __future__ import annotations

import pytest

from drainer.fingerprint import (
    error_excerpt,
    failure_fingerprint,
    llm_call_seen,
    normalize_error,
    rc_bucket,
    reached_llm_boundary,
    worker_error_line,
    yield_per_minute,
    zero_yield_reason,
)

TRACEBACK_A = """\
2026-11-21 23:38:56,123 ERROR phase build129-run-0007 failed (pid 4312)
Traceback (most recent call last):
  File "/home/alice/autopack/src/autopack/executor.py", line 412, in run
    result = builder.apply(patch)
ValueError: patch rejected for fileorg-p2-20251208-1234 at 0x7f3a9c2b1d40
"""
TRACEBACK_B = """\
2025-01-02 01:02:03,999 ERROR phase shop-run-0042 failed (pid 77)
Traceback (most recent call last):
  File "/srv/ci/work/src/autopack/executor.py", line 418, in run
    result = builder.apply(patch)
ValueError: patch rejected for shop-p9-20250101-0001 at 0x55d0c0ffee00
"""


def fp(error: str, state: str | None = "FAILED", rc: int | None = 1) -> str:
    return failure_fingerprint(state, rc, timed_out=False, error=error)


# --- normalize_error ------------------------------------------------------------------------


def test_errors_differing_only_in_volatile_parts_share_a_fingerprint() -> None:
    assert fp(TRACEBACK_A) == fp(TRACEBACK_B)
    assert fp(TRACEBACK_A).startswith("FAILED|rc1|<datetime> error phase <id> failed (pid <n>)")


def test_genuinely_different_errors_get_different_fingerprints() -> None:
    assert fp("ValueError: patch rejected") != fp("KeyError: 'phase_id'")
    assert fp("ModuleNotFoundError: No module named 'foo'") != fp(
        "ModuleNotFoundError: No module named 'bar'"
    )
    assert fp("boom", state="FAILED") != fp("boom", state="QUEUED")
    assert fp("boom", rc=1) != fp("boom", rc=2)


def test_dates_times_and_datetimes() -> None:
    assert normalize_error("on 2026-11-21 at 23:38:56") == "on <date> at <time>"
    assert normalize_error("at 23:38") == "at <time>"
    for stamp in ("2026-11-21T23:38:56.123Z", "2026-11-21 23:38:56", "2026-11-21T23:38:56+01:00"):
        assert normalize_error(f"started {stamp} ok") == "started <datetime> ok"


def test_uuids_hex_and_numbers() -> None:
    text = "job 123e4567-e89B-12d3-a456-426614174000 obj at 0x7F3A9c commit a1b2c3d4e5 pid=4312"
    assert normalize_error(text) == "job <uuid> obj at <hex> commit <hex> pid=<n>"
    assert normalize_error("timed out after 30s, retry 2 of 3.5") == (
        "timed out after <n>s, retry <n> of <n>"
    )
    # Numbers glued to words are part of the word.
    assert normalize_error("python3 abc123") == "python3 abc123"


@pytest.mark.parametrize(
    "path",
    [
        "/home/alice/autopack/src/executor.py",
        "./a/b.py",
        "../up/c.txt",
        "~/x/y",
        "src/drainer/fingerprint.py",
        "/tmp/run-2026-11-21/out.log",
    ],
)
def test_posix_paths(path: str) -> None:
    assert normalize_error(f"open {path} failed") == "open <path> failed"
    assert normalize_error(f'File "{path}", line 7') == 'file "<path>", line <n>'
    assert normalize_error(f"({path})") == "(<path>)"
    assert normalize_error(f"'{path}'") == "'<path>'"


@pytest.mark.parametrize(
    "path",
    [
        "C:\\Users\\bob\\autopack\\src\\executor.py",
        "d:/work/autopack/x.py",
        "\\\\server\\share\\logs\\x.txt",
        "src\\pkg\\mod.py",
    ],
)
def test_windows_paths(path: str) -> None:
    assert normalize_error(f'File "{path}", line 12, in run') == 'file "<path>", line <n>, in run'
    assert normalize_error(f"({path})") == "(<path>)"


def test_posix_and_windows_tracebacks_match() -> None:
    posix = 'File "/home/a/src/executor.py", line 3, in run\nValueError: x'
    windows = 'File "C:\\Users\\a\\src\\executor.py", line 99, in run\r\nValueError: x'
    assert fp(posix) == fp(windows)


def test_line_numbers_after_files() -> None:
    assert normalize_error("src/a/b.py:42:7: E501") == "<path> line <n>: e501"
    assert normalize_error("/abs/b.py:42 boom") == "<path> line <n> boom"
    assert normalize_error("worker.py:99 boom") == "worker.py line <n> boom"
    assert normalize_error("Line 42") == "line <n>"


def test_words_and_urls_that_are_not_paths() -> None:
    assert normalize_error("read and/or write, 1 / 0") == "read and/or write, <n> / <n>"
    assert normalize_error("GET https://example.com/api") == "get https://example.com/api"


def test_session_and_run_ids() -> None:
    assert normalize_error("session batch-drain-20261121-233856-a1b2 ended") == (
        "session <session> ended"
    )
    assert normalize_error("batch-drain-20261121-233856") == "<session>"
    for run_id in ("build129-run-0007", "fileorg-p2-20251208-1234", "run-0007", "my-run-7"):
        assert normalize_error(f"run {run_id} failed") == "run <id> failed"
    # Short word-N forms and kebab-case words are not ids.
    assert normalize_error("'utf-8' codec, sha-256") == "'utf-<n>' codec, sha-<n>"
    assert normalize_error("no-such-file") == "no-such-file"


def test_lowercases_and_collapses_whitespace() -> None:
    assert normalize_error("  Foo\n\n\tBAR   baz \r\n") == "foo bar baz"


@pytest.mark.parametrize("text", ["", " ", "\n\t", "::", "<>", "-", "/", "\\", "0x", "é—ñ"])
def test_never_crashes_on_odd_input(text: str) -> None:
    assert isinstance(normalize_error(text), str)
    assert fp(text).startswith("FAILED|rc1|")


@pytest.mark.parametrize(
    "text", [TRACEBACK_A, TRACEBACK_B, "C:\\x\\y.py:3 utf-8 run-12 1.5s", "etc/conf.d/1st", "9T:\\/"]
)
def test_normalising_twice_changes_nothing(text: str) -> None:
    once = normalize_error(text)
    assert normalize_error(once) == once


def test_long_pathological_input_is_fast() -> None:
    # Each rule must be linear; a quadratic regex would take minutes here.
    for text in ("-a" * 100_000, "a/" * 100_000, "1-" * 100_000, "a-b." * 50_000, "1:" * 50_000):
        normalize_error(text)


# --- rc buckets and fingerprint shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "timed_out", "bucket"),
    [
        (0, False, "rc0"),
        (1, False, "rc1"),
        (2, False, "rcN"),
        (255, False, "rcN"),
        (None, False, "rcN"),
        (-9, False, "signal9"),
        (-15, False, "signal15"),
        (1, True, "timeout"),
        (-9, True, "timeout"),
        (None, True, "timeout"),
    ],
)
def test_rc_bucket(returncode: int | None, timed_out: bool, bucket: str) -> None:
    assert rc_bucket(returncode, timed_out=timed_out) == bucket


def test_fingerprint_shape_and_unknown_state() -> None:
    assert failure_fingerprint(None, None, timed_out=False, error="Boom 42") == "UNKNOWN|rcN|boom <n>"
    assert failure_fingerprint("FAILED", -9, timed_out=False, error="") == "FAILED|signal9|"
    assert failure_fingerprint("FAILED", 0, timed_out=True, error="x") == "FAILED|timeout|x"


def test_fingerprint_truncates_normalised_error_to_200_chars() -> None:
    error = "Error " + "word " * 100
    result = failure_fingerprint("FAILED", 1, timed_out=False, error=error)
    prefix, _, normalised = result.partition("FAILED|rc1|")
    assert prefix == ""
    assert len(normalised) == 200
    assert normalised == normalize_error(error)[:200]
    # Differences past the cut do not matter.
    assert fp(error + " tail one") == fp(error + " tail two")


# --- LLM boundary -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "POST https://api.anthropic.com/v1/messages",
        "using model claude-sonnet-4",
        "model=GPT-4o",
        "OpenAI client created",
        "[LLM] request sent",
        "llm_call started",
        "Calling LLM for phase 3",
        "LLM request 1/3",
        "llm response received",
        "max_tokens=4096",
        "prompt tokens: 1200, completion tokens: 300",
        "Tokens used: 1500",
        "token budget exceeded",
        "Builder: calling model",
    ],
)
def test_llm_call_seen(text: str) -> None:
    assert llm_call_seen(text)
    assert llm_call_seen(f"noise\n{text.upper()}\nmore noise")
    assert not reached_llm_boundary(text)  # naming an LLM is not hitting its limits


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Traceback (most recent call last):\nImportError: cannot import name 'x'",
        "collecting tests... 3 passed",
        "tokenizer loaded",
        "phase queued, no model used",
    ],
)
def test_llm_call_not_seen(text: str) -> None:
    assert not llm_call_seen(text)
    assert not reached_llm_boundary(text)


@pytest.mark.parametrize(
    "text",
    [
        "anthropic.BadRequestError: prompt is too long (context_length_exceeded)",
        "This model's maximum context length is 200000 tokens",
        "stop_reason='max_tokens'",
        "Conversation too long, please start a new one",
        "Builder stopped: max_turns reached",
        "token limit exceeded for phase 3",
    ],
)
def test_llm_boundary_is_a_limit_hit(text: str) -> None:
    """Autopack's meaning: a message, context or token limit was hit."""
    assert reached_llm_boundary(f"noise\n{text}\nmore")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n"
         "Autonomous execution loop finished\n", "ValueError: bad"),
        ("[drain_one_phase] Error: boom\nsqlalchemy.exc.OperationalError: (sqlite3) locked\n"
         "[SQL: UPDATE phases]\n", "sqlalchemy.exc.OperationalError: (sqlite3) locked"),
        ("[drain_one_phase] Error: Cannot proceed without API server\n",
         "[drain_one_phase] Error: Cannot proceed without API server"),
        ("KeyboardInterrupt\n", "KeyboardInterrupt"),
        ("all fine\nerror_count: 0\nErrors: none\n", ""),
        ("", ""),
    ],
)
def test_worker_error_line_is_the_last_line_naming_an_error(text: str, line: str) -> None:
    assert worker_error_line(text) == line


# --- zero yield -----------------------------------------------------------------------------


def reason(
    *,
    events: int | None = 0,
    success: bool = False,
    timed_out: bool = False,
    output: str = "",
    rc: int | None = 1,
) -> str | None:
    return zero_yield_reason(
        success=success,
        timed_out=timed_out,
        telemetry_events=events,
        output=output,
        returncode=rc,
    )


def test_zero_yield_reasons() -> None:
    """Autopack's order and meanings; ``unknown`` also when telemetry could not be counted."""
    limit = "context_length_exceeded"
    assert reason(events=3, timed_out=True) is None
    assert reason(events=1, success=True) is None
    assert reason(events=None, success=True) == "unknown"
    assert reason(events=None, timed_out=True) == "unknown"
    assert reason(success=True, output=limit, rc=0) == "success_no_llm_calls"
    assert reason(timed_out=True, output=limit, rc=-15) == "timeout"
    assert reason(output=limit, rc=1) == "llm_boundary_hit"
    assert reason(output="openai.AuthenticationError: bad key", rc=1) == "execution_error"
    assert reason(output="Refusing to drain: phase state is COMPLETE", rc=1) \
        == "failed_before_llm"
    assert reason(output="psycopg2 connection error", rc=1) == "failed_before_llm"
    assert reason(rc=None) == "failed_before_llm"  # never started
    assert reason(rc=-9) == "execution_error"
    assert reason(rc=2) == "execution_error"
    assert reason(rc=0) == "unknown"


# --- yield ----------------------------------------------------------------------------------


def test_yield_per_minute() -> None:
    assert yield_per_minute(None, 60.0) is None
    assert yield_per_minute(0, 0.0) == 0.0
    assert yield_per_minute(0, -1.0) == 0.0
    assert yield_per_minute(0, 90.0) == 0.0
    assert yield_per_minute(10, 60.0) == 10.0
    assert yield_per_minute(3, 120.0) == 1.5
    assert yield_per_minute(1, 7.0) == 8.571
    assert yield_per_minute(1, 0.0) == 60_000.0  # duration floored at 1 ms


# --- excerpt --------------------------------------------------------------------------------


def test_error_excerpt() -> None:
    assert error_excerpt("") == ""
    assert error_excerpt(" \n\t\n") == ""
    assert error_excerpt("one\n\n  two  \n\n\n") == "one\n  two"
    assert error_excerpt("abc", limit=0) == ""
    # Cut inside a line: the partial line is dropped so the excerpt starts at a line start.
    text = "first line\nsecond line\n" + "x" * 30 + "\n"
    assert error_excerpt(text, limit=40) == "x" * 30
    # A single over-long last line is cut to its last `limit` characters.
    assert error_excerpt("a" * 50 + "END", limit=10) == "a" * 7 + "END"
    # Dropping the partial line would lose more than half the budget: keep it.
    text = "p" * 100 + "\nshort"
    assert error_excerpt(text, limit=20) == "p" * 14 + "\nshort"
    assert len(error_excerpt("line\n" * 1000, limit=500)) <= 500


# --- messages and fingerprints of whole attempts (attempt.error_message) --------------------


def _message(reason: str | None, previous: str | None, *, rc: int = 1, stderr: str = "",
             restored: bool = False) -> tuple[str, str]:
    from drainer.attempt import error_message
    from drainer.models import Attempt
    from drainer.supervisor import ProcessResult

    started = Attempt(run_id="r", phase_id="p", phase_index=0, initial_state="FAILED",
                      attempt_id="a", attempt_number=1, lane=1, started_at="",
                      subprocess_stderr_path="/s/logs/r__p__1.stderr.txt")
    return error_message(started, ProcessResult(returncode=rc, stderr_tail=stderr),
                         row=("FAILED", reason), restored=restored, previous_reason=previous,
                         timeout_label="60s")


def test_unchanged_reasons_without_an_error_line_keep_their_own_fingerprints() -> None:
    """Review finding: the basis fell to the generic 'unchanged by this attempt?' text, so
    unrelated stale reasons shared one fingerprint and stopped each other's runs."""
    bases = {_message(why, why, stderr="FATAL: worker aborted\n")[1]
             for why in ("Deliverable missing: a.py", "patch rejected", "ImportError: x")}
    assert len(bases) == 3
    assert _message("", "", rc=0)[1] != ""  # never an empty basis


def test_an_error_line_that_holds_the_reason_is_not_repeated() -> None:
    text, _ = _message("ValueError: bad thing", None, stderr="ValueError: bad thing at step 3")
    assert text == "ValueError: bad thing at step 3 | (log: /s/logs/r__p__1.stderr.txt)"


def test_an_empty_api_url_port_is_made_explicit() -> None:
    from drainer.config import normalize_api_url

    assert normalize_api_url("http://h:") == "http://h:80"
    assert normalize_api_url("https://u:p@h:/") == "https://u:p@h:443"
