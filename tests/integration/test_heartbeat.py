"""Workers' heartbeats in Redis: there while a worker runs, gone when it stops or dies."""

import signal

import pytest
import redis

from simulator.local import stop_process
from workers import heartbeat
from workers.app import queue_for, workers_for_queue

from ..conftest import TEST_NODE, start_worker, wait_for

pytestmark = pytest.mark.integration


def test_a_running_worker_beats_on_its_queue(worker, redis_url):
    client = redis.Redis.from_url(redis_url)
    alive = heartbeat.live_workers(client, queue_for(TEST_NODE))
    assert len(alive) == 1 and alive[0].startswith(f"{TEST_NODE}@")
    assert workers_for_queue(queue_for(TEST_NODE)) == alive
    assert 0 < client.ttl(heartbeat.worker_key(queue_for(TEST_NODE), alive[0])) <= heartbeat.HEARTBEAT_TTL_S


def test_a_stopped_worker_is_gone_at_once_and_a_killed_one_after_its_ttl(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    queue = queue_for("beating")
    proc = start_worker(redis_url, "beating", tmp_path / "w1.log", concurrency=2)
    assert wait_for(lambda: heartbeat.live_workers(client, queue), what="the worker's heartbeat")
    stop_process(proc)  # SIGTERM: a warm shutdown deletes the heartbeat
    assert heartbeat.live_workers(client, queue) == []
    assert not client.smembers(heartbeat.index_key(queue))

    proc = start_worker(redis_url, "beating", tmp_path / "w2.log", concurrency=2)
    assert wait_for(lambda: heartbeat.live_workers(client, queue), what="the worker's heartbeat")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Nobody deletes it now: Redis expires it within HEARTBEAT_TTL_S of the last renewal.
    wait_for(lambda: heartbeat.live_workers(client, queue) == [], timeout_s=heartbeat.HEARTBEAT_TTL_S + 3,
             what="the dead worker's heartbeat to expire")
    assert not client.smembers(heartbeat.index_key(queue))  # and the reader pruned the index
