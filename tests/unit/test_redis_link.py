"""workers.redisurl's settings for a link to Redis that can die silently, and its once-per-outage log.

The behaviour itself -- a worker, the beat and an exporter back within 10 s
of a link that was down a minute -- is tests/cluster/test_partition.py's,
on a cluster of network namespaces.
"""

import logging
import socket

import kombu.exceptions
import redis

from workers import redisurl

URL = "redis://:pw@10.0.0.1:6379/0"


def test_every_tcp_connection_is_declared_dead_by_the_kernel_within_seconds():
    settings = redisurl.socket_settings(URL)
    assert settings["socket_keepalive"] is True
    options = settings["socket_keepalive_options"]
    assert options[socket.TCP_KEEPIDLE] == redisurl.KEEPALIVE_IDLE_S
    assert options[socket.TCP_KEEPINTVL] == redisurl.KEEPALIVE_INTERVAL_S
    assert options[socket.TCP_KEEPCNT] == redisurl.KEEPALIVE_PROBES
    assert options[socket.TCP_USER_TIMEOUT] == redisurl.DEAD_AFTER_S * 1000  # milliseconds
    assert settings["socket_connect_timeout"] == redisurl.CONNECT_TIMEOUT_S
    assert settings["socket_timeout"] == redisurl.DEFAULT_TIMEOUT_S
    client = redisurl.connect(URL)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_keepalive_options"] == options
    assert kwargs["health_check_interval"] == redisurl.HEALTH_CHECK_INTERVAL_S


def test_a_unix_socket_gets_only_a_timeout():
    assert redisurl.socket_settings("unix:///run/redis.sock") == {"socket_timeout": redisurl.DEFAULT_TIMEOUT_S}
    redisurl.connect("unix:///run/redis.sock")  # redis-py refuses keepalive options there: none given
    assert "redis_socket_keepalive" not in redisurl.celery_settings("unix:///run/redis.sock")


def test_celery_gets_the_same_settings_for_its_broker_and_backend():
    from workers.app import app

    conf = app.conf
    for key, value in redisurl.socket_settings(str(conf.broker_url)).items():
        assert conf.broker_transport_options[key] == value
    assert conf.broker_transport_options["health_check_interval"] == redisurl.HEALTH_CHECK_INTERVAL_S
    assert conf.redis_socket_timeout == redisurl.DEFAULT_TIMEOUT_S
    assert conf.redis_socket_connect_timeout == redisurl.CONNECT_TIMEOUT_S
    assert conf.redis_socket_keepalive is True
    assert conf.redis_backend_health_check_interval == redisurl.HEALTH_CHECK_INTERVAL_S
    assert conf.broker_connection_retry and conf.broker_connection_max_retries is None
    assert conf.worker_consumer == "workers.app:Consumer"


def test_the_worker_sends_its_event_heartbeat_without_retrying_in_its_event_loop():
    from workers.app import Consumer

    steps = Consumer.Blueprint.default_steps
    assert "celery.worker.consumer.heart:Heart" not in steps
    assert "workers.app:_EventHeartbeatStep" in steps


def test_an_outage_is_two_lines_however_many_attempts(caplog):
    outages = redisurl.Outages(logging.getLogger("test.outages"))
    caplog.set_level(logging.INFO, logger="test.outages")
    assert not outages.lost(redis.ConnectionError("before watching"))  # inert: one-shot commands say it themselves
    outages.watch(URL)
    assert not outages.back()  # nothing was lost
    assert outages.lost(redis.ConnectionError("Network is unreachable"))
    for _ in range(50):
        assert not outages.lost(redis.TimeoutError("Timeout connecting to server"))
    assert outages.down
    assert outages.back()
    assert not outages.back()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("[REDIS] lost redis://:***@10.0.0.1:6379/0 (ConnectionError: Network is unreachable)")
    assert lines[1].startswith("[REDIS] back: ")
    assert "pw" not in " ".join(lines)


def test_a_pass_that_cannot_reach_redis_is_absorbed_into_the_one_loss(caplog):
    log = logging.getLogger("test.absorbed")
    outages = redisurl.Outages(logging.getLogger("test.outages2"))
    outages.absorb(log)
    caplog.set_level(logging.INFO)
    lost = kombu.exceptions.OperationalError("Error 101")
    lost.__cause__ = redis.ConnectionError("Error 101 connecting")
    log.error("[ROUND] n1: could not dispatch (%s: %s)", type(lost).__name__, lost)
    assert len(caplog.records) == 1  # not watching: logged as it was
    outages.watch(URL)
    caplog.clear()
    for _ in range(3):
        log.error("[ROUND] n1: could not dispatch (%s: %s)", type(lost).__name__, lost)
        log.error("[WARM-UP] cannot read (%s: %s)", "TimeoutError", redis.TimeoutError("Timeout reading"))
    log.error("[ROUND] n1: refused (%s)", redis.ResponseError("OOM command not allowed"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("[REDIS] lost ") and "refused" in messages[1]


def test_errors_that_are_not_about_reaching_redis_are_not_a_loss():
    assert redisurl.is_connection_error(redis.ConnectionError())
    assert redisurl.is_connection_error(redis.TimeoutError())
    assert not redisurl.is_connection_error(redis.ResponseError("NOSCRIPT"))
    assert not redisurl.is_connection_error(ValueError())
