"""Benchmark: D drainers x L lanes each against 1 drainer x (D*L) lanes on one PostgreSQL backlog.

Several drainer processes may share one PostgreSQL backlog; they coordinate through the
``drainer_leases`` table (one lease per run, never two phases of one run at once). This
benchmark asks what splitting a lane budget over several processes costs or gains: for every
configuration ``DxL`` in ``--configs`` it drains a FRESH PostgreSQL database (Autopack's
schema in PostgreSQL's dialect, ``--runs`` runs x ``--phases-per-run`` FAILED phases, cloned
from a template database built once) with D separate ``python -m drainer run`` processes of L
lanes each, all started at once (``subprocess.Popen``), and waits for every one of them.

drainer's modules are compiled to bytecode first (``compileall``), as ``pip install`` does
for a regular install: an editable install run with ``PYTHONDONTWRITEBYTECODE=1`` would
otherwise compile every module at every drainer start, which ``DxL`` pays D times (the JSON
says whether that worked: ``drainer_bytecode_compiled``).

Each drainer gets its own ``--session-dir``, ``--batch-size`` = every phase of the backlog,
``--max-attempts-per-phase 1``, ``--phase-timeout-seconds 60`` and
``--max-fingerprint-repeats`` / ``--max-timeouts-per-run`` set far above the number of phases
(the command line has no "off" for these two stop rules; with a worker that always succeeds
they never fire anyway). Everything else keeps drainer's defaults (lease TTL, host name). The
drainers run in a scratch directory with every ``DRAINER_*`` variable removed from their
environment, so no settings file or variable of the caller leaks in.

The worker is a tiny Python script (stdlib only) that sleeps ``--sleep`` seconds, then sets
its phase COMPLETE with ``psql`` (run as a subprocess, the ids passed as psql variables;
``updated_at`` stamped in UTC, as Autopack's models stamp it) and exits 0; exit 3: psql
failed or updated no row. ``psql`` was chosen over a Python worker that imports asyncpg
because it is cheaper per attempt: about 75 ms against about 140 ms of start-up and round
trip on a 2-core machine. drainer hands workers the sync form of the URL in
``DATABASE_URL`` (``postgresql://...``); the worker strips a ``+driver`` part, should there be
one, because libpq does not understand it.

Figures per configuration (the median over ``--repeat`` drains):

* ``wall_s``: from just before the first drainer is started to the exit of the last one
  (process start-up, schema check and session files included);
* ``complete``: phases COMPLETE at the end (must be all of them);
* ``phases/s``: COMPLETE phases / wall time; ``vs_1xN``: that throughput over the one of the
  ``1x(D*L)`` configuration (added to the list if missing), the target being >= 0.95;
* ``ideal_s``: the sleep-only lower bound ``max(ceil(phases / (D*L)), phases_per_run) * sleep``;
* per drainer: attempts made and succeeded, lease claims and those refused because another
  drainer held the run (``claims`` / ``claims_refused`` from its ``<session>/session.json``;
  null where this drainer version does not report them), ``stale`` claims (claims - refused -
  attempts: the phase was no longer FAILED when read under the lease, another drainer had
  drained it meanwhile), its exit time, stop reason, and its CPU time (user + sys).
  ``cpu_s`` is the drainer process alone (read from ``/proc/<pid>/stat`` once it has exited
  and before it is reaped, Linux only); ``tree_cpu_s`` is ``os.wait4``'s rusage, which
  includes every descendant the drainer waited for, i.e. its workers and their ``psql`` too.

Targets, each with a printed verdict: every ``DxL`` (D > 1) reaches at least 0.95 of the
throughput of ``1x(D*L)``; and in every drain, each drainer's refused claims are at most its
successful attempts (drainers should not spend more round trips colliding than working).

``--repeat K`` drains every configuration K times, alternating (1x12, 3x4, 1x12, 3x4, ...) so
that a slow spell of a shared machine hits them alike; wall time is the median of the K drains,
and the per-drainer figures are those of the median drain (the lower middle one for an even K).
The JSON holds every drain.

Cost of the defaults (48 runs x 2 phases x 0.3 s, configs 1x12,3x4): the sleeps alone take
8 x 0.3 = 2.4 s per drain; worker start-up (~75 ms each, 96 per drain, 12 at once on 2 cores),
drainer start-up and the database clone bring each drain to about 5-10 s, so about half a
minute with ``--repeat 2``. The cost grows linearly with runs x phases-per-run and ``--repeat``.
On 2 cores the defaults are CPU-bound rather than sleep-bound (12 workers of ~80 ms CPU each
per 0.3 s sleep want more than 2 cores), so ``wall_s`` sits well above ``ideal_s`` and every
drainer process's own CPU (start-up, claims) competes with the workers'.

Needs a PostgreSQL server (``--admin-url``, default ``$DRAINER_TEST_PG`` or
``postgresql://postgres@127.0.0.1:5432/test``) whose user may create databases, ``psql`` on
the PATH and asyncpg. The databases it makes are named ``drainer_bench_multi_<hex>`` and
dropped at the end.

Usage::

    python benchmarks/multi.py [--runs 48] [--phases-per-run 2] [--sleep 0.3]
                               [--configs 1x12,3x4] [--repeat 1] [--admin-url URL]
                               [--json PATH|-]

``--json -`` writes the JSON to stdout (the tables then go to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    add_backlog_options,
    check_backlog_options,
    machine_info,
    pg_admin,
    pg_schema,
    pg_state_counts,
    pg_url,
    print_table,
    write_report,
)

DEFAULT_RUNS = 48
DEFAULT_PHASES_PER_RUN = 2
DEFAULT_SLEEP = 0.3
DEFAULT_CONFIGS = "1x12,3x4"
DEFAULT_ADMIN_URL = os.environ.get("DRAINER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-multi.json"
TARGET_RATIO = 0.95
PHASE_TIMEOUT = 60.0
DB_PREFIX = "drainer_bench_multi_"
NOT_REPORTED = "not reported by this drainer version"

# The worker: stdlib only. It sleeps argv[1] seconds, then sets its phase COMPLETE through
# psql (argv[2]), the ids passed as psql variables (quoted by psql, never by us), stamping
# updated_at in UTC as Autopack's models do, and exits 0; exit 3: psql failed or updated no row.
WORKER = textwrap.dedent(
    """\
    import os, subprocess, sys, time
    seconds = float(sys.argv[1])
    if seconds > 0:
        time.sleep(seconds)
    scheme, sep, rest = os.environ["DATABASE_URL"].partition("://")
    url = scheme.split("+", 1)[0] + sep + rest  # libpq knows no +driver
    done = subprocess.run(
        [sys.argv[2], "-X", "-v", "ON_ERROR_STOP=1", "-d", url,
         "-v", "run=" + os.environ["DRAINER_RUN_ID"],
         "-v", "phase=" + os.environ["DRAINER_PHASE_ID"]],
        input="UPDATE phases SET state = 'COMPLETE', updated_at = timezone('UTC', now())"
              " WHERE run_id = :'run' AND phase_id = :'phase';\\n",
        capture_output=True, text=True)
    if done.returncode != 0 or done.stdout.strip() != "UPDATE 1":
        sys.stderr.write(done.stderr)
        sys.exit(3)
    """
)


# -- the backlog ---------------------------------------------------------------------------


async def _build_template(admin_url: str, name: str, runs: int, phases_per_run: int) -> None:
    import asyncpg

    await pg_admin(admin_url, f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(pg_url(admin_url, name), timeout=10)
    try:
        await conn.execute(pg_schema())
        async with conn.transaction():
            for r in range(runs):
                run_id = f"multi-{r:05d}"
                await conn.execute(
                    "INSERT INTO runs (id, state) VALUES ($1, 'RUN_FINISHED')", run_id)
                tier = await conn.fetchval(
                    "INSERT INTO tiers (tier_id, run_id, tier_index, name) "
                    "VALUES ('T1', $1, 0, 't') RETURNING id", run_id)
                await conn.executemany(
                    "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state,"
                    " last_failure_reason) VALUES ($1, $2, $3, $4, $5, 'FAILED', $6)",
                    [(f"p{i:02d}", run_id, tier, i, f"phase {i}",
                      "Deliverable missing: src/x.py was not created")
                     for i in range(phases_per_run)])
    finally:
        await conn.close()


async def _server_version(admin_url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# -- one drain: D drainer processes at once ------------------------------------------------


def _own_cpu_s(pid: int) -> float | None:
    """user + sys of ``pid`` itself (not its children), read from ``/proc`` while it is a
    zombie; None where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _session_info(session_dir: Path) -> dict[str, Any] | None:
    found = sorted(session_dir.glob("*/session.json"))
    if len(found) != 1:
        return None
    data: dict[str, Any] = json.loads(found[0].read_text(encoding="utf-8"))
    return data


