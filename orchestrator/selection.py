"""Choosing a round's measurement from its servers' outcomes.  Pure: data in, data out.

The gates, in order:

1. **strict** -- delay <= max_delay, uncertainty <= max_acceptable_uncertainty,
   min_stratum <= stratum <= max_stratum;
2. **relaxed** (if ``enable_fallback``) -- the same samples, not a new network
   round, against 2x delay and 2x uncertainty; the result says ``relaxed``;
3. otherwise **starvation**: nothing is chosen, and the caller must not
   publish anything as fresh.

Among the samples that pass, the best is the one with the lowest uncertainty
(root distance: the bound on its error), then the lower stratum, then the lower
delay.  ChronoTick's old key preferred the *higher* stratum number -- a server
further from a reference clock -- by mistake.
"""

from __future__ import annotations

from workers.quality import Thresholds

STRICT = "strict"
RELAXED = "relaxed"
STARVATION = "starvation"

#: Per-server statuses in a round record.
ACCEPTED = "accepted"   # passed the gate in force (a candidate)
CHOSEN = "chosen"       # the one published
REJECTED = "rejected"   # a reply arrived but failed the gate in force
FAILED = "failed"       # no usable reply after every attempt


def best_key(sample: dict) -> tuple:
    """Sort key of the documented rule: uncertainty, then stratum, then delay."""
    return (sample["uncertainty_s"], sample["stratum"], sample["delay_s"], sample["server"])


def unique_by_server(outcomes: list[dict]) -> list[dict]:
    """One outcome per server: a redelivered task must not vote twice.

    A successful outcome wins over a failed one for the same server; among
    equals the first is kept.
    """
    chosen: dict[str, dict] = {}
    for outcome in outcomes:
        server = outcome["server"]
        if server not in chosen or (chosen[server]["status"] != "ok" and outcome["status"] == "ok"):
            chosen[server] = outcome
    return list(chosen.values())


def flatten(results: list) -> list[dict]:
    """Chord results: outcome dicts, or lists of them from a sequential chain."""
    flat: list[dict] = []
    for item in results:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def select(outcomes: list[dict], strict: Thresholds, *, enable_fallback: bool) -> dict:
    """Apply the strict gate, then the relaxed one, and pick the best sample.

    Parameters
    ----------
    outcomes:
        Query-task outcomes (see :func:`workers.tasks.query_server`), any order,
        possibly with duplicates.
    strict:
        The configured thresholds.
    enable_fallback:
        Whether the relaxed gate may be used.

    Returns
    -------
    ``{"quality", "chosen", "servers", "servers_used", "servers_total"}``:
    ``quality`` is ``strict``, ``relaxed`` or ``starvation``; ``chosen`` is the
    published sample (``None`` on starvation); ``servers`` has one entry per
    server with its status and reasons, in name order.
    """
    outcomes = unique_by_server(outcomes)
    samples = [o["sample"] for o in outcomes if o["status"] == "ok"]
    gates = [(STRICT, strict)] + ([(RELAXED, strict.relaxed())] if enable_fallback else [])
    quality, gate, passing = STARVATION, gates[-1], []
    for name, thresholds in gates:
        passing = [s for s in samples if not thresholds.violations(s)]
        if passing:
            quality, gate = name, (name, thresholds)
            break
    chosen = min(passing, key=best_key) if passing else None

    servers = []
    for outcome in sorted(outcomes, key=lambda o: o["server"]):
        entry = {"server": outcome["server"], "attempts": outcome["attempts"],
                 "history": outcome.get("history", [])}
        if outcome["status"] != "ok":
            entry.update(status=FAILED, reason=outcome["reason"], detail=outcome.get("detail"),
                         kiss_code=outcome.get("kiss_code"))
        else:
            sample = outcome["sample"]
            reasons = gate[1].violations(sample)
            status = CHOSEN if sample is chosen else (REJECTED if reasons else ACCEPTED)
            entry.update(status=status, sample=sample)
            if reasons:
                entry.update(reason=f"over_{gate[0]}_thresholds", detail="; ".join(reasons))
        servers.append(entry)
    return {
        "quality": quality,
        "chosen": chosen,
        "servers": servers,
        "servers_used": len(passing),
        "servers_total": len(outcomes),
    }
