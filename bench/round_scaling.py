"""A round against Celery's own floor, and the sweep N = 5, 10, 20, 40, in one run each.

The default run prints issue #24's table (item 3): N = 10 and 40 loopback
servers, all 20 ms away, one worker process, repetitions interleaved (every
repetition runs each method once, for both N, in a rotating order), medians:

pipeline    a real round as ``measure`` sends it (``rounds.dispatch``, then
            ``wait``): its record's ``duration_s`` -- dispatch to publication,
            on Redis' clock, what ``measure --json`` prints -- and the wall
            time here from dispatch until the record is in hand
thread pool ``ThreadPoolExecutor(N)`` + ntplib, one query per server
noop chord  a chord of N no-op tasks (Celery's built-in ``celery.accumulate``)
            and a no-op callback, sent and awaited the same way (send to
            ``get()``) on the same worker and broker: Celery's own floor

and the targets: N = 40 pipeline <= 1.0x the no-op chord of 40, N = 10
pipeline <= the thread pool + 20 ms.  ``--quick``: 5 repetitions.  ``--cli``
adds a column: ``chronotick-ntp measure --json``'s ``duration_s``, each from a
fresh process (the issue's own measurement), which also pays that process's
first connections.  A round published early still has servers out: every
pipeline round is let complete (untimed) before the next measurement.

``--sweep`` runs the older, wider sweep instead: N = 5, 10, 20, 40, equal
(20 ms) and staggered (2..40 ms) servers, the beat's path too, the no-op chord
with and without stored results, CPU per task and RSS per worker process, for
one and then two worker processes, and a PNG:

pipeline    a real round: ``rounds.dispatch`` (as ``measure`` sends it: every
            query message from here) until it is published, seen from here
            (dispatch to the record in hand)
beat        a real round as the beat sends it: one message, which the node's
            worker fans out into the chord, until the ``updates`` message
            reaches a subscriber here
noop chord  as above
noop, no result
            the same chord with the header's results ignored, as the
            pipeline's query tasks do (only the chord's join carries them):
            the floor for that setting
thread pool as above

and the worker's CPU per task (from /proc, for pipeline and beat rounds; the
beat's includes sending the query messages) and its RSS.
Medians of ``--rounds`` rounds.  The ratios are issue #12's targets:
pipeline / thread pool; the per-server marginal cost (the slope from N = 5 to
40) against the no-op chord's; N = 40 equal against the no-op chord of 40 plus
the servers' 20 ms.

Run:  python -m bench.round_scaling [--reps 15] [--quick] [--cli]
      python -m bench.round_scaling --sweep [--rounds 11] [--processes 1 2] [--png docs/round_scaling.png]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ntplib

from bench.harness import REPO, Bed, bed, child_env, cpu_s, parser, rss_mb
from simulator.ntpserver import Behaviour

NODE = "scaling"
SIZES = (5, 10, 20, 40)
EQUAL_DELAY_S = 0.020

#: Issue #24's sizes and targets: N = 40 within this many times the no-op chord of 40 ...
ISSUE_SIZES = (10, 40)
TARGET_NOOP_RATIO = 1.0
#: ... and N = 10 within this much of the thread pool (s).
TARGET_OVER_POOL_S = 0.020


def delays_for(kind: str, n: int) -> list[float]:
    if kind == "equal":
        return [EQUAL_DELAY_S] * n
    return [0.002 + 0.038 * i / max(1, n - 1) for i in range(n)]  # 2 .. 40 ms


def settle(config, round_id: str) -> None:
    """Wait (untimed) until a published round is complete: its late servers in, its callback run."""
    from orchestrator.store import COMPLETE, store_for

    store = store_for(config.service)
    deadline = time.monotonic() + 30
    while store.round_state(NODE, round_id) != COMPLETE:
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {round_id} was not completed")
        time.sleep(0.002)


class Bench:
    """Loopback servers for each (kind, N), a private Redis, and the ways to time a round against them."""

    def __init__(self, b: Bed, keys: list[tuple[str, int]]):
        self.bed = b
        self.configs = {}
        for kind, n in keys:
            sim = b.servers([Behaviour(delay_s=d) for d in delays_for(kind, n)])
            self.configs[(kind, n)] = b.config(f"{kind}{n}.yaml", sim.servers(),
                                               ntp={"timeout_seconds": 2.0, "max_delay": 0.5,
                                                    "max_acceptable_uncertainty": 0.5, "max_retries": 1},
                                               service={"key_prefix": "scaling", "nodes": [NODE]})
        self.updates = None

    def start_workers(self, on: Bed, processes: int) -> list:
        """``processes`` workers on the node's queue, started on ``on`` (they stop when it ends)."""
        largest = max(self.configs, key=lambda k: k[1])
        return [on.worker(self.configs[largest], NODE, log=f"worker{i}.log", instance=i) for i in range(processes)]

    def pipeline(self, config) -> tuple[float, float]:
        """One round as ``measure`` sends it: (wall time here, the record's ``duration_s``).

        Timed until the record is in hand.  A round published early still has servers out, and its
        callback still to run: this waits (untimed) until it is complete, so that its tail does not
        land in the next measurement.
        """
        from orchestrator import rounds

        started = time.perf_counter()
        handle = rounds.dispatch(config, NODE)
        record = handle.wait()
        took = time.perf_counter() - started
        assert record and record["latest"], record
        settle(config, handle.round_id)
        return took, record["duration_s"]

    def measure_cli(self, config) -> float:
        """``chronotick-ntp measure --json`` in a fresh process: the record's ``duration_s``."""
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "measure", "--config", str(config.source),
                              "--node", NODE, "--json"], capture_output=True, text=True, cwd=str(REPO), timeout=60,
                             env=child_env(), check=False)
        if out.returncode:
            raise RuntimeError(f"measure failed ({out.returncode}): {out.stderr[-2000:]}")
        record = json.loads(out.stdout)
        settle(config, record["round_id"])
        return record["duration_s"]

    def beat(self, config) -> float:
        from orchestrator import rounds

        if self.updates is None:
            self.updates = self.bed.updates(config, NODE)
        started = time.perf_counter()
        handle = rounds.dispatch_fanned_out(config, NODE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = self.updates.get_message(timeout=1)
            if message and message["type"] == "message" and json.loads(message["data"])["round_id"] == \
                    handle.round_id:
                took = time.perf_counter() - started
                settle(config, handle.round_id)
                return took
        raise RuntimeError(f"round {handle.round_id} was not published")

    def noop(self, n: int, *, ignore_result: bool = False) -> float:
        from celery.result import AsyncResult

        from workers import chords
        from workers.app import app, queue_for

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

    @staticmethod
    def threadpool(servers: list[str]) -> float:
        ntp = ntplib.NTPClient()
        started = time.perf_counter()
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: ntp.request(s.split(":")[0], port=int(s.split(":")[1]),
                                                version=4, timeout=2), servers))
        return time.perf_counter() - started


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--reps", type=int, default=15, help="interleaved repetitions (issue table)")
    arguments.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up (issue table)")
    arguments.add_argument("--cli", action="store_true",
                        help="also `chronotick-ntp measure --json` in a fresh process each time (issue table)")
    arguments.add_argument("--sweep", action="store_true", help="the wider sweep instead (issue #12's table)")
    arguments.add_argument("--rounds", type=int, default=11, help="rounds per cell (--sweep)")
    arguments.add_argument("--png", default=str(REPO / "docs" / "round_scaling.png"), help="(--sweep)")
    arguments.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="worker processes on the node's queue, one sweep each (--sweep; the PNG shows the first)")
    args = arguments.parse_args()
    if args.sweep:
        sweep_main(args)
    else:
        issue_main(args)


