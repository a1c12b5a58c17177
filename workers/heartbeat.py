"""A worker says it is alive, per queue, in Redis: ``measure`` checks in one round trip.

Asking the workers over the broker (``inspect().active_queues()``) always
waits out its whole timeout, since nobody knows how many will answer.
Instead each worker keeps, for every queue it consumes:

``chronotick-ntp:worker:<queue>:<hostname>``
    A key that lives :data:`HEARTBEAT_TTL_S`, renewed every
    :data:`HEARTBEAT_INTERVAL_S` while the worker runs and deleted when it
    stops.  Redis expires it, so no two hosts' clocks are compared.
``chronotick-ntp:workers:<queue>``
    The set of host names that ever beat there; members whose key has
    expired are dropped by the reader.

The names follow the queues (``ntp.<node>``), which no key prefix separates
either.  Every process that imports :mod:`workers.app` -- ``chronotick-ntp
worker`` or a plain ``celery -A workers.app worker`` -- beats.
"""

from __future__ import annotations

import logging
import threading

import redis
from celery import signals

from . import redisurl

log = logging.getLogger(__name__)

#: How often a worker renews its heartbeat (s).  Every node's worker does, so
#: this is a fixed load on the central Redis: two commands per node per interval.
HEARTBEAT_INTERVAL_S = 5.0

#: How long a heartbeat outlives its last renewal (s): three missed renewals.
HEARTBEAT_TTL_S = 15

#: Key names' first part.
NAMESPACE = "chronotick-ntp"


def worker_key(queue: str, hostname: str) -> str:
    return f"{NAMESPACE}:worker:{queue}:{hostname}"


def index_key(queue: str) -> str:
    return f"{NAMESPACE}:workers:{queue}"


def beat(client: redis.Redis, hostname: str, queues: list[str]) -> None:
    """Say once that ``hostname`` consumes ``queues``."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.set(worker_key(queue, hostname), "1", ex=HEARTBEAT_TTL_S)
        pipe.sadd(index_key(queue), hostname)
    pipe.execute()


def live_workers(client: redis.Redis, queue: str) -> list[str]:
    """Host names of the workers whose heartbeat on ``queue`` has not expired."""
    members = sorted(m.decode() if isinstance(m, bytes) else m for m in client.smembers(index_key(queue)))
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for hostname in members:
        pipe.exists(worker_key(queue, hostname))
    alive = pipe.execute()
    gone = [h for h, ok in zip(members, alive, strict=True) if not ok]
    if gone:
        client.srem(index_key(queue), *gone)
    return [h for h, ok in zip(members, alive, strict=True) if ok]


class Heartbeat:
    """The background thread of one worker process."""

    def __init__(self, client: redis.Redis, hostname: str, queues: list[str]):
        self.client = client
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
                beat(self.client, self.hostname, self.queues)
            except redis.RedisError as exc:  # Redis down: the worker waits for it anyway
                log.debug("heartbeat not written (%s)", exc)
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_INTERVAL_S + 1)
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.delete(worker_key(queue, self.hostname))
                pipe.srem(index_key(queue), self.hostname)
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
    _running.append(Heartbeat(client, sender.hostname, queues).start())


@signals.worker_shutdown.connect
def _stop(**_):
    while _running:
        _running.pop().stop()
