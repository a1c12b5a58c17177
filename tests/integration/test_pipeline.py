"""The whole pipeline: CLI -> chord on a real worker -> selection -> Redis, read back by a consumer."""

import base64
import contextlib
import io
import json
import re
import time
import uuid
from dataclasses import dataclass

import pytest
import redis

import workers.app
from orchestrator import cli, rounds, selection
from orchestrator.store import Store, store_for
from simulator.ntpserver import Behaviour, NtpSimulator
from workers import chords
from workers import config as config_mod

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration

TRUE_OFFSET_S = 0.0125


def _measure(path, capsys, *extra):
    code = cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json", *extra])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def _by_server(record):
    return {s["server"]: s for s in record["servers"]}


def _expected_choice(record):
    """The documented rule, from the record: the passing truechimer whose bound, widened to the agreed
    interval, is smallest (then its own bound, stratum, delay)."""
    interval = record["agreement"]["interval"]
    passing = [s["sample"] for s in record["servers"] if s["status"] in ("chosen", "accepted")]
    return min(passing, key=lambda x: (selection.covering_uncertainty(x, interval), *selection.best_key(x)))


# -- four healthy servers: one `measure`, each thing it must do checked on its own --------------------------

@dataclass(frozen=True)
class HealthyRound:
    """One ``measure --json --complete`` of four healthy servers, and what a subscriber to ``updates`` saw."""

    code: int          # measure's exit status
    record: dict       # what it printed: the round record, its late servers in
    update: dict       # the first message on the node's updates channel
    config: config_mod.Config


@pytest.fixture(scope="module")
def healthy(worker, redis_url, tmp_path_factory) -> HealthyRound:
    """The round, once for every test of it (tests must not change its data)."""
    sim = NtpSimulator.on_free_ports([Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.002 * (i + 1)) for i in range(4)],
                                     seed=1).start()
    client = redis.Redis.from_url(redis_url)
    try:
        key_prefix = f"t{uuid.uuid4().hex[:10]}"
        path = write_config(tmp_path_factory.mktemp("healthy"), sim.servers(), key_prefix=key_prefix)
        pubsub = client.pubsub()
        pubsub.subscribe(f"{key_prefix}:ntp:{TEST_NODE}:updates")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json", "--complete"])
        update = next(m for m in iter(lambda: pubsub.get_message(timeout=5), None) if m["type"] == "message")
        pubsub.close()
    finally:
        client.close()
        sim.stop()
    return HealthyRound(code, json.loads(printed.getvalue()), json.loads(update["data"]), config_mod.load(path))


def test_measure_exits_ok_with_a_strict_round_every_server_answered_in(healthy):
    record = healthy.record
    assert healthy.code == cli.EXIT_OK, "measure exits 0"
    assert record["quality"] == "strict", f"a strict round: {record['quality']}"
    assert all(s.get("sample") for s in record["servers"]), f"a sample from every server: {record['servers']}"
    # Published as soon as the replies in hand decided it: a server still out then is recorded late.
    late = sum(s["status"] == "late" for s in record["servers"])
    assert record["servers_used"] + late == 4, f"every server used or late: {record['servers_used']} + {late}"


def test_latest_is_the_rounds_published_measurement_with_every_contract_field(healthy):
    latest = store_for(healthy.config.service).latest(TEST_NODE)
    assert latest == healthy.record["latest"], "latest in Redis is the round's"
    missing = {"node", "round_id", "offset", "uncertainty", "delay", "stratum", "server", "quality", "measured_at",
               "published_at", "servers_used", "servers_total"} - set(latest)
    assert not missing, f"the contract's fields of latest: {missing} missing"
    assert latest["measured_at"] <= latest["published_at"], "measured before it was published"


def test_the_published_server_is_the_documented_choice_and_its_bound_covers_the_agreement(healthy):
    record, latest = healthy.record, healthy.record["latest"]
    assert latest["server"] == _expected_choice(record)["server"], "the documented rule's choice"
    low, high = record["agreement"]["interval"]
    assert latest["offset"] - latest["uncertainty"] <= low and latest["offset"] + latest["uncertainty"] >= high, \
        f"the published bound covers the agreed interval [{low}, {high}]: {latest}"
    assert latest["sample_uncertainty"] == _by_server(record)[latest["server"]]["sample"]["uncertainty_s"], \
        "sample_uncertainty is the chosen sample's own"