# -- issue #24: a round against the no-op chord and the thread pool, N = 10 and 40 ------------------------

def issue_main(args) -> None:
    reps = 5 if args.quick else args.reps
    warmup = 1 if args.quick else 2
    keys = [("equal", n) for n in ISSUE_SIZES]
    with bed("ct-scaling-") as b:
        bench = Bench(b, keys)
        workers = bench.start_workers(b, 1)
        methods = {
            "pipeline": lambda key: bench.pipeline(bench.configs[key]),
            "threadpool": lambda key: bench.threadpool([s.name for s in bench.configs[key].ntp.servers]),
            "noop": lambda key: bench.noop(key[1]),
        }
        if args.cli:
            methods["measure"] = lambda key: bench.measure_cli(bench.configs[key])
        for _ in range(warmup):  # the first rounds learn the slowest-first order; Celery warms up
            for key in keys:
                for run in methods.values():
                    run(key)
        times: dict[tuple, dict[str, list[float]]] = {
            key: {"pipeline_wall": [], **{name: [] for name in methods}} for key in keys}
        order = list(methods)
        cpu_before = cpu_s(workers[0].pid)
        for rep in range(reps):
            rotated = order[rep % len(order):] + order[:rep % len(order)]
            for key in (keys if rep % 2 == 0 else keys[::-1]):
                for name in rotated:
                    got = methods[name](key)
                    if name == "pipeline":
                        times[key]["pipeline_wall"].append(got[0])
                        times[key]["pipeline"].append(got[1])
                    else:
                        times[key][name].append(got)
        cpu = cpu_s(workers[0].pid) - cpu_before
        rss = rss_mb(workers[0].pid)
    issue_report({key: {name: statistics.median(v) for name, v in t.items()} for key, t in times.items()},
                 reps=reps, cpu_s_total=cpu, rss=rss)


