"""Deciding a round before every reply is in: publish once no outstanding reply can change it.  Pure.

A reply still outstanding ``e`` seconds after its request left has a round-trip
delay of at least ``e`` less the server's hold (RFC 5905's ``t3 - t2``, which
the worker allows for: :mod:`workers.inflight`), and its root distance -- its
uncertainty -- is at least half its delay.  So each outstanding server has a
lower bound on what it can still say, which grows with time; a server whose
attempt failed with a retry to come, or whose burst has requests still to
send, has a bound of zero: it could say anything.  The worker asks
:func:`decide` after every outcome whether the round is decided.

**What "decided" means.**  Waiting -- :func:`selection.select` on the completed
round -- is the oracle.  A *completion* gives each outstanding server any
outcome its bound allows: a failure, or any offset, stratum and delay with an
uncertainty at least its bound.  Early publishes only when, for **every**
completion, waiting

1. publishes through the same gate (strict, relaxed; under ``auth_select:
   prefer`` the same pool);
2. publishes an offset inside early's published bound, and has early's offset
   inside its own bound;
3. chooses or combines no server early called a falseticker, and calls none of
   early's members one.

**How it is proven** without trying every completion (the differential test in
``tests/unit/test_early.py`` does try them).  Votes first: an outstanding
server is a vote whose interval is unknown (a group is one vote, unknown while
any member is still out: one could come back tighter than the member in hand
and vote for the group instead -- whatever its bound, so that the agreement
never rests on a bound).  With ``V`` votes in all, ``k`` of them
unknown, the agreed interval of any completion (chrony's sweep,
:func:`selection.sweep`) contains the **narrow** interval ``N`` -- the points
that ``majority(V)`` known intervals cover -- and lies inside the **wide** one
``W`` -- the points ``majority(V) - k`` cover: unknown votes can only add
depth, and a failure only lowers the majority by as much as it removes.  No
stand-in vote is placed anywhere: both are computed from what is in hand, so a
liar cannot sit next to one.  ``k`` must be below ``majority(V)``.

A sample in hand meeting ``N`` is a truechimer in every completion; one
missing ``W`` a falseticker in every one (these are what early calls
falsetickers); any other is *undecided*.  A sample *surely passes* a gate when
it is a truechimer everywhere, meets the thresholds, and its uncertainty
widened to cover ``W`` is within the gate's (a label is honest:
:func:`selection.gate_violations`).  It *may pass* when it meets ``W``, the
thresholds, and covers ``N`` within the gate; an outstanding server may pass
a gate while its bound is within it.  The gate (and pool) waiting uses is
decided when some sample surely passes it and nothing may pass an earlier one.

The choice, and its bound ``U``:

- ``best`` publishes the surely-passing sample with the least uncertainty
  covering ``W``, with that uncertainty ``U``.  Waiting chooses the least
  uncertainty covering its own interval, so its choice's bound is at most
  ``U``; if early's offset lies in ``N`` (so in every completion's interval,
  which waiting's bound covers), items 2 and 3 follow whatever waiting chose.
  Otherwise every other sample waiting could choose must have early's offset
  within the least bound it could be published with, and no outstanding reply
  may be able to be chosen (its bound above ``U``); failing that, the least of
  the surely-passing samples whose offset lies in ``N`` is published instead.
- ``combine`` publishes the combination of the surely-passing samples within
  :data:`selection.COMBINE_LIMIT` times the tightest of them, ``t``.  Nothing
  else may be able to join: no undecided sample within ``3t``; an outstanding
  server whose bound is within ``3t`` (a retry, say) is allowed only when early's
  offset lies in ``N``, and ``U`` then also covers every offset its joining
  could move the combination to (:func:`_joining_spread`: at most
  ``max(t, 3tm/(3+m))`` past its members and ``W``, for ``m`` joiners).  ``U``
  must pass the gate.

**What rests on a bound, and what does not.**  The agreement -- who is a
truechimer, what the published bound covers -- never does: unknown votes are
taken as anything.  Bounds decide only whether an outstanding reply could pass
an earlier gate, be chosen instead, or join a combination.  A bound assumes the
server held the request no longer than :data:`workers.inflight.HOLD_ALLOWANCE_S`
(as it says in ``t3 - t2``); one that holds longer can come back tighter than
its bound and so make waiting's label or choice differ from early's -- but what
early published still covers the wide interval, so it holds the truth whenever
a majority of all the votes is honest.

A round that is undecided says which outstanding bound would decide it
(``needed_uncertainty_s``), so the worker asks again when the bounds have
grown that far; ``None`` when only more outcomes can.

Sequential rounds (``parallel_queries: false``) are never decided early: their
later servers have not been asked yet.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from workers.contracts import AuthSelect, OutcomeStatus, Selection
from workers.quality import Thresholds

from . import selection
from .selection import GateStep, Json


@dataclass(frozen=True)
class Outstanding:
    """A server of the round with no outcome yet.

    ``min_uncertainty_s``: the least uncertainty its outcome can have, from how
    long the requests of its last attempt have been out.  ``retrying``: nothing
    bounds what it will say -- its attempt failed with a retry to come, or the
    attempt out is not its last (a request out a while may have been lost, and
    the retry that follows could answer with any delay), as the server's retry
    policy answered its task (:class:`workers.retry.RetryPolicy`, through
    :meth:`workers.inflight.RoundView.retry_may_follow`); or its task has not
    started: a bound of 0 that does not grow.  ``nts``: whether its replies are
    NTS-authenticated.
    """

    server: str
    min_uncertainty_s: float = 0.0
    nts: bool = False
    retrying: bool = False

    @property
    def bound_s(self) -> float:
        """The least uncertainty its next reply can have."""
        return 0.0 if self.retrying else self.min_uncertainty_s


@dataclass(frozen=True)
class Decision:
    """Whether to publish now, and what.

    ``publish``: decided.  ``picked``: what to publish (:func:`selection.select`'s
    shape).  ``needed_uncertainty_s``: undecided only because some outstanding
    bound is at most this -- the round may be decided once every outstanding
    bound exceeds it, if nothing else arrives; ``None`` when only more
    outcomes can decide it.  ``why``: one line, for the log and the record.
    """

    publish: bool
    why: str
    picked: dict[str, Any] | None = None
    needed_uncertainty_s: float | None = None
    late: tuple[str, ...] = ()


def fails_above(gate: Thresholds) -> float:
    """The bound above which no reply passes ``gate`` (its delay is at least twice its uncertainty)."""
    return min(gate.max_uncertainty_s, gate.max_delay_s / 2)


@dataclass
class _Blockers:
    """What holds an undecided round: outstanding bounds to outgrow, or nothing but outcomes."""

    needed_s: float = 0.0
    outcomes_only: bool = False
    reasons: list[str] = field(default_factory=list)

    def bound(self, items: Iterable[Outstanding], above_s: float, why: str) -> None:
        """Each of ``items`` whose bound is not above ``above_s`` holds the round until it is."""
        held = [i for i in items if i.bound_s <= above_s]
        if held:
            self.needed_s = max(self.needed_s, above_s)
            if any(i.retrying for i in held):
                self.outcomes_only = True  # a retry's bound only grows once it is sent
            self.reasons.append(f"{why}: {', '.join(sorted(i.server for i in held))} "
                                f"(needs a bound > {above_s * 1e3:.3f} ms)")

    def hold(self, why: str) -> None:
        """The round is held until more outcomes come: no bound growing can decide it."""
        self.outcomes_only = True
        self.reasons.append(why)

    def merged_into(self, other: _Blockers) -> _Blockers:
        """Both blockers' reasons and needs in one."""
        return _Blockers(max(self.needed_s, other.needed_s), self.outcomes_only or other.outcomes_only,
                         other.reasons + self.reasons)

    def decision(self) -> Decision:
        needed = None if self.outcomes_only or self.needed_s <= 0 else self.needed_s
        return Decision(False, "; ".join(self.reasons), needed_uncertainty_s=needed)


