"""The round record: built here alone, and stored here -- compact by default, verbose on request.

**One record, one builder.**  A round record (:func:`round_record`), each of
its server entries (:func:`answered_entry`, :func:`set_apart_entry`,
:func:`failed_entry`, :func:`late_entry`, :func:`waiting_entry`,
:func:`unreported_entry`) and its published measurement (:class:`Latest`, the
``latest`` key's value) are built by this module and by no other:
:mod:`orchestrator.selection` says each server's status and why,
:mod:`orchestrator.callback` decides the round, :mod:`orchestrator.store`
writes what it is given.  Records travel as JSON (Celery, Redis), so they are
plain dicts outside this module; :class:`Latest` is the typed measurement,
with :meth:`Latest.to_json` for the one JSON shape and :meth:`Latest.from_json`
for the one parser every reader uses (the ``latest`` key, a history record's
``latest``, an ``updates`` message: :class:`orchestrator.reader.Measurement`).

A measurement's names: a sample says ``offset_s``, ``delay_s``,
``uncertainty_s`` (:class:`workers.contracts.SampleDict`); the published
measurement says ``offset``, ``delay``, ``uncertainty`` (docs/contract.md);
a compact server entry stores a sample's under :data:`SHORT` names and
:func:`expand` gives them back as the sample's.

**The compact form.**  A node publishes 720 rounds a day at ChronoTick's
2-minute interval, and the history keeps a day of them, so a record's size is
the service's memory.  Redis packs stream entries of up to about 2,000 bytes
two to a 4 KiB node (``stream-node-max-bytes``), 2.3 kB each in memory; a
larger entry takes a node alone, 3.1 kB (``bench/redis_memory.py`` shows
both).  So the compact form (``ntp_service.record_detail: compact``) aims under
:data:`RECORD_BUDGET_BYTES` for ten servers.

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
equal (issue #24).  Which fields the record and the chosen entry already say
(:data:`FROM_RECORD`, :data:`FROM_SAMPLE`) and which the stored measurement
keeps (:data:`LATEST_FIELDS`) are read from :class:`Latest` itself, so a field
added to the measurement is kept without a second list to update.  Every other
number is rounded: offsets to 100 ns; delays,
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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from workers.contracts import OutcomeStatus, Reason, Selection

from .outcomes import ClosedBy, RoundMeta, ServerStatus

#: A record, an entry, an outcome or a sample, as the JSON it travels as.
Json = dict[str, Any]

COMPACT = "compact"
VERBOSE = "verbose"


# -- server entries -------------------------------------------------------------------------------------------


def _entry_of(outcome: Mapping[str, Any]) -> Json:
    """What every entry built from a server's outcome says first: the server, its attempts, who took it."""
    return {"server": outcome["server"], "attempts": outcome["attempts"], "history": outcome.get("history", []),
            "worker": outcome.get("worker")}


def answered_entry(outcome: Mapping[str, Any], status: str, *, reason: str | None = None,
                   detail: str | None = None) -> Json:
    """A server that answered (``ok``), with its sample: ``status`` and, when it was refused, ``reason`` and
    ``detail`` (:func:`orchestrator.selection.server_entries` says which)."""
    entry = _entry_of(outcome)
    entry["sample"] = outcome["sample"]
    entry["status"] = status
    if reason is not None:
        entry.update(reason=reason, detail=detail)
    return entry


def set_apart_entry(outcome: Mapping[str, Any]) -> Json:
    """A reply set apart before the vote (:func:`orchestrator.leap.set_apart`): ``rejected``, with its reason
    and sample, as a plain reply under ``auth_select: require`` is."""
    return {**_entry_of(outcome), "status": ServerStatus.REJECTED, "sample": outcome["sample"],
            "reason": outcome["reason"], "detail": outcome.get("detail")}


def failed_entry(outcome: Mapping[str, Any], status: str = ServerStatus.FAILED) -> Json:
    """A server with no usable reply after every attempt: its reason, detail and any kiss code."""
    return {**_entry_of(outcome), "status": status, "reason": outcome["reason"], "detail": outcome.get("detail"),
            "kiss_code": outcome.get("kiss_code")}


