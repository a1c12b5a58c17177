"""workers.outcome_reports: outcomes reported to their round's hash, many per round trip, from one thread; a
drain that waits for them, within its bound; Redis away costs reports, never the thread -- on a Redis in
memory (:mod:`tests.unit.memory_redis`).

A query task's report read by the closer, with a real Redis and worker: tests/integration/test_outcome_reports.py.
"""

from __future__ import annotations

import json
import logging
import random
import threading

import redis

from workers.outcome_reports import DEFAULT_KEEP_AFTER_DEADLINE_S, Reporter

from .memory_redis import MemoryRedis, Pipeline

SEED = 20270308


class SlowRedis(MemoryRedis):
    """Each pipeline's round trip waits for ``gate`` (and then takes ``delay_s``); ``fail`` makes it raise."""

    def __init__(self, *, delay_s: float = 0.0):
        super().__init__(now=0.0)  # before every deadline here
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = delay_s
        self.fail: Exception | None = None
        self.batch_sizes: list[int] = []

    def pipeline(self, transaction=True):
        outer = self

        class Slow(Pipeline):
            def execute(self):
                outer.gate.wait()
                if outer.delay_s:
                    threading.Event().wait(outer.delay_s)
                if outer.fail is not None:
                    raise outer.fail
                outer.batch_sizes.append(sum(1 for name, _, _ in self.queued if name == "hset"))
                return super().execute()

        return Slow(self)


def _job(round_no: int, server: str, *, deadline_at: float = 2000.0) -> dict:
    return {"report_to": f"t:ntp:n1:outcomes:r{round_no}", "server": server, "deadline_at": deadline_at}


def test_no_report_to_no_report_and_no_thread():
    reporter = Reporter(lambda: MemoryRedis())
    reporter.report({"report_to": None, "server": "a", "deadline_at": 1.0}, {"status": "ok"})
    reporter.report({"server": "a", "deadline_at": 1.0}, {"status": "ok"})
    assert reporter._thread is None and reporter.drain(0.01) and reporter.written == 0


def test_random_reports_from_many_threads_all_land_once_each_with_their_rounds_expiry():
    """The oracle: every (round, server)'s last report is its hash field, as compact JSON; each hash expires
    ``keep_after_deadline_s`` after its round's deadline; nothing is written twice or lost."""
    rng = random.Random(SEED)
    client = SlowRedis(delay_s=0.002)
    reporter = Reporter(lambda: client, keep_after_deadline_s=30.0)
    plan = [(rng.randint(0, 4), f"s{rng.randint(0, 9)}", {"status": rng.choice(["ok", "failed"]), "n": i,
                                                          "offset_s": rng.uniform(-1, 1)})
            for i in range(300)]
    deadlines = {r: 1000.0 + 7.5 * r for r in range(5)}
    chunks = [plan[i::6] for i in range(6)]
    threads = [threading.Thread(target=lambda c=c: [reporter.report(_job(r, s, deadline_at=deadlines[r]), o)
                                                    for r, s, o in c]) for c in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reporter.drain(5.0)
    assert reporter.written == len(plan)
    assert 1 <= reporter.batches < len(plan) / 2, "many reports per round trip"
    assert sum(client.batch_sizes) == len(plan)
    for key in {_job(r, s)["report_to"] for r, s, _ in plan}:
        stored = client.hgetall(key)
        assert set(stored) == {s for r, s, _ in plan if _job(r, s)["report_to"] == key}
        for server, raw in stored.items():  # threads race: some report of the server's, whole
            assert json.loads(raw) in [o for r, s, o in plan if _job(r, s)["report_to"] == key and s == server]
            assert ", " not in raw and ": " not in raw, "compact JSON"
        round_no = int(key.rsplit("r", 1)[1])
        assert client.expires_at[key] == int(deadlines[round_no] + 30.0)


def test_one_thread_reports_in_order_and_the_last_report_of_a_server_wins():
    client = MemoryRedis(now=0.0)
    reporter = Reporter(lambda: client)
    for n in range(20):
        reporter.report(_job(1, "a"), {"n": n})
    assert reporter.drain(1.0)
    assert json.loads(client.hgetall(_job(1, "a")["report_to"])["a"]) == {"n": 19}
    assert client.expires_at[_job(1, "a")["report_to"]] == int(2000.0 + DEFAULT_KEEP_AFTER_DEADLINE_S)


def test_a_drain_waits_at_most_its_bound_then_for_everything():
    client = SlowRedis()
    client.gate.clear()  # Redis stuck
    reporter = Reporter(lambda: client)
    reporter.report(_job(1, "a"), {"n": 1})
    assert reporter.drain(0.05) is False, "a callback must not hang on a stuck Redis"
    reporter.report(_job(1, "b"), {"n": 2})
    client.gate.set()
    assert reporter.drain(2.0) is True
    assert set(client.hgetall(_job(1, "a")["report_to"])) == {"a", "b"} and reporter.written == 2


def test_redis_away_loses_the_batch_not_the_thread(caplog):
    client = SlowRedis()
    client.fail = redis.ConnectionError("Redis is away")
    reporter = Reporter(lambda: client)
    with caplog.at_level(logging.WARNING, logger="workers.outcome_reports"):
        reporter.report(_job(1, "a"), {"n": 1})
        assert reporter.drain(1.0), "a failed write is no longer pending"
    assert reporter.written == 0
    assert any("cannot report 1 outcome(s) (ConnectionError: Redis is away)" in r.getMessage() for r in caplog.records)
    client.fail = None
    reporter.report(_job(1, "b"), {"n": 2})
    assert reporter.drain(1.0) and reporter.written == 1
    assert reporter._thread is not None and reporter._thread.is_alive()
