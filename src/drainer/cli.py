"""Command line: ``python -m drainer {run,plan,config,analyze,status,demo}``. The only place
that exits.

The drain options are generated from :data:`drainer.config.OPTIONS` (one declaration per
option); every option of Autopack's ``batch_drain_controller.py`` keeps its name and default.
Options are parsed with ``argparse.SUPPRESS`` defaults, so the namespace holds exactly what was
typed and the only defaults are the config's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import LIST, OPTIONS, SWITCH, DrainConfig, Option, default_of, saved_value
from .errors import DrainerError, UsageError, drainer_error_in
from .events import DrainEvent
from .settings import DEFAULT, find_config_file, resolve, schema_of, workspace_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DRAIN_COMMANDS = ("run", "plan", "config", "forecast")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"drainer: error: {message} (see {self.prog} --help)\n")


def _default_text(name: str, opt: Option) -> str:
    value = opt.shown(default_of(name))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _help(name: str, opt: Option) -> str:
    text = opt.help.replace("%(default)s", _default_text(name, opt))
    return text.replace("%", "%%")  # argparse formats help with %


def _add_option(group: Any, name: str, opt: Option) -> None:
    help_text = _help(name, opt)
    if opt.kind == SWITCH:
        if opt.negative is None:
            group.add_argument(opt.flag, dest=name, action="store_true", help=help_text)
            return
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(opt.flag, dest=name, action="store_true", help=help_text)
        pair.add_argument(opt.negative, dest=name, action="store_false",
                          help=f"the opposite of {opt.flag}")
        return
    group.add_argument(opt.flag, dest=name, metavar=opt.metavar, choices=opt.choices,
                       action="append" if opt.kind == LIST else "store", help=help_text)


def _add_drain_options(p: argparse.ArgumentParser) -> None:
    groups: dict[str, Any] = {}
    for name, opt in OPTIONS.items():
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        _add_option(groups[opt.group], name, opt)
    session = groups["session"]
    session.add_argument("--config", metavar="FILE",
                         help="settings file (default: drainer.toml, else [tool.drainer] in "
                              "pyproject.toml, in the workspace); the command line and "
                              "DRAINER_* variables win over it")
    session.add_argument("--resume", nargs="?", const="latest", metavar="SESSION_ID",
                         help="resume the latest incomplete session in --session-dir, or "
                              "SESSION_ID; options not given again keep the session's values")


def _add_schema_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="settings file for the schema mapping (default: drainer.toml or "
                        "pyproject.toml in the current directory)")


def _sub(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, argument_default=argparse.SUPPRESS,
                                                     **kw)
    return parser


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
    run = _sub(sub, "run", help="drain the backlog",
               description="Drain FAILED phases of the backlog, one worker per phase.")
    _add_drain_options(run)
    run.add_argument("--dry-run", action="store_true", help="same as the plan command")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON event per line on stdout (for machines), nothing else")
    out.add_argument("--plain", action="store_true",
                     help="plain progress lines even on a terminal (no live view)")
    plan = _sub(sub, "plan", help="dry run: what would be drained, in order, and skips",
                description="List, in order, what run would drain and what it skips and "
                            "why. Starts nothing, writes nothing.")
    _add_drain_options(plan)
    plan.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    fc = _sub(sub, "forecast", help="expected success, attempts and time to drain what is "
              "left, from the attempt history, with a back-test",
              description="Forecast, from the attempt history, what draining the FAILED "
                          "phases left would bring, per category of their reasons: success "
                          "rate, duration and telemetry per attempt, attempts and wall time at "
                          "the chosen lanes and settings, all with 95% intervals; and a "
                          "back-test of the forecast against each past session. Writes "
                          "nothing.")
    _add_drain_options(fc)
    fc_out = fc.add_mutually_exclusive_group()
    fc_out.add_argument("--json", action="store_true", help="print the forecast as JSON")
    fc.add_argument("--html", metavar="PATH",
                    help="also write a self-contained HTML report with charts to PATH")
    cfg = _sub(sub, "config", help="print the effective settings and where each came from",
               description="Print every setting drainer would use, and its source: command "
                           "line, environment, config file or default. Secrets are redacted.")
    _add_drain_options(cfg)
    an = _sub(sub, "analyze", help="figures and recommendations for a session",
              description="Analyse a session written by drainer or Autopack: totals, "
                          "timeouts, telemetry yield, fingerprints, durations, runs, leaks, "
                          "and what to do next.")
    an.add_argument("target", nargs="?", default="latest",
                    help="session id, or path to a session JSON / journal.jsonl "
                         "(default: the latest session)")
    an.add_argument("--latest", action="store_true", help="the latest session (the default)")
    _add_option(an, "session_dir", OPTIONS["session_dir"])
    an.add_argument("--json", action="store_true", help="print the analysis as JSON")
    an.add_argument("--html", metavar="PATH",
                    help="also write a self-contained HTML report with charts to PATH")
    an.add_argument("--history", action="store_true",
                    help="analyse the backlog's attempt history (drainer_attempts) across "
                         "sessions and drainers instead of one session: per run and phase, "
                         "attempts, the outcome trend, fingerprints by revision; needs "
                         "--database-url or DATABASE_URL")
    an.add_argument("--clusters", action="store_true",
                    help="group the failed attempts of the attempt history into clusters "
                         "(same exception, and the same location or similar messages), each "
                         "with its runs and the options that avoid or target it; needs "
                         "--database-url or DATABASE_URL")
    _add_option(an, "database_url", OPTIONS["database_url"])
    _add_option(an, "run_id", OPTIONS["run_id"])
    st = _sub(sub, "status", help="backlog by run, QUEUED and stale phases, sessions",
              description="Show the backlog's phases by state per run, runs with QUEUED "
                          "phases, stale non-final phases, and incomplete sessions with how "
                          "to resume them. Writes nothing.")
    _add_option(st, "database_url", OPTIONS["database_url"])
    _add_option(st, "session_dir", OPTIONS["session_dir"])
    st.add_argument("--stale-minutes", type=float, default=60.0, metavar="M",
                    help="a non-final phase not updated for M minutes is stale (default: 60)")
    _add_schema_config(st)
    stop = _sub(sub, "stop", help="ask a running session, on any host, to stop picking",
                description="Ask a running session to stop picking, through the backlog "
                            "database: it starts no new attempt, gives the attempts in flight "
                            "their --stop-grace-seconds, and stays resumable. Waits until the "
                            "session takes the request. Exit 0 when it did, 1 when no running "
                            "drainer took it in time (the request is withdrawn).")
    stop.add_argument("--session", required=True, metavar="ID",
                      help="the session to stop: its id, as drainer status lists it, or "
                           "'latest', the newest session running in --session-dir on this "
                           "host (waited for up to --wait)")
    stop.add_argument("--wait", type=float, default=30.0, metavar="S",
                      help="how long to wait for the session to take the request (default: "
                           "%(default)s; 0: ask and return, the request stays for it)")
    _add_option(stop, "database_url", OPTIONS["database_url"])
    _add_option(stop, "host_name", OPTIONS["host_name"])
    _add_option(stop, "session_dir", OPTIONS["session_dir"])
    _add_schema_config(stop)
    demo = _sub(sub, "demo", help="build a realistic SQLite backlog and drain a batch of it",
                description="Build a demo backlog (56 runs, 274 FAILED phases) in a SQLite "
                            "file and drain a batch with a simulated worker.")
    demo.add_argument("--dir", default=".drainer/demo", metavar="DIR",
                      help="where the demo database and sessions go (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=30, metavar="N",
                      help="attempts to run (default: 30)")
    demo.add_argument("--lanes", type=int, default=2, metavar="N",
                      help="attempts at once (default: 2)")
    return parser


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The drain options typed on the command line, by config field name."""
    return {name: value for name, value in vars(args).items() if name in OPTIONS}


