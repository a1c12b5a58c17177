"""The README's first command: the offline demo runs end to end and shows every view."""

import subprocess
import sys

import pytest

from workers import config as config_mod

from ..conftest import REPO

pytestmark = pytest.mark.integration


def test_the_offline_demo_runs_a_round_and_shows_latest_and_status(tmp_path):
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "PYTHONPATH": str(REPO), config_mod.ENV_NODE: "demo-node"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--rounds", "3",
                           "--plot", str(tmp_path / "demo.png")], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "--- round 3 of 3 ---" in out and "chosen: 127.0.0.1:" in out
    assert "falseticker" in out  # the demo's fast liar
    assert " late " in out  # its dead server, and its spoofed one, were still out when the rounds were decided
    assert "node demo-node: offset" in out  # what ChronoTick reads
    # Its bad servers cost neither round time nor retries (issue #18) ...
    status = {line.split("  ")[1].strip(): line.split()[-1] for line in out.splitlines()
              if line.startswith("  ") and line.rstrip().endswith(("ok", "MISS")) and "<=" in line}
    for target in ("round time, mean", "round time, p99", "starvation rounds", "retries / attempts"):
        assert status[target] == "ok", out
    # ... and the one they miss says so, in one line.
    assert status["refused / received replies"] == "MISS"
    assert "refused / received replies: missed only because of the demo's" in out
    assert "unreachable" in out or "failing" in out  # chronotick-ntp servers: the dead one
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
