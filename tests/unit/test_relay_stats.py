"""relay/stats.py: what one relay port counts, its refusals' sum, and the added delay's quantiles."""

from __future__ import annotations

import random

from relay.stats import COUNTERS, RESERVOIR_SIZE, PortStats


def test_a_new_port_has_every_counter_at_zero_and_no_hop_figure():
    stats = PortStats(port=8123, upstream="time.example:123")
    snapshot = stats.snapshot()
    assert all(snapshot[name] == 0 for name in COUNTERS), "counters start at zero"
    assert snapshot["added_delay_p50_s"] is None and snapshot["added_delay_p99_s"] is None, "no delay yet"
    assert "hop -" in stats.summary(), "the summary says there is no hop figure"


def test_refused_is_the_sum_of_every_refusal_and_nothing_else():
    stats = PortStats(port=8123, upstream="u")
    for k, name in enumerate(n for n in COUNTERS if n.startswith("refused_")):
        setattr(stats, name, k + 1)
    stats.policy_refused, stats.timeouts = 100, 1000  # not refusals
    refusals = sum(range(1, 1 + sum(n.startswith("refused_") for n in COUNTERS)))
    assert stats.refused == refusals


def test_the_quantiles_are_of_the_added_delays():
    stats = PortStats(port=8123, upstream="u")
    for ms in range(1, 101):
        stats.add_delay(ms / 1000)
    assert stats.quantile(0.5) == 0.051 and stats.quantile(0.99) == 0.1, "nearest rank"
    assert "hop +51.00/100.00 ms" in stats.summary()


def test_past_the_reservoir_the_sample_stays_uniform_and_bounded():
    """Reservoir sampling: 20 x the reservoir's size of delays, the old half and the new half kept alike."""
    stats = PortStats(port=8123, upstream="u")
    total = 20 * RESERVOIR_SIZE
    for i in range(total):
        stats.add_delay(0.001 if i < total // 2 else 0.002)
    assert len(stats.added_delays_s) == RESERVOIR_SIZE, "bounded"
    old = stats.added_delays_s.count(0.001) / RESERVOIR_SIZE
    assert 0.45 < old < 0.55, f"share of the first half kept: {old:.3f}"


def test_the_sample_is_repeatable():
    """Its own seeded generator: two ports fed alike keep alike (the relay's figures do not depend on others')."""
    one, two = PortStats(port=1, upstream="u"), PortStats(port=2, upstream="u")
    rng = random.Random(5)
    for _ in range(3 * RESERVOIR_SIZE):
        value = rng.random()
        one.add_delay(value)
        two.add_delay(value)
    assert one.added_delays_s == two.added_delays_s
