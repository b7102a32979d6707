"""Helpers shared by the benchmark scripts: machine facts, peak memory, the table printer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sqlite3
import sys
from collections.abc import Callable, Sequence
from importlib.resources import files
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


# -- Autopack's schema, on SQLite and PostgreSQL ---------------------------------------------


def autopack_schema() -> str:
    return files("drainer.demo").joinpath("autopack-schema.sql").read_text(encoding="utf-8")


def pg_schema() -> str:
    """Autopack's SQLite schema in PostgreSQL's dialect (as the schema file's header says)."""
    sql = re.sub(r"--[^\n]*", "", autopack_schema())
    sql = sql.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
    sql = sql.replace("DATETIME", "TIMESTAMP")
    return sql.replace("BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false")


def pg_url(admin_url: str, database: str) -> str:
    """The URL of ``database`` on the server of ``admin_url``."""
    return admin_url.rsplit("/", 1)[0] + "/" + database


async def pg_admin(admin_url: str, statement: str) -> None:
    """Run one statement on the server of ``admin_url`` (CREATE / DROP DATABASE...)."""
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def pg_state_counts(url: str) -> dict[str, int]:
    """Phases per state in the PostgreSQL database at ``url``."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT state, COUNT(*) FROM phases GROUP BY state")
    finally:
        await conn.close()
    return {str(r[0]): int(r[1]) for r in rows}


def add_backlog_options(parser: argparse.ArgumentParser, *, runs: int, phases_per_run: int,
                        sleep: float) -> None:
    """``--runs``, ``--phases-per-run`` and ``--sleep`` of a sleep-bound synthetic backlog."""
    parser.add_argument("--runs", type=int, default=runs,
                        help="runs in the backlog (default: %(default)s)")
    parser.add_argument("--phases-per-run", type=int, default=phases_per_run,
                        help="FAILED phases per run (default: %(default)s)")
    parser.add_argument("--sleep", type=float, default=sleep,
                        help="seconds each worker sleeps (default: %(default)s)")


def check_backlog_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) what :func:`add_backlog_options` and ``--repeat`` cannot take."""
    if args.runs < 1 or args.phases_per_run < 1:
        parser.error("--runs and --phases-per-run must be at least 1")
    if args.sleep < 0:
        parser.error("--sleep must be zero or more")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
