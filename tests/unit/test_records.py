"""Round records (orchestrator/records.py): one builder, compact and small, every count and field survives."""

import json
import random

import pytest

from orchestrator import selection as selection_mod
from orchestrator.callback import build_record
from orchestrator.counting import round_counters
from orchestrator.display import format_round
from orchestrator.outcomes import RoundMeta
from orchestrator.reader import Measurement
from orchestrator.records import (
    FROM_CHOSEN,
    FROM_RECORD,
    FROM_SAMPLE,
    LATEST_FIELDS,
    LATEST_KEYS,
    LONG,
    RECORD_BUDGET_BYTES,
    SAMPLE_FIELDS,
    SHORT,
    Latest,
    compact,
    expand,
)
from workers import config as config_mod

REAL_NAMES = ["time.google.com", "time1.google.com", "time2.google.com", "time3.google.com", "time.cloudflare.com",
              "time.nist.gov", "pool.ntp.org", "0.pool.ntp.org", "1.pool.ntp.org", "time.apple.com"]


def _meta(servers):
    ntp = config_mod.ntp_from_mapping({"servers": servers})
    return RoundMeta(round_id="ares-comp-11-20261130T002642.123Z-abcdef", node="ares-comp-11",
                     dispatched_at=1795998582.1234567, deadline_at=1795998612.0, key_prefix="chronotick",
                     history_length=10000, ntp=ntp)


def _sample(name, rng):
    delay = rng.uniform(0.005, 0.09)
    return {"server": name, "address": f"203.0.113.{rng.randint(1, 254)}", "port": 123,
            "offset_s": rng.uniform(-0.004, 0.004), "delay_s": delay,
            "uncertainty_s": delay / 2 + rng.uniform(0, 0.003),
            "stratum": rng.randint(1, 3), "leap": 0, "precision_s": 2 ** -20, "root_delay_s": rng.uniform(0, 0.01),
            "root_dispersion_s": rng.uniform(0, 0.002), "ref_id": "GPS", "t1_ns": 1795998582123456789,
            "t4_ns": 1795998582146913578, "kernel_rx_timestamp": True, "measured_at": 1795998582.1234567}


def _outcome(name, rng, *, fail_first=0, failed=False, refusals=0):
    reasons = ["timeout", "bogus_origin", "unsynchronised_leap", "socket_error"]
    history = [{"attempt": i + 1, "started_at": 1795998582.0 + 5 * i, "reason": rng.choice(reasons),
                "detail": "no reply within 2 s", "kiss_code": None} for i in range(fail_first)]
    if failed:
        return {"summary": "failed", "status": "failed", "server": name, "reason": history[-1]["reason"],
                "detail": "origin 0x42d64f3f56d88deb is not our transmit 0x42d64f3f0c82d7b1", "kiss_code": None,
                "attempts": len(history), "history": history, "worker": "ares-comp-11@ares-comp-11"}
    sample = _sample(name, rng)
    last = {"attempt": fail_first + 1, "started_at": 1795998582.0, "reason": None}
    if refusals:
        last["refusals"] = [{"reason": "bogus_origin", "detail": "origin ..."}] * refusals
        sample["samples_taken"] = 3 - refusals
    return {"summary": "ok", "status": "ok", "server": name, "sample": sample, "attempts": fail_first + 1,
            "history": history + [last], "worker": "ares-comp-11@ares-comp-11"}


def test_a_ten_server_round_fits_two_to_a_redis_stream_node():
    """Under 2,000 bytes a stream entry costs Redis 2.3 kB; over it, 3.1 kB (bench/redis_memory.py)."""
    rng = random.Random(3)
    for dead in (0, 2, 5):
        outcomes = [_outcome(n, rng) for n in REAL_NAMES[:10 - dead]]
        outcomes += [_outcome(n, rng, fail_first=3, failed=True) for n in REAL_NAMES[10 - dead:]]
        record = build_record(_meta(REAL_NAMES), outcomes, finished_at=1795998582.2234567)
        record["closed_by"] = "callback"
        record["filter"] = {"outlier": False, "reset": False, "predicted_s": 0.0012345678901, "scale_s": 1.23456789e-4,
                            "z": 0.123456789, "window": 20}  # a steady-state round carries the filter's figures
        stored = json.dumps(compact(record), sort_keys=True, separators=(",", ":"))
        assert len(stored) <= RECORD_BUDGET_BYTES == 2000, (dead, len(stored))
        assert len(json.dumps(record)) > 2.5 * len(stored)  # the verbose one is far larger


