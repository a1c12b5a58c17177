"""Servers that lie, stall and misbehave on purpose, through the whole pipeline.

Each test runs real rounds on the real worker against the fault-injecting
simulator and checks two things: the bad server's outcome carries the named
reason, and nothing it said reached ``latest``.
"""

import contextlib
import io
import json
import uuid
from dataclasses import dataclass

import pytest

from orchestrator import cli, rounds
from orchestrator.store import Store, store_for
from simulator.ntpserver import Behaviour, NtpSimulator
from workers import config as config_mod
from workers.contracts import Reason

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration

TRUTH_S = 0.0125
LIE_S = 0.300

#: Every sanity check and kiss code, with the reason it must be refused for.
FAULTS = {
    "kod_rate": (Behaviour(kod="RATE"), {"kod_rate"}),
    "kod_deny": (Behaviour(kod="DENY"), {"kod_deny"}),
    "kod_rstr": (Behaviour(kod="RSTR"), {"kod_rstr"}),
    "leap3": (Behaviour(leap=3), {Reason.UNSYNCHRONISED_LEAP}),
    "stratum0": (Behaviour(stratum=0), {Reason.UNSYNCHRONISED_STRATUM}),
    "stratum16": (Behaviour(stratum=16), {Reason.UNSYNCHRONISED_STRATUM}),
    "bad_origin": (Behaviour(bad_origin=True), {Reason.BOGUS_ORIGIN}),
    "zero_transmit": (Behaviour(zero_transmit=True), {Reason.ZERO_TRANSMIT}),
    "rx_after_tx": (Behaviour(receive_after_transmit=True), {Reason.RECEIVE_AFTER_TRANSMIT}),
    "truncated": (Behaviour(truncate=True), {Reason.TRUNCATED}),
    # Random bytes: almost always the wrong mode, else (1 in 8) a wrong origin.
    "garbage": (Behaviour(garbage=True), {Reason.BAD_MODE, Reason.BOGUS_ORIGIN}),
    "wrong_port": (Behaviour(wrong_port=True), {Reason.WRONG_SOURCE}),
    "mode3": (Behaviour(mode=3), {Reason.BAD_MODE}),
    "version3": (Behaviour(version=3), {Reason.BAD_VERSION}),
    "long_hold": (Behaviour(claimed_hold_s=5.0), {Reason.SERVER_PROCESSING_TOO_LONG}),
    "negative_delay": (Behaviour(delay_s=0.002, claimed_hold_s=0.5), {Reason.NEGATIVE_DELAY}),
    "root_delay": (Behaviour(root_delay_s=2.0), {Reason.ROOT_DELAY_OUT_OF_RANGE}),
    "root_dispersion": (Behaviour(root_dispersion_s=1.5), {Reason.ROOT_DISPERSION_OUT_OF_RANGE}),
    "stale_reference": (Behaviour(stale_reference=True), {Reason.STALE_REFERENCE}),
    "future_reference": (Behaviour(future_reference=True), {Reason.REFERENCE_AFTER_TRANSMIT}),
    "dead": (Behaviour(loss=1.0), {Reason.TIMEOUT}),
}


def _lying(behaviour: Behaviour) -> Behaviour:
    behaviour.offset_s = LIE_S  # whatever gets through would be visibly wrong
    return behaviour


def _round(path, capsys):
    code = cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _server(record, name):
    return next(s for s in record["servers"] if s["server"] == name)


# -- every fault at once, beside one good server: one round, each behaviour checked on its own ------------

@dataclass(frozen=True)
class FaultyRound:
    """One ``measure --json`` of a server for every fault and one good one, and the node's contract after it."""

    servers: dict[str, str]  # name -> host:port
    code: int                # measure's exit status
    record: dict             # what it printed
    latest: dict             # the node's latest key after it
    stats: dict              # the node's counters after it


