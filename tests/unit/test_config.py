"""Configuration: ChronoTick's own files load unchanged; bad files are refused with file, key and reason."""

from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from workers import config as config_mod
from workers.config import ConfigError
from workers.retry import RetryPolicy

DATA = Path(__file__).resolve().parent.parent / "data"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["chronotick_homelab_2min_ntp.yaml", "chronotick_ares_2min_ntp.yaml"])
def test_original_chronotick_files_load_unchanged(name):
    config = config_mod.load(DATA / name, environ={})
    ntp = config.ntp
    assert len(ntp.servers) == 10
    assert ntp.max_acceptable_uncertainty == 0.1
    assert ntp.max_stratum == 16 and ntp.min_stratum == 1
    assert ntp.max_delay == 0.100  # absent from the file: the documented default
    assert ntp.measurement_mode == "advanced" and ntp.parallel_queries and ntp.max_workers == 10
    assert RetryPolicy.from_settings(ntp).waits_s == (5.0, 10.0)  # attempts start at 0, 5, 15 s
    # Not in ChronoTick's files: defaults.  `combine`, as ChronoTick averages servers (its Experiment-11).
    assert ntp.selection == "combine" and ntp.server_groups == ()
    assert config.timing.warm_up_duration_s == 60 and config.timing.warm_up_interval_s == 1
    assert config.timing.normal_interval_s == 120
    assert "models" in config.extra  # ChronoTick's own sections are kept, not refused
    if "ares" in name:
        assert ntp.servers[0] == config_mod.ServerAddress("172.20.1.1", 8123)
        assert ntp.servers[-1].port == 8132


@pytest.mark.parametrize("name", ["config_homelab_2min_ntp.yaml", "config_ares_2min_ntp.yaml",
                                  "config_ares_relay_2min_ntp.yaml", "config_homelab_nts.yaml",
                                  "config_local_demo.yaml"])
def test_shipped_configs_pass_check_config(name, capsys):
    assert cli.main(["check-config", str(CONFIGS / name)]) == 0
    assert "OK" in capsys.readouterr().out


def test_shipped_homelab_config_groups_google():
    ntp = config_mod.load(CONFIGS / "config_homelab_2min_ntp.yaml", environ={}).ntp
    assert ntp.server_groups == (("time.google.com", "time1.google.com", "time2.google.com", "time3.google.com"),)
    assert ntp.selection == "combine"


def test_config_id_changes_with_the_settings():
    one = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a"]}}}, environ={}).ntp
    two = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a"], "timeout_seconds": 1}}},
                                  environ={}).ntp
    assert one.config_id != two.config_id and len(one.config_id) == 12


def test_defaults_where_keys_are_absent():
    config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a.example"]}}}, environ={})
    ntp = config.ntp
    assert (ntp.max_delay, ntp.max_acceptable_uncertainty, ntp.min_stratum, ntp.max_stratum) == (0.1, 0.01, 1, 15)
    assert (ntp.timeout_seconds, ntp.max_retries, ntp.retry_delay) == (2.0, 3, 5.0)
    assert ntp.enable_fallback and ntp.parallel_queries
    assert config.service.redis_url == config_mod.DEFAULT_REDIS_URL
    assert config.service.key_prefix == "chronotick"


@pytest.mark.parametrize("max_retries, waits", [(0, ()), (1, ()), (2, (0.5,)), (3, (0.5, 1.0)), (4, (0.5, 1.0, 2.0))])
def test_max_retries_counts_attempts_and_fractional_delays_work(max_retries, waits):
    ntp = {"servers": ["a"], "max_retries": max_retries, "retry_delay": 0.5}
    config = config_mod.from_mapping({"clock_measurement": {"ntp": ntp}}, environ={})
    assert RetryPolicy.from_settings(config.ntp).waits_s == waits
    assert RetryPolicy.from_settings(config.ntp).attempts == max(1, max_retries)


@pytest.mark.parametrize("text, host, port", [
    ("time.google.com", "time.google.com", 123), ("172.20.1.1:8123", "172.20.1.1", 8123),
    ("[::1]:1234", "::1", 1234), ("[::1]", "::1", 123), ("::1", "::1", 123)])
def test_server_notation(text, host, port):
    assert config_mod.parse_server(text) == config_mod.ServerAddress(host, port)