@pytest.mark.parametrize("selection", ["best", "combine"])
def test_a_ten_server_round_that_publishes_fits_too(selection):
    """The published measurement is kept exactly (its numbers unrounded): 300 rounds that publish one, each of
    ten servers, some retried, some failed after three attempts, with the filter's figures, fit the budget."""
    rng = random.Random(5)
    meta = _meta(REAL_NAMES)
    meta = RoundMeta(**{**meta.__dict__, "ntp": config_mod.ntp_from_mapping({"servers": REAL_NAMES,
                                                                             "selection": selection})})
    published = 0
    for _ in range(300):
        dead = rng.choice([0, 1, 2, 3])
        outcomes = [_outcome(n, rng, fail_first=rng.choice([0, 0, 1])) for n in REAL_NAMES[:10 - dead]]
        for o in outcomes:
            o["sample"]["offset_s"] = rng.uniform(-1e-4, 1e-4)  # they agree: a measurement is published
        outcomes += [_outcome(n, rng, fail_first=3, failed=True) for n in REAL_NAMES[10 - dead:]]
        record = build_record(meta, outcomes, finished_at=1795998582.2234567)
        record["filter"] = {"outlier": False, "reset": False, "predicted_s": 0.0012345678901,
                            "scale_s": 1.23456789e-4, "z": 0.123456789, "window": 20}
        if record["latest"] is None:
            continue
        published += 1
        stored = json.dumps(compact(record), sort_keys=True, separators=(",", ":"))
        assert len(stored) <= RECORD_BUDGET_BYTES, len(stored)
        assert expand(json.loads(stored))["latest"] == record["latest"]
    assert published > 50  # (the rest starve: their delays are over the relaxed thresholds)


def test_every_count_survives_compaction_on_random_rounds():
    rng = random.Random(11)
    for _ in range(1000):
        names = rng.sample(REAL_NAMES, rng.randint(1, 10))
        outcomes = []
        for name in names:
            kind = rng.random()
            if kind < 0.15:
                outcomes.append(_outcome(name, rng, fail_first=rng.randint(1, 3), failed=True))
            else:
                outcomes.append(_outcome(name, rng, fail_first=rng.choice([0, 0, 0, 1, 2]),
                                         refusals=rng.choice([0, 0, 0, 1, 2])))
        if rng.random() < 0.2:  # a server taken by another worker: its entry says so
            outcomes[rng.randrange(len(outcomes))]["worker"] = "ares-comp-12@ares-comp-12"
        record = build_record(_meta(names), outcomes, finished_at=1795998582.3)
        small = expand(json.loads(json.dumps(compact(record))))  # as a reader gets it back from Redis
        assert round_counters(small) == round_counters(record)
        assert small["detail"] == "compact" and small["quality"] == record["quality"]
        assert [(s["status"], s["worker"]) for s in small["servers"]] == \
            [(s["status"], s["worker"]) for s in record["servers"]]
        # Every field of latest, each equal: numbers exactly (issue #24), a combination's own figures too.
        assert small["latest"] == record["latest"]
        for small_entry, entry in zip(small["servers"], record["servers"], strict=True):
            if entry.get("sample"):
                assert small_entry["sample"]["uncertainty_s"] >= entry["sample"]["uncertainty_s"]
                if entry["status"] == "chosen" and record["latest"] and not record["latest"].get("combined"):
                    for key in ("offset_s", "delay_s", "uncertainty_s", "stratum"):  # the sample published
                        assert small_entry["sample"][key] == entry["sample"][key], key
        assert format_round(small)  # a person can still read it


def test_a_verbose_record_is_read_back_as_it_was():
    rng = random.Random(5)
    record = build_record(_meta(REAL_NAMES[:3]), [_outcome(n, rng) for n in REAL_NAMES[:3]], finished_at=1.0)
    assert expand(json.loads(json.dumps(record))) == json.loads(json.dumps(record))


