"""Faults cost nothing: a round publishes once its answer is known (issue #18), on a real worker.

Ten loopback servers as the issue measured them -- eight healthy (8-36 ms), one that never answers,
one 400 ms away -- with ``timeout_seconds: 1`` and ``retry_delay: 2``.  Before, every round waited for
the dead server's three attempts (9 s); now it is published when the eight have answered, the two
others are recorded late, and nothing is retried.
"""

import json
import statistics
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import cli, rounds
from orchestrator.sources import Reach
from orchestrator.store import Store, store_for
from simulator.ntpserver import Behaviour, NtpSimulator
from workers import config as config_mod

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration

TRUTH_S = 0.0031
HEALTHY = {f"h{i}": Behaviour(offset_s=TRUTH_S, delay_s=0.008 + 0.004 * i, jitter_s=0.001) for i in range(8)}
ROUNDS = 8  # the reach register's width: the dead server ends unreachable


def _timing(servers, key_prefix, tmp_path, name, **ntp):
    return config_mod.load(write_config(tmp_path, servers, key_prefix=key_prefix, name=name, timeout_seconds=1.0,
                                        retry_delay=2.0, max_retries=2, **ntp))


# -- a dead and a slow server among eight healthy ones: one run, each behaviour checked on its own ------------

@dataclass(frozen=True)
class FaultyRun:
    """Eight rounds of the eight healthy servers alone and of all ten, interleaved, as the issue measured them."""

    selection: str
    servers: dict[str, str]      # name -> host:port
    config_path: Path            # the ten servers' config (the CLI's ``--config``)
    healthy_s: list[float]       # each healthy round's duration_s
    records: list[dict]          # each round of the ten, complete (its late servers in)
    history: int                 # rounds of the ten in the node's history
    stats: dict                  # the node's counters after them
    reach: dict[str, Reach]      # each server's reach register after them


@pytest.fixture(scope="module", params=["best", "combine"])
def faulty(request, worker, tmp_path_factory) -> FaultyRun:
    """The expensive part, once per selection method for every test of it (tests must not change its data)."""
    selection = request.param
    tmp_path = tmp_path_factory.mktemp(f"early-{selection}")
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    named = {**HEALTHY, "dead": Behaviour(loss=1.0), "slow": Behaviour(offset_s=TRUTH_S, delay_s=0.400)}
    sim = NtpSimulator.on_free_ports(list(named.values()), seed=1).start()
    servers = {name: f"127.0.0.1:{port}" for name, port in zip(named, sim.behaviours, strict=True)}
    try:
        healthy = _timing([servers[n] for n in HEALTHY], key_prefix + "h", tmp_path, "healthy.yaml",
                          selection=selection)
        faulty_config = _timing(list(servers.values()), key_prefix, tmp_path, "faulty.yaml", selection=selection)
        # Interleaved, so that the machine's load falls on both alike.
        healthy_s, records = [], []
        for _ in range(ROUNDS):
            healthy_s.append(rounds.dispatch(healthy, TEST_NODE).wait()["duration_s"])
            records.append(rounds.dispatch(faulty_config, TEST_NODE).wait(complete=True))
    finally:
        sim.stop()
    store = store_for(faulty_config.service)  # the service's own client of the tests' Redis
    return FaultyRun(selection, servers, tmp_path / "faulty.yaml", healthy_s, records,
                     len(store.history(TEST_NODE, count=50)), store.stats(TEST_NODE), store.reach(TEST_NODE))


def test_a_dead_and_a_slow_server_cost_no_round_time(faulty):
    base, with_faults = statistics.median(faulty.healthy_s), statistics.median(r["duration_s"] for r in faulty.records)
    assert with_faults <= 1.5 * base + 0.050, \
        f"round time with the dead and slow servers within 1.5 x healthy + 50 ms: {faulty.healthy_s}, " \
        f"{[r['duration_s'] for r in faulty.records]}"


def test_each_round_is_published_early_strict_and_true(faulty):
    for record in faulty.records:
        assert record["closed_by"] == "early", f"published early, not by its callback: {record['round_id']}"
        assert record["quality"] == "strict", f"strict: {record['round_id']}"
        latest = record["latest"]
        assert abs(latest["offset"] - TRUTH_S) <= latest["uncertainty"], f"the truth within its bound: {latest}"


def test_the_dead_and_slow_servers_are_recorded_late_and_never_published(faulty):
    dead_name, slow_name = faulty.servers["dead"], faulty.servers["slow"]
    for record in faulty.records:
        by_server = {s["server"]: s for s in record["servers"]}
        dead, slow = by_server[dead_name], by_server[slow_name]
        assert (dead["status"], dead["reason"], dead["attempts"]) == ("late", "timeout", 1), \
            f"the dead server: late, its one attempt timed out: {dead}"
        assert slow["status"] == "late" and slow["sample"]["delay_s"] >= 0.39, \
            f"the slow server: late, with what it said: {slow}"
        published = record["latest"].get("combined", [record["latest"]["server"]])
        assert slow_name not in published, f"the slow server is not part of what was published: {published}"


