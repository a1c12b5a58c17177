"""Leap seconds and smearing: near a leap second, servers of one timescale only vote.  Pure but for the file.

A leap second is a moment when TAI - UTC changes (by one second).  NTP
servers meet it in one of two ways:

- **stepping** (Cloudflare, NIST, the Pool, chrony's and ntpd's default):
  UTC's 23:59:60 is repeated or skipped, so the server's time jumps by a
  second at midnight UTC;
- **smearing** (Google Public NTP, https://developers.google.com/time/smear):
  the second is spread linearly over the 24 hours from noon before to noon
  after the leap (the "standard smear"), each smeared second 1/86400 longer
  (11.6 ppm), so the server is never a second off but is up to 0.5 s away
  from a stepping one at the leap.

Google's and Cloudflare's pages both say not to mix the two: during a smear
they disagree by up to half a second, which is a thousand times the bounds a
round publishes.  A vote or a combination over both is wrong whichever one
wins, and a majority of the two kinds can flip during the day.  So from 12 h
before to 12 h after a leap second (:func:`leap_window`: the smear's own
span), only servers of ``clock_measurement.ntp.leap_timescale`` take part in a
round; the replies of the others are set apart before the vote
(:func:`one_timescale`), with the reason ``other_timescale``.  Outside that
window nothing changes.

**Which timescale a server keeps** (:func:`timescale_of`): Google's servers are
known by name -- ``time.google.com``, ``time1`` .. ``time4.google.com``, any
``*.google.com`` NTP name, written ``nts://`` too -- and any other is listed in
``smearing_servers``.  An IP address is never guessed at.

**When the leap seconds are** comes from the IERS/IETF ``leap-seconds.list``
that tzdata installs (``/usr/share/zoneinfo/leap-seconds.list``; the file
chrony's ``leapseclist`` directive reads).  Its format
(https://hpiers.obspm.fr/iers/bul/bulc/ntp/leap-seconds.list, and the copy
at https://data.iana.org/time-zones/tzdb/leap-seconds.list): one line per
change, ``NTP_SECONDS  TAI-UTC  # comment``, the instant in seconds since
1900-01-01 (the NTP era-0 epoch); ``#$`` the last update and ``#@`` the
expiry, both in NTP seconds; ``#h`` a SHA-1 of the numbers, checked when
present; other ``#`` lines comments.  A file past its expiry may miss a leap
second announced since, so it gives **no window**: nothing is set apart, and
the log says so once (as for a missing or bad file) -- tzdata's next update
mends it.

The parsed file is cached per (path, modification time), and the timescale of
a name per name, so the worker's decider can ask after every outcome.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Any

from workers.config import ConfigError, NtpSettings, parse_server
from workers.contracts import OutcomeStatus, Reason

log = logging.getLogger(__name__)

#: An outcome as the JSON it travels as.
Json = dict[str, Any]

#: Seconds from the NTP epoch (1900-01-01 00:00 UTC) to the Unix one (1970-01-01).
NTP_UNIX_OFFSET_S = 2_208_988_800

#: Half the window around a leap second: Google's smear runs from noon to noon UTC, 24 h.
HALF_WINDOW_S = 12 * 3600.0


#: Google Public NTP's names: every ``*.google.com`` NTP server smears (https://developers.google.com/time/smear).
GOOGLE_DOMAIN = "google.com"


class Timescale(StrEnum):
    """How a server meets a leap second (``clock_measurement.ntp.leap_timescale``)."""

    STEP = "step"    # the second is inserted (or skipped) at midnight UTC
    SMEAR = "smear"  # the second is spread over the 24 h around it, noon to noon UTC


class LeapFileError(ValueError):
    """A ``leap-seconds.list`` that cannot be trusted: the file, the line (0: the whole file) and why."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class LeapTable:
    """A parsed ``leap-seconds.list``: every change of TAI - UTC, and how long the list is good for.

    Times are Unix seconds (UTC).  ``offsets``: ``(instant, TAI - UTC from then on)``, in order;
    ``expires_at``: the ``#@`` line; ``updated_at``: the ``#$`` line, if any.
    """

    path: str
    offsets: tuple[tuple[float, int], ...]
    expires_at: float
    updated_at: float | None = None

    @cached_property
    def leaps(self) -> tuple[float, ...]:
        """The leap seconds: each instant at which TAI - UTC changes (the first line sets it, no leap)."""
        return tuple(at for (at, value), (_, before) in zip(self.offsets[1:], self.offsets, strict=False)
                     if value != before)

    def expired(self, now: float) -> bool:
        """Whether the list is past its expiry at ``now``: it may miss a leap second announced since."""
        return now >= self.expires_at


