"""Warm-ups bounded (issue #26 item 5): the request script against a real redis-server.

Every rule is the script's, judged on Redis' clock with the policy the leading beat published: one warm-up per
node at a time (a request joins it), none while the node is fresh, a cooldown after one, the length capped by
the service's policy (never the consumer's), an unknown node, the hub node and a missing policy refused by name.
Time is never waited for: a warm-up that "ended" or a measurement that is "old" is written with Redis' own
``TIME`` minus the age wanted.
"""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from orchestrator import scheduler
from orchestrator.reader import ClockMeasurementSource
from workers import config as config_mod
from workers import warmup
from workers.keys import Keys

from ..conftest import wait_for

NODES = ("n1", "n2", "n3", "head")
POLICY = warmup.Policy(nodes=NODES, duration_s=60.0, cooldown_s=600.0, stale_after_s=360.0, hub="head")


def _now_ms(client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
def published(redis_client, key_prefix):
    """The default policy, published under a fresh prefix: (client, prefix)."""
    warmup.publish_policy(redis_client, key_prefix, POLICY, ttl_s=60)
    return redis_client, key_prefix


def _set_latest(client, prefix: str, node: str, age_s: float, *, node_off_s: float = 0.0) -> None:
    now = _now_ms(client) / 1000
    client.set(Keys(prefix).latest(node), json.dumps({"offset": 0.001, "measured_at": now - age_s + node_off_s,
                                                      "published_at": now - age_s}))


def _ended(client, prefix: str, node: str, ago_s: float) -> None:
    """``node``'s last warm-up ended ``ago_s`` ago (on Redis' clock), and is no longer running."""
    keys = Keys(prefix)
    client.zadd(keys.warm_up_ended(), {node: _now_ms(client) - int(ago_s * 1000)})
    client.zrem(keys.warm_up(), node)


# -- no policy, unknown node, hub, disabled -------------------------------------------------------------------

def test_without_a_published_policy_every_request_is_refused_and_nothing_is_written(redis_client, key_prefix):
    answer = warmup.request(redis_client, key_prefix, "n1", 60)
    assert answer.refused and answer.reason == warmup.NO_POLICY and not answer.started
    assert "no beat has published the warm-up policy" in answer.message
    assert redis_client.keys(f"{key_prefix}:*") == []


def test_an_unknown_node_is_refused_by_name_not_started(published):
    client, prefix = published
    answer = warmup.request(client, prefix, "nl", 60)  # n1 misspelt
    assert (answer.outcome, answer.reason, answer.started) == (warmup.REFUSED, warmup.UNKNOWN_NODE, False)
    assert answer.limit == len(NODES)
    assert "'nl' is not one of the 4 node(s)" in answer.message
    assert not client.exists(Keys(prefix).warm_up())
    assert warmup.active(client, prefix) == {}


def test_the_hub_node_never_warms_up(published):
    client, prefix = published
    answer = warmup.request(client, prefix, "head")
    assert answer.reason == warmup.HUB and "hub node" in answer.message
    assert warmup.active(client, prefix) == {}


def test_a_service_length_of_zero_refuses_every_warm_up(redis_client, key_prefix):
    warmup.publish_policy(redis_client, key_prefix,
                          warmup.Policy(nodes=("n1",), duration_s=0.0, cooldown_s=600.0, stale_after_s=360.0))
    answer = warmup.request(redis_client, key_prefix, "n1", 60)
    assert answer.reason == warmup.DISABLED
    assert warmup.active(redis_client, key_prefix) == {}


# -- the length: the service's, never the consumer's ---------------------------------------------------------

@pytest.mark.parametrize("asked, granted", [(86400.0, 60.0), (None, 60.0), (5.0, 60.0), (0.001, 60.0)])
def test_the_length_is_capped_by_the_services_policy(published, asked, granted):
    client, prefix = published
    answer = warmup.request(client, prefix, "n1", asked)
    assert answer.started and answer.outcome == warmup.STARTED and answer.reason is None
    assert answer.remaining_s == pytest.approx(granted, abs=0.01)
    assert granted - 1 < warmup.active(client, prefix)["n1"] <= granted
    keys = Keys(prefix)
    assert 0 < client.pttl(keys.warm_up()) <= granted * 1000  # expires with the warm-up
    assert client.pttl(keys.warm_up_ended()) <= (granted + POLICY.cooldown_s) * 1000


def test_a_zero_length_request_is_an_error_not_a_silent_no(published):
    client, prefix = published
    with pytest.raises(ValueError, match="more than 0 s"):
        warmup.request(client, prefix, "n1", 0)


# -- one at a time: a request joins -----------------------------------------------------------------------------

def test_a_request_while_a_warm_up_runs_joins_it_and_does_not_extend_it(published):
    client, prefix = published
    first = warmup.request(client, prefix, "n1", 60)
    ends = client.zscore(Keys(prefix).warm_up(), "n1")
    second = warmup.request(client, prefix, "n1", 86400)
    assert first.started and not second.started and second.outcome == warmup.JOINED
    assert 0 < second.remaining_s <= first.remaining_s
    assert (second[0], second[1]) == (False, second.remaining_s)  # the old (started, remaining) reading
    assert client.zscore(Keys(prefix).warm_up(), "n1") == ends
    assert "joined the running warm-up of n1" in second.message


def test_a_node_that_became_fresh_during_its_warm_up_is_still_joined(published):
    client, prefix = published
    assert warmup.request(client, prefix, "n2").started
    _set_latest(client, prefix, "n2", age_s=0.5)  # the warm-up's first round
    assert warmup.request(client, prefix, "n2").outcome == warmup.JOINED


# -- fresh -----------------------------------------------------------------------------------------------------

def test_a_fresh_node_is_refused_and_a_stale_one_is_not(published):
    client, prefix = published
    _set_latest(client, prefix, "n1", age_s=10, node_off_s=-7200)  # the node's own clock 2 h behind: no matter
    refused = warmup.request(client, prefix, "n1", 60)
    assert refused.reason == warmup.FRESH
    assert refused.age_s == pytest.approx(10, abs=1) and refused.limit == 360
    assert refused.retry_in_s == pytest.approx(350, abs=1)
    assert "n1 is fresh (its latest measurement is 10 s old, stale after 360 s)" in refused.message
    _set_latest(client, prefix, "n2", age_s=361, node_off_s=7200)
    assert warmup.request(client, prefix, "n2", 60).started


def test_a_latest_without_a_readable_publish_time_is_not_fresh(published):
    client, prefix = published
    client.set(Keys(prefix).latest("n1"), "not json")
    client.set(Keys(prefix).latest("n2"), json.dumps({"offset": 0.0, "published_at": None}))
    assert warmup.request(client, prefix, "n1").started
    assert warmup.request(client, prefix, "n2").started


# -- cooldown --------------------------------------------------------------------------------------------------

def test_after_a_warm_up_ends_the_next_waits_for_the_cooldown(published):
    client, prefix = published
    assert warmup.request(client, prefix, "n1", 60).started
    client.zrem(Keys(prefix).warm_up(), "n1")  # as if it had run its 60 s (it ends 60 s from now)
    refused = warmup.request(client, prefix, "n1", 60)
    assert refused.reason == warmup.COOLDOWN
    assert refused.retry_in_s == pytest.approx(660, abs=1)  # 600 s after the end, 60 s from now
    assert refused.retry_at == pytest.approx(_now_ms(client) / 1000 + 660, abs=1)
    assert "the next may run in 660 s, at 20" in refused.message  # and the UTC time


@pytest.mark.parametrize("ended_ago_s, started", [(1, False), (599, False), (601, True)])
def test_the_cooldown_counts_from_the_last_end(published, ended_ago_s, started):
    client, prefix = published
    _ended(client, prefix, "n3", ended_ago_s)
    answer = warmup.request(client, prefix, "n3", 60)
    assert answer.started is started, answer
    if not started:
        assert answer.reason == warmup.COOLDOWN
        assert answer.retry_in_s == pytest.approx(600 - ended_ago_s, abs=1)


def test_the_cooldown_is_the_published_ones(redis_client, key_prefix):
    warmup.publish_policy(redis_client, key_prefix,
                          warmup.Policy(nodes=("n1",), duration_s=60.0, cooldown_s=30.0, stale_after_s=360.0))
    _ended(redis_client, key_prefix, "n1", 31)
    assert warmup.request(redis_client, key_prefix, "n1").started


# -- bounded keys -----------------------------------------------------------------------------------------------

def test_keys_stay_bounded_whatever_the_number_of_requests(published):
    client, prefix = published
    keys = Keys(prefix)
    for i in range(200):
        warmup.request(client, prefix, NODES[i % len(NODES)], 60)
        warmup.request(client, prefix, f"stranger{i}", 60)
    assert client.zcard(keys.warm_up()) == 3 and client.zcard(keys.warm_up_ended()) == 3  # the hub: never
    assert sorted(client.keys(f"{prefix}:*")) == sorted(
        [keys.warm_up(), keys.warm_up_ended(), keys.warm_up_policy()])
    assert all(0 < client.pttl(k) for k in (keys.warm_up(), keys.warm_up_ended(), keys.warm_up_policy()))


def test_a_node_whose_cooldown_is_over_leaves_the_cooldown_set(published):
    client, prefix = published
    _ended(client, prefix, "n1", 700)
    warmup.request(client, prefix, "n2")
    assert client.zscore(Keys(prefix).warm_up_ended(), "n1") is None


# -- the beat's side ----------------------------------------------------------------------------------------------

def test_the_leaders_poll_keeps_the_policy_alive_and_restores_it(redis_client, key_prefix, caplog):
    keys = Keys(key_prefix)
    warmup.publish_policy(redis_client, key_prefix, POLICY, ttl_s=2)
    assert warmup.request(redis_client, key_prefix, "n1").started
    assert warmup.poll(redis_client, key_prefix, POLICY, ttl_s=90).keys() == {"n1"}
    assert 60_000 < redis_client.pttl(keys.warm_up_policy()) <= 90_000
    redis_client.delete(keys.warm_up_policy())  # Redis lost it (restarted without its data, emptied)
    caplog.set_level(logging.WARNING, logger="workers.warmup")
    assert warmup.poll(redis_client, key_prefix, POLICY, ttl_s=90).keys() == {"n1"}
    assert json.loads(redis_client.get(keys.warm_up_policy()))["nodes"] == list(NODES)
    assert "published it again" in caplog.text
    assert warmup.active(redis_client, key_prefix).keys() == {"n1"}  # a reader's look renews nothing


def test_request_many_answers_each_node_in_one_round_trip(published):
    client, prefix = published
    _set_latest(client, prefix, "n2", age_s=1)
    answers = warmup.request_many(client, prefix, ["n1", "n2", "head", "zz"], 86400)
    assert {n: (a.outcome, a.reason) for n, a in answers.items()} == {
        "n1": ("started", None), "n2": ("refused", "fresh"), "head": ("refused", "hub"),
        "zz": ("refused", "unknown_node")}
    assert answers["n1"].remaining_s == pytest.approx(60, abs=0.01)


def test_the_policy_is_the_services_config():
    config = config_mod.from_mapping({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]},
                              "timing": {"warm_up": {"duration_seconds": 45, "measurement_interval": 1},
                                         "normal_operation": {"measurement_interval": 100}}},
        "ntp_service": {"nodes": ["head", "a"], "warm_up_cooldown_seconds": 900,
                        "hub": {"address": "10.0.0.1", "node": "head"}}}, environ={})
    policy = warmup.Policy.of(config, ["head", "a"])
    assert policy == warmup.Policy(nodes=("head", "a"), duration_s=45.0, cooldown_s=900.0, stale_after_s=300.0,
                                   hub="head")
    assert json.loads(policy.to_json()) == {"nodes": ["head", "a"], "hub": "head", "duration_ms": 45000,
                                            "cooldown_ms": 900000, "stale_after_ms": 300000}
    assert warmup.policy_ttl_s(config.service) == 60.0


