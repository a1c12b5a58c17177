"""What a dead and a slow server cost a round, with and without publishing once the answer is known.

Issue #18's measurement: ten loopback servers -- eight healthy (RTT 8-36 ms), one that never answers, one
400 ms away -- with ``timeout_seconds: 1`` and ``retry_delay: 2``, on a real worker and a private Redis.
Three sets, their rounds interleaved so the machine's load falls on all alike: the eight healthy servers
alone; all ten; all ten with ``publish_early: false`` (every round waits for its last server, as before).

Run:  python bench/faults.py              (10 rounds a set)
      python bench/faults.py --rounds 30 --selection best
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.ntpserver import Behaviour, NtpSimulator  # noqa: E402
from simulator.processes import RedisProcess, start_node_worker, stop_process  # noqa: E402
from workers import config as config_mod  # noqa: E402

NODE = "faults"
HEALTHY = [Behaviour(offset_s=0.003, delay_s=0.008 + 0.004 * i, jitter_s=0.001) for i in range(8)]
DEAD, SLOW = Behaviour(loss=1.0), Behaviour(offset_s=0.003, delay_s=0.400)


def config_for(tmp: Path, name: str, servers: list[str], url: str, **ntp) -> config_mod.Config:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        # ChronoTick's own strict gate (configs/config_homelab_2min_ntp.yaml): with the default 10 ms, these
        # servers' honest published bounds (11-13 ms) are over it, every round is relaxed, and a relaxed round
        # waits for any server still out that could make it strict.
        "clock_measurement": {"ntp": {"servers": servers, "timeout_seconds": 1.0, "retry_delay": 2.0,
                                      "max_retries": 3, "max_acceptable_uncertainty": 0.1, **ntp}},
        "ntp_service": {"key_prefix": f"faults-{name}", "nodes": [NODE], "history_length": 10_000}}))
    return config_mod.load(path, environ={**os.environ, config_mod.ENV_REDIS_URL: url})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds a set (default 10)")
    parser.add_argument("--selection", default="combine", choices=("best", "combine"))
    args = parser.parse_args()
    from orchestrator import rounds
    from orchestrator.store import store_for

    with tempfile.TemporaryDirectory(prefix="chronotick-faults-") as tmp_name, \
            RedisProcess(Path(tmp_name)) as redis_proc:
        tmp = Path(tmp_name)
        os.environ[config_mod.ENV_REDIS_URL] = redis_proc.url
        sim = NtpSimulator.on_free_ports([*HEALTHY, DEAD, SLOW], seed=1).start()
        try:
            servers = sim.servers()
            sets = {
                "8 healthy": config_for(tmp, "healthy", servers[:8], redis_proc.url, selection=args.selection),
                "+ dead + slow": config_for(tmp, "faulty", servers, redis_proc.url, selection=args.selection),
                "+ dead + slow, publish_early: false": config_for(tmp, "waiting", servers, redis_proc.url,
                                                                  selection=args.selection, publish_early=False),
            }
            worker = start_node_worker(sets["8 healthy"], NODE, tmp / "worker.log")
            try:
                times: dict[str, list[float]] = {name: [] for name in sets}
                bounds: dict[str, list[float]] = {name: [] for name in sets}
                for _ in range(args.rounds + 1):  # the first of each set learns the slowest-first order
                    for name, config in sets.items():
                        record = rounds.dispatch(config, NODE).wait()
                        times[name].append(record["duration_s"])
                        bounds[name].append(record["latest"]["uncertainty"])
                stats = {name: store_for(config.service).stats(NODE) for name, config in sets.items()}
            finally:
                stop_process(worker)
        finally:
            sim.stop()
    base = statistics.median(times["8 healthy"][1:])
    print(f"{args.rounds} rounds a set, selection {args.selection}; round time = dispatch to publication")
    print(f"{'servers':<38} {'median ms':>10} {'p90 ms':>8} {'x healthy':>10} {'retries/requests':>17} "
          f"{'published ± ms':>15}")
    for name, values in times.items():
        values = sorted(values[1:])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        median = statistics.median(values)
        retry_rate = stats[name]["retries"] / stats[name]["queries"] if stats[name]["queries"] else 0.0
        bound = statistics.median(bounds[name][1:])
        print(f"{name:<38} {median * 1e3:>10.1f} {p90 * 1e3:>8.1f} {median / base:>10.2f} {retry_rate * 100:>16.1f}% "
              f"{bound * 1e3:>15.2f}")
    limit = 1.5 * base + 0.050
    print(f"target (issue #18): with the dead and slow servers <= 1.5 x healthy + 50 ms = {limit * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
