"""Falsetickers, groups, combining, the temporal filter and the kiss memory: pure logic."""

import math

import pytest

from orchestrator import outliers, selection
from workers.kod import REASON_BACKOFF, REASON_DEMOBILISED, KissMemory
from workers.quality import Thresholds

from .test_selection import ok

LOOSE = Thresholds(max_delay_s=1.0, max_uncertainty_s=1.0, min_stratum=1, max_stratum=15)


def honest(name, offset=0.0, delay=0.030):
    return ok(name, delay=delay, unc=delay / 2 + 0.001, offset=offset)


def test_the_liar_with_the_lowest_delay_is_a_falseticker():
    liar = ok("liar", delay=0.002, unc=0.0015, offset=0.5)
    outcomes = [honest(f"h{i}", offset=0.001 * i, delay=0.020 + 0.005 * i) for i in range(4)] + [liar]
    result = selection.select(outcomes, LOOSE, enable_fallback=True)
    assert result["agreement"]["majority"] and result["agreement"]["falsetickers"] == ["liar"]
    assert result["chosen"]["server"] == "h0"
    statuses = {s["server"]: s["status"] for s in result["servers"]}
    assert statuses["liar"] == "falseticker"


def test_no_majority_publishes_nothing():
    result = selection.select([ok("a", delay=0.01, unc=0.005, offset=0.0), ok("b", delay=0.01, unc=0.005, offset=0.1)],
                              LOOSE, enable_fallback=True)
    assert result["quality"] == selection.STARVATION and result["chosen"] is None
    assert result["agreement"]["majority"] is False
    assert all(s["status"] == "falseticker" for s in result["servers"])


def test_a_correlated_group_votes_once():
    smeared = [ok(f"g{i}", delay=0.004, unc=0.003, offset=0.4) for i in range(3)]
    others = [honest("cloudflare"), honest("nist", offset=0.002)]
    without = selection.select(smeared + others, LOOSE, enable_fallback=True)
    assert without["chosen"]["server"].startswith("g")  # three agreeing votes outvote two
    grouped = selection.select(smeared + others, LOOSE, enable_fallback=True, groups=[["g0", "g1", "g2"]])
    assert grouped["agreement"]["votes"] == 3
    assert grouped["chosen"]["server"] == "cloudflare"
    assert grouped["agreement"]["falsetickers"] == ["g0", "g1", "g2"]


def test_touching_intervals_agree():
    agreement = selection.intersect([{"server": "a", "offset_s": 0.0, "uncertainty_s": 1.0},
                                     {"server": "b", "offset_s": 2.0, "uncertainty_s": 1.0}])
    assert agreement["majority"] and agreement["interval"] == [1.0, 1.0]


def test_combine_weights_by_inverse_uncertainty_and_bounds_the_error():
    a = ok("a", delay=0.010, unc=0.005, offset=0.010)
    b = ok("b", delay=0.020, unc=0.010, offset=0.013)
    far = ok("far", delay=0.1, unc=0.016, offset=0.012)  # over 3x the best's uncertainty: not combined
    result = selection.select([a, b, far], LOOSE, enable_fallback=True, method=selection.COMBINE)
    chosen = result["chosen"]
    assert chosen["combined"] == ["a", "b"] and result["servers_combined"] == 2
    assert chosen["offset_s"] == pytest.approx((0.010 / 0.005 + 0.013 / 0.010) / (1 / 0.005 + 1 / 0.010))
    assert chosen["uncertainty_s"] == pytest.approx(2 / (1 / 0.005 + 1 / 0.010))
    statuses = {s["server"]: s["status"] for s in result["servers"]}
    assert statuses == {"a": "chosen", "b": "combined", "far": "accepted"}
    # The bound is hard: any errors within each member's own bound stay within the combined one.
    w = [1 / 0.005, 1 / 0.010]
    worst = (w[0] * 0.005 + w[1] * 0.010) / sum(w)
    assert math.isclose(worst, chosen["uncertainty_s"])


