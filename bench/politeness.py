"""What one public server receives from the whole cluster, a minute, for 10 / 100 / 1,000 nodes: relay against hub.

Simulated time, no packets (issue #26, item 9).  ChronoTick's ARES timing, read
from configs/config_ares_2min_ntp.yaml: advanced mode, 3 samples 0.1 s apart
per server per round; a warm-up of one round every 1 s for 60 s, then a round
every 120 s at the node's phase (``orchestrator.scheduler.phase_slot``).  Every
node starts its warm-up at the same instant: the worst case.  The public
servers are all alike, so one is followed.

relay   Every node measures the public server through the head node's relay
        (configs/ntp_proxy_config.yaml, so the relay's defaults).  Each request
        goes through the relay's own limiter code (relay/limits.py: the
        client's bucket, then the upstream's ``UpstreamLimit``), in the order
        ``relay.server.PortRelay.from_client`` applies them.  A request over
        the upstream's budget is policy-refused with the relay's RATE kiss,
        and the node reacts as its worker does: the burst stops at the kiss
        (workers/measure.py), the attempt is not retried, and the server is
        left alone for 4 normal intervals, doubling for each further RATE
        (``workers.kod.KissMemory`` on the simulated clock).  The upstream
        answers whatever reaches it.
hub     Only the head node (``ntp_service.hub.node``) measures the public
        server: a round every ``hub.measurement_interval`` (64 s), warm-up or
        not, 3 samples a round.  The nodes measure the hub's LAN server alone.
        Twice: every request answered; and the worst case, every attempt
        unanswered and retried at 5 and 15 s (ARES: ``retry_delay`` 5 s,
        ``max_retries`` 3; attempts start at 0, 5 and 15 s).

Columns: the nodes' requests in the worst 60 s (to the relay's port for that
server, or to the hub's LAN server); what the public server receives in the
worst 60 s and the worst 10 minutes (any window, not calendar minutes), with
the hub's limits beside them (``hub.max_requests_per_minute`` 12,
``hub.max_requests_per_10_minutes`` 40); the relay's forwarded and
policy-refused requests over the whole run; and a node's warm-up: its rounds
with a sample from this server, the median node.  Deterministic: the figures
are counts of one run, not measurements.

Run:  python bench/politeness.py [--minutes 30] [--nodes 10 100 1000] [--burst N --min-interval S]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.rounds import RATE_BACKOFF_INTERVALS  # noqa: E402
from orchestrator.scheduler import phase_slot  # noqa: E402
from relay.config import DEFAULT_CLIENT_BURST, DEFAULT_CLIENT_INTERVAL_S, Mapping, load_mappings  # noqa: E402
from relay.limits import FORWARD, OVER_BUDGET, ClientLimits, UpstreamLimit  # noqa: E402
from workers import config as config_mod  # noqa: E402
from workers.config import Config, HubSettings  # noqa: E402
from workers.kod import RATE, KissMemory  # noqa: E402
from workers.measure import ADVANCED_SAMPLE_SPACING_S, attempt_offsets_s  # noqa: E402

ARES = REPO / "configs" / "config_ares_2min_ntp.yaml"
PROXY = REPO / "configs" / "ntp_proxy_config.yaml"
MINUTE_S, TEN_MINUTES_S = 60.0, 600.0


@dataclass
class Run:
    """One path for one cluster: when requests were sent, and what became of them."""

    asked: list[float] = field(default_factory=list)     # the nodes' requests toward the server (relay port or LAN)
    received: list[float] = field(default_factory=list)  # what the public server received
    policy_refused: int = 0
    silent: int = 0                                      # requests that got nothing (the client's own bucket)
    warm_up_answered: list[int] = field(default_factory=list)  # per node, warm-up rounds with a sample
    normal_rounds: list[int] = field(default_factory=list)     # per node, rounds after its warm-up
    normal_answered: list[int] = field(default_factory=list)   # ... and those with a sample

    def answered_share(self) -> float:
        """The median node's share of its rounds after the warm-up that got a sample (%)."""
        return statistics.median(100 * a / r if r else 0.0 for a, r in zip(self.normal_answered, self.normal_rounds,
                                                                            strict=True))


def samples_of(config: Config) -> int:
    ntp = config.ntp
    return ntp.advanced_samples if ntp.measurement_mode == "advanced" else 1


