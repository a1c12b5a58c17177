"""Services dying on the cluster (issue #25 item 9): Redis, the relay, a worker and the beat SIGKILLed.

One behaviour a test, on the session's bed (tests/cluster/bed.py): the head's
Redis SIGKILLed and restarted from its append-only file; the relay the nodes
measure through dead for 25 s; a node's worker SIGKILLed and restarted as
systemd would (``Restart=on-failure``, ``RestartSec=5``); the beat SIGKILLed
until ``ChronotickNtpNoLeadingBeat`` fires, then restarted.  Every time is
Redis' clock (``TIME``; ``published_at`` and ``dispatched_at`` are on it).
"""

from __future__ import annotations

import math
import re
import subprocess
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.store import Store
from workers.keys import Keys

from .bed import KEY_PREFIX, REPO, poll

pytestmark = pytest.mark.cluster

#: The bed's timing (Bed.write_files): a normal round every 2 s, a warm-up of 4 s at 1 s.
INTERVAL_S = 2.0
WARM_UP_S = 4.0
WARM_UP_INTERVAL_S = 1.0
#: A node is stale after 3 normal intervals (workers.redisclock.STALE_INTERVALS).
STALE_S = 3 * INTERVAL_S
#: ``ntp_service.beat_lease_seconds``' default: the bed sets none.
LEASE_S = 10.0
#: A reach register whose server answered in each of the last eight rounds.
FULL = 0xFF
ALERTS = REPO / "configs" / "prometheus" / "alerts.yml"


def _registers(store: Store, node: str) -> dict[str, int]:
    return {server: reach.register for server, reach in store.reach(node).items()}


def _all_full(bed, store: Store) -> bool:
    return all(set(_registers(store, node).values()) == {FULL} for node in bed.nodes)


def _publishing(bed, timeout_s: float = 3 * INTERVAL_S) -> None:
    """Every node publishes a round from now (the bed is at work before a fault is injected)."""
    now = bed.redis_time()
    for node in bed.nodes:
        bed.wait_published(node, after=now, timeout_s=timeout_s)


def _redis_answers(bed) -> bool:
    try:
        return bool(bed.redis().ping())
    except Exception:
        return False


def test_redis_sigkilled_and_restarted_loses_nothing_and_nodes_publish_within_15_s(bed):
    """The head's Redis SIGKILLed and restarted on its append-only file."""
    store = Store(bed.redis(), prefix=KEY_PREFIX)
    _publishing(bed)
    history = {node: [r["round_id"] for r in store.history_since(node, 0.0)] for node in bed.nodes}
    latest = {node: bed.latest(node) for node in bed.nodes}
    assert all(history.values()) and all(latest.values())

    bed.crash("redis")
    killed_at = time.time()
    bed.restart("redis", bed.start_redis)
    poll(lambda: _redis_answers(bed), timeout_s=30.0, what="Redis to answer again")
    up_at = bed.redis_time()
    down_s = up_at - killed_at

    # Nothing lost: every round recorded before the kill is still there, and each node's latest is the one
    # published before the kill or one published after it from a round the history holds.
    after = {node: [r["round_id"] for r in store.history_since(node, 0.0)] for node in bed.nodes}
    lost = {node: sorted(set(history[node]) - set(after[node])) for node in bed.nodes}
    assert not any(lost.values()), f"rounds lost with Redis' SIGKILL: {lost}"
    for node in bed.nodes:
        now = bed.latest(node)
        assert now is not None, f"{node}: latest gone"
        assert now["published_at"] >= latest[node]["published_at"], (node, latest[node], now)
        if now["published_at"] == latest[node]["published_at"]:
            assert now == latest[node], f"{node}: latest changed: {latest[node]} -> {now}"

    took = {node: bed.wait_published(node, after=up_at, timeout_s=45.0) - up_at for node in bed.nodes}
    print(f"\nRedis down {down_s:.1f} s; {sum(map(len, history.values()))} rounds kept; published again "
          + ", ".join(f"{node} {t:.1f} s" for node, t in took.items()) + " after Redis answered")
    assert max(took.values()) <= 15.0, f"a node published more than 15 s after Redis answered again: {took}"


