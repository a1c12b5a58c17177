"""A Prometheus exporter for the Redis contract: one process serves every node, and keeps no state.

Each scrape runs :meth:`NtpCollector.collect`, which reads every node's
``latest``, ``stats``, ``round_duration`` and newest history record from
Redis in one pipeline and turns them into fresh metric families
(``prometheus_client``'s custom-collector pattern, as chrony_exporter does
for chronyd).  The counters are Redis' own, so they only ever go up -- unless
Redis is reset -- however many exporters run and however often they restart.

Names follow node_exporter and chrony_exporter: namespace ``chronotick_ntp``,
base units, ``_seconds``, ``_total``, ``_timestamp_seconds`` for event times.
Redis being unreachable is ``chronotick_ntp_redis_up 0`` (and no other
series), not a failed scrape: alert on it, and on Prometheus' own ``up``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import cast

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay.counts import read_all as read_relays
from relay.stats import COUNTERS as RELAY_COUNTERS
from workers import redisurl
from workers.config import DEFAULT_STALE_AFTER_S, Config, ServiceSettings
from workers.keys import QUEUE_PREFIX
from workers.redisclock import latest_age_s, time_of

from . import defaults, records, sources
from .counting import COUNTERS, ROUND_DURATION_BUCKETS_S
from .outcomes import Quality
from .sources import Reach
from .store import Keys

log = logging.getLogger(__name__)

NAMESPACE = "chronotick_ntp"

#: The round qualities ``rounds_total`` is split by.
QUALITIES = tuple(Quality)

#: A scrape tries a failed Redis call once more, on a new connection (Redis may have closed an idle
#: one), then answers ``chronotick_ntp_redis_up 0``.  With a reply timeout of
#: :data:`workers.redisurl.DEFAULT_TIMEOUT_S` and :data:`workers.redisurl.CONNECT_TIMEOUT_S` to connect,
#: a scrape behind a cut link answers in 7 s at most: within Prometheus' default scrape timeout (10 s),
#: so the outage shows as ``redis_up 0``, not as a failed scrape.  (redis-py's own default, ten tries,
#: would take half a minute.)
SCRAPE_RETRIES = 1


class NtpCollector(Collector):
    """Reads the contract on each scrape.

    Parameters
    ----------
    client:
        A ``redis.Redis`` on the service's Redis (:func:`workers.redisurl.connect`'s: replies as text).
    prefix:
        ``ntp_service.key_prefix``.
    nodes:
        Nodes to export even before their first round (``ntp_service.nodes``);
        every node in Redis' node set is exported too.
    stale_after_s:
        Exported as ``chronotick_ntp_stale_after_seconds`` so the stale-node
        alert needs no number of its own (:meth:`workers.config.Config.stale_after_s`;
        :func:`collector_for` gives each node its own).
    stale_after_by_node:
        Nodes whose limit differs (the hub node's rounds are further apart:
        ``ntp_service.hub.measurement_interval``).
    beat_lease_s:
        ``ntp_service.beat_lease_seconds``: the lease's age is this minus its
        remaining time to live (:mod:`orchestrator.leader`).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "chronotick", nodes: tuple[str, ...] = (),
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, beat_lease_s: float = ServiceSettings.beat_lease_seconds,
                 stale_after_by_node: dict[str, float] | None = None):
        self.client = client
        client.set_retry(Retry(NoBackoff(), SCRAPE_RETRIES))  # the exporter's client: its scrapes' policy
        # Each scrape reads Redis: the probe that says, once each, that it lost Redis and that it is back.
        redisurl.outages.watch(redisurl.describe(client))
        self.keys = Keys(prefix)
        self.configured_nodes = tuple(nodes)
        self.stale_after_s = stale_after_s
        self.stale_after_by_node = dict(stale_after_by_node or {})
        self.beat_lease_s = beat_lease_s
        #: The lease's holder and remaining time to live (s), as the last scrape read them.
        self.lease: tuple[str | None, float | None] = (None, None)

    def collect(self):
        up = GaugeMetricFamily(f"{NAMESPACE}_redis_up", "1 if the service's Redis answered this scrape, else 0")
        try:
            snapshot, service_now = self._read()
        except redis.RedisError as exc:
            # Unreachable: once per outage (workers/redisurl.py), not once per scrape.  Anything else each time.
            if redisurl.is_connection_error(exc):
                redisurl.outages.lost(exc)
            else:
                log.warning("scrape: Redis refused the read (%s: %s)", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        redisurl.outages.back()
        up.add_metric([], 1)
        yield up
        yield from self._families(snapshot, service_now)
        yield from self._beat_families()
        try:
            yield from self._relay_families(read_relays(self.client, self.keys.prefix))
        except redis.RedisError as exc:
            if redisurl.is_connection_error(exc):
                redisurl.outages.lost(exc)
            else:
                log.warning("scrape: relay reports unreadable (%s: %s)", type(exc).__name__, exc)

    def _relay_families(self, reports: list[dict]):
        """Each relay port's counts (``chronotick-ntp relay`` with ``CHRONOTICK_REDIS_URL``)."""
        if not reports:
            return
        labels = ["relay", "port", "upstream"]
        values = [[r.get(label, "") for label in labels] for r in reports]
        for name in RELAY_COUNTERS:
            family = CounterMetricFamily(f"{NAMESPACE}_relay_{name}", f"Relay port: {name.replace('_', ' ')}",
                                         labels=labels)
            for r, label_values in zip(reports, values, strict=True):
                family.add_metric(label_values, float(r.get(name) or 0))
            yield family
        age = GaugeMetricFamily(f"{NAMESPACE}_relay_report_age_seconds",
                                "Seconds since the relay port last reported its counts (every 10 s while it runs; "
                                "on Redis' clock)", labels=labels)
        for r, label_values in zip(reports, values, strict=True):
            if r.get("report_age_s") is not None:
                age.add_metric(label_values, float(r["report_age_s"]))
        yield age
        delay = GaugeMetricFamily(f"{NAMESPACE}_relay_added_delay_seconds",
                                  "Delay the relay's hop adds to a round trip, by quantile",
                                  labels=[*labels, "quantile"])
        for r, label_values in zip(reports, values, strict=True):
            for quantile, field in (("0.5", "added_delay_p50_s"), ("0.99", "added_delay_p99_s")):
                if r.get(field):
                    delay.add_metric([*label_values, quantile], float(r[field]))
        yield delay

    def _read(self) -> tuple[dict[str, dict], float]:
        """Every node's data, and Redis' clock (``TIME``) read in the same pipeline, after their ``latest``."""
        found = cast(set[str], self.client.smembers(self.keys.nodes()))  # text: workers.redisurl.connect
        nodes = sorted({*self.configured_nodes, *found})
        pipe = self.client.pipeline(transaction=False)
        for node in nodes:
            pipe.get(self.keys.latest(node))
            pipe.hgetall(self.keys.stats(node))
            pipe.hgetall(self.keys.round_duration(node))
            pipe.xrevrange(self.keys.history(node), count=1)
            pipe.hgetall(self.keys.reach(node))
            pipe.xrevrange(self.keys.late(node), count=1)
            pipe.smembers(self.keys.workers(QUEUE_PREFIX + node))
        pipe.get(self.keys.beat())
        pipe.pttl(self.keys.beat())
        pipe.time()
        *replies, holder, lease_ttl_ms, now = pipe.execute()
        heartbeats = {node: sorted(replies[7 * i + 6]) for i, node in enumerate(nodes)}
        alive = self._alive(heartbeats)
        snapshot = {}
        for i, node in enumerate(nodes):
            latest, stats, durations, newest, reach, late = replies[7 * i:7 * i + 6]
            record = records.expand(json.loads(newest[0][1]["record"])) if newest else None
            if record is not None and late:
                round_id, said = records.late_of(late[0][1])
                if round_id == record["round_id"]:
                    records.with_late(record, said)
            snapshot[node] = {
                "latest": json.loads(latest) if latest else None,
                "stats": {k: int(v) for k, v in stats.items()},
                "durations": {k: float(v) for k, v in durations.items()},
                "record": record,
                "reach": Reach.registers(reach),
                "live_workers": alive[node],
            }
        self.lease = (holder,
                      lease_ttl_ms / 1000 if isinstance(lease_ttl_ms, int) and lease_ttl_ms >= 0 else None)
        return snapshot, time_of(now)

    def _alive(self, heartbeats: dict[str, list[str]]) -> dict[str, int]:
        """How many of each node's workers have a heartbeat that has not expired (:mod:`workers.heartbeat`).

        Read only: the set's expired members are left for the workers' readers to drop.
        """
        pipe = self.client.pipeline(transaction=False)
        for node, hostnames in heartbeats.items():
            for hostname in hostnames:
                pipe.exists(self.keys.worker(QUEUE_PREFIX + node, hostname))
        found = iter(pipe.execute() if any(heartbeats.values()) else [])
        return {node: sum(1 for _ in hostnames if next(found)) for node, hostnames in heartbeats.items()}

    def _beat_families(self):
        """Which beat leads (the lease's holder, :mod:`orchestrator.leader`) and how long since it renewed."""
        holder, remaining = self.lease
        held = GaugeMetricFamily(f"{NAMESPACE}_beat_lease_held", "1 if a beat holds the dispatch lease (one leads), "
                                 "else 0: no round is dispatched")
        held.add_metric([], 0 if holder is None else 1)
        yield held
        who = GaugeMetricFamily(f"{NAMESPACE}_beat_lease_holder", "The beat holding the dispatch lease "
                                "(host:pid:token), 1", labels=["holder"])
        age = GaugeMetricFamily(f"{NAMESPACE}_beat_lease_age_seconds", "Seconds since the leading beat last "
                                "took or renewed its lease (it renews every third of the lease)")
        left = GaugeMetricFamily(f"{NAMESPACE}_beat_lease_remaining_seconds", "Seconds before the lease lapses "
                                 "unless renewed (then a standby beat may take it)")
        if holder is not None:
            who.add_metric([holder], 1)
            if remaining is not None:
                left.add_metric([], remaining)
                age.add_metric([], max(0.0, self.beat_lease_s - remaining))
        yield from (who, age, left)

    def _families(self, snapshot: dict[str, dict], service_now: float):
        def gauge(name, doc, labels=("node",)):
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=list(labels))

        def counter(name, doc, labels=("node",)):
            return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=list(labels))

        offset = gauge("offset_seconds", "Latest published offset, server minus local (true = local + offset)")
        uncertainty = gauge("uncertainty_seconds", "Latest published uncertainty (root distance bound)")
        delay = gauge("delay_seconds", "Round-trip delay of the latest published measurement")
        stratum = gauge("stratum", "Stratum of the server behind the latest published measurement")
        published = gauge("last_publish_timestamp_seconds",
                          "When the latest measurement was published, on the service's (Redis') clock (Unix s)")
        # On Redis' clock, as every age is: the node's own clock (measured_at) may be hours off.
        measured = gauge("last_measurement_timestamp_seconds",
                         "When the latest measurement was published, on the service's (Redis') clock (Unix s)")
        age = gauge("last_measurement_age_seconds",
                    "Seconds since the latest measurement was published, on the service's (Redis') clock")
        stale_after = gauge("stale_after_seconds", "A node whose latest measurement is older than this is stale")
        info = gauge("latest_info", "The server and quality of the latest published measurement",
                     ("node", "server", "quality"))
        rounds = counter("rounds", "Rounds finished, by quality", ("node", "quality"))
        queries = counter("queries", "Attempts to query a server, retries included (advanced mode: one burst each)")
        requests = counter("requests", "NTP request packets sent (advanced mode: every packet of each burst)")
        retries = counter("retries", "Attempts that were retries")
        replies = counter("replies", "NTP reply packets received, refused ones included")
        rejections = counter("rejections", "Replies refused, by reason (sanity checks and gates)",
                             ("node", "reason"))
        failures = counter("failures", "Servers that gave no usable reply in a round, by final reason",
                           ("node", "reason"))
        falsetickers = counter("falsetickers", "Samples outvoted as falsetickers")
        duration = HistogramMetricFamily(f"{NAMESPACE}_round_duration_seconds",
                                         "Round time, dispatch to finish", labels=["node"])
        server_offset = gauge("server_offset_seconds", "Each server's offset in the node's last round",
                              ("node", "server"))
        server_delay = gauge("server_delay_seconds", "Each server's round-trip delay in the node's last round",
                             ("node", "server"))
        server_stratum = gauge("server_stratum", "Each server's stratum in the node's last round",
                               ("node", "server"))
        server_uncertainty = gauge("server_uncertainty_seconds", "Each server's uncertainty in the node's last round",
                                   ("node", "server"))
        server_reach = gauge("server_reach", "Each server's reach register (chrony's): bit 0 the newest round, "
                             "1 where it gave a usable reply", ("node", "server"))
        server_reachable = gauge("server_reachable", "1 if the server gave a usable reply in any of the last "
                                 "eight rounds (reach > 0), else 0", ("node", "server"))
        server_state = gauge("server_state", "1 for each server's state in its newest round (chronotick-ntp "
                             "servers)", ("node", "server", "state"))
        late = counter("late_replies", "Servers still out when their round was published early, counted as "
                       "their outcome came")
        early = counter("early_rounds", "Rounds published before every server had answered")
        workers = gauge("live_workers", "Workers whose heartbeat on the node's queue has not expired (0: nobody "
                        "measures the node)")

        for node, data in snapshot.items():
            stale_after.add_metric([node], self.stale_after_by_node.get(node, self.stale_after_s))
            workers.add_metric([node], data["live_workers"])
            latest = data["latest"]
            if latest is not None:
                offset.add_metric([node], latest["offset"])
                uncertainty.add_metric([node], latest["uncertainty"])
                delay.add_metric([node], latest["delay"])
                stratum.add_metric([node], latest["stratum"])
                published.add_metric([node], latest["published_at"])
                measured.add_metric([node], latest["published_at"])
                latest_age = latest_age_s(latest, service_now)
                if latest_age is not None:
                    age.add_metric([node], latest_age)
                info.add_metric([node, latest["server"], latest["quality"]], 1)
            stats = {**{name: 0 for name in COUNTERS}, **data["stats"]}
            for quality in QUALITIES:
                rounds.add_metric([node, quality], stats[quality])
            queries.add_metric([node], stats["queries"])
            requests.add_metric([node], stats["requests"])
            retries.add_metric([node], stats["retries"])
            replies.add_metric([node], stats["replies"])
            falsetickers.add_metric([node], stats["falsetickers"])
            late.add_metric([node], stats["late"])
            early.add_metric([node], stats["early"])
            for name, value in sorted(stats.items()):
                kind, _, reason = name.partition(":")
                if reason and kind == "rejected":
                    rejections.add_metric([node, reason], value)
                elif reason and kind == "failed":
                    failures.add_metric([node, reason], value)
            hist = data["durations"]
            if hist:
                count = hist.get("count", 0.0)
                buckets = [(str(float(bound)), hist.get(f"le:{bound:g}", 0.0)) for bound in ROUND_DURATION_BUCKETS_S]
                duration.add_metric([node], buckets + [("+Inf", count)], sum_value=hist.get("sum", 0.0))
            record = data["record"]
            entries = {s["server"]: s for s in (record or {}).get("servers", [])}
            for name in sorted({*entries, *data["reach"]}):
                reach = data["reach"].get(name)
                if reach is not None:
                    server_reach.add_metric([node, name], reach.register)
                    server_reachable.add_metric([node, name], 1 if reach.register else 0)
                state = sources.state_of(entries.get(name), reach)
                server_state.add_metric([node, name, state], 1)
            for server in (record or {}).get("servers", []):
                sample = server.get("sample")
                if not sample:
                    continue
                labels = [node, server["server"]]
                server_offset.add_metric(labels, sample["offset_s"])
                server_delay.add_metric(labels, sample["delay_s"])
                server_stratum.add_metric(labels, sample["stratum"])
                server_uncertainty.add_metric(labels, sample["uncertainty_s"])
        yield from (offset, uncertainty, delay, stratum, published, measured, age, stale_after, info, rounds, queries,
                    requests, retries, replies, rejections, failures, falsetickers, early, late, duration,
                    server_offset, server_delay, server_stratum, server_uncertainty, server_reach, server_reachable,
                    server_state, workers)


