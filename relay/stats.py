"""What one relay port counts, and the delay its hop adds.

Counters (all since start):

``requests``     every datagram a client sent to the port
``forwarded``    requests sent upstream
``answered``     replies handed to the client whose request they answer
``unmatched``    replies that answer nothing pending (or come from elsewhere)
``late``         replies that came after their request's deadline
``timeouts``     requests whose reply never came by the deadline
``refused_allow``, ``refused_size``, ``refused_mode``, ``refused_rate``,
``refused_duplicate``, ``refused_unresolved``, ``refused_busy``
                 requests answered with nothing, by reason (``refused`` is their sum)
``policy_refused``   requests over the upstream's budget (its burst, then one per
                 ``min_interval_s``): not forwarded, answered with the relay's
                 own RATE kiss.  Politeness, not a failure: the upstream never
                 saw them, and the node's worker backs off as the kiss asks
``kisses_received``  RATE kisses from upstream (passed to the client that asked)
``kisses_sent``      RATE kisses the relay sent itself: every policy refusal, and
                 every request during the back-off after an upstream's RATE

The added delay of a reply is the time the relay held the request (in to
forwarded) plus the time it held the reply (in to sent): what the hop costs
the measured round trip, queueing included.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

COUNTERS = ("requests", "forwarded", "answered", "unmatched", "late", "timeouts", "refused_allow",
            "refused_size", "refused_mode", "refused_rate", "refused_duplicate", "refused_unresolved",
            "refused_busy", "policy_refused", "kisses_received", "kisses_sent")

#: Added delays kept for the quantiles (a uniform sample of all of them).
RESERVOIR_SIZE = 2048


@dataclass
class PortStats:
    port: int
    upstream: str
    requests: int = 0
    forwarded: int = 0
    answered: int = 0
    unmatched: int = 0
    late: int = 0
    timeouts: int = 0
    refused_allow: int = 0
    refused_size: int = 0
    refused_mode: int = 0
    refused_rate: int = 0
    refused_duplicate: int = 0
    refused_unresolved: int = 0
    refused_busy: int = 0
    policy_refused: int = 0
    kisses_received: int = 0
    kisses_sent: int = 0
    added_delays_s: list[float] = field(default_factory=list)
    _seen: int = 0
    _random: random.Random = field(default_factory=lambda: random.Random(0))

    def add_delay(self, seconds: float) -> None:
        """Keep ``seconds`` in a uniform sample of every added delay (reservoir sampling)."""
        self._seen += 1
        if len(self.added_delays_s) < RESERVOIR_SIZE:
            self.added_delays_s.append(seconds)
        else:
            slot = self._random.randrange(self._seen)
            if slot < RESERVOIR_SIZE:
                self.added_delays_s[slot] = seconds

    def quantile(self, q: float) -> float | None:
        if not self.added_delays_s:
            return None
        ordered = sorted(self.added_delays_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def refused(self) -> int:
        return sum(getattr(self, name) for name in COUNTERS if name.startswith("refused_"))

    def snapshot(self) -> dict:
        """Every counter, with the added delay's p50/p99 (s, or None)."""
        out: dict = {name: getattr(self, name) for name in COUNTERS}
        out.update(port=self.port, upstream=self.upstream, added_delay_p50_s=self.quantile(0.5),
                   added_delay_p99_s=self.quantile(0.99))
        return out

    def summary(self) -> str:
        """One log line."""
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        hop = f"hop +{p50 * 1e3:.2f}/{p99 * 1e3:.2f} ms (p50/p99)" if p50 is not None and p99 is not None else "hop -"
        return (f"port {self.port} -> {self.upstream}: {self.requests} requests, {self.forwarded} forwarded, "
                f"{self.answered} answered, {self.refused} refused, "
                f"{self.policy_refused} policy-refused (over budget: RATE), {self.timeouts} timeouts, "
                f"{self.unmatched} unmatched, {self.late} late, {self.kisses_received} RATE in / "
                f"{self.kisses_sent} out; {hop}")

