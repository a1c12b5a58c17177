"""Run rounds for every node on the configured timing (the ``beat`` command).

One scheduler dispatches per cluster; more may run as standbys (see
:mod:`orchestrator.leader`).  Each node's rounds come every warm-up interval for
the warm-up period, then every normal interval.  Nodes are spread across the
interval (node i of n starts i/n of an interval late) so that a cluster does
not hit the public servers in the same second.  A node's next round is not
sent while its previous one is still running; a round whose callback has not
come by its deadline is closed with what its tasks reported
(:func:`orchestrator.rounds.close`), so no chord is waited on forever and
rounds never pile up behind a slow or dead worker.
"""

from __future__ import annotations

import logging
import threading
import time

from workers.config import Config

from . import rounds

log = logging.getLogger(__name__)

#: How often a leading beat looks for rounds other processes left open (s).
ADOPT_EVERY_S = 1.0


class Scheduler:
    """Dispatch rounds for ``nodes`` until :meth:`stop`.

    Parameters
    ----------
    config:
        The validated configuration (timing and servers).
    nodes:
        The nodes to measure.
    dispatch:
        ``dispatch(config, node) -> RoundHandle``; :func:`orchestrator.rounds.dispatch`
        by default (tests may wrap it to observe).
    lease:
        An :class:`orchestrator.leader.Lease`: dispatch only while holding it,
        so standby beats can run beside this one.  ``None``: always dispatch.
    open_handles:
        ``open_handles(config, node) -> [RoundHandle]``: rounds left open in
        Redis, closed here once overdue (:func:`orchestrator.rounds.open_handles`).
    """

    def __init__(self, config: Config, nodes: list[str], *, dispatch=rounds.dispatch, lease=None,
                 open_handles=rounds.open_handles):
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
        self._open_handles = open_handles
        self._next_adoption = 0.0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        due: dict[str, float] = {}
        started = time.monotonic()
        while not self._stop.is_set():
            if not self._lead():
                due = {}  # a standby: when it takes over, it starts a fresh phase
                self._stop.wait(self.lease.ttl_s / 3)
                continue
            now = time.monotonic()
            if not due:
                started = now - self._schedule_age_s()
                first = self.config.timing.interval_at(now - started)
                due = {node: now + i * first / len(self.nodes) for i, node in enumerate(self.nodes)}
            self._close_overdue()
            for node in self.nodes:
                if now >= due[node]:
                    self._tick(node)
                    interval = self.config.timing.interval_at(now - started)
                    # Keep the phase: the next slot, never a burst of missed ones.
                    while due[node] <= now:
                        due[node] += interval
            wake = min(due.values()) - time.monotonic()
            if self.in_flight:
                wake = min(wake, min(h.close_at for h in self.in_flight.values()) - time.time())
            if self.lease is not None:
                wake = min(wake, self.lease.ttl_s / 3)  # renew well before the lease lapses
            self._stop.wait(max(0.01, wake))
        for handle in self.in_flight.values():
            handle.release()  # still open in Redis for whoever closes it; just stop listening
        if self.lease is not None and self.leading:
            self.lease.release()  # hand over at once rather than after the time to live

    def _lead(self) -> bool:
        """Whether this beat dispatches now (always, without a lease)."""
        if self.lease is None:
            return True
        holding = self.lease.hold()
        if holding != self.leading:
            log.warning("[BEAT] %s the lease %s", "took" if holding else "lost", self.lease.key)
            self.leading = holding
        return holding

    def _schedule_age_s(self) -> float:
        """How long the cluster's schedule has been running: a beat taking over skips a finished warm-up."""
        if self.lease is None:
            return 0.0
        return self.lease.schedule_age_s()

    def _close_overdue(self) -> None:
        """Forget finished rounds; close those whose callback is past its deadline."""
        self._adopt_open_rounds()
        for node, handle in list(self.in_flight.items()):
            try:
                if handle.ready():
                    handle.detach()
                    del self.in_flight[node]
                elif time.time() >= handle.close_at:
                    record = rounds.close(handle)  # on a Redis error it stays in flight, to try again
                    del self.in_flight[node]
                    self.closed[node] += 1
                    if record is not None:
                        log.warning("[CLOSED] %s: round %s closed at its deadline (%s)", node,
                                    handle.round_id, record["quality"])
            except Exception as exc:  # Redis away: try again on the next pass
                log.error("[CLOSE] %s: round %s (%s: %s)", node, handle.round_id, type(exc).__name__, exc)

    def _adopt_open_rounds(self) -> None:
        """Take over rounds another beat (or an interrupted ``measure``) left open, once a second."""
        now = time.monotonic()
        if now < self._next_adoption:
            return
        self._next_adoption = now + ADOPT_EVERY_S
        for node in self.nodes:
            try:
                orphans = [h for h in self._open_handles(self.config, node)
                           if h.round_id != getattr(self.in_flight.get(node), "round_id", None)]
            except Exception as exc:
                log.error("[ADOPT] %s: cannot list open rounds (%s: %s)", node, type(exc).__name__, exc)
                continue
            for handle in orphans:
                if time.time() >= handle.close_at:
                    try:
                        record = rounds.close(handle)
                    except Exception as exc:
                        log.error("[ADOPT] %s: round %s (%s: %s)", node, handle.round_id, type(exc).__name__, exc)
                        continue
                    self.closed[node] += 1
                    log.warning("[CLOSED] %s: round %s, left open by another process, closed at its deadline",
                                node, handle.round_id if record else handle.round_id + " (already finished)")

    def _tick(self, node: str) -> None:
        previous = self.in_flight.get(node)
        if previous is not None:
            self.skipped[node] += 1
            log.warning("[SKIP] %s: round %s still running; not starting another", node, previous.round_id)
            return
        try:
            handle = self._dispatch(self.config, node)
            self.in_flight[node] = handle
            self.dispatched[node] += 1
            log.info("[ROUND] %s: dispatched %s", node, self.in_flight[node].round_id)
        except Exception as exc:  # broker down: say so, keep the schedule
            log.error("[ROUND] %s: could not dispatch (%s: %s); will try at the next slot",
                      node, type(exc).__name__, exc)
