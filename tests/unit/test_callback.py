"""orchestrator.callback: the worker's early decider, finishing a round once, a round closed with servers
that never reported, the round metadata's parse cache and the one-line summaries -- with the store replaced
by one in memory (no Redis, no worker).

The round record itself: tests/unit/test_records.py (its builder) and test_hub.py (the hub's leg).
"""

from __future__ import annotations

import random
import re

import pytest

from orchestrator import callback, early, selection
from orchestrator.outcomes import ClosedBy, Quality, RoundMeta
from workers import config as config_mod
from workers import inflight

from .samples import failed, ok

SEED = 20270304
SERVERS = [f"10.0.0.{i}" for i in range(1, 11)]


def _meta(servers=SERVERS[:4], *, round_id="n1-r1", **ntp) -> RoundMeta:
    return RoundMeta(round_id=round_id, node="n1", dispatched_at=1000.0, deadline_at=1030.0, key_prefix="t",
                     history_length=100, ntp=config_mod.ntp_from_mapping({"servers": list(servers), **ntp}))


class MemoryStore:
    """What :func:`callback.finish` asks of :class:`orchestrator.store.Store`: the claim (first caller only),
    the node's filter window, and the hub node's ``latest``."""

    def __init__(self, *, hub_latest=None):
        self.claimed: set[tuple[str, str]] = set()
        self.recorded: list[dict] = []
        self.hub_latest = hub_latest
        self.asked_latest: list[str] = []

    def latest(self, node):
        self.asked_latest.append(node)
        if isinstance(self.hub_latest, Exception):
            raise self.hub_latest
        return self.hub_latest

    def record_round(self, node, round_id, build, **_):
        if (node, round_id) in self.claimed:
            return None
        self.claimed.add((node, round_id))
        record = build([], 0, 1010.0)
        self.recorded.append(record)
        return record


# -- summaries ----------------------------------------------------------------------------------------------

def test_a_rounds_summary_says_its_quality_and_what_it_published_on_random_rounds():
    rng = random.Random(SEED)
    kinds = set()
    for case in range(200):
        n = rng.randint(1, 6)
        outcomes = [ok(s, delay=rng.uniform(0.001, 0.05), unc=rng.uniform(0.001, 0.03),
                       offset=rng.uniform(-0.002, 0.002)) if rng.random() < 0.7 else failed(s)
                    for s in SERVERS[:n]]
        record = callback.build_record(_meta(SERVERS[:n]), outcomes, finished_at=1010.0)
        text = callback.summarise_round(record)
        used = f"{record['servers_used']}/{record['servers_total']} servers"
        latest = record["latest"]
        kinds.add(record["quality"])
        if latest is None:
            assert text == f"{record['quality']}: nothing published, {used}", case
            continue
        found = re.fullmatch(r"(\w+): (\S+) ([+-]\d+\.\d{3}) ms ±(\d+\.\d{3}) ms, (\d+/\d+ servers)", text)
        assert found, (case, text)
        assert (found[1], found[2], found[5]) == (record["quality"], latest["server"], used), case
        assert float(found[3]) == pytest.approx(latest["offset"] * 1e3, abs=5e-4)
        assert float(found[4]) == pytest.approx(latest["uncertainty"] * 1e3, abs=5e-4)
    assert {Quality.STRICT, Quality.STARVATION} <= kinds, kinds


def test_the_late_servers_are_summarised_each_with_its_answer():
    late = [ok("a", delay=0.01, unc=0.005, offset=0.0012), failed("b", reason="timeout")]
    assert callback.summarise_late(late) == "late, after the round was published: a ok +1.200 ms; b failed: timeout"


def test_how_a_round_was_closed_is_said_in_the_accepted_line():
    assert callback._how_closed(ClosedBy.CALLBACK, ()) == ""
    assert callback._how_closed(ClosedBy.DEADLINE, ()) == ", closed at its deadline"
    assert callback._how_closed(ClosedBy.EARLY, ("a", "b")) == ", decided with 2 late"


# -- the metadata's parse cache ------------------------------------------------------------------------------

def test_round_metadata_is_parsed_as_from_dict_and_each_ntp_section_once(monkeypatch):
    monkeypatch.setattr(callback, "_NTP_PARSED", {})
    rng = random.Random(SEED + 1)
    sections = [_meta(SERVERS[:k], selection=s).as_dict() for k in (2, 3) for s in ("best", "combine")]
    seen: dict[str, object] = {}
    for i in range(40):
        data = dict(rng.choice(sections), round_id=f"r{i}", dispatched_at=float(i))
        meta = callback.round_meta_of(data)
        assert meta == RoundMeta.from_dict(data), i
        key = repr(data["ntp"])
        assert seen.setdefault(key, meta.ntp) is meta.ntp, "the same section, the same parsed settings"
    assert len(callback._NTP_PARSED) == len(sections)


