"""What a dead and a slow server cost a round, with and without publishing once the answer is known.

Issue #18's measurement: ten loopback servers -- eight healthy (RTT 8-36 ms), one that never answers, one
400 ms away -- with ``timeout_seconds: 1`` and ``retry_delay: 2``, on a real worker and a private Redis.
Three sets, their rounds interleaved so the machine's load falls on all alike: the eight healthy servers
alone; all ten; all ten with ``publish_early: false`` (every round waits for its last server, as before).

Run:  python -m bench.faults              (10 rounds a set)
      python -m bench.faults --rounds 30 --selection best
"""

from __future__ import annotations

import statistics

from bench.harness import Bed, bed, parser, quantile
from simulator.ntpserver import Behaviour
from workers import config as config_mod

NODE = "faults"
HEALTHY = [Behaviour(offset_s=0.003, delay_s=0.008 + 0.004 * i, jitter_s=0.001) for i in range(8)]
DEAD, SLOW = Behaviour(loss=1.0), Behaviour(offset_s=0.003, delay_s=0.400)


def config_for(b: Bed, name: str, servers: list[str], **ntp) -> config_mod.Config:
    # ChronoTick's own strict gate (configs/config_homelab_2min_ntp.yaml): with the default 10 ms, these
    # servers' honest published bounds (11-13 ms) are over it, every round is relaxed, and a relaxed round
    # waits for any server still out that could make it strict.
    return b.config(f"{name}.yaml", servers,
                    ntp={"timeout_seconds": 1.0, "retry_delay": 2.0, "max_retries": 3,
                         "max_acceptable_uncertainty": 0.1, **ntp},
                    service={"key_prefix": f"faults-{name}", "nodes": [NODE], "history_length": 10_000})


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=10, help="rounds a set (default 10)")
    arguments.add_argument("--selection", default="combine", choices=("best", "combine"))
    args = arguments.parse_args()
    from orchestrator import rounds
    from orchestrator.store import store_for

    with bed("chronotick-faults-") as b:
        servers = b.servers([*HEALTHY, DEAD, SLOW], seed=1).servers()
        sets = {
            "8 healthy": config_for(b, "healthy", servers[:8], selection=args.selection),
            "+ dead + slow": config_for(b, "faulty", servers, selection=args.selection),
            "+ dead + slow, publish_early: false": config_for(b, "waiting", servers, selection=args.selection,
                                                              publish_early=False),
        }
        b.worker(sets["8 healthy"], NODE)
        times: dict[str, list[float]] = {name: [] for name in sets}
        bounds: dict[str, list[float]] = {name: [] for name in sets}
        for _ in range(args.rounds + 1):  # the first of each set learns the slowest-first order
            for name, config in sets.items():
                record = rounds.dispatch(config, NODE).wait()
                times[name].append(record["duration_s"])
                bounds[name].append(record["latest"]["uncertainty"])
        stats = {name: store_for(config.service).stats(NODE) for name, config in sets.items()}
    base = statistics.median(times["8 healthy"][1:])
    print(f"{args.rounds} rounds a set, selection {args.selection}; round time = dispatch to publication")
    print(f"{'servers':<38} {'median ms':>10} {'p90 ms':>8} {'x healthy':>10} {'retries/requests':>17} "
          f"{'published ± ms':>15}")
    for name, values in times.items():
        values = values[1:]
        p90 = quantile(values, 0.9)
        median = statistics.median(values)
        retry_rate = stats[name]["retries"] / stats[name]["queries"] if stats[name]["queries"] else 0.0
        bound = statistics.median(bounds[name][1:])
        print(f"{name:<38} {median * 1e3:>10.1f} {p90 * 1e3:>8.1f} {median / base:>10.2f} {retry_rate * 100:>16.1f}% "
              f"{bound * 1e3:>15.2f}")
    limit = 1.5 * base + 0.050
    print(f"target (issue #18): with the dead and slow servers <= 1.5 x healthy + 50 ms = {limit * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
