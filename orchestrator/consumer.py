"""Reading the service from a program: ChronoTick's side of the Redis contract.

ChronoTick swaps its in-process NTP client for one import::

    from orchestrator.consumer import NtpReader
    reader = NtpReader.from_config("configs/config_ares_2min_ntp.yaml")
    m = reader.latest("ares-comp-11")        # a Measurement, or None before the first round
    if m is not None and not m.stale:
        true_time = time.time() + m.offset   # +- m.aged_uncertainty

A :class:`Measurement` knows how old it is.  Its ``aged_uncertainty`` grows
the published bound by :data:`DRIFT_BOUND` (RFC 5905's PHI, 15 ppm: the
frequency tolerance NTP assumes of a clock) for every second since the offset
was measured -- the same growth ntpd and chrony give a sample's dispersion.
A clock known to wander more (an undisciplined crystal, a VM) passes its own
``drift_bound`` to the reader.

Redis being unreachable is never a silent ``None``: every call raises
:class:`ServiceUnavailable` instead.  ``None`` means only "nothing published".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import redis

from workers import config as config_mod
from workers import redisurl

from .store import Store

#: How fast an offset may go stale: RFC 5905's PHI, the frequency tolerance
#: NTP assumes of a local clock (s of error per s of age, 15 ppm).
DRIFT_BOUND = 15e-6

#: A measurement older than this many normal measurement intervals is stale
#: (the default of :meth:`NtpReader.from_config`).
STALE_INTERVALS = 3

#: Without a config, ChronoTick's normal interval is 120 s: 3 of them (s).
DEFAULT_STALE_AFTER_S = 360.0

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
    ``measured_at``.
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
    selection: str = "best"
    combined: tuple[str, ...] = ()
    #: From the reader: when this measurement counts as stale (s).
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    #: From the reader: how fast the uncertainty grows with age (s/s).
    drift_bound: float = DRIFT_BOUND
    #: The published JSON, every field (for fields newer than this class).
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_latest(cls, value: dict, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                    drift_bound: float = DRIFT_BOUND) -> Measurement:
        """From a ``latest`` value as the service publishes it."""
        return cls(node=value["node"], offset=float(value["offset"]), uncertainty=float(value["uncertainty"]),
                   delay=float(value["delay"]), stratum=int(value["stratum"]), precision=float(value["precision"]),
                   server=value["server"], quality=value["quality"], measured_at=float(value["measured_at"]),
                   published_at=float(value["published_at"]), round_id=value.get("round_id", ""),
                   address=value.get("address", ""), leap=int(value.get("leap", 0)),
                   root_delay=float(value.get("root_delay", 0.0)),
                   root_dispersion=float(value.get("root_dispersion", 0.0)),
                   servers_used=int(value.get("servers_used", 0)), servers_total=int(value.get("servers_total", 0)),
                   selection=value.get("selection", "best"), combined=tuple(value.get("combined", ())),
                   stale_after_s=stale_after_s, drift_bound=drift_bound, raw=dict(value))

    def age_at(self, now: float) -> float:
        """Seconds from ``measured_at`` to ``now`` (Unix s)."""
        return now - self.measured_at

    @property
    def age_s(self) -> float:
        """Seconds since the offset was measured (this host's clock, now)."""
        return self.age_at(time.time())

    def aged_uncertainty_at(self, now: float) -> float:
        """``uncertainty`` grown by ``drift_bound`` for every second of age at ``now``."""
        return self.uncertainty + self.drift_bound * max(0.0, self.age_at(now))

    @property
    def aged_uncertainty(self) -> float:
        """The bound that holds now: ``uncertainty + drift_bound * age_s``."""
        return self.aged_uncertainty_at(time.time())

    @property
    def stale(self) -> bool:
        """Older than ``stale_after_s``: the service has not published for too long."""
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
        When a measurement is stale (s); :meth:`from_config` uses
        :data:`STALE_INTERVALS` normal intervals.
    drift_bound:
        How fast a measurement's uncertainty grows with age (s/s).
    """

    def __init__(self, url: str, prefix: str = "chronotick", stale_after_s: float = DEFAULT_STALE_AFTER_S, *,
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

    @classmethod
    def from_config(cls, path: str, **kwargs) -> NtpReader:
        """A reader for the service a config file describes (the environment's Redis URL wins)."""
        config = config_mod.load(path)
        kwargs.setdefault("stale_after_s", STALE_INTERVALS * config.timing.normal_interval_s)
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
        ``datetime``); ``limit``: only the newest ``limit`` of those.
        """
        if isinstance(since, datetime):
            since = since.timestamp()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        return self._call(self._store.history_since, node, since, limit=limit)

    def stats(self, node: str) -> dict[str, int]:
        """The node's counters (see the README's contract)."""
        return self._call(self._store.stats, node)

    def nodes(self) -> list[str]:
        """Every node that has published a round."""
        return self._call(self._store.nodes)

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
                    yield self._measurement(json.loads(message["data"]))
        finally:
            try:
                pubsub.close()
            except redis.RedisError:
                pass

    # -- internals ----------------------------------------------------------

    def _measurement(self, value: dict) -> Measurement:
        return Measurement.from_latest(value, stale_after_s=self.stale_after_s, drift_bound=self.drift_bound)

    def _call(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except redis.RedisError as exc:
            raise ServiceUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc


class ClockMeasurementSource:
    """The methods ChronoTick's ``ClockMeasurementCollector`` offers, fed by this service.

    ChronoTick's pipeline calls ``get_latest_offset()`` and
    ``get_recent_measurements(window_seconds)``; this class answers both from
    Redis, so swapping the in-process client is a change of constructor.
    ``start_collection``/``stop_collection`` exist for the same reason: the
    service measures, there is nothing to start.
    """

    def __init__(self, reader: NtpReader, node: str):
        self.reader = reader
        self.node = node

    @classmethod
    def from_config(cls, path: str, node: str, **kwargs) -> ClockMeasurementSource:
        return cls(NtpReader.from_config(path, **kwargs), node)

    def start_collection(self) -> None:
        """Nothing to start: the node's worker and the beat measure."""

    def stop_collection(self) -> None:
        self.reader.close()

    def get_latest_measurement(self) -> dict | None:
        """The latest as ChronoTick's ``NTPMeasurement`` fields; ``None`` if none, or stale."""
        m = self.reader.latest(self.node)
        return None if m is None or m.stale else m.as_chronotick()

    def get_latest_offset(self) -> float | None:
        """The latest offset (s); ``None`` if nothing fresh was published (never a stale value)."""
        m = self.reader.latest(self.node)
        return None if m is None or m.stale else m.offset

    def get_recent_measurements(self, window_seconds: float = 300) -> list[tuple[float, float, float]]:
        """``(timestamp, offset, uncertainty)`` of every measurement published in the window, oldest first."""
        since = time.time() - window_seconds
        return [(r["latest"]["measured_at"], r["latest"]["offset"], r["latest"]["uncertainty"])
                for r in self.reader.history(self.node, since=since)
                if r.get("latest") and r["latest"]["measured_at"] >= since]
