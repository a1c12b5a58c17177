"""The relay's counts in Redis, for the exporter and for people: one hash per relay port.

``<prefix>:relay:<name>:<port>``
    Every counter of :mod:`relay.stats`, the upstream, the added delay's
    p50/p99 (s), and ``updated_at`` (Unix s, the relay's clock).  It expires
    :data:`REPORT_TTL_S` after the last write, so a relay that is gone
    disappears -- after a week: until then the exporter shows it silent
    (``report_age_s``, from the key's TTL: Redis' clock, not the relay's) and
    the relay alert stays firing.  A relay taken out of service on purpose:
    delete its keys (``redis-cli --scan --pattern '<prefix>:relay:<name>:*'``).
``<prefix>:relays``
    The set of those keys.

Written only when ``CHRONOTICK_REDIS_URL`` is set; the relay never needs Redis.
"""

from __future__ import annotations

import time

from workers.keys import Keys

#: A relay's report outlives its last write by this long (s): a week, so that a relay that stopped
#: reporting stays visible (its report's age growing) and the relay alert keeps firing -- an hour let the
#: alert clear while the relay was still dead (an adversarial review).
REPORT_TTL_S = 7 * 24 * 3600


def port_key(prefix: str, name: str, port: int) -> str:
    return Keys(prefix).relay_port(name, port)


def index_key(prefix: str) -> str:
    return Keys(prefix).relays()


class RedisReport:
    """Write snapshots (:meth:`relay.stats.PortStats.snapshot`) to Redis."""

    def __init__(self, client, *, prefix: str, name: str):
        self.client, self.prefix, self.name = client, prefix, name

    def __call__(self, snapshots: list[dict]) -> None:
        now = time.time()
        with self.client.pipeline(transaction=False) as pipe:
            for snap in snapshots:
                key = port_key(self.prefix, self.name, snap["port"])
                fields = {k: ("" if v is None else v) for k, v in snap.items()}
                pipe.hset(key, mapping={**fields, "relay": self.name, "updated_at": now})
                pipe.expire(key, REPORT_TTL_S)
                pipe.sadd(index_key(self.prefix), key)
            pipe.execute()


def read_all(client, prefix: str) -> list[dict]:
    """Every live relay port's report (stale members of the index are pruned).

    Each with ``report_age_s``: seconds since the relay last wrote it, from
    the key's remaining TTL (so on Redis' clock, whatever the relay's says).
    ``client`` replies as text (:func:`workers.redisurl.connect`).
    """
    keys = sorted(client.smembers(index_key(prefix)))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
            pipe.pttl(key)
        replies = pipe.execute()
    raw, ttls = replies[0::2], replies[1::2]
    gone = [k for k, h in zip(keys, raw, strict=True) if not h]
    if gone:
        client.srem(index_key(prefix), *gone)
    out = []
    for h, ttl_ms in zip(raw, ttls, strict=True):
        if not h:
            continue
        report = dict(h)
        if isinstance(ttl_ms, int) and ttl_ms >= 0:
            report["report_age_s"] = max(0.0, REPORT_TTL_S - ttl_ms / 1000)
        out.append(report)
    return out
