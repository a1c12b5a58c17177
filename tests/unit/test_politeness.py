"""The cluster's politeness budget per public server (issue #26): the sliding-window script on a real redis-server.

The windows are on Redis' clock (``TIME`` inside the script), so the tests never wait a minute: the minute's
budget is tested by counts (every request here is well inside the last minute), the ten minutes' with a budget
smaller than the minute's, and the windows' edges with places written at Redis' own ``TIME`` minus an age.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import uuid

import pytest

from workers import config as config_mod
from workers import measure
from workers.contracts import Reason
from workers.politeness import MINUTE_MS, TEN_MINUTES_MS, Budget, key, sent, take

SERVER = "time.example.org"
DEFAULT = Budget(12, 40)  # ntp_service.hub's defaults


def _take(client, prefix: str, requests: int = 1, budget: Budget = DEFAULT, server: str = SERVER):
    return take(client, prefix, server, requests, budget, holder=f"n:{uuid.uuid4().hex[:8]}:1")


def _now_ms(client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _place(client, prefix: str, ago_ms: int, count: int = 1, server: str = SERVER) -> None:
    """``count`` requests sent ``ago_ms`` before Redis' now, as the script writes them."""
    at = _now_ms(client) - ago_ms
    client.zadd(key(prefix, server), {f"old:{uuid.uuid4().hex[:8]}:{i}": at for i in range(count)})


def test_the_budgets_defaults_are_the_hubs():
    hub = config_mod.HubSettings()
    assert Budget(hub.max_requests_per_minute, hub.max_requests_per_10_minutes) == DEFAULT


def test_twelve_in_a_minute_are_granted_and_the_thirteenth_is_refused(redis_client, key_prefix):
    for i in range(1, 13):
        answer = _take(redis_client, key_prefix)
        assert (answer.granted, answer.in_minute, answer.in_10_minutes, answer.wait_s) == (True, i, i, 0.0)
    refused = _take(redis_client, key_prefix)
    assert not refused.granted
    assert (refused.in_minute, refused.in_10_minutes) == (12, 12)
    assert 55.0 < refused.wait_s <= 60.0  # the first of the twelve leaves the minute then
    assert redis_client.zcard(key(key_prefix, SERVER)) == 12  # the refusal took no place
    assert sent(redis_client, key_prefix, SERVER, since_s=60) == 12


def test_an_attempt_is_taken_whole_or_not_at_all(redis_client, key_prefix):
    for _ in range(10):
        assert _take(redis_client, key_prefix).granted
    burst = _take(redis_client, key_prefix, 3)  # 13 > 12: none of the three, not two of them
    assert not burst.granted and (burst.in_minute, burst.in_10_minutes) == (10, 10)
    assert redis_client.zcard(key(key_prefix, SERVER)) == 10
    answer = take(redis_client, key_prefix, SERVER, 2, DEFAULT, holder="head:r7:2")
    assert answer.granted and (answer.in_minute, answer.in_10_minutes) == (12, 12)
    members = set(redis_client.zrange(key(key_prefix, SERVER), 0, -1))
    assert {"head:r7:2:1", "head:r7:2:2"} <= members
    assert not _take(redis_client, key_prefix).granted


def test_a_burst_larger_than_what_is_left_of_either_window_is_refused_whole(redis_client, key_prefix):
    budget = Budget(per_minute=12, per_10_minutes=5)
    for _ in range(3):
        assert _take(redis_client, key_prefix, budget=budget).granted
    refused = _take(redis_client, key_prefix, 3, budget=budget)  # 6 > 5 in ten minutes; the minute has room
    assert not refused.granted and (refused.in_minute, refused.in_10_minutes) == (3, 3)
    assert redis_client.zcard(key(key_prefix, SERVER)) == 3
    assert _take(redis_client, key_prefix, 2, budget=budget).granted


def test_the_ten_minute_budget_refuses_though_the_minute_has_room(redis_client, key_prefix):
    budget = Budget(per_minute=12, per_10_minutes=5)
    for i in range(1, 6):
        assert _take(redis_client, key_prefix, budget=budget).in_10_minutes == i
    refused = _take(redis_client, key_prefix, budget=budget)
    assert not refused.granted and (refused.in_minute, refused.in_10_minutes) == (5, 5)
    assert 595.0 < refused.wait_s <= 600.0  # room when the first of the five leaves the ten minutes
    assert redis_client.zcard(key(key_prefix, SERVER)) == 5