def collector_for(config: Config, client: redis.Redis) -> NtpCollector:
    """The collector ``chronotick-ntp exporter`` serves for ``config``: its nodes, each with its staleness limit."""
    service = config.service
    return NtpCollector(client, prefix=service.key_prefix, nodes=service.nodes,
                        stale_after_s=config.stale_after_s(),
                        stale_after_by_node={node: config.stale_after_s(node) for node in service.nodes},
                        beat_lease_s=service.beat_lease_seconds)


def registry_for(collector: NtpCollector) -> CollectorRegistry:
    """A registry with only this collector (no process metrics of the exporter itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def split_address(text: str, *, source: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` -> (host, port or ``None``).

    A bare IPv6 address (two colons or more) is a host alone.  ``ValueError``
    names ``source`` (``--address``, the variable) and what is wrong.
    """
    text = text.strip()
    port_text = None
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"{source} {text!r}: not [V6] or [V6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
    if not host:
        raise ValueError(f"{source} {text!r}: no host (HOST, HOST:PORT or [V6]:PORT)")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{source} {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def listen_address(address: str | None, port: int | None, environ: Mapping[str, str]) -> tuple[str, int]:
    """Where the exporter listens: the flags win, then :data:`defaults.ENV_EXPORTER_ADDRESS`, then 127.0.0.1:9124.

    ``address`` (``--address``) replaces the variable whole; ``port``
    (``--port``) replaces whichever port the address gave.  ``--address
    HOST:PORT`` with a different ``--port`` is refused: which was meant?
    """
    if address is not None:
        host, given_port = split_address(address, source="--address")
        if port is not None and given_port is not None and port != given_port:
            raise ValueError(f"--address {address} says port {given_port}, --port says {port}")
    elif environ.get(defaults.ENV_EXPORTER_ADDRESS, "").strip():
        host, given_port = split_address(environ[defaults.ENV_EXPORTER_ADDRESS],
                                         source=f"${defaults.ENV_EXPORTER_ADDRESS}")
    else:
        host, given_port = defaults.EXPORTER_ADDRESS, None
    if port is not None:
        return host, port
    return host, defaults.EXPORTER_PORT if given_port is None else given_port

