"""drainer's one error hierarchy.

Every message is one line that says what is wrong and what to do about it. The CLI prints
``str(error)`` and exits 2 for :class:`UsageError` and its kin; library code never exits.
"""

from __future__ import annotations


class DrainerError(Exception):
    """Base class of every error drainer raises on purpose."""


class UsageError(DrainerError):
    """An option, a config value or a combination of them is invalid."""


class DatabaseError(DrainerError):
    """The backlog database is missing, unreadable, unreachable or of the wrong schema.

    ``transient``: the fault may pass by itself (a dropped connection, a server restarting,
    a lock held too long), so the statement is worth retrying on a fresh connection."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class SessionError(DrainerError):
    """The session directory or a session's files cannot be used (unwritable, corrupt, unknown)."""


def drainer_error_in(exc: BaseException) -> DrainerError | None:
    """The DrainerError behind ``exc``, also when task groups wrapped it in a group."""
    if isinstance(exc, DrainerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = drainer_error_in(inner)
            if found is not None:
                return found
    return None
