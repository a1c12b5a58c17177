"""Network Time Security for NTP (RFC 8915): key establishment, and NTS-protected requests and replies.

**NTS-KE** (RFC 8915 section 4): TLS 1.3 only, ALPN ``ntske/1``, the server's
certificate verified against the system's trust store (or
``clock_measurement.ntp.nts_ca_file``) and against the host name or address
asked for.  The client asks for Next Protocol NTPv4 and AEAD
``AEAD_AES_SIV_CMAC_256`` (15); the server answers with cookies, and with the
NTP server and port to use when they differ from its own (chronyd sends the
port when its NTP port is not 123).  The two keys come from the TLS exporter
(RFC 8446 section 7.5) with label ``EXPORTER-network-time-security`` and the
5-byte context of section 5.1.  pyOpenSSL's ``export_keying_material`` does that
(Python's ``ssl`` has no exporter); ``service_identity`` checks the name,
which pyOpenSSL does not.

**NTS-protected NTP** (section 5): a request carries a Unique Identifier (32
random bytes), one cookie, placeholders so that the server returns enough
new cookies to keep :data:`COOKIES_KEPT`, and the authenticator: AES-SIV
(``cryptography``'s ``AESSIV``) over the packet so far, with a fresh nonce,
keyed C2S.  A reply counts only if it carries the Unique Identifier sent and
its authenticator verifies under S2C; new cookies come only from its
encrypted part.  Otherwise it is refused, with a name:

``nts_no_authenticator``  an unauthenticated reply to an NTS request
``nts_bad_unique_id``     not an answer to this request
``nts_auth_failed``       the authenticator does not verify (tampered)
``nts_nak``               the server could not use the cookie: keys are dropped,
                          the next attempt runs NTS-KE again (not a KoD back-off)
``nts_ke_failed``         key establishment failed (TLS, certificate, records)

**Secrets.**  Keys and cookies live in this worker's memory only, one
:class:`Association` per server: never in Redis, never in a log, never in a
task's result.  A restarted worker runs NTS-KE again.  The first round for a
server pays the handshake; later rounds use cookies.

The transmit timestamp stays 64 random bits, echoed as the origin
(:func:`workers.ntp.packet.make_request`), so every RFC 5905 check still
applies on top of these.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from ..contracts import Reason
from . import packet

ALPN = b"ntske/1"
EXPORTER_LABEL = b"EXPORTER-network-time-security"
#: Next Protocol: NTPv4.
PROTOCOL_NTPV4 = 0
#: The one AEAD algorithm every NTS server supports.
AEAD_AES_SIV_CMAC_256 = 15
KEY_LENGTH = 32
#: Cookies kept per server (RFC 8915 section 5.7: eight).
COOKIES_KEPT = 8
#: Bytes of a Unique Identifier and of a request's nonce.
UNIQUE_ID_LENGTH = 32
NONCE_LENGTH = 16
#: An NTS-KE message is at most this long (chrony's limit).
KE_MAX_MESSAGE = 16384

# NTS-KE record types (section 4.1).
REC_END, REC_NEXT_PROTOCOL, REC_ERROR, REC_WARNING, REC_AEAD, REC_COOKIE, REC_SERVER, REC_PORT = range(8)
CRITICAL = 0x8000

# NTP extension field types (section 5).
EF_UNIQUE_ID, EF_COOKIE, EF_PLACEHOLDER, EF_AUTHENTICATOR = 0x0104, 0x0204, 0x0304, 0x0404


_NTSN = packet.kiss_code_to_ref_id("NTSN")
_U16 = struct.Struct("!H")
_U16x2 = struct.Struct("!HH")


class NtsError(Exception):
    """An NTS step failed; ``reason`` is one of the ``Reason.NTS_*`` names."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Keys:
    """What one NTS-KE session established: the keys, cookies, and where to send NTP."""

    c2s: bytes
    s2c: bytes
    cookies: list[bytes]
    ntp_host: str
    ntp_port: int


# -- NTS-KE ---------------------------------------------------------------------

def _record(kind: int, body: bytes, *, critical: bool = True) -> bytes:
    return _U16x2.pack(kind | (CRITICAL if critical else 0), len(body)) + body


