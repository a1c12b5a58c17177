"""The rounds this worker process is measuring, as it sees them: which requests are out, since when.

Every query of node X's round runs on X's worker, so this process sees each
request leave and each outcome come back.  A reply still out ``e`` seconds
after its request left has a delay of at least ``e`` (less the server's hold,
:data:`HOLD_ALLOWANCE_S`), so its uncertainty -- at least half its delay --
has a lower bound that grows with time.  With those bounds the orchestrator's
*decider* (installed with :meth:`Tracker.install`; the worker side never
imports the orchestrator) can tell whether the outcomes in hand already decide
the round (:mod:`orchestrator.early`), and publish it then rather than when
the last server gives up.

The tracker asks after an outcome, after a failed attempt, when a request
leaves, and once more when the bounds will have grown enough (one timer
thread for the process) -- unless the last answer said that only more
outcomes can change it (:attr:`Verdict.wait_for_outcomes`): then requests
leaving and timers do not ask, nor do outcomes until that many are in.  A
request leaving does not wait for the answer: its bound is zero, as it was
before it left, so what it changes is only whether every bound now grows (a
timer can be set); the question goes to the timer thread, the request goes
out at once.  A round it has published is *decided*: its failed attempts are
not retried (:meth:`Tracker.decided`; the rule is
:attr:`workers.retry.NotRetried.ROUND_DECIDED`).

Whether a retry follows is not decided here: the query task asks its retry
policy (:class:`workers.retry.RetryPolicy`) and tells the tracker -- whether an
attempt is *final* (no retry can follow it) when its first request leaves,
and whether a failed one is ``retrying`` -- and the decider is given the
policy's answer as it stands (:meth:`RoundView.retry_may_follow`).

What it cannot see it takes as the worst case: a server whose task has not
started here (queued, or run by another process on the same queue) has a
bound of zero, so such a round is only decided by its chord's callback.  A
server whose attempt failed with a retry to come has no request out: it is
passed as ``retrying``, and the decider says whether to wait for it.

In advanced mode a burst's result is its lowest-delay sample, so a burst
gives a bound once all its requests are out: the least of its best delay so
far and how long each request still out has been out.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .contracts import OutcomeDict

log = logging.getLogger(__name__)

#: How long a server may hold a request (t3 - t2) without breaking the bound (s).  chronyd and ntpd
#: answer in microseconds; a server that holds longer, and says so, may come back tighter than its
#: bound: its reply is recorded late, and never changes what was published.
HOLD_ALLOWANCE_S = 0.005

#: A round whose callback did not run here is forgotten this long after this process first saw it (s):
#: longer than any round's budget (its retry schedule) with ChronoTick's settings.
FORGET_AFTER_S = 3600.0


@dataclass
class _Attempt:
    """One server's attempt in flight: its requests out (index -> monotonic send time), and its best so far."""

    samples: int  # requests the attempt sends (an advanced-mode burst: several)
    final: bool = False  # no retry can follow it: what it keeps (or nothing) is the server's outcome
    sent: int = 0
    out: dict[int, float] = field(default_factory=dict)
    best_delay_s: float | None = None  # the lowest delay of the burst so far

    def bound(self, now: float) -> float | None:
        """The least uncertainty the server's outcome can have, or ``None`` if nothing bounds it yet.

        Only a final attempt bounds its server: a request out for a while may
        have been lost, and the retry that would follow it could answer with
        any delay.
        """
        if not self.final or self.sent < self.samples:
            return None  # a retry to come, or a request not yet sent, could come back with any delay
        delays = [now - at for at in self.out.values()]
        if self.best_delay_s is not None:
            delays.append(self.best_delay_s)
        return max(0.0, min(delays) - HOLD_ALLOWANCE_S) / 2 if delays else None

    @property
    def last_sent_at(self) -> float:
        return max(self.out.values(), default=0.0)


@dataclass
class RoundView:
    """What the decider is given: the round's key fields, outcomes in hand, and bounds on the rest.

    ``bounds``: server -> least uncertainty its reply can have now, for every server
    whose attempt has sent all its requests; any other server without an outcome has none yet.
    ``context``: the decider's own, kept with the round between calls.
    """

    key_prefix: str
    node: str
    round_id: str
    outcomes: list[dict]
    bounds: dict[str, float]
    context: dict[str, Any]
    retrying: frozenset[str] = frozenset()  # attempt failed, a retry to come: no request out
    #: Servers whose attempt out is not their last: a retry could follow it, so nothing bounds what they say.
    #: (A server with no attempt here yet, or a burst not all sent, may still get a bound: it is in neither.)
    unbounded: frozenset[str] = frozenset()

    def retry_may_follow(self, server: str) -> bool:
        """Whether, as the retry policy answered the task, ``server`` is still to be asked again in this round:
        its retry is to come, or one may follow its attempt out.  Then nothing bounds what it can say."""
        return server in self.retrying or server in self.unbounded


