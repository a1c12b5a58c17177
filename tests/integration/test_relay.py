"""chronotick-ntp relay on loopback: concurrent and matched, safe, polite upstream, and a whole round through it.

Clients are plain UDP sockets bound to distinct loopback addresses
(127.0.0.2, 127.0.0.3 ...: Linux routes all of 127/8 to lo), so each is its
own client to the relay's per-client limits.  Upstreams are the project's
simulator, or a bare socket where the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from orchestrator import cli
from relay.server import Relay
from relay.settings import DEFAULT_MIN_INTERVAL_S, DEFAULT_UPSTREAM_BURST, Mapping, RelaySettings, parse_allow
from simulator.ntpserver import Behaviour, free_udp_ports
from simulator.processes import free_tcp_port
from workers.ntp import packet

from ..conftest import REPO, TEST_NODE, wait_for, write_config

pytestmark = pytest.mark.integration


class RunningRelay:
    """A :class:`Relay` on its own event loop in a thread."""

    def __init__(self, settings: RelaySettings, **options):
        self.relay = Relay(settings, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.relay.run(),), daemon=True)

    def __enter__(self) -> RunningRelay:
        self.thread.start()
        wait_for(lambda: self.relay.ready is not None and self.relay.ready.is_set(), what="the relay to listen")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.relay.stop)
        self.thread.join(timeout=5)

    def stats(self, i: int = 0):
        return self.relay.ports[i].stats


#: An upstream budget no test of concurrency or of the per-client limit reaches (the defaults forward 4 at once).
UNCAPPED = {"min_interval_s": 0.001, "upstream_burst": 10_000}


def relay_to(upstream_port: int, *, allow=("127.0.0.0/8",), **options) -> tuple[RelaySettings, int]:
    listen = free_udp_ports(1)[0]
    mapping = Mapping(listen_port=listen, ntp_server="127.0.0.1", ntp_port=upstream_port,
                      min_interval_s=options.pop("min_interval_s", DEFAULT_MIN_INTERVAL_S),
                      upstream_burst=options.pop("upstream_burst", DEFAULT_UPSTREAM_BURST),
                      rate_backoff_s=options.pop("rate_backoff_s", 64.0))
    return RelaySettings(mappings=(mapping,), allow=parse_allow(list(allow)), **options), listen


def client(n: int) -> socket.socket:
    """A client socket on 127.0.0.<n>."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((f"127.0.0.{n}", 0))
    return sock


def receive(sock: socket.socket, timeout_s: float) -> bytes | None:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(2048)
    except TimeoutError:
        return None