def test_the_minute_slides_requests_older_than_a_minute_count_only_in_the_ten(redis_client, key_prefix):
    _place(redis_client, key_prefix, ago_ms=MINUTE_MS + 1_000, count=12)
    answer = _take(redis_client, key_prefix)
    assert answer.granted and (answer.in_minute, answer.in_10_minutes) == (1, 13)
    # The same history against a ten-minute budget of 13: full.
    refused = _take(redis_client, key_prefix, budget=Budget(12, 13))
    assert not refused.granted and (refused.in_minute, refused.in_10_minutes) == (1, 13)
    assert 535.0 < refused.wait_s <= 540.0  # the twelve leave the ten minutes 539 s from now


def test_the_wait_names_when_the_minute_frees_a_place(redis_client, key_prefix):
    _place(redis_client, key_prefix, ago_ms=30_000, count=12)
    refused = _take(redis_client, key_prefix)
    assert not refused.granted and refused.in_minute == 12
    assert 29.0 < refused.wait_s <= 30.0


def test_requests_older_than_ten_minutes_are_forgotten(redis_client, key_prefix):
    _place(redis_client, key_prefix, ago_ms=TEN_MINUTES_MS + 1_000, count=40)
    _place(redis_client, key_prefix, ago_ms=TEN_MINUTES_MS - 60_000, count=3)
    answer = _take(redis_client, key_prefix)
    assert answer.granted and (answer.in_minute, answer.in_10_minutes) == (1, 4)
    assert redis_client.zcard(key(key_prefix, SERVER)) == 4  # the forty are gone, not just uncounted


def test_the_window_never_holds_more_than_the_ten_minute_budget_and_expires(redis_client, key_prefix):
    """Random attempts against random small budgets: granted exactly when the whole attempt fits both windows
    (every request here is in the last minute), the set never larger than the ten-minute budget, a TTL."""
    rng = random.Random(1226)
    for case in range(30):
        server = f"s{case}.example"
        budget = Budget(rng.randint(1, 12), rng.randint(1, 40))
        held = 0
        for _ in range(rng.randint(5, 30)):
            n = rng.randint(1, 4)
            answer = _take(redis_client, key_prefix, n, budget, server=server)
            fits = held + n <= min(budget.per_minute, budget.per_10_minutes)
            assert answer.granted == fits, (budget, held, n, answer)
            held += n if fits else 0
            assert (answer.in_minute, answer.in_10_minutes) == (held, held)
            size = redis_client.zcard(key(key_prefix, server))
            assert size == held <= budget.per_10_minutes
            if held:
                assert 0 < redis_client.pttl(key(key_prefix, server)) <= TEN_MINUTES_MS
            else:  # nothing ever granted (an attempt larger than the budget): nothing written
                assert not redis_client.exists(key(key_prefix, server))


def test_concurrent_attempts_never_share_out_more_than_the_budget(redis_url, key_prefix):
    import redis

    granted = []
    barrier = threading.Barrier(24)

    def attempt():
        client = redis.Redis.from_url(redis_url)
        try:
            barrier.wait()
            granted.append(_take(client, key_prefix, 1).granted)
        finally:
            client.close()

    threads = [threading.Thread(target=attempt) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(granted) == 24 and granted.count(True) == 12


def test_each_server_has_its_own_window(redis_client, key_prefix):
    for _ in range(12):
        assert _take(redis_client, key_prefix, server="a.example").granted
    assert not _take(redis_client, key_prefix, server="a.example").granted
    assert _take(redis_client, key_prefix, server="b.example").granted
    assert _take(redis_client, f"{key_prefix}x", server="a.example").granted  # another service's prefix
    assert key(key_prefix, "a.example") == f"{key_prefix}:ntp:polite:a.example"


def test_the_refusal_names_the_server_the_counts_and_the_attempt(redis_client, key_prefix):
    for _ in range(11):
        _take(redis_client, key_prefix)
    refused = _take(redis_client, key_prefix, 3)
    text = refused.refusal(SERVER, DEFAULT, 3)
    assert text.startswith(f"the cluster's budget for {SERVER} is spent: 11 of 12 requests in the last minute, "
                           "11 of 40 in 10 minutes; 3 more would exceed it (room in ")
    assert text.endswith(" s); no request sent")


def test_a_budget_crosses_celery_as_a_pair_and_none_is_no_budget():
    assert Budget.from_job(None) is None
    assert Budget.from_job([]) is None
    assert Budget.from_job(json.loads(json.dumps(DEFAULT.as_job()))) == DEFAULT
    assert Budget.from_job([5, 7]) == Budget(5, 7)


# -- through the query task ------------------------------------------------------------------------------


@pytest.fixture
def app_on_test_redis(redis_url, monkeypatch):
    """The shared Celery app on the test's Redis for one test, then back where it was.

    ``app.backend`` is built once (per thread) from the configuration: it is cleared for the test (and put back
    after it), so that the task's ``app.backend.client`` is the test Redis'; so is the process' Redis clock
    estimate (``tasks._clock``).
    """
    from workers import tasks
    from workers.app import app, configure

    before = str(app.conf.broker_url)
    configure(app, config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}},
                                           environ={config_mod.ENV_REDIS_URL: redis_url}).service)
    monkeypatch.setattr(app, "_backend_cache", None)
    monkeypatch.delattr(app._local, "backend", raising=False)
    monkeypatch.setattr(tasks, "_clock", None)
    monkeypatch.delenv(config_mod.ENV_NODE, raising=False)
    port = app.backend.client.connection_pool.connection_kwargs["port"]
    assert f":{port}/" in redis_url or redis_url.endswith(f":{port}"), (port, redis_url)
    yield app
    if before != redis_url:
        configure(app, config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}},
                                               environ={config_mod.ENV_REDIS_URL: before}).service)


