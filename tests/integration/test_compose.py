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
