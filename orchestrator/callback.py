"""The chord callback: select the round's measurement and publish it to Redis.

And the decider the worker asks after each outcome (:mod:`workers.inflight`):
a round the outcomes in hand decide (:mod:`orchestrator.early`) is published
by the worker then, and its callback only records what the late servers said.
"""

from __future__ import annotations

import dataclasses
import json
import threading

from celery.utils.log import get_task_logger

from workers import inflight
from workers.app import app, redis_url_of
from workers.config import NtpSettings
from workers.contracts import OutcomeStatus
from workers.tasks import reporter

from . import display, early, hub, leap, outliers, records, selection
from .outcomes import ClosedBy, Quality, RoundMeta, ServerStatus, outage_of
from .store import Store, client_for

log = get_task_logger(__name__)

#: The registered name (what Flower shows).
FINISH_TASK = "chronotick.finish_round"


@app.task(bind=True, name=FINISH_TASK)
def finish_round(self, results: list, meta: dict) -> dict:
    """Select from a round's outcomes, publish, and return the round record.

    Parameters
    ----------
    results:
        The chord header's results: one outcome per server (or one list of
        them in sequential mode).
    meta:
        A reference to the round (:func:`orchestrator.rounds.round_reference`):
        its metadata is read from the round's open entry in Redis.
    """
    store = _store(meta["key_prefix"])
    entry = store.open_round_entry(meta["node"], meta["round_id"])
    if entry is None:  # finished already (finishing removes the entry): by a closer, or a redelivery
        log.warning("[DUPLICATE] %s round %s is no longer open; this callback publishes nothing",
                    meta["node"], meta["round_id"])
        return {"summary": "duplicate: no longer open", "round_id": meta["round_id"], "node": meta["node"],
                "duplicate": True}
    round_meta = round_meta_of(entry["meta"])
    reporter.drain()  # this process's reports first: none may land after the publication deletes them
    outcomes = selection.flatten(results)
    inflight.tracker.forget(meta["key_prefix"], meta["node"], meta["round_id"])
    record = finish(round_meta, outcomes, store, closed_by=ClosedBy.CALLBACK)
    if record is None:
        published = store.published_result(round_meta.node, round_meta.round_id)  # before complete() ends it
        late = complete(round_meta, outcomes, store)
        if late is not None:
            return {"summary": display.summarise_early_round(published, late), "round_id": round_meta.round_id,
                    "node": round_meta.node, "late": late}
        log.warning("[DUPLICATE] %s round %s was already finished; this callback publishes nothing",
                    round_meta.node, round_meta.round_id)
        return {"summary": "duplicate: already finished", "round_id": round_meta.round_id,
                "node": round_meta.node, "duplicate": True}
    # The summary first, so Flower's result column shows it (not stored in the history).
    return {"summary": summarise_round(record), **record}


def summarise_late(late: list[dict]) -> str:
    """The callback of a round published early: what its late servers said (Flower's result column)."""
    said = [f"{e['server']} " + (f"ok {e['sample']['offset_s'] * 1e3:+.3f} ms" if e.get("sample")
                                 else f"failed: {e['reason']}") for e in late]
    return f"late, after the round was published: {'; '.join(said)}"


def complete(meta: RoundMeta, outcomes: list[dict], store: Store) -> list[dict] | None:
    """Record the late servers' outcomes of a round published early (``None``: it was not, or is done)."""
    late = store.complete_round(meta.node, meta.round_id, selection.unique_by_server(outcomes),
                                history_length=meta.history_length, history_hours=meta.history_hours)
    if late:
        log.info("[LATE] %s round %s: %s", meta.node, meta.round_id, summarise_late(late))
    return late


