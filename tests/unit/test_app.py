"""workers.app: a node's queue, its worker's arguments, the settings every process's Celery app gets, who
consumes a queue (heartbeats first, the broadcast only without them), and the worker's quieter logging --
on fresh Celery apps that never connect, and a Redis in memory (:mod:`tests.unit.memory_redis`).

The settings taking effect in a running worker: tests/integration (test_pipeline.py, test_heartbeat.py,
test_security.py); the Redis link's settings: tests/unit/test_redis_link.py.
"""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.worker import heartbeat as celery_heartbeat
from celery.worker.consumer import consumer as celery_consumer

from workers import app as app_mod
from workers import config as config_mod
from workers import heartbeat
from workers.keys import QUEUE_PREFIX, Keys

from .memory_redis import MemoryRedis

SEED = 20270311


def test_a_nodes_queue_is_the_prefix_and_its_name():
    assert app_mod.queue_for("n1") == QUEUE_PREFIX + "n1"


def test_random_configs_give_the_workers_arguments_one_thread_per_server_plus_two():
    """The oracle: ``--concurrency`` is the argument, else ``worker_concurrency``, else ``max_workers`` or
    the servers, plus two; the node's queue alone, named ``<node>@%h``, threads, no gossip."""
    rng = random.Random(SEED)
    for case in range(100):
        ntp = {"servers": [f"10.0.0.{i}" for i in range(1, rng.randint(2, 12))]}
        if rng.random() < 0.3:
            ntp["max_workers"] = rng.randint(1, 20)
        service = {"worker_concurrency": rng.randint(1, 50)} if rng.random() < 0.3 else {}
        config = config_mod.from_mapping({"clock_measurement": {"ntp": ntp}, "ntp_service": service}, environ={})
        given = rng.choice([None, rng.randint(1, 64)])
        events, level = rng.random() < 0.5, rng.choice(["INFO", "DEBUG"])
        argv = app_mod.worker_argv(config, "n7", concurrency=given, events=events, loglevel=level)
        expected = given or service.get("worker_concurrency") or (ntp.get("max_workers") or len(ntp["servers"])) + 2
        assert argv == ["worker", "--queues", QUEUE_PREFIX + "n7", "--hostname", "n7@%h", "--pool", "threads",
                        "--concurrency", str(expected), "--loglevel", level, "--without-gossip",
                        "--without-mingle"] + (["--task-events"] if events else []), case


@pytest.mark.parametrize("url", ["redis://:secret@10.0.0.1:6379/0",
                                 "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"])
def test_every_process_gets_json_only_and_the_same_redis_for_broker_and_backend(url):
    service = config_mod.service_from_environment({config_mod.ENV_REDIS_URL: url})
    app = Celery("test", set_as_current=False)
    app_mod.configure(app, service)
    conf = app.conf
    assert conf.broker_url == conf.result_backend == url and app_mod.redis_url_of(app) == url
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert conf.accept_content == conf.result_accept_content == ["json"], "no pickle on the broker"
    assert conf.result_expires == app_mod.RESULT_EXPIRES_S
    transport = conf.broker_transport_options
    assert transport == conf.result_backend_transport_options
    assert transport["visibility_timeout"] == app_mod.VISIBILITY_TIMEOUT_S and transport["ack_emulation"] is False
    assert ("master_name" in transport) == url.startswith("sentinel://")
    assert (conf.chronotick_key_prefix, conf.chronotick_redis_master_name) == (service.key_prefix,
                                                                               service.redis_master_name)
    assert conf.worker_consumer == "workers.app:Consumer" and conf.worker_hijack_root_logger is False


def test_the_app_registers_the_task_modules_by_name():
    app = app_mod.create_app(config_mod.service_from_environment({config_mod.ENV_REDIS_URL: "redis://127.0.0.1:1/0"}))
    assert list(app.conf.include) == list(app_mod.TASK_MODULES)
    assert "orchestrator.callback" in app_mod.TASK_MODULES, "registered by name: workers imports no orchestrator"


