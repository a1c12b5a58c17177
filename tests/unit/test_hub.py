"""Two legs through the hub (issue #26): a node's offset is its LAN leg plus the hub's, bounded by both and the drift.

Pure: :mod:`orchestrator.hub` against random oracles of true clocks, and the hub's place in the config, the round
metadata and the round record (:func:`orchestrator.callback.build_record`).

Sign conventions (as the service's): an offset is reference clock minus clock, so ``o_lan = hub clock - node
clock`` and ``o_hub = UTC - hub clock``.  In the oracles a clock's *error* is ``UTC - clock``: node ``n``, hub
``h(t) = h0 + rate * (t - t_h)`` with ``|rate|`` within the drift bound.
"""

from __future__ import annotations

import json
import random

import pytest

from orchestrator import hub
from orchestrator.callback import build_record
from orchestrator.hub import PPM, Composed, compose, hub_age_s, hub_node_of, lan_leg, relative, utc_leg
from orchestrator.outcomes import RoundMeta
from workers import config as config_mod
from workers.config import ConfigError, ServerAddress
from workers.redisclock import stale_after_s

from .samples import ok

#: Float slack in the oracles (s): Unix times near 1.8e9 carry about 2e-7 s of rounding, times the drift bound.
EPS_S = 1e-9

HUB_NODE = "head"


def _latest(*, offset: float, uncertainty: float, measured_at: float, published_at: float, **extra) -> dict:
    """A hub node's ``latest`` as :func:`build_record` publishes it (only what the second leg reads)."""
    return {"node": HUB_NODE, "round_id": "h1", "offset": offset, "uncertainty": uncertainty,
            "measured_at": measured_at, "published_at": published_at, "leap": 0, **extra}


def _compose(hub_latest, *, now: float, lan_offset_s: float = 0.0012, lan_uncertainty_s: float = 0.0003,
             max_drift_ppm: float = 15.0, stale_after_s: float = 192.0) -> Composed | str:
    # The node's LAN sample at ``now`` on the hub's clock (Redis runs on the head here: one clock).
    return compose(lan_offset_s=lan_offset_s, lan_uncertainty_s=lan_uncertainty_s,
                   lan_measured_at=now - lan_offset_s, lan_round_id="r1",
                   lan_server="10.0.0.1", hub_node=HUB_NODE, hub_latest=hub_latest, now=now,
                   max_drift_ppm=max_drift_ppm, stale_after_s=stale_after_s)


# -- compose ---------------------------------------------------------------------------------------------


def _drift(ppm: float, age: float, apart: float, u_lan: float) -> float:
    """compose's drift term as its docstring states it: the bound over the larger of the Redis-clock age and
    the hub-clock gap, padded by the LAN leg's error and the hub clock's own rate."""
    phi = ppm * PPM
    return phi * max(age, (apart + u_lan) * (1 + 2 * phi))


def test_the_composed_offset_is_lan_plus_hub_and_the_bound_adds_the_drift_since_the_hubs_sample():
    latest = _latest(offset=-0.25, uncertainty=0.02, measured_at=1000.0, published_at=1000.5)
    leg = _compose(latest, now=1100.5)
    assert isinstance(leg, Composed)
    age = 100.5  # 100 s since its publication, plus its round's 0.5 s from sample to publication
    assert leg.offset_s == pytest.approx(0.0012 - 0.25, abs=1e-15)
    assert leg.uncertainty_s == pytest.approx(0.0003 + 0.02 + _drift(15.0, age, age, 0.0003), abs=1e-15)
    assert leg.legs["lan"] == {"round_id": "r1", "server": "10.0.0.1", "offset": 0.0012, "uncertainty": 0.0003}
    assert leg.legs["hub"] == {"node": HUB_NODE, "round_id": "h1", "offset": -0.25, "uncertainty": 0.02,
                               "measured_at": 1000.0, "age": pytest.approx(age), "apart": pytest.approx(age),
                               "leap": 0,
                               "drift": pytest.approx(_drift(15.0, age, age, 0.0003))}
    json.dumps(leg.legs)  # published as it is


@pytest.mark.parametrize("ppm", [1.0, 15.0, 500.0])
def test_the_drift_term_scales_with_the_bound_and_the_age(ppm):
    latest = _latest(offset=0.0, uncertainty=0.0, measured_at=0.0, published_at=0.0)
    ages = [0.0, 1.0, 60.0, 191.0]
    legs = [_compose(latest, now=age, lan_uncertainty_s=0.0, max_drift_ppm=ppm) for age in ages]
    assert [leg.uncertainty_s for leg in legs if isinstance(leg, Composed)] == pytest.approx(
        [_drift(ppm, age, age, 0.0) for age in ages], abs=1e-18)


def test_no_hub_latest_says_the_hub_node_has_no_measurement():
    why = _compose(None, now=1.0)
    assert isinstance(why, str)
    assert why == f"no hub leg: the hub node {HUB_NODE} has no measurement of UTC"


@pytest.mark.parametrize("broken, error", [
    ({"offset": None}, "TypeError"),
    ({"uncertainty": "wide"}, "ValueError"),
    ({"published_at": None}, "TypeError"),
    ({"measured_at": "yesterday"}, "ValueError"),
])
def test_an_unreadable_hub_latest_is_named_not_raised(broken, error):
    latest = {**_latest(offset=0.1, uncertainty=0.02, measured_at=10.0, published_at=10.5), **broken}
    why = _compose(latest, now=20.0)
    assert isinstance(why, str)
    assert why.startswith(f"no hub leg: the hub node {HUB_NODE}'s latest is unreadable ({error}")


@pytest.mark.parametrize("missing", ["offset", "uncertainty", "published_at", "measured_at"])
def test_a_hub_latest_missing_a_field_names_the_field(missing):
    latest = _latest(offset=0.1, uncertainty=0.02, measured_at=10.0, published_at=10.5)
    del latest[missing]
    why = _compose(latest, now=20.0)
    assert isinstance(why, str)
    assert "unreadable (KeyError" in why and missing in why and HUB_NODE in why


