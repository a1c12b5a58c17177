"""Choosing a round's measurement from its servers' outcomes.  Pure: data in, data out.

In order, in the words of RFC 5905 and chrony's ``sources.c``:

1. **Falsetickers out.**  Every valid sample says "the true offset lies in
   [offset - uncertainty, offset + uncertainty]"; servers declared correlated
   (a group, such as Google's four leap-smearing servers) count as one vote.
   Marzullo's sweep finds the **agreed interval**: the hull of every point a
   majority of the votes covers, where the truth lies whenever a majority is
   honest (:func:`intersect`).  Without one, nothing is published.  A sample
   whose interval misses it is a **falseticker**, however small its delay.
2. **Gates** on the truechimers: strict -- delay <= max_delay, uncertainty <=
   max_acceptable_uncertainty, min_stratum <= stratum <= max_stratum; then, if
   ``enable_fallback``, relaxed (2x delay and uncertainty, same samples, never
   a new network round); else **starvation**.
3. **Choice** among those that pass: ``best`` takes the lowest *published*
   uncertainty -- the sample's root distance widened to cover the agreed
   interval (:func:`covering_uncertainty`) -- then its own, the lower stratum,
   the lower delay.  ``combine`` averages the passing truechimers within
   :data:`COMBINE_LIMIT` times the tightest one's uncertainty, each weighted by
   1/uncertainty (chrony's ``combine_sources``); the combined uncertainty is
   the same weighted mean of their uncertainties -- a hard bound, since
   ``|sum w_i e_i| <= sum w_i u_i`` whenever each ``|e_i| <= u_i``, with no
   assumption that errors are independent (asymmetric paths make them
   anything but) -- widened likewise.

Whatever is published therefore holds the truth whenever a majority of the
votes is honest, even when the deepest region of the sweep is ambiguous or
sits on a tight liar that agrees with wide honest intervals: a case where
publishing the tightest interval would publish a confident wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.contracts import AuthSelect, OutcomeStatus, Reason, Selection
from workers.quality import Thresholds

from . import records
from .outcomes import Quality, ServerStatus

#: A sample, an outcome or a round's part of one, as the JSON it travels as.
Json = dict[str, Any]

#: chrony's ``combinelimit``: sources further than this many times the best
#: one's distance are not combined.
COMBINE_LIMIT = 3.0


def best_key(sample: Json) -> tuple[float, int, float, str]:
    """Sort key of the documented rule: uncertainty, then stratum, then delay."""
    return (sample["uncertainty_s"], sample["stratum"], sample["delay_s"], sample["server"])


def unique_by_server(outcomes: list[Json]) -> list[Json]:
    """One outcome per server: a redelivered task must not vote twice.

    A successful outcome wins over a failed one for the same server; among
    equals the first is kept.
    """
    chosen: dict[str, Json] = {}
    for outcome in outcomes:
        server = outcome["server"]
        if server not in chosen or (chosen[server]["status"] != OutcomeStatus.OK
                                    and outcome["status"] == OutcomeStatus.OK):
            chosen[server] = outcome
    return list(chosen.values())


def flatten(results: list[Any]) -> list[Json]:
    """Chord results: outcome dicts, or lists of them from a sequential chain."""
    flat: list[Json] = []
    for item in results:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def vote_key(server: str, group_of: dict[str, int]) -> object:
    """Whose vote a server's sample is: its own, or its group's (``("group", i)``)."""
    return ("group", group_of[server]) if server in group_of else server


def group_index(groups: list[list[str]] | None) -> dict[str, int]:
    """Server name -> index of its group in ``groups``."""
    return {server: i for i, members in enumerate(groups or []) for server in members}


def voters_of(samples: list[Json], groups: list[list[str]] | None = None) -> dict[object, Json]:
    """One sample per vote: a group votes through its member with the lowest uncertainty (the first on a tie)."""
    group_of = group_index(groups)
    voters: dict[object, Json] = {}
    for sample in samples:
        key = vote_key(sample["server"], group_of)
        if key not in voters or sample["uncertainty_s"] < voters[key]["uncertainty_s"]:
            voters[key] = sample
    return voters


def majority(votes: int) -> int:
    """How many of ``votes`` make a majority."""
    return votes // 2 + 1


def sweep(voters: list[Json], threshold: int) -> tuple[list[float] | None, int, list[list[float | None]]]:
    """Marzullo's sweep over the voters' intervals (chrony's ``sources.c``).

    Returns the hull of every point at least ``threshold`` intervals cover
    (``None`` if none is), the greatest depth, and the separate regions that
    reach it.  At equal offsets a start sorts before an end: touching
    intervals agree.
    """
    LOW, HIGH = 0, 1
    edges = sorted([(s["offset_s"] - s["uncertainty_s"], LOW) for s in voters]
                   + [(s["offset_s"] + s["uncertainty_s"], HIGH) for s in voters])
    depth = best_depth = 0
    agreed_low = agreed_high = None
    deepest: list[list[float | None]] = []
    for value, kind in edges:
        if kind == LOW:
            depth += 1
            if depth >= threshold and agreed_low is None:
                agreed_low = value
            if depth > best_depth:
                best_depth, deepest = depth, [[value, None]]
            elif depth == best_depth:  # back up to the greatest depth: a separate region
                deepest.append([value, None])
        else:
            if depth >= threshold:
                agreed_high = value
            if depth == best_depth:
                deepest[-1][1] = value
            depth -= 1
    if agreed_low is None or agreed_high is None:
        return None, best_depth, deepest
    return [agreed_low, agreed_high], best_depth, deepest


def overlaps(sample: Json, interval: list[float]) -> bool:
    """Whether the sample's interval meets ``interval``: a truechimer's does."""
    return bool(sample["offset_s"] - sample["uncertainty_s"] <= interval[1]
                and sample["offset_s"] + sample["uncertainty_s"] >= interval[0])


def intersect(samples: list[Json], groups: list[list[str]] | None = None) -> Json:
    """The interval a majority of votes agrees on, and who can be honest.

    Each sample says "the true offset lies in [offset - uncertainty, offset +
    uncertainty]".  With V votes (servers declared correlated in ``groups``
    vote once, through their member with the lowest uncertainty), a majority
    is m = V // 2 + 1.  If a majority of the votes is honest, the truth is
    covered by at least m intervals, so it lies in the **agreed interval**:
    the hull of every point that m or more intervals cover (Marzullo's sweep,
    as chrony's ``sources.c`` runs it, with RFC 5905's ``n - f`` threshold at
    its largest ``f``).  Nothing narrower is safe: any point of that hull could
    be the truth with a majority honest.  A sample whose interval misses the
    agreed interval cannot be honest if a majority is: a **falseticker**.
    Every other sample is a truechimer.

    ``depth`` is the greatest number of intervals covering one point and
    ``deepest`` the separate regions that reach it; ``ambiguous`` says there
    are several -- the case where the deepest region alone would point at a
    liar.

    Returns
    -------
    ``{"majority", "votes", "needed", "depth", "interval", "deepest", "ambiguous", "truechimers",
    "falsetickers"}`` (server names; ``interval`` is ``[low, high]`` in seconds, or ``None`` without a
    majority).
    """
    if not samples:
        return {"majority": False, "votes": 0, "needed": 1, "depth": 0, "interval": None, "deepest": [],
                "ambiguous": False, "truechimers": [], "falsetickers": []}
    voters = voters_of(samples, groups)
    votes = len(voters)
    needed = majority(votes)

    interval, best_depth, deepest = sweep(list(voters.values()), needed)
    if interval is None:
        return {"majority": False, "votes": votes, "needed": needed, "depth": best_depth, "interval": None,
                "deepest": deepest, "ambiguous": len(deepest) > 1, "truechimers": [],
                "falsetickers": sorted(s["server"] for s in samples)}
    truechimers: list[str] = []
    falsetickers: list[str] = []
    for s in samples:
        (truechimers if overlaps(s, interval) else falsetickers).append(s["server"])
    return {"majority": True, "votes": votes, "needed": needed, "depth": best_depth,
            "interval": interval, "deepest": deepest, "ambiguous": len(deepest) > 1,
            "truechimers": sorted(truechimers), "falsetickers": sorted(falsetickers)}


def covering_uncertainty(sample: Json, interval: list[float]) -> float:
    """The sample's uncertainty, widened so that offset ± it covers ``interval`` (the agreed one)."""
    low, high = interval
    return float(max(sample["uncertainty_s"], sample["offset_s"] - low, high - sample["offset_s"]))


