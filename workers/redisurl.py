"""Where Redis is: one server's URL, or the Sentinels that name the current master.

Two forms, the ones Celery itself accepts for its broker and result backend:

- ``redis://[user:password@]host:port/db`` (also ``rediss://``, ``unix://``);
- ``sentinel://[user:password@]host:port[/db];sentinel://host:port;...``: the
  Sentinels of a Redis Sentinel deployment (redis.io, "High availability with
  Redis Sentinel").  Which server is the master is asked of them, under
  ``ntp_service.redis_master_name``.  As in Celery, the password and database
  of the first entry are the data servers' own; the Sentinels take none.

Every process of the service (worker, beat, CLI, exporter, reader library)
connects through :func:`connect`, so each follows a failover the same way:
redis-py's ``Sentinel.master_for`` asks the Sentinels for the master on every
new connection, and a connection to a demoted master fails and is replaced.
And each reads text: :func:`connect` sets ``decode_responses`` (UTF-8), so no
caller decodes bytes.  Everything the service stores is text (JSON, names,
numbers, stream ids); NTS keys and cookies never leave a worker's memory.
Celery's own connections (broker, result backend) are kombu's and Celery's,
made with their settings (:func:`celery_settings`), and keep their bytes.

Passwords never come from YAML (:mod:`workers.config`) and never reach a log:
print :func:`redact` of a URL, never the URL.

A link to Redis can die without a word: a cable pulled, a switch port down,
a node's interface down.  Nothing tells either end, and TCP retransmits what
it sent with a back-off that doubles up to minutes, so a connection that
waits for a reply, and a process that waits on it, wait out that back-off
long after the link is back (measured on the cluster test bed: 49 s after a
60 s cut, nothing logged meanwhile).  Every connection made here, and every
one Celery and kombu make for the service (:func:`celery_settings`), is
instead declared dead after :data:`DEAD_AFTER_S` without an acknowledgement
-- by the kernel, through TCP keepalive and ``TCP_USER_TIMEOUT`` -- and no
call waits longer than :data:`DEFAULT_TIMEOUT_S` for a reply or
:data:`CONNECT_TIMEOUT_S` to connect; a new connection is tried every
:data:`RECONNECT_INTERVAL_S`.  A process says once that it lost Redis and
once that it is back (:class:`Outages`), never once per attempt.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
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
#: How long a reply may take, from Redis and from a Sentinel (s); the longest any call blocks on one.
DEFAULT_TIMEOUT_S = 5.0
#: How long connecting may take (s): a cluster LAN answers in a millisecond, and 2 s leaves room for
#: one lost SYN, which Linux sends again after 1 s.  Within a cut it fails in 2 s, or at once.
CONNECT_TIMEOUT_S = 2.0
#: TCP keepalive on every connection: the first probe after this long without traffic (s) ...
KEEPALIVE_IDLE_S = 5
#: ... then one every this long (s) ...
KEEPALIVE_INTERVAL_S = 1
#: ... and after this many unanswered, the kernel closes the connection.
KEEPALIVE_PROBES = 3
#: A connection with nothing acknowledged for this long is dead (s): idle (the keepalive probes
#: above go unanswered), or with a request out (``TCP_USER_TIMEOUT``, which otherwise is TCP's
#: retransmission back-off: about 15 minutes).  The process then gets an error, not a wait.
DEAD_AFTER_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES
#: A connection unused this long is PINGed before its next command (s): redis-py's health check,
#: and kombu's check of its BRPOP and pub/sub connections.  The backstop for what the kernel cannot
#: see -- a Redis that accepts connections and never answers -- so longer than :data:`DEAD_AFTER_S`,
#: and longer than a worker's 5 s heartbeat, which would otherwise PING before every beat.
HEALTH_CHECK_INTERVAL_S = 10
#: After losing Redis, a worker's consumer tries a new connection this often (s), not Celery's
#: default 2, 4, 6 ... 30 s, which can leave a worker idle half a minute after its link is back.
RECONNECT_INTERVAL_S = 1.0


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
            health_check_interval_s: int = HEALTH_CHECK_INTERVAL_S, retry: bool = True) -> redis.Redis:
    """A client for the Redis at ``url``: the server itself, or the master the Sentinels name.

    Nothing is sent until the first command.  With Sentinels, every new
    connection asks them for the master again, so a client made before a
    failover reaches the new master after it.  ``timeout_s`` bounds a reply
    (and connecting, at most :data:`CONNECT_TIMEOUT_S`); a dead link is
    noticed by the kernel (:func:`socket_settings`).  ``retry=False``: a
    command that times out fails at once (redis-py otherwise tries it again,
    so one call could block several timeouts).  Replies are text
    (``decode_responses``), set here once for every client of the service.
    """
    options: dict = {**socket_settings(url, timeout_s), "health_check_interval": health_check_interval_s,
                     "decode_responses": True}
    if not retry:
        options["retry"] = Retry(NoBackoff(), 0)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    where = parse_sentinel(url)
    sentinels = Sentinel(list(where.sentinels), sentinel_kwargs=socket_settings(url, timeout_s))
    return sentinels.master_for(master_name, db=where.db, username=where.username, password=where.password,
                                **options)


def celery_transport_options(url: str, master_name: str) -> dict:
    """What Celery's broker and result backend need beside a Sentinel URL (the master's name)."""
    if not is_sentinel(url):
        return {}
    return {"master_name": master_name, "sentinel_kwargs": socket_settings(url, DEFAULT_TIMEOUT_S)}


def keepalive_options() -> dict[int, int]:
    """``socket_keepalive_options`` for redis-py and kombu: :data:`KEEPALIVE_IDLE_S` and the rest.

    Only the options this platform has (Linux has all four); ``TCP_USER_TIMEOUT`` is in
    milliseconds.
    """
    wanted = {"TCP_KEEPIDLE": KEEPALIVE_IDLE_S, "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_S,
              "TCP_KEEPCNT": KEEPALIVE_PROBES, "TCP_USER_TIMEOUT": DEAD_AFTER_S * 1000}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def socket_settings(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """redis-py's (and kombu's) socket options for ``url``: timeouts, and keepalive over TCP.

    A Unix socket has no keepalive and no connect timeout to set (redis-py refuses them there).
    """
    if urlsplit(url.split(";")[0].strip()).scheme == "unix":
        return {"socket_timeout": timeout_s}
    return {"socket_timeout": timeout_s, "socket_connect_timeout": min(timeout_s, CONNECT_TIMEOUT_S),
            "socket_keepalive": True, "socket_keepalive_options": keepalive_options()}


def celery_settings(url: str) -> dict:
    """Celery's settings for a link to Redis that can die silently (see the module's docstring).

    ``broker_transport_options`` entries go to kombu, which passes them to redis-py for the
    broker's connections (a worker's BRPOP, every publish); the ``redis_*`` settings are the result
    backend's (Celery's chord counters).  ``broker_heartbeat`` is AMQP's and does nothing on Redis:
    the keepalives and health checks do its job.
    """
    sockets = socket_settings(url)
    transport = {**sockets, "health_check_interval": HEALTH_CHECK_INTERVAL_S}
    backend = {"redis_socket_timeout": sockets["socket_timeout"],
               "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL_S}
    if "socket_connect_timeout" in sockets:
        backend["redis_socket_connect_timeout"] = sockets["socket_connect_timeout"]
        # Celery passes no keepalive options to its backend, so redis-py's own apply (idle 30 s,
        # then 3 probes 5 s apart); the socket timeout bounds every call meanwhile.
        backend["redis_socket_keepalive"] = True
    return {"broker_transport_options": transport, **backend,
            # Reconnect for ever, at startup and after a loss: a node outlives its link and Redis restarts.
            "broker_connection_retry": True, "broker_connection_retry_on_startup": True,
            "broker_connection_max_retries": None}


class Outages:
    """Whether this process has Redis: one WARNING when it loses it, one when it is back.

    Each service process says what it saw -- :meth:`lost` after a failed call or connection,
    :meth:`back` after a good one -- as often as it likes; a line is logged only when the
    state changes, so an outage of a minute, with a retry every second, is two lines in the
    log.  Inert until :meth:`watch` names the Redis (a worker, the beat and the exporter do;
    one-shot commands report failures their own way).
    """

    def __init__(self, log: logging.Logger):
        self.log = log
        self.url: str | None = None
        self._lock = threading.Lock()
        self._since: float | None = None

    def watch(self, url: str) -> None:
        """Start reporting, for the Redis at ``url`` (shown redacted; :func:`describe` of a client will do)."""
        self.url = redact(url)

    def absorb(self, log: logging.Logger) -> None:
        """Make ``log``'s lines about a call that could not reach Redis into this one loss.

        A service that tries its calls again on its next pass (the beat: every
        round, every second) would otherwise log an error per pass for as long
        as Redis is away.  A record whose arguments or exception hold a
        connection error is dropped and reported through :meth:`lost` -- while
        this process watches its Redis; otherwise it is logged as it was.
        """
        log.addFilter(self._absorbed)

    def _absorbed(self, record: logging.LogRecord) -> bool:
        if self.url is None:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in (*args, record.exc_info[1] if record.exc_info else None)
                  if isinstance(a, BaseException) and is_connection_error(a)]
        if not errors:
            return True
        self.lost(errors[0])
        return False

    @property
    def down(self) -> bool:
        """Whether a loss was reported and no return since."""
        return self._since is not None

    def lost(self, error: BaseException | str) -> bool:
        """Redis failed us; True if this is news (and was logged)."""
        if self.url is None:
            return False
        with self._lock:
            if self._since is not None:
                return False
            self._since = time.monotonic()
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.log.warning("[REDIS] lost %s (%s). Trying again, quietly until it is back", self.url, detail)
        return True

    def back(self) -> bool:
        """Redis answered; True if it had been lost (and its return was logged)."""
        if self._since is None:
            return False
        with self._lock:
            if self._since is None:
                return False
            since, self._since = self._since, None
        self.log.warning("[REDIS] back: %s answers again, %.1f s after it was lost", self.url,
                         time.monotonic() - since)
        return True


def describe(client: redis.Redis) -> str:
    """Where ``client`` connects, without its password: for :meth:`Outages.watch`."""
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service is not None:
        return f"the master {service!r} the Sentinels name"
    kwargs = pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


#: This process's Redis link, as its worker, beat or exporter sees it.
outages = Outages(logging.getLogger(__name__))


def is_connection_error(error: BaseException | None) -> bool:
    """Whether ``error`` says Redis could not be reached (rather than refused a command).

    Its causes count too: kombu re-raises redis-py's errors as its own ``OperationalError``.
    """
    for _ in range(8):  # a chain of causes, not a cycle
        if error is None:
            return False
        if isinstance(error, redis.ConnectionError | redis.TimeoutError | ConnectionError | TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False
