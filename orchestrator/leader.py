"""Which beat dispatches: a lease in Redis, so several beats can run and only one acts.

Two beats dispatching would double every round.  Each beat tries to hold the
lease ``<prefix>:ntp:beat``; the holder renews it well within its time to live
and dispatches, the others stand by and take over when it lapses (its holder
died, hung, or lost Redis).  Renewal is a compare-and-extend in Lua, so a beat
never extends a lease another one has taken since.
"""

from __future__ import annotations

import os
import secrets
import socket

import redis

from workers import redisurl

#: Extend the lease only if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: Delete the lease only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A renewable lease on ``key``.

    Parameters
    ----------
    client:
        The Redis client.
    key:
        The lease key (one per cluster: ``<prefix>:ntp:beat``).
    ttl_s:
        How long the lease lasts unless renewed: the longest a dead holder
        can leave the cluster without rounds.
    """

    def __init__(self, client: redis.Redis, key: str, *, ttl_s: float):
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        # A beat asks for its lease every third of its time to live, leading or standing by: the probe
        # that says, once each, that this process lost Redis and that it is back (workers/redisurl.py).
        redisurl.outages.watch(redisurl.describe(client))

    def hold(self) -> bool:
        """Take or renew the lease; True while this process holds it.

        A Redis error means we cannot know, so we do not act (False).
        """
        ttl_ms = int(self.ttl_s * 1000)
        try:
            held = bool(self._renew(keys=[self.key], args=[self.token, ttl_ms])
                        or self.client.set(self.key, self.token, nx=True, px=ttl_ms))
        except redis.RedisError as exc:
            if redisurl.is_connection_error(exc):
                redisurl.outages.lost(exc)
            return False
        redisurl.outages.back()
        return held

    def release(self) -> None:
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError:
            pass  # it lapses by itself
