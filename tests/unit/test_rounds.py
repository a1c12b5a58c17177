"""orchestrator.rounds: a round's id, its jobs and their order, its deadline and expiry, its callback's
reference, and closing a round whose callback never came -- built without sending anything (no Redis, no
worker; the store in memory where one is read).

The deadline against every server's retry schedule: tests/unit/test_retry.py.
"""

from __future__ import annotations

import gc
import random
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator import rounds
from orchestrator.outcomes import ClosedBy, Quality, RoundMeta
from orchestrator.store import UNANSWERED_DELAY_S, Keys
from workers import config as config_mod
from workers.app import queue_for
from workers.tasks import QUERY_TASK

from .samples import ok

SEED = 20270305


def _config(*, servers, parallel=True, hub=None, nodes=("head", "n1"), prefix="t") -> config_mod.Config:
    service: dict = {"nodes": list(nodes), "key_prefix": prefix}
    if hub is not None:
        service["hub"] = hub
    return config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": servers, "parallel_queries": parallel}},
                                    "ntp_service": service}, environ={})


def _jobs(header, parallel: bool) -> list[dict]:
    return [sig.kwargs["job"] for sig in header] if parallel else [t.kwargs["job"] for t in header[0].tasks]


def test_a_round_id_is_the_node_the_utc_time_to_the_millisecond_and_a_random_suffix():
    rng = random.Random(SEED)
    for _ in range(200):
        now = rng.uniform(0, 4e9)
        round_id = rounds.new_round_id("n1", now)
        found = re.fullmatch(r"n1-(\d{8}T\d{6})\.(\d{3})Z-([0-9a-f]{6})", round_id)
        assert found, round_id
        stamp = datetime.strptime(found[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        assert stamp.timestamp() == int(now) and int(found[2]) == int(now % 1 * 1000)
    ids = [rounds.new_round_id("n1", 1000.0) for _ in range(50)]
    assert len(set(ids)) == 50, "the suffix tells apart rounds of the same millisecond"
    later = [rounds.new_round_id("n1", t) for t in (1000.0, 1000.001, 1001.0, 2000.0)]
    assert [i[:-7] for i in later] == sorted(i[:-7] for i in later), "sortable by time"


def test_random_rounds_send_every_job_to_the_nodes_queue_slowest_first_with_its_deadline(monkeypatch):
    """The oracle: jobs in config order, stably sorted by the previous round's delay, slowest first (a server
    with none as one that did not answer); each on the node's queue, expiring a day past the deadline."""
    rng = random.Random(SEED + 1)
    for case in range(60):
        servers = [f"10.0.{case}.{i}" for i in range(1, rng.randint(2, 8))]
        parallel = rng.random() < 0.75
        config = _config(servers=servers, parallel=parallel)
        delays = {s: rng.choice([0.001, 0.01, 0.05, UNANSWERED_DELAY_S]) for s in servers if rng.random() < 0.7}
        now = rng.uniform(1.7e9, 1.8e9)
        header, callback, meta = rounds.plan_round(config, "n1", now=now, expected_delays=delays or None)
        jobs = _jobs(header, parallel)
        order = sorted(servers, key=lambda s: -delays.get(s, UNANSWERED_DELAY_S)) if parallel and delays else servers
        assert [j["server"] for j in jobs] == order, case
        deadline = now + rounds.round_budget_s(config)
        assert meta.deadline_at == pytest.approx(deadline) and meta.dispatched_at == now
        assert meta.round_id.startswith("n1-") and meta.servers == servers
        expires = datetime.fromtimestamp(meta.deadline_at + rounds.EXPIRES_CLOCK_SLACK_S, tz=UTC)
        signatures = header if parallel else list(header[0].tasks)
        for sig, job in zip(signatures, jobs, strict=True):
            assert sig.task == QUERY_TASK and sig.options["queue"] == queue_for("n1"), case
            assert sig.options["expires"] == expires
            assert (job["node"], job["round_id"], job["deadline_at"]) == ("n1", meta.round_id, meta.deadline_at)
            assert job["report_to"] == Keys("t").outcomes("n1", meta.round_id) and job["key_prefix"] == "t"
            assert "polite" not in job
        assert callback.args == (rounds.round_reference(meta),)
        assert callback.options["queue"] == queue_for("n1")
        assert callback.options["expires"] == expires + timedelta(seconds=rounds.CLOSE_GRACE_S)
        assert len(parallel and header or header[0].tasks) == len(servers)


def test_the_callback_carries_a_reference_not_the_metadata():
    config = _config(servers=[f"10.0.0.{i}" for i in range(1, 41)])
    _, callback, meta = rounds.plan_round(config, "n1", now=1000.0)
    assert rounds.round_reference(meta) == {"round_id": meta.round_id, "node": "n1", "key_prefix": "t"}
    assert len(repr(callback.args)) < 200, "the same size whatever the servers"


def test_only_the_hub_nodes_jobs_carry_the_clusters_budget():
    hub = {"address": "10.0.0.1", "node": "head", "max_requests_per_minute": 7, "max_requests_per_10_minutes": 30}
    config = _config(servers=["time.example", "time2.example"], hub=hub)
    header, _, _ = rounds.plan_round(config, "head", now=1000.0)
    assert [j["polite"] for j in _jobs(header, True)] == [[7, 30], [7, 30]]
    header, _, meta = rounds.plan_round(config, "n1", now=1000.0)
    (job,) = _jobs(header, True)
    assert job["server"] == "10.0.0.1" and "polite" not in job, "a node through the hub asks the LAN server alone"
    assert meta.hub is not None and meta.hub["node"] == "head"


def test_an_unreachable_server_is_probed_not_retried():
    from orchestrator.sources import Reach

    config = _config(servers=["10.0.0.1", "10.0.0.2"])
    header, _, _ = rounds.plan_round(config, "n1", now=1000.0, reach={"10.0.0.1": Reach(0, Reach.SIZE)})
    probe, normal = _jobs(header, True)
    assert probe["retry_waits_s"] == [] and normal["retry_waits_s"] != []


def test_build_round_is_the_same_plan_as_a_chord():
    config = _config(servers=["10.0.0.1", "10.0.0.2"])
    sig, meta = rounds.build_round(config, "n1", now=1000.0)
    assert [t.kwargs["job"]["server"] for t in sig.tasks] == ["10.0.0.1", "10.0.0.2"]
    assert sig.body.args == (rounds.round_reference(meta),)


def test_a_handle_closes_its_round_a_grace_after_the_deadline_and_is_rebuilt_from_its_open_entry():
    config = _config(servers=["10.0.0.1"])
    _, _, meta = rounds.plan_round(config, "n1", now=1000.0)
    handle = rounds._handle_from_entry("n1", meta.round_id, {"meta": meta.as_dict(), "callback_id": "cb"})
    assert (handle.round_id, handle.node, handle.callback_id, handle.meta) == (meta.round_id, "n1", "cb", meta)
    assert handle.close_at == meta.deadline_at + rounds.CLOSE_GRACE_S
    assert rounds.RoundHandle("r", "n1", 5.0, "cb").reported() == [], "no metadata: nothing to read"


def test_no_collection_while_a_round_is_sent_and_collection_restored_as_it_was():
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with rounds._no_collection():
                assert not gc.isenabled()
            assert gc.isenabled() == enabled
            with pytest.raises(RuntimeError), rounds._no_collection():
                raise RuntimeError("sending failed")
            assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


# -- closing a round whose callback never came --------------------------------------------------------------

class ClosingStore:
    """What :func:`rounds.close` asks of the store: the reported outcomes, the claim, the late outcomes."""

    def __init__(self, reported, *, finished=False):
        self.reported, self.finished = reported, finished
        self.forgotten: list = []
        self.recorded: list = []

    def reported_outcomes(self, node, round_id):
        if isinstance(self.reported, Exception):
            raise self.reported
        return self.reported

    def record_round(self, node, round_id, build, **_):
        if self.finished:
            return None
        self.finished = True
        record = build([], 0, time.time())
        self.recorded.append(record)
        return record

    def complete_round(self, *a, **k):
        return None

    def forget_open_round(self, node, round_id):
        self.forgotten.append((node, round_id))


def _handle(servers) -> rounds.RoundHandle:
    config = _config(servers=servers)
    _, _, meta = rounds.plan_round(config, "n1", now=1000.0)
    return rounds.RoundHandle(meta.round_id, "n1", meta.deadline_at, "cb", meta=meta)


def test_a_round_is_closed_from_what_its_tasks_reported(monkeypatch):
    handle = _handle(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    store = ClosingStore([ok(s, delay=0.002, unc=0.001) for s in handle.meta.servers[:2]])
    monkeypatch.setattr(rounds, "_store", lambda meta: store)
    record = rounds.close(handle)
    assert record is store.recorded[0] and record["closed_by"] == ClosedBy.DEADLINE
    assert [s["reason"] for s in record["servers"] if s["server"] == "10.0.0.3"] == ["no_result"]
    assert store.forgotten == []


def test_a_round_finished_meanwhile_is_only_forgotten(monkeypatch):
    handle = _handle(["10.0.0.1"])
    store = ClosingStore([], finished=True)
    monkeypatch.setattr(rounds, "_store", lambda meta: store)
    assert rounds.close(handle) is None
    assert store.forgotten == [("n1", handle.round_id)]


def test_unreadable_reports_still_close_the_round_as_an_outage(monkeypatch):
    handle = _handle(["10.0.0.1", "10.0.0.2"])
    store = ClosingStore(ConnectionError("hiccup"))
    monkeypatch.setattr(rounds, "_store", lambda meta: store)
    record = rounds.close(handle)
    assert record["quality"] == Quality.OUTAGE and record["latest"] is None


def test_overdue_rounds_are_adopted_and_finished_ones_forgotten(monkeypatch):
    config = _config(servers=["10.0.0.1"])
    _, _, meta = rounds.plan_round(config, "n1", now=1000.0)

    class Overdue:
        client = None
        forgotten: list = []

        def overdue_open_rounds(self, now):
            assert now == 5000.0
            return [("n1", meta.round_id, {"meta": meta.as_dict(), "callback_id": "cb"}), ("n2", "gone", None)]

        def forget_open_round(self, node, round_id):
            self.forgotten.append((node, round_id))

    store = Overdue()
    monkeypatch.setattr(rounds, "store_for", lambda service: store)
    (handle,) = rounds.overdue_handles(config, now=5000.0)
    assert (handle.round_id, handle.meta) == (meta.round_id, meta)
    assert store.forgotten == [("n2", "gone")]
    assert isinstance(handle.meta, RoundMeta)
