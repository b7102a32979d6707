"""Command line: ``python -m drainer {run,plan,demo} [options]``. The only place that exits.

Every option of Autopack's ``batch_drain_controller.py`` keeps its name and default; options
map one to one onto :class:`drainer.DrainConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import DEFAULT_COMMAND, DEFAULT_SESSION_DIR, MIB, DrainConfig, parse_env_pairs
from .errors import DrainerError, UsageError
from .events import DrainEvent
from .settings import find_config_file, resolve, schema_of, workspace_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("run", "plan", "config", "analyze", "status", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"drainer: error: {message} (see {self.prog} --help)\n")


def _add_drain_options(p: argparse.ArgumentParser) -> None:
    db = p.add_argument_group("backlog")
    db.add_argument("--database-url", metavar="URL",
                    help="backlog database (default: $DATABASE_URL; required), e.g. "
                         "sqlite:///autopack.db or postgresql://user:pass@host/db")
    db.add_argument("--run-id", help="drain only this run")
    db.add_argument("--skip-run-prefix", action="append", default=[], metavar="PREFIX",
                    help="skip runs whose id starts with PREFIX (repeatable)")
    q = db.add_mutually_exclusive_group()
    q.add_argument("--skip-runs-with-queued", dest="skip_runs_with_queued", action="store_true",
                   default=True,
                   help="leave QUEUED phases alone (default); their runs' FAILED phases drain")
    q.add_argument("--no-skip-runs-with-queued", dest="skip_runs_with_queued", action="store_false",
                   help="drain QUEUED phases too")
    db.add_argument("--allow-empty-db", action="store_true",
                    help="run even if the database has no phases at all")

    w = p.add_argument_group("worker")
    w.add_argument("--command", metavar="TEMPLATE", default=DEFAULT_COMMAND,
                   help="worker command template, split like a shell would but never run by "
                        "one; placeholders {run_id} {phase_id} {phase_index} {attempt_id} "
                        "{session_id} {python} {workspace} (default: %(default)s)")
    w.add_argument("--workspace", default=".", metavar="DIR",
                   help="directory the worker runs in (default: current directory)")
    w.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for workers (repeatable)")
    w.add_argument("--api-url", metavar="URL",
                   help="Autopack API server handed to workers as AUTOPACK_API_URL")
    w.add_argument("--phase-timeout-seconds", type=float, default=900.0, metavar="S",
                   help="kill an attempt's whole process tree after S seconds (default: 900)")
    w.add_argument("--kill-grace-seconds", type=float, default=5.0, metavar="S",
                   help="between SIGTERM and SIGKILL when killing a tree (default: 5)")
    w.add_argument("--max-log-bytes", type=int, default=64 * MIB, metavar="N",
                   help="cap of each per-attempt log file (default: 64 MiB)")
    w.add_argument("--leak-policy", choices=("kill", "report"), default="kill",
                   help="what to do with processes an attempt leaves behind (default: kill)")

    s = p.add_argument_group("stop conditions")
    s.add_argument("--batch-size", type=int, default=10, metavar="N",
                   help="attempts in this session (default: 10)")
    s.add_argument("--max-total-minutes", type=float, metavar="M",
                   help="stop picking after M minutes (fractions allowed; default: no limit)")
    s.add_argument("--stop-grace-seconds", type=float, default=60.0, metavar="S",
                   help="how long in-flight attempts may finish after a stop (default: 60)")
    s.add_argument("--max-timeouts-per-run", type=int, default=2, metavar="N",
                   help="stop draining a run after N timeouts (default: 2)")
    s.add_argument("--max-attempts-per-phase", type=int, default=2, metavar="N",
                   help="attempts per phase in a session (default: 2)")
    s.add_argument("--max-fingerprint-repeats", type=int, default=3, metavar="N",
                   help="stop a run once its failure fingerprint was seen N times (default: 3)")
    s.add_argument("--max-consecutive-zero-yield", type=int, metavar="N",
                   help="stop after N attempts in a row with no telemetry (default: off)")

    o = p.add_argument_group("session")
    o.add_argument("--session-dir", default=str(DEFAULT_SESSION_DIR), metavar="DIR",
                   help="where sessions are saved (default: %(default)s; Autopack users: "
                        ".autonomous_runs/batch_drain_sessions)")
    o.add_argument("--config", metavar="FILE",
                   help="settings file (default: drainer.toml, else [tool.drainer] in "
                        "pyproject.toml, in the workspace); the command line and DRAINER_* "
                        "variables win over it")
    o.add_argument("--resume", nargs="?", const="latest", metavar="SESSION_ID",
                   help="resume the latest incomplete session in --session-dir, or SESSION_ID; "
                        "options not given again keep the session's values")
    o.add_argument("--lanes", type=int, default=1, metavar="N",
                   help="attempts at once, never two of one run (default: 1)")
    o.add_argument("--lease-ttl-seconds", type=float, default=60.0, metavar="S",
                   help="a run's lease expires S seconds after its last heartbeat (default: 60)")
    w.add_argument("--api-command", metavar="TEMPLATE",
                   help="start one API server for all workers, e.g. "
                        "'uvicorn autopack.main:app --port {port}'; stopped at the end")
    w.add_argument("--leak-pattern", default="uvicorn", metavar="REGEX",
                   help="command lines counted as leaks when they outlive their attempt "
                        "(default: %(default)s)")
    s.add_argument("--max-leaks", type=int, metavar="N",
                   help="stop the session when more than N processes have leaked")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="drainer",
        description="Drain a backlog of FAILED phases: one supervised worker per phase, "
                    "adaptive stops, crash-safe sessions.",
        epilog="Exit codes: 0 all attempts succeeded, 1 some failed or timed out, "
               "2 bad input (nothing changed), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"drainer {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="drain the backlog",
                         description="Drain FAILED phases of the backlog, one worker per phase.")
    _add_drain_options(run)
    run.add_argument("--dry-run", action="store_true", help="same as the plan command")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON event per line on stdout (for machines), nothing else")
    out.add_argument("--plain", action="store_true",
                     help="plain progress lines even on a terminal (no live view)")
    plan = sub.add_parser("plan", help="dry run: what would be drained, in order, and skips",
                          description="List, in order, what run would drain and what it "
                                      "skips and why. Starts nothing, writes nothing.")
    _add_drain_options(plan)
    plan.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    cfg = sub.add_parser("config", help="print the effective settings and where each came from",
                         description="Print every setting drainer would use, and its source: "
                                     "command line, environment, config file or default. "
                                     "Secrets are redacted.")
    _add_drain_options(cfg)
    an = sub.add_parser("analyze", help="figures and recommendations for a session",
                        description="Analyse a session written by drainer or Autopack: totals, "
                                    "timeouts, telemetry yield, fingerprints, durations, runs, "
                                    "leaks, and what to do next.")
    an.add_argument("target", nargs="?", default="latest",
                    help="session id, or path to a session JSON / journal.jsonl "
                         "(default: the latest session)")
    an.add_argument("--latest", action="store_true", help="the latest session (the default)")
    an.add_argument("--session-dir", default=str(DEFAULT_SESSION_DIR), metavar="DIR",
                    help="where sessions are (default: %(default)s)")
    an.add_argument("--json", action="store_true", help="print the analysis as JSON")
    an.add_argument("--html", metavar="PATH",
                    help="also write a self-contained HTML report with charts to PATH")
    st = sub.add_parser("status", help="backlog by run, QUEUED and stale phases, sessions",
                        description="Show the backlog's phases by state per run, runs with "
                                    "QUEUED phases, stale non-final phases, and incomplete "
                                    "sessions with how to resume them. Writes nothing.")
    st.add_argument("--database-url", metavar="URL", help="backlog (default: $DATABASE_URL)")
    st.add_argument("--session-dir", default=str(DEFAULT_SESSION_DIR), metavar="DIR",
                    help="where sessions are (default: %(default)s)")
    st.add_argument("--stale-minutes", type=float, default=60.0, metavar="M",
                    help="a non-final phase not updated for M minutes is stale (default: 60)")
    st.add_argument("--config", metavar="FILE",
                    help="settings file for the schema mapping (default: drainer.toml or "
                         "pyproject.toml in the current directory)")
    demo = sub.add_parser("demo", help="build a realistic SQLite backlog and drain a batch of it",
                          description="Build a demo backlog (56 runs, 274 FAILED phases) in "
                                      "a SQLite file and drain a batch with a simulated worker.")
    demo.add_argument("--dir", default=".drainer/demo", metavar="DIR",
                      help="where the demo database and sessions go (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=30, metavar="N",
                      help="attempts to run (default: 30)")
    demo.add_argument("--lanes", type=int, default=2, metavar="N",
                      help="attempts at once (default: 2)")
    return parser


# CLI option (argparse dest) -> DrainConfig field.
FIELD_OF = {
    "command": "command",
    "workspace": "workspace",
    "batch_size": "batch_size",
    "run_id": "run_id",
    "skip_run_prefix": "skip_run_prefixes",
    "skip_runs_with_queued": "skip_runs_with_queued",
    "api_url": "api_url",
    "phase_timeout_seconds": "phase_timeout",
    "max_total_minutes": "max_total_minutes",
    "max_timeouts_per_run": "max_timeouts_per_run",
    "max_attempts_per_phase": "max_attempts_per_phase",
    "max_fingerprint_repeats": "max_fingerprint_repeats",
    "max_consecutive_zero_yield": "max_consecutive_zero_yield",
    "allow_empty_db": "allow_empty_db",
    "env": "env",
    "max_log_bytes": "max_log_bytes",
    "kill_grace_seconds": "kill_grace_period",
    "stop_grace_seconds": "stop_grace_period",
    "lanes": "lanes",
    "lease_ttl_seconds": "lease_ttl",
    "api_command": "api_command",
    "leak_pattern": "leak_pattern",
    "max_leaks": "max_leaks",
    "leak_policy": "leak_policy",
}
# Saved-config keys a resumed session takes over unless the option is given again.
RESUMED_FIELDS = frozenset(FIELD_OF.values()) | {"telemetry_tables"}


def _field_value(dest: str, value: Any) -> Any:
    if dest == "env":
        return parse_env_pairs(value)
    if dest == "skip_run_prefix":
        return tuple(value)
    return value


def _saved_value(name: str, value: Any) -> Any:
    if name == "env":
        pairs = tuple((str(k), str(v)) for k, v in dict(value).items())
        hidden = [k for k, v in pairs if v == "***"]
        if hidden:
            raise UsageError(
                f"the session's --env {hidden[0]} was redacted when saved; give --env again"
            )
        return pairs
    return tuple(value) if isinstance(value, list) else value


def config_from_args(
    args: argparse.Namespace,
    environ: dict[str, str],
    *,
    explicit: frozenset[str] = frozenset(),
    extra: dict[str, Any] | None = None,
) -> DrainConfig:
    """Map options onto a config; on ``--resume``, options not given again keep the
    values the session was started with (``explicit`` = the options on the command line)."""
    url = args.database_url or environ.get("DATABASE_URL")
    if not url:
        raise UsageError(
            "no database given: pass --database-url URL or set DATABASE_URL "
            "(drainer never falls back to a default database)"
        )
    fields = {name: _field_value(dest, getattr(args, dest)) for dest, name in FIELD_OF.items()}
    fields.update(extra or {})
    resume = args.resume
    if resume is not None:
        from .resume import find_resumable

        replay = find_resumable(Path(args.session_dir), resume)
        if replay is not None:
            given = {FIELD_OF[d] for d in explicit if d in FIELD_OF}
            for name, value in replay.config.items():
                if name in RESUMED_FIELDS and name not in given:
                    fields[name] = _saved_value(name, value)
            resume = replay.session_id
            saved_db = replay.config.get("database_url")
            config = DrainConfig(database_url=url, session_dir=args.session_dir, resume=resume,
                                 **fields)
            if saved_db and saved_db != config.db.redacted:
                raise UsageError(
                    f"session {resume} drained {saved_db}, not {config.db.redacted}; "
                    "resume it with the same database"
                )
            return config
    return DrainConfig(database_url=url, session_dir=args.session_dir, resume=resume, **fields)


def explicit_options(argv: Sequence[str]) -> frozenset[str]:
    """The options actually given on the command line (argparse dests)."""
    parser = build_parser()
    for sub in _subparsers(parser):
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(list(argv)))) - {"cmd"}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.extend(action.choices.values())
    return found


_stdout_open = True


def _echo(line: str) -> None:
    """Print a progress line. A closed stdout (``drainer run | head``) silences output;
    it must not abort a drain."""
    global _stdout_open
    if not _stdout_open:
        return
    try:
        print(line, flush=True)
    except (BrokenPipeError, ValueError):
        _stdout_open = False
        # Point stdout at /dev/null so the interpreter's final flush does not fail either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import anyio

    if args.cmd == "demo":
        from .demo.runner import run_demo

        return anyio.run(run_demo, args.dir, args.batch_size, _echo, args.lanes)
    if args.cmd in ("analyze", "status"):
        environ = dict(os.environ)
        given = explicit_options(argv)
        found = find_config_file(getattr(args, "config", None), workspace_of(args, given, environ))
        resolve(args, _actions_of(args.cmd), given, environ, found, strict=False)
        if args.cmd == "analyze":
            return _analyze(args)
        return _status(args, schema_of(found).get("schema"))
    environ = dict(os.environ)
    given = explicit_options(argv)
    file = find_config_file(args.config, workspace_of(args, given, environ))
    sources = resolve(args, _actions_of(args.cmd), given, environ, file)
    extra = schema_of(file)
    # On --resume, what the command line, environment or config file sets wins over the
    # session's saved values; only defaults give way to them.
    explicit = frozenset(d for d, src in sources.items() if src != "default")
    if args.cmd == "config":
        return _print_config(args, sources, environ, explicit=explicit, extra=extra)
    config = config_from_args(args, environ, explicit=explicit, extra=extra)
    if args.cmd == "plan" or args.dry_run:
        from .plan import make_plan, plan_lines

        plan = anyio.run(make_plan, config)
        for line in plan_lines(plan, config):
            _echo(line)
        return EXIT_OK
    from .session import drain

    if args.json:
        import orjson

        def print_event(event: DrainEvent) -> None:
            _echo(orjson.dumps(event.to_json()).decode())

        async def go_json() -> int:
            summary = await drain(config, print_event, echo=lambda _line: None,
                                  handle_signals=True)
            return summary.exit_code

        return anyio.run(go_json)
    if sys.stdout.isatty() and not args.plain:
        from .live import REFRESH_INTERVAL, LiveView

        view = LiveView(sys.stdout, total=config.batch_size, lanes=config.lanes)

        async def go_live() -> int:
            async with anyio.create_task_group() as tg:

                async def tick() -> None:
                    while True:
                        await anyio.sleep(REFRESH_INTERVAL)
                        view.redraw()

                tg.start_soon(tick)
                try:
                    summary = await drain(config, view.on_event, echo=view.line,
                                          handle_signals=True)
                finally:
                    tg.cancel_scope.cancel()
                    view.close()
            return summary.exit_code

        return anyio.run(go_live)

    async def go() -> int:
        summary = await drain(config, echo=_echo, handle_signals=True)
        return summary.exit_code

    return anyio.run(go)


def _actions_of(cmd: str) -> dict[str, argparse.Action]:
    """The options of one subcommand, by argparse dest."""
    for sub in _subparsers(build_parser()):
        if sub.prog.split()[-1] == cmd:
            actions: dict[str, argparse.Action] = {}
            for action in sub._actions:  # the first option of a dest (--skip-..., not --no-...)
                if action.dest != "help":
                    actions.setdefault(action.dest, action)
            return actions
    return {}


def _print_config(
    args: argparse.Namespace, sources: dict[str, str], environ: dict[str, str],
    *, explicit: frozenset[str], extra: dict[str, Any],
) -> int:
    config = config_from_args(args, environ, explicit=explicit, extra=extra) if (
        args.database_url or environ.get("DATABASE_URL")) else None
    shown = config.to_json() if config is not None else {}
    rows: list[tuple[str, str, str]] = []
    for dest, name in [("database_url", "database_url"), ("session_dir", "session_dir"),
                       *FIELD_OF.items()]:
        if name in shown:
            value: Any = shown[name]
        elif dest == "database_url":
            value = "(not set: give --database-url or DATABASE_URL)"
        else:
            value = getattr(args, dest)
        option = "--" + dest.replace("_", "-")
        rows.append((option, json.dumps(value) if not isinstance(value, str) else value,
                     sources.get(dest, "default")))
    if "schema" in extra:
        rows.append(("schema", json.dumps(extra["schema"].to_json()), "file"))
    width = max(len(r[0]) for r in rows)
    for option, value, source in rows:
        _echo(f"{option:<{width}}  {value}   ({source})")
    return EXIT_OK


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze, load_session, render_text

    target = "latest" if args.latest else args.target
    session = load_session(target, Path(args.session_dir))
    report = analyze(session)
    if args.html:
        from .report_html import render_html

        out = Path(args.html)
        try:
            out.write_text(render_html(session, report), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write --html {out}: {exc.strerror}") from exc
        print(f"HTML report written to {out}", file=sys.stderr)
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for line in render_text(report):
            _echo(line)
    return EXIT_OK


def _status(args: argparse.Namespace, schema: Any) -> int:
    import anyio

    from .dburl import parse_database_url
    from .status import collect_status, status_lines

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise UsageError("no database given: pass --database-url URL or set DATABASE_URL")
    if not args.stale_minutes >= 0:
        raise UsageError(f"--stale-minutes must be zero or more, got {args.stale_minutes}")
    db = parse_database_url(url)
    session_dir = Path(args.session_dir)
    status = anyio.run(collect_status, db, session_dir, args.stale_minutes, schema)
    for line in status_lines(status, db, session_dir, args.stale_minutes):
        _echo(line)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Autopack's controller had no subcommands: `drainer --batch-size 5` means `drainer run`.
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _run(args, argv)
    except DrainerError as exc:
        print(f"drainer: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("drainer: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