@pytest.fixture(scope="module")
def faulty(worker, tmp_path_factory) -> FaultyRound:
    """The round, once for every test of it (tests must not change its data)."""
    named = {name: _lying(b) for name, (b, _) in FAULTS.items()}
    named["good"] = Behaviour(offset_s=TRUTH_S, delay_s=0.004)
    key_prefix = f"t{uuid.uuid4().hex[:10]}"
    sim = NtpSimulator.on_free_ports(list(named.values()), seed=1).start()
    try:
        servers = {name: f"127.0.0.1:{port}" for name, port in zip(named, sim.behaviours, strict=True)}
        path = write_config(tmp_path_factory.mktemp("faults"), list(servers.values()), key_prefix=key_prefix,
                            max_retries=2, retry_delay=0.1, timeout_seconds=0.3)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json"])
        store = store_for(config_mod.load(path).service)  # the service's own client of the tests' Redis
        latest, stats = store.latest(TEST_NODE), store.stats(TEST_NODE)
    finally:
        sim.stop()
    return FaultyRound(servers, code, json.loads(printed.getvalue()), latest, stats)


def test_a_round_among_every_fault_exits_ok_and_publishes_the_good_server_only(faulty):
    assert faulty.code == cli.EXIT_OK, "measure exits 0: the good server decides the round"
    latest = faulty.latest
    assert latest["server"] == faulty.servers["good"] and abs(latest["offset"] - TRUTH_S) < 0.001, \
        f"latest is the good server's, within 1 ms of the truth: nothing a faulty server said: {latest}"


def test_each_faulty_server_fails_with_its_named_reason(faulty):
    for name, (_, reasons) in FAULTS.items():
        outcome = _server(faulty.record, faulty.servers[name])
        assert outcome["status"] == "failed", f"{name}: failed: {outcome}"
        assert outcome["reason"] in reasons, \
            f"{name}: refused for one of {sorted(reasons)}: {outcome['reason']} ({outcome['detail']})"


def test_a_kiss_of_death_is_named_and_never_retried(faulty):
    for name in FAULTS:
        if name.startswith("kod_"):
            outcome = _server(faulty.record, faulty.servers[name])
            assert outcome["attempts"] == 1 and outcome["kiss_code"] == name[4:].upper(), \
                f"{name}: one attempt, its kiss code named: {outcome}"


def test_each_refusal_is_counted_by_its_reason(faulty):
    stats = faulty.stats
    for name, (_, reasons) in FAULTS.items():
        if name != "dead":
            assert sum(stats.get(f"rejected:{r}", 0) for r in reasons) >= 1, \
                f"{name}: a rejection counted for one of {sorted(reasons)}: {stats}"
    assert stats["rejected:kod_rate"] == 1 and stats["failed:kod_rate"] == 1, \
        f"the RATE kiss counted once as a rejection and once as a failure: {stats}"


