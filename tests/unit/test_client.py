"""workers.ntp.client: one exchange on a loopback socket (RFC 5905 section 8's arithmetic), and its refusals.

The server is :class:`tests.unit.loopback_ntp.LoopbackNtp`, a thread on 127.0.0.1 answering as each test
says; nothing leaves the machine.  tests/integration/test_client.py runs the same client against the
simulator and chronyd.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import time

import pytest

from workers.contracts import Reason
from workers.ntp import packet
from workers.ntp.client import (
    CLIENT_PRECISION_S,
    PHI,
    SO_TIMESTAMPNS,
    QueryFailed,
    exchange,
    kernel_rx_ns,
    resolve,
    root_distance_s,
)

from .loopback_ntp import LoopbackNtp, good, reply_to

SEED = 20270301

#: Loopback is fast: an exchange's delay stays far below this (s), even on a loaded machine.
LOOPBACK_SLACK_S = 0.25


def _ask(server: LoopbackNtp, *, timeout_s: float = 1.0, **kwargs):
    return exchange("loopback", socket.AF_INET, server.address, timeout_s=timeout_s, **kwargs)


def _refusal(server: LoopbackNtp, **kwargs) -> tuple[QueryFailed, float]:
    started = time.monotonic()
    with pytest.raises(QueryFailed) as failed:
        _ask(server, **kwargs)
    return failed.value, time.monotonic() - started


def test_root_distance_is_rfc_5905s_sum_on_random_inputs():
    rng = random.Random(SEED)
    for _ in range(500):
        delay, root_delay, root_disp = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 1)
        precision, client_error = 2.0 ** rng.randint(-30, -5), rng.uniform(0, 1e-3)
        expected = (delay / 2 + root_delay / 2 + root_disp + precision + CLIENT_PRECISION_S + client_error
                    + PHI * delay)
        assert root_distance_s(delay_s=delay, root_delay_s=root_delay, root_dispersion_s=root_disp,
                               server_precision_s=precision, client_error_s=client_error) == pytest.approx(expected)


def test_random_replies_give_their_offset_and_fields_within_the_round_trip():
    """The oracle: a server ``offset_s`` ahead that holds the request ``hold_s`` is measured ``offset_s`` ahead,
    to within half the round trip, and every header field reaches the sample as sent."""
    rng = random.Random(SEED + 1)
    cases = []

    def answer(i, request, received_ns):
        case = cases[i]
        # Sent once the hold is over, as a server that really held it would.
        return [(case["hold_s"], reply_to(request, received_ns=received_ns, offset_s=case["offset_s"],
                                          hold_s=case["hold_s"],
                                          stratum=case["stratum"], leap=case["leap"],
                                          precision_log2=case["precision_log2"], root_delay_s=case["root_delay_s"],
                                          root_dispersion_s=case["root_dispersion_s"], ref_id=case["ref_id"]))]

    with LoopbackNtp(answer) as server:
        for _ in range(40):
            case = {"offset_s": rng.choice([rng.uniform(-1e-3, 1e-3), rng.uniform(-900.0, 900.0)]),
                    "hold_s": rng.choice([0.0, rng.uniform(0.0, 0.005)]), "stratum": rng.randint(1, 15),
                    "leap": rng.choice([0, 1, 2]),
                    "precision_log2": rng.randint(-25, -6), "root_delay_s": rng.uniform(0.0, 0.5),
                    "root_dispersion_s": rng.uniform(0.0, 0.5), "ref_id": rng.getrandbits(32)}
            cases.append(case)
            before_ns = time.time_ns()
            sample = _ask(server)
            after_ns = time.time_ns()
            assert sample.offset_s == pytest.approx(case["offset_s"], abs=sample.delay_s / 2 + 1e-6), case
            assert 0.0 <= sample.delay_s < LOOPBACK_SLACK_S, case
            assert (sample.stratum, sample.leap, sample.precision_s) == (
                case["stratum"], case["leap"], 2.0 ** case["precision_log2"])
            assert sample.root_delay_s == pytest.approx(case["root_delay_s"], abs=2 ** -16)
            assert sample.root_dispersion_s == pytest.approx(case["root_dispersion_s"], abs=2 ** -16)
            without_send = root_distance_s(delay_s=sample.delay_s, root_delay_s=sample.root_delay_s,
                                           root_dispersion_s=sample.root_dispersion_s,
                                           server_precision_s=sample.precision_s)
            assert without_send <= sample.uncertainty_s < without_send + 1e-3  # plus half the sendto call
            assert before_ns <= sample.t1_ns <= sample.t4_ns <= after_ns
            assert sample.measured_at == (sample.t1_ns + sample.t4_ns) / 2 / 1e9
            assert (sample.server, sample.address, sample.port, sample.nts) == ("loopback", "127.0.0.1",
                                                                                server.port, False)
            assert sample.as_dict()["measured_at"] == sample.measured_at
            if sys.platform.startswith("linux"):
                assert sample.kernel_rx_timestamp
        assert len(server.requests) == 40


def test_a_packet_that_is_not_our_reply_is_set_aside_for_the_genuine_one_behind_it():
    def answer(i, request, received_ns):
        return [(0.0, reply_to(request, received_ns=received_ns, origin=12345)),  # a spoofer's guess
                (0.0, b"\x24" * 20),  # not even a header
                (0.005, reply_to(request, received_ns=received_ns, offset_s=0.5))]

    with LoopbackNtp(answer) as server:
        sample = _ask(server)
    assert sample.offset_s == pytest.approx(0.5, abs=LOOPBACK_SLACK_S)


@pytest.mark.parametrize(("bad", "reason"), [
    (lambda request, received_ns: reply_to(request, received_ns=received_ns, origin=1), Reason.BOGUS_ORIGIN),
    (lambda request, received_ns: b"\x24" * 20, Reason.TRUNCATED),
    (lambda request, received_ns: reply_to(request, received_ns=received_ns, mode=5), Reason.BAD_MODE),
])
def test_with_nothing_genuine_the_timeout_names_what_was_set_aside(bad, reason):
    with LoopbackNtp(lambda i, request, received_ns: [(0.0, bad(request, received_ns))]) as server:
        failure, took_s = _refusal(server, timeout_s=0.1)
    assert failure.rejection.reason == reason
    assert took_s >= 0.1, "waited the timeout out in case the genuine reply followed"


def test_a_reply_from_another_port_is_named_at_the_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        other_port = other.getsockname()[1]

        def answer(i, request, received_ns):
            return [(0.0, reply_to(request, received_ns=received_ns), other)]  # right bytes, wrong port

        with LoopbackNtp(answer) as server:
            failure, took_s = _refusal(server, timeout_s=0.1)
    assert failure.rejection.reason == Reason.WRONG_SOURCE
    assert f"127.0.0.1:{other_port}" in failure.rejection.detail and took_s >= 0.1


@pytest.mark.parametrize(("fields", "reason", "kiss_code"), [
    ({"stratum": 0, "ref_id": packet.kiss_code_to_ref_id("RATE")}, Reason.KOD_RATE, "RATE"),
    ({"stratum": 0, "ref_id": packet.kiss_code_to_ref_id("DENY")}, Reason.KOD_DENY, "DENY"),
    ({"leap": packet.LEAP_UNSYNCHRONISED}, Reason.UNSYNCHRONISED_LEAP, None),
    ({"stratum": 16}, Reason.UNSYNCHRONISED_STRATUM, None),
    ({"root_delay_s": 2.0}, Reason.ROOT_DELAY_OUT_OF_RANGE, None),
])
def test_our_reply_refused_fails_at_once_with_its_reason(fields, reason, kiss_code):
    """The answer to our request, and unusable: no other will come, so the exchange does not wait."""
    with LoopbackNtp(good(**fields)) as server:
        failure, took_s = _refusal(server, timeout_s=1.0)
    assert (failure.rejection.reason, failure.rejection.kiss_code) == (reason, kiss_code)
    assert took_s < 0.5


def test_a_lower_root_bound_is_passed_to_the_checks():
    with LoopbackNtp(good(root_dispersion_s=0.2)) as server:
        assert _ask(server).root_dispersion_s == pytest.approx(0.2, abs=2 ** -16)
        failure, _ = _refusal(server, max_root_dispersion_s=0.1)
    assert failure.rejection.reason == Reason.ROOT_DISPERSION_OUT_OF_RANGE


def test_a_server_that_says_it_held_the_request_longer_than_the_round_trip_gives_a_negative_delay():
    with LoopbackNtp(good(hold_s=0.5)) as server:
        failure, _ = _refusal(server)
    assert failure.rejection.reason == Reason.NEGATIVE_DELAY


def test_silence_is_a_timeout_after_timeout_s():
    with LoopbackNtp(lambda i, request, received_ns: []) as server:
        failure, took_s = _refusal(server, timeout_s=0.1)
        assert len(server.requests) == 1
    assert failure.rejection.reason == Reason.TIMEOUT and "0.1 s" in failure.rejection.detail
    assert 0.1 <= took_s < 0.5


def test_give_up_at_ends_the_wait_before_the_timeout():
    with LoopbackNtp(lambda i, request, received_ns: []) as server:
        cut = time.monotonic() + 0.05
        failure, took_s = _refusal(server, timeout_s=5.0, give_up_at=lambda: cut)
    assert failure.rejection.reason == Reason.TIMEOUT
    assert 0.05 <= took_s < 1.0
    assert float(failure.rejection.detail.split()[3]) < 1.0, "the detail names the time waited, not the timeout"


def test_give_up_at_none_waits_for_a_late_genuine_reply():
    def answer(i, request, received_ns):
        return [(0.05, reply_to(request, received_ns=received_ns))]

    with LoopbackNtp(answer) as server:
        sample = _ask(server, timeout_s=1.0, give_up_at=lambda: None)
    assert sample.delay_s >= 0.04


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="IP_RECVERR is Linux's")
def test_nothing_listening_is_port_unreachable_at_once():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        address = closed.getsockname()
    started = time.monotonic()
    with pytest.raises(QueryFailed) as failed:
        exchange("nobody", socket.AF_INET, address, timeout_s=2.0)
    assert failed.value.rejection.reason == Reason.PORT_UNREACHABLE
    assert time.monotonic() - started < 1.0


def test_the_kernel_receive_time_is_read_from_its_control_message():
    sec, nsec = 1_795_998_582, 123_456_789
    payload = struct.pack("@qq", sec, nsec)
    assert kernel_rx_ns([(socket.SOL_SOCKET, SO_TIMESTAMPNS, payload)]) == sec * 10 ** 9 + nsec
    assert kernel_rx_ns([(socket.IPPROTO_IP, SO_TIMESTAMPNS, payload)]) is None  # another level's message
    assert kernel_rx_ns([(socket.SOL_SOCKET, SO_TIMESTAMPNS + 1, payload)]) is None
    assert kernel_rx_ns([(socket.SOL_SOCKET, SO_TIMESTAMPNS, payload[:8])]) is None  # short
    assert kernel_rx_ns([]) is None


def test_resolve_reads_an_address_and_names_a_name_no_resolver_can_answer():
    assert resolve("127.0.0.1", 123) == (socket.AF_INET, ("127.0.0.1", 123))
    with pytest.raises(QueryFailed) as failed:
        resolve("a" * 64 + ".invalid", 123)  # a label over 63 characters: refused before any lookup
    assert failed.value.rejection.reason == Reason.DNS_ERROR and "cannot resolve" in failed.value.rejection.detail
