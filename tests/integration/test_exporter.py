"""The Prometheus exporter over real rounds, scraped by a real Prometheus; the alert rules under promtool."""

import json
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import rounds
from orchestrator.counting import ROUND_DURATION_BUCKETS_S
from orchestrator.exporter import NtpCollector, registry_for
from orchestrator.store import Store
from simulator.ntpserver import Behaviour, NtpSimulator
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


# -- two rounds of a good, a far and a lying server, scraped: one run, each metric family checked on its own --

@dataclass(frozen=True)
class ScrapedRounds:
    """Two rounds on the real worker, one scrape of the collector after them, and one after a third round."""

    servers: dict[str, str]  # name -> host:port
    records: list[dict]      # the two rounds, complete (their late servers in)
    latest: dict             # the node's latest key after them
    stats: dict              # the node's counters after them
    scrape: dict             # {(name, frozenset(labels)): value} after the two rounds
    redis_now: float         # Redis' clock right after that scrape
    after: dict              # a scrape after a third round

    def get(self, name: str, **labels) -> float:
        """The test node's sample ``name`` with ``labels``, from the scrape after the two rounds."""
        return self.scrape[(name, frozenset({("node", TEST_NODE), *labels.items()}))]


@pytest.fixture(scope="module")
def scraped(worker, redis_url, tmp_path_factory) -> ScrapedRounds:
    """The rounds and scrapes, once for every test of them (tests must not change their data)."""
    named = {"good": Behaviour(delay_s=0.002, offset_s=0.004), "far": Behaviour(delay_s=0.006, offset_s=0.004),
             "liar": Behaviour(delay_s=0.002, bad_origin=True)}
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    sim = NtpSimulator.on_free_ports(list(named.values()), seed=1).start()
    client = redisurl.connect(redis_url)
    try:
        servers = {name: f"127.0.0.1:{port}" for name, port in zip(named, sim.behaviours, strict=True)}
        path = write_config(tmp_path_factory.mktemp("exporter"), list(servers.values()), key_prefix=key_prefix,
                            max_retries=2, retry_delay=0.1)
        config = config_mod.load(path)
        registry = registry_for(NtpCollector(client, prefix=key_prefix, nodes=("configured-only", "the-hub"),
                                             stale_after_s=360, stale_after_by_node={"the-hub": 1920}))
        records = [rounds.dispatch(config, TEST_NODE).wait(complete=True) for _ in range(2)]
        store = Store(client, prefix=key_prefix)
        latest, stats = store.latest(TEST_NODE), store.stats(TEST_NODE)
        scrape = _samples(registry)
        seconds, micros = client.time()
        rounds.dispatch(config, TEST_NODE).wait()
        after = _samples(registry)
    finally:
        client.close()
        sim.stop()
    return ScrapedRounds(servers, records, latest, stats, scrape, int(seconds) + int(micros) / 1e6, after)


@pytest.mark.integration
def test_both_rounds_are_decided_early_and_the_liar_is_late(scraped):
    # good and far decide each round; the liar's bogus reply is set aside until its timeout: it is late,
    # and not retried, since nothing it could say would change a published round.
    assert [r["closed_by"] for r in scraped.records] == ["early", "early"], "each round closed early"
    assert scraped.get("chronotick_ntp_early_rounds_total") == 2, "early rounds counted"
    assert scraped.get("chronotick_ntp_late_replies_total") == 2, "the liar's late reply counted once a round"


@pytest.mark.integration
def test_the_node_gauges_are_its_latest_measurement_aged_on_redis_clock(scraped):
    get, latest = scraped.get, scraped.latest
    assert scraped.scrape[("chronotick_ntp_redis_up", frozenset())] == 1, "redis_up 1"
    assert get("chronotick_ntp_offset_seconds") == latest["offset"], "offset: latest's"
    assert get("chronotick_ntp_uncertainty_seconds") == latest["uncertainty"], "uncertainty: latest's"
    assert get("chronotick_ntp_last_publish_timestamp_seconds") == latest["published_at"], "last publish: latest's"
    # On Redis' clock, never the node's own measured_at (tests/integration/test_skew.py runs a node 2 h off).
    assert get("chronotick_ntp_last_measurement_timestamp_seconds") == latest["published_at"], \
        "last measurement: latest's published_at (Redis' clock), not its measured_at"
    assert 0 <= get("chronotick_ntp_last_measurement_age_seconds") <= scraped.redis_now - latest["published_at"], \
        "age: at most the time since publication on Redis' clock"


