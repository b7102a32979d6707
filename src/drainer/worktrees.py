"""Per-lane workspaces (``--lane-workspaces git-worktree``).

Autopack gives each parallel run its own git worktree: only one executor may touch a
workspace at a time, or its git state is corrupted. With this option each lane gets a git
worktree of ``--workspace``'s repository at its ``HEAD``, on its own branch
``drainer/<session>/lane-N``, under ``<session>/worktrees/lane-N``: made before the first
attempt, reused by every attempt of that lane (a lane runs one attempt at a time), removed at
the session's end. Workers run in the lane's copy of ``--workspace`` (the same subdirectory
of the repository). A resumed session reuses the worktrees its crashed part left.

Nothing the workers did is lost at the end: uncommitted changes (untracked files included,
ignored ones not) are stashed in the repository (``git stash list`` names the session and
lane), and a lane branch that gained commits is kept; the worktree directories are removed.

git runs as a plain subprocess (never a shell), in a worker thread.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import UsageError

GIT_TIMEOUT = 120.0  #: one git command gives up after this long


def is_git_workspace(path: Path) -> bool:
    """True when ``path`` is inside a git working tree (git installed and answering)."""
    try:
        return _git(path, "rev-parse", "--is-inside-work-tree") == "true"
    except UsageError:
        return False


def check_git_workspace(path: Path, script: str | None = None) -> None:
    """Fail (before anything is written) unless ``path`` is in a git working tree with a
    commit to check out, and ``script`` (relative to ``path``), when given, is committed:
    the lanes' worktrees hold the committed files only."""
    if not is_git_workspace(path):
        raise UsageError(f"--lane-workspaces git-worktree: --workspace {path} is not in a "
                         "git working tree")
    try:
        _git(path, "rev-parse", "--verify", "--quiet", "HEAD")
    except UsageError:
        raise UsageError(f"--lane-workspaces git-worktree: --workspace {path} has no commit "
                         "to check out (HEAD)") from None
    if script is not None and not Path(script).is_absolute():
        try:
            _git(path, "cat-file", "-e", f"HEAD:./{script}")
        except UsageError:
            raise UsageError(
                f"--lane-workspaces git-worktree: worker script {script!r} is not committed "
                f"in {path}; the lanes' worktrees hold only committed files") from None


def _git(cwd: Path, *args: str) -> str:
    """The stripped stdout of one git command; UsageError with git's last line on failure."""
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"git {' '.join(args[:2])} in {cwd} failed: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"git {' '.join(args[:2])} in {cwd} failed: {said}")
    return done.stdout.strip()


class LaneWorkspaces:
    """One git worktree per lane under ``root``; :attr:`dirs` is where each lane's workers
    run (its copy of ``workspace``)."""

    def __init__(self, workspace: Path, root: Path, lanes: int, session_id: str) -> None:
        self.workspace = workspace.resolve()
        self.root = root.resolve()  # git runs elsewhere (-C): never hand it a relative path
        self.session_id = session_id
        self.trees = {lane: self.root / f"lane-{lane}" for lane in range(1, lanes + 1)}
        self.dirs: dict[int, Path] = {}
        self._top = self.workspace

    def branch(self, lane: int) -> str:
        return f"drainer/{self.session_id}/lane-{lane}"

    def create(self) -> None:
        """Make every lane's worktree, or reuse the one a crashed run of the session left.
        Blocking; call from a thread."""
        self._top = Path(_git(self.workspace, "rev-parse", "--show-toplevel")).resolve()
        inside = self.workspace.relative_to(self._top)
        self.root.mkdir(parents=True, exist_ok=True)
        _git(self._top, "worktree", "prune")
        for lane, tree in self.trees.items():
            if not self._is_worktree(tree):
                if tree.exists():
                    shutil.rmtree(tree)  # a half-made one (only ever under our root)
                    _git(self._top, "worktree", "prune")
                if self._has_branch(lane):
                    _git(self._top, "worktree", "add", str(tree), self.branch(lane))
                else:
                    _git(self._top, "worktree", "add", "-b", self.branch(lane), str(tree),
                         "HEAD")
            self.dirs[lane] = tree / inside

    def remove(self) -> list[str]:
        """Stash what the workers left uncommitted, remove the worktrees, delete the lane
        branches that gained no commits. Returns what was kept, one line each. Blocking."""
        kept: list[str] = []
        for lane, tree in self.trees.items():
            if self._is_worktree(tree):
                if _git(tree, "status", "--porcelain"):
                    message = f"drainer {self.session_id} lane-{lane}: left by its workers"
                    _git(tree, "stash", "push", "--include-untracked", "-m", message)
                    kept.append(f"lane-{lane}'s uncommitted changes: git stash list "
                                f"shows {message!r}")
                _git(self._top, "worktree", "remove", "--force", str(tree))
            elif tree.exists():
                shutil.rmtree(tree)
            if self._has_branch(lane):
                try:  # -d: only a branch whose commits HEAD has already
                    _git(self._top, "branch", "-d", self.branch(lane))
                except UsageError:
                    kept.append(f"lane-{lane}'s commits: branch {self.branch(lane)}")
        _git(self._top, "worktree", "prune")
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
        return kept

    def _is_worktree(self, tree: Path) -> bool:
        if not tree.is_dir():
            return False
        try:
            return Path(_git(tree, "rev-parse", "--show-toplevel")).resolve() == tree
        except UsageError:
            return False

    def _has_branch(self, lane: int) -> bool:
        try:
            _git(self._top, "rev-parse", "--verify", "--quiet", f"refs/heads/{self.branch(lane)}")
        except UsageError:
            return False
        return True