def decide(outcomes: list[dict], outstanding: list[Outstanding], *, strict: Thresholds, enable_fallback: bool,
           method: str, groups: list[list[str]] | None = None,
           auth_select: str = AuthSelect.MIX, parallel: bool = True, apart: Collection[str] = ()) -> Decision:
    """Whether the round of ``outcomes`` (so far) is decided with ``outstanding`` still out (module doc).

    ``apart``: servers set apart before the vote (near a leap second, those of
    the other timescale: :func:`orchestrator.leap.one_timescale`, which has
    set their replies in ``outcomes`` apart already).  Still out, one can
    neither vote nor be chosen -- as a plain server under ``require`` -- and is
    recorded late.
    """
    if method not in (Selection.BEST, Selection.COMBINE):
        raise ValueError(f"unknown selection method {method!r}")
    if not outstanding:
        return Decision(False, "nothing outstanding: the chord's callback publishes it")
    if not parallel:
        return Decision(False, "a sequential round waits for every server")
    outcomes = selection.unique_by_server(outcomes)
    samples = [o["sample"] for o in outcomes if o["status"] == OutcomeStatus.OK]
    require = auth_select == AuthSelect.REQUIRE
    voting = [s for s in samples if not require or s.get("nts")]
    unauthenticated = {s["server"] for s in samples} - {s["server"] for s in voting}
    # Under "require" a plain server's reply neither votes nor can be chosen, nor, near a leap second, one of
    # the other timescale's: it cannot matter.
    eligible = [i for i in outstanding if (not require or i.nts) and i.server not in apart]
    if not eligible:
        return Decision(False, "no outstanding server can vote: the chord's callback publishes it")
    blockers = _Blockers()

    # -- the votes: which are known, which could still be anything ----------------------------------
    # A group with a member still out is unknown whatever that member's bound: a reply tighter than the
    # member in hand would vote for the group instead, and a server that holds a request longer than the
    # bound allows for (t3 - t2) can come back tighter than its bound -- which must never move the agreement.
    group_of = selection.group_index(groups)
    in_hand = selection.voters_of(voting, groups)
    unknown = {selection.vote_key(item.server, group_of) for item in eligible}
    known = [s for key, s in in_hand.items() if key not in unknown]
    k, votes = len(unknown), len(known) + len(unknown)
    needed = selection.majority(votes)
    if k >= needed:
        blockers.hold(f"{k} outstanding votes could make a majority of {votes} on their own")
        return blockers.decision()
    narrow, depth, _ = selection.sweep(known, needed)
    wide = selection.sweep(known, needed - k)[0]
    if narrow is None or wide is None:
        blockers.hold(f"no {needed} of the {votes} votes agree in every completion yet")
        return blockers.decision()

    # -- who is a truechimer everywhere, anywhere ----------------------------------------------------
    anywhere = [s for s in voting if selection.overlaps(s, wide)]
    everywhere = [s for s in anywhere if selection.overlaps(s, narrow)]

    def surely(step: GateStep) -> list[Json]:
        return selection.passing(everywhere, step, wide)

    def maybe(step: GateStep) -> list[Json]:
        return selection.passing(anywhere, step, narrow)

    def may_pass(step: GateStep) -> list[Outstanding]:
        return [i for i in eligible if not step.nts_only or i.nts]

    # -- the gate every completion uses ---------------------------------------------------------------
    step, sure = None, []
    for candidate in selection.gate_steps(strict, enable_fallback=enable_fallback, auth_select=auth_select):
        sure = surely(candidate)
        if sure:
            step = candidate
            break
        if maybe(candidate):
            blockers.hold(f"a reply in hand may pass {_name(candidate)} or not, as the votes still out fall")
        blockers.bound(may_pass(candidate), fails_above(candidate.thresholds),
                       f"an outstanding reply could pass {_name(candidate)}")
    if step is None:
        if not blockers.reasons:
            blockers.hold("no truechimer passes any gate: the chord's callback publishes the starvation")
        return blockers.decision()
    if blockers.reasons:  # an earlier gate is not yet ruled out
        return blockers.decision()

    # -- the choice, and what every completion could publish instead -----------------------------
    could_answer = [i for i in may_pass(step) if i.bound_s <= fails_above(step.thresholds)]
    if method == Selection.BEST:
        # The least published uncertainty; failing that, the least among those inside the narrow interval,
        # which nothing still out can contradict.
        candidates = [min(sure, key=lambda s: (selection.covering_uncertainty(s, wide), *selection.best_key(s)))]
        inside = [s for s in sure if narrow[0] <= s["offset_s"] <= narrow[1]]
        if inside:
            candidates.append(min(inside, key=lambda s: (selection.covering_uncertainty(s, wide),
                                                         *selection.best_key(s))))
        for pick in candidates:
            chosen, used = selection.choose([pick], wide, method)
            held = _best_held(chosen, maybe(step), could_answer, narrow)
            if not held.reasons:
                break
        if held.reasons:
            blockers = held.merged_into(blockers)
        published_s = chosen["uncertainty_s"]
    else:
        chosen, used = selection.choose(sure, wide, method)
        offset_s, published_s = chosen["offset_s"], chosen["uncertainty_s"]
        in_narrow = narrow[0] <= offset_s <= narrow[1]
        used_names = {s["server"] for s in used}
        limit_s = selection.COMBINE_LIMIT * min(s["uncertainty_s"] for s in used)
        for other in maybe(step):
            if other["server"] not in used_names and other["uncertainty_s"] <= limit_s:
                blockers.hold(f"{other['server']} may be combined or not, as the votes still out fall")
        joining = [i for i in could_answer if i.bound_s <= limit_s]
        # A combination inside the narrow interval is published at once, its bound widened to wherever the
        # replies that could still join could move it (waiting for their bounds would cost the round's time).
        if joining and not in_narrow:
            blockers.bound(joining, limit_s, "an outstanding reply could join the combination")
        elif joining:  # joining, they move the combination: at most ``spread`` past its members and the wide interval
            spread = _joining_spread(min(s["uncertainty_s"] for s in used), len(joining))
            low = min(wide[0], *(s["offset_s"] for s in used)) - spread
            high = max(wide[1], *(s["offset_s"] for s in used)) + spread
            published_s = max(published_s, offset_s - low, high - offset_s)
            if published_s > step.thresholds.max_uncertainty_s:
                blockers.bound(joining, limit_s, "an outstanding reply joining would widen the bound past the gate")
    if blockers.reasons:
        return blockers.decision()

    # -- decided: the record, as waiting would write it where it is known -------------------------
    falsetickers = {s["server"] for s in voting} - {s["server"] for s in anywhere}
    chosen = dict(chosen, uncertainty_s=published_s)
    agreement = {"majority": True, "votes": votes, "needed": needed,
                 "depth": depth, "interval": wide, "deepest": [], "ambiguous": False,
                 "truechimers": sorted(s["server"] for s in anywhere), "falsetickers": sorted(falsetickers),
                 "outstanding_votes": k, "narrow_interval": narrow, "published_interval": wide}
    picked = {"quality": step.quality, "chosen": chosen,
              "servers": selection.server_entries(outcomes, falsetickers=falsetickers,
                                                  unauthenticated=unauthenticated, step=step, interval=wide,
                                                  chosen=chosen, used=used),
              "servers_used": len(sure), "servers_combined": len(used) if method == Selection.COMBINE else None,
              "servers_total": len(outcomes) + len(outstanding), "agreement": agreement}
    tightest_bound = min(i.bound_s for i in eligible)
    return Decision(True, f"decided with {len(outstanding)} outstanding (least bound "
                          f"{tightest_bound * 1e3:.3f} ms), {k} of {votes} votes unknown",
                    picked=picked, late=tuple(sorted(i.server for i in outstanding)))


