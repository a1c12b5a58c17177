"""Sanity checks on a server reply, before any number from it is believed.

ntplib checks nothing but the source address.  These are the packet tests of
RFC 5905 section 8 (tests 1-7 of chrony's ``ntp_core.c``), RFC 4330 section 5's
list for SNTP clients, and beevik/ntp's ``Validate()``.  Every rejection has a
stable name (a :class:`workers.contracts.Reason`): round records, counters and log lines
use it, so an operator can grep for it and a test can assert on it.

Order matters.  A reply that is not an answer to *our* request (wrong mode,
wrong origin) is discarded before anything in it is read; only then is a
Kiss-o'-Death acted upon, so a blind spoofer cannot silence a server with a
forged RATE or DENY (CVE-2015-7704).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..contracts import Reason, kiss_reason
from .packet import LEAP_UNSYNCHRONISED, MODE_SERVER, NS_PER_S, Reply

#: chrony's MAX_SERVER_INTERVAL: a server that held our request longer than
#: this has timestamps we cannot pair up with any confidence.
MAX_SERVER_PROCESSING_S = 4.0

#: RFC 4330's "truly paranoid" bound on root delay and root dispersion.
DEFAULT_MAX_ROOT_S = 1.0

#: A reference time older than this (about 36 h, RFC 5905 MAXPOLL) means the
#: server has not heard from its own source for too long.
MAX_REFERENCE_AGE_S = 2 ** 17


@dataclass(frozen=True)
class Rejection:
    """Why a reply (or an attempt) produced no usable sample.

    Parameters
    ----------
    reason:
        A :class:`workers.contracts.Reason` (or ``kod_<code>``: :func:`workers.contracts.kiss_reason`).
    detail:
        A human sentence with the numbers involved.
    kiss_code:
        The four-letter code of a Kiss-o'-Death, else ``None``.
    """

    reason: str
    detail: str
    kiss_code: str | None = None


def check_reply(
    reply: Reply,
    *,
    sent_transmit: int,
    sent_version: int,
    max_root_delay_s: float = DEFAULT_MAX_ROOT_S,
    max_root_dispersion_s: float = DEFAULT_MAX_ROOT_S,
) -> Rejection | None:
    """Judge a decoded reply; ``None`` means it may be used.

    Parameters
    ----------
    reply:
        The decoded header.
    sent_transmit:
        The transmit value of our request; the reply's origin must equal it.
    sent_version:
        The version of our request; the reply must echo it.
    max_root_delay_s, max_root_dispersion_s:
        Upper bounds (exclusive) for the server's root delay and dispersion.
    """
    if reply.mode != MODE_SERVER:
        return Rejection(Reason.BAD_MODE, f"mode {reply.mode}, a server reply has mode {MODE_SERVER}")
    if reply.origin_ts != sent_transmit:
        return Rejection(Reason.BOGUS_ORIGIN,
                         f"origin {reply.origin_ts:#018x} is not our transmit {sent_transmit:#018x}")
    code = reply.kiss_code
    if code is not None:
        return Rejection(kiss_reason(code), f"Kiss-o'-Death {code}", kiss_code=code)
    if reply.version != sent_version:
        return Rejection(Reason.BAD_VERSION, f"version {reply.version}, we sent {sent_version}")
    if reply.transmit_ts == 0:
        return Rejection(Reason.ZERO_TRANSMIT, "transmit timestamp is zero")
    if reply.receive_ts == 0:
        return Rejection(Reason.ZERO_RECEIVE, "receive timestamp is zero")
    if reply.receive_ts > reply.transmit_ts:
        return Rejection(Reason.RECEIVE_AFTER_TRANSMIT,
                         f"receive is {_ts_diff_s(reply.receive_ts, reply.transmit_ts):.6f} s after transmit")
    processing_s = _ts_diff_s(reply.transmit_ts, reply.receive_ts)
    if processing_s > MAX_SERVER_PROCESSING_S:
        return Rejection(Reason.SERVER_PROCESSING_TOO_LONG,
                         f"server held the request {processing_s:.3f} s (limit {MAX_SERVER_PROCESSING_S} s)")
    if reply.leap == LEAP_UNSYNCHRONISED:
        return Rejection(Reason.UNSYNCHRONISED_LEAP, "leap indicator 3: server clock not synchronised")
    if not 1 <= reply.stratum <= 15:
        return Rejection(Reason.UNSYNCHRONISED_STRATUM, f"stratum {reply.stratum}: server not synchronised")
    if not 0 <= reply.root_delay_s < max_root_delay_s:
        return Rejection(Reason.ROOT_DELAY_OUT_OF_RANGE,
                         f"root delay {reply.root_delay_s:.6f} s (limit {max_root_delay_s} s)")
    if not 0 <= reply.root_dispersion_s < max_root_dispersion_s:
        return Rejection(Reason.ROOT_DISPERSION_OUT_OF_RANGE,
                         f"root dispersion {reply.root_dispersion_s:.6f} s (limit {max_root_dispersion_s} s)")
    if reply.ref_ts > reply.transmit_ts:
        return Rejection(Reason.REFERENCE_AFTER_TRANSMIT, "reference time is after transmit time")
    age_s = _ts_diff_s(reply.transmit_ts, reply.ref_ts)
    if age_s > MAX_REFERENCE_AGE_S:
        return Rejection(Reason.STALE_REFERENCE,
                         f"reference time is {age_s:.0f} s old (limit {MAX_REFERENCE_AGE_S} s)")
    return None


def _ts_diff_s(later: int, earlier: int) -> float:
    """Difference of two raw NTP timestamps in seconds (same era assumed)."""
    return (later - earlier) / float(1 << 32)


def check_delay(delay_ns: int) -> Rejection | None:
    """A negative round trip means the server's timestamps are inconsistent."""
    if delay_ns < 0:
        return Rejection(Reason.NEGATIVE_DELAY, f"delay {delay_ns / NS_PER_S:.6f} s is negative")
    return None