def make_config(
    values: dict[str, Any], sources: dict[str, str], extra: dict[str, Any],
    resume: str | None,
) -> DrainConfig:
    """The config from resolved settings. On ``--resume``, options set nowhere (their source
    is the default) keep the values the session was started with."""
    fields = {**values, **extra}
    if resume is not None:
        from .journal import find_resumable

        session_dir = Path(fields.get("session_dir", default_of("session_dir")))
        replay = find_resumable(session_dir, resume)
        if replay is not None:
            for name, value in replay.config.items():
                opt = OPTIONS.get(name)
                if (opt is not None and opt.resumed and sources.get(name) == DEFAULT) \
                        or (name == "telemetry_tables" and "telemetry_tables" not in extra):
                    fields[name] = saved_value(name, value)
            config = DrainConfig(**fields, resume=replay.session_id)
            saved_db = replay.config.get("database_url")
            if saved_db and _identity(saved_db) != config.db.identity:
                raise UsageError(
                    f"session {replay.session_id} drained {saved_db}, not "
                    f"{config.db.redacted}; resume it with the same database"
                )
            return config
    return DrainConfig(**fields, resume=resume)


_stdout_open = True


def _echo(line: str) -> None:
    """Print a progress line. A closed stdout (``drainer run | head``, a terminal that hung
    up) silences output; it must not abort a drain."""
    global _stdout_open
    if not _stdout_open:
        return
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        _stdout_open = False
        from .live import point_at_devnull

        point_at_devnull(sys.stdout)


