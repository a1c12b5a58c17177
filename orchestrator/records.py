"""Round records as the history stream keeps them: compact by default, verbose on request.

A node publishes 720 rounds a day at ChronoTick's 2-minute interval, and the
history keeps a day of them, so a record's size is the service's memory.
Redis packs stream entries of up to about 2,000 bytes two to a 4 KiB node
(``stream-node-max-bytes``), 2.3 kB each in memory; a larger entry takes a node
alone, 3.1 kB (``bench/redis_memory.py`` shows both).  So the compact form
(``ntp_service.record_detail: compact``) aims under :data:`RECORD_BUDGET_BYTES`
for ten servers.

It keeps what a person, ``status``, ``plot`` and the exporter read -- every
server's status, final reason, attempts and each attempt's reason (and any
refused sample of a burst), offset, delay, uncertainty, stratum and leap
indicator (when not 0), and the
worker that took it (once, when one worker took them all), and every field of
the published measurement (``latest``: :data:`LATEST_FIELDS`) -- and drops
what only the moment of measurement needed: the reasons' details, each
server's wire address, raw t1/t4, reference ids, each attempt's start time,
the agreement's member lists (the statuses say them).  A sample's time is its
round's.
The published measurement keeps its numbers exactly (a float's ``repr``, which
JSON gives back bit for bit), and so does the sample it was chosen from (the
chosen server's entry, which says its delay, stratum and own bound), so a
measurement read through the history is the ``latest`` key's, every field
equal (issue #24).  Every other number is rounded: offsets to 100 ns; delays,
durations and bounds to a microsecond (bounds rounded up: a bound stays a
bound); times stay exact, since readers compare them.  Each server entry uses
short keys (:data:`SHORT`), and values equal to their default are left out.

Readers never see that encoding: :func:`expand` turns a stored record back into
the usual shape (``Store.history``, the reader API and the exporter all call it),
and :func:`orchestrator.counting.round_counters` gives the same numbers for a
record and its stored form (a unit test holds it to that).  ``verbose`` stores
the callback's record whole.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .outcomes import ClosedBy, ServerStatus

COMPACT = "compact"
VERBOSE = "verbose"


#: Redis keeps a stream entry of up to about 2,000 bytes two to a node: see the module doc.
RECORD_BUDGET_BYTES = 2000

#: A compact server entry's keys: long name -> stored name.
SHORT = {"server": "s", "status": "st", "attempts": "n", "reason": "r", "history": "h", "offset_s": "o",
         "delay_s": "d", "uncertainty_s": "u", "stratum": "k", "samples_taken": "m", "worker": "w", "nts": "a",
         "leap": "l"}
LONG = {short: long for long, short in SHORT.items()}

#: What a sample keeps in a compact record (its time is the round's).
SAMPLE_FIELDS = ("offset_s", "delay_s", "uncertainty_s", "stratum", "samples_taken")

#: What the published measurement keeps, exactly: every field of ``latest`` that its record and chosen
#: server's entry do not already say -- server, delay, stratum and the sample's own bound are in
#: the chosen server's entry, node, round, quality and servers used in the record, and
#: ``published_at`` is its ``finished_at`` -- so a measurement read through the history has every
#: field ``latest`` has, with the same value (issue #24: "the reader loses nothing").  ``leap`` and
#: ``nts`` are kept only when they are not 0 and false (:data:`LATEST_DEFAULTS`; absent: those, as in an
#: entry written before ``leap`` was kept).
LATEST_FIELDS = ("offset", "uncertainty", "precision", "measured_at", "nts", "leap", "root_delay",
                 "root_dispersion", "address", "selection", "legs")

#: ... and for a combination (``selection: combine`` over more than one server), what is the
#: combination's own rather than its primary server's; the servers combined are the entries
#: whose status is ``chosen`` or ``combined``.  A stored measurement with a ``delay`` is a
#: combination's (records written before ``selection`` was always kept marked it the same way), and
#: its ``selection`` is ``combine`` unless it says otherwise (:data:`COMBINATION_DEFAULTS`).
COMBINATION_FIELDS = ("delay", "stratum", "sample_uncertainty")

#: A published measurement's fields left out of a compact record when they have this value.
LATEST_DEFAULTS: dict[str, Any] = {"leap": 0, "nts": False}

#: ... and a combination's.
COMBINATION_DEFAULTS: dict[str, Any] = {"selection": "combine"}

#: Digits kept (but by the published measurement and its sample): 100 ns for offsets, microseconds for
#: delays, bounds (rounded up) and durations.
OFFSET_DIGITS = 7
US_DIGITS = 6

#: Fields whose value is a bound (a root dispersion is one too): rounded up, never down.
BOUNDS = frozenset({"uncertainty_s", "uncertainty", "sample_uncertainty", "root_dispersion"})


def compact(record: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a round record (pure)."""
    kept = ("round_id", "node", "quality", "servers_used", "servers_total")
    out: dict[str, Any] = {key: record[key] for key in kept if key in record}
    if record.get("mode", "simple") != "simple" or not record.get("parallel", True):
        out["mode"], out["parallel"] = record["mode"], record["parallel"]  # only when not the default
    out["dispatched_at"], out["finished_at"] = record["dispatched_at"], record["finished_at"]
    out["duration_s"] = round(record["duration_s"], US_DIGITS)
    if record.get("closed_by", ClosedBy.CALLBACK) != ClosedBy.CALLBACK:
        out["closed_by"] = record["closed_by"]
    workers = {s.get("worker") for s in record["servers"]}
    shared = workers.pop() if len(workers) == 1 else None
    if shared is not None:
        out["worker"] = shared  # the worker that took every server (the node's own, normally)
    latest = record.get("latest")
    # The sample published, when the measurement is one server's: expand() takes its delay, stratum and own
    # bound from the chosen server's entry, which so keeps them exactly.  A combination keeps its own.
    sampled = latest is not None and not latest.get("combined")
    out["servers"] = [compact_server(s, shared, exact=sampled and s["status"] == ServerStatus.CHOSEN)
                      for s in record["servers"]]
    agreement = record.get("agreement")
    if agreement:
        out["agreement"] = {key: agreement[key] for key in ("majority", "votes", "depth") if key in agreement}
        out["agreement"]["interval"] = _offsets(agreement.get("interval"))
        if agreement.get("ambiguous"):
            out["agreement"]["ambiguous"] = True
            out["agreement"]["deepest"] = [_offsets(region) for region in agreement["deepest"]]
    verdict = record.get("filter")
    if verdict is not None:
        out["filter"] = {k: (_number("offset", v) if isinstance(v, float) else v)
                         for k, v in verdict.items() if v not in (None, False)}
    if latest is None and record.get("candidate") is not None:
        out["candidate"] = record["candidate"]  # refused by the filter: what it refused
    combination = bool(latest and latest.get("combined"))
    fields = LATEST_FIELDS + COMBINATION_FIELDS if combination else LATEST_FIELDS
    implied = {**LATEST_DEFAULTS, **COMBINATION_DEFAULTS} if combination else LATEST_DEFAULTS
    out["latest"] = None if latest is None else {  # exactly: the latest key's numbers, bit for bit
        key: latest[key] for key in fields
        if key in latest and not (key in implied and _same_value(latest[key], implied[key]))}
    out["detail"] = COMPACT
    return out


