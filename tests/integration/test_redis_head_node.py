"""configs/redis-head-node.conf: a real redis-server started with it has every setting the cluster relies on.

Only what a test must change is overridden on the command line, after the file
(Redis applies the file first): a free port, a temporary directory and pid
file, and the password -- which the shipped file never holds.
"""

import re
import shutil
import subprocess
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from simulator.processes import free_tcp_port, stop_process

from ..conftest import REPO

pytestmark = pytest.mark.integration

CONF = REPO / "configs" / "redis-head-node.conf"


def _client(port: int, password: str | None = None) -> redis.Redis:
    """No retries: redis-py retries a refused password (a ConnectionError) with a back-off, seconds each."""
    return redis.Redis(port=port, password=password, socket_timeout=2, socket_connect_timeout=0.5,
                       decode_responses=True, retry=Retry(NoBackoff(), 0))


def _settings() -> dict[str, str]:
    """The file's active directives (comments and blank lines left out)."""
    lines = [line.strip() for line in CONF.read_text().splitlines()]
    return dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))


def test_the_shipped_file_holds_no_secret_and_names_the_cluster_address_commented():
    text = CONF.read_text()
    assert "requirepass" not in _settings() and "masterauth" not in _settings()
    assert re.search(r"^# bind 127\.0\.0\.1 \d+\.\d+\.\d+\.\d+$", text, re.M)  # the LAN address, for the operator
    assert re.search(r"^# include /etc/redis/\S+$", text, re.M)  # the password's root-only file


def test_redis_started_with_the_head_node_config_has_its_settings_and_refuses_strangers(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    port, password = free_tcp_port(), "test-only-not-a-secret"
    log = tmp_path / "redis.log"
    proc = subprocess.Popen(["redis-server", str(CONF), "--port", str(port), "--dir", str(tmp_path),
                             "--pidfile", str(tmp_path / "redis.pid"), "--requirepass", password],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    stranger, client = _client(port), _client(port, password)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["bind"] == "127.0.0.1"
        assert config["protected-mode"] == "yes"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == ""  # the append-only file is the persistence
        assert config["requirepass"] == password
        assert config["dir"] == str(tmp_path)
        # Without the password, nothing: not a read, not a write.
        for command in (lambda: stranger.ping(), lambda: stranger.get("x"), lambda: stranger.set("x", 1)):
            with pytest.raises(redis.AuthenticationError):
                command()
        with pytest.raises(redis.AuthenticationError):
            _client(port, "wrong").ping()
        # And what is written survives a restart, through the append-only file.
        client.set("chronotick:ntp:probe", "kept")
        with pytest.raises(redis.ConnectionError):  # the server closes the connection as it stops
            client.execute_command("SHUTDOWN")  # a clean stop: the append-only file is flushed
        assert proc.wait(timeout=10) == 0
    finally:
        stranger.close()
        client.close()
        stop_process(proc)
    proc = subprocess.Popen(["redis-server", str(CONF), "--port", str(port), "--dir", str(tmp_path),
                             "--pidfile", str(tmp_path / "redis.pid"), "--requirepass", password],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    client = _client(port, password)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                value = client.get("chronotick:ntp:probe")
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
        assert value == "kept"
    finally:
        client.close()
        stop_process(proc)
