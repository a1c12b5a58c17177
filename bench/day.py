"""One day of ChronoTick's homelab, replayed at compressed time: the six targets with every fault of a real day.

ChronoTick's own ``configs/config_homelab_2min_ntp.yaml`` (advanced mode, ten servers, Google's four as
one group, ``combine``, 2 s timeout, retries at 0, 5, 15 s), with its ten servers replaced by loopback
simulators that behave like the homelab's pool.ntp.org trace: round trips from 10.1 ms to 70 ms (median
36.6 ms), a spike to 100-208 ms in 1.5 % of the queries, 1.6 % of requests lost.  On top, the day's faults:

=============  ==================  =================================================================
when           server              what
=============  ==================  =================================================================
02:00-06:00    2.pool.ntp.org      dead: never answers (4 h)
10:00-11:00    time.cloudflare     a falseticker: 50 ms off, and quick (1 h)
13:20-13:26    time.nist.gov       answers with a RATE kiss
17:00-17:06    every server        the seed's starvation episode: every delay 118 ms for 6 min 37 s
=============  ==================  =================================================================

720 rounds, one per 2-minute slot of the day, on a real worker and a private Redis, one slot every
``--slot`` seconds (default 1: 12 minutes).  The configuration's interval is scaled the same way, so a
RATE kiss keeps its server away for the same four slots it would for real.  The table is
``chronotick-ntp status``'s own figures over the day's records, plus what a day of faults must not cost:
no falseticker published, every published offset within its bound of the truth, and the longest stretch
of the day with no new measurement.

Run:  python -m bench.day                      (writes docs/day.png)
      python -m bench.day --slot 0.6 --plot /tmp/day.png
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import yaml

from bench.harness import REPO, Bed, bed, parser
from simulator.ntpserver import Behaviour
from workers import config as config_mod

NODE = "homelab"
SLOTS = 720
SLOT_S = 120.0  # the day's interval
#: The servers' base round trips (s), spread as the homelab trace's are (min 10.1, median 36.6, p95 70 ms).
BASE_RTT_S = (0.0101, 0.014, 0.020, 0.028, 0.033, 0.0366, 0.041, 0.050, 0.062, 0.070)
SPIKE_P, SPIKE_S = 0.015, (0.100, 0.208)
LOSS = 0.016
TRUTH_S = 0.0  # every honest server tells the truth: a published offset is this within its bound


def events(slot: int) -> dict[int, Behaviour | str]:
    """The faults in force at ``slot`` (server index -> what), the day's timetable above."""
    hour = slot * SLOT_S / 3600
    found: dict[int, Behaviour | str] = {}
    if 2 <= hour < 6:
        found[8] = Behaviour(loss=1.0)  # 2.pool.ntp.org
    if 10 <= hour < 11:
        found[4] = "falseticker"  # time.cloudflare.com
    if 13 + 20 / 60 <= hour < 13 + 26 / 60:
        found[5] = Behaviour(kod="RATE")  # time.nist.gov
    if 17 <= hour < 17 + 397 / 3600:
        found[-1] = "congested"  # every server at 118 ms
    return found


def behaviour_for(index: int, slot: int, rng: random.Random) -> Behaviour:
    fault = events(slot)
    if isinstance(fault.get(index), Behaviour):
        return fault[index]
    delay = BASE_RTT_S[index]
    if rng.random() < SPIKE_P:
        delay = rng.uniform(*SPIKE_S)
    if "congested" in fault.values():
        delay = 0.118
    offset = 0.050 if fault.get(index) == "falseticker" else TRUTH_S
    return Behaviour(offset_s=offset, delay_s=delay, jitter_s=0.002, loss=LOSS, stratum=1 if index < 6 else 2)


def day_config(b: Bed, servers: list[str], slot_s: float) -> config_mod.Config:
    """ChronoTick's homelab file, its servers on loopback and its times scaled to the compressed day."""
    document = yaml.safe_load((REPO / "configs" / "config_homelab_2min_ntp.yaml").read_text())
    ntp = document["clock_measurement"]["ntp"]
    names = dict(zip(ntp["servers"], servers, strict=True))
    ntp["servers"] = servers
    ntp["server_groups"] = {group: [names[m] for m in members] for group, members in ntp["server_groups"].items()}
    document["clock_measurement"]["timing"] = {"warm_up": {"duration_seconds": 0, "measurement_interval": slot_s},
                                               "normal_operation": {"measurement_interval": slot_s}}
    document["ntp_service"].update(key_prefix="day", nodes=[NODE], history_length=10_000, history_hours=24)
    return b.write_config("day.yaml", document)