def test_the_beats_check_asks_for_stale_nodes_but_never_the_hub(redis_url, redis_client, key_prefix):
    config = config_mod.from_mapping({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}},
        "ntp_service": {"key_prefix": key_prefix, "nodes": list(NODES),
                        "hub": {"address": "10.0.0.1", "node": "head"}}},
        environ={config_mod.ENV_REDIS_URL: redis_url})
    warmup.publish_policy(redis_client, key_prefix, POLICY)
    _set_latest(redis_client, key_prefix, "n2", age_s=1)
    assert scheduler.warm_up_nodes_without_fresh_measurement(config, list(NODES)) == ["n1", "n3"]
    assert warmup.active(redis_client, key_prefix).keys() == {"n1", "n3"}


# -- ChronoTick's drop-in: a refusal is logged, and it measures on -------------------------------------------

@pytest.mark.parametrize("node, level, words", [
    ("nl", logging.ERROR, "'nl' is not one of the 4 node(s)"),
    ("n1", logging.WARNING, "n1 is fresh"),
])
def test_a_consumer_told_no_logs_why_and_keeps_collecting(published, redis_url, tmp_path, caplog, node, level,
                                                          words):
    client, prefix = published
    _set_latest(client, prefix, "n1", age_s=5)
    path = tmp_path / "chronotick.yaml"  # ChronoTick's own: no ntp_service.nodes, a day of warm-up
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]},
                              "timing": {"warm_up": {"duration_seconds": 86400, "measurement_interval": 1}}},
        "ntp_service": {"key_prefix": prefix, "redis_url": redis_url}}))
    caplog.set_level(logging.INFO, logger="orchestrator.reader")
    source = ClockMeasurementSource(str(path), node, environ={})
    source.start_collection()
    try:
        wait_for(lambda: source.warm_up is not None, what="the service's answer")
        assert source.warm_up is not None and source.warm_up.refused
        assert [r.levelno for r in caplog.records if words in r.getMessage()] == [level], caplog.text
        assert source.collecting and source.warm_up_duration == 86400  # ChronoTick's timer reads its own
        source.get_latest_offset()
        source.get_recent_measurements(500)
    finally:
        source.stop_collection()
    assert warmup.active(client, prefix) == {}


def test_a_consumer_asking_for_a_day_gets_the_services_length(published, redis_url, tmp_path, caplog):
    client, prefix = published
    path = tmp_path / "chronotick.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]},
                              "timing": {"warm_up": {"duration_seconds": 86400, "measurement_interval": 1}}},
        "ntp_service": {"key_prefix": prefix, "redis_url": redis_url}}))
    caplog.set_level(logging.INFO, logger="orchestrator.reader")
    source = ClockMeasurementSource(str(path), "n3", environ={})
    source.start_collection()
    try:
        wait_for(lambda: source.warm_up is not None, what="the service's answer")
    finally:
        source.stop_collection()
    assert source.warm_up is not None and source.warm_up.started
    assert source.warm_up.remaining_s == pytest.approx(60, abs=0.01)
    assert 59 < warmup.active(client, prefix)["n3"] <= 60
    assert "the service's own warm_up.duration_seconds caps it" in caplog.text
