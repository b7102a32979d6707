"""Database URL handling: the sync form users give, the async form drainer opens, redaction.

Users give Autopack-style sync URLs (``sqlite:///autopack.db``, ``postgresql://u:p@h/db``).
drainer opens them with async drivers and hands workers the sync form in ``DATABASE_URL``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, quote_plus, unquote

from .errors import UsageError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

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
# RFC 3986's shape as SQLAlchemy's ``make_url`` reads it: scheme://[user[:password]@]
# [host | [ipv6]][:port][/database][?query]. A plain URL (no escapes but in the password, no
# character any SQLAlchemy release quotes) is parsed here, so that commands that never open
# the database (``drainer config``, usage errors) do not import SQLAlchemy; every release
# reads and writes such a URL alike. Any other URL is read by the installed SQLAlchemy
# itself, as the workers' SQLAlchemy beside it will (2.0 leaves an escaped database name as
# it is, 2.1 decodes it).
_PLAIN = re.compile(
    r"""[A-Za-z0-9+]+://
        (?:[A-Za-z0-9._~-]*(?::[^@/?#]*)?@)?
        (?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)
        (?::[0-9]*)?
        (?:/[A-Za-z0-9._~/-]*)?
        (?:\?[A-Za-z0-9._~=&-]*)?""",
    re.X,
)
_URL = re.compile(
    r"""(?P<scheme>[\w+]+)://
        (?:(?P<user>[^:/]*)(?::(?P<password>[^@]*))?@)?
        (?:\[(?P<ipv6>[^/?]+)\]|(?P<host>[^/:?]+))?
        (?::(?P<port>[^/?]*))?
        (?:/(?P<database>[^?]*))?
        (?:\?(?P<query>.*))?\Z""",
    re.X | re.S,
)


@dataclass(frozen=True, slots=True)
class _Parts:
    """A URL's parts, unquoted: what SQLAlchemy's ``URL`` holds."""

    drivername: str
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    query: tuple[tuple[str, str], ...]
    plain: bool = True  #: parsed here (else by SQLAlchemy, which then writes it too)

    def render(self, *, hide_password: bool) -> str:
        """The URL as SQLAlchemy's ``render_as_string`` writes it (the same quoting, query
        keys sorted), except that hiding also hides a lone user name and a ``password``
        given in the query."""
        if not self.plain:
            return self._render_by_sqlalchemy(hide_password)
        out = f"{self.drivername}://"
        if self.username is not None and hide_password and self.password is None:
            out += "***@"  # a user alone may be a token: any userinfo is hidden
        elif self.username is not None:
            out += quote(self.username, safe=" +")
            if self.password is not None:
                out += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            out += "@"
        if self.host is not None:
            out += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            out += f":{self.port}"
        if self.database is not None:
            out += "/" + quote(self.database, safe=" +/")
        if self.query:
            out += "?" + "&".join(
                f"{quote_plus(key)}="
                + ("***" if hide_password and key.lower() == "password" else quote_plus(value))
                for key, value in sorted(self.query, key=lambda kv: kv[0]))
        return out

    def _render_by_sqlalchemy(self, hide_password: bool) -> str:
        from sqlalchemy.engine import URL

        lone_user = hide_password and self.username is not None and self.password is None
        url = URL.create(self.drivername, username=None if lone_user else self.username,
                         password=self.password, host=self.host, port=self.port,
                         database=self.database, query=self.query_dict())
        out = url.render_as_string(hide_password=hide_password)
        if lone_user:  # "***@" where the user was
            scheme, _, rest = out.partition("://")
            out = f"{scheme}://***@{rest}"
        if hide_password and any(k.lower() == "password" for k, _ in self.query):
            out = re.sub(r"([?&][Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=)[^&]*", r"\1***", out)
        return out

    def query_dict(self) -> dict[str, str | list[str]]:
        """The query as SQLAlchemy's ``URL`` holds it: a repeated key's values in a list."""
        out: dict[str, str | list[str]] = {}
        for key, value in self.query:
            had = out.get(key)
            out[key] = value if had is None else [*([had] if isinstance(had, str) else had),
                                                  value]
        return out

    @property
    def secret(self) -> str | None:
        """The password, from the credentials or from the query."""
        if self.password:
            return self.password
        return next((v for k, v in self.query if k.lower() == "password" and v), None)


def _parse(raw: str) -> _Parts:
    if not _PLAIN.fullmatch(raw):
        return _parse_by_sqlalchemy(raw)
    m = _URL.match(raw)
    if m is None:
        raise ValueError("not a URL")
    port = m["port"]
    return _Parts(
        drivername=m["scheme"],
        username=unquote(m["user"]) if m["user"] is not None else None,
        password=unquote(m["password"]) if m["password"] is not None else None,
        host=m["ipv6"] or m["host"] or None,
        port=int(port) if port else None,
        database=unquote(m["database"]) if m["database"] else None,
        query=tuple(parse_qsl(m["query"] or "")),
    )


def _parse_by_sqlalchemy(raw: str) -> _Parts:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ValueError(str(exc)) from exc
    query: list[tuple[str, str]] = []
    for key in sorted(url.query):
        values = url.query[key]
        query += [(key, values)] if isinstance(values, str) else [(key, v) for v in values]
    return _Parts(drivername=url.drivername, username=url.username, password=url.password,
                  host=url.host, port=url.port, database=url.database, query=tuple(query),
                  plain=False)


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A validated backlog URL in its three forms."""

    parts: _Parts  #: what drainer opens (sqlite+aiosqlite / postgresql+asyncpg)
    sync_url: str  #: what workers get in DATABASE_URL (password intact)
    redacted: str  #: what drainer prints and writes (password, or a lone user, as ***)
    password: str | None
    #: SQLite: the URL's ``timeout``, seconds to wait for a lock, as for Python's
    #: ``sqlite3.connect`` and SQLAlchemy (None: not given)
    sqlite_timeout: float | None = None
    #: the redacted URL without ``timeout``: which database it names (``--resume`` compares it)
    identity: str = ""

    @property
    def async_url(self) -> URL:
        """The URL drainer opens, as SQLAlchemy's ``URL`` (imports SQLAlchemy)."""
        from sqlalchemy.engine import URL

        p = self.parts
        return URL.create(p.drivername, username=p.username, password=p.password,
                          host=p.host, port=p.port, database=p.database,
                          query=p.query_dict())

    @property
    def is_sqlite(self) -> bool:
        return self.parts.drivername.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.parts.database) if self.is_sqlite and self.parts.database else None


def parse_database_url(raw: str, *, base_dir: Path | None = None) -> DatabaseURL:
    """Validate ``raw`` and derive the async, sync and redacted forms.

    A relative SQLite path is made absolute against ``base_dir`` (default: the current
    directory) so that drainer and workers started in another workspace open the same file.
    """
    if not raw or not raw.strip():
        raise UsageError(f"empty database URL; give one, {EXAMPLES}")
    try:
        url = _parse(_quote_password(raw.strip()))
    except ValueError as exc:
        raise UsageError(f"bad database URL {_redact_raw(raw)!r}: {EXAMPLES}") from exc
    name = url.drivername
    timeout: float | None = None
    if name in _SQLITE:
        db = url.database
        if not db or db == ":memory:" or db.startswith("file:"):
            raise UsageError(
                "SQLite URL needs a file path that workers can open too, e.g. sqlite:///autopack.db"
            )
        path = Path(db)
        if not path.is_absolute():
            path = (base_dir or Path(os.getcwd())) / path
        timeout = _sqlite_timeout(url.query, raw)
        url = replace(url, drivername="sqlite+aiosqlite", database=str(path))
        sync = replace(url, drivername="sqlite" if name == "sqlite+aiosqlite" else name)
    elif name in _POSTGRES:
        if not url.database:
            raise UsageError(f"PostgreSQL URL names no database: {EXAMPLES}")
        sync_name = "postgresql" if name in _ASYNC_DRIVERS or name == "postgres" else name
        sync = replace(url, drivername=sync_name)
        url = replace(url, drivername="postgresql+asyncpg")
    else:
        raise UsageError(
            f"unsupported database URL scheme {name!r}: drainer supports SQLite and PostgreSQL, "
            f"{EXAMPLES}"
        )
    named = sync if timeout is None else \
        replace(sync, query=tuple(kv for kv in sync.query if kv[0] != "timeout"))
    return DatabaseURL(
        parts=url,
        sync_url=sync.render(hide_password=False),
        redacted=sync.render(hide_password=True),
        password=url.secret,
        sqlite_timeout=timeout,
        identity=named.render(hide_password=True),
    )


#: the SQLite ``timeout`` drainer accepts, in seconds: ``sqlite3`` keeps it as whole
#: milliseconds in a C int, so a value below a millisecond waits not at all and one above
#: about 24 days overflows to no wait; drainer's retries and stops scale with it
SQLITE_TIMEOUT_RANGE = (0.001, 3600.0)


def _sqlite_timeout(query: tuple[tuple[str, str], ...], raw: str) -> float | None:
    """The URL's ``timeout``, checked (an empty one is dropped, as SQLAlchemy drops it)."""
    values = [v for k, v in query if k == "timeout"]
    if not values:
        return None
    low, high = SQLITE_TIMEOUT_RANGE
    try:
        seconds = float(values[0])
    except ValueError:
        seconds = math.nan
    if len(values) > 1 or not (low <= seconds <= high):
        raise UsageError(f"bad database URL {_redact_raw(raw)!r}: timeout= must be given "
                         f"once, as seconds from {low:g} to {high:g} (how long to wait for "
                         "SQLite's lock)")
    return seconds


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
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://***@{host}"
    return raw


def redact_text(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret in ``text`` by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
