"""A round: one query task per server for one node, joined by a chord.

Every task of node X's round goes to X's queue (``ntp.X``), callback
included: an offset describes the clock of the machine that took it, so only
X's worker may measure for X.
"""

from __future__ import annotations

import gc
import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from celery import Signature, chain, chord
from redis.client import PubSub

from orchestrator.outcomes import ClosedBy
from workers import chords, measure, politeness
from workers.app import app, queue_for, redis_url_of
from workers.config import Config
from workers.redisclock import clock_for
from workers.retry import RetryPolicy, rate_backoff_for
from workers.tasks import describe, query_server

from . import records
from .callback import complete, finish, finish_round
from .outcomes import RoundMeta
from .sources import Reach
from .store import COMPLETE, PUBLISHED, UNANSWERED_DELAY_S, Keys, Store, client_for, store_for

log = logging.getLogger(__name__)

#: Time allowed for messages to reach the worker and the callback to run,
#: on top of the query schedule itself.
DISPATCH_SLACK_S = 2.0


#: How long after its deadline a round's callback may still arrive before
#: the round is closed with what it has (s).
CLOSE_GRACE_S = 2.0

#: Celery's own expiry of a round's messages is checked on the worker's clock against a time
#: from the dispatcher's, so it is set this much past the deadline: hosts may disagree by up
#: to a day.  The deadline itself is checked on Redis' clock (:mod:`workers.redisclock`), so
#: a queued message past it is dropped at once either way; this only lets messages from an
#: outage of over a day expire unread (s).
EXPIRES_CLOCK_SLACK_S = 86_400.0


@dataclass(frozen=True)
class RoundHandle:
    """A dispatched round: its id, node, deadline (Unix s on Redis' clock), callback's task id and metadata.

    Nothing waits on Celery for it: the callback stores no result (the record
    is in history), and whoever wants the record listens to the node's round
    events (:meth:`wait`).
    """

    round_id: str
    node: str
    deadline_at: float
    callback_id: str
    meta: RoundMeta | None = None
    #: The node's round events, subscribed to before the round was sent (``dispatch(watch=True)``).
    events: PubSub | None = None

    @property
    def close_at(self) -> float:
        """When to stop waiting for the callback and close the round (Unix s on Redis' clock)."""
        return self.deadline_at + CLOSE_GRACE_S

    def reported(self) -> list[dict]:
        """The outcomes the round's query tasks have reported so far (what :func:`close` would publish)."""
        return _store(self.meta).reported_outcomes(self.node, self.round_id) if self.meta else []

    def release(self) -> None:
        """Stop listening for this round's events (it stays open in Redis for whoever finishes it)."""
        if self.events is not None:
            try:
                self.events.close()
            except Exception as exc:  # Redis away: the subscription dies with the connection
                log.debug("round %s: %s", self.round_id, exc)

    def ready(self) -> bool:
        """Whether the round is published (by the worker, its callback or a closer): its claim key, one EXISTS."""
        return self.meta is not None and _store(self.meta).round_finished(self.node, self.round_id)

    def wait(self, *, grace_s: float = CLOSE_GRACE_S, complete: bool = False) -> dict | None:
        """The round record once it is published, or ``None`` if it is not by the deadline (+ grace).

        Published: by the worker as soon as the outcomes in hand decide it
        (:mod:`orchestrator.early`), else by its callback.  ``complete``: wait
        until the late servers' outcomes are recorded too, and return the
        record with them.  The record comes whole in the node's round-events
        message (a round dispatched with ``watch`` was subscribed to them
        before it was sent, so nothing is missed); without a subscription,
        the record is read back from history.  On ``None`` the caller should
        :func:`close` the round.
        """
        assert self.meta is not None, "a round is waited for from its metadata"
        store = _store(self.meta)
        events = self.events if self.events is not None else _subscribe(store, self.node)
        clock = clock_for(store.client)
        record: dict | None = None
        try:
            if self.events is None and store.round_state(self.node, self.round_id) in (
                    {COMPLETE} if complete else {PUBLISHED, COMPLETE}):
                return self.stored_record()  # finished before this subscription: what history has
            while True:
                remaining = self.deadline_at + grace_s - clock.now()
                if remaining <= 0:
                    return None
                message = events.get_message(timeout=min(remaining, 1.0))
                if message is None:
                    continue
                event = json.loads(message["data"])
                if event.get("round_id") != self.round_id:
                    continue  # another round of this node
                if "record" in event:
                    record = event["record"]
                if event["state"] == COMPLETE and "late" in event:
                    record = record if record is not None else self.stored_record()
                    if record is not None:
                        records.with_late(record, {e["server"]: e for e in event["late"]})
                if record is not None and (event["state"] == COMPLETE or not complete):
                    return record
        finally:
            events.close()

    def stored_record(self) -> dict | None:
        """This round's record as published in the history stream (``None`` if not found)."""
        return _store(self.meta).round_record(self.node, self.round_id) if self.meta else None


