"""Compact round records (orchestrator/records.py): small, and every count survives."""

import json
import random

import pytest

from orchestrator.callback import build_record
from orchestrator.counting import round_counters
from orchestrator.display import format_round
from orchestrator.outcomes import RoundMeta
from orchestrator.records import RECORD_BUDGET_BYTES, compact, expand
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
        record_of((b"1700000000000-1", {b"record": raw.encode()}))
    assert raised.value.entry_id == "1700000000000-1" and reason in raised.value.reason
    skipped = []
    entries = [(b"1-0", {b"record": good}), (b"2-0", {b"record": raw}), (b"3-0", {"record": good})]
    assert len(records_of(entries, skip=lambda stream, bad: skipped.append(bad.entry_id))) == 2
    assert skipped == ["2-0"]


def test_an_entry_without_a_record_field_is_named():
    from orchestrator.store import BadRecord, record_of

    with pytest.raises(BadRecord, match="no 'record' field"):
        record_of(("5-0", {"other": "x"}))
