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
        server, 3 samples a round, and it never warms up: its rounds come
        every ``max(normal interval, hub.measurement_interval)``
        (``Config.normal_interval_of``).  ChronoTick's ARES file has no hub,
        so ``HubSettings``' defaults: 64 s, and with ARES' 120 s normal
        interval the head's rounds are 120 s apart.  The nodes measure the
        hub's LAN server alone.  Before an attempt of the head's sends
        anything, it takes places for its whole burst in the public server's
        window (:func:`take_places`, the rule of workers/politeness.py's Redis
        script): at most ``hub.max_requests_per_minute`` (12) in any 60 s and
        ``hub.max_requests_per_10_minutes`` (40) in any 10 minutes, all or
        nothing; an attempt that finds no room sends nothing and fails
        ``politeness_limit``, not retried.  Three rows: every request
        answered; the worst case, every attempt unanswered and retried at 5
        and 15 s (ARES: ``retry_delay`` 5 s, ``max_retries`` 3; attempts start
        at 0, 5 and 15 s); and that worst case without the budget: what the
        head would send if the budget were not enforced, which is not what
        happens.  The reach register, which stops retrying a server silent
        for 8 rounds (orchestrator/sources.py), is left out: the worst case.

Columns: the nodes' requests in the worst 60 s (to the relay's port for that
server, or to the hub's LAN server); what the public server receives in the
worst 60 s and the worst 10 minutes (any window, not calendar minutes; times
counted in whole ms), with the hub's limits beside them
(``hub.max_requests_per_minute`` 12, ``hub.max_requests_per_10_minutes`` 40);
the relay's forwarded and policy-refused requests over the whole run; the
head's attempts the budget refused, and its rounds whose first attempt got out
(was not refused), over the whole run; and a node's warm-up: its rounds with a
sample from this server, the median node.  Deterministic: the figures are
counts of one run, not measurements.

Run:  python -m bench.politeness [--minutes 30] [--nodes 10 100 1000] [--burst N --min-interval S]
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from dataclasses import dataclass, field, replace

from bench.harness import REPO, parser
from orchestrator.scheduler import phase_slot
from relay.limits import FORWARD, OVER_BUDGET, ClientLimits, UpstreamLimit
from relay.settings import DEFAULT_CLIENT_BURST, DEFAULT_CLIENT_INTERVAL_S, Mapping, load_mappings
from workers import config as config_mod
from workers.config import Config, HubSettings
from workers.kod import KissMemory
from workers.politeness import MINUTE_MS, TEN_MINUTES_MS, Budget  # (no redis: the rule is mirrored)
from workers.retry import ADVANCED_SAMPLE_SPACING_S, RATE, RetryPolicy, rate_backoff_for

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
    hub_rounds: int = 0                                  # the head's rounds
    hub_first_out: int = 0                               # ... whose first attempt was sent
    hub_attempts: int = 0                                # the head's attempts (those the budget refused included)
    budget_refused: int = 0                              # ... that the budget refused: nothing sent

    def answered_share(self) -> float:
        """The median node's share of its rounds after the warm-up that got a sample (%)."""
        return statistics.median(100 * a / r if r else 0.0 for a, r in zip(self.normal_answered, self.normal_rounds,
                                                                            strict=True))


def samples_of(config: Config) -> int:
    return RetryPolicy.from_settings(config.ntp).samples


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
    policy = RetryPolicy.from_settings(config.ntp, rate_backoff_s=rate_backoff_for(config.timing.normal_interval_s))
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
                memories[node].record(server, RATE, config_id=config_id, policy=policy)
                continue  # the relay's RATE kiss ends the burst: the attempt fails kod_rate, not retried
        if k + 1 < samples:
            heapq.heappush(events, (at + ADVANCED_SAMPLE_SPACING_S, next(order), node, k + 1, warm))
        elif forwarded_in_round[node]:
            if warm:
                run.warm_up_answered[node] += 1
            else:
                run.normal_answered[node] += 1
    return run


