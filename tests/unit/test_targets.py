"""``status``'s figures (pure): every target against records built to hit or miss it."""

import random

import pytest

from orchestrator import targets
from orchestrator.targets import node_report, percentile


def record(duration_s, *, quality="strict", servers=None, finished_at=1000.0):
    servers = servers if servers is not None else [ok_server()]
    return {"round_id": f"r{random.random()}", "node": "n", "quality": quality, "duration_s": duration_s,
            "finished_at": finished_at, "servers": servers}


def ok_server(attempts=1, refused=()):
    history = [{"attempt": i + 1, "reason": r} for i, r in enumerate(refused)]
    history.append({"attempt": len(history) + 1, "reason": None})
    return {"server": "a", "status": "chosen", "attempts": len(history) if attempts == 1 else attempts,
            "history": history}


def failed_server(reason="timeout", attempts=3):
    return {"server": "b", "status": "failed", "reason": reason, "attempts": attempts,
            "history": [{"attempt": i + 1, "reason": reason} for i in range(attempts)]}


LATEST = {"measured_at": 990.0, "published_at": 990.0}


def test_percentile_is_nearest_rank_against_a_sort():
    rng = random.Random(7)
    for _ in range(1000):
        values = [rng.uniform(0, 10) for _ in range(rng.randint(1, 300))]
        q = rng.choice([50, 90, 99, 100])
        ordered = sorted(values)
        expected = ordered[max(0, -(-q * len(values) // 100) - 1)]
        assert percentile(values, q) == expected


def test_healthy_node_meets_every_target():
    records = [record(0.1 + i / 1000) for i in range(100)]
    n = node_report(records, LATEST, now=1000.0, stale_after_s=360)
    assert n["ok"] and not n["stale"] and n["rounds"] == 100
    assert n["latest_age_s"] == pytest.approx(10.0)
    assert n["targets"]["round_time_avg_s"]["value"] == pytest.approx(sum(r["duration_s"] for r in records) / 100)
    assert n["targets"]["round_time_p99_s"]["value"] == pytest.approx(0.1 + 98 / 1000)
    assert all(t["ok"] for t in n["targets"].values())


def test_each_target_misses_for_its_own_reason():
    slow = node_report([record(0.6) for _ in range(10)], LATEST, now=1000, stale_after_s=360)["targets"]
    assert not slow["round_time_avg_s"]["ok"] and slow["round_time_p99_s"]["ok"]

    spike = [record(0.1) for _ in range(98)] + [record(2.5), record(2.5)]
    t = node_report(spike, LATEST, now=1000, stale_after_s=360)["targets"]
    assert t["round_time_avg_s"]["ok"] and not t["round_time_p99_s"]["ok"]

    starved = [record(0.1) for _ in range(9)] + [record(0.1, quality="starvation", servers=[failed_server()])]
    t = node_report(starved, LATEST, now=1000, stale_after_s=360)["targets"]
    assert t["starvation_events"]["value"] == 1 and not t["starvation_events"]["ok"]

    relaxed = [record(0.1) for _ in range(8)] + [record(0.1, quality="relaxed") for _ in range(2)]
    t = node_report(relaxed, LATEST, now=1000, stale_after_s=360)["targets"]
    assert t["fallback_rate"]["value"] == pytest.approx(0.2) and not t["fallback_rate"]["ok"]

    # One server of 2 needs a retry in each round: 1 retry in 3 requests.
    retried = [record(0.1, servers=[ok_server(), ok_server(refused=["timeout"])]) for _ in range(5)]
    t = node_report(retried, LATEST, now=1000, stale_after_s=360)["targets"]
    assert t["retry_rate"]["value"] == pytest.approx(1 / 3) and not t["retry_rate"]["ok"]
    # A timeout is no reply, so nothing was refused.
    assert t["rejection_rate"]["value"] == 0 and t["rejection_rate"]["ok"]

    refused = [record(0.1, servers=[ok_server(refused=["bogus_origin"])]) for _ in range(5)]
    t = node_report(refused, LATEST, now=1000, stale_after_s=360)["targets"]
    assert t["rejection_rate"]["value"] == pytest.approx(0.5) and not t["rejection_rate"]["ok"]


def test_stale_or_silent_node_is_not_ok():
    fine = [record(0.1)]
    assert not node_report(fine, {"measured_at": 500.0, "published_at": 500.0}, now=1000, stale_after_s=360)["ok"]
    assert node_report(fine, {"measured_at": 700.0, "published_at": 700.0}, now=1000, stale_after_s=360)["ok"]
    never = node_report([], None, now=1000, stale_after_s=360)
    assert never["stale"] and never["latest_age_s"] is None and not never["ok"]
    assert never["targets"]["round_time_avg_s"] == {"value": None, "limit": 0.5, "ok": False}


def test_target_names_are_the_documented_contract():
    assert [t.name for t in targets.TARGETS] == ["round_time_avg_s", "round_time_p99_s", "starvation_events",
                                                "fallback_rate", "retry_rate", "rejection_rate"]


@pytest.mark.parametrize("skew_s", [7200.0, -7200.0])
def test_age_is_on_the_service_clock_whatever_the_nodes_clock(skew_s):
    """``now`` and ``published_at`` are Redis' clock; ``measured_at`` is the node's, here 2 h off."""
    fine = [record(0.1)]
    fresh = node_report(fine, {"measured_at": 990.0 + skew_s, "published_at": 990.0}, now=1000, stale_after_s=360)
    assert fresh["latest_age_s"] == pytest.approx(10.0) and not fresh["stale"] and fresh["ok"]
    old = node_report(fine, {"measured_at": 500.0 + skew_s, "published_at": 500.0}, now=1000, stale_after_s=360)
    assert old["latest_age_s"] == pytest.approx(500.0) and old["stale"] and not old["ok"]
    # A value with no time on the service's clock cannot be judged fresh.
    assert node_report(fine, {"measured_at": 999.0}, now=1000, stale_after_s=360)["stale"]


def test_outages_are_listed_apart_and_are_not_starvation():
    """Issue #25: rounds no server was asked in (a node cut off) counted as starvation and missed the target."""
    unasked = [dict(failed_server("no_result", 0), server=name) for name in ("a", "b")]
    outage = dict(record(10.0, quality="outage", servers=unasked, finished_at=1005.0),
                  agreement={"outage": "no server was asked (no_result x2)"})
    report = node_report([record(0.2), outage, record(0.3)], LATEST, now=1000.0, stale_after_s=360)
    assert report["counts"]["outage"] == 1 and report["counts"]["starvation"] == 0
    assert report["targets"][targets.STARVATION_EVENTS]["value"] == 0
    assert report["targets"][targets.STARVATION_EVENTS]["ok"]
    assert [o["why"] for o in report["outages"]] == ["no server was asked (no_result x2)"]
    starved = node_report([record(0.2, quality="starvation")], LATEST, now=1000.0, stale_after_s=360)
    assert starved["targets"][targets.STARVATION_EVENTS]["value"] == 1 and starved["outages"] == []
