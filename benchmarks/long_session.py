"""Benchmark: one long session in flat memory (issue: sessions of any length).

Builds a real Autopack-schema SQLite backlog of ``--attempts`` FAILED phases (plus 1% more, so
the session can be interrupted and resumed), spread over runs of ``--phases-per-run``, and
drains it with a real ``python -m drainer run`` process on ``--lanes`` lanes. The worker sets
its phase COMPLETE through sqlite3 and exits: the ``sqlite3`` command-line shell (about 5 ms,
so drainer's own cost dominates; the default when it is installed) or, with
``--worker python``, a small Python script using the ``sqlite3`` module (about 35 ms).

While the session runs, after every finished attempt, it reads the drainer process's RSS
(``VmRSS``/``VmHWM``), the journal's size, and whether the snapshot was rewritten (a new file:
its size counts as written). At every 1% of the attempts it keeps a sample; the table shows
10%, 50% and 100%:

* ``rss`` / ``peak``: the drainer process's resident memory then, and its peak so far;
* ``att/s``: throughput over the preceding 5% of the attempts;
* ``CPU ms/att``: drainer's own CPU per attempt over that window, and ``worker CPU ms/att``
  the workers' (drainer reaps them, so their time is its children's);
* ``B/att``: bytes written to session files per attempt over that window (journal growth plus
  snapshot rewrites; the worker prints nothing, so its logs are empty files); ``B/att so far``
  the same since the start (the snapshot is rewritten each time the journal grew by a
  quarter, so a window may hold no rewrite while the amortised figure stays flat); and
  ``wchar/att``: every byte drainer wrote (files, SQLite, and its progress lines on stdout).

At the last attempt it sends SIGINT (the session stops, resumable), then measures the peak RSS
(``wait4``) and wall time of ``drainer analyze``, ``analyze --json``, ``status`` and
``run --resume`` on that session (the resume replays every attempt, then drains the 1% left).

Targets (issue 8 / ``../shared/TARGETS.md``): peak RSS <= 80 MiB; RSS at the end within 10%
of RSS at 10%; throughput at the end >= 90% of throughput at 10%; bytes per attempt flat; the
readers under 80 MiB. They are reported, never asserted.

Usage::

    python benchmarks/long_session.py [--attempts 100000] [--lanes 4]
        [--worker sqlite3|python] [--phases-per-run 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from _common import MIB, machine_info, print_table, write_report

WORKER = """\
import os, sqlite3, sys
db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=60)
db.execute("UPDATE phases SET state = 'COMPLETE' WHERE run_id = ? AND phase_id = ?",
           (sys.argv[1], sys.argv[2]))
