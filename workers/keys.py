"""Every Redis key name the service uses, under one prefix (``ntp_service.key_prefix``).

The contract's keys (``latest``, ``history``, ``updates``, ``stats``, ``nodes``,
``round_duration``) are documented in :mod:`orchestrator.store` and docs/contract.md;
the rest are internal.  Workers, the beat, the exporter and readers all take
their names from here, so a name is spelt once.
"""

from __future__ import annotations

#: Prefix of the per-node queues: a round for node X goes to ``ntp.X`` (queues have no key prefix).
QUEUE_PREFIX = "ntp."


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "chronotick"):
        self.prefix = prefix

    def _node(self, node: str, leaf: str) -> str:
        return f"{self.prefix}:ntp:{node}:{leaf}"

    def latest(self, node: str) -> str:
        return self._node(node, "latest")

    def history(self, node: str) -> str:
        return self._node(node, "history")

    def updates(self, node: str) -> str:
        return self._node(node, "updates")

    def stats(self, node: str) -> str:
        return self._node(node, "stats")

    def nodes(self) -> str:
        return f"{self.prefix}:ntp:nodes"

    def open_rounds(self, node: str) -> str:
        """Internal: rounds dispatched and not yet finished, so any beat can close them."""
        return self._node(node, "open")

    def open_by_close_time(self) -> str:
        """Internal: every open round of every node (``<node> <round_id>``), scored by when to close it.

        A beat finds the overdue ones in one ZRANGEBYSCORE, whatever the number of nodes.
        """
        return f"{self.prefix}:ntp:open_by_close_time"

    def beat(self) -> str:
        """Internal: the lease of the beat that dispatches (see :mod:`orchestrator.leader`)."""
        return f"{self.prefix}:ntp:beat"

    def filter_window(self, node: str) -> str:
        """Internal: the temporal filter's recent accepted results, ``[measured_at, offset]`` JSON."""
        return self._node(node, "filter_window")

    def filter_state(self, node: str) -> str:
        """Internal: the temporal filter's count of outliers in a row."""
        return self._node(node, "filter_state")

    def round_claim(self, node: str, round_id: str) -> str:
        """Internal: set once by whoever finishes the round (callback or deadline closer)."""
        return self._node(node, f"round:{round_id}")

    def outcomes(self, node: str, round_id: str) -> str:
        """Internal: a hash, server -> outcome JSON, each query task's report (:mod:`workers.outcome_reports`).

        What a closer publishes if the round's callback never comes; deleted
        with the round's publication, else it expires after the deadline.
        """
        return self._node(node, f"outcomes:{round_id}")

    def late(self, node: str) -> str:
        """A stream: the outcomes of each round published early that came after it (``round``, ``servers``)."""
        return self._node(node, "late")

    def reach(self, node: str) -> str:
        """Internal: a hash, server -> its reach register and how many rounds filled it (``256 * rounds + reach``)."""
        return self._node(node, "reach")

    def round_events(self, node: str) -> str:
        """Internal: a channel, ``{"round_id", "state"}`` as each round is published (with its ``record``)
        and completed (with its ``late`` servers' entries)."""
        return self._node(node, "rounds")

    def round_duration(self, node: str) -> str:
        """The round-time histogram: ``le:<bound>`` (cumulative), ``count``, ``sum``."""
        return self._node(node, "round_duration")

    def server_delay(self, node: str) -> str:
        """Internal: each server's last round-trip delay, so the next round sends the slowest first."""
        return self._node(node, "server_delay")

    def no_worker(self, node: str) -> str:
        """Set by the leading beat while no live worker consumes ``node``'s queue and a round already waits
        there (JSON ``{"since", "queue", "waiting"}``, ``since`` on Redis' clock); it dispatches nothing more
        for the node meanwhile.  Refreshed at each of the node's slots, deleted when a worker takes the queue
        again, expires by itself if the beat stops (:mod:`orchestrator.scheduler`)."""
        return self._node(node, "no_worker")

    def worker(self, queue: str, hostname: str) -> str:
        """A worker's heartbeat on ``queue``: expires unless renewed (:mod:`workers.heartbeat`)."""
        return f"{self.prefix}:worker:{queue}:{hostname}"

    def workers(self, queue: str) -> str:
        """The set of host names that beat on ``queue`` (members whose heartbeat expired are dropped)."""
        return f"{self.prefix}:workers:{queue}"

    def warm_up(self) -> str:
        """Internal: a sorted set, node -> when its warm-up ends (ms on Redis' clock; :mod:`workers.warmup`).

        Expires with the last warm-up in it, so no schedule key outlives its use.
        """
        return f"{self.prefix}:ntp:warm_up"

    def warm_up_ended(self) -> str:
        """Internal: a sorted set, node -> when its last warm-up ends or ended (ms on Redis' clock), for the
        cooldown (:mod:`workers.warmup`).  One member per node of the policy; members whose cooldown is over
        are dropped at the next request, and the key expires a cooldown after the last warm-up's end."""
        return f"{self.prefix}:ntp:warm_up_ended"

    def round_now(self) -> str:
        """Internal: a sorted set of nodes whose worker asked for one round at once -- its link to Redis
        came back after an outage (:func:`workers.warmup.ask_round_now`).  The leading beat takes them all at
        its next poll; the key expires a minute after the last ask."""
        return f"{self.prefix}:ntp:round_now"

    def warm_up_policy(self) -> str:
        """Internal: the leading beat's warm-up policy, JSON (``nodes``, ``hub``, ``duration_ms``,
        ``cooldown_ms``, ``stale_after_ms``): what every warm-up request is judged by (:mod:`workers.warmup`).

        Published when a beat takes the lease; its expiry is renewed at each of the leader's polls, so it
        lapses a while after no beat leads (requests are then refused: nobody would run the warm-up).
        """
        return f"{self.prefix}:ntp:warm_up_policy"

    def relay_port(self, relay: str, port: int) -> str:
        """A relay port's counts (:mod:`relay.counts`): a hash, ``relay`` the head node's short name."""
        return f"{self.prefix}:relay:{relay}:{port}"

    def relays(self) -> str:
        """The set of every relay port's counts key, for the exporter."""
        return f"{self.prefix}:relays"