BAD_CASES = [
    # (what to change in clock_measurement.ntp, key named in the error, words in the problem)
    ({"colour": "blue"}, "clock_measurement.ntp.colour", "unknown key"),
    ({"timeout_seconds": "2"}, "clock_measurement.ntp.timeout_seconds", "must be a number"),
    ({"enable_fallback": "yes"}, "clock_measurement.ntp.enable_fallback", "true or false"),
    ({"max_delay": True}, "clock_measurement.ntp.max_delay", "boolean"),
    ({"max_delay": -0.1}, "clock_measurement.ntp.max_delay", "greater than 0"),
    ({"max_acceptable_uncertainty": 0}, "clock_measurement.ntp.max_acceptable_uncertainty", "greater than 0"),
    ({"retry_delay": 0}, "clock_measurement.ntp.retry_delay", "more than 0"),
    ({"servers": []}, "clock_measurement.ntp.servers", "empty"),
    ({"servers": ["a:99999"]}, "clock_measurement.ntp.servers[0]", "bad port"),
    ({"servers": ["a:b:c:"]}, "clock_measurement.ntp.servers[0]", "[address]:port"),
    ({"servers": ["ok", "host:"]}, "clock_measurement.ntp.servers[1]", "bad port"),
    ({"servers": ["a", "a:123"]}, "clock_measurement.ntp.servers", "listed twice"),
    ({"min_stratum": 5, "max_stratum": 3}, "clock_measurement.ntp.max_stratum", "below min_stratum"),
    ({"measurement_mode": "fast"}, "clock_measurement.ntp.measurement_mode", "'simple' or 'advanced'"),
    ({"max_retries": -1}, "clock_measurement.ntp.max_retries", "between 0 and 10"),
    ({"selection": "average"}, "clock_measurement.ntp.selection", "'best' or 'combine'"),
    ({"server_groups": {"g": ["127.0.0.1:123"]}}, "clock_measurement.ntp.server_groups.g", "at least two"),
    ({"servers": ["a", "b"], "server_groups": {"g": ["a", "c"]}}, "clock_measurement.ntp.server_groups.g[1]",
     "not in clock_measurement.ntp.servers"),
    ({"servers": ["a", "b", "c"], "server_groups": {"g": ["a", "b"], "h": ["b", "c"]}},
     "clock_measurement.ntp.server_groups.h[0]", "already in group 'g'"),
    ({"max_root_dispersion": 0}, "clock_measurement.ntp.max_root_dispersion", "greater than 0"),
    # Names no resolver can answer: each would crash a query (UnicodeError from the IDNA codec).
    ({"servers": ["time..google.com"]}, "clock_measurement.ntp.servers[0]", "bad host name"),
    ({"servers": ["a" * 64 + ".example"]}, "clock_measurement.ntp.servers[0]", "bad host name"),
    ({"servers": [".example"]}, "clock_measurement.ntp.servers[0]", "bad host name"),
    ({"servers": ["ti$me.example"]}, "clock_measurement.ntp.servers[0]", "characters a host name cannot have"),
    ({"servers": ["-x.example"]}, "clock_measurement.ntp.servers[0]", "bad host name"),
    ({"servers": ["x." * 127 + "example"]}, "clock_measurement.ntp.servers[0]", "bad host name"),
    # Accepted once, each crashed later: infinities and a retry wait of 30,000 years.
    ({"timeout_seconds": float("inf")}, "clock_measurement.ntp.timeout_seconds", "finite"),
    ({"retry_delay": float("inf")}, "clock_measurement.ntp.retry_delay", "finite"),
    ({"retry_delay": float("nan")}, "clock_measurement.ntp.retry_delay", "finite"),
    ({"retry_delay": 1e12}, "clock_measurement.ntp.retry_delay", "at most 600 s"),
    ({"timeout_seconds": 3600}, "clock_measurement.ntp.timeout_seconds", "at most 60 s"),
    # One server, two spellings, two votes: refused.
    ({"servers": ["[0:0::1]", "::1"]}, "clock_measurement.ntp.servers", "listed twice"),
    ({"servers": ["Time.Google.com", "time.google.com"]}, "clock_measurement.ntp.servers", "listed twice"),
    ({"servers": ["time.google.com.", "time.google.com:123"]}, "clock_measurement.ntp.servers", "listed twice"),
]


@pytest.mark.parametrize("change, key, words", BAD_CASES)
def test_bad_config_names_file_key_and_problem(tmp_path, change, key, words):
    ntp = {"servers": ["127.0.0.1:123"], **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"clock_measurement": {"ntp": ntp}}))
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


