"""The reader API against a real Redis, real worker and real rounds; an outage is an exception."""

import json
import subprocess
import sys
import threading

import pytest

from orchestrator import rounds
from orchestrator.reader import ClockMeasurementSource, NtpReader, ServiceUnavailable
from simulator.ntpserver import Behaviour
from simulator.processes import RedisProcess, free_tcp_port
from workers import config as config_mod

from ..conftest import REPO, TEST_NODE, wait_for, write_config

pytestmark = pytest.mark.integration

TRUE_OFFSET_S = -0.0042


def _round(config):
    record = rounds.dispatch(config, TEST_NODE).wait()
    assert record is not None and record["latest"] is not None
    return record


def _subscribers(client, key_prefix):
    return client.pubsub_numsub(f"{key_prefix}:ntp:{TEST_NODE}:updates")[0][1]


def test_reader_reads_latest_history_and_updates(worker, simulator, tmp_path, key_prefix, redis_client):
    _, servers = simulator({f"s{i}": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.002 * (i + 1)) for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    config = config_mod.load(path)
    reader = NtpReader.from_config(str(path))
    assert reader.stale_after_s == 3 * config.timing.normal_interval_s  # 3 normal intervals
    assert reader.latest(TEST_NODE) is None  # nothing published yet: None, not an error
    assert reader.history(TEST_NODE) == []

    first = _round(config)
    m = reader.latest(TEST_NODE)
    assert m.round_id == first["round_id"] and m.offset == first["latest"]["offset"]
    assert abs(m.offset - TRUE_OFFSET_S) <= m.uncertainty
    assert m.server == first["latest"]["server"] and m.quality == "strict" and m.stratum == first["latest"]["stratum"]
    assert m.measured_at <= m.published_at and 0 <= m.age_s < 30 and not m.stale
    assert m.aged_uncertainty >= m.uncertainty
    assert m.as_chronotick()["timestamp"] == m.measured_at

    # wait_for_update returns the next one published, not the current one.
    got = {}
    waiter = threading.Thread(target=lambda: got.update(m=reader.wait_for_update(TEST_NODE, timeout_s=20)))
    waiter.start()
    wait_for(lambda: _subscribers(redis_client, key_prefix) >= 1, what="the waiter's subscription")
    second = _round(config)
    waiter.join(timeout=30)
    assert got["m"] is not None and got["m"].round_id == second["round_id"]
    assert reader.wait_for_update(TEST_NODE, timeout_s=0.3) is None  # nothing new: None after the timeout

    third = _round(config)
    ids = [r["round_id"] for r in reader.history(TEST_NODE)]
    assert ids == [first["round_id"], second["round_id"], third["round_id"]]  # oldest first
    assert [r["round_id"] for r in reader.history(TEST_NODE, limit=2)] == ids[1:]  # the newest two
    assert [r["round_id"] for r in reader.history(TEST_NODE, since=second["finished_at"])] == ids[1:]
    assert reader.stats(TEST_NODE)["rounds"] == 3 and TEST_NODE in reader.nodes()
    reader.close()


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


def test_chronotick_collector_surface(worker, simulator, tmp_path, key_prefix):
    _, servers = simulator({"a": Behaviour(delay_s=0.002, offset_s=0.0071)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    config = config_mod.load(path)
    source = ClockMeasurementSource.from_config(str(path), TEST_NODE)
    assert source.get_latest_offset() is None and source.get_recent_measurements() == []
    assert source.ntp_client.get_measurement_statistics() == {"status": "no_measurements"}  # ChronoTick's word
    source.start_collection()
    records = [_round(config) for _ in range(2)]
    wait_for(lambda: len(source.get_recent_measurements(300)) == 2, what="the source to read both rounds")
    assert source.has_new_measurement() is True and source.has_new_measurement() is False
    latest = records[-1]["latest"]
    assert source.get_latest_offset() == pytest.approx(latest["offset"], abs=0.5e-7)  # from history: compact
    got = source.get_latest_measurement()
    assert set(got) == {"offset", "delay", "stratum", "precision", "server", "timestamp", "uncertainty"}
    assert got["server"] == servers["a"] and got["timestamp"] == latest["measured_at"]
    assert got["stratum"] == latest["stratum"] and 0 <= got["uncertainty"] - latest["uncertainty"] < 1e-6
    recent = source.get_recent_measurements(300)
    for (at, offset, bound), r in zip(recent, records, strict=True):  # oldest first, rounded
        assert at == r["latest"]["measured_at"]
        assert offset == pytest.approx(r["latest"]["offset"], abs=0.5e-7)
        assert 0 <= bound - r["latest"]["uncertainty"] < 1e-6  # a bound rounded up
    assert source.get_recent_measurements(1e-3) == []  # the window is measured back from now
    stats = source.ntp_client.get_measurement_statistics()
    assert stats["total_measurements"] == 2 and stats["servers_used"] == [servers["a"]]
    assert stats["offset_stats"]["mean"] == pytest.approx(0.0071, abs=0.002)
    # A source that considers everything stale hands ChronoTick nothing, never an old value.
    strict = ClockMeasurementSource(str(path), TEST_NODE, stale_after_s=1e-6)
    strict.start_collection()
    wait_for(lambda: strict.ntp_client.get_measurement_statistics()["status"] == "active", what="strict's read")
    assert strict.get_latest_offset() is None and strict.get_latest_measurement() is None
    source.stop_collection()
    strict.stop_collection()


def test_the_collector_takes_its_node_from_the_environment(tmp_path, monkeypatch):
    path = write_config(tmp_path, ["127.0.0.1:9"])
    monkeypatch.setenv(config_mod.ENV_NODE, "ares-comp-11")
    assert ClockMeasurementSource(str(path)).node == "ares-comp-11"
    monkeypatch.delenv(config_mod.ENV_NODE)
    import socket
    assert ClockMeasurementSource(str(path)).node == socket.gethostname().split(".")[0]
    with pytest.raises(config_mod.ConfigError):
        ClockMeasurementSource(str(tmp_path / "missing.yaml"))
