"""workers/outcome_reports.py against a real Redis: batched, bounded in time, never in a task's way."""

import json
import logging
import threading
import time

import pytest
import redis

from workers.outcome_reports import Reporter

from ..conftest import wait_for
from ..unit.samples import ok

pytestmark = pytest.mark.integration


def job(key: str, server: str, deadline_at: float) -> dict:
    return {"report_to": key, "server": server, "deadline_at": deadline_at, "round_id": "r"}


def test_reports_queued_together_are_written_in_one_round_trip(redis_client, key_prefix):
    gate = threading.Event()

    def client():  # the writer waits here until every report is queued
        gate.wait(10)
        return redis_client

    reporter = Reporter(client, keep_after_deadline_s=60)
    key, deadline_at = f"{key_prefix}:outcomes:r1", time.time() + 5
    servers = [f"127.0.0.1:{1000 + i}" for i in range(40)]
    reporter.report(job(key, servers[0], deadline_at), ok(servers[0], delay=0.02, unc=0.01))
    wait_for(lambda: any(t.name == "chronotick-reporter" for t in threading.enumerate()), what="the reporter thread")
    for server in servers[1:]:
        reporter.report(job(key, server, deadline_at), ok(server, delay=0.02, unc=0.01))
    assert not reporter.drain(timeout_s=0.05)  # held back: not written yet, and drain says so
    gate.set()
    assert reporter.drain(timeout_s=10)
    assert reporter.written == 40 and reporter.batches <= 2  # the first one alone, then the other 39 at once
    stored = redis_client.hgetall(key)
    assert sorted(stored) == sorted(servers)
    assert json.loads(stored[servers[7]])["sample"]["server"] == servers[7]
    # Kept until a minute after the round's deadline, not forever.
    assert deadline_at + 55 < time.time() + redis_client.ttl(key) <= deadline_at + 61


def test_a_job_without_a_report_key_writes_nothing(redis_client):
    calls = []
    reporter = Reporter(lambda: calls.append(1) or redis_client)
    reporter.report({"server": "127.0.0.1:9", "deadline_at": time.time(), "round_id": "r"}, {"status": "ok"})
    assert reporter.drain(timeout_s=0.1) and calls == [] and reporter.written == 0


def test_redis_away_costs_a_warning_not_the_task(redis_client, key_prefix, caplog):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = [redis.Redis(port=port, socket_connect_timeout=0.5)]
    reporter = Reporter(lambda: target[0])
    with caplog.at_level(logging.WARNING, logger="workers.outcome_reports"):
        reporter.report(job(f"{key_prefix}:outcomes:r2", "127.0.0.1:9", time.time()), {"status": "ok"})
        assert reporter.drain(timeout_s=10)  # failed, and no longer pending
    assert reporter.written == 0
    assert "cannot report 1 outcome(s)" in caplog.text and "ConnectionError" in caplog.text
    # The writer survives: the next report is written once Redis is back.
    target[0] = redis_client
    reporter.report(job(f"{key_prefix}:outcomes:r2", "127.0.0.1:9", time.time()), {"status": "ok"})
    assert reporter.drain(timeout_s=10) and reporter.written == 1
    assert redis_client.hexists(f"{key_prefix}:outcomes:r2", "127.0.0.1:9")
