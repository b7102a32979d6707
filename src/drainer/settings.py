"""Where each setting comes from: CLI > environment (``DRAINER_*``, ``DATABASE_URL``) > config
file (``--config FILE``, else ``drainer.toml``, else ``[tool.drainer]`` in ``pyproject.toml``,
both looked up in the workspace) > the config's own defaults.

File keys and ``DRAINER_*`` variables use the command line's option names
(``batch-size = 50`` or ``batch_size = 50``; ``DRAINER_BATCH_SIZE=50``), and every value is
converted and checked by the option's one declaration (:class:`drainer.config.Option`).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FIELD_OF_KEY, OPTIONS
from .errors import UsageError
from .schema import schema_from_mapping

#: Variables drainer sets for its workers: never read back as settings (a drainer started
#: inside a worker must not be limited to that worker's run).
WORKER_VARS = {"DRAINER_RUN_ID", "DRAINER_PHASE_ID", "DRAINER_SESSION_ID", "DRAINER_ATTEMPT_ID"}
DEFAULT = "default"


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: dict[str, Any]  #: normalised keys (underscores) -> raw TOML values


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


def _check_keys(file: ConfigFile) -> None:
    valid = sorted(FIELD_OF_KEY)
    for key in file.values:
        if key == "schema":
            continue  # a table of its own: see drainer.schema
        if key not in FIELD_OF_KEY:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0].replace('_', '-')}'?" if near else ""
            raise UsageError(f"unknown key '{key.replace('_', '-')}' in {file.path}{hint}")
        opt = OPTIONS[FIELD_OF_KEY[key]]
        if opt.command_line_only:
            raise UsageError(f"'{key.replace('_', '-')}' in {file.path}: {opt.flag} is "
                             "given on the command line only")


def resolve(
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    file: ConfigFile | None,
    *,
    names: Iterable[str] = OPTIONS,
    strict: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The value and source of each option in ``names`` (config field names) that is set.

    ``given`` holds the raw command-line values by field name (only options actually typed).
    Options set nowhere are left out, so the config's own default applies. ``strict``:
    unknown file keys are errors (run, plan, config); status and analyze share the file but
    take only the keys they know.
    """
    if file is not None and strict:
        _check_keys(file)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in names:
        opt = OPTIONS[name]
        env_names = [opt.env_name]
        if name == "database_url":
            env_names.append("DATABASE_URL")  # Autopack's own variable, after drainer's
        env_name = next((e for e in env_names if environ.get(e) and e not in WORKER_VARS), None)
        if opt.command_line_only and name not in given:
            sources[name] = DEFAULT
            continue
        if name in given:
            source, value = "command line", opt.convert(given[name], "command line")
        elif env_name is not None:
            source = f"env {env_name}"
            value = opt.convert(environ[env_name], source)
        elif file is not None and opt.key in file.values:
            source = f"file {file.path}"
            value = opt.convert(file.values[opt.key], str(file.path))
            if opt.relative_to_file:
                value = _relative_to(file.path.parent, value)
        else:
            sources[name] = DEFAULT
            continue
        values[name], sources[name] = value, source
    if sources.get("session_dir") == DEFAULT:
        workspace = Path(values.get("workspace", workspace_of(given, environ)))
        if looks_like_autopack(workspace):
            values["session_dir"] = workspace / AUTOPACK_SESSION_DIR
            sources["session_dir"] = AUTOPACK_PRESET
    return values, sources


AUTOPACK_SESSION_DIR = Path(".autonomous_runs", "batch_drain_sessions")
AUTOPACK_PRESET = "Autopack workspace (scripts/drain_one_phase.py and .autonomous_runs/)"


def looks_like_autopack(workspace: Path) -> bool:
    """An Autopack checkout: its worker script and its runs directory are there. Then the
    session directory defaults to Autopack's own, where its tools look."""
    return (workspace / "scripts" / "drain_one_phase.py").is_file() and \
        (workspace / ".autonomous_runs").is_dir()


def _relative_to(base: Path, value: Any) -> Any:
    """Relative paths in a config file mean: relative to the file, not to the shell's cwd."""
    if isinstance(value, Path):
        return value if value.is_absolute() else base / value
    if isinstance(value, str):  # a database URL: only a relative SQLite path changes
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


def workspace_of(given: Mapping[str, Any], environ: Mapping[str, str]) -> Path:
    """Where to look for drainer.toml / pyproject.toml: --workspace, DRAINER_WORKSPACE, or
    the current directory."""
    if "workspace" in given:
        return Path(given["workspace"])
    return Path(environ.get(OPTIONS["workspace"].env_name) or os.getcwd())
