"""The chord callback: select the round's measurement and publish it to Redis.

And the decider the worker asks after each outcome (:mod:`workers.inflight`):
a round the outcomes in hand decide (:mod:`orchestrator.early`) is published
by the worker then, and its callback only records what the late servers said.
"""

from __future__ import annotations

from celery.utils.log import get_task_logger

from workers import inflight
from workers.app import app, redis_url_of
from workers.contracts import OutcomeStatus
from workers.tasks import reporter

from . import early, outliers, selection
from .contracts import REASON_NO_RESULT, ClosedBy, Quality, RoundMeta, ServerStatus
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
    round_meta = RoundMeta.from_dict(entry["meta"])
    reporter.drain()  # this process's reports first: none may land after the publication deletes them
    outcomes = selection.flatten(results)
    inflight.tracker.forget(meta["key_prefix"], meta["node"], meta["round_id"])
    record = finish(round_meta, outcomes, store, closed_by=CLOSED_BY_CALLBACK)
    if record is None:
        late = complete(round_meta, outcomes, store)
        if late is not None:
            return {"summary": summarise_late(late), "round_id": round_meta.round_id, "node": round_meta.node,
                    "late": late}
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
    late = store.complete_round(meta.node, meta.round_id, outcomes, history_length=meta.history_length,
                                history_hours=meta.history_hours)
    if late:
        log.info("[LATE] %s round %s: %s", meta.node, meta.round_id, summarise_late(late))
    return late


def decide_early(view: inflight.RoundView) -> inflight.Verdict:
    """The worker's question after each outcome: do the outcomes in hand decide the round?  If so, publish.

    Installed in :data:`workers.inflight.tracker` below.  The round's metadata
    is read once per round from its open entry in Redis.
    """
    context = view.context
    meta = context.get("meta")
    if meta is None:
        store = _store(view.key_prefix)
        entry = store.open_round_entry(view.node, view.round_id)
        if entry is None:  # finished already
            return inflight.Verdict(False)
        meta = context["meta"] = RoundMeta.from_dict(entry["meta"])
        context["nts"] = {s.name: s.nts for s in meta.ntp.servers}
    ntp = meta.ntp
    reported = {o["server"] for o in view.outcomes}
    pending = [name for name in meta.servers if name not in reported]
    answered = sum(1 for o in view.outcomes if o["status"] == OutcomeStatus.OK)
    if not pending or not ntp.publish_early or (not ntp.server_groups and answered < len(pending)):
        return inflight.Verdict(False)  # the callback publishes it, or too few votes to outvote the rest
    outstanding = [early.Outstanding(name, view.bounds.get(name, 0.0), context["nts"][name],
                                     retrying=name in view.retrying) for name in pending]
    decision = early.decide(view.outcomes, outstanding, strict=meta.strict, enable_fallback=ntp.enable_fallback,
                            method=ntp.selection, groups=[list(g) for g in ntp.server_groups],
                            auth_select=ntp.auth_select, parallel=ntp.parallel_queries)
    if not decision.publish:
        every_bound_grows = all(name in view.bounds or name in view.retrying for name in pending)
        return inflight.Verdict(False, decision.needed_uncertainty_s if every_bound_grows else None)
    record = finish(meta, view.outcomes, _store(view.key_prefix), closed_by=CLOSED_BY_EARLY,
                    picked=decision.picked, late=decision.late)
    if record is not None:
        log.info("[EARLY] %s round %s: %s", meta.node, meta.round_id, decision.why)
    return inflight.Verdict(True)  # published, by this call or by whoever claimed it first


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


#: Who finished a round (``closed_by`` in its record).
CLOSED_BY_CALLBACK = ClosedBy.CALLBACK
CLOSED_BY_DEADLINE = ClosedBy.DEADLINE
CLOSED_BY_EARLY = ClosedBy.EARLY


def finish(meta: RoundMeta, outcomes: list[dict], store: Store, *, closed_by: str, picked: dict | None = None,
           late: tuple[str, ...] = ()) -> dict | None:
    """Finish a round once: select, filter, publish, log.  ``None`` if it was already finished.

    The chord callback, the deadline closer (:func:`orchestrator.rounds.close`)
    and the worker deciding it early (:func:`decide_early`: ``picked``, what
    :mod:`orchestrator.early` decided, and the ``late`` servers) all come here;
    whichever claims the round first publishes it, so a redelivered callback or
    a late one after the closer counts nothing twice.
    """
    def build(window: list[list[float]], consecutive: int, finished_at: float) -> dict:
        record = build_record(meta, outcomes, finished_at=finished_at, window=window,
                              consecutive_outliers=consecutive, picked=picked, late=late)
        record["closed_by"] = closed_by
        return record

    record = store.finish_round(meta.node, meta.round_id, build, history_length=meta.history_length,
                                history_hours=meta.history_hours, detail=meta.record_detail,
                                window_size=meta.ntp.outlier_window_size)
    if record is None:
        return None
    chosen = record["latest"]
    if record["quality"] == "outlier":
        log.warning("[NTP_OUTLIER] %s round %s: %s is %.1f sigma from the recent results; not published",
                    meta.node, meta.round_id, record["candidate"]["server"], record["filter"]["z"])
    elif chosen is None:
        log.error("[NTP_STARVATION] %s round %s: no server passed any gate (%d servers)",
                  meta.node, meta.round_id, record["servers_total"])
    else:
        log.info("[NTP_ACCEPTED] %s round %s: %s offset=%.6f s uncertainty=%.6f s (%s, %d/%d servers%s)",
                 meta.node, meta.round_id, chosen["server"], chosen["offset"], chosen["uncertainty"],
                 chosen["quality"], chosen["servers_used"], chosen["servers_total"],
                 _how_closed(closed_by, late))
    return record