def close(handle: RoundHandle) -> dict | None:
    """Finish a round whose callback never came, with whatever its tasks reported.

    A worker killed mid-round, a lost message or an expired task leaves a
    chord that will never fire; at its deadline the round is closed here from
    the outcomes its query tasks reported (servers with none are recorded as
    ``no_result``) and published like any other.  Returns the record, or
    ``None`` if the callback (or another closer) finished the round first.
    """
    assert handle.meta is not None, "a round is closed from its metadata"
    store = _store(handle.meta)
    try:
        outcomes = store.reported_outcomes(handle.node, handle.round_id)
    except Exception as exc:  # a hiccup must not stop the round being closed
        log.warning("round %s: cannot read the reported outcomes (%s)", handle.round_id, exc)
        outcomes = []
    record = finish(handle.meta, outcomes, store, closed_by=ClosedBy.DEADLINE)
    if record is None and complete(handle.meta, outcomes, store) is None:
        store.forget_open_round(handle.node, handle.round_id)  # finished by someone else meanwhile
    handle.release()
    return record


def overdue_handles(config: Config, now: float | None = None) -> list[RoundHandle]:
    """Every open round of any node under the config's prefix that is due to be closed, whoever dispatched it.

    One index read, whatever the number of nodes (:meth:`Store.overdue_open_rounds`).
    """
    store = store_for(config.service)
    handles = []
    for node, round_id, entry in store.overdue_open_rounds(clock_for(store.client).now() if now is None else now):
        if entry is None:  # finished meanwhile; only its index entry was left
            store.forget_open_round(node, round_id)
            continue
        handles.append(_handle_from_entry(node, round_id, entry))
    return handles


def _handle_from_entry(node: str, round_id: str, entry: dict) -> RoundHandle:
    meta = RoundMeta.from_dict(entry["meta"])
    return RoundHandle(round_id=round_id, node=node, deadline_at=meta.deadline_at,
                       callback_id=entry["callback_id"], meta=meta)


def _store(meta: RoundMeta) -> Store:
    return Store(client_for(redis_url_of(app), app.conf.chronotick_redis_master_name),
                 prefix=meta.key_prefix)