def take_places(window: tuple[int, ...], now_ms: int, requests: int,
                budget: Budget) -> tuple[bool, tuple[int, ...]]:
    """``(granted, the window after)``: the rule of the Redis script in workers/politeness.py (``_TAKE``), pure.

    ``window`` holds when each request still counted took its place (ms, as the sorted set's scores).
    Places taken 10 minutes or more before ``now_ms`` are dropped (``ZREMRANGEBYSCORE -inf now-600000``);
    the last minute counts from ``now_ms`` - 60,000, that instant included (``ZCOUNT now-60000 +inf``).
    If ``requests`` more fit in both the minute's and the 10 minutes' budget, all of them take a place at
    ``now_ms``; else none does, and the attempt sends nothing.
    """
    kept = tuple(t for t in window if t > now_ms - TEN_MINUTES_MS)
    in_minute = sum(t >= now_ms - MINUTE_MS for t in kept)
    if in_minute + requests > budget.per_minute or len(kept) + requests > budget.per_10_minutes:
        return False, kept
    return True, kept + (now_ms,) * requests


def from_hub(config: Config, hub: HubSettings, nodes: int, horizon_s: float, *, retried: bool,
             budgeted: bool = True) -> Run:
    """The head alone measures the public server, within its budget unless not ``budgeted``; the nodes'
    rounds go to the hub's LAN server."""
    samples = samples_of(config)
    run = Run(warm_up_answered=[0] * nodes, normal_rounds=[0] * nodes, normal_answered=[0] * nodes)
    offsets = RetryPolicy.from_settings(config.ntp).offsets_s if retried else [0.0]
    budget = Budget(hub.max_requests_per_minute, hub.max_requests_per_10_minutes)
    window: tuple[int, ...] = ()
    start, interval_s = 0.0, hub_interval_s(config, hub)
    while start < horizon_s:  # the head's rounds, one interval apart: it never warms up
        run.hub_rounds += 1
        for no, offset in enumerate(offsets):  # worst case (retried): every attempt unanswered
            at = start + offset
            run.hub_attempts += 1
            if budgeted:
                granted, window = take_places(window, round(at * 1000), samples, budget)
                if not granted:
                    run.budget_refused += 1
                    break  # politeness_limit: nothing sent, not retried
            run.hub_first_out += no == 0
            run.received += [at + k * ADVANCED_SAMPLE_SPACING_S for k in range(samples)]
        start += interval_s
    for i in range(nodes):
        for t, warm in round_starts(config, i, nodes, horizon_s):
            run.asked += [t + k * ADVANCED_SAMPLE_SPACING_S for k in range(samples)]
            # On the LAN: no public server's budget in the way.
            run.warm_up_answered[i] += warm
            run.normal_rounds[i] += not warm
            run.normal_answered[i] += not warm
    return run


def hub_interval_s(config: Config, hub: HubSettings) -> float:
    """How far apart the head's rounds are: the service's rule (``Config.normal_interval_of``) with ``hub``."""
    return replace(config, service=replace(config.service, hub=hub)).normal_interval_of(hub.node)


