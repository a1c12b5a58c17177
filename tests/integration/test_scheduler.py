"""The beat: rounds every warm-up interval, then every normal interval, published without anyone asking."""

import contextlib
import dataclasses
import json
import threading
import time

import pytest
import yaml

from orchestrator import rounds
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
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
    warm = [b - a for a, b in zip(starts, starts[1:], strict=False) if b < 0.9]
    normal = [b - a for a, b in zip(starts, starts[1:], strict=False) if a >= 1.1]
    # From the warm-up's end the node is back on its phase (node 0 of 1: whole seconds on Redis' clock); the
    # gap from the last warm-up round to it is whatever that takes.
    assert all(_phase_error(r["dispatched_at"], 0, 1, 1.0) < 0.2 for r, s in zip(records, starts, strict=True)
               if s >= 1.1), \
        [r["dispatched_at"] % 1.0 for r in records]
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
                          warm_ups=lambda config: {}, on_lead=lambda config, nodes: [], clock=time.time,
                          waiting_without_worker=lambda config, node: 0)
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
    # The orphan and the scheduler's own rounds, if any (at its phase of 60 s, and only while the orphan's
    # message is not waiting in a queue nobody consumes), each once.
    assert store.stats(node)["rounds"] == 1 + scheduler.dispatched[node]


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

    # Node a's phase (0 of 600 s) 50 ms from the start on the beat's clock, node b's (300 s) minutes away.
    shift = -(time.time() % 600) - 0.05
    scheduler = Scheduler(config, ["a", "b"], dispatch=dispatch, overdue_handles=lambda config, now: [],
                          warm_ups=warm_ups, on_lead=lambda config, nodes: [], clock=lambda: time.time() + shift,
                          waiting_without_worker=lambda config, node: 0)
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


def _phase_error(t: float, index: int, count: int, every: float) -> float:
    """How far ``t`` is from node ``index`` of ``count``'s phase (circular, s)."""
    off = (t - every * index / count) % every
    return min(off, every - off)


def test_nodes_keep_their_phases_after_a_warm_up_and_after_a_beat_restart(tmp_path):
    """Issue #25 item 5: after a warm-up every node was dispatched in the same second, and a restarted beat
    started its own phases; now node i of n is at i/n of the interval on the (Redis) clock, whatever happened."""
    every, nodes = 0.9, ["a", "b", "c"]
    config = config_mod.from_mapping({"clock_measurement": {
        "ntp": {"servers": ["127.0.0.1:9"]},
        "timing": {"warm_up": {"duration_seconds": 0.6, "measurement_interval": 0.1},
                   "normal_operation": {"measurement_interval": every}}}}, environ={})
    sent: list[tuple[float, float, str]] = []  # (monotonic, clock, node)

    def dispatch(cfg, node):
        sent.append((time.monotonic(), time.time(), node))
        return _FakeRound(round_id=f"r{len(sent)}", node=node, deadline_at=time.time() + 60, callback_id="",
                          finished=True)

    ends = {node: time.monotonic() + 0.6 for node in nodes}  # all three asked for at once

    def warm_ups(cfg):
        now = time.monotonic()
        return {node: end - now for node, end in ends.items() if end > now}

    def scheduler():
        return Scheduler(config, nodes, dispatch=dispatch, overdue_handles=lambda config, now: [],
                         warm_ups=warm_ups, on_lead=lambda config, nodes: [], clock=time.time,
                         waiting_without_worker=lambda config, node: 0)

    with _running(scheduler()) as first:
        wait_for(lambda: all(first.warm_ups_started[n] for n in nodes), what="the three warm-ups")
        warm_end = max(ends.values())
        wait_for(lambda: time.monotonic() > warm_end + 2 * every + 0.1, what="two normal intervals", interval_s=0.1)
    in_warm_up = [node for mono, _, node in sent if mono <= warm_end]
    assert all(in_warm_up.count(n) >= 4 for n in nodes), in_warm_up  # every 0.1 s, together, while it lasted
    after = [(t, node) for mono, t, node in sent if mono > warm_end]
    for i, node in enumerate(nodes):
        times = [t for t, n in after if n == node]
        assert len(times) >= 2, after
        assert all(_phase_error(t, i, len(nodes), every) < 0.06 for t in times), (node, times)
    # Restarted (or a standby taking over) at a time that is nobody's phase: each node still at its own.
    wait_for(lambda: abs(time.time() % (every / 3) - every / 6) < 0.01, what="a start between two phases",
             interval_s=0.005)
    sent.clear()
    with _running(scheduler()):
        wait_for(lambda: {n for _, _, n in sent} == set(nodes), what="one round of each node")
    for i, node in enumerate(nodes):
        t = next(t for _, t, n in sent if n == node)
        assert _phase_error(t, i, len(nodes), every) < 0.06, (node, t % every, sent)