def test_relay_dead_for_25_s_records_outages_not_starvation_and_costs_no_reach(bed):
    """The relay every node measures the Internet through, dead for 25 s."""
    store = Store(bed.redis(), prefix=KEY_PREFIX)
    poll(lambda: _all_full(bed, store), timeout_s=30.0, what="every server's reach register to be full")
    before = {node: store.stats(node) for node in bed.nodes}

    bed.crash("relay")
    down_at = bed.redis_time()
    time.sleep(25.0)  # the fault's length, not a wait for anything
    back_at = bed.redis_time()  # from here the relay may answer (its start waits until it does)
    bed.restart("relay", bed.start_relay)
    up_at = bed.redis_time()

    took = {node: bed.wait_published(node, after=up_at, timeout_s=20.0) - up_at for node in bed.nodes}
    # The rounds dispatched and finished while the relay was away (one straddling its death or return may publish).
    gap = {node: [r for r in store.history_since(node, down_at) if r["dispatched_at"] >= down_at + 1.0
                  and r["finished_at"] <= back_at] for node in bed.nodes}
    qualities = {node: sorted({r["quality"] for r in records}) for node, records in gap.items()}
    stats = {node: store.stats(node) for node in bed.nodes}
    outages = {node: stats[node].get("outage", 0) - before[node].get("outage", 0) for node in bed.nodes}
    starved = {node: stats[node].get("starvation", 0) - before[node].get("starvation", 0) for node in bed.nodes}

    # The reach registers after the relay's return: the rounds since return fill them again, the outages did not
    # shift a zero in (eight rounds at 2 s each would be 16 s of misses otherwise: poll a round or two).
    def missing() -> dict[str, dict[str, str]]:
        return {node: {s: f"{r:08b}" for s, r in _registers(store, node).items() if r != FULL} for node in bed.nodes}

    lost_bits = missing()
    end = time.monotonic() + 2 * INTERVAL_S
    while any(lost_bits.values()) and time.monotonic() < end:
        time.sleep(0.2)
        lost_bits = missing()
    print(f"\nrelay down {back_at - down_at:.1f} s (answering {up_at - back_at:.1f} s later): "
          f"rounds in the gap {({n: len(r) for n, r in gap.items()})}, "
          f"qualities {qualities}, outages +{outages}, starvation +{starved}; published again "
          + ", ".join(f"{node} {t:.1f} s" for node, t in took.items()) + " after the relay's return")

    assert all(len(records) >= 5 for records in gap.values()), f"too few rounds during the gap: {qualities}"
    assert max(took.values()) <= 3 * INTERVAL_S, f"publishing again after the relay's return took {took}"
    reasons = {node: sorted({str(a.get("reason")) for r in records for s in r["servers"] for a in s["history"]})
               for node, records in gap.items()}
    assert all(q == ["outage"] for q in qualities.values()), f"rounds in the gap: {qualities} ({reasons})"
    assert all("port_unreachable" in named for named in reasons.values()), f"no ICMP refusal named: {reasons}"
    assert all(outages[node] >= len(gap[node]) for node in bed.nodes), f"outages counted {outages}"
    assert not any(starved.values()), f"NTP starvation counted for a dead relay: {starved}"
    assert not any(lost_bits.values()), f"reach bits lost to the relay's death: {lost_bits}"