def late_entry(outcome: Mapping[str, Any] | None, server: str) -> Json:
    """A server still out when its round was published early, once it said something (status ``late``).

    ``outcome``: what it said; ``None``: nothing (``no_result``)."""
    if outcome is None:
        return {"server": server, "status": ServerStatus.LATE, "reason": Reason.NO_RESULT, "attempts": 0,
                "history": [], "worker": None}
    entry = {"server": server, "status": ServerStatus.LATE, "attempts": outcome["attempts"],
             "history": outcome.get("history", []), "worker": outcome.get("worker")}
    if outcome["status"] == OutcomeStatus.OK:
        entry["sample"] = outcome["sample"]
    else:
        entry.update(reason=outcome["reason"], detail=outcome.get("detail"), kiss_code=outcome.get("kiss_code"))
    return entry


def waiting_entry(server: str) -> Json:
    """A server still out when its round was decided (status ``late``): its outcome follows in ``late``."""
    return {"server": server, "status": ServerStatus.LATE, "attempts": 0, "history": [], "worker": None,
            "detail": "still out when the round was decided: it could not change the result"}


def unreported_outcome(server: str) -> Json:
    """The outcome of a server whose task did not report before its round closed: ``no_result``."""
    return {"status": OutcomeStatus.FAILED, "server": server, "reason": Reason.NO_RESULT,
            "detail": "the task did not report before the round closed", "attempts": 0, "history": []}


def unreported_entry(server: str) -> Json:
    """The entry of a server that never reported, in a round decided without it: ``failed``, ``no_result``."""
    return {**unreported_outcome(server), "worker": None}


def with_status(entry: Mapping[str, Any], status: str) -> Json:
    """``entry`` with another status (a round that publishes nothing marks nothing ``chosen``)."""
    return {**entry, "status": status}


# -- the published measurement --------------------------------------------------------------------------------


#: The published measurement's fields its chosen sample (or combination) gives it, one name each: field -> the
#: sample's key (:class:`workers.contracts.SampleDict`; a sample says its unit, the measurement the contract's
#: names).  The rest are the round's (:meth:`Latest.published`).
FROM_CHOSEN = {"offset": "offset_s", "uncertainty": "uncertainty_s", "delay": "delay_s", "stratum": "stratum",
               "leap": "leap", "root_delay": "root_delay_s", "root_dispersion": "root_dispersion_s",
               "precision": "precision_s", "server": "server", "measured_at": "measured_at"}


#: A stored measurement's ``selection`` when it does not say: it was written before the field was kept, by a
#: round that published one server's sample, ``best`` (a combination says ``combine`` by its ``delay``:
#: :data:`COMBINATION_DEFAULTS`).  A fact about records already written, not a configuration default: the
#: configuration's (:class:`workers.config.NtpSettings`) is always written out, whatever it is.
UNSAID_SELECTION: str = Selection.BEST.value