def combine(samples: list[Json]) -> Json:
    """Weighted combination of ``samples`` (weights 1/uncertainty); see the module doc.

    The result looks like a sample: ``server`` is the primary (lowest
    uncertainty) member, ``combined`` lists every member.
    """
    primary = min(samples, key=best_key)
    total = offset = delay = root_delay = root_dispersion = measured_at = 0.0
    for s in samples:  # one pass: a round of 40 asks this often
        w = 1.0 / s["uncertainty_s"]
        total += w
        offset += w * s["offset_s"]
        delay += w * s["delay_s"]
        root_delay += w * s["root_delay_s"]
        root_dispersion += w * s["root_dispersion_s"]
        measured_at += w * s["measured_at"]
    result = dict(primary)
    result.update(
        offset_s=offset / total,
        uncertainty_s=len(samples) / total,  # = sum(w_i * u_i) / sum(w_i)
        delay_s=delay / total,
        root_delay_s=root_delay / total,
        root_dispersion_s=root_dispersion / total,
        measured_at=measured_at / total,
        stratum=min(s["stratum"] for s in samples),
        combined=sorted(s["server"] for s in samples),
    )
    return result


@dataclass(frozen=True)
class GateStep:
    """One step of the order in which a round's gates are tried: its quality, thresholds, and pool.

    ``nts_only``: only NTS-authenticated samples may pass (``auth_select: prefer``'s first pool).
    """

    quality: str
    thresholds: Thresholds
    nts_only: bool = False

    def admits(self, sample: Json) -> bool:
        """Whether ``sample`` is in this step's pool."""
        return not self.nts_only or bool(sample.get("nts"))


