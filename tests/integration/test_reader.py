"""The reader loses nothing (issue #24, item 4): bad entries, stream ids that go back, every field, Redis' clock.

Against a real ``redis-server``: the session's, or a private one where a test
flushes or restarts it.  Each test here failed on the reader before the fix:

- one ``[]``/``null`` history entry cost ChronoTick's drop-in its whole batch
  (10 good + 1 bad at start-up: 0 held; live, ``null`` + 3 good: 0 new), and
  ``NtpReader.history``/``updates`` raised on one;
- after Redis came back empty, or a stream was made again with lower ids, the
  follower kept reading after the id it held and saw nothing new;
- a measurement read through the history had ``leap`` 0, ``root_delay`` 0 and
  no ``address``;
- ages were judged on the reader's clock against the measuring node's
  ``measured_at``: a node 2 h behind was stale right after its round, one 2 h
  ahead fresh long after its last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis
import yaml

from orchestrator import records, rounds
from orchestrator.reader import KEEP_MEASUREMENTS, ClockMeasurementSource, Measurement, NtpReader
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
from simulator.processes import RedisProcess
from workers import config as config_mod

from ..conftest import REPO, TEST_NODE, wait_for, write_config

pytestmark = pytest.mark.integration

NODE = "readernode"

#: How long a test waits for the follower to read what it should (s): it polls every 0.25 s.
FOLLOW_WAIT_S = 8.0

#: A normal interval (s), so that 3 of them (the staleness) fit a test.
INTERVAL_S = 20.0


def _config(tmp_path, prefix: str) -> str:
    path = tmp_path / "reader.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]},
                              "timing": {"warm_up": {"duration_seconds": 0},
                                         "normal_operation": {"measurement_interval": INTERVAL_S}}},
        "ntp_service": {"key_prefix": prefix}}))
    return str(path)


def _redis_now(client) -> float:
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1e6


def _record(round_id: str, *, published_at: float, measured_at: float | None = None, offset: float = 0.0012,
            node: str = NODE, numbers: dict | None = None, combined: bool = False) -> dict:
    """A one-server round record as the callback builds it (``published_at``: Redis' clock).

    ``numbers`` replaces ``latest``'s (the chosen server's sample follows); ``combined``: a combination of
    s1 (chosen) and s2, with its own delay, stratum and sample bound.
    """
    measured_at = published_at - 0.05 if measured_at is None else measured_at
    latest = {"node": node, "round_id": round_id, "offset": offset, "uncertainty": 0.0021,
              "sample_uncertainty": 0.0021, "delay": 0.004, "stratum": 2, "leap": 0, "root_delay": 0.0003,
              "root_dispersion": 0.0002, "precision": 2 ** -20, "server": "s1", "address": "127.0.0.1:123",
              "quality": "strict", "measured_at": measured_at, "published_at": published_at, "servers_used": 1,
              "servers_total": 1, "selection": "best", "nts": False, **(numbers or {})}
    sample = {"offset_s": latest["offset"], "delay_s": latest["delay"], "uncertainty_s": latest["sample_uncertainty"],
              "stratum": 2, "samples_taken": 1}
    servers = [{"server": "s1", "status": "chosen", "attempts": 1, "history": [{"reason": None}], "worker": "w",
                "sample": sample}]
    if combined:  # the combination's own figures differ from its primary's (s1's) sample
        servers.append({"server": "s2", "status": "combined", "attempts": 1, "history": [{"reason": None}],
                        "worker": "w", "sample": {"offset_s": 0.00098765432101, "delay_s": 0.0061234567,
                                                  "uncertainty_s": 0.0033333333, "stratum": 3, "samples_taken": 1}})
        sample.update(delay_s=0.0051234567891, uncertainty_s=0.0031111111)
        latest.update(selection="combine", combined=["s1", "s2"], servers_used=2, servers_total=2, stratum=3)
    return {"round_id": round_id, "node": node, "quality": "strict", "dispatched_at": published_at - 0.1,
            "finished_at": published_at, "duration_s": 0.1, "servers_used": latest["servers_used"],
            "servers_total": latest["servers_total"], "servers": servers,
            "agreement": None, "filter": None, "candidate": None, "latest": latest}


def _entry(record: dict) -> dict:
    """A history stream entry's fields, compact as the service stores them."""
    return {"record": json.dumps(records.compact(record), sort_keys=True, separators=(",", ":"))}