def test_a_node_without_a_worker_gets_at_most_one_waiting_round(redis_url, simulator, tmp_path, key_prefix,
                                                                redis_client, caplog):
    """Issue #25 item 6: a listed node nobody serves grew its queue by a round each dispatch, never reclaimed.

    Now one round waits in ``ntp.<node>`` however many slots and deadlines pass; the beat says so once (and
    in ``<prefix>:ntp:<node>:no_worker``), and once when a worker's heartbeat is back.
    """
    from workers import heartbeat
    from workers.keys import Keys

    node = f"noworker{key_prefix}"
    queue = f"ntp.{node}"
    _, servers = simulator({"s": Behaviour()})
    path = tmp_path / "noworker.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": list(servers.values()), "timeout_seconds": 0.1,
                                      "max_retries": 1},
                              "timing": {"warm_up": {"duration_seconds": 0, "measurement_interval": 1},
                                         "normal_operation": {"measurement_interval": 0.25}}},
        "ntp_service": {"key_prefix": key_prefix, "nodes": [node]}}))
    config = config_mod.load(path)
    store = Store(redis_client, prefix=key_prefix)
    keys = Keys(key_prefix)
    caplog.set_level("INFO", logger="orchestrator.scheduler")
    scheduler = Scheduler(config, [node])
    try:
        with _running(scheduler):
            wait_for(lambda: scheduler.dispatched[node] == 1, what="the first round")
            one_round_bytes = redis_client.memory_usage(queue)
            assert one_round_bytes and redis_client.llen(queue) == 1
            # Two deadlines (+ grace, ~4.3 s each) and some 40 slots: before, a round a deadline piled up.
            wait_for(lambda: scheduler.closed[node] >= 1 and scheduler.held[node] >= 8, timeout_s=20,
                     what="the round closed at its deadline, and slots held after it")
            held_at = time.monotonic()
            wait_for(lambda: time.monotonic() > held_at + 4.5, timeout_s=10, what="another deadline's time",
                     interval_s=0.2)
            assert redis_client.llen(queue) == 1
            assert redis_client.memory_usage(queue) <= one_round_bytes
            assert scheduler.dispatched[node] == 1 and len(store.open_round_entries(node)) <= 1
            mark = json.loads(redis_client.get(keys.no_worker(node)))
            assert mark["queue"] == queue and mark["waiting"] == 1
            assert 0 < redis_client.ttl(keys.no_worker(node)) <= 60
            said = [r.getMessage() for r in caplog.records if "[NO WORKER]" in r.getMessage()]
            assert len(said) == 1 and "no live worker takes queue" in said[0], said
            # A worker's heartbeat on the queue: rounds resume, said once, and the mark goes.
            heartbeat.beat(redis_client, keys, f"{node}@test", [queue])
            wait_for(lambda: scheduler.dispatched[node] >= 2, what="a round once a worker is there")
            assert redis_client.get(keys.no_worker(node)) is None
            said = [r.getMessage() for r in caplog.records if "[NO WORKER]" in r.getMessage()]
            assert len(said) == 2 and "is taken again" in said[1], said
    finally:
        redis_client.delete(queue, keys.worker(queue, f"{node}@test"), keys.workers(queue))
