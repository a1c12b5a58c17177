"""The relay: each listening port forwards NTP client requests to one upstream server, concurrently and matched.

What ChronoTick's ``ntp_proxy.py`` did wrong, and what happens here instead:

- It forwarded one request per port and blocked up to 5 s for the answer.
  Here every port has any number of requests in flight: a request is sent
  upstream as it arrives, and its entry waits in a table.
- It handed whatever came back to whoever asked next.  Here a reply goes
  to the client whose request it answers, matched by the echoed transmit
  timestamp (the reply's *origin*, RFC 5905 section 8), and only if it
  comes from the upstream's own address and port: the upstream socket is
  connected, so the kernel delivers nothing else, and the source is checked
  again.  A reply that matches nothing pending, or comes after its
  request's deadline, is dropped and counted.  The relay never rewrites a
  packet: extension fields (NTS) pass untouched, and a request whose
  transmit timestamp is already pending is refused rather than confused.
- It bound 0.0.0.0 and forwarded anything of 48 bytes or more (mode 6/7
  control queries included: an amplification vector).  Here it binds one
  address (loopback unless told), answers only ``--allow`` networks, and
  forwards only client requests (mode 3, version 1-4, 48 bytes or more).
- Nothing limited a client.  Here each client has a token bucket per port,
  chrony's ``ratelimit`` shape: one request per ``--client-interval``
  sustained, after a burst of ``--client-burst`` (defaults
  :data:`~relay.settings.DEFAULT_CLIENT_INTERVAL_S` and
  :data:`~relay.settings.DEFAULT_CLIENT_BURST`, with room for a ChronoTick
  node's warm-up); what a client sends past it gets nothing.
- Nothing limited what the cluster sent a public server, which sees the head
  node as *one* client however many nodes stand behind it.  Here each
  mapping's upstream gets, all clients together, a start-up burst of
  ``upstream_burst`` (default :data:`~relay.settings.DEFAULT_UPSTREAM_BURST`,
  chrony's ``iburst``), then at most one request every ``min_interval_s``
  (default :data:`~relay.settings.DEFAULT_MIN_INTERVAL_S`: NIST asks never
  to query more often than every 4 s).  A request over that budget is a *policy refusal*: it is not
  forwarded, the relay answers it with a RATE Kiss-o'-Death of its own
  (RFC 5905 section 7.4) carrying the request's origin, and counts it
  ``policy_refused``, apart from every upstream failure.  The node's worker
  takes the kiss as from the server itself (``workers/kod.py``: no retry,
  the server backed off, reason ``kod_rate`` then ``kod_backoff``), so at
  the node it is a refusal it can name, never a silent timeout.
- A RATE kiss from the upstream (RFC 5905 section 7.4) goes to the client
  that asked; for the mapping's ``rate_backoff_s`` the relay then sends
  nothing upstream and answers each request with a RATE kiss of its own, so
  the whole cluster backs off as the upstream sees it: as one client.

Upstream names are resolved at start and again every ``resolve_every_s`` in
a thread (the Pool rotates), never per packet.  A look-up that fails is tried
again after ``resolve_retry_s``, the wait doubling up to ``resolve_every_s``
(:func:`resolve_delay_s`): a relay started before DNS works serves seconds
after it does.  The failure is logged once, and the recovery once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from workers.ntp import packet

from .limits import ClientLimits, UpstreamLimit
from .settings import Mapping, RelaySettings, describe, impolite
from .stats import PortStats

log = logging.getLogger(__name__)

_ORIGIN = slice(24, 32)
_TRANSMIT = slice(40, 48)
_NO_TIMESTAMP = bytes(8)
_RATE = packet.kiss_code_to_ref_id("RATE")
_REF_ID = struct.Struct("!I")

#: How often pending requests are expired and idle client buckets pruned (s).
SWEEP_EVERY_S = 0.25
#: How long an expired request is remembered, so that its reply counts as late, not unmatched (s).
LATE_MEMORY_S = 60.0

#: Requests in flight per port, at most, and timed-out ones remembered (to count a late reply):
#: both tables stay bounded whatever clients send.
MAX_PENDING = 4096

#: What looks an upstream name up: ``loop.getaddrinfo``'s signature (host, port, *, type) -> addrinfo list.
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]


def resolve_delay_s(failures: int, *, retry_s: float, every_s: float) -> float:
    """How long until the next look-up of an upstream name, after ``failures`` failed ones in a row.

    None failed: ``every_s`` (the Pool rotates).  Else ``retry_s``, doubled
    for each further failure, never more than ``every_s``.
    """
    if failures <= 0:
        return every_s
    return min(retry_s * 2 ** min(failures - 1, 64), every_s)


@dataclass
class _Pending:
    client: tuple
    deadline: float
    received_ns: int
    forwarded_ns: int


class PortRelay:
    """One mapping: a listening socket for the clients, a connected socket to the upstream."""

    def __init__(self, mapping: Mapping, settings: RelaySettings, *, resolver: Resolver | None = None):
        self.mapping = mapping
        self.settings = settings
        #: ``None``: the event loop's ``getaddrinfo`` (in a thread).
        self.resolver = resolver
        #: Look-ups failed in a row (0: the last one answered), and when the first of them failed.
        self.resolve_failures = 0
        self._failing_since: float | None = None
        self.stats = PortStats(port=mapping.listen_port, upstream=mapping.upstream)
        self.clients = ClientLimits(settings.client_interval_s, settings.client_burst)
        #: The upstream's budget and its RATE back-off, all clients together (:class:`relay.limits.UpstreamLimit`).
        self.upstream_limit = UpstreamLimit(mapping.min_interval_s, mapping.upstream_burst, mapping.rate_backoff_s,
                                            now=time.monotonic())
        self.upstream_address: tuple | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._expired: dict[bytes, float] = {}
        self._listener: asyncio.DatagramTransport | None = None
        self._upstream: asyncio.DatagramTransport | None = None

    # -- life cycle ---------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.settings.bind else socket.AF_INET
        self._listener, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self.from_client), local_addr=(self.settings.bind, self.mapping.listen_port),
            family=family)
        await self.resolve()

    def next_resolve_in_s(self) -> float:
        """When to look the upstream name up again (s): soon after a failure, backing off (:func:`resolve_delay_s`)."""
        return resolve_delay_s(self.resolve_failures, retry_s=self.settings.resolve_retry_s,
                               every_s=self.settings.resolve_every_s)

    async def keep_resolved(self) -> None:
        """Look the upstream name up again and again, :meth:`next_resolve_in_s` apart, until cancelled."""
        while True:
            await asyncio.sleep(self.next_resolve_in_s())
            await self.resolve()

    async def resolve(self) -> bool:
        """Look the upstream name up (in a thread) and point the upstream socket at it if it moved.

        Whether the name resolved.  The first failure in a row is logged (a
        warning), the rest only at debug level; the first success after them
        once.  A failure keeps the address in use, if there is one.
        """
        loop = asyncio.get_running_loop()
        resolver = self.resolver or loop.getaddrinfo
        new: asyncio.DatagramTransport | None = None
        try:
            infos = await resolver(self.mapping.ntp_server, self.mapping.ntp_port, type=socket.SOCK_DGRAM)
            if not infos:
                raise OSError("no address")
            family, _, _, _, sockaddr = infos[0]
            address = (str(sockaddr[0]), int(sockaddr[1]))
            if address != (self.upstream_address or ())[:2]:
                new, _ = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self.from_upstream), remote_addr=address, family=family)
        except (OSError, UnicodeError) as exc:  # no name, no address, or none we can send to
            self.resolve_failures += 1
            if self.resolve_failures == 1:
                self._failing_since = time.monotonic()
                using = (f"still forwarding to {self.upstream_address[0]}:{self.upstream_address[1]}"
                         if self.upstream_address else "refusing requests until it resolves")
                log.warning("relay port %d: cannot resolve %s (%s); %s; asking again in %g s, then backing off "
                            "to every %g s", self.mapping.listen_port, self.mapping.upstream, exc, using,
                            self.next_resolve_in_s(), self.settings.resolve_every_s)
            else:
                log.debug("relay port %d: still cannot resolve %s (%s; %d failures); next in %g s",
                          self.mapping.listen_port, self.mapping.upstream, exc, self.resolve_failures,
                          self.next_resolve_in_s())
            return False
        recovered = self.resolve_failures
        self.resolve_failures = 0
        if new is not None:
            old, self._upstream = self._upstream, new
            self.upstream_address = new.get_extra_info("peername")
            if old is not None:  # replies still on their way to the old address get their deadline's worth
                loop.call_later(self.settings.timeout_s, old.close)
            if not recovered:
                log.info("relay port %d -> %s at %s", self.mapping.listen_port, self.mapping.upstream,
                         self.upstream_address)
        if recovered:
            log.warning("relay port %d: %s resolves again, -> %s, after %d failed look-up(s) over %.1f s",
                        self.mapping.listen_port, self.mapping.upstream, self.upstream_address, recovered,
                        time.monotonic() - (self._failing_since or time.monotonic()))
            self._failing_since = None
        return True

    def close(self) -> None:
        for transport in (self._listener, self._upstream):
            if transport is not None:
                transport.close()

    @property
    def tables(self) -> dict[str, int]:
        """How many entries each of the port's tables holds: all bounded."""
        return {"pending": len(self._pending), "expired": len(self._expired), "clients": len(self.clients)}

    # -- the two directions ---------------------------------------------------
    def from_client(self, data: bytes, client: tuple) -> None:
        received_ns = time.monotonic_ns()
        now = received_ns / 1e9
        stats = self.stats
        stats.requests += 1
        if not self.settings.allows(client[0]):
            stats.refused_allow += 1
            return
        if len(data) < packet.HEADER_LEN:
            stats.refused_size += 1
            return
        version, mode = (data[0] >> 3) & 0x7, data[0] & 0x7
        if mode != packet.MODE_CLIENT or not 1 <= version <= 4:
            stats.refused_mode += 1  # control (6), private (7), broadcast ... : never forwarded
            return
        if not self.clients.allow(client[0], now):
            stats.refused_rate += 1
            return
        transmit = data[_TRANSMIT]
        if self.upstream_limit.backing_off(now):
            self._kiss(data, client)  # the upstream said RATE: the whole cluster backs off, as one client
            return
        if transmit == _NO_TIMESTAMP or transmit in self._pending:
            stats.refused_duplicate += 1  # a reply could not tell these requests apart
            return
        if self._upstream is None:
            stats.refused_unresolved += 1
            return
        if len(self._pending) >= MAX_PENDING:
            stats.refused_busy += 1  # bounded memory, whatever the upstream's cap allows
            return
        if not self.upstream_limit.take(now):
            stats.policy_refused += 1  # over the upstream's budget: refused by policy, told so with RATE
            self._kiss(data, client)
            return
        forwarded_ns = time.monotonic_ns()
        self._pending[transmit] = _Pending(client, now + self.settings.timeout_s, received_ns, forwarded_ns)
        self._upstream.sendto(data)
        stats.forwarded += 1

    def from_upstream(self, data: bytes, source: tuple) -> None:
        arrived_ns = time.monotonic_ns()
        stats = self.stats
        if source[:2] != (self.upstream_address or ())[:2] or len(data) < packet.HEADER_LEN:
            stats.unmatched += 1
            return
        origin = data[_ORIGIN]
        pending = self._pending.pop(origin, None)
        if pending is None:
            if self._expired.pop(origin, None) is not None:
                stats.late += 1
            else:
                stats.unmatched += 1
            return
        if data[1] == 0 and _REF_ID.unpack_from(data, 12)[0] == _RATE:
            stats.kisses_received += 1
            self.upstream_limit.kissed(arrived_ns / 1e9)
            log.warning("relay port %d: RATE kiss from %s; sending it nothing for %g s", self.mapping.listen_port,
                        self.mapping.upstream, self.mapping.rate_backoff_s)
        assert self._listener is not None
        stats.answered += 1  # counted before it leaves: whoever has the reply can read the count
        self._listener.sendto(data, pending.client)
        sent_ns = time.monotonic_ns()
        stats.add_delay(((pending.forwarded_ns - pending.received_ns) + (sent_ns - arrived_ns)) / 1e9)

    def _kiss(self, request: bytes, client: tuple) -> None:
        """Answer a request with a RATE kiss of the relay's own, carrying its origin (so the client's origin
        check passes and its worker backs the server off: ``workers/kod.py``)."""
        now_ntp = packet.unix_ns_to_ntp(time.time_ns())
        reply = packet.build_reply(leap=3, version=(request[0] >> 3) & 0x7, stratum=0, poll=request[2],
                                   precision_log2=0, ref_id=_RATE, origin_ts=int.from_bytes(request[_TRANSMIT]),
                                   receive_ts=now_ntp, transmit_ts=now_ntp)
        assert self._listener is not None
        self.stats.kisses_sent += 1  # before it leaves, like every reply
        self._listener.sendto(reply, client)

    # -- housekeeping --------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Expire requests past their deadline; forget clients idle long enough."""
        for transmit in [t for t, p in self._pending.items() if p.deadline <= now]:
            del self._pending[transmit]
            self._expired[transmit] = now
            self.stats.timeouts += 1
            while len(self._expired) > MAX_PENDING:  # the oldest first (dicts keep insertion order)
                del self._expired[next(iter(self._expired))]
        for transmit in [t for t, at in self._expired.items() if now - at > LATE_MEMORY_S]:
            del self._expired[transmit]
        self.clients.prune(now)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, handler):
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.handler(data, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable from an upstream
        log.debug("relay socket error: %s", exc)


class Relay:
    """Every port of a :class:`RelaySettings`, their housekeeping, and their reports."""

    def __init__(self, settings: RelaySettings, *, report=None, report_every_s: float = 10.0,
                 summary_every_s: float = 60.0, resolver: Resolver | None = None):
        self.settings = settings
        self.ports = [PortRelay(m, settings, resolver=resolver) for m in settings.mappings]
        self.report = report
        self.report_every_s = report_every_s
        self.summary_every_s = summary_every_s
        self._stop: asyncio.Event | None = None
        self.ready: asyncio.Event | None = None

    async def run(self) -> None:
        self._stop, self.ready = asyncio.Event(), asyncio.Event()
        for port in self.ports:
            await port.start()
            log.info("relay port %d -> %s: %s", port.mapping.listen_port, port.mapping.upstream,
                     describe(port.mapping))
            for problem in impolite(port.mapping):
                log.warning("relay port %d -> %s: %s (past the public servers' published rules)",
                            port.mapping.listen_port, port.mapping.upstream, problem)
        self.ready.set()
        loop = asyncio.get_running_loop()
        # Each port looks its name up on its own schedule: soon after a failure, else every resolve_every_s.
        resolving = [asyncio.create_task(port.keep_resolved()) for port in self.ports]
        next_report = next_summary = loop.time()
        next_summary += self.summary_every_s
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for port in self.ports:
                    port.sweep(now)
                if self.report is not None and loop.time() >= next_report:
                    next_report += self.report_every_s
                    await loop.run_in_executor(None, self._report)
                if loop.time() >= next_summary:
                    next_summary += self.summary_every_s
                    for port in self.ports:
                        log.info("[RELAY] %s", port.stats.summary())
                try:
                    await asyncio.wait_for(self._stop.wait(), SWEEP_EVERY_S)
                except TimeoutError:
                    pass
        finally:
            for task in resolving:
                task.cancel()
            await asyncio.gather(*resolving, return_exceptions=True)
            if self.report is not None:
                await loop.run_in_executor(None, self._report)
            for port in self.ports:
                port.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def snapshots(self) -> list[dict]:
        return [port.stats.snapshot() for port in self.ports]

    def _report(self) -> None:
        try:
            self.report(self.snapshots())
        except Exception as exc:  # Redis away: the counts are in memory and in the log
            log.warning("relay counts not written (%s: %s)", type(exc).__name__, exc)