def test_every_round_and_request_is_counted_once_and_nothing_is_retried(faulty):
    stats = faulty.stats
    assert faulty.history == ROUNDS, f"each round in history once: {faulty.history} of {ROUNDS}"
    assert stats["rounds"] == stats["early"] == ROUNDS, f"rounds and early rounds counted once each: {stats}"
    late = sum(s["status"] == "late" for r in faulty.records for s in r["servers"])
    # The dead and slow ones at least: a healthy one may be late too.
    assert stats["late"] == late >= 2 * ROUNDS, f"late servers counted as recorded ({late}): {stats}"
    assert stats["queries"] == 10 * ROUNDS, f"one query per server per round: {stats}"
    assert stats["retries"] == 0, f"no retry: {stats}"
    assert stats["failed:timeout"] == ROUNDS, f"the dead server's timeout once a round: {stats}"


def test_reach_marks_the_dead_server_unreachable_and_the_slow_one_reachable(faulty):
    """As chrony keeps it: the slow server answers (late), so it is reachable."""
    dead, slow, healthy = (faulty.reach[faulty.servers[n]] for n in ("dead", "slow", "h0"))
    assert dead.register == 0 and dead.unreachable, f"the dead server unreachable after {ROUNDS} rounds: {dead}"
    assert slow.register == 0xFF, f"the slow server reachable in every round: {slow}"
    assert healthy.register == 0xFF, f"a healthy server reachable in every round: {healthy}"


def test_servers_json_gives_each_servers_state_reach_and_failures(faulty, capsys):
    code = cli.main(["servers", "--config", str(faulty.config_path), "--node", TEST_NODE, "--json"])
    assert code == cli.EXIT_OK, "servers --json exits 0"
    report = json.loads(capsys.readouterr().out)
    assert report["node"] == TEST_NODE, "the node it reports"
    states = {s["server"]: s for s in report["servers"]}
    dead, slow, healthy = (states[faulty.servers[n]] for n in ("dead", "slow", "h0"))
    assert (dead["state"], dead["reach"]) == ("unreachable", 0), f"the dead server: {dead}"
    assert dead["failures"] == {"timeout": ROUNDS}, f"the dead server's failures: {dead}"
    assert (slow["state"], slow["reach"]) == ("late", 255), f"the slow server: {slow}"
    assert healthy["state"] == "ok" and healthy["last_good_age_s"] < 60, f"a healthy server: {healthy}"


def test_servers_table_shows_reach_in_octal_as_chronyc_does(faulty, capsys):
    code = cli.main(["servers", "--config", str(faulty.config_path), "--node", TEST_NODE])
    assert code == cli.EXIT_OK, "servers exits 0"
    table = capsys.readouterr().out
    assert faulty.servers["dead"] in table and "unreachable" in table, f"the dead server's line: {table}"
    assert " 377 " in table, f"a full register in octal (377): {table}"


def test_an_unreachable_server_is_probed_without_retries_and_used_once_it_answers(worker, simulator, tmp_path,
                                                                                 key_prefix, redis_client):
    # Two servers: the dead one's vote decides the majority, so its round cannot be decided early
    # and it is retried -- until eight rounds without a reply make it unreachable.
    sim, servers = simulator({"good": Behaviour(offset_s=TRUTH_S, delay_s=0.004),
                              "dead": Behaviour(loss=1.0)})
    config = config_mod.load(write_config(tmp_path, list(servers.values()), key_prefix=key_prefix,
                                          timeout_seconds=0.15, retry_delay=0.05, max_retries=2))
    store = Store(redis_client, prefix=key_prefix)
    for _ in range(8):
        record = rounds.dispatch(config, TEST_NODE).wait(complete=True)
        assert {s["server"]: s for s in record["servers"]}[servers["dead"]]["attempts"] == 2, json.dumps(record)
    assert store.reach(TEST_NODE)[servers["dead"]].unreachable
    record = rounds.dispatch(config, TEST_NODE).wait(complete=True)
    dead = {s["server"]: s for s in record["servers"]}[servers["dead"]]
    assert dead["attempts"] == 1 and dead["reason"] == "timeout"  # probed once, not retried
    port = int(servers["dead"].rsplit(":", 1)[1])
    sim.set_behaviour(port, Behaviour(offset_s=TRUTH_S, delay_s=0.006))
    record = rounds.dispatch(config, TEST_NODE).wait(complete=True)
    back = {s["server"]: s for s in record["servers"]}[servers["dead"]]
    assert back.get("sample") is not None and back["status"] in ("chosen", "accepted")  # used at once
    assert store.reach(TEST_NODE)[servers["dead"]].register == 1


