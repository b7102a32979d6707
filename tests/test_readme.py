"""The README's operator, team and embedder sections run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- runnable: (\w+) -->\n```(\w+)\n(.*?)```", re.S)


def _blocks() -> dict[str, tuple[str, str]]:
    return {name: (lang, body) for name, lang, body in BLOCK.findall(README.read_text())}


def test_the_readme_marks_all_four_sections() -> None:
    assert set(_blocks()) == {"operators", "teams", "embedders", "autopack", "learning"}


def _autopack_checkout(path: Path) -> None:
    """A stand-in Autopack checkout: its worker (the Autopack-shaped stub), its runs
    directory, its .gitignore, a backlog in autopack.db; committed."""
    from autopack_stubs import AUTOPACK_WORKER
    from conftest import create_backlog

    (path / "scripts").mkdir()
    (path / "scripts" / "drain_one_phase.py").write_text(AUTOPACK_WORKER)
    (path / ".autonomous_runs").mkdir()
    (path / ".gitignore").write_text("*.db\n.autonomous_runs/\n")
    create_backlog(path / "autopack.db", [(f"run-{r}", f"P{p}", p, "FAILED", None)
                                          for r in range(3) for p in range(2)])
    for git in (["init", "-q"], ["add", "."],
                ["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(path), *git], check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["operators", "teams", "embedders", "autopack", "learning"])
def test_readme_section_runs_as_written(name: str, tmp_path: Path) -> None:
    lang, body = _blocks()[name]
    if name == "autopack":
        _autopack_checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRAINER_", "DATABASE_URL"))}
    # `python` is the interpreter drainer is installed in, as after the quick start.
    bindir = Path(sys.executable).parent
    assert (bindir / "python").exists(), "run the tests from the virtualenv of the quick start"
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    if lang == "sh":
        # Line by line, as a reader would: `drainer run` exits 1 when demo phases fail.
        proc = subprocess.run(["bash", "-u", "-c", body + "\ntrue\n"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
    else:
        script = tmp_path / "example.py"
        script.write_text(body)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, proc.stderr
    if name == "operators":
        assert (tmp_path / "report.html").stat().st_size > 1000
        assert "Would drain, in order" in proc.stdout  # plan
        assert "[12/12] [lane " in proc.stdout  # run
        assert "no incomplete session" in proc.stdout  # run --resume
        assert "Recommendations" in proc.stdout  # analyze
        assert "Live leases" in proc.stdout  # status
        assert "--max-fingerprint-repeats" in proc.stdout  # --help
    if name == "learning":
        assert "Time limits (--phase-timeout-seconds auto:2" in proc.stdout  # plan
        assert "preferred #1: research-system-v*]" in proc.stdout
        assert "Attempt history in" in (tmp_path / "history.txt").read_text()
        assert "Failure clusters in" in proc.stdout and "avoid: --skip-run-prefix" in proc.stdout
        assert "Forecast for" in proc.stdout and "wall time at 4 busy lane(s)" in proc.stdout
        assert "the stop request was taken by drainer on" in proc.stdout  # stop
        assert "stop requested: drainer stop from" in (tmp_path / "background.log").read_text()
        assert re.search(r"^  stopped run \S+: max_fingerprint_repeats", proc.stdout, re.M)
        assert re.search(r"\[UNSTOP\] run \S+: its stop \(max_fingerprint_repeats\) is "
                         "lifted", proc.stdout)
    if name == "teams":
        assert "(env DRAINER_LANES)" in proc.stdout and "(command line)" in proc.stdout
        assert list((tmp_path / ".drainer" / "team-sessions").glob("batch-drain-*.json"))
    if name == "autopack":
        sessions = tmp_path / ".autonomous_runs" / "batch_drain_sessions"
        assert f"sessions: {sessions} (Autopack's session directory" in proc.stdout
        assert "[WORKTREE] 2 lane worktree(s)" in proc.stdout
        assert len(list(sessions.glob("batch-drain-*.json"))) == 1
        assert "Recommendations" in proc.stdout and "Live leases" in proc.stdout
        status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain"],
                                capture_output=True, text=True, check=True)
        assert status.stdout == ""
    if name == "embedders":
        assert "SessionStopped" in proc.stdout or "True" in proc.stdout
