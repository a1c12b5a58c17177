"""A round costs its slowest server, or its number of servers?  The sweep N = 5, 10, 20, 40, in one run.

For each N and two sets of loopback servers -- all equal (20 ms), and
staggered (round trips spread over 2..40 ms) -- it times:

pipeline    a real round: ``rounds.dispatch`` (as ``measure`` sends it: every
            query message from here) until its callback has published, seen
            from here (dispatch to ``get()``)
beat        a real round as the beat sends it: one message, which the node's
            worker fans out into the chord, until the ``updates`` message
            reaches a subscriber here
noop chord  a chord of N no-op tasks (Celery's built-in ``celery.accumulate``)
            and a no-op callback, sent and awaited the same way, on the same
            worker: Celery's own floor, measured in the same run
noop, no result
            the same chord with the header's results ignored, as the
            pipeline's query tasks do (only the chord's join carries them):
            the floor for that setting
thread pool ``ThreadPoolExecutor(N)`` + ntplib, one query per server

and the worker's CPU per task (from /proc, for pipeline and beat rounds; the
beat's includes sending the query messages) and its RSS.
Medians of ``--rounds`` rounds.  The ratios are the issue's targets:
pipeline / thread pool; the per-server marginal cost (the slope from N = 5 to
40) against the no-op chord's; N = 40 equal against the no-op chord of 40 plus
the servers' 20 ms.  A PNG of the sweep is written beside the table.

Run:  python bench/round_scaling.py [--rounds 11] [--processes 1 2] [--png docs/round_scaling.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ntplib
import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.local import RedisProcess, start_node_worker, stop_process  # noqa: E402
from simulator.server import Behaviour, NtpSimulator  # noqa: E402
from workers import config as config_mod  # noqa: E402

NODE = "scaling"
SIZES = (5, 10, 20, 40)
EQUAL_DELAY_S = 0.020
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def delays_for(kind: str, n: int) -> list[float]:
    if kind == "equal":
        return [EQUAL_DELAY_S] * n
    return [0.002 + 0.038 * i / max(1, n - 1) for i in range(n)]  # 2 .. 40 ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--png", default=str(REPO / "docs" / "round_scaling.png"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="worker processes on the node's queue, one sweep each (the PNG shows the first)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ct-scaling-") as tmp_name, RedisProcess(Path(tmp_name)) as redis_proc:
        tmp = Path(tmp_name)
        os.environ[config_mod.ENV_REDIS_URL] = redis_proc.url
        sims = {(kind, n): NtpSimulator.on_free_ports([Behaviour(delay_s=d) for d in delays_for(kind, n)]).start()
                for kind in ("equal", "stagger") for n in SIZES}
        configs = {}
        for (kind, n), sim in sims.items():
            path = tmp / f"{kind}{n}.yaml"
            path.write_text(yaml.safe_dump({
                "clock_measurement": {"ntp": {"servers": sim.servers(), "timeout_seconds": 2.0, "max_delay": 0.5,
                                              "max_acceptable_uncertainty": 0.5, "max_retries": 1}},
                "ntp_service": {"key_prefix": "scaling", "nodes": [NODE]}}))
            configs[(kind, n)] = config_mod.load(path)
        from celery.result import AsyncResult

        from orchestrator import rounds
        from workers import chords
        from workers.app import app, queue_for

        def sweep(processes: int) -> tuple[dict, list[float]]:
            workers = [start_node_worker(configs[("equal", max(SIZES))], NODE, tmp / f"worker{i}.log", instance=i)
                       for i in range(processes)]
            found: dict[tuple[str, int], dict] = {}
            try:
                for key in configs:
                    pipeline(configs[key])  # warm-up: first round of each set (slowest-first order learnt)
                for key, config in configs.items():
                    n = key[1]
                    servers = [s.name for s in config.ntp.servers]
                    times: dict[str, list[float]] = {"pipeline": [], "beat": [], "noop": [], "noop_ignored": [],
                                                      "threadpool": []}
                    cpu = {"pipeline": 0.0, "beat": 0.0}
                    for _ in range(args.rounds):
                        for name, run in (("pipeline", pipeline), ("beat", beat)):
                            before = sum(cpu_s(w.pid) for w in workers)
                            times[name].append(run(config))
                            cpu[name] += sum(cpu_s(w.pid) for w in workers) - before
                        times["noop"].append(noop(n))
                        times["noop_ignored"].append(noop(n, ignore_result=True))
                        times["threadpool"].append(threadpool(servers))
                    found[key] = {name: statistics.median(v) for name, v in times.items()}
                    for name, seconds in cpu.items():
                        found[key][f"{name}_cpu_per_task_ms"] = seconds / (args.rounds * n) * 1e3
                return found, [rss_mb(w.pid) for w in workers]
            finally:
                for w in workers:
                    stop_process(w)

        def pipeline(config) -> float:
            started = time.perf_counter()
            handle = rounds.dispatch(config, NODE)
            record = handle.wait()
            took = time.perf_counter() - started
            assert record and record["latest"], record
            return took

        updates = redis.Redis.from_url(redis_proc.url).pubsub()
        updates.subscribe(f"scaling:ntp:{NODE}:updates")
        updates.get_message(timeout=1)

        def beat(config) -> float:
            started = time.perf_counter()
            handle = rounds.dispatch_fanned_out(config, NODE)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = updates.get_message(timeout=1)
                if message and message["type"] == "message" and json.loads(message["data"])["round_id"] == \
                        handle.round_id:
                    return time.perf_counter() - started
            raise RuntimeError(f"round {handle.round_id} was not published")

        def noop(n: int, *, ignore_result: bool = False) -> float:
            queue = queue_for(NODE)
            header = [app.signature("celery.accumulate", args=(i,), queue=queue, ignore_result=ignore_result)
                      for i in range(n)]
            body = app.signature("celery.accumulate", queue=queue)
            started = time.perf_counter()
            sent = chords.send(header, body)
            result = AsyncResult(sent.callback_id, app=app)
            result.get(timeout=30, disable_sync_subtasks=False)
            took = time.perf_counter() - started
            result.forget()
            return took

        def threadpool(servers: list[str]) -> float:
            ntp = ntplib.NTPClient()
            started = time.perf_counter()
            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(lambda s: ntp.request(s.split(":")[0], port=int(s.split(":")[1]),
                                                    version=4, timeout=2), servers))
            return time.perf_counter() - started

        try:
            sweeps = {p: sweep(p) for p in args.processes}
        finally:
            for sim in sims.values():
                sim.stop()
    for p, (results, rss) in sweeps.items():
        report(results, rss, args, processes=p, png=args.png if p == args.processes[0] else None)


def report(results: dict, rss: list[float], args, *, processes: int, png: str | None) -> None:
    print(f"{processes} worker process(es) on the node's queue; round time vs number of servers, medians of "
          f"{args.rounds} rounds; worker RSS at the end {' + '.join(f'{r:.0f}' for r in rss)} MB "
          "(target <= 100 per process)\n")
    for kind in ("equal", "stagger"):
        label = "all servers 20 ms" if kind == "equal" else "staggered 2..40 ms"
        print(f"set {kind} ({label})")
        print(f"  {'N':>3} {'pipeline':>9} {'beat':>9} {'noop chord':>11} {'no result':>10} {'thread pool':>12} "
              f"{'pipe/pool':>10} "
              f"{'pipe/(noop+slowest)':>20} {'beat/(noop+slowest)':>20} {'CPU/task pipe':>14} {'CPU/task beat':>14}")
        for n in SIZES:
            r = results[(kind, n)]
            slowest = EQUAL_DELAY_S if kind == "equal" else 0.040
            print(f"  {n:>3} {r['pipeline'] * 1e3:>6.1f} ms {r['beat'] * 1e3:>6.1f} ms {r['noop'] * 1e3:>8.1f} ms "
                  f"{r['noop_ignored'] * 1e3:>7.1f} ms "
                  f"{r['threadpool'] * 1e3:>9.1f} ms "
                  f"{r['pipeline'] / r['threadpool']:>9.2f}x {r['pipeline'] / (r['noop'] + slowest):>19.2f}x "
                  f"{r['beat'] / (r['noop'] + slowest):>19.2f}x "
                  f"{r['pipeline_cpu_per_task_ms']:>11.2f} ms {r['beat_cpu_per_task_ms']:>11.2f} ms")
        lo, hi = results[(kind, SIZES[0])], results[(kind, SIZES[-1])]
        span = SIZES[-1] - SIZES[0]
        noop_slope = (hi["noop"] - lo["noop"]) / span * 1e3
        ignored_slope = (hi["noop_ignored"] - lo["noop_ignored"]) / span * 1e3
        for name in ("pipeline", "beat"):
            slope = (hi[name] - lo[name]) / span * 1e3
            print(f"  per-server marginal cost (N {SIZES[0]} -> {SIZES[-1]}): {name} {slope:.2f} ms, "
                  f"noop chord {noop_slope:.2f} ms, ratio {slope / noop_slope:.2f}x (target <= 1.2x); "
                  f"against the no-result chord's {ignored_slope:.2f} ms, {slope / ignored_slope:.2f}x")
        print()
    if png is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no PNG)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("equal", "stagger"), strict=True):
        slowest = EQUAL_DELAY_S if kind == "equal" else 0.040
        for name, label, style in (("pipeline", "pipeline (measure)", "o-"), ("beat", "pipeline (beat)", "D-"),
                                   ("noop", "noop chord", "s--"), ("noop_ignored", "noop chord, no result", "v--"),
                                   ("threadpool", "thread pool", "^:")):
            ax.plot(SIZES, [results[(kind, n)][name] * 1e3 for n in SIZES], style, label=label)
        ax.plot(SIZES, [(results[(kind, n)]["noop"] + slowest) * 1e3 for n in SIZES], "-", color="grey",
                alpha=0.5, label="noop chord + slowest server")
        ax.set_title("all servers 20 ms" if kind == "equal" else "staggered 2..40 ms")
        ax.set_xlabel("servers in the round")
        ax.set_xticks(SIZES)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("round time, median (ms)")
    axes[0].legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}\n")


if __name__ == "__main__":
    main()
