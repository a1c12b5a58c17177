"""Redis Sentinel: the service survives the loss of its Redis primary.

Real processes on loopback: a primary, a replica and three Sentinels
(``redis-server <conf> --sentinel``), ``chronotick-ntp worker`` and
``chronotick-ntp beat`` pointed at the Sentinels' URL.  The primary is SIGKILLed
mid-run; the Sentinels promote the replica; rounds must publish again soon,
none twice, and the readers (consumer API, ``latest``, ``status``) must follow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator.reader import NtpReader
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
from simulator.processes import SentinelGroup, stop_process
from workers import config as config_mod
from workers import redisurl

from ..conftest import REPO, wait_for

pytestmark = pytest.mark.integration

NODE = "sentinelnode"
PREFIX = "sent"
#: The issue's bound: rounds publish again within this long of the promotion (s).
RECOVERY_BOUND_S = 15.0


def _run(cli_args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *cli_args], env=env, cwd=str(REPO),
                            stdout=log, stderr=subprocess.STDOUT)


def test_rounds_survive_the_loss_of_the_redis_primary(tmp_path, simulator):
    _, servers = simulator({"a": Behaviour(delay_s=0.002), "b": Behaviour(delay_s=0.004)})
    group = SentinelGroup(tmp_path, master_name="ntp-master").start()
    try:
        path = tmp_path / "sentinel.yaml"
        path.write_text(yaml.safe_dump({
            "clock_measurement": {
                "ntp": {"servers": list(servers.values()), "timeout_seconds": 0.3, "retry_delay": 0.2,
                        "max_retries": 2},
                "timing": {"warm_up": {"duration_seconds": 0, "measurement_interval": 0.5},
                           "normal_operation": {"measurement_interval": 0.5}}},
            "ntp_service": {"redis_url": group.url, "redis_master_name": "ntp-master", "key_prefix": PREFIX,
                            "nodes": [NODE]}}))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(config_mod.ENV_REDIS_URL)  # the session's Redis: this test's comes from the file
        log = open(tmp_path / "processes.log", "ab")
        worker = _run(["worker", "--config", str(path), "--node", NODE, "--loglevel", "INFO"], env, log)
        beat = _run(["beat", "--config", str(path)], env, log)
        store = Store(redisurl.connect(group.url, "ntp-master", timeout_s=5), prefix=PREFIX)

        def history_ids() -> list[str]:
            try:
                return [r["round_id"] for r in store.history(NODE, count=10_000)]
            except Exception:  # noqa: BLE001 -- a failover in progress; ask again
                return []

        try:
            wait_for(lambda: len(history_ids()) >= 4, timeout_s=60, what="rounds through the Sentinels' primary")
            client = store.client
            assert client.wait(1, 3000) == 1  # the replica has what was published so far
            before = history_ids()

            group.kill_primary()
            killed = time.monotonic()
            wait_for(lambda: group.master_port() == group.replica.port, timeout_s=30,
                     what="the Sentinels to promote the replica")
            promoted, promoted_wall = time.monotonic(), time.time()

            def published_after_promotion():
                latest = store.latest(NODE) if history_ids() else None
                return latest is not None and latest["published_at"] > promoted_wall

            wait_for(published_after_promotion, timeout_s=RECOVERY_BOUND_S,
                     what=f"a round published within {RECOVERY_BOUND_S:g} s of the promotion")
            recovered_s = time.monotonic() - promoted
            print(f"promotion {promoted - killed:.1f} s after the SIGKILL; "
                  f"first round published {recovered_s:.1f} s after the promotion")
            assert worker.poll() is None and beat.poll() is None

            after = history_ids()
            assert len(after) == len(set(after)), "a round was published twice"
            assert set(before) <= set(after), "history from before the failover was lost"
            assert len(after) > len(before)

            # The consumer API, `latest` and `status` all reach the new primary.
            with NtpReader(group.url, prefix=PREFIX, master_name="ntp-master") as reader:
                assert reader.latest(NODE) is not None
            cli_env = {k: v for k, v in env.items() if k != config_mod.ENV_REDIS_URL}
            for command, ok in (("latest", (0,)), ("status", (0, 1))):
                done = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, "--config", str(path),
                                       "--node", NODE], env=cli_env, cwd=str(REPO), capture_output=True,
                                      text=True, timeout=60)
                assert done.returncode in ok, f"{command}: {done.stdout}\n{done.stderr}"
                assert NODE in done.stdout or "offset" in done.stdout
        finally:
            stop_process(beat)
            stop_process(worker)
            log.close()
    finally:
        group.stop()

