"""What a worker process asks of the service by itself, through Celery's signals and its consumer.

- **At start** (Celery's ``worker_ready``): for each node whose queue it consumes and that has no fresh
  measurement, a warm-up (:func:`workers.warmup.warm_up_if_not_fresh`; the published policy decides).
- **Back on Redis after an outage** (:class:`workers.app.Consumer`): a round at once for each of its nodes
  (:func:`round_now_after_outage`; issue #25), not at the next slot an interval away.

Celery's side of :mod:`workers.warmup`, which itself imports no Celery: the reader
(:mod:`orchestrator.reader`) asks for warm-ups through it from ChronoTick's process, which loads no task
queue.  :mod:`workers.app` imports this module, so the hook is connected in every process that loads the
app: ``chronotick-ntp worker`` and a plain ``celery -A workers.app worker`` alike.  The worker's config is
the file ``$CHRONOTICK_CONFIG`` names (the ``worker`` command sets it), else the defaults.
"""

from __future__ import annotations

import logging
import os

import redis
from celery import signals

from . import config as config_mod
from . import redisurl, warmup
from .keys import QUEUE_PREFIX

log = logging.getLogger(__name__)


def _worker_config() -> config_mod.Config | None:
    path = os.environ.get(config_mod.ENV_CONFIG)
    if not path:
        return None
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:  # the CLI checked it already; a plain celery worker may not have
        log.error("[WARM-UP] %s", exc)
        return None


@signals.worker_ready.connect
def _warm_up_on_start(sender=None, **_) -> None:
    """A worker starting for node N while N has nothing fresh asks for N's warm-up.

    The node is the one of each ``ntp.<node>`` queue it consumes (not the hub
    node's: it never warms up); the key prefix and timing come from
    ``$CHRONOTICK_CONFIG`` (the ``worker`` command sets it), else the defaults.
    The service's published policy decides (:func:`workers.warmup.request`); its answer is
    logged, a refusal with its reason.
    """
    config = _worker_config()
    service = config.service if config is not None else config_mod.ServiceSettings()
    timing = config.timing if config is not None else config_mod.TimingSettings()
    hub = service.hub.node if service.hub is not None else ""
    nodes = [q.name[len(QUEUE_PREFIX):] for q in sender.task_consumer.queues
             if q.name.startswith(QUEUE_PREFIX) and q.name[len(QUEUE_PREFIX):] != hub]  # the hub never warms up
    if not nodes:
        return
    try:
        client = redisurl.connect(str(sender.app.conf.broker_url), sender.app.conf.chronotick_redis_master_name)
        try:
            for answer in warmup.warm_up_if_not_fresh(client, service.key_prefix, nodes, timing).values():
                warmup.log_answer(log, answer, f"{answer.node}: no fresh measurement; asked for a warm-up: ",
                                  granted_level=logging.WARNING)
        finally:
            client.close()
    except redis.RedisError as exc:  # Redis away: the beat's own check covers the node when it leads
        log.warning("[WARM-UP] could not ask for a warm-up (%s: %s)", type(exc).__name__, exc)


def round_now_after_outage(broker_url: str, master_name: str, queues: list[str]) -> list[str]:
    """A worker's link to Redis is back after an outage: ask a round at once for each node it serves.

    ``queues``: the queues it consumes (``ntp.<node>``).  Said once in the log; a failure to ask is
    said too (the node then waits for its next slot).  Returns the nodes asked for.
    """
    nodes = [q[len(QUEUE_PREFIX):] for q in queues if q.startswith(QUEUE_PREFIX)]
    if not nodes:
        return []
    config = _worker_config()
    prefix = (config.service if config is not None else config_mod.ServiceSettings()).key_prefix
    try:
        client = redisurl.connect(broker_url, master_name)
        try:
            warmup.ask_round_now(client, prefix, nodes)
        finally:
            client.close()
    except redis.RedisError as exc:
        log.warning("[CATCH-UP] %s: could not ask for a round at once (%s: %s); the next slot will do",
                    ", ".join(nodes), type(exc).__name__, exc)
        return []
    log.warning("[CATCH-UP] %s: back on Redis; asked the beat for a round at once", ", ".join(nodes))
    return nodes
