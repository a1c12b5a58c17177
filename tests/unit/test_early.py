"""orchestrator/early.py: a round decided early never publishes what waiting would have refused.

Like chrony's test/unit, the property is checked on 1,000 random rounds against the real selection:
whenever :func:`early.decide` publishes, every way the outstanding servers could still answer (or not)
is tried, and waiting's own selection must agree -- same gate, the early choice a truechimer through
it, no late reply chosen or combined, and the published bound covering the interval waiting agrees on.
"""

import random

import pytest

from orchestrator import early, selection
from workers.quality import Thresholds

from .samples import failed, ok

GATE = Thresholds(max_delay_s=0.100, max_uncertainty_s=0.050, min_stratum=1, max_stratum=15)
USED = {"chosen", "combined", "accepted"}


def _decide(outcomes, outstanding, **kw):
    return early.decide(outcomes, outstanding, strict=GATE, enable_fallback=kw.pop("enable_fallback", True), **kw)


def test_a_dead_and_a_slow_server_do_not_hold_a_decided_round():
    answered = [ok(f"s{i}:123", delay=0.010 + 0.002 * i, unc=0.006 + 0.001 * i) for i in range(8)]
    soon = _decide(answered, [early.Outstanding("dead:123", 0.004), early.Outstanding("slow:123", 0.004)])
    assert not soon.publish and soon.needed_uncertainty_s is not None  # could still be the tightest
    later = _decide(answered, [early.Outstanding("dead:123", 0.030), early.Outstanding("slow:123", 0.030)])
    assert later.publish and later.late == ("dead:123", "slow:123")
    assert later.picked["chosen"]["server"] == "s0:123"
    assert later.picked["agreement"]["outstanding_votes"] == 2
    assert all(not s["server"].startswith("<") for s in later.picked["servers"])


def test_outstanding_votes_that_could_outvote_the_answers_hold_the_round():
    answered = [ok("a:123", delay=0.01, unc=0.005), ok("b:123", delay=0.01, unc=0.005)]
    wide = [early.Outstanding(f"o{i}:123", 10.0) for i in range(2)]
    assert not _decide(answered, wide).publish  # 2 outstanding of 4 votes: they could be a majority elsewhere
    assert _decide(answered, wide[:1]).publish


def test_a_relaxed_round_waits_while_an_outstanding_reply_could_pass_strict():
    # A real reply's uncertainty is at least half its delay, which makes the published bound enough on its
    # own; these samples are not, so that the gate's own check is what decides.
    slow = [ok(f"s{i}:123", delay=0.150, unc=0.020) for i in range(5)]  # over the strict delay: relaxed
    assert not _decide(slow, [early.Outstanding("o:123", 0.030)]).publish  # 60 ms, 30 ms: it could pass strict
    assert _decide(slow, [early.Outstanding("o:123", 0.051)]).publish


def test_starvation_and_sequential_rounds_are_never_decided_early():
    assert not _decide([failed("a:123"), failed("b:123"), failed("c:123")], [early.Outstanding("o:123", 9.0)]).publish
    answered = [ok(f"s{i}:123", delay=0.01, unc=0.005) for i in range(4)]
    assert not _decide(answered, [early.Outstanding("o:123", 9.0)], parallel=False).publish


def test_a_failed_attempt_waiting_to_retry_votes_but_does_not_hold_a_strict_round():
    answered = [ok(f"s{i}:123", delay=0.010, unc=0.006) for i in range(4)]
    retrying = early.Outstanding("r:123", 0.0, retrying=True)
    assert _decide(answered, [retrying]).publish  # strict: its retry is not waited for
    relaxed = [ok(f"s{i}:123", delay=0.150, unc=0.080) for i in range(4)]
    assert not _decide(relaxed, [retrying]).publish  # its retry could pass strict: worth waiting for
    many = [early.Outstanding(f"r{i}:123", 0.0, retrying=True) for i in range(4)]
    assert not _decide(answered, many).publish  # four retries to come could still outvote four answers


