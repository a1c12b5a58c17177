"""Where Redis is: one server's URL, or the Sentinels that name the current master.

Two forms, the ones Celery itself accepts for its broker and result backend:

- ``redis://[user:password@]host:port/db`` (also ``rediss://``, ``unix://``);
- ``sentinel://[user:password@]host:port[/db];sentinel://host:port;...``: the
  Sentinels of a Redis Sentinel deployment (redis.io, "High availability with
  Redis Sentinel").  Which server is the master is asked of them, under
  ``ntp_service.redis_master_name``.  As in Celery, the password and database
  of the first entry are the data servers' own; the Sentinels take none.

Every process of the service (worker, beat, CLI, exporter, consumer API)
connects through :func:`connect`, so each follows a failover the same way:
redis-py's ``Sentinel.master_for`` asks the Sentinels for the master on every
new connection, and a connection to a demoted master fails and is replaced.

Passwords never come from YAML (:mod:`workers.config`) and never reach a log:
print :func:`redact` of a URL, never the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

#: Schemes of a single Redis server.
DIRECT_SCHEMES = ("redis", "rediss", "unix")
#: Scheme of a Sentinel entry.
SENTINEL_SCHEME = "sentinel"
#: The port a Sentinel listens on when an entry names none.
DEFAULT_SENTINEL_PORT = 26379
#: Sentinel's own default master name (``sentinel.conf``).
DEFAULT_MASTER_NAME = "mymaster"
#: How long a connect or a reply may take, to Redis and to a Sentinel (s).
DEFAULT_TIMEOUT_S = 5.0


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message never holds its password."""


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a ``sentinel://...;sentinel://...`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    """Whether ``url`` lists Sentinels rather than one server."""
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel(url: str) -> SentinelUrl:
    """Split a Sentinel URL into its Sentinels, database and credentials.

    Raises :class:`RedisUrlError` naming the entry that is wrong.
    """
    entries = [part.strip() for part in url.split(";") if part.strip()]
    if not entries:
        raise RedisUrlError("no Sentinel listed")
    sentinels = []
    db, username, password = 0, None, None
    for i, entry in enumerate(entries):
        parts = urlsplit(entry)
        where = f"entry {i + 1} ({_redact_one(entry)!r})"
        if parts.scheme != SENTINEL_SCHEME:
            raise RedisUrlError(f"{where}: every entry must be sentinel://host:port")
        if not parts.hostname:
            raise RedisUrlError(f"{where}: no host")
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise RedisUrlError(f"{where}: bad port") from None
        sentinels.append((parts.hostname, port))
        if i == 0:
            path = parts.path.strip("/")
            if path:
                if not path.isdigit():
                    raise RedisUrlError(f"{where}: the database must be a number, not {path!r}")
                db = int(path)
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
    return SentinelUrl(tuple(sentinels), db, username, password)


def check(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis location, or ``None``."""
    if is_sentinel(url):
        try:
            parse_sentinel(url)
        except RedisUrlError as exc:
            return str(exc)
        return None
    parts = urlsplit(url)
    if parts.scheme not in DIRECT_SCHEMES:
        return f"must be a redis://, rediss://, unix:// or sentinel:// URL, not {redact(url)!r}"
    if parts.scheme == "unix":
        return None if parts.path else f"{redact(url)!r}: no socket path"
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked)
    except ValueError:
        return f"{redact(url)!r}: the port must be a number 1-65535"
    if not parts.hostname:
        return f"{redact(url)!r}: no host"
    path = parts.path.strip("/")
    if path and not path.isdigit():
        return f"{redact(url)!r}: the database must be a number, not {path!r}"
    return None


def has_password(url: str) -> bool:
    """Whether any entry of ``url`` carries a password."""
    return any(urlsplit(part.strip()).password for part in url.split(";") if part.strip())


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` for the data servers (first entry of a Sentinel URL)."""
    first, sep, rest = url.partition(";")
    parts = urlsplit(first.strip())
    user = quote(unquote(parts.username or ""), safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)) + sep + rest


def redact(url: str) -> str:
    """``url`` with every password replaced by ``***`` (safe to print)."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, master_name: str = DEFAULT_MASTER_NAME, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            health_check_interval_s: int = 0, retry: bool = True) -> redis.Redis:
    """A client for the Redis at ``url``: the server itself, or the master the Sentinels name.

    Nothing is sent until the first command.  With Sentinels, every new
    connection asks them for the master again, so a client made before a
    failover reaches the new master after it.  ``retry=False``: a command
    that times out fails at once (redis-py otherwise tries it again, so one
    call could block several timeouts).
    """
    options: dict = {**_timeouts(timeout_s), "health_check_interval": health_check_interval_s}
    if not retry:
        options["retry"] = Retry(NoBackoff(), 0)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    where = parse_sentinel(url)
    sentinels = Sentinel(list(where.sentinels), sentinel_kwargs=_timeouts(timeout_s))
    return sentinels.master_for(master_name, db=where.db, username=where.username, password=where.password,
                                **options)


def celery_transport_options(url: str, master_name: str) -> dict:
    """What Celery's broker and result backend need beside a Sentinel URL (the master's name)."""
    if not is_sentinel(url):
        return {}
    return {"master_name": master_name, "sentinel_kwargs": _timeouts(DEFAULT_TIMEOUT_S)}


def _timeouts(seconds: float) -> dict:
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}
