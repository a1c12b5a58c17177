"""``chronotick-ntp up``: one box in one command, stopped by Ctrl-C, its Redis data kept across restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml

from orchestrator.consumer import NtpReader
from simulator.local import free_tcp_port, stop_process
from simulator.server import Behaviour
from workers import config as config_mod

from ..conftest import REPO, wait_for

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _up(path, data_dir, exporter_port, log):
    env = {k: v for k, v in os.environ.items() if k not in (config_mod.ENV_REDIS_URL, config_mod.ENV_CONFIG)}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "up", "--config", str(path), "--node",
                             "upnode", "--data-dir", str(data_dir), "--exporter-port", str(exporter_port),
                             "--redis-port", "0"],
                            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)
    first, second = proc.stdout.readline(), proc.stdout.readline()
    url = re.search(r"Redis at (redis://\S+)", first)
    assert url and "private" in first, (first, log.read_text()[-2000:])
    pids = [int(p) for p in re.findall(r"pid (\d+)", second)]
    assert len(pids) == 3, second
    return proc, url.group(1), pids


def test_up_runs_one_box_and_ctrl_c_stops_it_all(tmp_path, simulator):
    _, servers = simulator({f"s{i}": Behaviour(offset_s=0.002, delay_s=0.002 * (i + 1)) for i in range(3)})
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": list(servers.values()), "timeout_seconds": 0.3,
                                      "retry_delay": 0.2, "max_retries": 2},
                              "timing": {"warm_up": {"duration_seconds": 3, "measurement_interval": 0.5},
                                         "normal_operation": {"measurement_interval": 2}}},
        "ntp_service": {"key_prefix": "box"}}))
    data_dir, port = tmp_path / "data", free_tcp_port()
    proc, url, pids = _up(path, data_dir, port, tmp_path / "up.log")
    try:
        reader = NtpReader(url, prefix="box")
        wait_for(lambda: len(reader.history("upnode")) >= 3, timeout_s=60, what="the box's first rounds")
        before = len(reader.history("upnode"))
        reader.close()
        metrics = wait_for(lambda: _scrape(port), what="the exporter")
        assert "chronotick_ntp_redis_up 1.0" in metrics and 'node="upnode"' in metrics  # it reads the box's Redis
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0, (tmp_path / "up.log").read_text()[-2000:]
    finally:
        stop_process(proc)
    assert "up: stopped" in proc.stdout.read()
    assert not [pid for pid in pids if _alive(pid)]  # every child stopped
    assert any(data_dir.rglob("*.aof*"))  # Redis kept its append-only file

    again, url2, pids2 = _up(path, data_dir, free_tcp_port(), tmp_path / "up2.log")
    try:
        reader = NtpReader(url2, prefix="box")
        assert len(reader.history("upnode")) >= before  # what the first run published, still there
        reader.close()
    finally:
        again.send_signal(signal.SIGINT)
        again.wait(timeout=60)
        stop_process(again)
    assert not [pid for pid in pids2 if _alive(pid)]


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return None
