"""What the agreement rule buys and costs: the published bound against the truth, on random rounds.

Two rules, on the same random rounds:

* ``deepest``  -- the previous rule (chrony's ``sources.c`` sweep as it stands): the
  region most intervals cover; truechimers contain it or lie inside it; publish
  the tightest truechimer with its own bound.
* ``majority`` -- this project's rule (:mod:`orchestrator.selection`): the hull of
  every point a majority covers; falsetickers miss it; publish the truechimer
  whose bound, widened to cover it, is smallest.

Rows: rounds where a majority of servers is honest but some lie (the bound must
still hold the truth: how often it does not), and all-honest rounds of
internet-like servers (what the guarantee costs in published uncertainty).

Run:  python -m bench.agreement [--rounds 5000]
"""

from __future__ import annotations

import random
import statistics

from bench.harness import parser, quantile
from orchestrator import selection
from workers.contracts import Selection
from workers.quality import Thresholds

LOOSE = Thresholds(max_delay_s=1.0, max_uncertainty_s=1.0, min_stratum=1, max_stratum=15)


def deepest_rule(samples: list[dict]) -> dict | None:
    """The previous rule, for comparison: Marzullo's deepest region, then the tightest truechimer."""
    edges = sorted([(s["offset_s"] - s["uncertainty_s"], 0) for s in samples]
                   + [(s["offset_s"] + s["uncertainty_s"], 1) for s in samples])
    depth = best = 0
    low = high = None
    for value, kind in edges:
        if kind == 0:
            depth += 1
            if depth > best:
                best, low = depth, value
        else:
            if depth == best:
                high = value
            depth -= 1
    if best <= len(samples) / 2:
        return None
    def bounds(s):
        return s["offset_s"] - s["uncertainty_s"], s["offset_s"] + s["uncertainty_s"]

    true = [s for s in samples if (bounds(s)[0] <= low and bounds(s)[1] >= high)
            or (bounds(s)[0] >= low and bounds(s)[1] <= high)]
    return min(true, key=selection.best_key) if true else None


def majority_rule(samples: list[dict]) -> dict | None:
    outcomes = [{"status": "ok", "server": s["server"], "sample": s, "attempts": 1, "history": []} for s in samples]
    return selection.select(outcomes, LOOSE, enable_fallback=False, method=Selection.BEST)["chosen"]


def sample(name: str, offset: float, unc: float) -> dict:
    return {"server": name, "offset_s": offset, "uncertainty_s": unc, "delay_s": 2 * unc, "stratum": 2,
            "leap": 0, "root_delay_s": 0.0, "root_dispersion_s": 0.0, "precision_s": 1e-7, "address": "x",
            "port": 123, "measured_at": 0.0}


def internet_server(rng, name, truth):
    delay = rng.uniform(0.010, 0.100)
    unc = delay / 2 + rng.uniform(0.0005, 0.003)
    return sample(name, truth + rng.uniform(-0.5, 0.5) * unc, unc)  # asymmetry within the bound


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=5000, help="random rounds per row (default 5000)")
    arguments.add_argument("--seed", type=int, default=1)
    args = arguments.parse_args()
    rng = random.Random(args.seed)
    print(f"{args.rounds} random rounds per row, seed {args.seed}")
    print(f"\n  {'rounds with a majority honest, some lying':<46} {'published':>10} {'bound misses truth':>19}")
    for n in (3, 5, 7, 10):
        counts = {"deepest": [0, 0], "majority": [0, 0]}
        for _ in range(args.rounds):
            truth = rng.uniform(-0.05, 0.05)
            liars = rng.randint(1, (n - 1) // 2)
            servers = [internet_server(rng, f"h{i}", truth) for i in range(n - liars)]
            for i in range(liars):  # quick liars, near enough to overlap the honest
                unc = rng.uniform(0.0005, 0.005)
                servers.append(sample(f"l{i}", truth + rng.choice([-1, 1]) * rng.uniform(unc, 0.06), unc))
            for name, rule in (("deepest", deepest_rule), ("majority", majority_rule)):
                chosen = rule(servers)
                if chosen is not None:
                    counts[name][0] += 1
                    counts[name][1] += abs(chosen["offset_s"] - truth) > chosen["uncertainty_s"]
        for name, (published, wrong) in counts.items():
            share = wrong / max(1, published)
            print(f"  {n:2d} servers, {name:<8} rule{'':<23} {published:>10} {wrong:>10} ({share:6.2%})")
    print(f"\n  {'all honest, internet-like (RTT 10..100 ms)':<46} {'uncertainty majority/deepest':>29} "
          f"{'|error| deepest':>16} {'|error| majority':>17}")
    for n in (4, 6, 10):
        ratios, err_deep, err_major = [], [], []
        for _ in range(args.rounds):
            servers = [internet_server(rng, f"s{i}", 0.0) for i in range(n)]
            deep, major = deepest_rule(servers), majority_rule(servers)
            ratios.append(major["uncertainty_s"] / deep["uncertainty_s"])
            err_deep.append(abs(deep["offset_s"]))
            err_major.append(abs(major["offset_s"]))
        p90 = quantile(ratios, 0.9)
        print(f"  {n:2d} servers{'':<37} median {statistics.median(ratios):5.2f}x, p90 {p90:5.2f}x"
              f" {statistics.median(err_deep) * 1e3:11.2f} ms {statistics.median(err_major) * 1e3:12.2f} ms")


if __name__ == "__main__":
    main()