def decide_early(view: inflight.RoundView) -> inflight.Verdict:
    """The worker's question after each outcome: do the outcomes in hand decide the round?  If so, publish.

    Installed in :data:`workers.inflight.tracker` below.  The round's metadata
    is read once per round from its open entry in Redis (and its ``ntp``
    section parsed once per process: :func:`round_meta_of`).  Until the round
    could be decided -- the votes in hand could outvote the rest, and the
    decider does not say that only more outcomes can decide it -- the answer
    says how many more outcomes to wait for (:attr:`inflight.Verdict.wait_for_outcomes`),
    so that nothing else asks again.
    """
    context = view.context
    meta = context.get("meta")
    if meta is None:
        store = _store(view.key_prefix)
        entry = store.open_round_entry(view.node, view.round_id)
        if entry is None:  # finished already
            return inflight.Verdict(False)
        meta = context["meta"] = round_meta_of(entry["meta"])
        context["servers"] = meta.servers
        context["nts"] = {s.name: s.nts for s in meta.ntp.servers}
        context["strict"] = meta.strict
    ntp = meta.ntp
    reported = {o["server"] for o in view.outcomes}
    pending = [name for name in context["servers"] if name not in reported]
    if not pending:
        return inflight.Verdict(False)  # the callback publishes it
    if not ntp.publish_early:
        return inflight.Verdict(False, wait_for_outcomes=len(pending) + 1)  # never: the callback publishes it
    answered = sum(1 for o in view.outcomes if o["status"] == OutcomeStatus.OK)
    if not ntp.server_groups and answered < len(pending):
        # Too few votes to outvote the rest: not before (pending - answered) / 2 more answers, at the least.
        return inflight.Verdict(False, wait_for_outcomes=(len(pending) - answered + 1) // 2)
    # A server the retry policy may still ask again could still say anything: to the decider it is a retry
    # to come.  One with no bound yet (its task not started, a burst not all sent) may get one soon: bound 0.
    outstanding = [early.Outstanding(name, view.bounds.get(name, 0.0), context["nts"][name],
                                     retrying=view.retry_may_follow(name))
                   for name in pending]
    split = leap.one_timescale(view.outcomes, context["servers"], ntp, meta.dispatched_at)  # near a leap second
    decision = early.decide(split.outcomes, outstanding, strict=context["strict"], enable_fallback=ntp.enable_fallback,
                            method=ntp.selection, groups=[list(g) for g in ntp.server_groups],
                            auth_select=ntp.auth_select, parallel=ntp.parallel_queries, apart=split.apart)
    if not decision.publish:
        if decision.needed_uncertainty_s is None:  # the decider's word: only more outcomes can decide it
            return inflight.Verdict(False, wait_for_outcomes=1)
        every_bound_grows = all(name in view.bounds or name in view.retrying for name in pending)
        return inflight.Verdict(False, decision.needed_uncertainty_s if every_bound_grows else None)
    record = finish(meta, view.outcomes, _store(view.key_prefix), closed_by=ClosedBy.EARLY,
                    picked=decision.picked, late=decision.late)
    if record is not None:
        log.info("[EARLY] %s round %s: %s", meta.node, meta.round_id, decision.why)
    return inflight.Verdict(True)  # published, by this call or by whoever claimed it first


#: Parsed ``ntp`` sections (their JSON -> settings), so that a round's metadata is not validated anew
#: each time it is read: a node's rounds all carry the same section.  Bounded: cleared when full.
_NTP_PARSED: dict[str, NtpSettings] = {}
_NTP_PARSED_MAX = 32
_ntp_parsed_lock = threading.Lock()


def round_meta_of(data: dict) -> RoundMeta:
    """:meth:`RoundMeta.from_dict`, with the ``ntp`` section parsed once per process for each distinct one.

    Validating the section builds every server's address (about half a millisecond for forty
    servers), and the decider and the callback read each round's metadata: the same section
    parses to the same (immutable) settings, so it is kept, keyed by its JSON.
    """
    key = json.dumps(data["ntp"], sort_keys=True, separators=(",", ":"))
    ntp = _NTP_PARSED.get(key)
    if ntp is None:
        meta = RoundMeta.from_dict(data)
        with _ntp_parsed_lock:
            if len(_NTP_PARSED) >= _NTP_PARSED_MAX:
                _NTP_PARSED.clear()
            _NTP_PARSED[key] = meta.ntp
        return meta
    return RoundMeta(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(RoundMeta) if f.name != "ntp"},
                     ntp=ntp)


def _store(prefix: str) -> Store:
    """The store under ``prefix``, on this worker's Redis (one shared client)."""
    return Store(client_for(redis_url_of(app), app.conf.chronotick_redis_master_name), prefix=prefix)


inflight.tracker.install(decide_early)


def summarise_round(record: dict) -> str:
    """One line: the quality, and the choice or why there is none."""
    latest = record["latest"]
    used = f"{record['servers_used']}/{record['servers_total']} servers"
    if latest is not None:
        return (f"{record['quality']}: {latest['server']} {latest['offset'] * 1e3:+.3f} ms "
                f"±{latest['uncertainty'] * 1e3:.3f} ms, {used}")
    return f"{record['quality']}: nothing published, {used}"