def test_a_stale_hub_latest_gives_its_age_and_the_limit():
    latest = _latest(offset=0.1, uncertainty=0.02, measured_at=1000.0, published_at=1001.0)
    why = _compose(latest, now=1193.5, stale_after_s=192.0)  # 192.5 s since publication, 193.5 since the sample
    assert why == (f"no hub leg: the hub node {HUB_NODE}'s measurement of UTC is 193.5 s old "
                   "(stale after 192 s)")
    # At the limit itself it is still used, with the whole drift of its age.
    at_limit = _compose(latest, now=1192.0, stale_after_s=192.0, lan_uncertainty_s=0.0)
    assert isinstance(at_limit, Composed)
    assert at_limit.uncertainty_s == pytest.approx(0.02 + _drift(15.0, 192.0, 192.0, 0.0))


def test_the_age_counts_the_hub_rounds_own_length_too():
    """Age since the *sample* (measured_at), not since publication: the hub's round took time to publish."""
    latest = _latest(offset=0.0, uncertainty=0.0, measured_at=1000.0, published_at=1150.0)
    why = _compose(latest, now=1190.0, stale_after_s=180.0)  # 40 s since publication, 190 s since the sample
    assert isinstance(why, str) and "190.0 s old" in why


def test_hub_age_is_never_below_the_time_since_publication():
    rng = random.Random(2601)
    for _ in range(5000):
        published = rng.uniform(1.7e9, 1.8e9)
        # The head's clock (measured_at) may be ahead of or behind Redis' (published_at); Redis' clock may step.
        measured = published + rng.choice([rng.uniform(-60, 60), 0.0, rng.uniform(-1e4, 1e4)])
        now = published + rng.choice([rng.uniform(-5, 600), 0.0, rng.uniform(-1e4, 1e4)])
        latest = {"published_at": published, "measured_at": measured}
        age = hub_age_s(latest, now)
        assert age >= now - published and age >= 0.0
        if measured <= published <= now:
            assert age == pytest.approx(now - measured, abs=1e-6)
    # Strings (JSON from another writer) read as numbers.
    assert hub_age_s({"published_at": "10.5", "measured_at": "10"}, 20.5) == pytest.approx(10.5)


# -- the compose oracle ----------------------------------------------------------------------------------


def _compose_case(rng: random.Random, *, adversarial: bool):
    """One world: true clocks, a hub round, a node's LAN round finishing later; what the service would see.

    Redis' clock reads the head's clock, or is ahead of it (``redis_ahead_s`` >= 0: Redis on the head, as
    docs/operations.md deploys it, or elsewhere and ahead); the node's LAN sample is taken after the hub's.
    ``adversarial``: every error at its bound, all of one sign, the drift at the bound, no slack anywhere:
    the truth lands exactly on the bound's edge.
    """
    ppm = rng.choice([15.0, rng.uniform(0.5, 500.0)])
    phi = ppm * PPM
    stale = 3 * rng.uniform(16.0, 600.0)
    u_lan = rng.uniform(5e-6, 2e-3)
    u_hub = rng.uniform(1e-3, 0.1)
    t_h = rng.uniform(1.7e9, 1.8e9)            # true UTC of the hub's sample
    h0 = rng.uniform(-3.0, 3.0)                 # UTC - hub clock then
    n = rng.uniform(-10.0, 10.0)                # UTC - node clock at its LAN sample: the truth
    # Up to just under stale (the age is read from times near 1.8e9 s: a few 1e-7 s of rounding).
    age = rng.choice([stale - 1e-5, rng.uniform(0, stale - 1e-5), rng.uniform(0, 1.0)])
    if adversarial:
        rate = rng.choice([phi, -phi])
        sign = -1.0 if rate > 0 else 1.0       # the errors push the same way as the drift
        e_lan, e_wan = sign * u_lan, sign * u_hub
        redis_ahead_s = 0.0
        round_s = rng.uniform(0, age)
        finish_lag_s = 0.0
    else:
        rate = rng.choice([phi, -phi, rng.uniform(-phi, phi)])
        e_lan, e_wan = rng.uniform(-u_lan, u_lan), rng.uniform(-u_hub, u_hub)
        redis_ahead_s = rng.choice([0.0, rng.uniform(0, min(age, 5.0))])
        round_s = rng.uniform(0, age - redis_ahead_s)
        finish_lag_s = rng.uniform(0, age - redis_ahead_s - round_s)
    rho = redis_ahead_s - h0                     # Redis' clock - UTC
    now_true = t_h + age - redis_ahead_s         # so that the age compose reads is ``age``
    t_p = t_h + round_s                          # the hub's round is published
    t_l = now_true - finish_lag_s                # the node's LAN sample, after the hub's
    hub_at_t_l = h0 + rate * (t_l - t_h)         # UTC - hub clock at the LAN sample
    latest = {"node": HUB_NODE, "round_id": "h", "leap": 0,
              "offset": h0 + e_wan, "uncertainty": u_hub,
              "measured_at": t_h - h0,           # the head's own clock reading of its sample
              "published_at": t_p + rho}         # Redis' clock
    lan = {"offset": (n - hub_at_t_l) + e_lan, "uncertainty": u_lan}
    return dict(latest=latest, lan=lan, now=now_true + rho, ppm=ppm, stale=stale, truth=n,
                lan_measured_at=t_l - n)  # the node's own clock at its LAN sample (UTC - n)


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "at-the-bounds"])
def test_the_truth_is_always_inside_the_composed_bound(adversarial):
    rng = random.Random(26 + adversarial)
    tight = 0
    for i in range(4000):
        case = _compose_case(rng, adversarial=adversarial)
        leg = compose(lan_offset_s=case["lan"]["offset"], lan_uncertainty_s=case["lan"]["uncertainty"],
                      lan_measured_at=case["lan_measured_at"], lan_round_id="r", lan_server="lan",
                      hub_node=HUB_NODE, hub_latest=case["latest"], now=case["now"], max_drift_ppm=case["ppm"],
                      stale_after_s=case["stale"])
        assert isinstance(leg, Composed), f"case {i}: {leg}"
        error = leg.offset_s - case["truth"]
        assert abs(error) <= leg.uncertainty_s + EPS_S, (
            f"case {i}: truth {case['truth']!r} outside {leg.offset_s!r} ± {leg.uncertainty_s!r} "
            f"(missed by {abs(error) - leg.uncertainty_s:.3g} s): {case}")
        # On the edge, but for the gap read on the hub's own (drifting) clock and the LAN leg's error in it:
        # the drift bound over those, second order (compose's docstring).
        # On the edge but for the drift term's pad (the gap read on the hub's drifting clock, the LAN leg's
        # error in it): no looser than that.
        pad = leg.legs["hub"]["drift"] - case["ppm"] * PPM * leg.legs["hub"]["age"]
        tight += leg.uncertainty_s - abs(error) < 1e-7 + pad
    if adversarial:
        assert tight == 4000  # every adversarial case sits on the edge: the bound is not looser than it says


