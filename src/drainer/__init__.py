"""drainer: drain a backlog of failed phases with supervised, crash-safe worker subprocesses.

Public names are imported lazily so that ``import drainer`` (and ``python -m
drainer.demo.worker``) stays cheap: worker start-up time is on every attempt's path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Attempt": "drainer.models",
    "AttemptFinished": "drainer.events",
    "AttemptStarted": "drainer.events",
    "DrainEvent": "drainer.events",
    "DrainStatistics": "drainer.api",
    "Drainer": "drainer.api",
    "RunStopped": "drainer.events",
    "RunUnstopped": "drainer.events",
    "SessionStopped": "drainer.events",
    "open_drainer": "drainer.api",
    "DatabaseError": "drainer.errors",
    "DrainConfig": "drainer.config",
    "DrainerError": "drainer.errors",
    "PhaseRef": "drainer.models",
    "PhaseState": "drainer.models",
    "SessionError": "drainer.errors",
    "SessionSummary": "drainer.models",
    "StopReason": "drainer.models",
    "Totals": "drainer.models",
    "UsageError": "drainer.errors",
    "drain": "drainer.api",
    "iter_attempts": "drainer.journal",
    "OUTCOMES": "drainer.models",
    "Outcomes": "drainer.models",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .api import Drainer as Drainer
    from .api import DrainStatistics as DrainStatistics
    from .api import drain as drain
    from .api import open_drainer as open_drainer
    from .config import DrainConfig as DrainConfig
    from .errors import DatabaseError as DatabaseError
    from .errors import DrainerError as DrainerError
    from .errors import SessionError as SessionError
    from .errors import UsageError as UsageError
    from .events import AttemptFinished as AttemptFinished
    from .events import AttemptStarted as AttemptStarted
    from .events import DrainEvent as DrainEvent
    from .events import RunStopped as RunStopped
    from .events import RunUnstopped as RunUnstopped
    from .events import SessionStopped as SessionStopped
    from .journal import iter_attempts as iter_attempts
    from .models import OUTCOMES as OUTCOMES
    from .models import Attempt as Attempt
    from .models import Outcomes as Outcomes
    from .models import PhaseRef as PhaseRef
    from .models import PhaseState as PhaseState
    from .models import SessionSummary as SessionSummary
    from .models import StopReason as StopReason
    from .models import Totals as Totals


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'drainer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
