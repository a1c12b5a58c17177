"""relay.counts: a relay's counts written to one hash per port and read back for the exporter, with each
report's age from its TTL (Redis' clock) and gone relays pruned -- on a Redis in memory
(:mod:`tests.unit.memory_redis`).

A running relay reporting to a real Redis: tests/integration/test_relay.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from relay import counts
from relay.stats import COUNTERS, PortStats
from workers.keys import Keys

from .memory_redis import MemoryRedis

SEED = 20270309


def _stats(rng: random.Random, port: int) -> PortStats:
    stats = PortStats(port=port, upstream=f"time{port}.example:123")
    for name in COUNTERS:
        setattr(stats, name, rng.randint(0, 10_000))
    for _ in range(rng.choice([0, 5, 50])):
        stats.add_delay(rng.uniform(1e-5, 1e-2))
    return stats


def test_the_keys_are_the_services_names():
    assert counts.port_key("t", "head", 8123) == Keys("t").relay_port("head", 8123) == "t:relay:head:8123"
    assert counts.index_key("t") == Keys("t").relays() == "t:relays"


def test_random_reports_read_back_as_written_with_their_age_from_redis_clock(monkeypatch):
    """The oracle: every port's last snapshot, field by field as text (``None`` as empty), with the relay's
    name and write time; ``report_age_s`` the time since that write on Redis' clock; a relay silent for longer
    than :data:`counts.REPORT_TTL_S` gone, and taken out of the index."""
    rng = random.Random(SEED)
    for case in range(40):
        client = MemoryRedis(now=1_000_000.0)
        relay_clock = SimpleNamespace(time=lambda: 5.0)  # the relay's own clock: not what the age is read on
        monkeypatch.setattr(counts, "time", relay_clock)
        last: dict[str, tuple[float, dict, str]] = {}
        relays = [counts.RedisReport(client, prefix="t", name=name) for name in ("head", "edge")]
        for _ in range(rng.randint(0, 8)):
            client.now += rng.uniform(0.0, counts.REPORT_TTL_S / 3)
            relay = rng.choice(relays)
            snapshots = [_stats(rng, port).snapshot() for port in rng.sample(range(8123, 8128), rng.randint(1, 3))]
            relay(snapshots)
            for snap in snapshots:
                last[counts.port_key("t", relay.name, snap["port"])] = (client.now, snap, relay.name)
        client.now += rng.uniform(0.0, counts.REPORT_TTL_S)
        read = counts.read_all(client, "t")
        live = {k: v for k, v in last.items() if client.now - v[0] < counts.REPORT_TTL_S}
        assert len(read) == len(live), case
        for report, key in zip(read, sorted(live), strict=True):
            written_at, snap, name = live[key]
            expected = {k: "" if v is None else str(v) for k, v in snap.items()}
            assert {k: v for k, v in report.items() if k in snap} == expected, case
            assert (report["relay"], report["updated_at"]) == (name, "5.0")
            assert report["report_age_s"] == pytest.approx(client.now - written_at, abs=1e-3), case
        assert client.smembers(counts.index_key("t")) == set(live), "the gone are pruned"


def test_one_round_trip_writes_every_port_and_nothing_to_read_is_one_round_trip():
    client = MemoryRedis()
    assert counts.read_all(client, "t") == [] and client.round_trips == 1
    rng = random.Random(SEED + 1)
    counts.RedisReport(client, prefix="t", name="head")([_stats(rng, p).snapshot() for p in range(8123, 8133)])
    assert client.round_trips == 2
    assert client.pttl(counts.port_key("t", "head", 8123)) == counts.REPORT_TTL_S * 1000
    before = client.round_trips
    assert len(counts.read_all(client, "t")) == 10 and client.round_trips - before == 2  # SMEMBERS, a pipeline


def test_a_report_without_a_ttl_has_no_age():
    client = MemoryRedis()
    client.hset("t:relay:old:8123", mapping={"port": 8123, "relay": "old"})
    client.sadd(counts.index_key("t"), "t:relay:old:8123")
    (report,) = counts.read_all(client, "t")
    assert "report_age_s" not in report and report["relay"] == "old"
