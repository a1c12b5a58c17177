"""Reading the service from a program: ChronoTick's side of the Redis contract.

Two ways in.  ChronoTick's own pipeline swaps its in-process NTP client for
one import line, and runs unmodified::

    from orchestrator.consumer import ClockMeasurementSource as ClockMeasurementCollector

(:class:`ClockMeasurementSource`: every attribute ChronoTick's pipeline
touches, answered from memory, never raising, whatever Redis does).  A
program of its own reads the contract directly::

    from orchestrator.reader import NtpReader
    reader = NtpReader.from_config("configs/config_ares_2min_ntp.yaml")
    m = reader.latest("ares-comp-11")        # a Measurement, or None before the first round
    if m is not None and not m.stale:
        true_time = time.time() + m.offset   # +- m.aged_uncertainty

A :class:`Measurement` knows how old it is, on the service's clock (Redis',
:mod:`workers.redisclock`): its age is the time since its round was published
(``published_at``, Redis' clock) -- never this host's clock against the
measuring node's ``measured_at``, which differ by whatever the two clocks
disagree, and a node whose clock is wrong is exactly the one ChronoTick must
correct.  Its ``aged_uncertainty`` grows the published bound by
:data:`DRIFT_BOUND` (RFC 5905's PHI, 15 ppm: the frequency tolerance NTP
assumes of a clock) for every second of that age -- the same growth ntpd and
chrony give a sample's dispersion.  A clock known to wander more (an
undisciplined crystal, a VM) passes its own ``drift_bound`` to the reader.

The reader loses nothing (issue #24): a history entry that is not a round
record is skipped with one warning naming it, and the rest of its batch is
kept; a history stream made again under the reader (Redis emptied, or ids
that go back) is noticed and read again from its start, without duplicates
and without a round older than the newest held coming after it; and a
measurement read through the history has every field ``latest`` has, with
the same values.

For :class:`NtpReader`, Redis being unreachable is never a silent ``None``:
every call raises :class:`ServiceUnavailable` instead.  ``None`` means only
"nothing published".
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import redis

from workers import config as config_mod
from workers import redisclock, redisurl, warmup
from workers.keys import Keys

from . import hub, records
from .store import BadRecord, Store, record_of

log = logging.getLogger(__name__)

#: How fast an offset may go stale: RFC 5905's PHI, the frequency tolerance
#: NTP assumes of a local clock (s of error per s of age, 15 ppm).
DRIFT_BOUND = 15e-6

#: How long one Redis command may take before the reader gives up (s).
SOCKET_TIMEOUT_S = 5.0

#: ChronoTick's ``NTPMeasurement`` fields, in its order.
CHRONOTICK_FIELDS = ("offset", "delay", "stratum", "precision", "server", "timestamp", "uncertainty")


class ServiceUnavailable(Exception):
    """Redis (the service's store) could not be read: the one error a reader raises for an outage.

    ``url`` is the Redis URL with any password removed; ``__cause__`` is the
    redis-py error.
    """

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot read the NTP service at {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Measurement:
    """One published ``latest``: the node's best offset and how far to trust it.

    Times are Unix seconds and durations seconds.  ``offset`` is server minus
    local: true time = local time + offset, within ``uncertainty`` at
    ``measured_at`` (the measuring node's clock).  ``published_at`` is on the
    service's clock (Redis' ``TIME``, read as the round was published), and so
    is every age: ``age_s`` is the time since publication on ``clock``, the
    reader's estimate of Redis' clock (:class:`workers.redisclock.RedisClock`:
    this host's clock plus an offset measured with ``TIME``).

    Why that age, for staleness and for ``aged_uncertainty``: an age is a
    difference of two instants, and both must be read on one clock.  ``now -
    measured_at`` on this host mixes two clocks, wrong by however far they
    disagree -- two hours for a node two hours off, so its fresh measurement
    looked two hours old (or, ahead, an old one looked fresh and its bound
    never grew).  ``published_at`` and Redis' clock are one clock, whoever
    reads them, to within half a ``TIME`` round trip.  The age so read is short
    of the offset's own age by the rest of its round after the exchange (under
    the round's budget, seconds): at PHI that is below a microsecond, under the
    resolution a bound is published with, so nothing is added for it.  A
    reader on the measuring node itself could use ``now - measured_at``, but
    the reader cannot tell where it runs, and that age jumps when the node's
    clock is stepped -- which is what a clock being corrected does.
    """

    node: str
    offset: float
    uncertainty: float
    delay: float
    stratum: int
    precision: float
    server: str
    quality: str
    measured_at: float
    published_at: float
    round_id: str = ""
    address: str = ""
    leap: int = 0
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    servers_used: int = 0
    servers_total: int = 0
    selection: str = records.UNSAID_SELECTION
    combined: tuple[str, ...] = ()
    #: From the reader: when this measurement counts as stale (s; without a config, the declared default
    #: interval's: :data:`workers.config.DEFAULT_STALE_AFTER_S`).
    stale_after_s: float = config_mod.DEFAULT_STALE_AFTER_S
    #: From the reader: how fast the uncertainty grows with age (s/s).
    drift_bound: float = DRIFT_BOUND
    #: The published JSON, every field (for fields newer than this class).
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    #: From the reader: the service's clock now (Unix s on Redis' clock, as this host estimates it,
    #: without asking Redis); ages are read on it.  Default: this host's clock, taken for Redis'.
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @classmethod
    def from_latest(cls, value: dict, *, stale_after_s: float = config_mod.DEFAULT_STALE_AFTER_S,
                    drift_bound: float = DRIFT_BOUND, clock: Callable[[], float] = time.time) -> Measurement:
        """From a published measurement: the ``latest`` key's value, an ``updates`` message, or a history
        record's ``latest`` -- each read by the one parser, :meth:`orchestrator.records.Latest.from_json`.

        Fields newer than a value (an old history entry's) take their
        defaults.  Raises ``KeyError``, ``TypeError`` or ``ValueError`` (a
        number that is not finite) for a value that is no measurement.
        """
        latest = records.Latest.from_json(value)
        ours = {f.name for f in fields(cls)}  # every field of the published measurement this class has
        return cls(**{f.name: getattr(latest, f.name) for f in fields(latest) if f.name in ours},
                   stale_after_s=stale_after_s, drift_bound=drift_bound, raw=dict(value), clock=clock)

    def age_at(self, now: float) -> float:
        """Seconds from publication to ``now`` (Unix s on the service's clock: see the class doc)."""
        return now - self.published_at

    @property
    def age_s(self) -> float:
        """Seconds since the measurement was published, on the service's clock (Redis'), now."""
        return self.age_at(self.clock())

    def aged_uncertainty_at(self, now: float) -> float:
        """``uncertainty`` grown by ``drift_bound`` for every second of age at ``now`` (the service's clock)."""
        return self.uncertainty + self.drift_bound * max(0.0, self.age_at(now))

    @property
    def aged_uncertainty(self) -> float:
        """The bound that holds now: ``uncertainty + drift_bound * age_s`` (never below ``uncertainty``)."""
        return self.aged_uncertainty_at(self.clock())

    @property
    def stale(self) -> bool:
        """Older than ``stale_after_s`` on the service's clock: the service has not published for too long."""
        return self.age_s > self.stale_after_s

    def as_chronotick(self) -> dict:
        """Exactly ChronoTick's ``NTPMeasurement`` fields (SI seconds).

        ``timestamp`` is ``measured_at``, the local instant the offset refers
        to (the midpoint of the exchange); ``uncertainty`` is the published
        bound, not aged: ChronoTick ages its measurements itself.
        """
        return {"offset": self.offset, "delay": self.delay, "stratum": self.stratum, "precision": self.precision,
                "server": self.server, "timestamp": self.measured_at, "uncertainty": self.uncertainty}


class NtpReader:
    """Read a node's measurements, history and counters from the service's Redis.

    Parameters
    ----------
    url:
        The Redis URL (``redis://[:password@]host:port/db``), or the
        Sentinels' (``sentinel://host:26379;sentinel://host2:26379``): the
        reader then follows the master they name through a failover.
    prefix:
        ``ntp_service.key_prefix``.
    stale_after_s:
        When a measurement is stale (s); :meth:`from_config` uses the config's
        (:meth:`workers.config.Config.stale_after_s`: 3 normal intervals), and
        without one it is the declared default interval's
        (:data:`workers.config.DEFAULT_STALE_AFTER_S`).
    drift_bound:
        How fast a measurement's uncertainty grows with age (s/s).
    """

    def __init__(self, url: str, prefix: str = "chronotick", stale_after_s: float = config_mod.DEFAULT_STALE_AFTER_S, *,
                 drift_bound: float = DRIFT_BOUND, socket_timeout_s: float = SOCKET_TIMEOUT_S,
                 master_name: str = redisurl.DEFAULT_MASTER_NAME):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, not {stale_after_s!r}")
        if drift_bound < 0:
            raise ValueError(f"drift_bound must not be negative, not {drift_bound!r}")
        self.url = redisurl.redact(url)
        self.prefix = prefix
        self.stale_after_s = float(stale_after_s)
        self.drift_bound = float(drift_bound)
        self._client = redisurl.connect(url, master_name, timeout_s=socket_timeout_s)
        self._store = Store(self._client, prefix=prefix)
        #: Redis' clock, which every age is read on (the one ``history(since=...)`` uses too).
        self._clock = redisclock.clock_for(self._client)

    @classmethod
    def from_config(cls, path: str, **kwargs) -> NtpReader:
        """A reader for the service a config file describes (the environment's Redis URL wins)."""
        config = config_mod.load(path)
        kwargs.setdefault("stale_after_s", config.stale_after_s())
        kwargs.setdefault("master_name", config.service.redis_master_name)
        return cls(config.service.redis_url, prefix=config.service.key_prefix, **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> NtpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads --------------------------------------------------------------

    def latest(self, node: str) -> Measurement | None:
        """The node's current best measurement; ``None`` if none was ever published."""
        value = self._call(self._store.latest, node)
        return None if value is None else self._measurement(value)

    def history(self, node: str, since: float | datetime | None = None, limit: int | None = None) -> list[dict]:
        """Round records (starvation and outliers too), oldest first.

        ``since``: only rounds finished at or after it (Unix s, or an aware
        ``datetime``); ``limit``: only the newest ``limit`` of those.  An
        entry that is no round record is skipped, with one warning naming it
        (:meth:`orchestrator.store.Store.records_in`); a record's ``latest``
        has every field the ``latest`` key had, each equal to it (numbers
        exactly, in the compact form too: :mod:`orchestrator.records`).
        """
        if isinstance(since, datetime):
            since = since.timestamp()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        return self._call(self._store.history_since, node, since, limit=limit)

    def stats(self, node: str) -> dict[str, int]:
        """The node's counters (see docs/contract.md)."""
        return self._call(self._store.stats, node)

    def nodes(self) -> list[str]:
        """Every node that has published a round."""
        return self._call(self._store.nodes)

    def relative_offset(self, a: str, b: str, *, max_drift_ppm: float = hub.DEFAULT_MAX_DRIFT_PPM) -> hub.Relative:
        """Node ``a``'s clock against node ``b``'s, from their latest LAN legs (issue #26, :mod:`orchestrator.hub`).

        ``offset_to_reference`` is b's clock minus a's (add it to a reading of
        a's clock to get b's); ``uncertainty`` bounds it by the two LAN legs plus
        both clocks' drift at ``max_drift_ppm`` over the time between the two
        measurements (nothing against the hub node, whose clock is the hub's).
        Nodes measured without a hub compare their offsets to UTC, with their
        WAN-sized bounds.  Raises :class:`LookupError` if either node has
        published nothing.
        """
        values = [self._call(self._store.latest, node) for node in (a, b)]
        for node, value in zip((a, b), values, strict=True):
            if value is None:
                raise LookupError(f"node {node!r} has published no measurement")
        return hub.relative(values[0], values[1], hub_node=None, max_drift_ppm=max_drift_ppm)

    # -- waiting ------------------------------------------------------------

    def wait_for_update(self, node: str, timeout_s: float = 5.0) -> Measurement | None:
        """The next measurement published for ``node`` after this call; ``None`` after ``timeout_s``."""
        return next(self.updates(node, timeout_s=timeout_s), None)

    def updates(self, node: str, *, timeout_s: float | None = None) -> Iterator[Measurement]:
        """Each measurement published for ``node`` from now on, as it is published.

        One subscription for the whole iteration, so nothing published between
        two items is missed.  Ends after ``timeout_s`` (``None``: never).
        """
        channel = self._store.keys.updates(node)
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            self._call(pubsub.subscribe, channel)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return
                message = self._call(pubsub.get_message, timeout=min(remaining, 1.0))
                if message is not None and message["type"] == "message":
                    try:
                        measurement = self._measurement(json.loads(message["data"]))
                    except (ValueError, KeyError, TypeError) as exc:  # another version's, a hand-made one
                        log.warning("skipping a message on %s: not a measurement (%s: %s)", channel,
                                    type(exc).__name__, exc)
                        continue
                    yield measurement
        finally:
            try:
                pubsub.close()
            except redis.RedisError:
                pass

    # -- internals ----------------------------------------------------------

    def _measurement(self, value: dict) -> Measurement:
        self._clock.now()  # measures Redis' clock again when due (every few minutes), here where Redis is read
        return Measurement.from_latest(value, stale_after_s=self.stale_after_s, drift_bound=self.drift_bound,
                                       clock=self._service_now)

    def _service_now(self) -> float:
        """Redis' clock now, from the last measured offset: no Redis command, so an age never waits."""
        return time.time() + self._clock.offset_s

    def _call(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except redis.RedisError as exc:
            raise ServiceUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc



#: How long one Redis command of :class:`ClockMeasurementSource`'s follower may
#: take (s); the follower runs beside ChronoTick's calls, never under them.
FOLLOW_TIMEOUT_S = 0.75

#: The follower's blocking read on the history stream returns after this long
#: with nothing new (ms): how soon :meth:`ClockMeasurementSource.stop_collection`
#: is heard.
FOLLOW_BLOCK_MS = 250

#: After a failed read, the follower tries Redis again this often (s).
FOLLOW_RETRY_S = 0.5

#: Measurements a source keeps in memory: ChronoTick's collector kept at most
#: 1,000 (its 500 s window at a 1 s warm-up holds 500).
KEEP_MEASUREMENTS = 1000

#: How many round ids a source remembers having read (starvation rounds too), so that a stream read again
#: from its start gives none back (:meth:`ClockMeasurementSource._from_start`).  A re-read reaches
#: :data:`KEEP_MEASUREMENTS` entries back from the new stream's end: with that stream up to as many entries
#: short of what was read, it still holds a round read within the last twice as many.  Deeper, the rounds
#: are told by their publish times (unless Redis' clock also went back).
SEEN_REMEMBERED = 2 * KEEP_MEASUREMENTS

#: How many of the newest measurements :meth:`SourceStatistics.get_measurement_statistics`
#: summarises, as ChronoTick's client did.
STATISTICS_RECENT = 10

#: The id a follower holds for a stream that was empty (or missing) when it read it: XREAD from it reads all.
EMPTY_STREAM_ID = "0-0"

#: Whether the history stream still holds the entry the follower read last (KEYS[1] the stream, ARGV[1]
#: its id), and the stream's first and last ids now ('' when it is empty or gone).  Redis never gives a
#: stream an id at or below one it gave before, nor trims from anywhere but the start, so the entry held
#: is gone only if the stream was made again (Redis emptied or restarted without its data, the key
#: deleted -- its new ids may be below the one held: a Redis host whose clock went back) or trimmed
#: past it.  Ids only, in one small reply, with every blocking read.
HELD_ENTRY = """
local held = #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
return {held, first and first[1] or '', last and last[1] or ''}
"""


class SourceStatistics:
    """``collector.ntp_client`` in ChronoTick: what ``get_stats()`` reads (``real_data_pipeline.py``)."""

    def __init__(self, source: ClockMeasurementSource):
        self._source = source

    def get_measurement_statistics(self) -> dict:
        """ChronoTick's keys, over the newest :data:`STATISTICS_RECENT` measurements (seconds).

        ``status`` is ``no_measurements`` (and nothing else) before the first;
        then ``active``, ``total_measurements``, ``recent_count``,
        ``offset_stats`` {mean, stdev, range}, ``delay_stats`` {mean, min, max},
        ``servers_used`` (every server a recent measurement came from or was
        averaged over).  Added here: ``ntp_service_reachable``.
        """
        measurements, total, reachable = self._source._snapshot()
        if not measurements:
            return {"status": "no_measurements"}
        recent = measurements[-STATISTICS_RECENT:]
        offsets = [m.offset for m in recent]
        delays = [m.delay for m in recent]
        servers = sorted({name for m in recent for name in (m.combined or (m.server,))})
        return {
            "status": "active",
            "total_measurements": total,
            "recent_count": len(recent),
            "offset_stats": {"mean": statistics.mean(offsets),
                             "stdev": statistics.stdev(offsets) if len(offsets) > 1 else 0,
                             "range": max(offsets) - min(offsets)},
            "delay_stats": {"mean": statistics.mean(delays), "min": min(delays), "max": max(delays)},
            "servers_used": servers,
            "ntp_service_reachable": reachable,
        }


class ClockMeasurementSource:
    """ChronoTick's ``ClockMeasurementCollector``, fed by this service: a drop-in, one import line.

    ``ClockMeasurementSource(config_path)`` is all ChronoTick calls.  The node
    is ``$CHRONOTICK_NODE``, else the short host name (the worker's rule);
    Redis is the config's (``$CHRONOTICK_REDIS_URL`` and
    ``$CHRONOTICK_REDIS_PASSWORD`` as everywhere).

    ``start_collection()`` asks the service for the node's warm-up (rounds
    every warm-up interval, shared with any other consumer of the node, for at
    most the *service's* ``warm_up.duration_seconds``, :mod:`workers.warmup`)
    and starts one thread that follows the node's history stream.  The service
    may refuse (the node is fresh or in its cooldown, the node is unknown or
    the hub, no beat leads): the refusal is logged with its reason (an unknown
    node as an error) and in :attr:`warm_up`, and collection goes on.  Every other
    call answers from what that thread has read: none waits on Redis, and
    none raises when Redis is away.  The thread logs one warning when an
    outage starts and one when it ends, and catches up on what was published
    meanwhile.  (:class:`NtpReader` is the strict way in: it raises
    :class:`ServiceUnavailable`.)

    The follower loses nothing (issue #24).  A history entry that is not a
    round record, or whose measurement is not one, is skipped with one
    warning naming it; the rest of its batch is kept.  With every read it
    checks that the stream still holds the entry it read last
    (:data:`HELD_ENTRY`); if not, the stream was made again -- Redis emptied or
    restarted without its data, a replica or a copy some entries behind, ids
    that went back -- and it reads the stream again from its start, keeping
    only the rounds published after every round it read (:meth:`_from_start`):
    what it holds stays in the order the rounds were published, and no round
    read before comes back, even one long gone from its memory.  Staleness and
    the window of :meth:`get_recent_measurements` are judged on Redis' clock
    (:class:`Measurement`), which the follower measures; ChronoTick's calls
    only read the offset it measured.

    A measurement's timestamp is ``measured_at``: the local instant its
    offset refers to, the midpoint of the chosen exchange (for ``combine``,
    the weighted one), where ChronoTick's own client stamped the time it
    finished averaging.
    """

    def __init__(self, config_path: str, node: str | None = None, *, stale_after_s: float | None = None,
                 drift_bound: float = DRIFT_BOUND, environ=None):
        config = config_mod.load(config_path)
        self.config_path = str(config_path)
        self.node = config_mod.resolve_node(node, environ=environ)
        timing = config.timing
        #: ChronoTick's names, with its meaning (s).
        self.warm_up_duration = timing.warm_up_duration_s
        self.warm_up_interval = timing.warm_up_interval_s
        self.normal_interval = timing.normal_interval_s
        #: A measurement older than this is never handed out (s; default: the node's staleness limit,
        #: :meth:`workers.config.Config.stale_after_s`).
        self.stale_after_s = config.stale_after_s(self.node) if stale_after_s is None else stale_after_s
        self.drift_bound = drift_bound
        self.url = config.service.redis_url_redacted
        self.ntp_client = SourceStatistics(self)
        self._prefix = config.service.key_prefix
        self._history_key = Keys(self._prefix).history(self.node)
        self._client = redisurl.connect(config.service.redis_url, config.service.redis_master_name,
                                        timeout_s=FOLLOW_TIMEOUT_S, retry=False)
        self._lock = threading.Lock()
        self._measurements: deque[Measurement] = deque(maxlen=KEEP_MEASUREMENTS)
        self._total = 0
        self._last_id: str | None = None  # None: the recent history is still to be read
        #: The round ids read, the newest :data:`SEEN_REMEMBERED` (the follower's alone: no lock).
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        #: The newest publish time (``finished_at``, Redis' clock) of a round read; None before the first.
        self._newest_read: float | None = None
        #: Redis' clock, measured by the follower only (ChronoTick's calls never wait on Redis).
        self._clock = redisclock.RedisClock(self._client)
        self._clock_due = 0.0  # time.monotonic() when the follower measures Redis' clock again
        self._new_since_check = False
        self._warm_up_wanted = False
        self._outage_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The service's answer to this consumer's warm-up request (:class:`workers.warmup.Answer`: ``[0]``
        #: started, ``[1]`` seconds remaining, ``outcome``, ``reason`` when refused), or None before.
        self.warm_up: warmup.Answer | None = None

    @classmethod
    def from_config(cls, path: str, node: str | None = None, **kwargs) -> ClockMeasurementSource:
        return cls(path, node, **kwargs)

    # -- ChronoTick's calls ---------------------------------------------------

    def start_collection(self) -> None:
        """Ask for the node's warm-up and start following its measurements (returns at once)."""
        if self._thread is not None and self._thread.is_alive():
            log.warning("clock measurement collection already running for %s", self.node)
            return
        self._stop.clear()
        self._warm_up_wanted = self.warm_up_duration > 0
        self._thread = threading.Thread(target=self._follow, name=f"chronotick-ntp-follow-{self.node}", daemon=True)
        self._thread.start()
        log.info("following %s's measurements at %s; warm-up %g s at %g s, then every %g s", self.node, self.url,
                 self.warm_up_duration, self.warm_up_interval, self.normal_interval)

    def stop_collection(self) -> None:
        """Stop following (within about a second); what was read stays readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=FOLLOW_TIMEOUT_S + FOLLOW_BLOCK_MS / 1000)
        self._client.close()

    def get_latest_offset(self) -> float | None:
        """The newest offset (s); ``None`` before the first, or once it is stale (never a stale value)."""
        latest = self._latest()
        return None if latest is None else latest.offset

    def get_latest_measurement(self) -> dict | None:
        """The newest as ChronoTick's ``NTPMeasurement`` fields; ``None`` if none, or stale."""
        latest = self._latest()
        return None if latest is None else latest.as_chronotick()

    def has_new_measurement(self) -> bool:
        """Whether a measurement came since the last call (the first call: since the start)."""
        with self._lock:
            new, self._new_since_check = self._new_since_check, False
        return new

    def get_recent_measurements(self, window_seconds: float = 300) -> list[tuple[float, float, float]]:
        """``(timestamp, offset, uncertainty)`` of the last ``window_seconds``, oldest first.

        The window is judged on Redis' clock, as every age (:class:`Measurement`):
        measurements published at most ``window_seconds`` ago.  ``timestamp``
        stays ``measured_at``, the node's own instant, which ChronoTick
        compares with its own clock on that node.
        """
        now = self._service_now()
        with self._lock:
            found = [(m.measured_at, m.offset, m.uncertainty) for m in self._measurements
                     if m.age_at(now) <= window_seconds]
        return sorted(found)

    # -- state -----------------------------------------------------------------

    @property
    def collecting(self) -> bool:
        """Whether the follower thread runs (between start_collection and stop_collection)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def reachable(self) -> bool:
        """Whether the follower's last read of Redis succeeded."""
        return self._outage_since is None

    def _service_now(self) -> float:
        """Redis' clock now, from the offset the follower last measured: no Redis command."""
        return time.time() + self._clock.offset_s

    def _latest(self) -> Measurement | None:
        with self._lock:
            latest = self._measurements[-1] if self._measurements else None
        return None if latest is None or latest.stale else latest

    def _snapshot(self) -> tuple[list[Measurement], int, bool]:
        with self._lock:
            return list(self._measurements), self._total, self.reachable

    # -- the follower ------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._read_once()
            except redis.RedisError as exc:
                if self._stop.is_set():
                    break  # stop_collection closed the client under the read
                self._outage(exc)
                self._stop.wait(FOLLOW_RETRY_S)
                continue
            except Exception:  # never die silently: ChronoTick would be left reading a frozen past
                log.exception("following %s's measurements failed; trying again", self.node)
                self._stop.wait(FOLLOW_RETRY_S)
                continue
            if self._outage_since is not None:
                log.warning("the NTP service at %s answers again after %.1f s; %d measurements held",
                            self.url, time.monotonic() - self._outage_since, len(self._measurements))
                self._outage_since = None

    def _read_once(self) -> None:
        if self._warm_up_wanted:
            self._ask_for_warm_up()
        self._measure_clock()
        if self._last_id is None:  # the newest records first, then only what is new
            self._read_from_start()
            return
        if self._last_id == EMPTY_STREAM_ID:  # the stream was empty: once it is not, read it from its start
            if self._client.xread({self._history_key: self._last_id}, count=1, block=FOLLOW_BLOCK_MS):
                self._read_from_start()
            return
        # And is the entry read last still there?  Asked in the same round trip, *after* the read returns: a
        # stream made again while the read waited then answers no, and what the read brought (maybe new ids
        # above the one held, with lower ones before them) is not taken alone.
        reply: Any
        with self._client.pipeline(transaction=False) as pipe:
            pipe.xread({self._history_key: self._last_id}, count=KEEP_MEASUREMENTS, block=FOLLOW_BLOCK_MS)
            pipe.eval(HELD_ENTRY, 1, self._history_key, self._last_id)
            reply, (held, first, last) = pipe.execute()
        if not int(held):
            log.warning("the history stream of %s changed under the reader: %s; reading it again from its "
                        "start, keeping only rounds published after every round read", self.node,
                        _why_gone(self._last_id, str(first), str(last)))
            self._read_from_start()
            return
        for _, entries in reply or ():
            if entries:
                self._last_id = str(entries[-1][0])
                self._ingest(entries)

    def _ask_for_warm_up(self) -> None:
        """Ask the service for the node's warm-up, once per ``start_collection``; say what it answered.

        A refusal (the node is fresh, in its cooldown, unknown to the beat, the
        hub, or no beat leads) is logged -- an unknown node as an error -- and
        collection goes on: ChronoTick measures on with what is published.
        Raises redis' errors only (the follower retries).
        """
        answer = warmup.request(self._client, self._prefix, self.node, self.warm_up_duration)
        self.warm_up = answer
        self._warm_up_wanted = False
        capped = ""
        if answer.started and answer.remaining_s < self.warm_up_duration - 0.5:
            capped = (f" (this config asks for {self.warm_up_duration:g} s; the service's own "
                      "warm_up.duration_seconds caps it)")
        warmup.log_answer(log, answer, "consumer: ", capped)

    def _read_from_start(self) -> None:
        """Read the stream's newest :data:`KEEP_MEASUREMENTS` entries, and follow it from the newest.

        Read again (after a round was read), only what :meth:`_from_start`
        keeps is kept, and Redis' clock is measured again before the next
        read: a stream made again may be another Redis' (a failover), or a
        Redis' whose clock went back.
        """
        with self._client.pipeline(transaction=False) as pipe:
            pipe.xrevrange(self._history_key, count=KEEP_MEASUREMENTS)
            pipe.time()
            found, now = pipe.execute()
        newest: list = list(found or [])
        newest.reverse()
        self._last_id = str(newest[-1][0]) if newest else EMPTY_STREAM_ID
        if self._newest_read is not None:
            self._clock_due = 0.0
        self._ingest(newest, redis_now=redisclock.time_of(now))

    def _from_start(self, read: list[tuple[str, float, Measurement | None]],
                    redis_now: float) -> list[tuple[str, float, Measurement | None]]:
        """Of the rounds read from the stream's start (stream order), the new ones: published after every round
        read before, so that they come after the ones held.

        ``read``: (round id, publish time, measurement or ``None``) each;
        ``redis_now``: Redis' clock as they were read.  Before any round was
        read, all of them.  Else, when the stream holds a round read before
        (the newest :data:`SEEN_REMEMBERED`), the rounds after the last such
        one: a stream's order is the order of publication, whatever the
        clocks say (a replica one entry behind, its clock behind the old
        master's, publishes its first rounds at earlier times than the newest
        held).  A round before it was read before -- maybe long ago and gone
        from memory: a replica one entry behind gives back the 1,000 rounds
        before its end -- or is older than one read, and must not come after
        it.  When the stream holds none (Redis emptied or restarted without
        its data), the rounds published after the newest read, on Redis'
        clock: a copy older than everything read gives nothing back.  Unless
        Redis' clock reads before that newest round: it went back (or this
        Redis' clock is behind the one that published it), and the rounds
        published since carry earlier times though they are newer: then all of
        them.
        """
        newest = self._newest_read
        if newest is None:
            return read
        last_read = max((i for i, (round_id, _, _) in enumerate(read) if round_id in self._seen), default=None)
        if last_read is not None:
            return read[last_read + 1:]
        if redis_now < newest:
            log.warning("Redis' clock reads %.3f s before the newest round held of %s was published, and the "
                        "stream holds no round read before: its clock went back, or this Redis' clock is behind "
                        "the one that published it; keeping every round in it", newest - redis_now, self.node)
            return read
        return [r for r in read if r[1] > newest]

    def _measure_clock(self) -> None:
        """Measure Redis' clock when due (:data:`workers.redisclock.REFRESH_S`; sooner while it never answered)."""
        if time.monotonic() < self._clock_due:
            return
        self._clock.measure()  # keeps the last offset if Redis does not answer
        self._clock_due = time.monotonic() + (redisclock.REFRESH_S if self._clock.error_s is not None
                                              else redisclock.RETRY_S)

    def _ingest(self, entries, *, redis_now: float | None = None) -> None:
        """Keep the measurements of ``entries`` (stream order) not read before; skip, with a warning, what is none.

        ``redis_now`` (Redis' clock as they were read) when they are the
        stream's newest, read from its start: then only what
        :meth:`_from_start` keeps.
        """
        read: list[tuple[str, float, Measurement | None]] = []  # every round record, starvation too
        for entry in entries:
            try:
                record = record_of(entry)
                latest = record.get("latest")
                measurement = None if latest is None else Measurement.from_latest(  # None: nothing published
                    {"round_id": record["round_id"], **latest}, stale_after_s=self.stale_after_s,
                    drift_bound=self.drift_bound, clock=self._service_now)
            except BadRecord as bad:
                log.warning("skipping history entry %s of %s: %s", bad.entry_id, self.node, bad.reason)
                continue
            except Exception as exc:  # one bad entry must cost only itself, whatever is wrong with it
                log.warning("skipping history entry %s of %s: its measurement is not one ChronoTick can use "
                            "(%s: %s)", entry[0], self.node, type(exc).__name__, exc)
                continue
            read.append((record["round_id"], record["finished_at"] if measurement is None else measurement.published_at,
                         measurement))
        if redis_now is not None:
            read = self._from_start(read, redis_now)
        found = []
        for round_id, published_at, measurement in read:
            if round_id in self._seen:
                continue  # read again after the stream was made again: read before
            self._remember(round_id)
            if self._newest_read is None or published_at > self._newest_read:
                self._newest_read = published_at
            if measurement is not None:
                found.append(measurement)
        if not found:
            return
        with self._lock:
            self._measurements.extend(found)
            self._total += len(found)
            self._new_since_check = True

    def _remember(self, round_id: str) -> None:
        """Remember ``round_id`` as read (the newest :data:`SEEN_REMEMBERED`)."""
        if len(self._seen_order) >= SEEN_REMEMBERED:
            self._seen.discard(self._seen_order.popleft())
        self._seen_order.append(round_id)
        self._seen.add(round_id)

    def _outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("cannot read the NTP service at %s (%s: %s); answering from the %d measurements read "
                        "before", self.url, type(exc).__name__, exc, len(self._measurements))


def _stream_id(text: str) -> tuple[int, int]:
    """A stream id (``ms-seq``) as numbers, to compare."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _why_gone(held: str, first: str, last: str) -> str:
    """Why the entry a follower held (``held``) is no longer in its stream, from the stream's first and last ids."""
    if not last:
        return f"entry {held} is gone and the stream is empty (Redis emptied or restarted without its data)"
    if _stream_id(last) < _stream_id(held):
        return (f"its ids went back: it ends at {last}, before the entry held, {held} (made again: Redis emptied, "
                "or its clock went back)")
    if _stream_id(first) > _stream_id(held):
        return f"it starts at {first}, after the entry held, {held} (trimmed past it, or made again)"
    return f"entry {held} is gone from between {first} and {last} (the stream was made again with other ids)"
