"""The relay's tables stay bounded under a flood of rotating source addresses inside the allow-list.

300,000 spoofed requests, each from a new address in 127.0.0.0/8, once grew the relay by
205 MB: every source got a bucket and every forwarded request was remembered for a minute.
Memory follows the tables, so the test bounds the tables.
This drives the real PortRelay logic; only the upstream socket is a recorder.
"""

import pytest

from relay.limits import DEFAULT_MAX_CLIENTS, ClientLimits
from relay.server import MAX_PENDING, PortRelay
from relay.settings import Mapping, RelaySettings, parse_allow
from workers.ntp import packet

#: Far past every bound (the report's 300,000 behave the same, three times slower).
FLOOD = 100_000


class _Recorder:
    """Stands in for the upstream datagram transport: counts what would be sent."""

    def __init__(self):
        self.sent = 0

    def sendto(self, data, addr=None):
        self.sent += 1


def _source(i: int) -> tuple[str, int]:
    return f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 123


def test_a_flood_of_rotating_sources_keeps_every_table_bounded():
    # An upstream cap loose enough not to be what bounds memory here.
    mapping = Mapping(listen_port=8123, ntp_server="127.0.0.1", min_interval_s=1e-6, upstream_burst=10**7)
    port = PortRelay(mapping, RelaySettings(mappings=(mapping,), allow=parse_allow(["127.0.0.0/8"])))
    port._upstream = upstream = _Recorder()  # noqa: SLF001  (the one socket this test does not open)
    request = bytearray(packet.make_request()[0])
    for i in range(FLOOD):
        request[40:48] = (i + 1).to_bytes(8, "big")  # a distinct transmit each, as a spoofer would send
        port.from_client(bytes(request), _source(i))
    during = port.tables
    port.sweep(now=1e12)  # everything past its deadline: remembered only up to the bound
    assert during["pending"] <= MAX_PENDING and during["clients"] <= DEFAULT_MAX_CLIENTS + 1, during
    assert port.tables["expired"] <= MAX_PENDING and port.tables["pending"] == 0
    assert upstream.sent <= MAX_PENDING
    assert port.stats.refused_busy + port.stats.refused_rate == FLOOD - upstream.sent


def test_sources_past_the_table_share_one_bucket():
    limits = ClientLimits(0.25, 8, max_clients=100)
    admitted = sum(limits.allow(f"10.0.{i >> 8}.{i & 255}", 0.0) for i in range(10_000))
    assert len(limits) <= 101
    assert admitted == 100 + 8  # one request from each of the first 100 sources, then the shared bucket's burst
    assert limits.overflowed == 10_000 - 100


@pytest.mark.parametrize("field, value", [("timeout_s", float("inf")), ("timeout_s", 0),
                                          ("client_interval_s", float("nan")), ("client_burst", 0)])
def test_settings_that_would_remember_for_ever_are_refused(field, value):
    mapping = Mapping(listen_port=8123, ntp_server="127.0.0.1")
    with pytest.raises(ValueError, match=field):
        RelaySettings(mappings=(mapping,), **{field: value})
