"""Helpers shared by the benchmark scripts: machine facts, peak memory, the table printer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

MIB = 1024 * 1024
Column = tuple[str, str, str]  #: (title, key in the row, format)


def machine_info() -> dict[str, Any]:
    import sqlalchemy

    import drainer

    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "drainer": drainer.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB."""
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child started by a parent
    # that once held a big fixture would report the parent's peak.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], out: TextIO) -> None:
    """Right-aligned columns; None prints as '-'."""
    cells = [
        ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns]
        for row in rows
    ]
    widths = [
        max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(columns)
    ]
    line = " | ".join(title.rjust(w) for (title, _, _), w in zip(columns, widths, strict=True))
    print(line, file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for c in cells:
        print(" | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)), file=out)


def positive_ints(flag: str, example: str) -> Callable[[str], list[int]]:
    """An argparse type for ``1,2,4`` (underscores allowed): positive whole numbers."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(p.replace("_", "")) for p in text.split(",") if p.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{flag} expects numbers like {example}: {exc}"
            ) from exc
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag} expects positive numbers like {example}")
        return values

    return parse


def write_report(report: dict[str, Any], dest: str, out: TextIO) -> None:
    """The JSON report to ``dest`` (``-`` = stdout, the table having gone to stderr)."""
    if dest == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        print("JSON: -", file=out)
    else:
        path = Path(dest)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"JSON: {path}", file=out)