@dataclass
class Verdict:
    """The decider's answer: ``published``, or the uncertainty every bound must exceed first (or ``None``).

    ``wait_for_outcomes``: nothing but more outcomes can change the answer, and
    not before this many more are in (0: anything may) -- a request leaving,
    the bounds growing or fewer outcomes cannot, so the tracker does not ask
    again until then.  A failed attempt (a server waiting for its retry, and
    that retry leaving) always asks again.
    """

    published: bool
    needed_uncertainty_s: float | None = None
    wait_for_outcomes: int = 0


@dataclass
class _Round:
    key: tuple[str, str, str]
    forget_at: float  # monotonic
    attempts: dict[str, _Attempt] = field(default_factory=dict)
    retrying: set[str] = field(default_factory=set)
    outcomes: dict[str, dict] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    published: bool = False
    deciding: bool = False
    dirty: bool = False  # something arrived while the decider was running
    ask_at: int = 0  # outcomes in hand before the decider is worth asking again (Verdict.wait_for_outcomes)
    retry_seen: bool = False  # an attempt failed, or its retry left, while the decider was running
    soon: bool = False  # a question is queued for the timer thread (a request left)


Decider = Callable[[RoundView], Verdict]


class Tracker:
    """One per worker process (:data:`tracker`); thread-safe."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._rounds: dict[tuple[str, str, str], _Round] = {}
        self._decider: Decider | None = None
        self._timers: list[tuple[float, tuple[str, str, str]]] = []
        self._wake = threading.Condition(self._lock)
        self._timer_thread: threading.Thread | None = None

    def install(self, decider: Decider | None) -> None:
        """Who decides (and publishes) a round: the orchestrator's, in a worker; ``None``: nobody."""
        self._decider = decider

    # -- events from the query task ---------------------------------------------------------------

    def exchange_started(self, job: dict, index: int, *, final: bool = False) -> None:
        """The ``index``-th request of ``job``'s attempt is about to be sent (``final``: no retry can follow)."""
        if self._decider is None:
            return
        with self._lock:
            state = self._round(job)
            retry_left = job["server"] in state.retrying
            state.retrying.discard(job["server"])
            attempt = state.attempts.get(job["server"])
            if attempt is None:  # a new attempt (the last one's entry went with its end)
                attempt = state.attempts[job["server"]] = _Attempt(job["samples"], final)
            attempt.sent += 1
            now = attempt.out[index] = self._clock()
            if retry_left:
                self._reopen(state)
            # Nothing can be decided before the first outcome, nor while only outcomes can decide it.
            # Otherwise the question goes to the timer thread: the request does not wait for the decider.
            if state.outcomes and not state.published and len(state.outcomes) >= state.ask_at:
                if state.deciding:
                    state.dirty = True
                elif not state.soon:
                    state.soon = True
                    self._schedule(now, state.key)

    def exchange_done(self, job: dict, index: int, delay_s: float | None) -> None:
        """The ``index``-th request of ``job``'s attempt came back with ``delay_s`` (``None``: nothing usable).

        Called from the exchange's own thread (a burst's exchanges run side by side), before the
        attempt that sent it returns.
        """
        with self._lock:
            state = self._rounds.get(_key(job))
            attempt = state.attempts.get(job["server"]) if state else None
            if attempt is not None:
                attempt.out.pop(index, None)
                if delay_s is not None:
                    attempt.best_delay_s = delay_s if attempt.best_delay_s is None else min(attempt.best_delay_s,
                                                                                            delay_s)

    def attempt_ended(self, job: dict, *, retrying: bool = False) -> None:
        """``job``'s attempt failed: no request of it is out now (``retrying``: another attempt is to come)."""
        with self._lock:
            state = self._rounds.get(_key(job))
            if state is not None:
                state.attempts.pop(job["server"], None)
                if retrying:
                    state.retrying.add(job["server"])
                    self._reopen(state)
        if retrying:
            self._evaluate(job)

    def outcome(self, job: dict, outcome: OutcomeDict) -> None:
        """``job``'s task ended with ``outcome`` (kept as the plain dict the decider reads)."""
        if self._decider is None:
            return
        with self._lock:
            state = self._round(job)
            state.attempts.pop(job["server"], None)
            state.retrying.discard(job["server"])
            state.outcomes[job["server"]] = dict(outcome)
        self._evaluate(job)

    def decided(self, job: dict) -> bool:
        """Whether ``job``'s round is already published (by this process): nothing more it does can matter."""
        with self._lock:
            state = self._rounds.get(_key(job))
            return bool(state and state.published)

    def forget(self, key_prefix: str, node: str, round_id: str) -> None:
        """The round is complete (its callback ran here): drop what was kept of it."""
        with self._lock:
            self._rounds.pop((key_prefix, node, round_id), None)

    # -- deciding ---------------------------------------------------------------------------------

    @staticmethod
    def _reopen(state: _Round) -> None:
        """A server's attempt failed or its retry left: ask the decider at the next chance (lock held)."""
        state.ask_at = 0
        state.retry_seen = state.deciding

    def _round(self, job: dict) -> _Round:
        """The round's state (created on first sight); call with the lock held."""
        key = _key(job)
        state = self._rounds.get(key)
        if state is None:
            now = self._clock()
            for stale in [k for k, r in self._rounds.items() if r.forget_at < now]:
                del self._rounds[stale]
            state = self._rounds[key] = _Round(key, now + FORGET_AFTER_S)
        return state

    def _bounds(self, state: _Round, now: float) -> dict[str, float]:
        bounds = {}
        for server, attempt in state.attempts.items():
            bound = attempt.bound(now)
            if bound is not None:
                bounds[server] = bound
        return bounds

    def _evaluate(self, job_or_key) -> None:
        key = job_or_key if isinstance(job_or_key, tuple) else _key(job_or_key)
        decider = self._decider
        while decider is not None:
            with self._lock:
                state = self._rounds.get(key)
                if state is None or state.published:
                    return
                if state.deciding:
                    state.dirty = True
                    return
                if len(state.outcomes) < state.ask_at:
                    return  # only more outcomes can change the last answer
                now = self._clock()
                bounds = self._bounds(state, now)
                seen = len(state.outcomes)
                view = RoundView(key[0], key[1], key[2], list(state.outcomes.values()), bounds,
                                 state.context, frozenset(state.retrying),
                                 frozenset(server for server, a in state.attempts.items() if not a.final))
                attempts = [a for server, a in state.attempts.items() if server in bounds]
                all_bounded = len(attempts) == len(state.attempts)
                state.deciding, state.dirty, state.retry_seen = True, False, False
            try:
                verdict = decider(view)
            except Exception as exc:  # never a crashed task: the callback decides the round anyway
                log.warning("round %s: cannot decide it early (%s: %s)", key[2], type(exc).__name__, exc)
                verdict = Verdict(False)
            with self._lock:
                state.deciding = False
                if verdict.published:
                    state.published = True
                    return
                # A failed attempt while the decider ran was not in the view: its answer does not hold then.
                state.ask_at = 0 if state.retry_seen else seen + max(0, verdict.wait_for_outcomes)
                again = state.dirty and len(state.outcomes) >= state.ask_at
                if not again and verdict.needed_uncertainty_s is not None and attempts and all_bounded:
                    # When every request out now will have been out long enough (if nothing else comes).
                    due = (max(a.last_sent_at for a in attempts) + 2 * verdict.needed_uncertainty_s
                           + HOLD_ALLOWANCE_S + 1e-4)
                    if due > now:  # else the bounds are there already: only an outcome can decide it
                        self._schedule(due, key)
            if not again:
                return

    def _schedule(self, due: float, key: tuple[str, str, str]) -> None:
        """Ask again about ``key`` at ``due`` (monotonic); call with the lock held."""
        heapq.heappush(self._timers, (due, key))
        if self._timer_thread is None:
            self._timer_thread = threading.Thread(target=self._run_timers, name="chronotick-early", daemon=True)
            self._timer_thread.start()
        self._wake.notify()

    def _run_timers(self) -> None:
        while True:
            with self._lock:
                while not self._timers or self._timers[0][0] > self._clock():
                    timeout = None if not self._timers else max(0.0, self._timers[0][0] - self._clock())
                    self._wake.wait(timeout)
                _, key = heapq.heappop(self._timers)
                state = self._rounds.get(key)
                if state is not None:
                    state.soon = False
            self._evaluate(key)


def _key(job: dict) -> tuple[str, str, str]:
    return job.get("key_prefix", ""), job["node"], job["round_id"]


#: This process's tracker: the query task reports to it, the orchestrator installs its decider.
tracker = Tracker()
