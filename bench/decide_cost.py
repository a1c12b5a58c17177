"""What one call of the early decider costs: ``orchestrator.early.decide``, once per outcome, rounds of 10 and 40.

The worker may ask the decider after each outcome of a round (issue #24: at
most 0.2 ms a call).  This times exactly those calls, for ``best`` and
``combine``, on two shapes of round:

homelab     shaped like ChronoTick's homelab (``configs/config_homelab_2min_ntp.yaml``:
            its strict gate, ``enable_fallback``, Google's four servers as one
            group among ten; a round of 40 is four such tens, four groups of
            four).  Servers 10..70 ms away whose tasks start 0.75 ms apart, one
            falseticker 50 ms off, one 200 ms away (over the strict gate), one
            that failed at once (a kiss), one dead (still out; once every other
            server is in, its first attempt fails with a retry to come).  Asked
            at every outcome (with groups, the worker asks from the first).
equal       ``bench/round_scaling.py``'s rounds: every server 20 ms away, no
            groups, its gate (0.5 s); asked once the answers in hand could
            outvote the rest, as the worker does.

At each outcome, in the order they land, ``decide`` gets the outcomes in hand
and every other server outstanding with the bound its request has earned by
then (``(time out - 5 ms) / 2``; 0 for a task not started), until the call that
publishes the round: the worker asks no more once it is published.  Arguments
are built before the clock starts; only the call is timed.  Every call is
timed once per pass, the passes interleaving the four cases, and a call's cost
is its median over the passes (a pass preempted by another process on this
shared machine does not count); median and p99 are over the calls.

Only the decider's public surface is used (``early.decide``, ``early.Outstanding``),
so the benchmark measures whatever implementation is in place.

Run:  python -m bench.decide_cost [--rounds 200] [--passes 7]
"""

from __future__ import annotations

import random
import statistics
import time

from bench.harness import REPO, parser, quantile
from orchestrator.early import Outstanding, decide
from workers import config as config_mod
from workers.quality import Thresholds

HOMELAB = REPO / "configs" / "config_homelab_2min_ntp.yaml"

#: The target per call (issue #24, item 3).
TARGET_S = 0.2e-3

#: What a request out ``e`` seconds has earned: ``(e - HOLD) / 2`` (workers.inflight's hold allowance).
HOLD_S = 0.005

#: Tasks of a round start this far apart on one worker (bench/round_breakdown.py: about 0.75 ms).
START_SPACING_S = 0.00075

#: bench/round_scaling.py's servers, and its gate (``max_delay``, ``max_acceptable_uncertainty``: 0.5 s).
EQUAL_DELAY_S = 0.020
EQUAL_GATE = Thresholds(max_delay_s=0.5, max_uncertainty_s=0.5, min_stratum=1, max_stratum=15)


def ok(server: str, *, delay: float, unc: float, stratum: int = 2, offset: float = 0.001) -> dict:
    """An outcome as a query task returns it (tests/unit/samples.py's shape, with a burst's fields)."""
    sample = {"server": server, "offset_s": offset, "delay_s": delay, "uncertainty_s": unc, "stratum": stratum,
              "leap": 0, "root_delay_s": 0.0, "root_dispersion_s": 0.0, "precision_s": 1e-7,
              "address": "127.0.0.1", "port": 123, "measured_at": 1.0, "nts": False, "samples_taken": 4,
              "burst_delays_s": [delay] * 4, "jitter_s": 0.0, "spread_s": 0.0}
    return {"summary": f"ok {offset * 1e3:+.3f} ms", "status": "ok", "server": server, "sample": sample,
            "attempts": 1, "history": [{"attempt": 1, "reason": None}], "worker": "bench@host"}


def failed(server: str, reason: str = "timeout", attempts: int = 3) -> dict:
    return {"summary": f"failed: {reason}", "status": "failed", "server": server, "reason": reason, "detail": "",
            "kiss_code": None, "attempts": attempts,
            "history": [{"attempt": i + 1, "reason": reason} for i in range(attempts)], "worker": "bench@host"}


def homelab():
    """The homelab config's strict gate, fallback, and its ten servers with their one group."""
    ntp = config_mod.load(HOMELAB).ntp
    names = [s.name for s in ntp.servers]
    return Thresholds.from_settings(ntp), ntp.enable_fallback, names, [list(g) for g in ntp.server_groups]


