"""orchestrator.store, without a Redis: what a round's publication queues (read from a recording pipeline),
the claim's states, each server's expected delay, which entries say nothing of reach, reading history entries
(bad ones named and skipped, once each), and paging the newest records past bad entries.

The transactions themselves -- claims, WATCH, MULTI/EXEC against a live Redis -- run in
tests/integration (test_pipeline.py, test_finish.py, test_early.py).
"""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from orchestrator import records, store
from orchestrator.callback import build_record
from orchestrator.counting import duration_fields, round_counters
from orchestrator.outcomes import RoundMeta
from orchestrator.store import (
    COMPLETE,
    PUBLISHED,
    UNANSWERED_DELAY_S,
    BadRecord,
    Store,
    brief_result,
    expected_delays,
    record_of,
    records_of,
)
from workers import config as config_mod
from workers.contracts import Reason

from .samples import failed, ok

SEED = 20270306
SERVERS = [f"10.0.0.{i}" for i in range(1, 7)]


class RecordingPipe:
    """A pipeline that only writes down what is queued on it: ``(command, args, kwargs)``."""

    def __init__(self):
        self.queued: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, command):
        return lambda *args, **kwargs: self.queued.append((command, args, kwargs))

    def named(self, command: str, key: str | None = None) -> list[tuple[tuple, dict]]:
        return [(a, k) for c, a, k in self.queued if c == command and (key is None or a[0] == key)]


def _random_record(rng: random.Random, i: int) -> dict:
    n = rng.randint(1, len(SERVERS))
    ntp = config_mod.ntp_from_mapping({"servers": SERVERS[:n], "selection": rng.choice(["best", "combine"])})
    meta = RoundMeta(round_id=f"n1-r{i}", node="n1", dispatched_at=1.7e9 + i, deadline_at=1.7e9 + i + 30,
                     key_prefix="t", history_length=100, ntp=ntp)
    outcomes = [ok(s, delay=rng.uniform(0.001, 0.05), unc=rng.uniform(0.001, 0.03), offset=rng.uniform(-1e-3, 1e-3))
                if rng.random() < 0.7 else failed(s, reason=rng.choice(["timeout", "no_result"]))
                for s in SERVERS[:n]]
    record = build_record(meta, outcomes, finished_at=1.7e9 + i + rng.uniform(0.01, 40.0))
    record["closed_by"] = "callback"
    if record["latest"] is not None:
        record["filter"] = dict(record["filter"], reset=rng.random() < 0.3)
    elif rng.random() < 0.3:  # the temporal filter held the candidate back
        record["filter"] = dict(record["filter"] or {"reset": False}, outlier=True)
    return record


def test_a_rounds_publication_queues_its_whole_contract_on_random_rounds():
    """The oracle is docs/contract.md's list, written out per command."""
    rng = random.Random(SEED)
    the_store = Store(TextClient(), prefix="t")
    keys = the_store.keys
    seen = {"published": 0, "starved": 0, "reset": 0, "outlier": 0, "left open": 0}
    for i in range(150):
        record = _random_record(rng, i)
        complete, detail = rng.random() < 0.8, rng.choice([records.COMPACT, records.VERBOSE])
        hours, length, window = rng.choice([1.0, 24.0, 1e6]), rng.randint(10, 1000), rng.randint(5, 50)
        pipe = RecordingPipe()
        the_store._queue_publish(pipe, record, history_length=length, window_size=window, history_hours=hours,
                                 detail=detail, complete=complete)
        latest = record["latest"]
        verdict = record.get("filter") or {}
        if latest is not None:
            payload = json.dumps(latest, sort_keys=True)
            assert pipe.named("set") == [((keys.latest("n1"), payload), {})], i
            assert pipe.named("publish") == [((keys.updates("n1"), payload), {})], i
            resets = pipe.named("delete", keys.filter_window("n1"))
            assert len(resets) == (1 if verdict.get("reset") else 0), i
            assert pipe.named("rpush") == [((keys.filter_window("n1"),
                                             json.dumps([latest["measured_at"], latest["offset"]])), {})], i
            assert pipe.named("ltrim") == [((keys.filter_window("n1"), -window, -1), {})], i
            assert pipe.named("hset", keys.filter_state("n1")) == [
                ((keys.filter_state("n1"), "consecutive_outliers", 0), {})], i
            seen["published"] += 1
            seen["reset"] += bool(verdict.get("reset"))
        else:  # starvation: the previous latest stays, with its own time
            assert pipe.named("set") == pipe.named("publish") == pipe.named("rpush") == [], i
            outliers = pipe.named("hincrby", keys.filter_state("n1"))
            assert outliers == ([((keys.filter_state("n1"), "consecutive_outliers", 1), {})]
                                if verdict.get("outlier") else []), i
            seen["starved"] += 1
            seen["outlier"] += bool(verdict.get("outlier"))
        ((history_args, history_kwargs),) = pipe.named("xadd")
        assert history_args[0] == keys.history("n1")
        assert history_kwargs["minid"] == max(0, int((record["finished_at"] - hours * 3600) * 1000))
        assert pipe.named("xtrim") == [((keys.history("n1"),), {"maxlen": length, "approximate": False})]
        stored = json.loads(history_args[1]["record"])
        assert stored.get("detail") == (records.COMPACT if detail == records.COMPACT else None), i
        kept = records.compact(record) if detail == records.COMPACT else record
        assert record_of(("1-0", history_args[1])) == records.expand(json.loads(json.dumps(kept))), i
        assert pipe.named("sadd") == [((keys.nodes(), "n1"), {})]
        closed = [pipe.named("hdel", keys.open_rounds("n1")),
                  pipe.named("delete", keys.outcomes("n1", record["round_id"]))]
        assert closed == ([[((keys.open_rounds("n1"), record["round_id"]), {})],
                           [((keys.outcomes("n1", record["round_id"]),), {})]] if complete else [[], []]), i
        seen["left open"] += not complete
        assert pipe.named("hset", keys.server_delay("n1")) == [
            ((keys.server_delay("n1"),), {"mapping": expected_delays(record)})], i
        counted = {a[1]: a[2] for a, _ in pipe.named("hincrby", keys.stats("n1"))}
        assert counted == round_counters(record), i
        histogram = [a[1] for a, _ in pipe.named("hincrby", keys.round_duration("n1"))]
        assert histogram == duration_fields(record["duration_s"]), i
        assert pipe.named("hincrbyfloat") == [((keys.round_duration("n1"), "sum", record["duration_s"]), {})]
    assert min(seen.values()) >= 5, seen