def test_the_bound_is_tight_at_the_drift_bound_just_under_stale():
    """The hub drifting at exactly 15 ppm for just under the staleness limit, every error at its bound."""
    stale, age = 192.0, 192.0 - 1e-6
    phi = 15.0 * PPM
    t_h, h0, n = 1_800_000_000.0, 0.75, -2.5
    u_lan, u_hub = 0.0004, 0.03
    latest = {"node": HUB_NODE, "offset": h0 - u_hub, "uncertainty": u_hub, "measured_at": t_h - h0,
              "published_at": t_h - h0 + 2.0}    # Redis on the head: its clock is the head's
    t_l = t_h + age
    lan_offset = n - (h0 + phi * age) - u_lan   # the hub's clock ran slow; both errors low
    leg = compose(lan_offset_s=lan_offset, lan_uncertainty_s=u_lan, lan_measured_at=t_l - n, lan_round_id="r",
                  lan_server="lan", hub_node=HUB_NODE, hub_latest=latest, now=t_l - h0, max_drift_ppm=15.0,
                  stale_after_s=stale)
    assert isinstance(leg, Composed)
    assert leg.legs["hub"]["age"] == pytest.approx(age, abs=1e-6)
    pad = leg.legs["hub"]["drift"] - phi * age  # the gap's pad: the LAN leg's error, the hub clock's rate
    assert 0 <= leg.uncertainty_s - abs(leg.offset_s - n) <= pad + EPS_S
    assert leg.uncertainty_s == pytest.approx(u_lan + u_hub + _drift(15.0, age, leg.legs["hub"]["apart"], u_lan),
                                              abs=EPS_S)
    # A microsecond later the same leg is stale: nothing is published rather than a bound past the limit.
    assert isinstance(compose(lan_offset_s=lan_offset, lan_uncertainty_s=u_lan, lan_measured_at=t_l - n,
                              lan_round_id="r", lan_server="lan",
                              hub_node=HUB_NODE, hub_latest=latest, now=t_l - h0 + 2e-6, max_drift_ppm=15.0,
                              stale_after_s=stale), str)


@pytest.mark.parametrize("head_ahead_s, hub_after_lan_s", [(60.0, 0.0), (0.0, 5.0)],
                         ids=["head-clock-ahead-of-redis", "hub-sampled-after-the-lan-leg"])
def test_the_bound_holds_across_clocks_and_sample_orders(head_ahead_s, hub_after_lan_s):
    phi = 15.0 * PPM
    u_lan, u_hub, n, h0 = 0.0004, 0.03, 1.5, -head_ahead_s   # UTC - hub clock: the head's clock ahead
    t_h = 1_800_000_000.0
    if hub_after_lan_s:
        t_l, t_p, now = t_h - hub_after_lan_s, t_h + 0.5, t_h + 1.0   # a node round closed at its deadline
    else:
        t_l, t_p, now = t_h + 30.0, t_h + 20.0, t_h + 30.0
    rate = phi                                                    # the hub's clock runs slow at the bound
    latest = {"node": HUB_NODE, "offset": h0 - u_hub, "uncertainty": u_hub,
              "measured_at": t_h - h0, "published_at": t_p}       # Redis' clock is UTC here
    hub_error_at_t_l = h0 + rate * (t_l - t_h)
    lan_offset = n - hub_error_at_t_l - u_lan * (1 if t_l > t_h else -1)
    if t_l < t_h:
        latest["offset"] = h0 + u_hub
    leg = compose(lan_offset_s=lan_offset, lan_uncertainty_s=u_lan, lan_measured_at=t_l - n, lan_round_id="r",
                  lan_server="lan", hub_node=HUB_NODE, hub_latest=latest, now=now, max_drift_ppm=15.0,
                  stale_after_s=192.0)
    assert isinstance(leg, Composed)
    assert abs(leg.offset_s - n) <= leg.uncertainty_s + EPS_S


# -- relative, lan_leg, hub_node_of -----------------------------------------------------------------------


def _node_latest(node: str, *, lan: float, u: float, at: float, hub_node: str = HUB_NODE,
                 wan: float = 0.25, u_wan: float = 0.02) -> dict:
    """A node's ``latest`` published through the hub: the composed offset, with its ``legs``."""
    return {"node": node, "offset": lan + wan, "uncertainty": u + u_wan + 1e-4, "measured_at": at,
            "published_at": at + 0.01,
            "legs": {"lan": {"round_id": "r", "server": "10.0.0.1", "offset": lan, "uncertainty": u},
                     "hub": {"node": hub_node, "offset": wan, "uncertainty": u_wan}}}


def _hub_latest(at: float = 500.0) -> dict:
    """The hub node's own ``latest``: measured against UTC, no ``legs``."""
    return {"node": HUB_NODE, "offset": 0.25, "uncertainty": 0.02, "measured_at": at, "published_at": at + 1}


