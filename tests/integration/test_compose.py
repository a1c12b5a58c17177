"""docker-compose.yml: valid, secure by default, and running the documented commands.

Validated with Debian's docker-compose (``config`` needs no engine).
"""

import os
import shutil
import subprocess

import pytest
import yaml

from orchestrator import cli

from ..conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
SECRETS = {"REDIS_PASSWORD": "compose-test-pw", "FLOWER_BASIC_AUTH": "ops:compose-test-flower"}


def _config(**env):
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install --no-install-recommends docker-compose); "
                    "scripts/bootstrap installs it")
    environ = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("CHRONOTICK_")}
    return subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], env={**environ, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rendered():
    result = _config(**SECRETS, CHRONOTICK_NODE="ares-comp-11")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_services_and_health_checks(rendered):
    assert set(rendered) == {"redis", "worker", "beat", "flower", "relay"}
    assert all("healthcheck" in service for service in rendered.values())
    assert rendered["relay"]["profiles"] == ["relay"]  # only on a head node that relays, when asked
    for name in ("worker", "beat", "flower"):
        assert rendered[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_services_run_the_documented_commands(rendered):
    parser = cli._parser()
    expected = {"worker": "worker", "beat": "beat", "flower": "flower"}
    for service, command in expected.items():
        argv = rendered[service]["command"]
        assert argv[:2] == ["chronotick-ntp", command]
        args = parser.parse_args(argv[1:])  # a real, valid chronotick-ntp command line
        assert args.config == "/app/configs/config_homelab_2min_ntp.yaml"
    assert parser.parse_args(rendered["worker"]["command"][1:]).node == "ares-comp-11"
    relay = parser.parse_args(rendered["relay"]["command"][1:])
    assert (relay.config, relay.bind) == ("/app/configs/ntp_proxy_config.yaml", "127.0.0.1")  # loopback unless told
    assert rendered["worker"]["environment"]["CHRONOTICK_NODE"] == "ares-comp-11"


def test_secure_defaults(rendered):
    assert "ports" not in rendered["redis"]  # Redis is not published on the host
    assert "--maxmemory-policy noeviction" in " ".join(rendered["redis"]["command"])
    assert [str(p) for p in rendered["flower"]["ports"]] == ["127.0.0.1:5555:5555/tcp"]  # loopback only
    assert rendered["flower"]["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    command = rendered["flower"]["command"]
    assert "--allow-control" not in command and "--insecure-no-auth" not in command
    text = COMPOSE.read_text()
    assert all(secret not in text for secret in SECRETS.values())
    # The Redis password reaches redis-server through a private file, never its argv.
    assert "requirepass" in " ".join(rendered["redis"]["command"])
    assert "$REDIS_PASSWORD" in " ".join(rendered["redis"]["command"])


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_refuses_to_render_without_its_secrets(missing):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    result = _config(**env)
    assert result.returncode != 0 and missing in result.stderr


def test_the_image_installs_from_exactly_what_its_dockerfile_copies(tmp_path):
    """The Dockerfile's install step, run on exactly the files its COPY lines name (no Docker engine here)."""
    import shlex
    import sys
    import zipfile
    from pathlib import Path

    app = tmp_path / "app"
    app.mkdir()
    copied = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        *sources, dest = words[1:]
        for source in sources:  # WORKDIR /app: "COPY a b ./" keeps the names, "COPY a b" renames a to b
            target = app / (Path(source).name if dest in ("./", ".") else dest)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / source, target)
            copied.append(source)
    assert "relay" in copied  # pyproject packages relay/: the image must have it
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path / "dist"), str(app)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("workers/tasks.py", "orchestrator/cli.py", "relay/server.py", "simulator/ntpserver.py"):
        assert module in names, module


def test_compose_redis_keeps_history_across_a_restart(rendered, tmp_path):
    """compose's Redis settings, run here: a round published before a restart is there after it."""
    import shlex
    import time

    import redis as redis_py

    from orchestrator.store import Store
    from simulator.processes import free_tcp_port, stop_process

    script = rendered["redis"]["command"][-1]
    args = shlex.split(script.split("exec redis-server /tmp/redis.conf", 1)[1])
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in " ".join(str(v) for v in rendered["redis"]["volumes"]) or any(
        (v.get("source"), v.get("target")) == ("redis-data", "/data") for v in rendered["redis"]["volumes"]
        if isinstance(v, dict))
    data = tmp_path / "data"
    data.mkdir()
    args = [str(data) if a == "/data" else a for a in args]
    port = free_tcp_port()

    def start():
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_py.Redis(port=port, socket_timeout=1, decode_responses=True)  # as redisurl.connect makes them
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return proc, client
            except redis_py.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("compose's redis settings did not start a redis-server")
                time.sleep(0.05)

    proc, client = start()
    now = time.time()
    record = {"round_id": "r1", "node": "n1", "quality": "starvation", "dispatched_at": now, "finished_at": now,
              "duration_s": 0.0, "servers_used": 0, "servers_total": 0, "servers": [], "agreement": None,
              "filter": None, "candidate": None, "latest": None}
    Store(client, prefix="chronotick").publish_round(record, history_length=10, window_size=20)
    stop_process(proc)  # SIGTERM: as docker stops a container
    proc, client = start()
    try:
        assert [r["round_id"] for r in Store(client, prefix="chronotick").history("n1")] == ["r1"]
        assert Store(client, prefix="chronotick").stats("n1")["rounds"] == 1
    finally:
        stop_process(proc)
