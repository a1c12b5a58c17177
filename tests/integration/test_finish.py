"""Finishing a round is one atomic Redis step: a connection lost at the worst moment loses nothing."""

import socket
import threading
import uuid

import pytest
import redis

from orchestrator import rounds
from orchestrator.callback import finish
from orchestrator.outcomes import ClosedBy
from orchestrator.store import Store
from workers import config as config_mod

from ..conftest import write_config
from ..unit.samples import ok

pytestmark = pytest.mark.integration


class CuttingProxy:
    """A TCP proxy to Redis on loopback that cuts the connection instead of forwarding an ``EXEC``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, sink, from_client):
        try:
            while data := source.recv(65536):
                if from_client and b"\r\nEXEC\r\n" in data:
                    self.cut.set()
                    break  # the commands queued after MULTI never run
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_a_connection_lost_at_exec_leaves_the_round_for_the_closer(redis_server, redis_client, tmp_path,
                                                                    key_prefix):
    node = f"cut-{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path, ["127.0.0.1:9", "127.0.0.1:10"], key_prefix=key_prefix)
    _, meta = rounds.build_round(config_mod.load(path), node)
    outcomes = [ok("127.0.0.1:9", delay=0.01, unc=0.005), ok("127.0.0.1:10", delay=0.02, unc=0.006)]
    proxy = CuttingProxy(redis_server.port)
    try:
        cut_store = Store(redis.Redis(port=proxy.port, socket_timeout=5, decode_responses=True), prefix=key_prefix)
        with pytest.raises(redis.ConnectionError):
            finish(meta, outcomes, cut_store, closed_by=ClosedBy.CALLBACK)
        assert proxy.cut.is_set()
    finally:
        proxy.close()
    store = Store(redis_client, prefix=key_prefix)
    # Nothing half-written: no claim that would stop the closer, no latest, no history, no counts.
    assert not redis_client.exists(store.keys.round_claim(node, meta.round_id))
    assert store.latest(node) is None and store.history(node) == [] and store.stats(node)["rounds"] == 0

    handle = rounds.RoundHandle(round_id=meta.round_id, node=node, deadline_at=meta.deadline_at,
                                callback_id=str(uuid.uuid4()), meta=meta)
    record = rounds.close(handle)
    assert record is not None and record["closed_by"] == ClosedBy.DEADLINE
    assert [r["round_id"] for r in store.history(node)] == [meta.round_id]
    assert store.stats(node)["rounds"] == 1
    # And once finished, nobody finishes it again.
    assert finish(meta, outcomes, store, closed_by=ClosedBy.CALLBACK) is None
    assert len(store.history(node)) == 1


def test_a_round_leaves_no_celery_result_no_report_and_no_subscription(worker, simulator, tmp_path, key_prefix,
                                                                       redis_client):
    from simulator.ntpserver import Behaviour

    from ..conftest import TEST_NODE, wait_for

    _, servers = simulator({"a": Behaviour(delay_s=0.002), "b": Behaviour(delay_s=0.003)})
    config = config_mod.load(write_config(tmp_path, list(servers.values()), key_prefix=key_prefix))
    store = Store(redis_client, prefix=key_prefix)

    def subscriptions():
        return sum(int(c.get("sub", 0)) for c in redis_client.client_list())

    def results():
        return set(redis_client.scan_iter("celery-task-meta-*"))

    before, stored = subscriptions(), results()
    waited = rounds.dispatch(config, TEST_NODE)
    record = waited.wait()
    assert record is not None and record["servers_used"] == 2
    # No task stores a result (the outcomes travel in the chord's join, the record is in history);
    # the reports went with the round's completion.
    assert results() <= stored
    wait_for(lambda: not redis_client.exists(store.keys.outcomes(TEST_NODE, waited.round_id)),
             what="the round's reports to go with its completion")
    # ... and this process stopped listening to the node's round events.
    wait_for(lambda: subscriptions() == before, what="the round's events subscription to end")

    # As the beat sends it: nobody waits, so not even the callback's return value is stored.
    unwatched = rounds.dispatch(config, TEST_NODE, fan_out=True)
    wait_for(unwatched.ready, what="the round to finish")
    assert store.round_record(TEST_NODE, unwatched.round_id)["servers_used"] == 2
    assert results() <= stored
    assert not redis_client.exists(store.keys.outcomes(TEST_NODE, unwatched.round_id))
    assert subscriptions() == before


def test_history_is_trimmed_by_age_and_capped_by_count(redis_client, key_prefix):
    import time

    from ..conftest import wait_for

    store = Store(redis_client, prefix=key_prefix)

    def record(i):
        now = time.time()
        return {"round_id": f"r{i}", "node": "aged", "quality": "starvation", "dispatched_at": now - 0.1,
                "finished_at": now, "duration_s": 0.1, "servers_used": 0, "servers_total": 0, "servers": [],
                "agreement": None, "filter": None, "candidate": None, "latest": None}

    window_h = 1.5 / 3600  # a window of 1.5 s
    for i in range(3):
        store.publish_round(record(i), history_length=100, window_size=20, history_hours=window_h)
    assert redis_client.xlen(store.keys.history("aged")) == 3
    first_written = time.time()
    wait_for(lambda: time.time() > first_written + 2.0, what="the first records to age out of the window")
    store.publish_round(record(3), history_length=100, window_size=20, history_hours=window_h)
    assert [r["round_id"] for r in store.history("aged")] == ["r3"]  # older than the window: trimmed (MINID)
    for i in range(4, 10):
        store.publish_round(record(i), history_length=4, window_size=20, history_hours=24)
    assert [r["round_id"] for r in store.history("aged")] == ["r9", "r8", "r7", "r6"]  # and capped by count
    assert store.history("aged")[0]["detail"] == "compact"


def test_an_outage_round_takes_no_reach_bit_and_is_exported_apart(redis_client, key_prefix, tmp_path):
    """Issue #25: a round no worker took (its node cut off) cost every server a reach bit and counted as starvation."""
    from prometheus_client import generate_latest

    from orchestrator.exporter import NtpCollector, registry_for
    from orchestrator.leader import Lease
    from orchestrator.outcomes import RoundMeta
    from workers import heartbeat
    from workers.keys import Keys

    from ..unit.samples import failed

    config = config_mod.load(write_config(tmp_path, key_prefix=key_prefix, servers=["a", "b"]))
    store = Store(redis_client, prefix=key_prefix)
    now = float(redis_client.time()[0])

    def meta(round_id):
        return RoundMeta.for_round(config, round_id=round_id, node="cut", dispatched_at=now,
                                          deadline_at=now + 1)

    ok_a = dict(ok("a", delay=0.01, unc=0.005), sample=dict(ok("a", delay=0.01, unc=0.005)["sample"], port=123))
    finish(meta("r1"), [ok_a, failed("b")], store, closed_by=ClosedBy.CALLBACK)
    before = {name: r.register for name, r in store.reach("cut").items()}
    assert before == {"a": 1, "b": 0}
    record = finish(meta("r2"), [], store, closed_by=ClosedBy.DEADLINE)  # nothing reported: nobody asked
    assert record is not None and record["quality"] == "outage"
    assert {name: r.register for name, r in store.reach("cut").items()} == before  # no bit shifted in
    stats = store.stats("cut")
    assert stats["outage"] == 1 and stats["starvation"] == 0

    lease = Lease(redis_client, Keys(key_prefix).beat(), ttl_s=10)
    collector = NtpCollector(redis_client, prefix=key_prefix, nodes=("cut",), beat_lease_s=10)
    text = generate_latest(registry_for(collector)).decode()
    assert 'chronotick_ntp_rounds_total{node="cut",quality="outage"} 1.0' in text
    assert 'chronotick_ntp_rounds_total{node="cut",quality="starvation"} 0.0' in text
    assert 'chronotick_ntp_live_workers{node="cut"} 0.0' in text
    assert "chronotick_ntp_beat_lease_held 0.0" in text
    assert lease.hold()
    heartbeat.beat(redis_client, Keys(key_prefix), "cut@host", ["ntp.cut"])
    try:
        text = generate_latest(registry_for(collector)).decode()
        assert "chronotick_ntp_beat_lease_held 1.0" in text
        assert f'chronotick_ntp_beat_lease_holder{{holder="{lease.token}"}} 1.0' in text
        age = float(next(line.split()[-1] for line in text.splitlines()
                         if line.startswith("chronotick_ntp_beat_lease_age_seconds ")))
        assert 0 <= age < 2
        assert 'chronotick_ntp_live_workers{node="cut"} 1.0' in text
    finally:
        lease.release()