def round_starts(config: Config, index: int, nodes: int, horizon_s: float) -> list[tuple[float, bool]]:
    """Node ``index``'s round starts ``(t, in its warm-up)``: the warm-up from 0 (every node at once), then its
    phase slots (node i of n at i/n of the normal interval, as the beat keeps them)."""
    timing = config.timing
    rounds = int(timing.warm_up_duration_s / timing.warm_up_interval_s)
    starts = [(k * timing.warm_up_interval_s, True) for k in range(rounds)]
    t = phase_slot(timing.warm_up_duration_s, index, nodes, timing.normal_interval_s, strictly=False)
    while t < horizon_s:
        starts.append((t, False))
        t += timing.normal_interval_s
    return starts


def through_relay(config: Config, mapping: Mapping, nodes: int, horizon_s: float) -> Run:
    """Every node's rounds to one relay port, through the relay's limiter on simulated time."""
    samples = samples_of(config)
    run = Run(warm_up_answered=[0] * nodes, normal_rounds=[0] * nodes, normal_answered=[0] * nodes)
    clients = ClientLimits(DEFAULT_CLIENT_INTERVAL_S, DEFAULT_CLIENT_BURST)
    upstream = UpstreamLimit(mapping.min_interval_s, mapping.upstream_burst, mapping.rate_backoff_s, now=0.0)
    now = [0.0]
    memories = [KissMemory(clock=lambda: now[0], wall_clock=lambda: now[0]) for _ in range(nodes)]
    rate_backoff_s = RATE_BACKOFF_INTERVALS * config.timing.normal_interval_s  # as orchestrator.rounds sets it
    server, config_id = f"{mapping.ntp_server}:{mapping.listen_port}", config.ntp.config_id
    order = itertools.count()
    events = [(t, next(order), i, 0, warm)  # when, order, node, sample of the burst, in the warm-up
              for i in range(nodes) for t, warm in round_starts(config, i, nodes, horizon_s)]
    heapq.heapify(events)
    forwarded_in_round = [0] * nodes
    while events:
        at, _, node, k, warm = heapq.heappop(events)
        now[0] = at
        if k == 0:
            run.normal_rounds[node] += not warm
            if memories[node].refusal(server, config_id=config_id):
                continue  # kod_backoff: the worker sends that server nothing
            forwarded_in_round[node] = 0
        run.asked.append(at)
        if not clients.allow(f"node-{node}", at):
            run.silent += 1  # nothing comes back: a timeout at the node
        else:
            verdict = upstream.admit(at)
            if verdict == FORWARD:
                run.received.append(at)
                forwarded_in_round[node] += 1
            else:
                assert verdict == OVER_BUDGET  # the upstream never kisses here
                run.policy_refused += 1
                memories[node].record(server, RATE, config_id=config_id, rate_backoff_s=rate_backoff_s)
                continue  # the relay's RATE kiss ends the burst: the attempt fails kod_rate, not retried
        if k + 1 < samples:
            heapq.heappush(events, (at + ADVANCED_SAMPLE_SPACING_S, next(order), node, k + 1, warm))
        elif forwarded_in_round[node]:
            if warm:
                run.warm_up_answered[node] += 1
            else:
                run.normal_answered[node] += 1
    return run


def from_hub(config: Config, hub: HubSettings, nodes: int, horizon_s: float, *, retried: bool) -> Run:
    """The head alone measures the public server; the nodes' rounds go to the hub's LAN server."""
    samples = samples_of(config)
    run = Run(warm_up_answered=[0] * nodes, normal_rounds=[0] * nodes, normal_answered=[0] * nodes)
    offsets = attempt_offsets_s(config.ntp.retry_waits_s) if retried else [0.0]
    start = 0.0
    while start < horizon_s:  # the head's rounds, warm-up or not, one measurement_interval apart
        run.received += [start + offset + k * ADVANCED_SAMPLE_SPACING_S for offset in offsets for k in range(samples)]
        start += hub.measurement_interval
    for i in range(nodes):
        for t, warm in round_starts(config, i, nodes, horizon_s):
            run.asked += [t + k * ADVANCED_SAMPLE_SPACING_S for k in range(samples)]
            # On the LAN: no public server's budget in the way.
            run.warm_up_answered[i] += warm
            run.normal_rounds[i] += not warm
            run.normal_answered[i] += not warm
    return run


