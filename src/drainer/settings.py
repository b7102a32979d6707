"""Where each setting comes from: CLI > environment (``DRAINER_*``, ``DATABASE_URL``) > config
file (``--config FILE``, else ``drainer.toml``, else ``[tool.drainer]`` in ``pyproject.toml``,
both looked up in the workspace) > defaults.

File keys and ``DRAINER_*`` variables use the command line's option names
(``batch-size = 50`` or ``batch_size = 50``; ``DRAINER_BATCH_SIZE=50``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .schema import schema_from_mapping

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}
NOT_SETTINGS = {"cmd", "dry_run", "resume", "json", "plain", "config", "help", "target",
                "latest", "html"}
#: Variables drainer sets for its workers: never read back as settings (a drainer started
#: inside a worker must not be limited to that worker's run).
WORKER_VARS = {"DRAINER_RUN_ID", "DRAINER_PHASE_ID", "DRAINER_SESSION_ID", "DRAINER_ATTEMPT_ID"}
#: Options whose relative paths in a config file are relative to the file's directory.
PATH_OPTIONS = {"workspace", "session_dir"}
TEMPLATE_OPTIONS = {"command", "api_command"}


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: dict[str, Any]  #: normalised keys (argparse dests) -> raw TOML values


def _norm(key: str) -> str:
    return key.strip().replace("-", "_")


def find_config_file(explicit: str | None, workspace: Path) -> ConfigFile | None:
    """The config file in force: ``--config``, else drainer.toml, else pyproject.toml."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        return ConfigFile(path, _read(path, table=("tool", "drainer") if
                                      path.name == "pyproject.toml" else ()))
    candidate = workspace / "drainer.toml"
    if candidate.is_file():
        return ConfigFile(candidate, _read(candidate, table=()))
    pyproject = workspace / "pyproject.toml"
    if pyproject.is_file():
        values = _read(pyproject, table=("tool", "drainer"))
        if values:
            return ConfigFile(pyproject, values)
    return None


def _read(path: Path, *, table: tuple[str, ...]) -> dict[str, Any]:
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    for part in table:
        data = data.get(part, {}) if isinstance(data, dict) else {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: [{'.'.join(table)}] must be a table")
    return {_norm(k): v for k, v in data.items()}


def check_keys(file: ConfigFile, known: Mapping[str, argparse.Action]) -> None:
    valid = sorted(k for k in known if k not in NOT_SETTINGS)
    for key in file.values:
        if key == "schema":
            continue  # a table of its own: see drainer.schema
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0].replace('_', '-')}'?" if near else ""
            raise UsageError(f"unknown key '{key.replace('_', '-')}' in {file.path}{hint}")


def _convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """A file or environment value, converted and checked like the option would be."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in TRUE | FALSE:
            value = raw.lower() in TRUE
        else:
            raise UsageError(f"{where}: {flag} takes true or false, got {raw!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        if isinstance(raw, dict):
            raw = [f"{k}={v}" for k, v in raw.items()]
        elif isinstance(raw, str) and where == "DRAINER_ENV":
            raw = [p for p in raw.split(";") if p]  # KEY=VALUE;KEY=VALUE (values may hold ,)
        elif isinstance(raw, str):
            raw = [p for p in raw.split(",") if p] if where.startswith("DRAINER_") else [raw]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise UsageError(f"{where}: {flag} takes a list of strings, got {raw!r}")
        return list(raw)
    if action.dest in TEMPLATE_OPTIONS and isinstance(raw, list):
        if not all(isinstance(v, str) for v in raw):
            raise UsageError(f"{where}: {flag} takes a string or a list of strings")
        return shlex.join(raw)  # an argv list: kept token for token
    if isinstance(raw, bool | list | dict):
        raise UsageError(f"{where}: {flag} takes one value, got {raw!r}")
    convert = action.type if callable(action.type) else str
    if convert is int and isinstance(raw, float):
        raise UsageError(f"{where}: {flag} takes a whole number, got {raw!r}")
    try:
        return convert(raw) if convert is not str else str(raw)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {flag} got an invalid value {raw!r}") from exc


def resolve(
    args: argparse.Namespace,
    actions: Mapping[str, argparse.Action],
    explicit: frozenset[str],
    environ: Mapping[str, str],
    file: ConfigFile | None,
    *,
    strict: bool = True,
) -> dict[str, str]:
    """Fill ``args`` in place by precedence; return where each setting came from.

    ``strict``: unknown file keys are errors (run, plan, config); status and analyze share
    the file but take only the keys they know.
    """
    if file is not None and strict:
        check_keys(file, actions)
    sources: dict[str, str] = {}
    for dest, action in actions.items():
        if dest in NOT_SETTINGS:
            continue
        env_name = "DATABASE_URL" if dest == "database_url" else f"DRAINER_{dest.upper()}"
        if dest in explicit:
            sources[dest] = "command line"
        elif dest == "database_url" and environ.get("DRAINER_DATABASE_URL"):
            setattr(args, dest, environ["DRAINER_DATABASE_URL"])
            sources[dest] = "env DRAINER_DATABASE_URL"
        elif environ.get(env_name) and env_name not in WORKER_VARS:
            setattr(args, dest, _convert(action, environ[env_name], env_name))
            sources[dest] = f"env {env_name}"
        elif file is not None and dest in file.values:
            value = _convert(action, file.values[dest], str(file.path))
            setattr(args, dest, _relative_to(file.path.parent, dest, value))
            sources[dest] = f"file {file.path}"
        else:
            sources[dest] = "default"
    return sources


def _relative_to(base: Path, dest: str, value: Any) -> Any:
    """Relative paths in a config file mean: relative to the file, not to the shell's cwd."""
    if dest in PATH_OPTIONS and isinstance(value, str) and not Path(value).is_absolute():
        return str(base / value)
    if dest == "database_url" and isinstance(value, str):
        scheme, sep, rest = value.partition(":///")
        if sep and scheme.startswith("sqlite") and rest and not rest.startswith("/") \
                and not rest.startswith(":memory:"):
            return f"{scheme}:///{base / rest}"
    return value


def schema_of(file: ConfigFile | None) -> dict[str, Any]:
    """``schema=`` and ``telemetry_tables=`` for DrainConfig from the file's schema table."""
    if file is None or "schema" not in file.values:
        return {}
    data = file.values["schema"]
    if not isinstance(data, dict):
        raise UsageError(f"config file {file.path}: schema must be a table")
    schema, tables = schema_from_mapping(data, str(file.path))
    return {"schema": schema} | ({"telemetry_tables": tables} if tables is not None else {})


def workspace_of(
    args: argparse.Namespace, explicit: frozenset[str], environ: Mapping[str, str]
) -> Path:
    """Where to look for drainer.toml / pyproject.toml: --workspace, DRAINER_WORKSPACE, or
    the current directory."""
    if "workspace" in explicit:
        return Path(args.workspace)
    return Path(environ.get("DRAINER_WORKSPACE") or os.getcwd())