def test_the_history_is_capped_by_age_on_redis_clock_and_never_below_id_zero():
    pipe = RecordingPipe()
    store._queue_capped_add(pipe, "s", {"record": "{}"}, now=7200.5, hours=1.0, length=10)
    store._queue_capped_add(pipe, "s", {"record": "{}"}, now=10.0, hours=1.0, length=10)
    assert [k["minid"] for _, k in pipe.named("xadd")] == [3_600_500, 0]
    assert all(k["approximate"] is False for _, k in pipe.named("xadd") + pipe.named("xtrim"))


@pytest.mark.parametrize(("raw", "state"), [
    (None, {}), ("", {}),
    ("1", {"state": COMPLETE}),  # a claim from before rounds could be published early
    ("not json", {"state": COMPLETE}),
    (json.dumps({"state": COMPLETE}), {"state": COMPLETE}),
    (json.dumps({"state": PUBLISHED, "late": ["a"], "result": {"quality": "strict"}}),
     {"state": PUBLISHED, "late": ["a"], "result": {"quality": "strict"}}),
])
def test_a_claim_reads_as_its_state(raw, state):
    assert store._claim_state(raw) == state


def test_the_brief_result_of_random_rounds_is_what_they_published():
    rng = random.Random(SEED + 1)
    for i in range(100):
        record = _random_record(rng, i)
        latest = record["latest"] or {}
        assert brief_result(record) == {
            "quality": record["quality"], "servers_used": record["servers_used"],
            "servers_total": record["servers_total"], "server": latest.get("server"),
            "offset": latest.get("offset"), "uncertainty": latest.get("uncertainty")}, i


def test_a_server_that_did_not_answer_is_expected_to_hold_its_query_longest():
    record = {"servers": [{"server": "a", "sample": {"delay_s": 0.02}}, {"server": "b", "sample": None},
                          {"server": "c"}]}
    assert expected_delays(record) == {"a": 0.02, "b": UNANSWERED_DELAY_S, "c": UNANSWERED_DELAY_S}


@pytest.mark.parametrize(("entry", "not_asked"), [
    ({"reason": Reason.NO_RESULT, "history": []}, True),
    ({"reason": Reason.ROUND_DEADLINE, "history": [{"reason": Reason.ROUND_DEADLINE}]}, True),
    ({"reason": Reason.ROUND_DEADLINE, "history": [{"reason": Reason.TIMEOUT}, {"reason": Reason.ROUND_DEADLINE}]},
     False),  # asked once, and it did not answer: a reach bit
    ({"reason": Reason.TIMEOUT, "history": [{"reason": Reason.TIMEOUT}]}, False),
    ({"reason": Reason.NO_RESULT, "sample": {"delay_s": 0.01}}, False),
])
def test_only_a_server_never_asked_says_nothing_of_its_reach(entry, not_asked):
    assert store._not_asked(entry) is not_asked


# -- reading history entries -----------------------------------------------------------------------------------

