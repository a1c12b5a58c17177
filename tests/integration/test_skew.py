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

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator import rounds
from orchestrator.consumer import NtpReader
from orchestrator.store import Store
from simulator.local import stop_process
from simulator.server import Behaviour
from workers import config as config_mod

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
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    env.pop(config_mod.ENV_NODE, None)
    worker = subprocess.Popen([*_faketime(skew_s), sys.executable, "-m", "orchestrator.cli", "worker",
                               "--config", str(path), "--node", node, "--concurrency", "5"], env=env,
                              cwd=str(REPO), stdout=open(tmp_path / "w.log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: queue_has_worker(redis_url, node), what="the skewed worker")
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
