"""Per-lane workspaces (``--lane-workspaces git-worktree``).

Autopack gives each parallel run its own git worktree: only one executor may touch a
workspace at a time, or its git state is corrupted. With this option each lane gets a
detached ``git worktree`` of ``--workspace``'s ``HEAD`` under ``<session>/worktrees/lane-N``,
made before the first attempt, reused by every attempt of that lane (a lane runs one attempt
at a time), and removed at the session's end. A resumed session makes them anew.

git runs as a plain subprocess (never a shell), in a worker thread.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio

from .errors import UsageError

GIT_TIMEOUT = 120.0  #: one git command gives up after this long


def is_git_workspace(path: Path) -> bool:
    """True when ``path`` is inside a git working tree (git installed and answering)."""
    try:
        done = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"],
                              capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "true"


def check_git_workspace(path: Path) -> None:
    """Fail (before anything is written) unless ``path`` is a git working tree with a
    commit to check out."""
    if not is_git_workspace(path):
        raise UsageError(f"--lane-workspaces git-worktree: --workspace {path} is not a git "
                         "working tree")
    try:
        _git(path, "rev-parse", "--verify", "--quiet", "HEAD")
    except UsageError:
        raise UsageError(f"--lane-workspaces git-worktree: --workspace {path} has no commit "
                         "to check out (HEAD)") from None


def _git(workspace: Path, *args: str) -> None:
    try:
        done = subprocess.run(["git", "-C", str(workspace), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"git {args[0]} {args[1]} in {workspace} failed: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"git {' '.join(args[:2])} in {workspace} failed: {said}")


class LaneWorkspaces:
    """One git worktree per lane under ``root``."""

    def __init__(self, workspace: Path, root: Path, lanes: int) -> None:
        self.workspace = workspace.resolve()
        self.root = root
        self.paths = {lane: root / f"lane-{lane}" for lane in range(1, lanes + 1)}

    def create(self) -> None:
        """Make every lane's worktree (what a crashed run of the session left is replaced).
        Blocking; call from a thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.paths.values():
            self._drop(path)
        _git(self.workspace, "worktree", "prune")
        for path in self.paths.values():
            _git(self.workspace, "worktree", "add", "--detach", str(path), "HEAD")

    def remove(self) -> None:
        """Remove every lane's worktree, also from git's list. Blocking."""
        for path in self.paths.values():
            self._drop(path)
        _git(self.workspace, "worktree", "prune")
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def _drop(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            _git(self.workspace, "worktree", "remove", "--force", str(path))
        except UsageError:
            shutil.rmtree(path)  # not a worktree any more (only ever under our root)


async def open_lane_workspaces(workspace: Path, root: Path, lanes: int) -> LaneWorkspaces:
    spaces = LaneWorkspaces(workspace, root, lanes)
    await anyio.to_thread.run_sync(spaces.create)
    return spaces
