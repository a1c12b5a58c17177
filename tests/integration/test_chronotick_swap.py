"""ChronoTick's pipeline on this service: its own call sequence against a real worker, beat and Redis.

ChronoTick's ``RealDataPipeline`` (server/src/chronotick/inference/real_data_pipeline.py)
does, with its collector swapped by one import line:

1. ``ClockMeasurementCollector(config_path)`` -- the path alone;
2. ``start_collection()``, then reads ``warm_up_duration`` and starts a timer for it;
3. on every correction (about once a second) ``get_recent_measurements(window_seconds=500)``,
   keeping those newer than the last it processed, and ``get_latest_offset()``;
4. when the timer fires, it needs >= 10 measurements in its dataset, or stays in
   warm-up and checks again every 5 s;
5. ``get_stats()`` merges ``ntp_client.get_measurement_statistics()``;
6. ``stop_collection()`` at shutdown.

This file drives exactly that sequence (written from ChronoTick's behaviour,
not its code), with ChronoTick starting as its node's service does (its node
has nothing fresh, so it gets a warm-up, which it joins), and a Redis stall in
the middle.  Warm-ups are bounded (issue #26 item 5): a consumer restarted on a
fresh node gets none.  The cluster here uses a short warm-up (8 s at 0.25 s) and a 3 s
normal interval so the test fits in CI; ChronoTick's 60 s at 1 s is the same
shape.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from orchestrator.consumer import ClockMeasurementSource as ClockMeasurementCollector  # ChronoTick's one line
from simulator.ntpserver import Behaviour
from simulator.processes import RedisProcess, stop_process
from workers import config as config_mod
from workers import heartbeat, redisurl, warmup
from workers.app import queue_for
from workers.keys import Keys

from ..conftest import REPO, wait_for

pytestmark = pytest.mark.integration

NODE = "swapnode"
WARM_UP_S = 8.0
WARM_UP_EVERY_S = 0.25
NORMAL_EVERY_S = 3.0
#: ChronoTick's ``MIN_DATASET_SIZE``: the ML models need this many measurements when the timer fires.
MIN_DATASET_SIZE = 10
#: ChronoTick's window for new measurements (s).
WINDOW_S = 500
#: No ChronoTick call may block longer than this (s).
CALL_BUDGET_S = 1.0
STALL_S = 8.0


def _config(tmp_path, servers: list[str]) -> str:
    path = tmp_path / "chronotick.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {
            "ntp": {"servers": servers, "timeout_seconds": 0.3, "retry_delay": 0.2, "max_retries": 2,
                    "max_delay": 0.1, "max_acceptable_uncertainty": 0.05},
            "timing": {"warm_up": {"duration_seconds": WARM_UP_S, "measurement_interval": WARM_UP_EVERY_S},
                       "normal_operation": {"measurement_interval": NORMAL_EVERY_S}}},
        # ChronoTick's own sections ride along untouched.
        "prediction_scheduling": {"cpu_model": {"prediction_interval": 1.0}},
        "ntp_service": {"key_prefix": "swap", "nodes": [NODE]}}))
    return str(path)


def _cli(args: list[str], env: dict, log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=str(REPO),
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


class ChronoTickCalls:
    """ChronoTick's side of the calls, timed: what its pipeline does with the collector, nothing more."""

    def __init__(self, collector):
        self.collector = collector
        self.dataset: list[tuple[float, float, float]] = []
        self.last_processed = 0.0
        self.slowest_s = 0.0
        self.calls = 0
        self.errors: list[BaseException] = []
        self.warm_up_complete = False
        self.checks: list[int] = []
        #: At each timer check: how many of the dataset's measurements were taken after ``started_at``.
        self.served: list[int] = []
        self.started_at = time.time()
        self._lock = threading.Lock()

    def _timed(self, call, *args):
        started = time.monotonic()
        try:
            return call(*args)
        except BaseException as exc:  # ChronoTick would crash here: record it
            self.errors.append(exc)
            return None
        finally:
            with self._lock:
                self.calls += 1
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)

    def check_for_ntp_updates(self):
        """``_check_for_ntp_updates``: new measurements by timestamp into the dataset."""
        measurements = self._timed(self.collector.get_recent_measurements, WINDOW_S) or []
        new = [m for m in measurements if m[0] > self.last_processed]
        if new:
            with self._lock:
                self.dataset.extend(new)
            self.last_processed = new[-1][0]

    def correction(self):
        """``get_real_clock_correction``: the update check, then the latest offset during warm-up."""
        self.check_for_ntp_updates()
        if not self.warm_up_complete:
            self._timed(self.collector.get_latest_offset)

    def mark_warm_up_complete(self):
        """``_mark_warm_up_complete`` (the timer): >= 10 measurements, or stay in warm-up."""
        self.check_for_ntp_updates()
        self.checks.append(len(self.dataset))
        self.served.append(len([m for m in self.dataset if m[0] >= self.started_at]))
        if len(self.dataset) >= MIN_DATASET_SIZE:
            self.warm_up_complete = True


