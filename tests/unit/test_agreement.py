"""The agreement (falsetickers, groups, the published bound) and combining: pure logic, against a brute force."""

import random

import pytest

from orchestrator import selection
from orchestrator.outcomes import Quality
from workers.contracts import Selection
from workers.quality import Thresholds

from .samples import ok

LOOSE = Thresholds(max_delay_s=1.0, max_uncertainty_s=1.0, min_stratum=1, max_stratum=15)


def honest(name, offset=0.0, delay=0.030):
    return ok(name, delay=delay, unc=delay / 2 + 0.001, offset=offset)


def test_the_liar_with_the_lowest_delay_is_a_falseticker():
    liar = ok("liar", delay=0.002, unc=0.0015, offset=0.5)
    outcomes = [honest(f"h{i}", offset=0.001 * i, delay=0.020 + 0.005 * i) for i in range(4)] + [liar]
    result = selection.select(outcomes, LOOSE, enable_fallback=True, method=Selection.BEST)
    agreement = result["agreement"]
    assert agreement["majority"] and agreement["falsetickers"] == ["liar"] and agreement["needed"] == 3
    low, high = agreement["interval"]
    chosen = result["chosen"]
    # Published: the truechimer whose bound, widened to cover the agreed interval, is smallest.
    samples = [o["sample"] for o in outcomes[:4]]
    assert chosen["uncertainty_s"] == min(selection.covering_uncertainty(x, [low, high]) for x in samples)
    assert chosen["offset_s"] - chosen["uncertainty_s"] <= low and chosen["offset_s"] + chosen["uncertainty_s"] >= high
    assert chosen["sample_uncertainty_s"] <= chosen["uncertainty_s"]
    statuses = {s["server"]: s["status"] for s in result["servers"]}
    assert statuses["liar"] == "falseticker"


def test_an_ambiguous_agreement_never_publishes_the_liar_confidently():
    """The issue's case: a wide honest server overlaps an honest one and a quick liar that do not overlap."""
    truth = -0.005
    wide = ok("wide", delay=0.020, unc=0.010, offset=0.0)        # [-10, +10] ms: honest
    honest_ = ok("honest", delay=0.006, unc=0.003, offset=-0.005)  # [-8, -2] ms: honest
    liar = ok("liar", delay=0.002, unc=0.001, offset=0.004)        # [+3, +5] ms: the tightest, and wrong
    result = selection.select([wide, honest_, liar], LOOSE, enable_fallback=True, method=Selection.BEST)
    agreement = result["agreement"]
    assert agreement["ambiguous"] and agreement["deepest"] == [[pytest.approx(-0.008), pytest.approx(-0.002)],
                                                               [pytest.approx(0.003), pytest.approx(0.005)]]
    chosen = result["chosen"]
    assert abs(chosen["offset_s"] - truth) <= chosen["uncertainty_s"]  # the published bound holds the truth
    assert chosen["server"] != "liar"  # the liar's bound, widened to the agreed interval, is the widest
    assert chosen["uncertainty_s"] == pytest.approx(0.010)


def test_no_majority_publishes_nothing():
    result = selection.select([ok("a", delay=0.01, unc=0.005, offset=0.0), ok("b", delay=0.01, unc=0.005, offset=0.1)],
                              LOOSE, enable_fallback=True, method=Selection.BEST)
    assert result["quality"] == Quality.STARVATION and result["chosen"] is None
    assert result["agreement"]["majority"] is False
    assert all(s["status"] == "falseticker" for s in result["servers"])