@pytest.mark.parametrize("document, key", [
    ({"clock_measurement": {"ntp": {"servers": ["a"]}, "timing": {"warm_up": {"duration_seconds": -1}}}},
     "clock_measurement.timing.warm_up.duration_seconds"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}, "timing": {"normal_operation": {"interval": 5}}}},
     "clock_measurement.timing.normal_operation.interval"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"redis_url": "redis://:hunter2@h/0"}},
     "ntp_service.redis_url"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"redis_url": "http://h"}},
     "ntp_service.redis_url"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"nodes": ["a b"]}}, "ntp_service.nodes[0]"),
    ({"clock_measurement": {}}, "clock_measurement.ntp"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}, "timming": {"warm_up": {"duration_seconds": 5}}}},
     "clock_measurement.timming"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"history_hours": float("inf")}},
     "ntp_service.history_hours"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"beat_lease_seconds": float("inf")}},
     "ntp_service.beat_lease_seconds"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"redis_url": "redis://h:notaport/0"}},
     "ntp_service.redis_url"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}}, "ntp_service": {"redis_url": "redis://h:6379/zero"}},
     "ntp_service.redis_url"),
    ({"clock_measurement": {"ntp": {"servers": ["a"]}, "timing": {"normal_operation": {
        "measurement_interval": float("inf")}}}}, "clock_measurement.timing.normal_operation.measurement_interval"),
    ({"clock_measurement": {"ntp": {}}}, "clock_measurement.ntp.servers"),
])
def test_bad_timing_and_service_sections(document, key):
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(document, source="f.yaml", environ={})
    assert caught.value.key == key
    assert "hunter2" not in str(caught.value)


def test_password_never_in_yaml_but_from_environment():
    env = {config_mod.ENV_REDIS_URL: "redis://10.0.0.5:6380/2", config_mod.ENV_REDIS_PASSWORD: "s3cret/+"}
    config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a"]}},
                                      "ntp_service": {"redis_url": "redis://127.0.0.1:6379/0"}}, environ=env)
    assert config.service.redis_url == "redis://:s3cret%2F%2B@10.0.0.5:6380/2"
    assert "s3cret" not in config.service.redis_url_redacted