#: History entries no reader can use: JSON that is no object, and no JSON at all.
BAD_ENTRIES = {"empty list": "[]", "null": "null", "garbage": "\x00not json{"}


def _held(source: ClockMeasurementSource) -> list[str]:
    """The round ids the drop-in holds, in order (its memory, as ChronoTick's calls read it)."""
    measurements, _, _ = source._snapshot()
    return [m.round_id for m in measurements]


def _warnings_naming(caplog, entry_id) -> list[str]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.fixture
def source_for(tmp_path, drop_in):
    """``source_for(prefix, url=None)``: a started drop-in for :data:`NODE`; stopped after the test."""
    return lambda prefix, url=None: drop_in(_config(tmp_path, prefix), NODE, url)


# -- a bad entry costs only itself ------------------------------------------------------------------


def test_a_bad_entry_at_start_up_costs_only_itself(redis_url, redis_client, key_prefix, source_for, caplog):
    """10 good entries around 3 bad ones, before the drop-in starts: it holds the 10, one warning per bad id."""
    caplog.set_level(logging.WARNING)
    history = f"{key_prefix}:ntp:{NODE}:history"
    now = _redis_now(redis_client)
    good, bad = [], {}
    after = dict(zip((2, 5, 8), BAD_ENTRIES, strict=True))  # a bad entry after good ones 2, 5 and 8
    for i in range(10):
        good.append(f"r{i}")
        redis_client.xadd(history, _entry(_record(f"r{i}", published_at=now)))
        if i in after:
            bad[after[i]] = redis_client.xadd(history, {"record": BAD_ENTRIES[after[i]]})
    source = source_for(key_prefix)
    wait_for(lambda: len(_held(source)) >= 10, timeout_s=FOLLOW_WAIT_S, what="the 10 good entries")
    assert _held(source) == good
    assert source.get_latest_offset() == pytest.approx(0.0012)
    for kind, entry_id in bad.items():
        assert len(_warnings_naming(caplog, entry_id)) == 1, (kind, caplog.text)
    # The strict reader skips them the same way: the good records, each bad one named in a warning.
    caplog.clear()
    with NtpReader(redis_url, prefix=key_prefix) as reader:
        assert [r["round_id"] for r in reader.history(NODE)] == good
        assert [r["round_id"] for r in reader.history(NODE, limit=3)] == good[-3:]  # 3 records, not 3 entries
    for kind, entry_id in bad.items():
        assert len(_warnings_naming(caplog, entry_id)) == 1, (kind, caplog.text)


def test_a_bad_entry_read_live_costs_only_itself(redis_client, key_prefix, source_for, caplog):
    """``null`` (and the others) then 3 good in one batch, while following: the 3 are read."""
    caplog.set_level(logging.WARNING)
    history = f"{key_prefix}:ntp:{NODE}:history"
    source = source_for(key_prefix)
    redis_client.xadd(history, _entry(_record("first", published_at=_redis_now(redis_client))))
    wait_for(lambda: _held(source) == ["first"], timeout_s=FOLLOW_WAIT_S, what="the first entry")
    now = _redis_now(redis_client)
    with redis_client.pipeline(transaction=True) as pipe:  # one batch for the follower's next read
        for kind in BAD_ENTRIES:
            pipe.xadd(history, {"record": BAD_ENTRIES[kind]})
        for i in range(3):
            pipe.xadd(history, _entry(_record(f"live{i}", published_at=now)))
        ids = pipe.execute()
    wait_for(lambda: len(_held(source)) >= 4, timeout_s=FOLLOW_WAIT_S, what="the 3 good entries after the bad")
    time.sleep(0.5)  # nothing more comes, and nothing twice
    assert _held(source) == ["first", "live0", "live1", "live2"]
    assert source.has_new_measurement() is True
    for kind, entry_id in zip(BAD_ENTRIES, ids[:len(BAD_ENTRIES)], strict=True):
        assert len(_warnings_naming(caplog, entry_id)) == 1, (kind, caplog.text)
    assert source.collecting and source.reachable


