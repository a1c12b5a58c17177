"""One exchange against real servers on loopback: the simulator and chronyd."""

import socket
import time

import pytest

from simulator.ntpserver import Behaviour
from workers import measure
from workers.contracts import Reason
from workers.ntp import client
from workers.ntp.client import QueryFailed

pytestmark = pytest.mark.integration


def _exchange(address: str, timeout_s: float = 0.5):
    host, port = address.rsplit(":", 1)
    return client.exchange(address, socket.AF_INET, (host, int(port)), timeout_s=timeout_s)


def test_offset_and_delay_match_the_simulated_truth(simulator):
    _, servers = simulator({"sym": Behaviour(offset_s=0.250, delay_s=0.020),
                            "asym": Behaviour(offset_s=-0.100, delay_s=0.030, asymmetry_s=0.010)})
    sym = _exchange(servers["sym"])
    assert sym.offset_s == pytest.approx(0.250, abs=0.0005)
    assert sym.delay_s == pytest.approx(0.020, abs=0.002)
    assert sym.kernel_rx_timestamp  # t4 came from the kernel, not from a woken thread
    asym = _exchange(servers["asym"])
    # The inbound leg is 10 ms longer: the estimate is off by exactly half of that,
    # and the uncertainty (at least delay/2) still covers the truth.
    assert asym.offset_s == pytest.approx(-0.100 + 0.005, abs=0.0005)
    assert abs(asym.offset_s - (-0.100)) <= asym.uncertainty_s
    assert asym.uncertainty_s >= asym.delay_s / 2


def test_uncertainty_is_root_distance(simulator):
    _, servers = simulator({"s": Behaviour(delay_s=0.010, root_delay_s=0.020, root_dispersion_s=0.003)})
    sample = _exchange(servers["s"])
    # delay/2 + root delay/2 + root dispersion + server precision + client precision + PHI * delay,
    # plus half our own sendto() call (measured per exchange, microseconds).
    floor = (sample.delay_s / 2 + 0.020 / 2 + 0.003 + sample.precision_s + client.CLIENT_PRECISION_S
             + client.PHI * sample.delay_s)
    assert sample.precision_s == 2.0 ** -14
    assert floor < sample.uncertainty_s < floor + 200e-6


@pytest.mark.parametrize("behaviour, reason", [
    (Behaviour(kod="RATE"), "kod_rate"),
    (Behaviour(kod="DENY"), "kod_deny"),
    (Behaviour(leap=3), Reason.UNSYNCHRONISED_LEAP),
    (Behaviour(stratum=16), Reason.UNSYNCHRONISED_STRATUM),
    (Behaviour(bad_origin=True), Reason.BOGUS_ORIGIN),
    (Behaviour(zero_transmit=True), Reason.ZERO_TRANSMIT),
    (Behaviour(truncate=True), Reason.TRUNCATED),
    (Behaviour(wrong_port=True), Reason.WRONG_SOURCE),
    (Behaviour(mode=5), Reason.BAD_MODE),
    (Behaviour(loss=1.0), Reason.TIMEOUT),
])
def test_misbehaving_server_is_rejected_with_its_reason(simulator, behaviour, reason):
    _, servers = simulator({"bad": behaviour})
    with pytest.raises(QueryFailed) as caught:
        _exchange(servers["bad"], timeout_s=0.3)
    assert caught.value.rejection.reason == reason


def test_chronyd_answers_as_a_real_server(chronyd):
    sample = _exchange(chronyd)
    assert sample.stratum == 8  # `local stratum 8`
    assert abs(sample.offset_s) < 0.001  # it serves this host's own clock
    assert 0 <= sample.delay_s < 0.01


def _advanced_job(address, samples=3):
    host, port = address.rsplit(":", 1)
    return {"server": address, "host": host, "port": int(port), "timeout_s": 0.5, "samples": samples}