def test_the_published_offset_is_the_truth_within_its_bound(healthy):
    latest = healthy.record["latest"]
    assert abs(latest["offset"] - TRUE_OFFSET_S) < 0.0005, f"within 0.5 ms of the truth: {latest['offset']}"
    assert abs(latest["offset"] - TRUE_OFFSET_S) <= latest["uncertainty"], f"the truth within its bound: {latest}"


def test_the_update_goes_out_on_the_updates_channel(healthy):
    assert healthy.update == healthy.record["latest"], "the updates message is latest, as published"


def test_the_round_is_in_history_and_counted(healthy):
    store = store_for(healthy.config.service)
    assert store.history(TEST_NODE)[0]["round_id"] == healthy.record["round_id"], "the newest in history"
    stats = store.stats(TEST_NODE)
    assert stats["rounds"] == 1 and stats["strict"] == 1, f"counted once, strict: {stats}"
    assert TEST_NODE in store.nodes(), "the node in the nodes set"


def test_chronyd_takes_part_in_a_round(worker, simulator, tmp_path, key_prefix, capsys, chronyd):
    _, servers = simulator({"sim": Behaviour(delay_s=0.030)})
    path = write_config(tmp_path, [chronyd, servers["sim"]], key_prefix=key_prefix)
    code, record = _measure(path, capsys)
    assert code == cli.EXIT_OK
    assert record["latest"]["server"] == chronyd and record["latest"]["stratum"] == 8


def test_one_dead_server_does_not_fail_the_round(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"good": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.004),
                            "also": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.006),
                            "dead": Behaviour(loss=1.0)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    code, record = _measure(path, capsys, "--complete")
    assert code == cli.EXIT_OK and record["quality"] == "strict" and record["closed_by"] == "early"
    assert record["duration_s"] < 0.5  # not the dead server's timeout (1 s), nor its retries
    dead = _by_server(record)[servers["dead"]]
    assert dead["status"] == "late" and dead["reason"] == "timeout"
    # The round was decided while its first request was out: it was not retried.
    assert dead["attempts"] == 1 and [a["attempt"] for a in dead["history"]] == [1]


def test_slow_servers_pass_only_the_relaxed_gate(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({f"slow{i}": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.060 + 0.005 * i)
                            for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix,
                        max_delay=0.050, max_acceptable_uncertainty=0.040)
    code, record = _measure(path, capsys, "--complete")
    assert code == cli.EXIT_OK
    assert record["quality"] == "relaxed" and record["latest"]["quality"] == "relaxed"
    assert record["latest"]["server"] == _expected_choice(record)["server"]
    assert all(s["attempts"] == 1 for s in record["servers"])  # relaxed-passing samples are not retried


def test_every_server_refused_is_starvation_and_latest_keeps_its_age(worker, simulator, tmp_path, key_prefix,
                                                                      redis_client, capsys):
    sim, servers = simulator({"a": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.004),
                              "b": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.005)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    assert _measure(path, capsys)[0] == cli.EXIT_OK
    store = Store(redis_client, prefix=key_prefix)
    before, stats_before = store.latest(TEST_NODE), store.stats(TEST_NODE)
    for port in sim.behaviours:  # they answer, unsynchronised: NTP starvation (every one silent is an outage)
        sim.set_behaviour(port, Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.004, leap=3))
    code, record = _measure(path, capsys)
    assert code == cli.EXIT_STARVATION
    assert record["quality"] == "starvation" and record["latest"] is None
    assert store.latest(TEST_NODE) == before  # unchanged, with its own timestamps
    after = store.stats(TEST_NODE)
    assert after["starvation"] == stats_before["starvation"] + 1
    assert after["rounds"] == stats_before["rounds"] + 1
    assert store.history(TEST_NODE)[0]["quality"] == "starvation"