def test_a_bad_update_message_is_skipped_and_the_next_one_read(redis_url, redis_client, key_prefix, caplog):
    """``NtpReader.updates``: a message on the updates channel that is no measurement costs only itself."""
    caplog.set_level(logging.WARNING)
    channel = f"{key_prefix}:ntp:{NODE}:updates"
    got = []
    with NtpReader(redis_url, prefix=key_prefix) as reader:
        updates = reader.updates(NODE, timeout_s=10)

        def publish():
            wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, what="the reader's subscription")
            redis_client.publish(channel, "null")
            redis_client.publish(channel, json.dumps(_record("good", published_at=_redis_now(redis_client))["latest"]))

        threading.Thread(target=publish, daemon=True).start()
        got.append(next(updates))
        updates.close()
    assert got[0].round_id == "good"
    assert len([r for r in caplog.records if channel in r.getMessage() and r.levelno == logging.WARNING]) == 1


# -- stream ids that go back --------------------------------------------------------------------------


def _id(entry_id) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq)



@pytest.mark.parametrize("how", ["flushall", "restart", "fresh_stream"])
def test_stream_ids_that_go_back_are_noticed_and_read_again_without_duplicates(how, tmp_path, source_for, caplog):
    """Redis emptied (FLUSHALL, or restarted without its data), or the stream made again, with lower ids.

    The new stream holds the 3 rounds the follower has (restored from an older
    copy) and 5 new ones: 4 with ids below the one it held, the last above it.
    It must end holding 3 + 5, each once.
    """
    caplog.set_level(logging.WARNING)
    (tmp_path / "redis").mkdir()
    with RedisProcess(tmp_path / "redis") as proc:
        client = redis.Redis.from_url(proc.url)
        history = f"rd:ntp:{NODE}:history"
        source = source_for("rd", proc.url)
        now = _redis_now(client)
        old = [_record(f"old{i}", published_at=now + i / 1000) for i in range(3)]
        for record in old:
            client.xadd(history, _entry(record))
        held_id = client.xrevrange(history, count=1)[0][0]
        wait_for(lambda: _held(source) == ["old0", "old1", "old2"], timeout_s=FOLLOW_WAIT_S, what="the old rounds")

        if how == "flushall":
            client.flushall()
        elif how == "restart":
            proc.stop()
            wait_for(lambda: not source.reachable, timeout_s=FOLLOW_WAIT_S, what="the follower to see Redis gone")
            proc.start()
            client.close()
            client = redis.Redis.from_url(proc.url)
        else:
            client.delete(history)
        new = [_record(f"new{i}", published_at=_redis_now(client)) for i in range(5)]
        with client.pipeline(transaction=True) as pipe:
            for i, record in enumerate(old + new[:4]):
                pipe.xadd(history, _entry(record), id=f"{1000 + i}-0")  # far below the id held
            pipe.xadd(history, _entry(new[4]))  # and one above it
            pipe.execute()
        assert _id(client.xrange(history)[-1][0]) > _id(held_id)  # the stream's end passed the id held

        want = ["old0", "old1", "old2", *(r["round_id"] for r in new)]
        wait_for(lambda: len(_held(source)) >= len(want), timeout_s=FOLLOW_WAIT_S, what="the new stream's rounds")
        time.sleep(0.6)  # a few more reads: nothing comes twice
        assert sorted(_held(source)) == sorted(want)
        assert source.ntp_client.get_measurement_statistics()["total_measurements"] == len(want)
        assert len(source.get_recent_measurements(300)) == len(want)
        noticed = [m for m in (r.getMessage() for r in caplog.records) if "changed under the reader" in m]
        assert len(noticed) == 1, caplog.text  # noticed once, with why; then read again from the start

        # It follows the new stream from there on.
        client.xadd(history, _entry(_record("after", published_at=_redis_now(client))))
        wait_for(lambda: _held(source)[-1:] == ["after"], timeout_s=FOLLOW_WAIT_S, what="a round after")
        assert len(_held(source)) == len(want) + 1
        client.close()


