"""Run rounds for every node on the configured timing (the ``beat`` command).

One scheduler dispatches per cluster; more may run as standbys (see
:mod:`orchestrator.leader`).  Each node's rounds come every normal interval,
and every warm-up interval while the node warms up: a warm-up is asked for when
a consumer starts collecting for the node, when its worker starts with nothing
fresh, or when a beat takes the lease and the node has nothing fresh
(:mod:`workers.warmup`); the leading beat reads the requests once a second,
whatever the beat's own age.  Nodes are spread across the
interval (node i of n starts i/n of an interval late) so that a cluster does
not hit the public servers in the same second.  A node's next round is not
sent while its previous one is still running; a round whose callback has not
come by its deadline is closed with what its tasks reported
(:func:`orchestrator.rounds.close`), so no chord is waited on forever and
rounds never pile up behind a slow or dead worker.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time

from workers import redisurl, warmup
from workers.config import Config
from workers.redisclock import clock_for

from . import rounds
from .store import service_client

log = logging.getLogger(__name__)
# A pass that cannot reach Redis says so once, as the lease does, not once per pass (workers/redisurl.py).
redisurl.outages.absorb(log)

#: How often a leading beat looks for rounds other processes left open, and for warm-ups asked for (s).
ADOPT_EVERY_S = 1.0


def warm_ups(config: Config) -> dict[str, float]:
    """``{node: seconds of warm-up left}`` under the config's prefix (one script call)."""
    return warmup.active(service_client(config.service), config.service.key_prefix)


def warm_up_nodes_without_fresh_measurement(config: Config, nodes: list[str]) -> list[str]:
    """Ask for a warm-up of each of ``nodes`` with nothing fresh; the nodes asked for.

    Fresh is judged on Redis' clock (one MGET and one TIME, :func:`workers.warmup.nodes_without_fresh_measurement`):
    a node whose clock is hours off is fresh right after its round, and stale three intervals after its last.
    """
    return warmup.warm_up_if_not_fresh(service_client(config.service), config.service.key_prefix, nodes,
                                       config.timing)


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
        ``warm_ups(config) -> {node: seconds left}``: the warm-ups asked for
        (:func:`warm_ups`).
    on_lead:
        ``on_lead(config, nodes)``, called when this beat starts to dispatch:
        by default it asks for a warm-up of the nodes with nothing fresh.
    clock:
        ``clock() -> Unix s`` on the clock rounds' deadlines are set on: Redis'
        (:mod:`workers.redisclock`) by default.
    """

    def __init__(self, config: Config, nodes: list[str], *, dispatch=rounds.dispatch_fanned_out, lease=None,
                 overdue_handles=rounds.overdue_handles, warm_ups=warm_ups,
                 on_lead=warm_up_nodes_without_fresh_measurement, clock=None):
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
        self._warm_ups = warm_ups
        self._clock = clock if clock is not None else clock_for(service_client(config.service)).now
        self._on_lead = on_lead
        #: Until when (monotonic s) each node warms up.
        self.warm_until: dict[str, float] = {}
        #: Warm-ups this beat has started running, per node.
        self.warm_ups_started: dict[str, int] = {node: 0 for node in self.nodes}
        self._next_warm_up_poll = 0.0
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
                every = self.config.timing.normal_interval_s
                due = [(now + i * every / len(self.nodes), i, node, self._generation[node])
                       for i, node in enumerate(self.nodes)]
                heapq.heapify(due)
            for node in self._poll_warm_ups(now):  # a new warm-up: its first round now, not at the old slot
                self._generation[node] += 1
                heapq.heappush(due, (now, self.nodes.index(node), node, self._generation[node]))
            self._close_overdue()
            while due and due[0][0] <= now:
                at, i, node, generation = heapq.heappop(due)
                if generation != self._generation[node]:
                    continue  # replaced by a warm-up's slot
                self._tick(node)
                interval = self.interval_for(node, now)
                # Keep the phase: the next slot, never a burst of missed ones.
                while at <= now:
                    at += interval
                heapq.heappush(due, (at, i, node, generation))
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

    def interval_for(self, node: str, now: float) -> float:
        """The interval in force for ``node`` at ``now`` (monotonic s): warm-up while it warms up."""
        timing = self.config.timing
        return timing.warm_up_interval_s if now < self.warm_until.get(node, 0.0) else timing.normal_interval_s

    def _started_leading(self) -> None:
        """This beat starts to dispatch: nodes with nothing fresh get a warm-up (read at the next poll)."""
        self._next_warm_up_poll = 0.0
        try:
            asked = self._on_lead(self.config, self.nodes)
        except Exception as exc:  # Redis away: the workers and consumers still ask for themselves
            log.error("[WARM-UP] cannot check the nodes' measurements (%s: %s)", type(exc).__name__, exc)
            return
        if asked:
            log.info("[WARM-UP] nothing fresh for %s: warm-up asked for", ", ".join(asked))

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
            if self.warm_until.get(node, 0.0) <= now:
                starting.append(node)
                self.warm_ups_started[node] += 1
                log.info("[WARM-UP] %s: rounds every %g s for %.0f s", node,
                         self.config.timing.warm_up_interval_s, left_s)
            self.warm_until[node] = now + left_s
        return starting

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
        try:
            handle = self._dispatch(self.config, node)
            self.in_flight[node] = handle
            heapq.heappush(self._closing, (handle.close_at, handle.round_id, node))
            self.dispatched[node] += 1
            log.info("[ROUND] %s: dispatched %s", node, handle.round_id)
        except Exception as exc:  # broker down: say so, keep the schedule
            log.error("[ROUND] %s: could not dispatch (%s: %s); will try at the next slot",
                      node, type(exc).__name__, exc)

    @staticmethod
    def _finished(handle) -> bool:
        try:
            return bool(handle.ready())
        except Exception as exc:  # Redis away: treat it as running; the dispatch would fail too
            log.error("[ROUND] %s: cannot check round %s (%s: %s)", handle.node, handle.round_id,
                      type(exc).__name__, exc)
            return False