@pytest.mark.parametrize("argv", [
    ["status", "--config", "C", "--hours", "inf"],
    ["status", "--config", "C", "--hours", "nan"],
    ["exporter", "--config", "C", "--port", "99999"],
    ["flower", "--config", "C", "--port", "0"],
    ["relay", "--config", "C", "--timeout", "inf"],
])
def test_cli_refuses_arguments_that_would_crash_later(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert argv[-2] in err and ("finite" in err or "1-65535" in err)


def test_cli_exits_2_on_bad_config_and_says_why(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: []\n")
    assert cli.main(["check-config", str(path)]) == cli.EXIT_USAGE
    assert cli.main(["measure", "--config", str(path), "--node", "n1"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{path}: clock_measurement.ntp.servers: empty" in err


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("clock_measurement: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_mod.load(broken)


def test_node_resolution_order():
    assert config_mod.resolve_node("cli-node", environ={config_mod.ENV_NODE: "env-node"}) == "cli-node"
    assert config_mod.resolve_node(None, environ={config_mod.ENV_NODE: "env-node"}) == "env-node"
    assert config_mod.resolve_node(None, environ={})  # the host name
    with pytest.raises(ValueError, match="bad node name"):
        config_mod.resolve_node("no spaces please", environ={})


def test_fast_polling_of_public_servers_warns_but_loads(capsys):
    homelab = config_mod.load(DATA / "chronotick_homelab_2min_ntp.yaml", environ={})
    warnings = config_mod.warnings_for(homelab)
    assert len(warnings) == 1 and "warm_up.measurement_interval: 1 s polls 10 public server(s)" in warnings[0]
    assert cli.main(["check-config", str(DATA / "chronotick_homelab_2min_ntp.yaml")]) == 0
    assert "warning:" in capsys.readouterr().err
    local = config_mod.load(CONFIGS / "config_local_demo.yaml", environ={})
    assert config_mod.warnings_for(local) == []  # loopback servers: poll as fast as you like


@pytest.mark.parametrize("host, public", [("time.google.com", True), ("216.239.35.0", True), ("127.0.0.1", False),
                                          ("172.20.1.1", False), ("::1", False), ("ntp.lab.local", False)])
def test_what_counts_as_a_public_server(host, public):
    assert config_mod.is_public(host) is public


def test_the_documented_tables_are_the_option_declarations():
    """Each option is declared once; the contract's tables must be exactly what the declarations say."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    for settings in (config_mod.NtpSettings, config_mod.TimingSettings, config_mod.ServiceSettings):
        assert config_mod.options_table(settings) in readme, f"docs/contract.md table of {settings.__name__} is stale"
    assert config_mod.options_table(config_mod.HubSettings, prefix="hub.") in readme, "the hub's table is stale"
    assert len(config_mod.options_of(config_mod.NtpSettings)) == 25


def test_a_negative_warm_up_duration_is_refused_with_the_right_words(tmp_path):
    document = {"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]},
                                      "timing": {"warm_up": {"duration_seconds": -1}}}}
    with pytest.raises(config_mod.ConfigError) as refused:
        config_mod.from_mapping(document, source="f.yaml")
    assert str(refused.value) == ("f.yaml: clock_measurement.timing.warm_up.duration_seconds: "
                                  "must be from 0 to 86400 s (got -1)")
    zero = {"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}, "timing": {"warm_up": {"duration_seconds": 0}}}}
    assert config_mod.from_mapping(zero).timing.warm_up_duration_s == 0


def test_ntp_settings_survive_the_trip_through_a_round():
    ntp = config_mod.from_mapping({"clock_measurement": {"ntp": {
        "servers": ["a.example", "b.example:124", "[::1]:125"], "selection": "combine", "max_retries": 2,
        "server_groups": {"g": ["a.example", "b.example:124"]}}}}).ntp
    import json
    again = config_mod.ntp_from_mapping(json.loads(json.dumps(ntp.as_mapping())))
    assert again == ntp


def test_nts_servers_parse_and_name_themselves():
    server = config_mod.parse_server("nts://time.cloudflare.com")
    assert (server.host, server.port, server.nts, server.name) == ("time.cloudflare.com", 4460, True,
                                                                  "nts://time.cloudflare.com")
    assert config_mod.parse_server("nts://127.0.0.1:14460").name == "nts://127.0.0.1:14460"
    assert config_mod.parse_server("nts://[::1]:14460").host == "::1"
    with pytest.raises(config_mod.ConfigError, match="the only scheme"):
        config_mod.parse_server("ntp://time.google.com")


def test_the_shipped_nts_config_uses_nts_for_three_servers(capsys):
    ntp = config_mod.load(CONFIGS / "config_homelab_nts.yaml", environ={}).ntp
    assert [s.name for s in ntp.servers if s.nts] == ["nts://time.cloudflare.com", "nts://nts.netnod.se",
                                                      "nts://ptbtime1.ptb.de"]
    assert ntp.auth_select == "prefer"
    from orchestrator import cli

    assert cli.main(["check-config", str(CONFIGS / "config_homelab_nts.yaml")]) == 0
    assert "NTS (RFC 8915): 3 of 13 servers" in capsys.readouterr().out


def test_bad_nts_options_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [nts://a]\n    nts_ca_file: /nonexistent.pem\n")
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(path, environ={})
    assert caught.value.key == "clock_measurement.ntp.nts_ca_file"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [nts://a]\n    auth_select: always\n")
    with pytest.raises(config_mod.ConfigError, match="require, prefer, mix, ignore"):
        config_mod.load(path, environ={})


def test_attempts_start_at_their_offsets_from_the_first_attempts_start_whatever_the_timeout():
    """Issue #25 item 4: 0, 5 and 15 s after the first start (they were 0, 7.2 and 19.2 s with a 2 s timeout)."""
    ntp = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a"]}}}, environ={}).ntp
    policy = RetryPolicy.from_settings(ntp)
    assert policy.offsets_s == [0.0, 5.0, 15.0]
    carried = RetryPolicy.from_job(policy.as_job())  # as the job carries it to the task
    # Attempt 1 started at 100 and failed at 102 (its 2 s timeout): attempt 2 at 105, not 107.
    assert carried.next_attempt(1, first_started_at=100.0, now=102.0, deadline_at=1e9).starts_at == 105.0
    assert carried.next_attempt(2, first_started_at=100.0, now=107.0, deadline_at=1e9).starts_at == 115.0
    assert carried.next_attempt(3, first_started_at=100.0, now=117.0, deadline_at=1e9).starts_at is None  # no fourth
    # An attempt that fails past its successor's place: the successor starts at once.
    assert carried.next_attempt(1, first_started_at=100.0, now=106.0, deadline_at=1e9).starts_at == 106.0
    assert RetryPolicy(2.0 / 2, (5.0, 10.0)).latest_starts_s == [0.0, 5.0, 15.0]  # attempts of 2 s
    assert RetryPolicy(8.2 / 2, (5.0, 10.0)).latest_starts_s == pytest.approx([0.0, 8.2, 16.4])  # of 8.2 s


def test_check_config_prints_the_attempt_starts_the_worker_uses(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [a]\n    timeout_seconds: 2\n")
    assert cli.main(["check-config", str(path)]) == 0
    assert "attempts per server: 3, starting at 0, 5, 15 s after the first attempt's start\n" in capsys.readouterr().out
    path.write_text("clock_measurement:\n  ntp:\n    servers: [a]\n    timeout_seconds: 4\n")
    assert cli.main(["check-config", str(path)]) == 0
    assert "starting at 0, 5, 15 s after the first attempt's start (at the latest 0, 8, 16 s" in capsys.readouterr().out
