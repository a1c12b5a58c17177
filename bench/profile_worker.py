"""Where a node's worker spends its GIL during rounds: py-spy samples, sorted into Celery's parts and ours.

A private Redis, N loopback servers that all answer in 20 ms (replies land
together: the worst case for one GIL), one worker process, and ``--rounds``
rounds sent as ``measure`` sends them (or as the beat does, ``--beat``).
py-spy (``pip install py-spy``; not a dependency of the service) samples the
worker's GIL holder; each sample goes to the first part, in the order of the
table, that appears in its stack.

Run:  python -m bench.profile_worker [--servers 40] [--rounds 150] [--beat] [--rate 500] [--raw FILE]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.harness import bed, parser
from simulator.ntpserver import Behaviour

NODE = "profiled"

#: (part, marker in a stack frame), in the order a sample is matched.
PARTS = (
    ("Celery: the chord's join (Lua per task; the callback's publication)", "on_chord_part_return"),
    ("Celery: storing a task's result", "Backend.store_result"),
    ("Celery: saferepr of each result", "saferepr"),
    ("ours: the early decider (early.decide)", "decide (orchestrator/early.py"),
    ("ours: deciding early, the rest (meta, publishing early)", "decide_early (orchestrator/callback.py"),
    ("ours: the tracker (requests out, when to ask)", "workers/inflight.py"),
    ("ours: the NTP exchange and its checks", "attempt (workers/measure.py"),
    ("ours: the reporter thread (reports for the closer)", "Reporter._run"),
    ("ours: the chord callback (selection, publication)", "finish_round (orchestrator/callback.py"),
    ("ours: the fan-out (sending the round's messages)", "_send_frozen"),
    ("Celery: the consumer thread (BRPOP, decoding, hand-off)", "MainThread"),
    ("Celery: the rest of running a task", "trace_task"),
    ("Celery: the thread pool and the request's bookkeeping", "concurrent/futures/thread.py"),
)


#: Samples whose stack py-spy caught only in part (it does not pause the worker).
OTHER = "other (partial stacks)"


def py_spy() -> str:
    found = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def classify(raw: Path) -> tuple[Counter, int]:
    parts: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        part = next((name for name, marker in PARTS if marker in stack), OTHER)
        parts[part] += n
    return parts, total


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--servers", type=int, default=40)
    arguments.add_argument("--rounds", type=int, default=150)
    arguments.add_argument("--beat", action="store_true",
                           help="send rounds as the beat does (fanned out by the worker)")
    arguments.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    arguments.add_argument("--raw", help="also keep py-spy's raw samples in this file (one stack a line)")
    args = arguments.parse_args()
    spy_bin = py_spy()
    with bed("ct-profile-") as b:
        sim = b.servers([Behaviour(delay_s=0.020) for _ in range(args.servers)])
        config = b.config("profile.yaml", sim.servers(),
                          ntp={"timeout_seconds": 2.0, "max_delay": 0.5, "max_acceptable_uncertainty": 0.5,
                               "max_retries": 1},
                          service={"key_prefix": "profile", "nodes": [NODE]})
        worker = b.worker(config, NODE)
        raw = b.tmp / "samples.txt"
        from orchestrator import rounds

        def one_round() -> None:
            if args.beat:
                handle = rounds.dispatch_fanned_out(config, NODE)
                deadline = time.monotonic() + 30
                while not handle.ready():
                    if time.monotonic() > deadline:
                        raise SystemExit(f"round {handle.round_id} did not finish")
                    time.sleep(0.002)  # polling one EXISTS: this process is not the one profiled
            elif rounds.dispatch(config, NODE).wait() is None:
                raise SystemExit("a round did not finish")

        for _ in range(3):
            one_round()
        spy = b.process([spy_bin, "record", "--pid", str(worker.pid), "--rate", str(args.rate), "--format", "raw",
                         "--output", str(raw), "--gil", "--threads", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.perf_counter()
        for _ in range(args.rounds):
            one_round()
        took = time.perf_counter() - started
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=30)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        parts, total = classify(raw)
        if args.raw:
            shutil.copyfile(raw, args.raw)
    path_name = "the beat's (fanned out by the worker)" if args.beat else "measure's"
    print(f"{args.rounds} rounds of {args.servers} servers at 20 ms, sent on {path_name} path: "
          f"{took / args.rounds * 1e3:.1f} ms a round while sampled; {total} GIL samples at {args.rate} Hz\n")
    print(f"  {'part':<70} {'share':>7}")
    for name, _ in (*PARTS, (OTHER, "")):
        print(f"  {name:<70} {parts[name] / max(1, total) * 100:>6.1f}%")


if __name__ == "__main__":
    main()