def finish(meta: RoundMeta, outcomes: list[dict], store: Store, *, closed_by: str, picked: dict | None = None,
           late: tuple[str, ...] = ()) -> dict | None:
    """Finish a round once: select, filter, publish, log.  ``None`` if it was already finished.

    The chord callback, the deadline closer (:func:`orchestrator.rounds.close`)
    and the worker deciding it early (:func:`decide_early`: ``picked``, what
    :mod:`orchestrator.early` decided, and the ``late`` servers) all come here;
    whichever claims the round first publishes it, so a redelivered callback or
    a late one after the closer counts nothing twice.
    """
    # The second leg, read before the round is claimed: the hub node's latest measurement of UTC.
    hub_latest = None
    if meta.hub is not None:
        try:
            hub_latest = store.latest(meta.hub["node"])
        except ValueError:  # not JSON: no usable leg, said in the record (orchestrator.hub.compose)
            hub_latest = None

    def build(window: list[list[float]], consecutive: int, finished_at: float) -> dict:
        record = build_record(meta, outcomes, finished_at=finished_at, window=window,
                              consecutive_outliers=consecutive, picked=picked, late=late,
                              unreported_unknown=closed_by == ClosedBy.DEADLINE, hub_latest=hub_latest)
        record["closed_by"] = closed_by
        return record

    record = store.record_round(meta.node, meta.round_id, build, history_length=meta.history_length,
                                history_hours=meta.history_hours, detail=meta.record_detail,
                                window_size=meta.ntp.outlier_window_size)
    if record is None:
        return None
    chosen = record["latest"]
    if record["quality"] == "outlier":
        log.warning("[NTP_OUTLIER] %s round %s: %s is %.1f sigma from the recent results; not published",
                    meta.node, meta.round_id, record["candidate"]["server"], record["filter"]["z"])
    elif record["quality"] == Quality.OUTAGE:
        log.error("[NTP_OUTAGE] %s round %s: %s (%d servers); not NTP starvation, no reach bit taken",
                  meta.node, meta.round_id, record["agreement"].get("outage", "no server could be asked"),
                  record["servers_total"])
    elif chosen is None:
        log.error("[NTP_STARVATION] %s round %s: no server passed any gate (%d servers)",
                  meta.node, meta.round_id, record["servers_total"])
    else:
        log.info("[NTP_ACCEPTED] %s round %s: %s offset=%.6f s uncertainty=%.6f s (%s, %d/%d servers%s)",
                 meta.node, meta.round_id, chosen["server"], chosen["offset"], chosen["uncertainty"],
                 chosen["quality"], chosen["servers_used"], chosen["servers_total"],
                 _how_closed(closed_by, late))
    return record


def _leap_seconds(ntp: NtpSettings) -> tuple[float, ...]:
    """The leap seconds the system's ``leap-seconds.list`` knows (past ones stay facts when it expires)."""
    table = leap.load(ntp.leap_seconds_file)
    return table.leaps if table is not None else ()


def _how_closed(closed_by: str, late: tuple[str, ...]) -> str:
    if closed_by == ClosedBy.DEADLINE:
        return ", closed at its deadline"
    return f", decided with {len(late)} late" if closed_by == ClosedBy.EARLY else ""


def _closed_with_unreported(meta: RoundMeta, outcomes: list[dict], unreported: list[str]) -> dict:
    """A round closed with servers that never reported: published only if they could not have changed it.

    A server with no outcome is not known to have failed -- its task may have
    been lost with a worker, or the round closed before it ended -- so it is an
    unknown vote, as a server still out is to the early decider
    (:mod:`orchestrator.early`, with no bound).  Were unreported servers taken
    as failed, a quick liar alone in hand would be a majority of one.  When the
    answers in hand do not decide the round, nothing is published: NTP
    starvation here, which :func:`build_record` makes an outage when nothing
    at all was reported, or nothing but failures the node's path explains
    (:func:`orchestrator.outcomes.outage_of`).
    """
    ntp = meta.ntp
    nts = {s.name: s.nts for s in ntp.servers}
    decision = early.decide(outcomes, [early.Outstanding(name, 0.0, nts.get(name, False), retrying=True)
                                       for name in unreported],
                            strict=meta.strict, enable_fallback=ntp.enable_fallback, method=ntp.selection,
                            groups=[list(g) for g in ntp.server_groups], auth_select=ntp.auth_select)
    if decision.publish and decision.picked is not None:
        return decision.picked
    held = selection.select(outcomes, meta.strict, enable_fallback=ntp.enable_fallback, method=ntp.selection,
                            groups=[list(g) for g in ntp.server_groups], auth_select=ntp.auth_select)
    agreement = dict(held["agreement"], undecided=f"{len(unreported)} servers never reported, and they could "
                                                  f"have changed the result: {decision.why}")
    if held["chosen"] is None:  # the answers in hand passed no gate: NTP starvation (or an outage_of one)
        return dict(held, quality=Quality.STARVATION, chosen=None, servers_used=0, agreement=agreement)
    # Answers in hand passed a gate; only the servers that never reported -- the node cut off, its worker
    # gone -- kept the round undecided: an outage, not NTP starvation, and nothing is marked as chosen.
    servers = [records.with_status(e, ServerStatus.ACCEPTED)
               if e.get("status") in (ServerStatus.CHOSEN, ServerStatus.COMBINED) else e for e in held["servers"]]
    return dict(held, quality=Quality.OUTAGE, chosen=None, servers_used=0, servers=servers,
                agreement=dict(agreement, outage=f"undecided: {agreement['undecided']}"))