def compile_drainer() -> bool:
    """Compile drainer's modules to bytecode in their ``__pycache__``, as ``pip install``
    does for a regular install; True when that worked. An editable install run with
    ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines) would otherwise compile every module
    at every start of every drainer process, which a D-drainer configuration pays D times."""
    import drainer

    return bool(compileall.compile_dir(Path(drainer.__file__).parent, quiet=1))


def _child_env() -> dict[str, str]:
    """The caller's environment without drainer's variables (``DRAINER_*``, ``DATABASE_URL``),
    so that only the command line configures the drainers."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("DRAINER_") and k != "DATABASE_URL"}


def drain_once(
    drainers: int, lanes: int, *, url: str, phases: int, worker_cmd: list[str],
    workdir: Path, deadline_s: float,
) -> dict[str, Any]:
    """Start ``drainers`` drainer processes of ``lanes`` lanes on ``url`` at once and wait
    for all; the figures of the drain."""
    env = _child_env()
    big = str(max(phases, 1) * 1000)  # "off": far above anything one session can reach
    procs: list[subprocess.Popen[bytes]] = []
    dirs = [workdir / f"drainer-{n + 1}" for n in range(drainers)]
    for session_dir in dirs:
        session_dir.mkdir(parents=True)
    with contextlib.ExitStack() as logs:
        outputs = [logs.enter_context(open(d / "output.log", "wb")) for d in dirs]
        t0 = time.perf_counter()
        try:
            for session_dir, log in zip(dirs, outputs, strict=True):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "drainer", "run", "--plain",
                     "--database-url", url, "--command", shlex.join(worker_cmd),
                     "--workspace", str(workdir), "--session-dir", str(session_dir),
                     "--lanes", str(lanes), "--batch-size", str(phases),
                     "--max-attempts-per-phase", "1",
                     "--phase-timeout-seconds", f"{PHASE_TIMEOUT:g}",
                     "--max-fingerprint-repeats", big, "--max-timeouts-per-run", big],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=workdir, env=env))
            exits = _reap_all(procs, t0, deadline_s)
        finally:
            for p in procs:
                if p.returncode is None:  # only after an error above: leave none running
                    p.kill()
                    p.wait()
    wall_s = max(e["exit_s"] for e in exits)
    per: list[dict[str, Any]] = []
    for n, (session_dir, ex) in enumerate(zip(dirs, exits, strict=True)):
        info = _session_info(session_dir)
        totals = (info or {}).get("totals") or {}
        row: dict[str, Any] = {
            "drainer": n + 1,
            "exit_code": ex["exit_code"],
            "exit_s": ex["exit_s"],
            "cpu_s": ex["cpu_s"],
            "tree_cpu_s": ex["tree_cpu_s"],
            "attempts": totals.get("processed"),
            "succeeded": totals.get("ok"),
            "stop_reason": (info or {}).get("stop_reason"),
            "claims": (info or {}).get("claims"),
            "claims_refused": (info or {}).get("claims_refused"),
        }
        # Claims that were neither refused nor led to an attempt: the phase was no longer
        # FAILED when read under the lease (drained by another drainer meanwhile).
        row["claims_stale"] = (
            row["claims"] - row["claims_refused"] - row["attempts"]
            if None not in (row["claims"], row["claims_refused"], row["attempts"]) else None)
        if info is None:
            row["note"] = "no session.json found"
        elif "claims_refused" not in info:
            row["note"] = f"claims_refused {NOT_REPORTED}"
        if ex["exit_code"] != 0:
            tail = (session_dir / "output.log").read_text(encoding="utf-8", errors="replace")
            row["output_tail"] = tail[-2000:]
        per.append(row)
    return {"wall_s": wall_s, "timed_out": any(e["killed"] for e in exits), "drainers": per}


def _reap_all(
    procs: list[subprocess.Popen[bytes]], t0: float, deadline_s: float
) -> list[dict[str, Any]]:
    """Wait for every process of ``procs``, in the order they exit; per process its exit
    time since ``t0``, exit code, own CPU (read before reaping) and tree CPU (``wait4``).
    Past ``deadline_s``, SIGTERM (then SIGKILL 15 s later) to those still running."""
    by_pid = {p.pid: i for i, p in enumerate(procs)}
    out: list[dict[str, Any] | None] = [None] * len(procs)
    killed = threading.Event()

    def stop(sig: int) -> None:
        killed.set()
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    timers = [threading.Timer(deadline_s, stop, (signal.SIGTERM,)),
              threading.Timer(deadline_s + 15, stop, (signal.SIGKILL,))]
    for t in timers:
        t.daemon = True
        t.start()
    try:
        pending = len(procs)
        while pending:
            own: float | None = None
            if hasattr(os, "waitid"):
                # Learn who exited without reaping it: a zombie's /proc/<pid>/stat still
                # holds its own CPU time.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
                assert info is not None
                pid = info.si_pid
                ended = time.perf_counter()
                own = _own_cpu_s(pid)
                _, status, usage = os.wait4(pid, 0)
            else:
                pid, status, usage = os.wait4(-1, 0)
                ended = time.perf_counter()
            i = by_pid.get(pid)
            if i is None:
                continue  # not one of ours
            code = os.waitstatus_to_exitcode(status)
            procs[i].returncode = code  # reaped here: Popen must not wait for it again
            out[i] = {"exit_s": ended - t0, "exit_code": code, "cpu_s": own,
                      "tree_cpu_s": usage.ru_utime + usage.ru_stime,
                      "killed": killed.is_set()}
            pending -= 1
    finally:
        for t in timers:
            t.cancel()
    return [e for e in out if e is not None]


# -- the driver ----------------------------------------------------------------------------


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``1x12,3x4`` as [(1, 12), (3, 4)]: drainers x lanes each, in order, no duplicates."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*[xX*]\s*(\d+)", part)
        if m is None or int(m[1]) < 1 or int(m[2]) < 1:
            raise argparse.ArgumentTypeError(
                f"--configs expects DxL pairs of positive numbers like 1x12,3x4, got {part!r}")
        pair = (int(m[1]), int(m[2]))
        if pair not in out:
            out.append(pair)
    if not out:
        raise argparse.ArgumentTypeError("--configs expects DxL pairs like 1x12,3x4")
    return out


def ideal_wall_s(phases: int, phases_per_run: int, sleep: float, total_lanes: int) -> float:
    """Sleep-only lower bound: at most ``total_lanes`` phases at once, one per run at once."""
    return max(math.ceil(phases / total_lanes), phases_per_run) * sleep


def summarise(d: int, lanes: int, drains: list[dict[str, Any]], phases: int) -> dict[str, Any]:
    """One configuration's row: the median wall time of its drains, the median drain's
    per-drainer figures."""
    walls = [x["wall_s"] for x in drains]
    wall = statistics.median(walls)
    middle = sorted(drains, key=lambda x: x["wall_s"])[(len(drains) - 1) // 2]
    per = middle["drainers"]
    refused = [r["claims_refused"] for r in per]
    return {
        "config": f"{d}x{lanes}",
        "drainers": d,
        "lanes": lanes,
        "total_lanes": d * lanes,
        "wall_s": wall,
        "wall_s_each": walls,
        "complete": middle["complete"],
        "phases": phases,
        "all_complete": all(x["complete"] == phases for x in drains),
        "phases_per_s": middle["complete"] / wall if wall > 0 else None,
        "attempts_each": [r["attempts"] for r in per],
        "attempts_total": sum(r["attempts"] or 0 for r in per),
        "claims_refused_each": refused,
        "cpu_s_each": [r["cpu_s"] for r in per],
        "tree_cpu_s_each": [r["tree_cpu_s"] for r in per],
        "median_drain": middle,
        "drains": drains,
    }


def _joined(values: Sequence[Any], fmt: str = "{}") -> str:
    return "/".join("-" if v is None else fmt.format(v) for v in values)


SUMMARY_COLUMNS = (
    ("config", "config", "{}"),
    ("lanes", "total_lanes", "{}"),
    ("ideal_s", "ideal_s", "{:.2f}"),
    ("wall_s", "wall_s", "{:.2f}"),
    ("phases/s", "phases_per_s", "{:.2f}"),
    ("vs_1xN", "ratio", "{:.3f}"),
    ("complete", "complete_text", "{}"),
    ("attempts", "attempts_text", "{}"),
    ("refused", "refused_text", "{}"),
    ("cpu_s", "cpu_text", "{}"),
    ("tree_cpu_s", "tree_cpu_text", "{}"),
)

DRAINER_COLUMNS = (
    ("config", "config", "{}"),
    ("drainer", "drainer", "{}"),
    ("attempts", "attempts", "{}"),
    ("ok", "succeeded", "{}"),
    ("claims", "claims", "{}"),
    ("refused", "claims_refused", "{}"),
    ("stale", "claims_stale", "{}"),
    ("exit_s", "exit_s", "{:.2f}"),
    ("cpu_s", "cpu_s", "{:.2f}"),
    ("tree_cpu_s", "tree_cpu_s", "{:.2f}"),
    ("exit", "exit_code", "{}"),
    ("stop_reason", "stop_reason", "{}"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_backlog_options(parser, runs=DEFAULT_RUNS, phases_per_run=DEFAULT_PHASES_PER_RUN,
                        sleep=DEFAULT_SLEEP)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="DxL = D drainers of L lanes each, comma separated; a missing "
                             "1x(D*L) baseline is added (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="drains per configuration, alternating; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL,
                        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE "
                             "(default: $DRAINER_TEST_PG or %(default)s)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    check_backlog_options(parser, args)
    try:
        configs = parse_configs(args.configs)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    for d, lanes in list(configs):
        if d > 1 and (1, d * lanes) not in configs:
            configs.insert(configs.index((d, lanes)), (1, d * lanes))
    psql = shutil.which("psql")
    if psql is None:
        parser.error("psql is not on the PATH (the worker sets its phase COMPLETE with it)")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        parser.error("asyncpg is not installed (pip install -e '.[postgres]')")

    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    compiled = compile_drainer()
    if not compiled:
        print("WARNING: drainer's modules could not all be compiled to bytecode; with "
              "PYTHONDONTWRITEBYTECODE set, each drainer process compiles them as it starts",
              file=out, flush=True)
    runs, per_run, sleep = args.runs, args.phases_per_run, args.sleep
    phases = runs * per_run
    ideal = {c: ideal_wall_s(phases, per_run, sleep, c[0] * c[1]) for c in configs}
    print(f"{runs} runs x {per_run} phases = {phases} phases, worker sleeps {sleep:g} s; "
          f"configs {', '.join(f'{d}x{n}' for d, n in configs)}, {args.repeat} drain(s) each; "
          f"about {sum(ideal.values()) * args.repeat:.0f} s of sleeps in all",
          file=out, flush=True)

    drains: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    created: list[str] = []
    template = f"{DB_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        with tempfile.TemporaryDirectory(prefix="drainer-bench-multi-") as tmp:
            workdir = Path(tmp)
            worker = workdir / "worker.py"
            worker.write_text(WORKER, encoding="utf-8")
            worker_cmd = [sys.executable, str(worker), repr(sleep), psql]
            created.append(template)
            try:
                server = asyncio.run(_server_version(args.admin_url))
                asyncio.run(_build_template(args.admin_url, template, runs, per_run))
            except Exception as exc:
                raise SystemExit(f"cannot build the backlog at {args.admin_url}: {exc}") from exc
            for rep in range(args.repeat):
                for d, lanes in configs:
                    name = f"{DB_PREFIX}{uuid.uuid4().hex[:12]}"
                    created.append(name)
                    asyncio.run(pg_admin(args.admin_url,
                                       f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
                    url = pg_url(args.admin_url, name)
                    print(f"{d}x{lanes} (drain {rep + 1} of {args.repeat}): {d} drainer(s) of "
                          f"{lanes} lane(s), ideal {ideal[(d, lanes)]:.1f} s...",
                          file=sys.stderr, flush=True)
                    run_dir = workdir / f"{d}x{lanes}-{rep + 1}"
                    result = drain_once(
                        d, lanes, url=url, phases=phases, worker_cmd=worker_cmd,
                        workdir=run_dir,
                        deadline_s=60 + 20 * ideal[(d, lanes)] + 0.5 * phases)
                    states = asyncio.run(pg_state_counts(url))
                    result["final_states"] = states
                    result["complete"] = states.get("COMPLETE", 0)
                    result["repetition"] = rep + 1
                    drains[(d, lanes)].append(result)
                    asyncio.run(pg_admin(args.admin_url,
                                       f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    created.remove(name)
                    shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        for name in created:
            try:
                asyncio.run(pg_admin(args.admin_url,
                                   f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:  # report, and go on dropping the others
                print(f"WARNING: could not drop database {name}: {exc}", file=sys.stderr)

    rows = [summarise(d, lanes, drains[(d, lanes)], phases) for d, lanes in configs]
    by_config = {(r["drainers"], r["lanes"]): r for r in rows}
    for r in rows:
        base = by_config.get((1, r["total_lanes"]))
        r["ideal_s"] = ideal[(r["drainers"], r["lanes"])]
        r["ratio"] = (r["phases_per_s"] / base["phases_per_s"]
                      if r["drainers"] > 1 and base is not None and base["phases_per_s"]
                      and r["phases_per_s"] is not None else None)
        r["complete_text"] = f"{r['complete']}/{phases}"
        r["attempts_text"] = _joined(r["attempts_each"])
        r["refused_text"] = _joined(r["claims_refused_each"])
        r["cpu_text"] = _joined(r["cpu_s_each"], "{:.2f}")
        r["tree_cpu_text"] = _joined(r["tree_cpu_s_each"], "{:.2f}")
    print_table(rows, SUMMARY_COLUMNS, out)
    print(f"\nper drainer ({'the median drain' if args.repeat > 1 else 'the drain'} of each "
          "config; cpu_s = the drainer process alone, tree_cpu_s = with its workers and psql):",
          file=out)
    print_table([{"config": r["config"], **x} for r in rows for x in r["median_drain"]["drainers"]],
                DRAINER_COLUMNS, out)

    # -- verdicts
    print(file=out)
    throughput_met: bool | None = None
    for r in rows:
        if r["drainers"] == 1:
            continue
        if r["ratio"] is None:
            print(f"{r['config']}: no throughput ratio (no 1x{r['total_lanes']} figure)", file=out)
            continue
        ok = r["ratio"] >= TARGET_RATIO and r["all_complete"]
        throughput_met = ok if throughput_met is None else throughput_met and ok
        print(f"{r['config']}: throughput {r['phases_per_s']:.2f} phases/s = {r['ratio']:.3f} "
              f"of 1x{r['total_lanes']}'s; {'meets' if ok else 'MISSES'} the >= {TARGET_RATIO} "
              "target", file=out)
    claims_met: bool | None = None
    unreported = False
    for r in rows:
        if r["drainers"] == 1:
            continue
        worst: tuple[float, dict[str, Any], int] | None = None
        for drain in r["drains"]:
            for x in drain["drainers"]:
                if x["claims_refused"] is None:
                    unreported = True
                    continue
                share = x["claims_refused"] / max(x["succeeded"] or 0, 1)
                if worst is None or share > worst[0]:
                    worst = (share, x, drain["repetition"])
        if worst is None:
            continue
        ok = all(x["claims_refused"] <= (x["succeeded"] or 0)
                 for drain in r["drains"] for x in drain["drainers"]
                 if x["claims_refused"] is not None)
        claims_met = ok if claims_met is None else claims_met and ok
        x = worst[1]
        print(f"{r['config']}: claims refused <= successful attempts for every drainer in every "
              f"drain: {'yes' if ok else 'NO'} (worst: drainer {x['drainer']} of drain "
              f"{worst[2]}, {x['claims_refused']} refused, {x['succeeded']} succeeded)", file=out)
    if unreported:
        print(f"claims_refused: {NOT_REPORTED} (null in the JSON)", file=out)
    if not all(r["all_complete"] for r in rows):
        print("WARNING: some phases did not end COMPLETE (see complete)", file=out)
    if any(d["timed_out"] for r in rows for d in r["drains"]):
        print("WARNING: some drains were stopped at their deadline", file=out)
    failed = [x for r in rows for d in r["drains"] for x in d["drainers"] if x["exit_code"] != 0]
    if failed:
        print(f"WARNING: {len(failed)} drainer(s) exited with a non-zero status (output_tail in "
              "the JSON); the first one's output ends:", file=out)
        print(textwrap.indent(failed[0].get("output_tail", "").rstrip()[-1500:], "    "),
              file=out)
    dup = [r["config"] for r in rows if r["attempts_total"] > phases]
    if dup:
        print(f"WARNING: more attempts than phases in {', '.join(dup)}: some phase was attempted "
              "twice", file=out)

    for r in rows:
        for key in ("complete_text", "attempts_text", "refused_text", "cpu_text",
                    "tree_cpu_text"):
            del r[key]
    report = {
        "benchmark": "multi",
        "runs": runs,
        "phases_per_run": per_run,
        "phases": phases,
        "sleep_s": sleep,
        "repeat": args.repeat,
        "statistic": "median wall time over repeat drains per config (alternating); "
                     "per-drainer figures from the median drain (lower middle for even repeat)",
        "phase_timeout_s": PHASE_TIMEOUT,
        "worker": [sys.executable, "worker.py", repr(sleep), psql],
        "worker_kind": "python stdlib + psql subprocess",
        "cpu": {"cpu_s": "the drainer process alone (/proc/<pid>/stat of the exited drainer)",
                "tree_cpu_s": "os.wait4 rusage: the drainer and every descendant it waited "
                              "for (its workers and their psql)"},
        "target": {
            "throughput_ratio_at_least": TARGET_RATIO,
            "baseline": "1x(D*L): one drainer with the same total lanes",
            "claims_refused_at_most": "successful attempts, per drainer, in every drain",
            "throughput_met": throughput_met,
            "claims_met": claims_met,
        },
        "drainer_bytecode_compiled": compiled,
        "machine": {**machine_info(), "postgresql": server,
                    "asyncpg": importlib.metadata.version("asyncpg")},
        "results": rows,
    }
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
