"""What one node costs in Redis: bytes per round record, per node at steady state, for 500 and 5,000 nodes.

Real rounds of ten loopback servers (round trips 10..100 ms, two of them dead,
so records carry retries and failures) go through the whole pipeline with the
default settings; then Redis itself is asked (``MEMORY USAGE``, all samples)
what each of the node's keys takes.  Rounds are waited for, as ``measure``
and the beat do, so Celery's results are forgotten; any left are counted.

Steady state with the defaults -- a round every 2 minutes, 24 hours of
history -- is 720 records; the projection is bytes per history entry x 720
plus the node's fixed keys, plus the claims of the last 2 hours.

Run:  python -m bench.redis_memory [--rounds 200] [--detail compact|verbose]
"""

from __future__ import annotations

import statistics

from bench.harness import bed, parser
from orchestrator import rounds
from orchestrator.store import ROUND_CLAIM_TTL_S, Keys
from simulator.ntpserver import Behaviour

NODE = "ares-comp-11"
ROUNDS_PER_DAY = 24 * 3600 // 120


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=200, help="rounds to run (default 200)")
    arguments.add_argument("--detail", default="compact", choices=("compact", "verbose"))
    args = arguments.parse_args()
    behaviours = [Behaviour(delay_s=0.010 * (i + 1)) for i in range(8)] + [Behaviour(loss=1.0)] * 2
    with bed("ct-mem-") as b:
        sim = b.servers(behaviours)
        config = b.config("mem.yaml", sim.servers(),
                          ntp={"timeout_seconds": 0.2, "retry_delay": 0.05, "max_delay": 0.5,
                               "max_acceptable_uncertainty": 0.5},
                          service={"record_detail": args.detail})
        b.worker(config, NODE)
        client = b.client()
        before = client.info("memory")["used_memory"]
        for _ in range(args.rounds):
            if rounds.dispatch(config, NODE).wait() is None:
                raise SystemExit("a round did not finish")
        keys = Keys(config.service.key_prefix)
        history = keys.history(NODE)
        entries = client.xrange(history)
        record_bytes = [len(fields["record"].encode()) for _, fields in entries]
        history_bytes = client.memory_usage(history, samples=0)
        node_keys = {name: client.memory_usage(key, samples=0) or 0 for name, key in (
            ("latest", keys.latest(NODE)), ("stats", keys.stats(NODE)),
            ("round_duration", keys.round_duration(NODE)), ("server_delay", keys.server_delay(NODE)),
            ("filter_window", keys.filter_window(NODE)), ("filter_state", keys.filter_state(NODE)),
            ("open", keys.open_rounds(NODE)))}
        claims = list(client.scan_iter(match=keys.round_claim(NODE, "*"), count=1000))
        claim_bytes = statistics.median(client.memory_usage(k, samples=0) for k in claims[:50])
        celery_left = sum(1 for _ in client.scan_iter(match="celery-task-meta-*", count=1000))
        reports_left = sum(1 for _ in client.scan_iter(match=keys.outcomes(NODE, "*"), count=1000))
        chord_keys = list(client.scan_iter(match="celery-taskset-meta-*", count=1000))
        chord_left = len(chord_keys)
        chord_ttl = max((client.ttl(k) for k in chord_keys), default=0)
        used = client.info("memory")["used_memory"] - before
    per_entry = history_bytes / len(entries)
    fixed = sum(node_keys.values())
    claims_kept = ROUND_CLAIM_TTL_S / 120
    per_node = per_entry * ROUNDS_PER_DAY + fixed + claims_kept * claim_bytes
    print(f"{args.rounds} rounds of 10 servers (8 answer, 2 dead: 3 attempts each), record_detail={args.detail}")
    print(f"\n  {'what':<52} {'bytes':>12}")
    print(f"  {'round record as stored (JSON), median':<52} {statistics.median(record_bytes):>12,.0f}")
    print(f"  {'history entry in Redis (MEMORY USAGE / entries)':<52} {per_entry:>12,.0f}")
    for name, size in node_keys.items():
        print(f"  {'  ' + name:<52} {size:>12,}")
    print(f"  {'a round claim (kept 2 h)':<52} {claim_bytes:>12,.0f}")
    print(f"  {'Celery results left after the rounds':<52} {celery_left:>12}")
    print(f"  {'round reports left (the closer reads them)':<52} {reports_left:>12}")
    print(f"  {'Celery chord markers left (they expire; longest TTL)':<52} {chord_left:>6} ({chord_ttl} s)")
    print(f"  {'Redis used_memory growth over the run':<52} {used:>12,}")
    print(f"\n  steady state per node, 2-min interval, 24 h history ({ROUNDS_PER_DAY} records): "
          f"{per_node / 1e6:.2f} MB (target <= 2 MB)")
    for nodes in (500, 5000):
        print(f"  {nodes:>5} nodes: {per_node * nodes / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
