"""One set of totals: the live footer, the summary, the session files, ``analyze`` and the HTML
report give the same counts in the same words, for a session that was killed, resumed,
stopped by a signal and resumed again, with every outcome in it."""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest

from conftest import (
    Env,
    create_backlog,
    drainer_view,
    only_session,
    under_a_terminal,
    wait_for_worker_file,
)
from drainer.models import OUTCOME_KEYS, OUTCOMES

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WORDS = "|".join(OUTCOMES)
COUNT = re.compile(rf"\b({WORDS}) (\d+)")


def _counts(text: str) -> dict[str, int]:
    """``{word: n}`` of the outcome counts in one line of output."""
    return {word: int(n) for word, n in COUNT.findall(text)}


def _full(counts: dict[str, int]) -> dict[str, int]:
    """The five counts, zeros included (brief lines leave zero cancelled/interrupted out)."""
    return {word: counts.get(word, 0) for word in OUTCOMES}


def _from_json(totals: dict[str, int]) -> dict[str, int]:
    return {word: totals[key] for word, key in OUTCOME_KEYS}


def _html_rows(page: str) -> dict[str, str]:
    """``{figure: value}`` of the report's two-column rows (the totals table's among them)."""
    rows = re.findall(r"<tr><td>([^<]*)</td><td class=\"n\">([^<]*)</td></tr>", page)
    return {html.unescape(k): v for k, v in rows}


@pytest.mark.slow
def test_footer_summary_snapshot_analyze_and_html_agree_across_resumes(env: Env) -> None:
    # One run per phase, so the stop rules of a run do not interfere. Kinds by phase: the
    # one drainer is killed under (P0), a success, a worker failure, a hang that times out,
    # and one held until the test stops the session with two SIGINTs (cancelled).
    kinds = {"P0": "ok", "P1": "ok", "P2": "fail", "P3": "hang", "P4": "gated"}
    create_backlog(env.db, [(f"run-{p}", p, 0, "FAILED", None) for p in kinds])
    by_phase = ",".join(f"{p}={k}" for p, k in kinds.items())
    args = [*env.base_args(), "--batch-size", "20", "--phase-timeout-seconds", "2",
            "--kill-grace-seconds", "0.5", "--stop-grace-seconds", "600",
            "--max-fingerprint-repeats", "100",
            "--retry-backoff-seconds", "0"]  # the timed-out phase's retry comes at once

    # 1. kill -9 while the first worker runs: an attempt left unfinished.
    (env.out / "hang-next").write_text("")
    crashed = env.run_cli("run", *args, env=env.worker_env(
        DRAINER_CRASH_AT="worker_running:1", WORKER_KIND_BY_PHASE=by_phase))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    (env.out / "hang-next").unlink(missing_ok=True)

    # 2. --resume closes it (interrupted) and drains on until the gated worker starts: two
    #    SIGINTs cancel it.
    resumed = subprocess.Popen([sys.executable, "-m", "drainer", "run", *args, "--resume"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=env.tmp, env=env.worker_env(WORKER_KIND_BY_PHASE=by_phase))
    wait_for_worker_file(env.out, "started.P4", resumed)
    resumed.send_signal(signal.SIGINT)
    assert resumed.stdout is not None
    for line in resumed.stdout:  # the second SIGINT only after the first was handled
        if "[STOP] SIGINT received" in line:
            break
    resumed.send_signal(signal.SIGINT)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, out + err

    # 3. --resume again, on a pseudo-terminal (the live view), with P4 now a success.
    code, screen = under_a_terminal(["run", *args, "--resume"], env,
                                    WORKER_KIND_BY_PHASE=by_phase.replace("P4=gated", "P4=ok"))
    assert code == 1, screen  # a worker failure and a timeout
    screen = ANSI.sub("", screen).replace("\r", "")

    snapshot, root = only_session(env.sessions)
    view = drainer_view(snapshot)
    truth = _full(dict(Counter(_outcome(r) for r in view["results"])))
    assert all(truth[word] >= 1 for word in OUTCOMES), truth  # every outcome is in it
    attempts = sum(truth.values())

    # the footer: its last drawing, after the session stopped
    # (on the terminal's 80 columns the times and the stop are on a second line)
    lines = screen.splitlines()
    at = max(i for i, line in enumerate(lines) if re.match(r"\[\d+/\d+\] ok ", line))
    assert lines[at].startswith(f"[{attempts}/20] ")
    assert _full(_counts(lines[at])) == truth, lines[at]
    assert "stopped: no_candidates" in lines[at] + lines[at + 1]

    # the summary
    summary = next(line for line in screen.splitlines() if line.startswith("Attempts: "))
    assert summary.startswith(f"Attempts: {attempts}  ")
    assert _counts(summary) == truth, summary
    by_run_lines = {line.split()[0]: _full(_counts(line)) for line in screen.splitlines()
                    if line.startswith("  run-P")}

    # the session files: drainer's session.json, and Autopack's header by its own rules
    info = json.loads((root / "session.json").read_text())
    assert _from_json(info["totals"]) == truth and info["totals"]["processed"] == attempts
    header = json.loads(snapshot.read_text())
    assert header["total_processed"] == attempts - truth["interrupted"] == len(header["results"])
    assert header["total_success"] == truth["ok"]
    assert header["total_failed"] == truth["failed"] + truth["timed out"] + truth["cancelled"]

    # analyze, text and JSON, and its HTML report
    report = json.loads(env.run_cli("analyze", str(root), "--json").stdout)
    assert _from_json(report["totals"]) == truth and report["totals"]["processed"] == attempts
    assert {run: _from_json(c) for run, c in report["by_run"].items()} == by_run_lines
    text = env.run_cli("analyze", str(root)).stdout
    totals_block = text[text.index("Totals"):text.index("Telemetry")]
    assert {w: int(n) for w, n in re.findall(rf"^\s+({WORDS})\s+(\d+)$", totals_block,
                                            re.M)} == truth
    page_path = env.tmp / "report.html"
    assert env.run_cli("analyze", str(root), "--html", str(page_path)).returncode == 0
    rows = _html_rows(page_path.read_text())
    assert {word: int(rows[word]) for word in OUTCOMES} == truth
    assert rows["attempts"] == str(attempts)
    # the crash's leftovers are drainer's, said once, not blamed on the workers
    assert "drainer-crash" in report["recommendation_rules"]
    assert "worker-leaks" not in report["recommendation_rules"]


def _outcome(record: dict[str, object]) -> str:
    """An attempt's outcome from its journal record, by the rule README states."""
    if record["interrupted"]:
        return "interrupted"
    if record["success"]:
        return "ok"
    if record["cancelled"]:
        return "cancelled"
    return "timed out" if record["timed_out"] else "failed"
