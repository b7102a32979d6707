"""The operator's preferred runs (``--prefer-run``, ``--prefer-run-prefix``,
``--priority-file``): runs that go before every other, in the order given, ahead of triage
tiers and priority categories. A run's rank is the place of the first entry it matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DrainConfig
from .errors import UsageError

MAX_FILE_BYTES = 16 * 1024 * 1024  #: a priority file larger than this is refused


@dataclass(frozen=True, slots=True)
class Preferences:
    """Entries in order: ``(run id, False)`` or ``(prefix, True)``."""

    entries: tuple[tuple[str, bool], ...] = ()

    @classmethod
    def of(cls, config: DrainConfig) -> Preferences:
        """``--prefer-run`` entries first, then ``--prefer-run-prefix``, then the lines of
        ``--priority-file`` (a run id, or a prefix ending in ``*``; blank lines and ``#``
        comments skipped). An unreadable file is a usage error."""
        entries = [(run, False) for run in config.prefer_runs]
        entries += [(prefix, True) for prefix in config.prefer_run_prefixes]
        if config.priority_file is not None:
            entries += read_priority_file(config.priority_file)
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def rank(self, run_id: str) -> int:
        """The place of the first entry ``run_id`` matches; after all of them when none."""
        for n, (value, prefix) in enumerate(self.entries):
            if run_id == value or (prefix and run_id.startswith(value)):
                return n
        return len(self.entries)

    def describe(self, run_id: str) -> str | None:
        """Why a run is preferred (for ``plan``), or None."""
        n = self.rank(run_id)
        if n == len(self.entries):
            return None
        value, prefix = self.entries[n]
        return f"preferred #{n + 1}: {value}*" if prefix else f"preferred #{n + 1}"


def read_priority_file(path: Path) -> list[tuple[str, bool]]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UsageError(f"--priority-file {path} is larger than {MAX_FILE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--priority-file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read --priority-file {path}: {exc.strerror}") from None
    found: list[tuple[str, bool]] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.endswith("*"):
            if entry == "*":
                raise UsageError(f"--priority-file {path}: a line '*' would prefer every run")
            found.append((entry[:-1], True))
        else:
            found.append((entry, False))
    return found
