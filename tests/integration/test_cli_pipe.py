"""``chronotick-ntp latest ... | head -1``: a reader that stops early ends the command quietly, exit 141.

141 is what a shell reports for a program killed by SIGPIPE (``yes | head -1`` under
``set -o pipefail``): Python ignores SIGPIPE and raised ``BrokenPipeError`` instead,
with a traceback on stderr, once the reader was gone.
"""

import os
import shlex
import subprocess
import sys
import uuid

import pytest
import yaml

from orchestrator import cli, rounds
from orchestrator.callback import finish
from orchestrator.outcomes import ClosedBy
from orchestrator.store import Store
from workers import config as config_mod

from ..conftest import REPO, wait_for, write_config
from ..unit.samples import ok

pytestmark = pytest.mark.integration

SERVERS = ["127.0.0.1:9", "127.0.0.1:10"]
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored")


def _publish(config, node: str, store: Store) -> dict:
    """One round of ``node``, finished as the callback finishes it: latest, history, stats, updates."""
    _, meta = rounds.build_round(config, node)
    return finish(meta, [ok(SERVERS[0], delay=0.010, unc=0.005), ok(SERVERS[1], delay=0.012, unc=0.006)], store,
                  closed_by=ClosedBy.CALLBACK)


@pytest.fixture
def published(tmp_path, key_prefix, redis_client, redis_url):
    node = f"pipe-{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path, SERVERS, key_prefix=key_prefix)
    config = config_mod.load(path)
    store = Store(redis_client, prefix=key_prefix)
    _publish(config, node, store)
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO)}
    env.pop(config_mod.ENV_CONFIG, None)
    return path, node, config, store, env


def _argv(*args) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


@pytest.mark.parametrize("command", [["latest"], ["latest", "--json"], ["status", "--json"], ["status"],
                                     ["servers"], ["servers", "--json"]])
def test_a_closed_pipe_ends_each_reading_command_quietly(published, command, tmp_path):
    """The reader is gone before the first byte: every write fails, deterministically."""
    path, node, _, _, env = published
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(_argv(*command, "--config", str(path), "--node", node), stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO), timeout=60)
    finally:
        os.close(write_end)
    assert not any(word in result.stderr for word in NOISE), result.stderr
    assert result.returncode == cli.EXIT_CLOSED_PIPE == 141, result.stderr


def _pipeline(argv: list[str], env: dict, tmp_path) -> subprocess.Popen:
    """``argv | head -1`` in bash with pipefail; the command's stderr and exit status go to files."""
    script = (f"set -o pipefail; {shlex.join(argv)} 2>{shlex.quote(str(tmp_path / 'err'))} | head -1; "
              f"echo ${{PIPESTATUS[0]}} > {shlex.quote(str(tmp_path / 'status'))}")
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))


def _quiet_with_141(tmp_path) -> None:
    err = (tmp_path / "err").read_text()
    assert not any(word in err for word in NOISE), err
    assert (tmp_path / "status").read_text().strip() == "141", err


def test_latest_follow_into_head_stops_quietly_when_head_is_done(published, tmp_path):
    """``head -1`` takes the first line and exits; the next measurement finds the pipe closed."""
    path, node, config, store, env = published
    proc = _pipeline(_argv("latest", "--config", str(path), "--node", node, "--follow"), env, tmp_path)
    first = proc.stdout.readline()
    assert first.startswith(f"node {node}: offset"), first  # head printed the first line, and exited

    def ended():
        if proc.poll() is None:
            _publish(config, node, store)  # the next measurement: the follower writes it, to nobody
            return False
        return True

    wait_for(ended, timeout_s=30, interval_s=0.3, what="the follower to end once head was done")
    _quiet_with_141(tmp_path)


def test_a_long_status_into_head_stops_quietly(tmp_path, key_prefix, redis_url):
    """``status --json`` for 400 nodes is more than a pipe holds: the rest is written after head is gone."""
    path = write_config(tmp_path, SERVERS, key_prefix=key_prefix)
    document = yaml.safe_load(path.read_text())
    document["ntp_service"]["nodes"] = [f"node-{i:04d}" for i in range(400)]
    path.write_text(yaml.safe_dump(document))
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO)}
    proc = _pipeline(_argv("status", "--config", str(path), "--json"), env, tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert out == "{\n", out[:200]
    _quiet_with_141(tmp_path)
