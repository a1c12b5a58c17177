"""workers.ntp.nts: NTS-KE records and NTS extension fields, against the module's own server-side mirror.

A reply is built here the way chronyd builds one (RFC 8915 section 5.7): the
Unique Identifier in clear, then the authenticator whose encrypted part holds
the new cookies.  1,000 random single-bit flips anywhere in it are all refused.
"""

import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from workers.contracts import Reason
from workers.ntp import nts, packet


def _ef(kind: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", kind, 4 + len(body)) + body


def _server_reply(request: bytes, s2c: bytes, cookies: list[bytes]) -> bytes:
    fields = nts.extension_fields(request)
    unique_id = next(body for kind, _, body in fields if kind == nts.EF_UNIQUE_ID)
    transmit = int.from_bytes(request[40:48], "big")
    head = packet.build_reply(origin_ts=transmit, receive_ts=1 << 32, transmit_ts=2 << 32)
    head += _ef(nts.EF_UNIQUE_ID, unique_id)
    nonce = os.urandom(16)
    ciphertext = AESSIV(s2c).encrypt(b"".join(_ef(nts.EF_COOKIE, c) for c in cookies), [head, nonce])
    return head + _ef(nts.EF_AUTHENTICATOR, struct.pack("!HH", 16, len(ciphertext)) + nonce + ciphertext)


def test_a_request_carries_uid_cookie_placeholders_and_a_verifiable_authenticator():
    c2s = os.urandom(32)
    header, _ = packet.make_request()
    request, unique_id = nts.build_request(header, c2s=c2s, cookie=b"C" * 100, placeholders=7)
    kinds = [kind for kind, _, _ in nts.extension_fields(request)]
    assert kinds == [nts.EF_UNIQUE_ID, nts.EF_COOKIE] + [nts.EF_PLACEHOLDER] * 7 + [nts.EF_AUTHENTICATOR]
    assert len(request) == 956  # what chronyd 4.3 expects with 100-byte cookies (nts-notes)
    offset, body = next((o, b) for k, o, b in nts.extension_fields(request) if k == nts.EF_AUTHENTICATOR)
    nonce_length, ct_length = struct.unpack_from("!HH", body)
    AESSIV(c2s).decrypt(body[4 + nonce_length:4 + nonce_length + ct_length], [request[:offset], body[4:20]])


def test_a_genuine_reply_gives_its_cookies():
    s2c = os.urandom(32)
    request, unique_id = nts.build_request(packet.make_request()[0], c2s=os.urandom(32), cookie=b"x" * 100,
                                           placeholders=2)
    reply = _server_reply(request, s2c, [b"a" * 100, b"b" * 100, b"c" * 100])
    assert nts.open_reply(reply, unique_id=unique_id, s2c=s2c) == [b"a" * 100, b"b" * 100, b"c" * 100]


def test_every_single_bit_flip_is_refused():
    rng = random.Random(1)
    s2c = os.urandom(32)
    request, unique_id = nts.build_request(packet.make_request()[0], c2s=os.urandom(32), cookie=b"x" * 100,
                                           placeholders=0)
    reply = _server_reply(request, s2c, [b"n" * 100])
    for _ in range(1000):
        bit = rng.randrange(len(reply) * 8)
        altered = bytearray(reply)
        altered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(nts.NtsError) as caught:
            nts.open_reply(bytes(altered), unique_id=unique_id, s2c=s2c)
        assert caught.value.reason in (Reason.NTS_AUTH_FAILED, Reason.NTS_BAD_UNIQUE_ID,
                                       Reason.NTS_NO_AUTHENTICATOR)


def test_refusals_are_named():
    s2c = os.urandom(32)
    request, unique_id = nts.build_request(packet.make_request()[0], c2s=os.urandom(32), cookie=b"x" * 100,
                                           placeholders=0)
    reply = _server_reply(request, s2c, [b"n" * 100])
    with pytest.raises(nts.NtsError, match=Reason.NTS_NO_AUTHENTICATOR):
        nts.open_reply(reply[:48], unique_id=unique_id, s2c=s2c)
    with pytest.raises(nts.NtsError, match=Reason.NTS_BAD_UNIQUE_ID):
        nts.open_reply(reply, unique_id=os.urandom(32), s2c=s2c)
    with pytest.raises(nts.NtsError, match=Reason.NTS_AUTH_FAILED):
        nts.open_reply(reply, unique_id=unique_id, s2c=os.urandom(32))


def test_a_nak_is_recognised_only_with_our_unique_id():
    unique_id = os.urandom(32)
    nak = packet.build_reply(leap=3, stratum=0, ref_id=packet.kiss_code_to_ref_id("NTSN")) + _ef(
        nts.EF_UNIQUE_ID, unique_id)
    assert nts.is_nak(nak, unique_id)
    assert not nts.is_nak(nak, os.urandom(32))


def _record(kind, body, critical=True):
    return struct.pack("!HH", kind | (0x8000 if critical else 0), len(body)) + body


def test_ke_response_records():
    response = (_record(1, b"\0\0") + _record(4, b"\0\x0f") + _record(7, struct.pack("!H", 11123))
                + _record(6, b"ntp.example.test") + _record(5, b"k" * 100, False) * 8 + _record(0, b""))
    cookies, host, port = nts.parse_ke_response(response, default_host="127.0.0.1")
    assert (len(cookies), host, port) == (8, "ntp.example.test", 11123)
    assert nts.parse_ke_response(_record(1, b"\0\0") + _record(4, b"\0\x0f") + _record(5, b"k", False)
                                 + _record(0, b""), default_host="h")[1:] == ("h", 123)


@pytest.mark.parametrize("response, words", [
    (_record(2, b"\0\x01") + _record(0, b""), "Error 1"),
    (_record(1, b"\0\0") + _record(4, b"\0\x1e") + _record(5, b"k", False) + _record(0, b""), "AEAD 15"),
    (_record(1, b"\0\0") + _record(4, b"\0\x0f") + _record(0, b""), "no cookie"),
    (_record(1, b"\0\0") + _record(4, b"\0\x0f"), "End of Message"),
    (_record(1, b"\0\0") + _record(99, b"", True) + _record(0, b""), "unknown critical"),
])
def test_bad_ke_responses_are_named(response, words):
    with pytest.raises(nts.NtsError) as caught:
        nts.parse_ke_response(response, default_host="h")
    assert caught.value.reason == Reason.NTS_KE_FAILED and words in caught.value.detail
