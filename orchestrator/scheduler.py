"""Run rounds for every node on the configured timing (the ``beat`` command).

One scheduler dispatches per cluster; more may run as standbys (see
:mod:`orchestrator.leader`).  Each node's rounds come every normal interval,
and every warm-up interval while the node warms up: a warm-up is asked for when
a consumer starts collecting for the node, when its worker starts with nothing
fresh, or when a beat takes the lease and the node has nothing fresh
(:mod:`workers.warmup`); the leading beat reads the requests once a second,
whatever the beat's own age.  Which requests become warm-ups is the leading
beat's policy (its nodes, its warm-up length, the cooldown, the staleness
limit, the hub), which it publishes when it takes the lease and keeps alive at
each poll; the request script enforces it (issue #26 item 5).  Nodes are spread across the
interval so that a cluster does not hit the public servers in the same
second: node i of n has its normal rounds at the *phase* i/n of the interval,
the times ``k * interval + i/n * interval`` on Redis' clock
(:func:`phase_slot`).  Every path lands there -- after a normal round, when a
warm-up ends (the first phase slot from its end) and when a beat takes the
lease -- so a restarted beat, or a standby taking over, keeps the phases the
last one had (issue #25: after a warm-up every node was dispatched in the same
second until a beat re-took the lease).  Warm-up rounds keep the phase too:
node i of n warms up at the times ``k * w + i/n * w`` (``w`` the warm-up
interval), so nodes warming up together are spread over each warm-up interval
rather than dispatched in the same instant.

With a hub (``ntp_service.hub``), the hub node measures the public servers for
the whole cluster: it never warms up (the policy refuses it, and a listed
warm-up of it is ignored), and its interval is ``max(normal interval,
hub.measurement_interval)``, at its phase i/n of that interval, never two of
its rounds closer than that.  A node's next round is not
sent while its previous one is still running; a round whose callback has not
come by its deadline is closed with what its tasks reported
(:func:`orchestrator.rounds.close`), so no chord is waited on forever and
rounds never pile up behind a slow or dead worker.

Nor in a queue nobody consumes: before a node's round is sent, the beat looks
at the node's queue (one LLEN) and, only when something waits there, at its
workers' heartbeats (:mod:`workers.heartbeat`).  With a round already waiting
and no live worker, nothing more is sent for the node -- at most one round
waits per node, however long it has no worker (issue #25: ~12.5 kB a dispatch,
~9 MB a day, under ``noeviction``) -- and the beat says so once (``[NO
WORKER]``), sets ``<prefix>:ntp:<node>:no_worker`` (:meth:`workers.keys.Keys.no_worker`)
and says once when the queue is consumed again.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import threading
import time

from workers import heartbeat, redisurl, warmup
from workers.config import Config
from workers.keys import QUEUE_PREFIX, Keys
from workers.redisclock import clock_for

from . import rounds
from .store import service_client

log = logging.getLogger(__name__)
# A pass that cannot reach Redis says so once, as the lease does, not once per pass (workers/redisurl.py).
redisurl.outages.absorb(log)

#: How often a leading beat looks for rounds other processes left open, and for warm-ups asked for (s).
ADOPT_EVERY_S = 1.0

#: How late after its slot the hub node's round may have been sent for the next phase slot to count as an
#: interval after it (s): a pass and a dispatch take milliseconds; the hub's interval is at least 16 s.
HUB_SEND_SLACK_S = 1.0


#: Through a hub, the nodes' normal rounds are this far apart (s), not spread over the whole interval: they
#: ask only the hub's chronyd (thousands of requests a second), and node-to-node time needs the nodes measured
#: close together -- two legs an interval apart would add both clocks' drift over it (3.6 ms at 15 ppm and
#: 120 s) to a LAN-sized bound.  1,000 nodes then take 10 s of each interval.
HUB_SPACING_S = 0.01


def phase_slot(after: float, index: int, count: int, interval: float, *, strictly: bool = True,
               spacing_s: float | None = None) -> float:
    """Node ``index`` of ``count``'s first normal slot after ``after`` (Unix s on Redis' clock; at or after
    it unless ``strictly``): a time ``k * interval + index / count * interval`` -- or, with ``spacing_s``,
    ``k * interval + index * spacing_s`` (wrapped within the interval).

    Anchored on the epoch of Redis' clock, not on when a beat started: every beat computes the same slots.
    """
    phase = interval * index / count if spacing_s is None else (index * spacing_s) % interval
    k = math.floor((after - phase) / interval)
    slot = k * interval + phase
    while slot < after or (strictly and slot <= after):
        slot += interval
    return slot


def waiting_without_worker(config: Config, node: str) -> int:
    """How many messages wait in ``node``'s queue with no live worker to take them (0: none wait, or a worker
    is there).  One LLEN; the heartbeats are read only when something waits (:func:`workers.heartbeat.live_workers`).
    """
    client = service_client(config.service)
    queue = QUEUE_PREFIX + node
    waiting = int(client.llen(queue))
    if not waiting or heartbeat.live_workers(client, Keys(config.service.key_prefix), queue):
        return 0
    return waiting


#: How long ``<prefix>:ntp:<node>:no_worker`` outlives its last refresh, in normal intervals (at least a minute).
NO_WORKER_MARK_INTERVALS = 3


def mark_without_worker(config: Config, node: str, state: dict | None) -> None:
    """Set (``state``: ``{"since", "queue", "waiting"}``) or delete ``<prefix>:ntp:<node>:no_worker``."""
    client = service_client(config.service)
    key = Keys(config.service.key_prefix).no_worker(node)
    if state is None:
        client.delete(key)
    else:
        ttl_s = max(60, math.ceil(NO_WORKER_MARK_INTERVALS * config.timing.normal_interval_s))
        client.set(key, json.dumps(state, sort_keys=True), ex=ttl_s)


def warm_up_nodes_without_fresh_measurement(config: Config, nodes: list[str]) -> list[str]:
    """Ask for a warm-up of each of ``nodes`` with nothing fresh (never the hub node's); the nodes asked for.

    Fresh is judged on Redis' clock (one MGET and one TIME, :func:`workers.warmup.nodes_without_fresh_measurement`):
    a node whose clock is hours off is fresh right after its round, and stale three intervals after its last.
    The published policy decides (:func:`workers.warmup.request`); each answer is logged, a refusal with its reason.
    """
    hub = config.service.hub
    candidates = [node for node in nodes if hub is None or node != hub.node]
    answers = warmup.warm_up_if_not_fresh(service_client(config.service), config.service.key_prefix, candidates,
                                          config.timing)
    for answer in answers.values():
        warmup.log_answer(log, answer, f"{answer.node}: nothing fresh: ")
    return list(answers)


class Scheduler:
    """Dispatch rounds for ``nodes`` until :meth:`stop`.

    Parameters
    ----------
    config:
        The validated configuration (timing and servers).
    nodes:
        The nodes to measure.
    dispatch:
        ``dispatch(config, node) -> RoundHandle``; :func:`orchestrator.rounds.dispatch_fanned_out`
        by default (tests may wrap it to observe).
    lease:
        An :class:`orchestrator.leader.Lease`: dispatch only while holding it,
        so standby beats can run beside this one.  ``None``: always dispatch.
    overdue_handles:
        ``overdue_handles(config, now) -> [RoundHandle]``: rounds of any node
        left open in Redis and due to be closed, closed here
        (:func:`orchestrator.rounds.overdue_handles`).
    warm_ups:
        ``warm_ups(config) -> {node: seconds left}``: the warm-ups asked for.
        By default the leader's poll of Redis (:func:`workers.warmup.poll`),
        which also keeps the published policy alive.
    on_lead:
        ``on_lead(config, nodes)``, called when this beat starts to dispatch:
        by default it publishes the warm-up policy (:attr:`policy`) and asks for
        a warm-up of the nodes with nothing fresh.
    clock:
        ``clock() -> Unix s`` on the clock rounds' deadlines are set on: Redis'
        (:mod:`workers.redisclock`) by default.
    waiting_without_worker:
        ``waiting_without_worker(config, node) -> int``: messages waiting in the
        node's queue with no live worker (:func:`waiting_without_worker`); while
        it is not 0 the node gets no round.
    mark_without_worker:
        ``mark_without_worker(config, node, state or None)``: says so in Redis
        (:func:`mark_without_worker`).
    """

    def __init__(self, config: Config, nodes: list[str], *, dispatch=rounds.dispatch_fanned_out, lease=None,
                 overdue_handles=rounds.overdue_handles, warm_ups=None, on_lead=None, clock=None,
                 waiting_without_worker=waiting_without_worker, mark_without_worker=mark_without_worker,
                 rounds_now=None):
        if not nodes:
            raise ValueError("no nodes to schedule: list them in ntp_service.nodes or pass --node")
        self.config = config
        self.nodes = list(nodes)
        self._dispatch = dispatch
        self._stop = threading.Event()
        self.in_flight: dict[str, rounds.RoundHandle] = {}
        self.dispatched: dict[str, int] = {node: 0 for node in self.nodes}
        self.skipped: dict[str, int] = {node: 0 for node in self.nodes}
        self.closed: dict[str, int] = {node: 0 for node in self.nodes}
        self.lease = lease
        self.leading = lease is None
        self._overdue_handles = overdue_handles
        self._next_adoption = 0.0
        self._lease_renewed_at = float("-inf")
        #: (close_at Unix s on Redis' clock, round_id, node) of every round this beat dispatched.
        self._closing: list[tuple[float, str, str]] = []
        #: What this beat publishes when it leads: every warm-up request is judged by it (:mod:`workers.warmup`).
        self.policy = warmup.Policy.of(config, self.nodes)
        self._warm_ups = warm_ups if warm_ups is not None else self._poll_redis
        self._clock = clock if clock is not None else clock_for(service_client(config.service)).now
        self._on_lead = on_lead if on_lead is not None else self._publish_policy_and_warm_up
        self._index = {node: i for i, node in enumerate(self.nodes)}
        hub = config.service.hub
        #: The hub node, when it is one of ours: it never warms up, and has its own interval.
        self.hub_node = hub.node if hub is not None and hub.node in self._index else None
        #: Each node's interval between normal rounds (s): the hub's at least ``hub.measurement_interval``.
        self.intervals = {node: config.normal_interval_of(node) for node in self.nodes}
        #: When (monotonic s) each node's last round was sent, for the hub's spacing.
        self._last_sent: dict[str, float] = {}
        #: Nodes whose listed warm-up this beat ignores (the hub), said once each.
        self._ignored_warm_ups: set[str] = set()
        #: Until when (monotonic s) each node warms up.
        self.warm_until: dict[str, float] = {}
        #: Warm-ups this beat has started running, per node.
        self.warm_ups_started: dict[str, int] = {node: 0 for node in self.nodes}
        self._next_warm_up_poll = 0.0
        #: Rounds asked for at once, by workers back from an outage (``rounds_now(config) -> [node]``); without
        #: a warm-ups source of its own (tests on a fake clock), none.
        self._rounds_now = rounds_now if rounds_now is not None else (
            self._rounds_now_from_redis if warm_ups is None else (lambda config: []))
        self._next_round_now_poll = 0.0
        self._last_round_now: dict[str, float] = {}
        self._waiting_without_worker = waiting_without_worker
        self._mark_without_worker = mark_without_worker
        #: Nodes whose queue holds a round no live worker takes: ``{node: since (Redis' clock)}``.
        self.without_worker: dict[str, float] = {}
        #: Slots not sent because a round already waited for a worker, per node.
        self.held: dict[str, int] = {node: 0 for node in self.nodes}
        #: A node's slot in the due heap is valid only with its current generation.
        self._generation: dict[str, int] = {node: 0 for node in self.nodes}

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        # Two heaps keep each pass's cost independent of the number of nodes:
        # when each node is next due (monotonic s), and when each dispatched
        # round may be closed (Unix s).
        due: list[tuple[float, int, str, int]] = []
        while not self._stop.is_set():
            if not self._lead():
                due = []  # a standby: when it takes over, it starts a fresh phase
                self._stop.wait(self.lease.ttl_s / 3)
                continue
            now = time.monotonic()
            if not due:
                self._started_leading()
                # Each node at its phase on Redis' clock: the slots the previous leader had.
                due = [(self._spaced(node, i, self.next_normal_slot(i, now, strictly=False)), i, node,
                        self._generation[node]) for i, node in enumerate(self.nodes)]
                heapq.heapify(due)
            for node in self._poll_warm_ups(now):  # a new warm-up: its first round at its first warm-up slot
                self._generation[node] += 1
                i = self._index[node]
                heapq.heappush(due, (self.next_warm_up_slot(i, now, strictly=False), i, node,
                                     self._generation[node]))
            for node in self._poll_rounds_now(now):  # back from an outage: one round now, then its phase
                self._generation[node] += 1
                heapq.heappush(due, (now, self._index[node], node, self._generation[node]))
            self._close_overdue()
            while due and due[0][0] <= now:
                at, i, node, generation = heapq.heappop(due)
                if generation != self._generation[node]:
                    continue  # replaced by a warm-up's slot
                self._tick(node)
                heapq.heappush(due, (self.next_due(node, i, at, now), i, node, generation))
            wake = (due[0][0] if due else now + 1.0) - time.monotonic()
            if self._closing:
                wake = min(wake, self._closing[0][0] - self._clock())
            wake = min(wake, self._next_warm_up_poll - time.monotonic())
            if self.lease is not None:
                wake = min(wake, self.lease.ttl_s / 3)  # renew well before the lease lapses
            self._stop.wait(max(0.01, wake))
        for handle in self.in_flight.values():
            handle.release()  # still open in Redis for whoever closes it; just stop listening
        if self.lease is not None and self.leading:
            self.lease.release()  # hand over at once rather than after the time to live

    def _slot(self, index: int, after: float, every: float, strictly: bool, spacing_s: float | None = None) -> float:
        """Node ``index``'s first slot of period ``every`` after ``after`` (monotonic s), as a monotonic time.

        The phase is on Redis' clock (:func:`phase_slot`); the heap runs on the monotonic clock.
        """
        offset = self._clock() - time.monotonic()  # Redis' clock minus the monotonic one
        return phase_slot(after + offset, index, len(self.nodes), every, strictly=strictly,
                          spacing_s=spacing_s) - offset

    def next_normal_slot(self, index: int, after: float, *, strictly: bool = True) -> float:
        """Node ``index``'s first normal phase slot after ``after`` (monotonic s), as a monotonic time: at i/n
        of its interval (:attr:`intervals`: the normal one, the hub's at least ``hub.measurement_interval``)."""
        node = self.nodes[index]
        # Through a hub, the nodes close together (HUB_SPACING_S); the hub node at its i/n phase.
        through_hub = self.config.service.hub is not None and node != self.config.service.hub.node
        return self._slot(index, after, self.intervals[node], strictly, HUB_SPACING_S if through_hub else None)

    def next_warm_up_slot(self, index: int, after: float, *, strictly: bool = True) -> float:
        """Node ``index``'s first warm-up slot after ``after`` (monotonic s): at i/n of the warm-up interval, so
        that nodes warming up together are spread over it, not dispatched in the same instant."""
        return self._slot(index, after, self.config.timing.warm_up_interval_s, strictly)

    def next_due(self, node: str, index: int, at: float, now: float) -> float:
        """When ``node`` (``index`` in the nodes) is next due after its slot ``at`` ran at ``now`` (monotonic s).

        While it warms up, its next warm-up slot (:meth:`next_warm_up_slot`: the one after ``at``, or the
        first after ``now`` when late -- never a burst of missed ones); after that, and in normal operation,
        its next phase slot -- the first at or after the warm-up's end, so that nodes warmed up together
        part again.  After a slot the next is at least half an interval on, so a clock estimate that moves a
        little never repeats a slot; the hub node's never comes sooner than its interval after its last round.
        """
        warm_until = self.warm_until.get(node, 0.0)
        if now < warm_until:
            step = self.config.timing.warm_up_interval_s
            following = self.next_warm_up_slot(index, max(at + step / 2, now))
            if following < warm_until:
                return following
            return self.next_normal_slot(index, warm_until, strictly=False)
        every = self.intervals[node]
        return self._spaced(node, index, self.next_normal_slot(index, max(at, now) + min(every / 2, 1.0)))

    def _spaced(self, node: str, index: int, slot: float) -> float:
        """``slot``, unless it is the hub node's and comes sooner than its interval after its last round.

        Phase slots are an interval apart on Redis' clock, and a round is sent a little after its slot
        (:data:`HUB_SEND_SLACK_S` at most, in practice milliseconds), so a slot that early is the next one
        in phase.  Sooner than that (Redis' clock estimate stepped: a failover to a Redis whose clock is
        off), the hub waits for its first phase slot a whole interval after its last round: it is never
        moved off its phase, and its rounds never crowd the public servers.
        """
        if node != self.hub_node or node not in self._last_sent:
            return slot
        earliest = self._last_sent[node] + self.intervals[node]
        if slot >= earliest - HUB_SEND_SLACK_S:
            return slot
        return self.next_normal_slot(index, earliest, strictly=False)

    def _publish_policy_and_warm_up(self, config: Config, nodes: list[str]) -> list[str]:
        """The default ``on_lead``: publish :attr:`policy`, then ask for the warm-ups of nodes with nothing fresh."""
        client = service_client(config.service)
        warmup.publish_policy(client, config.service.key_prefix, self.policy, warmup.policy_ttl_s(config.service))
        if self.hub_node is not None and warmup.nodes_without_fresh_measurement(
                client, config.service.key_prefix, [self.hub_node], config.stale_after_s(self.hub_node)):
            # The hub node never warms up, and its next slot may be an interval away: every other node's
            # rounds need its leg, so it gets one round at once (then its interval, and its budget, hold).
            warmup.ask_round_now(client, config.service.key_prefix, [self.hub_node])
        return warm_up_nodes_without_fresh_measurement(config, nodes)

    def _poll_redis(self, config: Config) -> dict[str, float]:
        """The default ``warm_ups``: the running warm-ups, renewing (or restoring) the published policy."""
        return warmup.poll(service_client(config.service), config.service.key_prefix, self.policy,
                           warmup.policy_ttl_s(config.service))

    def _started_leading(self) -> None:
        """This beat starts to dispatch: it publishes its warm-up policy, and nodes with nothing fresh get a
        warm-up (each answer logged; the warm-ups are read at the next poll)."""
        self._next_warm_up_poll = 0.0
        try:
            self._on_lead(self.config, self.nodes)
        except Exception as exc:  # Redis away: the poll publishes the policy again once Redis answers
            log.error("[WARM-UP] cannot publish the warm-up policy or check the nodes' measurements (%s: %s)",
                      type(exc).__name__, exc)

    def _poll_warm_ups(self, now: float) -> list[str]:
        """Read the warm-ups asked for, once a second; the nodes whose warm-up starts now."""
        if now < self._next_warm_up_poll:
            return []
        self._next_warm_up_poll = now + ADOPT_EVERY_S
        try:
            remaining = self._warm_ups(self.config)
        except Exception as exc:  # Redis away: keep the schedule as it is
            log.error("[WARM-UP] cannot read the warm-ups (%s: %s)", type(exc).__name__, exc)
            return []
        starting = []
        for node, left_s in remaining.items():
            if node not in self._generation:
                continue  # another beat's node
            if node == self.hub_node:  # listed under an older policy: the hub's rounds stay at its interval
                if node not in self._ignored_warm_ups:
                    self._ignored_warm_ups.add(node)
                    log.warning("[WARM-UP] %s is the hub node: its listed warm-up is ignored (it measures the "
                                "public servers at most every %g s)", node, self.intervals[node])
                continue
            if self.warm_until.get(node, 0.0) <= now:
                starting.append(node)
                self.warm_ups_started[node] += 1
                log.info("[WARM-UP] %s: rounds every %g s for %.0f s", node,
                         self.config.timing.warm_up_interval_s, left_s)
            self.warm_until[node] = now + left_s
        return starting

    def _poll_rounds_now(self, now: float) -> list[str]:
        """The nodes asked for a round at once (:func:`workers.warmup.ask_round_now`: a worker back from an
        outage; a beat taking the lease while the hub node has nothing fresh): read at the warm-up poll's
        pace; each of ours gets one, unless it warms up (its rounds are a second apart), had one less than
        an interval ago, or is the hub node with a round sent less than its interval ago."""
        if now < self._next_round_now_poll:
            return []
        self._next_round_now_poll = now + ADOPT_EVERY_S
        try:
            asked = self._rounds_now(self.config)
        except Exception as exc:  # Redis away: the slots go on as they are
            log.error("[CATCH-UP] cannot read the rounds asked for (%s: %s)", type(exc).__name__, exc)
            return []
        granted = []
        for node in asked:
            if node not in self._generation or self.warm_until.get(node, 0.0) > now:
                continue
            if now - self._last_round_now.get(node, float("-inf")) < self.intervals[node]:
                continue
            if node == self.hub_node and now - self._last_sent.get(node, float("-inf")) < self.intervals[node]:
                continue  # the hub node's rounds stay an interval apart: the public servers' budget
            self._last_round_now[node] = now
            granted.append(node)
            log.info("[CATCH-UP] %s: its worker is back on Redis; a round now, then its phase", node)
        return granted

    def _rounds_now_from_redis(self, config: Config) -> list[str]:
        return warmup.rounds_asked_now(service_client(config.service), config.service.key_prefix)

    def _lead(self) -> bool:
        """Whether this beat dispatches now (always, without a lease).

        The lease is renewed every third of its time to live, not on every
        pass: a beat wakes once per round, and a renewal each time would cost
        Redis as much as a small round.
        """
        if self.lease is None:
            return True
        now = time.monotonic()
        if self.leading and now - self._lease_renewed_at < self.lease.ttl_s / 3:
            return True
        holding = self.lease.hold()
        if holding:
            self._lease_renewed_at = now
        if holding != self.leading:
            log.warning("[BEAT] %s the lease %s", "took" if holding else "lost", self.lease.key)
            self.leading = holding
        return holding

    def _close_overdue(self) -> None:
        """Close this beat's rounds whose callback is past its deadline, and any others left open.

        A round's finish is only looked for when it matters -- at its node's
        next slot (:meth:`_tick`) or at its closing time -- so the cost per
        round stays one EXISTS, whatever else is in flight.
        """
        self._adopt_open_rounds()
        now = self._clock()
        while self._closing and self._closing[0][0] <= now:
            _, round_id, node = heapq.heappop(self._closing)
            handle = self.in_flight.get(node)
            if handle is None or handle.round_id != round_id:
                continue  # finished and dropped at its node's next slot
            try:
                if handle.ready():
                    del self.in_flight[node]
                    continue
                record = rounds.close(handle)
                del self.in_flight[node]
                self.closed[node] += 1
                if record is not None:
                    log.warning("[CLOSED] %s: round %s closed at its deadline (%s)", node,
                                handle.round_id, record["quality"])
            except Exception as exc:  # Redis away: stays in flight, tried again on the next pass
                log.error("[CLOSE] %s: round %s (%s: %s)", node, handle.round_id, type(exc).__name__, exc)
                heapq.heappush(self._closing, (now + 1.0, round_id, node))

    def _adopt_open_rounds(self) -> None:
        """Close rounds another beat (or an interrupted ``measure``) left open, once a second: one index read."""
        now = time.monotonic()
        if now < self._next_adoption:
            return
        self._next_adoption = now + ADOPT_EVERY_S
        own = {h.round_id for h in self.in_flight.values()}
        try:
            orphans = [h for h in self._overdue_handles(self.config, self._clock()) if h.round_id not in own]
        except Exception as exc:
            log.error("[ADOPT] cannot list open rounds (%s: %s)", type(exc).__name__, exc)
            return
        for handle in orphans:
            try:
                record = rounds.close(handle)
            except Exception as exc:
                log.error("[ADOPT] %s: round %s (%s: %s)", handle.node, handle.round_id, type(exc).__name__, exc)
                continue
            self.closed[handle.node] = self.closed.get(handle.node, 0) + 1
            log.warning("[CLOSED] %s: round %s, left open by another process, closed at its deadline",
                        handle.node, handle.round_id if record else handle.round_id + " (already finished)")

    def _tick(self, node: str) -> None:
        previous = self.in_flight.get(node)
        if previous is not None and self._finished(previous):
            del self.in_flight[node]  # nothing to drop: its tasks store no result, nobody waits for its callback
            previous = None
        if previous is not None:
            self.skipped[node] += 1
            log.warning("[SKIP] %s: round %s still running; not starting another", node, previous.round_id)
            return
        if not self._room_for_a_round(node):
            self.held[node] += 1
            return
        try:
            handle = self._dispatch(self.config, node)
            self._last_sent[node] = time.monotonic()
            self.in_flight[node] = handle
            heapq.heappush(self._closing, (handle.close_at, handle.round_id, node))
            self.dispatched[node] += 1
            log.info("[ROUND] %s: dispatched %s", node, handle.round_id)
        except Exception as exc:  # broker down: say so, keep the schedule
            log.error("[ROUND] %s: could not dispatch (%s: %s); will try at the next slot",
                      node, type(exc).__name__, exc)

    def _room_for_a_round(self, node: str) -> bool:
        """Whether a round of ``node`` may be sent: none waits in its queue, or a live worker takes it.

        Says once that the node has no worker (``[NO WORKER]``, and ``<prefix>:ntp:<node>:no_worker``,
        refreshed at each held slot), and once that its queue is consumed again.
        """
        try:
            waiting = self._waiting_without_worker(self.config, node)
        except Exception as exc:  # Redis away: the dispatch says so (and fails) as before
            log.error("[ROUND] %s: cannot look at its queue (%s: %s)", node, type(exc).__name__, exc)
            return True
        queue = QUEUE_PREFIX + node
        if not waiting:
            if self.without_worker.pop(node, None) is not None:
                log.warning("[NO WORKER] %s: queue %s is taken again; rounds resume", node, queue)
                self._mark(node, None)
            return True
        if node not in self.without_worker:
            self.without_worker[node] = self._clock()
            log.warning("[NO WORKER] %s: no live worker takes queue %s, where a round already waits (%d "
                        "message(s)); no more rounds for it until one does", node, queue, waiting)
        self._mark(node, {"since": self.without_worker[node], "queue": queue, "waiting": waiting})
        return False

    def _mark(self, node: str, state: dict | None) -> None:
        try:
            self._mark_without_worker(self.config, node, state)
        except Exception as exc:  # only the marker is missing: the schedule is unaffected
            log.error("[NO WORKER] %s: cannot mark it in Redis (%s: %s)", node, type(exc).__name__, exc)

    @staticmethod
    def _finished(handle) -> bool:
        try:
            return bool(handle.ready())
        except Exception as exc:  # Redis away: treat it as running; the dispatch would fail too
            log.error("[ROUND] %s: cannot check round %s (%s: %s)", handle.node, handle.round_id,
                      type(exc).__name__, exc)
            return False
