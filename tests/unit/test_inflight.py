"""workers/inflight.py: a server's bound never exceeds what its reply can still say.

The decider (orchestrator/early.py) trusts each outstanding server's bound: the least uncertainty its
attempt's sample can have.  Like chrony's test/unit, 1,000 random attempts -- single requests and
advanced-mode bursts of up to five, sent 0.1 s apart, replies lost, late, held by the server up to
:data:`HOLD_ALLOWANCE_S` -- are replayed event by event through the tracker, and at every moment the
decider is asked, each bound it is given must be at most half the delay of the sample the attempt
will keep (its lowest-delay reply: root distance is at least half the delay).
"""

from __future__ import annotations

import random

import pytest

from workers import inflight
from workers.inflight import HOLD_ALLOWANCE_S, Tracker, Verdict


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _attempts(rng: random.Random, servers: int):
    """Per server: [(sent_at, arrives_at or None, delay_s)] for each request of its attempt."""
    plan = {}
    for i in range(servers):
        samples = rng.choice([1, 1, 3, 5])
        start = rng.uniform(0.0, 0.01)
        requests = []
        for k in range(samples):
            sent = start + 0.1 * k
            if rng.random() < 0.2:
                requests.append((sent, None, None))  # lost
                continue
            rtt = rng.choice([rng.uniform(0.001, 0.05), rng.uniform(0.05, 0.5)])
            hold = rng.uniform(0.0, HOLD_ALLOWANCE_S)
            requests.append((sent, sent + rtt + hold, rtt))  # delay = (t4 - t1) - hold = rtt
        plan[f"s{i}:123"] = requests
    return plan


def test_1000_random_attempts_never_get_a_bound_over_their_sample():
    rng = random.Random(20261206)
    checked = 0
    for round_no in range(1000):
        clock = Clock()
        tracker = Tracker(clock=clock)
        plan = _attempts(rng, rng.randint(2, 6))
        kept = {server: min((d for _, at, d in reqs if at is not None), default=None) for server, reqs in plan.items()}
        seen: list[dict[str, float]] = []

        def decider(view, seen=seen):
            seen.append(dict(view.bounds))
            return Verdict(False)

        tracker.install(decider)
        jobs = {server: {"key_prefix": "t", "node": "n", "round_id": f"r{round_no}", "server": server,
                         "samples": len(reqs)} for server, reqs in plan.items()}
        events = []
        for server, reqs in plan.items():
            for k, (sent, arrives, delay) in enumerate(reqs):
                events.append((clock.now + sent, 0, server, k, None))
                if arrives is not None:
                    events.append((clock.now + arrives, 1, server, k, delay))
            last = max((a for _, a, _ in reqs if a is not None), default=reqs[-1][0] + 1.0)
            events.append((clock.now + last + 1e-6, 2, server, None, None))
        # A first outcome from elsewhere, so that the tracker asks from the start.
        tracker.outcome({**jobs[next(iter(jobs))], "server": "other:123"}, {"server": "other:123", "status": "ok"})
        for at, kind, server, k, delay in sorted(events):
            clock.now = at
            if kind == 0:
                tracker.exchange_started(jobs[server], k, final=True)
            elif kind == 1:
                tracker.exchange_done(jobs[server], k, delay)
            else:
                tracker.outcome(jobs[server], {"server": server, "status": "ok" if kept[server] else "failed"})
            # Ask now, as a timer would: every bound the decider is given must hold.
            tracker._evaluate(("t", "n", f"r{round_no}"))
        for bounds in seen:
            for server, bound in bounds.items():
                if kept[server] is not None:
                    assert bound <= kept[server] / 2 + 1e-12, (round_no, server, bound, kept[server])
                    checked += 1
    assert checked > 5000


def test_only_a_final_attempt_bounds_its_server():
    attempt = inflight._Attempt(samples=1)  # a retry can follow it: a lost request, then a quick retry
    attempt.sent, attempt.out = 1, {0: 0.0}
    assert attempt.bound(10.0) is None
    final = inflight._Attempt(samples=1, final=True)
    final.sent, final.out = 1, {0: 0.0}
    assert final.bound(10.0) == pytest.approx((10.0 - HOLD_ALLOWANCE_S) / 2)


def test_a_burst_has_no_bound_until_its_last_request_is_out():
    attempt = inflight._Attempt(samples=3, final=True)
    attempt.sent, attempt.out = 2, {0: 0.0, 1: 0.1}
    assert attempt.bound(5.0) is None  # its third request could still come back with any delay
    attempt.sent, attempt.out[2] = 3, 0.2
    assert attempt.bound(0.3) == pytest.approx((0.1 - HOLD_ALLOWANCE_S) / 2)  # the youngest request: out 0.1 s
    attempt.best_delay_s = 0.02
    assert attempt.bound(0.3) == pytest.approx((0.02 - HOLD_ALLOWANCE_S) / 2)  # a reply in hand caps it