def _run(args: argparse.Namespace) -> int:
    import anyio

    if args.cmd == "demo":
        from .demo.runner import run_demo

        return anyio.run(run_demo, args.dir, args.batch_size, _echo, args.lanes)
    environ = dict(os.environ)
    given = _given(args)
    file = find_config_file(getattr(args, "config", None), workspace_of(given, environ))
    if args.cmd == "analyze":
        values, _ = resolve(given, environ, file,
                            names=("session_dir", "database_url", "run_id"), strict=False)
        if getattr(args, "history", False) or getattr(args, "clusters", False):
            return _analyze_history(args, values, schema_of(file).get("schema"))
        return _analyze(args, values.get("session_dir", default_of("session_dir")))
    if args.cmd == "status":
        values, _ = resolve(given, environ, file, names=("database_url", "session_dir"),
                            strict=False)
        return _status(args, values, schema_of(file).get("schema"))
    if args.cmd == "stop":
        values, _ = resolve(given, environ, file,
                            names=("database_url", "host_name", "session_dir"), strict=False)
        return _stop(args, values, schema_of(file).get("schema"))
    values, sources = resolve(given, environ, file)
    extra = schema_of(file)
    resume = getattr(args, "resume", None)
    if args.cmd == "config":
        return _print_config(values, sources, extra, resume)
    config = make_config(values, sources, extra, resume)
    if args.cmd == "forecast":
        from .forecast import forecast_text, make_forecast
        from .report_html import render_forecast_html

        report = anyio.run(make_forecast, config).to_json()
        return _print_report(args, report, forecast_text, render_forecast_html)
    if args.cmd == "plan" or getattr(args, "dry_run", False):
        from .plan import make_plan, plan_lines

        plan = anyio.run(make_plan, config)
        for line in plan_lines(plan, config):
            _echo(line)
        return EXIT_OK
    from . import reaper
    from .api import drain

    # Escapees of the workers (setsid plus env -i) are re-parented to drainer, not to init,
    # so each attempt's end finds and kills them (see reaper.py).
    reaper.become_subreaper()

    if getattr(args, "json", False):
        import orjson

        def print_event(event: DrainEvent) -> None:
            _echo(orjson.dumps(event.to_json()).decode())

        async def go_json() -> int:
            summary = await drain(config, print_event, echo=lambda _line: None,
                                  handle_signals=True)
            return summary.exit_code

        return _run_session(go_json)
    if sys.stdout.isatty() and not getattr(args, "plain", False):
        from .live import REFRESH_INTERVAL, LiveView
        from .session import DrainSession

        view = LiveView(sys.stdout, total=config.batch_size, lanes=config.lanes,
                        deadline=config.session_timeout, totals=lambda: session.totals)
        session = DrainSession(config, echo=view.line, handle_signals=True,
                               on_event=view.on_event)

        async def go_live() -> int:
            async with anyio.create_task_group() as tg:

                async def tick() -> None:
                    while True:
                        await anyio.sleep(REFRESH_INTERVAL)
                        view.redraw()

                tg.start_soon(tick)
                try:
                    summary = await session.run()
                finally:
                    tg.cancel_scope.cancel()
                    view.close()
            return summary.exit_code

        return _run_session(go_live)

    async def go() -> int:
        summary = await drain(config, echo=_echo, handle_signals=True)
        return summary.exit_code

    return _run_session(go)


def _run_session(session: Callable[[], Awaitable[int]]) -> int:
    """Run a drain session on the command line's event loop, with worker exits watched
    through pidfds (see :func:`drainer.supervisor.pidfd_child_watcher`)."""
    import anyio

    from .supervisor import pidfd_child_watcher

    async def main() -> int:
        with pidfd_child_watcher():
            return await session()

    return anyio.run(main)


def _print_config(
    values: dict[str, Any], sources: dict[str, str], extra: dict[str, Any], resume: str | None
) -> int:
    """Every option, its effective value (secrets redacted) and where it came from."""
    shown: dict[str, Any] = {}
    if "database_url" in values:
        shown = make_config(values, sources, extra, resume).to_json()
    rows: list[tuple[str, str, str]] = []
    for name, opt in OPTIONS.items():
        if name in shown:
            value: Any = opt.shown(shown[name])
        elif name == "database_url":
            value = "(not set: give --database-url or DATABASE_URL)"
        else:
            value = opt.shown(values.get(name, default_of(name)))
        if isinstance(value, Path):
            value = str(value)
        rows.append((opt.flag, value if isinstance(value, str) else json.dumps(value),
                     sources.get(name, DEFAULT)))
    if "schema" in extra:
        rows.append(("schema", json.dumps(extra["schema"].to_json()), "file"))
    width = max(len(r[0]) for r in rows)
    for flag, value, source in rows:
        _echo(f"{flag:<{width}}  {value}   ({source})")
    return EXIT_OK


