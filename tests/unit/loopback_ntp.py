"""A tiny NTP responder on 127.0.0.1, in a thread, for the unit tests of the client and the attempt.

It answers each request as a test says (:class:`LoopbackNtp`'s ``answer``): a well-formed reply
(:func:`reply_to`) with the offset, hold and root distance asked for, after a delay, or a bad one, or
nothing.  Loopback only: no packet leaves the machine.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from workers.ntp import packet

#: Where a request keeps its transmit timestamp (the last of the header's four).
_TRANSMIT = struct.Struct("!Q")
_TRANSMIT_AT = packet.HEADER_LEN - _TRANSMIT.size

#: What ``answer(index, request, received_ns)`` returns for a request: ``(delay_s, datagram)`` pairs, each
#: sent that long after the request arrived (a callable datagram is built when it is sent), or
#: ``(delay_s, datagram, sock)`` to send it from another socket than the server's.
Answer = Callable[[int, bytes, int], Iterable[tuple]]


def transmit_of(request: bytes) -> int:
    """The transmit timestamp of a request: what its reply's origin must echo."""
    return int(_TRANSMIT.unpack_from(request, _TRANSMIT_AT)[0])


def reply_to(request: bytes, *, received_ns: int, offset_s: float = 0.0, hold_s: float = 0.0,
             origin: int | None = None, **fields) -> bytes:
    """A server's reply to ``request``: its clock ``offset_s`` ahead of ours, holding it ``hold_s``.

    ``fields`` go to :func:`workers.ntp.packet.build_reply` (``stratum``, ``leap``, ``root_delay_s`` ...);
    the reference time is a second before the receive time unless given.
    """
    t2_ns = received_ns + round(offset_s * 1e9)
    t3_ns = t2_ns + round(hold_s * 1e9)
    fields.setdefault("ref_ts", packet.unix_ns_to_ntp(t2_ns - 1_000_000_000))
    return packet.build_reply(origin_ts=transmit_of(request) if origin is None else origin,
                              receive_ts=packet.unix_ns_to_ntp(t2_ns), transmit_ts=packet.unix_ns_to_ntp(t3_ns),
                              **fields)


def good(offset_s: float = 0.0, **fields) -> Answer:
    """Every request answered at once, the server ``offset_s`` ahead."""
    return lambda i, request, received_ns: [(0.0, reply_to(request, received_ns=received_ns, offset_s=offset_s,
                                                           **fields))]


class LoopbackNtp:
    """A UDP responder on ``127.0.0.1:port``; ``requests`` are what it received, in order."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.port = self.address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-ntp", daemon=True)
        self._timers: list[threading.Timer] = []

    def __enter__(self) -> LoopbackNtp:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        for timer in self._timers:
            timer.cancel()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            received_ns = time.time_ns()
            index = len(self.requests)
            self.requests.append(data)
            for delay_s, datagram, *via in self.answer(index, data, received_ns):
                sock = via[0] if via else self.sock
                if delay_s <= 0:
                    self._send(datagram, source, sock)
                else:
                    timer = threading.Timer(delay_s, self._send, (datagram, source, sock))
                    timer.daemon = True
                    self._timers.append(timer)
                    timer.start()

    def _send(self, datagram, source, sock: socket.socket) -> None:
        try:
            sock.sendto(datagram() if callable(datagram) else datagram, source)
        except OSError:  # closed: the test is over
            pass