@pytest.fixture
def cluster(tmp_path, simulator, monkeypatch):
    """A private Redis, and a real ``chronotick-ntp worker`` and ``beat`` for :data:`NODE`."""
    _, servers = simulator({f"s{i}": Behaviour(offset_s=0.0031, delay_s=0.002 * (i + 1)) for i in range(3)})
    path = _config(tmp_path, list(servers.values()))
    (tmp_path / "redis").mkdir()
    with RedisProcess(tmp_path / "redis") as redis_proc:
        env = {**os.environ, config_mod.ENV_REDIS_URL: redis_proc.url, "PYTHONPATH": str(REPO)}
        env.pop(config_mod.ENV_CONFIG, None)
        monkeypatch.setenv(config_mod.ENV_REDIS_URL, redis_proc.url)
        monkeypatch.setenv(config_mod.ENV_NODE, NODE)
        client = redisurl.connect(redis_proc.url)
        worker = _cli(["worker", "--config", path, "--node", NODE, "--concurrency", "6"], env, tmp_path / "worker.log")
        beat = None
        try:
            wait_for(lambda: heartbeat.live_workers(client, Keys(config_mod.load(path).service.key_prefix),
                                                    queue_for(NODE)), what="the worker's heartbeat")
            beat = _cli(["beat", "--config", path], env, tmp_path / "beat.log")
            yield {"path": path, "redis": redis_proc, "client": client, "tmp": tmp_path}
        finally:
            for proc in (beat, worker):
                if proc is not None:
                    os.kill(proc.pid, signal.SIGCONT)  # in case a test left anything stopped
                    stop_process(proc)
            client.close()


def _history_len(client) -> int:
    return client.xlen(f"swap:ntp:{NODE}:history")


def _beat_leads(client) -> bool:
    """The beat has taken the lease: its warm-up policy is published (and the node's warm-up asked for)."""
    return bool(client.exists(Keys("swap").warm_up_policy()))


