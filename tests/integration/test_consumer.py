"""The reader API against a real Redis, real worker and real rounds; an outage is an exception."""

import json
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass

import pytest

from orchestrator import rounds
from orchestrator.reader import ClockMeasurementSource, Measurement, NtpReader, ServiceUnavailable
from simulator.ntpserver import Behaviour, NtpSimulator
from simulator.processes import RedisProcess, free_tcp_port
from workers import config as config_mod
from workers import redisurl

from ..conftest import REPO, TEST_NODE, wait_for, write_config

pytestmark = pytest.mark.integration

TRUE_OFFSET_S = -0.0042


def _round(config):
    record = rounds.dispatch(config, TEST_NODE).wait()
    assert record is not None and record["latest"] is not None
    return record


def _subscribers(client, key_prefix):
    return client.pubsub_numsub(f"{key_prefix}:ntp:{TEST_NODE}:updates")[0][1]


# -- three rounds read through NtpReader: one run, each thing the reader must do checked on its own ----------

@dataclass(frozen=True)
class ReadRounds:
    """What an :class:`NtpReader` of the node gave before, between and after three rounds on the real worker."""

    normal_interval_s: float     # the config's normal interval
    stale_after_s: float         # the reader's
    latest_before: Measurement | None   # ``latest`` before any round
    history_before: list[dict]   # ``history`` before any round
    records: list[dict]          # the three rounds, as published
    first: Measurement           # ``latest`` right after the first round
    first_age_s: float           # its age, stale flag and aged bound, read then
    first_stale: bool
    first_aged_uncertainty: float
    waited: Measurement | None   # what ``wait_for_update``, started before the second round, returned
    waited_again: Measurement | None    # ``wait_for_update`` with nothing new (0.3 s)
    history: list[dict]          # after the three: ``history``, ``history(limit=2)``, ``history(since=...)``
    history_limit_2: list[dict]
    history_since_second: list[dict]
    stats: dict
    nodes: set[str]


@pytest.fixture(scope="module")
def read_rounds(worker, redis_url, tmp_path_factory) -> ReadRounds:
    """The rounds and reads, once for every test of them (tests must not change their data)."""
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    sim = NtpSimulator.on_free_ports([Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.002 * (i + 1)) for i in range(3)],
                                     seed=1).start()
    client = redisurl.connect(redis_url)
    try:
        path = write_config(tmp_path_factory.mktemp("reader"), sim.servers(), key_prefix=key_prefix)
        config = config_mod.load(path)
        with NtpReader.from_config(str(path)) as reader:
            stale_after_s, latest_before, history_before = (reader.stale_after_s, reader.latest(TEST_NODE),
                                                            reader.history(TEST_NODE))
            first = _round(config)
            m = reader.latest(TEST_NODE)
            age_s, stale, aged_uncertainty = m.age_s, m.stale, m.aged_uncertainty

            got = {}
            waiter = threading.Thread(target=lambda: got.update(m=reader.wait_for_update(TEST_NODE, timeout_s=20)))
            waiter.start()
            wait_for(lambda: _subscribers(client, key_prefix) >= 1, what="the waiter's subscription")
            second = _round(config)
            waiter.join(timeout=30)
            waited_again = reader.wait_for_update(TEST_NODE, timeout_s=0.3)

            third = _round(config)
            history, limit_2 = reader.history(TEST_NODE), reader.history(TEST_NODE, limit=2)
            since = reader.history(TEST_NODE, since=second["finished_at"])
            stats, nodes = reader.stats(TEST_NODE), reader.nodes()
    finally:
        client.close()
        sim.stop()
    return ReadRounds(config.timing.normal_interval_s, stale_after_s, latest_before, history_before,
                      [first, second, third], m, age_s, stale, aged_uncertainty, got.get("m"), waited_again,
                      history, limit_2, since, stats, set(nodes))


def test_the_reader_is_stale_after_three_normal_intervals(read_rounds):
    assert read_rounds.stale_after_s == 3 * read_rounds.normal_interval_s, \
        f"stale after 3 normal intervals: {read_rounds.stale_after_s} s"


def test_before_any_round_latest_is_none_and_history_empty(read_rounds):
    assert read_rounds.latest_before is None, "nothing published yet: None, not an error"
    assert read_rounds.history_before == [], "no history yet"


def test_latest_is_the_rounds_measurement_with_the_truth_in_its_bound(read_rounds):
    m, latest = read_rounds.first, read_rounds.records[0]["latest"]
    assert m.round_id == read_rounds.records[0]["round_id"] and m.offset == latest["offset"], f"the first round's: {m}"
    assert abs(m.offset - TRUE_OFFSET_S) <= m.uncertainty, f"the truth within its bound: {m}"
    assert m.server == latest["server"] and m.quality == "strict" and m.stratum == latest["stratum"], \
        f"server, quality and stratum as published: {m}"
    assert m.as_chronotick()["timestamp"] == m.measured_at, "ChronoTick's timestamp is measured_at"


