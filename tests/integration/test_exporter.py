"""The Prometheus exporter over real rounds, scraped by a real Prometheus; the alert rules under promtool."""

import json
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import rounds
from orchestrator.counting import ROUND_DURATION_BUCKETS_S
from orchestrator.exporter import NtpCollector, registry_for
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
from simulator.processes import RedisProcess, free_tcp_port, stop_process
from workers import config as config_mod
from workers import redisurl

from ..conftest import REPO, TEST_NODE, tool, wait_for, write_config

ALERTS = REPO / "configs" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "tests" / "data" / "alerts_test.yml"


def _promtool() -> str:
    return tool("promtool", package="prometheus")


def test_promtool_accepts_the_alert_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout


def test_each_alert_fires_on_a_miss_and_not_on_a_pass():
    result = subprocess.run([_promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _samples(registry) -> dict:
    """{(name, frozenset(labels)): value} of one scrape."""
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.integration
def test_collector_exports_the_contract_and_counters_only_grow(worker, simulator, tmp_path, key_prefix,
                                                               redis_client):
    _, servers = simulator({"good": Behaviour(delay_s=0.002, offset_s=0.004),
                            "far": Behaviour(delay_s=0.006, offset_s=0.004),
                            "liar": Behaviour(delay_s=0.002, bad_origin=True)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, max_retries=2, retry_delay=0.1)
    config = config_mod.load(path)
    registry = registry_for(NtpCollector(redis_client, prefix=key_prefix, nodes=("configured-only", "the-hub"),
                                         stale_after_s=360, stale_after_by_node={"the-hub": 1920}))
    records = [rounds.dispatch(config, TEST_NODE).wait(complete=True) for _ in range(2)]
    store = Store(redis_client, prefix=key_prefix)
    latest, stats = store.latest(TEST_NODE), store.stats(TEST_NODE)
    # good and far decide each round; the liar's bogus reply is set aside until its timeout: it is late,
    # and not retried, since nothing it could say would change a published round.
    assert [r["closed_by"] for r in records] == ["early", "early"]
    m = _samples(registry)
    node = frozenset({("node", TEST_NODE)})

    def get(name, **labels):
        return m[(name, frozenset({("node", TEST_NODE), *labels.items()}))]

    assert m[("chronotick_ntp_redis_up", frozenset())] == 1
    assert get("chronotick_ntp_offset_seconds") == latest["offset"]
    assert get("chronotick_ntp_uncertainty_seconds") == latest["uncertainty"]
    assert get("chronotick_ntp_last_publish_timestamp_seconds") == latest["published_at"]
    # On Redis' clock, never the node's own measured_at (tests/integration/test_skew.py runs a node 2 h off).
    assert get("chronotick_ntp_last_measurement_timestamp_seconds") == latest["published_at"]
    seconds, micros = redis_client.time()
    assert 0 <= get("chronotick_ntp_last_measurement_age_seconds") <= int(seconds) + int(micros) / 1e6 - latest[
        "published_at"]
    assert get("chronotick_ntp_rounds_total", quality="strict") == 2
    assert get("chronotick_ntp_rounds_total", quality="starvation") == 0
    assert get("chronotick_ntp_queries_total") == stats["queries"] == 2 * (1 + 1 + 1)
    assert get("chronotick_ntp_requests_total") == stats["requests"] == 2 * (1 + 1 + 1)  # simple mode: one each
    assert get("chronotick_ntp_retries_total") == stats["retries"] == 0
    assert get("chronotick_ntp_replies_total") == stats["replies"] == 2 * 3
    assert get("chronotick_ntp_rejections_total", reason="bogus_origin") == 2
    assert get("chronotick_ntp_early_rounds_total") == 2 and get("chronotick_ntp_late_replies_total") == 2
    liar = servers["liar"]
    assert get("chronotick_ntp_server_reach", server=liar) == 0
    assert get("chronotick_ntp_server_reach", server=servers["good"]) == 0b11
    assert get("chronotick_ntp_server_reachable", server=servers["good"]) == 1
    assert get("chronotick_ntp_server_state", server=liar, state="refused") == 1
    assert get("chronotick_ntp_server_state", server=servers["good"], state="ok") == 1
    assert get("chronotick_ntp_round_duration_seconds_count") == 2
    assert get("chronotick_ntp_round_duration_seconds_sum") == pytest.approx(sum(r["duration_s"] for r in records))
    assert get("chronotick_ntp_round_duration_seconds_bucket", le="+Inf") == 2
    for bound in ROUND_DURATION_BUCKETS_S:  # cumulative, as Prometheus reads a histogram
        within = sum(r["duration_s"] <= bound for r in records)
        assert get("chronotick_ntp_round_duration_seconds_bucket", le=f"{float(bound)}") == within
    assert get("chronotick_ntp_round_duration_seconds_bucket", le="5.0") == 2  # rounds here take < 1 s
    for s in records[-1]["servers"]:  # per server, from the last round
        if s.get("sample"):
            # From the compact history record: offsets to 100 ns, delays to the microsecond.
            assert get("chronotick_ntp_server_offset_seconds", server=s["server"]) == pytest.approx(
                s["sample"]["offset_s"], abs=0.5e-7)
            assert get("chronotick_ntp_server_delay_seconds", server=s["server"]) == pytest.approx(
                s["sample"]["delay_s"], abs=0.5e-6)
            assert get("chronotick_ntp_server_stratum", server=s["server"]) == s["sample"]["stratum"]
    assert ("chronotick_ntp_server_offset_seconds", frozenset({*node, ("server", servers["liar"])})) not in m
    # A configured node that never ran is exported (so "stale" can fire) with no offset.
    assert m[("chronotick_ntp_stale_after_seconds", frozenset({("node", "configured-only")}))] == 360
    # The hub node's rounds are further apart: its own limit (issue #26).
    assert m[("chronotick_ntp_stale_after_seconds", frozenset({("node", "the-hub")}))] == 1920
    assert ("chronotick_ntp_offset_seconds", frozenset({("node", "configured-only")})) not in m
    assert ("chronotick_ntp_last_measurement_age_seconds", frozenset({("node", "configured-only")})) not in m

    rounds.dispatch(config, TEST_NODE).wait()
    after = _samples(registry)
    counters = [k for k in m if k[0].endswith(("_total", "_count", "_bucket", "_sum"))]
    assert counters and all(after[k] >= m[k] for k in counters)
    assert after[("chronotick_ntp_rounds_total", frozenset({*node, ("quality", "strict")}))] == 3


def test_collector_says_redis_is_down_instead_of_failing(tmp_path):
    with RedisProcess(tmp_path) as proc:
        client = redisurl.connect(proc.url, timeout_s=1)
        registry = registry_for(NtpCollector(client, prefix="x"))
        assert _samples(registry)[("chronotick_ntp_redis_up", frozenset())] == 1
        proc.stop()
        assert _samples(registry) == {("chronotick_ntp_redis_up", frozenset()): 0}


def _http_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.integration
def test_a_real_prometheus_scrapes_the_exporter(worker, simulator, tmp_path, key_prefix, redis_url):
    binary = tool("prometheus", package="prometheus")
    _, servers = simulator({"a": Behaviour(delay_s=0.002, offset_s=-0.0031), "b": Behaviour(delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    config = config_mod.load(path)
    record = rounds.dispatch(config, TEST_NODE).wait()
    exporter_port, prom_port = free_tcp_port(), free_tcp_port()
    env = {"PATH": "/usr/bin:/bin", config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO)}
    exporter = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "exporter", "--config", str(path),
                                 "--port", str(exporter_port)], env=env, cwd=str(REPO),
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "exporter.log", "wb"))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        f"scrape_configs: [{{job_name: ntp, static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]}}]\n")
    prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(expr):
        try:
            body = _http_json(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
        except OSError:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            return None
        return body["data"]["result"] or None

    try:
        result = wait_for(lambda: query(f'chronotick_ntp_offset_seconds{{node="{TEST_NODE}"}}'), timeout_s=60,
                          interval_s=0.5, what="Prometheus to scrape the node's offset")
        assert float(result[0]["value"][1]) == record["latest"]["offset"]
        assert result[0]["metric"]["job"] == "ntp"
        rounds_strict = query(f'chronotick_ntp_rounds_total{{node="{TEST_NODE}",quality="strict"}}')
        assert float(rounds_strict[0]["value"][1]) == 1
        rules = _http_json(f"{api}/rules")["data"]["groups"]
        assert [g["name"] for g in rules] == ["chronotick-ntp"] and len(rules[0]["rules"]) == 13
        assert all(r["health"] != "err" for r in rules[0]["rules"])
    finally:
        stop_process(prometheus)
        stop_process(exporter)


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def _free_port_on(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_the_exporter_listens_where_its_environment_says_and_the_flags_win(tmp_path, redis_url):
    """CHRONOTICK_EXPORTER_ADDRESS, as deploy/systemd/chronotick-ntp-exporter.service documents it."""
    path = write_config(tmp_path, ["127.0.0.1:9"])
    port = _free_port_on("127.0.0.2")  # not the default address (127.0.0.1), nor the default port
    env = {"PATH": "/usr/bin:/bin", config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "CHRONOTICK_EXPORTER_ADDRESS": f"127.0.0.2:{port}"}
    argv = [sys.executable, "-m", "orchestrator.cli", "exporter", "--config", str(path)]
    exporter = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "exporter.log", "wb"))
    try:
        body = wait_for(lambda: exporter.poll() is None and _scrape(f"http://127.0.0.2:{port}/metrics"),
                        what="the exporter on the environment's address")
        assert "chronotick_ntp_redis_up 1.0" in body, (tmp_path / "exporter.log").read_text()
        assert _scrape(f"http://127.0.0.1:{port}/metrics") is None  # that address only, not loopback at large
    finally:
        stop_process(exporter)
    # The flags win over the environment: --port over its port, --address over the whole of it.
    flagged = _free_port_on("127.0.0.1")
    exporter = subprocess.Popen([*argv, "--address", "127.0.0.1", "--port", str(flagged)], env=env,
                                cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "flags.log", "wb"))
    try:
        body = wait_for(lambda: exporter.poll() is None and _scrape(f"http://127.0.0.1:{flagged}/metrics"),
                        what="the exporter on the flags' address")
        assert "chronotick_ntp_redis_up 1.0" in body
    finally:
        stop_process(exporter)