@dataclass(frozen=True)
class Latest:
    """A published measurement: the ``latest`` key's value, an ``updates`` message, a record's ``latest``.

    Seconds and Unix seconds (docs/contract.md names each field).
    :meth:`published` builds it from the round's choice, :meth:`to_json`
    gives its one JSON shape (these fields, in this order; ``sample_uncertainty``,
    ``combined`` and ``legs`` only when they say something), and
    :meth:`from_json` reads any stored one back, an older one's missing fields
    taking the defaults docs/contract.md gives.
    """

    node: str
    round_id: str
    offset: float
    uncertainty: float
    sample_uncertainty: float | None  # None: a measurement stored before it was kept
    delay: float
    stratum: int
    leap: int
    root_delay: float
    root_dispersion: float
    precision: float
    server: str
    address: str
    quality: str
    measured_at: float
    published_at: float
    servers_used: int
    servers_total: int
    selection: str
    nts: bool
    #: ``combine`` over more than one server: the servers averaged (``server`` is the primary).
    combined: tuple[str, ...] = ()
    #: Through the hub (:mod:`orchestrator.hub`): the two legs composed.
    legs: Json | None = None

    #: The fields that must be finite numbers: a NaN offset handed to ChronoTick would poison its model.
    FINITE = ("offset", "uncertainty", "delay", "precision", "measured_at", "published_at", "root_delay",
              "root_dispersion")

    @classmethod
    def published(cls, chosen: Mapping[str, Any], *, node: str, round_id: str, quality: str, published_at: float,
                  servers_used: int, servers_total: int, selection: str, legs: Json | None = None) -> Latest:
        """What a round publishes from ``chosen`` (:func:`orchestrator.selection.choose`'s sample or
        combination, through the hub with the legs composed: ``legs``)."""
        taken = {name: chosen[key] for name, key in FROM_CHOSEN.items()}
        if legs is not None:
            # UTC's leap second is announced upstream: the hub's leg carries it to the node (its LAN server,
            # the hub's chronyd, knows of none), end to end.
            taken["leap"] = int(legs["hub"].get("leap") or 0) or taken["leap"]
        combined = chosen.get("combined", [])
        return cls(node=node, round_id=round_id, **taken,
                   sample_uncertainty=chosen.get("sample_uncertainty_s", chosen["uncertainty_s"]),
                   address=f"{chosen['address']}:{chosen['port']}", quality=quality, published_at=published_at,
                   servers_used=servers_used, servers_total=servers_total, selection=selection,
                   nts=bool(chosen.get("nts")), combined=tuple(combined) if len(combined) > 1 else (), legs=legs)

    def to_json(self) -> Json:
        """The published JSON: every field, ``sample_uncertainty``, ``combined`` and ``legs`` when they say
        something."""
        out: Json = {}
        for name in LATEST_KEYS:
            value = getattr(self, name)
            if name == "combined":
                if value:
                    out[name] = list(value)
            elif value is not None or name not in OPTIONAL:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Latest:
        """The one parser of a published measurement, wherever it was read (see the class doc).

        A field added after a value was stored takes its default: ``round_id``
        and ``address`` "", ``leap`` and the root delay and dispersion 0,
        ``servers_used`` and ``servers_total`` 0, ``nts`` false, ``selection``
        :data:`UNSAID_SELECTION`.  Raises ``KeyError`` (a field every
        measurement has is missing), ``TypeError`` or ``ValueError`` (a
        number that is none, or not finite).
        """
        if not isinstance(value, Mapping):
            raise TypeError(f"a measurement is a JSON object, not {type(value).__name__}")
        sample_uncertainty = value.get("sample_uncertainty")
        legs = value.get("legs")
        latest = cls(
            node=value["node"], round_id=value.get("round_id", ""), offset=float(value["offset"]),
            uncertainty=float(value["uncertainty"]),
            sample_uncertainty=None if sample_uncertainty is None else float(sample_uncertainty),
            delay=float(value["delay"]), stratum=int(value["stratum"]), leap=int(value.get("leap", 0)),
            root_delay=float(value.get("root_delay", 0.0)), root_dispersion=float(value.get("root_dispersion", 0.0)),
            precision=float(value["precision"]), server=value["server"], address=value.get("address", ""),
            quality=value["quality"], measured_at=float(value["measured_at"]),
            published_at=float(value["published_at"]), servers_used=int(value.get("servers_used", 0)),
            servers_total=int(value.get("servers_total", 0)), selection=value.get("selection", UNSAID_SELECTION),
            nts=bool(value.get("nts", False)), combined=tuple(value.get("combined", ())),
            legs=dict(legs) if isinstance(legs, Mapping) else None)
        for name in cls.FINITE:
            if not math.isfinite(getattr(latest, name)):
                raise ValueError(f"{name} is not a finite number ({getattr(latest, name)!r})")
        return latest


#: :class:`Latest`'s fields, in the order its JSON has them.
LATEST_KEYS = tuple(f.name for f in fields(Latest))