def expand(stored: dict[str, Any]) -> dict[str, Any]:
    """A record as readers expect it, from either stored form (pure; a verbose record is returned as is)."""
    if stored.get("detail") != COMPACT:
        return stored
    record = dict(stored)
    record.setdefault("mode", "simple")
    record.setdefault("parallel", True)
    record.setdefault("closed_by", ClosedBy.CALLBACK)
    record.setdefault("filter", None)
    record.setdefault("candidate", None)
    agreement = record.get("agreement")
    if agreement:
        record["agreement"] = {"ambiguous": False, "deepest": [], "needed": agreement.get("votes", 0) // 2 + 1,
                               **agreement}
    if record["filter"] is not None:
        record["filter"] = {"outlier": False, "reset": False, **record["filter"]}
    shared = record.pop("worker", None)
    record["servers"] = [expand_server(s, shared) for s in stored["servers"]]
    stored_latest = record.get("latest")
    if stored_latest is not None:  # what the stored measurement left to its record and chosen server
        chosen = next((s for s in record["servers"] if s["status"] == "chosen"), None)
        sample = (chosen or {}).get("sample", {})
        record["latest"] = {"node": record["node"], "round_id": record["round_id"], "quality": record["quality"],
                            "published_at": record["finished_at"], "servers_used": record.get("servers_used"),
                            "servers_total": record.get("servers_total"), **LATEST_DEFAULTS,
                            **({"server": chosen["server"], "delay": sample.get("delay_s"),
                                "stratum": sample.get("stratum"), "sample_uncertainty": sample.get("uncertainty_s")}
                               if chosen else {}),
                            **stored_latest}
        if "delay" in stored_latest and "combined" not in stored_latest:  # a combination: its servers
            record["latest"]["combined"] = sorted(s["server"] for s in record["servers"]
                                                  if s["status"] in ("chosen", "combined"))
            record["latest"] = {**COMBINATION_DEFAULTS, **record["latest"]}
    return record


