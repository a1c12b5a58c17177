"""Warm-up on demand: a node gets rounds at the warm-up interval when someone starts to need them.

ChronoTick's collector measured every ``warm_up.measurement_interval`` for
``warm_up.duration_seconds`` after *it* started, and its pipeline then wants
ten measurements at once (``real_data_pipeline.py``, ``_mark_warm_up_complete``).
A cluster's beat runs for months, so a warm-up tied to the beat's age would
serve only the first minute of the cluster.  Instead a warm-up is asked for:

- by a consumer starting collection for node N (:class:`orchestrator.consumer.ClockMeasurementSource`);
- by N's worker starting while N has no fresh measurement (the hook below);
- by a beat taking the lease, for its nodes that have none.

All requests go into one sorted set, ``<prefix>:ntp:warm_up``: node -> when
its warm-up ends, in milliseconds on *Redis'* clock (``TIME`` inside a
script), so no two hosts' clocks are ever compared.  A request while N's
warm-up runs joins it (consumers on one node share one warm-up); the key
expires with the last warm-up in it.  The leading beat reads the set once a
second (one script call, whatever the number of nodes) and runs each listed
node at the warm-up interval until its end.
"""

from __future__ import annotations

import json
import logging
import os

import redis
from celery import signals

from . import config as config_mod
from . import redisurl
from .keys import QUEUE_PREFIX, Keys
from .redisclock import STALE_INTERVALS as STALE_INTERVALS  # judged on Redis' clock, so defined with it
from .redisclock import is_stale, latest_age_s, stale_after_s, time_of

log = logging.getLogger(__name__)

#: Join the node's running warm-up, or start one ending ARGV[2] ms from now
#: (Redis' clock).  Returns {started (0/1), ms remaining}.
_REQUEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
if ends > now then
    return {0, ends - now}
end
local duration = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + duration, ARGV[1])
if redis.call('PTTL', KEYS[1]) < duration then
    redis.call('PEXPIRE', KEYS[1], duration)
end
return {1, duration}
"""

#: Drop finished warm-ups; return node, ms remaining, ... for the running ones.
_ACTIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local found = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #found, 2 do
    out[#out + 1] = found[i]
    out[#out + 1] = tostring(math.floor(tonumber(found[i + 1]) - now))
end
return out
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def request(client: redis.Redis, prefix: str, node: str, duration_s: float) -> tuple[bool, float]:
    """Ask for ``duration_s`` of warm-up rounds for ``node``; ``(started, seconds remaining)``.

    ``started`` is False when ``node`` was already warming up: the request
    joins that warm-up and does not extend it.  Raises redis' errors.
    """
    if duration_s <= 0:
        return False, 0.0
    started, remaining_ms = client.eval(_REQUEST, 1, Keys(prefix).warm_up(), node, int(duration_s * 1000))
    return bool(int(started)), int(remaining_ms) / 1000


def active(client: redis.Redis, prefix: str) -> dict[str, float]:
    """``{node: seconds of warm-up remaining}`` for every node warming up now.  Raises redis' errors."""
    flat = client.eval(_ACTIVE, 1, Keys(prefix).warm_up())
    return {_text(flat[i]): int(_text(flat[i + 1])) / 1000 for i in range(0, len(flat), 2)}


def nodes_without_fresh_measurement(client: redis.Redis, prefix: str, nodes: list[str],
                                    normal_interval_s: float) -> list[str]:
    """Those of ``nodes`` whose ``latest`` is missing or older than :data:`STALE_INTERVALS` normal intervals.

    One MGET and one TIME in one round trip, whatever the number of nodes:
    the age is judged on Redis' clock (:func:`latest_age_s`), so the beat and
    a node's own worker agree whatever either host's clock says.
    """
    if not nodes:
        return []
    keys = Keys(prefix)
    with client.pipeline(transaction=False) as pipe:
        pipe.mget([keys.latest(node) for node in nodes])
        pipe.time()
        values, now = pipe.execute()
    service_now = time_of(now)
    limit = stale_after_s(normal_interval_s)
    stale = []
    for node, raw in zip(nodes, values, strict=True):
        try:
            latest = json.loads(raw) if raw is not None else None
        except ValueError:
            latest = None
        if is_stale(latest_age_s(latest if isinstance(latest, dict) else None, service_now), limit):
            stale.append(node)
    return stale


def warm_up_if_not_fresh(client: redis.Redis, prefix: str, nodes: list[str],
                         timing: config_mod.TimingSettings) -> list[str]:
    """Request a warm-up for each of ``nodes`` without a fresh measurement; the nodes requested."""
    if timing.warm_up_duration_s <= 0:
        return []
    stale = nodes_without_fresh_measurement(client, prefix, nodes, timing.normal_interval_s)
    for node in stale:
        request(client, prefix, node, timing.warm_up_duration_s)
    return stale


def _worker_config() -> config_mod.Config | None:
    path = os.environ.get(config_mod.ENV_CONFIG)
    if not path:
        return None
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:  # the CLI checked it already; a plain celery worker may not have
        log.error("[WARM-UP] %s", exc)
        return None


@signals.worker_ready.connect
def _warm_up_on_start(sender=None, **_) -> None:
    """A worker starting for node N while N has nothing fresh asks for N's warm-up.

    The node is the one of each ``ntp.<node>`` queue it consumes; the key
    prefix and timing come from ``$CHRONOTICK_CONFIG`` (the ``worker``
    command sets it), else the defaults.
    """
    config = _worker_config()
    service = config.service if config is not None else config_mod.ServiceSettings()
    timing = config.timing if config is not None else config_mod.TimingSettings()
    nodes = [q.name[len(QUEUE_PREFIX):] for q in sender.task_consumer.queues if q.name.startswith(QUEUE_PREFIX)]
    if not nodes:
        return
    try:
        client = redisurl.connect(str(sender.app.conf.broker_url), sender.app.conf.chronotick_redis_master_name)
        try:
            for node in warm_up_if_not_fresh(client, service.key_prefix, nodes, timing):
                log.warning("[WARM-UP] %s: no fresh measurement; asked for %g s of rounds every %g s", node,
                            timing.warm_up_duration_s, timing.warm_up_interval_s)
        finally:
            client.close()
    except redis.RedisError as exc:  # Redis away: the beat's own check covers the node when it leads
        log.warning("[WARM-UP] could not ask for a warm-up (%s: %s)", type(exc).__name__, exc)