def gate_steps(strict: Thresholds, *, enable_fallback: bool, auth_select: str = AuthSelect.MIX) -> list[GateStep]:
    """The steps in order: strict, then relaxed if ``enable_fallback``; under ``prefer``, authenticated first."""
    gates = [(Quality.STRICT, strict)] + ([(Quality.RELAXED, strict.relaxed())] if enable_fallback else [])
    pools = [True, False] if auth_select == AuthSelect.PREFER else [False]
    return [GateStep(quality, thresholds, nts_only) for nts_only in pools for quality, thresholds in gates]


def gate_violations(sample: Json, thresholds: Thresholds, interval: list[float]) -> list[str]:
    """Why ``sample`` fails a gate: its thresholds, and what it would publish.

    A label is honest: a sample passes only if the uncertainty it would be
    published with -- its own, widened to cover the agreed ``interval``
    (:func:`covering_uncertainty`) -- is within the gate's.  A combination of
    passing samples passes too: its offset is their weighted mean and its
    uncertainty their weighted mean, so its covering uncertainty is at most
    the largest of theirs.
    """
    found = thresholds.violations(sample)
    published_s = covering_uncertainty(sample, interval)
    if sample["uncertainty_s"] <= thresholds.max_uncertainty_s < published_s:
        found.append(f"published uncertainty {published_s * 1e3:.3f} ms (covering the agreed interval) > "
                     f"{thresholds.max_uncertainty_s * 1e3:.3f} ms")
    return found