def ke_request() -> bytes:
    """What chrony's own client sends: NTPv4, AES-SIV-CMAC-256, end (all critical)."""
    return (_record(REC_NEXT_PROTOCOL, _U16.pack(PROTOCOL_NTPV4)) + _record(REC_AEAD, _U16.pack(AEAD_AES_SIV_CMAC_256))
            + _record(REC_END, b""))


def parse_ke_response(data: bytes, *, default_host: str) -> tuple[list[bytes], str, int]:
    """The cookies, NTP host and NTP port of a complete NTS-KE response; :class:`NtsError` otherwise."""
    cookies, host, port, protocol, aead = [], default_host, packet.NTP_PORT, None, None
    offset = 0
    while True:
        if offset + 4 > len(data):
            raise NtsError(Reason.NTS_KE_FAILED, "the response ended before its End of Message record")
        word, length = _U16x2.unpack_from(data, offset)
        body = data[offset + 4:offset + 4 + length]
        if len(body) != length:
            raise NtsError(Reason.NTS_KE_FAILED, "a record runs past the end of the response")
        offset += 4 + length
        kind, critical = word & 0x7FFF, bool(word & CRITICAL)
        if kind == REC_END:
            break
        if kind == REC_ERROR:
            code = _U16.unpack(body)[0] if len(body) == 2 else -1
            raise NtsError(Reason.NTS_KE_FAILED, f"the server sent Error {code} "
                                                 "(0 unrecognised critical record, 1 bad request, 2 internal)")
        if kind == REC_WARNING:
            raise NtsError(Reason.NTS_KE_FAILED, "the server sent a Warning record (none is defined)")
        if kind == REC_NEXT_PROTOCOL:
            protocol = _U16.unpack(body)[0] if len(body) == 2 else None
        elif kind == REC_AEAD:
            aead = _U16.unpack(body)[0] if len(body) == 2 else None
        elif kind == REC_COOKIE:
            cookies.append(body)
        elif kind == REC_SERVER:
            host = body.decode("ascii", "replace")
        elif kind == REC_PORT and len(body) == 2:
            port = _U16.unpack(body)[0]
        elif critical:
            raise NtsError(Reason.NTS_KE_FAILED, f"unknown critical record type {kind}")
    if protocol != PROTOCOL_NTPV4:
        raise NtsError(Reason.NTS_KE_FAILED, f"the server did not agree to NTPv4 (next protocol {protocol})")
    if aead != AEAD_AES_SIV_CMAC_256:
        raise NtsError(Reason.NTS_KE_FAILED, f"the server did not agree to AEAD 15 (it offered {aead})")
    if not cookies:
        raise NtsError(Reason.NTS_KE_FAILED, "the server sent no cookie")
    return cookies, host, port


def key_exchange(host: str, port: int = packet.NTS_KE_PORT, *, ca_file: str | None = None,
                 timeout_s: float = 5.0) -> Keys:
    """Run NTS-KE with ``host``; :class:`NtsError` (``nts_ke_failed``) with the TLS or record error."""
    deadline = time.monotonic() + timeout_s
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_alpn_protos([ALPN])
    if ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.set_default_verify_paths()
    context.set_verify(SSL.VERIFY_PEER, lambda _conn, _cert, _errno, _depth, ok: bool(ok))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise NtsError(Reason.NTS_KE_FAILED, f"cannot connect to {host}:{port}: {exc}") from None
    raw.setblocking(False)
    conn = SSL.Connection(context, raw)
    conn.set_connect_state()
    if address is None:
        conn.set_tlsext_host_name(host.encode("idna"))  # never an address as SNI
    try:
        _until(conn.do_handshake, conn, deadline)
        if conn.get_alpn_proto_negotiated() != ALPN:
            raise NtsError(Reason.NTS_KE_FAILED, f"the server did not agree to ALPN {ALPN.decode()}")
        try:
            if address is not None:
                verify_ip_address(conn, str(address))
            else:
                verify_hostname(conn, host)
        except VerificationError as exc:
            raise NtsError(Reason.NTS_KE_FAILED, f"certificate does not name {host}: {exc}") from None
        _until(lambda: conn.sendall(ke_request()), conn, deadline)
        response = b""
        while not _complete(response):
            try:
                chunk = _until(lambda: conn.recv(4096), conn, deadline)
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            response += chunk
            if len(response) > KE_MAX_MESSAGE:
                raise NtsError(Reason.NTS_KE_FAILED, f"response longer than {KE_MAX_MESSAGE} bytes")
        cookies, ntp_host, ntp_port = parse_ke_response(response, default_host=host)
        c2s = conn.export_keying_material(EXPORTER_LABEL, KEY_LENGTH, _exporter_context(0))
        s2c = conn.export_keying_material(EXPORTER_LABEL, KEY_LENGTH, _exporter_context(1))
    except SSL.Error as exc:
        raise NtsError(Reason.NTS_KE_FAILED, f"TLS: {_tls_text(exc)}") from None
    except OSError as exc:
        raise NtsError(Reason.NTS_KE_FAILED, f"{type(exc).__name__}: {exc}") from None
    finally:
        try:
            conn.shutdown()
        except (SSL.Error, OSError):
            pass
        raw.close()
    return Keys(c2s=c2s, s2c=s2c, cookies=cookies, ntp_host=ntp_host, ntp_port=ntp_port)


