"""The cluster's politeness budget per public server: a sliding window in Redis (issue #26).

Public servers' operators publish how often one client may ask: NIST, never
more than once every 4 s; chrony's documentation, no polling below 64 s; the
Pool answers fast clients with RATE.  A cluster behind one head node is *one*
client to them.  With a hub (``ntp_service.hub``) only the hub node's rounds
ask the public servers, and every request they send -- each sample of an
advanced-mode burst, each retry -- first takes a place in its server's window
here: at most ``max_requests_per_minute`` in any 60 s and
``max_requests_per_10_minutes`` in any 600 s, whatever the number of nodes,
workers, restarts or beats.  An attempt that finds no room sends nothing and
fails ``politeness_limit`` (not retried; a round of nothing else is an
outage, not NTP starvation).

``<prefix>:ntp:polite:<server>``
    A sorted set of the requests sent in the last 10 minutes, scored by
    when (ms, Redis' clock: ``TIME`` inside the script, so no two hosts'
    clocks are compared).  Never more than the 10-minute budget's members;
    it expires 10 minutes after the last request.

The script takes the whole attempt's requests at once, or none: a burst is
never cut in two by the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The windows (ms): a minute and ten minutes.
MINUTE_MS = 60_000
TEN_MINUTES_MS = 600_000

#: Take ARGV[1] places for ARGV[4] if both windows have room; {1, in the last minute, in 10 min} or
#: {0, in the last minute, in 10 min, ms until the first place frees}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, per_minute, per_ten = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 600000)
local in_ten = redis.call('ZCARD', KEYS[1])
local in_minute = redis.call('ZCOUNT', KEYS[1], now - 60000, '+inf')
if in_minute + n > per_minute or in_ten + n > per_ten then
    local wait = 0
    if in_minute + n > per_minute then
        local first = redis.call('ZRANGEBYSCORE', KEYS[1], now - 60000, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        if #first > 0 then wait = tonumber(first[2]) + 60000 - now end
    end
    if in_ten + n > per_ten then
        local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        if #first > 0 then wait = math.max(wait, tonumber(first[2]) + 600000 - now) end
    end
    return {0, in_minute, in_ten, wait}
end
for i = 1, n do
    redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], 600000)
return {1, in_minute + n, in_ten + n, 0}
"""


@dataclass(frozen=True)
class Budget:
    """A public server's budget: requests in any minute, in any ten minutes."""

    per_minute: int
    per_10_minutes: int

    def as_job(self) -> list[int]:
        return [self.per_minute, self.per_10_minutes]

    @classmethod
    def from_job(cls, value: list[int] | None) -> Budget | None:
        return None if not value else cls(int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Answer:
    """What the window said: ``granted``, the counts after it, and when room frees (s) if not."""

    granted: bool
    in_minute: int
    in_10_minutes: int
    wait_s: float

    def refusal(self, server: str, budget: Budget, requests: int) -> str:
        return (f"the cluster's budget for {server} is spent: {self.in_minute} of {budget.per_minute} requests "
                f"in the last minute, {self.in_10_minutes} of {budget.per_10_minutes} in 10 minutes; "
                f"{requests} more would exceed it (room in {self.wait_s:.0f} s); no request sent")


def key(prefix: str, server: str) -> str:
    return f"{prefix}:ntp:polite:{server}"


def take(client, prefix: str, server: str, requests: int, budget: Budget, *, holder: str) -> Answer:
    """Take ``requests`` places in ``server``'s window, or none.  Raises redis' errors (no place: no packet).

    ``holder``: a unique name for the attempt (its members in the set).
    """
    granted, in_minute, in_ten, wait_ms = client.eval(
        _TAKE, 1, key(prefix, server), int(requests), budget.per_minute, budget.per_10_minutes, holder)
    return Answer(bool(int(granted)), int(in_minute), int(in_ten), int(wait_ms) / 1000)


def sent(client, prefix: str, server: str, *, since_s: float) -> int:
    """How many requests ``server``'s window holds from the last ``since_s`` seconds (Redis' clock)."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return int(client.zcount(key(prefix, server), now_ms - since_s * 1000, "+inf"))