def most_in_any(times: list[float], window_s: float) -> int:
    """The most of ``times`` in any window ``[t, t + window_s)``, counted in whole ms (as Redis' scores are):
    in float seconds, 1080.1 - 600 falls just short of 480.1, and a window would hold one request too many."""
    ordered, span, most, first = sorted(round(t * 1000) for t in times), round(window_s * 1000), 0, 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - span:
            first += 1
        most = max(most, last - first + 1)
    return most


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--minutes", type=float, default=30.0, help="simulated time from a cold start (default 30)")
    arguments.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000], help="cluster sizes")
    arguments.add_argument("--burst", type=int, default=None, help="the relay's upstream_burst (default: its default)")
    arguments.add_argument("--min-interval", type=float, default=None,
                        help="the relay's min_interval_s (default: its default)")
    args = arguments.parse_args()
    config = config_mod.load(ARES)
    mapping = load_mappings(PROXY)[0]  # every mapping of ChronoTick's file has the relay's defaults
    mapping = replace(mapping, upstream_burst=args.burst or mapping.upstream_burst,
                      min_interval_s=args.min_interval or mapping.min_interval_s)
    hub, hub_from = config.service.hub, "the config's ntp_service.hub"
    if hub is None:
        hub, hub_from = HubSettings(address="hub.invalid", node="head"), "HubSettings' defaults: the file has no hub"
    horizon_s = args.minutes * 60
    timing = config.timing
    warm_rounds = int(timing.warm_up_duration_s / timing.warm_up_interval_s)
    samples, offsets = samples_of(config), RetryPolicy.from_settings(config.ntp).offsets_s
    print(f"requests one public server receives from the whole cluster: relay against hub "
          f"({args.minutes:g} simulated minutes from a cold start)")
    print(f"ChronoTick's ARES timing: {config.ntp.measurement_mode}, {samples} samples "
          f"{ADVANCED_SAMPLE_SPACING_S:g} s apart a server a round; warm-up every {timing.warm_up_interval_s:g} s "
          f"for {timing.warm_up_duration_s:g} s, then every {timing.normal_interval_s:g} s; every node warming up "
          "at once")
    print(f"relay: burst {mapping.upstream_burst}, then one per {mapping.min_interval_s:g} s, RATE kiss past it")
    print(f"hub ({hub_from}): hub.measurement_interval {hub.measurement_interval:g} s, so the head's round every "
          f"max({timing.normal_interval_s:g}, {hub.measurement_interval:g}) = {hub_interval_s(config, hub):g} s, "
          f"no warm-up; worst-case retries at {', '.join(f'{o:g}' for o in offsets)} s")
    print(f"hub budget, enforced in Redis (workers/politeness.py): each attempt takes places for its {samples} "
          f"requests in any 60 s ({hub.max_requests_per_minute}) and any 10 minutes "
          f"({hub.max_requests_per_10_minutes}), all or nothing; no room: nothing sent, politeness_limit, "
          "not retried\n")
    print(f"{'':>34}{'nodes send':>12}{'public server receives':>27}{'within':>9}{'relay: forwarded /':>21}"
          f"{'hub: attempts':>16}{'hub: rounds, 1st':>18}{'a node, median: rounds answered':>34}")
    print(f"{'nodes':>6}  {'path':<26}{'worst 60 s':>12}{'worst 60 s':>13}{'worst 10 min':>14}{'12 / 40':>9}"
          f"{'policy-refused':>21}{'budget-refused':>16}{'attempt out':>18}{'in its warm-up':>17}{'after it':>17}")
    limit_minute, limit_ten = hub.max_requests_per_minute, hub.max_requests_per_10_minutes
    for nodes in args.nodes:
        rows = [("relay", through_relay(config, mapping, nodes, horizon_s)),
                ("hub, every reply", from_hub(config, hub, nodes, horizon_s, retried=False)),
                ("hub, worst-case retries", from_hub(config, hub, nodes, horizon_s, retried=True)),
                ("hub, retries, no budget *", from_hub(config, hub, nodes, horizon_s, retried=True, budgeted=False))]
        for name, run in rows:
            minute, ten = most_in_any(run.received, MINUTE_S), most_in_any(run.received, TEN_MINUTES_S)
            within = "yes" if minute <= limit_minute and ten <= limit_ten else "NO"
            refused = f"{len(run.received):,} / {run.policy_refused:,}" if name == "relay" else "-"
            budgeted = name.startswith("hub") and not name.endswith("*")
            budget_refused = f"{run.budget_refused} of {run.hub_attempts}" if budgeted else "-"
            first_out = f"{100 * run.hub_first_out / run.hub_rounds:.0f} % of {run.hub_rounds}" if budgeted else "-"
            lan = "" if name == "relay" else " (LAN)"
            warm_up = f"{statistics.median(run.warm_up_answered):g} of {warm_rounds}{lan}"
            after = f"{run.answered_share():.0f} %{lan}"
            print(f"{nodes:>6,}  {name:<26}{most_in_any(run.asked, MINUTE_S):>12,}{minute:>13,}{ten:>14,}{within:>9}"
                  f"{refused:>21}{budget_refused:>16}{first_out:>18}{warm_up:>17}{after:>17}")
            if run.silent:
                print(f"{'':>8}({run.silent:,} requests got nothing: over the client's own limit)")
    print(f"{'':>6}  {'the hub limits (item 2)':<26}{'':>12}{limit_minute:>13}{limit_ten:>14}")
    print("\n* not what happens: what the head would send if its budget were not enforced "
          "(workers/politeness.py refuses the attempts past it)")
    print("the public servers' rules: NIST, never more than once every 4 s (15 a minute, 150 in 10 minutes); "
          "chrony, not below 64 s (minpoll 6) to a public server; the Pool answers fast clients with RATE")


if __name__ == "__main__":
    main()