def _exporter_context(direction: int) -> bytes:
    """Section 5.1: protocol id, AEAD id, then 0 (client to server) or 1 (server to client)."""
    return _U16x2.pack(PROTOCOL_NTPV4, AEAD_AES_SIV_CMAC_256) + bytes([direction])


def _complete(response: bytes) -> bool:
    offset = 0
    while offset + 4 <= len(response):
        word, length = _U16x2.unpack_from(response, offset)
        if word & 0x7FFF == REC_END and offset + 4 + length <= len(response):
            return True
        offset += 4 + length
    return False


def _until(step: Callable[[], Any], conn: SSL.Connection, deadline: float) -> Any:
    """Run a non-blocking pyOpenSSL step until it completes or the deadline passes."""
    while True:
        try:
            return step()
        except SSL.WantReadError:
            wanted: tuple[list[Any], list[Any]] = ([conn], [])
        except SSL.WantWriteError:
            wanted = ([], [conn])
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not any(select.select(*wanted, [], remaining)[:2]):
            raise NtsError(Reason.NTS_KE_FAILED, "timed out")


def _tls_text(exc: SSL.Error) -> str:
    parts = [" ".join(str(x) for x in item if x) for item in (exc.args[0] if exc.args and
                                                                isinstance(exc.args[0], list) else [])]
    return "; ".join(p for p in parts if p) or str(exc) or type(exc).__name__


# -- NTS-protected NTP ------------------------------------------------------------

def _ef(kind: int, body: bytes) -> bytes:
    padded = body + bytes(-len(body) % 4)
    return _U16x2.pack(kind, 4 + len(padded)) + padded


def build_request(header: bytes, *, c2s: bytes, cookie: bytes, placeholders: int) -> tuple[bytes, bytes]:
    """``header`` with NTS extension fields; returns the packet and its Unique Identifier."""
    unique_id = os.urandom(UNIQUE_ID_LENGTH)
    body = header + _ef(EF_UNIQUE_ID, unique_id) + _ef(EF_COOKIE, cookie)
    body += b"".join(_ef(EF_PLACEHOLDER, bytes(len(cookie))) for _ in range(placeholders))
    nonce = os.urandom(NONCE_LENGTH)
    ciphertext = AESSIV(c2s).encrypt(b"", [body, nonce])  # the tag alone: nothing to hide in a request
    auth = _U16x2.pack(len(nonce), len(ciphertext)) + nonce + ciphertext + bytes(-len(ciphertext) % 4)
    return body + _ef(EF_AUTHENTICATOR, auth), unique_id


def extension_fields(data: bytes, start: int = packet.HEADER_LEN) -> list[tuple[int, int, bytes]]:
    """``(type, offset, body)`` of each extension field from ``start`` (a malformed tail ends the list)."""
    fields, offset = [], start
    while offset + 4 <= len(data):
        kind, length = _U16x2.unpack_from(data, offset)
        if length < 4 or length % 4 or offset + length > len(data):
            break
        fields.append((kind, offset, data[offset + 4:offset + length]))
        offset += length
    return fields


