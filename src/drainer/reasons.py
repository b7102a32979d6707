"""A phase's ``last_failure_reason`` as drainer writes it: the worker's own reason, kept, and
drainer's note after it.

Autopack's worker keeps a phase's reason on purpose when it re-queues it, and writes its own
(``INFRA_RETRY``, a traceback's last line) when it gives up; a phase drainer restores keeps
that text first and gets drainer's note appended::

    INFRA_RETRY | drainer: worker exited with status 1; phase was left QUEUED, restored to FAILED

A reason with no worker part is the note alone (``drainer: ...``). Restoring again replaces
the earlier note instead of adding one more, so the text never grows across attempts.
Pure functions, stdlib only.
"""

from __future__ import annotations

import re

NOTE_START = "drainer: "
SEPARATOR = " | "
_NOTE_AFTER = SEPARATOR + NOTE_START
#: a bare status code such as ``FAILED`` or ``INFRA_RETRY``: it names no error by itself
_CODE = re.compile(r"[A-Z][A-Z0-9_]*")


def worker_part(reason: str | None) -> str:
    """The reason without drainer's note ("" when it is only a note, or empty)."""
    if not reason or reason.startswith(NOTE_START):
        return ""
    cut = reason.find(_NOTE_AFTER)
    return (reason if cut < 0 else reason[:cut]).strip()


def note_part(reason: str | None) -> str:
    """drainer's note in the reason ("" when there is none)."""
    if not reason:
        return ""
    if reason.startswith(NOTE_START):
        return reason
    cut = reason.find(_NOTE_AFTER)
    return "" if cut < 0 else reason[cut + len(SEPARATOR):]


def with_note(reason: str | None, note: str) -> str:
    """``reason``'s worker part, kept, followed by ``note`` (which starts ``drainer: ``)."""
    kept = worker_part(reason)
    return f"{kept}{SEPARATOR}{note}" if kept else note


def is_code(text: str) -> bool:
    """True for a bare status code (``FAILED``), which says what happened but not why."""
    return _CODE.fullmatch(text.strip()) is not None


def stale_note(state: str, minutes: float) -> str:
    """drainer's note on a phase ``--restore-stale-after`` restored."""
    return (f"{NOTE_START}left {state} for more than {minutes:g} min with no drainer's lease "
            "(--restore-stale-after); restored to FAILED")