def _joining_spread(tightest_s: float, joiners: int) -> float:
    """How far past its members' offsets and the wide interval ``joiners`` replies can move a combination.

    A combination is the mean of its members' offsets weighted by 1/u.  A
    joiner meets the agreed interval (inside the wide one), so its offset lies
    within its own u of it, and its weight times that distance is at most 1.
    Let ``t`` be the tightest member in hand.  If a joiner is under ``t/3``, the
    limit (3x the tightest) drops every member wider than 3x it, and the mean of
    what remains lies within that joiner's 3u < ``t`` of the interval.  Otherwise
    the member of ``t`` stays (weight ``1/t``) and each joiner weighs at least
    ``1/(3t)``, so the mean moves at most ``m / (1/t + m/(3t)) = 3tm / (3 + m)``
    for ``m`` joiners.
    """
    return max(tightest_s, 3 * tightest_s * joiners / (3 + joiners))


def _best_held(chosen: Json, may_pass: list[Json], could_answer: list[Outstanding], narrow: list[float]) -> _Blockers:
    """What holds ``best``'s ``chosen`` (published with ``uncertainty_s``): another choice waiting could make.

    Waiting's choice is published with at most ``chosen``'s bound (it takes the
    least).  If ``chosen``'s offset lies in the narrow interval, which every
    completion's bound covers, nothing can.  Otherwise no sample in hand that
    might be chosen may have a bound missing this offset, and no reply still
    out may be able to be chosen (its bound must exceed ``chosen``'s).
    """
    held = _Blockers()
    offset_s, published_s = chosen["offset_s"], chosen["uncertainty_s"]
    if narrow[0] <= offset_s <= narrow[1]:
        return held
    for other in may_pass:
        least_s = selection.covering_uncertainty(other, narrow)
        if (other["server"] != chosen["server"] and least_s <= published_s
                and abs(other["offset_s"] - offset_s) > least_s):
            held.hold(f"{other['server']} could be chosen instead, and its bound miss this offset")
    held.bound(could_answer, published_s, "an outstanding reply could be chosen instead")
    return held


def _name(step: GateStep) -> str:
    return f"{step.quality}{' (authenticated)' if step.nts_only else ''}"
