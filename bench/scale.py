"""How many nodes one central box (beat + Redis) carries: the cluster's load on this machine, time compressed.

N nodes every I seconds carry the load of N x 120 / I nodes every 2 minutes.  Ten
loopback servers (round trips 2..20 ms) stand in for the NTP servers; a few plain
``celery -A workers.app worker`` processes each consume a share of the node
queues (as the README documents); one ``chronotick-ntp beat`` dispatches.  CPU
time comes from /proc (beat, workers) and from Redis' own ``INFO cpu``.

Printed: rounds due and published, starvation, round time p50/p99, CPU ms per
round for the beat, Redis and the workers, Redis bytes per node, and the number
of nodes x 10 servers per 2-minute interval that one 2-core central box (beat +
Redis) sustains at 50 % CPU.

Run:  python bench/scale.py [--nodes 50] [--interval 10] [--seconds 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.store import Keys  # noqa: E402
from simulator.local import RedisProcess, stop_process  # noqa: E402
from simulator.server import Behaviour, NtpSimulator  # noqa: E402
from workers import config as config_mod  # noqa: E402

PREFIX = "scale"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=10.0, help="each node's interval (s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured run after one interval's warm-up")
    parser.add_argument("--workers", type=int, default=2, help="worker processes sharing the node queues")
    args = parser.parse_args()
    names = [f"n{i:04d}" for i in range(args.nodes)]
    with tempfile.TemporaryDirectory(prefix="ct-scale-") as tmp, RedisProcess(Path(tmp)) as redis_proc:
        sim = NtpSimulator.on_free_ports([Behaviour(delay_s=0.002 * (i + 1)) for i in range(10)]).start()
        path = Path(tmp) / "scale.yaml"
        path.write_text(yaml.safe_dump({
            "clock_measurement": {
                "ntp": {"servers": sim.servers(), "timeout_seconds": 1.0, "max_delay": 0.1},
                "timing": {"warm_up": {"duration_seconds": 0, "measurement_interval": args.interval},
                           "normal_operation": {"measurement_interval": args.interval}}},
            "ntp_service": {"key_prefix": PREFIX, "nodes": names}}))
        config = config_mod.load(path, environ={config_mod.ENV_REDIS_URL: redis_proc.url})
        from workers.app import queue_for, worker_argv

        env = {**os.environ, config_mod.ENV_REDIS_URL: redis_proc.url, "PYTHONPATH": str(REPO)}
        env.pop(config_mod.ENV_NODE, None)
        workers = []
        for w in range(args.workers):
            share = names[w::args.workers]
            argv = worker_argv(config, share[0], concurrency=48, loglevel="WARNING")
            argv[argv.index("--queues") + 1] = ",".join(queue_for(n) for n in share)
            argv[argv.index("--hostname") + 1] = f"scale{w}@%h"
            workers.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", *argv], env=env,
                                            cwd=str(REPO), stdout=subprocess.DEVNULL,
                                            stderr=open(Path(tmp) / f"worker{w}.log", "ab")))
        beat = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "beat", "--config", str(path)], env=env,
                                cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "beat.log", "ab"))
        client = redis.Redis(port=redis_proc.port)
        keys = Keys(PREFIX)

        def counts() -> dict[str, int]:
            total: dict[str, int] = {}
            for n in names:
                for k, v in client.hgetall(keys.stats(n)).items():
                    total[k.decode()] = total.get(k.decode(), 0) + int(v)
            return total

        try:
            time.sleep(args.interval + 5)  # warm-up: one whole interval, every node started (a run length)
            start = {"t": time.time(), "beat": cpu_s(beat.pid), "workers": sum(cpu_s(w.pid) for w in workers),
                     "redis": redis_cpu_s(client), "counts": counts()}
            time.sleep(args.seconds)  # the measured run (a length of time, not a synchronisation)
            end = {"t": time.time(), "beat": cpu_s(beat.pid), "workers": sum(cpu_s(w.pid) for w in workers),
                   "redis": redis_cpu_s(client), "counts": counts()}
            durations = []
            for n in names:
                for _, fields in client.xrange(keys.history(n), min=str(int(start["t"] * 1000))):
                    durations.append(json.loads(fields[b"record"])["duration_s"])
            used = client.info("memory")["used_memory"]
        finally:
            stop_process(beat)
            for w in workers:
                stop_process(w)
            sim.stop()
    elapsed = end["t"] - start["t"]
    done = {k: end["counts"].get(k, 0) - start["counts"].get(k, 0) for k in end["counts"]}
    published = done.get("strict", 0) + done.get("relaxed", 0)
    rounds = done.get("rounds", 0)
    due = args.nodes * elapsed / args.interval
    per_round = {what: (end[what] - start[what]) / max(1, rounds) * 1e3 for what in ("beat", "redis", "workers")}
    central_ms = per_round["beat"] + per_round["redis"]
    capacity = 2 * 0.5 / (central_ms / 1e3) * 120  # rounds/s at half of 2 cores, times 120 s
    durations.sort()
    print(f"{args.nodes} nodes x 10 servers every {args.interval:g} s (= {args.nodes * 120 / args.interval:,.0f} "
          f"nodes every 2 min), {args.workers} workers, {elapsed:.0f} s measured")
    print(f"\n  {'rounds due / finished / published':<40} {due:,.0f} / {rounds:,} / {published:,}")
    print(f"  {'starvation':<40} {done.get('starvation', 0)}")
    if durations:
        print(f"  {'round time p50 / p99':<40} {statistics.median(durations) * 1e3:.0f} / "
              f"{durations[int(0.99 * (len(durations) - 1))] * 1e3:.0f} ms")
    print(f"  {'CPU per round: beat / Redis / workers':<40} {per_round['beat']:.1f} / {per_round['redis']:.1f} / "
          f"{per_round['workers']:.1f} ms")
    print(f"  {'Redis bytes per node (this run)':<40} {used / args.nodes:,.0f}")
    print(f"\n  central CPU (beat + Redis) {central_ms:.1f} ms per round: one 2-core box at 50 % CPU carries "
          f"{capacity:,.0f} nodes x 10 servers every 2 minutes (target >= 10,000)")


if __name__ == "__main__":
    main()
