"""orchestrator/leader.py: one beat dispatches -- the lease in Redis, on the tests' private redis-server."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from orchestrator.leader import Lease
from simulator.processes import free_tcp_port


@pytest.fixture
def lease_key() -> str:
    return f"test-leader:{uuid.uuid4().hex[:10]}:ntp:beat"


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_one_holder_at_a_time_and_the_holder_renews(client, lease_key):
    first, second = Lease(client, lease_key, ttl_s=5.0), Lease(client, lease_key, ttl_s=5.0)
    assert first.hold(), "the first beat takes the free lease"
    assert not second.hold(), "the second stands by while it is held"
    client.pexpire(lease_key, 300)
    assert first.hold(), "the holder renews"
    assert client.pttl(lease_key) > 4000, "renewing restores the whole time to live"
    assert not second.hold(), "still held after the renewal"


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_cannot_renew_it(client, lease_key):
    first, second = Lease(client, lease_key, ttl_s=0.2), Lease(client, lease_key, ttl_s=5.0)
    assert first.hold()
    time.sleep(0.3)  # past the time to live: the holder died, hung or lost Redis
    assert second.hold(), "the standby takes over once the lease lapses"
    assert not first.hold(), "the old holder does not extend a lease another has taken since"
    assert client.get(lease_key) == second.token.encode(), "the lease names its new holder"


def test_release_frees_only_the_holders_own_lease(client, lease_key):
    first, second = Lease(client, lease_key, ttl_s=5.0), Lease(client, lease_key, ttl_s=5.0)
    assert first.hold()
    second.release()
    assert client.get(lease_key) == first.token.encode(), "a standby's release leaves the holder's lease"
    first.release()
    assert client.get(lease_key) is None, "the holder's release frees it"
    assert second.hold(), "and another beat takes it at once"


def test_without_redis_no_beat_believes_it_holds_the_lease():
    dead = redis.Redis(port=free_tcp_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    assert not Lease(dead, "test-leader:dead:ntp:beat", ttl_s=5.0).hold(), "cannot know: do not act"