def _apart_drift(ppm: float, apart: float, u_n: float, u_r: float) -> float:
    """relative's drift term as its docstring states it: both clocks over the gap, padded by the legs'
    errors in it and the hub clock's own rate."""
    phi = ppm * PPM
    return 2 * phi * (apart + u_n + u_r) * (1 + 2 * phi)


def test_against_the_hub_node_the_bound_is_the_lan_leg_alone():
    node = _node_latest("n1", lan=0.0031, u=0.0002, at=1000.0)
    rel = relative(node, _hub_latest(at=500.0), hub_node=None, max_drift_ppm=15.0)  # the hub from the legs
    assert (rel.node, rel.reference) == ("n1", HUB_NODE)
    assert rel.offset_to_reference == 0.0031  # hub clock - node clock: the LAN leg itself
    assert rel.uncertainty == 0.0002           # 500 s apart, but the hub's leg is exactly 0 at any time
    assert rel.measured_at == 1000.0
    assert rel.as_dict() == {"node": "n1", "offset_to_reference": 0.0031, "uncertainty": 0.0002,
                             "measured_at": 1000.0}
    named = relative(node, _hub_latest(), hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert named == rel


def test_the_hub_node_against_a_node_is_the_negated_lan_leg_with_the_drift_between_them():
    node = _node_latest("n1", lan=0.0031, u=0.0002, at=1000.0)
    rel = relative(_hub_latest(at=940.0), node, hub_node=None, max_drift_ppm=15.0)
    assert rel.offset_to_reference == -0.0031  # node clock - hub clock
    # Stated at the hub's time: 60 s before the node's sample, on the hub's clock (1000 + 0.0031 - 940).
    assert rel.uncertainty == pytest.approx(0.0002 + _apart_drift(15.0, 60.0031, 0.0, 0.0002))
    assert rel.measured_at == 940.0


def test_between_two_nodes_the_hub_cancels_and_both_clocks_drift_over_the_time_apart():
    a = _node_latest("a", lan=0.0040, u=0.0003, at=1000.0, wan=0.25)
    b = _node_latest("b", lan=-0.0010, u=0.0001, at=1090.0, wan=0.31)  # a later hub leg: irrelevant
    rel = relative(a, b, hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert rel.offset_to_reference == pytest.approx(0.0050, abs=1e-15)  # b's clock - a's = o_lan(a) - o_lan(b)
    apart = (1090.0 - 0.0010) - (1000.0 + 0.0040)  # on the hub's clock: measured_at + the LAN leg
    assert rel.uncertainty == pytest.approx(0.0004 + _apart_drift(15.0, apart, 0.0003, 0.0001), abs=1e-15)
    back = relative(b, a, hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert back.offset_to_reference == pytest.approx(-rel.offset_to_reference, abs=1e-15)
    assert back.uncertainty == pytest.approx(rel.uncertainty, abs=1e-15)
    assert relative(a, b, hub_node=HUB_NODE, max_drift_ppm=100.0).uncertainty == pytest.approx(
        0.0004 + _apart_drift(100.0, apart, 0.0003, 0.0001))


def test_a_node_against_itself_is_zero_plus_or_minus_zero():
    a = _node_latest("a", lan=0.004, u=0.0003, at=1000.0)
    rel = relative(a, dict(a), hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert (rel.offset_to_reference, rel.uncertainty, rel.measured_at) == (0.0, 0.0, 1000.0)
    plain = {"node": "x", "offset": 0.2, "uncertainty": 0.03, "measured_at": 7.0}
    assert relative(plain, plain, hub_node=None, max_drift_ppm=15.0).uncertainty == 0.0
    hub_itself = relative(_hub_latest(), _hub_latest(), hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert (hub_itself.offset_to_reference, hub_itself.uncertainty) == (0.0, 0.0)


def test_nodes_without_legs_compare_their_offsets_to_utc():
    a = {"node": "a", "offset": 0.120, "uncertainty": 0.020, "measured_at": 1000.0}
    b = {"node": "b", "offset": 0.100, "uncertainty": 0.030, "measured_at": 1010.0}
    rel = relative(a, b, hub_node=None, max_drift_ppm=15.0)
    # (UTC - a) - (UTC - b) = b - a
    assert rel.offset_to_reference == pytest.approx(0.020, abs=1e-15)
    apart = (1010.0 + 0.100) - (1000.0 + 0.120)  # on UTC: measured_at + offset
    assert rel.uncertainty == pytest.approx(0.050 + _apart_drift(15.0, apart, 0.020, 0.030), abs=1e-15)


def test_lan_leg_of_each_kind_of_latest():
    """(offset, bound, the sample's time on the hub's clock); a latest with no LAN leg has none."""
    assert lan_leg(_node_latest("a", lan=0.004, u=0.0003, at=9.0), hub_node=None) == (0.004, 0.0003, 9.004)
    assert lan_leg(_hub_latest(at=5.0), hub_node=HUB_NODE) == (0.0, 0.0, 5.0)
    for hub_name in (None, "elsewhere"):
        with pytest.raises(ValueError):
            lan_leg(_hub_latest(at=5.0), hub_node=hub_name)
    # ``legs`` without a LAN leg is not a LAN leg.
    odd = {**_hub_latest(at=5.0), "node": "n", "legs": {"hub": {"node": HUB_NODE}}}
    with pytest.raises(ValueError):
        lan_leg(odd, hub_node=HUB_NODE)
    # Against UTC: the whole offset, at the sample's UTC time.
    assert utc_leg(_hub_latest(at=5.0)) == (0.25, 0.02, 5.25)


def test_a_node_with_legs_against_one_without_compares_both_to_utc():
    """Never a hub-based offset against a UTC-based one: both against UTC, with their whole bounds."""
    a = _node_latest("a", lan=0.004, u=0.0003, at=1000.0, wan=0.25, u_wan=0.02)
    plain = {"node": "p", "offset": 0.1, "uncertainty": 0.03, "measured_at": 1000.0}
    rel = relative(a, plain, hub_node="head", max_drift_ppm=15.0)
    assert rel.offset_to_reference == pytest.approx(a["offset"] - 0.1)
    assert rel.uncertainty >= a["uncertainty"] + 0.03


def test_hub_node_of_reads_the_legs():
    assert hub_node_of(_node_latest("a", lan=0.0, u=0.0, at=0.0, hub_node="h2")) == "h2"
    assert hub_node_of(_hub_latest()) is None
    assert hub_node_of({"legs": None}) is None
    assert hub_node_of({"legs": {"lan": {}}}) is None
    assert hub_node_of({"legs": "garbage"}) is None
    assert hub_node_of({"legs": {"hub": {}}}) is None  # no name: None, not the string "None"


def test_relative_against_a_random_oracle_of_true_clocks():
    """Three clocks drifting within the bound; each node's LAN leg measured at its own time, with errors within
    its bound.  The truth: the reference's clock minus the node's at the node's measurement."""
    rng = random.Random(2626)
    nodes = ["a", "b", HUB_NODE]
    for i in range(5000):
        ppm = rng.choice([15.0, rng.uniform(0.5, 100.0)])
        phi = ppm * PPM
        t0 = rng.uniform(1.7e9, 1.8e9)
        # Each clock's error (UTC - clock) at t0 and its rate; the hub's (the LAN legs' reference) too.
        err = {name: (rng.uniform(-2.0, 2.0), rng.uniform(-phi, phi)) for name in nodes}
        err[HUB_NODE] = (rng.uniform(-2.0, 2.0), rng.choice([phi, -phi, rng.uniform(-phi, phi)]))

        def error(name, t, err=err, t0=t0):
            e0, rate = err[name]
            return e0 + rate * (t - t0)

        def latest(name, t, err=err, error=error):
            if name == HUB_NODE:
                return {"node": name, "offset": 0.1, "uncertainty": 0.02, "measured_at": t - error(name, t)}
            u = rng.uniform(1e-5, 2e-3)
            lan = error(name, t) - error(HUB_NODE, t) + rng.uniform(-u, u)   # hub clock - node clock, measured
            return {"node": name, "offset": lan + 0.1, "uncertainty": u + 0.02, "measured_at": t - error(name, t),
                    "legs": {"lan": {"offset": lan, "uncertainty": u}, "hub": {"node": HUB_NODE}}}

        node, reference = rng.sample(nodes, 2) if rng.random() < 0.9 else (nodes[0], nodes[0])
        t_n = t0 + rng.uniform(0, 600)
        t_r = t_n if node == reference else t0 + rng.uniform(0, 600)
        node_latest = latest(node, t_n)
        reference_latest = node_latest if node == reference else latest(reference, t_r)
        rel = relative(node_latest, reference_latest, hub_node=rng.choice([None, HUB_NODE]), max_drift_ppm=ppm)
        truth = error(node, t_n) - error(reference, t_n)   # (UTC - node) - (UTC - reference) = reference - node
        assert abs(rel.offset_to_reference - truth) <= rel.uncertainty + EPS_S, (
            f"case {i}: {node} against {reference}: truth {truth!r} outside "
            f"{rel.offset_to_reference!r} ± {rel.uncertainty!r}")
        assert rel.measured_at == node_latest["measured_at"]


@pytest.mark.parametrize("rate_sign", [1.0, -1.0])
def test_relative_is_tight_with_the_reference_drifting_against_the_hub_at_twice_the_bound(rate_sign):
    """The hub at +PHI, the reference at -PHI (or the other way), both LAN errors at their bounds."""
    phi = 15.0 * PPM
    t_a, t_b = 1000.0, 1300.0
    u_a, u_b = 0.0003, 0.0005

    def hub_error(t):
        return rate_sign * phi * (t - t_a)

    def b_error(t):
        return 0.002 - rate_sign * phi * (t - t_a)

    a_error = -0.004
    # computed - truth = (r_hub - r_b) (t_b - t_a) + e_a - e_b: push every term the same way.
    e_a, e_b = rate_sign * u_a, -rate_sign * u_b
    # t_a, t_b are true times; each node's measured_at is its own clock's reading then (UTC - error).
    a = {"node": "a", "measured_at": t_a - a_error, "offset": 0.0, "uncertainty": 0.0,
         "legs": {"lan": {"offset": a_error - hub_error(t_a) + e_a, "uncertainty": u_a}, "hub": {"node": HUB_NODE}}}
    b = {"node": "b", "measured_at": t_b - b_error(t_b), "offset": 0.0, "uncertainty": 0.0,
         "legs": {"lan": {"offset": b_error(t_b) - hub_error(t_b) + e_b, "uncertainty": u_b},
                  "hub": {"node": HUB_NODE}}}
    rel = relative(a, b, hub_node=None, max_drift_ppm=15.0)
    truth = a_error - b_error(t_a)
    # On the edge, but for the milliseconds the clocks' errors put between the gap as read and as it was.
    assert 0 <= rel.uncertainty - abs(rel.offset_to_reference - truth) <= 2 * phi * 0.02
    assert rel.uncertainty == pytest.approx(u_a + u_b + 2 * phi * 300.0, abs=2 * phi * 0.02)


def test_relative_counts_the_true_time_between_the_legs_whatever_the_node_clocks_read():
    phi = 15.0 * PPM
    t_a, t_b = 1_800_000_300.0, 1_800_000_000.0      # a's round 300 s after b's...
    a_error, b_error0 = 300.0, 0.0                    # ...but a's clock is 300 s behind: both read ...000.0
    u = 0.0001

    def hub_error(t):
        return phi * (t - t_b)

    def b_error(t):
        return b_error0 - phi * (t - t_b)

    a = {"node": "a", "measured_at": t_a - a_error, "offset": 0.0, "uncertainty": 0.0,
         "legs": {"lan": {"offset": a_error - hub_error(t_a) + u, "uncertainty": u}, "hub": {"node": HUB_NODE}}}
    b = {"node": "b", "measured_at": t_b - b_error(t_b), "offset": 0.0, "uncertainty": 0.0,
         "legs": {"lan": {"offset": b_error(t_b) - hub_error(t_b) - u, "uncertainty": u},
                  "hub": {"node": HUB_NODE}}}
    rel = relative(a, b, hub_node=None, max_drift_ppm=15.0)
    truth = a_error - b_error(t_a)
    assert abs(rel.offset_to_reference - truth) <= rel.uncertainty + EPS_S


# -- the hub in the config -------------------------------------------------------------------------------


PUBLIC = ["time.google.com", "time1.google.com", "ptbtime1.ptb.de", "time.cloudflare.com"]


def _config(hub_settings: dict | None = None, *, nodes=("head", "n1", "n2"), normal_s: float = 120.0,
            **ntp) -> config_mod.Config:
    service: dict = {"nodes": list(nodes)}
    if hub_settings is not None:
        service["hub"] = hub_settings
    return config_mod.from_mapping({"clock_measurement": {
        "ntp": {"servers": PUBLIC, "server_groups": {"google": PUBLIC[:2]},
                "smearing_servers": ["time.google.com"], "timeout_seconds": 0.7, "max_delay": 0.05, **ntp},
        "timing": {"normal_operation": {"measurement_interval": normal_s}}},
        "ntp_service": service}, environ={})


HUB = {"address": "10.0.0.1", "node": "head"}


def test_through_the_hub_a_node_measures_the_lan_server_alone_with_the_same_gates():
    config = _config(HUB)
    node = config.for_node("n1")
    assert node.ntp.servers == (ServerAddress("10.0.0.1", 123),)
    assert node.ntp.server_groups == () and node.ntp.smearing_servers == ()
    assert (node.ntp.timeout_seconds, node.ntp.max_delay) == (0.7, 0.05)
    assert node.service == config.service and node.timing == config.timing
    assert config.ntp.servers[0].name == "time.google.com"  # the config itself unchanged
    # The hub node measures the public servers; so does every node without a hub.
    assert config.for_node("head") is config
    plain = _config(None)
    assert plain.for_node("n1") is plain
    with_port = _config({"address": "10.0.0.1:8123", "node": "head"}).for_node("n2")
    assert with_port.ntp.servers == (ServerAddress("10.0.0.1", 8123),)


def test_the_hub_leg_is_every_node_but_the_hub_nodes():
    config = _config(HUB)
    assert config.hub_leg_of("head") is None
    assert config.hub_leg_of("n1") is config.service.hub and config.hub_leg_of("n2") is config.service.hub
    assert _config(None).hub_leg_of("n1") is None


@pytest.mark.parametrize("normal_s, interval, hub_node_s", [(120.0, None, 120.0), (30.0, None, 64.0),
                                                             (30.0, 16.0, 30.0), (10.0, 600.0, 600.0)])
def test_the_hub_nodes_rounds_are_at_least_its_interval_apart(normal_s, interval, hub_node_s):
    settings = dict(HUB) if interval is None else {**HUB, "measurement_interval": interval}
    config = _config(settings, normal_s=normal_s)
    assert config.normal_interval_of("head") == hub_node_s
    assert config.normal_interval_of("n1") == normal_s
    assert _config(None, normal_s=normal_s).normal_interval_of("head") == normal_s


@pytest.mark.parametrize("settings, key, words", [
    ({"node": "head"}, "ntp_service.hub.address", "missing"),
    ({"address": "", "node": "head"}, "ntp_service.hub.address", "missing"),
    ({"address": "10.0.0.1"}, "ntp_service.hub.node", "missing"),
    ({"address": "10.0.0.1", "node": "elsewhere"}, "ntp_service.hub.node", "'elsewhere' is not in ntp_service.nodes"),
    ({"address": "nts://10.0.0.1", "node": "head"}, "ntp_service.hub.address", "plain `HOST[:PORT]`"),
    ({"address": "10.0.0.1:99999", "node": "head"}, "ntp_service.hub.address", "bad port"),
    ({"address": "10.0.0.1", "node": "head", "servers": ["x"]}, "ntp_service.hub.servers", "unknown key"),
    ({"address": "10.0.0.1", "node": "head", "max_drift_ppm": 0}, "ntp_service.hub.max_drift_ppm", "more than 0"),
    ({"address": "10.0.0.1", "node": "head", "measurement_interval": 8}, "ntp_service.hub.measurement_interval",
     "from 16"),
    ({"address": "10.0.0.1", "node": "he ad"}, "ntp_service.hub.node", "bad node name"),
])
def test_a_bad_hub_is_refused_by_key(settings, key, words):
    with pytest.raises(ConfigError) as caught:
        _config(settings)
    assert caught.value.key == key
    assert words in caught.value.problem
    assert caught.value.source == "<config>"


def test_a_hub_without_a_node_list_takes_any_node():
    assert _config({"address": "10.0.0.1", "node": "anyone"}, nodes=()).service.hub is not None


# -- the hub in the round's metadata and record ----------------------------------------------------------


def _meta(config: config_mod.Config, node: str, round_id: str = "r1") -> RoundMeta:
    return RoundMeta.for_round(config, round_id=round_id, node=node, dispatched_at=999.0, deadline_at=1010.0)


def test_round_metadata_carries_the_hub_leg_only_for_nodes_measured_through_it():
    config = _config({**HUB, "max_drift_ppm": 20.0, "measurement_interval": 90.0}, normal_s=60.0)
    node = _meta(config, "n1")
    assert node.hub == {"node": "head", "max_drift_ppm": 20.0, "stale_after_s": stale_after_s(90.0)}
    assert node.servers == ["10.0.0.1"]
    assert RoundMeta.from_dict(json.loads(json.dumps(node.as_dict()))) == node  # what crosses Celery
    head = _meta(config, "head")
    assert head.hub is None and head.servers == PUBLIC
    assert RoundMeta.from_dict(json.loads(json.dumps(head.as_dict()))) == head
    assert _meta(_config(None), "n1").hub is None


LAN = "10.0.0.1"


def _lan_ok(offset: float = 0.0012, unc: float = 0.0003, measured_at: float = 999.5) -> dict:
    outcome = ok(LAN, delay=0.0004, unc=unc, offset=offset)
    outcome["sample"]["measured_at"] = measured_at
    return outcome


def test_a_round_through_the_hub_publishes_the_two_legs_composed():
    meta = _meta(_config(HUB), "n1")
    hub_latest = _latest(offset=0.25, uncertainty=0.02, measured_at=940.0, published_at=940.5)
    record = build_record(meta, [_lan_ok()], finished_at=1000.0, hub_latest=hub_latest)
    latest = record["latest"]
    assert record["quality"] == "strict" and latest is not None
    age = 60.0
    assert latest["offset"] == pytest.approx(0.2512, abs=1e-15)
    assert latest["uncertainty"] == pytest.approx(0.0003 + 0.02 + 15e-6 * age, abs=1e-15)
    assert latest["legs"]["lan"] == {"round_id": "r1", "server": LAN, "offset": 0.0012, "uncertainty": 0.0003}
    assert latest["legs"]["hub"]["node"] == "head" and latest["legs"]["hub"]["age"] == pytest.approx(age)
    assert record["candidate"]["offset"] == latest["offset"]
    json.dumps(record)
    # The reader's relative offset against the hub node is the LAN leg back again.
    rel = hub.relative(latest, hub_latest, hub_node=None, max_drift_ppm=15.0)
    assert (rel.offset_to_reference, rel.uncertainty) == (0.0012, 0.0003)


def test_the_hub_nodes_own_round_publishes_its_offset_to_utc_without_legs():
    config = _config(HUB)
    meta = _meta(config, "head")
    outcomes = [ok(name, delay=0.02, unc=0.005, offset=0.25) for name in PUBLIC]
    record = build_record(meta, outcomes, finished_at=1000.0, hub_latest=None)
    assert record["latest"] is not None and "legs" not in record["latest"]
    assert record["latest"]["offset"] == pytest.approx(0.25)


def test_the_outlier_filter_judges_the_composed_offset_not_the_lan_leg():
    meta = _meta(_config(HUB), "n1")
    hub_latest = _latest(offset=0.25, uncertainty=0.001, measured_at=990.0, published_at=990.2)
    composed_level = [[900.0 + 10 * i, 0.2512] for i in range(10)]
    kept = build_record(meta, [_lan_ok()], finished_at=1000.0, window=composed_level, hub_latest=hub_latest)
    assert kept["quality"] == "strict" and kept["filter"]["outlier"] is False and kept["latest"] is not None
    # The window at the LAN leg's level: the composed offset, 250 ms from it, is the outlier.
    lan_level = [[900.0 + 10 * i, 0.0012] for i in range(10)]
    refused = build_record(meta, [_lan_ok()], finished_at=1000.0, window=lan_level, hub_latest=hub_latest)
    assert refused["quality"] == "outlier" and refused["latest"] is None
    assert refused["filter"]["outlier"] is True
    assert refused["candidate"]["offset"] == pytest.approx(0.2512)
    assert refused["filter"]["predicted_s"] == pytest.approx(0.0012)


@pytest.mark.parametrize("hub_latest, words", [
    (None, "has no measurement of UTC"),
    (_latest(offset=0.25, uncertainty=0.02, measured_at=500.0, published_at=500.5), "s old (stale after 360 s)"),
    ({"node": "head", "offset": "NaN?", "uncertainty": 0.02, "measured_at": 990.0, "published_at": 990.5},
     "unreadable"),
])
def test_without_a_usable_hub_leg_a_node_round_is_an_outage_naming_the_hub(hub_latest, words):
    meta = _meta(_config(HUB), "n1")
    assert meta.hub is not None and meta.hub["stale_after_s"] == 360.0
    record = build_record(meta, [_lan_ok()], finished_at=1000.0, hub_latest=hub_latest)
    assert record["quality"] == "outage"
    assert record["latest"] is None and record["candidate"] is None and record["filter"] is None
    outage = record["agreement"]["outage"]
    assert outage.startswith("no hub leg: the hub node head") and words in outage
    # The LAN server itself answered: it is in the record as such, not as a failure.
    assert [s["status"] for s in record["servers"]] == ["chosen"]


@pytest.mark.parametrize("budget, key", [({"max_requests_per_minute": 2}, "max_requests_per_minute"),
                                         ({"max_requests_per_10_minutes": 2, "max_requests_per_minute": 2},
                                          "max_requests_per_minute"),
                                         ({"max_requests_per_10_minutes": 5}, "max_requests_per_10_minutes")])
def test_a_budget_that_could_never_send_an_attempt_is_refused_naming_its_key(budget, key):
    """An attempt takes its whole burst's places or none: a budget under one burst would silence the hub; a
    10-minute budget under the minute's is a typo."""
    with pytest.raises(config_mod.ConfigError) as refused:
        _config({**HUB, **budget}, measurement_mode="advanced", advanced_samples=3)
    assert refused.value.key == f"ntp_service.hub.{key}"
    # One sample a request (simple mode): a budget of 2 sends.
    if key == "max_requests_per_minute" and "max_requests_per_10_minutes" not in budget:
        assert _config({**HUB, **budget}).service.hub.max_requests_per_minute == 2


def test_with_a_hub_the_warm_ups_1_s_rounds_are_no_warning_about_public_servers():
    """Through the hub the nodes' 1-s warm-ups reach only the LAN: check-config's RFC 4330 warning would be false."""
    assert any("warm_up.measurement_interval" in w for w in config_mod.warnings_for(_config(None)))
    assert config_mod.warnings_for(_config(HUB)) == []


def test_a_series_pairs_each_measurement_with_the_references_nearest_in_time():
    """The plot's points: each of a node's latests against the reference's nearest (on the hub's clock)."""
    a = [_node_latest("a", lan=0.001 * i, u=0.0001, at=1000.0 + 10 * i) for i in range(5)]
    b = [_node_latest("b", lan=-0.002, u=0.0002, at=1003.0 + 20 * i) for i in range(3)]
    series = hub.relative_series(a, b, hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert [p.offset_to_reference for p in series] == pytest.approx([0.001 * i + 0.002 for i in range(5)])
    nearest = [min(b, key=lambda r, t=x["measured_at"] + x["legs"]["lan"]["offset"]:
                   abs(r["measured_at"] + r["legs"]["lan"]["offset"] - t)) for x in a]
    assert [p.uncertainty for p in series] == [relative(x, r, hub_node=HUB_NODE, max_drift_ppm=15.0).uncertainty
                                              for x, r in zip(a, nearest, strict=True)]
    # Against the hub node: the LAN legs alone, whatever the hub's own rounds' times.
    against_hub = hub.relative_series(a, [_hub_latest(at=500.0)], hub_node=HUB_NODE, max_drift_ppm=15.0)
    assert [p.uncertainty for p in against_hub] == [0.0001] * 5
    assert hub.relative_series([], b, hub_node=HUB_NODE, max_drift_ppm=15.0) == []


def test_a_leap_second_announced_upstream_reaches_the_nodes_through_the_hubs_leg():
    """The hub's chronyd announces none; the public servers do.  The leap indicator is kept end to end."""
    meta = _meta(_config(HUB), "n1")
    for leap in (1, 2):
        hub_latest = _latest(offset=0.25, uncertainty=0.02, measured_at=940.0, published_at=940.5, leap=leap)
        assert build_record(meta, [_lan_ok()], finished_at=1000.0, hub_latest=hub_latest)["latest"]["leap"] == leap
    quiet = _latest(offset=0.25, uncertainty=0.02, measured_at=940.0, published_at=940.5)
    assert build_record(meta, [_lan_ok()], finished_at=1000.0, hub_latest=quiet)["latest"]["leap"] == 0


# -- a leap second between the legs (review of #26) -------------------------------------------------------------

LEAP_2017 = 1483228800.0  # 2017-01-01T00:00:00Z: the last leap second


def _across_the_leap(*, leap_seconds=(), hub_leap: int = 1, stepping: bool = True, after_s: float = 30.0):
    """The hub measured 30 s before the leap; the node's LAN sample ``after_s`` after it, its clock 5 ms ahead."""
    hub_latest = _latest(offset=0.0, uncertainty=0.02, measured_at=LEAP_2017 - 30.0,
                         published_at=LEAP_2017 - 29.5, leap=hub_leap)
    return compose(lan_offset_s=-0.005, lan_uncertainty_s=0.0002, lan_measured_at=LEAP_2017 + after_s + 0.005,
                   lan_round_id="r", lan_server=LAN, hub_node=HUB_NODE, hub_latest=hub_latest,
                   now=LEAP_2017 + after_s + 0.5, max_drift_ppm=15.0, stale_after_s=360.0,
                   leap_seconds=leap_seconds, stepping=stepping)


def test_a_leg_is_never_used_across_a_leap_second():
    """Neither clock steps with UTC (chronyd -x serves the head's clock as it is): a leg measured before the leap
    is a whole second wrong after it.  Known from the list, or from the hub's own leap indicator."""
    for why in (_across_the_leap(leap_seconds=(LEAP_2017,), hub_leap=0), _across_the_leap(hub_leap=1),
                _across_the_leap(hub_leap=2)):
        assert isinstance(why, str) and "leap second" in why
    # No leap known, or both samples on one side of it, or a smeared timescale (continuous): used.
    assert isinstance(_across_the_leap(hub_leap=0), Composed)
    assert isinstance(_across_the_leap(leap_seconds=(LEAP_2017 - 86400 * 180,), hub_leap=0), Composed)
    assert isinstance(_across_the_leap(leap_seconds=(LEAP_2017,), stepping=False), Composed)
    assert isinstance(_across_the_leap(leap_seconds=(LEAP_2017,), after_s=-10.0, hub_leap=0), Composed)


def test_near_a_leap_a_smearing_hub_leaves_its_nodes_lan_server_in_its_timescale(tmp_path):
    """leap_timescale smear: the hub's LAN server is the smeared timescale the hub node selects, never set
    apart as a stepping server (every node would publish nothing for a day)."""
    leaps = tmp_path / "leap-seconds.list"
    ntp_1900 = 2208988800
    leaps.write_text(f"#@\t{int(LEAP_2017 + 86400 * 100 + ntp_1900)}\n"
                     f"{int(LEAP_2017 - 86400 * 184 + ntp_1900)}\t36\n{int(LEAP_2017 + ntp_1900)}\t37\n")
    for timescale in ("smear", "step"):
        config = _config(HUB, leap_timescale=timescale, leap_seconds_file=str(leaps))
        assert config.for_node("n1").ntp.smearing_servers == ((LAN,) if timescale == "smear" else ())
        meta = RoundMeta.for_round(config, round_id="r1", node="n1", dispatched_at=LEAP_2017 - 3600.0,
                                   deadline_at=LEAP_2017 - 3590.0)
        hub_latest = _latest(offset=0.0, uncertainty=0.02, measured_at=LEAP_2017 - 3630.0,
                             published_at=LEAP_2017 - 3629.5)
        record = build_record(meta, [_lan_ok(measured_at=LEAP_2017 - 3599.9)], finished_at=LEAP_2017 - 3599.5,
                              hub_latest=hub_latest)
        assert record["quality"] == "strict" and record["latest"] is not None, (timescale, record["servers"])
