"""Where a round's time goes: dispatch, task starts, the last reply, the callback, the consumer.

Ten simulated servers with round trips 10, 20, ... 100 ms (``--set stagger``)
or all 50 ms (``--set same50``, every reply lands at once), a real worker, a
private Redis.  For each round it takes, relative to the moment dispatch began:
when ``dispatch`` returned, when the first and the last query task started,
when the slowest server's task started, the last t4, when the callback
finished, and when the ``updates`` message reached a subscriber.  Medians over
the rounds after two warm-up rounds.

Run:  python -m bench.round_breakdown [--rounds 15] [--set stagger|same50]
"""

from __future__ import annotations

import json
import statistics
import time

from bench.harness import bed, parser
from simulator.ntpserver import Behaviour

NODE = "breakdown"


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=15)
    arguments.add_argument("--set", choices=("stagger", "same50"), default="stagger")
    args = arguments.parse_args()
    with bed("ct-breakdown-") as b:
        delays = [0.050] * 10 if args.set == "same50" else [0.010 * (i + 1) for i in range(10)]
        sim = b.servers([Behaviour(offset_s=0.25, delay_s=d) for d in delays])
        config = b.config("breakdown.yaml", sim.servers(),
                          ntp={"max_delay": 0.5, "max_acceptable_uncertainty": 0.5, "max_retries": 1},
                          service={"key_prefix": "breakdown"})
        from orchestrator import rounds

        b.worker(config, NODE)
        pubsub = b.updates(config, NODE)
        rows = []
        for i in range(args.rounds + 2):
            t0 = time.time()
            handle = rounds.dispatch(config, NODE)
            dispatched = time.time()
            while True:
                message = pubsub.get_message(timeout=10)
                if message and message["type"] == "message" and \
                        json.loads(message["data"])["round_id"] == handle.round_id:
                    break
            received = time.time()
            record = handle.wait(complete=True)  # with the servers still out when it was published early
            starts = sorted(s["history"][0]["started_at"] for s in record["servers"])
            slowest = max(record["servers"], key=lambda s: s["sample"]["delay_s"])
            last_t4 = max(s["sample"]["t4_ns"] for s in record["servers"]) / 1e9
            if i >= 2:
                rows.append({"dispatch returned": dispatched, "first task started": starts[0],
                             "last task started": starts[-1],
                             "slowest server's task started": slowest["history"][0]["started_at"],
                             "last reply (t4)": last_t4, "callback finished": record["finished_at"],
                             "consumer got the update": received, "_t0": t0})
    rtts = "all 50 ms" if args.set == "same50" else "10..100 ms, slowest first"
    print(f"median over {args.rounds} rounds, ms after dispatch began (set {args.set}: RTTs {rtts}):")
    for name in rows[0]:
        if name != "_t0":
            print(f"  {name:<32} {statistics.median((r[name] - r['_t0']) * 1e3 for r in rows):7.1f}")


if __name__ == "__main__":
    main()