def shaped(n: int, names: list[str], groups: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """``n`` servers (a multiple of ten): ``n // 10`` copies of the homelab's ten, each with its group."""
    copies = n // len(names)
    servers = [f"{name}#{c}" if c else name for c in range(copies) for name in names]
    return servers, [[f"{m}#{c}" if c else m for m in g] for c in range(copies) for g in groups]


def homelab_round(rng: random.Random, servers: list[str]) -> list[tuple[list[dict], list[Outstanding]]]:
    """One homelab-shaped round's decider calls: at each outcome, (outcomes in hand, the rest with bounds)."""
    truth = rng.uniform(-0.005, 0.005)
    order = servers[:]
    rng.shuffle(order)  # the order the tasks start in
    falseticker, dead, slow, kissed = order[1], order[2], order[3], order[4]
    events = []  # (time it lands, outcome)
    started = {}
    for i, server in enumerate(order):
        start = i * START_SPACING_S
        started[server] = start
        if server == dead:
            continue  # its first attempt times out after 2 s: still out when the round is decided
        if server == kissed:
            events.append((start + 0.001, failed(server, "kod_rate", attempts=1)))
            continue
        delay = 0.200 if server == slow else rng.uniform(0.010, 0.070)
        unc = delay / 2 + rng.uniform(0.0005, 0.003)
        offset = truth + (0.050 if server == falseticker else rng.uniform(-0.3, 0.3) * delay / 2)
        events.append((start + delay, ok(server, delay=delay, unc=unc, offset=offset,
                                         stratum=rng.choice((1, 1, 2, 2, 3)))))
    calls = _calls(events, started, order, ask_from=1)
    # And once the dead server's first attempt has failed, a retry to come (2 s in, everything else in).
    calls.append(([o for _, o in sorted(events, key=lambda e: e[0])], [Outstanding(dead, 0.0, retrying=True)]))
    return calls


def equal_round(rng: random.Random, servers: list[str]) -> list[tuple[list[dict], list[Outstanding]]]:
    """One of bench/round_scaling.py's rounds (every server 20 ms away, no groups): the calls the worker makes."""
    events, started = [], {}
    for i, server in enumerate(servers):
        started[server] = start = i * START_SPACING_S
        delay = EQUAL_DELAY_S + rng.uniform(0.0002, 0.0008)
        events.append((start + delay, ok(server, delay=delay, unc=delay / 2 + 0.0001,
                                         offset=rng.uniform(-0.0001, 0.0001))))
    return _calls(events, started, servers, ask_from=(len(servers) + 1) // 2)


def _calls(events: list, started: dict[str, float], order: list[str], *, ask_from: int) -> list:
    """At each outcome from the ``ask_from``-th on: (outcomes in hand, the rest outstanding with their bounds)."""
    events = sorted(events, key=lambda e: e[0])
    calls, in_hand = [], []
    for at, outcome in events:
        in_hand.append(outcome)
        answered = {o["server"] for o in in_hand}
        outstanding = [Outstanding(s, max(0.0, at - started[s] - HOLD_S) / 2 if started[s] <= at else 0.0)
                       for s in order if s not in answered]
        if outstanding and len(in_hand) >= ask_from:
            calls.append((list(in_hand), outstanding))
    return calls


def asked(rounds: list, strict: Thresholds, fallback: bool, method: str, groups: list[list[str]]) -> list:
    """Every round's calls up to and including the first that publishes it (found here, not timed)."""
    calls = []
    for round_ in rounds:
        for outcomes, outstanding in round_:
            calls.append((outcomes, outstanding))
            if decide(outcomes, outstanding, strict=strict, enable_fallback=fallback, method=method,
                      groups=groups, auth_select="mix", parallel=True).publish:
                break
    return calls


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=200, help="random rounds per case")
    arguments.add_argument("--passes", type=int, default=7, help="interleaved passes over every case's calls")
    arguments.add_argument("--seed", type=int, default=24)
    args = arguments.parse_args()
    strict, fallback, names, groups = homelab()
    rng = random.Random(args.seed)
    cases = {}  # (shape, servers, method) -> (calls, gate, enable_fallback, groups)
    for n in (10, 40):
        servers, server_groups = shaped(n, names, groups)
        homelab_rounds = [homelab_round(rng, servers) for _ in range(args.rounds)]
        plain = [f"10.0.0.{i}:123" for i in range(n)]
        equal_rounds = [equal_round(rng, plain) for _ in range(args.rounds)]
        for method in ("best", "combine"):
            cases[("homelab", n, method)] = (asked(homelab_rounds, strict, fallback, method, server_groups),
                                             strict, fallback, server_groups)
            cases[("equal", n, method)] = (asked(equal_rounds, EQUAL_GATE, True, method, []), EQUAL_GATE, True, [])
    timings: dict[tuple, list[list[float]]] = {key: [[] for _ in cases[key][0]] for key in cases}
    for p in range(args.passes):
        for key in (list(cases) if p % 2 == 0 else list(cases)[::-1]):
            calls, gate, fallback_on, server_groups = cases[key]
            for took, (outcomes, outstanding) in zip(timings[key], calls, strict=True):
                started = time.perf_counter_ns()
                decide(outcomes, outstanding, strict=gate, enable_fallback=fallback_on, method=key[2],
                       groups=server_groups, auth_select="mix", parallel=True)
                took.append((time.perf_counter_ns() - started) / 1e9)
    print(f"orchestrator.early.decide, one call per outcome the worker asks about: {args.rounds} random rounds a "
          f"case, {args.passes} interleaved passes, a call's cost its median over them "
          f"(target <= {TARGET_S * 1e6:.0f} us a call)\n")
    print(f"  {'shape':>7} {'servers':>7} {'method':>8} {'calls/round':>12} {'median':>10} {'p99':>10} {'max':>10}  "
          "target (median, p99)")
    for shape, n, method in sorted(timings, key=lambda k: (k[0] != "homelab", k[1], k[2])):
        per_call = timings[(shape, n, method)]
        ordered = sorted(statistics.median(passes) for passes in per_call)
        p99 = quantile(ordered, 0.99)
        median = statistics.median(ordered)
        per_round = len(cases[(shape, n, method)][0]) / args.rounds
        print(f"  {shape:>7} {n:>7} {method:>8} {per_round:>12.1f} {median * 1e6:>7.1f} us {p99 * 1e6:>7.1f} us "
              f"{ordered[-1] * 1e6:>7.1f} us  {'met' if median <= TARGET_S else 'NOT met'}, "
              f"{'met' if p99 <= TARGET_S else 'NOT met'}")


if __name__ == "__main__":
    main()
