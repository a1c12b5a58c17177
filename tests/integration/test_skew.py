"""A node whose clock is wrong is still measured: the service keeps its own times on Redis' clock.

The worker runs under libfaketime (Debian's ``faketime``): its whole process
sees a wall clock shifted by the skew, as a node with a wrong clock would.
The dispatcher (this process) and Redis keep the true time.  Before the
service kept its bookkeeping on Redis' clock, a worker ahead of the
dispatcher by more than a round's budget dropped every round as past its
deadline (``starvation``, all ``no_result``), and a finisher 2 h ahead
trimmed its node's whole history (MINID on its own clock).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
import yaml

from orchestrator import cli, rounds, scheduler
from orchestrator.reader import NtpReader
from orchestrator.store import Store
from simulator.ntpserver import Behaviour, NtpSimulator
from simulator.processes import free_tcp_port, stop_process
from workers import config as config_mod
from workers import redisurl

from ..conftest import REPO, wait_for
from .test_cluster import queue_has_worker

pytestmark = pytest.mark.integration

TRUTH_S = 0.0042


def _faketime(skew_s: float) -> list[str]:
    binary = shutil.which("faketime")
    if binary is None:
        pytest.fail("faketime is not installed (Debian package faketime); run scripts/bootstrap")
    # -m: the thread-safe library (the worker runs a thread pool); the monotonic clock stays true,
    # as a skewed node's would.
    return [binary, "-m", "-f", f"{skew_s:+g}s"]


def _skewed_worker(skew_s: float, path, node: str, redis_url: str, log_path) -> subprocess.Popen:
    """``chronotick-ntp worker`` for ``node`` under libfaketime, ``skew_s`` off; returns once it consumes."""
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    env.pop(config_mod.ENV_NODE, None)
    worker = subprocess.Popen([*_faketime(skew_s), sys.executable, "-m", "orchestrator.cli", "worker",
                               "--config", str(path), "--node", node, "--concurrency", "5"], env=env,
                              cwd=str(REPO), stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: queue_has_worker(redis_url, node), what="the skewed worker")
    except BaseException:
        stop_process(worker)
        raise
    return worker


@pytest.mark.parametrize("skew_s", [7200.0, -30.0])
def test_a_node_whose_clock_is_off_is_measured_and_keeps_its_history(skew_s, redis_url, redis_client, simulator,
                                                                      tmp_path, key_prefix):
    node = f"skew{int(abs(skew_s))}{'a' if skew_s > 0 else 'b'}"  # one node per case: no worker is shared
    _, servers = simulator({f"s{i}": Behaviour(offset_s=TRUTH_S, delay_s=0.002 * (i + 1)) for i in range(3)})
    path = tmp_path / "skew.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": list(servers.values()), "timeout_seconds": 0.3,
                                      "retry_delay": 0.1, "max_retries": 2, "selection": "best"}},
        # One hour of history: a finisher two hours ahead computing MINID on its own clock trimmed all.
        "ntp_service": {"key_prefix": key_prefix, "history_hours": 1}}))
    config = config_mod.load(path)
    assert rounds.round_budget_s(config) < abs(skew_s)  # the skew is past a whole round's budget
    worker = _skewed_worker(skew_s, path, node, redis_url, tmp_path / "w.log")
    try:
        records = [rounds.dispatch(config, node).wait() for _ in range(3)]
    finally:
        stop_process(worker)
    log = (tmp_path / "w.log").read_text()
    for record in records:
        assert record is not None, log[-2000:]
        assert record["closed_by"] in ("callback", "early") and record["quality"] == "strict", record["servers"]
        latest = record["latest"]
        # The offset is the node's clock error, measured: about -skew (plus the servers' own offset).
        assert abs(latest["offset"] - (TRUTH_S - skew_s)) <= latest["uncertainty"] + 0.05, latest
        assert 0 <= record["duration_s"] < 5  # dispatch and finish on one clock: no skew in the round time
    store = Store(redis_client, prefix=key_prefix)
    assert [r["round_id"] for r in store.history(node, count=10)][::-1] == [r["round_id"] for r in records]
    # A reader on the true clock finds them in a one-minute window: no 60 s slack, no skew.
    reader = NtpReader(redis_url, prefix=key_prefix)
    assert len(reader.history(node, since=time.time() - 60)) == 3
    assert reader.history(node, since=time.time() + 1) == []
    reader.close()


def _redis_now(client) -> float:
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1e6


def _skewed_cli(skew_s: float, args: list[str], redis_url: str, **popen) -> subprocess.Popen:
    """``chronotick-ntp ARGS`` under libfaketime, ``skew_s`` off: a command run on the skewed node itself."""
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    return subprocess.Popen([*_faketime(skew_s), sys.executable, "-m", "orchestrator.cli", *args], env=env,
                            cwd=str(REPO), **popen)


def _scrape(port: int) -> dict | None:
    """``{(name, node): value}`` of one scrape of an exporter, or ``None`` while it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {(s.name, s.labels.get("node")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


# -- a node 2 h off, judged fresh then stale by every reader: one run per skew, each reader checked on its own --

@dataclass(frozen=True)
class Judged:
    """What ``status`` (here and on the skewed node), a skewed exporter and the beat's freshness check said of a
    node 2 h off: right after its rounds, and three intervals after its last (Redis' clock)."""

    skew_s: float
    node: str
    stale_after_s: float
    latest: dict                 # the last round's measurement
    since_publish_s: float       # Redis' clock, from that round's publication to when the fresh reads were done
    # Right after the rounds:
    status_code: int             # ``status --json`` here: its exit status and the node's report
    status: dict
    on_node_code: int            # ``status --json`` run on the skewed node
    on_node: dict
    on_node_output: str
    metrics: dict | None         # one scrape of the skewed exporter
    warm_ups: list[str]          # the beat's freshness check
    # Three intervals after the last round:
    stale_status_code: int
    stale_status: dict
    stale_metrics: dict | None
    stale_warm_ups: list[str]


@pytest.fixture(scope="module", params=[7200.0, -7200.0], ids=["ahead", "behind"])
def judged(request, redis_url, tmp_path_factory) -> Judged:
    """Ages are judged on Redis' clock: a node 2 h off is fresh after its round, stale three intervals later.

    Judged on the node's own clock (``measured_at``), a node 2 h behind was STALE (age 7,200 s) right after
    a fresh round, and one 2 h ahead had an age of -7,200 s and could not go stale for two hours.  The
    worker, an exporter and one ``status`` run 2 h off (libfaketime); this process, the other ``status``,
    the beat's freshness check and Redis keep the true time.  Once per skew for every test of it (tests
    must not change its data).
    """
    skew_s = request.param
    tmp_path = tmp_path_factory.mktemp(f"ages{'ahead' if skew_s > 0 else 'behind'}")
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    node = f"age{'ahead' if skew_s > 0 else 'behind'}"
    interval_s = 3.0
    stale_after_s = 3 * interval_s  # three normal intervals
    sim = NtpSimulator.on_free_ports([Behaviour(offset_s=TRUTH_S, delay_s=0.002 * (i + 1)) for i in range(3)],
                                     seed=1).start()
    client = redisurl.connect(redis_url)
    try:
        path = tmp_path / "ages.yaml"
        path.write_text(yaml.safe_dump({
            # The gates of the tests' configs (conftest.write_config): a busy machine's delays refuse no reply,
            # so ``status`` has only the age to judge.
            "clock_measurement": {"ntp": {"servers": sim.servers(), "timeout_seconds": 0.3,
                                          "retry_delay": 0.1, "max_retries": 2, "selection": "best",
                                          "max_delay": 0.1, "max_acceptable_uncertainty": 0.05},
                                  "timing": {"warm_up": {"duration_seconds": 5, "measurement_interval": 1},
                                             "normal_operation": {"measurement_interval": interval_s}}},
            "ntp_service": {"key_prefix": key_prefix, "nodes": [node]}}))
        config = config_mod.load(path)
        port = free_tcp_port()

        def status() -> tuple[int, dict]:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = cli.main(["status", "--config", str(path), "--node", node, "--json"])
            return code, json.loads(printed.getvalue())["nodes"][node]

        exporter = _skewed_cli(skew_s, ["exporter", "--config", str(path), "--port", str(port)], redis_url,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "exporter.log", "wb"))
        try:
            worker = _skewed_worker(skew_s, path, node, redis_url, tmp_path / "w.log")
            try:
                wait_for(lambda: _scrape(port), what="the skewed exporter to answer")
                # Three rounds, so that a cold worker's slow first round cannot miss the round-time targets alone.
                records = [rounds.dispatch(config, node).wait() for _ in range(3)]
            finally:
                stop_process(worker)
            assert all(r is not None and r["quality"] == "strict" for r in records), \
                (tmp_path / "w.log").read_text()[-2000:]
            latest = records[-1]["latest"]

            # Right after the round.
            on_node = _skewed_cli(skew_s, ["status", "--config", str(path), "--node", node, "--json"], redis_url,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            code, report = status()
            metrics = _scrape(port)
            warm_ups = scheduler.warm_up_nodes_without_fresh_measurement(config, [node])
            out, err = on_node.communicate(timeout=30)
            since_publish_s = _redis_now(client) - latest["published_at"]
            assert since_publish_s < stale_after_s, "the machine was too slow to see the node fresh"

            # Three intervals after its last round, on Redis' clock.
            wait_for(lambda: _redis_now(client) > latest["published_at"] + stale_after_s,
                     timeout_s=stale_after_s + 5, what="three intervals to pass on Redis' clock", interval_s=0.1)
            stale_code, stale_report = status()
            stale_metrics = _scrape(port)
            stale_warm_ups = scheduler.warm_up_nodes_without_fresh_measurement(config, [node])
        finally:
            stop_process(exporter)
    finally:
        client.close()
        sim.stop()
    try:
        on_node_report = json.loads(out)["nodes"][node]
    except (ValueError, KeyError):  # no report: its test shows what it said
        on_node_report = {}
    return Judged(skew_s, node, stale_after_s, latest, since_publish_s, code, report, on_node.returncode,
                  on_node_report, out + err, metrics, warm_ups, stale_code, stale_report, stale_metrics,
                  stale_warm_ups)


def test_the_nodes_own_clock_really_is_off(judged):
    latest = judged.latest
    assert abs(latest["measured_at"] - latest["published_at"] - judged.skew_s) < 60, \
        f"its measurement's own time is {judged.skew_s:+g} s from its publish time on Redis': {latest}"


def test_status_finds_the_node_fresh_right_after_its_round(judged):
    report = judged.status
    assert judged.status_code == cli.EXIT_OK and not report["stale"], f"status exits 0, not stale: {report}"
    assert 0 <= report["latest_age_s"] <= judged.since_publish_s, \
        f"an age no larger than the time since publication ({judged.since_publish_s} s): {report}"


def test_status_run_on_the_skewed_node_finds_it_fresh_too(judged):
    report = judged.on_node
    assert judged.on_node_code == cli.EXIT_OK and not report["stale"], \
        f"status on the skewed node exits 0, not stale: {judged.on_node_output}"
    assert 0 <= report["latest_age_s"] <= judged.since_publish_s, \
        f"an age no larger than the time since publication ({judged.since_publish_s} s): {report}"


def test_a_skewed_exporter_ages_the_node_on_redis_clock(judged):
    metrics, node = judged.metrics, judged.node
    assert metrics is not None and metrics[("chronotick_ntp_stale_after_seconds", node)] == judged.stale_after_s, \
        "the exporter answered, with the node's stale limit"
    assert 0 <= metrics[("chronotick_ntp_last_measurement_age_seconds", node)] <= judged.since_publish_s, \
        f"an age no larger than the time since publication ({judged.since_publish_s} s)"
    assert metrics[("chronotick_ntp_last_measurement_timestamp_seconds", node)] == judged.latest["published_at"], \
        "the last measurement's time: its publication on Redis' clock, not the node's measured_at"


def test_the_beats_freshness_check_asks_no_warm_up_for_the_fresh_node(judged):
    assert judged.warm_ups == [], f"fresh, so no warm-up: {judged.warm_ups}"


def test_status_finds_the_node_stale_three_intervals_after_its_round(judged):
    report, stale_after_s = judged.stale_status, judged.stale_after_s
    assert judged.stale_status_code == cli.EXIT_STARVATION and report["stale"], f"status exits 1, stale: {report}"
    assert stale_after_s < report["latest_age_s"] < stale_after_s + 30, \
        f"an age past the stale limit ({stale_after_s} s), by seconds, not hours: {report}"


def test_a_skewed_exporter_ages_the_node_past_its_stale_limit(judged):
    metrics, stale_after_s = judged.stale_metrics, judged.stale_after_s
    assert metrics is not None, "the exporter answered"
    age = metrics[("chronotick_ntp_last_measurement_age_seconds", judged.node)]
    assert stale_after_s < age < stale_after_s + 30, \
        f"an age past the stale limit ({stale_after_s} s), by seconds, not hours: {age}"


def test_the_beats_freshness_check_asks_a_warm_up_for_the_stale_node(judged):
    assert judged.stale_warm_ups == [judged.node], f"stale, so a warm-up: {judged.stale_warm_ups}"
