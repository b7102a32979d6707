"""Failure clusters (``analyze --clusters``): failures that differ only in ids and paths, or
in a name within the same exception, group together; different exceptions stay apart."""

from __future__ import annotations

import json

from conftest import Env
from drainer.backlog.history import Row
from drainer.clusters import clusters, exception_of
from drainer.fingerprint import failure_fingerprint
from test_history import args, history


def row(n: int, run: str, error: str, *, outcome: str = "failed") -> Row:
    return Row(attempt_id=f"a{n}", session_id="s", host="h", run_id=run, phase_id="p",
               attempt_number=1, started_at=None, finished_at=1_000_000.0 + n,
               duration_seconds=1.0, outcome=outcome, final_state="FAILED",
               fingerprint=failure_fingerprint("FAILED", 1, timed_out=False, error=error),
               failure_category="other", telemetry_events=None, exit_status=1,
               revision="abc")


def test_ids_paths_and_names_group_and_exceptions_stay_apart() -> None:
    rows = [
        row(1, "build129-p01", "FileNotFoundError: /srv/build129-p01/out.json not found"),
        row(2, "build129-p02", "FileNotFoundError: /srv/build129-p02/out.json not found"),
        row(3, "fileorg-p2-20251208-a",
            "FileNotFoundError: C:\\\\work\\\\fileorg-p2-20251208-a\\\\out.json not found"),
        row(4, "r1", "ImportError: cannot import name 'Alpha' from 'pkg.models'"),
        row(5, "r2", "ImportError: cannot import name 'Beta' from 'pkg.models'"),
        row(6, "r3", "KeyError: cannot import name 'Alpha' from 'pkg.models'"),
        row(7, "r4", "ValueError: bad config key in settings.py line 12"),
        row(8, "r5", "ValueError: a completely different complaint in settings.py line 40"),
        row(9, "r6", "ok", outcome="ok"),
    ]
    found = clusters(rows)
    groups = sorted(sorted(c.runs) for c in found)
    assert groups == [["build129-p01", "build129-p02", "fileorg-p2-20251208-a"], ["r1", "r2"],
                      ["r3"], ["r4", "r5"]]
    assert exception_of("sqlalchemy.exc.operationalerror: database is locked") == \
        "operationalerror"
    assert [c.attempts for c in found] == [3, 2, 2, 1]


def test_analyze_clusters_on_a_real_history(env: Env, make_url: object) -> None:
    url = make_url([("build1-a", "P1-path", 0, "FAILED", None),  # type: ignore[operator]
                    ("build2-b", "P1-path", 0, "FAILED", None),
                    ("imp-1", "P1-import", 0, "FAILED", None),
                    ("asrt-1", "P1-fail", 0, "FAILED", None),
                    ("build3-ok", "P1-ok", 0, "FAILED", None)])
    proc = env.run_cli("run", *args(env, url, "--max-attempts-per-phase", "1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(history(url)) == 5
    out = env.run_cli("analyze", "--clusters", "--database-url", url, "--json",
                      "--html", str(env.tmp / "clusters.html"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["failed_attempts"] == 4
    by_runs = {tuple(sorted(c["runs"])): c for c in report["clusters"]}
    assert set(by_runs) == {("build1-a", "build2-b"), ("imp-1",), ("asrt-1",)}
    paths = by_runs[("build1-a", "build2-b")]
    assert paths["exception"] == "filenotfounderror" and len(paths["fingerprints"]) == 1
    assert paths["avoid"] == ["--skip-run-prefix", "build"]
    assert paths["avoid_also_skips"] == ["build3-ok"]
    assert paths["target"][0][0] == "--run-id"
    page = (env.tmp / "clusters.html").read_text()
    assert 'id="chart-clusters"' in page and "filenotfounderror" in page
    text = env.run_cli("analyze", "--clusters", "--database-url", url)
    assert text.returncode == 0, text.stderr
    assert "3 cluster(s) of 4 failed attempt(s)" in text.stdout
    assert "avoid: --skip-run-prefix build (also skips 1 other run(s))" in text.stdout