def test_a_correlated_group_votes_once():
    smeared = [ok(f"g{i}", delay=0.004, unc=0.003, offset=0.4) for i in range(3)]
    others = [honest("cloudflare"), honest("nist", offset=0.002)]
    without = selection.select(smeared + others, LOOSE, enable_fallback=True, method=Selection.BEST)
    assert without["chosen"]["server"].startswith("g")  # three agreeing votes outvote two
    grouped = selection.select(smeared + others, LOOSE, enable_fallback=True, groups=[["g0", "g1", "g2"]],
                               method=Selection.BEST)
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
    far = ok("far", delay=0.1, unc=0.016, offset=0.012)  # over 3x the tightest's uncertainty: not combined
    result = selection.select([a, b, far], LOOSE, enable_fallback=True, method=Selection.COMBINE)
    chosen = result["chosen"]
    assert chosen["combined"] == ["a", "b"] and result["servers_combined"] == 2
    assert chosen["offset_s"] == pytest.approx((0.010 / 0.005 + 0.013 / 0.010) / (1 / 0.005 + 1 / 0.010))
    assert chosen["sample_uncertainty_s"] == pytest.approx(2 / (1 / 0.005 + 1 / 0.010))
    assert chosen["uncertainty_s"] == pytest.approx(
        selection.covering_uncertainty({**chosen, "uncertainty_s": chosen["sample_uncertainty_s"]},
                                       result["agreement"]["interval"]))
    statuses = {s["server"]: s["status"] for s in result["servers"]}
    assert statuses == {"a": "chosen", "b": "combined", "far": "accepted"}


def test_the_combined_bound_holds_for_any_errors_within_each_members_bound():
    """Inject errors: each member off by anything within its own bound; the combination stays within its own."""
    rng = random.Random(5)
    worst = 0.0
    for _ in range(2000):
        truth = rng.uniform(-1, 1)
        samples = []
        for i in range(rng.randint(2, 6)):
            unc = rng.uniform(1e-4, 0.05)
            error = rng.choice([-1, 1, rng.uniform(-1, 1)]) * unc  # often at the very edge of the bound
            samples.append(ok(f"s{i}", delay=2 * unc, unc=unc, offset=truth + error)["sample"])
        combined = selection.combine(samples)
        ratio = abs(combined["offset_s"] - truth) / combined["uncertainty_s"]
        assert ratio <= 1 + 1e-9
        worst = max(worst, ratio)
    assert worst > 0.999  # the errors reach the bound: any tighter bound would fail this test


def test_combine_of_one_is_that_one():
    result = selection.select([honest("only")], LOOSE, enable_fallback=True, method=Selection.COMBINE)
    assert result["chosen"]["server"] == "only" and result["chosen"]["combined"] == ["only"]


# -- the agreement against a brute-force reference (chrony's test/unit/sources.c runs 1,000 random sets) --

def _reference(voters: list[dict]) -> tuple[int, list[float] | None, int]:
    """(needed, agreed interval, greatest depth) by counting every interval at every endpoint."""
    needed = len(voters) // 2 + 1
    points = sorted({v["offset_s"] + sign * v["uncertainty_s"] for v in voters for sign in (-1, 1)})

    def cover(x):
        return sum(v["offset_s"] - v["uncertainty_s"] <= x <= v["offset_s"] + v["uncertainty_s"] for v in voters)

    covered = [x for x in points if cover(x) >= needed]
    depth = max(cover(x) for x in points)
    return needed, ([covered[0], covered[-1]] if covered else None), depth


def _random_round(rng: random.Random):
    """Servers, some honest (their interval holds the truth), some lying; sometimes a correlated group."""
    truth = rng.uniform(-0.05, 0.05)
    n = rng.randint(1, 9)
    outcomes = []
    for i in range(n):
        unc = rng.choice([rng.uniform(1e-4, 0.002), rng.uniform(0.001, 0.03)])
        if rng.random() < 0.6:
            offset = truth + rng.uniform(-1, 1) * unc  # honest
        else:
            offset = truth + rng.choice([-1, 1]) * rng.uniform(0, 0.05)  # a liar, maybe consistent with others
        # Coarse grids make ties and touching intervals common.
        offset, unc = round(offset, 3), max(0.0005, round(unc, 3))
        outcomes.append(ok(f"s{i}", delay=rng.uniform(0.001, 0.2), unc=unc, offset=offset,
                           stratum=rng.randint(1, 3)))
    groups = None
    if n >= 4 and rng.random() < 0.3:
        groups = [[f"s{i}" for i in rng.sample(range(n), rng.randint(2, 3))]]
    return truth, outcomes, groups