def test_without_a_config_file_the_app_reads_redis_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(config_mod.ENV_CONFIG, raising=False)
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, "redis://10.9.9.9:6380/2")
    assert app_mod._service_from_environment().redis_url == "redis://10.9.9.9:6380/2"
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [10.0.0.1]\n"
                    "ntp_service:\n  redis_url: redis://10.8.8.8:6379/0\n  key_prefix: fromfile\n")
    monkeypatch.setenv(config_mod.ENV_CONFIG, str(path))
    service = app_mod._service_from_environment()
    assert service.key_prefix == "fromfile"
    assert service == config_mod.load(path).service


# -- who consumes a queue ------------------------------------------------------------------------------------

class Broadcast:
    """``app.control.inspect(timeout=...).active_queues()``, recorded."""

    def __init__(self, replies):
        self.replies, self.asked = replies, []

    def inspect(self, timeout):
        self.asked.append(timeout)
        return SimpleNamespace(active_queues=lambda: self.replies)


def test_heartbeats_answer_first_and_the_broadcast_only_without_them(monkeypatch):
    client = MemoryRedis()
    monkeypatch.setattr(app_mod.redisurl, "connect", lambda url, master_name: client)
    client.close = lambda: None
    broadcast = Broadcast({"b@h": [{"name": "ntp.n1"}], "c@h": [{"name": "ntp.n2"}], "d@h": [{"name": "ntp.n1"}]})
    monkeypatch.setattr(app_mod.app, "control", broadcast)
    heartbeat.beat(client, Keys(app_mod.app.conf.chronotick_key_prefix), "a@h", ["ntp.n1"])
    assert app_mod.workers_for_queue("ntp.n1", timeout_s=0.3) == ["a@h"] and broadcast.asked == []
    assert app_mod.workers_for_queue("ntp.n1", timeout_s=0.3, key_prefix="elsewhere") == ["b@h", "d@h"]
    assert broadcast.asked == [0.3]
    broadcast.replies = None  # nobody answered
    assert app_mod.workers_for_queue("ntp.n9", timeout_s=0.1) == []


# -- the worker's logging and event heartbeat ----------------------------------------------------------------

def test_celerys_own_lost_connection_line_is_dropped_and_nothing_else():
    drop = app_mod._CeleryLossLines()

    def record(msg, args):
        return logging.LogRecord("celery", logging.WARNING, __file__, 1, msg, args, None)

    assert not drop.filter(record("%s", (celery_consumer.CONNECTION_RETRY,)))
    assert drop.filter(record("%s", ("something else",)))
    assert drop.filter(record("no args", None))


def test_per_task_lines_are_kept_for_debug_only():
    loggers = [logging.getLogger(name) for name in app_mod.PER_TASK_LOGGERS]
    root = logging.getLogger()
    saved = (root.level, [lg.level for lg in loggers])
    try:
        root.setLevel(logging.DEBUG)
        for lg in loggers:
            lg.setLevel(logging.NOTSET)
        app_mod._per_task_lines_at_debug_only()
        assert [lg.level for lg in loggers] == [logging.NOTSET] * len(loggers)
        root.setLevel(logging.INFO)
        app_mod._per_task_lines_at_debug_only()
        assert [lg.level for lg in loggers] == [logging.WARNING] * len(loggers)
    finally:
        root.setLevel(saved[0])
        for lg, level in zip(loggers, saved[1], strict=True):
            lg.setLevel(level)


def test_the_event_heartbeat_is_never_retried(monkeypatch):
    sent = []
    monkeypatch.setattr(celery_heartbeat.Heart, "_send", lambda self, event, retry=True: sent.append((event, retry)))
    beating = app_mod._EventHeartbeat.__new__(app_mod._EventHeartbeat)
    beating._send("worker-heartbeat")
    beating._send("worker-online", retry=True)
    assert sent == [("worker-heartbeat", False), ("worker-online", False)]


def test_only_celerys_heartbeat_step_is_replaced():
    ours = app_mod.Consumer.Blueprint.default_steps
    theirs = app_mod.CeleryConsumer.Blueprint.default_steps
    assert len(ours) == len(theirs)
    assert [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b] == [
        ("workers.app:_EventHeartbeatStep", "celery.worker.consumer.heart:Heart")]