def test_the_parse_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(callback, "_NTP_PARSED", {})
    monkeypatch.setattr(callback, "_NTP_PARSED_MAX", 3)
    for k in range(2, 9):
        callback.round_meta_of(_meta(SERVERS[:k]).as_dict())
        assert 1 <= len(callback._NTP_PARSED) <= 3


# -- finishing once ----------------------------------------------------------------------------------------

def test_a_round_is_finished_once_and_says_who_closed_it():
    store = MemoryStore()
    meta = _meta()
    outcomes = [ok(s, delay=0.01, unc=0.006) for s in meta.servers]
    record = callback.finish(meta, outcomes, store, closed_by=ClosedBy.DEADLINE)
    assert record is not None and record["closed_by"] == ClosedBy.DEADLINE
    assert record == store.recorded[0] and record["latest"]["server"] in meta.servers
    assert callback.finish(meta, outcomes, store, closed_by=ClosedBy.CALLBACK) is None, "claimed already"
    assert store.asked_latest == [], "no hub leg to read"


def test_a_node_measured_through_the_hub_reads_the_hub_nodes_latest_and_survives_a_bad_one():
    meta = _meta()
    meta = RoundMeta(**{**meta.__dict__, "hub": {"node": "head", "max_drift_ppm": 50.0, "stale_after_s": 360.0}})
    store = MemoryStore(hub_latest=ValueError("not JSON"))
    record = callback.finish(meta, [ok(s, delay=0.01, unc=0.006) for s in meta.servers], store,
                             closed_by=ClosedBy.CALLBACK)
    assert store.asked_latest == ["head"]
    assert record["quality"] == Quality.OUTAGE and record["latest"] is None, "no usable hub leg: nothing published"


# -- a round closed at its deadline with servers that never reported ---------------------------------------

def test_servers_that_never_reported_are_unknown_votes_not_failures():
    """One quick answer, three servers silent: taken as failed, the one would be a majority of one."""
    meta = _meta()
    lone = [ok(meta.servers[0], delay=0.01, unc=0.006, offset=0.5)]
    closed = callback.build_record(meta, lone, finished_at=1031.0, unreported_unknown=True)
    assert closed["latest"] is None and closed["quality"] == Quality.OUTAGE
    assert "never reported" in closed["agreement"]["undecided"]
    assert all(s["status"] != "chosen" for s in closed["servers"])
    as_failed = callback.build_record(meta, lone, finished_at=1031.0)
    assert as_failed["latest"] is not None, "the callback's view: the others failed"


def test_a_round_the_unreported_could_not_change_is_published_at_its_deadline():
    meta = _meta()
    agreeing = [ok(s, delay=0.002, unc=0.001, offset=0.001) for s in meta.servers[:3]]
    record = callback.build_record(meta, agreeing, finished_at=1031.0, unreported_unknown=True)
    assert record["latest"] is not None and record["quality"] == Quality.STRICT
    assert [s["reason"] for s in record["servers"] if s["server"] == meta.servers[3]] == ["no_result"]
    # Wider answers, which the silent server could still have moved past the gate: held, an outage.
    wide = [ok(s, delay=0.012, unc=0.006, offset=0.001) for s in meta.servers[:3]]
    held = callback.build_record(meta, wide, finished_at=1031.0, unreported_unknown=True)
    assert held["latest"] is None and held["quality"] == Quality.OUTAGE
    assert "could have changed the result" in held["agreement"]["undecided"]


def test_with_no_answer_in_hand_a_deadline_round_is_an_outage():
    meta = _meta()
    record = callback.build_record(meta, [], finished_at=1031.0, unreported_unknown=True)
    assert record["latest"] is None and record["quality"] == Quality.OUTAGE


# -- the worker's early decider ------------------------------------------------------------------------------

def _view(meta: RoundMeta, outcomes, *, bounds=None, retrying=(), unbounded=()) -> inflight.RoundView:
    context = {"meta": meta, "servers": meta.servers, "nts": {s.name: s.nts for s in meta.ntp.servers},
               "strict": meta.strict}
    return inflight.RoundView(key_prefix="t", node=meta.node, round_id=meta.round_id, outcomes=outcomes,
                              bounds=bounds or {}, context=context, retrying=frozenset(retrying),
                              unbounded=frozenset(unbounded))


