"""A soak: a thousand rounds and more, unattended -- memory, Redis, and every round recorded exactly once.

One ``chronotick-ntp beat`` dispatches rounds for a few nodes at a short
interval; one plain ``celery -A workers.app worker`` consumes all their queues
(as the README documents); three loopback servers answer.  While it runs, the
worker's and the beat's RSS and Redis' ``used_memory`` are sampled.  With
``--restarts K`` Redis (append-only file, ``appendfsync always``) is SIGKILLed
and restarted K times at random moments.

At the end, every round the beat reports as dispatched (its log) and whose
deadline has passed must be in history exactly once -- published, or closed at
its deadline -- and no round twice.

Run:  python -m bench.soak --rounds 1000                      (memory: history trimmed to --history-s)
      python -m bench.soak --rounds 1000 --restarts 5         (exactly once through Redis restarts)
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import redis

from bench.harness import bed, child_env, parser, rss_mb
from orchestrator.store import Keys
from simulator.ntpserver import Behaviour
from simulator.processes import stop_process
from workers import config as config_mod

PREFIX = "soak"
DISPATCHED = re.compile(r"\[ROUND\] (\S+): dispatched (\S+)")


def run_soak(tmp: Path | None = None, *, rounds: int, nodes: int = 2, interval_s: float = 0.2, restarts: int = 0,
             history_s: float | None = None, seed: int = 1, log=print) -> dict:
    """Run the soak in ``tmp`` (default: a temporary directory); return its figures (see the module doc)."""
    rng = random.Random(seed)
    names = [f"soak{i}" for i in range(nodes)]
    with bed("ct-soak-", directory=tmp, append_only=restarts > 0) as b:
        sim = b.servers([Behaviour(delay_s=0.002 * (i + 1)) for i in range(3)])
        service = {"key_prefix": PREFIX, "nodes": names, "history_length": 1_000_000}
        if history_s is not None:
            service["history_hours"] = history_s / 3600
        config = b.config("soak.yaml", sim.servers(),
                          ntp={"timeout_seconds": 0.3, "retry_delay": 0.1, "max_retries": 2},
                          timing={"warm_up": {"duration_seconds": 0, "measurement_interval": interval_s},
                                  "normal_operation": {"measurement_interval": interval_s}},
                          service=service, environ={config_mod.ENV_REDIS_URL: b.url})
        from orchestrator.rounds import CLOSE_GRACE_S, round_budget_s
        env = child_env(**{config_mod.ENV_REDIS_URL: b.url})
        env.pop(config_mod.ENV_NODE, None)
        os.environ.pop(config_mod.ENV_NODE, None)
        # One plain worker for every node's queue, as the README documents.
        worker = b.worker(config, names[0], concurrency=4 * nodes + 2, nodes=names, hostname="soak@%h",
                          environ={config_mod.ENV_REDIS_URL: b.url})
        beat = b.process(["python", "-m", "orchestrator.cli", "beat", "--config", str(config.source)], env=env,
                         log="beat.log")
        client = redis.Redis(port=b.redis.port, socket_timeout=2, socket_connect_timeout=2)
        keys = Keys(PREFIX)
        samples: list[dict] = []
        restart_at = sorted(rng.uniform(0.15, 0.85) * rounds for _ in range(restarts))
        budget_s = round_budget_s(config) + CLOSE_GRACE_S
        expected_s = rounds * interval_s / nodes
        deadline = time.monotonic() + 3 * expected_s + 60
        done = 0
        while done < rounds:
            if time.monotonic() > deadline or worker.poll() is not None or beat.poll() is not None:
                raise RuntimeError(f"soak stalled at {done} of {rounds} rounds; see {b.tmp}")
            try:
                done = sum(int(client.hget(keys.stats(n), "rounds") or 0) for n in names)
                samples.append({"rounds": done, "worker_mb": rss_mb(worker.pid), "beat_mb": rss_mb(beat.pid),
                                "redis_bytes": client.info("memory")["used_memory"]})
            except redis.RedisError:
                pass  # restarting
            if restart_at and done >= restart_at[0]:
                restart_at.pop(0)
                log(f"  round {done}: SIGKILL Redis and restart it from its append-only file")
                b.redis.kill_and_restart()
            time.sleep(0.5)  # the sampling period of a soak, not a synchronisation
        cut = time.time() - budget_s  # rounds dispatched before this have had their deadline
        settle = time.monotonic() + budget_s + 2
        while time.monotonic() < settle:
            time.sleep(0.2)  # let the beat close what is overdue, as it would in production
        stop_process(beat)
        stop_process(worker)
        dispatched = [(node, rid) for node, rid in DISPATCHED.findall((b.tmp / "beat.log").read_text())
                      if _dispatched_at(rid) < cut]
        history: dict[str, list[str]] = {}
        for node in names:
            entries = client.xrange(keys.history(node))
            history[node] = [json.loads(f[b"record"])["round_id"] for _, f in entries]
        stats_rounds = sum(int(client.hget(keys.stats(n), "rounds") or 0) for n in names)
    ids = [rid for node in names for rid in history[node]]
    missing = [rid for node, rid in dispatched if rid not in history[node]]
    if history_s is not None:  # trimmed by age: only rounds young enough to still be kept can be checked
        keep_from = time.time() - history_s + 5
        missing = [rid for rid in missing if _dispatched_at(rid) > keep_from]
    warm = next(s for s in samples if s["rounds"] >= rounds * 0.2)
    half = next(s for s in samples if s["rounds"] >= rounds * 0.6)
    end = samples[-1]
    return {"rounds": stats_rounds, "dispatched_checked": len(dispatched), "missing": missing,
            "duplicates": len(ids) - len(set(ids)), "restarts": restarts,
            "worker_mb": (warm["worker_mb"], end["worker_mb"]), "beat_mb": (warm["beat_mb"], end["beat_mb"]),
            "redis_bytes": (warm["redis_bytes"], half["redis_bytes"], end["redis_bytes"]),
            "history_entries": sum(len(v) for v in history.values())}


def _dispatched_at(round_id: str) -> float:
    """A round's dispatch time from its id (``node-YYYYmmddTHHMMSS.mmmZ-xxxxxx``)."""
    stamp = round_id.rsplit("-", 2)[-2]
    return time.mktime(time.strptime(stamp[:15], "%Y%m%dT%H%M%S")) - time.timezone + int(stamp[16:19]) / 1000


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=1000)
    arguments.add_argument("--nodes", type=int, default=2)
    arguments.add_argument("--interval", type=float, default=0.2, help="each node's interval (s)")
    arguments.add_argument("--restarts", type=int, default=0, help="SIGKILL and restart Redis this many times")
    arguments.add_argument("--history-s", type=float, default=None,
                        help="history kept (s; default: the soak's length / 3, without restarts)")
    args = arguments.parse_args()
    history_s = args.history_s
    if history_s is None and args.restarts == 0:
        history_s = args.rounds * args.interval / args.nodes / 3
    started = time.monotonic()
    r = run_soak(rounds=args.rounds, nodes=args.nodes, interval_s=args.interval, restarts=args.restarts,
                 history_s=history_s)
    took = time.monotonic() - started
    w0, w1 = r["worker_mb"]
    b0, b1 = r["beat_mb"]
    m0, m1, m2 = r["redis_bytes"]
    print(f"\n{r['rounds']} rounds, {args.nodes} nodes every {args.interval:g} s, {args.restarts} Redis restarts, "
          f"history {'kept whole' if history_s is None else f'{history_s:.0f} s'}; {took:.0f} s")
    print(f"  {'worker RSS after warm-up (20 %) -> end':<44} {w0:6.1f} -> {w1:6.1f} MB ({w1 - w0:+.1f}; target <= +5)")
    print(f"  {'beat RSS after warm-up -> end':<44} {b0:6.1f} -> {b1:6.1f} MB ({b1 - b0:+.1f}; target <= +5)")
    print(f"  {'Redis used_memory at 20 %, 60 %, 100 %':<44} {m0 / 1e6:6.2f}, {m1 / 1e6:.2f}, {m2 / 1e6:.2f} MB")
    print(f"  {'history entries at the end':<44} {r['history_entries']:6}")
    print(f"  {'dispatched rounds checked':<44} {r['dispatched_checked']:6}")
    print(f"  {'  missing from history':<44} {len(r['missing']):6}")
    print(f"  {'  recorded twice':<44} {r['duplicates']:6}")


if __name__ == "__main__":
    main()
