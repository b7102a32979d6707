"""The workspace's revision, recorded with each attempt in the history and compared by
``--skip-unchanged``: ``git rev-parse HEAD``, with ``+dirty.<hash>`` when the tree has
changes (a hash of the diff, and of untracked files by size and change time: the same edits
give the same revision, other edits another), or the first line ``--revision-command``
prints. Read once per session, before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .config import DrainConfig, render_command
from .errors import UsageError

REVISION_TIMEOUT = 60.0  #: a revision command (or git) that takes longer is an error
MAX_REVISION_CHARS = 128  #: the history's column width


def session_revision(config: DrainConfig) -> str | None:
    """The revision a session records (None with ``--no-history``, or outside git with no
    command); ``--skip-unchanged`` cannot do without one (a usage error)."""
    if not config.history:
        return None
    revision = workspace_revision(config.workspace, config.revision_command, config.python)
    if revision is None and config.skip_unchanged:
        raise UsageError(f"--skip-unchanged compares the workspace's revision, but "
                         f"--workspace {config.workspace} is not a git work tree; give "
                         "--revision-command to print one")
    return revision


def workspace_revision(workspace: Path, command: Sequence[str] | None = None,
                       python: str = "python3") -> str | None:
    """The revision of ``workspace``; None when it is not a git work tree (and no command is
    given). A command that fails or prints nothing is a usage error."""
    if command is not None:
        argv = render_command(command, {"workspace": str(workspace.resolve()),
                                        "python": python})
        out = _run(argv, workspace, what="--revision-command")
        line = out.strip().splitlines()[0].strip() if out.strip() else ""
        if not line:
            raise UsageError(f"--revision-command {' '.join(argv)!r} printed nothing")
        return line[:MAX_REVISION_CHARS]
    head = _git(workspace, "rev-parse", "--verify", "HEAD")
    if head is None:
        return None
    name = head.decode("ascii", "replace").strip()
    status = _git(workspace, "status", "--porcelain", "-z", "--untracked-files=all")
    if not status:
        return name
    digest = hashlib.sha1(status)
    digest.update(_git(workspace, "diff", "HEAD", "--binary") or b"")
    for entry in status.split(b"\0"):  # untracked files count by size and change time
        if entry.startswith(b"?? "):
            with contextlib.suppress(OSError):
                st = (workspace / os.fsdecode(entry[3:])).stat()
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{name}+dirty.{digest.hexdigest()[:12]}"


def short(revision: str | None) -> str:
    """A revision as messages show it (a git hash cut to 7 characters)."""
    if not revision:
        return "an unknown revision"
    head, _, dirty = revision.partition("+")
    if len(head) == 40 and all(c in "0123456789abcdef" for c in head):
        head = head[:7]
    return head + ("+" + dirty if dirty else "")


def _git(workspace: Path, *args: str) -> bytes | None:
    """What git prints, as bytes (a diff holds files in any encoding); None on failure."""
    try:
        done = subprocess.run(["git", "-C", str(workspace), *args], capture_output=True,
                              timeout=REVISION_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _run(argv: list[str], workspace: Path, *, what: str) -> str:
    try:
        done = subprocess.run(argv, cwd=workspace, capture_output=True,
                              timeout=REVISION_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{what} {argv[0]!r} could not run: {exc}") from None
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        last = err[-1] if err else ""
        raise UsageError(f"{what} {' '.join(argv)!r} exited with status {done.returncode}"
                         + (f": {last}" if last else ""))
    return done.stdout.decode("utf-8", "replace")