def run_day(tmp: Path | None = None, *, slot_s: float, seed: int, log=print) -> tuple[list[dict], dict]:
    """The day, in ``tmp`` (default: a temporary directory); its records and what the table needs besides."""
    from orchestrator import rounds
    from orchestrator.store import store_for

    rng = random.Random(seed)
    with bed("chronotick-day-", directory=tmp) as b:
        sim = b.servers([behaviour_for(i, 0, rng) for i in range(10)], seed=seed)
        config = day_config(b, sim.servers(), slot_s)
        b.worker(config, NODE)
        store = store_for(config.service)
        start = time.monotonic()
        for slot in range(SLOTS):
            for index, port in enumerate(sim.behaviours):
                sim.set_behaviour(port, behaviour_for(index, slot, rng))
            record = rounds.dispatch(config, NODE).wait()
            if record is None:
                log(f"slot {slot}: no record by the deadline")
            if slot % 60 == 59:
                log(f"  {slot + 1} of {SLOTS} slots ({(slot + 1) * SLOT_S / 3600:.0f}:00), "
                    f"{time.monotonic() - start:.0f} s")
            next_at = start + (slot + 1) * slot_s
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(min(5.0, config.ntp.timeout_seconds * 2))  # the last rounds' late replies
        records = store.history_since(NODE, None)
        return records, {"latest": store.latest(NODE), "stats": store.stats(NODE),
                         "servers": config.ntp.servers, "sim": list(sim.behaviours),
                         "elapsed_s": time.monotonic() - start}


def summarise(records: list[dict], extra: dict, *, slot_s: float) -> list[tuple[str, str, str, str]]:
    from orchestrator import targets

    now = time.time()
    report = targets.node_report(records, extra["latest"], now=now, stale_after_s=1e9)
    rows = []
    for target in targets.TARGETS:
        t = report["targets"][target.name]
        value = t["value"]
        shown = (f"{value * 1e3:.0f} ms" if target.unit == "s" else f"{value * 100:.2f} %" if target.unit == "rate"
                 else f"{value:g}")
        limit = (f"{t['limit'] * 1e3:.0f} ms" if target.unit == "s" else f"{t['limit'] * 100:.0f} %"
                 if target.unit == "rate" else f"{t['limit']:g}")
        rows.append((target.doc, shown, "<= " + limit, "ok" if t["ok"] else "MISS"))
    names = [s.name for s in extra["servers"]]
    falseticker = names[4]
    window = [r for r in records if 10 <= _hour(r, records, slot_s) < 11]
    published = [r["latest"] for r in records if r.get("latest")]
    used_liar = sum(1 for r in window if r.get("latest") and falseticker in
                    {s["server"] for s in r["servers"] if s["status"] in ("chosen", "combined")})
    outside = sum(1 for p in published if abs(p["offset"] - TRUTH_S) > p["uncertainty"])
    gaps, last = [], None
    for r in records:
        if r.get("latest"):
            if last is not None:
                gaps.append(_hour(r, records, slot_s) - last)
            last = _hour(r, records, slot_s)
    early = sum(1 for r in records if r.get("closed_by") == "early")
    durations = [r["duration_s"] for r in records]
    rows += [
        ("rounds (early-published)", f"{len(records)} ({early})", f"= {SLOTS}",
         "ok" if len(records) == SLOTS else "MISS"),
        ("round time, median", f"{statistics.median(durations) * 1e3:.0f} ms", "", ""),
        ("falseticker published (10-11 h)", f"{used_liar} of {len(window)}", "= 0", "ok" if not used_liar else "MISS"),
        ("offset outside its bound", f"{outside} of {len(published)}", "= 0", "ok" if not outside else "MISS"),
        ("longest gap without a result", f"{max(gaps, default=0) * 60:.0f} min", "", ""),
        ("late replies, no-result rounds", f"{extra['stats']['late']}, {extra['stats']['starvation']}", "", ""),
    ]
    return rows


def _hour(record: dict, records: list[dict], slot_s: float) -> float:
    """The day's hour of a record: its slot, from its dispatch time relative to the first one."""
    return round((record["dispatched_at"] - records[0]["dispatched_at"]) / slot_s) * SLOT_S / 3600


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--slot", type=float, default=1.0, help="real seconds per 2-minute slot (default 1)")
    arguments.add_argument("--seed", type=int, default=1)
    arguments.add_argument("--plot", default=str(REPO / "docs" / "day.png"), help="PNG to write (default docs/day.png)")
    args = arguments.parse_args()
    print(f"day: {SLOTS} slots, one every {args.slot:g} s (ChronoTick's homelab config, loopback servers)")
    records, extra = run_day(slot_s=args.slot, seed=args.seed)
    rows = summarise(records, extra, slot_s=args.slot)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'target':<{width}}  {'value':>14}  {'limit':>10}")
    for name, value, limit, ok in rows:
        print(f"{name:<{width}}  {value:>14}  {limit:>10}  {ok}")
    print(f"(ran {extra['elapsed_s'] / 60:.1f} min)")
    from orchestrator.plot import plot_node

    plot_node(records, node=f"{NODE} (one day at {SLOT_S / args.slot:.0f}x)", output=args.plot)
    print(f"{args.plot}: {len(records)} rounds")


if __name__ == "__main__":
    main()