def most_in_any(times: list[float], window_s: float) -> int:
    """The most of ``times`` in any window ``[t, t + window_s)``."""
    ordered, most, first = sorted(times), 0, 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated time from a cold start (default 30)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000], help="cluster sizes")
    parser.add_argument("--burst", type=int, default=None, help="the relay's upstream_burst (default: its default)")
    parser.add_argument("--min-interval", type=float, default=None,
                        help="the relay's min_interval_s (default: its default)")
    args = parser.parse_args()
    config = config_mod.load(ARES)
    mapping = load_mappings(PROXY)[0]  # every mapping of ChronoTick's file has the relay's defaults
    mapping = replace(mapping, upstream_burst=args.burst or mapping.upstream_burst,
                      min_interval_s=args.min_interval or mapping.min_interval_s)
    hub = config.service.hub or HubSettings(address="hub.invalid", node="head")
    horizon_s = args.minutes * 60
    timing = config.timing
    warm_rounds = int(timing.warm_up_duration_s / timing.warm_up_interval_s)
    print(f"requests one public server receives from the whole cluster: relay against hub "
          f"({args.minutes:g} simulated minutes from a cold start)")
    print(f"ChronoTick's ARES timing: {config.ntp.measurement_mode}, {samples_of(config)} samples "
          f"{ADVANCED_SAMPLE_SPACING_S:g} s apart a server a round; warm-up every {timing.warm_up_interval_s:g} s "
          f"for {timing.warm_up_duration_s:g} s, then every {timing.normal_interval_s:g} s; every node warming up "
          "at once")
    print(f"relay: burst {mapping.upstream_burst}, then one per {mapping.min_interval_s:g} s, RATE kiss past it; "
          f"hub: the head's round every {hub.measurement_interval:g} s, worst-case retries at "
          f"{', '.join(f'{o:g}' for o in attempt_offsets_s(config.ntp.retry_waits_s))} s\n")
    print(f"{'':>34}{'nodes send':>12}{'public server receives':>27}{'within':>9}{'relay: forwarded /':>21}"
          f"{'a node, median: rounds answered':>34}")
    print(f"{'nodes':>6}  {'path':<26}{'worst 60 s':>12}{'worst 60 s':>13}{'worst 10 min':>14}{'12 / 40':>9}"
          f"{'policy-refused':>21}{'in its warm-up':>17}{'after it':>17}")
    limit_minute, limit_ten = hub.max_requests_per_minute, hub.max_requests_per_10_minutes
    for nodes in args.nodes:
        rows = [("relay", through_relay(config, mapping, nodes, horizon_s)),
                ("hub, every reply", from_hub(config, hub, nodes, horizon_s, retried=False)),
                ("hub, worst-case retries", from_hub(config, hub, nodes, horizon_s, retried=True))]
        for name, run in rows:
            minute, ten = most_in_any(run.received, MINUTE_S), most_in_any(run.received, TEN_MINUTES_S)
            within = "yes" if minute <= limit_minute and ten <= limit_ten else "NO"
            refused = f"{len(run.received):,} / {run.policy_refused:,}" if name == "relay" else "-"
            lan = "" if name == "relay" else " (LAN)"
            warm_up = f"{statistics.median(run.warm_up_answered):g} of {warm_rounds}{lan}"
            after = f"{run.answered_share():.0f} %{lan}"
            print(f"{nodes:>6,}  {name:<26}{most_in_any(run.asked, MINUTE_S):>12,}{minute:>13,}{ten:>14,}{within:>9}"
                  f"{refused:>21}{warm_up:>17}{after:>17}")
            if run.silent:
                print(f"{'':>8}({run.silent:,} requests got nothing: over the client's own limit)")
    print(f"{'':>6}  {'the hub limits (item 2)':<26}{'':>12}{limit_minute:>13}{limit_ten:>14}")
    print("\nthe public servers' rules: NIST, never more than once every 4 s (15 a minute, 150 in 10 minutes); "
          "chrony, not below 64 s (minpoll 6) to a public server; the Pool answers fast clients with RATE")


if __name__ == "__main__":
    main()