def test_combine_of_one_is_that_one():
    result = selection.select([honest("only")], LOOSE, enable_fallback=True, method=selection.COMBINE)
    assert result["chosen"]["server"] == "only" and result["chosen"]["combined"] == ["only"]


# -- the temporal filter ---------------------------------------------------------

def _window(n=10, *, drift=0.0, start=0.001, spacing=120.0, noise=(0.0,)):
    return [[i * spacing, start + drift * i * spacing + noise[i % len(noise)]] for i in range(n)]


def test_filter_waits_for_five_results():
    assert not outliers.judge(1.0, 1e-4, 0.0, _window(4), sigma_threshold=5)["outlier"]


def test_filter_follows_a_steady_drift():
    window = _window(10, drift=10e-6, noise=(2e-5, -2e-5, 1e-5))  # 10 ppm: 1.2 ms a round
    next_t = 10 * 120.0
    on_trend = 0.001 + 10e-6 * next_t
    assert not outliers.judge(on_trend, 1e-4, next_t, window, sigma_threshold=5)["outlier"]
    assert outliers.judge(on_trend + 0.005, 1e-4, next_t, window, sigma_threshold=5)["outlier"]


def test_filter_does_not_refuse_a_result_whose_interval_reaches_the_prediction():
    window = _window(10, noise=(1e-5, -1e-5))
    assert not outliers.judge(0.006, 0.0049999, 1200.0, window, sigma_threshold=5)["outlier"]


def test_filter_believes_a_new_level_after_three_outliers():
    window = _window(10, noise=(1e-5, -1e-5))
    first = outliers.judge(0.05, 1e-4, 1200.0, window, sigma_threshold=5, consecutive_outliers=0)
    assert first["outlier"] and not first["reset"]
    fourth = outliers.judge(0.05, 1e-4, 1200.0, window, sigma_threshold=5, consecutive_outliers=3)
    assert not fourth["outlier"] and fourth["reset"]


def test_the_homelab_sigma_lets_what_the_default_refuses_through():
    window = _window(10, noise=(1e-5, -1e-5))  # residual scale ~15 us
    assert outliers.judge(0.1, 1e-4, 1200.0, window, sigma_threshold=5.0)["outlier"]
    assert not outliers.judge(0.1, 1e-4, 1200.0, window, sigma_threshold=10000.0)["outlier"]


# -- the kiss memory -------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_backs_off_and_doubles():
    clock = Clock()
    memory = KissMemory(clock=clock)
    memory.record("s", "RATE", config_id="c1", rate_backoff_s=480)
    assert memory.refusal("s", config_id="c1")[0] == REASON_BACKOFF
    clock.now += 481
    assert memory.refusal("s", config_id="c1") is None
    memory.record("s", "RATE", config_id="c1", rate_backoff_s=480)  # again: twice as long
    clock.now += 900
    assert memory.refusal("s", config_id="c1")[0] == REASON_BACKOFF
    clock.now += 61
    assert memory.refusal("s", config_id="c1") is None


def test_deny_and_rstr_last_until_the_config_changes():
    memory = KissMemory(clock=Clock())
    memory.record("d", "DENY", config_id="c1", rate_backoff_s=1)
    memory.record("r", "RSTR", config_id="c1", rate_backoff_s=1)
    assert memory.refusal("d", config_id="c1")[0] == REASON_DEMOBILISED
    assert memory.refusal("r", config_id="c1")[0] == REASON_DEMOBILISED
    assert memory.refusal("d", config_id="c2") is None  # a new configuration: try again


def test_other_kiss_codes_are_not_acted_on():
    memory = KissMemory(clock=Clock())
    assert memory.record("s", "INIT", config_id="c1", rate_backoff_s=1) is None
    assert memory.refusal("s", config_id="c1") is None
