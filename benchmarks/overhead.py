"""Benchmark: drainer's per-attempt cost against a plain spawn-and-wait loop and GNU parallel.

The backlog is a synthetic Autopack-schema database of ``--attempts`` runs with one FAILED
phase each, on every backend of ``--backend``:

* ``sqlite`` (the default): a template file built once; every loop drains a fresh copy of it.
* ``postgres`` (opt-in): Autopack's schema in PostgreSQL's dialect in a template database
  built once (``drainer_bench_<hex>_tpl``); every loop drains a fresh database cloned from it
  (``CREATE DATABASE ... TEMPLATE``) and dropped afterwards, so every loop starts from the
  same state. It needs ``asyncpg`` and a server answering at ``$DRAINER_TEST_PG`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``, the admin database; the benchmark's own
  databases get the same user, host and port); otherwise it is skipped with a note.

For every (backend, worker) pair, the loops of ``--loops`` run one after the other in each of
``--rounds`` rounds, their order rotated from round to round (round ``i`` starts with loop
``i mod len(loops)``), so that drift (caches, CPU clock) favours no loop; the median round is
reported. Rounds are interleaved across the pairs too: round 1 of every pair, then round 2...
Before the rounds, every loop of every pair runs once untimed over the first
``WARMUP_ATTEMPTS`` phases (first-use imports, page cache), its figures discarded.

* **plain**: for each phase in turn, ``subprocess.run(worker)`` with the environment drainer
  gives a worker (``DATABASE_URL``, ``DRAINER_SESSION_ID``, ``DRAINER_RUN_ID``,
  ``DRAINER_PHASE_ID``, ``DRAINER_ATTEMPT_ID``, ``PYTHONUTF8``...), stdin closed and
  stdout/stderr captured; the ids are put in the command's ``{run_id}``/``{phase_id}`` as
  drainer would.
* **drainer**: :func:`drainer.drain` with ``lanes=1``, ``batch_size`` = every phase,
  ``max_attempts_per_phase=1`` and no fingerprint/timeout stop rules, as ``python -m drainer
  run`` runs it (the process is its workers' child subreaper, worker exits watched through
  pidfds); the wall time of ``anyio.run(drain, ...)`` (event loop, engine, schema check,
  session files and final snapshot included).
* **unrecorded**: the same with ``history=False`` (``--no-history``): no row in
  ``drainer_attempts`` per attempt. ``history_ms`` = (drainer - unrecorded) / attempts is
  what the history costs (target: at most 1 ms per attempt), ``history_cpu_ms`` its CPU.
* **parallel**: GNU parallel ``--will-cite -j1``, when a GNU ``parallel`` is on PATH (else
  skipped with a note). It reads one line per phase (``run_id TAB phase_id TAB attempt_id``,
  written before the clock starts) with ``--colsep``; each job is
  ``DRAINER_RUN_ID={1} DRAINER_PHASE_ID={2} DRAINER_ATTEMPT_ID={3} <worker command>``, the
  command's ids being ``{1}`` and ``{2}``: the assignments are made by the shell parallel
  starts for every job anyway (``$SHELL -c``; no extra ``env`` process), the rest of the
  environment is parallel's own, the same as the plain loop's. parallel captures the jobs'
  output as it normally does (two temporary files per job, in ``--tmpdir`` = the benchmark's
  directory, like drainer's two log files per attempt) and prints it; its stdout goes to
  /dev/null. The wall time is that of ``subprocess.run(parallel ...)``.

CPU. For plain and drainer, ``cpu`` is the loop's own process (``time.process_time``, all
threads), the workers excluded; their workers' CPU is reported apart (``*_children_cpu_ms``,
from ``getrusage(RUSAGE_CHILDREN)`` deltas). For parallel only the whole tree is measurable
from outside: the ``RUSAGE_CHILDREN`` delta holds parallel's Perl process, its start-up
helpers, one shell per job AND the workers (``parallel_cpu_ms``); its own share is estimated
as that minus the plain loop's workers' CPU (``parallel_own_cpu_est_ms``, an estimate). So
compare ``drainer_total_cpu_ms`` (drainer + its workers) with ``parallel_cpu_ms``. On
PostgreSQL the server's CPU (the backends serving drainer and the workers) is in no figure.

Workers (``--worker``):

* ``noop`` (alias ``python``): a tiny standalone Python script (stdlib ``sqlite3`` only) that
  sets its phase COMPLETE and exits 0: the realistic minimal worker. SQLite only: a
  stdlib-only Python script cannot talk to PostgreSQL (skipped there with a note).
* ``true``: ``/bin/true``. It changes nothing, so under drainer every attempt "fails" (the
  phase stays FAILED) and is recorded as such; that is fine: only the cost is measured.
* ``sqlite3`` (aliases ``cli``, ``psql``): the database's command-line client sets the phase
  COMPLETE: ``sqlite3 -cmd '.timeout 30000' <file> "UPDATE phases SET state = 'COMPLETE'
  WHERE run_id = '{run_id}' AND phase_id = '{phase_id}'"`` on SQLite, and its counterpart
  ``psql -q -X -d <url> -c "UPDATE ..."`` on PostgreSQL (reported as ``psql``; the real client:
  where the ``psql`` on PATH is Debian's ``pg_wrapper`` Perl script, which costs ~35 ms a call,
  the newest ``/usr/lib/postgresql/<major>/bin/psql``). drainer fills
  placeholders inside a larger token (``render_command``), so the SQL is one token; the
  synthetic ids are plain strings that need no quoting.

Reported per (backend, worker), in ms per attempt (median round / attempts): each loop's wall
time, plain's and drainer's own CPU, parallel's whole-tree CPU, ``ratio`` = drainer / plain,
``ratio_parallel`` = drainer / parallel and ``overhead_ms`` = (drainer - plain) / attempts.
``in_worker_ms`` is drainer's own measure of the worker's run time (spawn to exit). Targets
(``../shared/TARGETS.md``): ratio <= 1.10 for noop on SQLite; drainer's CPU <= 3 ms per
attempt with ``true`` on SQLite; and drainer's wall time below GNU parallel's in every row
where parallel ran. Checks: every phase ends COMPLETE (noop, sqlite3, psql) or stays FAILED
(true) after every loop, every worker exits 0, drainer makes one attempt per phase.

Creating a file is not free and its cost depends on the file system: on some machines it costs
~0.25 ms of CPU under /tmp but ~0.01 ms elsewhere, and drainer creates two log files per
attempt (parallel two temporary files, the plain loop none). So the backlogs, session files
and parallel's temporary files live in ``--dir`` (default: the system temporary directory),
and the JSON records, per backend, the median cost of one ``os.open(O_CREAT)`` of an empty
file in a fresh subdirectory there (``file_create``: wall and CPU microseconds, 500 calls);
the table's footer prints it. Nothing is deleted from ``--dir`` before the run ends: on ext4,
files created next to files deleted in the last minutes cost up to 30 times more (see
``FILE_PROBES``), and the loops would pay for each other's clean-up.

Cost of the defaults: 3 rounds x 200 attempts x 4 loops x (3 workers' start-up + overhead),
one to two minutes on a 2-core machine (the noop worker dominates); ``--backend postgres``
adds about as much again.

Usage::

    python benchmarks/overhead.py [--attempts 200] [--rounds 3]
                                  [--loops drainer,unrecorded,plain,parallel]
                                  [--worker noop,true,sqlite3] [--backend sqlite[,postgres]]
                                  [--dir DIR] [--json PATH|-]

``--json -`` writes the JSON to stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from _common import (
    autopack_schema,
    machine_info,
    pg_admin,
    pg_schema,
    pg_state_counts,
    pg_url,
    write_report,
)
from _common import print_table as _print_table

DEFAULT_ATTEMPTS = 200
DEFAULT_ROUNDS = 3
LOOPS = ("drainer", "unrecorded", "plain", "parallel")
WORKERS = ("noop", "true", "sqlite3")
BACKENDS = ("sqlite", "postgres")
WORKER_ALIASES = {"noop": "noop", "python": "noop", "true": "true",
                  "sqlite3": "sqlite3", "cli": "sqlite3", "psql": "sqlite3"}
BACKEND_ALIASES = {"sqlite": "sqlite", "postgres": "postgres", "postgresql": "postgres",
                   "pg": "postgres"}
DEFAULT_JSON = Path(tempfile.gettempdir()) / "drainer-bench-overhead.json"
PG_ADMIN_URL = os.environ.get("DRAINER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
TARGET_RATIO = 1.10  #: for a Python worker (noop), SQLite
TARGET_CPU_MS = 3.0  #: drainer's CPU per attempt with /bin/true (SQLite, one lane)
TARGET_HISTORY_MS = 1.0  #: what recording each attempt in the history may add (wall)
PHASE_TIMEOUT = 60.0
#: Nothing the benchmark creates in --dir (session files, the file probe's files) is deleted
#: before the run ends. On ext4 a new file does not reuse an inode freed in the last minute
#: (five more while that inode's table block is unwritten): the allocator checks each such
#: inode it passes (``recently_deleted()`` in the kernel's ``fs/ext4/ialloc.c``; perf put
#: 65% of a slow create there). Deleting one loop's 2 x N log files made the next loop's
#: creates in that directory's block group cost 200 to 700 us of CPU each, not ~20, which
#: was the benchmark's own doing, not drainer's.
FILE_PROBES = 500  #: os.open(O_CREAT) calls timed per backend
WARMUP_ATTEMPTS = 5  #: phases per untimed warm-up loop
REASON = "Deliverable missing: src/x.py was not created"
SET_COMPLETE = ("UPDATE phases SET state = 'COMPLETE' "
                "WHERE run_id = '{run_id}' AND phase_id = '{phase_id}'")

# The noop worker: stdlib only and as little as possible, so its start-up stays small. It
# moves its phase to COMPLETE (the contract) and exits 0; exit 3: the phase does not exist.
NOOP_WORKER = textwrap.dedent(
    """\
    import os, sqlite3, sys
    db = sqlite3.connect(os.environ["DATABASE_URL"][len("sqlite:///"):], timeout=30,
                         isolation_level=None)
    cur = db.execute("UPDATE phases SET state = 'COMPLETE' WHERE run_id = ? AND phase_id = ?",
                     (os.environ["DRAINER_RUN_ID"], os.environ["DRAINER_PHASE_ID"]))
    db.close()
    sys.exit(0 if cur.rowcount == 1 else 3)
    """
)

Keys = list[tuple[str, str]]
Result = dict[str, Any]


def make_keys(runs: int) -> Keys:
    return [(f"overhead-{r:05d}", "p00") for r in range(runs)]


# -- SQLite backlogs -----------------------------------------------------------------------


def build_backlog(path: Path, keys: Keys) -> None:
    """Write one FAILED phase per key (each its own run) to a new SQLite file."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(autopack_schema())
        conn.execute("PRAGMA synchronous=OFF")  # a fixture: durability does not matter here
        conn.execute("BEGIN")
        for run_id, phase_id in keys:
            conn.execute("INSERT INTO runs (id, state) VALUES (?, 'RUN_FINISHED')", (run_id,))
            tier_pk = conn.execute(
                "INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES ('T1', ?, 0, 't')",
                (run_id,),
            ).lastrowid
            conn.execute(
                "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state,"
                " last_failure_reason) VALUES (?, ?, ?, 0, 'phase 0', 'FAILED', ?)",
                (phase_id, run_id, tier_pk, REASON),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def fresh_copy(template: Path, path: Path) -> Path:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, path)
    return path


