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