#: Ways to spoil a stored record, each with words of the reason it is named by.
SPOILERS = [
    (lambda r: r.pop("round_id"), "no round_id"),
    (lambda r: r.update(node=7), "no node"),
    (lambda r: r.update(finished_at="yesterday"), "finished_at is not a time"),
    (lambda r: r.update(finished_at=True), "finished_at is not a time"),
    (lambda r: r.update(finished_at=math.inf), "finished_at is not a time"),
    (lambda r: r.update(servers={"a": 1}), "servers are not a list"),
    (lambda r: r.update(latest=[1]), "latest is an array"),
]


def test_random_history_entries_read_back_or_are_named_bad():
    rng = random.Random(SEED + 2)
    for i in range(150):
        record = _random_record(rng, i)
        stored = records.compact(record)
        entry_id = f"{1_700_000_000_000 + i}-0"
        roll = rng.random()
        if roll < 0.4:
            assert record_of((entry_id, {"record": json.dumps(stored)})) == records.expand(stored), i
            continue
        if roll < 0.5:
            fields, words = rng.choice([({}, "no 'record' field"), ({"record": "{oops"}, "not JSON"),
                                        ({"record": "[]"}, "an array, not an object"),
                                        ({"record": "null"}, "null, not an object")])
        else:
            spoil, words = rng.choice(SPOILERS)
            plain = dict(record)
            spoil(plain)
            fields = {"record": json.dumps(plain, default=str)}  # verbose: read as it is
        with pytest.raises(BadRecord) as bad:
            record_of((entry_id, fields))
        assert bad.value.entry_id == entry_id and words in bad.value.reason, (i, bad.value.reason)
        assert str(bad.value).startswith(f"entry {entry_id}: ")


def test_bad_entries_cost_only_themselves_and_are_warned_about_once(caplog, monkeypatch):
    rng = random.Random(SEED + 3)
    good = [_random_record(rng, i) for i in range(3)]
    entries = [("1-0", {"record": json.dumps(records.compact(good[0]))}), ("2-0", {"record": "{"}),
               ("3-0", {"record": json.dumps(good[1])}), ("4-0", {}),
               ("5-0", {"record": json.dumps(records.compact(good[2]))})]
    skipped = []
    assert [r["round_id"] for r in records_of(entries, skip=lambda s, b: skipped.append((s, b.entry_id)))] == [
        g["round_id"] for g in good]
    assert skipped == [("history", "2-0"), ("history", "4-0")]
    the_store = Store(TextClient(), prefix="t")
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        for _ in range(3):
            assert len(the_store.records_in("t:ntp:n1:history", entries)) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "skipping t:ntp:n1:history entry 2-0: its record is not JSON (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1))", "skipping t:ntp:n1:history entry 4-0: it has no 'record' field"]
    monkeypatch.setattr(store, "SKIPPED_REMEMBERED", 1)
    small = Store(TextClient(), prefix="t")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        small.records_in("h", entries)
        small.records_in("h", entries)
    assert len(caplog.records) == 4, "remembering one, each read names both again"
    assert len(small._skipped) == 1


class TextClient:
    """A client that reads replies as text, as the Store requires; the test never sends it a command."""

    def get_connection_kwargs(self):
        return {"decode_responses": True}


class StreamClient(TextClient):
    """XREVRANGE over a list of ``(id, fields)``, ids ``"<ms>-0"`` in order (exclusive ``(`` bounds too)."""

    def __init__(self, entries):
        self.entries = entries
        self.calls = 0

    def xrevrange(self, key, max="+", min="-", count=None):
        self.calls += 1

        def ms(entry_id):
            return int(entry_id.split("-")[0])

        found = []
        for entry_id, fields in reversed(self.entries):
            if max != "+" and (ms(entry_id) >= ms(max[1:]) if max.startswith("(") else ms(entry_id) > ms(max)):
                continue
            if min != "-" and ms(entry_id) < ms(min):
                continue
            found.append((entry_id, fields))
        return found[:count]


def test_the_newest_records_are_read_past_bad_entries_on_random_streams():
    rng = random.Random(SEED + 4)
    for case in range(60):
        entries, good = [], []
        for i in range(rng.randint(0, 30)):
            if rng.random() < 0.3:
                entries.append((f"{i + 1}-0", {"record": rng.choice(["{", "[]", "null"])}))
            else:
                record = _random_record(rng, i)
                entries.append((f"{i + 1}-0", {"record": json.dumps(records.compact(record))}))
                good.append(records.expand(records.compact(record)))
        client = StreamClient(entries)
        the_store = Store(client, prefix="t")
        count = rng.randint(1, 12)
        newest = the_store._newest("n1", "-", count)
        assert [r["round_id"] for r in newest] == [r["round_id"] for r in reversed(good)][:count], case
        assert client.calls <= 1 + len(entries), case


def test_a_client_that_returns_bytes_is_refused_by_name():
    class BytesClient:
        def get_connection_kwargs(self):
            return {}

    with pytest.raises(ValueError, match="decode_responses=True"):
        Store(BytesClient(), prefix="t")