def test_rate_kiss_backs_the_server_off_for_later_rounds(worker, simulator, tmp_path, key_prefix, capsys):
    sim, servers = simulator({"rate": Behaviour(kod="RATE"), "good": Behaviour(offset_s=TRUTH_S, delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    rate_port = int(servers["rate"].rsplit(":", 1)[1])
    _, first = _round(path, capsys)
    assert _server(first, servers["rate"])["reason"] == "kod_rate"
    _, second = _round(path, capsys)
    backed_off = _server(second, servers["rate"])
    assert backed_off["reason"] == "kod_backoff" and backed_off["attempts"] == 0
    assert "sent RATE" in backed_off["detail"]
    assert sim.stats[rate_port].received == 1  # not a single packet since the kiss


def test_deny_kiss_stops_queries_until_the_config_changes(worker, simulator, tmp_path, key_prefix, capsys):
    sim, servers = simulator({"deny": Behaviour(kod="DENY"), "good": Behaviour(offset_s=TRUTH_S, delay_s=0.004)})
    deny_port = int(servers["deny"].rsplit(":", 1)[1])
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    _round(path, capsys)
    _, second = _round(path, capsys)
    assert _server(second, servers["deny"])["reason"] == "kod_demobilised"
    assert sim.stats[deny_port].received == 1
    changed = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, timeout_seconds=0.31,
                           name="changed.yaml")
    _, third = _round(changed, capsys)
    assert _server(third, servers["deny"])["reason"] == "kod_deny"
    assert sim.stats[deny_port].received == 2


def test_a_spoofed_kiss_is_ignored(worker, simulator, tmp_path, key_prefix, capsys):
    sim, servers = simulator({"spoof": Behaviour(kod="DENY", bad_origin=True),
                              "good": Behaviour(offset_s=TRUTH_S, delay_s=0.004)})
    port = int(servers["spoof"].rsplit(":", 1)[1])
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, max_retries=2, retry_delay=0.1)
    _, first = _round(path, capsys)
    spoofed = _server(first, servers["spoof"])
    assert spoofed["reason"] == Reason.BOGUS_ORIGIN and spoofed["attempts"] == 2  # retried as usual
    _round(path, capsys)
    assert sim.stats[port].received == 4  # and queried again next round


def test_an_accurate_looking_liar_is_never_published(worker, simulator, tmp_path, key_prefix, redis_client, capsys):
    named = {f"honest{i}": Behaviour(offset_s=TRUTH_S, delay_s=0.020 + 0.005 * i) for i in range(4)}
    named["liar"] = Behaviour(offset_s=TRUTH_S + 0.5, delay_s=0.002)
    _, servers = simulator(named)
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    for _ in range(5):
        code, record = _round(path, capsys)
        assert code == cli.EXIT_OK
        assert record["latest"]["server"] != servers["liar"]
        assert abs(record["latest"]["offset"] - TRUTH_S) < 0.001
        assert _server(record, servers["liar"])["status"] == "falseticker"
    assert Store(redis_client, prefix=key_prefix).stats(TEST_NODE)["falsetickers"] == 5


def test_correlated_servers_vote_once(worker, simulator, tmp_path, key_prefix, capsys):
    named = {f"smear{i}": Behaviour(offset_s=TRUTH_S + 0.4, delay_s=0.003) for i in range(3)}
    named.update(cf=Behaviour(offset_s=TRUTH_S, delay_s=0.020), nist=Behaviour(offset_s=TRUTH_S, delay_s=0.030))
    _, servers = simulator(named)
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix,
                        server_groups={"google": [servers[f"smear{i}"] for i in range(3)]})
    code, record = _round(path, capsys)
    assert code == cli.EXIT_OK and record["latest"]["server"] == servers["cf"]
    assert record["agreement"]["votes"] == 3


