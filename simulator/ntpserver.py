"""A fault-injecting NTP server on loopback ports, for tests and the offline demo.

Each port has a :class:`Behaviour`: a true clock offset, a network delay with
a known asymmetry (so the offset error an honest client must tolerate is known
exactly), jitter and loss, and every way a real server misbehaves -- Kiss-o'-
Death, unsynchronised leap or stratum, a wrong origin, zero or reversed
timestamps, truncated or garbage packets, a reply from another port, huge root
delay or dispersion, a stale reference time.

The delay is simulated in user space (this kernel has no ``netem``).  A request
received at ``r`` is answered at ``r + in + hold + out``, stamped

    t2 = r + in + offset            t3 = (moment of sending) - out + offset

so whatever lateness the scheduler adds lands in the server's hold time
(t3 - t2), which NTP subtracts, and never in the client's offset: with
symmetric legs the true offset is exactly ``offset_s`` and the true error of a
client's estimate is ``asymmetry_s / 2``.

One thread serves every port with a selector and a heap of pending replies,
so concurrent requests to one port are each delayed independently (unlike
ChronoTick's ARES relay, which served each port one request at a time).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, fields

from workers.ntp import client, packet

_NTP64 = struct.Struct("!Q")

#: Kiss codes the simulator knows how to send.
KISS_CODES = ("RATE", "DENY", "RSTR")


@dataclass
class Behaviour:
    """How one simulated server answers (seconds unless named otherwise).

    Parameters
    ----------
    offset_s:
        The server's clock minus the host clock: what an ideal client measures.
    delay_s:
        Round-trip network delay, split between the two legs.
    asymmetry_s:
        Extra time on the way in minus on the way out; the legs are
        ``(delay + asymmetry) / 2`` and ``(delay - asymmetry) / 2``, so a
        client's offset is off by exactly ``asymmetry / 2``.  ``|asymmetry|``
        must not exceed ``delay``.
    jitter_s:
        Each leg gets an extra uniform random delay in ``[0, jitter]``.
    hold_s:
        How long the server holds the request (t3 - t2).
    hold_first_s:
        Hold the first request this long instead (a reply that comes late),
        then answer the others with ``hold_s``.
    loss:
        Probability of silently dropping a request.
    drop_first:
        Drop this many requests, then answer normally.
    unsynchronised_first:
        Answer this many requests unsynchronised (leap 3), then normally: an
        attempt that fails at once, and is retried.
    kod:
        Answer every request with this Kiss-o'-Death code (``RATE``, ``DENY``,
        ``RSTR``): stratum 0, leap 3, correct origin.
    leap, stratum, version, mode, precision_log2, root_delay_s, root_dispersion_s:
        Header fields of the reply (``version`` None echoes the request's).
        The default precision, 2^-14 s (61 us), is honest about this server:
        its t3 is read in Python some tens of microseconds before the packet
        leaves (``bench/round_latency.py`` shows a lone query's offset off
        by about 0.02 ms median: half that lag).
    bad_origin:
        Put a wrong origin timestamp in the reply.
    bad_origin_first:
        Put a wrong origin in the replies to this many requests, then answer
        honestly (a refusal inside an advanced-mode burst).
    spoofed_ahead_s:
        A blind spoofer on the server's address: this long after each request
        arrives, a reply with a wrong origin goes out, ahead of the genuine
        one (which still comes after ``delay_s``).  None: no spoofer.
    zero_transmit:
        Send a zero transmit timestamp.
    receive_after_transmit:
        Swap t2 and t3 so that receive > transmit.
    truncate:
        Send only the first 40 bytes.
    garbage:
        Send 48 random bytes.
    wrong_port:
        Send the reply from another UDP port.
    stale_reference:
        Reference time 2^17 s + 1 h before the transmit time.
    future_reference:
        Reference time 1 h after the transmit time.
    claimed_hold_s:
        Move t3 this much later without waiting: a server that claims to
        have held the request (over 4 s is refused; more than the round trip
        makes the client's delay negative).
    """

    offset_s: float = 0.0
    delay_s: float = 0.0
    asymmetry_s: float = 0.0
    jitter_s: float = 0.0
    hold_s: float = 0.0
    hold_first_s: float = 0.0
    loss: float = 0.0
    drop_first: int = 0
    unsynchronised_first: int = 0
    kod: str | None = None
    leap: int = 0
    stratum: int = 2
    version: int | None = None
    mode: int = packet.MODE_SERVER
    precision_log2: int = -14
    root_delay_s: float = 0.0
    root_dispersion_s: float = 0.0
    bad_origin: bool = False
    bad_origin_first: int = 0
    spoofed_ahead_s: float | None = None
    zero_transmit: bool = False
    receive_after_transmit: bool = False
    truncate: bool = False
    garbage: bool = False
    wrong_port: bool = False
    stale_reference: bool = False
    future_reference: bool = False
    claimed_hold_s: float = 0.0

    def __post_init__(self):
        if self.delay_s < 0 or self.jitter_s < 0 or self.hold_s < 0 or self.hold_first_s < 0:
            raise ValueError("delay_s, jitter_s, hold_s and hold_first_s must not be negative")
        if abs(self.asymmetry_s) > self.delay_s:
            raise ValueError(f"|asymmetry_s| {self.asymmetry_s} exceeds delay_s {self.delay_s}")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss {self.loss} is not a probability")
        if self.kod is not None and self.kod not in KISS_CODES:
            raise ValueError(f"kod {self.kod!r} is not one of {', '.join(KISS_CODES)}")

    @classmethod
    def from_dict(cls, data: dict) -> Behaviour:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"port"})
        if unknown:
            raise ValueError(f"unknown behaviour {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class PortStats:
    """What one port saw: requests received, dropped, answered."""

    received: int = 0
    dropped: int = 0
    answered: int = 0
    arrivals_ns: list = field(default_factory=list)


class NtpSimulator:
    """Serve simulated NTP servers until :meth:`stop`.

    Parameters
    ----------
    behaviours:
        Port -> :class:`Behaviour`.  Port 0 is not allowed (ports must be known
        to the config that queries them); use :func:`free_udp_ports`.
    host:
        The loopback address to bind (never a routable one by default).
    seed:
        Seed for loss and jitter, for repeatable tests.
    """

    def __init__(self, behaviours: dict[int, Behaviour], *, host: str = "127.0.0.1", seed: int | None = None):
        self.behaviours = dict(behaviours)
        self.host = host
        self.stats = {port: PortStats() for port in self.behaviours}
        self._random = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[int, socket.socket] = {}
        self._pending: list = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._stray = socket.socket(family, socket.SOCK_DGRAM)  # for wrong_port replies
        self._stray.bind((host, 0))
        self._bound: dict[int, socket.socket] = {}

    @classmethod
    def on_free_ports(cls, behaviours: list[Behaviour], *, host: str = "127.0.0.1",
                      seed: int | None = None) -> NtpSimulator:
        """Servers on ports the kernel picks, kept bound from the start (not started yet).

        Unlike :func:`free_udp_ports`, there is no moment between choosing a
        port and binding it in which another socket can take it.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sockets = []
        for _ in behaviours:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sockets.append(sock)
        sim = cls({sock.getsockname()[1]: b for sock, b in zip(sockets, behaviours, strict=True)}, host=host, seed=seed)
        sim._bound = {sock.getsockname()[1]: sock for sock in sockets}
        return sim

    # -- life cycle -------------------------------------------------------
    def start(self) -> NtpSimulator:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for port in self.behaviours:
            sock = self._bound.pop(port, None)
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, port))
            client.enable_kernel_timestamps(sock)
            sock.setblocking(False)
            self._sockets[port] = sock
            self._selector.register(sock, selectors.EVENT_READ, port)
        self._thread = threading.Thread(target=self._serve, name="ntp-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for sock in self._sockets.values():
            self._selector.unregister(sock)
            sock.close()
        self._sockets.clear()
        self._stray.close()
        self._selector.close()

    def __enter__(self) -> NtpSimulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_behaviour(self, port: int, behaviour: Behaviour) -> None:
        """Change how ``port`` answers from the next request on (e.g. a server coming back)."""
        with self._lock:
            self.behaviours[port] = behaviour

    def servers(self) -> list[str]:
        """``host:port`` for every port, as a config's ``servers`` list wants them."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"{host}:{port}" for port in self.behaviours]

    # -- the loop ---------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            timeout = 0.05
            if self._pending:
                timeout = max(0.0, min(timeout, (self._pending[0][0] - time.monotonic_ns()) / 1e9))
            for key, _ in self._selector.select(timeout):
                assert isinstance(key.fileobj, socket.socket)
                self._receive(key.fileobj, key.data)
            now = time.monotonic_ns()
            while self._pending and self._pending[0][0] <= now:
                _, _, send = heapq.heappop(self._pending)
                send()

    def _receive(self, sock: socket.socket, port: int) -> None:
        while True:
            try:
                data, ancdata, _, peer = sock.recvmsg(512, client.ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            wall_ns, mono_ns = time.time_ns(), time.monotonic_ns()
            rx_ns = client.kernel_rx_ns(ancdata)
            # Age of the request in the socket, from the kernel's arrival stamp.
            age_ns = max(0, wall_ns - rx_ns) if rx_ns else 0
            arrived_ns = wall_ns - age_ns
            with self._lock:
                behaviour = self.behaviours[port]
            stats = self.stats[port]
            stats.received += 1
            stats.arrivals_ns.append(arrived_ns)
            if stats.received <= behaviour.drop_first or (behaviour.loss and self._random.random() < behaviour.loss):
                stats.dropped += 1
                continue
            if stats.received <= behaviour.bad_origin_first:
                behaviour = dataclasses.replace(behaviour, bad_origin=True)
            if stats.received <= behaviour.unsynchronised_first:
                behaviour = dataclasses.replace(behaviour, leap=3)
            if stats.received == 1 and behaviour.hold_first_s:
                behaviour = dataclasses.replace(behaviour, hold_s=behaviour.hold_first_s)
            leg_in = (behaviour.delay_s + behaviour.asymmetry_s) / 2 + self._random.uniform(0, behaviour.jitter_s)
            leg_out = (behaviour.delay_s - behaviour.asymmetry_s) / 2 + self._random.uniform(0, behaviour.jitter_s)
            due_ns = mono_ns - age_ns + int((leg_in + behaviour.hold_s + leg_out) * 1e9)
            self._seq += 1
            send = _Reply(self, sock, port, behaviour, data, peer, arrived_ns, leg_in, leg_out)
            heapq.heappush(self._pending, (due_ns, self._seq, send))
            if behaviour.spoofed_ahead_s is not None:
                self._seq += 1
                spoof = _Reply(self, sock, port, dataclasses.replace(behaviour, bad_origin=True), data, peer,
                               arrived_ns, leg_in, leg_out)
                heapq.heappush(self._pending, (mono_ns - age_ns + int(behaviour.spoofed_ahead_s * 1e9), self._seq,
                                               spoof))


class _Reply:
    """A reply waiting for its moment; builds its timestamps when it is sent."""

    __slots__ = ("sim", "sock", "port", "b", "request", "client", "arrived_ns", "leg_in", "leg_out")

    def __init__(self, sim, sock, port, behaviour, request, client, arrived_ns, leg_in, leg_out):
        self.sim, self.sock, self.port, self.b = sim, sock, port, behaviour
        self.request, self.client, self.arrived_ns = request, client, arrived_ns
        self.leg_in, self.leg_out = leg_in, leg_out

    def __call__(self) -> None:
        b = self.b
        if b.garbage:
            payload = os.urandom(packet.HEADER_LEN)
        else:
            payload = self._build()
            if not (b.zero_transmit or b.receive_after_transmit):
                # Stamp t3 last, just before the send, so building the packet
                # in Python does not count as network time.
                t3_ns = max(time.time_ns() - int(self.leg_out * 1e9) + int(b.offset_s * 1e9), self._t2_ns())
                t3_ns += int(b.claimed_hold_s * 1e9)
                payload = payload[:40] + _NTP64.pack(packet.unix_ns_to_ntp(t3_ns))
            if b.truncate:
                payload = payload[:40]
        sender = self.sim._stray if b.wrong_port else self.sock
        try:
            sender.sendto(payload, self.client)
            self.sim.stats[self.port].answered += 1
        except OSError:
            pass

    def _t2_ns(self) -> int:
        return self.arrived_ns + int(self.leg_in * 1e9) + int(self.b.offset_s * 1e9)

    def _build(self) -> bytes:
        b = self.b
        offset_ns = int(b.offset_s * 1e9)
        t2_ns = self._t2_ns()
        t3_ns = time.time_ns() - int(self.leg_out * 1e9) + offset_ns
        t3_ns = max(t3_ns, t2_ns)
        try:
            request = packet.parse(self.request)
            origin, version = request.transmit_ts, request.version
        except packet.MalformedPacket:
            origin, version = 0, packet.NTP_VERSION
        if b.bad_origin:
            origin ^= 0x5A5A5A5A
        receive_ts, transmit_ts = packet.unix_ns_to_ntp(t2_ns), packet.unix_ns_to_ntp(t3_ns)
        if b.receive_after_transmit:
            receive_ts, transmit_ts = transmit_ts + (1 << 30), receive_ts
        if b.zero_transmit:
            transmit_ts = 0
        ref_age_s = 2 ** 17 + 3600 if b.stale_reference else (-3600 if b.future_reference else 16)
        ref_ts = packet.unix_ns_to_ntp(t3_ns - int(ref_age_s * 1e9))
        if b.kod:
            return packet.build_reply(leap=3, version=version, mode=b.mode, stratum=0,
                                      ref_id=packet.kiss_code_to_ref_id(b.kod), origin_ts=origin,
                                      receive_ts=receive_ts, transmit_ts=transmit_ts)
        return packet.build_reply(
            leap=b.leap, version=b.version if b.version is not None else version, mode=b.mode,
            stratum=b.stratum, precision_log2=b.precision_log2, root_delay_s=b.root_delay_s,
            root_dispersion_s=b.root_dispersion_s, ref_id=0x7F7F0101, ref_ts=ref_ts,
            origin_ts=origin, receive_ts=receive_ts, transmit_ts=transmit_ts)


def free_udp_ports(count: int, *, host: str = "127.0.0.1") -> list[int]:
    """``count`` UDP ports free on ``host`` right now (bound and released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def from_config(section: dict, *, source: str = "<config>") -> NtpSimulator:
    """Build a simulator from a config's ``simulator`` section.

    The section is ``{host: 127.0.0.1, servers: [{port: N, <behaviour>...}, ...]}``.
    Raises ``ValueError`` naming the file, the entry and the problem.
    """
    host = section.get("host", "127.0.0.1")
    behaviours = {}
    for i, entry in enumerate(section.get("servers") or []):
        where = f"{source}: simulator.servers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("port"), int) or isinstance(entry.get("port"), bool):
            raise ValueError(f"{where}: needs an integer 'port'")
        try:
            behaviours[entry["port"]] = Behaviour.from_dict(entry)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not behaviours:
        raise ValueError(f"{source}: simulator.servers: no servers to simulate")
    return NtpSimulator(behaviours, host=host)
