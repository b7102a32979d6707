"""Benchmark: how long the command line takes to answer before it touches a database.

Runs each command ``--runs`` times in a fresh interpreter and reports the median and the
range of the wall time, with the peak RSS of the slowest run: ``drainer --help``,
``drainer run --help`` and ``drainer config`` (which builds the whole configuration).
The target (issue 11): ``--help`` and ``config`` under 0.25 s; SQLAlchemy, the largest
import, is loaded only by commands that open a database.

It also prices the live view's import against a terminal library: ``import drainer.live``,
and, where ``rich`` is installed in the same interpreter, the same with ``rich.console`` and
``rich.live`` (the rows a library would add to ``drainer run`` on a terminal).

Usage::

    python benchmarks/startup.py [--runs 10] [--json out.json]

``--json -`` writes the JSON to stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, print_table, write_report

DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-startup.json"
TARGET_S = 0.25
COMMANDS = {
    "--help": ["-m", "drainer", "--help"],
    "run --help": ["-m", "drainer", "run", "--help"],
    "config": ["-m", "drainer", "config", "--database-url", "sqlite:///backlog.db"],
    "import drainer.live": ["-c", "import drainer.live"],
}
WITH_RICH = {"import drainer.live + rich": ["-c", "import drainer.live, rich.console, rich.live"]}


def _time(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, from wait4) of one ``python ARGV`` run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("DRAINER_")})
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"python {' '.join(argv)} exited with {proc.returncode}")
    return took, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per command (default: 10)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where the JSON goes")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    rows: list[dict[str, Any]] = []
    commands = dict(COMMANDS)
    if importlib.util.find_spec("rich") is not None:
        commands.update(WITH_RICH)
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in commands.items():
            times, peaks = zip(*(_time(argv, Path(tmp)) for _ in range(args.runs)),
                               strict=True)
            rows.append({"command": name, "runs": args.runs,
                         "median_s": round(statistics.median(times), 4),
                         "min_s": round(min(times), 4), "max_s": round(max(times), 4),
                         "peak_rss_mib": round(max(peaks), 1),
                         "under_target": statistics.median(times) < TARGET_S})
    out = sys.stderr if args.json == "-" else sys.stdout
    print_table(rows, [("command", "command", "{}"), ("median s", "median_s", "{:.3f}"),
                       ("min s", "min_s", "{:.3f}"), ("max s", "max_s", "{:.3f}"),
                       ("peak MiB", "peak_rss_mib", "{:.1f}"),
                       (f"< {TARGET_S} s", "under_target", "{}")], out)
    write_report({"benchmark": "startup", "machine": machine_info(), "target_s": TARGET_S,
                  "results": rows}, args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
