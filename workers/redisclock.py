"""The service's one clock for its own bookkeeping: Redis' (``TIME``), never a host's.

A round's deadline is set by the dispatcher (the beat, or ``measure``) and
checked by the node's worker; its record is finished by whoever runs the
callback, and trimmed against stream ids, which are Redis' milliseconds.  Read
on each host's own clock, a node whose clock is ahead of the beat's by more
than a round's budget found every round past its deadline -- and that node is
exactly the one ChronoTick must correct.  So every service time (dispatch,
deadlines, finish, history windows) is Redis' time, as each process estimates
it; a measurement's own times (t1, t4, ``measured_at``) stay the node's, since
the offset describes that clock.  Every age (how old ``latest`` is: ``status``,
the exporter, the alert rules, the beat's and a worker's freshness checks) is
Redis' clock now minus ``published_at``, the Redis time its round was
published at (:func:`latest_age_s`, :func:`is_stale`), never a host's clock minus
``measured_at``.

:class:`RedisClock` estimates Redis' clock from this host's: ``time.time()``
plus an offset measured with one ``TIME`` round trip (its midpoint), again
every :data:`REFRESH_S` (the quickest of :data:`SAMPLES`).  The estimate's
error is half that round trip, far below any budget it is compared with.  One
clock per process and Redis (:func:`clock_for`), so every thread of a process
reads the same estimate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import redis

log = logging.getLogger(__name__)

#: How often the offset to Redis' clock is measured again (s): clocks drift by
#: parts per million, so a minute keeps the estimate within microseconds of drift.
REFRESH_S = 60.0

#: Exchanges per measurement; the quickest one's offset is kept (its error is the smallest),
#: as NTP's clock filter keeps the minimum-delay sample.
SAMPLES = 3

#: After a failed measurement, try again this soon (s); the last offset stays in use.
RETRY_S = 1.0


class RedisClock:
    """This process's estimate of the Redis server's clock (Unix s)."""

    def __init__(self, client: redis.Redis, *, refresh_s: float = REFRESH_S):
        self.client = client
        self.refresh_s = refresh_s
        #: Redis' clock minus this host's (s); 0 until first measured.
        self.offset_s = 0.0
        #: Half the round trip of the last measurement: the estimate's error bound (s).
        self.error_s: float | None = None
        self._next = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        """Redis' clock now, as estimated here (Unix s)."""
        return self.from_local(time.time())

    def measure(self) -> float:
        """Measure the offset again (one ``TIME``); the offset, or the last one if Redis did not answer."""
        with self._lock:
            best: tuple[float, float] | None = None  # (round trip, offset) of the quickest exchange
            try:
                for _ in range(SAMPLES):
                    before, sent = time.time(), time.monotonic()
                    seconds, micros = self.client.time()
                    took = time.monotonic() - sent
                    offset = (int(seconds) + int(micros) / 1e6) - (before + took / 2)
                    if best is None or took < best[0]:
                        best = (took, offset)
            except redis.RedisError as exc:
                self._next = time.monotonic() + RETRY_S
                log.debug("cannot read Redis' clock (%s); keeping the offset %+.6f s", exc, self.offset_s)
                return self.offset_s
            assert best is not None
            self.error_s, self.offset_s = best[0] / 2, best[1]
            self._next = time.monotonic() + self.refresh_s
            return self.offset_s

    def from_local(self, local_s: float) -> float:
        """A time on this host's clock, as Redis' clock reads it (Unix s)."""
        if time.monotonic() >= self._next:
            self.measure()
        return local_s + self.offset_s


def time_of(reply: tuple[Any, Any]) -> float:
    """A ``TIME`` reply (``(seconds, microseconds)``, as redis-py gives it, in a pipeline too) as Unix s."""
    seconds, micros = reply
    return int(seconds) + int(micros) / 1e6


def redis_now(client: redis.Redis) -> float:
    """Redis' clock now, read with one ``TIME`` (Unix s): exact, where :class:`RedisClock` estimates."""
    return time_of(client.time())


#: A measurement older than this many normal intervals is not fresh: a worker
#: starting then asks for a warm-up (:mod:`workers.warmup`), and ``status``,
#: the exporter and readers call it stale.
STALE_INTERVALS = 3


def stale_after_s(normal_interval_s: float) -> float:
    """How old a measurement may get before it is stale (s): :data:`STALE_INTERVALS` normal intervals."""
    return STALE_INTERVALS * normal_interval_s


def latest_age_s(latest: Mapping[str, Any] | None, service_now: float) -> float | None:
    """How old a ``latest`` value is (s), on the service's clock: ``service_now`` minus its ``published_at``.

    ``service_now`` is Redis' clock (:func:`redis_now`), and
    ``published_at`` is the Redis time its round was published at, so no
    host's clock enters.  Never ``measured_at``: that is the measuring node's
    own clock, and the node ChronoTick must correct may be hours off -- 2 h
    behind, its fresh measurement looked 7,200 s old; 2 h ahead, -7,200 s
    (it could not go stale for two hours).  ``None`` without a value, or
    with one that has no readable ``published_at``.
    """
    if latest is None:
        return None
    try:
        return service_now - float(latest["published_at"])
    except (KeyError, TypeError, ValueError):
        return None


def is_stale(age_s: float | None, stale_after: float) -> bool:
    """Whether a measurement of age ``age_s`` (:func:`latest_age_s`; ``None``: none) is stale."""
    return age_s is None or age_s > stale_after


@lru_cache(maxsize=64)
def clock_for(client: redis.Redis) -> RedisClock:
    """One clock per client (and so per Redis) in this process."""
    return RedisClock(client)
