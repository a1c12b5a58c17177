"""The Celery application: broker, backend and the settings every process shares.

``celery -A workers.app worker ...`` works as it is: the broker comes from
``$CHRONOTICK_REDIS_URL`` or from the file named by ``$CHRONOTICK_CONFIG``.
The orchestrator's chord callback is registered through ``include`` (a name,
not an import), so a worker runs it while this package never imports the
orchestrator.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals
from celery.worker import heartbeat as celery_heartbeat
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.consumer import heart as celery_heart
from celery.worker.state import maybe_shutdown

from . import config as config_mod
from . import (
    heartbeat,  # noqa: F401  (connects the worker's heartbeat to Celery's signals)
    redisurl,
    worker_hooks,  # connects the start hook: a warm-up for a node with nothing fresh; after an outage, a round
)
from .keys import QUEUE_PREFIX, Keys

#: Task modules every worker registers.
TASK_MODULES = ("workers.tasks", "workers.chords", "orchestrator.callback")

#: Chord state only needs to outlive a round.  No task of a round stores a result
#: (the query tasks' outcomes travel in the chord's join, the callback's record is
#: in history); this expiry is the backstop for the chord's own counter (s).
RESULT_EXPIRES_S = 600

#: Redis redelivers an unacknowledged message after this long; retry
#: countdowns (seconds) stay far below it so none is delivered twice.
VISIBILITY_TIMEOUT_S = 3600


def queue_for(node: str) -> str:
    """The queue whose worker measures ``node``."""
    return QUEUE_PREFIX + node


def workers_for_queue(queue: str, *, timeout_s: float = 1.0, key_prefix: str | None = None,
                      through: Celery | None = None) -> list[str]:
    """Names of the live workers consuming ``queue``.

    Their heartbeats under ``key_prefix`` first (default: the app's; one Redis
    round trip, :mod:`workers.heartbeat`); only when none is there, the
    broadcast that waits out ``timeout_s``, for a worker that does not beat
    there (another prefix, another version, another Celery app).  ``through``:
    the app to ask with (default: this module's :data:`app`; a broadcast makes
    the app's broker pool, which then stays on that app's Redis).
    """
    asking = through or app
    client = redisurl.connect(redis_url_of(asking), asking.conf.chronotick_redis_master_name)
    try:
        alive = heartbeat.live_workers(client, Keys(key_prefix or asking.conf.chronotick_key_prefix), queue)
    finally:
        client.close()
    if alive:
        return alive
    replies = asking.control.inspect(timeout=timeout_s).active_queues() or {}
    return sorted(name for name, queues in replies.items() if any(q.get("name") == queue for q in queues))


def worker_argv(config: config_mod.Config, node: str, *, concurrency: int | None = None,
                events: bool = False, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments for ``node`` (also shown in docs/operations.md).

    Threads, one per server: each query sleeps in ``recvmsg`` for most of its
    life, so threads cost little (a prefork child is ~50 MB) and a round's
    queries all start at once; two more serve the callback and retries.
    """
    ntp = config.ntp
    default = (ntp.max_workers or len(ntp.servers)) + 2
    concurrency = concurrency or config.service.worker_concurrency or default
    argv = ["worker", "--queues", queue_for(node), "--hostname", f"{node}@%h",
            "--pool", "threads", "--concurrency", str(concurrency), "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]
    if events:
        argv.append("--task-events")
    return argv


def create_app(service: config_mod.ServiceSettings | None = None) -> Celery:
    """Build the Celery app for a Redis broker and result backend.

    Parameters
    ----------
    service:
        The resolved ``ntp_service`` settings; default: from the environment.
    """
    app = Celery("chronotick_ntp", include=list(TASK_MODULES))
    configure(app, service if service is not None else _service_from_environment())
    return app


def configure(app: Celery, service: config_mod.ServiceSettings) -> None:
    """Point ``app`` at the Redis of ``service`` (before it first connects).

    The CLI calls this after loading ``--config``, so one imported ``app`` --
    the one the tasks are registered on -- serves every command.
    """
    # A Sentinel URL (``sentinel://...;...``) needs the master's name, in both
    # option sets: Celery's result backend reads only its own.
    # No ack emulation: kombu would keep every message in an "unacked" hash (six more Redis commands a
    # message) to redeliver it after the visibility timeout -- long after the round's deadline, when
    # the worker drops it as expired anyway.  A round whose messages are lost is closed at its deadline.
    # Keepalives, timeouts and health checks (workers/redisurl.py): a cut link costs seconds, not
    # TCP's retransmission back-off, and the worker keeps reconnecting for ever.
    link = redisurl.celery_settings(service.redis_url)
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT_S, "ack_emulation": False,
                 **link.pop("broker_transport_options"),
                 **redisurl.celery_transport_options(service.redis_url, service.redis_master_name)}
    app.conf.update(
        broker_url=service.redis_url,
        result_backend=service.redis_url,
        # JSON only: a pickle on the broker would be code run by every worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=RESULT_EXPIRES_S,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        **link,
        # The worker's consumer: Celery's, reconnecting every RECONNECT_INTERVAL_S, one line a loss.
        worker_consumer=f"{__name__}:Consumer",
        # No task acknowledges late, so there is nothing to cancel when the connection is lost; set, it is
        # Celery 6's default and spares a deprecation warning on every loss.  The prefetch count is per
        # consumer on Redis, so Celery would skip its reduction after a reconnection anyway (with a line).
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_enable_prefetch_count_reduction=False,
        # A query is a few packets; results are small; nothing to track.
        task_track_started=False,
        worker_hijack_root_logger=False,
        # The Redis URL itself is broker_url, which Celery masks wherever it shows settings
        # (Flower's Config tab, inspect().conf(), celery report); no other setting holds it.
        chronotick_redis_master_name=service.redis_master_name,
        chronotick_key_prefix=service.key_prefix,
    )


