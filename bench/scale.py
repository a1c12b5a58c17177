"""How many nodes one central box (beat + Redis) carries: the cluster's load on this machine, time compressed.

N nodes every I seconds carry the load of N x 120 / I nodes every 2 minutes.  Ten
loopback servers (round trips 2..20 ms) stand in for the NTP servers; a few plain
``celery -A workers.app worker`` processes each consume a share of the node
queues (as the README documents); one ``chronotick-ntp beat`` dispatches.  CPU
time comes from /proc (beat, workers) and from Redis' own ``INFO cpu``.

Printed: rounds due and published, starvation, round time p50/p99, CPU ms per
round for the beat, Redis and the workers, Redis bytes per node, and the number
of nodes x 10 servers per 2-minute interval that one 2-core central box (beat +
Redis) sustains at 50 % CPU -- from the rounds alone, and with what every node
costs Redis while idle (its worker's BRPOP each second, its heartbeat), which a
time-compressed run cannot show by itself: measured at the end, with
``--idle-workers`` workers of one node's queue each and no round running,
against Redis' own housekeeping with no client at the start.

``--baseline REV`` runs the same load first against another commit of this
repository (``git archive``, same virtualenv), so the two columns and their
ratio come from one run on one machine.

Run:  python -m bench.scale [--nodes 50] [--interval 10] [--seconds 60] [--workers 2] [--baseline REV]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.harness import REPO, bed, child_env, cpu_s, parser, quantile
from orchestrator.store import Keys
from simulator.ntpserver import Behaviour
from simulator.processes import stop_process
from workers import config as config_mod
from workers.heartbeat import HEARTBEAT_INTERVAL_S

PREFIX = "scale"
#: How long the idle phase lasts (s).
IDLE_SECONDS = 10.0


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_scale(tree: Path, *, nodes: int, interval_s: float, seconds: float, workers: int,
              idle_workers: int = 10, profile_beat: str | None = None) -> dict:
    """Run the load with the code in ``tree``; return its figures."""
    names = [f"n{i:04d}" for i in range(nodes)]
    with bed("ct-scale-") as b:
        sim = b.servers([Behaviour(delay_s=0.002 * (i + 1)) for i in range(10)])
        path = b.config("scale.yaml", sim.servers(), ntp={"timeout_seconds": 1.0, "max_delay": 0.1},
                        timing={"warm_up": {"duration_seconds": 0, "measurement_interval": interval_s},
                                "normal_operation": {"measurement_interval": interval_s}},
                        service={"key_prefix": PREFIX, "nodes": names}).source
        client = b.client()
        bare0 = (redis_cpu_s(client), time.time())
        time.sleep(IDLE_SECONDS)  # Redis with no client but this one: its own housekeeping
        bare1 = (redis_cpu_s(client), time.time())
        env = child_env(**{config_mod.ENV_REDIS_URL: b.url, "PYTHONPATH": str(tree)})
        env.pop(config_mod.ENV_NODE, None)
        procs = []
        for w in range(workers):
            queues = ",".join(f"ntp.{n}" for n in names[w::workers])
            # The README's plain worker, one per share of the node queues.
            argv = ["worker", "--queues", queues, "--hostname", f"scale{w}@%h", "--pool", "threads",
                    "--concurrency", "48", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"]
            procs.append(b.process(["python", "-m", "celery", "-A", "workers.app", *argv], log=f"worker{w}.log",
                                   cwd=tree, env=env))
        profile = ["-m", "cProfile", "-o", profile_beat] if profile_beat else []
        beat = b.process(["python", *profile, "-m", "orchestrator.cli", "beat", "--config", str(path)],
                         log="beat.log", cwd=tree, env=env)
        keys = Keys(PREFIX)

        def counts() -> dict[str, int]:
            total: dict[str, int] = {}
            for n in names:
                for k, v in client.hgetall(keys.stats(n)).items():
                    total[k] = total.get(k, 0) + int(v)
            return total

        def sample() -> dict:
            return {"t": time.time(), "beat": cpu_s(beat.pid), "workers": sum(cpu_s(p.pid) for p in procs),
                    "redis": redis_cpu_s(client), "counts": counts(),
                    "commands": int(client.info("stats")["total_commands_processed"])}

        time.sleep(interval_s + 5)  # warm-up: one whole interval, every node started (a run length)
        start = sample()
        time.sleep(seconds)  # the measured run (a length of time, not a synchronisation)
        end = sample()
        durations = []
        for n in names:
            for _, fields in client.xrange(keys.history(n), min=str(int(start["t"] * 1000))):
                durations.append(json.loads(fields["record"])["duration_s"])
        used = client.info("memory")["used_memory"]
        # Idle nodes: what Redis spends on nodes that do nothing -- each worker's BRPOP,
        # heartbeat and connections -- which time compression cannot scale.  Measured with
        # workers shaped as in a cluster, one node's queue each, and nothing else running.
        stop_process(beat)
        for p in procs:
            stop_process(p)
        procs = [b.process(["python", "-m", "celery", "-A", "workers.app", "worker", "--queues", f"ntp.idle{i}",
                            "--hostname", f"idle{i}@%h", "--pool", "threads", "--concurrency", "12", "--loglevel",
                            "WARNING", "--without-gossip", "--without-mingle"], log=f"idle{i}.log", cwd=tree,
                           env=env)
                 for i in range(idle_workers)]
        deadline = time.monotonic() + 120
        # Their heartbeats, under the prefix a worker without a config file has (the service's default).
        beats = Keys(config_mod.service_from_environment(env).key_prefix).worker("ntp.idle*", "*")
        while len(client.keys(beats)) < idle_workers:
            if time.monotonic() > deadline:
                raise RuntimeError("idle workers did not start")
            time.sleep(0.5)
        idle0 = (redis_cpu_s(client), int(client.info("stats")["total_commands_processed"]), time.time())
        time.sleep(IDLE_SECONDS)  # the idle measurement's length
        idle1 = (redis_cpu_s(client), int(client.info("stats")["total_commands_processed"]), time.time())
    elapsed = end["t"] - start["t"]
    done = {k: end["counts"].get(k, 0) - start["counts"].get(k, 0) for k in end["counts"]}
    rounds = done.get("rounds", 0)
    per_round = {what: (end[what] - start[what]) / max(1, rounds) * 1e3 for what in ("beat", "redis", "workers")}
    central_ms = per_round["beat"] + per_round["redis"]
    commands = end["commands"] - start["commands"]
    idle_s = idle1[2] - idle0[2]
    idle_commands_s = (idle1[1] - idle0[1]) / idle_s
    bare_cpu_s = (bare1[0] - bare0[0]) / (bare1[1] - bare0[1])  # Redis' own housekeeping, per second
    idle_cpu_s = (idle1[0] - idle0[0]) / idle_s
    per_node_commands_s = idle_commands_s / idle_workers  # this bench's INFO calls included
    idle_ms_per_node_s = max(0.0, idle_cpu_s - bare_cpu_s) / idle_workers * 1e3
    return {
        "elapsed_s": elapsed, "due": nodes * elapsed / interval_s, "rounds": rounds,
        "published": done.get("strict", 0) + done.get("relaxed", 0), "starvation": done.get("starvation", 0),
        "p50_ms": statistics.median(durations) * 1e3 if durations else float("nan"),
        "p99_ms": quantile(durations, 0.99) * 1e3 if durations else float("nan"),
        **{f"{what}_ms": value for what, value in per_round.items()},
        "central_ms": central_ms, "commands_per_round": commands / max(1, rounds),
        "idle_commands_per_node_s": per_node_commands_s, "bare_ms_s": bare_cpu_s * 1e3,
        "idle_ms_per_node_s": idle_ms_per_node_s, "bytes_per_node": used / nodes,
        # One core (half of two) over 2-minute rounds: N/120 rounds a second, each central_ms.
        "capacity": 1000 / (central_ms / 120),
        "capacity_idle": 1000 / (central_ms / 120 + idle_ms_per_node_s),
    }


ROWS = (
    ("rounds due / finished / published", lambda r: f"{r['due']:,.0f} / {r['rounds']:,} / {r['published']:,}"),
    ("starvation", lambda r: f"{r['starvation']}"),
    ("round time p50 / p99", lambda r: f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms"),
    ("CPU per round: beat", lambda r: f"{r['beat_ms']:.1f} ms"),
    ("CPU per round: Redis", lambda r: f"{r['redis_ms']:.1f} ms"),
    ("CPU per round: workers", lambda r: f"{r['workers_ms']:.1f} ms"),
    ("central CPU per round (beat + Redis)", lambda r: f"{r['central_ms']:.1f} ms"),
    ("Redis commands per round", lambda r: f"{r['commands_per_round']:.0f}"),
    ("Redis bytes per node (this run)", lambda r: f"{r['bytes_per_node']:,.0f}"),
    ("idle node: Redis commands/s", lambda r: f"{r['idle_commands_per_node_s']:.1f}"),
    ("idle node: Redis CPU per s", lambda r: f"{r['idle_ms_per_node_s'] * 1e3:.0f} us"),
    ("nodes per 2-core box, rounds only", lambda r: f"{r['capacity']:,.0f}"),
    ("nodes per box, with idle cost", lambda r: f"{r['capacity_idle']:,.0f}"),
)

RATIOS = {"beat CPU per round": "beat_ms", "Redis CPU per round": "redis_ms", "central CPU per round": "central_ms"}


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--nodes", type=int, default=50)
    arguments.add_argument("--interval", type=float, default=10.0, help="each node's interval (s)")
    arguments.add_argument("--seconds", type=float, default=60.0, help="measured run after one interval's warm-up")
    arguments.add_argument("--workers", type=int, default=2, help="worker processes sharing the node queues")
    arguments.add_argument("--idle-workers", type=int, default=10, help="single-queue workers measured idle")
    arguments.add_argument("--baseline", metavar="REV", help="also run this commit's code, first, for a ratio")
    arguments.add_argument("--profile-beat", metavar="FILE", help="run the beat under cProfile, stats written to FILE")
    args = arguments.parse_args()
    load = {"nodes": args.nodes, "interval_s": args.interval, "seconds": args.seconds, "workers": args.workers,
            "idle_workers": args.idle_workers}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ct-baseline-") as base:
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
            results[args.baseline] = run_scale(Path(base), **load)
        results["this tree"] = run_scale(REPO, **load, profile_beat=args.profile_beat)
    print(f"{args.nodes} nodes x 10 servers every {args.interval:g} s (= {args.nodes * 120 / args.interval:,.0f} "
          f"nodes every 2 min), {args.workers} workers, {args.seconds:.0f} s measured\n")
    names = list(results)
    print(f"  {'':<40}" + "".join(f"{n:>16}" for n in names))
    for label, cell in ROWS:
        print(f"  {label:<40}" + "".join(f"{cell(results[n]):>16}" for n in names))
    if len(names) == 2:
        print()
        for label, key in RATIOS.items():
            print(f"  {label + ', this tree / ' + names[0]:<56} {results[names[1]][key] / results[names[0]][key]:.2f}x")
    mine = results["this tree"]
    print(f"\n  an idle node (its worker's BRPOP each second, its heartbeats every {HEARTBEAT_INTERVAL_S:g} s, its "
          f"connections) costs Redis {mine['idle_ms_per_node_s'] * 1e3:.0f} us of CPU a second, above Redis' own "
          f"{mine['bare_ms_s']:.1f} ms a second with no client")
    print(f"  central CPU {mine['central_ms']:.1f} ms per round: one 2-core box at 50 % CPU carries "
          f"{mine['capacity']:,.0f} nodes x 10 servers every 2 minutes ({mine['capacity_idle']:,.0f} counting "
          "idle nodes' polling; target >= 10,000)")


if __name__ == "__main__":
    main()
