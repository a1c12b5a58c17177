"""The relay's counts in Redis, for the exporter and for people: one hash per relay port.

``<prefix>:relay:<name>:<port>``
    Every counter of :mod:`relay.stats`, the upstream, the added delay's
    p50/p99 (s), and ``updated_at`` (Unix s).  It expires
    :data:`REPORT_TTL_S` after the last write, so a relay that is gone
    disappears.
``<prefix>:relays``
    The set of those keys.

Written only when ``CHRONOTICK_REDIS_URL`` is set; the relay never needs Redis.
"""

from __future__ import annotations

import time

from workers.keys import Keys

#: A relay's report outlives its last write by this long (s).
REPORT_TTL_S = 300


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
    """Every live relay port's report (stale members of the index are pruned)."""
    keys = sorted(_text(k) for k in client.smembers(index_key(prefix)))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        raw = pipe.execute()
    gone = [k for k, h in zip(keys, raw, strict=True) if not h]
    if gone:
        client.srem(index_key(prefix), *gone)
    return [{_text(k): _text(v) for k, v in h.items()} for h in raw if h]


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
