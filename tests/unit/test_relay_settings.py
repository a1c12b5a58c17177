"""relay.settings: ChronoTick's proxy file loads unchanged; bad input names the key, or the flag."""

from pathlib import Path

import pytest

from relay.settings import (
    COMMAND_LINE,
    DEFAULT_BIND,
    DEFAULT_CLIENT_BURST,
    DEFAULT_CLIENT_INTERVAL_S,
    DEFAULT_MIN_INTERVAL_S,
    DEFAULT_RATE_BACKOFF_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_UPSTREAM_BURST,
    MAX_CLIENT_INTERVAL_S,
    MAX_TIMEOUT_S,
    RelayConfigError,
    RelaySettings,
    from_arguments,
    load_mappings,
    parse_allow,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def test_chronoticks_own_file_loads_unchanged_with_the_default_cap():
    mappings = load_mappings(DATA / "ntp_proxy_config.yaml")
    assert [m.listen_port for m in mappings] == list(range(8123, 8133))
    assert mappings[0].upstream == "time.google.com:123"
    assert mappings[-1].ntp_server == "3.pool.ntp.org"
    assert all((m.min_interval_s, m.upstream_burst, m.rate_backoff_s)
               == (DEFAULT_MIN_INTERVAL_S, DEFAULT_UPSTREAM_BURST, DEFAULT_RATE_BACKOFF_S) for m in mappings)


def test_the_shipped_file_is_chronoticks_with_comments_only():
    shipped = load_mappings(DATA.parent.parent / "configs" / "ntp_proxy_config.yaml")
    assert shipped == load_mappings(DATA / "ntp_proxy_config.yaml")


def test_the_optional_keys_are_read(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("proxy_mappings:\n  - {listen_port: 8129, ntp_server: 0.pool.ntp.org, min_interval_s: 16,"
                    " upstream_burst: 8, rate_backoff_s: 256}\n")
    (mapping,) = load_mappings(path)
    assert (mapping.ntp_port, mapping.min_interval_s, mapping.upstream_burst, mapping.rate_backoff_s) == (
        123, 16.0, 8, 256.0)


@pytest.mark.parametrize("body, key, words", [
    ("{}", "proxy_mappings", "missing"),
    ("proxy_mappings: []", "proxy_mappings", "non-empty"),
    ("proxy_mappings: [{ntp_server: a}]", "proxy_mappings[0].listen_port", "missing"),
    ("proxy_mappings: [{listen_port: 0, ntp_server: a}]", "proxy_mappings[0].listen_port", "1-65535"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: ''}]", "proxy_mappings[0].ntp_server", "host"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: a, min_interval_s: -1}]",
     "proxy_mappings[0].min_interval_s", "> 0"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: a, upstream_burst: 0}]",
     "proxy_mappings[0].upstream_burst", ">= 1"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: a, upstream_burst: 2.5}]",
     "proxy_mappings[0].upstream_burst", "whole number"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: a, colour: red}]", "proxy_mappings[0].colour", "unknown"),
    ("proxy_mappings: [{listen_port: 8123, ntp_server: a}, {listen_port: 8123, ntp_server: b}]",
     "proxy_mappings[1].listen_port", "twice"),
])
def test_a_bad_file_names_the_key(tmp_path, body, key, words):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(RelayConfigError) as caught:
        load_mappings(path)
    assert caught.value.key == key and words in caught.value.problem
    assert str(path) in str(caught.value)


def test_allow_is_loopback_by_default_and_networks_when_given():
    settings = RelaySettings(mappings=())
    assert settings.allows("127.0.0.1") and settings.allows("::1")
    assert not settings.allows("172.20.3.4")
    ares = RelaySettings(mappings=(), allow=parse_allow(["172.20.0.0/16"]))
    assert ares.allows("172.20.3.4") and ares.allows("::ffff:172.20.3.4") and not ares.allows("10.0.0.1")
    with pytest.raises(ValueError, match="not-a-net"):
        parse_allow(["not-a-net"])