def test_the_decider_on_random_rounds_waits_publishes_or_names_the_bound_as_its_rule_says(monkeypatch):
    """The oracle is the rule written out: nothing pending, the callback publishes; too few votes to outvote the
    rest, wait for (pending - answered + 1) // 2 more; else the decider's word, a bound only if every
    pending server's bound can grow."""
    rng = random.Random(SEED + 2)
    store = MemoryStore()
    monkeypatch.setattr(callback, "_store", lambda prefix: store)
    asked: list = []

    def decide(outcomes, outstanding, **kwargs):
        asked.append((outcomes, outstanding, kwargs))
        return answer

    monkeypatch.setattr(early, "decide", decide)
    seen: dict[str, int] = {}
    for case in range(400):
        n = rng.randint(2, 8)
        meta = _meta(SERVERS[:n], round_id=f"r{case}", publish_early=rng.random() < 0.9)
        reported = rng.sample(meta.servers, rng.randint(0, n))
        outcomes = [ok(s, delay=0.01, unc=0.006) if rng.random() < 0.7 else failed(s) for s in reported]
        pending = [s for s in meta.servers if s not in reported]
        bounds = {s: rng.uniform(0.0, 0.1) for s in pending if rng.random() < 0.6}
        retrying = {s for s in pending if s not in bounds and rng.random() < 0.5}
        unbounded = {s for s in pending if rng.random() < 0.2}
        picked = selection.select(outcomes, meta.strict, enable_fallback=True, method=meta.ntp.selection)
        answer = rng.choice([early.Decision(False, "held", needed_uncertainty_s=None),
                             early.Decision(False, "held", needed_uncertainty_s=rng.uniform(0.001, 0.1)),
                             early.Decision(True, "decided", picked=picked, late=tuple(pending))])
        asked.clear()
        verdict = callback.decide_early(_view(meta, outcomes, bounds=bounds, retrying=retrying, unbounded=unbounded))
        answered = sum(1 for o in outcomes if o["status"] == "ok")
        if not pending:
            want, kind = inflight.Verdict(False), "all in: the callback's"
        elif not meta.ntp.publish_early:
            want, kind = inflight.Verdict(False, wait_for_outcomes=len(pending) + 1), "never early"
        elif answered < len(pending):
            want, kind = inflight.Verdict(False, wait_for_outcomes=(len(pending) - answered + 1) // 2), "too few"
        elif answer.publish:
            want, kind = inflight.Verdict(True), "published"
        elif answer.needed_uncertainty_s is None:
            want, kind = inflight.Verdict(False, wait_for_outcomes=1), "only outcomes"
        elif all(s in bounds or s in retrying for s in pending):
            want, kind = inflight.Verdict(False, answer.needed_uncertainty_s), "a bound"
        else:
            want, kind = inflight.Verdict(False), "a bound not growing"
        assert verdict == want, (case, kind)
        seen[kind] = seen.get(kind, 0) + 1
        if kind in ("published", "only outcomes", "a bound", "a bound not growing"):
            ((given, outstanding, kwargs),) = asked
            assert given == outcomes and kwargs["method"] == meta.ntp.selection
            assert [(o.server, o.min_uncertainty_s, o.retrying) for o in outstanding] == [
                (s, bounds.get(s, 0.0), s in retrying or s in unbounded) for s in pending], case
        else:
            assert asked == [], (case, kind)
        if kind == "published":
            assert store.recorded[-1]["round_id"] == meta.round_id
            assert store.recorded[-1]["closed_by"] == ClosedBy.EARLY
            assert {s["server"] for s in store.recorded[-1]["servers"] if s["status"] == "late"} == set(pending)
    assert len(seen) == 7 and min(seen.values()) >= 5, seen


def test_a_decided_round_publishes_what_the_decider_picked(monkeypatch):
    store = MemoryStore()
    monkeypatch.setattr(callback, "_store", lambda prefix: store)
    meta = _meta(SERVERS[:5])
    outcomes = [ok(s, delay=0.01, unc=0.006, offset=0.001) for s in meta.servers[:4]]
    verdict = callback.decide_early(_view(meta, outcomes, bounds={meta.servers[4]: 0.5}))
    assert verdict == inflight.Verdict(True)
    (record,) = store.recorded
    assert record["closed_by"] == ClosedBy.EARLY and record["latest"] is not None
    assert [s["status"] for s in record["servers"] if s["server"] == meta.servers[4]] == ["late"]
    assert callback.decide_early(_view(meta, outcomes, bounds={meta.servers[4]: 0.5})) == inflight.Verdict(True), (
        "asked again, it was published already: still published, nothing recorded twice")
    assert len(store.recorded) == 1