def late_of(fields: dict[Any, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """A ``late`` stream entry's round id and its late servers' entries, expanded, by server."""
    def field(name: str) -> str:
        value = fields.get(name.encode(), fields.get(name))
        return value.decode() if isinstance(value, bytes) else str(value)

    return field("round"), {e["server"]: e for e in (expand_server(x, None) for x in json.loads(field("servers")))}


def with_late(record: dict[str, Any], said: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``record`` with each ``late`` server's entry replaced by what it said (``said``: server -> entry)."""
    if said:
        record["servers"] = [said.get(s["server"], s) if s["status"] == ServerStatus.LATE else s
                             for s in record["servers"]]
    return record


def compact_server(entry: dict[str, Any], shared_worker: str | None, *, exact: bool = False) -> dict[str, Any]:
    """A server's entry as compact records keep it; ``exact``: its sample's numbers unrounded (the published one)."""
    out: dict[str, Any] = {"s": entry["server"], "st": entry["status"]}
    if entry.get("worker") != shared_worker:
        out["w"] = entry.get("worker")
    if entry["attempts"] != 1:
        out["n"] = entry["attempts"]  # absent: one
    if entry.get("reason"):
        out["r"] = entry["reason"]  # the detail ("origin 0x... is not ...") is verbose-only
    attempts = entry.get("history", [])
    if any(a.get("refusals") for a in attempts):  # advanced mode: refused samples of a burst, kept by reason
        out["h"] = [{"reason": a.get("reason"),
                     **({"refusals": [{"reason": r["reason"]} for r in a["refusals"]]} if a.get("refusals")
                        else {})} for a in attempts]
    elif [a.get("reason") for a in attempts] != [None]:  # a lone attempt that succeeded says nothing
        out["h"] = [a.get("reason") for a in attempts]  # each attempt's reason (null: it succeeded)
    sample = entry.get("sample")
    if sample:
        out.update({SHORT[key]: sample[key] if exact else _number(key, sample[key])
                    for key in SAMPLE_FIELDS if key in sample})
        if sample.get("nts"):
            out["a"] = True  # NTS-authenticated (absent: not)
        if sample.get("leap"):
            out["l"] = sample["leap"]  # the server's leap indicator (absent: 0, no leap second announced)
    return out


def expand_server(stored: dict[str, Any], shared_worker: str | None) -> dict[str, Any]:
    long = {LONG.get(key, key): value for key, value in stored.items()}
    entry: dict[str, Any] = {"server": long["server"], "status": long["status"], "attempts": long.get("attempts", 1),
                             "worker": long.get("worker", shared_worker)}
    if "reason" in long:
        entry["reason"] = long["reason"]
    sample = {key: long[key] for key in SAMPLE_FIELDS if key in long}
    if sample:
        sample["nts"] = bool(long.get("nts"))
        sample["leap"] = int(long.get("leap", 0))
    history = long.get("history")
    if history is None:
        history = [None] if sample else []
    entry["history"] = [a if isinstance(a, dict) else {"reason": a} for a in history]
    if sample:
        entry["sample"] = sample
    return entry


def _same_value(value: Any, default: Any) -> bool:
    """``value`` is ``default``, of its type too (``False`` is no leap of 0, nor ``0`` an ``nts`` of false)."""
    return type(value) is type(default) and value == default


def _number(key: str, value: Any) -> Any:
    """A value as compact records keep it: see the module doc."""
    if not isinstance(value, float) or key in ("measured_at", "precision"):
        return value  # a time (compared by readers) or a power of two: exactly
    if key in BOUNDS:
        return math.ceil(value * 10 ** US_DIGITS) / 10 ** US_DIGITS
    if key in ("offset_s", "offset"):
        return round(value, OFFSET_DIGITS)
    return round(value, US_DIGITS)


def _offsets(values: list[float | None] | None) -> list[float | None] | None:
    """An interval's ends, as offsets are kept."""
    return None if values is None else [None if v is None else round(v, OFFSET_DIGITS) for v in values]