def test_worker_sigkilled_and_restarted_warms_up_and_returns_to_its_phase(bed):
    """node2's worker SIGKILLed; systemd restarts it after ``RestartSec=5``, plus its start: the node is stale.

    docs/contract.md ("Warm-up on demand"): a worker starting while its node
    has no fresh measurement (3 normal intervals) asks for the node's warm-up.
    docs/design.md: node i of n has its normal rounds at i/n of the interval,
    the first after a warm-up at the first phase slot from its end.
    """
    node = "node2"
    index = bed.nodes.index(node)
    phase = INTERVAL_S * index / len(bed.nodes)
    store = Store(bed.redis(), prefix=KEY_PREFIX)
    name = f"worker-{node}"
    _publishing(bed)

    bed.crash(name)
    last = bed.published_at(node)
    # What systemd's restart delay and the worker's start come to here: past 3 normal intervals of silence.
    poll(lambda: bed.redis_time() - last > STALE_S, timeout_s=STALE_S + 5.0, what=f"{node} to go stale")
    started = bed.redis_time()
    worker = bed.restart(name, lambda: bed.start_worker(node))
    asked = poll(lambda: worker.lines(rf"\[WARM-UP\] {node}: no fresh measurement"), timeout_s=30.0,
                 what=f"{node}'s worker to ask for a warm-up")
    ends_ms = bed.redis().zscore(Keys(KEY_PREFIX).warm_up(), node)
    assert ends_ms is not None, f"no warm-up in the schedule after {asked}"
    warm_end = float(ends_ms) / 1000
    warm_start = warm_end - WARM_UP_S

    # The warm-up's rounds, then three normal ones.
    def normal_rounds() -> list[dict]:
        # Past the warm-up's end by a warm-up interval: the beat reads a warm-up up to a poll (1 s) after it is
        # asked for, so its last warm-up slot may come just after the end Redis holds.
        return [r for r in store.history_since(node, started) if r["dispatched_at"] >= warm_end + WARM_UP_INTERVAL_S]

    poll(lambda: len(normal_rounds()) >= 3, timeout_s=WARM_UP_S + 4 * INTERVAL_S + 10.0,
         what=f"{node}'s normal rounds after its warm-up", interval_s=0.2)
    records = store.history_since(node, started)
    warm = [r for r in records if warm_start - 0.05 <= r["dispatched_at"] < warm_end - 0.05]
    warm_gaps = [b["dispatched_at"] - a["dispatched_at"] for a, b in zip(warm, warm[1:], strict=False)]
    normal = normal_rounds()[:3]
    normal_at = [r["dispatched_at"] for r in normal]
    # Distance of each normal round from the node's phase slot k * interval + phase (s).
    off_phase = [abs(((at - phase + INTERVAL_S / 2) % INTERVAL_S) - INTERVAL_S / 2) for at in normal_at]
    print(f"\n{node} restarted {started - last:.1f} s after its last round; warm-up {asked[0].strip()[:80]}...; "
          f"warm-up rounds {len(warm)} {[round(g, 2) for g in warm_gaps]} s apart ({[r['quality'] for r in warm]}); "
          f"normal rounds at {[round(at % INTERVAL_S, 3) for at in normal_at]} mod {INTERVAL_S:g} s "
          f"(phase {phase:.3f} s; off by {[round(o, 3) for o in off_phase]})")

    assert len(warm) >= WARM_UP_S / WARM_UP_INTERVAL_S - 1, f"warm-up rounds: {len(warm)} ({records})"
    assert all(abs(g - WARM_UP_INTERVAL_S) <= 0.3 for g in warm_gaps), f"warm-up rounds {warm_gaps} s apart"
    assert all(r["quality"] in ("strict", "relaxed") for r in warm + normal), [r["quality"] for r in warm + normal]
    gaps = [b - a for a, b in zip(normal_at, normal_at[1:], strict=False)]
    assert all(abs(g - INTERVAL_S) <= 0.3 for g in gaps), f"normal rounds {gaps} s apart"
    at_mod = [round(at % INTERVAL_S, 3) for at in normal_at]
    assert max(off_phase) <= 0.25, (f"{node}'s normal rounds after a warm-up are not at its phase {phase:.3f} s "
                                    f"of the {INTERVAL_S:g} s interval: {at_mod}")


def _lease(text: str) -> tuple[float, dict[str, float]]:
    """``chronotick_ntp_beat_lease_held`` and the holders of one scrape."""
    held, holders = math.nan, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chronotick_ntp_beat_lease_held":
                held = sample.value
            elif sample.name == "chronotick_ntp_beat_lease_holder":
                holders[sample.labels["holder"]] = sample.value
    return held, holders


