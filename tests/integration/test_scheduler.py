"""The beat: rounds every warm-up interval, then every normal interval, published without anyone asking."""

import contextlib
import dataclasses
import threading
import time

import pytest
import yaml

from orchestrator import rounds
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from simulator.server import Behaviour
from workers import config as config_mod

from ..conftest import TEST_NODE, wait_for

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _running(scheduler):
    """The scheduler's loop in a thread for the duration of the block, stopped and joined after."""
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()
        thread.join(timeout=5)


@dataclasses.dataclass(frozen=True)
class _FakeRound(rounds.RoundHandle):
    """A dispatched round the scheduler can watch without Redis: running until ``finished``."""

    finished: bool = False

    def release(self):
        pass

    def ready(self):
        return self.finished

    @property
    def close_at(self):
        return self.deadline_at


def _beat_config(tmp_path, servers, key_prefix, *, warm_up_s, warm_up_every_s, every_s):
    """A config for the test node's beat: fast queries, the given schedule."""
    path = tmp_path / "beat.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {
            "ntp": {"servers": list(servers.values()), "timeout_seconds": 0.3, "retry_delay": 0.1},
            "timing": {"warm_up": {"duration_seconds": warm_up_s, "measurement_interval": warm_up_every_s},
                       "normal_operation": {"measurement_interval": every_s}}},
        "ntp_service": {"key_prefix": key_prefix, "nodes": [TEST_NODE]}}))
    return config_mod.load(path)


def test_beat_runs_warm_up_then_normal_rounds(worker, simulator, tmp_path, key_prefix, redis_client):
    _, servers = simulator({"s": Behaviour(offset_s=0.002, delay_s=0.004)})
    config = _beat_config(tmp_path, servers, key_prefix, warm_up_s=1.0, warm_up_every_s=0.25, every_s=1.0)
    store = Store(redis_client, prefix=key_prefix)
    with _running(Scheduler(config, list(config.service.nodes))) as scheduler:
        wait_for(lambda: store.stats(TEST_NODE)["rounds"] >= 7, timeout_s=20, what="seven scheduled rounds")
    records = sorted(store.history(TEST_NODE, count=50), key=lambda r: r["dispatched_at"])
    starts = [r["dispatched_at"] - records[0]["dispatched_at"] for r in records]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    warm = [g for s, g in zip(starts, gaps, strict=False) if s < 0.9]
    normal = [g for s, g in zip(starts, gaps, strict=False) if s >= 1.1]
    # The scheduler keeps its phase, so one late dispatch shortens the next gap: check each gap
    # loosely and their mean tightly.
    assert warm and all(0.05 <= g <= 0.5 for g in warm), gaps
    assert sum(warm) / len(warm) == pytest.approx(0.25, abs=0.06), gaps
    assert normal and all(0.7 <= g <= 1.3 for g in normal), gaps
    assert sum(normal) / len(normal) == pytest.approx(1.0, abs=0.1), gaps
    assert all(r["quality"] == "strict" for r in records)
    assert store.latest(TEST_NODE)["round_id"] == records[-1]["round_id"]
    assert scheduler.skipped[TEST_NODE] == 0


def test_a_node_whose_round_is_still_running_is_skipped(tmp_path):
    config = config_mod.from_mapping({"clock_measurement": {
        "ntp": {"servers": ["127.0.0.1:9"]},
        "timing": {"warm_up": {"duration_seconds": 0, "measurement_interval": 1},
                   "normal_operation": {"measurement_interval": 0.05}}}}, environ={})
    sent = []

    def fake_dispatch(cfg, node):
        sent.append(node)
        return _FakeRound(round_id=f"r{len(sent)}", node=node, deadline_at=time.time() + 60, callback_id="")

    scheduler = Scheduler(config, ["a", "b"], dispatch=fake_dispatch, overdue_handles=lambda config, now: [],
                          warm_ups=lambda config: {}, on_lead=lambda config, nodes: [], clock=time.time)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    wait_for(lambda: scheduler.skipped["a"] >= 3 and scheduler.skipped["b"] >= 3, what="skipped ticks")
    scheduler.stop()
    thread.join(timeout=5)
    assert sent.count("a") == 1 and sent.count("b") == 1  # never a second round while one runs


