"""Deciding a round before every reply is in: publish once nothing outstanding can change it.  Pure.

A reply still outstanding ``e`` seconds after its request left has a round-trip
delay of at least ``e`` -- less what the server says it held the request
(RFC 5905's ``t3 - t2``), which for an NTP server is microseconds and is
allowed for (:data:`workers.inflight.HOLD_ALLOWANCE_S`) -- and its root
distance, its uncertainty, is at least half its delay.  So by then every
outstanding server is a wide interval whatever it will say: the worker that
runs the round's queries knows when each request left, and asks :func:`decide`
after every outcome whether the round is decided.

It is decided when, whatever the outstanding servers answer -- any offset,
an uncertainty of at least their bound, or no answer at all:

1. **The majority is decided by the votes in hand.**  With ``n`` votes in and
   ``k`` outstanding, the final agreed interval (:func:`selection.intersect`)
   lies between two extremes, both computed here by running the real
   selection on completions of the round: ``k`` liars placed far away (the
   narrowest it can be) and ``k`` intervals wide enough to cover every answer
   (the widest).  A sample meeting the narrowest is a truechimer in every
   completion, one missing the widest a falseticker in every one.  Both
   completions must choose from the same gate, and the outstanding servers
   alone must not make a majority (``k < (n + k) // 2 + 1``).
2. **No outstanding reply could be published instead, or join what is.**
   (A server whose attempt failed, with a retry to come, has no reply out: it
   still votes in 1, but is not waited for here unless the round is relaxed.)
   ``best``: its uncertainty would exceed the published one, widened to cover
   the widest agreed interval.  ``combine``: it would exceed
   :data:`selection.COMBINE_LIMIT` times the tightest member's (chrony's
   ``combinelimit``), so its weight is nought.  A relaxed round also needs
   every outstanding server unable to pass the strict gate, which would make
   waiting publish a strict one; ``auth_select: prefer`` likewise for an
   outstanding NTS server against a plain choice.  A group member outstanding
   must be unable to replace its group's vote (wider than that vote).

What is published is then the choice of the narrow completion -- truechimers in
every completion, through the gate every completion uses -- with its
uncertainty widened to cover the widest agreed interval, so it still holds
the truth whenever a majority of *all* the votes is honest.  Waiting could
have chosen another truechimer (a tie moved by the late votes), never
refused this one.

Sequential rounds (``parallel_queries: false``) are never decided early: their
later servers have not been asked yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.contracts import AuthSelect, OutcomeStatus, Selection
from workers.quality import Thresholds

from . import selection
from .contracts import Quality

#: Server names of the stand-in votes of a completion (no configured server has a space in its name).
STAND_IN = "<outstanding {}>"

#: How far from every answer the narrow completion's liars sit (s): far enough to miss them all.
FAR_S = 1e6


@dataclass(frozen=True)
class Outstanding:
    """A server of the round with no outcome yet.

    ``min_uncertainty_s``: the least uncertainty its reply can have, from how
    long its request has been out (0 while none is out).  ``retrying``: its
    attempt failed and another is to come -- no reply of it is out.  It still
    counts as a vote, but a retry is sent only if the round is still undecided,
    so it is not waited for unless the gate depends on it (a relaxed round
    waits for anything that could still pass strict).
    """

    server: str
    min_uncertainty_s: float = 0.0
    nts: bool = False
    retrying: bool = False


@dataclass(frozen=True)
class Decision:
    """Whether to publish now, and what.

    ``publish``: decided.  ``picked``: what to publish (:func:`selection.select`'s
    shape).  ``needed_uncertainty_s``: undecided only because some outstanding
    bound is at most this -- the round is decided once every outstanding
    bound exceeds it, if nothing else arrives; ``None`` when only more
    outcomes can decide it.  ``why``: one line, for the log and the record.
    """

    publish: bool
    why: str
    picked: dict[str, Any] | None = None
    needed_uncertainty_s: float | None = None
    late: tuple[str, ...] = ()


def decide(outcomes: list[dict], outstanding: list[Outstanding], *, strict: Thresholds, enable_fallback: bool,
           method: str = Selection.BEST, groups: list[list[str]] | None = None,
           auth_select: str = AuthSelect.MIX, parallel: bool = True) -> Decision:
    """Whether the round of ``outcomes`` (so far) is decided with ``outstanding`` still out (module doc)."""
    if not outstanding:
        return Decision(False, "nothing outstanding: the chord's callback publishes it")
    if not parallel:
        return Decision(False, "a sequential round waits for every server")
    outcomes = selection.unique_by_server(outcomes)
    ok = {o["server"]: o["sample"] for o in outcomes if o["status"] == OutcomeStatus.OK}
    groups = [list(g) for g in groups or []]
    group_of = {server: i for i, members in enumerate(groups) for server in members}

    def votes_for(sample: dict) -> bool:
        return auth_select != AuthSelect.REQUIRE or bool(sample.get("nts"))

    needed = 0.0  # every outstanding bound must exceed this
    new_votes: set[object] = set()
    eligible = []  # outstanding servers whose reply could vote (and be chosen)
    for item in outstanding:
        if auth_select == AuthSelect.REQUIRE and not item.nts:
            continue  # it could neither vote nor be chosen
        eligible.append(item)
        group = group_of.get(item.server)
        if group is None:
            new_votes.add(item.server)
            continue
        in_hand = [ok[s]["uncertainty_s"] for s in groups[group] if s in ok and votes_for(ok[s])]
        if in_hand:
            needed = max(needed, min(in_hand))  # tighter than its group's vote, it would replace it
        else:
            new_votes.add(("group", group))
    if not eligible:
        return Decision(False, "no outstanding server can vote: the chord's callback publishes it")
    k = len(new_votes)

    def run(extra: list[dict]) -> dict:
        return selection.select(outcomes + extra, strict, enable_fallback=enable_fallback, method=method,
                                groups=groups, auth_select=auth_select)

    in_hand_votes = selection.intersect([s for s in ok.values() if votes_for(s)], groups)["votes"]
    if k >= (in_hand_votes + k) // 2 + 1:
        return Decision(False, f"{k} outstanding votes could make a majority of {in_hand_votes + k} on their own")
    narrow = run([_stand_in(i, FAR_S * (i + 1), 1.0) for i in range(k)])
    chosen = narrow["chosen"]
    if chosen is None:
        return Decision(False, "no truechimer passes a gate in every completion yet")
    low, high = _span([s for s in ok.values() if votes_for(s)])
    wide = run([_stand_in(i, (low + high) / 2, (high - low) / 2 + 1.0) for i in range(k)])
    if wide["quality"] != narrow["quality"]:
        return Decision(False, f"the gate is not decided ({narrow['quality']} or {wide['quality']})")
    interval = wide["agreement"]["interval"]
    if method == Selection.COMBINE:
        tightest = ok[chosen["server"]]["uncertainty_s"]  # a combination's primary is its tightest member
        needed = max(needed, selection.COMBINE_LIMIT * tightest)
    published_s = max(chosen["sample_uncertainty_s"], chosen["offset_s"] - interval[0],
                      interval[1] - chosen["offset_s"])
    needed = max(needed, published_s)
    if narrow["quality"] == Quality.RELAXED:
        needed = max(needed, _fails(strict))  # else an outstanding reply might pass strict
    if auth_select == AuthSelect.PREFER and not chosen.get("nts") and any(i.nts for i in eligible):
        needed = max(needed, _fails(strict.relaxed() if enable_fallback else strict))
    # A server whose attempt failed has no reply out: its retry is only sent if the round is still
    # undecided, so it does not hold the round -- unless a strict reply of it would unseat a relaxed one.
    waited_for = [i for i in eligible if not i.retrying or narrow["quality"] == Quality.RELAXED]
    tightest_bound = min((i.min_uncertainty_s for i in waited_for), default=float("inf"))
    if tightest_bound <= needed:
        return Decision(False, f"an outstanding reply could still be as tight as {tightest_bound * 1e3:.3f} ms "
                               f"(needs > {needed * 1e3:.3f} ms)", needed_uncertainty_s=needed)
    picked = dict(narrow, chosen=dict(chosen, uncertainty_s=published_s),
                  servers=[s for s in narrow["servers"] if not _is_stand_in(s["server"])],
                  servers_total=len(outcomes) + len(outstanding))
    agreement = dict(narrow["agreement"])
    for key in ("truechimers", "falsetickers"):
        agreement[key] = [s for s in agreement[key] if not _is_stand_in(s)]
    picked["agreement"] = dict(agreement, outstanding_votes=k, published_interval=interval)
    return Decision(True, f"decided with {len(outstanding)} outstanding, each out wider than "
                          f"{tightest_bound * 1e3:.3f} ms (needed > {needed * 1e3:.3f} ms)",
                    picked=picked, needed_uncertainty_s=needed, late=tuple(sorted(i.server for i in outstanding)))


def _fails(gate: Thresholds) -> float:
    """The uncertainty bound past which a reply fails ``gate`` (its delay is at least twice it)."""
    return min(gate.max_uncertainty_s, gate.max_delay_s / 2)


def _span(samples: list[dict]) -> tuple[float, float]:
    """From the lowest interval's start to the highest one's end."""
    if not samples:
        return 0.0, 0.0
    return (min(s["offset_s"] - s["uncertainty_s"] for s in samples),
            max(s["offset_s"] + s["uncertainty_s"] for s in samples))


def _stand_in(index: int, offset_s: float, uncertainty_s: float) -> dict:
    """One outstanding vote of a completion: an interval, and a reply no gate passes."""
    sample = {"server": STAND_IN.format(index + 1), "offset_s": offset_s, "uncertainty_s": uncertainty_s,
              "delay_s": 1e3, "stratum": 16, "root_delay_s": 0.0, "root_dispersion_s": 0.0, "measured_at": 0.0,
              "nts": True, "leap": 0, "precision_s": 0.0, "address": "", "port": 0}
    return {"server": sample["server"], "status": OutcomeStatus.OK, "sample": sample, "attempts": 1, "history": []}


def _is_stand_in(name: str) -> bool:
    return name.startswith("<outstanding ")
