"""What ChronoTick's calls cost on the drop-in collector, with Redis up and with Redis stalled.

ChronoTick's pipeline calls ``get_recent_measurements(500)`` and
``get_latest_offset()`` on every correction (about once a second).  The
drop-in (:class:`orchestrator.reader.ClockMeasurementSource`) answers both
from memory while one thread follows the node's history stream.  This bench
publishes 1,000 three-server rounds (the most the collector keeps, all inside
ChronoTick's 500 s window) into a private Redis, then times each call:

- Redis up, 1,000 measurements held;
- Redis stalled (SIGSTOP), for ``--stall`` seconds, calls at about a thousand a second;
- how long a newly published round takes to become visible to the calls
  (publish to ``has_new_measurement()``), Redis up.

Medians, p99 and the maximum, from one run.  Target: no call over 1 s.

Run:  python -m bench.collector [--calls 2000] [--stall 5] [--rounds 50]
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time

from bench.harness import bed, parser, quantile
from orchestrator.callback import build_record
from orchestrator.outcomes import RoundMeta
from orchestrator.reader import KEEP_MEASUREMENTS, ClockMeasurementSource
from orchestrator.store import Store
from workers import config as config_mod

NODE = "ares-comp-11"
PREFIX = "bench"


def _record(i: int, now: float) -> dict:
    """A three-server round as the callback builds it (orchestrator.callback.build_record), measured at ``now``."""
    servers = [f"172.20.1.1:{8123 + k}" for k in range(3)]
    meta = RoundMeta(round_id=f"{NODE}-r{i}", node=NODE, dispatched_at=now - 0.05, deadline_at=now + 30,
                     key_prefix=PREFIX, history_length=5000, ntp=config_mod.ntp_from_mapping({"servers": servers}))
    outcomes = []
    for k, name in enumerate(servers):
        delay = 0.010 + 0.004 * k
        sample = {"server": name, "address": "172.20.1.1", "port": 8123 + k, "offset_s": 0.0021 + 1e-5 * k,
                  "delay_s": delay, "uncertainty_s": delay / 2 + 0.0004, "stratum": 1, "leap": 0,
                  "precision_s": 2 ** -20, "root_delay_s": 0.0, "root_dispersion_s": 0.0002, "ref_id": "GOOG",
                  "t1_ns": int((now - 0.03) * 1e9), "t4_ns": int((now - 0.03 + delay) * 1e9),
                  "kernel_rx_timestamp": True, "measured_at": now - 0.03 + delay / 2}
        outcomes.append({"summary": "ok", "status": "ok", "server": name, "sample": sample, "attempts": 1,
                         "history": [{"attempt": 1, "started_at": now - 0.04, "reason": None}],
                         "worker": f"{NODE}@{NODE}"})
    return build_record(meta, outcomes, finished_at=now)


def _stats(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples) * 1e3, quantile(samples, 0.99) * 1e3, max(samples) * 1e3


def _time_calls(source: ClockMeasurementSource, calls: int, until: float | None = None) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {"get_recent_measurements(500)": [], "get_latest_offset()": []}
    done = 0
    while done < calls or (until is not None and time.monotonic() < until):
        for name, call in (("get_recent_measurements(500)", lambda: source.get_recent_measurements(500)),
                           ("get_latest_offset()", source.get_latest_offset)):
            started = time.perf_counter()
            call()
            took[name].append(time.perf_counter() - started)
        done += 1
        if until is not None:
            time.sleep(0.001)  # the load's pace during the stall: about a thousand calls a second
    return took


def main() -> int:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--calls", type=int, default=2000, help="calls of each kind with Redis up")
    arguments.add_argument("--stall", type=float, default=5.0, help="seconds Redis is stopped")
    arguments.add_argument("--rounds", type=int, default=50, help="rounds published one by one to time visibility")
    args = arguments.parse_args()
    with bed() as b:
        config = b.config("c.yaml", ["172.20.1.1:8123"],
                          timing={"warm_up": {"duration_seconds": 0, "measurement_interval": 1},
                                  "normal_operation": {"measurement_interval": 120}},
                          service={"key_prefix": PREFIX, "history_length": 5000})
        client = b.client()
        store = Store(client, prefix=PREFIX)
        now = time.time()
        for i in range(KEEP_MEASUREMENTS):  # one every 0.4 s, ending now: all inside ChronoTick's 500 s window
            store.publish_round(_record(i, now - (KEEP_MEASUREMENTS - i) * 0.4), history_length=5000,
                                window_size=20)
        source = ClockMeasurementSource(str(config.source), NODE)
        source.start_collection()
        deadline = time.monotonic() + 10
        while len(source.get_recent_measurements(10 ** 6)) < KEEP_MEASUREMENTS and time.monotonic() < deadline:
            time.sleep(0.01)
        held = len(source.get_recent_measurements(10 ** 6))

        visible = []
        for i in range(args.rounds):
            source.has_new_measurement()
            record = _record(KEEP_MEASUREMENTS + i, time.time())
            published = time.perf_counter()
            store.publish_round(record, history_length=5000, window_size=20)
            while not source.has_new_measurement():
                if time.perf_counter() - published > 5:
                    break
                time.sleep(0.0002)
            visible.append(time.perf_counter() - published)

        up = _time_calls(source, args.calls)
        redis_pid = b.redis.process.pid
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            stalled = _time_calls(source, 0, until=time.monotonic() + args.stall)
            reachable_during = source.reachable
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        stop_started = time.perf_counter()
        source.stop_collection()
        stop_s = time.perf_counter() - stop_started

    print(f"drop-in collector: {held} measurements held; Redis up, then stopped (SIGSTOP) for {args.stall:g} s")
    print()
    print(f"  {'call':34} {'when':10} {'calls':>7} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    worst = 0.0
    for when, table in (("Redis up", up), ("stalled", stalled)):
        for name, samples in table.items():
            median, p99, most = _stats(samples)
            worst = max(worst, most)
            print(f"  {name:34} {when:10} {len(samples):>7} {median:>10.3f} {p99:>8.3f} {most:>8.3f}")
    median, p99, most = _stats(visible)
    print(f"  {'publish -> has_new_measurement()':34} {'Redis up':10} {len(visible):>7} {median:>10.3f} "
          f"{p99:>8.3f} {most:>8.3f}")
    print(f"  {'stop_collection()':34} {'after':10} {1:>7} {stop_s * 1e3:>10.1f}")
    print()
    print(f"  during the stall the source said reachable={reachable_during}; slowest call {worst:.3f} ms "
          f"(target < 1000 ms): {'ok' if worst < 1000 else 'MISS'}")
    return 0 if worst < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
