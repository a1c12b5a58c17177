"""One NTP exchange: send a request, wait for the reply, compute offset and delay.

The four timestamps (RFC 5905 section 8)::

    t1  our clock when the request left      t2  server clock when it arrived
    t4  our clock when the reply arrived     t3  server clock when the reply left

    offset = ((t2 - t1) + (t3 - t4)) / 2     server minus local: true = local + offset
    delay  = (t4 - t1) - (t3 - t2)           round trip minus the server's hold time

Two things make a Python client worse than it needs to be, and both are fixed
here.  t4 read with ``time.time()`` after ``recvfrom`` includes however long the
interpreter took to wake this thread -- with ten replies landing together, the
last thread is woken milliseconds late -- so t4 comes from the kernel's receive
timestamp (``SO_TIMESTAMPNS``) when Linux offers it.  And a wall-clock
difference is corrupted when the host clock is stepped mid-exchange, so the
interval t4 - t1 is measured on the monotonic clock; the kernel timestamp only
trims the short wait between the packet's arrival and our read of it.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..contracts import Reason, SampleDict
from . import packet, sanity
from .sanity import Rejection

#: ``SO_TIMESTAMPNS`` / ``SCM_TIMESTAMPNS`` on Linux (asm-generic and x86);
#: Python's socket module does not export it.
SO_TIMESTAMPNS = 35

#: ``IP_RECVERR`` / ``IPV6_RECVERR`` on Linux (``<linux/in.h>``, ``<linux/in6.h>``); Python's socket module
#: does not export them.  With them an unconnected socket hears the ICMP errors its request caused: a
#: port unreachable (nothing listens there -- a relay or a hub's NTP server down) fails the exchange at
#: once, named, instead of waiting out the timeout.
IP_RECVERR = 11
IPV6_RECVERR = 25

#: Our clock's reading precision (RFC 5905 rho_c): ``time_ns`` resolves 1 ns
#: but a read costs tens of ns; a microsecond is conservative.  The send
#: time's own uncertainty is measured per exchange and added separately.
CLIENT_PRECISION_S = 1e-6

#: RFC 5905 PHI: the frequency tolerance that makes dispersion grow with the
#: time an exchange takes (15 ppm).
PHI = 15e-6

_TIMESPEC = struct.Struct("@qq")
#: Bytes read per reply: an NTS reply is as long as its request (up to about 1 kB with 7 placeholders).
MAX_REPLY_BYTES = 4096
ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


class QueryFailed(Exception):
    """An exchange produced no usable sample; ``rejection`` says why."""

    def __init__(self, rejection: Rejection):
        super().__init__(f"{rejection.reason}: {rejection.detail}")
        self.rejection = rejection


@dataclass(frozen=True)
class Sample:
    """One accepted exchange with one server (seconds unless the name says ns).

    ``uncertainty_s`` is the root distance of RFC 5905 and chrony: the error
    bound on ``offset_s`` from every cause this one exchange can see --
    half the round trip (the worst path asymmetry), the server's own distance
    to its reference (root delay / 2 + root dispersion), both clocks'
    precision, and the frequency tolerance over the exchange.
    """

    server: str
    address: str
    port: int
    offset_s: float
    delay_s: float
    uncertainty_s: float
    stratum: int
    leap: int
    precision_s: float
    root_delay_s: float
    root_dispersion_s: float
    ref_id: str
    t1_ns: int
    t4_ns: int
    kernel_rx_timestamp: bool
    #: Whether the reply was NTS-authenticated (RFC 8915).
    nts: bool = False

    @property
    def measured_at(self) -> float:
        """The instant the offset refers to: the midpoint of t1 and t4 (Unix s)."""
        return (self.t1_ns + self.t4_ns) / 2 / packet.NS_PER_S

    def as_dict(self) -> SampleDict:
        """What crosses Celery for this sample: :class:`workers.contracts.SampleDict`, field by field."""
        return SampleDict(server=self.server, address=self.address, port=self.port, offset_s=self.offset_s,
                          delay_s=self.delay_s, uncertainty_s=self.uncertainty_s, stratum=self.stratum,
                          leap=self.leap, root_delay_s=self.root_delay_s, root_dispersion_s=self.root_dispersion_s,
                          precision_s=self.precision_s, ref_id=self.ref_id, t1_ns=self.t1_ns, t4_ns=self.t4_ns,
                          kernel_rx_timestamp=self.kernel_rx_timestamp, nts=self.nts, measured_at=self.measured_at)


#: How often an exchange with ``give_up_at`` asks it while waiting (s).
GIVE_UP_POLL_S = 0.005


def root_distance_s(*, delay_s: float, root_delay_s: float, root_dispersion_s: float,
                    server_precision_s: float, client_error_s: float = 0.0) -> float:
    """RFC 5905 root distance of one sample (see :class:`Sample`).

    ``client_error_s`` is what our own send time's uncertainty does to the
    offset (half the ``sendto`` call); the clock's reading precision is
    :data:`CLIENT_PRECISION_S`.
    """
    epsilon = server_precision_s + CLIENT_PRECISION_S + client_error_s + PHI * delay_s
    return delay_s / 2 + root_delay_s / 2 + root_dispersion_s + epsilon


def resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """Resolve ``host`` to one UDP address (the first the resolver prefers).

    Raises :class:`QueryFailed` with reason ``dns_error``.  The caller bounds
    the time this may take (see :mod:`workers.measure`).
    """
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    except (socket.gaierror, UnicodeError) as exc:
        raise QueryFailed(Rejection(Reason.DNS_ERROR, f"cannot resolve {host!r}: {exc}")) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


@dataclass(frozen=True)
class NtsRequest:
    """A request prepared by :meth:`workers.ntp.nts.Association.prepare`, and how to check its reply."""

    packet: bytes
    transmit: int
    unique_id: bytes
    s2c: bytes
    association: Any  # workers.ntp.nts.Association


#: Refusals that say a packet is not the answer to this request (it cannot be parsed, is no
#: server reply, or does not echo our random transmit timestamp): set aside, and the wait goes
#: on until the timeout; named only if no genuine reply follows.
NOT_OUR_REPLY = frozenset({Reason.TRUNCATED, Reason.BAD_MODE, Reason.BOGUS_ORIGIN})


def exchange(server: str, family: int, sockaddr: tuple[Any, ...], *, timeout_s: float,
             max_root_delay_s: float = sanity.DEFAULT_MAX_ROOT_S,
             max_root_dispersion_s: float = sanity.DEFAULT_MAX_ROOT_S, nts: NtsRequest | None = None,
             give_up_at: Callable[[], float | None] | None = None) -> Sample:
    """Do one request/reply exchange on a fresh UDP socket.

    Parameters
    ----------
    server:
        The name the configuration uses (kept in the sample and in errors).
    family, sockaddr:
        From :func:`resolve`.
    timeout_s:
        How long to wait for a valid reply, in total.  Packets from any other
        address or port, and packets from the server's address that are not
        the answer to this request (:data:`NOT_OUR_REPLY`), are set aside and
        named only if nothing valid follows.
    max_root_delay_s, max_root_dispersion_s:
        Passed to :func:`workers.ntp.sanity.check_reply`.
    nts:
        Send this NTS-protected request instead of a plain one.  A reply then
        counts only if :func:`workers.ntp.nts.open_reply` accepts it; one that
        does not is set aside, as RFC 8915 asks, in case a genuine one follows,
        and named if none does.  An NTS NAK drops the association's keys.
    give_up_at:
        Asked every :data:`GIVE_UP_POLL_S` while waiting: a monotonic time
        before the timeout at which to stop waiting (``None``: not yet).  The
        exchange then fails as at its timeout, naming what it set aside.

    Raises
    ------
    QueryFailed
        With the name of the first reason the exchange is unusable.
    """
    if nts is None:
        request, transmit = packet.make_request()
    else:
        request, transmit = nts.packet, nts.transmit
    deadline = time.monotonic() + timeout_s
    stray: str | None = None
    refused: Rejection | None = None
    rejection: Rejection | None = None
    try:
        # A fresh, unconnected socket: a connected one would let the kernel
        # drop replies from a wrong port silently, and we want to name them.
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            kernel_ts = enable_kernel_timestamps(sock)
            enable_icmp_errors(sock, family)
            # The packet leaves somewhere inside sendto().  t1 is read just
            # before it -- a true lower bound, so delay can never come out
            # negative -- and the call's duration bounds t1's error.  (Not
            # the midpoint: on loopback delivery is synchronous and the
            # woken server can answer before our sendto even returns.)
            t1_ns, mono1_ns = time.time_ns(), time.monotonic_ns()
            sock.sendto(request, sockaddr)
            send_ns = time.monotonic_ns() - mono1_ns
            while True:
                now = time.monotonic()
                cut = give_up_at() if give_up_at is not None else None
                remaining = (deadline if cut is None else min(deadline, cut)) - now
                if remaining <= 0:
                    if refused:
                        raise QueryFailed(refused)
                    if stray:
                        raise QueryFailed(Rejection(Reason.WRONG_SOURCE, stray))
                    waited = timeout_s if cut is None or cut >= deadline else now - mono1_ns / 1e9
                    raise QueryFailed(Rejection(Reason.TIMEOUT, f"no reply within {waited:.3g} s"))
                sock.settimeout(remaining if give_up_at is None else min(remaining, GIVE_UP_POLL_S))
                try:
                    data, ancdata, _flags, source = sock.recvmsg(MAX_REPLY_BYTES, ANCILLARY_SIZE)
                except TimeoutError:
                    continue
                except ConnectionRefusedError:
                    # ICMP port unreachable for our request (the socket sent to nothing else): no NTP
                    # service at that address and port, so no reply can follow.
                    raise QueryFailed(Rejection(
                        Reason.PORT_UNREACHABLE,
                        f"ICMP port unreachable from {sockaddr[0]}:{sockaddr[1]}: nothing listens there")) from None
                mono4_ns = time.monotonic_ns()
                wall4_ns = time.time_ns()
                if source[:2] != sockaddr[:2]:
                    stray = f"reply from {source[0]}:{source[1]}, we asked {sockaddr[0]}:{sockaddr[1]}"
                    continue
                if nts is not None:
                    from . import nts as nts_mod  # cryptography and pyOpenSSL only where NTS is used

                    if nts_mod.is_nak(data, nts.unique_id):
                        nts.association.forget()
                        raise QueryFailed(Rejection(Reason.NTS_NAK, "NTS NAK: the server cannot use the "
                                                    "cookie; new keys at the next attempt"))
                    try:
                        cookies = nts_mod.open_reply(data, unique_id=nts.unique_id, s2c=nts.s2c)
                    except nts_mod.NtsError as exc:
                        refused = Rejection(exc.reason, exc.detail)
                        continue
                    nts.association.accept(cookies, nts.s2c)
                try:
                    reply = packet.parse(data)
                except packet.MalformedPacket as exc:
                    refused = Rejection(Reason.TRUNCATED, str(exc))
                    continue  # not a reply to anyone: set aside until the timeout, in case ours follows
                rejection = sanity.check_reply(
                    reply, sent_transmit=transmit, sent_version=packet.NTP_VERSION,
                    max_root_delay_s=max_root_delay_s, max_root_dispersion_s=max_root_dispersion_s)
                if rejection is not None and rejection.reason in NOT_OUR_REPLY:
                    # RFC 5905: a packet that is not the answer to this request is discarded, and the
                    # wait goes on; one spoofed packet must not cost the genuine reply behind it.
                    refused = rejection
                    continue
                break
    except OSError as exc:
        raise QueryFailed(Rejection(Reason.SOCKET_ERROR, f"{type(exc).__name__}: {exc}")) from None

    elapsed_ns = mono4_ns - mono1_ns
    rx_ns = kernel_rx_ns(ancdata) if kernel_ts else None
    if rx_ns is not None:
        # How long the reply sat in the socket before we read it.  A clock
        # step in that window would make it nonsense; then trust nothing.
        lag_ns = wall4_ns - rx_ns
        if 0 <= lag_ns <= elapsed_ns:
            elapsed_ns -= lag_ns
        else:
            rx_ns = None
    t4_ns = t1_ns + elapsed_ns

    if rejection:  # the answer to our request, and unusable: no other will come
        raise QueryFailed(rejection)

    t2_ns = packet.ntp_to_unix_ns(reply.receive_ts, near_unix_ns=t1_ns)
    t3_ns = packet.ntp_to_unix_ns(reply.transmit_ts, near_unix_ns=t1_ns)
    delay_ns = (t4_ns - t1_ns) - (t3_ns - t2_ns)
    rejection = sanity.check_delay(delay_ns)
    if rejection:
        raise QueryFailed(rejection)
    offset_s = ((t2_ns - t1_ns) + (t3_ns - t4_ns)) / 2 / packet.NS_PER_S
    delay_s = delay_ns / packet.NS_PER_S
    return Sample(
        server=server,
        address=str(sockaddr[0]),
        port=int(sockaddr[1]),
        offset_s=offset_s,
        delay_s=delay_s,
        uncertainty_s=root_distance_s(delay_s=delay_s, root_delay_s=reply.root_delay_s,
                                      root_dispersion_s=reply.root_dispersion_s,
                                      server_precision_s=reply.precision_s,
                                      client_error_s=send_ns / 2 / packet.NS_PER_S),
        stratum=reply.stratum,
        leap=reply.leap,
        precision_s=reply.precision_s,
        root_delay_s=reply.root_delay_s,
        root_dispersion_s=reply.root_dispersion_s,
        ref_id=reply.ref_id_text,
        t1_ns=t1_ns,
        t4_ns=t4_ns,
        kernel_rx_timestamp=rx_ns is not None,
        nts=nts is not None,
    )


def enable_icmp_errors(sock: socket.socket, family: int) -> bool:
    """Have ``sock`` report the ICMP errors its packets cause (Linux ``IP_RECVERR``); ``False`` where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    v6 = family == socket.AF_INET6
    level, option = (socket.IPPROTO_IPV6, IPV6_RECVERR) if v6 else (socket.IPPROTO_IP, IP_RECVERR)
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        return False
    return True


def enable_kernel_timestamps(sock: socket.socket) -> bool:
    """Ask Linux to stamp every received datagram (``SO_TIMESTAMPNS``); False where it cannot."""
    if not sys.platform.startswith("linux") or not ANCILLARY_SIZE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def kernel_rx_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The kernel's receive time (Unix ns) from ``recvmsg`` ancillary data, if present."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(payload)
            return int(sec) * packet.NS_PER_S + int(nsec)
    return None