def parse_leap_seconds(text: str, path: str = "<leap-seconds.list>") -> LeapTable:
    """Parse the IERS/IETF ``leap-seconds.list`` format (module doc); :class:`LeapFileError` names a bad line.

    Refused: a data line that is not two integers, instants that do not
    increase or fall at midnight UTC, TAI - UTC changing by more than a
    second, a malformed or repeated ``#@`` or ``#$`` line, a ``#h`` hash
    that does not match, and a file with no data or no expiry.
    """
    offsets: list[tuple[int, int]] = []
    expires: int | None = None
    updated: int | None = None
    digest: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(("#@", "#$")):
            kind = "expiry (#@)" if line[1] == "@" else "last update (#$)"
            if (expires if line[1] == "@" else updated) is not None:
                raise LeapFileError(path, number, f"a second {kind} line")
            value = _integer(line[2:].split("#")[0], path, number, kind)
            if line[1] == "@":
                expires = value
            else:
                updated = value
            continue
        if line.startswith("#h"):
            words = line[2:].split()
            if not words or not all(_is_hex(w) and len(w) <= 8 for w in words):
                raise LeapFileError(path, number, f"the hash line (#h) is not hex words: {line[2:].strip()!r}")
            digest = (number, "".join(w.lower().rjust(8, "0") for w in words))  # NIST drops leading zeros
            continue
        if line.startswith("#"):
            continue
        fields = line.split("#")[0].split()
        if len(fields) != 2:
            raise LeapFileError(path, number, f"expected 'NTP_SECONDS TAI-UTC [# comment]', not {line!r}")
        at = _integer(fields[0], path, number, "the NTP time")
        value = _integer(fields[1], path, number, "TAI-UTC")
        if at % 86400:
            raise LeapFileError(path, number, f"NTP time {at} is not a midnight UTC")
        if offsets and at <= offsets[-1][0]:
            raise LeapFileError(path, number, f"NTP time {at} is not after the line before's {offsets[-1][0]}")
        if offsets and abs(value - offsets[-1][1]) > 1:
            raise LeapFileError(path, number, f"TAI-UTC goes from {offsets[-1][1]} to {value}: a leap second "
                                              "changes it by one")
        offsets.append((at, value))
    if not offsets:
        raise LeapFileError(path, 0, "no leap second lines ('NTP_SECONDS TAI-UTC')")
    if expires is None:
        raise LeapFileError(path, 0, "no expiry line (#@): the list cannot say how long it is good for")
    if digest is not None:
        numbers = ("" if updated is None else str(updated)) + str(expires) + "".join(f"{a}{v}" for a, v in offsets)
        if hashlib.sha1(numbers.encode()).hexdigest() != digest[1]:
            raise LeapFileError(path, digest[0], "the hash (#h) does not match the file's numbers: it is damaged")
    return LeapTable(path=path, offsets=tuple((float(a - NTP_UNIX_OFFSET_S), v) for a, v in offsets),
                     expires_at=float(expires - NTP_UNIX_OFFSET_S),
                     updated_at=None if updated is None else float(updated - NTP_UNIX_OFFSET_S))


def _integer(text: str, path: str, number: int, what: str) -> int:
    word = text.strip()
    if not (word.isascii() and word.isdigit()):
        raise LeapFileError(path, number, f"{what} is not a whole number of seconds: {word!r}")
    return int(word)


def _is_hex(word: str) -> bool:
    return bool(word) and all(c in "0123456789abcdefABCDEF" for c in word)


def leap_window(now: float, table: LeapTable) -> tuple[float, float] | None:
    """``(start, end)`` (Unix s) when ``now`` is within 12 h of a leap second -- ``start <= now < end`` --
    else ``None``; ``None`` too when the table is expired at ``now`` (no window is known)."""
    if table.expired(now):
        return None
    leaps = table.leaps
    # The first leap whose window has not ended at ``now``: its end is after now.
    i = bisect.bisect_right(leaps, now - HALF_WINDOW_S)
    if i < len(leaps) and leaps[i] - HALF_WINDOW_S <= now:
        return leaps[i] - HALF_WINDOW_S, leaps[i] + HALF_WINDOW_S
    return None


@lru_cache(maxsize=4096)
def timescale_of(server: str, smearing_servers: tuple[str, ...] = ()) -> Timescale:
    """``smear`` for Google's servers (by name) and those listed in ``smearing_servers``; else ``step``.

    ``server`` is a configured name (``host``, ``host:port``, ``nts://host``);
    ``smearing_servers`` the configured list (canonical names, as ``servers``
    has them).  An IP address is only ``smear`` when listed: who answers at one
    is not guessed.
    """
    if server in smearing_servers:
        return Timescale.SMEAR
    try:
        host = parse_server(server).host
    except ConfigError:
        host = server
    host = host.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        return Timescale.STEP
    except ValueError:
        pass
    if host == GOOGLE_DOMAIN or host.endswith("." + GOOGLE_DOMAIN):
        return Timescale.SMEAR
    return Timescale.STEP