def _published(selection="combine", leap=0):
    rng = random.Random(7)
    outcomes = [_outcome(n, rng) for n in REAL_NAMES[:4]]
    for o in outcomes:  # four servers that agree, so a combination combines them
        o["sample"].update(offset_s=rng.uniform(-1e-4, 1e-4), delay_s=0.01, uncertainty_s=0.006, leap=leap)
    meta = _meta(REAL_NAMES[:4])
    meta = RoundMeta(**{**meta.__dict__, "ntp": config_mod.ntp_from_mapping({"servers": REAL_NAMES[:4],
                                                                             "selection": selection})})
    return build_record(meta, outcomes, finished_at=1795998582.3)


@pytest.mark.parametrize("selection", ["combine", "best"])
def test_the_published_measurement_keeps_every_field_it_had(selection):
    """leap, root delay and dispersion, address, selection: a history reader once got 0, 0, 0, "" and "best"."""
    record = _published(selection, leap=1)
    full = record["latest"]
    assert (full["leap"], full["selection"]) == (1, selection) and full["address"] and full["root_delay"] > 0
    assert ("combined" in full) == (selection == "combine")
    kept = expand(json.loads(json.dumps(compact(record))))["latest"]
    assert set(kept) == set(full)
    assert (kept["leap"], kept["address"], kept["selection"]) == (1, full["address"], selection)
    assert kept == full  # every value too, each number exactly (they were rounded: 100 ns, 1 us)


def test_a_leap_of_zero_is_left_out_and_read_back():
    record = _published(leap=0)
    stored = compact(record)
    assert "leap" not in stored["latest"] and "nts" not in stored["latest"]  # the usual value costs nothing
    assert "selection" not in stored["latest"]  # a combination's is combine
    latest = expand(json.loads(json.dumps(stored)))["latest"]
    assert (latest["leap"], latest["nts"], latest["selection"]) == (0, False, "combine")
    assert latest == record["latest"]


@pytest.mark.parametrize("selection", ["combine", "best"])
def test_what_is_not_the_default_is_kept(selection):
    """nts true, a best measurement's selection: stored, and read back."""
    record = _published(selection)
    record["latest"]["nts"] = True
    stored = compact(record)
    assert stored["latest"]["nts"] is True and ("selection" in stored["latest"]) == (selection == "best")
    assert expand(json.loads(json.dumps(stored)))["latest"] == record["latest"]


def test_an_entry_written_before_the_fields_were_kept_still_reads():
    """An older compact record (no leap, root delay, dispersion, address; selection only for a combination)."""
    for selection in ("combine", "best"):
        stored = json.loads(json.dumps(compact(_published(selection))))
        for key in ("leap", "root_delay", "root_dispersion", "address"):
            stored["latest"].pop(key, None)
        if selection == "best":
            del stored["latest"]["selection"]
        stored["latest"].pop("sample_uncertainty", None)
        latest = expand(stored)["latest"]
        assert latest["leap"] == 0 and "address" not in latest  # the reader's defaults fill in the rest
        assert ("combined" in latest) == (selection == "combine")  # a combination still known by its delay


BAD = [("[]", "an array, not an object"), ("null", "null, not an object"), ("42", "a number, not an object"),
       ("{not json", "not JSON"), ('{"detail": "compact"}', "cannot be read"),
       ('{"latest": {"offset": 1.0}, "detail": "verbose"}', "no round_id")]


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_an_entry_that_is_no_round_record_is_named_with_why(raw, reason):
    from orchestrator.store import BadRecord, record_of, records_of

    good = json.dumps(compact(_published()))
    with pytest.raises(BadRecord, match=reason) as raised:
        record_of(("1700000000000-1", {"record": raw}))
    assert raised.value.entry_id == "1700000000000-1" and reason in raised.value.reason
    skipped = []
    entries = [("1-0", {"record": good}), ("2-0", {"record": raw}), ("3-0", {"record": good})]
    assert len(records_of(entries, skip=lambda stream, bad: skipped.append(bad.entry_id))) == 2
    assert skipped == ["2-0"]


def test_an_entry_without_a_record_field_is_named():
    from orchestrator.store import BadRecord, record_of

    with pytest.raises(BadRecord, match="no 'record' field"):
        record_of(("5-0", {"other": "x"}))


# -- one record, one builder (issue #27) ------------------------------------------------------------------------

HUB_LEG = {"node": "head", "max_drift_ppm": 15.0, "stale_after_s": 360.0}


