"""workers.heartbeat: a worker's heartbeat per queue, who is alive by it, and the thread that keeps it -- on a
Redis in memory whose clock the test moves (:mod:`tests.unit.memory_redis`).

A running worker's heartbeat, as ``measure`` and the beat read it: tests/integration/test_heartbeat.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import redis

from workers import heartbeat
from workers.keys import Keys

from .memory_redis import MemoryRedis

SEED = 20270307
KEYS = Keys("t")


def test_a_beat_says_once_per_queue_that_the_host_consumes_it_in_one_round_trip():
    client = MemoryRedis()
    heartbeat.beat(client, KEYS, "n1@host", ["ntp.n1", "ntp.n2"])
    assert client.round_trips == 1
    for queue in ("ntp.n1", "ntp.n2"):
        assert client.smembers(KEYS.workers(queue)) == {"n1@host"}
        assert client.pttl(KEYS.worker(queue, "n1@host")) == heartbeat.HEARTBEAT_TTL_S * 1000


def test_the_live_workers_are_those_that_beat_within_the_ttl_on_random_histories():
    """The oracle: a host is alive while its last beat is under HEARTBEAT_TTL_S old; the others are dropped
    from the queue's set by the reader (and a host that beats again is back)."""
    rng = random.Random(SEED)
    for case in range(100):
        client = MemoryRedis(now=0.0)
        hosts = [f"w{i}@h" for i in range(rng.randint(0, 6))]
        last: dict[str, float] = {}
        for _ in range(rng.randint(0, 30)):
            client.now += rng.uniform(0.0, 10.0)
            if hosts:
                host = rng.choice(hosts)
                heartbeat.beat(client, KEYS, host, ["q"])
                last[host] = client.now
        client.now += rng.uniform(0.0, 2 * heartbeat.HEARTBEAT_TTL_S)
        alive = sorted(h for h, at in last.items() if client.now - at < heartbeat.HEARTBEAT_TTL_S)
        assert heartbeat.live_workers(client, KEYS, "q") == alive, case
        assert client.smembers(KEYS.workers("q")) == set(alive), "the expired are pruned"
        assert heartbeat.live_workers(client, KEYS, "another queue") == []


def test_no_members_is_one_round_trip_and_the_reader_writes_nothing_for_the_living():
    client = MemoryRedis()
    assert heartbeat.live_workers(client, KEYS, "q") == [] and client.round_trips == 1
    heartbeat.beat(client, KEYS, "a@h", ["q"])
    client.commands.clear()
    assert heartbeat.live_workers(client, KEYS, "q") == ["a@h"]
    assert "srem" not in client.commands


def test_the_thread_beats_at_once_and_says_goodbye_when_stopped():
    client = MemoryRedis()
    beating = heartbeat.Heartbeat(client, KEYS, "n1@host", ["ntp.n1"]).start()
    try:
        deadline = 200
        while not client.exists(KEYS.worker("ntp.n1", "n1@host")) and deadline:
            deadline -= 1
            beating._stop.wait(0.005)
        assert heartbeat.live_workers(client, KEYS, "ntp.n1") == ["n1@host"]
    finally:
        beating.stop()
    assert not beating._thread.is_alive()
    assert heartbeat.live_workers(client, KEYS, "ntp.n1") == []
    assert client.smembers(KEYS.workers("ntp.n1")) == set()


class DownRedis:
    """Every pipeline fails, as with Redis away."""

    def pipeline(self, transaction=True):
        return self

    def __getattr__(self, name):
        return lambda *a, **k: None

    def execute(self):
        raise redis.ConnectionError("Redis is away")


def test_redis_away_costs_the_thread_nothing():
    beating = heartbeat.Heartbeat(DownRedis(), KEYS, "n1@host", ["ntp.n1"]).start()
    beating._stop.wait(0.02)
    assert beating._thread.is_alive(), "a failed beat is logged and the next one tried"
    beating.stop()  # and its goodbye fails quietly
    assert not beating._thread.is_alive()


def test_the_workers_signals_keep_one_thread_for_the_current_queues(monkeypatch):
    client = MemoryRedis()
    monkeypatch.setattr(heartbeat.redisurl, "connect", lambda url, master_name: client)
    monkeypatch.setattr(heartbeat, "_running", [])

    def sender(*queues):
        conf = SimpleNamespace(broker_url="redis://127.0.0.1:1/0", chronotick_redis_master_name="mymaster",
                               chronotick_key_prefix="t")
        return SimpleNamespace(task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues]),
                               app=SimpleNamespace(conf=conf), hostname="n1@host")

    try:
        heartbeat._start(sender=sender("ntp.n2", "ntp.n1"))
        first = heartbeat._running[0]
        assert first.queues == ["ntp.n1", "ntp.n2"] and first.keys.worker("q", "h") == KEYS.worker("q", "h")
        heartbeat._start(sender=sender("ntp.n1"))  # the consumer restarted after a lost connection
        (second,) = heartbeat._running
        assert second is not first and not first._thread.is_alive() and second.queues == ["ntp.n1"]
    finally:
        heartbeat._stop()
    assert heartbeat._running == []
    assert heartbeat.live_workers(client, KEYS, "ntp.n1") == []