def test_a_round_left_open_by_another_process_is_closed_by_the_beat(redis_url, simulator, tmp_path, key_prefix,
                                                                    redis_client):
    node = "orphannode"  # no worker serves it: nothing will ever fire these chords
    _, servers = simulator({"s": Behaviour()})
    path = tmp_path / "orphan.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": list(servers.values()), "timeout_seconds": 0.3,
                                      "max_retries": 1},
                              "timing": {"warm_up": {"duration_seconds": 0, "measurement_interval": 60},
                                         "normal_operation": {"measurement_interval": 60}}},
        "ntp_service": {"key_prefix": key_prefix, "nodes": [node]}}))
    config = config_mod.load(path)
    orphan = rounds.dispatch(config, node)  # "another process": a beat that then died
    orphan.release()
    store = Store(redis_client, prefix=key_prefix)
    assert list(store.open_round_entries(node)) == [orphan.round_id]
    scheduler = Scheduler(config, [node])
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: orphan.round_id in {r["round_id"] for r in store.history(node)}, timeout_s=20,
                 what="the orphaned round to be closed")
        wait_for(lambda: not store.open_round_entries(node), timeout_s=20, what="no round left open")
    finally:
        scheduler.stop()
        thread.join(timeout=5)
    record = store.round_record(node, orphan.round_id)
    assert record["closed_by"] == "deadline" and record["finished_at"] >= orphan.close_at
    assert store.stats(node)["rounds"] == 2  # the orphan and the scheduler's own round, each once


def test_the_beat_does_not_collect_result_subscriptions(worker, simulator, tmp_path, key_prefix, redis_client):
    """The beat subscribes to no result channel: it learns that a round finished from the round's claim."""
    _, servers = simulator({"s": Behaviour(delay_s=0.002), "t": Behaviour(delay_s=0.003)})
    config = _beat_config(tmp_path, servers, key_prefix, warm_up_s=0, warm_up_every_s=1, every_s=0.2)

    def subscriptions():
        return sum(int(c.get("sub", 0)) for c in redis_client.client_list())

    before = subscriptions()
    store = Store(redis_client, prefix=key_prefix)
    with _running(Scheduler(config, list(config.service.nodes))):
        wait_for(lambda: store.stats(TEST_NODE)["rounds"] >= 12, timeout_s=30, what="twelve scheduled rounds")
        during = subscriptions()
    # Celery's own chord.apply_async would subscribe to 3 channels a round (36+ without forgetting them).
    assert during == before, (before, during)


def test_a_warm_up_asked_for_long_after_the_beat_started_runs_at_once(tmp_path):
    """Warm-up follows the requests, not the beat's age: a beat in its normal interval serves one at once."""
    config = config_mod.from_mapping({"clock_measurement": {
        "ntp": {"servers": ["127.0.0.1:9"]},
        "timing": {"warm_up": {"duration_seconds": 1.0, "measurement_interval": 0.1},
                   "normal_operation": {"measurement_interval": 600}}}}, environ={})
    sent = []

    def dispatch(cfg, node):
        sent.append((time.monotonic(), node))
        return _FakeRound(round_id=f"r{len(sent)}", node=node, deadline_at=time.time() + 60, callback_id="",
                          finished=True)

    ends = {}  # node -> monotonic end of its warm-up, as Redis would keep it

    def warm_ups(cfg):
        now = time.monotonic()
        return {node: end - now for node, end in ends.items() if end > now}

    scheduler = Scheduler(config, ["a", "b"], dispatch=dispatch, overdue_handles=lambda config, now: [],
                          warm_ups=warm_ups, on_lead=lambda config, nodes: [], clock=time.time)
    with _running(scheduler):
        wait_for(lambda: sent, what="the first normal round")
        first_sent = len(sent)
        wait_for(lambda: time.monotonic() - sent[0][0] > 1.5, what="the beat to be past any start-up")
        assert len(sent) == first_sent == 1  # normal interval: node a once, node b's slot is minutes away
        asked = time.monotonic()
        ends["a"] = asked + 1.0
        wait_for(lambda: scheduler.warm_ups_started["a"] == 1, what="the beat to read the warm-up")
        wait_for(lambda: time.monotonic() > asked + 2.5, what="the warm-up to end", interval_s=0.1)
    warm = [at - asked for at, node in sent[first_sent:] if node == "a"]
    assert warm and warm[0] < 1.2  # read within a poll, started at once, not at the old slot
    in_warm_up = [t for t in warm if t <= 1.0 + 1.05]
    assert len(in_warm_up) >= 5, warm  # about every 0.1 s while it lasted (polls start it up to 1 s late)
    assert all(t <= 2.2 for t in warm), warm  # then back to the normal interval: nothing more
    assert not [node for _, node in sent if node == "b"]  # the other node is untouched
