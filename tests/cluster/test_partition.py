"""Partitions, on a cluster of network namespaces: a link down for a minute costs seconds after it returns.

Issue #25: an operator pulled a compute node's link for 60 s.  Its worker
logged nothing for the whole outage and published again only 49.5 s after the
link was back: its Redis connections waited out TCP's retransmission back-off.
Here the same happens to two nodes at once -- one whose own interface goes down
(the operator's trial), one whose switch port goes dark (packets vanish
silently) -- and to a service host running the beat and an exporter.  Each
must publish (or answer a scrape) within 10 s of its link returning, and say
once that it lost Redis and once that it is back.

Every time is Redis' clock (``TIME``; ``published_at`` is on it), read right
after the ``ip link set ... up`` that ends the outage.
"""

from __future__ import annotations

import re
import time

import pytest

from orchestrator.store import Store

from .bed import KEY_PREFIX, LogMark, poll

pytestmark = pytest.mark.cluster

#: How long a link stays down (s): the operator's trial.
CUT_S = 60.0
#: The bound on getting back to work after the link returns (s): issue #25.
BACK_WITHIN_S = 10.0
#: The bound on saying that Redis is lost (s): the kernel's verdict on a silent connection (8 s,
#: ``workers.redisurl.DEAD_AFTER_S``), a reply's timeout (5 s) and a connection attempt's (2 s), with room.
LOST_WITHIN_S = 20.0
#: The lines every service logs once per outage (workers/redisurl.py, ``Outages``).
LOST = r"\[REDIS\] lost "
BACK = r"\[REDIS\] back: "
#: A node that keeps its link publishes at least every this long (s): 3 of the bed's 2 s intervals,
#: the stale threshold of ``status`` and the exporter.
STALE_S = 6.0
#: Prometheus' default scrape timeout (s): a scrape during an outage must answer within it.
SCRAPE_TIMEOUT_S = 10.0
#: A reach register whose server answered in each of the last eight rounds.
FULL = 0xFF
#: Reasons of a server no request was sent to (a round no worker took).
NOT_ASKED = {"no_result", "round_deadline"}


def _stamp(line: str) -> float:
    """The wall-clock time at the start of a log line (Celery's and the CLI's formats; every host shares the clock)."""
    found = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
    assert found, line
    return time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000


