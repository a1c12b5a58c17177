"""Kiss-o'-Death: servers that told us to go away, and until when.

RFC 5905 section 7.4: on RATE a client must poll less often; on DENY or RSTR
it must stop sending to that server.  chrony acts on RATE by adding four poll
intervals to the next transmission.  How long each kiss keeps a server away is
the retry policy's (:meth:`workers.retry.RetryPolicy.kiss_backoff_s`):

* ``RATE`` -- the server gets no packet for a back-off period: four times the
  normal measurement interval, doubled for each further RATE (capped at a
  day).  It is never retried 5 s later.
* ``DENY`` / ``RSTR`` -- the server gets no packet until this worker restarts
  or the configuration changes (a new ``config_id``).

This module remembers them.  A kiss counts only if it passed the origin check (see
:mod:`workers.ntp.sanity`), so a blind spoofer cannot trigger any of this.
The memory is per worker process, which is what "until the worker is
restarted" asks for; the round record and the stats show every refusal.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .contracts import Reason
from .retry import ACTED_ON, DEMOBILISING, RATE, RetryPolicy


@dataclass(frozen=True)
class Kiss:
    """What a server said and what follows: ``until`` is monotonic seconds (inf: for good)."""

    code: str
    received_at: float
    until: float
    config_id: str
    count: int


class KissMemory:
    """Thread-safe memory of kisses, keyed by server name."""

    def __init__(self, *, clock=time.monotonic, wall_clock=time.time):
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._kisses: dict[str, Kiss] = {}

    def record(self, server: str, code: str, *, config_id: str, policy: RetryPolicy) -> Kiss | None:
        """Remember a kiss, kept for as long as ``policy`` says; returns what was stored (``None`` for codes
        not acted on)."""
        if code not in ACTED_ON:
            return None
        now = self._clock()
        with self._lock:
            previous = self._kisses.get(server)
            count = previous.count + 1 if code == RATE and previous and previous.code == RATE else 1
            until = now + policy.kiss_backoff_s(code, count)
            kiss = Kiss(code=code, received_at=self._wall(), until=until, config_id=config_id, count=count)
            self._kisses[server] = kiss
            return kiss

    def refusal(self, server: str, *, config_id: str) -> tuple[str, str] | None:
        """``(reason, detail)`` if ``server`` must not be queried now, else ``None``."""
        now = self._clock()
        with self._lock:
            kiss = self._kisses.get(server)
            if kiss is None:
                return None
            if kiss.code in DEMOBILISING:
                if kiss.config_id != config_id:
                    del self._kisses[server]  # the configuration changed: start afresh
                    return None
                return Reason.KOD_DEMOBILISED, (f"sent {kiss.code} at {_clock_text(kiss.received_at)}; not queried "
                                            "until the worker restarts or the configuration changes")
            if now >= kiss.until:
                return None  # back-off over; the count stays in case it kisses again
            return Reason.KOD_BACKOFF, (f"sent RATE at {_clock_text(kiss.received_at)} ({kiss.count} in a row); "
                                    f"not queried for another {kiss.until - now:.0f} s")


def _clock_text(unix_s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(unix_s)) + "Z"


#: This worker process's memory.
memory = KissMemory()