def test_twenty_clients_at_once_each_get_their_own_reply_in_the_upstreams_time(simulator):
    sim, servers = simulator({"slow": Behaviour(delay_s=0.2)})
    upstream = int(servers["slow"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream, **UNCAPPED)
    with RunningRelay(settings) as running:
        socks = [client(2 + i) for i in range(20)]
        sent = {}
        started = time.monotonic()
        for sock in socks:
            request, transmit = packet.make_request()
            sock.sendto(request, ("127.0.0.1", listen))
            sent[sock] = transmit
        times, waiting = {}, set(socks)
        deadline = time.monotonic() + 2.0
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(list(waiting), [], [], 0.1)
            for sock in readable:
                times[sock] = time.monotonic() - started
                assert packet.parse(sock.recv(2048)).origin_ts == sent[sock]  # its own reply, nobody else's
                waiting.discard(sock)
        assert not waiting, f"{len(waiting)} clients got no reply"
        assert all(receive(sock, 0.01) is None for sock in socks)  # and only that one
        # Concurrent, not queued: everyone within the upstream's 200 ms plus a small overhead.
        assert max(times.values()) < 0.2 + 0.15, sorted(times.values())
        assert sim.stats[upstream].received == 20
        stats = running.stats()
        assert stats.answered == 20 and stats.forwarded == 20
        assert stats.quantile(0.99) is not None and stats.quantile(0.99) < 0.02
        for sock in socks:
            sock.close()


def test_a_late_reply_never_reaches_another_client(simulator):
    sim, servers = simulator({"late": Behaviour(delay_s=0.002, hold_first_s=3.0)})
    upstream = int(servers["late"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream, timeout_s=1.0)
    with RunningRelay(settings) as running:
        first, second = client(2), client(3)
        request, first_transmit = packet.make_request()
        first.sendto(request, ("127.0.0.1", listen))
        time.sleep(0.1)  # the second asks while the first's reply is outstanding (an ordering, not a wait)
        request, second_transmit = packet.make_request()
        started = time.monotonic()
        second.sendto(request, ("127.0.0.1", listen))
        data = receive(second, 1.0)
        assert data is not None and time.monotonic() - started < 0.2  # at once, not behind the first
        assert packet.parse(data).origin_ts == second_transmit
        # The first reply comes 3 s later, past its 1 s deadline: dropped and counted, delivered to nobody.
        wait_for(lambda: running.stats().late == 1, timeout_s=5, what="the late reply")
        assert receive(second, 0.2) is None
        assert receive(first, 0.2) is None
        assert running.stats().timeouts == 1
        assert sim.stats[upstream].received == 2
        first.close()
        second.close()


def test_control_queries_short_packets_and_strangers_get_nothing(simulator):
    sim, servers = simulator({"s": Behaviour()})
    upstream = int(servers["s"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream, allow=("127.0.0.1/32", "127.0.0.2/32"))
    with RunningRelay(settings) as running:
        request, _ = packet.make_request()
        friend, stranger = client(2), client(9)
        mode6 = bytes([(2 << 3) | 6]) + request[1:]  # a control (ntpq) query: an amplification vector
        friend.sendto(mode6, ("127.0.0.1", listen))
        friend.sendto(request[:47], ("127.0.0.1", listen))
        stranger.sendto(request, ("127.0.0.1", listen))
        for sock in (friend, stranger):
            assert receive(sock, 0.5) is None
        stats = running.stats()
        assert (stats.refused_mode, stats.refused_size, stats.refused_allow) == (1, 1, 1)
        assert sim.stats[upstream].received == 0  # the upstream saw nothing
        friend.close()
        stranger.close()


def test_a_client_over_its_rate_is_refused_and_the_upstream_sees_at_most_the_limit(simulator):
    sim, servers = simulator({"s": Behaviour()})
    upstream = int(servers["s"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream, **UNCAPPED)  # the client's defaults: a burst of 8, then four a second
    with RunningRelay(settings) as running:
        eager = client(2)
        for _ in range(10):
            eager.sendto(packet.make_request()[0], ("127.0.0.1", listen))
        answers = 0
        while receive(eager, 0.5) is not None:
            answers += 1
        assert answers == settings.client_burst
        assert sim.stats[upstream].received <= settings.client_burst
        assert running.stats().refused_rate == 10 - settings.client_burst
        eager.close()


def _kiss_for(sock: socket.socket, transmit: int) -> bool:
    """Whether ``sock`` got a RATE kiss carrying ``transmit`` as its origin (the requester's own)."""
    data = receive(sock, 1.0)
    if data is None:
        return False
    reply = packet.parse(data)
    return (reply.stratum, reply.ref_id, reply.origin_ts) == (0, packet.kiss_code_to_ref_id("RATE"), transmit)


def test_over_the_upstreams_budget_a_request_gets_the_relays_rate_kiss_counted_as_policy(simulator):
    """The defaults: a burst of 4 reaches the upstream; the rest are told RATE by the relay, not dropped."""
    sim, servers = simulator({"s": Behaviour()})
    upstream = int(servers["s"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream)
    assert (settings.mappings[0].upstream_burst, settings.mappings[0].min_interval_s) == (4, 4.0)
    with RunningRelay(settings) as running:
        nodes = [client(2), client(3)]
        sent = []
        for _ in range(3):  # one advanced-mode round from each of two nodes: 6 requests at once
            for sock in nodes:
                request, transmit = packet.make_request()
                sock.sendto(request, ("127.0.0.1", listen))
                sent.append((sock, transmit))
                time.sleep(0.01)  # in this order at the relay
        kissed = []
        for sock, transmit in sent:
            data = receive(sock, 1.0)
            assert data is not None, "every request is answered: by the upstream, or by the relay's kiss"
            reply = packet.parse(data)
            assert reply.origin_ts == transmit
            if reply.stratum == 0:
                assert reply.ref_id == packet.kiss_code_to_ref_id("RATE")
                kissed.append(transmit)
        assert kissed == [t for _, t in sent[4:]]  # the two past the burst
        stats = running.stats()
        assert (stats.forwarded, stats.answered, stats.policy_refused, stats.kisses_sent) == (4, 4, 2, 2)
        assert stats.refused == 0 and stats.timeouts == 0  # a policy refusal is neither a refusal nor a failure
        assert sim.stats[upstream].received == 4
        for sock in nodes:
            sock.close()


def test_min_interval_caps_what_all_clients_together_send_upstream(simulator):
    sim, servers = simulator({"pool": Behaviour()})
    upstream = int(servers["pool"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream, min_interval_s=60.0, upstream_burst=1)
    with RunningRelay(settings) as running:
        socks = [client(2 + i) for i in range(5)]
        transmits = []
        for sock in socks:
            request, transmit = packet.make_request()
            sock.sendto(request, ("127.0.0.1", listen))
            transmits.append(transmit)
            time.sleep(0.01)
        assert receive(socks[0], 1.0) is not None  # the one forwarded
        assert all(_kiss_for(sock, transmit) for sock, transmit in zip(socks[1:], transmits[1:], strict=True))
        assert sim.stats[upstream].received == 1  # one request a minute, whoever asks
        assert running.stats().policy_refused == 4
        for sock in socks:
            sock.close()


def test_a_rate_kiss_reaches_the_asker_and_the_relay_backs_off_for_everyone(simulator):
    sim, servers = simulator({"strict": Behaviour(kod="RATE")})
    upstream = int(servers["strict"].rsplit(":", 1)[1])
    settings, listen = relay_to(upstream)
    with RunningRelay(settings) as running:
        first, second = client(2), client(3)
        for sock in (first, second):
            request, transmit = packet.make_request()
            sock.sendto(request, ("127.0.0.1", listen))
            data = receive(sock, 1.0)
            assert data is not None
            reply = packet.parse(data)
            assert reply.stratum == 0 and reply.ref_id == packet.kiss_code_to_ref_id("RATE")
            assert reply.origin_ts == transmit  # the requester's own origin: its client accepts the kiss
        assert sim.stats[upstream].received == 1  # the second was answered by the relay itself
        stats = running.stats()
        assert (stats.kisses_received, stats.kisses_sent) == (1, 1)
        first.close()
        second.close()


def test_extension_fields_pass_through_untouched():
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    settings, listen = relay_to(upstream.getsockname()[1])
    with RunningRelay(settings):
        request, transmit = packet.make_request(version=4)
        extension = bytes.fromhex("0104 0024") + bytes(range(32))  # an NTS Unique Identifier field
        asker = client(2)
        asker.sendto(request + extension, ("127.0.0.1", listen))
        upstream.settimeout(1.0)
        seen, relay_address = upstream.recvfrom(2048)
        assert seen == request + extension
        reply = packet.build_reply(origin_ts=transmit, transmit_ts=1) + bytes.fromhex("0404 0014") + bytes(16)
        upstream.sendto(reply, relay_address)
        assert receive(asker, 1.0) == reply
        asker.close()
    upstream.close()


def test_a_name_that_does_not_resolve_yet_is_served_within_a_second_of_resolving(simulator):
    """A relay started before DNS works: refused while its name fails, served soon after (not in 5 min)."""
    _, servers = simulator({"up": Behaviour(delay_s=0.002)})
    upstream_port = int(servers["up"].rsplit(":", 1)[1])
    failing = threading.Event()
    failing.set()

    async def resolver(host, port, *, type=0):  # the resolver of a host whose DNS is not up yet
        if failing.is_set():
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", ("127.0.0.1", port))]

    listen = free_udp_ports(1)[0]
    settings = RelaySettings(mappings=(Mapping(listen_port=listen, ntp_server="ntp.cluster.invalid",
                                               ntp_port=upstream_port),), resolve_retry_s=0.2)
    with RunningRelay(settings, resolver=resolver) as running:
        asker = client(2)
        asker.sendto(packet.make_request()[0], ("127.0.0.1", listen))
        assert receive(asker, 0.3) is None
        assert running.stats().refused_unresolved == 1
        failing.clear()  # DNS works now
        resolved_at = time.monotonic()
        wait_for(lambda: running.relay.ports[0].upstream_address is not None, timeout_s=5,
                 what="the relay to look its name up again")
        assert time.monotonic() - resolved_at < 1.0  # the back-off had reached 0.8 s at most
        asker.sendto(packet.make_request()[0], ("127.0.0.1", listen))
        assert receive(asker, 1.0) is not None
        asker.close()


def test_a_whole_round_through_the_relay_publishes(worker, simulator, tmp_path, key_prefix, capsys):
    sim, servers = simulator({f"s{i}": Behaviour(delay_s=0.002 * (i + 1)) for i in range(3)})
    mappings, ports = [], []
    for address in servers.values():
        listen = free_udp_ports(1)[0]
        ports.append(listen)
        mappings.append(Mapping(listen_port=listen, ntp_server="127.0.0.1", ntp_port=int(address.rsplit(":", 1)[1])))
    with RunningRelay(RelaySettings(mappings=tuple(mappings))) as running:
        path = write_config(tmp_path, [f"127.0.0.1:{p}" for p in ports], key_prefix=key_prefix)
        assert cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json"]) == cli.EXIT_OK
        record = json.loads(capsys.readouterr().out)
        assert record["latest"] is not None and record["latest"]["server"] in {f"127.0.0.1:{p}" for p in ports}
        # A round published early (two of three decide it) returns before the third reply has passed the relay.
        wait_for(lambda: sum(port.stats.answered for port in running.relay.ports) >= 3, timeout_s=5,
                 what="the third server's reply through the relay")


def test_a_node_past_the_budget_is_told_rate_and_names_it_kod_rate_not_a_timeout(worker, simulator, tmp_path,
                                                                                 key_prefix, capsys):
    """What the node sees of a policy refusal: a RATE kiss its worker takes as the server's (``kod_rate``, no
    retry, the server backed off), never a silence that would read as a dead server."""
    sim, servers = simulator({f"s{i}": Behaviour(delay_s=0.002) for i in range(3)})
    mappings, ports = [], []
    for address in servers.values():
        listen = free_udp_ports(1)[0]
        ports.append(listen)
        mappings.append(Mapping(listen_port=listen, ntp_server="127.0.0.1", ntp_port=int(address.rsplit(":", 1)[1]),
                                min_interval_s=600.0, upstream_burst=1))
    with RunningRelay(RelaySettings(mappings=tuple(mappings))) as running:
        other = client(2)  # another node spends each upstream's budget first
        for listen in ports:
            other.sendto(packet.make_request()[0], ("127.0.0.1", listen))
            assert receive(other, 1.0) is not None
        other.close()
        path = write_config(tmp_path, [f"127.0.0.1:{p}" for p in ports], key_prefix=key_prefix)
        cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json"])
        record = json.loads(capsys.readouterr().out)
        assert record["latest"] is None
        for entry in record["servers"]:
            assert (entry["status"], entry["reason"], entry["kiss_code"], entry["attempts"]) == (
                "failed", "kod_rate", "RATE", 1), entry  # told, and not retried
        assert all(sim.stats[int(a.rsplit(":", 1)[1])].received == 1 for a in servers.values())
        assert [port.stats.policy_refused for port in running.relay.ports] == [1, 1, 1]
        assert sum(port.stats.timeouts for port in running.relay.ports) == 0


#: ``chronotick-ntp relay --config``, as a process: what an operator runs.
RELAY_COMMAND = [sys.executable, "-m", "orchestrator.cli", "relay", "--config"]


def test_the_relay_refuses_a_bind_off_loopback_without_allow():
    chronotick_file = REPO / "tests" / "data" / "ntp_proxy_config.yaml"
    done = subprocess.run([*RELAY_COMMAND, str(chronotick_file), "--bind", "172.20.1.1"], capture_output=True,
                          text=True, cwd=str(REPO), timeout=60)
    assert done.returncode == cli.EXIT_USAGE, "an open bind is a usage error"
    assert "--allow" in done.stderr, "the refusal names --allow"


def test_the_relay_refuses_a_bad_mapping_naming_its_key_and_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy_mappings:\n  - listen_port: 99999\n    ntp_server: time.google.com\n")
    done = subprocess.run([*RELAY_COMMAND, str(bad)], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert done.returncode == cli.EXIT_USAGE, "a bad file is a usage error"
    assert "proxy_mappings[0].listen_port" in done.stderr and "99999" in done.stderr, "the key and value are named"


def test_the_relay_writes_its_counts_to_redis_and_the_exporter_shows_them(redis_url, redis_client, tmp_path,
                                                                          simulator):
    sim, servers = simulator({"s": Behaviour()})
    upstream = int(servers["s"].rsplit(":", 1)[1])
    listen = free_udp_ports(1)[0]
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text(f"proxy_mappings:\n  - listen_port: {listen}\n    ntp_server: 127.0.0.1\n"
                     f"    ntp_port: {upstream}\n    upstream_burst: 1\n    min_interval_s: 600\n")
    prefix = f"relay{free_tcp_port()}"
    env = {"PATH": "/usr/bin:/bin", "CHRONOTICK_REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "relay", "--config", str(proxy),
                             "--key-prefix", prefix], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        from relay.counts import read_all

        asker = client(2)
        wait_for(lambda: read_all(redis_client, prefix), what="the relay's first report")
        asker.sendto(packet.make_request()[0], ("127.0.0.1", listen))
        assert receive(asker, 1.0) is not None
        request, transmit = packet.make_request()
        asker.sendto(request, ("127.0.0.1", listen))  # past the budget of one: the relay's RATE kiss
        assert _kiss_for(asker, transmit)
        wait_for(lambda: any((r.get("answered"), r.get("policy_refused")) == ("1", "1")
                             for r in read_all(redis_client, prefix)), timeout_s=20,
                 what="the answered and policy-refused counts in Redis")
        asker.close()
        from prometheus_client import generate_latest

        from orchestrator.exporter import NtpCollector, registry_for

        text = generate_latest(registry_for(NtpCollector(redis_client, prefix=prefix))).decode()
        answered = [line for line in text.splitlines()
                    if line.startswith("chronotick_ntp_relay_answered_total{") and f'port="{listen}"' in line]
        assert len(answered) == 1 and answered[0].endswith(" 1.0"), answered
        refused = [line for line in text.splitlines()
                   if line.startswith("chronotick_ntp_relay_policy_refused_total{") and f'port="{listen}"' in line]
        assert len(refused) == 1 and refused[0].endswith(" 1.0"), refused
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    # What it said at start: the limit, and what a request past it gets.
    assert f"relay port {listen} -> 127.0.0.1:{upstream}: upstream at most 1 requests at once, then one per 600 s; " \
           "over that, a RATE kiss from the relay (policy_refused)" in out, out
    assert "1 policy-refused (over budget: RATE)" in out, out
