"""Shared fixtures: a private redis-server, a real Celery worker, loopback NTP servers.

Nothing here touches a Redis, NTP server or clock that the tests did not start:
Redis runs on a free loopback port, the worker is a ``celery worker``
subprocess consuming the test node's queue, the NTP servers are the project's
simulator and ``chronyd -x`` on loopback ports.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from simulator.ntpserver import Behaviour, NtpSimulator, free_udp_ports
from simulator.processes import RedisProcess, chronyd_binary, stop_process
from workers import config as config_mod
from workers import redisurl

REPO = Path(__file__).resolve().parent.parent

#: The node the test worker serves.
TEST_NODE = "testnode"

#: Deadline for anything the tests wait on (seconds).
WAIT_S = 30.0


def tool(name: str, *, package: str) -> str:
    """The path of a program the tests run: the copy scripts/bootstrap unpacked into .venv, else PATH."""
    for unpacked in (REPO / ".venv" / package / "usr" / "bin" / name, REPO / ".venv" / package / "usr" / "sbin" / name):
        if unpacked.is_file():
            return str(unpacked)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (Debian package {package}); run scripts/bootstrap")
    return found


def wait_for(predicate, *, timeout_s: float = WAIT_S, what: str = "condition", interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a free loopback port for the whole session."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    with tempfile.TemporaryDirectory(prefix="ct-redis-") as tmp, RedisProcess(Path(tmp)) as proc:
        yield proc
        # Let Celery drop its result subscriptions while Redis still answers.
        gc.collect()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session", autouse=True)
def _point_app_at_test_redis(request):
    """Make every config the tests load use the private Redis (never a shared one)."""
    if not any(item.get_closest_marker("integration") for item in request.session.items):
        yield
        return
    url = request.getfixturevalue("redis_url")
    old = os.environ.get(config_mod.ENV_REDIS_URL)
    os.environ[config_mod.ENV_REDIS_URL] = url
    from workers.app import app, configure

    configure(app, config_mod.from_mapping(
        {"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}}, environ=os.environ).service)
    yield
    if old is None:
        os.environ.pop(config_mod.ENV_REDIS_URL, None)
    else:
        os.environ[config_mod.ENV_REDIS_URL] = old


@pytest.fixture(autouse=True)
def _restore_app_redis(request):
    """A test that points the CLI at another Redis (a dead one, say) leaves the shared app there: undo it."""
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    url = request.getfixturevalue("redis_url")
    yield
    from workers.app import app, configure

    if app.conf.broker_url != url:
        configure(app, config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}},
                                               environ={config_mod.ENV_REDIS_URL: url}).service)


def start_worker(redis_url: str, node: str, log_path: Path, *, concurrency: int = 16) -> subprocess.Popen:
    """A real ``celery worker`` subprocess serving ``node``'s queue: the launcher the demo and benches use."""
    from simulator.processes import start_node_worker

    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url}
    env.pop(config_mod.ENV_CONFIG, None)
    config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}}, environ=env)
    try:
        return start_node_worker(config, node, log_path, loglevel="INFO", concurrency=concurrency,
                                 timeout_s=WAIT_S, environ={config_mod.ENV_REDIS_URL: redis_url})
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def worker(redis_url, tmp_path_factory):
    """One worker for the session, serving :data:`TEST_NODE`."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(redis_url, TEST_NODE, log_path)
    yield proc
    stop_process(proc)


@pytest.fixture
def redis_client(redis_url):
    """The session's Redis, as the service connects to it (:func:`workers.redisurl.connect`: replies as text)."""
    client = redisurl.connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def drop_in(redis_url, monkeypatch):
    """``drop_in(config_path, node, url=None)``: ChronoTick's drop-in (``ClockMeasurementSource``) for ``node``,
    collecting from ``url`` (default: the session's Redis); every one started is stopped after the test."""
    from orchestrator.reader import ClockMeasurementSource

    started = []

    def start(config_path, node: str, url: str | None = None):
        monkeypatch.setenv(config_mod.ENV_REDIS_URL, url or redis_url)
        source = ClockMeasurementSource(str(config_path), node)
        source.start_collection()
        started.append(source)
        return source

    yield start
    for source in started:
        source.stop_collection()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's rounds."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def simulator():
    """Start simulated servers: ``simulator({"name": Behaviour(...)})`` -> (sim, {name: "host:port"})."""
    started = []

    def start(named: dict[str, Behaviour]):
        sim = NtpSimulator.on_free_ports(list(named.values()), seed=1).start()
        started.append(sim)
        return sim, {name: f"127.0.0.1:{port}" for name, port in zip(named, sim.behaviours, strict=True)}

    yield start
    for sim in started:
        sim.stop()


def write_config(tmp_path: Path, servers: list[str], *, key_prefix: str = "chronotick",
                 name: str = "config.yaml", **ntp) -> Path:
    """Write a config file with ``servers`` and ntp overrides (fast timeouts by default).

    ``selection: best`` unless a test says otherwise: most tests check which
    server is chosen.  The config's own default (``combine``) has its tests.
    """
    settings = {"servers": servers, "timeout_seconds": 0.3, "retry_delay": 0.2, "max_retries": 3,
                "max_delay": 0.1, "max_acceptable_uncertainty": 0.05, "selection": "best", **ntp}
    document = {"clock_measurement": {"ntp": settings},
                "ntp_service": {"key_prefix": key_prefix, "history_length": 50}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="session")
def chronyd(tmp_path_factory):
    """A real chronyd serving NTP on a loopback port; it never touches the clock (-x)."""
    binary = chronyd_binary()
    if binary is None:
        pytest.fail("no chronyd: run scripts/bootstrap (it unpacks one into .venv/chrony)")
    tmp = tmp_path_factory.mktemp("chronyd")
    port = free_udp_ports(1)[0]
    conf = tmp / "chrony.conf"
    conf.write_text("\n".join([
        f"port {port}", "bindaddress 127.0.0.1", "allow 127.0.0.1", "local stratum 8", "cmdport 0",
        f"pidfile {tmp}/chronyd.pid", f"driftfile {tmp}/drift", f"logdir {tmp}", "",
    ]))
    # -x: never touch the clock.  As root, drop to nobody: an unpacked chronyd
    # (scripts/bootstrap) has no _chrony user to drop to.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([binary, "-x", "-d", *user, "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "chronyd.log", "wb"))
    address = f"127.0.0.1:{port}"
    import socket

    from workers.ntp.client import QueryFailed, exchange

    def answers():
        if proc.poll() is not None:
            pytest.fail(f"chronyd exited: {(tmp / 'chronyd.log').read_text()}")
        try:
            return exchange(address, socket.AF_INET, ("127.0.0.1", port), timeout_s=0.2)
        except QueryFailed:
            return None

    wait_for(answers, what="chronyd to answer")
    yield address
    stop_process(proc)