class Backlog(Protocol):
    name: str

    def fresh(self) -> str:
        """A backlog in its initial state; its DATABASE_URL."""

    def states(self, url: str) -> dict[str, int]:
        """How many phases are in each state."""

    def discard(self, url: str) -> None: ...

    def close(self) -> None: ...


class SqliteBacklog:
    name = "sqlite"

    def __init__(self, workdir: Path, keys: Keys) -> None:
        self.template = workdir / "template.db"
        self.path = workdir / "backlog.db"
        build_backlog(self.template, keys)

    def fresh(self) -> str:
        fresh_copy(self.template, self.path)
        return f"sqlite:///{self.path}"

    def states(self, url: str) -> dict[str, int]:
        conn = sqlite3.connect(sqlite_path(url))
        try:
            rows = conn.execute("SELECT state, COUNT(*) FROM phases GROUP BY state").fetchall()
        finally:
            conn.close()
        return {str(state): int(n) for state, n in rows}

    def discard(self, url: str) -> None:
        pass  # the next fresh() overwrites the copy; the directory goes at the end

    def close(self) -> None:
        pass


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):]


# -- PostgreSQL backlogs -------------------------------------------------------------------


def pg_database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def postgres_problem(admin_url: str) -> str | None:
    """None when asyncpg imports and the server answers, else why not (one line)."""
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[postgres]')"
    try:
        asyncio.run(pg_admin(admin_url, "SELECT 1"))
    except Exception as exc:  # any failure to reach it is a reason to skip
        return " ".join(f"no PostgreSQL answers at {admin_url}: {exc}".split())
    return None


