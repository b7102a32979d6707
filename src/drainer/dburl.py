"""Database URL handling: the sync form users give, the async form drainer opens, redaction.

Users give Autopack-style sync URLs (``sqlite:///autopack.db``, ``postgresql://u:p@h/db``).
drainer opens them with async drivers and hands workers the sync form in ``DATABASE_URL``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UsageError

_SQLITE = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}
_POSTGRES = {
    "postgres",
    "postgresql",
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "postgresql+pg8000",
}
_ASYNC_DRIVERS = {"sqlite+aiosqlite", "postgresql+asyncpg"}
EXAMPLES = "e.g. sqlite:///autopack.db or postgresql://user:password@host:5432/dbname"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A validated backlog URL in its three forms."""

    async_url: URL  #: what drainer opens (sqlite+aiosqlite / postgresql+asyncpg)
    sync_url: str  #: what workers get in DATABASE_URL (password intact)
    redacted: str  #: what drainer prints and writes (password replaced by ***)
    password: str | None

    @property
    def is_sqlite(self) -> bool:
        return self.async_url.get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.async_url.database) if self.is_sqlite and self.async_url.database else None


def parse_database_url(raw: str, *, base_dir: Path | None = None) -> DatabaseURL:
    """Validate ``raw`` and derive the async, sync and redacted forms.

    A relative SQLite path is made absolute against ``base_dir`` (default: the current
    directory) so that drainer and workers started in another workspace open the same file.
    """
    if not raw or not raw.strip():
        raise UsageError(f"empty database URL; give one, {EXAMPLES}")
    try:
        url = make_url(_quote_password(raw.strip()))
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"bad database URL {_redact_raw(raw)!r}: {EXAMPLES}") from exc
    name = url.drivername
    if name in _SQLITE:
        db = url.database
        if not db or db == ":memory:" or db.startswith("file:"):
            raise UsageError(
                "SQLite URL needs a file path that workers can open too, e.g. sqlite:///autopack.db"
            )
        path = Path(db)
        if not path.is_absolute():
            path = (base_dir or Path(os.getcwd())) / path
        url = url.set(drivername="sqlite+aiosqlite", database=str(path))
        sync = url.set(drivername="sqlite" if name == "sqlite+aiosqlite" else name)
    elif name in _POSTGRES:
        if not url.database:
            raise UsageError(f"PostgreSQL URL names no database: {EXAMPLES}")
        sync_name = "postgresql" if name in _ASYNC_DRIVERS or name == "postgres" else name
        sync = url.set(drivername=sync_name)
        url = url.set(drivername="postgresql+asyncpg")
    else:
        raise UsageError(
            f"unsupported database URL scheme {name!r}: drainer supports SQLite and PostgreSQL, "
            f"{EXAMPLES}"
        )
    return DatabaseURL(
        async_url=url,
        sync_url=sync.render_as_string(hide_password=False),
        redacted=sync.render_as_string(hide_password=True),
        password=url.password if url.password else None,
    )


def _quote_password(raw: str) -> str:
    """Percent-encode a password typed raw (``p@ss``, ``50%off``): the last ``@`` ends the
    credentials, so no part of the password is taken for the host (nor shown in an error)."""
    scheme, sep, rest = raw.partition("://")
    if not sep or "@" not in rest:
        return raw
    creds, host = rest.rsplit("@", 1)
    user, colon, password = creds.partition(":")
    if not colon or ("@" not in password and not _BAD_ESCAPE.search(password)):
        return raw
    return f"{scheme}://{user}:{quote(unquote(password), safe='')}@{host}"


def _redact_raw(raw: str) -> str:
    """Best-effort redaction of a URL we could not parse: hide what follows ``user:``."""
    if "@" in raw and "://" in raw:
        scheme, rest = raw.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else raw
    return raw


def redact_text(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret in ``text`` by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