def issue_report(found: dict, *, reps: int, cpu_s_total: float, rss: float) -> None:
    print(f"issue #24: servers all {EQUAL_DELAY_S * 1e3:.0f} ms away on loopback, one worker process, medians of "
          f"{reps} interleaved repetitions (worker CPU over the run {cpu_s_total:.1f} s, RSS {rss:.0f} MB)\n")
    cli = all("measure" in r for r in found.values())
    print(f"  {'N':>3} {'pipeline':>9} {'(wall)':>9} {'thread pool':>12} {'noop chord':>11} "
          f"{'pipe/noop':>10} {'pipe-pool':>10}" + (f" {'measure --json':>15}" if cli else ""))
    for (_, n), r in found.items():
        print(f"  {n:>3} {r['pipeline'] * 1e3:>6.1f} ms {r['pipeline_wall'] * 1e3:>6.1f} ms "
              f"{r['threadpool'] * 1e3:>9.1f} ms {r['noop'] * 1e3:>8.1f} ms "
              f"{r['pipeline'] / r['noop']:>9.2f}x {(r['pipeline'] - r['threadpool']) * 1e3:>+7.1f} ms"
              + (f" {r['measure'] * 1e3:>12.1f} ms" if cli else ""))
    print("  (pipeline: the record's duration_s, dispatch to publication, as `measure --json` prints it, for rounds "
          "sent from this process; (wall): dispatch to record in hand here)")
    if cli:
        print("  (measure --json: its duration_s, each from a fresh process: the same round, and that process's "
              "first connections to the broker)")
    print()
    big = found[("equal", max(ISSUE_SIZES))]
    small = found[("equal", min(ISSUE_SIZES))]
    for name, label in (("pipeline", "pipeline"), ("measure", "measure --json")):
        if name not in big:
            continue
        ratio = big[name] / big["noop"]
        over = small[name] - small["threadpool"]
        print(f"  target: N={max(ISSUE_SIZES)} {label} <= {TARGET_NOOP_RATIO:.1f}x the no-op chord of "
              f"{max(ISSUE_SIZES)}: {ratio:.2f}x  {'met' if ratio <= TARGET_NOOP_RATIO else 'NOT met'}")
        print(f"  target: N={min(ISSUE_SIZES)} {label} <= thread pool + {TARGET_OVER_POOL_S * 1e3:.0f} ms: "
              f"{small[name] * 1e3:.1f} <= {(small['threadpool'] + TARGET_OVER_POOL_S) * 1e3:.1f} ms  "
              f"{'met' if over <= TARGET_OVER_POOL_S else 'NOT met'}")


# -- issue #12: the sweep ----------------------------------------------------------------------------------

def sweep_main(args) -> None:
    keys = [(kind, n) for kind in ("equal", "stagger") for n in SIZES]
    with bed("ct-scaling-") as b:
        bench = Bench(b, keys)
        configs = bench.configs

        def sweep(processes: int) -> tuple[dict, list[float]]:
            with b.scope() as this_sweep:
                workers = bench.start_workers(this_sweep, processes)
                found: dict[tuple[str, int], dict] = {}
                for key in configs:
                    bench.pipeline(configs[key])  # warm-up: first round of each set (slowest-first order learnt)
                for key, config in configs.items():
                    n = key[1]
                    servers = [s.name for s in config.ntp.servers]
                    times: dict[str, list[float]] = {"pipeline": [], "beat": [], "noop": [], "noop_ignored": [],
                                                      "threadpool": []}
                    cpu = {"pipeline": 0.0, "beat": 0.0}
                    for _ in range(args.rounds):
                        for name, run in (("pipeline", lambda c: bench.pipeline(c)[0]), ("beat", bench.beat)):
                            before = sum(cpu_s(w.pid) for w in workers)
                            times[name].append(run(config))
                            cpu[name] += sum(cpu_s(w.pid) for w in workers) - before
                        times["noop"].append(bench.noop(n))
                        times["noop_ignored"].append(bench.noop(n, ignore_result=True))
                        times["threadpool"].append(bench.threadpool(servers))
                    found[key] = {name: statistics.median(v) for name, v in times.items()}
                    for name, seconds in cpu.items():
                        found[key][f"{name}_cpu_per_task_ms"] = seconds / (args.rounds * n) * 1e3
                return found, [rss_mb(w.pid) for w in workers]

        sweeps = {p: sweep(p) for p in args.processes}
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