def _analyze(args: argparse.Namespace, session_dir: Path) -> int:
    from .analyze import analyze, load_session, render_text

    target = "latest" if getattr(args, "latest", False) else args.target
    session = load_session(target, Path(session_dir))
    if session.damage is not None:
        print(f"drainer: warning: {session.damage.describe()}; analysing the rest",
              file=sys.stderr)
    report = analyze(session)

    def page(report: dict[str, Any]) -> str:
        from .report_html import render_html

        return render_html(session, report)

    return _print_report(args, report, render_text, page)


def _print_report(args: argparse.Namespace, report: dict[str, Any],
                  text: Callable[[dict[str, Any]], list[str]],
                  page: Callable[[dict[str, Any]], str]) -> int:
    """An analysis: its HTML page to ``--html``, then JSON (``--json``) or text on stdout."""
    html = getattr(args, "html", None)
    if html is not None:
        out = Path(html)
        try:
            out.write_text(page(report), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write --html {out}: {exc.strerror}") from exc
        print(f"HTML report written to {out}", file=sys.stderr)
    if getattr(args, "json", False):
        import orjson

        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for line in text(report):
            _echo(line)
    return EXIT_OK


def _analyze_history(args: argparse.Namespace, values: dict[str, Any], schema: Any) -> int:
    import anyio

    from .backlog import open_backlog
    from .dburl import parse_database_url
    from .history_report import history_report, history_text

    url = values.get("database_url")
    if not url:
        raise UsageError("analyze --history and --clusters read the backlog: pass "
                         "--database-url URL or set DATABASE_URL")
    db = parse_database_url(url)
    run_id = values.get("run_id")

    async def read() -> Any:
        async with open_backlog(db, schema=schema) as backlog:
            return await backlog.history.rows(run_id=run_id)

    rows = anyio.run(read)
    if getattr(args, "clusters", False):
        from .clusters import clusters_report, clusters_text
        from .report_html import render_clusters_html

        report = clusters_report(rows, db.redacted)
        text, page = clusters_text, render_clusters_html
    else:
        from .report_html import render_history_html

        report = history_report(rows, db.redacted, run_id=run_id)
        text, page = history_text, render_history_html
    return _print_report(args, report, text, page)


def _status(args: argparse.Namespace, values: dict[str, Any], schema: Any) -> int:
    import anyio

    from .dburl import parse_database_url
    from .status import collect_status, status_lines

    url = values.get("database_url")
    if not url:
        raise UsageError("no database given: pass --database-url URL or set DATABASE_URL")
    if not args.stale_minutes >= 0:
        raise UsageError(f"--stale-minutes must be zero or more, got {args.stale_minutes}")
    db = parse_database_url(url)
    session_dir = Path(values.get("session_dir", default_of("session_dir")))
    status = anyio.run(collect_status, db, session_dir, args.stale_minutes, schema)
    for line in status_lines(status, db, session_dir, args.stale_minutes):
        _echo(line)
    return EXIT_OK


def _stop(args: argparse.Namespace, values: dict[str, Any], schema: Any) -> int:
    import anyio

    from .dburl import parse_database_url
    from .journal import hostname
    from .remote_stop import NothingRunning, ask_to_stop

    url = values.get("database_url")
    if not url:
        raise UsageError("no database given: pass --database-url URL or set DATABASE_URL")
    db = parse_database_url(url)
    session_dir = Path(values.get("session_dir", default_of("session_dir")))
    try:
        asked = anyio.run(ask_to_stop, db, schema, args.session,
                          hostname(values.get("host_name")), args.wait, session_dir)
    except NothingRunning as exc:
        _echo(str(exc))
        return EXIT_FAILED
    for line in asked.lines():
        _echo(line)
    return EXIT_OK if asked.taken or args.wait == 0 else EXIT_FAILED


def _identity(saved_url: str) -> str:
    """The database a session's saved (redacted) URL names, as this drainer writes it (older
    drainers showed a lone user; a SQLite ``timeout`` does not count, and one an older
    drainer let through unchecked is dropped first), so that ``--resume`` compares like
    with like."""
    from .dburl import parse_database_url

    if saved_url.startswith("sqlite"):
        base, _, query = saved_url.partition("?")
        kept = "&".join(p for p in query.split("&") if p and p.partition("=")[0] != "timeout")
        saved_url = f"{base}?{kept}" if kept else base
    try:
        return parse_database_url(saved_url).identity
    except UsageError:
        return saved_url


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
        try:
            return _run(args)
        except BaseExceptionGroup as group:  # the live view's task group wraps what it raises
            error = drainer_error_in(group)
            if error is None:
                raise
            raise error from None
    except DrainerError as exc:
        print(f"drainer: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("drainer: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
