"""The NTPv4 wire format: building a client request and reading a server reply.

The 48-byte header layout is ntplib's (``NTPPacket``: ``!B B B b 11I``), but the
four 64-bit timestamps are kept as the integers that came off the wire.  ntplib
turns them into floats of about 3.9e9 s, whose spacing is 2^-21 s (0.48 us), so
an origin timestamp converted to float and back no longer equals what was sent
(ntplib issue #37) -- and the origin check is the one that stops spoofed and
stale replies.  Local times are integer nanoseconds for the same reason.

Nothing here does I/O; :mod:`workers.ntp.client` sends and receives.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

import ntplib

#: Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
NTP_TO_UNIX_S: int = ntplib.NTP.NTP_DELTA

#: One NTP era is 2^32 seconds (era 0 ends 2036-02-07).
ERA_S = 1 << 32

#: The header without extension fields or MAC.
HEADER_LEN = 48

#: NTP's UDP port (RFC 5905), and NTS-KE's TCP port (RFC 8915 section 4).
NTP_PORT = 123
NTS_KE_PORT = 4460

#: ntplib's header layout, with the timestamps as whole 64-bit words.
_HEADER = struct.Struct("!BBBbIII4Q")

#: Protocol version we send; a server must echo it (RFC 4330 section 5).
NTP_VERSION = 4

MODE_CLIENT = 3
MODE_SERVER = 4

#: Leap indicator 3: "alarm condition, clock not synchronised".
LEAP_UNSYNCHRONISED = 3

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Reply:
    """One server reply, decoded but not yet judged.

    Parameters
    ----------
    leap, version, mode, stratum, poll:
        Header fields as sent.
    precision_log2:
        The server's clock precision as a signed power of two (seconds).
    root_delay_s, root_dispersion_s:
        The server's distance to its reference, from the 16.16 short format.
    ref_id:
        The 32-bit reference identifier (a kiss code when stratum is 0).
    ref_ts, origin_ts, receive_ts, transmit_ts:
        Raw 64-bit NTP timestamps, exactly as on the wire.
    """

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision_log2: int
    root_delay_s: float
    root_dispersion_s: float
    ref_id: int
    ref_ts: int
    origin_ts: int
    receive_ts: int
    transmit_ts: int

    @property
    def precision_s(self) -> float:
        return 2.0 ** self.precision_log2

    @property
    def kiss_code(self) -> str | None:
        """The kiss code of a stratum-0 reply: four ASCII capitals or digits, else ``None``.

        Stratum 0 with anything else in the reference id is just an
        unsynchronised server, not a Kiss-o'-Death.
        """
        raw = self.ref_id.to_bytes(4, "big").rstrip(b"\0")
        if self.stratum != 0 or not raw or not all(48 <= b <= 57 or 65 <= b <= 90 for b in raw):
            return None
        return raw.decode("ascii")

    @property
    def ref_id_text(self) -> str:
        """The reference id as chronyc shows it: letters at stratum 0-1, an address above."""
        if self.stratum <= 1:
            raw = self.ref_id.to_bytes(4, "big")
            return "".join(chr(b) for b in raw if 32 < b < 127)
        return str(ntplib.ref_id_to_text(self.ref_id, self.stratum))


class MalformedPacket(ValueError):
    """The bytes are not an NTP header at all (too short)."""


def make_request(*, version: int = NTP_VERSION) -> tuple[bytes, int]:
    """Build a client request and return it with its transmit timestamp.

    The transmit timestamp is 64 random bits rather than the local time
    (draft-ietf-ntp-data-minimization, as beevik/ntp and chrony do): a server
    only echoes it, so it reveals nothing about our clock, and an off-path
    spoofer cannot guess the value its forged reply must carry.  The true
    send time never leaves this process.

    Parameters
    ----------
    version:
        The NTP version to put in the header.

    Returns
    -------
    The 48-byte packet and the transmit value the reply's origin must equal.
    """
    transmit = secrets.randbits(64) or 1  # zero would mean "no timestamp"
    first = (0 << 6) | (version << 3) | MODE_CLIENT
    packet = _HEADER.pack(first, 0, 0, 0, 0, 0, 0, 0, 0, 0, transmit)
    return packet, transmit


def parse(data: bytes) -> Reply:
    """Decode the fixed header of a reply; extension fields and MACs are ignored.

    Raises
    ------
    MalformedPacket
        When fewer than 48 bytes arrived.
    """
    if len(data) < HEADER_LEN:
        raise MalformedPacket(f"{len(data)} bytes, an NTP header needs {HEADER_LEN}")
    (first, stratum, poll, precision, root_delay, root_disp, ref_id,
     ref_ts, origin_ts, receive_ts, transmit_ts) = _HEADER.unpack_from(data)
    return Reply(
        leap=first >> 6,
        version=(first >> 3) & 0x7,
        mode=first & 0x7,
        stratum=stratum,
        poll=poll,
        precision_log2=precision,
        root_delay_s=root_delay / 65536.0,
        root_dispersion_s=root_disp / 65536.0,
        ref_id=ref_id,
        ref_ts=ref_ts,
        origin_ts=origin_ts,
        receive_ts=receive_ts,
        transmit_ts=transmit_ts,
    )


def build_reply(
    *,
    leap: int = 0,
    version: int = NTP_VERSION,
    mode: int = MODE_SERVER,
    stratum: int = 2,
    poll: int = 6,
    precision_log2: int = -20,
    root_delay_s: float = 0.0,
    root_dispersion_s: float = 0.0,
    ref_id: int = 0,
    ref_ts: int = 0,
    origin_ts: int = 0,
    receive_ts: int = 0,
    transmit_ts: int = 0,
) -> bytes:
    """Encode a server reply (the simulator's half of the format).

    Root delay and dispersion saturate at the largest 16.16 value so that a
    simulated "huge" value still fits the field.
    """
    first = ((leap & 0x3) << 6) | ((version & 0x7) << 3) | (mode & 0x7)
    return _HEADER.pack(
        first, stratum & 0xFF, poll & 0xFF, precision_log2,
        _short(root_delay_s), _short(root_dispersion_s), ref_id & 0xFFFFFFFF,
        ref_ts, origin_ts, receive_ts, transmit_ts,
    )


def _short(seconds: float) -> int:
    return max(0, min(0xFFFFFFFF, round(seconds * 65536)))


def unix_ns_to_ntp(unix_ns: int) -> int:
    """Convert Unix nanoseconds to a 64-bit NTP timestamp (wrapping at era ends)."""
    seconds, rem_ns = divmod(unix_ns, NS_PER_S)
    fraction = (rem_ns << 32) // NS_PER_S
    return (((seconds + NTP_TO_UNIX_S) % ERA_S) << 32) | fraction


def ntp_to_unix_ns(ntp_ts: int, *, near_unix_ns: int) -> int:
    """Convert a 64-bit NTP timestamp to Unix nanoseconds.

    The era is not on the wire, so pick the one that puts the result closest
    to ``near_unix_ns`` (our own clock): correct across the 2036 rollover as
    long as the two clocks are within 68 years of each other.
    """
    seconds = ntp_ts >> 32
    fraction_ns = ((ntp_ts & 0xFFFFFFFF) * NS_PER_S) >> 32
    near_s = near_unix_ns // NS_PER_S + NTP_TO_UNIX_S
    era = (near_s - seconds + ERA_S // 2) // ERA_S
    return (seconds + era * ERA_S - NTP_TO_UNIX_S) * NS_PER_S + fraction_ns


def kiss_code_to_ref_id(code: str) -> int:
    """Encode a four-letter kiss code (``RATE``, ``DENY`` ...) as a reference id."""
    return int.from_bytes(code.encode("ascii")[:4].ljust(4, b"\0"), "big")