def test_chronotick_pipeline_runs_on_the_service_through_a_redis_stall(cluster, caplog):
    client = cluster["client"]
    # ChronoTick starts with its node's service: the node has nothing fresh, and its warm-up is asked for.
    wait_for(lambda: _beat_leads(client), what="the beat to take the lease")

    caplog.set_level(logging.INFO, logger="orchestrator.reader")
    collector = ClockMeasurementCollector(cluster["path"])  # the path alone: node from $CHRONOTICK_NODE
    assert collector.node == NODE
    assert collector.warm_up_duration == WARM_UP_S  # ChronoTick reads it for its timer
    assert collector.has_new_measurement() is False
    calls = ChronoTickCalls(collector)

    calls.started_at = time.time()
    collector.start_collection()
    timer = threading.Timer(collector.warm_up_duration, calls.mark_warm_up_complete)
    timer.start()
    stop_loop = threading.Event()

    def every_second():  # ChronoTick corrects about once a second; twice here, for more chances to block
        while not stop_loop.is_set():
            calls.correction()
            stop_loop.wait(0.5)

    loop = threading.Thread(target=every_second, daemon=True)
    loop.start()
    try:
        wait_for(lambda: calls.checks, timeout_s=WARM_UP_S + 10, what="ChronoTick's warm-up timer")
        # Its first check passes, on measurements taken for it (the earlier ones would be outside
        # its 500 s window in a cluster that had run for longer than this test can wait).
        assert calls.warm_up_complete and calls.served[0] >= MIN_DATASET_SIZE, (calls.checks, calls.served)
        assert collector.warm_up is not None and collector.warm_up.outcome in ("started", "joined")
        assert collector.has_new_measurement() is True and collector.has_new_measurement() is False
        stats = collector.ntp_client.get_measurement_statistics()  # get_stats()'s call
        assert stats["status"] == "active" and stats["recent_count"] == 10
        assert stats["total_measurements"] >= calls.served[0]
        assert set(stats["offset_stats"]) == {"mean", "stdev", "range"}
        assert set(stats["delay_stats"]) == {"mean", "min", "max"}
        assert abs(stats["offset_stats"]["mean"] - 0.0031) < 0.002
        assert set(stats["servers_used"]) <= set(collector_servers(cluster["path"]))

        # A Redis stall in the middle: ChronoTick keeps correcting, from what was read.
        before_stall = len(calls.dataset)
        calls_before = calls.calls
        os.kill(cluster["redis"].process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: not collector.reachable, timeout_s=5, what="the follower to notice the stall")
            stall_over = time.monotonic() + STALL_S
            wait_for(lambda: time.monotonic() > stall_over, timeout_s=STALL_S + 2, what="the stall", interval_s=0.2)
            assert collector.get_latest_offset() is not None  # what it last read, still fresh
            assert collector.ntp_client.get_measurement_statistics()["ntp_service_reachable"] is False
        finally:
            os.kill(cluster["redis"].process.pid, signal.SIGCONT)
        assert calls.calls >= calls_before + 2 * STALL_S // 1  # the calls went on through the stall
        wait_for(lambda: len(calls.dataset) > before_stall and collector.reachable, timeout_s=30,
                 what="new measurements after the stall")
    finally:
        stop_loop.set()
        loop.join(timeout=5)
        timer.cancel()
    assert calls.errors == []
    assert calls.slowest_s < CALL_BUDGET_S, calls.slowest_s
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "cannot read the NTP service" in w]) == 1, warnings
    assert len([w for w in warnings if "answers again" in w]) == 1, warnings

    stopped = time.monotonic()
    collector.stop_collection()
    assert time.monotonic() - stopped < CALL_BUDGET_S and not collector.collecting
    wait_for(lambda: not warmup.active(client, "swap"), timeout_s=30, what="the warm-up to end")
    assert client.ttl("swap:ntp:warm_up") == -2  # no schedule key outlives its warm-up
    assert not [k for k in client.keys("swap:*") if client.ttl(k) == -1 and "beat" in k]  # nothing forever


def collector_servers(path: str) -> list[str]:
    return [s.name for s in config_mod.load(path).ntp.servers]


def test_consumers_on_one_node_share_one_warm_up_and_a_restart_on_a_fresh_node_gets_none(cluster, caplog):
    client = cluster["client"]
    wait_for(lambda: warmup.active(client, "swap"), what="the node's warm-up")
    ends = client.zscore("swap:ntp:warm_up", NODE)
    first, second = ClockMeasurementCollector(cluster["path"]), ClockMeasurementCollector(cluster["path"])
    try:
        first.start_collection()
        wait_for(lambda: first.warm_up is not None, what="the first consumer's answer")
        second.start_collection()
        wait_for(lambda: second.warm_up is not None, what="the second consumer's answer")
        assert first.warm_up.outcome == second.warm_up.outcome == "joined"  # one warm-up, not extended
        assert second.warm_up.remaining_s <= first.warm_up.remaining_s
        assert list(warmup.active(client, "swap")) == [NODE]
        assert client.zscore("swap:ntp:warm_up", NODE) == ends
        assert 0 < client.pttl("swap:ntp:warm_up") <= WARM_UP_S * 1000
    finally:
        first.stop_collection()
        second.stop_collection()
    # After it, a consumer restarted (a crash loop under systemd) finds the node fresh: told so, no warm-up.
    wait_for(lambda: not warmup.active(client, "swap"), timeout_s=30, what="the warm-up to end")
    caplog.set_level(logging.INFO, logger="orchestrator.reader")
    again = ClockMeasurementCollector(cluster["path"])
    try:
        again.start_collection()
        wait_for(lambda: again.warm_up is not None, what="the restarted consumer's answer")
        assert again.warm_up.outcome == "refused" and again.warm_up.reason == "fresh"
        assert "refused (fresh)" in caplog.text
        wait_for(lambda: again.get_latest_offset() is not None, what="the restarted consumer's measurements")
    finally:
        again.stop_collection()
    assert not warmup.active(client, "swap")