def test_a_fresh_measurement_has_a_small_age_and_a_bound_grown_with_it(read_rounds):
    m, age_s, stale = read_rounds.first, read_rounds.first_age_s, read_rounds.first_stale
    assert m.measured_at <= m.published_at and 0 <= age_s < 30 and not stale, \
        f"measured before published, fresh after its round: age {age_s} s, stale {stale}"
    assert read_rounds.first_aged_uncertainty >= m.uncertainty, \
        f"the aged bound never below the published one: {read_rounds.first_aged_uncertainty} < {m.uncertainty}"


def test_wait_for_update_returns_the_next_measurement_not_the_current_one(read_rounds):
    assert read_rounds.waited is not None and read_rounds.waited.round_id == read_rounds.records[1]["round_id"], \
        f"the round published while it waited: {read_rounds.waited}"


def test_wait_for_update_with_nothing_new_returns_none_after_its_timeout(read_rounds):
    assert read_rounds.waited_again is None, f"None after 0.3 s with nothing new: {read_rounds.waited_again}"


def test_history_is_oldest_first_and_takes_a_limit_and_a_since(read_rounds):
    ids = [r["round_id"] for r in read_rounds.history]
    assert ids == [r["round_id"] for r in read_rounds.records], f"oldest first: {ids}"
    assert [r["round_id"] for r in read_rounds.history_limit_2] == ids[1:], "limit=2: the newest two"
    assert [r["round_id"] for r in read_rounds.history_since_second] == ids[1:], "since: from the second round's finish"


def test_stats_count_the_rounds_and_nodes_lists_the_node(read_rounds):
    stats, nodes = read_rounds.stats, read_rounds.nodes
    assert stats["rounds"] == 3 and TEST_NODE in nodes, f"3 rounds counted, the node listed: {stats}; {nodes}"


