"""relay.limits: the token bucket against a brute-force model, 1,000 random request sequences."""

import random

from relay.limits import ClientLimits, TokenBucket


def _model(times: list[float], interval_s: float, burst: int) -> list[bool]:
    """Admit a request when fewer than ``burst`` were admitted in a window the refill has not covered.

    Step by step: tokens = min(burst, tokens + elapsed / interval); take one if >= 1.
    Written out with exact fractions of the same arithmetic, independently of the class.
    """
    from fractions import Fraction

    tokens, last, out = Fraction(burst), Fraction(times[0]) if times else Fraction(0), []
    for t in times:
        t = Fraction(t)
        tokens = min(Fraction(burst), tokens + (t - last) / Fraction(interval_s))
        last = t
        if tokens >= 1:
            tokens -= 1
            out.append(True)
        else:
            out.append(False)
    return out


def test_a_bucket_admits_what_the_model_admits():
    rng = random.Random(1)
    for _ in range(1000):
        interval, burst = rng.choice([0.5, 1.0, 2.0, 16.0]), rng.randint(1, 6)
        times, t = [], 0.0
        for _ in range(rng.randint(1, 40)):
            t += rng.choice([0.0, 0.0, rng.uniform(0, 3 * interval)])
            times.append(round(t, 3))
        bucket = TokenBucket(interval, burst, updated_at=times[0])
        got = [bucket.take(now) for now in times]
        assert got == _model(times, interval, burst), (interval, burst, times)


def test_sustained_rate_is_one_per_interval_after_the_burst():
    bucket = TokenBucket(2.0, 4, updated_at=0.0)
    admitted = sum(bucket.take(t * 0.5) for t in range(200))  # a request every 0.5 s for 100 s
    assert admitted == 4 + 49  # the burst, then one every 2 s (the last refill lands at 98 s)


def test_client_limits_forget_clients_whose_bucket_refilled():
    limits = ClientLimits(2.0, 4)
    for i in range(100):
        assert limits.allow(f"10.0.0.{i}", 0.0)
    assert len(limits) == 100
    limits.prune(1.0)
    assert len(limits) == 100  # each took one token, 2 s to refill
    limits.prune(2.0)
    assert len(limits) == 0


def test_an_upstream_limit_forwards_its_burst_then_one_per_interval():
    from relay.limits import FORWARD, OVER_BUDGET, UpstreamLimit

    limit = UpstreamLimit(4.0, 4, 64.0, now=0.0)
    verdicts = [limit.admit(t * 0.5) for t in range(121)]  # a request every 0.5 s for 60 s
    forwarded = [t * 0.5 for t, v in enumerate(verdicts) if v == FORWARD]
    assert forwarded == [0.0, 0.5, 1.0, 1.5] + [4.0 * k for k in range(1, 16)]  # the burst, then 4, 8 ... 60 s
    assert all(v == OVER_BUDGET for v in verdicts if v != FORWARD)
    # After the burst, the forwarded requests are 4 s apart: never more often, as NIST asks.
    assert all(b - a >= 4.0 for a, b in zip(forwarded[4:], forwarded[5:], strict=False))


def test_an_upstream_limit_backs_off_after_a_kiss_without_spending_its_budget():
    from relay.limits import BACKING_OFF, FORWARD, UpstreamLimit

    limit = UpstreamLimit(4.0, 4, 64.0, now=0.0)
    assert limit.admit(0.0) == FORWARD
    limit.kissed(0.0)
    assert [limit.admit(t) for t in (1.0, 30.0, 63.9)] == [BACKING_OFF] * 3
    assert [limit.admit(64.0) for _ in range(4)] == [FORWARD] * 4  # the bucket refilled meanwhile, whole
