"""ChronoTick's targets, judged from a node's round records.  Pure: data in, data out.

The targets come from ChronoTick's own plan for its NTP client (and are this
service's reason to exist):

========================  =======  ==================================================
target                    limit    definition (over the rounds finished in the window)
========================  =======  ==================================================
``round_time_avg_s``      0.5 s    mean of ``duration_s`` (dispatch to finish)
``round_time_p99_s``      2 s      99th percentile of ``duration_s`` (nearest rank)
``starvation_events``     0        rounds of quality ``starvation`` (NTP starvation only:
                                   ``outage`` rounds, no server asked or reached, are
                                   counted apart in ``outages`` and miss no target)
``fallback_rate``         0.10     ``relaxed`` rounds / published rounds (strict + relaxed)
``retry_rate``            0.05     retries / attempts (``queries``: each retry is an attempt
                                   that needed one; advanced mode: a burst each)
``rejection_rate``        0.10     replies refused (sanity checks or the gate in force)
                                   / replies received
========================  =======  ==================================================

A target holds when its value is at most its limit.  The counts are those of
:func:`orchestrator.counting.round_counters`, the same ones the stats hash and the
Prometheus exporter use, so ``status`` and the alert rules agree.  A node with
no round in the window cannot show its round time: those two targets miss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workers.redisclock import is_stale, latest_age_s

from .counting import round_counters
from .outcomes import Quality

ROUND_TIME_AVG = "round_time_avg_s"
ROUND_TIME_P99 = "round_time_p99_s"
STARVATION_EVENTS = "starvation_events"
FALLBACK_RATE = "fallback_rate"
RETRY_RATE = "retry_rate"
REJECTION_RATE = "rejection_rate"


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    #: How a person reads the value: "s" (seconds), "rate" (a fraction), "count".
    unit: str
    doc: str


#: ChronoTick's targets, in the order they are shown.
TARGETS = (
    Target(ROUND_TIME_AVG, 0.5, "s", "round time, mean"),
    Target(ROUND_TIME_P99, 2.0, "s", "round time, p99"),
    Target(STARVATION_EVENTS, 0, "count", "starvation rounds"),
    Target(FALLBACK_RATE, 0.10, "rate", "relaxed / published rounds"),
    Target(RETRY_RATE, 0.05, "rate", "retries / attempts"),
    Target(REJECTION_RATE, 0.10, "rate", "refused / received replies"),
)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def node_report(records: list[dict[str, Any]], latest: dict[str, Any] | None, *, now: float,
                stale_after_s: float, excluding: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One node's figures against :data:`TARGETS`.

    Returns ``{"rounds", "latest_age_s", "stale", "ok", "targets": {name: {"value", "limit", "ok"}},
    "counts", "outages"}``; ``outages`` lists the node's outage rounds (``round_id``, ``finished_at``,
    ``why``), which count against no target but show as the node's staleness.  ``latest_age_s`` is
    ``None`` (and the node stale) when nothing was ever published.
    ``now`` is Redis' clock: ``latest_age_s`` is ``now`` minus the ``published_at`` of ``latest``
    (:func:`workers.redisclock.latest_age_s`), never the node's own ``measured_at``.
    ``excluding``: servers whose requests and replies are left out of the rates (what the
    rates would be without them: the demo's servers that are bad on purpose).
    """
    counts: dict[str, int] = {}
    for record in records:
        if excluding:
            record = dict(record, servers=[s for s in record["servers"] if s["server"] not in excluding])
        for name, amount in round_counters(record).items():
            counts[name] = counts.get(name, 0) + amount
    durations = [r["duration_s"] for r in records]
    published = counts.get(Quality.STRICT, 0) + counts.get(Quality.RELAXED, 0)
    values = {
        ROUND_TIME_AVG: sum(durations) / len(durations) if durations else None,
        ROUND_TIME_P99: percentile(durations, 99) if durations else None,
        STARVATION_EVENTS: counts.get(Quality.STARVATION, 0),
        FALLBACK_RATE: _ratio(counts.get(Quality.RELAXED, 0), published),
        RETRY_RATE: _ratio(counts.get("retries", 0), counts.get("queries", 0)),
        REJECTION_RATE: _ratio(counts.get("rejected", 0), counts.get("replies", 0)),
    }
    targets = {t.name: {"value": values[t.name], "limit": t.limit, "ok": _holds(values[t.name], t.limit)}
               for t in TARGETS}
    age = latest_age_s(latest, now)
    stale = is_stale(age, stale_after_s)
    outages = [{"round_id": r["round_id"], "finished_at": r["finished_at"],
                "why": (r.get("agreement") or {}).get("outage")} for r in records if r["quality"] == Quality.OUTAGE]
    return {"rounds": len(records), "latest_age_s": age, "stale": stale, "stale_after_s": stale_after_s,
            "ok": not stale and all(t["ok"] for t in targets.values()), "targets": targets,
            "counts": {k: counts.get(k, 0) for k in ("strict", "relaxed", "starvation", "outlier", "outage",
                                                     "queries", "requests", "retries", "replies", "rejected")},
            "outages": outages}


def _holds(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