def test_the_bed_is_a_cluster_whose_nodes_reach_only_the_head(bed):
    """Later tests rely on the topology: nodes see the head, never the Internet; Redis is on the LAN only."""
    import socket

    def connect(address: str, port: int) -> str:
        with socket.socket() as s:
            s.settimeout(2)
            try:
                s.connect((address, port))
            except OSError as exc:
                return type(exc).__name__
            return "connected"

    from .bed import HEAD_ADDRESS, INET_ADDRESS, REDIS_PORT, WAN_HEAD_ADDRESS

    assert bed.call_in("node1", connect, HEAD_ADDRESS, REDIS_PORT) == "connected"
    assert bed.call_in("node1", connect, INET_ADDRESS, 123) != "connected"  # no route, no forwarding
    assert bed.call_in("inet", connect, WAN_HEAD_ADDRESS, REDIS_PORT) != "connected"  # Redis not on the uplink
    assert bed.run("head", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    # Every node measured every upstream through the relay, chronyd's port included.
    store = Store(bed.redis(), prefix=KEY_PREFIX)
    for node in bed.nodes:
        assert set(store.reach(node)) == set(bed.servers), node
    assert bed.redis().config_get("appendonly")["appendonly"] == "yes"
    assert bed.redis().config_get("requirepass")["requirepass"]


def test_nodes_cut_off_for_a_minute_publish_within_10_s_of_their_link_returning(bed):
    """node1's own interface goes down (the operator's trial), node2's switch port; node3 keeps its link."""
    cut = {"node1": "host", "node2": "switch"}
    witness = "node3"
    store = Store(bed.redis(), prefix=KEY_PREFIX)
    workers = {node: bed.services[f"worker-{node}"] for node in cut}
    marks = {node: LogMark(service) for node, service in workers.items()}
    for node in (*cut, witness):  # every node is publishing before the cut
        bed.wait_published(node, after=bed.redis_time() - STALE_S, timeout_s=STALE_S)

    def registers(node: str) -> dict[str, int]:
        return {server: reach.register for server, reach in store.reach(node).items()}

    # Every server of the cut nodes answered its last eight rounds (a fresh bed needs a few more rounds).
    poll(lambda: all(set(registers(node).values()) == {FULL} for node in cut), timeout_s=30.0,
         what="every server's reach register to be full")
    starvation_before = {node: store.stats(node).get("starvation", 0) for node in cut}

    cut_at = bed.redis_time()
    for node, at in cut.items():
        bed.cut(node, at=at)
    # The minute of the outage, watched: the witness keeps publishing, the cut workers say they lost Redis.
    lost_seen: dict[str, float] = {}
    witness_last, witness_gap = bed.published_at(witness), 0.0
    deadline = time.monotonic() + CUT_S
    while time.monotonic() < deadline:
        now = bed.redis_time()
        published = bed.published_at(witness)
        witness_gap = max(witness_gap, now - witness_last)
        witness_last = published
        for node in cut:
            if node not in lost_seen and marks[node].lines(LOST):
                lost_seen[node] = now - cut_at
        time.sleep(0.2)
    up_at = {}
    for node, at in cut.items():
        bed.restore(node, at=at)
        up_at[node] = bed.redis_time()

    # Waited for longer than the bound, so that a failure says how long it took (before the fix: 49 s).
    took = {node: bed.wait_published(node, after=up_at[node], timeout_s=CUT_S + BACK_WITHIN_S) - up_at[node]
            for node in cut}
    # Nothing else to wait for: a "back" line comes before the first round published after it.
    report = "; ".join(f"{node} ({cut[node]}): published {took[node]:.1f} s after its link returned, loss logged "
                       f"{lost_seen.get(node, float('nan')):.1f} s into the outage" for node in cut)
    for node in cut:
        assert took[node] <= BACK_WITHIN_S, f"{report}\n{node}'s worker:\n{marks[node].text()}"
        assert node in lost_seen and lost_seen[node] <= LOST_WITHIN_S, f"{report}\n{marks[node].text()}"
        lost, back = marks[node].lines(LOST), marks[node].lines(BACK)
        assert len(lost) == 1 and len(back) == 1, f"{node}: lost {lost}, back {back}\n{marks[node].text()}"
        assert _stamp(back[0]) >= up_at[node] - 1.0, f"{node} said it was back before its link was: {back[0]}"
        # Back, it asks the beat for a round at once: at ARES' 120-s interval its next slot could be minutes off.
        asked = marks[node].lines(r"\[CATCH-UP\] .*asked the beat for a round at once")
        assert len(asked) == 1, f"{node}: catch-up asks {asked}\n{marks[node].text()}"
    assert witness_gap <= STALE_S, f"{witness} went {witness_gap:.1f} s without publishing during the cut"
    print(f"\n{report}; {witness} never more than {witness_gap:.1f} s without publishing")

    # What the outage cost the cut nodes' records: a round no worker took asked no server, so it should
    # neither count as starvation nor take a reach bit from a server that had all eight.
    def full_again() -> dict[str, dict[str, str]]:
        return {node: {server: f"{register:08b}" for server, register in registers(node).items() if register != FULL}
                for node in cut}

    lost_bits = full_again()
    deadline = time.monotonic() + 2 * 2.0  # the late servers of the next two rounds have been heard by then
    while any(lost_bits.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        lost_bits = full_again()
    starved = {node: store.stats(node).get("starvation", 0) - starvation_before[node] for node in cut}
    unasked = {node: sum(1 for r in store.history_since(node, cut_at)
                         if r["quality"] == "starvation" and all(s.get("reason") in NOT_ASKED for s in r["servers"]))
               for node in cut}
    outages = {node: store.stats(node).get("outage", 0) for node in cut}
    assert not any(starved.values()) and not any(unasked.values()), (
        f"starvation counted {starved} (rounds nobody asked: {unasked}; outages {outages})")
    assert not any(lost_bits.values()), f"reach bits lost {lost_bits} (outages {outages})"
    assert all(outages.values()), f"the rounds nobody asked are not counted as outages: {outages}"


def test_the_beat_and_an_exporter_cut_off_for_a_minute_are_back_within_10_s(bed):
    """The beat and an exporter on a service host of their own (a standby beat's, per docs/operations.md).

    Only a host apart from Redis can lose it: on the head, Redis is local.
    The head's beat stops first (as an operator moving it would), so the one
    beat is the one cut off: no round anywhere until it is back.
    """
    bed.add_host("ops", 5)
    bed.stop("beat")
    try:
        beat = bed.start_beat("ops", name="beat-ops")
        exporter = bed.start_exporter("ops", name="exporter-ops")
        for node in bed.nodes:
            bed.wait_published(node, after=bed.redis_time(), timeout_s=BACK_WITHIN_S * 2)
        marks = {"beat": LogMark(beat), "exporter": LogMark(exporter)}

        cut_at = bed.redis_time()
        bed.cut("ops", at="switch")
        lost_seen: dict[str, float] = {}
        slowest_scrape, answered_down = 0.0, 0
        deadline = time.monotonic() + CUT_S
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                text = bed.scrape("ops", timeout_s=SCRAPE_TIMEOUT_S)
            except OSError as exc:  # what Prometheus would record as a failed scrape (up 0)
                text = f"failed: {exc}"
            slowest_scrape = max(slowest_scrape, time.monotonic() - started)
            answered_down += "chronotick_ntp_redis_up 0.0" in text
            for name, mark in marks.items():
                if name not in lost_seen and mark.lines(LOST):
                    lost_seen[name] = bed.redis_time() - cut_at
            time.sleep(0.5)
        bed.restore("ops", at="switch")
        up_at = bed.redis_time()

        def scrapes_up() -> bool:
            return "chronotick_ntp_redis_up 1.0" in bed.scrape("ops", timeout_s=SCRAPE_TIMEOUT_S)

        poll(scrapes_up, timeout_s=BACK_WITHIN_S * 3, what="the exporter to read Redis again", interval_s=0.2)
        scrape_took = bed.redis_time() - up_at
        took = {node: bed.wait_published(node, after=up_at, timeout_s=BACK_WITHIN_S * 3) - up_at
                for node in bed.nodes}
        report = (f"exporter read Redis {scrape_took:.1f} s after the link returned (slowest scrape during the "
                  f"outage {slowest_scrape:.1f} s, {answered_down} said redis_up 0); rounds published "
                  + ", ".join(f"{node} {t:.1f} s" for node, t in took.items())
                  + f" after; loss logged {lost_seen}")
        assert scrape_took <= BACK_WITHIN_S, f"{report}\n{marks['exporter'].text()}"
        assert max(took.values()) <= BACK_WITHIN_S, f"{report}\n{marks['beat'].text()}"
        assert slowest_scrape <= SCRAPE_TIMEOUT_S and answered_down, report
        for name, mark in marks.items():
            assert name in lost_seen and lost_seen[name] <= LOST_WITHIN_S, f"{report}\n{name}:\n{mark.text()}"
            lost, back = mark.lines(LOST), mark.lines(BACK)
            assert len(lost) == 1 and len(back) == 1, f"{name}: lost {lost}, back {back}\n{mark.text()}"
        print(f"\n{report}")
    finally:
        bed.stop("beat-ops")
        bed.stop("exporter-ops")
        bed.start_beat()
