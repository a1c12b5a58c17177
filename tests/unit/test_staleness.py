"""Staleness: one setting, one function, and every site agrees (issue #27).

"Stale after 3 normal intervals" lives in :mod:`workers.redisclock` (``STALE_INTERVALS``,
``stale_after_s``); a node's limit is :meth:`workers.config.Config.stale_after_s`.  With per-node intervals
(the hub node's rounds are further apart) every site must give each node the same limit and, at the same age,
the same verdict: ``status``, the exporter's gauge (which the stale alert compares the age with), the round's
metadata (the hub's leg, the temporal filter's gap), the warm-up policy and the beat's freshness checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator import cli, exporter, store
from orchestrator import scheduler as scheduler_mod
from orchestrator.outcomes import RoundMeta
from workers import config as config_mod
from workers import redisclock, redisurl, warmup
from workers.keys import Keys

REPO = Path(__file__).resolve().parents[2]
PREFIX = "stale"
#: Redis' clock now, in every site's view (Unix s).
NOW = 1_800_000_000.0
NORMAL_S = 30.0
HUB_INTERVAL_S = 90.0  # the hub node's rounds: max(normal, hub.measurement_interval) apart


def _config() -> config_mod.Config:
    return config_mod.from_mapping({
        "clock_measurement": {"ntp": {"servers": ["time.example.org"]},
                              "timing": {"normal_operation": {"measurement_interval": NORMAL_S}}},
        "ntp_service": {"key_prefix": PREFIX, "nodes": ["head", "a", "b"],
                        "hub": {"address": "10.0.0.1", "node": "head", "measurement_interval": HUB_INTERVAL_S}},
    }, environ={})


def _latest(age_s: float) -> dict:
    return {"offset": 0.001, "uncertainty": 0.002, "delay": 0.01, "stratum": 2, "server": "s", "quality": "strict",
            "measured_at": NOW - age_s - 7200.0,  # the node's own clock, 2 h off: never what an age is read from
            "published_at": NOW - age_s}


#: Each node's latest age (s): just inside and just past its own limit (the hub node's is three times the others').
AGES = {"head": 3 * HUB_INTERVAL_S - 1, "a": 3 * NORMAL_S + 1, "b": 3 * NORMAL_S - 1}
STALE = {"head": False, "a": True, "b": False}


def test_the_rule_has_one_home_and_the_default_comes_from_the_default_interval():
    config = _config()
    assert redisclock.stale_after_s(NORMAL_S) == redisclock.STALE_INTERVALS * NORMAL_S
    assert config.stale_after_s("a") == config.stale_after_s() == redisclock.stale_after_s(NORMAL_S)
    assert config.stale_after_s("head") == redisclock.stale_after_s(HUB_INTERVAL_S)
    assert config_mod.DEFAULT_STALE_AFTER_S == redisclock.stale_after_s(config_mod.TimingSettings().normal_interval_s)


def test_no_other_module_computes_a_staleness_limit_or_hard_codes_one():
    """Outside workers/redisclock.py nothing multiplies STALE_INTERVALS, and no stale-after name is a number."""
    multiplied = re.compile(r"STALE_INTERVALS\s*\*|\*\s*STALE_INTERVALS")
    literal = re.compile(r"stale_after\w*\s*(?::[^=\n]*)?=\s*\d", re.IGNORECASE)
    found = []
    for package in ("workers", "orchestrator", "relay", "simulator"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "workers" / "redisclock.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if multiplied.search(line) or literal.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "a staleness limit outside workers.redisclock / Config.stale_after_s:\n" + "\n".join(found)


# -- every site, one config with a hub ------------------------------------------------------------------


class FakeStore:
    """What ``status`` reads: no rounds, each node's ``latest`` at its age in :data:`AGES`."""

    client = None

    def history_since(self, node, since):
        return []

    def latest(self, node):
        return _latest(AGES[node])

    def nodes(self):
        return []


def _status(monkeypatch, capsys, config) -> dict:
    monkeypatch.setattr(cli, "_load", lambda args: config)
    monkeypatch.setattr(cli, "_check_broker", lambda config: None)
    monkeypatch.setattr(cli, "redis_now", lambda client: NOW)
    monkeypatch.setattr(store, "store_for", lambda service: FakeStore())
    cli.main(["status", "--config", "unused.yaml", "--json"])
    return json.loads(capsys.readouterr().out)["nodes"]