def test_a_group_member_out_must_be_unable_to_replace_its_groups_vote():
    answered = [ok("g1:123", delay=0.02, unc=0.020), ok("a:123", delay=0.01, unc=0.005),
                ok("b:123", delay=0.01, unc=0.005)]
    groups = [["g1:123", "g2:123"]]
    assert not _decide(answered, [early.Outstanding("g2:123", 0.015)], groups=groups).publish
    assert _decide(answered, [early.Outstanding("g2:123", 0.025)], groups=groups).publish


def _random_round(rng: random.Random):
    n = rng.randint(3, 11)
    names = [f"10.0.0.{i}:123" for i in range(n)]
    truth = rng.uniform(-0.01, 0.01)
    outcomes, outstanding = [], []
    liars = rng.randint(0, (n - 1) // 3)
    for i, name in enumerate(names):
        kind = rng.random()
        if kind < 0.25 and len(outstanding) < n // 2:
            if rng.random() < 0.2:  # its attempt failed; a retry to come could answer anything
                outstanding.append(early.Outstanding(name, 0.0, retrying=True))
            else:
                outstanding.append(early.Outstanding(name, rng.choice([0.0, *[rng.uniform(0.0, 0.12)] * 4])))
            continue
        if kind < 0.32:
            outcomes.append(failed(name))
            continue
        unc = rng.uniform(0.001, 0.08)
        offset = truth + rng.uniform(-unc, unc)
        if i < liars:
            offset = truth + rng.choice([-1, 1]) * rng.uniform(0.01, 0.5)
        outcomes.append(ok(name, delay=rng.uniform(unc, 2 * unc), unc=unc, offset=offset,
                           stratum=rng.choice([1, 2, 3, 16])))
    return outcomes, outstanding, truth


def _completions(rng: random.Random, outstanding, truth, count: int):
    for _ in range(count):
        extra = []
        for item in outstanding:
            if rng.random() < 0.3:
                extra.append(failed(item.server))
                continue
            low = 0.0005 if item.retrying else item.min_uncertainty_s
            unc = low + rng.choice([0.0, rng.uniform(0.0, 0.05)]) + 1e-9
            offset = rng.choice([truth + rng.uniform(-unc, unc), truth + rng.uniform(-1.0, 1.0)])
            extra.append(ok(item.server, delay=rng.uniform(2 * low, 2 * unc), unc=unc,
                            offset=offset, stratum=rng.choice([1, 2])))
        yield extra


@pytest.mark.parametrize("method", ["best", "combine"])
def test_1000_random_rounds_an_early_publish_is_never_refused_by_waiting(method):
    rng = random.Random(20261203 + len(method))
    decided = 0
    for _ in range(1000):
        outcomes, outstanding, truth = _random_round(rng)
        fallback = rng.random() < 0.8
        decision = _decide(outcomes, outstanding, method=method, enable_fallback=fallback)
        if not decision.publish:
            continue
        decided += 1
        picked = decision.picked
        members = set(picked["chosen"].get("combined", [picked["chosen"]["server"]]))
        assert not members & {o.server for o in outstanding}
        published = picked["chosen"]
        for extra in _completions(rng, outstanding, truth, 20):
            waited = selection.select(outcomes + extra, GATE, enable_fallback=fallback, method=method)
            assert waited["quality"] == picked["quality"]
            status = {s["server"]: s["status"] for s in waited["servers"]}
            assert all(status[m] in USED for m in members), (status, members)
            # A reply that was out could not have been chosen; a retry's might (then the early choice
            # is one waiting would have accepted: never one it would have refused, asserted above).
            late_used = {s["server"] for s in waited["servers"] if s["status"] in ("chosen", "combined")
                         and s["server"] in {o.server for o in outstanding if not o.retrying}}
            assert not late_used
            low, high = waited["agreement"]["interval"]
            assert published["offset_s"] - published["uncertainty_s"] <= low + 1e-12
            assert published["offset_s"] + published["uncertainty_s"] >= high - 1e-12
    assert decided > 100  # the property was exercised, not skipped
