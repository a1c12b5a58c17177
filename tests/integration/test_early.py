"""Faults cost nothing: a round publishes once its answer is known (issue #18), on a real worker.

Ten loopback servers as the issue measured them -- eight healthy (8-36 ms), one that never answers,
one 400 ms away -- with ``timeout_seconds: 1`` and ``retry_delay: 2``.  Before, every round waited for
the dead server's three attempts (9 s); now it is published when the eight have answered, the two
others are recorded late, and nothing is retried.
"""

import json
import statistics

import pytest

from orchestrator import cli, rounds
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
from workers import config as config_mod

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration

TRUTH_S = 0.0031
HEALTHY = {f"h{i}": Behaviour(offset_s=TRUTH_S, delay_s=0.008 + 0.004 * i, jitter_s=0.001) for i in range(8)}
ROUNDS = 8  # the reach register's width: the dead server ends unreachable


def _timing(servers, key_prefix, tmp_path, name, **ntp):
    return config_mod.load(write_config(tmp_path, servers, key_prefix=key_prefix, name=name, timeout_seconds=1.0,
                                        retry_delay=2.0, max_retries=2, **ntp))


@pytest.mark.parametrize("selection", ["best", "combine"])
def test_a_dead_and_a_slow_server_cost_no_round_time_and_no_retries(worker, simulator, tmp_path, key_prefix,
                                                                    redis_client, capsys, selection):
    _, servers = simulator({**HEALTHY, "dead": Behaviour(loss=1.0),
                            "slow": Behaviour(offset_s=TRUTH_S, delay_s=0.400)})
    healthy = _timing([servers[n] for n in HEALTHY], key_prefix + "h", tmp_path, "healthy.yaml", selection=selection)
    faulty = _timing(list(servers.values()), key_prefix, tmp_path, "faulty.yaml", selection=selection)
    # Interleaved, so that the machine's load falls on both alike.
    healthy_s, faulty_records = [], []
    for _ in range(ROUNDS):
        healthy_s.append(rounds.dispatch(healthy, TEST_NODE).wait()["duration_s"])
        faulty_records.append(rounds.dispatch(faulty, TEST_NODE).wait(complete=True))
    faulty_s = [r["duration_s"] for r in faulty_records]
    base, with_faults = statistics.median(healthy_s), statistics.median(faulty_s)
    assert with_faults <= 1.5 * base + 0.050, (healthy_s, faulty_s)

    store = Store(redis_client, prefix=key_prefix)
    for record in faulty_records:
        by_server = {s["server"]: s for s in record["servers"]}
        assert record["closed_by"] == "early" and record["quality"] == "strict"
        assert abs(record["latest"]["offset"] - TRUTH_S) <= record["latest"]["uncertainty"]
        # Late, recorded with what each said, and never part of what was published.
        dead, slow = by_server[servers["dead"]], by_server[servers["slow"]]
        assert dead["status"] == "late" and dead["reason"] == "timeout" and dead["attempts"] == 1
        assert slow["status"] == "late" and slow["sample"]["delay_s"] >= 0.39
        assert servers["slow"] not in record["latest"].get("combined", [record["latest"]["server"]])
    # Published once each, every request counted once, no retry anywhere.
    stats = store.stats(TEST_NODE)
    assert len(store.history(TEST_NODE, count=50)) == stats["rounds"] == stats["early"] == ROUNDS
    late = sum(s["status"] == "late" for r in faulty_records for s in r["servers"])
    assert stats["late"] == late >= 2 * ROUNDS  # the dead and slow ones at least: a healthy one may be late too
    assert stats["queries"] == 10 * ROUNDS and stats["retries"] == 0
    assert stats["failed:timeout"] == ROUNDS
    # Reach, as chrony keeps it: the dead server unreachable, the slow one reachable (it answers, late).
    reach = store.reach(TEST_NODE)
    assert reach[servers["dead"]].register == 0 and reach[servers["dead"]].unreachable
    assert reach[servers["slow"]].register == 0xFF and reach[servers["h0"]].register == 0xFF

    path = tmp_path / "faulty.yaml"
    assert cli.main(["servers", "--config", str(path), "--node", TEST_NODE, "--json"]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["node"] == TEST_NODE
    states = {s["server"]: s for s in report["servers"]}
    assert states[servers["dead"]]["state"] == "unreachable" and states[servers["dead"]]["reach"] == 0
    assert states[servers["dead"]]["failures"] == {"timeout": ROUNDS}
    assert states[servers["slow"]]["state"] == "late" and states[servers["slow"]]["reach"] == 255
    assert states[servers["h0"]]["state"] == "ok" and states[servers["h0"]]["last_good_age_s"] < 60
    assert cli.main(["servers", "--config", str(path), "--node", TEST_NODE]) == cli.EXIT_OK
    table = capsys.readouterr().out
    assert f"{servers['dead']}" in table and " 377 " in table and "unreachable" in table


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