def test_the_beats_rounds_are_decided_early_too(worker, simulator, tmp_path, key_prefix, redis_client):
    """As the beat sends a round (one message, fanned out by the node's worker): the same early decision."""
    from ..conftest import wait_for

    _, servers = simulator({**HEALTHY, "dead": Behaviour(loss=1.0)})
    config = _timing(list(servers.values()), key_prefix, tmp_path, "beat.yaml")
    handle = rounds.dispatch_fanned_out(config, TEST_NODE)
    assert handle.events is None  # nobody listens: the beat learns of it from the round's claim
    wait_for(handle.ready, what="the round to be published")
    store = Store(redis_client, prefix=key_prefix)
    record = store.round_record(TEST_NODE, handle.round_id)
    assert record["closed_by"] == "early" and record["duration_s"] < 0.5  # the dead server's timeout is 1 s
    assert {s["server"]: s["status"] for s in record["servers"]}[servers["dead"]] == "late"
    wait_for(lambda: store.round_state(TEST_NODE, handle.round_id) == "complete", what="its late outcome")
    dead = {s["server"]: s for s in store.round_record(TEST_NODE, handle.round_id)["servers"]}[servers["dead"]]
    assert dead["status"] == "late" and dead["reason"] == "timeout" and dead["attempts"] == 1


# -- what an adversary found (issue #24): each round is published only as waiting would publish it ----------

def _early_config(tmp_path, servers, key_prefix, **ntp):
    # A refused first reply is retried 0.2 s later.
    return config_mod.load(write_config(tmp_path, servers, key_prefix=key_prefix, timeout_seconds=0.3,
                                        retry_delay=0.2, max_retries=2, **ntp))


@pytest.mark.parametrize("selection", ["best", "combine"])
def test_fast_liars_never_outvote_an_honest_server_waiting_for_its_retry(worker, simulator, tmp_path, key_prefix,
                                                                        selection):
    # h1, h2 honest (20-24 ms); h3 honest but its first reply refused (unsynchronised), so it waits for its
    # retry; l1, l2 fast and 1,000,000 s off.
    _, servers = simulator({"h1": Behaviour(offset_s=TRUTH_S, delay_s=0.020),
                            "h2": Behaviour(offset_s=TRUTH_S, delay_s=0.024),
                            "h3": Behaviour(offset_s=TRUTH_S, delay_s=0.020, unsynchronised_first=1),
                            "l1": Behaviour(offset_s=1e6, delay_s=0.002), "l2": Behaviour(offset_s=1e6, delay_s=0.002)})
    config = _early_config(tmp_path, list(servers.values()), key_prefix, selection=selection)
    record = rounds.dispatch(config, TEST_NODE).wait(complete=True)
    latest = record["latest"]
    assert latest is not None and record["quality"] == "strict", json.dumps(record)
    assert abs(latest["offset"] - TRUTH_S) <= latest["uncertainty"] <= 0.05, latest
    status = {s["server"]: s for s in record["servers"]}
    assert status[servers["l1"]]["status"] == status[servers["l2"]]["status"] == "falseticker"
    assert status[servers["h3"]]["attempts"] == 2 and status[servers["h3"]]["status"] != "falseticker"


def test_a_group_member_waiting_for_its_retry_keeps_its_groups_vote_open(worker, simulator, tmp_path, key_prefix):
    # ChronoTick's homelab config makes Google's four one vote.  g1 slow and 40 ms off; g2 honest, its first
    # reply refused (unsynchronised) so that it waits for its retry; a fast server 50 ms off; b honest.
    # Waiting: g2's vote makes the fast one a falseticker.
    _, servers = simulator({"g1": Behaviour(offset_s=TRUTH_S + 0.040, delay_s=0.090),
                            "g2": Behaviour(offset_s=TRUTH_S, delay_s=0.012, unsynchronised_first=1),
                            "fast": Behaviour(offset_s=TRUTH_S + 0.050, delay_s=0.004),
                            "b": Behaviour(offset_s=TRUTH_S, delay_s=0.012)})
    config = _early_config(tmp_path, list(servers.values()), key_prefix,
                           server_groups={"google": [servers["g1"], servers["g2"]]})
    record = rounds.dispatch(config, TEST_NODE).wait(complete=True)
    latest = record["latest"]
    assert latest is not None and abs(latest["offset"] - TRUTH_S) <= latest["uncertainty"] <= 0.010, json.dumps(record)
    status = {s["server"]: s for s in record["servers"]}
    assert status[servers["fast"]]["status"] == "falseticker"
    assert status[servers["g2"]]["attempts"] == 2