def test_retry_schedule_follows_the_configured_waits(worker, simulator, tmp_path, key_prefix, capsys):
    retry_delay = 0.4
    _, servers = simulator({"flaky": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.004, drop_first=2)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, retry_delay=retry_delay,
                        timeout_seconds=0.2)
    code, record = _measure(path, capsys)
    assert code == cli.EXIT_OK
    flaky = record["servers"][0]
    assert flaky["attempts"] == 3 and flaky["status"] == "chosen"
    starts = [a["started_at"] - flaky["history"][0]["started_at"] for a in flaky["history"]]
    # Attempts start 0, 0.4 and 1.2 s after the first one's start (the waits count from it, not from the
    # 0.2 s timeout's end: that gave 0.6 and 1.6 s).  Late by up to 0.15 s on a busy machine, never early.
    for start, planned in zip(starts, (0.0, retry_delay, 3 * retry_delay), strict=True):
        assert planned - 0.02 <= start < planned + 0.15, (starts, planned)


def test_retries_of_a_dead_server_start_at_0_d_3d_from_the_first_start(worker, simulator, tmp_path, key_prefix,
                                                                       capsys):
    """Issue #25 item 4: with a timeout near the delay, the old waits-after-the-failure gave 0, 0.9 and 2.3 s."""
    retry_delay, timeout_s = 0.5, 0.4
    _, servers = simulator({"dead": Behaviour(loss=1.0)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, retry_delay=retry_delay,
                        timeout_seconds=timeout_s, max_retries=3)
    code, record = _measure(path, capsys)
    assert code == cli.EXIT_STARVATION
    dead = record["servers"][0]
    assert dead["attempts"] == 3, dead
    first = dead["history"][0]["started_at"]
    starts = [a["started_at"] - first for a in dead["history"]]
    for start, planned in zip(starts, (0.0, retry_delay, 3 * retry_delay), strict=True):
        assert planned - 0.02 <= start < planned + 0.2, (starts, planned)


def test_sequential_mode_queries_one_server_after_another(worker, simulator, tmp_path, key_prefix, capsys):
    sim, servers = simulator({f"s{i}": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.050) for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, parallel_queries=False)
    code, record = _measure(path, capsys)
    assert code == cli.EXIT_OK and record["parallel"] is False
    assert record["servers_used"] == 3
    arrivals = sorted(t for stats in sim.stats.values() for t in stats.arrivals_ns)
    # Each request went out only after the previous server's 50 ms reply.
    assert all(b - a >= 0.045e9 for a, b in zip(arrivals, arrivals[1:], strict=False)), arrivals


def test_measure_without_a_worker_exits_3_and_says_so(redis_url, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"s": Behaviour()})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    code = cli.main(["measure", "--config", str(path), "--node", "nobody-serves-this"])
    assert code == cli.EXIT_NO_WORKER
    assert "no worker serves queue 'ntp.nobody-serves-this'" in capsys.readouterr().err


def test_measure_with_redis_unreachable_exits_4(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, ["127.0.0.1:123"])
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, "redis://127.0.0.1:1/0")
    try:
        code = cli.main(["measure", "--config", str(path), "--node", TEST_NODE])
    finally:
        monkeypatch.undo()
        from workers.app import app, configure

        configure(app, config_mod.load(path).service)
    assert code == cli.EXIT_NO_BROKER
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