def redis_url_of(app: Celery) -> str:
    """The Redis URL the app was configured with, password included: never show or log it."""
    return str(app.conf.broker_url)


class _EventHeartbeat(celery_heartbeat.Heart):
    """Celery's ``worker-heartbeat`` event (what Flower shows a worker alive by), sent once a tick.

    Celery sends it with kombu's default retry policy -- for ever, a second
    apart -- from the worker's event loop: with Redis behind a cut link the
    loop is stuck in that retry, so the worker neither notices the loss nor
    reconnects until the publish goes through (measured: 49 s after a 60 s
    cut).  Unretried, a failed heartbeat is buffered (as Celery does for
    events while offline), the loop goes on, and the broken connection is
    found and replaced.
    """

    def _send(self, event, retry=True):
        return super()._send(event, retry=False)


class _EventHeartbeatStep(celery_heart.Heart):
    """Celery's heartbeat bootstep, with :class:`_EventHeartbeat`."""

    def start(self, c):
        c.heart = _EventHeartbeat(c.timer, c.event_dispatcher, self.heartbeat_interval)
        c.heart.start()


class Consumer(CeleryConsumer):
    """Celery's consumer, which says once that it lost Redis and once that it is back.

    Celery logs a warning when the connection is lost and an error for every
    attempt to make a new one, at intervals growing to 30 s.  This one tries
    every :data:`workers.redisurl.RECONNECT_INTERVAL_S` -- so a worker takes
    rounds again within about a second of its link returning -- and reports
    through :data:`workers.redisurl.outages`: one ``[REDIS] lost`` line, one
    ``[REDIS] back`` line, whatever happens between.  Its event heartbeat is
    never retried inside the event loop (:class:`_EventHeartbeat`).
    """

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [f"{__name__}:_EventHeartbeatStep" if step == "celery.worker.consumer.heart:Heart" else step
                         for step in CeleryConsumer.Blueprint.default_steps]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        redisurl.outages.watch(redis_url_of(self.app))

    def on_connection_error_before_connected(self, exc):
        redisurl.outages.lost(exc)  # instead of Celery's error line, on every attempt

    def on_connection_error_after_connected(self, exc):
        redisurl.outages.lost(exc)
        super().on_connection_error_after_connected(exc)  # its warning is dropped (_CeleryLossLines)

    def ensure_connected(self, conn):
        if not self.app.conf.broker_connection_retry:
            return super().ensure_connected(conn)

        def failed(exc, interval):
            redisurl.outages.lost(exc)
            log.debug("Redis: %s: %s; next attempt in %g s", type(exc).__name__, exc, interval)

        conn = conn.ensure_connection(
            failed, self.app.conf.broker_connection_max_retries, interval_start=redisurl.RECONNECT_INTERVAL_S,
            interval_step=0, interval_max=redisurl.RECONNECT_INTERVAL_S, callback=maybe_shutdown)
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        if redisurl.outages.back():
            # Back after an outage: its node missed rounds and its next slot may be an interval away (issue
            # #25: published again within seconds of the link's return, not at the next 120-s slot).
            worker_hooks.round_now_after_outage(str(self.app.conf.broker_url),
                                                self.app.conf.chronotick_redis_master_name,
                                                list(self.app.amqp.queues.consume_from or {}))
        return conn


class _CeleryLossLines(logging.Filter):
    """Drops Celery's own "Connection to broker lost" warning: :class:`Consumer` logs the loss once."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and args[0] == getattr(celery_consumer, "CONNECTION_RETRY", object()))


log = logging.getLogger(__name__)
logging.getLogger(celery_consumer.__name__).addFilter(_CeleryLossLines())


#: Celery's loggers that write a line for every task received and finished.
PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


@signals.worker_ready.connect
def _per_task_lines_at_debug_only(sender=None, **_) -> None:
    """At INFO, Celery logs two lines per task -- ten servers, twenty lines a round -- with each result's repr.

    Those lines cost the worker CPU on every task; Flower and the round
    records show the same.  They stay available at ``--loglevel DEBUG``.
    """
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in PER_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _service_from_environment() -> config_mod.ServiceSettings:
    path = os.environ.get(config_mod.ENV_CONFIG)
    if path:
        return config_mod.load(path).service
    return config_mod.service_from_environment()


app = create_app()
