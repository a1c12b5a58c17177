"""What a person waits for at the terminal: ``measure``, ``latest``, ``status`` as whole processes.

A private Redis, ten simulated servers (round trips 10, 20, ... 100 ms) and a
real worker.  Each command runs as a fresh process, as a person or a cron job
runs it, timed from spawn to exit; ``measure``'s own round (``duration_s`` in
its record) is subtracted to show what the command itself costs.  Target:
``measure`` wall time <= its round's time + 0.5 s, process start included.

Also, in the same run: how long finding a live worker takes by its heartbeat
(one Redis round trip) against the broadcast ``inspect().active_queues()``
that ``measure`` used before (it waits out its whole timeout).

Run:  python -m bench.cli_latency [--runs 9]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from bench.harness import REPO, bed, child_env, machine, parser
from simulator.ntpserver import Behaviour

NODE = "bench"


def timed(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=str(REPO))
    return time.perf_counter() - start, done


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--runs", type=int, default=9, help="runs per command (default 9)")
    args = arguments.parse_args()
    with bed() as b:
        sim = b.servers([Behaviour(delay_s=0.010 * (i + 1)) for i in range(10)])
        config = b.config("bench.yaml", sim.servers(),
                          ntp={"timeout_seconds": 2.0, "max_delay": 0.5, "max_acceptable_uncertainty": 0.5,
                               "max_retries": 1},
                          service={"key_prefix": "bench", "history_length": 100})
        path = config.source
        from workers import heartbeat
        from workers.app import app, queue_for
        from workers.keys import Keys

        b.worker(config, NODE, timeout_s=30)
        env = child_env()
        cli = [sys.executable, "-m", "orchestrator.cli"]
        rows = {"measure": [], "measure minus its round": [], "round (duration_s)": [], "latest": [],
                "status": [], "python -c 'import orchestrator.cli'": []}
        checks = {"heartbeat": [], "inspect broadcast": []}
        from orchestrator.store import client_for

        client = client_for(b.url)
        for i in range(args.runs + 1):  # one warm-up
            wall, done = timed([*cli, "measure", "--config", str(path), "--node", NODE, "--json"], env)
            if done.returncode != 0:
                raise SystemExit(f"measure failed ({done.returncode}): {done.stderr}")
            record = json.loads(done.stdout)
            others = {name: timed([*cli, name, "--config", str(path), "--node", NODE], env)[0]
                      for name in ("latest", "status")}
            imported = timed([sys.executable, "-c", "import orchestrator.cli"], env)[0]
            start = time.perf_counter()
            assert heartbeat.live_workers(client, Keys(config.service.key_prefix), queue_for(NODE))
            beat_s = time.perf_counter() - start
            start = time.perf_counter()
            assert app.control.inspect(timeout=1.0).active_queues()
            inspect_s = time.perf_counter() - start
            if i == 0:
                continue
            rows["measure"].append(wall)
            rows["round (duration_s)"].append(record["duration_s"])
            rows["measure minus its round"].append(wall - record["duration_s"])
            rows["latest"].append(others["latest"])
            rows["status"].append(others["status"])
            rows["python -c 'import orchestrator.cli'"].append(imported)
            checks["heartbeat"].append(beat_s)
            checks["inspect broadcast"].append(inspect_s)
    print(f"machine: {machine()}; "
          f"{args.runs} runs per command after 1 warm-up, 10 simulated servers (10..100 ms), "
          "each command a fresh process")
    print(f"\n  {'command (wall time, spawn to exit)':<40} {'median':>9} {'max':>9}")
    for name, values in rows.items():
        print(f"  {name:<40} {statistics.median(values) * 1e3:7.0f} ms {max(values) * 1e3:7.0f} ms")
    over = statistics.median(rows["measure minus its round"])
    print(f"\n  measure costs its round + {over * 1e3:.0f} ms (target: + 500 ms at most) -> "
          f"{'OK' if over <= 0.5 else 'MISSED'}")
    beat, inspect = statistics.median(checks["heartbeat"]), statistics.median(checks["inspect broadcast"])
    print(f"  finding a live worker: heartbeat {beat * 1e3:.2f} ms, inspect broadcast {inspect * 1e3:.0f} ms "
          f"({inspect / beat:.0f}x)")


if __name__ == "__main__":
    main()