def passing(samples: list[Json], step: GateStep, interval: list[float]) -> list[Json]:
    """Those of ``samples`` in ``step``'s pool that pass its gate: :func:`gate_violations` empty.

    Without building the text: the early decider asks this many times a round.
    """
    thresholds = step.thresholds
    max_delay_s, max_s = thresholds.max_delay_s, thresholds.max_uncertainty_s
    min_stratum, max_stratum = thresholds.min_stratum, thresholds.max_stratum
    low, high = interval
    nts_only = step.nts_only
    return [s for s in samples
            if (not nts_only or s.get("nts")) and s["delay_s"] <= max_delay_s
            and min_stratum <= s["stratum"] <= max_stratum and s["uncertainty_s"] <= max_s
            and s["offset_s"] - low <= max_s and high - s["offset_s"] <= max_s]


def choose(passing: list[Json], interval: list[float], method: str) -> tuple[Json, list[Json]]:
    """What to publish from the samples that pass, and which were used (see the module doc).

    The choice's ``uncertainty_s`` is the published one (covering ``interval``);
    ``sample_uncertainty_s`` is its own.
    """
    if method == Selection.COMBINE:
        tightest = min(passing, key=best_key)
        used = [s for s in passing if s["uncertainty_s"] <= COMBINE_LIMIT * tightest["uncertainty_s"]]
        chosen = combine(used) if len(used) > 1 else dict(tightest, combined=[tightest["server"]])
    else:
        chosen = min(passing, key=lambda s: (covering_uncertainty(s, interval), *best_key(s)))
        used = [chosen]
    return dict(chosen, sample_uncertainty_s=chosen["uncertainty_s"],
                uncertainty_s=covering_uncertainty(chosen, interval)), used


def select(outcomes: list[Json], strict: Thresholds, *, enable_fallback: bool, method: str,
           groups: list[list[str]] | None = None, auth_select: str = AuthSelect.MIX) -> Json:
    """Reject falsetickers, apply the strict then the relaxed gate, and choose.

    Parameters
    ----------
    outcomes:
        Query-task outcomes (see :func:`workers.tasks.query_server`), any order,
        possibly with duplicates.
    strict:
        The configured thresholds.
    enable_fallback:
        Whether the relaxed gate may be used.
    method:
        ``best`` or ``combine``.
    groups:
        Correlated servers (see :func:`intersect`).
    auth_select:
        ``require``: only NTS-authenticated samples vote and may be chosen
        (the others are refused, ``not_authenticated``); ``prefer``: all vote,
        and plain samples are chosen only when no authenticated truechimer
        passes a gate; ``mix`` and ``ignore``: authentication does not count.

    Returns
    -------
    ``{"quality", "chosen", "servers", "servers_used", "servers_combined", "servers_total",
    "agreement"}``: ``quality`` is ``strict``, ``relaxed`` or ``starvation``;
    ``servers_used`` counts the truechimers that passed the gate in force;
    ``chosen`` is the
    sample (or combination) to publish, ``None`` on starvation; ``servers``
    has one entry per server with its status and reasons, in name order;
    ``agreement`` is :func:`intersect`'s answer.
    """
    if method not in (Selection.BEST, Selection.COMBINE):
        raise ValueError(f"unknown selection method {method!r}")
    outcomes = unique_by_server(outcomes)
    samples = [o["sample"] for o in outcomes if o["status"] == OutcomeStatus.OK]
    unauthenticated = {s["server"] for s in samples if not s.get("nts")} if auth_select == AuthSelect.REQUIRE else set()
    agreement = intersect([s for s in samples if s["server"] not in unauthenticated], groups)
    interval = agreement["interval"]
    truechimers = [s for s in samples if s["server"] in set(agreement["truechimers"])]
    steps = gate_steps(strict, enable_fallback=enable_fallback, auth_select=auth_select)
    quality: str = Quality.STARVATION
    step, passed = steps[-1], []
    if interval is not None:
        for candidate in steps:
            passed = passing(truechimers, candidate, interval)
            if passed:
                quality, step = candidate.quality, candidate
                break
    chosen, used = choose(passed, interval, method) if passed else (None, [])
    return {
        "quality": quality,
        "chosen": chosen,
        "servers": server_entries(outcomes, falsetickers=set(agreement["falsetickers"]),
                                  unauthenticated=unauthenticated, step=step, interval=interval,
                                  chosen=chosen, used=used),
        "servers_used": len(passed),
        "servers_combined": len(used) if method == Selection.COMBINE else None,
        "servers_total": len(outcomes),
        "agreement": agreement,
    }