def build_record(meta: RoundMeta, outcomes: list[dict], *, finished_at: float, window: list | None = None,
                 consecutive_outliers: int = 0, picked: dict | None = None, late: tuple[str, ...] = (),
                 unreported_unknown: bool = False, hub_latest: dict | None = None) -> dict:
    """The round record (pure): every server's outcome, the choice, the new ``latest`` -- decided here, built
    by :mod:`orchestrator.records` (:func:`~orchestrator.records.round_record`, :class:`~orchestrator.records.Latest`).

    ``window`` and ``consecutive_outliers`` are the node's temporal-filter
    state (see :mod:`orchestrator.outliers`).  ``picked`` and ``late``: a round
    decided early (:mod:`orchestrator.early`) -- its selection, and the
    servers still out, recorded ``late``.  ``unreported_unknown``: the round was
    closed at its deadline, and a server that never reported is an unknown vote,
    not a failure (:func:`_closed_with_unreported`).  ``hub_latest``: for a node
    measured through the hub (``meta.hub``), the hub node's ``latest``, the
    second leg (:mod:`orchestrator.hub`): the published offset is the two legs
    composed, and the temporal filter judges that; with no usable hub leg the
    round publishes nothing (an ``outage``: the node's path to UTC is down).
    """
    outcomes = leap.one_timescale(outcomes, meta.servers, meta.ntp, meta.dispatched_at).outcomes  # near a leap
    answered = {o["server"] for o in outcomes}
    missing = [records.unreported_outcome(name) for name in meta.servers if name not in answered and name not in late]
    ntp = meta.ntp
    groups = [list(g) for g in ntp.server_groups]
    if picked is None and missing and unreported_unknown:
        picked = _closed_with_unreported(meta, outcomes, [str(m["server"]) for m in missing])
    if picked is None:
        picked = selection.select(outcomes + missing, meta.strict, enable_fallback=ntp.enable_fallback,
                                  method=ntp.selection, groups=groups, auth_select=ntp.auth_select)
    else:  # decided without some servers: the late ones' places, and the unreported ones', in name order
        named = {s["server"] for s in picked["servers"]}
        waiting = [records.waiting_entry(name) for name in late]
        absent = [records.unreported_entry(m["server"]) for m in missing if m["server"] not in named]
        picked = dict(picked, servers=sorted(picked["servers"] + waiting + absent, key=lambda s: s["server"]))
    chosen = picked["chosen"]
    quality = picked["quality"]
    if chosen is None:
        # No server asked or reached (the worker gone, the node cut off, its path down): not starvation.
        why = outage_of(picked["servers"])
        if why is not None:
            quality = Quality.OUTAGE
            picked = dict(picked, agreement=dict(picked["agreement"] or {}, outage=why))
    composed: hub.Composed | None = None
    if chosen is not None and meta.hub is not None:
        leg = hub.compose(lan_offset_s=chosen["offset_s"], lan_uncertainty_s=chosen["uncertainty_s"],
                          lan_measured_at=chosen["measured_at"], lan_round_id=meta.round_id,
                          lan_server=chosen["server"], hub_node=meta.hub["node"],
                          hub_latest=hub_latest, now=finished_at, max_drift_ppm=meta.hub["max_drift_ppm"],
                          stale_after_s=meta.hub["stale_after_s"], leap_seconds=_leap_seconds(ntp),
                          stepping=ntp.leap_timescale != "smear")
        if isinstance(leg, str):
            quality, chosen = Quality.OUTAGE, None
            picked = dict(picked, agreement=dict(picked["agreement"] or {}, outage=leg))
        else:
            composed = leg
            chosen = dict(chosen, offset_s=leg.offset_s, uncertainty_s=leg.uncertainty_s)
    verdict = None
    if chosen is not None:
        verdict = outliers.judge(chosen["offset_s"], chosen["uncertainty_s"], chosen["measured_at"],
                                 window or [], sigma_threshold=ntp.outlier_sigma_threshold,
                                 consecutive_outliers=consecutive_outliers, max_gap_s=meta.stale_after_s)
        if verdict["outlier"]:
            quality = Quality.OUTLIER
    latest = None
    if chosen is not None and quality != Quality.OUTLIER:
        latest = records.Latest.published(chosen, node=meta.node, round_id=meta.round_id, quality=picked["quality"],
                                          published_at=finished_at, servers_used=picked["servers_used"],
                                          servers_total=len(meta.servers), selection=ntp.selection,
                                          legs=None if composed is None else composed.legs)
    return records.round_record(meta, quality=quality, finished_at=finished_at, picked=picked, candidate=chosen,
                                verdict=verdict, window_length=len(window or []), latest=latest)