def _varied_round(rng: random.Random, i: int) -> dict:
    """A round as the callback builds it, of any kind a node publishes: best or combine, NTS, leap indicators,
    servers failed, outvoted or set apart, a node through the hub, decided early with servers late, closed at
    its deadline with servers unreported, after a filter window."""
    names = rng.sample(REAL_NAMES, rng.randint(1, 8))
    selection = rng.choice(["best", "combine"])
    outcomes = []
    for name in names:
        if rng.random() < 0.15:
            outcomes.append(_outcome(name, rng, fail_first=rng.randint(1, 3), failed=True))
            continue
        outcome = _outcome(name, rng, fail_first=rng.choice([0, 0, 1]), refusals=rng.choice([0, 0, 1]))
        delay = rng.uniform(0.001, 0.05)
        outcome["sample"].update(offset_s=rng.uniform(-1e-4, 1e-4) if rng.random() < 0.85 else rng.uniform(-1, 1),
                                 leap=rng.choice([0, 0, 1, 2]), nts=rng.random() < 0.3, delay_s=delay,
                                 uncertainty_s=delay / 2 + rng.uniform(0, 0.002))
        if rng.random() < 0.05:  # a reply set apart before the vote (near a leap second)
            outcome.update(status="failed", reason="other_timescale", detail="the other timescale")
        outcomes.append(outcome)
    ntp = config_mod.ntp_from_mapping({"servers": names, "selection": selection,
                                       "auth_select": rng.choice(["mix", "mix", "require", "prefer"])})
    through_hub = rng.random() < 0.3
    meta = RoundMeta(round_id=f"n1-{i}", node="n1", dispatched_at=1795998582.1, deadline_at=1795998612.0,
                     key_prefix="chronotick", history_length=100, ntp=ntp, hub=HUB_LEG if through_hub else None)
    hub_latest = {"node": "head", "round_id": "head-1", "offset": rng.uniform(-0.3, 0.3), "uncertainty": 0.002,
                  "measured_at": 1795998500.0, "published_at": 1795998500.5, "leap": rng.choice([0, 1])}
    kwargs: dict = {}
    kind = rng.random()
    if kind < 0.2 and len(outcomes) > 1:  # decided with the first k outcomes in hand; the rest late
        k = rng.randint(1, len(outcomes) - 1)
        late, outcomes = tuple(o["server"] for o in outcomes[k:]), outcomes[:k]
        kwargs = {"picked": selection_mod.select(outcomes, meta.strict, enable_fallback=True, method=selection,
                                                 auth_select=ntp.auth_select), "late": late}
    elif kind < 0.35:  # closed at its deadline with one server unreported
        outcomes = outcomes[1:]
        kwargs = {"unreported_unknown": True}
    window = [[1795998000.0 + j, rng.uniform(-1e-4, 1e-4)] for j in range(rng.choice([0, 5, 20]))]
    record = build_record(meta, outcomes, finished_at=1795998582.3, window=window,
                          hub_latest=hub_latest if through_hub else None, **kwargs)
    record["closed_by"] = "early" if "late" in kwargs else rng.choice(["callback", "deadline"])
    return record


def _stored(record: dict, detail: str) -> dict:
    """``record`` as a reader gets it back from the history stream (:func:`orchestrator.store.record_of`)."""
    from orchestrator.store import record_of

    stored = record if detail == "verbose" else compact(record)
    return record_of(("1795998582300-0", {"record": json.dumps(stored, sort_keys=True, separators=(",", ":"))}))


@pytest.mark.parametrize("detail", ["compact", "verbose"])
def test_every_field_of_latest_and_the_chosen_entry_come_back_from_the_history(detail):
    """Many seeded rounds of every kind: the history's ``latest`` is the ``latest`` key's, every field exact,
    the chosen sample's numbers too, and the reader's one parser makes one measurement of both."""
    rng = random.Random(27)
    kinds = {"published": 0, "combined": 0, "legs": 0, "nts": 0, "leap": 0, "late": 0}
    for i in range(1500):
        record = _varied_round(rng, i)
        latest_key = json.loads(json.dumps(record["latest"], sort_keys=True))  # as the latest key keeps it
        back = _stored(record, detail)
        assert back["latest"] == latest_key, i
        kinds["late"] += any(s["status"] == "late" for s in back["servers"])
        if latest_key is None:
            continue
        kinds["published"] += 1
        for key in ("combined", "legs", "nts", "leap"):
            kinds[key] += bool(latest_key.get(key))
        assert set(back["latest"]) == set(latest_key)
        assert all(type(back["latest"][k]) is type(v) for k, v in latest_key.items()), i  # 0 is no 0.0
        from_key = Measurement.from_latest(latest_key)
        from_history = Measurement.from_latest({"round_id": back["round_id"], **back["latest"]})
        assert from_history == from_key and from_history.raw == from_key.raw
        assert Latest.from_json(back["latest"]) == Latest.from_json(latest_key)
        chosen = [(s, c) for s, c in zip(back["servers"], record["servers"], strict=True) if c["status"] == "chosen"]
        for entry, built in chosen:
            assert entry["server"] == built["server"] == latest_key["server"]
            if "combined" not in latest_key:  # one server's measurement: its sample's numbers exact
                for key in SAMPLE_FIELDS:
                    assert entry["sample"].get(key) == built["sample"].get(key), (i, key)
    assert min(kinds.values()) >= 20, kinds  # each kind of round was there to be checked


