"""The operator's preferred runs (``--prefer-run``, ``--prefer-run-prefix``,
``--priority-file``): they go before every other run, in the order given, and ``run``
drains in the order ``plan`` shows."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Env, create_backlog, journal_results, only_session
from drainer.preferences import Preferences, read_priority_file

RUNS = ["a-1", "b-1", "c-1", "c-2", "d-1", "e-1", "f-1"]


def test_a_run_ranks_by_the_first_entry_it_matches(tmp_path: Path) -> None:
    listed = tmp_path / "priority.txt"
    listed.write_text("# most urgent first\n\n  b-1  \nd*\n")
    assert read_priority_file(listed) == [("b-1", False), ("d", True)]
    prefs = Preferences((("e-1", False), ("c", True), ("b-1", False), ("d", True)))
    assert [prefs.rank(run) for run in RUNS] == [4, 2, 1, 1, 3, 0, 4]
    assert prefs.describe("c-2") == "preferred #2: c*" and prefs.describe("a-1") is None
    assert not Preferences()


def test_run_drains_preferred_runs_first_in_the_order_plan_shows(env: Env) -> None:
    create_backlog(env.db, [(run, "P", 0, "FAILED", None) for run in RUNS])
    listed = env.tmp / "priority.txt"
    listed.write_text("# most urgent first\nb-1\nd*\n")
    steer = ["--prefer-run", "e-1", "--prefer-run-prefix", "c", "--priority-file", str(listed)]
    plan = env.run_cli("plan", *env.base_args(), *steer, "--batch-size", "7")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    planned = re.findall(r"^\s+\d+\. (\S+) / P .*?\]$", plan.stdout, re.M)
    assert planned[:5] == ["e-1", "c-1", "c-2", "b-1", "d-1"]
    assert sorted(planned[5:]) == ["a-1", "f-1"]
    assert "preferred #1]" in plan.stdout and "preferred #2: c*]" in plan.stdout
    proc = env.run_cli("run", *env.base_args(), *steer, "--batch-size", "7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    drained = [r["run_id"] for r in journal_results(only_session(env.sessions)[1])]
    assert drained == planned


def test_a_bad_priority_file_is_a_one_line_error(env: Env) -> None:
    create_backlog(env.db, [(run, "P", 0, "FAILED", None) for run in RUNS])
    star = env.tmp / "star.txt"
    star.write_text("a-1\n*\n")
    for bad, says in [([str(env.tmp / "missing.txt")], "cannot read --priority-file"),
                      ([str(star)], "a line '*' would prefer every run")]:
        for command in ("run", "plan"):
            proc = env.run_cli(command, *env.base_args(), "--priority-file", *bad)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not env.sessions.exists()