def test_advanced_mode_keeps_the_minimum_delay_sample(simulator):
    # Each leg up to 5 ms late: every reply within 4x the best delay, so a burst waits for all three.
    _, servers = simulator({"jittery": Behaviour(offset_s=0.01, delay_s=0.004, jitter_s=0.005)})
    spread = []
    for _ in range(5):
        result = measure.attempt(_advanced_job(servers["jittery"]))
        delays = result["burst_delays_s"]
        assert result["samples_taken"] == len(delays) == 3
        assert result["delay_s"] == min(delays)  # the kept sample is the least-delayed one
        spread.append(max(delays) - min(delays))
        assert result["jitter_s"] >= 0 and result["uncertainty_s"] >= result["delay_s"] / 2 + result["jitter_s"]
    assert max(spread) > 0.002  # the delays really differ, so keeping another sample would show


def test_advanced_mode_records_a_refused_sample_of_a_burst_that_succeeds(simulator):
    _, servers = simulator({"lies_once": Behaviour(delay_s=0.004, bad_origin_first=1)})
    result = measure.attempt(_advanced_job(servers["lies_once"]))
    assert result["samples_taken"] == 2
    assert [r["reason"] for r in result["refusals"]] == [Reason.BOGUS_ORIGIN]


def test_advanced_mode_keeps_every_refusal_of_a_burst_that_fails(simulator):
    _, servers = simulator({"liar": Behaviour(delay_s=0.004, bad_origin=True)})
    with pytest.raises(measure.BurstFailed) as caught:
        measure.attempt(_advanced_job(servers["liar"]))
    assert caught.value.rejection.reason == Reason.BOGUS_ORIGIN
    assert [r.reason for r in caught.value.earlier] == [Reason.BOGUS_ORIGIN] * 2


def test_unresolvable_name_is_a_named_dns_error():
    job = {"server": "no-such-host.invalid", "host": "no-such-host.invalid", "port": 123, "timeout_s": 2.0,
           "samples": 1}
    with pytest.raises(QueryFailed) as caught:
        measure.attempt(job)
    assert caught.value.rejection.reason == Reason.DNS_ERROR


def _closed_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing listens on (bound, read, released: the kernel then answers it with ICMP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def test_nothing_listening_is_a_named_port_unreachable_at_once():
    """A relay or hub NTP server that is down: ICMP port unreachable fails the exchange at once, named
    (``IP_RECVERR``), not after the timeout -- and it is what makes such a round an outage."""
    port = _closed_udp_port()
    started = time.monotonic()
    with pytest.raises(QueryFailed) as caught:
        _exchange(f"127.0.0.1:{port}", timeout_s=2.0)
    took = time.monotonic() - started
    assert caught.value.rejection.reason == Reason.PORT_UNREACHABLE
    assert f"127.0.0.1:{port}" in caught.value.rejection.detail
    assert took < 1.0, f"waited {took:.2f} s for a refusal the kernel reported at once"


def test_a_worker_armed_with_its_node_refuses_another_nodes_job(monkeypatch):
    from workers import tasks

    monkeypatch.setenv("CHRONOTICK_NODE", "ares-comp-11")
    job = {"server": "127.0.0.1:9", "host": "127.0.0.1", "port": 9, "node": "ares-comp-12", "round_id": "r",
           "timeout_s": 0.1, "samples": 1, "retry_waits_s": [], "deadline_at": 4e9}
    outcome = tasks.query_server.apply(kwargs={"job": job}).get()
    assert outcome["status"] == "failed" and outcome["reason"] == Reason.WRONG_NODE
    assert outcome["attempts"] == 0  # not a packet sent


def test_a_spoofed_packet_ahead_of_the_reply_does_not_cost_the_exchange(simulator):
    """RFC 5905: a packet with a wrong origin is discarded and the wait goes on; the genuine reply is used."""
    _, servers = simulator({"spoofed": Behaviour(offset_s=0.004, delay_s=0.012, spoofed_ahead_s=0.002)})
    sample = _exchange(servers["spoofed"], timeout_s=0.5)
    assert abs(sample.offset_s - 0.004) <= sample.uncertainty_s
    assert 0.010 <= sample.delay_s < 0.1  # the genuine reply's round trip, not the spoofer's 2 ms
    # With nothing genuine behind it, the spoofed packet is what gets named.
    _, only = simulator({"only": Behaviour(bad_origin=True)})
    with pytest.raises(QueryFailed) as caught:
        _exchange(only["only"], timeout_s=0.3)
    assert caught.value.rejection.reason == Reason.BOGUS_ORIGIN
