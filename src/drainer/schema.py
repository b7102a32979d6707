"""Table, column and state names of a backlog: Autopack's by default, anything by config.

``[tool.drainer.schema]`` (or ``[schema]`` in drainer.toml) maps them, e.g.::

    [schema]
    phases-table = "work_items"
    run-id = "batch"
    phase-id = "item"
    phase-index = "position"
    state = "status"
    failure-reason = "error_text"
    updated-at = ""                  # no such column
    telemetry-tables = ["llm_calls"]
    [schema.states]
    FAILED = "failed"
    COMPLETE = "done"
    QUEUED = "queued"
    EXECUTING = "running"

drainer works on the canonical states (:class:`~drainer.models.PhaseState`); the backlog
store translates at the database's edge. A database value that maps to no state is treated
as final: drainer never "restores" a state it does not know.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from .errors import UsageError
from .models import NON_FINAL_STATES, PhaseState

DEFAULT_TELEMETRY = ("token_estimation_v2_events", "token_budget_escalation_events")


@dataclass(frozen=True, kw_only=True)
class Schema:
    """Names of the backlog's table, columns and state values."""

    phases_table: str = "phases"
    run_id: str = "run_id"
    phase_id: str = "phase_id"
    phase_index: str = "phase_index"
    state: str = "state"
    failure_reason: str = "last_failure_reason"
    updated_at: str | None = "updated_at"  #: optional column; None or "" = not there
    telemetry_run_id: str = "run_id"
    telemetry_phase_id: str = "phase_id"
    states: tuple[tuple[str, str], ...] = field(
        default_factory=lambda: tuple((s.value, s.value) for s in PhaseState)
    )  #: (canonical state, database value) pairs

    def __post_init__(self) -> None:
        names = {s.value for s in PhaseState}
        for canonical, value in self.states:
            if canonical not in names:
                raise UsageError(f"schema states: unknown state {canonical!r}; known: "
                                 f"{', '.join(sorted(names))}")
            if not isinstance(value, str) or not value:
                raise UsageError(f"schema states: {canonical} needs a non-empty text value")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("states", "updated_at") and (not isinstance(value, str) or
                                                            not value):
                raise UsageError(f"schema {f.name.replace('_', '-')} must be a non-empty name")

    def db(self, state: PhaseState | str) -> str:
        """The database value of a canonical state."""
        key = state.value if isinstance(state, PhaseState) else state
        return dict(self.states).get(key, key)

    def canonical(self, value: Any) -> str:
        """The canonical state of a database value (unknown values come back unchanged)."""
        if value is None:
            return ""
        text = str(value)
        return self._canonical_of.get(text, text)

    @cached_property
    def _canonical_of(self) -> dict[str, str]:
        # Called once per loaded phase: build the reverse mapping once.
        return {v: k for k, v in self.states}

    @property
    def non_final_db(self) -> tuple[str, ...]:
        return tuple(self.db(s) for s in NON_FINAL_STATES)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.run_id, self.phase_id, self.phase_index, self.state, self.failure_reason)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name != "states"}
        out["states"] = dict(self.states)
        return out


def schema_from_mapping(
    data: Mapping[str, Any], where: str
) -> tuple[Schema, tuple[str, ...] | None]:
    """A Schema (and telemetry tables, if given) from a config file's schema table."""
    allowed = {f.name for f in fields(Schema)} | {"telemetry_tables"}
    kwargs: dict[str, Any] = {}
    tables: tuple[str, ...] | None = None
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0].replace('_', '-')}'?" if near else ""
            raise UsageError(f"unknown schema key '{raw_key}' in {where}{hint}")
        if key == "states":
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: schema states must be a table STATE = \"value\"")
            merged = dict(Schema().states) | {str(k).upper(): str(v) for k, v in value.items()}
            kwargs["states"] = tuple(merged.items())
        elif key == "telemetry_tables":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where}: schema telemetry-tables must be a list of names")
            tables = tuple(value)
        elif key == "updated_at":
            kwargs[key] = str(value) or None
        else:
            kwargs[key] = value
    return Schema(**kwargs), tables