def _age(text: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chronotick_ntp_beat_lease_age_seconds":
                return sample.value
    return None


def _alert_rule(name: str) -> dict:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return rule
    raise AssertionError(f"no alert {name} in {ALERTS}")


def _promtool() -> str:
    from tests.conftest import tool

    return tool("promtool", package="prometheus")


def test_beat_killed_raises_no_leading_beat_within_its_for_and_a_restarted_beat_leads(bed, tmp_path):
    """The beat SIGKILLed: its lease lapses, the exporter says nobody leads, the alert fires after ``for:``.

    The exporter is scraped every 2 s from before the kill until ``for:`` has
    passed since the first scrape without a holder; ``promtool test rules``
    then evaluates the shipped rule over exactly those scraped values.
    """
    rule = _alert_rule("ChronotickNtpNoLeadingBeat")
    for_s = _seconds(rule["for"])
    step = 2.0  # a scrape interval fine enough to see the lapse within a couple of seconds
    _publishing(bed)
    held, holders = _lease(bed.scrape("head"))
    assert held == 1 and len(holders) == 1, (held, holders)
    old_holder = next(iter(holders))

    samples: list[tuple[float, dict[str, float]]] = []  # (held, holders) every `step` s
    killed_at_index = 1
    first_zero: int | None = None
    t0 = time.monotonic()
    while True:
        if len(samples) == killed_at_index:
            bed.crash("beat")
            killed = bed.redis_time()
        held, holders = _lease(bed.scrape("head"))
        samples.append((held, holders))
        if first_zero is None and held == 0:
            first_zero = len(samples) - 1
            lapsed_after = bed.redis_time() - killed
        if first_zero is not None and (len(samples) - 1 - first_zero) * step >= for_s:
            break
        if len(samples) > killed_at_index + (LEASE_S + for_s) / step + 4:
            raise AssertionError(f"the lease never lapsed: {samples}")
        time.sleep(max(0.0, t0 + len(samples) * step - time.monotonic()))  # the scrape interval, as Prometheus'
    assert first_zero is not None
    assert lapsed_after <= LEASE_S + step, f"the exporter said nobody leads only {lapsed_after:.1f} s after the kill"
    after_zero = samples[first_zero:]
    assert all(h == 0 and not who for h, who in after_zero), f"a holder shown with the beat dead: {after_zero}"

    # The shipped rule over the scraped series: pending before `for:` has passed, firing once it has.
    values = " ".join(f"{h:g}" for h, _ in samples)
    series = 'chronotick_ntp_beat_lease_held{instance="head:9124", job="chronotick-ntp"}'
    fires_at = first_zero * step + for_s
    labels = {"severity": "critical", "instance": "head:9124", "job": "chronotick-ntp"}
    tests = {"rule_files": [str(ALERTS)], "evaluation_interval": f"{step:g}s", "tests": [{
        "interval": f"{step:g}s",
        "input_series": [{"series": series, "values": values}],
        "alert_rule_test": [
            {"eval_time": f"{int((first_zero - 1) * step)}s", "alertname": "ChronotickNtpNoLeadingBeat",
             "exp_alerts": []},
            {"eval_time": f"{int(fires_at - step)}s", "alertname": "ChronotickNtpNoLeadingBeat", "exp_alerts": []},
            {"eval_time": f"{int(fires_at)}s", "alertname": "ChronotickNtpNoLeadingBeat",
             "exp_alerts": [{"exp_labels": labels}]},
        ]}]}
    # exp_annotations are not compared when absent? promtool compares them: give the rule's own, rendered.
    annotations = {k: v.replace("{{ $labels.instance }}", labels["instance"]) for k, v in rule["annotations"].items()}
    tests["tests"][0]["alert_rule_test"][2]["exp_alerts"][0]["exp_annotations"] = annotations
    unit = tmp_path / "no_leading_beat_test.yml"
    unit.write_text(yaml.safe_dump(tests))
    result = subprocess.run([_promtool(), "test", "rules", str(unit)], capture_output=True, text=True, timeout=60)

    # A beat restarted takes the lease: a new holder, a fresh age, and rounds again.
    beat = bed.restart("beat", bed.start_beat)
    restarted = bed.redis_time()

    def leads() -> tuple[str, float] | None:
        text = bed.scrape("head")
        held, holders = _lease(text)
        age = _age(text)
        return (next(iter(holders)), age) if held == 1 and len(holders) == 1 and age is not None else None

    holder, age = poll(leads, timeout_s=20.0, what="the restarted beat to take the lease", interval_s=0.2)
    took_lease = bed.redis_time() - restarted
    took = {node: bed.wait_published(node, after=restarted, timeout_s=30.0) - restarted for node in bed.nodes}
    print(f"\nlease lapsed {lapsed_after:.1f} s after the kill (scrapes every {step:g} s: {values}); alert fires "
          f"{fires_at - killed_at_index * step:.0f} s after the kill; restarted beat led after {took_lease:.1f} s "
          f"(age {age:.1f} s), nodes published after " + ", ".join(f"{n} {t:.1f} s" for n, t in took.items()))
    assert result.returncode == 0, f"promtool over the scraped series:\n{result.stdout}{result.stderr}\n{values}"
    assert holder != old_holder, f"the restarted beat's lease has the dead one's holder {holder}"
    assert age <= LEASE_S, f"lease age {age} s"
    assert beat.alive(), beat.tail()
    assert max(took.values()) <= LEASE_S, f"rounds after the beat's restart: {took}"


def _seconds(duration: str) -> float:
    found = re.fullmatch(r"(\d+)([smh])", duration)
    assert found, duration
    return int(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2)]