def _a_second_apart(count: int, *, newest_at: float) -> list[tuple[str, dict]]:
    """``count`` rounds 1 s apart (a warm-up), the newest published at ``newest_at`` (Redis' clock): each as
    (stream id, fields), the id Redis' milliseconds as XADD gives them.  Round ``i`` is ``round<i>`` and its
    offset is ``i`` ms, so a wrong "latest" shows."""
    return [(f"{int((newest_at - (count - i)) * 1000)}-0",
             _entry(_record(f"round{i:04d}", published_at=newest_at - (count - i), offset=i / 1000)))
            for i in range(1, count + 1)]


def _hold_a_full_deque(client, history: str, source_for, prefix: str, rounds, *,
                       live: int) -> tuple[ClockMeasurementSource, list[str]]:
    """The drop-in holds the newest :data:`KEEP_MEASUREMENTS` of ``rounds``, the last ``live`` of them read live
    (the rounds before: read at start-up and gone from its memory); has_new_measurement is cleared."""
    with client.pipeline(transaction=False) as pipe:
        for entry_id, fields in rounds[:len(rounds) - live]:
            pipe.xadd(history, fields, id=entry_id)
        pipe.execute()
    source = source_for(prefix)
    wait_for(lambda: len(_held(source)) == KEEP_MEASUREMENTS, timeout_s=FOLLOW_WAIT_S, what="a full memory")
    for entry_id, fields in rounds[len(rounds) - live:]:
        client.xadd(history, fields, id=entry_id)
    newest = f"round{len(rounds):04d}"
    wait_for(lambda: _held(source)[-1:] == [newest], timeout_s=FOLLOW_WAIT_S, what="the rounds read live")
    held = _held(source)
    assert held == [f"round{i:04d}" for i in range(len(rounds) - KEEP_MEASUREMENTS + 1, len(rounds) + 1)]
    assert source.has_new_measurement() is True
    return source, held


def _total(source: ClockMeasurementSource) -> int:
    return source.ntp_client.get_measurement_statistics()["total_measurements"]