async def pg_fill(url: str, keys: Keys) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(pg_schema())
        runs = [(run_id,) for run_id, _ in keys]
        await conn.executemany("INSERT INTO runs (id, state) VALUES ($1, 'RUN_FINISHED')", runs)
        await conn.executemany(
            "INSERT INTO tiers (tier_id, run_id, tier_index, name) VALUES ('T1', $1, 0, 't')",
            runs)
        await conn.executemany(
            "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state, "
            "last_failure_reason) SELECT $2, t.run_id, t.id, 0, 'phase 0', 'FAILED', $3 "
            "FROM tiers t WHERE t.run_id = $1",
            [(run_id, phase_id, REASON) for run_id, phase_id in keys])
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


class PostgresBacklog:
    """A template database built once; a clone of it per loop, dropped after the loop."""

    name = "postgres"

    def __init__(self, admin_url: str, keys: Keys) -> None:
        self.admin_url = admin_url
        self.prefix = f"drainer_bench_{uuid.uuid4().hex[:10]}"
        self.template = f"{self.prefix}_tpl"
        self.clones = 0
        self.live: list[str] = []
        self.create(self.template, template=None)
        asyncio.run(pg_fill(pg_url(admin_url, self.template), keys))

    def create(self, name: str, template: str | None) -> None:
        clause = f' TEMPLATE "{template}"' if template else ""
        asyncio.run(pg_admin(self.admin_url, f'CREATE DATABASE "{name}"{clause}'))
        self.live.append(name)

    def drop(self, name: str) -> None:
        asyncio.run(pg_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.live:
            self.live.remove(name)

    def fresh(self) -> str:
        self.clones += 1
        name = f"{self.prefix}_{self.clones}"
        self.create(name, template=self.template)
        return pg_url(self.admin_url, name)

    def states(self, url: str) -> dict[str, int]:
        return asyncio.run(pg_state_counts(url))

    def discard(self, url: str) -> None:
        self.drop(pg_database(url))

    def close(self) -> None:
        for name in list(reversed(self.live)):
            self.drop(name)


# -- workers -------------------------------------------------------------------------------


def program(name: str) -> str | None:
    """The absolute path of ``name`` on PATH (symlinks kept: a multi-call binary needs its
    name); for ``psql``, the real client rather than Debian's ``pg_wrapper``."""
    found = shutil.which(name)
    if found is None:
        return None
    if name == "psql" and Path(found).resolve().name == "pg_wrapper":
        return debian_psql() or str(Path(found).absolute())
    return str(Path(found).absolute())


def debian_psql() -> str | None:
    """The newest ``/usr/lib/postgresql/<major>/bin/psql``: Debian's ``psql`` on PATH is
    ``pg_wrapper``, a Perl script that picks a cluster's client (about 35 ms per call, and it
    must be run under the name ``psql``)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin/psql") if p.parent.parent.name
             .isdigit()]
    found.sort(key=lambda p: int(p.parent.parent.name))
    return str(found[-1]) if found else None


def worker_name(kind: str, backend: str) -> str:
    return "psql" if kind == "sqlite3" and backend == "postgres" else kind


def worker_problem(kind: str, backend: str) -> str | None:
    """Why ``kind`` cannot run on ``backend`` here (None: it can)."""
    if kind == "noop" and backend == "postgres":
        return ("the noop worker is a stdlib-only Python script, and the standard library "
                "cannot talk to PostgreSQL")
    if kind == "sqlite3":
        client = worker_name(kind, backend)
        if program(client) is None:
            return f"{client} is not on PATH"
    return None


def worker_command(kind: str, url: str, workdir: Path) -> list[str]:
    """The worker's command template (``{run_id}``/``{phase_id}`` placeholders) for ``url``."""
    if kind == "noop":
        return [sys.executable, str(workdir / "noop_worker.py")]
    if kind == "true":
        return [program("true") or "/bin/true"]
    if url.startswith("sqlite:///"):
        return [program("sqlite3") or "sqlite3", "-cmd", ".timeout 30000", sqlite_path(url),
                SET_COMPLETE]
    return [program("psql") or "psql", "-q", "-X", "-d", url, "-c", SET_COMPLETE]


def fill(template: Sequence[str], run_id: str, phase_id: str) -> list[str]:
    """The command for one phase (the templates here have no other braces)."""
    return [t.replace("{run_id}", run_id).replace("{phase_id}", phase_id) for t in template]


def find_gnu_parallel() -> tuple[str | None, str]:
    """(path, version line) of GNU parallel, or (None, why not)."""
    path = shutil.which("parallel")
    if path is None:
        return None, "GNU parallel is not on PATH"
    try:
        proc = subprocess.run([path, "--will-cite", "--version"], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} --version failed: {exc}"
    first = (proc.stdout.splitlines() or [""])[0]
    if not first.startswith("GNU parallel"):
        return None, f"{path} is not GNU parallel (moreutils' parallel?)"
    return path, first


# -- the three loops -----------------------------------------------------------------------


def children_cpu_s() -> float:
    """CPU of this process's waited-for descendants so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def base_env(url: str, session_id: str) -> dict[str, str]:
    """The environment drainer gives every worker, but the per-attempt ids."""
    env = dict(os.environ)
    env.update({"PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8", "TELEMETRY_DB_ENABLED": "1",
                "DATABASE_URL": url, "DRAINER_SESSION_ID": session_id})
    return env


def plain_loop(template: Sequence[str], url: str, keys: Keys, cwd: Path) -> Result:
    """Spawn and wait for the worker once per phase, sequentially; the environment drainer
    would give it, stdin closed, output captured (as any supervisor must)."""
    base = base_env(url, "plain-loop")
    bad = 0
    cpu0, kids0, t0 = time.process_time(), children_cpu_s(), time.perf_counter()
    for run_id, phase_id in keys:
        env = {**base, "DRAINER_ATTEMPT_ID": str(uuid.uuid4()), "DRAINER_RUN_ID": run_id,
               "DRAINER_PHASE_ID": phase_id}
        proc = subprocess.run(fill(template, run_id, phase_id), env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        bad += proc.returncode != 0
    wall_s = time.perf_counter() - t0
    return {"wall_s": wall_s, "cpu_s": time.process_time() - cpu0,
            "children_cpu_s": children_cpu_s() - kids0, "nonzero_exits": bad}


def drainer_loop(
    template: Sequence[str], url: str, attempts: int, session_dir: Path, cwd: Path,
    *, history: bool = True,
) -> Result:
    """One drain session, one lane; the wall time of ``anyio.run(drain)``. As under
    ``python -m drainer run``: the process is its workers' child subreaper, and worker exits
    are watched through pidfds."""
    import anyio

    from drainer import SessionSummary, drain, iter_attempts, reaper
    from drainer.config import DrainConfig
    from drainer.supervisor import pidfd_child_watcher

    reaper.become_subreaper()
    config = DrainConfig(
        database_url=url,
        command=list(template),
        workspace=cwd,
        session_dir=session_dir,
        batch_size=attempts,
        lanes=1,
        phase_timeout=PHASE_TIMEOUT,
        max_attempts_per_phase=1,
        max_fingerprint_repeats=None,
        max_timeouts_per_run=None,
        history=history,
    )

    async def run() -> SessionSummary:
        with pidfd_child_watcher():
            return await drain(config, echo=lambda _line: None)

    cpu0, kids0, t0 = time.process_time(), children_cpu_s(), time.perf_counter()
    summary = anyio.run(run)
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    kids_s = children_cpu_s() - kids0
    durations = [r.subprocess_duration_seconds for r in iter_attempts(summary.journal_path)]
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "children_cpu_s": kids_s,
        "attempts": summary.total_processed,
        "succeeded": summary.total_success,
        "stop_reason": summary.stop_reason,
        "in_worker_s": sum(durations),
    }


def parallel_job(template: Sequence[str]) -> str:
    """parallel's command line for one input line ``run_id TAB phase_id TAB attempt_id``: the
    per-attempt variables assigned by the job's shell, then the worker with ``{1}``/``{2}``."""
    return ("DRAINER_RUN_ID={1} DRAINER_PHASE_ID={2} DRAINER_ATTEMPT_ID={3} "
            + shlex.join(fill(template, "{1}", "{2}")))


def parallel_loop(
    parallel: str, template: Sequence[str], url: str, keys: Keys, workdir: Path
) -> Result:
    """GNU parallel -j1 over one line per phase; its stdout to /dev/null. CPU: only the whole
    tree (parallel, its shells, the workers) is measurable, as RUSAGE_CHILDREN."""
    lines = workdir / "parallel-input.tsv"
    lines.write_text("".join(f"{run_id}\t{phase_id}\t{uuid.uuid4()}\n"
                             for run_id, phase_id in keys), encoding="utf-8")
    argv = [parallel, "--will-cite", "-j1", "--tmpdir", str(workdir), "--colsep", "\t",
            "-a", str(lines), parallel_job(template)]
    env = base_env(url, "parallel-loop")
    cpu0, kids0, t0 = time.process_time(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall_s = time.perf_counter() - t0
    return {"wall_s": wall_s, "cpu_s": time.process_time() - cpu0,
            "children_cpu_s": children_cpu_s() - kids0, "exit_code": proc.returncode,
            "stderr_tail": proc.stderr.decode("utf-8", "replace")[-500:]}


# -- the driver ----------------------------------------------------------------------------


@dataclass
class Pair:
    """One (backend, worker) pair and its loops' results, round by round."""

    backlog: Backlog
    kind: str
    runs: dict[str, list[Result]] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.backlog.name

    @property
    def worker(self) -> str:
        return worker_name(self.kind, self.backend)


def rotated(loops: Sequence[str], i: int) -> list[str]:
    k = i % len(loops)
    return [*loops[k:], *loops[:k]]


def run_loop(loop: str, pair: Pair, keys: Keys, workdir: Path, tag: str,
             parallel: str | None) -> Result:
    """One loop over a fresh backlog, then the phases' states; the backlog is discarded."""
    url = pair.backlog.fresh()
    try:
        template = worker_command(pair.kind, url, workdir)
        if not pair.argv:
            pair.argv = template
        if loop == "plain":
            result = plain_loop(template, url, keys, workdir)
        elif loop in ("drainer", "unrecorded"):
            session_dir = workdir / f"sessions-{tag}"
            # The session's files stay until the whole run ends (see FILE_PROBES).
            result = drainer_loop(template, url, len(keys), session_dir, workdir,
                                  history=loop == "drainer")
        else:
            assert parallel is not None
            result = parallel_loop(parallel, template, url, keys, workdir)
        result["states"] = pair.backlog.states(url)
    finally:
        pair.backlog.discard(url)
    return result


def warm_up(pairs: Sequence[Pair], loops: Sequence[str], keys: Keys, workdir: Path,
            parallel: str | None) -> None:
    """Every loop of every pair once over the first few phases; the results are dropped."""
    for pair in pairs:
        for loop in loops:
            run_loop(loop, pair, keys[:WARMUP_ATTEMPTS], workdir, f"warmup-{pair.kind}-{loop}",
                     parallel)


def run_rounds(pairs: Sequence[Pair], loops: Sequence[str], rounds: int, keys: Keys,
               workdir: Path, parallel: str | None, log: TextIO) -> list[list[str]]:
    """Every pair's loops, round by round (rounds interleaved across pairs, loop order rotated
    each round); returns the order used in each round."""
    orders = []
    for i in range(rounds):
        order = rotated(loops, i)
        orders.append(order)
        for pair in pairs:
            for loop in order:
                tag = f"{pair.backend}-{pair.kind}-{loop}-{i}"
                pair.runs.setdefault(loop, []).append(
                    run_loop(loop, pair, keys, workdir, tag, parallel))
            walls = ", ".join(f"{loop} {pair.runs[loop][-1]['wall_s']:.2f} s" for loop in order)
            print(f"  round {i + 1}/{rounds} {pair.backend}/{pair.worker}: {walls}",
                  file=log, flush=True)
    return orders


def file_create_cost(directory: Path, count: int = FILE_PROBES) -> dict[str, Any]:
    """Median wall and CPU microseconds of one os.open(O_CREAT) of a new empty file, in a
    fresh subdirectory of ``directory`` (its files stay until the run ends: see FILE_PROBES)."""
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    walls: list[int] = []
    cpus: list[int] = []
    for i in range(count):
        path = probe / f"f{i}"
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        t1, c1 = time.perf_counter_ns(), time.process_time_ns()
        os.close(fd)
        walls.append(t1 - t0)
        cpus.append(c1 - c0)
    return {"dir": str(directory), "calls": count,
            "wall_us": statistics.median(walls) / 1000, "cpu_us": statistics.median(cpus) / 1000}


# -- the summary ---------------------------------------------------------------------------


def expected_state(kind: str) -> str:
    return "FAILED" if kind == "true" else "COMPLETE"


def run_problems(loop: str, result: Result, kind: str, attempts: int) -> list[str]:
    """What is wrong with one loop's run (empty: nothing)."""
    problems = []
    want = {expected_state(kind): attempts}
    if result["states"] != want:
        problems.append(f"{loop}: phase states {result['states']}, expected {want}")
    if loop == "plain" and result["nonzero_exits"]:
        problems.append(f"plain: {result['nonzero_exits']} worker(s) exited non-zero")
    if loop == "parallel" and result["exit_code"] != 0:
        problems.append(f"parallel: exit code {result['exit_code']}: "
                        f"{result['stderr_tail'][-200:]!r}")
    if loop in ("drainer", "unrecorded"):
        if result["attempts"] != attempts:
            problems.append(f"{loop}: {result['attempts']} attempts, expected {attempts}")
        if kind != "true" and result["succeeded"] != attempts:
            problems.append(f"{loop}: {result['succeeded']} succeeded, expected {attempts}")
    return problems


def summarize(pair: Pair, attempts: int, rounds: int) -> dict[str, Any]:
    def median(loop: str, key: str) -> float | None:
        runs = pair.runs.get(loop)
        return statistics.median(r[key] for r in runs) if runs else None

    def per_attempt(seconds: float | None) -> float | None:
        return None if seconds is None else seconds / attempts * 1000

    def quotient(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    plain_s = median("plain", "wall_s")
    drainer_s = median("drainer", "wall_s")
    parallel_s = median("parallel", "wall_s")
    drainer_cpu = per_attempt(median("drainer", "cpu_s"))
    drainer_kids = per_attempt(median("drainer", "children_cpu_s"))
    plain_kids = per_attempt(median("plain", "children_cpu_s"))
    parallel_cpu = per_attempt(median("parallel", "children_cpu_s"))
    problems = [p for loop, runs in pair.runs.items() for r in runs
                for p in run_problems(loop, r, pair.kind, attempts)]
    unrecorded_s = median("unrecorded", "wall_s")
    unrecorded_cpu = per_attempt(median("unrecorded", "cpu_s"))
    history_ms = (None if drainer_s is None or unrecorded_s is None
                  else (drainer_s - unrecorded_s) / attempts * 1000)
    ratio = quotient(drainer_s, plain_s)
    ratio_parallel = quotient(drainer_s, parallel_s)
    on_sqlite = pair.backend == "sqlite"
    ratio_applies = on_sqlite and pair.kind == "noop" and ratio is not None
    cpu_applies = on_sqlite and pair.kind == "true" and drainer_cpu is not None
    return {
        "backend": pair.backend,
        "worker": pair.worker,
        "argv": pair.argv,
        "loops": [loop for loop in LOOPS if loop in pair.runs],
        "attempts": attempts,
        "rounds": rounds,
        "expected_state": expected_state(pair.kind),
        "plain_s": plain_s,
        "drainer_s": drainer_s,
        "parallel_s": parallel_s,
        "plain_ms": per_attempt(plain_s),
        "drainer_ms": per_attempt(drainer_s),
        "parallel_ms": per_attempt(parallel_s),
        "unrecorded_ms": per_attempt(unrecorded_s),
        "unrecorded_cpu_ms": unrecorded_cpu,
        "history_ms": history_ms,
        "history_cpu_ms": (None if drainer_cpu is None or unrecorded_cpu is None
                           else drainer_cpu - unrecorded_cpu),
        "history_target_ms": TARGET_HISTORY_MS if history_ms is not None else None,
        "meets_history": history_ms <= TARGET_HISTORY_MS if history_ms is not None else None,
        "in_worker_ms": per_attempt(median("drainer", "in_worker_s")),
        "plain_cpu_ms": per_attempt(median("plain", "cpu_s")),
        "drainer_cpu_ms": drainer_cpu,
        "parallel_cpu_ms": parallel_cpu,
        "plain_children_cpu_ms": plain_kids,
        "drainer_children_cpu_ms": drainer_kids,
        "drainer_total_cpu_ms": (None if drainer_cpu is None or drainer_kids is None
                                 else drainer_cpu + drainer_kids),
        "parallel_own_cpu_est_ms": (None if parallel_cpu is None or plain_kids is None
                                    else parallel_cpu - plain_kids),
        "ratio": ratio,
        "ratio_parallel": ratio_parallel,
        "overhead_ms": (None if drainer_s is None or plain_s is None
                        else (drainer_s - plain_s) / attempts * 1000),
        "overhead_vs_parallel_ms": (None if drainer_s is None or parallel_s is None
                                    else (drainer_s - parallel_s) / attempts * 1000),
        "ratio_target": TARGET_RATIO if ratio_applies else None,
        "meets_ratio": ratio <= TARGET_RATIO if ratio_applies and ratio is not None else None,
        "cpu_target_ms": TARGET_CPU_MS if cpu_applies else None,
        "meets_cpu": (drainer_cpu <= TARGET_CPU_MS
                      if cpu_applies and drainer_cpu is not None else None),
        "below_parallel": (drainer_s < parallel_s
                           if drainer_s is not None and parallel_s is not None else None),
        "checks_ok": not problems,
        "check_problems": problems[:10],
        "plain_rounds_s": [r["wall_s"] for r in pair.runs.get("plain", [])],
        "drainer_rounds_s": [r["wall_s"] for r in pair.runs.get("drainer", [])],
        "unrecorded_rounds_s": [r["wall_s"] for r in pair.runs.get("unrecorded", [])],
        "parallel_rounds_s": [r["wall_s"] for r in pair.runs.get("parallel", [])],
        "plain_rounds": pair.runs.get("plain", []),
        "drainer_rounds": pair.runs.get("drainer", []),
        "parallel_rounds": pair.runs.get("parallel", []),
    }


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("backend", "backend", "{}"),
    ("worker", "worker", "{}"),
    ("N", "attempts", "{}"),
    ("plain ms", "plain_ms", "{:.2f}"),
    ("drainer ms", "drainer_ms", "{:.2f}"),
    ("parallel ms", "parallel_ms", "{:.2f}"),
    ("plain cpu", "plain_cpu_ms", "{:.2f}"),
    ("drainer cpu", "drainer_cpu_ms", "{:.2f}"),
    ("parallel cpu*", "parallel_cpu_ms", "{:.2f}"),
    ("d/plain", "ratio", "{:.2f}"),
    ("d/parallel", "ratio_parallel", "{:.2f}"),
    ("overhead ms", "overhead_ms", "{:.2f}"),
    ("history ms", "history_ms", "{:.2f}"),
    ("ratio ok", "meets_ratio", "{}"),
    ("cpu ok", "meets_cpu", "{}"),
    ("< parallel", "below_parallel", "{}"),
    ("checks", "checks_ok", "{}"),
)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    if rows:
        _print_table(rows, _COLUMNS, out)
    else:
        print("(nothing measured)", file=out)


def print_footer(file_create: dict[str, dict[str, Any]], skipped: Sequence[dict[str, str]],
                 rounds: int, out: TextIO) -> None:
    print(f"All figures: ms per attempt, median of {rounds} round(s). plain/drainer cpu: the "
          "loop's own process, workers excluded; *parallel cpu: parallel's whole tree (Perl, "
          "one shell per job, the workers), the only part measurable.", file=out)
    for backend, cost in file_create.items():
        print(f"{backend}: creating an empty file in {cost['dir']} costs "
              f"{cost['wall_us']:.1f} us wall, {cost['cpu_us']:.1f} us CPU (median of "
              f"{cost['calls']} os.open(O_CREAT)); drainer creates 2 per attempt (its logs), "
              "parallel 2 (--tmpdir there), the plain loop none.", file=out)
    for note in skipped:
        where = "/".join(note[k] for k in ("backend", "worker", "loop") if k in note)
        print(f"skipped {where}: {note['reason']}", file=out)


def verdicts(row: dict[str, Any]) -> str:
    parts = []
    if row["overhead_ms"] is not None:
        parts.append(f"overhead {row['overhead_ms']:.2f} ms/attempt over plain")
    if row["drainer_cpu_ms"] is not None:
        parts.append(f"drainer CPU {row['drainer_cpu_ms']:.2f} ms/attempt "
                     f"(+ {row['drainer_children_cpu_ms']:.2f} in its workers)")
    if row["meets_cpu"] is not None:
        parts.append(f"{'meets' if row['meets_cpu'] else 'MISSES'} the <= "
                     f"{TARGET_CPU_MS:g} ms CPU target")
    if row["meets_ratio"] is not None:
        parts.append(f"ratio {row['ratio']:.2f} {'meets' if row['meets_ratio'] else 'MISSES'}"
                     f" the <= {TARGET_RATIO} target")
    if row["meets_history"] is not None:
        parts.append(f"the history adds {row['history_ms']:.2f} ms/attempt ("
                     f"{row['history_cpu_ms']:.2f} CPU): "
                     f"{'meets' if row['meets_history'] else 'MISSES'} the <= "
                     f"{TARGET_HISTORY_MS:g} ms target")
    if row["below_parallel"] is not None:
        parts.append(f"drainer {row['drainer_ms']:.2f} vs GNU parallel {row['parallel_ms']:.2f}"
                     f" ms/attempt: {'meets' if row['below_parallel'] else 'MISSES'} the "
                     "'below GNU parallel' target")
        own = row["parallel_own_cpu_est_ms"]
        parts.append(f"whole-tree CPU drainer+workers {row['drainer_total_cpu_ms']:.2f} vs "
                     f"parallel+shells+workers {row['parallel_cpu_ms']:.2f} ms/attempt"
                     + ("" if own is None else f" (parallel's own ~{own:.2f})"))
    return f"{row['backend']}/{row['worker']}: " + "; ".join(parts)


# -- the command line ----------------------------------------------------------------------


def choices(flag: str, aliases: dict[str, str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list of names (aliases allowed), deduplicated."""

    def parse(text: str) -> list[str]:
        picked: list[str] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if part not in aliases:
                raise argparse.ArgumentTypeError(
                    f"{flag} expects some of {', '.join(aliases)}, comma separated; got {part!r}")
            if aliases[part] not in picked:
                picked.append(aliases[part])
        if not picked:
            raise argparse.ArgumentTypeError(f"{flag} expects at least one name")
        return picked

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS,
                        help="attempts (distinct phases) per loop (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds, the loops' order rotated each round; the median is "
                             "reported (default: %(default)s)")
    parser.add_argument("--loops", type=choices("--loops", {n: n for n in LOOPS}),
                        default=list(LOOPS),
                        help="loops to run: drainer, unrecorded (drainer --no-history), "
                             "plain, parallel (GNU parallel -j1), comma separated "
                             "(default: drainer,unrecorded,plain,parallel)")
    parser.add_argument("--worker", type=choices("--worker", WORKER_ALIASES),
                        default=list(WORKERS),
                        help="workers: noop (alias python), true, sqlite3 (aliases cli, psql: "
                             "the database's CLI client), comma separated "
                             "(default: noop,true,sqlite3)")
    parser.add_argument("--backend", type=choices("--backend", BACKEND_ALIASES),
                        default=["sqlite"],
                        help="backends: sqlite, postgres (alias postgresql, pg; needs asyncpg "
                             "and the server of $DRAINER_TEST_PG), comma separated "
                             "(default: sqlite)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary backlogs, session files and parallel's "
                             "temporary files live (default: %(default)s)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="where to write the JSON results; '-' for stdout "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.attempts < 1 or args.rounds < 1:
        parser.error("--attempts and --rounds must be at least 1")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def preload(backends: Sequence[str]) -> None:
    """Import drainer and the drivers before any timing starts."""
    import anyio  # noqa: F401
    import sqlalchemy.dialects.sqlite.aiosqlite

    import drainer.session
    import drainer.supervisor  # noqa: F401

    if "postgres" in backends:
        import asyncpg  # noqa: F401
        import sqlalchemy.dialects.postgresql.asyncpg  # noqa: F401


def usable_backends(wanted: Sequence[str], skipped: list[dict[str, str]]) -> list[str]:
    backends = []
    for backend in wanted:
        why = postgres_problem(PG_ADMIN_URL) if backend == "postgres" else None
        if why is None:
            backends.append(backend)
        else:
            skipped.append({"backend": backend, "reason": why})
    return backends


def open_backlog(backend: str, workdir: Path, keys: Keys) -> Backlog:
    if backend == "postgres":
        return PostgresBacklog(PG_ADMIN_URL, keys)
    return SqliteBacklog(workdir, keys)


def make_pairs(backlogs: Sequence[Backlog], kinds: Sequence[str],
               skipped: list[dict[str, str]]) -> list[Pair]:
    pairs = []
    for backlog in backlogs:
        for kind in kinds:
            why = worker_problem(kind, backlog.name)
            if why is None:
                pairs.append(Pair(backlog, kind))
            else:
                skipped.append({"backend": backlog.name, "worker": worker_name(kind, backlog.name),
                                "reason": why})
    return pairs


def measure(args: argparse.Namespace, loops: Sequence[str], backends: Sequence[str],
            parallel: str | None, skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Build the backlogs in a temporary directory under --dir, run every round, clean up."""
    keys = make_keys(args.attempts)
    with tempfile.TemporaryDirectory(prefix="drainer-bench-overhead-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        (workdir / "noop_worker.py").write_text(NOOP_WORKER, encoding="utf-8")
        backlogs: list[Backlog] = []
        try:
            for backend in backends:
                backlogs.append(open_backlog(backend, workdir, keys))
            file_create = {b.name: file_create_cost(workdir) for b in backlogs}
            pairs = make_pairs(backlogs, args.worker, skipped)
            print(f"{len(pairs)} backend/worker pair(s) x {len(loops)} loop(s) x {args.rounds} "
                  f"round(s) of {args.attempts} attempts, in {workdir}...", file=sys.stderr,
                  flush=True)
            warm_up(pairs, loops, keys, workdir, parallel)
            orders = run_rounds(pairs, loops, args.rounds, keys, workdir, parallel, sys.stderr)
        finally:
            for backlog in backlogs:
                backlog.close()
    return {"rows": [summarize(p, args.attempts, args.rounds) for p in pairs],
            "file_create": file_create, "orders": orders}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    skipped: list[dict[str, str]] = []
    loops = list(args.loops)
    parallel, parallel_about = None, None
    if "parallel" in loops:
        parallel, parallel_about = find_gnu_parallel()
        if parallel is None:
            loops.remove("parallel")
            skipped.append({"loop": "parallel", "reason": parallel_about})
    backends = usable_backends(args.backend, skipped)
    preload(backends)
    measured: dict[str, Any] = {"rows": [], "file_create": {}, "orders": []}
    if loops and backends:
        measured = measure(args, loops, backends, parallel, skipped)
    rows = measured["rows"]

    print_table(rows, out)
    print_footer(measured["file_create"], skipped, args.rounds, out)
    print(file=out)
    for row in rows:
        print(verdicts(row), file=out)
        if not row["checks_ok"]:
            print(f"WARNING: {row['backend']}/{row['worker']}: " + "; ".join(
                row["check_problems"][:3]), file=out)
    report = {
        "benchmark": "overhead",
        "attempts": args.attempts,
        "rounds": args.rounds,
        "statistic": "median over rounds",
        "target": {
            "ratio_at_most": TARGET_RATIO,
            "ratio_applies_to": "noop (a Python worker) on SQLite",
            "cpu_ms_at_most": TARGET_CPU_MS,
            "cpu_applies_to": "true (/bin/true) on SQLite: drainer's own CPU per attempt",
            "below_parallel_applies_to": "every row where GNU parallel ran: drainer's wall "
                                         "ms per attempt below parallel -j1's",
            "history_ms_at_most": TARGET_HISTORY_MS,
            "history_applies_to": "every row where the unrecorded loop ran: drainer minus "
                                  "drainer --no-history, wall ms per attempt (issue 13)",
            "source": "shared/TARGETS.md: <= 3 ms of drainer CPU per attempt (/bin/true, "
                      "SQLite, one lane); per-attempt cost vs a plain loop <= 1.10x",
        },
        "machine": machine_info(),
        "results": rows,
        "loops": loops,
        "workers": args.worker,
        "backends": backends,
        "dir": str(args.dir.resolve()),
        "file_create": measured["file_create"],
        "round_orders": measured["orders"],
        "skipped": skipped,
        "parallel": None if parallel is None else {
            "path": parallel, "version": parallel_about, "shell": os.environ.get("SHELL"),
            "job": parallel_job(["<worker>", "{run_id}", "{phase_id}"])},
        "postgres_admin_url": PG_ADMIN_URL if "postgres" in backends else None,
        "cpu_notes": "plain_cpu_ms / drainer_cpu_ms: the loop's own process (workers "
                     "excluded); *_children_cpu_ms: the workers (RUSAGE_CHILDREN); "
                     "parallel_cpu_ms: parallel + its shells + the workers (RUSAGE_CHILDREN, "
                     "nothing finer is measurable); parallel_own_cpu_est_ms = that minus the "
                     "plain loop's workers' CPU (an estimate). PostgreSQL's server CPU is in "
                     "no figure.",
    }
    write_report(report, args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
