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


def test_the_decider_is_told_which_servers_the_retry_policy_may_still_ask_again():
    """``RoundView.retry_may_follow``: a retry to come, or an attempt out that is not final (as the task's
    :class:`workers.retry.RetryPolicy` said); not a final attempt, nor a server whose task has not started."""
    clock = Clock()
    tracker = Tracker(clock=clock)
    tracker._schedule = lambda due, key: None  # no timer thread: the test asks itself
    views = []
    tracker.install(lambda view: views.append(view) or Verdict(False))
    job = {"key_prefix": "t", "node": "n", "round_id": "r", "samples": 1}
    tracker.outcome({**job, "server": "done:123"}, {"server": "done:123", "status": "ok"})
    tracker.exchange_started({**job, "server": "final:123"}, 0, final=True)
    tracker.exchange_started({**job, "server": "more:123"}, 0, final=False)
    tracker.exchange_started({**job, "server": "failed:123"}, 0, final=False)
    tracker.attempt_ended({**job, "server": "failed:123"}, retrying=True)  # asks the decider
    view = views[-1]
    assert [s for s in ("final:123", "more:123", "failed:123", "queued:123") if view.retry_may_follow(s)] == [
        "more:123", "failed:123"]
    tracker.exchange_started({**job, "server": "failed:123"}, 0, final=True)  # its retry, the last, leaves
    tracker._evaluate(("t", "n", "r"))
    assert not views[-1].retry_may_follow("failed:123")


# -- the tracker's life cycle: who is asked, when, and when no more ----------------------------------------

JOB = {"key_prefix": "t", "node": "n", "round_id": "r", "samples": 1}


def _job(server: str, round_id: str = "r") -> dict:
    return {**JOB, "server": server, "round_id": round_id}


def _asking(*verdicts: Verdict, clock=None) -> tuple[Tracker, list]:
    """A tracker whose decider answers ``verdicts`` in turn (then the last again), and the views it was given."""
    tracker = Tracker(clock=clock or Clock())
    tracker._schedule = lambda due, key: None  # no timer thread: these tests ask themselves
    views: list = []

    def decider(view):
        views.append(view)
        return verdicts[min(len(views), len(verdicts)) - 1]

    tracker.install(decider)
    return tracker, views


def test_without_a_decider_nothing_is_kept_and_nothing_is_decided():
    tracker = Tracker(clock=Clock())
    tracker.exchange_started(_job("a:123"), 0, final=True)
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})
    assert not tracker.decided(_job("a:123")), "no decider: no round is decided early"
    assert tracker._rounds == {}, "no decider: nothing kept"


def test_a_published_round_is_decided_asked_no_more_and_forgotten_once_complete():
    tracker, views = _asking(Verdict(True))
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})
    assert len(views) == 1 and tracker.decided(_job("a:123")), "published at the first outcome"
    tracker.outcome(_job("b:123"), {"server": "b:123", "status": "ok"})
    tracker.attempt_ended(_job("c:123"), retrying=True)
    assert len(views) == 1, "a published round is not asked about again"
    assert tracker.decided(_job("c:123")), "its failed attempts are not retried"
    tracker.forget("t", "n", "r")
    assert not tracker.decided(_job("a:123")), "forgotten once its callback ran"


def test_only_more_outcomes_are_waited_for_when_the_decider_says_so():
    tracker, views = _asking(Verdict(False, wait_for_outcomes=2), Verdict(False))
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})
    tracker.exchange_started(_job("b:123"), 0, final=True)
    tracker._evaluate(("t", "n", "r"))  # as a timer would
    tracker.outcome(_job("c:123"), {"server": "c:123", "status": "ok"})
    assert len(views) == 1, "neither a request leaving, a timer, nor one outcome asks before two more are in"
    tracker.outcome(_job("d:123"), {"server": "d:123", "status": "ok"})
    assert len(views) == 2, "the second outcome asks"
    assert {o["server"] for o in views[-1].outcomes} == {"a:123", "c:123", "d:123"}, "with every outcome in hand"


def test_a_failed_attempt_with_a_retry_to_come_always_asks_again():
    tracker, views = _asking(Verdict(False, wait_for_outcomes=5))
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})
    tracker.exchange_started(_job("b:123"), 0)
    tracker.attempt_ended(_job("b:123"), retrying=True)
    assert len(views) == 2, "a retry to come reopens the question"
    assert views[-1].retrying == frozenset({"b:123"}) and "b:123" not in views[-1].bounds, \
        "the server waiting for its retry has no request out: no bound"


def test_a_decider_that_fails_costs_only_the_early_decision():
    calls = []

    def broken(view):
        calls.append(view)
        raise RuntimeError("boom")

    tracker = Tracker(clock=Clock())
    tracker.install(broken)
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})  # must not raise into the task
    tracker.outcome(_job("b:123"), {"server": "b:123", "status": "ok"})
    assert len(calls) == 2 and not tracker.decided(_job("a:123")), "asked again; the callback decides the round"


def test_a_round_whose_callback_never_ran_here_is_forgotten_after_an_hour():
    clock = Clock()
    tracker, _ = _asking(Verdict(True), clock=clock)
    tracker.outcome(_job("a:123", "old"), {"server": "a:123", "status": "ok"})
    assert tracker.decided(_job("a:123", "old"))
    clock.now += 3599.0
    tracker.outcome(_job("a:123", "newer"), {"server": "a:123", "status": "ok"})
    assert tracker.decided(_job("a:123", "old")), "kept for an hour: longer than any round's retry schedule"
    clock.now += 2.0
    tracker.outcome(_job("a:123", "new"), {"server": "a:123", "status": "ok"})  # a new round is seen
    assert not tracker.decided(_job("a:123", "old")), "dropped when a newer round arrives after the hour"
    assert tracker.decided(_job("a:123", "new"))


def test_the_timer_asks_again_once_the_bounds_have_grown_enough():
    """Real time: the decider needs 20 ms of uncertainty; the timer thread asks again once the request out
    has been out 2 x 20 ms (+ the hold allowance), and the decider then sees a bound of at least 20 ms."""
    asked: list[tuple[float, dict[str, float]]] = []
    tracker = Tracker()

    def decider(view):
        asked.append((inflight.time.monotonic(), dict(view.bounds)))
        return Verdict(len(asked) > 1, needed_uncertainty_s=0.020)

    tracker.install(decider)
    tracker.exchange_started(_job("slow:123"), 0, final=True)
    sent = inflight.time.monotonic()
    tracker.outcome(_job("a:123"), {"server": "a:123", "status": "ok"})
    deadline = sent + 5.0
    while not tracker.decided(_job("a:123")) and inflight.time.monotonic() < deadline:
        inflight.time.sleep(0.005)
    assert tracker.decided(_job("a:123")), f"the timer asked again and the round was published: {asked}"
    at, bounds = asked[-1]
    assert at - sent >= 2 * 0.020 + HOLD_ALLOWANCE_S, f"not before the bound could have grown: {at - sent:.4f} s"
    assert bounds["slow:123"] >= 0.020, f"the bound it was given: {bounds}"