def _received(sock: socket.socket, *, within_s: float) -> int:
    """How many datagrams reach ``sock`` within ``within_s``."""
    sock.settimeout(within_s)
    count = 0
    try:
        while True:
            sock.recv(2048)
            count += 1
    except TimeoutError:
        return count


def test_a_hub_jobs_attempt_past_the_budget_fails_politeness_limit_and_sends_nothing(
        app_on_test_redis, redis_client, key_prefix):
    from workers import tasks

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a "public server" that counts, never answers
    try:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        config = config_mod.from_mapping({"clock_measurement": {"ntp": {
            "servers": [f"127.0.0.1:{port}"], "measurement_mode": "advanced", "advanced_samples": 3,
            "timeout_seconds": 0.2}}}, environ={})

        def job(round_id: str) -> dict:
            made = measure.make_job(server=config.ntp.servers[0], node="head", round_id=round_id, ntp=config.ntp,
                                    deadline_at=tasks.service_now() + 30, rate_backoff_s=0.0,
                                    key_prefix=key_prefix)
            made["retry_waits_s"] = []  # one attempt: no retry inside apply()
            made["polite"] = Budget(per_minute=4, per_10_minutes=40).as_job()
            return made

        # The first burst fits the budget: its three places are taken, and its requests go out.
        first = tasks.query_server.apply(kwargs={"job": job("r1")}).get()
        assert first["status"] == "failed" and first["reason"] == "timeout"  # asked, never answered
        assert _received(server, within_s=0.3) >= 1
        window = key(key_prefix, f"127.0.0.1:{port}")
        assert redis_client.zcard(window) == 3
        # The next burst would make six in the minute: refused whole, before any packet.
        second = tasks.query_server.apply(kwargs={"job": job("r2")}).get()
        assert second["status"] == "failed" and second["reason"] == Reason.POLITENESS_LIMIT
        assert second["attempts"] == 0 and second["history"] == []
        assert f"budget for 127.0.0.1:{port} is spent: 3 of 4 requests in the last minute" in second["detail"]
        assert second["detail"].endswith("no request sent")
        assert _received(server, within_s=0.5) == 0
        assert redis_client.zcard(window) == 3
        # A job with no budget (any node's but the hub's) is not counted.
        free = job("r3")
        del free["polite"]
        assert tasks.query_server.apply(kwargs={"job": free}).get()["reason"] == "timeout"
        assert _received(server, within_s=0.3) >= 1
        assert redis_client.zcard(window) == 3
    finally:
        server.close()


def test_the_hub_nodes_round_jobs_carry_the_budget_and_no_other_nodes_do():
    """What :func:`orchestrator.rounds.plan_round` puts in the jobs: ``polite`` only on the hub node's."""
    from orchestrator import rounds

    config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a.example", "b.example"]}},
                                      "ntp_service": {"nodes": ["head", "n1"], "hub": {
                                          "address": "10.0.0.1", "node": "head", "max_requests_per_minute": 9,
                                          "max_requests_per_10_minutes": 30}}}, environ={})
    head, _, _ = rounds.plan_round(config, "head", now=1000.0)
    assert [sig.kwargs["job"]["server"] for sig in head] == ["a.example", "b.example"]
    assert [sig.kwargs["job"]["polite"] for sig in head] == [[9, 30], [9, 30]]
    node, _, _ = rounds.plan_round(config, "n1", now=1000.0)
    assert [sig.kwargs["job"]["server"] for sig in node] == ["10.0.0.1"]
    assert all("polite" not in sig.kwargs["job"] for sig in node)
    plain = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a.example"]}}}, environ={})
    assert all("polite" not in sig.kwargs["job"] for sig in rounds.plan_round(plain, "head", now=1000.0)[0])