def new_round_id(node: str, now: float | None = None) -> str:
    """A sortable, readable id: node, UTC time, and a random suffix."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return f"{node}-{stamp}-{secrets.token_hex(3)}"


def round_budget_s(config: Config) -> float:
    """How long a round may take before it is given up on (seconds).

    Each server may use its whole retry schedule: the waits plus every
    attempt's worst case (:attr:`workers.retry.RetryPolicy.server_budget_s`).
    In sequential mode the servers take turns.
    """
    ntp = config.ntp
    servers = 1 if ntp.parallel_queries else len(ntp.servers)
    return RetryPolicy.from_settings(ntp).server_budget_s * servers + DISPATCH_SLACK_S


def build_round(config: Config, node: str, *, now: float | None = None,
                expected_delays: dict[str, float] | None = None):
    """The chord for one round of ``node`` and the metadata its callback gets.

    ``expected_delays`` (server -> seconds, from the previous round) orders the
    queries slowest first; without it they go in config order.
    """
    header, callback, meta = plan_round(config, node, now=now, expected_delays=expected_delays)
    return chord(header, callback), meta


def plan_round(config: Config, node: str, *, now: float | None = None,
               expected_delays: dict[str, float] | None = None,
               reach: dict[str, Reach] | None = None) -> tuple[list, Signature, RoundMeta]:
    """:func:`build_round`'s parts -- the header's signatures, the callback, the metadata -- without the chord.

    The dispatcher sends these itself (:mod:`workers.chords`); a ``chord``
    object would only copy every signature once more.  ``now``: Redis' clock
    (:func:`dispatch` reads it); the deadline is on it too.
    """
    config = config.for_node(node)  # through a hub, a node measures the hub's LAN server alone
    reach = reach or {}
    now = time.time() if now is None else now
    round_id = new_round_id(node, now)
    deadline_at = now + round_budget_s(config)
    queue = queue_for(node)
    rate_backoff_s = rate_backoff_for(config.timing.normal_interval_s)
    report_to = Keys(config.service.key_prefix).outcomes(node, round_id)
    jobs = [measure.make_job(server=s, node=node, round_id=round_id, ntp=config.ntp, deadline_at=deadline_at,
                             rate_backoff_s=rate_backoff_s, report_to=report_to,
                             key_prefix=config.service.key_prefix,
                             retry=not (s.name in reach and reach[s.name].unreachable))
            for s in config.ntp.servers]
    hub = config.service.hub
    if hub is not None and node == hub.node:
        # The hub node asks the public servers for the whole cluster: every request within their budget.
        budget = politeness.Budget(hub.max_requests_per_minute, hub.max_requests_per_10_minutes).as_job()
        for job in jobs:
            job["polite"] = budget
    if config.ntp.parallel_queries and expected_delays:
        # Longest first: a worker starts tasks in the order they arrive,
        # so the server that gates the round should not wait behind nine others.
        jobs.sort(key=lambda job: -expected_delays.get(job["server"], UNANSWERED_DELAY_S))
    meta = RoundMeta.for_round(config, round_id=round_id, node=node, dispatched_at=now, deadline_at=deadline_at)
    # A worker drops a query past the deadline (Redis' clock) at once, and a message from a long
    # outage unread: a worker that comes back does not replay stale rounds.
    expires = datetime.fromtimestamp(deadline_at + EXPIRES_CLOCK_SLACK_S, tz=UTC)
    if config.ntp.parallel_queries:
        header = [_query_signature(job, queue, expires) for job in jobs]
    else:
        # ChronoTick's old behaviour, kept for comparison: one server after another.
        header = [chain(*(_query_signature(job, queue, expires) for job in jobs))]
    # The callback gets a reference, not the metadata: every query message carries the callback, and
    # the round's metadata (the whole ntp section, every server's name) would make each of them grow
    # with the servers.  It waits in Redis with the open round (:func:`dispatch`).  Nobody reads the
    # callback's return value (the record is in history, Flower shows the summary): it is not stored.
    callback = finish_round.signature(args=(round_reference(meta),), queue=queue,
                                      argsrepr=f"(<{len(jobs)} outcomes>, round={round_id})",
                                      kwargsrepr="{}", ignore_result=True,
                                      expires=expires + timedelta(seconds=CLOSE_GRACE_S))
    return header, callback, meta


def _query_signature(job: dict, queue: str, expires: datetime):
    return query_server.signature(kwargs={"job": job}, queue=queue, argsrepr="()", kwargsrepr=describe(job),
                                  expires=expires)


def dispatch(config: Config, node: str, *, fan_out: bool = False, watch: bool | None = None) -> RoundHandle:
    """Send one round for ``node`` and return without waiting.

    ``fan_out``: send the round as one message that ``node``'s worker fans
    out into the chord (:func:`workers.chords.send_via_queue`): what the beat
    does, so that its cost per round does not grow with the servers.
    Otherwise every task is sent from here, a little sooner (``measure``).
    ``watch`` (default: unless ``fan_out``): subscribe to the node's round
    events first, for :meth:`RoundHandle.wait`.
    """
    store = store_for(config.service)
    # Set up before the round's clock starts: a process's first round would otherwise count, in its
    # duration, importing and building Celery's result backend (about 15 ms, once per process; the
    # chord's size is set through it) -- ``measure`` is a fresh process every time.
    app.backend  # noqa: B018
    events = _subscribe(store, node) if (not fan_out if watch is None else watch) else None
    try:
        with _no_collection():
            delays, reach = store.server_state(node)
            header, body, meta = plan_round(config, node, now=clock_for(store.client).now(),
                                            expected_delays=delays, reach=reach)
            sent = chords.freeze(body)
            handle = RoundHandle(round_id=meta.round_id, node=node, deadline_at=meta.deadline_at,
                                 callback_id=sent.callback_id, meta=meta, events=events)
            # Written before anything is sent: the callback reads the round's metadata from it.
            store.open_round(node, meta.round_id, {"meta": meta.as_dict(), "callback_id": sent.callback_id},
                             close_at=handle.close_at)
            if fan_out:
                chords.send_via_queue(header, body, queue=queue_for(node), frozen=sent,
                                      expires=datetime.fromtimestamp(meta.deadline_at + EXPIRES_CLOCK_SLACK_S,
                                                                     tz=UTC))
            else:
                chords.send(header, body, frozen=sent)
    except BaseException:
        if events is not None:
            events.close()
        raise
    return handle


@contextmanager
def _no_collection():
    """No garbage collection while a round is sent: it runs after, while the round is awaited.

    In a fresh process (``measure``) the heap is all just-imported modules, and a full
    collection -- 20 to 30 ms on a 2-core machine -- came due in the middle of sending the
    round's messages, delaying the round by as much.  Collection is restored as it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _subscribe(store: Store, node: str) -> PubSub:
    """A subscription to ``node``'s round events, confirmed by Redis before this returns."""
    events = store.client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(store.keys.round_events(node))
    # The confirmation is the first message; reading it makes sure the subscription is in place.
    events.get_message(timeout=1.0, ignore_subscribe_messages=False)
    return events


def round_reference(meta: RoundMeta) -> dict:
    """What the callback needs to find a round's metadata in Redis (:meth:`Store.open_round_entry`)."""
    return {"round_id": meta.round_id, "node": meta.node, "key_prefix": meta.key_prefix}


def dispatch_fanned_out(config: Config, node: str) -> RoundHandle:
    """:func:`dispatch` as the beat sends: one message per round, fanned out by the node's worker."""
    return dispatch(config, node, fan_out=True)