#: ... those left out of its JSON when they say nothing (``None``; ``combined``: empty).
OPTIONAL = frozenset({"sample_uncertainty", "combined", "legs"})


# -- the round record -----------------------------------------------------------------------------------------


def round_record(meta: RoundMeta, *, quality: str, finished_at: float, picked: Mapping[str, Any],
                 candidate: Mapping[str, Any] | None, verdict: Mapping[str, Any] | None, window_length: int,
                 latest: Latest | None) -> Json:
    """A round's record: every server's entry (``picked["servers"]``), the agreement, the choice, the verdict
    of the temporal filter and the measurement published (``None``: none).

    ``picked``: the selection (:func:`orchestrator.selection.select`, or the
    early decider's); ``candidate``: the sample or combination it chose (through
    the hub, the legs composed), ``None`` if it chose none; ``verdict``: the
    temporal filter's (:func:`orchestrator.outliers.judge`) over a window of
    ``window_length`` results.  Who closed the round (``closed_by``) is added by
    whoever finishes it (:func:`orchestrator.callback.finish`).
    """
    ntp = meta.ntp
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
        "servers_total": len(meta.servers),
        "servers": picked["servers"],
        "agreement": picked["agreement"],
        "filter": None if verdict is None else {**verdict, "window": window_length},
        "candidate": None if candidate is None else {
            "server": candidate["server"], "offset": candidate["offset_s"], "uncertainty": candidate["uncertainty_s"],
            "measured_at": candidate["measured_at"]},
        "latest": None if latest is None else latest.to_json(),  # through the hub: with its ``legs``
    }


# -- the compact form -----------------------------------------------------------------------------------------


#: Redis keeps a stream entry of up to about 2,000 bytes two to a node: see the module doc.
RECORD_BUDGET_BYTES = 2000

#: A compact server entry's keys: long name -> stored name.
SHORT = {"server": "s", "status": "st", "attempts": "n", "reason": "r", "history": "h", "offset_s": "o",
         "delay_s": "d", "uncertainty_s": "u", "stratum": "k", "samples_taken": "m", "worker": "w", "nts": "a",
         "leap": "l"}
LONG = {short: long for long, short in SHORT.items()}

#: What a sample keeps in a compact record (its time is the round's).
SAMPLE_FIELDS = ("offset_s", "delay_s", "uncertainty_s", "stratum", "samples_taken")

#: The published measurement's fields its round record says: field -> the record's key.
FROM_RECORD = {"node": "node", "round_id": "round_id", "quality": "quality", "published_at": "finished_at",
               "servers_used": "servers_used", "servers_total": "servers_total"}

#: ... and, for one server's measurement, its chosen server's entry: field -> the sample's key (and ``server``,
#: the entry's server).  A combination keeps these of its own (:data:`COMBINATION_FIELDS`).
FROM_SAMPLE = {"delay": "delay_s", "stratum": "stratum", "sample_uncertainty": "uncertainty_s"}

#: What the published measurement keeps, exactly: every field of :class:`Latest` that its record and chosen
#: server's entry do not already say (:data:`FROM_RECORD`, :data:`FROM_SAMPLE`; ``combined``: the entries
#: whose status is ``chosen`` or ``combined``), so a measurement read through the history has every field
#: ``latest`` has, with the same value (issue #24: "the reader loses nothing").  ``leap`` and ``nts`` are kept
#: only when they are not 0 and false (:data:`LATEST_DEFAULTS`; absent: those, as in an entry written before
#: ``leap`` was kept).
LATEST_FIELDS = tuple(name for name in LATEST_KEYS
                      if name not in FROM_RECORD and name not in FROM_SAMPLE and name not in ("server", "combined"))

#: ... and for a combination (``selection: combine`` over more than one server), what is the
#: combination's own rather than its primary server's; the servers combined are the entries
#: whose status is ``chosen`` or ``combined``.  A stored measurement with a ``delay`` is a
#: combination's (records written before ``selection`` was always kept marked it the same way), and
#: its ``selection`` is ``combine`` unless it says otherwise (:data:`COMBINATION_DEFAULTS`).
COMBINATION_FIELDS = tuple(FROM_SAMPLE)