def _exported(monkeypatch, config) -> tuple[dict[str, float], dict[str, float]]:
    """The exporter ``chronotick-ntp exporter`` runs for ``config``: (stale_after_seconds, age) by node."""
    monkeypatch.setattr(redisurl.outages, "url", redisurl.outages.url)  # the collector watches its Redis: undone
    client = redisurl.connect("redis://127.0.0.1:1/0")  # never asked: the snapshot is given
    collector = exporter.collector_for(config, client)
    snapshot = {node: {"latest": _latest(age), "stats": {}, "durations": {}, "record": None, "reach": {},
                       "live_workers": 1} for node, age in {**AGES, "unconfigured": 0.0}.items()}
    families = {f.name: f for f in collector._families(snapshot, NOW)}

    def by_node(name: str) -> dict[str, float]:
        return {s.labels["node"]: s.value for s in families[f"{exporter.NAMESPACE}_{name}"].samples}

    return by_node("stale_after_seconds"), by_node("last_measurement_age_seconds")


class FakeRedis:
    """The beat's freshness check: one MGET of ``latest`` and one TIME."""

    def __init__(self):
        self.values = {Keys(PREFIX).latest(node): json.dumps(_latest(age)) for node, age in AGES.items()}

    def pipeline(self, transaction=True):
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis):
        self.redis, self.queued = redis, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def mget(self, keys):
        self.queued.append([self.redis.values.get(k) for k in keys])

    def time(self):
        self.queued.append((int(NOW), int(NOW % 1 * 1e6)))

    def execute(self):
        return self.queued


def _beat_on_lead(monkeypatch, config) -> tuple[list[str], list[str]]:
    """What the leading beat asks for when it takes the lease: (warm-ups asked for, rounds-now asked for)."""
    warmed, now = [], []
    monkeypatch.setattr(scheduler_mod, "service_client", lambda service: FakeRedis())
    monkeypatch.setattr(warmup, "publish_policy", lambda *args, **kwargs: None)
    monkeypatch.setattr(warmup, "ask_round_now", lambda client, prefix, nodes: now.extend(nodes))

    def request_many(client, prefix, nodes, duration_s=None):
        warmed.extend(nodes)
        return {n: warmup.Answer(True, duration_s or 0.0, warmup.STARTED, n) for n in nodes}

    monkeypatch.setattr(warmup, "request_many", request_many)
    beat = scheduler_mod.Scheduler(config, list(config.service.nodes), warm_ups=lambda config: {},
                                   clock=lambda: NOW, lease=None)
    beat._publish_policy_and_warm_up(config, list(config.service.nodes))
    return warmed, now


def test_every_site_gives_each_node_the_same_limit_and_verdict(monkeypatch, capsys):
    config = _config()
    limits = {node: config.stale_after_s(node) for node in AGES}
    assert limits["head"] > limits["a"] == limits["b"]  # the hub node's rounds are further apart

    status = _status(monkeypatch, capsys, config)
    assert {node: status[node]["stale_after_s"] for node in AGES} == limits
    assert {node: status[node]["stale"] for node in AGES} == STALE

    gauge, age = _exported(monkeypatch, config)
    assert {node: gauge[node] for node in AGES} == limits
    assert gauge["unconfigured"] == config.stale_after_s("unconfigured") == config.stale_after_s()
    assert {node: age[node] > gauge[node] for node in AGES} == STALE  # the stale alert's comparison

    for node in AGES:  # the round's own gap, and the hub's leg as every other node's round uses it
        meta = RoundMeta.for_round(config, round_id="r", node=node, dispatched_at=NOW, deadline_at=NOW + 5)
        assert meta.stale_after_s == limits[node]
        if node == "head":
            assert meta.hub is None
        else:
            assert meta.hub is not None and meta.hub["stale_after_s"] == limits["head"]

    # Warm-ups: the published policy judges every node but the hub (which never warms up) by their limit ...
    assert warmup.Policy.of(config, list(AGES)).stale_after_s == limits["a"] == limits["b"]
    # ... and the leading beat asks a warm-up of each stale node, a round at once of the hub node if stale.
    warmed, now = _beat_on_lead(monkeypatch, config)
    assert warmed == [node for node in config.service.nodes if node != "head" and STALE[node]]
    assert now == []


def test_the_hub_node_past_its_own_limit_is_stale_everywhere(monkeypatch, capsys):
    config = _config()
    monkeypatch.setitem(AGES, "head", config.stale_after_s("head") + 2.0)
    monkeypatch.setitem(STALE, "head", True)
    assert _status(monkeypatch, capsys, config)["head"]["stale"]
    gauge, age = _exported(monkeypatch, config)
    assert age["head"] > gauge["head"] == config.stale_after_s("head")
    warmed, now = _beat_on_lead(monkeypatch, config)
    assert now == ["head"] and "head" not in warmed