def test_updates_iterator_misses_nothing_between_items(worker, simulator, tmp_path, key_prefix, redis_client):
    _, servers = simulator({"a": Behaviour(delay_s=0.002)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    config = config_mod.load(path)
    reader = NtpReader.from_config(str(path))
    seen = []

    def follow():
        updates = reader.updates(TEST_NODE, timeout_s=30)
        for m in updates:
            seen.append(m.round_id)
            if len(seen) == 3:
                break

    thread = threading.Thread(target=follow)
    thread.start()
    wait_for(lambda: _subscribers(redis_client, key_prefix) >= 1, what="the follower's subscription")
    ids = [_round(config)["round_id"] for _ in range(3)]
    thread.join(timeout=30)
    assert seen == ids


def test_redis_outage_raises_the_documented_exception(tmp_path):
    with RedisProcess(tmp_path) as proc:
        reader = NtpReader(proc.url, prefix="x", socket_timeout_s=1)
        assert reader.latest("n") is None
        proc.stop()
        for call in (lambda: reader.latest("n"), lambda: reader.history("n"), lambda: reader.stats("n"),
                     lambda: reader.wait_for_update("n", timeout_s=1)):
            with pytest.raises(ServiceUnavailable) as raised:
                call()
            assert raised.value.url == proc.url
    dead = NtpReader(f"redis://:s3cret@127.0.0.1:{free_tcp_port()}/0", socket_timeout_s=1)
    with pytest.raises(ServiceUnavailable) as raised:
        dead.latest("n")
    assert "s3cret" not in str(raised.value)  # the password never reaches a message


def test_latest_follow_prints_each_new_measurement(worker, simulator, tmp_path, key_prefix, redis_url, redis_client):
    _, servers = simulator({"a": Behaviour(delay_s=0.002)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    config = config_mod.load(path)
    env = {"PATH": "/usr/bin:/bin", config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO)}
    follower = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "latest", "--config", str(path),
                                 "--node", TEST_NODE, "--follow", "--json"], env=env, cwd=str(REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "following" in follower.stderr.readline()  # said once it is subscribed
        wait_for(lambda: _subscribers(redis_client, key_prefix) >= 1, what="the follower's subscription")
        ids = [_round(config)["round_id"] for _ in range(2)]
        lines = [follower.stdout.readline() for _ in ids]
        assert [json.loads(line)["round_id"] for line in lines] == ids
    finally:
        follower.terminate()
        follower.wait(timeout=10)


# -- ChronoTick's collector over two rounds: one run, each call ChronoTick makes checked on its own ---------

@dataclass(frozen=True)
class Collected:
    """What ChronoTick's calls on a :class:`ClockMeasurementSource` gave, before and after two rounds."""

    server: str                  # the one server's host:port
    records: list[dict]          # the two rounds, as published
    offset_before: float | None  # before start_collection: get_latest_offset, get_recent_measurements, statistics
    recent_before: list
    statistics_before: dict
    has_new: tuple[bool, bool]   # has_new_measurement, twice, once both rounds were read
    offset: float | None         # then: get_latest_offset, get_latest_measurement, get_recent_measurements(300)
    measurement: dict | None
    recent: list
    recent_in_a_millisecond: list    # get_recent_measurements(1e-3)
    statistics: dict
    strict_offset: float | None  # a source that considers everything stale (stale_after_s=1e-6)
    strict_measurement: dict | None


@pytest.fixture(scope="module")
def collected(worker, tmp_path_factory) -> Collected:
    """The rounds and calls, once for every test of them (tests must not change their data)."""
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    sim = NtpSimulator.on_free_ports([Behaviour(delay_s=0.002, offset_s=0.0071)], seed=1).start()
    try:
        (server,) = sim.servers()
        path = write_config(tmp_path_factory.mktemp("collector"), [server], key_prefix=key_prefix)
        config = config_mod.load(path)
        source = ClockMeasurementSource.from_config(str(path), TEST_NODE)
        before = (source.get_latest_offset(), source.get_recent_measurements(),
                  source.ntp_client.get_measurement_statistics())
        source.start_collection()
        strict = None
        try:
            records = [_round(config) for _ in range(2)]
            wait_for(lambda: len(source.get_recent_measurements(300)) == 2, what="the source to read both rounds")
            has_new = (source.has_new_measurement(), source.has_new_measurement())
            after_rounds = (source.get_latest_offset(), source.get_latest_measurement(),
                            source.get_recent_measurements(300), source.get_recent_measurements(1e-3),
                            source.ntp_client.get_measurement_statistics())
            strict = ClockMeasurementSource(str(path), TEST_NODE, stale_after_s=1e-6)
            strict.start_collection()
            wait_for(lambda: strict.ntp_client.get_measurement_statistics()["status"] == "active",
                     what="strict's read")
            strict_read = (strict.get_latest_offset(), strict.get_latest_measurement())
        finally:
            source.stop_collection()
            if strict is not None:
                strict.stop_collection()
    finally:
        sim.stop()
    return Collected(server, records, *before, has_new, *after_rounds, *strict_read)


def test_before_collecting_the_source_has_nothing_and_says_so_in_chronoticks_words(collected):
    assert collected.offset_before is None and collected.recent_before == [], "no offset, no measurements"
    assert collected.statistics_before == {"status": "no_measurements"}, "ChronoTick's word for none"


def test_has_new_measurement_is_true_once_for_what_was_read(collected):
    assert collected.has_new == (True, False), f"true, then false until the next: {collected.has_new}"


def test_latest_offset_is_the_newest_rounds_from_the_compact_history(collected):
    latest = collected.records[-1]["latest"]
    assert collected.offset == pytest.approx(latest["offset"], abs=0.5e-7), \
        f"the newest round's offset, to the history's 100 ns: {collected.offset}"


def test_latest_measurement_has_exactly_chronoticks_fields_and_the_rounds_values(collected):
    got, latest = collected.measurement, collected.records[-1]["latest"]
    assert set(got) == {"offset", "delay", "stratum", "precision", "server", "timestamp", "uncertainty"}, \
        f"ChronoTick's NTPMeasurement fields: {sorted(got)}"
    assert got["server"] == collected.server and got["timestamp"] == latest["measured_at"], \
        f"its server, measured_at as the timestamp: {got}"
    assert got["stratum"] == latest["stratum"] and 0 <= got["uncertainty"] - latest["uncertainty"] < 1e-6, \
        f"its stratum, its bound rounded up: {got}"


def test_recent_measurements_are_the_rounds_oldest_first_within_the_window(collected):
    for (at, offset, bound), r in zip(collected.recent, collected.records, strict=True):  # oldest first, rounded
        assert at == r["latest"]["measured_at"], f"the round's measured_at: {at}"
        assert offset == pytest.approx(r["latest"]["offset"], abs=0.5e-7), f"the round's offset: {offset}"
        assert 0 <= bound - r["latest"]["uncertainty"] < 1e-6, f"the round's bound, rounded up: {bound}"
    assert collected.recent_in_a_millisecond == [], "the window is measured back from now"


def test_measurement_statistics_count_the_rounds_and_name_the_server(collected):
    stats = collected.statistics
    assert stats["total_measurements"] == 2 and stats["servers_used"] == [collected.server], \
        f"two measurements, of the one server: {stats}"
    assert stats["offset_stats"]["mean"] == pytest.approx(0.0071, abs=0.002), f"the mean offset: {stats}"


def test_a_source_that_finds_everything_stale_hands_chronotick_nothing(collected):
    assert collected.strict_offset is None and collected.strict_measurement is None, \
        "never an old value: no offset, no measurement"


def test_the_collector_takes_its_node_from_the_environment(tmp_path, monkeypatch):
    path = write_config(tmp_path, ["127.0.0.1:9"])
    monkeypatch.setenv(config_mod.ENV_NODE, "ares-comp-11")
    assert ClockMeasurementSource(str(path)).node == "ares-comp-11"
    monkeypatch.delenv(config_mod.ENV_NODE)
    import socket
    assert ClockMeasurementSource(str(path)).node == socket.gethostname().split(".")[0]
    with pytest.raises(config_mod.ConfigError):
        ClockMeasurementSource(str(tmp_path / "missing.yaml"))
