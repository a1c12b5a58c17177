"""A worker says it is alive, per queue, in Redis: ``measure`` checks in one round trip.

Asking the workers over the broker (``inspect().active_queues()``) always
waits out its whole timeout, since nobody knows how many will answer.
Instead each worker keeps, for every queue it consumes:

``<prefix>:worker:<queue>:<hostname>``
    A key that lives :data:`HEARTBEAT_TTL_S`, renewed every
    :data:`HEARTBEAT_INTERVAL_S` while the worker runs and deleted when it
    stops.  Redis expires it, so no two hosts' clocks are compared.
``<prefix>:workers:<queue>``
    The set of host names that ever beat there; members whose key has
    expired are dropped by the reader.

``<prefix>`` is the worker's own ``ntp_service.key_prefix`` (from
``$CHRONOTICK_CONFIG``, else the default): the names come from
:class:`workers.keys.Keys`.  A worker still takes rounds of any prefix from
its queue; one whose prefix differs from the reader's is found by the
broadcast instead (:func:`workers.app.workers_for_queue`).  Every process that
imports :mod:`workers.app` -- ``chronotick-ntp worker`` or a plain ``celery -A
workers.app worker`` -- beats.
"""

from __future__ import annotations

import logging
import threading
from typing import cast

import redis
from celery import signals

from . import redisurl
from .keys import Keys

log = logging.getLogger(__name__)

#: How often a worker renews its heartbeat (s).  Every node's worker does, so
#: this is a fixed load on the central Redis: two commands per node per interval.
HEARTBEAT_INTERVAL_S = 5.0

#: How long a heartbeat outlives its last renewal (s): three missed renewals.
HEARTBEAT_TTL_S = 15

def beat(client: redis.Redis, keys: Keys, hostname: str, queues: list[str]) -> None:
    """Say once that ``hostname`` consumes ``queues``."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.set(keys.worker(queue, hostname), "1", ex=HEARTBEAT_TTL_S)
        pipe.sadd(keys.workers(queue), hostname)
    pipe.execute()


def live_workers(client: redis.Redis, keys: Keys, queue: str) -> list[str]:
    """Host names of the workers whose heartbeat on ``queue`` has not expired (``client``: text replies,
    :func:`workers.redisurl.connect`)."""
    members = sorted(cast(set[str], client.smembers(keys.workers(queue))))  # text: redisurl.connect
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for hostname in members:
        pipe.exists(keys.worker(queue, hostname))
    alive = pipe.execute()
    gone = [h for h, ok in zip(members, alive, strict=True) if not ok]
    if gone:
        client.srem(keys.workers(queue), *gone)
    return [h for h, ok in zip(members, alive, strict=True) if ok]


class Heartbeat:
    """The background thread of one worker process."""

    def __init__(self, client: redis.Redis, keys: Keys, hostname: str, queues: list[str]):
        self.client = client
        self.keys = keys
        self.hostname = hostname
        self.queues = queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chronotick-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(self.client, self.keys, self.hostname, self.queues)
            except redis.RedisError as exc:  # Redis down: the worker waits for it anyway
                log.debug("heartbeat not written (%s)", exc)
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_INTERVAL_S + 1)
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.delete(self.keys.worker(queue, self.hostname))
                pipe.srem(self.keys.workers(queue), self.hostname)
            pipe.execute()
        except redis.RedisError:
            pass


_running: list[Heartbeat] = []


@signals.worker_ready.connect
def _start(sender=None, **_):
    """Start beating for the queues this worker consumes (``sender`` is its consumer)."""
    _stop()  # the consumer restarts after a lost broker connection: one thread, current queues
    queues = sorted(q.name for q in sender.task_consumer.queues)
    client = redisurl.connect(str(sender.app.conf.broker_url), sender.app.conf.chronotick_redis_master_name)
    keys = Keys(sender.app.conf.chronotick_key_prefix)
    _running.append(Heartbeat(client, keys, sender.hostname, queues).start())


@signals.worker_shutdown.connect
def _stop(**_):
    while _running:
        _running.pop().stop()
