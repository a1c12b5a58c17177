"""The relay looks a failed upstream name up again within seconds, backing off, not in 5 minutes.

A relay started before DNS works kept ``None`` for its upstream, refusing every
request, until the next look-up 300 s later.  Now a failed look-up is tried
again after ``resolve_retry_s`` (1 s), the wait doubling up to
``resolve_every_s``; the failure is logged once and the recovery once.  The
resolver is a fake that fails on demand: no packet, no DNS.
"""

import asyncio
import logging
import socket
import time

import pytest

from relay.server import PortRelay, Relay, resolve_delay_s
from relay.settings import DEFAULT_RESOLVE_EVERY_S, DEFAULT_RESOLVE_RETRY_S, Mapping, RelaySettings


class FakeResolver:
    """``loop.getaddrinfo``'s shape: fails ``failures`` times (as a resolver with no DNS does), then answers."""

    def __init__(self, failures: int, address: str = "127.0.0.1"):
        self.failures = failures
        self.address = address
        self.calls: list[float] = []

    async def __call__(self, host, port, *, type=0):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", (self.address, port))]


def test_the_wait_after_a_failure_starts_at_a_second_and_doubles_up_to_the_normal_interval():
    assert (DEFAULT_RESOLVE_RETRY_S, DEFAULT_RESOLVE_EVERY_S) == (1.0, 300.0)
    waits = [resolve_delay_s(n, retry_s=1.0, every_s=300.0) for n in range(12)]
    assert waits == [300.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]
    assert resolve_delay_s(10_000, retry_s=1.0, every_s=300.0) == 300.0  # no overflow, however long DNS is away


def _settings(**options) -> RelaySettings:
    mapping = Mapping(listen_port=8123, ntp_server="time.example.org", ntp_port=123)
    return RelaySettings(mappings=(mapping,), **options)


def test_a_port_whose_name_fails_asks_again_soon_and_logs_failure_and_recovery_once(caplog):
    resolver = FakeResolver(failures=4)
    port = PortRelay(_settings().mappings[0], _settings(), resolver=resolver)

    async def scenario():
        waits = []
        for _ in range(5):
            await port.resolve()
            waits.append(port.next_resolve_in_s())
        port.close()
        return waits

    with caplog.at_level(logging.DEBUG, logger="relay"):
        waits = asyncio.run(scenario())
    assert waits == [1.0, 2.0, 4.0, 8.0, 300.0]  # four failures, then back to the normal interval
    assert port.upstream_address is not None and port.upstream_address[:2] == ("127.0.0.1", 123)
    assert port.resolve_failures == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # the failure once, the recovery once
    assert "cannot resolve time.example.org:123" in warnings[0] and "asking again in 1 s" in warnings[0]
    assert "resolves again" in warnings[1] and "after 4 failed" in warnings[1]


def test_a_relay_started_before_dns_works_forwards_within_seconds():
    """The whole relay, on loopback: its first look-ups fail, and it resolves well before 5 minutes."""
    resolver = FakeResolver(failures=3)
    mapping = Mapping(listen_port=0, ntp_server="time.example.org", ntp_port=123)  # any free port
    settings = RelaySettings(mappings=(mapping,), resolve_retry_s=0.05)
    relay = Relay(settings, resolver=resolver)

    async def scenario():
        task = asyncio.create_task(relay.run())
        try:
            deadline = time.monotonic() + 5
            while relay.ports[0].upstream_address is None:
                assert time.monotonic() < deadline, resolver.calls
                await asyncio.sleep(0.01)
        finally:
            relay.stop()
            await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 2.0
    gaps = [b - a for a, b in zip(resolver.calls, resolver.calls[1:], strict=False)]
    assert len(resolver.calls) == 4  # three failures, then the answer
    assert gaps == pytest.approx([0.05, 0.1, 0.2], abs=0.04)  # doubling