@pytest.mark.integration
def test_round_and_query_counters_are_the_nodes_stats(scraped):
    get, stats = scraped.get, scraped.stats
    assert get("chronotick_ntp_rounds_total", quality="strict") == 2, "strict rounds"
    assert get("chronotick_ntp_rounds_total", quality="starvation") == 0, "starvation rounds, exported at 0"
    assert get("chronotick_ntp_queries_total") == stats["queries"] == 2 * (1 + 1 + 1), f"queries: {stats}"
    assert get("chronotick_ntp_requests_total") == stats["requests"] == 2 * (1 + 1 + 1), \
        f"requests, one each in simple mode: {stats}"
    assert get("chronotick_ntp_retries_total") == stats["retries"] == 0, f"no retry: {stats}"
    assert get("chronotick_ntp_replies_total") == stats["replies"] == 2 * 3, f"replies: {stats}"
    assert get("chronotick_ntp_rejections_total", reason="bogus_origin") == 2, "the liar's replies refused by reason"


@pytest.mark.integration
def test_each_servers_reach_and_state(scraped):
    get, servers = scraped.get, scraped.servers
    assert get("chronotick_ntp_server_reach", server=servers["liar"]) == 0, "the liar: no reach bit"
    assert get("chronotick_ntp_server_reach", server=servers["good"]) == 0b11, "the good server: reached twice"
    assert get("chronotick_ntp_server_reachable", server=servers["good"]) == 1, "the good server reachable"
    assert get("chronotick_ntp_server_state", server=servers["liar"], state="refused") == 1, "the liar: refused"
    assert get("chronotick_ntp_server_state", server=servers["good"], state="ok") == 1, "the good server: ok"


@pytest.mark.integration
def test_round_duration_is_a_cumulative_histogram_of_the_rounds(scraped):
    get, records = scraped.get, scraped.records
    assert get("chronotick_ntp_round_duration_seconds_count") == 2, "count: the rounds"
    assert get("chronotick_ntp_round_duration_seconds_sum") == pytest.approx(sum(r["duration_s"] for r in records)), \
        "sum: the rounds' durations"
    assert get("chronotick_ntp_round_duration_seconds_bucket", le="+Inf") == 2, "+Inf bucket: every round"
    for bound in ROUND_DURATION_BUCKETS_S:  # cumulative, as Prometheus reads a histogram
        within = sum(r["duration_s"] <= bound for r in records)
        assert get("chronotick_ntp_round_duration_seconds_bucket", le=f"{float(bound)}") == within, \
            f"bucket le={bound}: the rounds within it ({within})"
    assert get("chronotick_ntp_round_duration_seconds_bucket", le="5.0") == 2, "rounds here take < 1 s"


@pytest.mark.integration
def test_per_server_gauges_are_the_last_rounds_samples(scraped):
    get = scraped.get
    for s in scraped.records[-1]["servers"]:  # per server, from the last round
        if s.get("sample"):
            # From the compact history record: offsets to 100 ns, delays to the microsecond.
            assert get("chronotick_ntp_server_offset_seconds", server=s["server"]) == pytest.approx(
                s["sample"]["offset_s"], abs=0.5e-7), f"{s['server']}: its sample's offset"
            assert get("chronotick_ntp_server_delay_seconds", server=s["server"]) == pytest.approx(
                s["sample"]["delay_s"], abs=0.5e-6), f"{s['server']}: its sample's delay"
            assert get("chronotick_ntp_server_stratum", server=s["server"]) == s["sample"]["stratum"], \
                f"{s['server']}: its sample's stratum"
    node = frozenset({("node", TEST_NODE)})
    assert ("chronotick_ntp_server_offset_seconds", frozenset({*node, ("server", scraped.servers["liar"])})) \
        not in scraped.scrape, "no offset for the liar, which gave no sample"


@pytest.mark.integration
def test_each_configured_node_is_exported_with_its_own_stale_limit(scraped):
    m = scraped.scrape
    # A configured node that never ran is exported (so "stale" can fire).
    assert m[("chronotick_ntp_stale_after_seconds", frozenset({("node", "configured-only")}))] == 360, \
        "a configured node that never ran: the service's limit"
    # The hub node's rounds are further apart: its own limit (issue #26).
    assert m[("chronotick_ntp_stale_after_seconds", frozenset({("node", "the-hub")}))] == 1920, \
        "the hub node: its own limit"


@pytest.mark.integration
def test_a_configured_node_that_never_ran_has_no_offset_and_no_age(scraped):
    m = scraped.scrape
    assert ("chronotick_ntp_offset_seconds", frozenset({("node", "configured-only")})) not in m, "no offset"
    assert ("chronotick_ntp_last_measurement_age_seconds", frozenset({("node", "configured-only")})) not in m, \
        "no age"


@pytest.mark.integration
def test_counters_only_grow_over_another_round(scraped):
    m, after = scraped.scrape, scraped.after
    counters = [k for k in m if k[0].endswith(("_total", "_count", "_bucket", "_sum"))]
    assert counters and all(after[k] >= m[k] for k in counters), \
        f"no counter went down: {[(k, m[k], after[k]) for k in counters if after[k] < m[k]]}"
    node = frozenset({("node", TEST_NODE)})
    assert after[("chronotick_ntp_rounds_total", frozenset({*node, ("quality", "strict")}))] == 3, \
        "the third strict round counted"


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