def test_a_worker_starting_with_nothing_fresh_asks_for_a_warm_up(redis_client, key_prefix):
    """The worker's hook: nothing fresh -> a warm-up; a fresh ``latest`` -> none."""
    import json

    timing = config_mod.TimingSettings(warm_up_duration_s=5.0, warm_up_interval_s=1.0, normal_interval_s=10.0)
    warmup.publish_policy(redis_client, key_prefix, warmup.Policy(nodes=("w1", "w2", "w3"), duration_s=5.0,
                                                                  cooldown_s=600.0, stale_after_s=30.0))
    assert list(warmup.warm_up_if_not_fresh(redis_client, key_prefix, ["w1"], timing)) == ["w1"]
    assert 0 < warmup.active(redis_client, key_prefix)["w1"] <= 5.0
    # Ages are on Redis' clock (published_at), never the node's own (measured_at): w2's node is 2 h behind,
    # w3's 2 h ahead.
    now = int(redis_client.time()[0])
    redis_client.set(f"{key_prefix}:ntp:w2:latest",
                     json.dumps({"measured_at": now - 5 - 7200, "published_at": now - 5}))
    redis_client.set(f"{key_prefix}:ntp:w3:latest",
                     json.dumps({"measured_at": now - 31 + 7200, "published_at": now - 31}))  # > 3 intervals
    assert list(warmup.warm_up_if_not_fresh(redis_client, key_prefix, ["w2", "w3"], timing)) == ["w3"]
    assert set(warmup.active(redis_client, key_prefix)) == {"w1", "w3"}


def test_a_real_worker_starting_for_a_node_with_nothing_fresh_asks_for_its_warm_up(tmp_path, redis_url,
                                                                                    redis_client, simulator):
    """``chronotick-ntp worker`` for a node that was never measured: its warm-up is in Redis (with the policy a
    beat published; the beat itself need not run yet)."""
    prefix = f"wk{os.getpid()}"
    warmup.publish_policy(redis_client, prefix, warmup.Policy(nodes=("freshnode",), duration_s=60.0,
                                                              cooldown_s=600.0, stale_after_s=360.0))
    _, servers = simulator({"s": Behaviour()})
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": list(servers.values())},
                              "timing": {"warm_up": {"duration_seconds": 30, "measurement_interval": 1}}},
        "ntp_service": {"key_prefix": prefix}}))
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO)}
    worker = _cli(["worker", "--config", str(path), "--node", "freshnode", "--concurrency", "3"], env,
                  tmp_path / "worker.log")
    try:
        wait_for(lambda: "freshnode" in warmup.active(redis_client, prefix), what="the worker's warm-up request")
        # The service's length (the policy's 60 s), whatever the asker's own config says (30 s).
        assert 55 < warmup.active(redis_client, prefix)["freshnode"] <= 60
    finally:
        stop_process(worker)


def test_a_record_the_collector_cannot_use_is_skipped_and_the_follower_goes_on(tmp_path, redis_url, redis_client,
                                                                               key_prefix, monkeypatch):
    """One malformed history entry (another version's, a hand-written one) must not freeze ChronoTick's view."""
    import json

    from orchestrator.store import Store

    monkeypatch.setenv(config_mod.ENV_REDIS_URL, redis_url)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}},
                                    "ntp_service": {"key_prefix": key_prefix}}))
    collector = ClockMeasurementCollector(str(path), "oddnode")
    collector.start_collection()
    try:
        history = f"{key_prefix}:ntp:oddnode:history"
        redis_client.xadd(history, {"record": json.dumps({"latest": {"offset": 1.0}, "detail": "verbose"})})
        now = time.time()
        latest = {"node": "oddnode", "offset": 0.0012, "uncertainty": 0.002, "delay": 0.01, "stratum": 2,
                  "precision": 2 ** -20, "server": "s", "quality": "strict", "measured_at": now,
                  "published_at": now}
        Store(redis_client, prefix=key_prefix).publish_round(
            {"round_id": "r1", "node": "oddnode", "quality": "strict", "dispatched_at": now, "finished_at": now,
             "duration_s": 0.0, "servers_used": 1, "servers_total": 1, "servers": [], "agreement": None,
             "filter": None, "candidate": None, "latest": latest},
            history_length=10, window_size=20, detail="verbose")
        wait_for(lambda: collector.get_latest_offset() == 0.0012, what="the good record after the bad one")
        assert collector.collecting and len(collector.get_recent_measurements(60)) == 1
    finally:
        collector.stop_collection()