def test_the_builders_json_reads_back_through_the_one_parser():
    rng = random.Random(3)
    for i in range(300):
        latest = _varied_round(rng, i)["latest"]
        if latest is not None:
            parsed = Latest.from_json(latest)
            assert parsed.to_json() == latest and list(parsed.to_json()) == list(latest)


def test_every_field_of_the_measurement_is_kept_or_said_by_its_record():
    """No field of :class:`Latest` can be added without the compact form keeping it (the bug of issue #24)."""
    assert "address" in LATEST_FIELDS and "leap" in LATEST_FIELDS and "root_delay" in LATEST_FIELDS
    said = set(LATEST_FIELDS) | set(FROM_RECORD) | set(FROM_SAMPLE) | {"server", "combined"}
    assert said == set(LATEST_KEYS) and not set(LATEST_FIELDS) & (set(FROM_RECORD) | set(FROM_SAMPLE))


def test_a_sample_is_read_by_the_names_its_contract_gives():
    """The sample's names the record module reads are :class:`SampleDict`'s, and the NTP client's sample has
    exactly those (``offset_s`` is published as ``offset``, stored compact as ``o``: one table each)."""
    from typing import NotRequired, get_origin, get_type_hints

    from workers.contracts import SampleDict
    from workers.ntp.client import Sample

    hints = get_type_hints(SampleDict, include_extras=True)
    declared = set(hints)
    always = {key for key, hint in hints.items() if get_origin(hint) is not NotRequired}  # advanced mode's: not
    read = set(FROM_CHOSEN.values()) | set(FROM_SAMPLE.values()) | set(SAMPLE_FIELDS) | {"address", "port", "nts"}
    assert read <= declared, read - declared
    made = Sample(server="s", address="192.0.2.1", port=123, offset_s=0.001, delay_s=0.01, uncertainty_s=0.006,
                  stratum=2, leap=0, precision_s=2 ** -20, root_delay_s=0.0, root_dispersion_s=0.0, ref_id="GPS",
                  t1_ns=1, t4_ns=3, kernel_rx_timestamp=True).as_dict()
    assert set(made) == always
    assert {LONG[SHORT[key]] for key in SAMPLE_FIELDS} == set(SAMPLE_FIELDS)


def test_an_old_measurement_takes_the_declared_defaults():
    """Fields added after a value was stored: the contract's defaults; ``selection``, ``best`` -- such a value was
    written before the field was kept, by a round that published one server's sample, whatever the configuration
    says today."""
    from workers.config import NtpSettings

    old = {"node": "n1", "offset": 0.001, "uncertainty": 0.002, "delay": 0.01, "stratum": 2, "precision": 1e-6,
           "server": "a", "quality": "strict", "measured_at": 1.0, "published_at": 2.0}
    latest = Latest.from_json(old)
    assert (latest.round_id, latest.address, latest.leap, latest.root_delay, latest.nts) == ("", "", 0, 0.0, False)
    assert latest.selection == "best" != NtpSettings.selection and latest.sample_uncertainty is None
    assert "sample_uncertainty" not in latest.to_json() and "combined" not in latest.to_json()
    with pytest.raises(ValueError, match="delay is not a finite number"):
        Latest.from_json({**old, "delay": float("inf")})
    for not_one in (None, [], "x"):  # an ``updates`` message of ``null``: refused as no measurement, by name
        with pytest.raises(TypeError, match="a measurement is a JSON object"):
            Latest.from_json(not_one)  # type: ignore[arg-type]