db.commit()
"""
FINISHED = (b"  [OK]", b"  [FAIL]", b"  [TIMEOUT]", b"  [CANCELLED]")
WINDOW = 0.05  #: throughput and bytes per attempt are taken over this share of the attempts
SHOWN = (10, 50, 100)
TARGET_MIB = 80.0
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-long-session.json"


def build_backlog(path: Path, phases: int, per_run: int) -> None:
    schema = files("drainer.demo").joinpath("autopack-schema.sql").read_text()
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    runs = (phases + per_run - 1) // per_run
    conn.executemany("INSERT INTO runs (id) VALUES (?)", [(f"run-{r:06d}",) for r in range(runs)])
    conn.executemany("INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES "
                     "('T1', ?, 0, 't')", [(f"run-{r:06d}",) for r in range(runs)])
    tier_of = dict(conn.execute("SELECT run_id, id FROM tiers"))
    rows = []
    for n in range(phases):
        run = f"run-{n // per_run:06d}"
        rows.append((f"phase-{n % per_run:03d}", run, tier_of[run], n % per_run,
                     f"phase {n}", "FAILED", "Deliverable missing: src/x.py" if n % 3 else None))
    conn.executemany("INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state, "
                     "last_failure_reason) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cpu(pid: int) -> tuple[float, float]:
    """(drainer's own CPU seconds, its reaped workers' CPU seconds) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _wchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def drain_long(workdir: Path, attempts: int, lanes: int, url: str, command: str,
               env: dict[str, str]) -> dict[str, Any]:
    sessions = workdir / "sessions"
    argv = [sys.executable, "-m", "drainer", "run", "--plain", "--database-url", url,
            "--command", command, "--session-dir", str(sessions),
            "--batch-size", str(attempts * 2), "--lanes", str(lanes),
            "--max-attempts-per-phase", "1", "--phase-timeout-seconds", "120",
            "--max-fingerprint-repeats", "1000000"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=workdir, bufsize=0)
    assert proc.stdout is not None
    session_id = ""
    journal = snapshot = None
    snap_key: tuple[int, int] | None = None
    snapshot_bytes = stdout_bytes = finished = 0
    samples: list[dict[str, Any]] = []
    marks = {max(1, attempts * pct // 100): pct for pct in range(1, 101)}
    started = time.monotonic()
    interrupted = False
    for line in proc.stdout:
        stdout_bytes += len(line)
        if not session_id and line.startswith(b"drainer session "):
            session_id = line.split()[-1].decode()
            journal = sessions / session_id / "journal.jsonl"
            snapshot = sessions / f"{session_id}.json"
        if not line.startswith(FINISHED):
            continue
        finished += 1
        if snapshot is not None:
            try:
                st = snapshot.stat()
            except OSError:
                st = None
            if st is not None and (st.st_ino, st.st_mtime_ns) != snap_key:
                snap_key = (st.st_ino, st.st_mtime_ns)
                snapshot_bytes += st.st_size
        pct = marks.get(finished)
        if pct is not None:
            mem = _status(proc.pid)
            own_cpu, workers_cpu = _cpu(proc.pid)
            samples.append({
                "cpu_s": own_cpu, "workers_cpu_s": workers_cpu,
                "pct": pct, "attempts": finished, "t_s": time.monotonic() - started,
                "rss_mib": mem.get("VmRSS", 0) / MIB, "peak_mib": mem.get("VmHWM", 0) / MIB,
                "journal_bytes": journal.stat().st_size if journal is not None else 0,
                "snapshot_bytes": snapshot_bytes, "stdout_bytes": stdout_bytes,
                "wchar": _wchar(proc.pid),
            })
            print(f"  {pct:3d}%  {finished} attempts  {samples[-1]['t_s']:.0f} s  "
                  f"rss {samples[-1]['rss_mib']:.1f} MiB", file=sys.stderr, flush=True)
            if pct == 100 and not interrupted:
                proc.send_signal(signal.SIGINT)  # stop here: the session stays resumable
                interrupted = True
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    for s in samples:
        base = _window_start(samples, s)
        n = s["attempts"] - base["attempts"]
        dt = s["t_s"] - base["t_s"]
        s["throughput"] = n / dt if dt > 0 else None
        s["file_bytes_per_attempt"] = ((s["journal_bytes"] - base["journal_bytes"])
                                       + (s["snapshot_bytes"] - base["snapshot_bytes"])) / n
        s["wchar_per_attempt"] = (s["wchar"] - base["wchar"]) / n
        s["cpu_ms_per_attempt"] = 1000 * (s["cpu_s"] - base["cpu_s"]) / n
        s["workers_cpu_ms_per_attempt"] = 1000 * (s["workers_cpu_s"] - base["workers_cpu_s"]) / n
        # Since the start: the snapshot is rewritten at geometric intervals (each time the
        # journal grew by a quarter), so its cost per attempt is flat when amortised.
        s["file_bytes_per_attempt_so_far"] = (s["journal_bytes"] + s["snapshot_bytes"]) \
            / s["attempts"]
    return {"session_id": session_id, "exit_code": proc.returncode,
            "finished_lines": finished, "wall_s": time.monotonic() - started,
            "peak_rss_mib_wait4": usage.ru_maxrss / 1024, "samples": samples,
            "stderr_tail": stderr[-2000:]}


def _window_start(samples: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
    """The sample WINDOW of the attempts before ``s`` (or a zero start for the first)."""
    want = s["pct"] - round(100 * WINDOW)
    for other in samples:
        if other["pct"] == want:
            return other
    return {"attempts": 0, "t_s": 0.0, "journal_bytes": 0, "snapshot_bytes": 0, "wchar": 0,
            "cpu_s": 0.0, "workers_cpu_s": 0.0}


def measure_reader(name: str, argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    return {"reader": name, "exit_code": os.waitstatus_to_exitcode(status), "wall_s": took,
            "peak_rss_mib": usage.ru_maxrss / 1024, "stderr_tail": err[-500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=100_000)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--phases-per-run", type=int, default=20)
    parser.add_argument("--worker", choices=("sqlite3", "python"),
                        default="sqlite3" if shutil.which("sqlite3") else "python",
                        help="the sqlite3 shell (default when installed) or a Python script")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.attempts < 20 or args.lanes < 1 or args.phases_per_run < 1:
        parser.error("--attempts must be at least 20, --lanes and --phases-per-run at least 1")
    out = sys.stderr if args.json == "-" else sys.stdout
    with tempfile.TemporaryDirectory(prefix="drainer-bench-long-") as tmp:
        workdir = Path(tmp)
        db = workdir / "backlog.db"
        extra = max(args.lanes * 2, args.attempts // 100)
        print(f"building {args.attempts + extra} FAILED phases...", file=sys.stderr, flush=True)
        build_backlog(db, args.attempts + extra, args.phases_per_run)
        worker = workdir / "worker.py"
        worker.write_text(WORKER)
        url = f"sqlite:///{db}"
        if args.worker == "sqlite3":
            # The ids are the benchmark's own (run-000123, phase-007): safe inside the SQL.
            command = shlex.join([
                "sqlite3", "-cmd", ".timeout 60000", str(db),
                "UPDATE phases SET state = 'COMPLETE' "
                "WHERE run_id = '{run_id}' AND phase_id = '{phase_id}'"])
        else:
            command = f"{sys.executable} -I -S {worker} {{run_id}} {{phase_id}}"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        print(f"draining {args.attempts} attempts on {args.lanes} lanes...", file=sys.stderr,
              flush=True)
        run = drain_long(workdir, args.attempts, args.lanes, url, command, env)
        sessions = workdir / "sessions"
        base = [sys.executable, "-m", "drainer"]
        readers = [
            measure_reader("analyze", [*base, "analyze", run["session_id"], "--session-dir",
                                       str(sessions)], env, workdir),
            measure_reader("analyze --json", [*base, "analyze", run["session_id"], "--json",
                                              "--session-dir", str(sessions)], env, workdir),
            measure_reader("status", [*base, "status", "--database-url", url, "--session-dir",
                                      str(sessions)], env, workdir),
            measure_reader("run --resume", [*base, "run", "--plain", "--resume",
                                            run["session_id"], "--database-url", url,
                                            "--session-dir", str(sessions)], env, workdir),
        ]
    shown = [s for s in run["samples"] if s["pct"] in SHOWN]
    print(f"\nlong session: {run['finished_lines']} attempts, {args.lanes} lanes, "
          f"{args.worker} worker, "
          f"{run['wall_s']:.0f} s, exit {run['exit_code']}, peak RSS (wait4) "
          f"{run['peak_rss_mib_wait4']:.1f} MiB", file=out)
    print_table(shown, [("at", "pct", "{}%"), ("attempts", "attempts", "{}"),
                        ("rss MiB", "rss_mib", "{:.1f}"), ("peak MiB", "peak_mib", "{:.1f}"),
                        ("att/s", "throughput", "{:.1f}"),
                        ("B/att", "file_bytes_per_attempt", "{:.0f}"),
                        ("B/att so far", "file_bytes_per_attempt_so_far", "{:.0f}"),
                        ("wchar/att", "wchar_per_attempt", "{:.0f}"),
                        ("CPU ms/att", "cpu_ms_per_attempt", "{:.2f}"),
                        ("worker CPU ms/att", "workers_cpu_ms_per_attempt", "{:.2f}")], out)
    print("\nreaders on that session:", file=out)
    print_table(readers, [("reader", "reader", "{}"), ("exit", "exit_code", "{}"),
                          ("wall s", "wall_s", "{:.2f}"), ("peak MiB", "peak_rss_mib", "{:.1f}")],
                out)
    first, last = shown[0], shown[-1]
    checks = {
        "peak_rss_at_most_80_mib": run["peak_rss_mib_wait4"] <= TARGET_MIB,
        "rss_end_within_10pct_of_rss_at_10pct": abs(last["rss_mib"] - first["rss_mib"])
        <= 0.10 * first["rss_mib"],
        "throughput_end_at_least_90pct_of_10pct": (last["throughput"] or 0)
        >= 0.9 * (first["throughput"] or 0),
        "readers_under_80_mib": all(r["peak_rss_mib"] <= TARGET_MIB for r in readers),
    }
    print("\ntargets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()),
          file=out)
    report = {"benchmark": "long_session", "machine": machine_info(),
              "attempts": args.attempts, "lanes": args.lanes, "worker": args.worker,
              "phases_per_run": args.phases_per_run, "run": run, "readers": readers,
              "targets_met": checks}
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
