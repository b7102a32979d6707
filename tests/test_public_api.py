"""The public surface: ``drainer.__all__`` is sorted and every name in it resolves."""

from __future__ import annotations

import subprocess
import sys

import drainer


def test_all_is_sorted_and_resolves() -> None:
    assert drainer.__all__ == sorted(drainer.__all__)
    for name in drainer.__all__:
        assert getattr(drainer, name) is not None, name


def test_public_names_match_all() -> None:
    public = {n for n in dir(drainer) if not n.startswith("_")} | {"__version__"}
    assert public == set(drainer.__all__)


def test_import_drainer_is_cheap() -> None:
    # Workers run `python -m drainer.demo.worker`: importing the package must not pull in
    # SQLAlchemy or anyio (that would add their import time to every attempt).
    code = "import sys, drainer, drainer.demo.worker; print(sorted(m for m in ('sqlalchemy', 'anyio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
