"""The README's first command: the offline demo runs end to end and shows every view."""

import subprocess
import sys

import pytest

from workers import config as config_mod

from ..conftest import REPO

pytestmark = pytest.mark.integration


def test_the_offline_demo_runs_a_round_and_shows_latest_and_status(tmp_path):
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "PYTHONPATH": str(REPO), config_mod.ENV_NODE: "demo-node"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--rounds", "1",
                           "--plot", str(tmp_path / "demo.png")], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "--- round 1 of 1 ---" in out and "chosen: 127.0.0.1:" in out
    assert "falseticker" in out  # the demo's fast liar
    assert "node demo-node: offset" in out  # what ChronoTick reads
    assert "demo-node: MISS" in out and "retries / requests" in out  # its faulty servers miss targets
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