def test_no_majority_is_recorded_and_not_published(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"a": Behaviour(offset_s=0.0, delay_s=0.004), "b": Behaviour(offset_s=0.2, delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    code, record = _round(path, capsys)
    assert code == cli.EXIT_STARVATION and record["latest"] is None
    assert record["agreement"]["majority"] is False


def test_temporal_filter_refuses_a_jump_then_believes_a_lasting_one(worker, simulator, tmp_path, key_prefix,
                                                                     redis_client, capsys):
    sim, servers = simulator({f"s{i}": Behaviour(offset_s=TRUTH_S, delay_s=0.002 + 0.001 * i) for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, outlier_sigma_threshold=5.0,
                        outlier_window_size=10)
    store = Store(redis_client, prefix=key_prefix)
    for _ in range(6):
        assert _round(path, capsys)[0] == cli.EXIT_OK
    before = store.latest(TEST_NODE)
    for port in sim.behaviours:  # the host clock is stepped by 50 ms
        sim.set_behaviour(port, Behaviour(offset_s=TRUTH_S + 0.050, delay_s=sim.behaviours[port].delay_s))
    qualities = []
    for _ in range(4):
        code, record = _round(path, capsys)
        qualities.append(record["quality"])
        if record["quality"] == "outlier":
            assert code == cli.EXIT_STARVATION and store.latest(TEST_NODE) == before
    assert qualities == ["outlier", "outlier", "outlier", "strict"]
    assert abs(store.latest(TEST_NODE)["offset"] - (TRUTH_S + 0.050)) < 0.001
    assert store.stats(TEST_NODE)["outlier"] == 3


def test_advanced_mode_records_and_counts_a_refusal_inside_a_burst(worker, simulator, tmp_path, key_prefix,
                                                                   redis_client):
    """bogus_origin on the first sample of a 3-sample burst whose other samples succeed: not lost."""
    _, servers = simulator({"lies_once": Behaviour(delay_s=0.004, bad_origin_first=1),
                            "honest": Behaviour(delay_s=0.006)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, measurement_mode="advanced",
                        advanced_samples=3)
    record = rounds.dispatch(config_mod.load(path), TEST_NODE).wait()
    entry = next(s for s in record["servers"] if s["server"] == servers["lies_once"])
    assert entry["attempts"] == 1 and entry["sample"]["samples_taken"] == 2
    assert [r["reason"] for r in entry["history"][0]["refusals"]] == [Reason.BOGUS_ORIGIN]
    stats = Store(redis_client, prefix=key_prefix).stats(TEST_NODE)
    assert stats["rejected:bogus_origin"] == 1 and stats["rejected"] == 1
    assert stats["replies"] == 2 + 1 + 3  # lies_once: 2 kept and 1 refused; honest: 3


def test_a_quick_liar_never_outvotes_slow_honest_servers(worker, simulator, tmp_path, key_prefix, capsys):
    """Every reply votes, the gates judge afterwards: a fast liar is a falseticker, not a strict publication.

    Two honest servers (+2.5 ms, RTT 45 ms: over even the relaxed gate's 20 ms bound) and one liar
    (+502.5 ms, RTT 4 ms), ChronoTick's default gates.  Were the honest replies dropped before the vote,
    the liar would be the only vote and be published ``strict``.
    """
    _, servers = simulator({"honest1": Behaviour(offset_s=0.0025, delay_s=0.045),
                            "honest2": Behaviour(offset_s=0.0025, delay_s=0.045),
                            "liar": Behaviour(offset_s=0.5025, delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, timeout_seconds=0.5,
                        max_delay=0.1, max_acceptable_uncertainty=0.010, max_retries=1)
    _, record = _round(path, capsys)
    by_server = {s["server"]: s for s in record["servers"]}
    assert by_server[servers["liar"]]["status"] == "falseticker"
    assert record["agreement"]["votes"] == 3
    latest = record["latest"]
    assert latest is None or abs(latest["offset"] - 0.0025) <= latest["uncertainty"]


def test_a_malformed_host_name_is_a_named_failure_and_the_config_refuses_it(tmp_path):
    """Any exception in a query becomes a named failure: the task ends with an outcome, so its chord calls back.

    The config refuses such names (tests/unit/test_config.py); this is the worker's own defence, for a
    name that reaches it anyway.  Run as the worker runs the task body (``apply``: in this process,
    no broker), with the retries a real round would have.
    """
    import time

    from workers.measure import make_job
    from workers.tasks import query_server

    config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"],
                                                                    "max_retries": 1}}}, environ={})
    cases = {("time..google.com", 123): Reason.DNS_ERROR, ("a" * 64 + ".example", 123): Reason.DNS_ERROR}
    for (host, port), reason in cases.items():
        job = make_job(server=config_mod.ServerAddress(host, port), node=TEST_NODE, round_id="r", ntp=config.ntp,
                       deadline_at=time.time() + 30, rate_backoff_s=0.0)
        outcome = query_server.apply(kwargs={"job": job}).get(disable_sync_subtasks=False)
        assert outcome["status"] == "failed" and outcome["reason"] == reason, (host, outcome)
        assert outcome["detail"]
    with pytest.raises(config_mod.ConfigError):
        config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["time..google.com"]}}}, environ={})