def test_latest_command_reads_the_contract(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"s": Behaviour(offset_s=TRUE_OFFSET_S, delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    assert cli.main(["latest", "--config", str(path), "--node", TEST_NODE]) == cli.EXIT_STARVATION
    capsys.readouterr()
    _measure(path, capsys)
    assert cli.main(["latest", "--config", str(path), "--node", TEST_NODE, "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["server"] == servers["s"]
    assert cli.main(["latest", "--config", str(path), "--node", TEST_NODE]) == cli.EXIT_OK
    assert re.match(r"node testnode: offset \+12\.[45]\d\d ms ± ", capsys.readouterr().out)


def test_round_tasks_go_only_to_the_nodes_queue(simulator, tmp_path, key_prefix):
    _, servers = simulator({"s": Behaviour()})
    config = config_mod.load(write_config(tmp_path, list(servers.values()), key_prefix=key_prefix))
    canvas, meta = rounds.build_round(config, "ares-comp-11")
    assert {t.options["queue"] for t in canvas.tasks} == {"ntp.ares-comp-11"}
    assert canvas.body.options["queue"] == "ntp.ares-comp-11"
    assert meta.deadline_at > meta.dispatched_at


def test_slowest_known_server_is_sent_first(simulator, tmp_path, key_prefix):
    _, servers = simulator({"fast": Behaviour(), "slow": Behaviour(), "new": Behaviour()})
    config = config_mod.load(write_config(tmp_path, list(servers.values()), key_prefix=key_prefix))
    expected = {servers["fast"]: 0.010, servers["slow"]: 0.090}
    canvas, _ = rounds.build_round(config, "n1", expected_delays=expected)
    order = [t.kwargs["job"]["server"] for t in canvas.tasks]
    # A server with no history may be dead (a whole timeout): it goes first too.
    assert order == [servers["new"], servers["slow"], servers["fast"]]
    assert "server=" + servers["new"] in canvas.tasks[0].options["kwargsrepr"]


def test_a_round_nobody_runs_is_closed_at_its_deadline(redis_url, tmp_path, key_prefix, redis_client, capsys,
                                                        monkeypatch):
    path = write_config(tmp_path, ["127.0.0.1:9", "127.0.0.1:10"], key_prefix=key_prefix)
    config = config_mod.load(path)
    header, body, meta = rounds.plan_round(config, "nobody-runs-this", now=time.time() - 60)  # long overdue
    sent = chords.send(header, body)  # as dispatch sends a round (no Celery result to wait on)
    stuck = rounds.RoundHandle(round_id=meta.round_id, node="nobody-runs-this",
                               deadline_at=meta.deadline_at, callback_id=sent.callback_id, meta=meta)
    monkeypatch.setattr(rounds, "dispatch", lambda config, node: stuck)
    monkeypatch.setattr(workers.app, "workers_for_queue", lambda queue, timeout_s=1.0: ["someone"])
    code = cli.main(["measure", "--config", str(path), "--node", "nobody-runs-this", "--json"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_STARVATION  # closed, not hanging, not a traceback
    assert "closing it with what it has" in captured.err
    record = json.loads(captured.out)
    assert record["closed_by"] == "deadline"
    assert {s["reason"] for s in record["servers"]} == {"no_result"}
    store = Store(redis_client, prefix=key_prefix)
    assert store.history("nobody-runs-this")[0]["round_id"] == meta.round_id
    assert rounds.close(stuck) is None  # finishing twice publishes nothing twice
    assert store.stats("nobody-runs-this")["rounds"] == 1


def test_plain_celery_process_takes_redis_from_the_environment(monkeypatch):
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, "redis://10.1.2.3:6390/4")
    monkeypatch.setenv(config_mod.ENV_REDIS_PASSWORD, "pw")
    from workers.app import create_app

    app = create_app()
    assert app.conf.broker_url == "redis://:pw@10.1.2.3:6390/4"
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"


def test_the_beat_sends_one_message_a_round_and_the_node_fans_it_out(simulator, tmp_path, key_prefix, redis_client):
    """Dispatch cost must not grow with the servers: one message to the node's queue, whatever their number."""
    _, servers = simulator({f"s{i}": Behaviour() for i in range(5)})
    config = config_mod.load(write_config(tmp_path, list(servers.values()), key_prefix=key_prefix))
    node = f"idle-{key_prefix}"  # no worker: the messages stay queued for counting
    queue = workers.app.queue_for(node)
    rounds.dispatch(config, node, fan_out=True)
    assert redis_client.llen(queue) == 1
    message = json.loads(redis_client.lindex(queue, 0))
    assert message["headers"]["task"] == chords.FAN_OUT_TASK
    rounds.dispatch(config, node)  # measure's way: every query task sent from here
    assert redis_client.llen(queue) == 1 + 5
    # Each query message carries the callback, with a reference to the round, not its metadata
    # (which waits in Redis with the open round): messages do not grow with the number of servers.
    for raw in redis_client.lrange(queue, 0, 4):
        message = json.loads(raw)
        _, _, embed = json.loads(base64.b64decode(message["body"]))
        assert embed["chord"]["args"][0].keys() == {"round_id", "node", "key_prefix"}
    redis_client.delete(queue)