def server_entries(outcomes: list[Json], *, falsetickers: set[str], unauthenticated: set[str], step: GateStep,
                   interval: list[float] | None, chosen: Json | None, used: list[Json]) -> list[Json]:
    """One entry per server, in name order: its status (:class:`ServerStatus`) and why (each built by
    :mod:`orchestrator.records`).

    ``falsetickers``: the servers whose interval misses the agreed ``interval``
    (all of them when there is none); ``step``: the gate in force, whose
    violations make a truechimer ``rejected``.  An outcome that is not ``ok``
    but carries a sample is a reply set apart before the vote
    (:func:`orchestrator.leap.set_apart`): ``rejected``, with its reason and sample.
    """
    used_names = {s["server"] for s in used}
    samples = [o["sample"] for o in outcomes if o["status"] == OutcomeStatus.OK]
    gate_only = GateStep(step.quality, step.thresholds)
    clean = {s["server"] for s in passing(samples, gate_only, interval)} if interval is not None else set()
    servers = []
    for outcome in sorted(outcomes, key=lambda o: o["server"]):
        if outcome["status"] != OutcomeStatus.OK:
            # With a sample: a reply set apart before the vote (a server of the other timescale near a leap
            # second, :mod:`orchestrator.leap`), refused as a plain reply under ``require`` is.
            servers.append(records.set_apart_entry(outcome) if outcome.get("sample") else records.failed_entry(outcome))
            continue
        sample = outcome["sample"]
        if sample["server"] in unauthenticated:
            servers.append(records.answered_entry(
                outcome, ServerStatus.REJECTED, reason=Reason.NOT_AUTHENTICATED,
                detail="auth_select: require, and this reply was not NTS-authenticated"))
        elif sample["server"] in falsetickers or interval is None:
            detail = ("no majority of servers agrees" if interval is None else
                      f"interval {sample['offset_s'] - sample['uncertainty_s']:+.6f}..."
                      f"{sample['offset_s'] + sample['uncertainty_s']:+.6f} s misses the interval a majority "
                      f"agrees on, {interval[0]:+.6f}...{interval[1]:+.6f} s")
            servers.append(records.answered_entry(outcome, ServerStatus.FALSETICKER, reason=Reason.FALSETICKER,
                                                  detail=detail))
        else:
            reasons = [] if sample["server"] in clean else gate_violations(sample, step.thresholds, interval)
            if not step.admits(sample) and not reasons:
                reasons = ["auth_select: prefer, and an authenticated truechimer passed"]
            if sample["server"] == (chosen or {}).get("server") and sample["server"] in used_names:
                status = ServerStatus.CHOSEN
            elif sample["server"] in used_names:
                status = ServerStatus.COMBINED
            else:
                status = ServerStatus.REJECTED if reasons else ServerStatus.ACCEPTED
            over = Reason.OVER_STRICT_THRESHOLDS if step.quality == Quality.STRICT else Reason.OVER_RELAXED_THRESHOLDS
            servers.append(records.answered_entry(outcome, status, reason=over if reasons else None,
                                                  detail="; ".join(reasons) if reasons else None))
    return servers