def is_nak(data: bytes, unique_id: bytes) -> bool:
    """An NTS NAK: a kiss with code NTSN carrying our Unique Identifier (it is unauthenticated)."""
    if len(data) < packet.HEADER_LEN or data[1] != 0 or struct.unpack_from("!I", data, 12)[0] != _NTSN:
        return False
    return any(kind == EF_UNIQUE_ID and body == unique_id for kind, _, body in extension_fields(data))


def open_reply(data: bytes, *, unique_id: bytes, s2c: bytes) -> list[bytes]:
    """Check a reply to an NTS request; return the new cookies from its encrypted part.

    Raises :class:`NtsError` naming why the reply does not count.
    """
    fields = extension_fields(data)
    auth = next(((offset, body) for kind, offset, body in fields if kind == EF_AUTHENTICATOR), None)
    if auth is None:
        raise NtsError(Reason.NTS_NO_AUTHENTICATOR, "no NTS authenticator in the reply to an NTS request")
    if not any(kind == EF_UNIQUE_ID and body == unique_id for kind, offset, body in fields if offset < auth[0]):
        raise NtsError(Reason.NTS_BAD_UNIQUE_ID, "the reply does not carry this request's unique identifier")
    offset, body = auth
    if len(body) < 4:
        raise NtsError(Reason.NTS_AUTH_FAILED, "authenticator field too short")
    nonce_length, ciphertext_length = _U16x2.unpack_from(body)
    nonce = body[4:4 + nonce_length]
    start = 4 + nonce_length + (-nonce_length % 4)
    ciphertext = body[start:start + ciphertext_length]
    if len(nonce) != nonce_length or len(ciphertext) != ciphertext_length:
        raise NtsError(Reason.NTS_AUTH_FAILED, "authenticator lengths run past the field")
    try:
        plaintext = AESSIV(s2c).decrypt(ciphertext, [data[:offset], nonce])
    except (InvalidTag, ValueError):
        raise NtsError(Reason.NTS_AUTH_FAILED, "the authenticator does not verify: the reply was altered "
                                               "or not made with this association's key") from None
    return [body for kind, _, body in extension_fields(plaintext, 0) if kind == EF_COOKIE]


# -- per-server state, in this worker's memory only --------------------------------

@dataclass
class Association:
    """One NTS server's keys and cookies in this worker (never serialised)."""

    host: str
    ke_port: int
    ca_file: str | None = None
    keys: Keys | None = field(default=None, repr=False)
    #: NTS-KE sessions run so far (the first round pays one; later rounds should not).
    handshakes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prepare(self, header: bytes, *, timeout_s: float) -> tuple[bytes, bytes, bytes, tuple[str, int]]:
        """A protected request: ``(packet, unique_id, s2c, (ntp_host, ntp_port))``; NTS-KE first if needed."""
        with self.lock:
            if self.keys is None or not self.keys.cookies:
                self.keys = key_exchange(self.host, self.ke_port, ca_file=self.ca_file, timeout_s=timeout_s)
                self.handshakes += 1
            keys = self.keys
            cookie = keys.cookies.pop(0)
            placeholders = max(0, COOKIES_KEPT - 1 - len(keys.cookies))
        request, unique_id = build_request(header, c2s=keys.c2s, cookie=cookie, placeholders=placeholders)
        return request, unique_id, keys.s2c, (keys.ntp_host, keys.ntp_port)

    def accept(self, cookies: list[bytes], s2c: bytes) -> None:
        """Keep the cookies of a verified reply (if the keys are still the ones it was made with)."""
        with self.lock:
            if self.keys is not None and self.keys.s2c == s2c:
                self.keys.cookies.extend(cookies)
                del self.keys.cookies[:-COOKIES_KEPT]

    def forget(self) -> None:
        """Drop keys and cookies (after an NTS NAK): the next request runs NTS-KE again."""
        with self.lock:
            self.keys = None


_associations: dict[tuple[str, int, str | None], Association] = {}
_associations_lock = threading.Lock()


def association(host: str, ke_port: int = packet.NTS_KE_PORT, *, ca_file: str | None = None) -> Association:
    """This worker's association with an NTS server (made on first use)."""
    key = (host, ke_port, ca_file)
    with _associations_lock:
        found = _associations.get(key)
        if found is None:
            found = _associations[key] = Association(host, ke_port, ca_file)
        return found
