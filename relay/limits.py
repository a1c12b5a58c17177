"""Rate limits: a token bucket per client and port, and one per upstream.

A bucket holds up to ``burst`` tokens and gains one every ``interval_s``; a
request takes one, or is refused when none is left.  So a client may send
``burst`` requests at once, then one every ``interval_s``, sustained -- the
shape of chrony's ``ratelimit interval ... burst ...``.  Time is passed in
(monotonic seconds): the arithmetic is pure, and tested so.

:class:`UpstreamLimit` is what one upstream is sent by all clients together:
its bucket, and silence after the upstream's own RATE kiss.  The relay
(:mod:`relay.server`) and the politeness benchmark (``bench/politeness.py``,
on simulated time) both decide with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``burst`` tokens at most, one more every ``interval_s``."""

    interval_s: float
    burst: int
    tokens: float = -1.0
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.burst < 1:
            raise ValueError(f"interval_s must be > 0 and burst >= 1 (got {self.interval_s}, {self.burst})")
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        """Take a token at ``now`` if there is one; whether there was."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full_at(self, now: float) -> bool:
        """Whether the bucket is full again at ``now`` (then it need not be kept)."""
        self._refill(now)
        return self.tokens >= self.burst

    def _refill(self, now: float) -> None:
        if now > self.updated_at:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated_at) / self.interval_s)
            self.updated_at = now


#: Clients (source addresses) a port keeps a bucket for, at most.  Past it, new sources share
#: one bucket: a flood of rotating (spoofed) addresses then gets one client's rate, together,
#: and memory stays bounded (chrony bounds its client log the same way, ``clientloglimit``).
DEFAULT_MAX_CLIENTS = 4096

#: The key of the bucket that sources past :data:`DEFAULT_MAX_CLIENTS` share.
OVERFLOW = "*overflow*"


class ClientLimits:
    """One bucket per client address, at most ``max_clients``; buckets full again are forgotten."""

    def __init__(self, interval_s: float, burst: int, *, max_clients: int = DEFAULT_MAX_CLIENTS):
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, not {max_clients}")
        self.interval_s = interval_s
        self.burst = burst
        self.max_clients = max_clients
        #: Requests that had to use the shared overflow bucket.
        self.overflowed = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._pruned_at = float("-inf")

    def allow(self, client: str, now: float) -> bool:
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients and now - self._pruned_at >= self.interval_s:
                self.prune(now)  # at most once a refill: a flood must not make every packet scan the table
            if len(self._buckets) >= self.max_clients:
                self.overflowed += 1
                client = OVERFLOW
                bucket = self._buckets.get(OVERFLOW)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(self.interval_s, self.burst, updated_at=now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled: they would start full anyway."""
        self._pruned_at = now
        for client in [c for c, b in self._buckets.items() if b.full_at(now)]:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


#: What :meth:`UpstreamLimit.admit` decides for a request.
FORWARD = "forward"
#: The upstream's bucket is empty: a policy refusal (the relay answers with a RATE kiss of its own).
OVER_BUDGET = "over_budget"
#: The upstream sent RATE not long ago: nothing is sent it until its back-off is over.
BACKING_OFF = "backing_off"


class UpstreamLimit:
    """What one upstream is sent, all clients together: ``burst`` requests at once, then one every
    ``interval_s``; nothing for ``backoff_s`` after it sent a RATE kiss (:meth:`kissed`)."""

    def __init__(self, interval_s: float, burst: int, backoff_s: float, *, now: float = 0.0):
        if not backoff_s > 0:
            raise ValueError(f"backoff_s must be > 0 (got {backoff_s})")
        self.bucket = TokenBucket(interval_s, burst, updated_at=now)
        self.backoff_s = backoff_s
        self.backoff_until = float("-inf")

    def backing_off(self, now: float) -> bool:
        """Whether the upstream's RATE back-off still runs at ``now``."""
        return now < self.backoff_until

    def take(self, now: float) -> bool:
        """Spend one of the upstream's requests at ``now``, if its budget has one; whether it had."""
        return self.bucket.take(now)

    def admit(self, now: float) -> str:
        """:data:`FORWARD` (a request spent), :data:`BACKING_OFF` or :data:`OVER_BUDGET`, at ``now``."""
        if self.backing_off(now):
            return BACKING_OFF
        return FORWARD if self.take(now) else OVER_BUDGET

    def kissed(self, now: float) -> None:
        """The upstream answered RATE at ``now``: send it nothing for ``backoff_s``."""
        self.backoff_until = now + self.backoff_s
