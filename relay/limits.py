"""Rate limits: a token bucket per client and port, and one per upstream.

A bucket holds up to ``burst`` tokens and gains one every ``interval_s``; a
request takes one, or is refused when none is left.  So a client may send
``burst`` requests at once, then one every ``interval_s``, sustained -- the
shape of chrony's ``ratelimit interval ... burst ...``.  Time is passed in
(monotonic seconds): the arithmetic is pure, and tested so.
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


class ClientLimits:
    """One bucket per client address; buckets full again are forgotten, so memory follows the active clients."""

    def __init__(self, interval_s: float, burst: int):
        self.interval_s = interval_s
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, client: str, now: float) -> bool:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.interval_s, self.burst, updated_at=now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled: they would start full anyway."""
        for client in [c for c, b in self._buckets.items() if b.full_at(now)]:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