def _remake(client, history: str, entries, new=()) -> None:
    """Make ``history`` again in one transaction: ``entries`` ((id, fields) each) with their ids, then ``new``
    (fields each) with ids XADD gives them."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(history)
        for entry_id, fields in entries:
            pipe.xadd(history, fields, id=entry_id)
        for fields in new:
            pipe.xadd(history, fields)
        pipe.execute()


@pytest.mark.parametrize(("live", "kept", "emptied_first"), [(5, 1004, False), (0, 1000, False), (0, 5, False),
                                                            (0, 1000, True)],
                         ids=["read_before", "never_read", "older_copy", "emptied_then_restored"])
def test_a_stream_gone_back_hands_out_no_older_round(live, kept, emptied_first, redis_client, key_prefix, source_for,
                                                     caplog):
    """A replica some entries behind takes over (a Sentinel failover), or an older AOF or copy is restored.

    1,005 rounds a second apart; the drop-in holds the newest 1,000, and the stream is made again with only
    the first ``kept``.  ``read_before``: the drop-in read rounds 1-5 too (they left its memory as 1001-1005
    came), and the stream lost round 1005: its re-read once admitted rounds 1-5 again, after 1005 --
    ChronoTick got round 5's offset, published 1,000 s before, as the latest, and 1,006 rounds counted.
    ``never_read``: rounds 1-5 came before the 1,000 it read at start-up, and the stream lost rounds
    1001-1005; ``older_copy``: it is a copy older than every round read, rounds 1-5 alone.  Older than
    every round held, they must not come after them.  ``emptied_then_restored``: as ``never_read``, but the
    drop-in sees the stream empty first (Redis restarted empty, then its data restored): it waits on an
    empty stream, and reads the restored one from its start once there is one, its newest 1,000 (it once
    read from its oldest, and admitted rounds 1-5 after round 1005).
    """
    caplog.set_level(logging.WARNING)
    history = f"{key_prefix}:ntp:{NODE}:history"
    rounds = _a_second_apart(KEEP_MEASUREMENTS + 5, newest_at=_redis_now(redis_client))
    source, held = _hold_a_full_deque(redis_client, history, source_for, key_prefix, rounds, live=live)
    assert source.get_latest_offset() == 1.005 and _total(source) == KEEP_MEASUREMENTS + live

    if emptied_first:
        redis_client.delete(history)
        wait_for(lambda: source._last_id == "0-0", timeout_s=FOLLOW_WAIT_S, what="the follower to see it empty")
    _remake(redis_client, history, rounds[:kept])
    wait_for(lambda: any("changed under the reader" in r.getMessage() for r in caplog.records),
             timeout_s=FOLLOW_WAIT_S, what="the follower to notice the stream made again")
    wait_for(lambda: source._last_id == rounds[kept - 1][0], timeout_s=FOLLOW_WAIT_S, what="the new stream read")
    time.sleep(0.6)  # a few more reads: nothing comes back
    assert _held(source) == held
    assert source.get_latest_offset() == 1.005 and _total(source) == KEEP_MEASUREMENTS + live
    assert source.has_new_measurement() is False
    assert not _clock_behind(caplog)  # Redis' clock did not go back

    # It follows the stream from there: the next round is read, after the newest.
    redis_client.xadd(history, _entry(_record("next", published_at=_redis_now(redis_client), offset=2.0)))
    wait_for(lambda: _held(source)[-1:] == ["next"], timeout_s=FOLLOW_WAIT_S, what="the next round")
    assert _held(source) == held[1:] + ["next"] and source.get_latest_offset() == 2.0
    assert _total(source) == KEEP_MEASUREMENTS + live + 1


def test_a_replica_behind_in_entries_and_in_clock_has_its_new_rounds_read(redis_client, key_prefix, source_for,
                                                                           caplog):
    """A replica one entry behind takes over, its clock 1 s behind the old master's.

    Its first round is published after round 3 (the entry it lacks) but at an earlier time on its clock, and
    the drop-in re-reads after that clock has passed round 3's time: the round is newer by the stream's
    order, which is the order of publication, and is read, after round 3.
    """
    caplog.set_level(logging.WARNING)
    history = f"{key_prefix}:ntp:{NODE}:history"
    now = _redis_now(redis_client)
    rounds = _a_second_apart(3, newest_at=now - 8)  # published at now - 10, - 9 and - 8
    for entry_id, fields in rounds:
        redis_client.xadd(history, fields, id=entry_id)
    source = source_for(key_prefix)
    wait_for(lambda: _held(source) == ["round0001", "round0002", "round0003"], timeout_s=FOLLOW_WAIT_S,
             what="the rounds")
    new = [_entry(_record(f"new{i}", published_at=now - 8.5 + i, offset=-1.0 - i)) for i in range(2)]
    _remake(redis_client, history, rounds[:-1], new)
    wait_for(lambda: _held(source)[-1:] == ["new1"], timeout_s=FOLLOW_WAIT_S, what="the new rounds")
    time.sleep(0.6)
    assert _held(source) == ["round0001", "round0002", "round0003", "new0", "new1"]
    assert source.get_latest_offset() == -2.0 and _total(source) == 5
    assert not _clock_behind(caplog)  # told by the stream's order, not by a clock


@pytest.mark.parametrize("how", ["emptied", "older_copy"])
def test_rounds_published_after_redis_clock_went_back_are_read(how, redis_client, key_prefix, source_for, caplog):
    """Redis' clock went back an hour: the rounds held were published at what it now reads as the future.

    ``emptied``: Redis restarted empty, so the new rounds' ids and publish times are both below the ones
    held: told by nothing but Redis' clock, reading before the newest held.  ``older_copy``: Redis came
    back with a copy holding rounds 1-5 (read at start-up, long gone from the drop-in's memory), the new
    rounds after them (XADD's ids never go back within a stream; their publish times do).  The new rounds
    are read, after the ones held, and no round read before comes back (rounds 1-5 once did).
    """
    caplog.set_level(logging.WARNING)
    history = f"{key_prefix}:ntp:{NODE}:history"
    rounds = _a_second_apart(KEEP_MEASUREMENTS + 5, newest_at=_redis_now(redis_client) + 3600)
    source, held = _hold_a_full_deque(redis_client, history, source_for, key_prefix, rounds, live=5)

    now = _redis_now(redis_client)  # an hour before the newest round held
    new = [_entry(_record(f"new{i}", published_at=now + i / 1000, offset=-1.0 - i)) for i in range(2)]
    _remake(redis_client, history, rounds[:5] if how == "older_copy" else [], new)
    wait_for(lambda: _held(source)[-1:] == ["new1"], timeout_s=FOLLOW_WAIT_S, what="the new rounds")
    time.sleep(0.6)  # a few more reads: nothing more, nothing twice
    assert _held(source) == held[2:] + ["new0", "new1"]
    assert source.get_latest_offset() == -2.0 and _total(source) == KEEP_MEASUREMENTS + 5 + 2
    # Said once, with why, when only Redis' clock tells (a round read before in the stream tells the rest).
    assert len(_clock_behind(caplog)) == (how == "emptied"), caplog.text


def _clock_behind(caplog) -> list[str]:
    return [m for m in (r.getMessage() for r in caplog.records) if "before the newest round held" in m]


# -- every field comes out the same -------------------------------------------------------------------

#: Numbers no rounding keeps (the review's): the compact history once kept offsets to 100 ns, delays to
#: a microsecond and bounds rounded up to one, so a reader of the history got numbers ``latest`` did not have.
UNROUNDED = {"offset": 0.00123456789, "uncertainty": 0.00210000001, "sample_uncertainty": 0.0020000000701,
             "delay": 0.0040004999, "root_delay": 0.00030049, "root_dispersion": 0.0002000001}


@pytest.mark.parametrize("combined", [False, True], ids=["best", "combine"])
def test_every_number_of_latest_comes_out_exactly_through_the_history(combined, redis_url, redis_client, key_prefix,
                                                                      source_for):
    """``latest`` against ``NtpReader.latest``, ``NtpReader.history`` and the drop-in: equal, every field."""
    record = _record("exact", published_at=_redis_now(redis_client), numbers=UNROUNDED, combined=combined)
    published = json.loads(json.dumps(record["latest"]))
    Store(redis_client, prefix=key_prefix).publish_round(record, history_length=100, window_size=20)
    source = source_for(key_prefix)
    with NtpReader(redis_url, prefix=key_prefix, stale_after_s=3 * INTERVAL_S) as reader:
        direct = reader.latest(NODE)
        history = reader.history(NODE)[-1]["latest"]
    assert direct.raw == published
    assert history == published, {k: (history.get(k), v) for k, v in published.items() if history.get(k) != v}
    wait_for(lambda: _held(source) == ["exact"], timeout_s=FOLLOW_WAIT_S, what="the round")
    held = source._snapshot()[0][-1]
    assert held == direct and held.raw == published  # every field of the dataclass, and the JSON
    assert source.get_latest_measurement() == direct.as_chronotick()
    assert source.get_latest_offset() == UNROUNDED["offset"]
    assert source.get_recent_measurements(60) == [(direct.measured_at, direct.offset, direct.uncertainty)]


@pytest.mark.parametrize("selection", ["combine", "best"])
def test_every_field_of_latest_comes_out_the_same_through_every_reader(selection, worker, simulator, tmp_path,
                                                                       key_prefix, monkeypatch):
    """A real round: ``latest`` against ``NtpReader.latest``, ``NtpReader.history`` and the drop-in."""
    _, servers = simulator({f"s{i}": Behaviour(offset_s=0.0042, delay_s=0.002 * (i + 1), leap=1, stratum=2,
                                               root_delay_s=0.0031 + i * 1e-4, root_dispersion_s=0.0017)
                            for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, selection=selection)
    config = config_mod.load(path)
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, config.service.redis_url)
    live = ClockMeasurementSource(str(path), TEST_NODE)  # following before the round
    live.start_collection()
    try:
        record = rounds.dispatch(config, TEST_NODE).wait()
        assert record is not None and record["latest"] is not None
        published = record["latest"]
        assert published["leap"] == 1 and published["root_delay"] > 0.003 and published["address"]
        assert ("combined" in published) == (selection == "combine")

        with NtpReader.from_config(str(path)) as reader:
            direct = reader.latest(TEST_NODE)
            history = reader.history(TEST_NODE)[-1]["latest"]
        published = json.loads(json.dumps(published))  # as Redis keeps it: a float's repr, exact
        assert direct.raw == published
        assert history == published, {k: (history.get(k), v) for k, v in published.items() if history.get(k) != v}

        starting = ClockMeasurementSource(str(path), TEST_NODE)  # reading it at start-up
        starting.start_collection()
        try:
            for source in (live, starting):
                wait_for(lambda s=source: _held(s)[-1:] == [published["round_id"]], timeout_s=FOLLOW_WAIT_S,
                         what="the drop-in to read the round")
            held = [s._snapshot()[0][-1] for s in (live, starting)]
            from_history = Measurement.from_latest(history, stale_after_s=direct.stale_after_s)
            for m in (from_history, *held):
                for f in dataclasses.fields(Measurement):
                    if f.compare:
                        assert getattr(m, f.name) == getattr(direct, f.name), f.name
                assert m.raw == history
            for source in (live, starting):
                got = source.get_latest_measurement()
                assert got == held[0].as_chronotick()
                assert got == direct.as_chronotick()
                assert source.get_recent_measurements(300)[-1] == (held[0].measured_at, held[0].offset,
                                                                   held[0].uncertainty)
                assert source.ntp_client.get_measurement_statistics()["servers_used"] == \
                    sorted(published.get("combined") or [published["server"]])
        finally:
            starting.stop_collection()
    finally:
        live.stop_collection()


# -- ages on Redis' clock -----------------------------------------------------------------------------


@pytest.mark.parametrize("node_off_s", [-7200.0, 7200.0])
def test_a_node_hours_off_is_fresh_after_its_round_and_stale_three_intervals_after(node_off_s, redis_url, redis_client,
                                                                                   key_prefix, source_for):
    """``measured_at`` is the node's clock (2 h off here); its round was published on Redis' clock."""
    store = Store(redis_client, prefix=key_prefix)
    now = _redis_now(redis_client)
    store.publish_round(_record("fresh", published_at=now, measured_at=now + node_off_s), history_length=100,
                        window_size=20)
    source = source_for(key_prefix)
    with NtpReader(redis_url, prefix=key_prefix, stale_after_s=3 * INTERVAL_S) as reader:
        m = reader.latest(NODE)
        assert not m.stale and 0 <= m.age_s < 5, m.age_s
        assert m.aged_uncertainty - m.uncertainty < 5 * m.drift_bound  # grown for seconds, not for hours
        wait_for(lambda: _held(source) == ["fresh"], timeout_s=FOLLOW_WAIT_S, what="the fresh round")
        assert source.get_latest_offset() == pytest.approx(0.0012)
        assert len(source.get_recent_measurements(60)) == 1

        # Its last round three intervals (and a bit) ago, on Redis' clock: stale, whatever its own clock says.
        then = _redis_now(redis_client) - 3 * INTERVAL_S - 2
        store.publish_round(_record("last", published_at=then, measured_at=then + node_off_s, offset=0.0013),
                            history_length=100, window_size=20)
        m = reader.latest(NODE)
        assert m.round_id == "last" and m.stale and 3 * INTERVAL_S < m.age_s < 3 * INTERVAL_S + 10, m.age_s
        wait_for(lambda: _held(source)[-1:] == ["last"], timeout_s=FOLLOW_WAIT_S, what="the last round")
        assert source.get_latest_offset() is None and source.get_latest_measurement() is None
        recent = source.get_recent_measurements(3 * INTERVAL_S + 30)  # the window, too, on Redis' clock
        assert sorted(offset for _, offset, _ in recent) == [0.0012, 0.0013]
        assert [offset for _, offset, _ in source.get_recent_measurements(30)] == [0.0012]


def _faketime(off_s: float) -> list[str]:
    """A command prefix that runs a program with its wall clock ``off_s`` off (libfaketime, as test_skew.py)."""
    binary = shutil.which("faketime")
    if binary is None:
        pytest.fail("faketime is not installed (Debian package faketime); run scripts/bootstrap")
    return [binary, "-m", "-f", f"{off_s:+g}s"]  # -m: the thread-safe library (the follower is a thread)


READ_UNDER_A_WRONG_CLOCK = """
import json, select, sys, time
from orchestrator.reader import ClockMeasurementSource, NtpReader
url, prefix, path = sys.argv[1:4]
with NtpReader(url, prefix=prefix, stale_after_s=60) as reader:
    m = reader.latest("readernode")
    out = {"stale": m.stale, "age_s": m.age_s, "grown_s": m.aged_uncertainty - m.uncertainty}
source = ClockMeasurementSource(path, "readernode")
source.start_collection()
deadline = time.monotonic() + 10
while source.get_latest_offset() is None and time.monotonic() < deadline:
    select.select([], [], [], 0.05)  # libfaketime breaks time.sleep's absolute monotonic wait (EINVAL)
out["collector_offset"] = source.get_latest_offset()
out["recent"] = len(source.get_recent_measurements(60))
source.stop_collection()
print(json.dumps(out))
"""


@pytest.mark.parametrize("reader_off_s", [7200.0, -7200.0])
def test_a_reader_whose_clock_is_hours_off_judges_ages_on_redis_clock(reader_off_s, redis_url, redis_client,
                                                                      key_prefix, tmp_path):
    """The reader under libfaketime, 2 h off; the node and Redis keep the true time."""
    now = _redis_now(redis_client)
    Store(redis_client, prefix=key_prefix).publish_round(_record("r", published_at=now, measured_at=now - 0.05),
                                                         history_length=100, window_size=20)
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run([*_faketime(reader_off_s), sys.executable, "-c", READ_UNDER_A_WRONG_CLOCK, redis_url,
                           key_prefix, _config(tmp_path, key_prefix)], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["stale"] is False and 0 <= out["age_s"] < 5, out
    assert out["grown_s"] < 5 * 15e-6, out
    assert out["collector_offset"] == pytest.approx(0.0012) and out["recent"] == 1, out