def _voters(samples, groups):
    group_of = {server: i for i, members in enumerate(groups or []) for server in members}
    voters = {}
    for s in samples:
        key = ("g", group_of[s["server"]]) if s["server"] in group_of else s["server"]
        if key not in voters or s["uncertainty_s"] < voters[key]["uncertainty_s"]:
            voters[key] = s
    return list(voters.values())


def test_agreement_and_choice_match_a_brute_force_reference_on_random_sets():
    rng = random.Random(20261129)
    published = majority_honest = ambiguous = 0
    gate = Thresholds(max_delay_s=0.1, max_uncertainty_s=0.02, min_stratum=1, max_stratum=2)
    for _ in range(3000):
        truth, outcomes, groups = _random_round(rng)
        samples = [o["sample"] for o in outcomes]
        voters = _voters(samples, groups)
        needed, interval, depth = _reference(voters)
        agreement = selection.intersect(samples, groups)
        assert agreement["votes"] == len(voters) and agreement["needed"] == needed and agreement["depth"] == depth
        assert agreement["majority"] == (interval is not None)
        ambiguous += agreement["ambiguous"]
        if interval is None:
            assert agreement["interval"] is None and agreement["truechimers"] == []
        else:
            assert agreement["interval"] == pytest.approx(interval, abs=1e-12)
            meets = {s["server"] for s in samples if s["offset_s"] - s["uncertainty_s"] <= interval[1]
                     and s["offset_s"] + s["uncertainty_s"] >= interval[0]}
            assert set(agreement["truechimers"]) == meets
            assert set(agreement["falsetickers"]) == {s["server"] for s in samples} - meets

        for method in (Selection.BEST, Selection.COMBINE):
            result = selection.select(outcomes, gate, enable_fallback=True, method=method, groups=groups)
            chosen = result["chosen"]
            honest = sum(abs(v["offset_s"] - truth) <= v["uncertainty_s"] for v in voters)
            if chosen is None:
                continue
            published += 1
            low, high = agreement["interval"]
            # Whatever is published covers the agreed interval, so it holds the truth whenever a majority
            # of the votes is honest -- ambiguous agreement or not.
            assert chosen["offset_s"] - chosen["uncertainty_s"] <= low + 1e-12
            assert chosen["offset_s"] + chosen["uncertainty_s"] >= high - 1e-12
            if honest >= needed:
                majority_honest += 1
                assert abs(chosen["offset_s"] - truth) <= chosen["uncertainty_s"] + 1e-12
            # A label is honest: what is published is within the uncertainty of the gate it is labelled with.
            labelled = gate if result["quality"] == Quality.STRICT else gate.relaxed()
            assert chosen["uncertainty_s"] <= labelled.max_uncertainty_s + 1e-12
            if method == Selection.BEST:
                for strictness in (gate, gate.relaxed()):
                    passing = [s for s in samples if s["server"] in agreement["truechimers"]
                               and not strictness.violations(s)
                               and selection.covering_uncertainty(s, [low, high]) <= strictness.max_uncertainty_s]
                    if passing:
                        break
                expected = min(passing, key=lambda s: (selection.covering_uncertainty(s, [low, high]),
                                                       *selection.best_key(s)))
                assert chosen["server"] == expected["server"]
                assert result["quality"] == (Quality.STRICT if strictness is gate else Quality.RELAXED)
    # The sets really exercise the cases that matter.
    assert published > 1000 and majority_honest > 1000 and ambiguous > 50
