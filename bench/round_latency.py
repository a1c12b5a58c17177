"""How long one round takes: sequential, a thread pool (ChronoTick's old way), this pipeline.

Ten simulated servers on loopback with round trips of 10, 20, ... 100 ms.  Each
method runs a round per iteration, interleaved so that the machine's noise
falls on all of them alike; the table shows medians and ratios from one run.

* ``sequential``   -- ntplib, one server after another (the old default path)
* ``threadpool``   -- ntplib in ``ThreadPoolExecutor(10)`` (the old parallel path)
* ``pipeline``     -- ``rounds.dispatch`` -> chord on a real worker -> selection ->
  ``latest`` in Redis, timed until the ``updates`` message reaches a subscriber
  (what a consumer sees)

Also reported: the |offset error| of every sample against the simulator's
known truth -- for a lone query and for a full round, with ntplib and with this
project's client -- on the same set and on ten servers whose replies all land
at once (50 ms each), where a thread woken late reads t4 late.

It also draws the round times of every method and set to a PNG (``--png``,
default ``docs/round_latency.png``), beside the table.

Run:  python -m bench.round_latency [--rounds 15] [--png FILE]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ntplib

from bench.harness import REPO, Bed, bed, machine, parser, quantile
from simulator.ntpserver import Behaviour

TRUE_OFFSET_S = 0.25
NODE = "bench"


def ntplib_round(servers, *, parallel: bool):
    client = ntplib.NTPClient()

    def one(address):
        host, port = address.rsplit(":", 1)
        return client.request(host, port=int(port), version=4, timeout=2).offset

    if not parallel:
        return [one(s) for s in servers]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        return list(pool.map(one, servers))


#: Rows of the precision table: (method that produces the samples, label).
ERROR_ROWS = {
    "ntplib, lone query": "sequential",
    "ntplib, ThreadPoolExecutor round": "threadpool",
    "chronotick client, lone query": "lone",
    "chronotick pipeline round": "pipeline",
}
ERROR_ROW_OF = {method: row for row, method in ERROR_ROWS.items()}


def lone_exchange(address):
    """One exchange with this project's client, nothing else in flight."""
    import socket

    from workers.ntp import client

    host, port = address.rsplit(":", 1)
    return client.exchange(address, socket.AF_INET, (host, int(port)), timeout_s=2.0).offset_s


def pipeline_round(config, pubsub):
    """Dispatch a round; return (seconds until its latest reached a subscriber, its record)."""
    from orchestrator import rounds

    start = time.perf_counter()
    handle = rounds.dispatch(config, NODE)
    while True:
        message = pubsub.get_message(timeout=10)
        if message is None:
            raise RuntimeError(f"round {handle.round_id} published nothing within 10 s")
        if message["type"] == "message" and json.loads(message["data"])["round_id"] == handle.round_id:
            elapsed = time.perf_counter() - start
            record = handle.wait(complete=True)  # after the clock stopped: not part of the round; every server
            return elapsed, record


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=15, help="measured rounds per method (default 15)")
    arguments.add_argument("--events", action="store_true", help="worker sends task events (as with Flower)")
    arguments.add_argument("--png", default=str(REPO / "docs" / "round_latency.png"),
                        help="where to draw the comparison (default docs/round_latency.png)")
    args = arguments.parse_args()

    with bed() as b:
        results = {}
        for set_name, delays in (("stagger", [0.010 * (i + 1) for i in range(10)]), ("same50", [0.050] * 10)):
            results[set_name] = run_set(b, delays, args)
    print_report(results, args)
    write_png(results, args)


def write_png(results, args) -> None:
    """Each method's rounds per set: every round as a dot, the median as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sequential": "#b2182b", "threadpool": "#4393c3", "pipeline": "#1b7837"}
    labels = {"sequential": "sequential (ntplib)", "threadpool": "ThreadPoolExecutor + ntplib",
              "pipeline": "chronotick-ntp pipeline"}
    fig, axes = plt.subplots(1, len(results), figsize=(11, 4.5), constrained_layout=True)
    for ax, (set_name, data) in zip(axes, results.items(), strict=True):
        for x, (method, values) in enumerate(data["times"].items()):
            ms = [v * 1e3 for v in values]
            med = statistics.median(ms)
            ax.bar(x, med, color=colours[method], alpha=0.35, width=0.6)
            ax.scatter([x] * len(ms), ms, s=10, color=colours[method], zorder=3)
            ax.annotate(f"{med:.0f} ms", (x, med), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
        ax.set_xticks(range(len(data["times"])), [labels[m] for m in data["times"]], fontsize=8, rotation=10)
        ax.set_ylabel("round wall time (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"set {set_name}: {'RTT 10..100 ms' if set_name == 'stagger' else '10 servers at 50 ms'}")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"One round of 10 servers, {args.rounds} rounds per method, medians as bars "
                 f"({platform.machine()}, {os.cpu_count()} cores)")
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    plt.close(fig)
    print(f"\nwrote {args.png}")


def run_set(b: Bed, delays, args):
    """One set of servers, its worker stopped and its servers too before the next set starts."""
    with b.scope() as this_set:
        sim = this_set.servers([Behaviour(offset_s=TRUE_OFFSET_S, delay_s=d) for d in delays])
        servers = sim.servers()
        config = this_set.config("bench.yaml", servers,
                                 ntp={"timeout_seconds": 2.0, "max_delay": 0.5, "max_acceptable_uncertainty": 0.5,
                                      "max_retries": 1},
                                 service={"key_prefix": "bench", "history_length": 100})
        this_set.worker(config, NODE, events=args.events, timeout_s=30)
        pubsub = this_set.updates(config, NODE)
        times = {"sequential": [], "threadpool": [], "pipeline": []}
        errors = {name: [] for name in ERROR_ROWS}
        for i in range(args.rounds + 2):  # two warm-up rounds
            for method in (*times, "lone"):
                if method == "pipeline":
                    elapsed, record = pipeline_round(config, pubsub)
                    offsets = [s["sample"]["offset_s"] for s in record["servers"] if s.get("sample")]
                elif method == "lone":
                    elapsed, offsets = None, [lone_exchange(s) for s in servers]
                else:
                    start = time.perf_counter()
                    offsets = ntplib_round(servers, parallel=method == "threadpool")
                    elapsed = time.perf_counter() - start
                if i >= 2:
                    if elapsed is not None:
                        times[method].append(elapsed)
                    errors[ERROR_ROW_OF[method]].extend(abs(o - TRUE_OFFSET_S) for o in offsets)
        return {"times": times, "errors": errors}


def print_report(results, args) -> None:
    print(f"machine: {machine()}, "
          f"{args.rounds} rounds per method after 2 warm-up, worker events {'on' if args.events else 'off'}")
    for set_name, data in results.items():
        times = data["times"]
        seq = statistics.median(times["sequential"])
        pool = statistics.median(times["threadpool"])
        print(f"\nset {set_name}: round wall time (ms)")
        print(f"  {'method':<12} {'median':>8} {'p90':>8} {'vs threadpool':>14} {'vs sequential':>14}")
        for method, values in times.items():
            med = statistics.median(values)
            print(f"  {method:<12} {med * 1e3:8.1f} {quantile(values, 0.9) * 1e3:8.1f} "
                  f"{med / pool:13.2f}x {seq / med:13.2f}x faster")
        print("  |offset error| per server sample (ms)       p50      p95      max")
        for row, errs in data["errors"].items():
            print(f"  {row:<40} {quantile(errs, .5) * 1e3:8.3f} {quantile(errs, .95) * 1e3:8.3f} "
                  f"{max(errs) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