# -- the file, cached per (path, modification time); each problem said once -----------------------------

_cache: dict[str, tuple[int, LeapTable | None]] = {}
_said: set[tuple[str, object, str]] = set()
_lock = threading.Lock()


def load(path: str) -> LeapTable | None:
    """The parsed file at ``path`` (cached per modification time); ``None``, logged once, if missing or bad."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        _say_once(path, None, "unreadable", "leap-seconds file %s cannot be read (%s): no leap window is known, "
                  "so near a leap second smearing and stepping servers would vote together", path, exc.strerror)
        return None
    cached = _cache.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    table: LeapTable | None
    try:
        with open(path, encoding="utf-8") as f:
            table = parse_leap_seconds(f.read(), path)
    except (OSError, UnicodeDecodeError, LeapFileError) as exc:
        _say_once(path, mtime, "bad", "leap-seconds file not used, no leap window is known: %s", exc)
        table = None
    with _lock:
        if len(_cache) > 16:
            _cache.clear()
        _cache[path] = (mtime, table)
    return table


def _say_once(path: str, version: object, what: str, message: str, *args: object) -> None:
    key = (path, version, what)
    with _lock:
        if key in _said:
            return
        _said.add(key)
    log.warning(message, *args)


def window_at(now: float, path: str, table: LeapTable | None = None) -> tuple[float, float] | None:
    """:func:`leap_window` from the file at ``path`` (or ``table``); an expired list is said once in the log."""
    if table is None:
        table = load(path)
        if table is None:
            return None
    if table.expired(now):
        _say_once(table.path, table.expires_at, "expired",
                  "leap-seconds file %s expired on %s: no leap window is known, so near a leap second smearing "
                  "and stepping servers would vote together (update tzdata)", table.path,
                  datetime.fromtimestamp(table.expires_at, UTC).strftime("%Y-%m-%d"))
        return None
    return leap_window(now, table)


# -- a round's outcomes, one timescale ---------------------------------------------------------------------

@dataclass(frozen=True)
class OneTimescale:
    """A round's outcomes ready for selection, and who was set apart.

    ``outcomes``: the round's, each reply of a server of the other timescale
    set apart (:func:`set_apart`); ``apart``: the servers of the other
    timescale (empty outside a window), whose outcomes still out cannot vote
    either; ``window``: the leap window ``now`` is in, or ``None``.
    """

    outcomes: list[Json]
    apart: frozenset[str]
    window: tuple[float, float] | None


def one_timescale(outcomes: list[Json], servers: Iterable[str], ntp: NtpSettings, now: float, *,
                  table: LeapTable | None = None) -> OneTimescale:
    """The round's outcomes with, inside a leap window, only servers of ``ntp.leap_timescale`` taking part.

    ``servers``: the round's server names; ``now``: the round's time (Unix s:
    its dispatch, so that every path deciding a round decides the same);
    ``table``: the leap list (default: ``ntp.leap_seconds_file``, cached).
    Outside a window, or when every server keeps the configured timescale, the
    outcomes are returned as they are (the file is then not read).  Inside, a
    reply of a server of the other timescale is set apart: it neither votes nor
    can be chosen or combined.  Pure, given ``table`` (but for saying an expired list once).
    """
    names = {*servers, *(o["server"] for o in outcomes)}
    smearing = tuple(ntp.smearing_servers)
    other = frozenset(n for n in names if timescale_of(n, smearing) != ntp.leap_timescale)
    if not other:
        return OneTimescale(list(outcomes), frozenset(), None)
    window = window_at(now, ntp.leap_seconds_file, table)
    if window is None:
        return OneTimescale(list(outcomes), frozenset(), None)
    kept = Timescale(ntp.leap_timescale)
    return OneTimescale([set_apart(o, kept, window) if o["server"] in other else o for o in outcomes],
                        other, window)


def set_apart(outcome: Json, kept: Timescale, window: tuple[float, float]) -> Json:
    """A reply of the other timescale, set apart: no longer ``ok`` (it does not vote), its sample kept.

    Selection records it ``rejected`` with the reason ``other_timescale``
    (:func:`orchestrator.selection.server_entries`), its sample shown and its
    reach kept: the server answered.  A failed outcome stays as it is: it had
    no vote to lose, and its own reason says more.
    """
    if outcome["status"] != OutcomeStatus.OK:
        return outcome
    other = Timescale.SMEAR if kept == Timescale.STEP else Timescale.STEP
    start, end = (datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") for t in window)
    return dict(outcome, status=OutcomeStatus.FAILED, reason=Reason.OTHER_TIMESCALE,
                detail=f"a {_KIND[other]} server: from {start} to {end} UTC, around a leap second, only "
                       f"{_KIND[kept]} servers vote (leap_timescale: {kept.value})")


_KIND = {Timescale.STEP: "stepping", Timescale.SMEAR: "smearing"}

