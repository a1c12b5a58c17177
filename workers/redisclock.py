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

:class:`RedisClock` estimates Redis' clock from this host's *monotonic* clock,
never its wall clock: one ``TIME`` round trip gives Redis' time at the
exchange's midpoint on the monotonic clock, and the estimate is that time plus
the monotonic time since.  A step of this host's wall clock (what correcting a
node's clock can do: chrony's ``makestep``, ``date -s``) moves no monotonic
clock, so it cannot move the estimate; when the estimate was
``time.time()`` plus a measured offset, a 2 h step moved "Redis' clock" 2 h
until the next measurement, up to a minute later: the beat closed every open
round as overdue, a worker refused every query as past its round's deadline,
a reader's ages were 2 h off.  The monotonic clock is Linux'
``CLOCK_MONOTONIC_RAW`` (:data:`ticks`), the bare oscillator, which no NTP
client's frequency correction or slew moves either (a slew moves
``CLOCK_MONOTONIC``: chrony's is up to 83,333 ppm by default, 5 s a minute);
``time.monotonic`` where there is no such clock.

It runs at this host's oscillator's rate, not Redis': a few tens of ppm off
true time, a few hundred at worst, so the estimate is measured again every
:data:`REFRESH_S` (the quickest of :data:`SAMPLES` exchanges) and drifts at
most 500 ppm x 60 s = 30 ms between two measurements (typically under 3 ms),
plus whatever Redis' own host is slewed by meanwhile.  Its error is half the
measuring round trip plus that drift, far below any budget it is compared
with.  When Redis does not answer, the estimate keeps running on the
monotonic clock from the last measurement (before any: this host's wall
clock).  One clock per process and Redis (:func:`clock_for`), so every thread
of a process reads the same estimate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import redis

log = logging.getLogger(__name__)

#: How often Redis' clock is measured again (s): this host's monotonic clock runs at its oscillator's
#: rate, a few tens of ppm off (500 ppm at worst: 30 ms a minute), and Redis' host may be corrected meanwhile.
REFRESH_S = 60.0

#: Exchanges per measurement; the quickest one's offset is kept (its error is the smallest),
#: as NTP's clock filter keeps the minimum-delay sample.
SAMPLES = 3

#: After a failed measurement, try again this soon (s); the estimate keeps running on the monotonic clock.
RETRY_S = 1.0


def _monotonic_raw() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC_RAW)


#: This host's monotonic clock (s, from an arbitrary origin): ``CLOCK_MONOTONIC_RAW`` where there is one (Linux,
#: macOS), which neither a step nor a slew of the wall clock moves; ``time.monotonic`` elsewhere.
ticks: Callable[[], float] = _monotonic_raw if hasattr(time, "CLOCK_MONOTONIC_RAW") else time.monotonic


class RedisClock:
    """This process's estimate of the Redis server's clock (Unix s), kept on this host's monotonic clock.

    ``monotonic`` is the monotonic clock to keep it on (s): :data:`ticks` unless given (a test's fake).
    """

    def __init__(self, client: redis.Redis, *, refresh_s: float = REFRESH_S,
                 monotonic: Callable[[], float] | None = None):
        self.client = client
        self.refresh_s = refresh_s
        self._ticks = ticks if monotonic is None else monotonic
        #: Half the round trip of the last measurement: the estimate's error bound (s); None until first measured.
        self.error_s: float | None = None
        #: (monotonic time, Redis' time then) of the last measurement: the quickest exchange's midpoint.
        self._anchor: tuple[float, float] | None = None
        self._next = 0.0  # monotonic time of the next measurement
        self._lock = threading.Lock()

    def now(self) -> float:
        """Redis' clock now, as estimated here (Unix s); measures it again first when due."""
        if self._ticks() >= self._next:
            self.measure()
        return self._estimate()

    @property
    def offset_s(self) -> float:
        """Redis' clock minus this host's wall clock now (s); 0 until first measured.  Never measures.

        ``time.time() + offset_s`` is :meth:`now` without a Redis command.  Not a constant: the host's wall
        clock steps and slews, the estimate does not, so this changes with each.
        """
        anchor = self._anchor
        if anchor is None:
            return 0.0
        return anchor[1] + (self._ticks() - anchor[0]) - time.time()

    def measure(self) -> float:
        """Measure Redis' clock again (:data:`SAMPLES` ``TIME``); :attr:`offset_s` after it.

        If Redis does not answer, the last measurement stays in use (the estimate runs on) and is tried again in
        :data:`RETRY_S`.
        """
        with self._lock:
            best: tuple[float, float, float] | None = None  # (round trip, monotonic, Redis) of the quickest
            try:
                for _ in range(SAMPLES):
                    sent = self._ticks()
                    reply = self.client.time()
                    took = self._ticks() - sent
                    if best is None or took < best[0]:
                        best = (took, sent + took / 2, time_of(reply))
            except redis.RedisError as exc:
                self._next = self._ticks() + RETRY_S
                log.debug("cannot read Redis' clock (%s); the estimate keeps running on the monotonic clock "
                          "(offset to this host's clock now %+.6f s)", exc, self.offset_s)
                return self.offset_s
            assert best is not None
            self._anchor = (best[1], best[2])
            self.error_s = best[0] / 2
            self._next = self._ticks() + self.refresh_s
            return self.offset_s

    def from_local(self, local_s: float) -> float:
        """A time on this host's wall clock (``time.time()``: a ``since`` a caller read), as Redis' clock reads it.

        Read with the wall clock's relation to Redis' clock now: a time from before a step of the host's clock
        is converted as if the step had always been there.
        """
        return self.now() + (local_s - time.time())

    def _estimate(self) -> float:
        anchor = self._anchor
        if anchor is None:
            return time.time()  # never measured: this host's clock is all there is
        return anchor[1] + (self._ticks() - anchor[0])


def time_of(reply: tuple[Any, Any]) -> float:
    """A ``TIME`` reply (``(seconds, microseconds)``, as redis-py gives it, in a pipeline too) as Unix s."""
    seconds, micros = reply
    return int(seconds) + int(micros) / 1e6


def redis_now(client: redis.Redis) -> float:
    """Redis' clock now, read with one ``TIME`` (Unix s): exact, where :class:`RedisClock` estimates."""
    return time_of(client.time())


#: A measurement older than this many normal intervals is not fresh: a worker
#: starting then asks for a warm-up (:mod:`workers.warmup`), and ``status``,
#: the exporter and readers call it stale.  The rule's one home: every limit
#: is :func:`stale_after_s`, a node's through
#: :meth:`workers.config.Config.stale_after_s`.
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