def _how_closed(closed_by: str, late: tuple[str, ...]) -> str:
    if closed_by == CLOSED_BY_DEADLINE:
        return ", closed at its deadline"
    return f", decided with {len(late)} late" if closed_by == CLOSED_BY_EARLY else ""


def build_record(meta: RoundMeta, outcomes: list[dict], *, finished_at: float, window: list | None = None,
                 consecutive_outliers: int = 0, picked: dict | None = None, late: tuple[str, ...] = ()) -> dict:
    """The round record (pure): every server's outcome, the choice, the new ``latest``.

    ``window`` and ``consecutive_outliers`` are the node's temporal-filter
    state (see :mod:`orchestrator.outliers`).  ``picked`` and ``late``: a round
    decided early (:mod:`orchestrator.early`) -- its selection, and the
    servers still out, recorded ``late``.
    """
    answered = {o["server"] for o in outcomes}
    missing = [{"status": OutcomeStatus.FAILED, "server": name, "reason": REASON_NO_RESULT,
                "detail": "the task did not report before the round closed", "attempts": 0, "history": []}
               for name in meta.servers if name not in answered and name not in late]
    ntp = meta.ntp
    if picked is None:
        picked = selection.select(outcomes + missing, meta.strict, enable_fallback=ntp.enable_fallback,
                                  method=ntp.selection, groups=[list(g) for g in ntp.server_groups],
                                  auth_select=ntp.auth_select)
    else:  # decided early: the late servers' places, in name order with the rest
        waiting: list[dict] = [
            {"server": name, "status": ServerStatus.LATE, "attempts": 0, "history": [], "worker": None,
             "detail": "still out when the round was decided: it could not change the result"} for name in late]
        picked = dict(picked, servers=sorted(picked["servers"] + waiting, key=lambda s: s["server"]))
    servers_total = len(meta.servers)
    chosen = picked["chosen"]
    quality = picked["quality"]
    verdict = None
    if chosen is not None:
        verdict = outliers.judge(chosen["offset_s"], chosen["uncertainty_s"], chosen["measured_at"],
                                 window or [], sigma_threshold=ntp.outlier_sigma_threshold,
                                 consecutive_outliers=consecutive_outliers)
        if verdict["outlier"]:
            quality = OUTLIER
    latest = None
    if chosen is not None and quality != OUTLIER:
        latest = {
            "node": meta.node,
            "round_id": meta.round_id,
            "offset": chosen["offset_s"],
            "uncertainty": chosen["uncertainty_s"],
            "sample_uncertainty": chosen.get("sample_uncertainty_s", chosen["uncertainty_s"]),
            "delay": chosen["delay_s"],
            "stratum": chosen["stratum"],
            "leap": chosen["leap"],
            "root_delay": chosen["root_delay_s"],
            "root_dispersion": chosen["root_dispersion_s"],
            "precision": chosen["precision_s"],
            "server": chosen["server"],
            "address": f"{chosen['address']}:{chosen['port']}",
            "quality": picked["quality"],
            "measured_at": chosen["measured_at"],
            "published_at": finished_at,
            "servers_used": picked["servers_used"],
            "servers_total": servers_total,
            "selection": ntp.selection,
            "nts": bool(chosen.get("nts")),
        }
        if len(chosen.get("combined", [])) > 1:
            latest["combined"] = chosen["combined"]
    return {
        "round_id": meta.round_id,
        "node": meta.node,
        "quality": quality,
        "dispatched_at": meta.dispatched_at,
        "finished_at": finished_at,
        "duration_s": finished_at - meta.dispatched_at,
        "mode": ntp.measurement_mode,
        "parallel": ntp.parallel_queries,
        "servers_used": picked["servers_used"],
        "servers_total": servers_total,
        "servers": picked["servers"],
        "agreement": picked["agreement"],
        "filter": None if verdict is None else {**verdict, "window": len(window or [])},
        "candidate": None if chosen is None else {"server": chosen["server"], "offset": chosen["offset_s"],
                                                  "uncertainty": chosen["uncertainty_s"],
                                                  "measured_at": chosen["measured_at"]},
        "latest": latest,
    }


#: The round quality when the temporal filter refused the chosen result.
OUTLIER = Quality.OUTLIER