#: A published measurement's fields left out of a compact record when they have this value.
LATEST_DEFAULTS: dict[str, Any] = {"leap": 0, "nts": False}

#: ... and a combination's.
COMBINATION_DEFAULTS: dict[str, Any] = {"selection": Selection.COMBINE.value}

#: Digits kept (but by the published measurement and its sample): 100 ns for offsets, microseconds for
#: delays, bounds (rounded up) and durations.
OFFSET_DIGITS = 7
US_DIGITS = 6

#: Fields whose value is a bound (a root dispersion is one too): rounded up, never down.
BOUNDS = frozenset({"uncertainty_s", "uncertainty", "sample_uncertainty", "root_dispersion"})


def compact(record: Mapping[str, Any]) -> Json:
    """The stored form of a round record (pure)."""
    kept = ("round_id", "node", "quality", "servers_used", "servers_total")
    out: Json = {key: record[key] for key in kept if key in record}
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
    kept_fields = LATEST_FIELDS + COMBINATION_FIELDS if combination else LATEST_FIELDS
    implied = {**LATEST_DEFAULTS, **COMBINATION_DEFAULTS} if combination else LATEST_DEFAULTS
    out["latest"] = None if latest is None else {  # exactly: the latest key's numbers, bit for bit
        key: latest[key] for key in kept_fields
        if key in latest and not (key in implied and _same_value(latest[key], implied[key]))}
    out["detail"] = COMPACT
    return out


def expand(stored: Json) -> Json:
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
    if stored_latest is not None:
        record["latest"] = _expand_latest(stored_latest, record)
    return record


def _expand_latest(stored: Mapping[str, Any], record: Json) -> Json:
    """A compact record's measurement with what it left to its record and chosen server's entry (see
    :data:`LATEST_FIELDS`)."""
    latest: Json = {name: record.get(key) if key.startswith("servers_") else record[key]
                    for name, key in FROM_RECORD.items()}
    latest.update(LATEST_DEFAULTS)
    chosen = next((s for s in record["servers"] if s["status"] == ServerStatus.CHOSEN), None)
    if chosen is not None:
        sample = chosen.get("sample", {})
        latest["server"] = chosen["server"]
        latest.update({name: sample.get(key) for name, key in FROM_SAMPLE.items()})
    latest.update(stored)
    if "delay" in stored and "combined" not in stored:  # a combination: its servers
        latest["combined"] = sorted(s["server"] for s in record["servers"]
                                    if s["status"] in (ServerStatus.CHOSEN, ServerStatus.COMBINED))
        latest = {**COMBINATION_DEFAULTS, **latest}
    return latest


def late_of(fields: Mapping[Any, Any]) -> tuple[str, dict[str, Json]]:
    """A ``late`` stream entry's round id and its late servers' entries, expanded, by server."""
    said = (expand_server(stored, None) for stored in json.loads(fields["servers"]))
    return str(fields["round"]), {entry["server"]: entry for entry in said}


def with_late(record: Json, said: Mapping[str, Json]) -> Json:
    """``record`` with each ``late`` server's entry replaced by what it said (``said``: server -> entry)."""
    if said:
        record["servers"] = [said.get(s["server"], s) if s["status"] == ServerStatus.LATE else s
                             for s in record["servers"]]
    return record


def compact_server(entry: Mapping[str, Any], shared_worker: str | None, *, exact: bool = False) -> Json:
    """A server's entry as compact records keep it; ``exact``: its sample's numbers unrounded (the published one)."""
    out: Json = {"s": entry["server"], "st": entry["status"]}
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


def expand_server(stored: Mapping[str, Any], shared_worker: str | None) -> Json:
    """A compact server entry in the usual shape (its sample: what :data:`SAMPLE_FIELDS` kept, ``nts``, ``leap``)."""
    long = {LONG.get(key, key): value for key, value in stored.items()}
    entry: Json = {"server": long["server"], "status": long["status"], "attempts": long.get("attempts", 1),
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
