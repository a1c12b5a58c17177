"""Workers' heartbeats in Redis: there while a worker runs, gone when it stops or dies."""

import signal

import pytest

from simulator.processes import start_node_worker, stop_process
from workers import config as config_mod
from workers import heartbeat, redisurl
from workers.app import queue_for, workers_for_queue
from workers.keys import Keys

from ..conftest import TEST_NODE, start_worker, wait_for, write_config

#: The session's workers have no config file: the default prefix.
KEYS = Keys("chronotick")

pytestmark = pytest.mark.integration


def test_a_running_worker_beats_on_its_queue(worker, redis_url):
    client = redisurl.connect(redis_url)
    alive = heartbeat.live_workers(client, KEYS, queue_for(TEST_NODE))
    assert len(alive) == 1 and alive[0].startswith(f"{TEST_NODE}@")
    assert workers_for_queue(queue_for(TEST_NODE)) == alive
    assert 0 < client.ttl(KEYS.worker(queue_for(TEST_NODE), alive[0])) <= heartbeat.HEARTBEAT_TTL_S


def test_a_stopped_worker_is_gone_at_once_and_a_killed_one_after_its_ttl(redis_url, tmp_path):
    client = redisurl.connect(redis_url)
    queue = queue_for("beating")
    proc = start_worker(redis_url, "beating", tmp_path / "w1.log", concurrency=2)
    assert wait_for(lambda: heartbeat.live_workers(client, KEYS, queue), what="the worker's heartbeat")
    stop_process(proc)  # SIGTERM: a warm shutdown deletes the heartbeat
    assert heartbeat.live_workers(client, KEYS, queue) == []
    assert not client.smembers(KEYS.workers(queue))

    proc = start_worker(redis_url, "beating", tmp_path / "w2.log", concurrency=2)
    assert wait_for(lambda: heartbeat.live_workers(client, KEYS, queue), what="the worker's heartbeat")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Nobody deletes it now: Redis expires it within HEARTBEAT_TTL_S of the last renewal.
    wait_for(lambda: heartbeat.live_workers(client, KEYS, queue) == [], timeout_s=heartbeat.HEARTBEAT_TTL_S + 3,
             what="the dead worker's heartbeat to expire")
    assert not client.smembers(KEYS.workers(queue))  # and the reader pruned the index


def test_a_worker_beats_under_its_own_key_prefix_and_is_found_from_another(redis_url, tmp_path, key_prefix):
    path = write_config(tmp_path, ["127.0.0.1:9"], key_prefix=key_prefix)
    config = config_mod.load(path, environ={config_mod.ENV_REDIS_URL: redis_url})
    proc = start_node_worker(config, "prefixed", tmp_path / "w.log", environ={config_mod.ENV_REDIS_URL: redis_url})
    try:
        client = redisurl.connect(redis_url)
        queue = queue_for("prefixed")
        own = Keys(key_prefix)
        alive = heartbeat.live_workers(client, own, queue)
        assert len(alive) == 1 and client.exists(own.worker(queue, alive[0]))
        assert client.sismember(own.workers(queue), alive[0])
        assert heartbeat.live_workers(client, KEYS, queue) == []  # nothing outside its prefix
        # A reader under another prefix still finds it, by the broadcast.
        assert workers_for_queue(queue, key_prefix="elsewhere") == alive
    finally:
        stop_process(proc)