def test_a_mapping_past_the_published_rules_is_named_and_the_defaults_are_not():
    from relay.settings import Mapping, describe, impolite

    assert impolite(Mapping(listen_port=8123, ntp_server="time.nist.gov")) == []
    assert impolite(Mapping(listen_port=8123, ntp_server="a", min_interval_s=4.0, upstream_burst=4)) == []
    assert len(impolite(Mapping(listen_port=8123, ntp_server="a", upstream_burst=5))) == 1  # just past each rule
    assert len(impolite(Mapping(listen_port=8123, ntp_server="a", min_interval_s=3.9))) == 1
    problems = impolite(Mapping(listen_port=8123, ntp_server="time.nist.gov", min_interval_s=2.0, upstream_burst=400))
    assert len(problems) == 2 and "min_interval_s 2 s" in problems[0] and "upstream_burst 400" in problems[1]
    assert describe(Mapping(listen_port=8123, ntp_server="a")) == (
        "upstream at most 4 requests at once, then one per 4 s; over that, a RATE kiss from the relay "
        "(policy_refused); 64 s of silence after the upstream's own RATE")


# -- chronotick-ntp relay's flags (relay.settings.from_arguments) -----------------------------------------------

CHRONOTICK_FILE = DATA / "ntp_proxy_config.yaml"


def test_the_flags_not_given_are_the_defaults():
    settings = from_arguments(CHRONOTICK_FILE)
    assert settings == RelaySettings(mappings=load_mappings(CHRONOTICK_FILE))
    assert (settings.bind, settings.timeout_s, settings.client_interval_s, settings.client_burst) == (
        DEFAULT_BIND, DEFAULT_TIMEOUT_S, DEFAULT_CLIENT_INTERVAL_S, DEFAULT_CLIENT_BURST)


def test_the_flags_given_are_the_settings():
    settings = from_arguments(CHRONOTICK_FILE, bind="172.20.1.1", allow=["172.20.0.0/16"], timeout_s=2.0,
                              client_interval_s=1.0, client_burst=3)
    assert (settings.bind, settings.allow, settings.timeout_s, settings.client_interval_s, settings.client_burst) == (
        "172.20.1.1", parse_allow(["172.20.0.0/16"]), 2.0, 1.0, 3)
    assert from_arguments(CHRONOTICK_FILE, bind="::1").bind == "::1"  # loopback: no --allow needed


@pytest.mark.parametrize("flags, flag, words", [
    ({"bind": "localhost"}, "--bind", "'localhost' is not an IP address"),
    ({"bind": "172.20.1.1"}, "--bind", "without --allow would answer only loopback clients"),
    ({"bind": "0.0.0.0"}, "--bind", "e.g. --allow 172.20.0.0/16"),
    ({"allow": ["172.20.0.0/16", "not-a-net"]}, "--allow", "'not-a-net' is not an address or CIDR"),
    ({"timeout_s": MAX_TIMEOUT_S + 1}, "--timeout", f"<= {MAX_TIMEOUT_S:g}"),
    ({"timeout_s": float("inf")}, "--timeout", "finite"),
    ({"client_interval_s": MAX_CLIENT_INTERVAL_S * 2}, "--client-interval", f"<= {MAX_CLIENT_INTERVAL_S:g}"),
    ({"client_interval_s": 0.0}, "--client-interval", "> 0"),
    ({"client_burst": 0}, "--client-burst", "at least 1"),
])
def test_a_bad_flag_is_named(flags, flag, words):
    with pytest.raises(RelayConfigError) as caught:
        from_arguments(CHRONOTICK_FILE, **flags)
    assert (caught.value.source, caught.value.key) == (COMMAND_LINE, flag) and words in caught.value.problem
    assert str(caught.value).startswith(f"{flag}: ")  # the CLI's line: "error: --bind: ..."


def test_the_file_is_read_before_the_flags_and_names_its_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy_mappings:\n  - listen_port: 99999\n    ntp_server: time.google.com\n")
    with pytest.raises(RelayConfigError) as caught:
        from_arguments(bad, bind="localhost")
    assert (caught.value.source, caught.value.key) == (str(bad), "proxy_mappings[0].listen_port")
