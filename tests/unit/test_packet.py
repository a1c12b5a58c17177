"""The wire format and the sanity checks, on packets built in memory (no network)."""

import time

import pytest

from workers.contracts import Reason
from workers.ntp import packet, sanity
from workers.ntp.packet import NS_PER_S


def test_timestamps_round_trip_at_nanosecond_resolution():
    now = time.time_ns()
    for unix_ns in (now, now + 123_456_789, 0, 2_085_978_496 * NS_PER_S + 5):  # incl. after the 2036 rollover
        back = packet.ntp_to_unix_ns(packet.unix_ns_to_ntp(unix_ns), near_unix_ns=unix_ns)
        assert abs(back - unix_ns) <= 1


def test_era_rollover_2036_is_resolved_against_our_clock():
    rollover_unix_s = (1 << 32) - packet.NTP_TO_UNIX_S  # 2036-02-07T06:28:16Z
    after = (rollover_unix_s + 10) * NS_PER_S
    wire = packet.unix_ns_to_ntp(after)
    assert wire >> 32 == 10  # era 1 has begun: the seconds field wrapped to 10
    assert packet.ntp_to_unix_ns(wire, near_unix_ns=after - 60 * NS_PER_S) == after


def test_request_carries_an_unpredictable_transmit_and_nothing_else():
    first, tx1 = packet.make_request()
    second, tx2 = packet.make_request()
    assert tx1 != tx2 and tx1 != 0
    assert len(first) == 48 and first[0] == (4 << 3) | 3  # LI 0, VN 4, mode 3
    assert first[1:40] == bytes(39)  # no local time leaks in the request
    assert int.from_bytes(first[40:48], "big") == tx1


def test_parse_reads_what_build_wrote():
    wire = packet.build_reply(leap=1, stratum=3, poll=7, precision_log2=-18, root_delay_s=0.25,
                              root_dispersion_s=0.0625, ref_id=0x0A000001, ref_ts=11, origin_ts=22,
                              receive_ts=33, transmit_ts=44)
    reply = packet.parse(wire + b"extension-field")
    assert (reply.leap, reply.version, reply.mode, reply.stratum, reply.poll) == (1, 4, 4, 3, 7)
    assert reply.precision_s == 2.0 ** -18
    assert (reply.root_delay_s, reply.root_dispersion_s) == (0.25, 0.0625)
    assert (reply.ref_ts, reply.origin_ts, reply.receive_ts, reply.transmit_ts) == (11, 22, 33, 44)
    assert reply.ref_id_text == "10.0.0.1"


def test_short_packet_is_malformed():
    with pytest.raises(packet.MalformedPacket, match="40 bytes"):
        packet.parse(bytes(40))


def _good(**overrides):
    now = packet.unix_ns_to_ntp(time.time_ns())
    fields = dict(stratum=2, origin_ts=0x1234, receive_ts=now, transmit_ts=now + 1000,
                  ref_ts=now - (60 << 32), root_delay_s=0.01, root_dispersion_s=0.01)
    fields.update(overrides)
    return packet.parse(packet.build_reply(**fields))


def _check(reply, **kw):
    return sanity.check_reply(reply, sent_transmit=0x1234, sent_version=4, **kw)


def test_a_good_reply_passes():
    assert _check(_good()) is None


@pytest.mark.parametrize("overrides, reason", [
    ({"mode": 3}, Reason.BAD_MODE),
    ({"origin_ts": 0x9999}, Reason.BOGUS_ORIGIN),
    ({"version": 3}, Reason.BAD_VERSION),
    ({"transmit_ts": 0}, Reason.ZERO_TRANSMIT),
    ({"receive_ts": 0}, Reason.ZERO_RECEIVE),
    ({"leap": 3}, Reason.UNSYNCHRONISED_LEAP),
    ({"stratum": 16}, Reason.UNSYNCHRONISED_STRATUM),
    ({"root_delay_s": 1.5}, Reason.ROOT_DELAY_OUT_OF_RANGE),
    ({"root_dispersion_s": 1.0}, Reason.ROOT_DISPERSION_OUT_OF_RANGE),
])
def test_each_bad_field_is_rejected_with_its_name(overrides, reason):
    rejection = _check(_good(**overrides))
    assert rejection is not None and rejection.reason == reason, rejection


def test_receive_after_transmit_and_long_hold():
    now = packet.unix_ns_to_ntp(time.time_ns())
    assert _check(_good(receive_ts=now + 10, transmit_ts=now)).reason == Reason.RECEIVE_AFTER_TRANSMIT
    assert _check(_good(receive_ts=now, transmit_ts=now + (5 << 32))).reason == Reason.SERVER_PROCESSING_TOO_LONG


def test_reference_time_checks():
    now = packet.unix_ns_to_ntp(time.time_ns())
    assert _check(_good(ref_ts=now + (10 << 32))).reason == Reason.REFERENCE_AFTER_TRANSMIT
    assert _check(_good(ref_ts=now - ((2 ** 17 + 10) << 32))).reason == Reason.STALE_REFERENCE


def test_kiss_of_death_is_read_only_after_the_origin_check():
    kod = dict(stratum=0, leap=3, ref_id=packet.kiss_code_to_ref_id("DENY"))
    genuine = _check(_good(**kod))
    assert genuine.reason == "kod_deny" and genuine.kiss_code == "DENY"
    spoofed = _check(_good(origin_ts=0x9999, **kod))
    assert spoofed.reason == Reason.BOGUS_ORIGIN and spoofed.kiss_code is None


def test_root_limits_are_configurable():
    reply = _good(root_delay_s=0.3)
    assert _check(reply) is None
    assert _check(reply, max_root_delay_s=0.2).reason == Reason.ROOT_DELAY_OUT_OF_RANGE


def test_negative_delay_is_named():
    assert sanity.check_delay(-1).reason == Reason.NEGATIVE_DELAY
    assert sanity.check_delay(0) is None
