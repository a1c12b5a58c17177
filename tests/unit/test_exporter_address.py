"""Where ``chronotick-ntp exporter`` listens: its flags, else $CHRONOTICK_EXPORTER_ADDRESS, else 127.0.0.1:9124."""

import pytest

from orchestrator import cli, defaults
from orchestrator.exporter import listen_address

DEFAULT_PORT, ENV_ADDRESS = defaults.EXPORTER_PORT, defaults.ENV_EXPORTER_ADDRESS


@pytest.mark.parametrize("address, port, environ, expected", [
    (None, None, {}, ("127.0.0.1", DEFAULT_PORT)),                              # loopback by default
    (None, None, {ENV_ADDRESS: ""}, ("127.0.0.1", DEFAULT_PORT)),               # empty: unset
    (None, None, {ENV_ADDRESS: "172.20.1.1:9200"}, ("172.20.1.1", 9200)),
    (None, None, {ENV_ADDRESS: "0.0.0.0"}, ("0.0.0.0", DEFAULT_PORT)),           # host alone: the default port
    (None, None, {ENV_ADDRESS: "[::]:9200"}, ("::", 9200)),
    (None, None, {ENV_ADDRESS: "::1"}, ("::1", DEFAULT_PORT)),
    (None, None, {ENV_ADDRESS: "head-node.cluster"}, ("head-node.cluster", DEFAULT_PORT)),
    (None, 9300, {ENV_ADDRESS: "172.20.1.1:9200"}, ("172.20.1.1", 9300)),       # --port wins over its port
    ("127.0.0.1", None, {ENV_ADDRESS: "172.20.1.1:9200"}, ("127.0.0.1", DEFAULT_PORT)),  # --address over all of it
    ("10.0.0.1:9400", None, {ENV_ADDRESS: "172.20.1.1:9200"}, ("10.0.0.1", 9400)),
    ("10.0.0.1:9400", 9400, {}, ("10.0.0.1", 9400)),
])
def test_the_flags_win_then_the_environment_then_loopback(address, port, environ, expected):
    assert listen_address(address, port, environ) == expected


@pytest.mark.parametrize("address, port, environ", [
    (None, None, {ENV_ADDRESS: "172.20.1.1:http"}),
    (None, None, {ENV_ADDRESS: "172.20.1.1:0"}),
    (None, None, {ENV_ADDRESS: "172.20.1.1:70000"}),
    (None, None, {ENV_ADDRESS: ":9200"}),
    (None, None, {ENV_ADDRESS: "[::1"}),
    ("10.0.0.1:9400", 9500, {}),  # two different ports: which one was meant?
])
def test_a_bad_address_is_refused_naming_where_it_came_from(address, port, environ):
    with pytest.raises(ValueError) as refused:
        listen_address(address, port, environ)
    assert (ENV_ADDRESS if address is None else "--address") in str(refused.value)


def test_the_command_line_keeps_its_flags_and_defaults_to_none():
    args = cli._parser().parse_args(["exporter", "--config", "c.yaml"])
    assert args.address is None and args.port is None  # so that the environment can speak
    args = cli._parser().parse_args(["exporter", "--config", "c.yaml", "--address", "0.0.0.0", "--port", "9125"])
    assert (args.address, args.port) == ("0.0.0.0", 9125)
